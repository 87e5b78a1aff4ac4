"""Reading the user's datasets (prompts, offline preferences) from JSONL or Parquet, with row-level errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schemas
from pipeline.artifacts import ArtifactError


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            raise ArtifactError(f"{path}: not a readable Parquet file: {e}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path}: not UTF-8 text (byte {e.start}); JSONL must be UTF-8") from None
    rows = []
    # split on "\n" only: str.splitlines() would also split inside JSON strings at U+2028/U+2029/U+0085
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path}: line {lineno} is not valid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise ArtifactError(f"{path}: line {lineno} is not a JSON object")
        row["_line"] = lineno
        rows.append(row)
    return rows


def _require_columns(path: Path, rows: list[dict], fields: tuple[str, ...]) -> None:
    """A field that no row has is a missing column: say so and list the columns the file has."""
    present = list(dict.fromkeys(k for row in rows for k in row if k != "_line"))
    missing = [f for f in fields if f not in present]
    if missing:
        raise ArtifactError(
            f"{path}: no column {', '.join(repr(m) for m in missing)}; the file has {', '.join(map(repr, present)) or 'no columns'}"
        )


def _where(path: Path, row: dict, i: int) -> str:
    return f"{path}: line {row['_line']}" if "_line" in row else f"{path}: row {i}"


def _text(path: Path, row: dict, i: int, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise ArtifactError(f"{_where(path, row, i)}: field {field!r} must be a non-empty string")
    return value


def read_prompts(path: str | Path) -> pa.Table:
    """Prompts as a PROMPTS table. `prompt_id` defaults to the row number; ids must be unique."""
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise ArtifactError(f"{path}: no prompts")
    _require_columns(path, rows, ("prompt",))
    out = {"prompt_id": [], "prompt": []}
    seen: set[str] = set()
    for i, row in enumerate(rows):
        raw_id = row.get("prompt_id")
        pid = f"row{i:06d}" if raw_id is None else str(raw_id)
        if pid in seen:
            raise ArtifactError(f"{_where(path, row, i)}: duplicate prompt_id {pid!r}")
        seen.add(pid)
        out["prompt_id"].append(pid)
        out["prompt"].append(_text(path, row, i, "prompt"))
    return pa.table(out, schema=schemas.PROMPTS)


def read_offline(path: str | Path) -> pa.Table:
    """Offline preference pairs as an OFFLINE table (pairs with chosen == rejected are errors)."""
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise ArtifactError(f"{path}: no preference pairs")
    _require_columns(path, rows, ("prompt", "chosen", "rejected"))
    out = {"pair_id": [], "prompt": [], "chosen": [], "rejected": []}
    for i, row in enumerate(rows):
        prompt, chosen, rejected = (_text(path, row, i, f) for f in ("prompt", "chosen", "rejected"))
        if chosen == rejected:
            raise ArtifactError(f"{_where(path, row, i)}: chosen and rejected are identical")
        raw_id = row.get("pair_id")
        out["pair_id"].append(f"off{i:06d}" if raw_id is None else str(raw_id))
        out["prompt"].append(prompt)
        out["chosen"].append(chosen)
        out["rejected"].append(rejected)
    return pa.table(out, schema=schemas.OFFLINE)
