"""Reading the user's datasets (prompts, offline preferences), with errors that name the file, split, row or column.

Where a dataset comes from (`pipeline.config.DataSource`):
- a JSONL or Parquet file (read here, row by row, so an error names its line);
- a folder in the Hugging Face Hub layout (Parquet/JSONL files, `data/<split>-*.parquet`, optional subsets in its
  README) or written by `datasets`' `save_to_disk`: read with `datasets`;
- a Hub dataset id: its snapshot is fetched once with huggingface_hub (the cache serves HF_HUB_OFFLINE=1) and read
  as a Hub-layout folder. Its fingerprint is the snapshot's commit.

What a row may hold (TRL's standard and conversational formats):
- prompts: `prompt` as text (one user turn) or as a conversation ({role, content} messages, optional system
  messages first, ending with a user turn); optional `prompt_id`;
- offline pairs: `chosen` / `rejected` as text, as the assistant turn alone ([{role: assistant, content}]), or as
  the whole conversation with the prompt turns repeated (UltraFeedback binarized): then the turns before the last
  are the prompt, and chosen and rejected must agree on them. `prompt` (text or conversation) is needed only when
  chosen/rejected do not carry it.
`columns` renames the dataset's columns to these fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataSource
from pipeline.data import schemas
from pipeline.data.artifacts import ArtifactError
from pipeline.data.chat import Prompt, check_prompt, messages_column, plain_text, simplify
from pipeline.data.models import HUB_PREFIX


def source_of(src: str | Path | DataSource) -> DataSource:
    return src if isinstance(src, DataSource) else DataSource(path=str(src))


def is_hub_dataset(path: str) -> bool:
    """A Hub dataset id rather than a local file or folder (pipeline.data.models.looks_local's rule)."""
    from pipeline.data.models import looks_local

    return not Path(path).exists() and not looks_local(path)


def plan_input(src: DataSource) -> Path | str:
    """What a stage's plan records for a dataset: the local path (fingerprinted by content), or
    hf://datasets/<id>[@revision] (fingerprinted by the snapshot's commit)."""
    if is_hub_dataset(src.path):
        return HUB_PREFIX + src.path + (f"@{src.revision}" if src.revision else "")
    return Path(src.path)


# ---------------------------------------------------------------------------------------------- rows


def _jsonl(path: Path) -> list[dict]:
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


def _pick_split(splits: list[str], src: DataSource, label: str) -> str:
    if src.split is None and len(splits) != 1:
        raise ArtifactError(f"{label}: several splits ({', '.join(splits)}); choose one with split")
    split = src.split or splits[0]
    if split not in splits:
        raise ArtifactError(f"{label}: no split {split!r}; the splits are {', '.join(splits)}")
    return split


def _hf_rows(folder: Path, src: DataSource, label: str) -> list[dict]:
    """Rows of a save_to_disk folder or a Hub-layout folder. `datasets` says which files make the chosen split
    (its Hub-layout rules: data/<split>-*.parquet, <split>.jsonl, subsets declared in the README); Parquet and JSONL
    files are then read here (no cache written, an empty split is an empty split), anything else by `datasets`."""
    import datasets

    datasets.disable_progress_bars()
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[_pick_split(list(loaded), src, label)]
        elif src.split is not None:
            raise ArtifactError(f"{label}: a single dataset saved without splits; remove split={src.split!r}")
        return loaded.to_list() if loaded.num_rows else []
    try:
        builder = datasets.load_dataset_builder(str(folder), name=src.name)
    except ValueError as e:  # e.g. an unknown subset: datasets lists the available ones
        raise ArtifactError(f"{label}: {e}") from None
    except (OSError, datasets.exceptions.DataFilesNotFoundError) as e:
        raise ArtifactError(f"{label}: not a readable dataset folder ({type(e).__name__}: {e})") from None
    files = {k: [str(f) for f in v] for k, v in (builder.config.data_files or {}).items()}
    if not files:
        raise ArtifactError(f"{label}: no data files in the folder")
    split = _pick_split(list(files), src, label)
    rows: list[dict] = []
    for f in files[split]:
        if f.endswith(".parquet"):
            try:
                rows += pq.read_table(f).to_pylist()
            except (pa.ArrowInvalid, OSError) as e:
                raise ArtifactError(f"{f}: not a readable Parquet file: {e}") from None
        elif f.endswith(".jsonl"):
            rows += _jsonl(Path(f))
        else:  # CSV, JSON arrays, Arrow files: datasets' own readers
            return datasets.load_dataset(str(folder), name=src.name, split=split).to_list()
    return rows


def load_rows(src: str | Path | DataSource, what: str = "rows") -> tuple[list[dict], str]:
    """The rows of a dataset (`what` it holds, for messages) with its columns renamed to dice's fields, and the
    label errors use for it."""
    src = source_of(src)
    label = str(src)
    path = Path(src.path)
    if src.path.startswith(HUB_PREFIX) or is_hub_dataset(src.path):
        repo = src.path.removeprefix(HUB_PREFIX)
        from pipeline.data.models import local_dataset

        rows = _hf_rows(local_dataset(repo, src.revision, "dataset"), src, label)
    elif path.is_dir():
        rows = _hf_rows(path, src, label)
    elif path.is_file():
        if src.split or src.name:
            raise ArtifactError(f"{label}: split and name apply to dataset folders and Hub ids, not to one file")
        if path.suffix == ".parquet":
            try:
                rows = pq.read_table(path).to_pylist()
            except (pa.ArrowInvalid, OSError) as e:
                raise ArtifactError(f"{path}: not a readable Parquet file: {e}") from None
        else:
            rows = _jsonl(path)
    else:
        raise ArtifactError(f"{path}: file not found")
    if not rows:
        raise ArtifactError(f"{label}: no {what}" + (f" in split {src.split!r}" if src.split else ""))
    if src.columns:
        present = [k for k in rows[0] if k != "_line"]
        absent = [c for c in src.columns.values() if c not in present]
        if absent:
            raise ArtifactError(f"{label}: columns {absent} (from `columns`) not found; the columns are {', '.join(present)}")
        back = {theirs: ours for ours, theirs in src.columns.items()}
        rows = [{back.get(k, k): v for k, v in r.items()} for r in rows]
    return rows, label


def _require_columns(label: str, rows: list[dict], fields: tuple[str, ...]) -> None:
    """A field that no row has is a missing column: say so and list the columns the file has."""
    present = list(dict.fromkeys(k for row in rows for k in row if k != "_line"))
    missing = [f for f in fields if f not in present]
    if missing:
        raise ArtifactError(
            f"{label}: no column {', '.join(repr(m) for m in missing)}; the file has {', '.join(map(repr, present)) or 'no columns'}"
            " (map yours with columns: {field: column})"
        )


def _where(label: str, row: dict, i: int) -> str:
    return f"{label}: line {row['_line']}" if "_line" in row else f"{label}: row {i}"


def _text(where: str, value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ArtifactError(f"{where}: field {field!r} must be a non-empty string or a conversation")
    return value


def _prompt(where: str, value: Any) -> Prompt:
    """A prompt field: non-empty text, or a conversation ending with a user turn."""
    if isinstance(value, list):
        try:
            return simplify(check_prompt(value, f"{where}: field 'prompt'"))
        except ValueError as e:
            raise ArtifactError(str(e)) from None
    return _text(where, value, "prompt")


def _response(where: str, value: Any, field: str) -> tuple[list[dict] | None, str]:
    """(prompt turns it repeats or None, the response text) of a chosen/rejected field."""
    if not isinstance(value, list):
        return None, _text(where, value, field)
    if not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
        raise ArtifactError(f"{where}: field {field!r} is a conversation that does not end with an assistant turn")
    text = _text(where, value[-1].get("content"), f"{field} (its assistant turn)")
    if len(value) == 1:
        return None, text
    try:
        turns = check_prompt(value[:-1], f"{where}: field {field!r} (the turns before its answer)")
    except ValueError as e:
        raise ArtifactError(str(e)) from None
    return turns, text


# ---------------------------------------------------------------------------------------------- tables


def read_prompts(src: str | Path | DataSource) -> pa.Table:
    """Prompts as a PROMPTS table. `prompt_id` defaults to the row number; ids must be unique."""
    rows, label = load_rows(src, "prompts")
    _require_columns(label, rows, ("prompt",))
    ids, prompts = [], []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = _where(label, row, i)
        raw_id = row.get("prompt_id")
        pid = f"row{i:06d}" if raw_id is None else str(raw_id)
        if pid in seen:
            raise ArtifactError(f"{where}: duplicate prompt_id {pid!r}")
        seen.add(pid)
        ids.append(pid)
        prompts.append(_prompt(where, row.get("prompt")))
    return pa.table(
        {"prompt_id": ids, "prompt": [plain_text(p) for p in prompts], "prompt_messages": messages_column(prompts)},
        schema=schemas.PROMPTS,
    )


def read_offline(src: str | Path | DataSource) -> pa.Table:
    """Offline preference pairs as an OFFLINE table (pairs with chosen == rejected are errors)."""
    rows, label = load_rows(src, "preference pairs")
    _require_columns(label, rows, ("chosen", "rejected"))
    out: dict[str, list] = {"pair_id": [], "prompt": [], "prompt_messages": [], "chosen": [], "rejected": []}
    for i, row in enumerate(rows):
        where = _where(label, row, i)
        turns_c, chosen = _response(where, row.get("chosen"), "chosen")
        turns_r, rejected = _response(where, row.get("rejected"), "rejected")
        if turns_c is not None or turns_r is not None:  # whole conversations: the shared turns are the prompt
            if turns_c != turns_r:
                raise ArtifactError(f"{where}: chosen and rejected repeat different prompt turns; a pair needs one prompt")
            prompt: Prompt = simplify(turns_c)
        elif "prompt" in row:
            prompt = _prompt(where, row["prompt"])
        else:
            raise ArtifactError(f"{where}: no 'prompt' field, and chosen/rejected do not carry the prompt turns")
        if chosen == rejected:
            raise ArtifactError(f"{where}: chosen and rejected are identical")
        raw_id = row.get("pair_id")
        out["pair_id"].append(f"off{i:06d}" if raw_id is None else str(raw_id))
        out["prompt"].append(plain_text(prompt))
        out["prompt_messages"].append(messages_column([prompt])[0])
        out["chosen"].append(chosen)
        out["rejected"].append(rejected)
    return pa.table(out, schema=schemas.OFFLINE)


def text_key(text: str) -> str:
    """The form under which two prompts count as the same text: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())


def prompt_texts(src: str | Path | DataSource, kind: str = "prompts") -> set[str]:
    """The `text_key`s of a dataset's prompts as dice reads them (`kind`: prompts, or offline pairs), for overlap
    checks; a conversation counts by its plain text."""
    table = read_offline(src) if kind == "offline" else read_prompts(src)
    return {text_key(t) for t in table.column("prompt").to_pylist()}


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
    elif path.is_file():
        rows, _ = load_rows(path, "reference outputs")
    else:
        raise ArtifactError(f"{path}: file not found")
    if not rows:
        raise ArtifactError(f"{path}: no reference outputs")
    out: dict[str, str] = {}
    for i, row in enumerate(rows):
        where = _where(str(path), row, i)
        key = text_key(_text(where, row.get("instruction"), "instruction"))
        output = row.get("output")
        if not isinstance(output, str):
            raise ArtifactError(f"{where}: field 'output' must be a string")
        if key in out and out[key] != output:
            raise ArtifactError(f"{where}: instruction {key[:60]!r} appears twice with different outputs")
        out[key] = output
    return out
