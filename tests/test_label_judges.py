"""Judge labelling on real engines: the tiny model as a local vLLM judge (the session `llm`), the same model
behind a real `vllm serve` on loopback as an HTTP judge, and the label and pairs stages end to end with several
annotators (iREPO's p̂ recomputed from the stored per-annotator values)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import JudgeConfig, RunConfig
from pipeline.data.artifacts import execute
from pipeline.method.judges import HttpJudge, VllmJudge, bradley_terry, compare, load_template
from pipeline.run import rounds
from stages import label, pairs
from tests.conftest import free_port, stop, wait_for
from tests.test_judges import write_responses

QUESTIONS = [
    (
        "Explain why the sky is blue.",
        "Because sunlight scatters off air molecules, blue the most.",
        "I like cats.",
    ),
    (
        "Write a haiku about rain.",
        "Soft rain on the roof / the garden drinks slowly / clouds drift away",
        "Rain.",
    ),
    ("What is 12 times 7?", "84", "12 times 7 is 84, since 12 times 7 equals 10 times 7 plus 2 times 7."),
    ("Give a tip for sleeping well.", "Keep a regular schedule.", "Sleep."),
]


def _local(llm, tiny_model, **kw) -> VllmJudge:
    from transformers import AutoTokenizer

    cfg = JudgeConfig(backend="vllm", **kw)
    return VllmJudge(
        "local",
        cfg,
        load_template(cfg.template),
        llm,
        AutoTokenizer.from_pretrained(tiny_model),
        str(tiny_model),
    )


@pytest.fixture(scope="session")
def vllm_server(tiny_model, tmp_path_factory):
    """A real `vllm serve` (the OpenAI-compatible server) of the tiny model on loopback, once per session."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    from pipeline.compute.engine import short_rpc_path

    env = short_rpc_path({k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"})
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20), "--seed", "0"]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited ({proc.returncode}):\n" + log_path.read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 240, "vllm serve", every=0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)


@pytest.mark.parametrize("fmt", ["chat", "completion"])
def test_http_judge_matches_local_judge(llm, tiny_model, vllm_server, fmt):
    """The same model judged locally (top log-probs from the in-process engine, answer tokens resolved by id) and
    over HTTP (`vllm serve`'s /v1/chat/completions or /v1/completions, answer tokens matched by text) gives the
    same probabilities in both orders."""
    local = _local(llm, tiny_model, format=fmt)
    remote_cfg = JudgeConfig(
        backend="http", url=vllm_server, model="tiny", format=fmt, concurrency=2, timeout_s=60
    )
    remote = HttpJudge("remote", remote_cfg, load_template(remote_cfg.template))
    ours, theirs = compare(local, QUESTIONS), compare(remote, QUESTIONS)
    assert all(c.error is None for c in ours + theirs), [c.detail for c in ours + theirs if c.error]
    for a, b in zip(ours, theirs):
        assert a.p_ab == pytest.approx(b.p_ab, abs=1e-4) and a.p_ba == pytest.approx(b.p_ba, abs=1e-4)
        assert a.p == pytest.approx(b.p, abs=1e-4)
    # the tiny model is a strongly position-biased judge: most of its p_AB is the bias, which symmetrising removes
    assert np.mean([c.p_ab for c in ours]) > 0.6 and all(abs(c.p - 0.5) < abs(c.p_ab - 0.5) for c in ours)


def test_local_judge_bad_input(llm, tiny_model, tmp_path):
    """Answer tokens that are not single tokens are an error naming the judge and the token; answer tokens outside
    the top log-probs are a counted failure of that comparison; a prompt longer than the judge's context too."""
    with pytest.raises(ValueError, match=r"judge local: answer token 'Response A' is \d+ tokens"):
        _local(llm, tiny_model, answer_tokens=("Response A", "Response B"))
    narrow = _local(
        llm, tiny_model, top_logprobs=2, answer_tokens=("A", "B")
    )  # B is not in the model's top 2
    (c,) = compare(narrow, QUESTIONS[:1])
    assert c.p is None and c.error == "answer_token_absent" and "'B'" in c.detail
    long = compare(_local(llm, tiny_model), [("word " * 1100, "a", "b")])[0]
    assert long.error == "too_long"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; set format: completion"):
        VllmJudge("local", JudgeConfig(), load_template("conf/judges/pairwise.txt"), llm, tok, "m")


