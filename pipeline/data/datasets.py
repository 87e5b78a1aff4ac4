"""Reading the user's datasets (prompts, offline preferences), with errors that name the file, split, row and field.

Where a dataset comes from (`pipeline.config.DataSource`):
- a file: JSONL or Parquet (read here, row by row, so an error names its line), JSON (a list of objects) or CSV
  (read by `datasets`' own JSON and CSV loaders);
- a folder in the Hugging Face Hub layout (data files, `data/<split>-*.parquet`, optional subsets in its README) or
  written by `datasets`' `save_to_disk`: `datasets` says which files make the chosen subset and split;
- a Hub dataset id: the commit its revision resolves to is asked once per process (`models.dataset_info`, the
  fingerprint the manifests record and the commit every read uses), then only the files of the chosen subset and
  split are downloaded into the huggingface_hub cache (which serves HF_HUB_OFFLINE=1) and read as a Hub-layout
  folder. A repository with a loading script (tatsu-lab/alpaca_eval) is never run: `name` picks its data file.

What a row may hold (TRL's standard and conversational formats):
- prompts: `prompt` as text (one user turn) or as a conversation ({role, content} messages with non-empty content,
  optional system messages first, ending with a user turn); optional `prompt_id`;
- offline pairs: `chosen` / `rejected` as text, as the assistant turn alone ([{role: assistant, content}]), or as
  the whole conversation with the prompt turns repeated (UltraFeedback binarized): the turns they share are the
  prompt, and after them each must be one assistant turn. Without a `prompt` field, text `chosen`/`rejected` share
  their prompt as a common beginning (TRL's implicit prompt): it is split off as TRL's `extract_prompt` does.
`columns` renames the dataset's columns to these fields.

A row dice cannot use is a `RowError` with a reason; `on_bad_row` decides: error (the first one stops the read,
naming the file, split, row and field), skip (the row is left out and counted by reason; the counts reach the
stage's manifest through `skipped_rows`), or, for `dice data check` and the run's check before round 0, collect
(every one is counted and the first few kept, `BadRows`).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataSource
from pipeline.data import schemas
from pipeline.data.artifacts import ArtifactError
from pipeline.data.chat import Prompt, check_prompt, messages_column, plain_text, simplify
from pipeline.data.models import HUB_PREFIX

Policy = Literal["error", "skip", "collect"]


def source_of(src: str | Path | DataSource) -> DataSource:
    return src if isinstance(src, DataSource) else DataSource(path=str(src))


def is_hub_dataset(path: str) -> bool:
    """A Hub dataset id rather than a local file or folder (pipeline.data.models.looks_local's rule)."""
    from pipeline.data.models import looks_local

    return path.startswith(HUB_PREFIX) or (not Path(path).exists() and not looks_local(path))


def plan_input(src: DataSource) -> Path | str:
    """What a stage's plan records for a dataset: the local path (fingerprinted by content), or
    hf://datasets/<id>[@revision] (fingerprinted by the snapshot's commit)."""
    if is_hub_dataset(src.path):
        return HUB_PREFIX + src.path.removeprefix(HUB_PREFIX) + (f"@{src.revision}" if src.revision else "")
    return Path(src.path)


# ---------------------------------------------------------------------------------------------- bad rows


class RowError(ArtifactError):
    """One row dice cannot use: `reason` (a short key, counted when rows are skipped) and what is wrong with it."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class BadRows:
    """The rows of one dataset that dice could not use: how many by reason, and the first few in full.

    policy: error (the first bad row raises ArtifactError naming it), skip (bad rows are left out and counted),
    collect (as skip; the caller decides, after reading, whether they are an error)."""

    SHOWN = 5

    def __init__(self, label: str, policy: Policy):
        self.label, self.policy = label, policy
        self.counts: Counter[str] = Counter()
        self._first: list[tuple[int, str]] = []  # (position in the file, message) of the earliest bad rows

    def add(self, where: str, e: RowError, position: int = 0) -> None:
        """Count a bad row at `where` (its line or row `position`: the first few are kept in file order)."""
        if self.policy == "error":
            raise ArtifactError(f"{where}: {e}")
        self.counts[e.reason] += 1
        self._first = sorted([*self._first, (position, f"{where}: {e}")], key=lambda x: x[0])[: self.SHOWN]

    @classmethod
    def restored(cls, label: str, policy: Policy, counts: dict[str, int], first: list[str]) -> BadRows:
        """The BadRows a read recorded (`counts`, `first`), for a dataset read once and kept (pipeline.data.offline_cache)."""
        bad = cls(label, policy)
        bad.counts.update(counts)
        bad._first = list(enumerate(first))
        return bad

    @property
    def first(self) -> list[str]:
        """The first few bad rows, in file order, each naming its file, split, row and field."""
        return [message for _, message in self._first]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """'3 rows (2 invalid_json, 1 bad_prompt)': the count, then by reason, most first."""
        by = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return f"{self.total} row{'s' if self.total != 1 else ''} ({', '.join(f'{n} {reason}' for reason, n in by)})"


_skipped: dict[str, dict[str, int]] | None = None  # label -> reason -> rows, while `skipped_rows` records


@contextmanager
def skipped_rows() -> Iterator[dict[str, dict[str, int]]]:
    """Record, for the body's duration, the rows every dataset read skipped (on_bad_row: skip): label -> reason ->
    count, for the stage's manifest. Each dataset is logged once, with its counts and first rows, to stderr."""
    global _skipped
    outer, _skipped = _skipped, {}
    try:
        yield _skipped
    finally:
        _skipped = outer


def note_skipped(bad: BadRows) -> None:
    """Log the rows `bad` skipped (on_bad_row: skip) once per dataset, and record them for the stage's manifest."""
    if bad.policy != "skip" or not bad.total:
        return
    counts = dict(bad.counts)
    if _skipped is not None:
        if _skipped.get(bad.label) == counts:
            return  # a stage reads its dataset more than once: logged already
        _skipped[bad.label] = counts
    print(f"warning: {bad.label}: skipped {bad.summary()} (on_bad_row: skip); first: {'; '.join(bad.first[:3])}",
          file=sys.stderr, flush=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------- files


def _jsonl(path: Path, bad: BadRows) -> list[dict]:
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
            bad.add(f"{path}: line {lineno}", RowError("invalid_json", f"not valid JSON: {e.msg}"), lineno)
            continue
        if not isinstance(row, dict):
            bad.add(f"{path}: line {lineno}", RowError("not_an_object", "not a JSON object"), lineno)
            continue
        row["_line"] = lineno
        rows.append(row)
    return rows


def _parquet(path: Path | str) -> list[dict]:
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowInvalid, OSError) as e:
        raise ArtifactError(f"{path}: not a readable Parquet file: {e}") from None


def _with_datasets(label: str, load: Any) -> list[dict]:
    """Rows from a `datasets` loader call `load(cache_dir)`, its Arrow cache in a temporary folder (nothing left in
    the user's cache); a file it cannot parse is an error naming `label` and the parser's own message."""
    import tempfile

    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="dice-datasets-") as cache:
        try:
            return load(cache).to_list()
        except (datasets.exceptions.DatasetGenerationError, pa.ArrowInvalid, ValueError, OSError) as e:
            cause = e.__cause__ or e
            raise ArtifactError(f"{label}: not readable ({type(cause).__name__}: {str(cause).splitlines()[0]})") from None


