"""Parquet I/O, fingerprints and manifests: the artifacts are the checkpoint.

Every output is written to a temporary name in its own folder and renamed into place, and a stage's
manifest is written last, so its existence means the stage completed. A stage whose manifest records the
same input fingerprints and the same config as the plan is skipped; anything else runs the stage again,
overwriting only that stage's own outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.schemas import OPTIONAL

MANIFEST_DIR = ".dice"  # per-stage manifests inside a round folder
READ_AHEAD = 4  # row groups read side by side (`_groups`)
_FULL_HASH_LIMIT = 64 << 20  # files up to this size are hashed whole; larger ones by size + head + tail
_CHUNK = 4 << 20
# Rows per Parquet row group: a reader holds one group's decompressed column at a time (pairs reads labels.parquet's
# texts and ids a group at a time; train streams reference.parquet), so memory stays flat in the file's size.
ROW_GROUP_ROWS = 16_384


class ArtifactError(ValueError):
    """An input artifact is missing or malformed; the message names the file (and column or row)."""


# ---------------------------------------------------------------------------------------------- Parquet


def write_parquet(table: pa.Table, path: Path, schema: pa.Schema) -> int:
    """Cast `table` to `schema` and write it atomically (temp file in the same folder, then rename).

    Returns the number of rows written. A crash leaves either the previous file or the new one, never half. Row
    groups of `ROW_GROUP_ROWS` rows.
    """
    return write_parquet_parts([table], path, schema)


def write_parquet_parts(parts: Iterable[pa.Table], path: Path, schema: pa.Schema) -> int:
    """`write_parquet` of the tables `parts` yields, one after the other (a table made a part at a time is never
    whole in memory). Returns the rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for table in parts:
                writer.write_table(_with_optional(table, schema).select(schema.names).cast(schema),
                                   row_group_size=ROW_GROUP_ROWS)  # fmt: skip
                rows += table.num_rows
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        raise with_path(e, path) from e
    finally:
        tmp.unlink(missing_ok=True)
    return rows


def with_path(e: OSError, path: Path) -> OSError:
    """`e` naming `path` when it names no file (pyarrow's and fsync's errors do not): a full disk says where.

    pyarrow reports an OS error as text ("... [errno 28] No space left on device"): its errno is read back from it."""
    if e.filename is not None:
        return e
    code = e.errno
    if code is None:
        import re

        found = re.search(r"errno (\d+)", str(e), re.IGNORECASE)
        code = int(found.group(1)) if found else None
    return OSError(code, os.strerror(code) if code else str(e), str(path))


