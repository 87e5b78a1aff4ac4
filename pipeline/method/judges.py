"""AI annotators: pairwise judge templates, soft preferences from answer-token logits, judge backends, rankings.

../shared/METHODS.md §6. A judge sees an instruction and two responses in a fixed template and answers with
one token, "A" or "B". Its soft preference is read from the next-token log-probs of the two answer tokens,
    p_AB = softmax([ℓ_A, ℓ_B])[0] = σ(ℓ_A − ℓ_B)      (log-probs and logits differ by one constant per position)
and, to cancel position bias, it is asked in both orders and averaged: p = ½(p_AB + 1 − p_BA). N annotators
(models, templates or seeds) give p̂ = mean of their p. For K > 2 responses a ranking over the pairwise p̂
(Bradley-Terry / Zermelo maximum likelihood, or Copeland) picks best and worst.

Backends answer ordered questions "P(first ≻ second)", one `Verdict` each:
  - `VllmJudge`: a local model on the vLLM engine; the top log-probs of the first generated token, the answer
    tokens resolved to ids with the judge's own tokenizer (each must be a single token).
  - `HttpJudge`: any OpenAI-compatible server (`vllm serve`, hosted APIs) through /v1/chat/completions or
    /v1/completions with `logprobs`; bounded concurrency, timeouts, retries with exponential backoff. The API
    key is read from the environment variable NAMED in the config, sent only as a header, and never logged,
    stored in an artifact, or echoed in an error (details are redacted).
  - `PythonJudge`: a callable 'module:function'(prompt, response_a, response_b, **options) -> P(a ≻ b) in
    [0, 1], with `options` from the config: the place for rule-based or simulated annotators (see
    `overlap_judge`). It is called for both orders, like any judge.
A question that fails (timeout, HTTP error, unparseable body, missing log-probs, an answer token outside the
top log-probs, a bad probability) is retried where that can help, then recorded with its reason: never labelled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import string
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import JudgeConfig

PLACEHOLDERS = ("instruction", "response_a", "response_b")
RETRYABLE_HTTP = {408, 409, 425, 429}  # and every 5xx
_DETAIL_CHARS = 300


# ---------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class JudgeTemplate:
    """A pairwise prompt template: plain text with {instruction}, {response_a}, {response_b} ({{ }} for braces)."""

    path: str
    text: str

    def fill(self, instruction: str, response_a: str, response_b: str) -> str:
        return self.text.format(instruction=instruction, response_a=response_a, response_b=response_b)


def load_template(path: str | Path) -> JudgeTemplate:
    """Read and check a judge template.

    Raises:
        ValueError: naming the file, when it is missing, unparseable, lacks a required placeholder or has an
            unknown one.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"judge template {p}: file not found")
    text = p.read_text()
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ValueError(
            f"judge template {p}: not a valid template ({e}); write literal braces as {{{{ }}}}"
        ) from e
    missing = [f for f in PLACEHOLDERS if f not in fields]
    unknown = sorted({f for f in fields if f not in PLACEHOLDERS})
    if missing or unknown:
        what = []
        if missing:
            what.append("missing placeholder(s) " + ", ".join("{" + f + "}" for f in missing))
        if unknown:
            what.append("unknown placeholder(s) " + ", ".join("{" + f + "}" for f in unknown))
        raise ValueError(
            f"judge template {p}: {'; '.join(what)} (needs {{instruction}}, {{response_a}}, {{response_b}})"
        )
    return JudgeTemplate(str(p), text)


# ---------------------------------------------------------------------------------------------- probabilities


def answer_probability(logprob_a: float, logprob_b: float) -> float:
    """p = softmax([ℓ_A, ℓ_B])[0] = σ(ℓ_A − ℓ_B): P(the first response is better) from the two answer tokens."""
    z = logprob_a - logprob_b
    if z >= 0:  # the two branches keep exp() from overflowing at extreme log-probs (e.g. -9999 placeholders)
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def symmetrise(p_ab: float, p_ba: float) -> float:
    """p = ½(p_AB + 1 − p_BA): the preference for a over b with position bias cancelled (METHODS.md §6)."""
    return 0.5 * (p_ab + 1.0 - p_ba)


