"""Stage `pairs`: preference pairs for the round.

Round k ≥ 1 (DICE, ../shared/METHODS.md §1.3-1.5), from `labels.parquet`:
  1. drop responses cut at the token limit (finish_reason = length), unscored ones, and degenerate ones
     (fewer than `pairs.min_chars` non-space characters); keep prompts with >= `pairs.min_valid` left;
  2. best-vs-worst on s = r − α·len, α searched so the mean chosen−rejected length gap is ≈ 0;
  3. drop ties (margin <= `pairs.min_margin`, or identical texts);
  4. experience replay with ratio γ: offline pairs from prompts the generated pairs do not use.
Round 0 (offline DPO): the offline set itself (capped by `round0.max_pairs`).

Writes `pairs.parquet` (PAIRS). Sampling of replay pairs is seeded by (seed, round).

    python -m stages.pairs conf/tiny.yaml --round 1
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import schemas
from pipeline.artifacts import StagePlan, read_parquet, write_parquet
from pipeline.config import RunConfig
from pipeline.datasets import read_offline
from pipeline.length import best_worst, replay_counts, search_alpha


def _offline_rows(offline: pa.Table, idx: np.ndarray, k: int) -> dict[str, list]:
    sub = offline.take(pa.array(idx, pa.int64())).to_pydict()
    n = len(idx)
    return {
        "pair_id": [f"off-{p}" for p in sub["pair_id"]],
        "prompt_id": [f"off-{p}" for p in sub["pair_id"]],
        "prompt": sub["prompt"],
        "chosen": sub["chosen"],
        "rejected": sub["rejected"],
        "source": ["offline"] * n,
        "chosen_reward": [None] * n,
        "rejected_reward": [None] * n,
        "chosen_len": [None] * n,
        "rejected_len": [None] * n,
        "alpha": [None] * n,
        "preference": [1.0] * n,
        "annotators": [1] * n,
        "round": [k] * n,
    }


def generated_pairs(labels: pa.Table, cfg: RunConfig, k: int) -> tuple[dict[str, list], dict[str, Any]]:
    """Best-vs-worst pairs (columns of PAIRS) and the selection's statistics."""
    pc = cfg.pairs
    d = labels.to_pydict()
    n = labels.num_rows
    reward = np.array([np.nan if r is None else r for r in d["reward"]], dtype=np.float64)
    cut = np.array([f == "length" for f in d["finish_reason"]])
    degenerate = np.array([len("".join(t.split())) < pc.min_chars for t in d["response"]])
    unscored = ~np.isfinite(reward)
    valid = ~cut & ~degenerate & ~unscored
    length = np.array(d["num_tokens"] if pc.length_unit == "tokens" else d["num_chars"], dtype=np.float64)

    groups: dict[str, list[int]] = defaultdict(list)
    for i in range(n):
        if valid[i]:
            groups[d["prompt_id"][i]].append(i)
    all_prompts = set(d["prompt_id"])
    kept = [pid for pid in dict.fromkeys(d["prompt_id"]) if len(groups.get(pid, ())) >= pc.min_valid]
    width = max((len(groups[p]) for p in kept), default=1)
    index = np.full((len(kept), width), -1)
    for row, pid in enumerate(kept):
        index[row, : len(groups[pid])] = groups[pid]
    present = index >= 0
    r2 = np.where(present, reward[index], np.nan)  # (P, K)
    l2 = np.where(present, length[index], 0.0)  # (P, K)

    at_zero = best_worst(r2, l2, 0.0)
    sel = search_alpha(r2, l2, pc.alpha_step, pc.alpha_max_steps) if pc.debias_length else at_zero
    rows = np.arange(len(kept))
    w, l_ = index[rows, sel.chosen], index[rows, sel.rejected]
    texts = d["response"]
    keep = (sel.margin > pc.min_margin) & np.array([texts[a] != texts[b] for a, b in zip(w, l_)], dtype=bool)
    w, l_ = w[keep], l_[keep]
    out = {
        "pair_id": [f"r{k}-{d['prompt_id'][i]}" for i in w],
        "prompt_id": [d["prompt_id"][i] for i in w],
        "prompt": [d["prompt"][i] for i in w],
        "chosen": [texts[i] for i in w],
        "rejected": [texts[i] for i in l_],
        "source": ["generated"] * len(w),
        "chosen_reward": reward[w].tolist(),
        "rejected_reward": reward[l_].tolist(),
        "chosen_len": length[w].astype(int).tolist(),
        "rejected_len": length[l_].astype(int).tolist(),
        "alpha": [sel.alpha] * len(w),
        "preference": [1.0] * len(w),  # best-vs-worst is a hard label
        "annotators": [1] * len(w),
        "round": [k] * len(w),
    }
    stats = {
        "responses": n,
        "dropped_length": int(cut.sum()),
        "dropped_degenerate": int((degenerate & ~cut).sum()),
        "dropped_unscored": int((unscored & ~cut & ~degenerate).sum()),
        "prompts": len(all_prompts),
        "prompts_below_min_valid": len(all_prompts) - len(kept),
        "dropped_ties": int((~keep).sum()),
        "alpha": sel.alpha,
        "length_gap_alpha0": at_zero.gap,
        "length_gap": float(np.mean(length[w] - length[l_])) if len(w) else None,
    }
    return out, stats


