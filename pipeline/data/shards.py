"""Shards and done-records: how a stage writes its work as it goes, shares it out, and resumes after a kill.

A stage cuts its work into shards, in order (`generate`: slices of the round's prompts; `label` and
`reference`: contiguous groups of whole prompts, so a prompt's K responses, or its pairs, are never split and
packing still computes the prompt once). Each finished shard is written to

    round-k/.dice/<name>-shards/shard-NNNNN.parquet     its rows
    round-k/.dice/<name>-shards/shard-NNNNN.json        its done-record, written LAST

The done-record holds the plan's digest (config + input fingerprints, `artifacts.plan_digest`): a shard whose
record is missing, or carries another digest (another config, model or input file), is not done. A stage run
again after a kill does only the missing shards, and its table is the shards concatenated in order, the same
table an uninterrupted run writes; the shard folder is removed once that table is written.

Who does which shard: process r of N takes the missing shards r, r+N, r+2N, ... (`assign`). The number of
processes is not part of the digest, so a stage killed on 8 processes resumes on 4.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.artifacts import (
    MANIFEST_DIR,
    StagePlan,
    plan_digest,
    read_manifest,
    write_json_atomic,
    write_parquet,
)


def slices(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `size` items each (the last may be shorter), in order."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def prompt_groups(prompt_ids: Sequence[Any]) -> list[np.ndarray]:
    """Row indices of each prompt, prompts in first-seen order (a prompt's rows need not be adjacent)."""
    groups: dict[Any, list[int]] = {}
    for i, pid in enumerate(prompt_ids):
        groups.setdefault(pid, []).append(i)
    return [np.asarray(rows, dtype=np.int64) for rows in groups.values()]


def group_shards(prompt_ids: Sequence[Any], prompts_per_shard: int) -> list[np.ndarray]:
    """Row indices of each shard: `prompts_per_shard` whole prompts per shard, prompts in first-seen order."""
    groups = prompt_groups(prompt_ids)
    return [np.concatenate(groups[s:e]) for s, e in slices(len(groups), prompts_per_shard)]


def assign(missing: Sequence[int], rank: int, world: int) -> list[int]:
    """The missing shards process `rank` of `world` does: every world-th one, starting at its rank."""
    return list(missing[rank::world])


class Shards:
    """The shard files of one piece of one stage's work (`name`, e.g. "generate" or "label-policy")."""

    def __init__(self, plan: StagePlan, name: str, count: int, digest: str | None = None):
        self.dir = plan.round_dir / MANIFEST_DIR / f"{name}-shards"
        self.name, self.count = name, count
        self.digest = digest if digest is not None else plan_digest(plan)  # fingerprints the inputs: pass it on

    def paths(self, i: int) -> tuple[Path, Path]:
        """(the shard's Parquet, its done-record)."""
        return self.dir / f"shard-{i:05d}.parquet", self.dir / f"shard-{i:05d}.json"

    def record(self, i: int) -> dict[str, Any] | None:
        """The shard's done-record when the shard is complete for this exact plan, else None."""
        table, record = self.paths(i)
        rec = read_manifest(record)
        if rec is None or rec.get("digest") != self.digest or not table.is_file():
            return None
        return rec

    def done(self) -> dict[int, dict[str, Any]]:
        """Done-records of the complete shards, by shard index."""
        return {i: rec for i in range(self.count) if (rec := self.record(i)) is not None}

    def missing(self) -> list[int]:
        """Indices of the shards not written yet for this plan, in order."""
        return [i for i in range(self.count) if self.record(i) is None]

    def write(self, i: int, table: pa.Table, schema: pa.Schema, **info: Any) -> dict[str, Any]:
        """Write shard i's rows, then its done-record (last: its existence means the shard is complete)."""
        table_path, record_path = self.paths(i)
        rows = write_parquet(table, table_path, schema)
        rec = {"digest": self.digest, "shard": i, "rows": rows, **info, "ended_at": time.time(),
               "host": socket.gethostname(), "pid": os.getpid()}  # fmt: skip
        write_json_atomic(record_path, rec)
        return rec

    def read(self, schema: pa.Schema) -> pa.Table:
        """Every shard's rows concatenated in shard order; an error naming the shards not written."""
        lost = self.missing()
        if lost:
            raise RuntimeError(f"{self.dir}: shards {lost[:20]} of {self.count} were not written")
        if not self.count:
            return schema.empty_table()
        return pa.concat_tables(pq.read_table(self.paths(i)[0], schema=schema) for i in range(self.count))

    def remove(self) -> None:
        """Delete the shard folder (once the stage's table, which holds every shard, is written)."""
        shutil.rmtree(self.dir, ignore_errors=True)


class Progress:
    """Progress over shards: a tqdm bar on a terminal, else one line per finished shard (what Prefect logs).

    A line: `label round 1 policy: shard 3 done; shards 4/12, prompts 256/768, 4096 sequences, 812345 tokens,
    21,500 tok/s, 41 s elapsed, ETA 80 s`: the counts are cumulative (shards already on disk included), tok/s is
    the shard's own rate, and the ETA extrapolates this run's pace over the shards still to do."""

    def __init__(self, what: str, n_shards: int, n_units: int, unit: str = "prompts", done_shards: int = 0,
                 done_units: int = 0, bar: bool = True):  # fmt: skip
        self.what, self.n_shards, self.n_units, self.unit = what, n_shards, n_units, unit
        self.shards, self.units, self.sequences, self.tokens = done_shards, done_units, 0, 0
        self.fresh_units = 0
        self.started = time.monotonic()
        self.bar = None
        if bar and sys.stdout.isatty() and not os.environ.get("TQDM_DISABLE"):
            from tqdm import tqdm

            self.bar = tqdm(total=n_units, initial=done_units, desc=what, unit=unit.rstrip("s") or "it")

    def shard_done(self, shard: int, units: int, sequences: int, tokens: int | None, seconds: float) -> None:
        """Count a finished shard: its units (prompts), sequences, tokens (None: not counted, e.g. judge requests)
        and the seconds it took."""
        self.shards += 1
        self.units += units
        self.fresh_units += units
        self.sequences += sequences
        self.tokens += tokens or 0
        elapsed = time.monotonic() - self.started
        left = self.n_units - self.units
        eta = elapsed / self.fresh_units * left if self.fresh_units else 0.0
        # the shard's own rate (no model load or engine start)
        rate = f"{tokens / max(seconds, 1e-9):,.0f} tok/s" if tokens is not None else f"{sequences / max(seconds, 1e-9):,.1f} seq/s"
        if self.bar is not None:
            self.bar.update(units)
            self.bar.set_postfix_str(f"shards {self.shards}/{self.n_shards}, {rate}")
        else:
            counted = f"{self.tokens} tokens, " if tokens is not None else ""
            # one write per line: ranks sharing a pipe never interleave inside a line
            sys.stdout.write(f"{self.what}: shard {shard} done; shards {self.shards}/{self.n_shards}, {self.unit} "
                             f"{self.units}/{self.n_units}, {self.sequences} sequences, {counted}{rate}, "
                             f"{elapsed:.0f} s elapsed, ETA {eta:.0f} s\n")  # fmt: skip
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