class JudgeFailure(Exception):
    """One question could not be answered: `reason` is a short code recorded in preferences.parquet."""

    def __init__(self, reason: str, detail: str = "", retryable: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.retryable = reason, detail[:_DETAIL_CHARS], retryable


@dataclass(frozen=True)
class Verdict:
    """The answer to one ordered question: p = P(first ≻ second), or the reason it failed."""

    p: float | None
    error: str | None = None
    detail: str | None = None
    attempts: int = 1


def _from_top(top: dict[str, float], answers: tuple[str, str]) -> float:
    missing = [a for a in answers if a not in top]
    if missing:
        shown = ", ".join(repr(t) for t in list(top)[:8])
        raise JudgeFailure(
            "answer_token_absent", f"{', '.join(map(repr, missing))} not among the top log-probs ({shown})"
        )
    return answer_probability(top[answers[0]], top[answers[1]])


def _choice_logprobs(body: Any) -> Any:
    """choices[0].logprobs of an OpenAI-format body (None when absent); a body without choices[0] fails."""
    try:
        return body["choices"][0].get("logprobs")
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise JudgeFailure("unparseable", f"no choices[0] in the response ({type(e).__name__})") from e


def parse_completion(body: Any, answers: tuple[str, str]) -> float:
    """P(first ≻ second) from a /v1/completions body: choices[0].logprobs.top_logprobs[0] maps token -> log-prob."""
    logprobs = _choice_logprobs(body)
    if not logprobs or not logprobs.get("top_logprobs"):
        raise JudgeFailure("missing_logprobs", "the response has no logprobs.top_logprobs")
    top = logprobs["top_logprobs"][0]
    if not isinstance(top, dict):
        raise JudgeFailure("unparseable", "logprobs.top_logprobs[0] is not a mapping")
    try:
        return _from_top({str(k): float(v) for k, v in top.items()}, answers)
    except (TypeError, ValueError) as e:
        raise JudgeFailure("unparseable", f"a top log-prob is not a number ({e})") from e


def parse_chat(body: Any, answers: tuple[str, str]) -> float:
    """P(first ≻ second) from a /v1/chat/completions body: choices[0].logprobs.content[0].top_logprobs."""
    logprobs = _choice_logprobs(body)
    if not logprobs or not logprobs.get("content"):
        raise JudgeFailure("missing_logprobs", "the response has no logprobs.content")
    entries = logprobs["content"][0].get("top_logprobs") if isinstance(logprobs["content"][0], dict) else None
    if not entries:
        raise JudgeFailure("missing_logprobs", "logprobs.content[0] has no top_logprobs")
    top: dict[str, float] = {}
    try:
        for e in entries:
            lp = float(e["logprob"])
            top[str(e["token"])] = max(lp, top.get(str(e["token"]), -math.inf))
    except (KeyError, TypeError, ValueError) as e:
        raise JudgeFailure("unparseable", f"a top_logprobs entry lacks token/logprob ({e})") from e
    return _from_top(top, answers)


# ---------------------------------------------------------------------------------------------- backends

Question = tuple[str, str, str]  # (instruction, first response, second response)


class PythonJudge:
    """A Python callable as annotator: fn(prompt, response_a, response_b, **options) -> P(a ≻ b) in [0, 1]."""

    def __init__(self, jid: str, cfg: JudgeConfig, fn: Callable[..., float]):
        self.id, self.cfg, self.fn = jid, cfg, fn

    def ask(self, questions: Sequence[Question]) -> list[Verdict]:
        out = []
        for x, a, b in questions:
            try:
                p = float(self.fn(x, a, b, **self.cfg.options))
            except Exception as e:  # noqa: BLE001 -- user code: any failure is this question's, not the round's
                out.append(Verdict(None, "python_error", f"{type(e).__name__}: {e}"[:_DETAIL_CHARS]))
                continue
            if not (math.isfinite(p) and 0.0 <= p <= 1.0):
                out.append(
                    Verdict(None, "invalid_probability", f"{self.cfg.function} returned {p!r}, not in [0, 1]")
                )
            else:
                out.append(Verdict(p))
        return out


class VllmJudge:
    """A local judge model on a vLLM engine: top log-probs of the first generated token."""

    def __init__(
        self, jid: str, cfg: JudgeConfig, template: JudgeTemplate, llm: Any, tokenizer: Any, model: str
    ):
        self.id, self.cfg, self.template, self.llm, self.tokenizer, self.model = (
            jid,
            cfg,
            template,
            llm,
            tokenizer,
            model,
        )
        self.answer_ids = tuple(self._single_token(t) for t in cfg.answer_tokens)
        if cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"judge {jid}: model {model} has no chat template; set format: completion for it"
            )
        self.max_len = int(llm.llm_engine.model_config.max_model_len)

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(
                f"judge {self.id}: answer token {text!r} is {len(ids)} tokens ({ids}) under the tokenizer of "
                f"{self.model}; choose answer_tokens that are single tokens of this judge"
            )
        return ids[0]

    def prompt_ids(self, instruction: str, a: str, b: str) -> list[int]:
        text = self.template.fill(instruction, a, b)
        if self.cfg.format == "chat":
            from pipeline.compute.logprobs import prompt_ids

            return prompt_ids(self.tokenizer, text)
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]  # as /v1/completions tokenizes

    def ask(self, questions: Sequence[Question]) -> list[Verdict]:
        from vllm import SamplingParams, TokensPrompt

        ids = [self.prompt_ids(*q) for q in questions]
        fits = [i for i, x in enumerate(ids) if len(x) < self.max_len]
        out: list[Verdict] = [
            Verdict(
                None, "too_long", f"judge prompt of {len(x)} tokens >= the judge's context {self.max_len}"
            )
            for x in ids
        ]
        params = SamplingParams(
            max_tokens=1, temperature=0.0, logprobs=self.cfg.top_logprobs, seed=self.cfg.seed
        )
        results = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids[i]) for i in fits], params, use_tqdm=False
        )
        for i, result in zip(fits, results):
            step = result.outputs[0].logprobs
            if not step:
                out[i] = Verdict(None, "missing_logprobs", "the engine returned no log-probs")
                continue
            top = step[0]
            missing = [t for t, tid in zip(self.cfg.answer_tokens, self.answer_ids) if tid not in top]
            if missing:
                shown = ", ".join(repr(v.decoded_token) for v in list(top.values())[:8])
                out[i] = Verdict(
                    None,
                    "answer_token_absent",
                    f"{', '.join(map(repr, missing))} not among the top log-probs ({shown})",
                )
                continue
            out[i] = Verdict(
                answer_probability(top[self.answer_ids[0]].logprob, top[self.answer_ids[1]].logprob)
            )
        return out


