"""Stage `evaluate`: did the round help? π_k against a baseline on held-out prompts, judged, with a win rate and a
length-controlled win rate (../shared/METHODS.md §8; the metrics are pipeline/method/evaluation.py).

Reads π_k (the model round k trained; round 0: π_0), the baseline — π_0 (`eval.baseline: initial`, the default),
π_{k-1} (`previous`) or a file of reference outputs — the held-out prompts `eval.prompts`, and `data.prompts` and
`data.offline` to refuse overlap. Writes `eval.parquet` (EVAL + per-annotator columns, pipeline/data/schemas.py) and
returns the metrics, which go into the round's manifest, `dice inspect`, the report and the flow's stopping rule.

0. Judges. A judge or reward model that is the evaluated model or the baseline is refused unless
   `eval.allow_self_judge` (a model tends to prefer its own answers); `judged_by` records who judged.
1. Prompts. The held-out file (its first `eval.max_prompts`), less every prompt whose text also appears in
   `data.prompts`, `data.offline` or the tiny model's SFT corpus (`model.tiny_data`) once case, spacing and
   punctuation are normalised (`overlap_key`): those are refused and counted (`prompts_overlap`); none left is an
   error naming the files.
2. Responses. `eval.num_samples` per prompt from each model with vLLM (`eval.temperature`, `top_p`, `max_tokens`;
   temperature 0 is greedy), prompts rendered by `pipeline.compute.logprobs.prompt_ids`. Prompt j's seed is
   `prompt_seed(run seed, EVAL_SEED_SLOT, prompt_id)` for every model and every round, so sample i of a prompt is
   compared with the baseline's sample i drawn with the same seed, and the baseline's responses are the same in
   every round. Each model's responses are cached in `<run>/eval-cache/<digest>.parquet` (`dice eval --out DIR`:
   DIR/eval-cache), the digest covering the model's fingerprint, the prompts and their `prompt_messages`, the
   sampling settings and the seed:
   π_0's responses are generated once per run, and with `previous` round k reuses the π_{k-1} responses round k-1
   generated. Prompts too long for either model (`model.max_prompt_tokens`, the context) are dropped and counted.
   A reference-outputs file (AlpacaEval's `instruction` / `output`) must have an output for every prompt kept
   (else an error naming the file and the first prompt missing); each of the policy's samples is compared with it.
3. Annotators, each giving P(policy ≻ baseline) per row: the judges of `eval.judges` (the backends of
   `label.judges`: a local model on vLLM, an OpenAI-compatible server, a Python function), asked in both orders with
   the position bias cancelled (pipeline.method.judges.compare); the reward model (σ(r_policy − r_baseline)); the Python
   metric (1, ½ or 0 by comparing the two scores). A failed comparison is recorded per annotator (`error_<id>`),
   excluded and counted; an annotator that fails every comparison is an error naming it (never a silent ½).
   p̂ = the mean over the annotators that answered; rows with fewer than `eval.min_annotators` are excluded.
   Control rows (`eval.lc_controls`): every pair of one side's samples of a prompt, judged the same way in the same
   pass, written to `eval_controls.parquet`; equal in quality in expectation, they carry the LC fit's length term.
4. Metrics over the rows with a p̂, rates, lengths and score means alike: win rate (mean p̂, ties ½) and the LC win
   rate (with the control rows; "not identified", with the reason in `lc_note`, when the data cannot separate
   quality from length), each with a 95% interval from `eval.bootstrap` prompt resamples (seeded by the run seed);
   wins, losses, ties; annotator agreement; mean length of both sides in tokens (the policy's tokenizer) and
   characters; the metric's and reward model's means per side; excluded rows by the side that caused them, and a
   warning when they skew by length.

    python -m stages.evaluate conf/tiny.yaml --round 1
    dice eval runs/tiny --round 1                                     # the same stage, then its metrics table
    dice eval --model PATH --baseline PATH_OR_FILE --config conf/tiny.yaml --out DIR   # any two models
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.data import schemas
from pipeline.data.artifacts import ArtifactError, StagePlan, fingerprint, read_parquet, write_parquet
from pipeline.data.chat import messages_column, prompts_of
from pipeline.data.datasets import (
    is_hub_dataset,
    overlap_key,
    prompt_texts,
    read_prompts,
    read_reference_outputs,
    text_key,
)
from pipeline.method import evaluation

# The "round" slot of stages.generate.prompt_seed for evaluation: no generate round is negative, so evaluation
# seeds never coincide with a training round's, and they are the same in every round and for every model.
EVAL_SEED_SLOT = -1


def cache_dir(plan: StagePlan) -> Path:
    """Where model responses are cached: the run folder (round plans) or the standalone output folder."""
    return (plan.round_dir.parent if plan.round >= 0 else plan.round_dir) / "eval-cache"


# ---------------------------------------------------------------------------------------------- 1. prompts


def _sft_texts(cfg: RunConfig) -> tuple[set[str], list[str], list[str]]:
    """overlap_keys of the prompts of the corpus the tiny model is built from (`model.tiny_data`), which is the
    policy's supervised training set in the toy recipes; (keys, files checked, files not found)."""
    from pipeline.data.datasets import load_rows

    keys: set[str] = set()
    checked, unchecked = [], []
    for path in cfg.model.tiny_data or []:
        if not Path(path).exists():
            unchecked.append(str(path))
            continue
        rows, _ = load_rows(path, "SFT corpus")
        keys |= {overlap_key(r["prompt"]) for r in rows if isinstance(r.get("prompt"), str)}
        checked.append(str(path))
    return keys, checked, unchecked