def _judge_cfg(tmp_path, tiny_model, strategy="best_worst", **label_kw) -> RunConfig:
    judges = [
        {"id": "tiny-long", "backend": "vllm", "model": str(tiny_model)},
        {
            "id": "tiny-brief",
            "backend": "vllm",
            "model": str(tiny_model),
            "template": "conf/judges/pairwise-brief.txt",
        },
        {
            "id": "overlap",
            "backend": "python",
            "function": "pipeline.method.judges:overlap_judge",
            "options": {"noise": 0.5},
        },
    ]
    return RunConfig.model_validate({
        "runs_dir": str(tmp_path / "runs"), "round0": {"mode": "skip"}, "model": {"policy": str(tiny_model)},
        "label": {"labeller": "judge", "judges": judges, **label_kw},
        "pairs": {"replay_ratio": 0.0, "strategy": strategy}, "data": {"offline": "data/offline_prefs.jsonl"},
    })  # fmt: skip


RESPONSES = {
    "p0": [
        "Explain something: here is a clear explanation of it.",
        "No.",
        "Question p0 explain something well",
        "ok",
    ],
    "p1": ["Something explained, step by step.", "Question p1: explain something. Explain!", "Hmm, maybe."],
    "p2": ["An explanation.", "Another explanation of something for question p2.", "Something"],
}


def test_label_and_pairs_with_three_annotators(llm, tiny_model, tmp_path):
    """Two local judges (two templates) and a simulated Python annotator label every pair of every prompt in both
    orders; preferences.parquet keeps each annotator's p_ab, p_ba and p; iREPO's p̂ of every pair and the ranking
    are recomputed here from those stored values alone."""
    cfg = _judge_cfg(tmp_path, tiny_model)
    write_responses(cfg, RESPONSES)
    plan = rounds.plan(cfg, 1, "label")
    assert {"judge:tiny-long", "judge:tiny-brief", "template:tiny-long", "template:tiny-brief"} <= set(
        plan.inputs
    )
    stats = execute(plan, lambda: label.run(cfg, plan, engines={str(tiny_model): llm}))["stats"]
    prefs = pd.read_parquet(plan.outputs["preferences"])
    n_pairs = 6 + 3 + 3  # C(4,2) + C(3,2) + C(3,2)
    assert (
        len(prefs) == 3 * n_pairs and stats["comparisons"] == 3 * n_pairs and stats["comparisons_failed"] == 0
    )
    assert set(prefs.annotator) == {"tiny-long", "tiny-brief", "overlap"} and prefs.p.notna().all()
    np.testing.assert_allclose(prefs.p, 0.5 * (prefs.p_ab + 1 - prefs.p_ba))
    # the two templates are different annotators: their answers differ
    by = prefs.pivot_table(index=["prompt_id", "idx_a", "idx_b"], columns="annotator", values="p")
    assert (by["tiny-long"] - by["tiny-brief"]).abs().max() > 1e-3

    # p̂ = mean over the annotators, and the ranking (Bradley-Terry on p̂) reproduced from the Parquet alone
    p_hat = by.mean(axis=1)
    labels = pd.read_parquet(plan.outputs["labels"])
    assert (labels.labeller == "judge").all() and labels.reward.notna().all()
    for pid, g in labels.groupby("prompt_id"):
        k = len(g)
        comps = [(a, b) for a, b in itertools.combinations(range(k), 2)]
        est = bradley_terry(k, np.array([a for a, _ in comps]), np.array([b for _, b in comps]),
                            np.array([p_hat[(pid, a, b)] for a, b in comps]), cfg.label.ranking_prior)  # fmt: skip
        np.testing.assert_allclose(g.sort_values("sample_idx").reward, est, atol=1e-9)

    pplan = rounds.plan(cfg, 1, "pairs")
    assert "preferences" in pplan.inputs
    pstats = execute(pplan, lambda: pairs.run(cfg, pplan))["stats"]
    out = pd.read_parquet(pplan.outputs["pairs"])
    assert pstats["alpha"] == 0.0 and len(out) == 3  # best_worst: one pair per prompt, no length α for judges
    for row in out.itertuples():
        g = labels[labels.prompt_id == row.prompt_id]
        w = g[g.response == row.chosen].sample_idx.item()
        l_ = g[g.response == row.rejected].sample_idx.item()
        assert row.chosen_reward == g.reward.max() and row.rejected_reward == g.reward.min()
        expected = p_hat[(row.prompt_id, min(w, l_), max(w, l_))]
        assert row.preference == pytest.approx(expected if w < l_ else 1 - expected, abs=1e-12)
        assert row.annotators == 3


