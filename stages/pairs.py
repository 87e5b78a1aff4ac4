"""Stage `pairs`: preference pairs for the round.

Round k ≥ 1 (../shared/METHODS.md §1.3-1.5, §7), from `labels.parquet` (and, for judges, `preferences.parquet`):
  1. drop responses cut at the token limit (finish_reason = length), unscored ones, degenerate ones (fewer than
     `pairs.min_chars` non-whitespace characters) and, with `pairs.max_chars`, longer ones; keep prompts with
     >= `pairs.min_valid` left;
  2. `pairs.strategy`:
     - best_worst (DICE): one pair per prompt, chosen = argmax, rejected = argmin of the score. Scalar rewards
       (implicit reward, reward model, python): s = r − α·len, α chosen so the mean chosen−rejected length gap
       is ≈ 0 (pipeline/method/length.py: exactly on the gap(α) curve, or on the reference's grid with
       `pairs.alpha_search: grid`). Judges: s = the ranking score (label.ranking), no α, and the pair's
       preference = p̂ of that comparison (as measured, so it can be below ½ where the direct comparison
       disagrees with the ranking);
     - all_pairs: every pair of valid responses (soft-label losses: iREPO, IPO);
     - random: `pairs.random_pairs_per_prompt` disjoint random pairs per prompt (online IPO);
     in all_pairs/random, chosen is the side the label prefers (higher r, or p̂ ≥ ½);
  3. drop ties: identical texts; a score margin not above `pairs.min_margin` (scalar rewards, and judges'
     best_worst); for judges |p̂ − ½| not above `pairs.min_preference_margin`, and pairs no annotator answered;
  4. experience replay with ratio γ: n_gen generated pairs sampled, then offline pairs from prompts those
     sampled pairs do not use (as the reference code's `create_mix_paired_set`).
`preference` is p̂ with `annotators` = how many annotators it averages for judges; for scalar rewards 1.0 (hard)
or σ(r_chosen − r_rejected) (`pairs.preference_from_rewards`; auto: σ for a reward model).
Round 0 (offline DPO): the offline set itself (capped by `round0.max_pairs`).

Writes `pairs.parquet` (PAIRS), generated pairs with the token ids they were sampled as (`prompt_token_ids`,
`chosen_token_ids`, `rejected_token_ids`, carried from labels.parquet in Arrow; null for offline pairs, which the
reference stage tokenises once). Sampling of replay pairs is seeded by (seed, round). Only the label columns it
needs are read, and response texts are compared in Arrow, so a round of 1M responses stays a few seconds.

    python -m stages.pairs conf/tiny.yaml --round 1
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import RunConfig
from pipeline.data import schemas
from pipeline.data.artifacts import (
    StagePlan,
    iter_parquet,
    read_parquet,
    take_column,
    take_rows,
    take_table,
    write_parquet,
)
from pipeline.data.offline_cache import offline_table
from pipeline.method.length import best_worst, replay_counts, search_alpha, search_alpha_exact

# The LABELS columns pairs reads for every response (the log-prob and bookkeeping columns are not needed) ...
SELECT_COLUMNS = ["prompt_id", "sample_idx", "num_tokens", "num_chars", "finish_reason", "reward", "label_error"]
# ... and those it reads only at the responses it pairs (texts and token ids: most of the file), a row group at a time
PAIRED_COLUMNS = ["prompt", "prompt_messages", "response", "prompt_token_ids", "response_token_ids"]
LABEL_COLUMNS = SELECT_COLUMNS + PAIRED_COLUMNS
# The token-id columns of PAIRS ...
ID_COLUMNS = ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids")
# ... and the texts: Arrow arrays from labels (and the offline set) to pairs.parquet, never a Python object per row
ARROW_COLUMNS = ("prompt", "prompt_messages", "chosen", "rejected") + ID_COLUMNS
# Python's str.isspace() characters, as an RE2 class (checked over every code point in tests/test_pairs_table.py)
WHITESPACE = r"\s\x{0b}\x{1c}-\x{1f}\x{85}\p{Z}"


def _as_pairs_column(column: pa.ChunkedArray | pa.Array, name: str) -> pa.Array:
    """`column` as one Arrow array typed as PAIRS' column `name` (as it goes into pairs.parquet)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.cast(schemas.PAIRS.field(name).type)