def _loaded(builder: str, files: list[str], label: str) -> list[dict]:
    """Rows of data files read by `datasets`' packaged loader `builder` (json, csv, arrow, ...)."""
    import datasets

    return _with_datasets(label, lambda cache: datasets.load_dataset(builder, data_files=files, split="train",
                                                                     cache_dir=cache))  # fmt: skip


_LOADERS = {".json": "json", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}


def _file_rows(path: Path, bad: BadRows) -> list[dict]:
    """A file's rows by its suffix: Parquet and JSONL read here (line numbers), JSON and CSV by `datasets`."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet(path)
    if suffix in _LOADERS:
        return _loaded(_LOADERS[suffix], [str(path)], str(path))
    return _jsonl(path, bad)


# ---------------------------------------------------------------------------------------------- folders and the Hub


def _pick_split(splits: list[str], src: DataSource, label: str, cached: bool = False) -> str:
    if src.split is None and len(splits) != 1:
        raise ArtifactError(f"{label}: several splits ({', '.join(splits)}); choose one with split")
    split = src.split or splits[0]
    if split not in splits:
        note = " in the local Hugging Face cache (with the Hub reachable dice downloads the split asked for)" if cached else ""
        raise ArtifactError(f"{label}: no split {split!r}; the splits are {', '.join(splits)}{note}")
    return split


DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".tsv", ".arrow")


def _script_subset(names: list[str], scripts: list[str], src: DataSource, label: str) -> str:
    """The data file a repository with a loading script holds for subset `src.name`: `<name>.<suffix>` beside the
    script (AlpacaEval's layout: each configuration of its script is one JSON file). dice never runs the script."""
    data = sorted(n for n in names if "/" not in n and n.lower().endswith(DATA_SUFFIXES))
    why = f"a dataset with a loading script ({', '.join(scripts)}), which dice never runs"
    if src.name is None:
        stems = ", ".join(Path(n).stem for n in data) or "none"
        raise ArtifactError(f"{label}: {why}; name the subset to read with name (its data files: {stems})")
    found = [n for n in data if Path(n).stem == src.name]
    if not found:
        raise ArtifactError(f"{label}: {why}; no data file {src.name}.<json|jsonl|parquet|csv> beside it (its data "
                            f"files: {', '.join(data) or 'none'})")  # fmt: skip
    if src.split is not None:
        raise ArtifactError(f"{label}: {why}; its subset {src.name!r} is the one file {found[0]}: remove split={src.split!r}")
    return found[0]


class NoDataFiles(ArtifactError):
    """A folder without data files for the subset and split asked for."""


def _split_files(folder: Path, src: DataSource, label: str, cached: bool = False) -> list[str]:
    """The files (paths under `folder`) that make `src`'s subset and split, as `datasets` resolves a Hub-layout
    folder (its file names, and the README's configs), or the data file of a repository with a loading script."""
    import datasets

    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    scripts = sorted(n for n in names if "/" not in n and n.endswith(".py"))
    if scripts:
        return [str(folder / _script_subset(names, scripts, src, label))]
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        builder = datasets.load_dataset_builder(str(folder), name=src.name)
    except ValueError as e:  # e.g. an unknown subset: datasets lists the available ones
        raise ArtifactError(f"{label}: {e}") from None
    except (OSError, datasets.exceptions.DataFilesNotFoundError) as e:
        raise NoDataFiles(f"{label}: not a readable dataset folder ({type(e).__name__}: {e})") from None
    files = {str(k): [str(f) for f in v] for k, v in (builder.config.data_files or {}).items()}
    if not files:
        raise NoDataFiles(f"{label}: no data files in the folder")
    return files[_pick_split(list(files), src, label, cached)]


def _saved_to_disk(names: list[str]) -> bool:
    return "dataset_dict.json" in names or "state.json" in names


def _folder_rows(folder: Path, src: DataSource, label: str, bad: BadRows, files: list[str] | None = None) -> list[dict]:
    """Rows of a save_to_disk folder or a Hub-layout folder (`files`: the ones to read, when already known).
    Parquet and JSONL files are read here (no cache written, an empty split is an empty split), anything else by
    `datasets`' loader for it."""
    import datasets

    if _saved_to_disk([p.name for p in folder.iterdir()]):
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[_pick_split(list(loaded), src, label)]
        elif src.split is not None:
            raise ArtifactError(f"{label}: a single dataset saved without splits; remove split={src.split!r}")
        return loaded.to_list() if loaded.num_rows else []
    rows: list[dict] = []
    for f in files if files is not None else _split_files(folder, src, label):
        path = Path(f)
        if path.suffix.lower() in (".parquet", ".jsonl"):
            rows += _file_rows(path, bad)
        elif path.suffix.lower() in _LOADERS:
            rows += _loaded(_LOADERS[path.suffix.lower()], [f], f)
        else:  # anything else datasets reads (text, ...): its own resolution of the folder
            return _with_datasets(label, lambda cache: datasets.load_dataset(str(folder), name=src.name, split=src.split,
                                                                             cache_dir=cache))  # fmt: skip
    return rows


def _only_split(readme: str, split: str | None) -> str:
    """A dataset card whose `configs` declare only `split` (where they declare it): what the local cache holds of a
    Hub dataset downloaded split by split still resolves, without the files of the splits never downloaded."""
    import re

    import yaml

    found = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme, re.DOTALL)
    if split is None or found is None:
        return readme
    try:
        meta = yaml.safe_load(found.group(1)) or {}
    except yaml.YAMLError:
        return readme
    for config in meta.get("configs") or []:
        entries = config.get("data_files") if isinstance(config, dict) else None
        if isinstance(entries, list):
            kept = [e for e in entries if isinstance(e, dict) and e.get("split") == split]
            if kept:
                config["data_files"] = kept
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + readme[found.end():]