def run(cfg: RunConfig, plan: StagePlan) -> dict[str, Any]:
    k = plan.round
    offline = read_offline(plan.inputs["offline"])
    rng = np.random.default_rng([cfg.seed, k])
    if k == 0:
        n = min(offline.num_rows, cfg.round0.max_pairs or offline.num_rows)
        idx = np.sort(rng.choice(offline.num_rows, size=n, replace=False))
        table = pa.table(_offline_rows(offline, idx, k), schema=schemas.PAIRS)
        rows = write_parquet(table, plan.outputs["pairs"], schemas.PAIRS)
        return {"pairs": rows, "pairs_offline": rows, "pairs_generated": 0}

    gen, stats = generated_pairs(read_parquet(plan.inputs["labels"], schemas.LABELS), cfg, k)
    n_gen_all = len(gen["pair_id"])
    used = set(gen["prompt"])
    eligible = np.array([i for i, p in enumerate(offline["prompt"].to_pylist()) if p not in used], dtype=np.int64)
    n_gen, n_off = replay_counts(n_gen_all, offline.num_rows, cfg.pairs.replay_ratio)
    if n_gen < n_gen_all:
        pick = np.sort(rng.choice(n_gen_all, size=n_gen, replace=False))
        gen = {c: [v[i] for i in pick] for c, v in gen.items()}
    off_idx = np.sort(rng.choice(eligible, size=min(n_off, len(eligible)), replace=False)) if n_off else np.array([], np.int64)
    off = _offline_rows(offline, off_idx, k)
    table = pa.table({c: gen[c] + off[c] for c in schemas.PAIRS.names}, schema=schemas.PAIRS)
    if table.num_rows == 0:
        raise ValueError(
            f"round {k}: no preference pair could be built from {plan.inputs['labels']} "
            f"({stats['dropped_length']} responses cut at the token limit, {stats['prompts_below_min_valid']} "
            f"prompts below pairs.min_valid, {stats['dropped_ties']} ties); raise generate.max_tokens or lower pairs.min_valid"
        )
    rows = write_parquet(table, plan.outputs["pairs"], schemas.PAIRS)
    cl, rl = np.array(gen["chosen_len"], float), np.array(gen["rejected_len"], float)
    cr, rr = np.array(gen["chosen_reward"], float), np.array(gen["rejected_reward"], float)
    stats.update(
        pairs=rows,
        pairs_generated=len(gen["pair_id"]),
        pairs_generated_before_replay_cap=n_gen_all,
        pairs_offline=len(off_idx),
        offline_requested=n_off,
        mean_chosen_len=float(cl.mean()) if cl.size else None,
        mean_rejected_len=float(rl.mean()) if rl.size else None,
        mean_chosen_reward=float(cr.mean()) if cr.size else None,
        mean_rejected_reward=float(rr.mean()) if rr.size else None,
    )
    return stats


if __name__ == "__main__":
    from stages.common import main

    main("pairs", run)