class HttpJudge:
    """An OpenAI-compatible server: chat or completions with logprobs, bounded concurrency, retries with backoff."""

    def __init__(self, jid: str, cfg: JudgeConfig, template: JudgeTemplate):
        assert cfg.url and cfg.model
        self.id, self.cfg, self.template = jid, cfg, template
        parsed = urllib.parse.urlsplit(cfg.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"judge {jid}: url {cfg.url!r} is not an http(s) URL")
        if parsed.username or parsed.password:
            raise ValueError(
                f"judge {jid}: url carries credentials; put the key in an environment variable "
                "named by api_key_env"
            )
        self._key: str | None = None
        if cfg.api_key_env:
            self._key = os.environ.get(cfg.api_key_env)
            if not self._key:
                raise ValueError(
                    f"judge {jid}: environment variable {cfg.api_key_env} (api_key_env) is not set"
                )
        endpoint = "chat/completions" if cfg.format == "chat" else "completions"
        self.endpoint = cfg.url.rstrip("/") + "/" + endpoint

    def __repr__(self) -> str:  # never the key
        return f"HttpJudge(id={self.id!r}, endpoint={self.endpoint!r})"

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def payload(self, question: Question) -> dict[str, Any]:
        text = self.template.fill(*question)
        common = {"model": self.cfg.model, "max_tokens": 1, "temperature": 0.0, "seed": self.cfg.seed}
        if self.cfg.format == "chat":
            return {**common, "messages": [{"role": "user", "content": text}], "logprobs": True,
                    "top_logprobs": self.cfg.top_logprobs}  # fmt: skip
        return {**common, "prompt": text, "logprobs": self.cfg.top_logprobs}

    def _once(self, data: bytes) -> float:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            try:
                body = e.read().decode("utf-8", "replace")
            except OSError:
                body = ""
            retry = e.code in RETRYABLE_HTTP or e.code >= 500
            raise JudgeFailure(f"http_{e.code}", self._redact(body), retryable=retry) from None
        except TimeoutError:
            raise JudgeFailure(
                "timeout", f"no answer within {self.cfg.timeout_s:g}s", retryable=True
            ) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise JudgeFailure(
                    "timeout", f"no answer within {self.cfg.timeout_s:g}s", retryable=True
                ) from None
            raise JudgeFailure("connection_error", self._redact(str(e.reason)), retryable=True) from None
        except (ConnectionError, OSError) as e:  # reset mid-read, http.client.RemoteDisconnected, ...
            raise JudgeFailure(
                "connection_error", self._redact(f"{type(e).__name__}: {e}"), retryable=True
            ) from None
        try:
            body = json.loads(raw)
        except ValueError:
            raise JudgeFailure("unparseable", self._redact(f"not JSON: {raw[:120]!r}")) from None
        parse = parse_chat if self.cfg.format == "chat" else parse_completion
        return parse(body, self.cfg.answer_tokens)

    def ask_one(self, question: Question) -> Verdict:
        data = json.dumps(self.payload(question)).encode()
        attempts = 0
        while True:
            attempts += 1
            try:
                return Verdict(self._once(data), attempts=attempts)
            except JudgeFailure as f:
                if not f.retryable or attempts > self.cfg.max_retries:
                    return Verdict(None, f.reason, f.detail, attempts)
            time.sleep(self.cfg.backoff_s * 2 ** (attempts - 1))

    def ask(self, questions: Sequence[Question]) -> list[Verdict]:
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(self.ask_one, questions))