def hub_files(names: list[str], readme: str | None, src: DataSource, label: str, cached: bool = False) -> list[str] | None:
    """Which data files of a Hub dataset repository (its file `names`, its README text) make `src`'s subset and
    split: what `datasets` would read, worked out from the names alone on an empty copy of the repository's layout
    (the download then fetches only those). `cached`: the names are what the local cache holds, possibly some splits
    only. None: the whole repository (a save_to_disk upload is read whole)."""
    import tempfile

    if _saved_to_disk(names):
        return None
    with tempfile.TemporaryDirectory(prefix="dice-layout-") as tmp:
        layout = Path(tmp) / "repo"
        layout.mkdir()
        for name in names:
            if any(part.startswith(".") for part in name.split("/")):
                continue
            (layout / name).parent.mkdir(parents=True, exist_ok=True)
            (layout / name).touch()
        if readme is not None:
            (layout / "README.md").write_text(_only_split(readme, src.split) if cached else readme, encoding="utf-8")
        try:
            files = _split_files(layout, src, label, cached)
        except NoDataFiles:
            if not cached:
                raise
            held = sorted(n for n in names if n.lower().endswith(DATA_SUFFIXES))
            raise ArtifactError(f"{label}: not in the local Hugging Face cache (it holds {', '.join(held) or 'no data files'} "
                                "of this dataset) and the Hub cannot be reached; read it once with network") from None
        except ArtifactError as e:
            raise ArtifactError(str(e).replace(str(layout), src.path)) from None
        return sorted(Path(f).relative_to(layout).as_posix() for f in files)