def _offline_rows(offline: pa.Table, idx: np.ndarray, k: int) -> dict[str, Any]:
    """PAIRS columns of the offline set's rows `idx`: the ARROW_COLUMNS as Arrow, the rest as lists."""
    sub = take_table(offline.select(["pair_id", "prompt", "prompt_messages", "chosen", "rejected"]), idx)
    n = len(idx)
    pair_ids = [f"off-{p}" for p in sub["pair_id"].to_pylist()]
    return {
        "pair_id": pair_ids,
        "prompt_id": pair_ids,
        **{c: _as_pairs_column(sub[c], c) for c in ("prompt", "prompt_messages", "chosen", "rejected")},
        "source": ["offline"] * n,
        "chosen_reward": [None] * n,
        "rejected_reward": [None] * n,
        "chosen_len": [None] * n,
        "rejected_len": [None] * n,
        "alpha": [None] * n,
        "preference": [1.0] * n,
        "annotators": [1] * n,
        "round": [k] * n,
        # tokenised once, by the reference stage (it has the model's tokenizer)
        **{c: pa.nulls(n, schemas.TOKEN_IDS) for c in ID_COLUMNS},
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


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _numpy(col: pa.ChunkedArray | pa.Array, dtype: Any, null: Any = None) -> np.ndarray:
    if null is not None:
        col = pc.fill_null(col, null)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=dtype)


def _at_least_chars(responses: pa.ChunkedArray, n: int) -> np.ndarray:
    """(N,) True where a response has at least n non-whitespace characters (str.isspace's whitespace)."""
    if n <= 0:
        return np.ones(len(responses), dtype=bool)
    # anchored: RE2 stops as soon as n non-whitespace characters are found, whatever the response's length
    found = pc.match_substring_regex(responses, pattern=f"^(?:[{WHITESPACE}]*[^{WHITESPACE}]){{{n}}}")
    return _numpy(found, bool, False)


def _long_enough(path: Any, n: int, min_chars: int) -> np.ndarray:
    """(n,) `_at_least_chars` of labels.parquet's responses, read a row group at a time (not read when min_chars <= 0)."""
    if min_chars <= 0:
        return np.ones(n, dtype=bool)
    parts = [_at_least_chars(g["response"], min_chars) for g in iter_parquet(path, schemas.LABELS, ["response"])]
    return np.concatenate(parts) if parts else np.ones(0, dtype=bool)


def reward_units(cfg: RunConfig) -> float:
    """Factor from the labels' reward to the DICE reference code's units: its implicit reward has no β."""
    return 1.0 / cfg.train.beta if cfg.label.labeller == "implicit_reward" else 1.0


