"""Stage `reference`: reference log-probs of every chosen and rejected response, computed once.

The reference of round k's training is π_{k-1}, the model training starts from (DICE §1.6; round 0: the
initial policy). Training reads these numbers from `reference.parquet` instead of holding a second model
in memory. Chosen and rejected are scored as one group per prompt (`reference.packing`, pipeline.compute.packing:
the prompt computed once, no padding; the same numbers as padded batches). Pairs whose prompt+response
exceeds `model.max_length` tokens, or whose log-prob is not finite, are dropped and counted.

Processes and resume: the pairs are cut into shards of `reference.shard_size` whole prompts (a prompt's pairs
are never split), and `reference.num_processes` DeepSpeed ranks (pipeline.compute.launch; 0: every visible GPU) each score
every N-th missing shard, writing each as it finishes to `.dice/reference-shards/` (pipeline.data.shards). A killed
stage run again scores only the missing shards, on any number of processes. `reference.zero_stage: 3` partitions
the model's weights across the ranks (ZeRO-3 inference, pipeline/compute/zero3.py) for a model larger than one GPU.

Tokens: a generated pair is scored on the ids it was sampled as (pairs.parquet's `prompt_token_ids`,
`chosen_token_ids`, `rejected_token_ids`); an offline pair on the run's kept ids of its offline set
(pipeline.data.offline_cache: tokenised once per run, here, by the first round that needs them, before the ranks
start, over every core), found by the pair's content. A pair neither has (an offline set whose tokenizer has no Rust
side, a round written before ids were stored) is tokenised by its rank, in one batch per shard. Every pair's ids
are written with it, so training never tokenises again.

Writes `reference.parquet` (REFERENCE = PAIRS with every pair's token ids + token counts + `ref_chosen_logps`/
`ref_rejected_logps`, TRL's column names: the file is a DPO dataset with precomputed reference log-probs for other
trainers too).

    python -m stages.reference conf/tiny.yaml --round 1
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.compute import launch
from pipeline.config import RunConfig
from pipeline.data import schemas
from pipeline.data.artifacts import (
    StagePlan,
    iter_parquet,
    plan_digest,
    read_parquet,
    take_table,
    write_parquet,
)
from pipeline.data.chat import prompts_of
from pipeline.data.shards import Progress, Shards, assign, group_shards

# A shard's rows: the pair's row in pairs.parquet, its response token counts, reference log-probs, whether it fits,
# and the token ids of a pair tokenised here (an offline pair: null for pairs that came with ids).
SCORES = pa.schema([("row", pa.int64()), ("chosen_tokens", pa.int32()), ("rejected_tokens", pa.int32()),
                    ("ref_chosen", pa.float64()), ("ref_rejected", pa.float64()), ("fits", pa.bool_()),
                    ("prompt_token_ids", schemas.TOKEN_IDS), ("chosen_token_ids", schemas.TOKEN_IDS),
                    ("rejected_token_ids", schemas.TOKEN_IDS)])  # fmt: skip
ID_COLUMNS = ["prompt_token_ids", "chosen_token_ids", "rejected_token_ids"]


def _pairs_by_shard(cfg: RunConfig, plan: StagePlan, offline_ids: str | None = None):
    """The pairs' texts and token ids (prompt, chosen, rejected; in Arrow) with `lacks_ids` (pairs.parquet has none for
    the pair), the rows of each shard (whole prompts), each shard's number of prompts, and the kept ids of its offline
    pairs (pipeline.data.offline_cache.KeptIds, from the run's `offline_ids` file; None without)."""
    from pipeline.data.offline_cache import find_ids

    pairs = read_parquet(plan.inputs["pairs"], schemas.PAIRS,
                         columns=["prompt_id", "prompt", "prompt_messages", "chosen", "rejected", *ID_COLUMNS])  # fmt: skip
    lacks = pc.or_(pc.or_(pc.is_null(pairs["prompt_token_ids"]), pc.is_null(pairs["chosen_token_ids"])),
                   pc.is_null(pairs["rejected_token_ids"]))  # fmt: skip
    kept = find_ids(pairs, Path(offline_ids) if offline_ids else None)
    ids = pairs["prompt_id"].to_pylist()
    rows = group_shards(ids, cfg.reference.shard_size)
    texts = pairs.drop_columns(["prompt_id"]).append_column("lacks_ids", lacks)
    return texts, rows, [len({ids[j] for j in r}) for r in rows], kept


def _encode_pairs(tokenizer, texts: pa.Table, idx: np.ndarray, max_length: int, kept=None):
    """(chosen encodings, rejected encodings, fits mask, the shard's ID_COLUMNS to record) of the pairs `idx`.

    A pair with token ids (generated: as sampled; offline: the run's kept ids) is scored on them; one without (an
    offline set the run could not keep ids of, a round written before ids were stored) is tokenised here from its
    texts (pipeline.compute.logprobs.encode_rows), every such pair of the shard in one batch; only these pairs' texts
    become Python strings. The ids recorded are those of every pair pairs.parquet has none for (null for the others):
    reference.parquet then has every pair's, and training never tokenises."""
    from pipeline.compute.logprobs import encode_rows, stored_ids

    taken = take_table(texts, idx)  # shard after shard: no copy of the whole table per shard
    taken = kept.fill(taken, idx) if kept is not None else taken  # offline pairs: the run's kept ids
    p_ids, c_ids, r_ids = (stored_ids(taken[c]) for c in ID_COLUMNS)
    fresh = np.array([p is None or c is None or r is None or not len(c) or not len(r)
                      for p, c, r in zip(p_ids, c_ids, r_ids)], dtype=bool)  # fmt: skip
    p_ids = [None if f else p for f, p in zip(fresh, p_ids)]
    todo = np.flatnonzero(fresh)
    sub = take_table(taken.select(["prompt", "prompt_messages", "chosen", "rejected"]), todo)
    prompts, chosen, rejected = [None] * len(idx), [None] * len(idx), [None] * len(idx)
    for j, p, y, z in zip(todo, prompts_of(sub), sub["chosen"].to_pylist(), sub["rejected"].to_pylist()):
        prompts[j], chosen[j], rejected[j] = p, y, z  # the conversation where the pair has one
    both = encode_rows(tokenizer, prompts * 2, chosen + rejected, p_ids * 2, c_ids + r_ids)  # fmt: skip  (each prompt rendered once)
    c, r = both[: len(idx)], both[len(idx) :]
    fits = np.array([max(len(a[0]) + len(a[1]), len(b[0]) + len(b[1])) <= max_length for a, b in zip(c, r)], dtype=bool)
    lacks = taken["lacks_ids"].to_numpy(zero_copy_only=False)
    recorded = {}
    for name, seqs in (("prompt_token_ids", [x[0] for x in c]), ("chosen_token_ids", [x[1] for x in c]),
                       ("rejected_token_ids", [x[1] for x in r])):  # fmt: skip
        here = pa.array([s if f else None for s, f in zip(seqs, fresh)], schemas.TOKEN_IDS)
        given = pc.if_else(pa.array(lacks & ~fresh), taken[name].combine_chunks(), pa.scalar(None, schemas.TOKEN_IDS))
        recorded[name] = pc.coalesce(here, given)
    return c, r, fits, recorded


def _score_worker(cfg: RunConfig, plan: StagePlan, todo: list[int], digest: str, offline_ids: str | None = None) -> dict[str, Any]:
    """One rank: its share (every N-th) of the missing shards, each shard written as it ends."""
    from pipeline.compute import zero3
    from pipeline.compute.logprobs import ResponseScorer, load_causal_lm, score

    ref = cfg.reference
    if ref.zero_stage == 3:
        launch.init_distributed()
    rank, world = launch.rank(), launch.world()
    texts, rows, n_prompts, kept = _pairs_by_shard(cfg, plan, offline_ids)
    mine = assign(todo, rank, world)
    if not mine and ref.zero_stage != 3:
        return {}
    path = str(plan.inputs["reference"])
    model, tokenizer = load_causal_lm(path, cfg.model.dtype, cfg.model.trust_remote_code, launch.device(), ref.zero_stage)
    zero = zero3.scoring(ResponseScorer(model), model.config) if ref.zero_stage == 3 else {}
    shards = Shards(plan, "reference", len(rows), digest)
    who = f" (rank {rank} of {world})" if world > 1 else ""
    progress = Progress(f"reference round {plan.round}{who}", len(mine), sum(n_prompts[i] for i in mine), "prompts",
                        bar=world == 1)  # fmt: skip
    # ZeRO-3: every rank runs as many shard steps as the busiest one (gathers are collective; the count comes from the
    # `todo` every rank was given, so ranks agree on it without a collective); extra steps score nothing
    for step in range(-(-len(todo) // world) if ref.zero_stage == 3 else len(mine)):
        i = mine[step] if step < len(mine) else None
        idx = rows[i] if i is not None else np.zeros(0, np.int64)
        started, started_at = time.monotonic(), time.time()
        c, r, fits, recorded = _encode_pairs(tokenizer, texts, idx, cfg.model.max_length, kept)
        ok = np.flatnonzero(fits)
        # packed (reference.packing): each pair's prompt once, chosen and rejected after it, no padding (exact)
        logps = score(model, [c[j] for j in ok] + [r[j] for j in ok], tokenizer.pad_token_id, ref.batch_size,
                      packing=ref.packing, max_length=cfg.model.max_length, **zero)  # fmt: skip
        if i is None:
            continue
        ref_c, ref_r = np.full(len(idx), np.nan), np.full(len(idx), np.nan)
        ref_c[ok], ref_r[ok] = logps[: len(ok)], logps[len(ok) :]
        tokens = sum(len(c[j][0]) + len(c[j][1]) + len(r[j][0]) + len(r[j][1]) for j in ok)
        seconds = round(time.monotonic() - started, 3)
        table = pa.table({"row": idx, "chosen_tokens": [len(x[1]) for x in c], "rejected_tokens": [len(x[1]) for x in r],
                          "ref_chosen": pa.array(ref_c, mask=np.isnan(ref_c)),
                          "ref_rejected": pa.array(ref_r, mask=np.isnan(ref_r)), "fits": fits,
                          **recorded}, schema=SCORES)  # fmt: skip
        shards.write(i, table, SCORES, sequences=2 * len(idx), tokens=tokens, seconds=seconds, started_at=started_at)
        progress.shard_done(i, n_prompts[i], 2 * len(idx), tokens, seconds)
    progress.close()
    held = zero3.share_held(model)
    del model, zero
    gc.collect()
    # rank 0's share of the model's weights; the pairs whose ids came from the run's kept offline ids
    return {"weights_held_per_rank": held, "offline_pairs_with_kept_ids": kept.found if kept is not None else 0}


def _preflight(cfg: RunConfig, plan: StagePlan) -> None:
    """Fail before any process starts: a missing model, or one ZeRO-3 cannot shard."""
    from pipeline.compute import zero3
    from pipeline.compute.logprobs import require_model

    path = str(plan.inputs["reference"])
    require_model(path)
    if cfg.reference.zero_stage == 3 and (reason := zero3.unsupported(path)):
        raise ValueError(f"reference.zero_stage=3: model {path}: ZeRO-3 cannot shard it: {reason}")


def _offline_ids(cfg: RunConfig, plan: StagePlan, tokenizer=None) -> tuple[Path | None, dict[str, Any]]:
    """The run's token ids of its offline set under this round's tokenizer (pipeline.data.offline_cache: tokenised
    here, over every core, the first time a round needs them), when some offline pair of pairs.parquet has none; and
    what it cost."""
    groups = iter_parquet(plan.inputs["pairs"], schemas.PAIRS, ["source", "chosen_token_ids"])
    needed = any(pc.any(pc.and_(pc.equal(g["source"], "offline"), pc.is_null(g["chosen_token_ids"]))).as_py() for g in groups)
    pa.default_memory_pool().release_unused()  # the groups read: their memory back to the system, not kept by the pool
    if not needed:
        return None, {}
    from transformers import AutoTokenizer

    from pipeline.compute.logprobs import encode_many, require_model
    from pipeline.data.offline_cache import offline_ids

    started = time.monotonic()
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(require_model(str(plan.inputs["reference"])),
                                                           trust_remote_code=cfg.model.trust_remote_code)  # fmt: skip
    path, tokenised = offline_ids(cfg.data.offline, cfg.run_dir, tokenizer,
                                  lambda prompts, responses: encode_many(tokenizer, prompts, responses))  # fmt: skip
    return path, {"offline_ids": "not kept (a tokenizer without a Rust side)" if path is None else
                  "tokenised" if tokenised else "reused", "offline_ids_s": round(time.monotonic() - started, 3)}  # fmt: skip


def run(cfg: RunConfig, plan: StagePlan) -> dict[str, Any]:
    ref = cfg.reference
    # the ranks read the texts and ids themselves; this process reads the whole table only once they are done
    prompt_ids = read_parquet(plan.inputs["pairs"], schemas.PAIRS, columns=["prompt_id"])["prompt_id"].to_pylist()
    n = launch.resolve_processes(ref.num_processes, cfg.train.hostfile)  # per node; 0 with a hostfile: its slots
    launch.check(n, cfg.train.hostfile, "reference.num_processes")
    _preflight(cfg, plan)
    ids_path, ids_stats = _offline_ids(cfg, plan)
    digest = plan_digest(plan)
    shards = Shards(plan, "reference", len(group_shards(prompt_ids, ref.shard_size)), digest)
    todo = shards.missing()
    if len(todo) < shards.count:
        print(f"reference round {plan.round}: {shards.count - len(todo)} of {shards.count} shards already written, "
              f"scoring {len(todo)}", flush=True)  # fmt: skip
    started, ranks = time.monotonic(), {}
    if todo:
        job = {"todo": todo, "digest": digest, "offline_ids": str(ids_path) if ids_path else None}
        ranks = launch.run("reference", cfg, plan, n, _score_worker, job,
                           hostfile=cfg.train.hostfile, what="reference scoring")  # fmt: skip
    scoring_s = time.monotonic() - started

    got = shards.read(SCORES).sort_by("row")  # one row per pair, in pairs.parquet's order
    pairs = read_parquet(plan.inputs["pairs"], schemas.PAIRS)
    fits = got["fits"].to_numpy(zero_copy_only=False)
    ref_c = got["ref_chosen"].to_numpy(zero_copy_only=False)
    ref_r = got["ref_rejected"].to_numpy(zero_copy_only=False)
    finite = fits & np.isfinite(ref_c) & np.isfinite(ref_r)
    keep = np.flatnonzero(finite)
    out = pairs.take(pa.array(keep, pa.int64()))
    for name in ID_COLUMNS:  # every pair's ids: those it came with, else those it was scored on (offline pairs)
        ids = pc.coalesce(pairs[name].combine_chunks(), got[name].combine_chunks().cast(schemas.TOKEN_IDS))
        out = out.set_column(out.schema.get_field_index(name), name, ids.take(pa.array(keep, pa.int64())))
    out = out.append_column("chosen_tokens", got["chosen_tokens"].take(keep))
    out = out.append_column("rejected_tokens", got["rejected_tokens"].take(keep))
    out = out.append_column("ref_chosen_logps", pa.array(ref_c[keep], pa.float64()))
    out = out.append_column("ref_rejected_logps", pa.array(ref_r[keep], pa.float64()))
    n_long, n_nonfinite = int((~fits).sum()), int((fits & ~finite).sum())
    if out.num_rows == 0:
        raise ValueError(
            f"{plan.inputs['pairs']}: no pair left after reference scoring ({n_long} longer than "
            f"model.max_length={cfg.model.max_length}, {n_nonfinite} with non-finite log-probs)"
        )
    rows = write_parquet(out, plan.outputs["reference"], schemas.REFERENCE)
    fresh = [shards.record(i) for i in todo]
    shards.remove()  # reference.parquet now holds every shard
    tokens = sum(r["tokens"] for r in fresh)
    span = max(r["ended_at"] for r in fresh) - min(r["started_at"] for r in fresh) if fresh else 0.0
    return {
        "pairs": rows,
        "dropped_too_long": n_long,
        "dropped_non_finite": n_nonfinite,
        "mean_ref_chosen_logps": float(ref_c[keep].mean()),
        "mean_ref_rejected_logps": float(ref_r[keep].mean()),
        "processes": launch.world_size(n, cfg.train.hostfile),
        "zero_stage": ref.zero_stage,
        "shards": shards.count,
        "shards_reused": shards.count - len(todo),
        "shards_scored": len(todo),
        "scoring_s": round(scoring_s, 3),
        "scored_tokens": tokens,
        "tokens_per_s": tokens / span if span else None,
        **ids_stats,
        **ranks,
    }


if __name__ == "__main__":
    if "--worker" in sys.argv:  # one rank of the scoring (pipeline.compute.launch)
        from stages.common import worker_main

        worker_main("reference", _score_worker)
    else:
        from stages.common import main

        main("reference", run)
