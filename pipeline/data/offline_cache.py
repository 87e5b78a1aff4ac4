"""The run's offline preference set: read and checked once, tokenised once per tokenizer.

Every round's `pairs` stage mixes offline pairs into its own (experience replay), and the reference stage scores
them on token ids. Reading the set row by row and tokenising it would be the same work every round, so both are done
once per run and kept in the run folder:

    <run>/.dice/offline/<source>.parquet                 the set as `read_offline` returns it (OFFLINE schema)
    <run>/.dice/offline/<source>.json                    written last: its rows, and the rows it skipped
                                                         (on_bad_row: skip), logged again on every read
    <run>/.dice/offline/<source>-ids-<tokenizer>.parquet each pair's token ids (OFFLINE_IDS), row for row

<source> fingerprints the dataset's content (as a stage's manifest records an input: a file's bytes, a Hub
dataset's commit; a local file's size and modification time too) and how it is read (split, subset, columns,
on_bad_row). <tokenizer> fingerprints what the ids depend on: the tokenizer's rules and vocabulary (its Rust
tokenizer's JSON), chat template and special tokens. An edited file or another tokenizer is another name, so a
stale file is never read; each file is written atomically, and one that cannot be read is written again.

A pair's ids are found by its content (`content_keys`: its prompt or conversation, chosen and rejected, hashed), not
by its id: a pair whose texts the cache does not hold (an older pairs.parquet, another offline set) is simply not
found, and the caller tokenises it as before (pipeline.compute.logprobs.encode_rows).

Tokenising (`offline_ids`) runs in the stage's own process before any rank starts: batches of
`TOKENIZE_BATCH_PAIRS` pairs through the Rust tokenizer's batch parallelism over every core, each batch's ids turned
into Arrow (4 bytes a token) and written as it ends.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import DataSource
from pipeline.data import schemas
from pipeline.data.artifacts import (
    ArtifactError,
    read_parquet,
    record_input,
    take_column,
    take_rows,
    take_table,
    write_json_atomic,
    write_parquet,
    write_parquet_parts,
)
from pipeline.data.chat import Prompt, as_messages, prompts_of
from pipeline.data.datasets import BadRows, note_skipped, plan_input, read_offline_rows, source_of

ID_COLUMNS = ["prompt_token_ids", "chosen_token_ids", "rejected_token_ids"]
OFFLINE_IDS = pa.schema([pa.field("key", pa.binary(16), nullable=False),
                         *(pa.field(c, schemas.TOKEN_IDS, nullable=False) for c in ID_COLUMNS)])  # fmt: skip
TOKENIZE_BATCH_PAIRS = 2048
Encoder = Callable[[list, list[str]], list[tuple[list[int], list[int]]]]
FORMAT = 1  # bumped when what these files hold changes: older files are then another name


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / ".dice" / "offline"


def _digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def source_key(src: DataSource, run_dir: Path) -> str:
    """The name of the set's files: its content's fingerprint and how it is read."""
    where = plan_input(src)
    stamp = ""
    if isinstance(where, Path) and where.expanduser().is_file():  # files over 64 MiB are fingerprinted by their ends
        st = where.expanduser().stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    how = src.model_dump(mode="json", exclude={"path"}) | {"on_bad_row": src.bad_rows}
    return _digest([str(FORMAT), record_input(where, run_dir)["fingerprint"], stamp, json.dumps(how, sort_keys=True)])


def tokenizer_key(tokenizer) -> str | None:
    """A fingerprint of what a pair's ids depend on, or None for a tokenizer without a Rust side (not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return _digest([str(FORMAT), type(tokenizer).__name__, backend.to_str(), tokenizer.chat_template or "",
                    json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str), str(tokenizer.eos_token_id)])  # fmt: skip


def _readable(path: Path, schema: pa.Schema) -> bool:
    """The file is there and is a Parquet file of `schema` (an interrupted write never is: writes are atomic)."""
    try:
        return pq.read_schema(path).equals(schema, check_metadata=False)
    except (OSError, pa.ArrowException):
        return False


def offline_table(src: str | Path | DataSource, run_dir: Path) -> pa.Table:
    """`read_offline(src)`, read and checked once per run: later calls read the kept table (and log the rows the first
    read skipped again)."""
    src = source_of(src)
    key = source_key(src, run_dir)
    table_path, done = folder(run_dir) / f"{key}.parquet", folder(run_dir) / f"{key}.json"
    if done.is_file() and _readable(table_path, schemas.OFFLINE):
        try:
            record = json.loads(done.read_text())
            table = read_parquet(table_path, schemas.OFFLINE)
        except (OSError, ValueError, pa.ArrowException):
            record = None
        if record is not None and table.num_rows == record.get("rows"):
            if record.get("skipped"):
                note_skipped(BadRows.restored(str(src), src.bad_rows, record["skipped"], record.get("first", [])))
            return table
    bad = BadRows(str(src), src.bad_rows)
    table, _ = read_offline_rows(src, bad)
    write_parquet(table, table_path, schemas.OFFLINE)
    write_json_atomic(done, {"source": str(src), "rows": table.num_rows, "skipped": dict(bad.counts), "first": bad.first})
    return table