def generated_pairs(
    labels: pa.Table,
    cfg: RunConfig,
    k: int,
    preferences: pa.Table | None = None,
    *,
    long_enough: np.ndarray | None = None,
    take: Callable[[list[str], np.ndarray], pa.Table] | None = None,
) -> tuple[dict[str, list], dict[str, Any]]:
    """Pairs (columns of PAIRS) and the selection's statistics.

    `labels`: LABELS rows (at least SELECT_COLUMNS; LABEL_COLUMNS unless `long_enough` and `take` are given).
    `preferences`: the judges' per-annotator table (labeller=judge); then `reward` in `labels` is the ranking score,
    each pair's `preference` is p̂ and `annotators` the number of annotators behind it. Without it the rewards are
    scalar (implicit reward, reward model, python) and `preference` follows `pairs.preference_from_rewards`.
    `long_enough`: (N,) whether each response has at least `pairs.min_chars` non-whitespace characters (default:
    from labels' `response`); `take(columns, rows)`: the PAIRED_COLUMNS of label rows `rows` (default: from `labels`).
    `run` passes both, so the texts and ids of the responses it does not pair are never held.
    The ARROW_COLUMNS of the result are Arrow arrays (the texts and ids as read), the other columns lists.
    """
    pcfg = cfg.pairs
    n = labels.num_rows
    codes_arr = pc.dictionary_encode(labels["prompt_id"].combine_chunks() if n else pa.array([], pa.string()))
    codes = _numpy(codes_arr.indices, np.int64)  # (N,) prompt number, in order of first appearance
    prompt_ids = codes_arr.dictionary.to_pylist()
    sample_idx = _numpy(labels["sample_idx"], np.int64)
    reward = _numpy(labels["reward"], np.float64, np.nan)
    cut = _numpy(pc.equal(labels["finish_reason"], "length"), bool, False)
    degenerate = ~(long_enough if long_enough is not None else _at_least_chars(labels["response"], pcfg.min_chars))
    if take is None:
        def take(columns: list[str], rows: np.ndarray) -> pa.Table:
            return pa.table({c: take_column(labels[c], rows) if c in labels.column_names
                             else pa.nulls(len(rows), schemas.LABELS.field(c).type) for c in columns})  # fmt: skip
    n_chars = _numpy(labels["num_chars"], np.int64)
    over = n_chars > pcfg.max_chars if pcfg.max_chars is not None else np.zeros(n, dtype=bool)
    unscored = ~np.isfinite(reward)
    valid = ~cut & ~degenerate & ~over & ~unscored
    length = _numpy(labels["num_tokens" if pcfg.length_unit == "tokens" else "num_chars"], np.float64)
    judged = preferences is not None
    p_hat = preference_means(preferences, cfg.label.min_annotators) if judged else {}
    soft = pcfg.preference_from_rewards == "sigmoid" or (
        pcfg.preference_from_rewards == "auto" and cfg.label.labeller == "reward_model"
    )

    # valid rows grouped by prompt (prompts in order of first appearance, rows in file order within a prompt)
    rows_valid = np.flatnonzero(valid)
    rows_valid = rows_valid[np.argsort(codes[rows_valid], kind="stable")]
    counts = np.bincount(codes[rows_valid], minlength=len(prompt_ids))  # (prompts,)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    kept = np.flatnonzero(counts >= pcfg.min_valid)  # prompt numbers with enough valid responses

    # candidates: chosen row, rejected row, score margin, before the tie filters
    alpha, gap0 = 0.0, None
    if pcfg.strategy == "best_worst":
        width = int(counts[kept].max()) if len(kept) else 1
        col = np.arange(width)
        index = np.where(col < counts[kept, None], starts[kept, None] + col, -1)  # (P, K) into rows_valid
        present = index >= 0
        index = np.where(present, rows_valid[np.where(present, index, 0)], -1)  # (P, K) label rows
        r2 = np.where(present, reward[index], np.nan)  # (P, K)
        l2 = np.where(present, length[index], 0.0)  # (P, K)
        at_zero = best_worst(r2, l2, 0.0)
        # α trades a scalar reward against length; a judge's ranking score is not on that scale
        if pcfg.debias_length and not judged and pcfg.alpha_search == "exact":
            sel = search_alpha_exact(r2, l2)
        elif pcfg.debias_length and not judged:  # the reference's grid, in its units: α·units is α in ours
            units = reward_units(cfg)
            sel = search_alpha(r2 * units, l2, pcfg.alpha_step, pcfg.alpha_max_steps)
            sel = best_worst(r2, l2, sel.alpha / units)
        else:
            sel = at_zero
        rows = np.arange(len(kept))
        w, l_ = index[rows, sel.chosen], index[rows, sel.rejected]
        margin = sel.margin
        alpha, gap0 = sel.alpha, at_zero.gap
    else:
        rng = np.random.default_rng([cfg.seed, k, 1])  # its own stream: replay sampling stays as it was
        cand = []
        for p in kept:
            rows_ = rows_valid[starts[p] : starts[p] + counts[p]].tolist()
            if pcfg.strategy == "all_pairs":
                picked = list(itertools.combinations(rows_, 2))
            else:  # random: disjoint pairs of a random order (online IPO: two fresh samples per pair)
                perm = rng.permutation(rows_).tolist()
                m = min(pcfg.random_pairs_per_prompt, len(perm) // 2)
                picked = [(perm[2 * t], perm[2 * t + 1]) for t in range(m)]
            for a, b in picked:
                cand.append((a, b) if reward[a] >= reward[b] else (b, a))
        w = np.array([c[0] for c in cand], dtype=np.int64)
        l_ = np.array([c[1] for c in cand], dtype=np.int64)
        margin = reward[w] - reward[l_]

    # judges: each candidate's p̂ (and orientation, outside best_worst)
    keep = np.ones(len(w), dtype=bool)
    prefs = np.ones(len(w))
    annotators = np.ones(len(w), dtype=np.int64)
    stats_judged: dict[str, Any] = {}
    if judged:
        no_comparison = 0
        for i in range(len(w)):
            a, b = (w[i], l_[i]) if sample_idx[w[i]] < sample_idx[l_[i]] else (l_[i], w[i])
            got = p_hat.get((prompt_ids[codes[a]], int(sample_idx[a]), int(sample_idx[b])))
            if got is None:
                no_comparison += 1  # every annotator failed (or too few answered) on this pair
                keep[i] = False
                continue
            prefs[i], annotators[i] = (got[0] if a == w[i] else 1.0 - got[0]), got[1]
            if pcfg.strategy != "best_worst" and prefs[i] < 0.5:  # orient by the judges' own verdict
                w[i], l_[i], prefs[i] = l_[i], w[i], 1.0 - prefs[i]
        stats_judged["dropped_no_comparison"] = no_comparison
    # the paired responses in file order (read as they lie: no reordering copy); at_w, at_l: each pair's chosen and
    # rejected row among them
    rows = np.unique(np.concatenate([w, l_]))
    paired = take(PAIRED_COLUMNS, rows)
    at_w, at_l = np.searchsorted(rows, w), np.searchsorted(rows, l_)
    identical = _numpy(pc.equal(take_column(paired["response"], at_w), take_column(paired["response"], at_l)), bool, False)
    close = margin <= pcfg.min_margin if (pcfg.strategy == "best_worst" or not judged) else np.zeros(len(w), bool)
    ties = keep & (identical | close)
    keep &= ~ties
    if judged:
        preference_ties = keep & (np.abs(prefs - 0.5) <= pcfg.min_preference_margin)
        keep &= ~preference_ties
        stats_judged["dropped_preference_ties"] = int(preference_ties.sum())
    elif soft:
        prefs = _sigmoid(reward[w] - reward[l_])  # p = σ(r_chosen − r_rejected)
    w, l_, prefs, annotators = w[keep], l_[keep], prefs[keep], annotators[keep]
    chosen = take_table(paired, at_w[keep])  # the kept pairs' chosen rows
    rejected = take_table(paired.select(["response", "response_token_ids"]), at_l[keep])
    del paired

    pids = [prompt_ids[c] for c in codes[w]]
    if pcfg.strategy == "best_worst":
        pair_ids = [f"r{k}-{p}" for p in pids]
    else:
        pair_ids = [f"r{k}-{p}-{a}-{b}" for p, a, b in zip(pids, sample_idx[w], sample_idx[l_])]
    out = {
        "pair_id": pair_ids,
        "prompt_id": pids,
        "prompt": _as_pairs_column(chosen["prompt"], "prompt"),
        "prompt_messages": _as_pairs_column(chosen["prompt_messages"], "prompt_messages"),
        "chosen": _as_pairs_column(chosen["response"], "chosen"),
        "rejected": _as_pairs_column(rejected["response"], "rejected"),
        "source": ["generated"] * len(w),
        "chosen_reward": reward[w].tolist(),
        "rejected_reward": reward[l_].tolist(),
        "chosen_len": length[w].astype(int).tolist(),
        "rejected_len": length[l_].astype(int).tolist(),
        "alpha": [alpha] * len(w),
        "preference": prefs.tolist(),
        "annotators": annotators.tolist(),
        "round": [k] * len(w),
        # the sampled tokens, carried as they are to the reference and train stages
        "prompt_token_ids": _as_pairs_column(chosen["prompt_token_ids"], "prompt_token_ids"),
        "chosen_token_ids": _as_pairs_column(chosen["response_token_ids"], "chosen_token_ids"),
        "rejected_token_ids": _as_pairs_column(rejected["response_token_ids"], "rejected_token_ids"),
    }
    stats = {
        "strategy": pcfg.strategy,
        "responses": n,
        "dropped_length": int(cut.sum()),
        "dropped_degenerate": int((degenerate & ~cut).sum()),
        "dropped_over_max_chars": int((over & ~cut & ~degenerate).sum()),
        "dropped_unscored": int((unscored & ~cut & ~degenerate & ~over).sum()),
        "prompts": len(prompt_ids),
        "prompts_below_min_valid": len(prompt_ids) - len(kept),
        "dropped_ties": int(ties.sum()),
        "alpha_search": pcfg.alpha_search if pcfg.strategy == "best_worst" and pcfg.debias_length and not judged else None,
        "alpha": alpha,
        "length_gap_alpha0": gap0,
        "length_gap": float(np.mean(length[w] - length[l_])) if len(w) else None,
    }
    if pcfg.alpha_search == "grid" and stats["alpha_search"]:
        stats["alpha_reference_units"] = alpha * reward_units(cfg)  # the grid's own α (rewards without β)
    if judged:
        stats.update(
            **stats_judged,
            best_lost_direct_comparison=int((prefs < 0.5).sum()),  # best_worst: the ranking's best lost
            mean_preference=float(np.mean(prefs)) if len(prefs) else None,
            mean_annotators=float(np.mean(annotators)) if len(annotators) else None,
        )
    return out, stats


def _nothing_to_pair(path: Any, labels: pa.Table, stats: dict[str, Any], cfg: RunConfig, k: int) -> str:
    """Why round k has no generated pair, pointing at the cause: the label stage, the token limit, or min_valid."""
    n = stats["responses"]
    if n and stats["dropped_unscored"] + stats["dropped_length"] + stats["dropped_degenerate"] >= n and \
            stats["dropped_unscored"] > 0:  # fmt: skip
        reasons = Counter(e for e in labels["label_error"].to_pylist() if e is not None)
        why = ", ".join(f"{c} {e}" for e, c in reasons.most_common()) or "no reason recorded"
        return (f"round {k}: the label stage scored none of the {n} responses usable for pairs in {path} "
                f"(label_error: {why}; labeller {cfg.label.labeller}); fix the labeller, then re-run label")  # fmt: skip
    return (
        f"round {k}: no preference pair could be built from {path} "
        f"({stats['dropped_length']} responses cut at the token limit, {stats['dropped_degenerate']} degenerate, "
        f"{stats['dropped_unscored']} unscored, {stats['prompts_below_min_valid']} of {stats['prompts']} prompts "
        f"below pairs.min_valid={cfg.pairs.min_valid}, {stats['dropped_ties']} ties); raise generate.max_tokens "
        "or lower pairs.min_valid"
    )


def run(cfg: RunConfig, plan: StagePlan) -> dict[str, Any]:
    k = plan.round
    offline = offline_table(cfg.data.offline, cfg.run_dir)  # read and checked once per run
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
    path = plan.inputs["labels"]
    labels = read_parquet(path, schemas.LABELS, columns=SELECT_COLUMNS)
    gen, stats = generated_pairs(labels, cfg, k, prefs, long_enough=_long_enough(path, labels.num_rows, cfg.pairs.min_chars),
                                 take=lambda columns, rows: take_rows(path, schemas.LABELS, columns, rows))  # fmt: skip
    n_gen_all = len(gen["pair_id"])
    if n_gen_all == 0:  # no generated pair means no offline pair either (replay mixes in γ of them)
        raise ValueError(_nothing_to_pair(plan.inputs["labels"], labels, stats, cfg, k))
    del labels
    n_gen, n_off = replay_counts(n_gen_all, offline.num_rows, cfg.pairs.replay_ratio)
    if n_gen < n_gen_all:
        pick = np.sort(rng.choice(n_gen_all, size=n_gen, replace=False))
        gen = {c: v.take(pa.array(pick)) if c in ARROW_COLUMNS else [v[i] for i in pick] for c, v in gen.items()}
    # offline pairs only from prompts the sampled generated pairs do not use (the reference's rule)
    used = pc.is_in(offline["prompt"], value_set=pc.unique(gen["prompt"]))
    eligible = np.flatnonzero(~_numpy(used, bool, False)).astype(np.int64)
    off_idx = np.sort(rng.choice(eligible, size=min(n_off, len(eligible)), replace=False)) if n_off else np.array([], np.int64)
    off = _offline_rows(offline, off_idx, k)
    table = pa.table({c: pa.concat_arrays([gen[c], off[c]]) if c in ARROW_COLUMNS else gen[c] + off[c]
                      for c in schemas.PAIRS.names}, schema=schemas.PAIRS)  # fmt: skip
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