def _hub_rows(src: DataSource, label: str, bad: BadRows) -> list[dict]:
    """Rows of a Hub dataset at the commit this process resolved for it, downloading only the files of the subset and
    split asked for (once; offline, what the local cache holds)."""
    from pipeline.data import models

    repo = src.path.removeprefix(HUB_PREFIX)
    commit, names = models.dataset_info(repo, src.revision, label)
    if names is None:  # offline or unreachable: the cache holds what it holds (maybe some splits only)
        folder = models.dataset_snapshot(repo, commit, None, label)
        cached = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        readme = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() else None
        files = hub_files(cached, readme, src, label, cached=True)
        return _folder_rows(folder, src, label, bad, None if files is None else [str(folder / f) for f in files])
    readme = None
    if "README.md" in names:
        readme = (models.dataset_snapshot(repo, commit, ["README.md"], label) / "README.md").read_text(encoding="utf-8")
    files = hub_files(names, readme, src, label)
    wanted = None if files is None else files + [n for n in ("README.md",) if n in names]
    folder = models.dataset_snapshot(repo, commit, wanted, label)
    return _folder_rows(folder, src, label, bad, None if files is None else [str(folder / f) for f in files])


# ---------------------------------------------------------------------------------------------- rows


def _map_columns(rows: list[dict], src: DataSource, label: str) -> list[dict]:
    """Rows with the dataset's columns renamed to dice's fields (`columns`), refusing a map that would read two
    columns as one field or names a column the dataset lacks."""
    present = list(dict.fromkeys(k for r in rows for k in r if k != "_line"))
    absent = [c for c in src.columns.values() if c not in present]
    if absent:
        raise ArtifactError(f"{label}: columns {absent} (from `columns`) not found; the columns are {', '.join(present)}")
    mapped_away = set(src.columns.values())
    for field, column in src.columns.items():
        if field != column and field in present and field not in mapped_away:
            raise ArtifactError(
                f"{label}: columns maps {column!r} to {field!r}, but the dataset also has a column {field!r}; dice "
                f"cannot tell which is meant: drop or rename one of {column!r} and {field!r}"
            )
    back = {theirs: ours for ours, theirs in src.columns.items()}
    return [{back.get(k, k): v for k, v in r.items()} for r in rows]