def held_out_prompts(cfg: RunConfig, plan: StagePlan) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """[(prompt_id, prompt)] to evaluate: eval.prompts (first max_prompts) less those the run also trains on (after
    `overlap_key`: case, spacing and punctuation do not hide a copy): data.prompts, data.offline, model.tiny_data."""
    path = cfg.eval.prompts
    table = read_prompts(path)
    if cfg.eval.max_prompts:
        table = table.slice(0, cfg.eval.max_prompts)
    rows = list(zip(table["prompt_id"].to_pylist(), table["prompt"].to_pylist()))
    seen, checked, unchecked = _sft_texts(cfg)
    for kind, src in (("prompts", cfg.data.prompts), ("offline", cfg.data.offline)):
        local = Path(src.path)
        if local.exists() or is_hub_dataset(src.path):
            seen |= {overlap_key(t) for t in prompt_texts(src, kind)}
            checked.append(str(src))
        else:  # a standalone `dice eval` whose config names data files this machine does not have
            unchecked.append(str(src))
    for src in unchecked:
        print(f"evaluate: {src} not found: held-out prompts not checked against it", file=sys.stderr)
    kept = [(pid, text) for pid, text in rows if overlap_key(text) not in seen]
    overlap = len(rows) - len(kept)
    if overlap:
        print(f"evaluate: {overlap} of the {len(rows)} prompts of {path} also appear in {' or '.join(checked)} "
              "and are not evaluated", flush=True)  # fmt: skip
    if not kept:
        raise ValueError(
            f"{path}: all {len(rows)} held-out prompts also appear in {' or '.join(checked)} (same text up to case, "
            "spacing and punctuation); "
            "eval.prompts must hold prompts the run does not train on"
        )
    return kept, {"prompts_file": len(rows), "prompts_overlap": overlap, "overlap_checked": checked,
                  "overlap_unchecked": unchecked}  # fmt: skip


# ---------------------------------------------------------------------------------------------- 2. responses


def _tokenizer(cfg: RunConfig, model: str):
    from stages.generate import _load_tokenizer

    return _load_tokenizer(cfg, model)


def _conversations(cfg: RunConfig) -> dict[str, Any]:
    """prompt_id -> what the model is prompted with: the `prompt_messages` conversation when set, else the text."""
    table = read_prompts(cfg.eval.prompts)
    return dict(zip(table["prompt_id"].to_pylist(), prompts_of(table)))


