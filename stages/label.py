"""Stage `label`: score every response.

labeller = implicit_reward (DICE, ../shared/METHODS.md §1.2): r = β·[logp(π_{k-1}, x, y) − logp(π_{k-2}, x, y)],
the current policy against its own reference, both scored over the same tokens (pipeline.logprobs.encode).
labeller = python: the function named in `label.python_reward`, called on batches of (prompts, responses).

Reads `responses.parquet`; writes `labels.parquet` (LABELS: every response column plus the log-probs, the
reward, and `label_error` where a response could not be scored: too_long, non_finite). Nothing is dropped
here; the pairs stage decides what is valid.

    python -m stages.label conf/tiny.yaml --round 1
"""

from __future__ import annotations

import gc
import math
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import schemas
from pipeline.artifacts import StagePlan, read_parquet, write_parquet
from pipeline.config import RunConfig
from pipeline.rewards import implicit_reward, load_reward_fn


def _logps_under(model_path: str, cfg: RunConfig, prompts: list[str], responses: list[str], vocab_of: Any = None):
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
        logps[ok] = score(model, [encoded[i] for i in ok], tokenizer.pad_token_id, cfg.label.batch_size)
    del model
    gc.collect()
    return logps, too_long, tokenizer


def run(cfg: RunConfig, plan: StagePlan) -> dict[str, Any]:
    table = read_parquet(plan.inputs["responses"], schemas.RESPONSES)
    prompts, responses = table["prompt"].to_pylist(), table["response"].to_pylist()
    n = table.num_rows
    errors: list[str | None] = [None] * n

    if cfg.label.labeller == "implicit_reward":
        policy_logps, too_long, tokenizer = _logps_under(str(plan.inputs["policy"]), cfg, prompts, responses)
        ref_logps, _, _ = _logps_under(str(plan.inputs["reference"]), cfg, prompts, responses, vocab_of=tokenizer)
        rewards = implicit_reward(policy_logps, ref_logps, cfg.train.beta)
        for i in np.flatnonzero(too_long):
            errors[i] = "too_long"
    else:
        assert cfg.label.python_reward is not None
        fn = load_reward_fn(cfg.label.python_reward)
        policy_logps = ref_logps = np.full(n, np.nan)
        rewards = np.full(n, np.nan)
        for start in range(0, n, cfg.label.batch_size):
            stop = min(start + cfg.label.batch_size, n)
            out = list(fn(prompts[start:stop], responses[start:stop]))
            if len(out) != stop - start:
                raise ValueError(
                    f"label.python_reward={cfg.label.python_reward}: returned {len(out)} scores for {stop - start} responses"
                )
            rewards[start:stop] = [math.nan if x is None else float(x) for x in out]
    for i in np.flatnonzero(~np.isfinite(rewards)):
        errors[i] = errors[i] or "non_finite"

    def nullable(a: np.ndarray) -> pa.Array:
        return pa.array(a, mask=~np.isfinite(a), type=pa.float64())

    labelled = table.append_column("policy_logp", nullable(policy_logps))
    labelled = labelled.append_column("reference_logp", nullable(ref_logps))
    labelled = labelled.append_column("reward", nullable(rewards))
    labelled = labelled.append_column("labeller", pa.array([cfg.label.labeller] * n, pa.string()))
    labelled = labelled.append_column("label_error", pa.array(errors, pa.string()))
    write_parquet(labelled, plan.outputs["labels"], schemas.LABELS)
    scored = rewards[np.isfinite(rewards)]
    return {
        "responses": n,
        "scored": int(scored.size),
        "unscored": n - int(scored.size),
        "reward_mean": float(scored.mean()) if scored.size else None,
        "reward_std": float(scored.std()) if scored.size else None,
        "reward_min": float(scored.min()) if scored.size else None,
        "reward_max": float(scored.max()) if scored.size else None,
    }


if __name__ == "__main__":
    from stages.common import main

    main("label", run)