def load_rows(src: str | Path | DataSource, what: str = "rows", bad: BadRows | None = None) -> tuple[list[dict], str]:
    """The rows of a dataset (`what` it holds, for messages) with its columns renamed to dice's fields, and the
    label errors use for it. `bad`: where unreadable lines go (default: src's on_bad_row)."""
    src = source_of(src)
    label = str(src)
    bad = bad if bad is not None else BadRows(label, src.bad_rows)
    path = Path(src.path).expanduser()
    if is_hub_dataset(src.path):
        rows = _hub_rows(src, label, bad)
    elif src.revision:
        raise ArtifactError(f"{label}: revision applies to Hub dataset ids; {src.path} is a local "
                            f"{'folder' if path.is_dir() else 'path'}: remove revision")  # fmt: skip
    elif path.is_dir():
        rows = _folder_rows(path, src, label, bad)
    elif path.is_file():
        if src.split or src.name:
            raise ArtifactError(f"{label}: split and name apply to dataset folders and Hub ids, not to one file")
        rows = _file_rows(path, bad)
    else:
        raise ArtifactError(f"{path}: file not found")
    if not rows and not bad.total:
        raise ArtifactError(f"{label}: no {what}" + (f" in split {src.split!r}" if src.split else ""))
    if src.columns and rows:
        rows = _map_columns(rows, src, label)
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


def where_of(label: str, row: dict, i: int) -> str:
    return f"{label}: line {row['_line']}" if "_line" in row else f"{label}: row {i}"


