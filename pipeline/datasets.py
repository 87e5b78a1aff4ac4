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


def text_key(text: str) -> str:
    """The form under which two prompts count as the same text: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())


def prompt_texts(path: str | Path, field: str = "prompt") -> set[str]:
    """The `text_key`s of a dataset's prompts (a prompt file or an offline preference set), for overlap checks."""
    path = Path(path)
    return {text_key(_text(path, row, i, field)) for i, row in enumerate(_rows(path))}


def read_reference_outputs(path: str | Path) -> dict[str, str]:
    """A baseline's reference outputs, AlpacaEval style: rows with `instruction` and `output` (a JSON list as
    alpaca_eval writes `model_outputs.json`, JSONL, or Parquet). Returns text_key(instruction) -> output.

    Raises:
        ArtifactError: naming the file and row: not a list of objects, a missing or non-string field, the same
            instruction twice with different outputs.
    """
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ArtifactError(f"{path}: expected a JSON list of objects with `instruction` and `output`")
        rows = data
    else:
        rows = _rows(path)
    if not rows:
        raise ArtifactError(f"{path}: no reference outputs")
    out: dict[str, str] = {}
    for i, row in enumerate(rows):
        key = text_key(_text(path, row, i, "instruction"))
        output = row.get("output")
        if not isinstance(output, str):
            raise ArtifactError(f"{_where(path, row, i)}: field 'output' must be a string")
        if key in out and out[key] != output:
            raise ArtifactError(f"{_where(path, row, i)}: instruction {key[:60]!r} appears twice with different outputs")
        out[key] = output
    return out