def _with_optional(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with the schema's optional columns it lacks added as nulls (files of earlier dice versions)."""
    for name in schema.names:
        if name in OPTIONAL and name not in table.column_names:
            table = table.append_column(pa.field(name, OPTIONAL[name]), pa.nulls(table.num_rows, OPTIONAL[name]))
    return table


def _open(path: Path, schema: pa.Schema, columns: list[str] | None) -> tuple[pq.ParquetFile, pa.Schema, list[str]]:
    """The file, the schema of the columns asked for, and those of them the file has; raises naming the file where it
    is missing, unreadable or lacks a required column. Not memory-mapped: the mapped pages of a file read whole would
    stay resident beside the table and count in the process's peak RSS."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found (did the previous stage finish?)")
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ArtifactError(f"{path}: not a readable Parquet file: {e}") from e
    present = pf.schema_arrow.names
    missing = [n for n in schema.names if n not in present and n not in OPTIONAL]
    if missing:
        raise ArtifactError(f"{path}: missing column(s) {', '.join(missing)}")
    return pf, schema, [n for n in schema.names if n in present]


def _group(pf: pq.ParquetFile, i: int, present: list[str], schema: pa.Schema, path: Path) -> pa.Table:
    """Row group i of the file, as `schema` (optional columns it lacks added as nulls, types cast)."""
    try:
        table = _with_optional(pf.read_row_group(i, columns=present), schema)
    except (pa.ArrowInvalid, OSError) as e:
        raise ArtifactError(f"{path}: not a readable Parquet file (row group {i}): {e}") from e
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ArtifactError(f"{path}: a column does not have the expected type: {e}") from e


def _groups(pf: pq.ParquetFile, path: Path, present: list[str], schema: pa.Schema, indices: list[int]) -> Iterator[pa.Table]:
    """Row groups `indices` of the file (`_group`), in order, read ahead by `READ_AHEAD` threads, each with its own
    handle on the file: one group's reading decompresses and decodes its columns on the machine's cores, but its
    largest column (a list of token ids) alone takes most of the time, so groups are read side by side. At most
    READ_AHEAD + 1 groups are held at once."""
    if len(indices) <= 1:  # the handle `_open` made
        yield from (_group(pf, i, present, schema, path) for i in indices)
        return
    local = threading.local()

    def read(i: int) -> pa.Table:
        if not hasattr(local, "pf"):
            local.pf = pq.ParquetFile(path)
        return _group(local.pf, i, present, schema, path)

    pool = ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="dice-parquet")
    try:
        pending = deque(pool.submit(read, i) for i in indices[:READ_AHEAD])
        for i in indices[READ_AHEAD:]:
            done = pending.popleft().result()
            pending.append(pool.submit(read, i))
            yield done
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_parquet(path: Path, schema: pa.Schema, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A dice table one row group at a time, checked as `read_parquet` checks: a reader that keeps what it needs of
    each group holds one group's decompressed columns at a time, not the file's."""
    pf, schema, present = _open(path, schema, columns)
    yield from _groups(pf, Path(path), present, schema, list(range(pf.num_row_groups)))


def read_parquet(path: Path, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Read a dice table, checking that every column of `schema` is there with a castable type.

    `columns`: read only these columns of `schema` (a stage that needs a few columns of a large table). Read a row
    group at a time (`iter_parquet`): the peak is the table and one group's buffers, not the whole file's as well.
    """
    groups = list(iter_parquet(path, schema, columns))
    return pa.concat_tables(groups) if groups else pa.schema([schema.field(c) for c in columns or schema.names]).empty_table()


def segmented_take(lengths: list[int], rows: np.ndarray, take: Callable[[int, np.ndarray], Any]) -> tuple[list, pa.Array | None]:
    """Rows of consecutive segments (row groups of a file, chunks of a column) taken segment by segment.

    `rows`: positions over the segments of `lengths` laid end to end (any order, repeats allowed); `take(segment,
    positions in it)` is called once per segment that holds some. Returns the parts, in segment order, and the
    indices that put their concatenation back in the order of `rows` (None when it already is: `rows` ascending)."""
    rows = np.asarray(rows, dtype=np.int64)
    ends = np.cumsum(lengths)
    segment = np.searchsorted(ends, rows, side="right")  # (M,) the segment of each row
    parts, order = [], []
    for g in np.unique(segment):
        sel = np.flatnonzero(segment == g)
        parts.append(take(int(g), rows[sel] - (ends[g] - lengths[g])))
        order.append(sel)
    if not len(rows) or bool((np.diff(rows) >= 0).all()):
        return parts, None
    back = np.argsort(np.concatenate(order), kind="stable")
    return parts, pa.array(back, pa.int64())


def take_column(col: pa.ChunkedArray | pa.Array, rows: np.ndarray) -> pa.Array:
    """col[rows] chunk by chunk: ChunkedArray.take first concatenates every chunk (a copy of the whole column, per
    call: a stage that takes shard after shard from a table read in row groups would copy it once per shard)."""
    if isinstance(col, pa.Array):
        return col.take(pa.array(rows, pa.int64()))
    parts, back = segmented_take([len(c) for c in col.chunks], rows, lambda c, at: col.chunks[c].take(pa.array(at)))
    if not parts:
        return pa.array([], col.type)
    out = pa.concat_arrays(parts) if len(parts) > 1 else parts[0]
    return out if back is None else out.take(back)


def take_table(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """table[rows], column by column with `take_column` (no copy of the columns' other rows)."""
    return pa.table({c: take_column(table[c], rows) for c in table.column_names}, schema=table.schema)


def take_rows(path: Path, schema: pa.Schema, columns: list[str], rows: np.ndarray) -> pa.Table:
    """The `columns` of the table's rows `rows` (file row numbers, any order, repeats allowed), read one row group at
    a time: only the rows taken stay in memory, not the columns' other rows."""
    pf, schema, present = _open(path, schema, columns)
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    rows = np.asarray(rows, dtype=np.int64)
    wanted = np.unique(np.searchsorted(np.cumsum(sizes), rows, side="right")).tolist()  # the groups holding some
    reader = zip(wanted, _groups(pf, Path(path), present, schema, wanted))  # read ahead, in the order they are taken

    def take(g: int, at: np.ndarray) -> pa.Table:
        i, group = next(reader)
        assert i == g, (i, g)  # segmented_take visits the groups in ascending order
        return group.take(pa.array(at))

    parts, back = segmented_take(sizes, rows, take)
    if not parts:
        return schema.empty_table()
    table = pa.concat_tables(parts)  # a chunk per row group, no copy
    return table if back is None else take_table(table, back.to_numpy())


# ---------------------------------------------------------------------------------------------- fingerprints


def _hash_file(h: Any, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{size}:".encode())
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:  # multi-GB weights: size + head + tail tells a new checkpoint from an old one cheaply
            h.update(f.read(_CHUNK))
            f.seek(size - _CHUNK)
            h.update(f.read(_CHUNK))


def fingerprint(path: str | Path) -> str:
    """Content fingerprint of a file or folder (hidden files and temp files excluded).

    A path that is not on disk is fingerprinted by its name (Hub ids: `input_record` resolves their commit).
    """
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        _hash_file(h, p)
    elif p.is_dir():
        for f in sorted(p.rglob("*")):
            rel = f.relative_to(p)
            if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                h.update(str(rel).encode() + b"\0")
                _hash_file(h, f)
    else:
        h.update(f"name:{path}".encode())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------- stages


@dataclass
class StagePlan:
    """What one stage of one round reads and writes, and the config that decides its result."""

    stage: str
    round: int
    round_dir: Path
    inputs: dict[str, Path | str]  # name -> file, folder or hub id
    outputs: dict[str, Path]  # name -> file or folder the stage writes
    config: dict[str, Any]  # the settings that change the result (fingerprinted)
    roles: dict[str, str] = field(default_factory=dict)  # human-readable notes (e.g. which model is the reference)

    @property
    def manifest_path(self) -> Path:
        return self.round_dir / MANIFEST_DIR / f"{self.stage}.json"

    @property
    def run_dir(self) -> Path:
        """The run folder the round lives in: inputs inside it are recorded relative to it (`input_record`)."""
        return self.round_dir.parent


def _config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise with_path(e, path) from e


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_done(plan: StagePlan, inputs: dict[str, dict[str, str]] | None = None) -> bool:
    """True when the stage's manifest matches the plan's inputs and config and its outputs are intact.

    `inputs`: the plan's input record, when the caller already has it (fingerprinting is not free).
    """
    m = read_manifest(plan.manifest_path)
    if m is None or m.get("config_digest") != _config_digest(plan.config):
        return False
    if not same_inputs(m.get("inputs", {}), inputs if inputs is not None else input_record(plan)):
        return False
    for name, out in plan.outputs.items():
        rec = m.get("outputs", {}).get(name)
        if rec is None or not Path(out).exists() or fingerprint(out) != rec["fingerprint"]:
            return False
    return True


def plan_digest(plan: StagePlan) -> str:
    """One hash of a plan's config and its inputs' content: equal digests mean the same work."""
    parts = [_config_digest(plan.config)] + [f"{n}={r['fingerprint']}" for n, r in sorted(input_record(plan).items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def input_record(plan: StagePlan) -> dict[str, dict[str, str]]:
    """The plan's inputs as a manifest records them: name -> {path, fingerprint}, plus
    - `revision`: the commit a Hub model or dataset resolved to, which is then its fingerprint (a branch that moved
      is another input);
    - `in_run`: for a file or folder inside the run folder (an earlier round's checkpoint or table), its path
      relative to the run folder. That, not the path, is what is compared: a run folder moved or copied elsewhere
      still matches its manifests, and its finished stages are not redone;
    - `abs_path`: for a relative path outside the run (`models/tiny`), where it pointed (not compared)."""
    return {name: record_input(p, plan.run_dir) for name, p in plan.inputs.items()}


def record_input(p: Path | str, run_dir: Path) -> dict[str, str]:
    from pipeline.data.models import HUB_PREFIX, dataset_commit, hub_commit, local_model, looks_local

    if isinstance(p, str) and p.startswith(HUB_PREFIX):
        repo, _, rev = p.removeprefix(HUB_PREFIX).partition("@")
        commit = dataset_commit(repo, rev or None)
        return {"path": p, "fingerprint": f"hub:{commit}", "revision": commit}
    if isinstance(p, str) and not Path(p).exists() and not looks_local(p):
        folder = Path(local_model(p))
        commit = hub_commit(folder)
        return {"path": p, "fingerprint": f"hub:{commit}" if commit else fingerprint(folder), "revision": commit or ""}
    record = {"path": str(p), "fingerprint": fingerprint(p)}
    inside = os.path.relpath(os.path.abspath(p), os.path.abspath(run_dir))
    if inside != os.curdir and not inside.startswith(os.pardir + os.sep) and inside != os.pardir:
        record["in_run"] = Path(inside).as_posix()
    elif not os.path.isabs(p):  # where a relative path pointed, for readers started elsewhere (dice export)
        record["abs_path"] = os.path.abspath(p)
    return record


def same_inputs(recorded: dict[str, dict[str, str]], current: dict[str, dict[str, str]]) -> bool:
    """Whether a manifest's input record matches the plan's: the same names with the same fingerprints (and Hub
    commits), each where it was: inside the run at the same place relative to the run, else at the same path. A
    manifest written before `in_run` existed is compared by path."""
    if recorded.keys() != current.keys():
        return False
    for name, now in current.items():
        then = recorded[name]
        if then.get("fingerprint") != now.get("fingerprint") or then.get("revision", "") != now.get("revision", ""):
            return False
        where = "in_run" if "in_run" in then and "in_run" in now else "path"
        if then.get(where) != now.get(where):
            return False
    return True


def execute(plan: StagePlan, fn: Callable[[], dict[str, Any]], *, force: bool = False) -> dict[str, Any]:
    """Run a stage unless it is already done; write its manifest last. Returns the manifest.

    `fn` writes the plan's outputs (each atomically) and returns stats (row counts, α, ...).
    """
    inputs = input_record(plan)  # fingerprinted once, before running: the inputs this result comes from
    if not force and is_done(plan, inputs):
        m = read_manifest(plan.manifest_path)
        assert m is not None
        m["skipped"] = True
        return m
    # A stale manifest must not survive a re-run that fails half way; nor the temporaries of a killed attempt.
    plan.manifest_path.unlink(missing_ok=True)
    remove_stale_temporaries(plan)
    started = time.time()
    stats = fn()
    finished = time.time()
    manifest = {
        "stage": plan.stage,
        "round": plan.round,
        "inputs": inputs,
        "outputs": {
            n: {"path": str(p), "fingerprint": fingerprint(p), **_rows(p)} for n, p in plan.outputs.items()
        },
        "config": plan.config,
        "config_digest": _config_digest(plan.config),
        "roles": plan.roles,
        "stats": stats,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(finished - started, 3),
    }
    write_json_atomic(plan.manifest_path, manifest)
    manifest["skipped"] = False
    return manifest


def remove_stale_temporaries(plan: StagePlan) -> list[Path]:
    """Delete what a killed attempt of this stage left half-written: `.<output>.*.tmp` files, `.<folder>.writing`
    and `.<folder>.old-*` folders, `.<manifest>.*.tmp`. Only for a stage about to run (the run lock is held, so no
    other process is writing them). Returns what was removed."""
    removed = []
    targets = [Path(p) for p in plan.outputs.values()] + [plan.manifest_path]
    for out in targets:
        for pattern in (f".{out.name}.*.tmp", f".{out.name}.tmp", f".{out.name}.writing", f".{out.name}.old-*"):
            for stale in out.parent.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed


def _rows(p: Path) -> dict[str, int]:
    p = Path(p)
    if p.is_file() and p.suffix == ".parquet":
        return {"rows": pq.ParquetFile(p).metadata.num_rows}
    return {}


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing an older one (the old one is removed after)."""
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


class RunLocked(RuntimeError):
    """Another process is running this run folder."""


class run_lock:
    """An exclusive lock on a run folder for the life of a flow run, so two runs never interleave writes.

    The lock is an OS file lock (released by the kernel if the process dies, so a SIGKILL leaves no stale lock).
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> run_lock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.path.read_text().strip() or "another process"
            raise RunLocked(f"{self.path.parent}: already being run by {holder}; wait for it or use another run name") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