def _text(value: Any, field: str, reason: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RowError(reason, f"field {field!r} must be a non-empty string or a conversation")
    return value


def _messages(value: list, field: str, reason: str) -> list[dict]:
    """A conversation's messages, each {role, content} with non-empty text (an empty turn says nothing to a model
    and renders differently under each chat template)."""
    for i, m in enumerate(value):
        if isinstance(m, dict) and isinstance(m.get("content"), str) and not m["content"].strip():
            raise RowError(reason, f"field {field!r}: message {i} ({m.get('role')}) has empty content")
    return value


def _prompt(value: Any) -> Prompt:
    """A prompt field: non-empty text, or a conversation ending with a user turn."""
    if isinstance(value, list):
        try:
            return simplify(check_prompt(_messages(value, "prompt", "bad_prompt"), "field 'prompt'"))
        except ValueError as e:
            if isinstance(e, RowError):
                raise
            raise RowError("bad_prompt", str(e)) from None
    return _text(value, "prompt", "bad_prompt")


def _side(value: Any, field: str) -> str | list[dict]:
    """A chosen/rejected field: its text, or its conversation (checked to end with a non-empty assistant turn)."""
    reason = f"bad_{field}"
    if not isinstance(value, list):
        return _text(value, field, reason)
    if not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
        raise RowError(reason, f"field {field!r} is a conversation that does not end with an assistant turn")
    _text(value[-1].get("content"), f"{field} (its assistant turn)", reason)
    return _messages(value, field, reason)


def shared_prefix(a: str | list, b: str | list) -> int:
    """Where `a` and `b` first differ, as TRL's `extract_prompt` splits an implicit prompt off: at the first
    differing character (or message), moved back one when a space precedes it so the answer keeps its space; when
    one is a prefix of the other, one before the shorter's end (TRL's loop leaves it there)."""
    idx = 0
    for idx in range(min(len(a), len(b))):
        if a[idx] != b[idx]:
            if a[idx - 1] == " ":
                idx -= 1
            break
    return idx


def _pair(row: dict) -> tuple[Prompt, str, str]:
    """(prompt, chosen text, rejected text) of an offline row (module docstring for the formats)."""
    chosen, rejected = _side(row.get("chosen"), "chosen"), _side(row.get("rejected"), "rejected")
    turns = [x for x in (chosen, rejected) if isinstance(x, list) and len(x) > 1]
    if turns:  # whole conversations: the turns both repeat are the prompt, one assistant turn each after them
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise RowError("different_prompt_turns", "chosen and rejected repeat different prompt turns; a pair needs one prompt")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if len(chosen) - n != 1 or len(rejected) - n != 1:
            if len(chosen) == len(rejected) == n:
                raise RowError("identical", "chosen and rejected are identical")
            raise RowError("different_prompt_turns", "chosen and rejected repeat different prompt turns; a pair needs one prompt")
        try:
            prompt: Prompt = simplify(check_prompt(chosen[:n], "the turns chosen and rejected share (the prompt)"))
        except ValueError as e:
            raise RowError("bad_prompt", str(e)) from None
        c, r = chosen[-1]["content"], rejected[-1]["content"]
    else:
        c = chosen if isinstance(chosen, str) else chosen[0]["content"]
        r = rejected if isinstance(rejected, str) else rejected[0]["content"]
        if "prompt" in row:
            prompt = _prompt(row["prompt"])
        elif isinstance(chosen, str) and isinstance(rejected, str) and c != r:
            # TRL's implicit prompt: the beginning both share
            cut = shared_prefix(c, r)
            prompt, c, r = c[:cut], c[cut:], r[cut:]
            if not prompt.strip():
                raise RowError("no_prompt", "no 'prompt' field, and chosen and rejected share no beginning to be "
                                            "the prompt (TRL's implicit prompt)")  # fmt: skip
            _text(c, "chosen (after the shared prompt)", "bad_chosen")
            _text(r, "rejected (after the shared prompt)", "bad_rejected")
        elif c != r:
            raise RowError("no_prompt", "no 'prompt' field, and chosen/rejected do not carry the prompt turns")
    if c == r:
        raise RowError("identical", "chosen and rejected are identical")
    return prompt, c, r


def _default_ids(rows: list[dict], field: str, prefix: str) -> list[str | None]:
    """Each row's id: its own (`field`, as a string), else `<prefix><row number>`, made unique against the ids the
    dataset gives (a user's 'row000001' is never also a default one)."""
    given = {str(r[field]) for r in rows if r.get(field) is not None}
    ids: list[str | None] = []
    for i, r in enumerate(rows):
        if r.get(field) is not None:
            ids.append(str(r[field]))
            continue
        pid, n = f"{prefix}{i:06d}", 0
        while pid in given:
            n += 1
            pid = f"{prefix}{i:06d}-{n}"
        ids.append(pid)
    return ids


# ---------------------------------------------------------------------------------------------- tables


def read_prompts_rows(src: str | Path | DataSource, bad: BadRows | None = None) -> tuple[pa.Table, list[str]]:
    """`read_prompts` with where each kept row came from (file, split, row), for checks that run on the table."""
    src = source_of(src)
    bad = bad if bad is not None else BadRows(str(src), src.bad_rows)
    rows, label = load_rows(src, "prompts", bad)
    if rows:
        _require_columns(label, rows, ("prompt",))
    ids, prompts, wheres = [], [], []
    seen: set[str] = set()
    for i, (row, pid) in enumerate(zip(rows, _default_ids(rows, "prompt_id", "row"))):
        where = where_of(label, row, i)
        try:
            if pid in seen:
                raise RowError("duplicate_id", f"duplicate prompt_id {pid!r}")
            prompt = _prompt(row.get("prompt"))
        except RowError as e:
            bad.add(where, e, row.get("_line", i))
            continue
        seen.add(pid)
        ids.append(pid)
        prompts.append(prompt)
        wheres.append(where)
    note_skipped(bad)
    if not ids and bad.policy != "collect":
        raise ArtifactError(f"{label}: no usable prompts: all {bad.summary()} skipped")
    table = pa.table({"prompt_id": ids, "prompt": [plain_text(p) for p in prompts],
                      "prompt_messages": messages_column(prompts)}, schema=schemas.PROMPTS)  # fmt: skip
    return table, wheres


def read_prompts(src: str | Path | DataSource) -> pa.Table:
    """Prompts as a PROMPTS table. `prompt_id` defaults to the row number; ids must be unique."""
    return read_prompts_rows(src)[0]


def read_offline_rows(src: str | Path | DataSource, bad: BadRows | None = None) -> tuple[pa.Table, list[str]]:
    """`read_offline` with where each kept row came from (file, split, row)."""
    src = source_of(src)
    bad = bad if bad is not None else BadRows(str(src), src.bad_rows)
    rows, label = load_rows(src, "preference pairs", bad)
    if rows:
        _require_columns(label, rows, ("chosen", "rejected"))
    out: dict[str, list] = {"pair_id": [], "prompt": [], "prompt_messages": [], "chosen": [], "rejected": []}
    wheres: list[str] = []
    seen: set[str] = set()
    for i, (row, pair_id) in enumerate(zip(rows, _default_ids(rows, "pair_id", "off"))):
        where = where_of(label, row, i)
        try:
            if pair_id in seen:
                raise RowError("duplicate_id", f"duplicate pair_id {pair_id!r}")
            prompt, chosen, rejected = _pair(row)
        except RowError as e:
            bad.add(where, e, row.get("_line", i))
            continue
        seen.add(pair_id)
        out["pair_id"].append(pair_id)
        out["prompt"].append(plain_text(prompt))
        out["prompt_messages"].append(messages_column([prompt])[0])
        out["chosen"].append(chosen)
        out["rejected"].append(rejected)
        wheres.append(where)
    note_skipped(bad)
    if not wheres and bad.policy != "collect":
        raise ArtifactError(f"{label}: no usable preference pairs: all {bad.summary()} skipped")
    return pa.table(out, schema=schemas.OFFLINE), wheres


def read_offline(src: str | Path | DataSource) -> pa.Table:
    """Offline preference pairs as an OFFLINE table (pairs with chosen == rejected are errors)."""
    return read_offline_rows(src)[0]


def text_key(text: str) -> str:
    """The form under which two prompts count as the same text: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())


def overlap_key(text: str) -> str:
    """The form under which a held-out prompt counts as a training prompt: lower case, punctuation dropped (every
    Unicode punctuation and symbol character becomes a space), whitespace runs collapsed. "Tell me about food!" and
    "tell me  about food." are one prompt."""
    import unicodedata

    chars = (" " if unicodedata.category(c)[0] in "PS" else c for c in text.casefold())
    return " ".join("".join(chars).split())


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
        where = where_of(str(path), row, i)
        try:
            key = text_key(_text(row.get("instruction"), "instruction", "bad_instruction"))
        except RowError as e:
            raise ArtifactError(f"{where}: {e}") from None
        output = row.get("output")
        if not isinstance(output, str):
            raise ArtifactError(f"{where}: field 'output' must be a string")
        if key in out and out[key] != output:
            raise ArtifactError(f"{where}: instruction {key[:60]!r} appears twice with different outputs")
        out[key] = output
    return out