Judge = PythonJudge | VllmJudge | HttpJudge


@dataclass(frozen=True)
class Comparison:
    """The symmetrised answer of one annotator on one unordered pair (a, b)."""

    p_ab: float | None
    p_ba: float | None
    p: float | None
    error: str | None
    detail: str | None
    attempts: int


def compare(judge: Judge, pairs: Sequence[Question]) -> list[Comparison]:
    """Ask `judge` every pair in both orders (one batch) and symmetrise. A pair whose either order failed gets
    p = None and the first failure's reason: one order alone would carry the position bias back in."""
    asked = judge.ask([(x, a, b) for x, a, b in pairs] + [(x, b, a) for x, a, b in pairs])
    n = len(pairs)
    out = []
    for ab, ba in zip(asked[:n], asked[n:]):
        attempts = ab.attempts + ba.attempts
        if ab.p is not None and ba.p is not None:
            out.append(Comparison(ab.p, ba.p, symmetrise(ab.p, ba.p), None, None, attempts))
            continue
        failed, order = (ab, "a first") if ab.p is None else (ba, "b first")
        detail = f"{order}: {failed.detail or ''}"
        out.append(Comparison(ab.p, ba.p, None, failed.error, detail, attempts))
    return out


# ---------------------------------------------------------------------------------------------- rankings