def _digest(cfg: RunConfig, model: str, prompts: list[tuple[str, str]], convs: dict[str, Any] | None = None) -> str:
    """The cache key of a model's responses: everything that decides them, the conversations rendered included (two
    prompts with one text but different `prompt_messages`, e.g. another system turn, are different prompts)."""
    ev, g = cfg.eval, cfg.generate
    convs = _conversations(cfg) if convs is None else convs
    messages = [messages_column([convs.get(pid, text)])[0] for pid, text in prompts]
    key = {
        "model": fingerprint(model), "prompts": prompts, "seed": cfg.seed, "slot": EVAL_SEED_SLOT,
        "prompt_messages": messages,
        "num_samples": ev.num_samples, "temperature": ev.temperature, "top_p": ev.top_p, "max_tokens": ev.max_tokens,
        "stop": g.stop, "stop_token_ids": g.stop_token_ids, "max_prompt_tokens": cfg.model.max_prompt_tokens,
        "max_model_len": g.engine.max_model_len, "dtype": cfg.model.dtype, "trust_remote_code": cfg.model.trust_remote_code,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def model_responses(
    cfg: RunConfig, plan: StagePlan, model: str, prompts: list[tuple[str, str]], engines: dict[str, Any]
) -> tuple[pa.Table, bool]:
    """`eval.num_samples` responses per prompt from `model` (RESPONSES rows; prompts too long for it are absent),
    from the cache when this model, these prompts and these settings were generated before. Returns (table, cached)."""
    from stages.generate import _context_limit, prompt_seed

    convs = _conversations(cfg)  # the conversations behind the texts, for the chat template
    path = cache_dir(plan) / f"{_digest(cfg, model, prompts, convs)}.parquet"
    if path.is_file():
        try:
            return read_parquet(path, schemas.RESPONSES), True
        except ArtifactError as e:  # a damaged cache file is regenerated, not trusted
            print(f"evaluate: cache {path} unreadable ({e}); generating again", file=sys.stderr)
    from vllm import SamplingParams, TokensPrompt

    from pipeline.compute.engine import make_llm, release
    from pipeline.compute.logprobs import prompt_ids

    ev, g = cfg.eval, cfg.generate
    tokenizer = _tokenizer(cfg, model)
    limit = min(cfg.model.max_prompt_tokens, _context_limit(cfg, model) - 1)
    ids = [prompt_ids(tokenizer, convs.get(pid, text)) for pid, text in prompts]
    kept = [i for i, x in enumerate(ids) if len(x) <= limit]
    seeds = [prompt_seed(cfg.seed, EVAL_SEED_SLOT, prompts[i][0]) for i in kept]
    llm = engines.get(model)
    owned = llm is None
    if owned:
        llm = make_llm(model, g.engine, dtype=cfg.model.dtype, seed=cfg.seed, trust_remote_code=cfg.model.trust_remote_code)
    started = time.monotonic()
    try:
        params = [
            SamplingParams(n=ev.num_samples, temperature=ev.temperature, top_p=ev.top_p, max_tokens=ev.max_tokens,
                           seed=s, stop=g.stop or None, stop_token_ids=g.stop_token_ids or None)
            for s in seeds
        ]  # fmt: skip
        results = llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i in kept], params, use_tqdm=False) if kept else []
    finally:
        if owned:  # gone before the next engine (the baseline's, a judge's) takes its share of the GPU
            release(llm)
    cols: dict[str, list] = {name: [] for name in schemas.RESPONSES.names}
    for i, seed, result in zip(kept, seeds, results):
        for j, out in enumerate(result.outputs):
            conv = convs.get(prompts[i][0], prompts[i][1])
            for name, value in (("prompt_id", prompts[i][0]), ("prompt", prompts[i][1]),
                                ("prompt_messages", messages_column([conv])[0]), ("sample_idx", j),
                                ("response", out.text), ("num_tokens", len(out.token_ids)), ("num_chars", len(out.text)),
                                ("finish_reason", out.finish_reason or "unknown"), ("cumulative_logprob", None),
                                ("seed", seed), ("model", model), ("round", plan.round),
                                ("prompt_token_ids", ids[i]), ("response_token_ids", list(out.token_ids))):  # fmt: skip
                cols[name].append(value)
    table = pa.table(cols, schema=schemas.RESPONSES)
    write_parquet(table, path, schemas.RESPONSES)
    n_tokens = sum(cols["num_tokens"])
    print(f"evaluate: {model}: {len(kept)} prompts × {ev.num_samples} samples, {n_tokens} tokens in "
          f"{time.monotonic() - started:.1f} s" + (f"; {len(prompts) - len(kept)} prompts too long" if len(kept) < len(prompts) else ""),
          flush=True)  # fmt: skip
    return table, False


def _by_prompt(table: pa.Table) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in table.to_pylist():
        out.setdefault(r["prompt_id"], {})[r["sample_idx"]] = r
    return out


# ---------------------------------------------------------------------------------------------- 3. annotators


def _judges(cfg: RunConfig, plan: StagePlan) -> list[tuple[str, str | None, Any]]:
    """(id, vLLM model or None, factory(llm) -> judge) per judge, templates checked up front (label's twin)."""
    from pipeline.method.judges import HttpJudge, PythonJudge, VllmJudge, load_template
    from pipeline.method.rewards import load_callable

    made: list[tuple[str, str | None, Any]] = []
    for i, (jid, j) in enumerate(zip(cfg.eval.annotator_ids(), cfg.eval.judges)):
        if j.backend == "python":
            fn = load_callable(str(j.function), f"eval.judges[{i}].function")
            made.append((jid, None, lambda _llm, jid=jid, j=j, fn=fn: PythonJudge(jid, j, fn)))
            continue
        template = load_template(plan.inputs[f"template:{jid}"])
        if j.backend == "http":
            judge = HttpJudge(jid, j, template)  # checks the URL and that the key's variable is set
            made.append((jid, None, lambda _llm, judge=judge: judge))
            continue
        model = str(plan.inputs[f"judge:{jid}"])

        def local(llm: Any, jid: str = jid, j: Any = j, template: Any = template, model: str = model) -> Any:
            from transformers import AutoTokenizer

            from pipeline.data.models import local_model

            tokenizer = AutoTokenizer.from_pretrained(local_model(model), trust_remote_code=cfg.eval.trust_remote_code)
            return VllmJudge(jid, j, template, llm, tokenizer, model)

        made.append((jid, model, local))
    return made


