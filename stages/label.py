"""Stage `label`: score every response.

labeller = implicit_reward (DICE, ../shared/METHODS.md §1.2): r = β·[logp(π_{k-1}, x, y) − logp(π_{k-2}, x, y)],
the current policy against its own reference, both scored over the same tokens (pipeline.logprobs.encode).
labeller = python: the function named in `label.python_reward`, called on batches of (prompts, responses).
labeller = reward_model: a sequence-classification model's score r, each text re-encoded with the reward
model's own tokenizer and chat template (pipeline/rewards.py); pairs take p = σ(r_1 − r_2).
labeller = judge (METHODS.md §6, pipeline/judges.py): every annotator in `label.judges` compares every pair of a
prompt's responses that were not cut at the token limit, in both orders; p = ½(p_AB + 1 − p_BA) per annotator,
p̂ = their mean, and the response's `reward` is its ranking score from p̂ (`label.ranking`). A failed comparison
(timeout, HTTP error, unparseable output, missing log-probs, answer token absent) is retried where retryable,
then recorded with its reason and excluded, and counted in the stats; the round goes on.

Reads `responses.parquet`; writes `labels.parquet` (LABELS: every response column plus the log-probs, the
reward, and `label_error` where a response could not be scored: too_long, non_finite, cut, no_comparisons) and
`preferences.parquet` (PREFERENCES: one row per prompt, response pair and annotator with p_ab, p_ba, p and the
error; empty for scalar labellers). Nothing is dropped here; the pairs stage decides what is valid.

    python -m stages.label conf/tiny.yaml --round 1
"""

from __future__ import annotations

import gc
import itertools
import math
import sys
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import schemas
from pipeline.artifacts import StagePlan, read_parquet, write_parquet
from pipeline.chat import Prompt, prompts_of
from pipeline.config import RunConfig
from pipeline.rewards import implicit_reward, load_reward_fn


def _logps_under(model_path: str, cfg: RunConfig, prompts: list[Prompt], responses: list[str], vocab_of: Any = None):
    """Summed response log-probs under one model (loaded, used, freed). Returns (logps, too_long mask, tokenizer)."""
    from pipeline.logprobs import encode, load_causal_lm, score

    model, tokenizer = load_causal_lm(model_path, cfg.model.dtype, cfg.model.trust_remote_code)
    if vocab_of is not None and tokenizer.get_vocab() != vocab_of.get_vocab():
        raise ValueError(
            f"model {model_path}: its tokenizer differs from the policy's; implicit rewards need both "
            "models to share one tokenizer"
        )
    encoded = [encode(tokenizer, p, r) for p, r in zip(prompts, responses)]
    too_long = np.array([len(p) + len(r) > cfg.model.max_length for p, r in encoded])
    logps = np.full(len(encoded), np.nan)
    ok = np.flatnonzero(~too_long)
    if len(ok):
        # packed: the K responses of a prompt in one padding-free group, the prompt computed once (exact)
        logps[ok] = score(
            model, [encoded[i] for i in ok], tokenizer.pad_token_id, cfg.label.batch_size,
            packing=cfg.reference.packing, max_length=cfg.model.max_length,
        )  # fmt: skip
    del model
    gc.collect()
    return logps, too_long, tokenizer


def _nullable(a: np.ndarray) -> pa.Array:
    return pa.array(a, mask=~np.isfinite(a), type=pa.float64())


def _scalar_stats(rewards: np.ndarray) -> dict[str, Any]:
    scored = rewards[np.isfinite(rewards)]
    return {
        "responses": int(rewards.size),
        "scored": int(scored.size),
        "unscored": int(rewards.size - scored.size),
        "reward_mean": float(scored.mean()) if scored.size else None,
        "reward_std": float(scored.std()) if scored.size else None,
        "reward_min": float(scored.min()) if scored.size else None,
        "reward_max": float(scored.max()) if scored.size else None,
    }