def bradley_terry(n: int, i: np.ndarray, j: np.ndarray, p: np.ndarray, prior: float = 0.01) -> np.ndarray:
    """Bradley-Terry (Zermelo) scores from soft pairwise outcomes, by Newton's method.

    Maximises Σ_c [p_c·log σ(s_i − s_j) + (1 − p_c)·log σ(s_j − s_i)] − (prior/2)·‖s‖²: the BT likelihood with
    fractional wins (p̂ instead of 0/1 votes), plus a small L2 term so a response that wins (or loses) every
    comparison keeps a finite score. Concave, so Newton with backtracking converges to the unique maximum.

    Args:
        n: number of responses.
        i, j: (C,) response indices of each comparison.
        p: (C,) P(i ≻ j).
        prior: L2 weight (label.ranking_prior).
    Returns:
        (n,) scores; NaN for responses in no comparison. P(i ≻ j) ≈ σ(s_i − s_j).
    """
    s = np.zeros(n)
    if len(p) == 0:
        return np.full(n, np.nan)
    d = np.zeros((len(p), n))  # (C, n): e_i − e_j per comparison
    d[np.arange(len(p)), i] += 1.0
    d[np.arange(len(p)), j] -= 1.0

    def objective(x: np.ndarray) -> float:
        z = d @ x  # (C,)
        return float(np.sum(p * -np.logaddexp(0, -z) + (1 - p) * -np.logaddexp(0, z)) - 0.5 * prior * x @ x)

    for _ in range(100):
        z = d @ s  # (C,)
        sig = 1.0 / (1.0 + np.exp(-z))
        grad = d.T @ (p - sig) - prior * s  # (n,)
        hess = (d.T * (sig * (1 - sig))) @ d + prior * np.eye(n)  # (n, n), the negated Hessian
        step = np.linalg.solve(hess, grad)
        t, f0 = 1.0, objective(s)
        while objective(s + t * step) < f0 - 1e-12 and t > 1e-6:
            t *= 0.5
        s = s + t * step
        if np.max(np.abs(t * step)) < 1e-10:
            break
    seen = np.zeros(n, dtype=bool)
    seen[i] = seen[j] = True
    return np.where(seen, s, np.nan)


def copeland(n: int, i: np.ndarray, j: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Copeland scores: comparisons won (p̂ > ½) minus lost (p̂ < ½); ties count 0. NaN for uncompared responses."""
    s = np.zeros(n)
    win = np.sign(p - 0.5)  # (C,) +1: i won, −1: j won
    np.add.at(s, i, win)
    np.add.at(s, j, -win)
    seen = np.zeros(n, dtype=bool)
    seen[i] = seen[j] = True
    return np.where(seen, s, np.nan)


# ---------------------------------------------------------------------------------------------- examples


def overlap_judge(prompt: str, response_a: str, response_b: str, *, scale: float = 0.1, noise: float = 0.0,
                  seed: int = 0) -> float:  # fmt: skip
    """An example simulated annotator (backend: python): prefers the response that uses more of the prompt's words.

    P(a ≻ b) = σ((cov_a − cov_b)/scale + noise·ε), cov = `pipeline.method.rewards.prompt_coverage`, ε a standard normal
    drawn deterministically from (seed, prompt, a, b): annotators that differ in `seed` disagree as much as
    `noise` says, and a re-run gives the same labels. Config:
        judges: [{backend: python, function: "pipeline.method.judges:overlap_judge", options: {noise: 1.0, seed: 3}}]
    """
    from pipeline.method.rewards import prompt_coverage

    cov_a, cov_b = prompt_coverage([prompt, prompt], [response_a, response_b])
    digest = hashlib.sha256(json.dumps([seed, prompt, response_a, response_b]).encode()).digest()
    eps = float(np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal())
    return 1.0 / (1.0 + math.exp(-((cov_a - cov_b) / scale + noise * eps)))