def _python_scores(cfg: RunConfig, prompts: list[str], responses: list[str]) -> np.ndarray:
    from pipeline.method.rewards import load_callable

    spec = str(cfg.eval.python_metric)
    fn = load_callable(spec, "eval.python_metric")
    out = np.full(len(prompts), np.nan)
    step = cfg.eval.batch_size
    for start in range(0, len(prompts), step):
        stop = min(start + step, len(prompts))
        try:
            scores = list(fn(prompts[start:stop], responses[start:stop]))
        except Exception as e:  # noqa: BLE001 -- user code: name it, keep its message
            raise ValueError(f"eval.python_metric={spec}: raised {type(e).__name__}: {e}") from e
        if len(scores) != stop - start:
            raise ValueError(f"eval.python_metric={spec}: returned {len(scores)} scores for {stop - start} responses")
        out[start:stop] = [np.nan if x is None else float(x) for x in scores]
    return out


def _reward_scores(cfg: RunConfig, plan: StagePlan, prompts: list[str], texts: list[str]) -> np.ndarray:
    """The reward model's score of each (prompt, text) on its own encoding; NaN where the text is too long."""
    from pipeline.method.rewards import check_format, load_reward_model, reward_model_ids, score_reward_model

    ev = cfg.eval
    check_format(ev.reward_model_format)
    path = str(plan.inputs["reward_model"])
    model, tokenizer = load_reward_model(path, cfg.model.dtype, ev.trust_remote_code)
    encoded = [reward_model_ids(tokenizer, p, t, ev.reward_model_format, path) for p, t in zip(prompts, texts)]
    limit = min(cfg.model.max_length, getattr(model.config, "max_position_embeddings", None) or cfg.model.max_length)
    ok = [i for i, x in enumerate(encoded) if len(x) <= limit]
    scores = np.full(len(encoded), np.nan)
    if ok:
        scores[ok] = score_reward_model(model, tokenizer, [encoded[i] for i in ok], ev.batch_size, path)
    del model
    gc.collect()
    return scores


def annotate(
    cfg: RunConfig, plan: StagePlan, prompts: list[str], policy: list[str], baseline: list[str],
    engines: dict[str, Any] | None = None,
) -> tuple[np.ndarray, list[list[str | None]], dict[str, np.ndarray], dict[str, Any]]:  # fmt: skip
    """Every annotator on every row: P(policy ≻ baseline) per row and annotator.

    Returns:
        (p: (N, A) with NaN where an annotator failed, errors: A lists of N reasons or None,
         scores: {"metric", "baseline_metric", "reward", "baseline_reward"} (N,) arrays where configured, stats).
    Raises:
        ValueError: naming the annotator, when one fails on every row.
    """
    from pipeline.compute.engine import make_llm, release
    from pipeline.method.judges import compare

    ev, engines = cfg.eval, engines or {}
    ids = ev.annotator_ids()
    n = len(prompts)
    p = np.full((n, len(ids)), np.nan)
    errors: list[list[str | None]] = [[None] * n for _ in ids]
    details: dict[str, str] = {}
    scores: dict[str, np.ndarray] = {}
    attempts = 0
    questions = list(zip(prompts, policy, baseline))
    judges = _judges(cfg, plan)
    for model in dict.fromkeys(m for _, m, _ in judges):  # one engine per judge model, freed before the next
        llm = None
        if model is not None:
            llm = engines.get(model) or make_llm(model, cfg.label.engine, dtype=cfg.model.dtype, seed=cfg.seed,
                                                 trust_remote_code=ev.trust_remote_code)  # fmt: skip
        try:
            for jid, m, factory in judges:
                if m != model:
                    continue
                a = ids.index(jid)
                for i, c in enumerate(compare(factory(llm), questions) if questions else []):
                    attempts += c.attempts
                    if c.p is None:
                        errors[a][i] = c.error
                        details.setdefault(f"{jid}:{c.error}", c.detail or "")
                    else:
                        p[i, a] = c.p
        finally:
            if model is not None and model not in engines:  # gone before the next judge's engine starts
                release(llm)
    if ev.reward_model:
        a = ids.index("reward_model")
        both = _reward_scores(cfg, plan, prompts + prompts, policy + baseline)
        scores["reward"], scores["baseline_reward"] = both[:n], both[n:]
        p[:, a] = evaluation.reward_preference(both[:n], both[n:])
        for i in np.flatnonzero(~np.isfinite(p[:, a])):
            errors[a][i] = "too_long"
    if ev.python_metric:
        a = ids.index("python_metric")
        both = _python_scores(cfg, prompts + prompts, policy + baseline)
        scores["metric"], scores["baseline_metric"] = both[:n], both[n:]
        p[:, a] = evaluation.scalar_preference(both[:n], both[n:])
        for i in np.flatnonzero(~np.isfinite(p[:, a])):
            errors[a][i] = "non_finite"
    where = {**{jid: "eval.judges" for jid in ids}, "reward_model": "eval.reward_model", "python_metric": "eval.python_metric"}
    per_annotator, by_reason = {}, Counter()
    for a, jid in enumerate(ids):
        failed = Counter(e for e in errors[a] if e is not None)
        by_reason.update(failed)
        per_annotator[jid] = {"ok": int(np.isfinite(p[:, a]).sum()), "failed": sum(failed.values())}
        if n and not per_annotator[jid]["ok"]:
            reason = failed.most_common(1)[0][0]
            detail = details.get(f"{jid}:{reason}", "")
            raise ValueError(
                f"evaluate: annotator {jid} ({where[jid]}) failed on all {n} comparisons (most often {reason}"
                + (f": {detail}" if detail else "") + "); fix it or remove it"
            )
    stats = {"annotators": ids, "per_annotator": per_annotator, "comparisons_failed": sum(by_reason.values()),
             "failures_by_reason": dict(by_reason), "judge_requests": attempts}  # fmt: skip
    return p, errors, scores, stats