def _python_rewards(cfg: RunConfig, prompts: list[str], responses: list[str]) -> np.ndarray:
    assert cfg.label.python_reward is not None
    fn = load_reward_fn(cfg.label.python_reward)
    n = len(prompts)
    rewards = np.full(n, np.nan)
    for start in range(0, n, cfg.label.batch_size):
        stop = min(start + cfg.label.batch_size, n)
        try:
            out = list(fn(prompts[start:stop], responses[start:stop]))
        except Exception as e:  # noqa: BLE001 (the user's code: say whose, which exception, on which rows)
            raise ValueError(
                f"label.python_reward={cfg.label.python_reward} raised {type(e).__name__}: {e} "
                f"(on responses {start}-{stop - 1} of {n}; DICE_DEBUG=1 shows the traceback)"
            ) from e
        if len(out) != stop - start:
            raise ValueError(
                f"label.python_reward={cfg.label.python_reward}: returned {len(out)} scores for {stop - start} responses"
            )
        rewards[start:stop] = [math.nan if x is None else float(x) for x in out]
    return rewards


def _reward_model_rewards(cfg: RunConfig, plan: StagePlan, prompts: list[Prompt], responses: list[str]):
    """Scores of the reward model on its own encoding (tokenizer, chat template). Returns (r, too_long)."""
    from pipeline.rewards import check_format, load_reward_model, reward_model_ids, score_reward_model

    lab = cfg.label
    check_format(lab.reward_model_format)
    path = str(plan.inputs["reward_model"])
    model, tokenizer = load_reward_model(path, cfg.model.dtype, lab.trust_remote_code)
    fallback = lab.reward_model_format
    encoded = [reward_model_ids(tokenizer, p, r, fallback, path) for p, r in zip(prompts, responses)]
    context = getattr(model.config, "max_position_embeddings", None) or cfg.model.max_length
    limit = min(cfg.model.max_length, context)
    too_long = np.array([len(x) > limit for x in encoded], dtype=bool)
    rewards = np.full(len(encoded), np.nan)
    ok = np.flatnonzero(~too_long)
    if len(ok):
        rewards[ok] = score_reward_model(model, tokenizer, [encoded[i] for i in ok], lab.batch_size, path)
    del model
    gc.collect()
    return rewards, too_long


def _make_judges(cfg: RunConfig, plan: StagePlan, engines: dict[str, Any]) -> list[tuple[str | None, Any]]:
    """(vLLM model or None, factory(llm) -> judge) per annotator, in config order; templates checked up front."""
    from pipeline.judges import HttpJudge, PythonJudge, VllmJudge, load_template
    from pipeline.rewards import load_callable

    made: list[tuple[str | None, Any]] = []
    for i, (jid, j) in enumerate(zip(cfg.label.judge_ids(), cfg.label.judges)):
        if j.backend == "python":
            fn = load_callable(str(j.function), f"label.judges[{i}].function")
            made.append((None, lambda _llm, jid=jid, j=j, fn=fn: PythonJudge(jid, j, fn)))
            continue
        template = load_template(plan.inputs[f"template:{jid}"])
        if j.backend == "http":
            judge = HttpJudge(jid, j, template)  # checks the URL and that the key's variable is set
            made.append((None, lambda _llm, judge=judge: judge))
            continue
        model = str(plan.inputs[f"judge:{jid}"])

        def local(llm: Any, jid: str = jid, j: Any = j, template: Any = template, model: str = model) -> Any:
            from transformers import AutoTokenizer

            from pipeline.models import local_model

            tokenizer = AutoTokenizer.from_pretrained(local_model(model), trust_remote_code=cfg.label.trust_remote_code)
            return VllmJudge(jid, j, template, llm, tokenizer, model)

        made.append((model, local))
    return made


