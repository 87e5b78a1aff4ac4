"""Stage `pairs`: preference pairs for the round.

Round k ≥ 1 (../shared/METHODS.md §1.3-1.5, §7), from `labels.parquet` (and, for judges, `preferences.parquet`):
  1. drop responses cut at the token limit (finish_reason = length), unscored ones, and degenerate ones
     (fewer than `pairs.min_chars` non-space characters); keep prompts with >= `pairs.min_valid` left;
  2. `pairs.strategy`:
     - best_worst (DICE): one pair per prompt, chosen = argmax, rejected = argmin of the score. Scalar rewards
       (implicit reward, reward model, python): s = r − α·len, α searched so the mean chosen−rejected length gap
       is ≈ 0. Judges: s = the ranking score (label.ranking), no α, and the pair's preference = p̂ of that
       comparison (as measured, so it can be below ½ where the direct comparison disagrees with the ranking);
     - all_pairs: every pair of valid responses (soft-label losses: iREPO, IPO);
     - random: `pairs.random_pairs_per_prompt` disjoint random pairs per prompt (online IPO);
     in all_pairs/random, chosen is the side the label prefers (higher r, or p̂ ≥ ½);
  3. drop ties: identical texts; a score margin not above `pairs.min_margin` (scalar rewards, and judges'
     best_worst); for judges |p̂ − ½| not above `pairs.min_preference_margin`, and pairs no annotator answered;
  4. experience replay with ratio γ: offline pairs from prompts the generated pairs do not use.
`preference` is p̂ with `annotators` = how many annotators it averages for judges; for scalar rewards 1.0 (hard)
or σ(r_chosen − r_rejected) (`pairs.preference_from_rewards`; auto: σ for a reward model).
Round 0 (offline DPO): the offline set itself (capped by `round0.max_pairs`).

Writes `pairs.parquet` (PAIRS). Sampling of replay pairs is seeded by (seed, round).

    python -m stages.pairs conf/tiny.yaml --round 1
"""

from __future__ import annotations

import itertools
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


PairKey = tuple[str, int, int]  # (prompt_id, idx_a, idx_b) of a compared pair, idx_a < idx_b