# ---------------------------------------------------------------------------------------------- the stage


def _baseline_label(plan: StagePlan) -> str:
    if "baseline" in plan.inputs:
        return str(plan.inputs["baseline"])
    return str(plan.inputs["baseline_outputs"])


def _same_model(a: str, b: str) -> bool:
    """Two model references name one model: the same hub id, or folders that resolve to one path."""
    if a == b:
        return True
    pa_, pb = Path(a), Path(b)
    return pa_.exists() and pb.exists() and pa_.resolve() == pb.resolve()


def judged_by(cfg: RunConfig, plan: StagePlan) -> list[str]:
    """Who judged, one line per annotator: its id and the model or function behind it (with its role in the run)."""
    ev = cfg.eval
    out = []
    for jid, j in zip(ev.annotator_ids(), ev.judges):
        if j.backend == "vllm":
            model, role = str(plan.inputs[f"judge:{jid}"]), plan.roles.get(f"judge:{jid}")
            out.append(f"{jid}: {model}" + (f" ({role})" if role and role != model else ""))
        elif j.backend == "http":
            out.append(f"{jid}: {j.model} at {j.url}")
        else:
            out.append(f"{jid}: {j.function}")
    if ev.reward_model:
        out.append(f"reward_model: {ev.reward_model}")
    if ev.python_metric:
        out.append(f"python_metric: {ev.python_metric}")
    return out


def check_self_judge(cfg: RunConfig, plan: StagePlan) -> None:
    """Refuse a judge (or reward model) that is the evaluated model or the baseline unless eval.allow_self_judge: a
    model judging its own answers tends to prefer them, so the win rate would measure that, not quality."""
    if cfg.eval.allow_self_judge:
        return
    sides = {"the evaluated model": str(plan.inputs["policy"])}
    if "baseline" in plan.inputs:
        sides["the baseline"] = str(plan.inputs["baseline"])
    judges = {f"eval.judges {k.split(':', 1)[1]}": (str(v), plan.roles.get(k)) for k, v in plan.inputs.items()
              if k.startswith("judge:")}  # fmt: skip
    if cfg.eval.reward_model:
        judges["eval.reward_model"] = (str(cfg.eval.reward_model), None)
    for name, (model, role) in judges.items():
        for side, other in sides.items():
            if _same_model(model, other):
                raise ValueError(
                    f"{name} is {model}{f' ({role})' if role and role != model else ''}, which is also {side}: a model "
                    "judging its own answers is refused; name another judge model (e.g. eval.judges[].model) or set "
                    "eval.allow_self_judge: true to accept it"
                )


def control_rows(samples: dict[str, dict[int, dict[str, Any]]], prompts: list[tuple[str, str]]) -> list[tuple[str, int, int]]:
    """(prompt_id, a, b) for every pair a < b of one side's samples of a kept prompt: equal quality in expectation."""
    out = []
    for pid, _ in prompts:
        idx = sorted(samples.get(pid, {}))
        out += [(pid, a, b) for i, a in enumerate(idx) for b in idx[i + 1 :]]
    return out


