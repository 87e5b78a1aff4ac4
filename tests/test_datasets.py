"""pipeline/data/datasets.py: the user's prompts and offline preferences, JSONL or Parquet, with file- and line-level errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import schemas
from pipeline.data.artifacts import ArtifactError
from pipeline.data.datasets import read_offline, read_prompts


def jsonl(tmp_path, lines, name="data.jsonl"):
    """Write `lines` (dicts are dumped as JSON, strings written verbatim) one per line."""
    p = tmp_path / name
    p.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8")
    return p


def parquet(tmp_path, rows, name="data.parquet"):
    p = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), p)
    return p


# ---------------------------------------------------------------------------------------------- prompts


def test_prompts_jsonl_with_and_without_ids(tmp_path):
    p = jsonl(
        tmp_path,
        [
            {"prompt_id": "a", "prompt": "Write a haiku."},  # explicit id
            {"prompt_id": 7, "prompt": "Name three rivers."},  # a numeric id becomes a string
            "",  # blank lines are skipped
            {"prompt": "Explain DPO.", "extra": 1},  # no id: the row number (of non-blank rows); extra keys ignored
        ],
    )
    t = read_prompts(p)
    assert t.schema == schemas.PROMPTS
    assert t.to_pydict() == {
        "prompt_id": ["a", "7", "row000002"],
        "prompt": ["Write a haiku.", "Name three rivers.", "Explain DPO."],
        "prompt_messages": [None, None, None],  # one user turn each: no conversation
    }


def test_prompts_parquet(tmp_path):
    p = parquet(tmp_path, [{"prompt": "one"}, {"prompt": "two"}])
    t = read_prompts(p)
    assert t.schema == schemas.PROMPTS
    assert t.to_pydict() == {"prompt_id": ["row000000", "row000001"], "prompt": ["one", "two"],
                             "prompt_messages": [None, None]}  # fmt: skip


def test_prompts_parquet_with_ids(tmp_path):
    p = parquet(tmp_path, [{"prompt_id": "x1", "prompt": "one"}, {"prompt_id": "x2", "prompt": "two"}])
    assert read_prompts(str(p))["prompt_id"].to_pylist() == ["x1", "x2"]


def test_prompts_keep_unicode_and_inner_whitespace(tmp_path):
    p = jsonl(tmp_path, [{"prompt": "  Übersetze: «naïve café» \n bitte  "}])
    assert read_prompts(p)["prompt"].to_pylist() == ["  Übersetze: «naïve café» \n bitte  "]


# ---------------------------------------------------------------------------------------------- offline pairs


def test_offline_jsonl(tmp_path):
    p = jsonl(
        tmp_path,
        [
            {"pair_id": "u1", "prompt": "q1", "chosen": "good", "rejected": "bad"},
            {"prompt": "q2", "chosen": "yes", "rejected": "no"},  # no pair_id: the row number
        ],
    )
    t = read_offline(p)
    assert t.schema == schemas.OFFLINE
    assert t.to_pydict() == {
        "pair_id": ["u1", "off000001"],
        "prompt": ["q1", "q2"],
        "prompt_messages": [None, None],
        "chosen": ["good", "yes"],
        "rejected": ["bad", "no"],
    }


def test_offline_parquet(tmp_path):
    p = parquet(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b", "score": 3.5}])
    t = read_offline(p)
    assert t.schema == schemas.OFFLINE
    assert t.to_pylist() == [{"pair_id": "off000000", "prompt": "q", "prompt_messages": None, "chosen": "a", "rejected": "b"}]


def test_shipped_data_reads():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert read_prompts(root / "data" / "prompts.jsonl").num_rows > 0
    assert read_offline(root / "data" / "offline_prefs.jsonl").num_rows > 0


# ---------------------------------------------------------------------------------------------- errors


def raises_naming(fn, path, *fragments):
    with pytest.raises(ArtifactError) as e:
        fn(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_invalid_json_line(tmp_path):
    p = jsonl(tmp_path, [{"prompt": "ok"}, "", '{"prompt": "unterminated'])  # line 3
    raises_naming(read_prompts, p, "line 3", "not valid JSON")


def test_json_line_that_is_not_an_object(tmp_path):
    p = jsonl(tmp_path, [{"prompt": "ok"}, '["a", "list"]'])
    raises_naming(read_prompts, p, "line 2", "not a JSON object")


@pytest.mark.parametrize(
    "bad",
    [
        {"text": "no prompt key"},  # missing
        {"prompt": ""},  # empty
        {"prompt": "   \t"},  # whitespace only
        {"prompt": None},  # null
        {"prompt": 42},  # not a string
    ],
)
def test_missing_or_empty_prompt(tmp_path, bad):
    p = jsonl(tmp_path, [{"prompt": "fine"}, "", bad])  # the bad row is on line 3 (line 2 is blank)
    raises_naming(read_prompts, p, "line 3", "'prompt'")


def test_missing_prompt_in_parquet_names_the_row(tmp_path):
    p = parquet(tmp_path, [{"prompt": "fine"}, {"prompt": ""}])
    raises_naming(read_prompts, p, "row 1", "'prompt'")


def test_duplicate_prompt_id(tmp_path):
    rows = [{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "b", "prompt": "y"}, {"prompt_id": "a", "prompt": "z"}]
    p = jsonl(tmp_path, rows)
    raises_naming(read_prompts, p, "line 3", "duplicate prompt_id 'a'")


def test_duplicate_prompt_id_across_types(tmp_path):
    # ids are compared as strings: 1 and "1" are the same id
    p = jsonl(tmp_path, [{"prompt_id": 1, "prompt": "x"}, {"prompt_id": "1", "prompt": "y"}])
    raises_naming(read_prompts, p, "line 2", "duplicate prompt_id '1'")


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_offline_missing_field(tmp_path, field):
    row = {"prompt": "q", "chosen": "a", "rejected": "b"}
    row[field] = " "
    p = jsonl(tmp_path, [{"prompt": "q0", "chosen": "a", "rejected": "b"}, row])
    raises_naming(read_offline, p, "line 2", repr(field))


def test_offline_chosen_equals_rejected(tmp_path):
    rows = [{"prompt": "q0", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "same", "rejected": "same"}]
    p = jsonl(tmp_path, rows)
    raises_naming(read_offline, p, "line 2", "identical")


def test_offline_chosen_equals_rejected_parquet(tmp_path):
    p = parquet(tmp_path, [{"prompt": "q", "chosen": "same", "rejected": "same"}])
    raises_naming(read_offline, p, "row 0", "identical")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    raises_naming(read_prompts, p, "no prompts")
    raises_naming(read_offline, p, "no preference pairs")


def test_empty_parquet(tmp_path):
    p = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), p)
    raises_naming(read_prompts, p, "no prompts")


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet"])
def test_missing_file(tmp_path, name):
    p = tmp_path / name
    raises_naming(read_prompts, p, "not found")
    raises_naming(read_offline, p, "not found")


def test_a_folder_is_not_a_file(tmp_path):
    raises_naming(read_prompts, tmp_path, "doesn't contain any data files")  # a folder is read as a dataset


def test_non_utf8_jsonl_names_the_file(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    raises_naming(read_prompts, p)


def test_corrupt_parquet_is_an_artifact_error(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"this is not parquet at all")
    raises_naming(read_prompts, p)


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_unicode_line_separators_inside_a_json_string(tmp_path, sep):
    p = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"first paragraph{sep}second paragraph"}, {"prompt": "next"}]
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_prompts(p)["prompt"].to_pylist() == [r["prompt"] for r in rows]
