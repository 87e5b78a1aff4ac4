"""AI annotators (pipeline/method/judges.py) without a model: templates, the soft-probability arithmetic, response parsing,
rankings, and the HTTP backend against a real threaded HTTP server of our own that answers in the OpenAI format
and fails or times out on a fraction of requests. The label stage runs for real on hand-made responses."""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.config import ConfigError, JudgeConfig, RunConfig
from pipeline.data import schemas
from pipeline.data.artifacts import execute, write_parquet
from pipeline.method.judges import (
    HttpJudge,
    JudgeFailure,
    PythonJudge,
    answer_probability,
    bradley_terry,
    compare,
    copeland,
    load_template,
    parse_chat,
    parse_completion,
    symmetrise,
)
from pipeline.run import rounds
from pipeline.run.report import round_summary
from stages import label, pairs

AB = ("A", "B")


# ---------------------------------------------------------------------------------------------- templates


def test_template_placeholders(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("Q: {instruction}\nA: {response_a}\nB: {response_b}\nLiteral {{braces}}. Answer:")
    t = load_template(good)
    assert t.fill("x?", "first", "se{c}ond") == "Q: x?\nA: first\nB: se{c}ond\nLiteral {braces}. Answer:"

    missing = tmp_path / "missing.txt"
    missing.write_text("Q: {instruction}\nA: {response_a}\nAnswer:")  # no {response_b}
    with pytest.raises(ValueError, match=r"missing\.txt: missing placeholder\(s\) \{response_b\}"):
        load_template(missing)
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("{instruction} {response_a} {response_b} {question}")
    with pytest.raises(ValueError, match=r"unknown\.txt: unknown placeholder\(s\) \{question\}"):
        load_template(unknown)
    broken = tmp_path / "broken.txt"
    broken.write_text("{instruction} {response_a} {response_b} {")
    with pytest.raises(ValueError, match=r"broken\.txt: not a valid template"):
        load_template(broken)
    with pytest.raises(ValueError, match=r"nowhere\.txt: file not found"):
        load_template(tmp_path / "nowhere.txt")


def test_shipped_templates_load(repo):
    for path in sorted((repo / "conf/judges").glob("*.txt")):
        load_template(path)


# ---------------------------------------------------------------------------------------------- arithmetic


def test_answer_probability_and_symmetrisation():
    """p = softmax([ℓ_A, ℓ_B])[0]: log-probs log 0.6 and log 0.2 -> 0.6 / (0.6 + 0.2) = 0.75.
    Both orders: p_AB = 0.75, p_BA = 0.35 -> p = ½(0.75 + 1 − 0.35) = 0.7."""
    assert answer_probability(math.log(0.6), math.log(0.2)) == pytest.approx(0.75)
    assert answer_probability(-1000.0, 0.0) == pytest.approx(0.0)  # no overflow at extreme logits
    assert symmetrise(0.75, 0.35) == pytest.approx(0.7)
    # a judge that always says "the first one" with 0.9: ½(0.9 + 1 − 0.9) = ½, whatever the responses
    assert symmetrise(0.9, 0.9) == pytest.approx(0.5)


def first_position(prompt: str, response_a: str, response_b: str, *, strength: float = 0.9) -> float:
    """A judge with pure position bias: prefers whatever it is shown first."""
    return strength


def flaky(prompt: str, response_a: str, response_b: str) -> float:
    if "boom" in response_a:
        raise RuntimeError("the judge crashed")
    return 1.7 if "big" in response_a else 0.5  # 1.7 is not a probability


def test_position_biased_judge_gives_one_half():
    judge = PythonJudge(
        "biased", JudgeConfig(backend="python", function="x:y", options={"strength": 0.9}), first_position
    )
    out = compare(judge, [("q", "a long careful answer", "no"), ("q", "no", "a long careful answer")])
    assert [c.p_ab for c in out] == [0.9, 0.9] and [c.p_ba for c in out] == [0.9, 0.9]
    assert [c.p for c in out] == [pytest.approx(0.5)] * 2


def test_python_judge_failures_are_recorded():
    judge = PythonJudge("flaky", JudgeConfig(backend="python", function="x:y"), flaky)
    ok, crash, bad = compare(judge, [("q", "one", "two"), ("q", "boom", "two"), ("q", "two", "big")])
    assert ok.p == pytest.approx(0.5) and ok.error is None
    assert crash.p is None and crash.error == "python_error" and "the judge crashed" in crash.detail
    assert crash.detail.startswith("a first: ")
    assert (
        bad.p is None and bad.error == "invalid_probability" and bad.detail.startswith("b first: ")
    )  # ("big", "two")


def test_parse_openai_bodies():
    completion = {
        "choices": [{"logprobs": {"top_logprobs": [{"A": math.log(0.3), "B": math.log(0.1), "C": -0.5}]}}]
    }
    assert parse_completion(completion, AB) == pytest.approx(0.75)
    chat = {"choices": [{"logprobs": {"content": [{"token": "B", "top_logprobs": [
        {"token": "B", "logprob": math.log(0.6)}, {"token": "A", "logprob": math.log(0.2)}]}]}}]}  # fmt: skip
    assert parse_chat(chat, AB) == pytest.approx(0.25)
    cases = [
        (parse_completion, {"error": "nope"}, "unparseable"),  # no choices
        (parse_completion, {"choices": [{"text": "A", "logprobs": None}]}, "missing_logprobs"),
        (parse_completion, {"choices": [{"logprobs": {"top_logprobs": [{"A": -0.1, "C": -2.0}]}}]}, "answer_token_absent"),
        (parse_completion, {"choices": [{"logprobs": {"top_logprobs": [{"A": "x", "B": -2.0}]}}]}, "unparseable"),
        (parse_chat, {"choices": [{"message": {"content": "A"}}]}, "missing_logprobs"),
        (parse_chat, {"choices": [{"logprobs": {"content": [{"token": "A", "top_logprobs": [{"tok": "A"}]}]}}]},
         "unparseable"),
        (parse_chat, {"choices": [{"logprobs": {"content": [{"token": "A", "top_logprobs": [
            {"token": "A", "logprob": -0.1}]}]}}]}, "answer_token_absent"),
    ]  # fmt: skip
    for parse, body, reason in cases:
        with pytest.raises(JudgeFailure) as e:
            parse(body, AB)
        assert e.value.reason == reason, body


# ---------------------------------------------------------------------------------------------- rankings


def test_bradley_terry_recovers_strengths():
    """With exact p_ij = σ(s_i − s_j) from known strengths, the (lightly regularised) MLE recovers s up to a shift."""
    s = np.array([1.5, 0.0, -0.7, 0.4, -1.2])
    i, j = np.triu_indices(5, 1)
    p = 1 / (1 + np.exp(-(s[i] - s[j])))
    est = bradley_terry(5, i, j, p, prior=1e-6)
    np.testing.assert_allclose(est - est.mean(), s - s.mean(), atol=1e-3)
    # a response that wins every comparison keeps a finite score thanks to the prior, and ranks first
    est = bradley_terry(3, np.array([0, 0, 1]), np.array([1, 2, 2]), np.array([1.0, 1.0, 0.5]), prior=0.01)
    assert np.all(np.isfinite(est)) and est.argmax() == 0 and est[1] == pytest.approx(est[2])
    # a response in no comparison has no score
    assert np.isnan(bradley_terry(3, np.array([0]), np.array([1]), np.array([0.7]))[2])


def test_copeland():
    # 0 beats 1 (0.8) and 2 (0.6); 1 vs 2 is a tie (0.5); 3 is never compared
    scores = copeland(4, np.array([0, 0, 1]), np.array([1, 2, 2]), np.array([0.8, 0.6, 0.5]))
    assert scores[:3].tolist() == [2.0, -1.0, -1.0] and np.isnan(scores[3])


# ---------------------------------------------------------------------------------------------- config


def test_judge_config_errors(tmp_path):
    with pytest.raises(ValueError, match="needs `url` and `model`"):
        JudgeConfig(backend="http")
    with pytest.raises(ValueError, match="answer_tokens must differ"):
        JudgeConfig(answer_tokens=("A", "A"))
    with pytest.raises(ValueError, match="api_key_env"):
        JudgeConfig(backend="http", url="http://x/v1", model="m", api_key_env="sk-not-a-name!")
    with pytest.raises(ValueError, match="label.judges must list"):
        RunConfig.model_validate({"label": {"labeller": "judge"}})
    with pytest.raises(ValueError, match="ids must be unique"):
        RunConfig.model_validate({"label": {"labeller": "judge", "judges": [{"id": "x"}, {"id": "x"}]}})
    from pipeline.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text("label:\n  labeller: judge\n  judges:\n    - backend: vllm\n      temperature: 0.5\n")
    with pytest.raises(ConfigError, match=r"(?s)c\.yaml.*label\.judges\.0\.temperature"):
        load_config(p)
    t = load_template("conf/judges/pairwise.txt")
    with pytest.raises(ValueError, match="must not carry credentials"):  # refused when the config loads
        HttpJudge("j", JudgeConfig(backend="http", url="http://user:pw@127.0.0.1:1/v1", model="m"), t)
    with pytest.raises(ValueError, match="DICE_TEST_UNSET_KEY .*is not set"):
        HttpJudge("j", JudgeConfig(backend="http", url="http://127.0.0.1:1/v1", model="m",
                                   api_key_env="DICE_TEST_UNSET_KEY"), t)  # fmt: skip


# ---------------------------------------------------------------------------------------------- HTTP


class StubJudgeServer:
    """A real threaded HTTP server answering /v1/chat/completions and /v1/completions in the OpenAI format.

    Its judge prefers the longer response and has a position bias: P(first) = σ((len_a − len_b)/20 + 1).
    `faults(body, attempt)` decides, per request, whether to fail: "500", "429", "timeout" (sleep past the
    client's timeout), "garbage" (not JSON), "no_logprobs", "absent" (answer tokens not in the top log-probs),
    or None to answer. Every request is counted, with its Authorization header.
    """

    def __init__(self, faults=None, sleep_s: float = 1.0):
        self.faults = faults or (lambda body, attempt: None)
        self.sleep_s = sleep_s
        self.requests: Counter[str] = Counter()  # payload -> times received
        self.outcomes: Counter[str] = Counter()
        self.auth: set[str | None] = set()
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                key = json.dumps(body, sort_keys=True)
                with stub.lock:
                    stub.requests[key] += 1
                    attempt = stub.requests[key]
                    stub.auth.add(self.headers.get("Authorization"))
                fault = stub.faults(body, attempt)
                with stub.lock:
                    stub.outcomes[fault or "ok"] += 1
                if fault == "timeout":
                    threading.Event().wait(stub.sleep_s)
                    fault = "500"  # whatever comes after the client gave up
                if fault in ("500", "429"):
                    return self._send(int(fault), b'{"error": "injected"}')
                if fault == "garbage":
                    return self._send(200, b"<html>not json</html>")
                text = body["messages"][0]["content"] if "messages" in body else body["prompt"]
                a, b = re.search(r"A: (.*)\nB: (.*)\n", text, re.DOTALL).groups()
                p_first = 1 / (1 + math.exp(-((len(a) - len(b)) / 20 + 1)))
                tokens = {"A": math.log(p_first), "B": math.log(1 - p_first), "C": -9.0}
                if fault == "absent":
                    tokens = {"C": -0.1, "D": -3.0}
                if "messages" in body:
                    top = [{"token": t, "logprob": v} for t, v in tokens.items()]
                    lp = (
                        None
                        if fault == "no_logprobs"
                        else {"content": [{"token": "A", "logprob": -0.1, "top_logprobs": top}]}
                    )
                    out = {"choices": [{"message": {"role": "assistant", "content": "A"}, "logprobs": lp}]}
                else:
                    lp = None if fault == "no_logprobs" else {"tokens": ["A"], "top_logprobs": [tokens]}
                    out = {"choices": [{"text": "A", "logprobs": lp}]}
                self._send(200, json.dumps(out).encode())

            def _send(self, code: int, data: bytes):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


STUB_TEMPLATE = "Instruction: {instruction}\nA: {response_a}\nB: {response_b}\nWhich is better, A or B?"


def write_responses(cfg, spec, k=1):
    """spec: {prompt_id: [response, ...]} -> the round's responses.parquet (RESPONSES), finish_reason stop."""
    rows = []
    for pid, texts in spec.items():
        for s, text in enumerate(texts):
            rows.append({
                "prompt_id": pid, "prompt": f"Question {pid}: explain something.", "sample_idx": s, "response": text,
                "num_tokens": max(len(text) // 4, 1), "num_chars": len(text), "finish_reason": "stop",
                "cumulative_logprob": -1.0, "seed": 0, "model": "m", "round": k,
            })  # fmt: skip
    path = rounds.round_dir(cfg, k) / "responses.parquet"
    write_parquet(pa.Table.from_pylist(rows, schema=schemas.RESPONSES), path, schemas.RESPONSES)
    return path


SPEC = {
    f"p{i}": [("word " * (3 + 5 * s + i)).strip() for s in range(4)] for i in range(6)
}  # 6 prompts × 4 lengths


def http_config(tmp_path, url, judges_extra=None, **label_kw):
    template = tmp_path / "stub.txt"
    template.write_text(STUB_TEMPLATE)
    judge = {"id": "stub", "backend": "http", "url": url, "model": "stub-judge", "template": str(template),
             "timeout_s": 0.3, "max_retries": 2, "backoff_s": 0.01, "concurrency": 4, **(judges_extra or {})}  # fmt: skip
    return RunConfig.model_validate({
        "runs_dir": str(tmp_path / "runs"), "round0": {"mode": "skip"},
        "label": {"labeller": "judge", "judges": [judge], **label_kw}, "pairs": {"replay_ratio": 0.0},
        "data": {"offline": "data/offline_prefs.jsonl"},
    })  # fmt: skip


def _fault_by_content(body, attempt):
    """Deterministic faults per request content: some fail once then succeed, some always fail."""
    text = body["messages"][0]["content"] if "messages" in body else body["prompt"]
    h = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 20
    if h in (0, 1):
        return "timeout" if attempt == 1 else None  # retried, then answered
    if h == 2:
        return "500" if attempt <= 2 else None  # two 500s, the third attempt answers (max_retries=2)
    if h == 3:
        return "429" if attempt == 1 else None
    if h == 4:
        return "500"  # every attempt fails: recorded as http_500 after 3 attempts
    if h == 5:
        return "garbage"  # not retried: unparseable
    if h == 6:
        return "absent"  # not retried: answer tokens absent
    return None


@pytest.mark.parametrize("fmt", ["chat", "completion"])
def test_http_judge_with_failing_server(tmp_path, monkeypatch, fmt):
    """A server that fails, times out or answers garbage on a fraction of requests: the label stage completes,
    retryable failures are retried, the rest are recorded per comparison and counted; nothing is labelled from a
    failed comparison; the API key travels as a header only and appears in no file the round writes."""
    secret = "sk-test-0123456789-do-not-store"
    monkeypatch.setenv("DICE_TEST_JUDGE_KEY", secret)
    with StubJudgeServer(_fault_by_content) as server:
        cfg = http_config(tmp_path, server.url, {"api_key_env": "DICE_TEST_JUDGE_KEY", "format": fmt})
        write_responses(cfg, SPEC)
        plan = rounds.plan(cfg, 1, "label")
        assert not any("DICE_TEST_JUDGE_KEY" in str(v) or secret in str(v) for v in plan.inputs.values())
        stats = execute(plan, lambda: label.run(cfg, plan))["stats"]
        pplan = rounds.plan(cfg, 1, "pairs")
        pstats = execute(pplan, lambda: pairs.run(cfg, pplan))["stats"]
    assert server.auth == {f"Bearer {secret}"}
    prefs = pd.read_parquet(plan.outputs["preferences"])
    assert len(prefs) == 6 * 6  # 6 prompts × C(4, 2) pairs × 1 annotator
    # every request the server received is an attempt the stage counted
    assert prefs.attempts.sum() == sum(server.requests.values()) == stats["attempts"]
    assert stats["retries"] == stats["attempts"] - 2 * len(prefs) > 0
    failed = prefs[prefs.p.isna()]
    assert len(failed) == stats["comparisons_failed"] > 0 and stats["comparisons_ok"] == len(prefs) - len(
        failed
    )
    # timeouts and 429s were injected on first attempts only: retried, then answered, never recorded
    assert min(server.outcomes[f] for f in ("timeout", "500", "429", "garbage", "absent")) > 0
    assert set(failed.error) == {"http_500", "unparseable", "answer_token_absent"}  # the permanent faults
    assert (
        failed[failed.error == "http_500"].attempts >= 3 + 1
    ).all()  # 1 + max_retries, and the other order
    assert stats["failures_by_reason"] == failed.error.value_counts().to_dict()
    assert prefs.p.notna().sum() > len(prefs) // 2  # most comparisons survive
    assert (prefs.error.isna() == prefs.p.notna()).all()
    # a surviving comparison is exactly the symmetrised stub judge (longer preferred, position bias cancelled)
    ok = prefs[prefs.p.notna()]
    np.testing.assert_allclose(ok.p, 0.5 * (ok.p_ab + 1 - ok.p_ba), rtol=1e-12)
    row = ok.iloc[0]
    la, lb = (len(SPEC[row.prompt_id][row.idx_a]), len(SPEC[row.prompt_id][row.idx_b]))

    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    assert row.p_ab == pytest.approx(sig((la - lb) / 20 + 1)) and row.p_ba == pytest.approx(
        sig((lb - la) / 20 + 1)
    )
    # the round's report counts them; no file of the round holds the key
    summary = round_summary(rounds.round_dir(cfg, 1))
    assert summary["label_failed"] == len(failed) and summary["label_comparisons"] == len(prefs)
    assert summary["label_retries"] == stats["retries"]
    for f in rounds.round_dir(cfg, 1).rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    # pairs use only answered comparisons; the judge prefers longer answers, so chosen is the longest response
    out = pd.read_parquet(pplan.outputs["pairs"])
    lost = (
        pstats["dropped_no_comparison"]
        + pstats["prompts_below_min_valid"]
        + pstats["dropped_preference_ties"]
    )
    assert len(out) == 6 - lost > 0 and (out.chosen.str.len() > out.rejected.str.len()).all()
    assert (out.annotators == 1).all() and (out.preference > 0.5).all()


def test_http_judge_position_bias_cancels(tmp_path):
    """Equal-length responses: the stub's preference is its position bias alone, σ(1) ≈ 0.73 for whichever is
    shown first, in both orders; symmetrised, p = ½ exactly where the bias was all there was."""
    with StubJudgeServer() as server:
        cfg = http_config(tmp_path, server.url, {"format": "completion"})
        judge = HttpJudge("biased", cfg.label.judges[0], load_template(cfg.label.judges[0].template))
        out = compare(judge, [("q", "same length one", "same length two"), ("q", "abc", "xyz")])
    assert all(c.p_ab == pytest.approx(1 / (1 + math.exp(-1))) == c.p_ba for c in out)
    assert all(c.p == pytest.approx(0.5) for c in out)


def test_all_comparisons_failing_is_an_error(tmp_path):
    """A judge that never answers (e.g. a wrong model name: HTTP 404 every time) is a configuration error, not a
    round of unlabelled responses; the message names the reason and the server's reply."""
    with StubJudgeServer(lambda body, attempt: "garbage") as server:
        cfg = http_config(tmp_path, server.url)
        write_responses(cfg, {"p0": ["one", "two two"]})
        plan = rounds.plan(cfg, 1, "label")
        with pytest.raises(ValueError, match="every judge comparison failed.*unparseable.*not JSON"):
            label.run(cfg, plan)


def test_unreachable_server_is_recorded(tmp_path):
    """Connection refused is retried, then recorded (connection_error); with every comparison failing, an error."""
    from tests.conftest import free_port

    cfg = http_config(tmp_path, f"http://127.0.0.1:{free_port()}/v1", {"max_retries": 1})
    judge = HttpJudge("down", cfg.label.judges[0], load_template(cfg.label.judges[0].template))
    (c,) = compare(judge, [("q", "a", "b")])
    assert c.p is None and c.error == "connection_error" and c.attempts == 4  # 2 orders × (1 + 1 retry)


def test_stage_cli_names_a_bad_template(tmp_path):
    """`python -m stages.label` with a template lacking a placeholder: a one-line error naming the file, exit 2."""
    import subprocess
    import sys

    from tests.conftest import REPO

    bad = tmp_path / "bad.txt"
    bad.write_text("Which is better? {response_a} or {response_b}")  # no {instruction}
    conf = tmp_path / "judge.yaml"
    conf.write_text(
        f"runs_dir: {tmp_path / 'runs'}\nround0: {{mode: skip}}\nlabel:\n  labeller: judge\n  judges:\n"
        f"    - {{backend: http, url: 'http://127.0.0.1:9/v1', model: m, template: {bad}}}\n"
    )
    cfg = http_config(tmp_path, "http://127.0.0.1:9/v1")
    write_responses(cfg.model_copy(update={"name": "tiny"}), {"p0": ["a", "b"]})
    proc = subprocess.run([sys.executable, "-m", "stages.label", str(conf), "--round", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"dice label: error: judge template {bad}: missing placeholder(s) {{instruction}}" in proc.stderr
    assert "Traceback" not in proc.stderr
