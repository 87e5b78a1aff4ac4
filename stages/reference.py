"""Stage `reference`: reference log-probs of every chosen and rejected response, computed once.

The reference of round k's training is π_{k-1}, the model training starts from (DICE §1.6; round 0: the
initial policy). Training reads these numbers from `reference.parquet` instead of holding a second model
in memory. Chosen and rejected are scored as one group per prompt (`reference.packing`, pipeline.packing:
the prompt computed once, no padding; the same numbers as padded batches). Pairs whose prompt+response
exceeds `model.max_length` tokens, or whose log-prob is not finite, are dropped and counted.

Writes `reference.parquet` (REFERENCE = PAIRS + token counts + `ref_chosen_logps`/`ref_rejected_logps`,
TRL's column names: the file is a DPO dataset with precomputed reference log-probs for other trainers too).

    python -m stages.reference conf/tiny.yaml --round 1
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import schemas
from pipeline.artifacts import StagePlan, read_parquet, write_parquet
from pipeline.chat import prompts_of
from pipeline.config import RunConfig


def run(cfg: RunConfig, plan: StagePlan) -> dict[str, Any]:
    from pipeline.logprobs import encode, load_causal_lm, score

    pairs = read_parquet(plan.inputs["pairs"], schemas.PAIRS)
    model, tokenizer = load_causal_lm(str(plan.inputs["reference"]), cfg.model.dtype, cfg.model.trust_remote_code)
    prompts = prompts_of(pairs)  # the conversation where the pair has one
    chosen = [encode(tokenizer, p, y) for p, y in zip(prompts, pairs["chosen"].to_pylist())]
    rejected = [encode(tokenizer, p, y) for p, y in zip(prompts, pairs["rejected"].to_pylist())]
    fits = np.array(
        [max(len(c[0]) + len(c[1]), len(r[0]) + len(r[1])) <= cfg.model.max_length for c, r in zip(chosen, rejected)],
        dtype=bool,
    )
    ok = np.flatnonzero(fits)
    both = [chosen[i] for i in ok] + [rejected[i] for i in ok]
    # packed (reference.packing): each pair's prompt once, chosen and rejected after it, no padding (exact)
    logps = (
        score(model, both, tokenizer.pad_token_id, cfg.reference.batch_size, packing=cfg.reference.packing,
              max_length=cfg.model.max_length)
        if len(ok) else np.empty(0)
    )  # fmt: skip
    ref_c, ref_r = logps[: len(ok)], logps[len(ok) :]
    finite = np.isfinite(ref_c) & np.isfinite(ref_r)
    keep = ok[finite]
    out = pairs.take(pa.array(keep, pa.int64()))
    out = out.append_column("chosen_tokens", pa.array([len(chosen[i][1]) for i in keep], pa.int32()))
    out = out.append_column("rejected_tokens", pa.array([len(rejected[i][1]) for i in keep], pa.int32()))
    out = out.append_column("ref_chosen_logps", pa.array(ref_c[finite], pa.float64()))
    out = out.append_column("ref_rejected_logps", pa.array(ref_r[finite], pa.float64()))
    if out.num_rows == 0:
        raise ValueError(
            f"{plan.inputs['pairs']}: no pair left after reference scoring ({int((~fits).sum())} longer than "
            f"model.max_length={cfg.model.max_length}, {int((~finite).sum())} with non-finite log-probs)"
        )
    rows = write_parquet(out, plan.outputs["reference"], schemas.REFERENCE)
    return {
        "pairs": rows,
        "dropped_too_long": int((~fits).sum()),
        "dropped_non_finite": int((~finite).sum()),
        "mean_ref_chosen_logps": float(ref_c[finite].mean()),
        "mean_ref_rejected_logps": float(ref_r[finite].mean()),
    }


if __name__ == "__main__":
    from stages.common import main

    main("reference", run)