def test_pairs_strategies_with_judges(llm, tiny_model, tmp_path):
    """all_pairs: every compared pair, chosen = the side p̂ prefers; random: one disjoint random pair per prompt,
    seeded; min_annotators drops comparisons too few annotators answered."""
    cfg = _judge_cfg(tmp_path, tiny_model, strategy="all_pairs", ranking="copeland")
    write_responses(cfg, RESPONSES)
    plan = rounds.plan(cfg, 1, "label")
    execute(plan, lambda: label.run(cfg, plan, engines={str(tiny_model): llm}))
    labels = pd.read_parquet(plan.outputs["labels"])
    assert set(labels.reward) <= set(range(-3, 4))  # Copeland: wins − losses
    pplan = rounds.plan(cfg, 1, "pairs")
    execute(pplan, lambda: pairs.run(cfg, pplan))
    out = pd.read_parquet(pplan.outputs["pairs"])
    assert (
        len(out) == 12
        and out.pair_id.is_unique
        and (out.preference > 0.5).all()
        and (out.annotators == 3).all()
    )

    cfg = cfg.model_copy(update={"pairs": cfg.pairs.model_copy(update={"strategy": "random"})})
    pplan = rounds.plan(cfg, 1, "pairs")
    execute(pplan, lambda: pairs.run(cfg, pplan))
    first = pd.read_parquet(pplan.outputs["pairs"])
    assert len(first) == 3 and first.prompt_id.is_unique and (first.preference > 0.5).all()
    execute(pplan, lambda: pairs.run(cfg, pplan), force=True)
    assert pd.read_parquet(pplan.outputs["pairs"]).equals(first)  # seeded by (seed, round)


def test_local_judge_matches_transformers_logits(llm, tiny_model):
    """p_AB from vLLM's top log-probs equals softmax over the two answer tokens' logits of a plain transformers
    forward on the same prompt ids (two independent implementations of METHODS.md §6)."""
    from transformers import AutoModelForCausalLM

    judge = _local(llm, tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for (x, a, b), c in zip(QUESTIONS, compare(judge, QUESTIONS)):
        for (first, second), got in (((a, b), c.p_ab), ((b, a), c.p_ba)):
            ids = torch.tensor([judge.prompt_ids(x, first, second)])
            with torch.no_grad():
                logits = model(ids).logits[0, -1].double()  # (V,)
            expected = torch.softmax(logits[list(judge.answer_ids)], -1)[0].item()
            assert got == pytest.approx(expected, abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_judge_and_reward_model(tiny_model, tmp_path):
    """The label stage's own CUDA vLLM judge engine (bf16) labels every pair; p is symmetrised and within [0, 1]."""
    cfg = _judge_cfg(tmp_path, tiny_model)
    cfg.label.engine = cfg.label.engine.model_copy(update={"kv_cache_memory_bytes": None, "gpu_memory_utilization": 0.3})
    write_responses(cfg, RESPONSES)
    plan = rounds.plan(cfg, 1, "label")
    stats = execute(plan, lambda: label.run(cfg, plan))["stats"]
    assert stats["comparisons_failed"] == 0 and rounds.gpus_used(cfg, "label") == 1
    prefs = pd.read_parquet(plan.outputs["preferences"])
    np.testing.assert_allclose(prefs.p, 0.5 * (prefs.p_ab + 1 - prefs.p_ba))
    assert prefs.p.between(0, 1).all()