def preference_means(preferences: pa.Table, min_annotators: int) -> dict[PairKey, tuple[float, int]]:
    """p̂ per compared pair: (prompt_id, idx_a, idx_b) -> (mean p over the annotators that answered, how many).

    Rows with a null p (failed comparisons) are excluded; pairs with fewer than `min_annotators` answers are absent.
    This is the only place p̂ is formed, so it is what a reader recomputes from preferences.parquet.
    """
    d = preferences.select(["prompt_id", "idx_a", "idx_b", "p"]).to_pydict()
    sums: dict[PairKey, list[float]] = defaultdict(list)
    for pid, a, b, p in zip(d["prompt_id"], d["idx_a"], d["idx_b"], d["p"]):
        if p is not None:
            sums[(pid, a, b)].append(p)
    return {key: (float(np.mean(ps)), len(ps)) for key, ps in sums.items() if len(ps) >= min_annotators}


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def generated_pairs(
    labels: pa.Table, cfg: RunConfig, k: int, preferences: pa.Table | None = None
) -> tuple[dict[str, list], dict[str, Any]]:
    """Pairs (columns of PAIRS) and the selection's statistics.

    `preferences`: the judges' per-annotator table (labeller=judge); then `reward` in `labels` is the ranking
    score, each pair's `preference` is p̂ and `annotators` the number of annotators behind it. Without it the
    rewards are scalar (implicit reward, reward model, python) and `preference` follows
    `pairs.preference_from_rewards`.
    """
    pc = cfg.pairs
    d = labels.to_pydict()
    n = labels.num_rows
    reward = np.array([np.nan if r is None else r for r in d["reward"]], dtype=np.float64)
    cut = np.array([f == "length" for f in d["finish_reason"]])
    degenerate = np.array([len("".join(t.split())) < pc.min_chars for t in d["response"]])
    unscored = ~np.isfinite(reward)
    valid = ~cut & ~degenerate & ~unscored
    length = np.array(d["num_tokens"] if pc.length_unit == "tokens" else d["num_chars"], dtype=np.float64)
    judged = preferences is not None
    p_hat = preference_means(preferences, cfg.label.min_annotators) if judged else {}
    soft = pc.preference_from_rewards == "sigmoid" or (
        pc.preference_from_rewards == "auto" and cfg.label.labeller == "reward_model"
    )

    groups: dict[str, list[int]] = defaultdict(list)
    for i in range(n):
        if valid[i]:
            groups[d["prompt_id"][i]].append(i)
    all_prompts = set(d["prompt_id"])
    kept = [pid for pid in dict.fromkeys(d["prompt_id"]) if len(groups.get(pid, ())) >= pc.min_valid]

    # candidates: (chosen row, rejected row, score margin), before the tie filters
    alpha, gap0 = 0.0, None
    if pc.strategy == "best_worst":
        width = max((len(groups[p]) for p in kept), default=1)
        index = np.full((len(kept), width), -1)
        for row, pid in enumerate(kept):
            index[row, : len(groups[pid])] = groups[pid]
        present = index >= 0
        r2 = np.where(present, reward[index], np.nan)  # (P, K)
        l2 = np.where(present, length[index], 0.0)  # (P, K)
        at_zero = best_worst(r2, l2, 0.0)
        # α trades a scalar reward against length; a judge's ranking score is not on that scale
        debias = pc.debias_length and not judged
        sel = search_alpha(r2, l2, pc.alpha_step, pc.alpha_max_steps) if debias else at_zero
        rows = np.arange(len(kept))
        chosen, rejected = index[rows, sel.chosen].tolist(), index[rows, sel.rejected].tolist()
        cand = list(zip(chosen, rejected, sel.margin.tolist()))
        alpha, gap0 = sel.alpha, at_zero.gap
    else:
        rng = np.random.default_rng([cfg.seed, k, 1])  # its own stream: replay sampling stays as it was
        cand = []
        for pid in kept:
            rows_ = groups[pid]
            if pc.strategy == "all_pairs":
                picked = list(itertools.combinations(rows_, 2))
            else:  # random: disjoint pairs of a random order (online IPO: two fresh samples per pair)
                perm = rng.permutation(rows_).tolist()
                m = min(pc.random_pairs_per_prompt, len(perm) // 2)
                picked = [(perm[2 * t], perm[2 * t + 1]) for t in range(m)]
            for a, b in picked:
                w, l_ = (a, b) if reward[a] >= reward[b] else (b, a)
                cand.append((w, l_, float(reward[w] - reward[l_])))

    texts = d["response"]
    out_w, out_l, prefs, annotators = [], [], [], []
    ties = no_comparison = preference_ties = disagree = 0
    for w, l_, margin in cand:
        pid = d["prompt_id"][w]
        pref, n_ann = 1.0, 1
        if judged:
            a, b = sorted((w, l_), key=lambda r: d["sample_idx"][r])
            got = p_hat.get((pid, d["sample_idx"][a], d["sample_idx"][b]))
            if got is None:
                no_comparison += 1  # every annotator failed (or too few answered) on this pair
                continue
            pref, n_ann = (got[0] if a == w else 1.0 - got[0]), got[1]
            if pc.strategy != "best_worst" and pref < 0.5:  # orient by the judges' own verdict
                w, l_, pref = l_, w, 1.0 - pref
        if texts[w] == texts[l_] or ((pc.strategy == "best_worst" or not judged) and margin <= pc.min_margin):
            ties += 1
            continue
        if judged and abs(pref - 0.5) <= pc.min_preference_margin:
            preference_ties += 1
            continue
        if judged:
            disagree += pref < 0.5  # best_worst: the ranking's best lost the direct comparison
        elif soft:
            pref = _sigmoid(reward[w] - reward[l_])  # p = σ(r_chosen − r_rejected)
        out_w.append(w)
        out_l.append(l_)
        prefs.append(pref)
        annotators.append(n_ann)
    w, l_ = np.array(out_w, dtype=int), np.array(out_l, dtype=int)
    if pc.strategy == "best_worst":
        pair_ids = [f"r{k}-{d['prompt_id'][i]}" for i in w]
    else:
        ids = d["sample_idx"]
        pair_ids = [f"r{k}-{d['prompt_id'][a]}-{ids[a]}-{ids[b]}" for a, b in zip(w, l_)]
    out = {
        "pair_id": pair_ids,
        "prompt_id": [d["prompt_id"][i] for i in w],
        "prompt": [d["prompt"][i] for i in w],
        "chosen": [texts[i] for i in w],
        "rejected": [texts[i] for i in l_],
        "source": ["generated"] * len(w),
        "chosen_reward": reward[w].tolist(),
        "rejected_reward": reward[l_].tolist(),
        "chosen_len": length[w].astype(int).tolist(),
        "rejected_len": length[l_].astype(int).tolist(),
        "alpha": [alpha] * len(w),
        "preference": prefs,
        "annotators": annotators,
        "round": [k] * len(w),
    }
    stats = {
        "strategy": pc.strategy,
        "responses": n,
        "dropped_length": int(cut.sum()),
        "dropped_degenerate": int((degenerate & ~cut).sum()),
        "dropped_unscored": int((unscored & ~cut & ~degenerate).sum()),
        "prompts": len(all_prompts),
        "prompts_below_min_valid": len(all_prompts) - len(kept),
        "dropped_ties": ties,
        "alpha": alpha,
        "length_gap_alpha0": gap0,
        "length_gap": float(np.mean(length[w] - length[l_])) if len(w) else None,
    }
    if judged:
        stats.update(
            dropped_no_comparison=no_comparison,
            dropped_preference_ties=preference_ties,
            best_lost_direct_comparison=int(disagree),
            mean_preference=float(np.mean(prefs)) if prefs else None,
            mean_annotators=float(np.mean(annotators)) if annotators else None,
        )
    return out, stats


def run(cfg: RunConfig, plan: StagePlan) -> dict[str, Any]:
    k = plan.round
    offline = read_offline(plan.inputs["offline"])
    rng = np.random.default_rng([cfg.seed, k])
    if k == 0 or cfg.offline_rounds:  # round 0, or a round of the offline baseline: offline pairs only
        cap = cfg.round0.max_pairs if k == 0 else cfg.data.offline_per_round
        n = min(offline.num_rows, cap or offline.num_rows)
        idx = np.sort(rng.choice(offline.num_rows, size=n, replace=False))
        table = pa.table(_offline_rows(offline, idx, k), schema=schemas.PAIRS)
        rows = write_parquet(table, plan.outputs["pairs"], schemas.PAIRS)
        return {"pairs": rows, "pairs_offline": rows, "pairs_generated": 0}

    prefs = None
    if "preferences" in plan.inputs:  # judges: p̂ from the per-annotator comparisons
        prefs = read_parquet(plan.inputs["preferences"], schemas.PREFERENCES)
    gen, stats = generated_pairs(read_parquet(plan.inputs["labels"], schemas.LABELS), cfg, k, prefs)
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