def _judge_labels(cfg: RunConfig, plan: StagePlan, table: pa.Table, engines: dict[str, Any]):
    """Every judge on every pair of a prompt's uncut responses, both orders.

    Returns:
        (rewards, label errors, the PREFERENCES table, stats).
    """
    from pipeline.engine import make_llm
    from pipeline.judges import bradley_terry, compare, copeland

    lab, k = cfg.label, plan.round
    d = table.to_pydict()
    n = table.num_rows
    errors: list[str | None] = [None] * n
    groups: dict[str, list[int]] = defaultdict(list)
    for i in range(n):
        if d["finish_reason"][i] == "length":
            errors[i] = "cut"  # never a pair (pairs drops cut responses): not worth a judge's time
        else:
            groups[d["prompt_id"][i]].append(i)
    comps = [  # every unordered pair of a prompt's judged responses, a before b in sample order
        (a, b)
        for rows in groups.values()
        for a, b in itertools.combinations(sorted(rows, key=lambda r: d["sample_idx"][r]), 2)
    ]
    questions = [(d["prompt"][a], d["response"][a], d["response"][b]) for a, b in comps]

    factories = _make_judges(cfg, plan, engines)
    results: dict[int, list[Any]] = {}
    for model in dict.fromkeys(m for m, _ in factories):  # one engine per judge model, freed before the next
        members = [i for i, (m, _) in enumerate(factories) if m == model]
        llm = None
        if model is not None:
            llm = engines.get(model) or make_llm(
                model, lab.engine, dtype=cfg.model.dtype, seed=cfg.seed,
                trust_remote_code=lab.trust_remote_code,
            )  # fmt: skip
        for i in members:
            results[i] = compare(factories[i][1](llm), questions) if questions else []
        if model is not None and model not in engines:
            del llm
            gc.collect()

    ids = lab.judge_ids()
    cols: dict[str, list] = {name: [] for name in schemas.PREFERENCES.names}
    p_sum, p_cnt = np.zeros(len(comps)), np.zeros(len(comps), dtype=int)
    by_reason: Counter[str] = Counter()
    per_annotator: dict[str, dict[str, int]] = {}
    attempts = 0
    for i, jid in enumerate(ids):
        ok = failed = 0
        for c, ((a, b), r) in enumerate(zip(comps, results[i])):
            cols["prompt_id"].append(d["prompt_id"][a])
            cols["idx_a"].append(d["sample_idx"][a])
            cols["idx_b"].append(d["sample_idx"][b])
            cols["annotator"].append(jid)
            cols["p_ab"].append(r.p_ab)
            cols["p_ba"].append(r.p_ba)
            cols["p"].append(r.p)
            cols["error"].append(r.error)
            cols["error_detail"].append(r.detail)
            cols["attempts"].append(r.attempts)
            cols["round"].append(k)
            attempts += r.attempts
            if r.p is None:
                failed += 1
                by_reason[str(r.error)] += 1
            else:
                ok += 1
                p_sum[c] += r.p
                p_cnt[c] += 1
        per_annotator[jid] = {"ok": ok, "failed": failed}
        if comps and not ok:
            print(f"dice label: warning: annotator {jid} failed on all {failed} comparisons", file=sys.stderr)
    n_cmp = len(comps) * len(ids)
    n_failed = sum(by_reason.values())
    if n_cmp and n_failed == n_cmp:
        reason = by_reason.most_common(1)[0][0]
        detail = next(x for x, e in zip(cols["error_detail"], cols["error"]) if e == reason)
        raise ValueError(
            f"label: every judge comparison failed ({n_cmp}; most often {reason}: {detail}); check label.judges"
        )

    # Ranking per prompt from p̂ = mean over annotators (comparisons with fewer than min_annotators excluded)
    rewards = np.full(n, np.nan)
    counted = p_cnt >= lab.min_annotators
    p_hat = np.where(counted, p_sum / np.maximum(p_cnt, 1), np.nan)
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for c, (a, _) in enumerate(comps):
        by_prompt[d["prompt_id"][a]].append(c)
    for pid, rows in groups.items():
        local = {r: x for x, r in enumerate(rows)}
        cs = [c for c in by_prompt.get(pid, []) if counted[c]]
        ii = np.array([local[comps[c][0]] for c in cs], dtype=int)
        jj = np.array([local[comps[c][1]] for c in cs], dtype=int)
        pp = p_hat[cs] if cs else np.zeros(0)
        if lab.ranking == "bradley_terry":
            scores = bradley_terry(len(rows), ii, jj, pp, lab.ranking_prior)
        else:
            scores = copeland(len(rows), ii, jj, pp)
        for r, s in zip(rows, scores):
            rewards[r] = s
            if not np.isfinite(s):
                errors[r] = "no_comparisons"
    prefs = pa.table(cols, schema=schemas.PREFERENCES)
    stats = {
        "annotators": len(ids),
        "comparisons": n_cmp,
        "comparisons_ok": n_cmp - n_failed,
        "comparisons_failed": n_failed,
        "failures_by_reason": dict(by_reason),
        "per_annotator": per_annotator,
        "requests": 2 * n_cmp,
        "attempts": attempts,
        "retries": attempts - 2 * n_cmp,
        "pairs_compared": len(comps),
        "pairs_below_min_annotators": int((~counted).sum()),
        "not_judged_cut": errors.count("cut"),
        "ranking": lab.ranking,
    }
    return rewards, errors, prefs, stats