def run(cfg: RunConfig, plan: StagePlan, engines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the plan's policy against its baseline. `engines`: started vLLM engines by model path (tests)."""
    ev, engines = cfg.eval, engines or {}
    policy = str(plan.inputs["policy"])
    check_self_judge(cfg, plan)
    prompts, prompt_stats = held_out_prompts(cfg, plan)

    # the reference-outputs file is checked before anything is generated
    outputs = None
    if "baseline_outputs" in plan.inputs:
        path = Path(plan.inputs["baseline_outputs"])
        if not path.is_file():
            raise ValueError(f"eval.baseline {path}: not 'initial', 'previous' or an existing reference-outputs file")
        outputs = read_reference_outputs(path)
        missing = [(pid, text) for pid, text in prompts if text_key(text) not in outputs]
        if missing:
            pid, text = missing[0]
            raise ValueError(
                f"{path}: no output for {len(missing)} of the {len(prompts)} held-out prompts (first: prompt_id "
                f"{pid!r}, {text[:80]!r}); eval.baseline needs an `output` for every `instruction` of {plan.inputs['prompts']}"
            )

    pol_table, pol_cached = model_responses(cfg, plan, policy, prompts, engines)
    pol = _by_prompt(pol_table)
    base: dict[str, dict[int, dict[str, Any]]] = {}
    base_cached = None
    if outputs is None:
        base_table, base_cached = model_responses(cfg, plan, str(plan.inputs["baseline"]), prompts, engines)
        base = _by_prompt(base_table)
    kept = [(pid, text) for pid, text in prompts if pid in pol and (outputs is not None or pid in base)]
    if not kept:
        raise ValueError(f"{plan.inputs['prompts']}: every held-out prompt is longer than model.max_prompt_tokens "
                         f"({cfg.model.max_prompt_tokens}) or a model's context")  # fmt: skip

    # one row per (prompt, sample): the policy's sample i against the baseline's sample i (or the file's output)
    tokenizer = _tokenizer(cfg, policy)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    cols: dict[str, list] = {name: [] for name in schemas.EVAL.names}
    for pid, text in kept:
        for j in sorted(pol[pid]):
            mine = pol[pid][j]
            theirs = base[pid].get(j) if outputs is None else None
            if outputs is None and theirs is None:
                continue  # the baseline has no sample j (both sides draw eval.num_samples: not expected)
            other = outputs[text_key(text)] if outputs is not None else theirs["response"]
            for name, value in (("prompt_id", pid), ("prompt", text), ("sample_idx", j), ("response", mine["response"]),
                                ("baseline_response", other), ("tokens", count(mine["response"])),
                                ("baseline_tokens", count(other)), ("chars", len(mine["response"])),
                                ("baseline_chars", len(other)), ("finish_reason", mine["finish_reason"]),
                                ("baseline_finish_reason", theirs["finish_reason"] if theirs else None),
                                ("seed", mine["seed"]), ("model", policy), ("baseline", _baseline_label(plan)),
                                ("round", plan.round if plan.round >= 0 else None)):  # fmt: skip
                cols[name].append(value)
    n = len(cols["prompt_id"])
    # control rows: each side's samples of a prompt against each other, judged with the policy rows in one pass
    texts = dict(kept)
    controls = []
    if ev.lc_controls:
        controls = [("policy", *c) for c in control_rows(pol, kept)]
        if outputs is None:
            controls += [("baseline", *c) for c in control_rows(base, kept)]
    side_of = {"policy": pol, "baseline": base}
    ctl_a = [side_of[sd][pid][a]["response"] for sd, pid, a, _ in controls]
    ctl_b = [side_of[sd][pid][b]["response"] for sd, pid, _, b in controls]
    p_all, err_all, scores_all, ann_stats = annotate(
        cfg, plan, cols["prompt"] + [texts[pid] for _, pid, _, _ in controls], cols["response"] + ctl_a,
        cols["baseline_response"] + ctl_b, engines,
    )  # fmt: skip
    p, errors = p_all[:n], [e[:n] for e in err_all]
    scores = {k: v[:n] for k, v in scores_all.items()}
    answered = np.isfinite(p).sum(1)  # (N,)
    counted = answered >= ev.min_annotators
    p_hat = np.where(counted, np.nansum(np.where(np.isfinite(p), p, 0.0), 1) / np.maximum(answered, 1), np.nan)
    if not counted.any():
        raise ValueError(f"evaluate: no row has eval.min_annotators={ev.min_annotators} annotators answering")
    cols["p"] = list(p_hat)
    cols["annotators"] = answered.astype(int).tolist()
    for name in ("metric", "baseline_metric", "reward", "baseline_reward"):
        cols[name] = list(scores[name]) if name in scores else [None] * n
    ids = ev.annotator_ids()
    for a, jid in enumerate(ids):
        cols[f"p_{jid}"] = list(p[:, a])
        cols[f"error_{jid}"] = errors[a]
    schema = schemas.eval_schema(ids)
    write_parquet(_table(cols, schema), plan.outputs["eval"], schema)
    pc_all = p_all[n:]
    c_answered = np.isfinite(pc_all).sum(1)  # (M,)
    c_counted = c_answered >= ev.min_annotators
    c_hat = np.where(c_counted, np.nansum(np.where(np.isfinite(pc_all), pc_all, 0.0), 1) / np.maximum(c_answered, 1), np.nan)
    ccols: dict[str, list] = {
        "prompt_id": [pid for _, pid, _, _ in controls], "side": [sd for sd, _, _, _ in controls],
        "sample_a": [a for _, _, a, _ in controls], "sample_b": [b for _, _, _, b in controls],
        "tokens_a": [count(t) for t in ctl_a], "tokens_b": [count(t) for t in ctl_b],
        "chars_a": [len(t) for t in ctl_a], "chars_b": [len(t) for t in ctl_b], "p": list(c_hat),
        "annotators": c_answered.astype(int).tolist(), "round": [plan.round if plan.round >= 0 else None] * len(controls),
    }  # fmt: skip
    for a, jid in enumerate(ids):
        ccols[f"p_{jid}"] = list(pc_all[:, a])
        ccols[f"error_{jid}"] = err_all[a][n:]
    cschema = schemas.eval_schema(ids, schemas.EVAL_CONTROLS)
    write_parquet(_table(ccols, cschema), plan.outputs["controls"], cschema)

    # metrics over the counted rows
    c = np.flatnonzero(counted)
    pc, pids = p_hat[c], [cols["prompt_id"][i] for i in c]
    unit = ev.length_unit  # "chars" or "tokens": the column pair the LC fit reads
    lp = np.array(cols[unit], dtype=float)[c]
    lb = np.array(cols[f"baseline_{unit}"], dtype=float)[c]
    cc = np.flatnonzero(c_counted)
    control = None
    if cc.size:
        control = evaluation.Controls(c_hat[cc], np.array(ccols[f"{unit}_a"], dtype=float)[cc],
                                      np.array(ccols[f"{unit}_b"], dtype=float)[cc])  # fmt: skip
    cids = [ccols["prompt_id"][i] for i in cc]
    lc = evaluation.length_controlled(pc, lp, lb, ev.lc_l2, control=control)
    level = 0.95
    wr_ci = evaluation.win_rate_interval(pc, pids, ev.bootstrap, level, cfg.seed)
    lc_ci = evaluation.lc_interval(pc, lp, lb, pids, ev.bootstrap, level, cfg.seed, ev.lc_l2, control, cids)
    if not lc.identified:
        print(f"evaluate round {plan.round}: LC win rate {lc.reason}", file=sys.stderr, flush=True)
    # rates and lengths over the same rows: the counted ones (an excluded row is out of both)
    mean = lambda name: float(np.mean(np.array(cols[name], dtype=float)[c]))  # noqa: E731
    excluded = _exclusions(cols, scores, counted, unit)
    stats: dict[str, Any] = {
        "baseline": plan.roles.get("baseline") or plan.roles.get("baseline_outputs"),
        "baseline_path": _baseline_label(plan),
        "prompts": len(kept),
        **prompt_stats,
        "prompts_too_long": len(prompts) - len(kept),
        "samples": ev.num_samples,
        "rows": n,
        "rows_counted": int(counted.sum()),
        "rows_excluded": int(n - counted.sum()),
        "win_rate": evaluation.win_rate(pc),
        "win_rate_ci": list(wr_ci) if wr_ci else None,
        "lc_win_rate": lc.lc_win_rate if lc.identified else None,
        "lc_win_rate_ci": list(lc_ci) if lc_ci else None,
        "lc_identified": lc.identified,
        "lc_note": lc.reason,
        "lc_control_rows": lc.control_rows,
        "lc_theta": lc.theta,
        "lc_phi": lc.phi,
        "lc_sigma_len": lc.sigma_len,
        "baseline_kind": _baseline_kind(cfg, plan),
        "judged_by": judged_by(cfg, plan),
        "self_judge_allowed": ev.allow_self_judge,
        **excluded,
        "length_unit": ev.length_unit,
        "ci_level": level,
        "wins": int((pc > 0.5).sum()),
        "losses": int((pc < 0.5).sum()),
        "ties": int((pc == 0.5).sum()),
        "agreement": evaluation.agreement(p[c]),
        "mean_tokens": mean("tokens"),
        "baseline_mean_tokens": mean("baseline_tokens"),
        "mean_chars": mean("chars"),
        "baseline_mean_chars": mean("baseline_chars"),
        "cut_at_limit": cols["finish_reason"].count("length"),
        "baseline_cut_at_limit": cols["baseline_finish_reason"].count("length") if outputs is None else None,
        "metric_mean": _paired_mean(scores, "metric", c, 0),
        "baseline_metric_mean": _paired_mean(scores, "metric", c, 1),
        "reward_mean": _paired_mean(scores, "reward", c, 0),
        "baseline_reward_mean": _paired_mean(scores, "reward", c, 1),
        "responses_cached": {"policy": pol_cached, "baseline": base_cached},
        **ann_stats,
    }
    if excluded["exclusion_warning"]:
        print(f"evaluate round {plan.round}: warning: {excluded['exclusion_warning']}", file=sys.stderr, flush=True)
    ci = lambda v: f" [{v[0]:.3f}, {v[1]:.3f}]" if v else ""  # noqa: E731
    lc_text = f"{lc.lc_win_rate:.3f}{ci(lc_ci)}" if lc.identified else "not identified"
    print(f"evaluate round {plan.round}: {plan.roles.get('policy')} vs "
          f"{stats['baseline']} on {len(kept)} prompts × {ev.num_samples}: win rate {stats['win_rate']:.3f}{ci(wr_ci)}, "
          f"LC win rate {lc_text} ({lc.control_rows} control rows), mean {unit} {np.mean(lp):.1f} vs {np.mean(lb):.1f}",
          flush=True)  # fmt: skip
    return stats


def _paired_mean(scores: dict[str, np.ndarray], name: str, rows: np.ndarray, side: int) -> float | None:
    """Mean score of one side (0 policy, 1 baseline) over the counted rows where both sides have a score."""
    if name not in scores:
        return None
    a, b = scores[name][rows], scores[f"baseline_{name}"][rows]
    both = np.isfinite(a) & np.isfinite(b)
    return float((a, b)[side][both].mean()) if both.any() else None


def _baseline_kind(cfg: RunConfig, plan: StagePlan) -> str:
    """initial, previous or file: what this round's baseline was (the stopping rule reads it per round)."""
    if "baseline_outputs" in plan.inputs:
        return "file"
    return cfg.eval.baseline if cfg.eval.baseline in ("initial", "previous") else "model"


def _exclusions(cols: dict[str, list], scores: dict[str, np.ndarray], counted: np.ndarray, unit: str) -> dict[str, Any]:
    """Excluded rows counted by the side that caused them, and a warning when they skew by length.

    A row is the policy's exclusion when only the policy's score is missing (a reward model's too-long response, a
    metric's non-finite score), the baseline's when only the baseline's is, and `pair` otherwise (a judge failed on
    the comparison). Dropping rows is harmless only when it does not select by length: when the excluded rows' length
    difference Δ = policy − baseline sits far from the counted rows' (more than half a standard deviation of Δ), the
    rates and lengths describe a filtered set, and the warning says so."""
    out_rows = np.flatnonzero(~counted)
    side = Counter()
    for i in out_rows:
        missing = {s: any(not np.isfinite(scores[f"{pre}{k}"][i]) for k in ("metric", "reward") if f"{pre}{k}" in scores)
                   for s, pre in (("policy", ""), ("baseline", "baseline_"))}  # fmt: skip
        side["policy" if missing["policy"] and not missing["baseline"] else
             "baseline" if missing["baseline"] and not missing["policy"] else "pair"] += 1  # fmt: skip
    delta = np.array(cols[unit], dtype=float) - np.array(cols[f"baseline_{unit}"], dtype=float)  # (N,)
    warning = None
    if out_rows.size and counted.any() and delta.size > 1 and delta.std() > 0:
        shift = float(delta[~counted].mean() - delta[counted].mean())
        if abs(shift) > 0.5 * delta.std():
            warning = (f"{out_rows.size} of {delta.size} rows were excluded (policy {side['policy']}, baseline "
                       f"{side['baseline']}, pair {side['pair']}) and they skew by length: their policy − baseline "
                       f"length difference averages {delta[~counted].mean():.1f} {unit} against {delta[counted].mean():.1f} "
                       "on the counted rows, so the rates and lengths describe a length-filtered set")  # fmt: skip
    return {"rows_excluded_policy": side["policy"], "rows_excluded_baseline": side["baseline"],
            "rows_excluded_pair": side["pair"],
            "excluded_delta_mean": float(delta[~counted].mean()) if out_rows.size else None,
            "exclusion_warning": warning}  # fmt: skip


def _table(cols: dict[str, list], schema: pa.Schema) -> pa.Table:
    """The columns as a table of `schema`, NaN floats stored as nulls."""
    arrays = []
    for f in schema:
        values = cols[f.name]
        if pa.types.is_floating(f.type):
            values = [None if v is None or not np.isfinite(v) else float(v) for v in values]
        arrays.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


if __name__ == "__main__":
    from stages.common import main

    main("evaluate", run)