def content_keys(prompts: Sequence[Prompt], chosen: Sequence[str], rejected: Sequence[str]) -> list[bytes]:
    """16-byte hashes of each pair's content: its prompt (a conversation by its messages), chosen and rejected."""
    out = []
    for p, c, r in zip(prompts, chosen, rejected):
        h = hashlib.blake2b(digest_size=16)
        for part in (p if isinstance(p, str) else json.dumps(as_messages(p), sort_keys=True), c, r):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        out.append(h.digest())
    return out


def _encoded(encode: Encoder, table: pa.Table) -> Iterator[pa.Table]:
    """OFFLINE_IDS rows of the set, a batch of pairs at a time."""
    for start in range(0, table.num_rows, TOKENIZE_BATCH_PAIRS):
        part = table.slice(start, TOKENIZE_BATCH_PAIRS)
        prompts, chosen, rejected = prompts_of(part), part["chosen"].to_pylist(), part["rejected"].to_pylist()
        both = encode(prompts * 2, chosen + rejected)  # each prompt rendered and tokenised once
        n = len(prompts)
        yield pa.table({"key": pa.array(content_keys(prompts, chosen, rejected), pa.binary(16)),
                        "prompt_token_ids": [p for p, _ in both[:n]], "chosen_token_ids": [y for _, y in both[:n]],
                        "rejected_token_ids": [y for _, y in both[n:]]}, schema=OFFLINE_IDS)  # fmt: skip


def offline_ids(src: str | Path | DataSource, run_dir: Path, tokenizer, encode: Encoder) -> tuple[Path | None, bool]:
    """The file of the set's token ids under `tokenizer` (None for a tokenizer that cannot be fingerprinted: the
    caller tokenises its pairs itself), and whether it was tokenised now (the run had none yet).

    `encode(prompts, responses)`: (prompt ids, response ids) of each pair, as every stage tokenises a text
    (pipeline.compute.logprobs.encode_many with this tokenizer: the data layer does not tokenise on its own)."""
    src = source_of(src)
    tkey = tokenizer_key(tokenizer)
    if tkey is None:
        return None, False
    path = folder(run_dir) / f"{source_key(src, run_dir)}-ids-{tkey}.parquet"
    if _readable(path, OFFLINE_IDS):
        return path, False
    write_parquet_parts(_encoded(encode, offline_table(src, run_dir)), path, OFFLINE_IDS)
    pa.default_memory_pool().release_unused()  # the set's texts, let go: back to the system before the ranks start
    return path, True


@dataclass
class KeptIds:
    """The kept ids of a table's pairs: `ids` (ID_COLUMNS, as read from the file) holds those found, `at[i]` is row i's
    place in them (-1: not found, or the row has ids of its own)."""

    ids: pa.Table
    at: np.ndarray

    @property
    def found(self) -> int:
        return int((self.at >= 0).sum())

    def fill(self, table: pa.Table, rows: np.ndarray) -> pa.Table:
        """`table` (the pairs `rows`, in that order) with the ID_COLUMNS of its found pairs filled in."""
        at = self.at[np.asarray(rows, np.int64)]
        has = at >= 0
        if not has.any():
            return table
        # the found rows' ids, then spread over the table's rows (null where not found: the row keeps its own)
        spread = np.where(has, np.cumsum(has) - 1, 0)
        index = pa.array(spread, pa.int64(), mask=~has)
        for c in ID_COLUMNS:
            found = take_column(self.ids[c], at[has]).cast(schemas.TOKEN_IDS).take(index)
            filled = pc.coalesce(table[c].combine_chunks().cast(schemas.TOKEN_IDS), found)
            table = table.set_column(table.schema.get_field_index(c), c, filled)
        return table


def _keys_of(pairs: pa.Table, rows: np.ndarray, batch: int = 4096) -> Iterator[bytes]:
    """`content_keys` of the pairs `rows`, a batch at a time (their texts are Python strings only batch by batch)."""
    for s in range(0, len(rows), batch):
        part = take_table(pairs.select(["prompt", "prompt_messages", "chosen", "rejected"]), rows[s : s + batch])
        yield from content_keys(prompts_of(part), part["chosen"].to_pylist(), part["rejected"].to_pylist())


def find_ids(pairs: pa.Table, ids_path: Path | None) -> KeptIds | None:
    """The kept ids of `pairs` (PAIRS columns: prompt, prompt_messages, chosen, rejected and the ID_COLUMNS): of each
    pair that has none and whose content the ids file holds. None when there is no file or nothing is found."""
    if ids_path is None or not pairs.num_rows:
        return None
    missing = np.zeros(pairs.num_rows, dtype=bool)
    for c in ID_COLUMNS:
        missing |= pairs[c].is_null().to_numpy(zero_copy_only=False)
    need = np.flatnonzero(missing)
    if not need.size:
        return None
    try:
        held = read_parquet(ids_path, OFFLINE_IDS, columns=["key"])["key"].to_pylist()
    except (OSError, ArtifactError, pa.ArrowException):
        return None
    row_of = {k: i for i, k in enumerate(held)}
    del held
    file_row = np.fromiter((row_of.get(k, -1) for k in _keys_of(pairs, need)), np.int64, need.size)
    found = np.flatnonzero(file_row >= 0)
    if not found.size:
        return None
    # read in file order (no reordering copy): the k-th row read is the k-th smallest file row found
    order = np.argsort(file_row[found], kind="stable")
    at = np.full(pairs.num_rows, -1, np.int64)
    at[need[found[order]]] = np.arange(found.size)
    return KeptIds(take_rows(ids_path, OFFLINE_IDS, ID_COLUMNS, file_row[found[order]]), at)