def run(cfg: RunConfig, plan: StagePlan, engines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Label round k's responses. `engines`: started vLLM engines by judge model path (tests, notebooks)."""
    table = read_parquet(plan.inputs["responses"], schemas.RESPONSES)
    prompts, responses = table["prompt"].to_pylist(), table["response"].to_pylist()  # prompts as text
    conversations = prompts_of(table)  # what the models see: the conversation where there is one
    n = table.num_rows
    errors: list[str | None] = [None] * n
    policy_logps = ref_logps = np.full(n, np.nan)
    prefs = pa.table({name: [] for name in schemas.PREFERENCES.names}, schema=schemas.PREFERENCES)
    extra: dict[str, Any] = {}

    labeller = cfg.label.labeller
    if labeller == "implicit_reward":
        policy_logps, too_long, tokenizer = _logps_under(str(plan.inputs["policy"]), cfg, conversations, responses)
        ref_logps, _, _ = _logps_under(str(plan.inputs["reference"]), cfg, conversations, responses, vocab_of=tokenizer)
        rewards = implicit_reward(policy_logps, ref_logps, cfg.train.beta)
        for i in np.flatnonzero(too_long):
            errors[i] = "too_long"
    elif labeller == "reward_model":
        rewards, too_long = _reward_model_rewards(cfg, plan, conversations, responses)
        for i in np.flatnonzero(too_long):
            errors[i] = "too_long"
    elif labeller == "judge":
        rewards, errors, prefs, extra = _judge_labels(cfg, plan, table, engines or {})
    else:
        rewards = _python_rewards(cfg, prompts, responses)
    for i in np.flatnonzero(~np.isfinite(rewards)):
        errors[i] = errors[i] or "non_finite"

    labelled = table.append_column("policy_logp", _nullable(policy_logps))
    labelled = labelled.append_column("reference_logp", _nullable(ref_logps))
    labelled = labelled.append_column("reward", _nullable(rewards))
    labelled = labelled.append_column("labeller", pa.array([labeller] * n, pa.string()))
    labelled = labelled.append_column("label_error", pa.array(errors, pa.string()))
    write_parquet(labelled, plan.outputs["labels"], schemas.LABELS)
    write_parquet(prefs, plan.outputs["preferences"], schemas.PREFERENCES)
    return {**_scalar_stats(rewards), **extra}


if __name__ == "__main__":
    from stages.common import main

    main("label", run)
