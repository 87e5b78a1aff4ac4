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


# ---------------------------------------------------------------------------------------------- column maps


@pytest.mark.parametrize("order", [["instruction", "prompt"], ["prompt", "instruction"]])
def test_a_column_map_onto_an_existing_column_is_refused_naming_both(tmp_path, order):
    """{"instruction": "B", "prompt": "A"} with columns {prompt: instruction}: which one is the prompt depended on the
    key order before; now neither is guessed."""
    from pipeline.config import DataSource

    values = {"instruction": "B", "prompt": "A"}
    p = jsonl(tmp_path, [{k: values[k] for k in order}])
    with pytest.raises(ArtifactError) as e:
        read_prompts(DataSource(path=str(p), columns={"prompt": "instruction"}))
    assert "columns maps 'instruction' to 'prompt', but the dataset also has a column 'prompt'" in str(e.value)


def test_a_column_map_that_swaps_two_columns_is_not_a_collision(tmp_path):
    from pipeline.config import DataSource

    p = jsonl(tmp_path, [{"prompt": "an id", "prompt_id": "the question?"}])
    t = read_prompts(DataSource(path=str(p), columns={"prompt": "prompt_id", "prompt_id": "prompt"}))
    assert t.to_pylist()[0]["prompt"] == "the question?" and t.to_pylist()[0]["prompt_id"] == "an id"


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"instruction": "prompt"}, "'instruction' is not a dice field (prompt, prompt_id, chosen, rejected, pair_id); "
                                    "the map reads {dice field: your column}"),  # the map written the wrong way round
        ({"prompt": "q", "prompt_id": "q"}, "column 'q' is mapped to more than one field"),
    ],
)
def test_column_map_keys_are_checked_when_the_config_loads(columns, message):
    import json as _json

    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.prompts={_json.dumps({'path': 'p.jsonl', 'columns': columns})}"])
    assert "field data.prompts.columns" in str(e.value) and message in str(e.value)


# ---------------------------------------------------------------------------------------------- bad rows


BAD_PROMPTS = [
    {"prompt_id": "a", "prompt": "fine"},
    '{"prompt": "unterminated',  # line 2: invalid_json
    {"prompt_id": "b", "prompt": ""},  # line 3: bad_prompt
    {"prompt_id": "a", "prompt": "again"},  # line 4: duplicate_id
    {"prompt_id": "c", "prompt": [{"role": "user", "content": "  "}]},  # line 5: bad_prompt (empty content)
    {"prompt_id": "d", "prompt": "also fine"},
]


def test_on_bad_row_error_names_the_first(tmp_path):
    raises_naming(read_prompts, jsonl(tmp_path, BAD_PROMPTS), "line 2", "not valid JSON")


def test_on_bad_row_skip_keeps_the_good_rows_and_counts_each_reason(tmp_path):
    from pipeline.config import DataSource
    from pipeline.data.datasets import skipped_rows

    src = DataSource(path=str(jsonl(tmp_path, BAD_PROMPTS)), on_bad_row="skip")
    with skipped_rows() as skipped:
        t = read_prompts(src)
        read_prompts(src)  # read twice (as stages do): counted once
    assert t.column("prompt_id").to_pylist() == ["a", "d"]
    assert skipped == {str(src): {"invalid_json": 1, "bad_prompt": 2, "duplicate_id": 1}}


def test_data_on_bad_row_reaches_every_source_unless_one_sets_its_own():
    from pipeline.config import load_config

    cfg = load_config(None, ["data.on_bad_row=skip", "eval.prompts={path: e.jsonl, on_bad_row: error}"])
    assert (cfg.data.prompts.bad_rows, cfg.data.offline.bad_rows, cfg.eval.prompts.bad_rows) == ("skip", "skip", "error")
    assert load_config(None).data.prompts.bad_rows == "error"
    # skipping changes what a stage reads: it is part of the stage's plan (a plain file's digest is unchanged otherwise)
    from pipeline.run import rounds

    plain, skipping = load_config(None), cfg
    assert "prompts_source" not in rounds.plan(plain, 1, "generate").config
    assert rounds.plan(skipping, 1, "generate").config["prompts_source"] == {"on_bad_row": "skip"}


def test_skipping_every_row_is_still_an_error(tmp_path):
    from pipeline.config import DataSource

    p = jsonl(tmp_path, [{"prompt": ""}, '{"bad'])
    with pytest.raises(ArtifactError, match=r"no usable prompts: all 2 rows \(1 bad_prompt, 1 invalid_json\) skipped"):
        read_prompts(DataSource(path=str(p), on_bad_row="skip"))


def test_duplicate_pair_ids_are_refused(tmp_path):
    rows = [{"pair_id": "x", "prompt": "q", "chosen": "a", "rejected": "b"},
            {"pair_id": "x", "prompt": "q2", "chosen": "c", "rejected": "d"}]  # fmt: skip
    raises_naming(read_offline, jsonl(tmp_path, rows), "line 2", "duplicate pair_id 'x'")


def test_default_ids_never_collide_with_given_ones(tmp_path):
    """A row without an id gets its row number, made unique against the ids other rows give."""
    prompts = read_prompts(jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "b"}, {"prompt_id": "row000001", "prompt": "c"}]))
    assert prompts.column("prompt_id").to_pylist() == ["row000000", "row000001-1", "row000001"]
    pairs = read_offline(jsonl(tmp_path, [{"pair_id": "off000001", "prompt": "q", "chosen": "a", "rejected": "b"},
                                          {"prompt": "q", "chosen": "c", "rejected": "d"}], "offline.jsonl"))  # fmt: skip
    assert pairs.column("pair_id").to_pylist() == ["off000001", "off000001-1"]


# ---------------------------------------------------------------------------------------------- formats


def test_a_json_file_is_read_by_datasets_json_loader(tmp_path):
    """A JSON array (AlpacaEval's files): read as JSON, not as JSON lines."""
    p = tmp_path / "prompts.json"
    p.write_text(json.dumps([{"prompt": "first\nsecond line", "prompt_id": 1}, {"prompt": "other", "prompt_id": 2}],
                            indent=2))  # fmt: skip
    assert read_prompts(p).to_pylist() == [{"prompt_id": "1", "prompt": "first\nsecond line", "prompt_messages": None},
                                           {"prompt_id": "2", "prompt": "other", "prompt_messages": None}]  # fmt: skip


def test_a_csv_file_is_read_by_datasets_csv_loader(tmp_path):
    p = tmp_path / "offline.csv"
    p.write_text('prompt,chosen,rejected\n"Two, lines:\nhere",good,bad\nq2,yes,no\n')
    t = read_offline(p)
    assert t.column("prompt").to_pylist() == ["Two, lines:\nhere", "q2"] and t.column("chosen").to_pylist() == ["good", "yes"]
    empty = tmp_path / "empty_cell.csv"
    empty.write_text("prompt\nfine\n\"\"\n")
    raises_naming(read_prompts, empty, "row 1", "'prompt'")


def test_an_unparseable_json_file_names_it(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[{"prompt": "a"}, {"prompt": ')
    raises_naming(read_prompts, p, "not readable")


def test_trl_implicit_prompt_is_the_shared_beginning_as_trl_splits_it(tmp_path):
    """TRL's standard implicit-prompt format: no `prompt`, chosen and rejected share their beginning. dice takes the
    same prompt and answers as TRL's own extract_prompt (the space before the answer stays with the answer)."""
    from trl import extract_prompt

    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: five"},
            {"chosen": "abc", "rejected": "abcd"}]  # fmt: skip
    t = read_offline(jsonl(tmp_path, rows))
    for row, got in zip(rows, t.to_pylist()):
        theirs = extract_prompt(row)
        assert (got["prompt"], got["chosen"], got["rejected"]) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
    assert t.column("prompt").to_pylist()[0] == "The sky is"


def test_trl_implicit_prompt_in_conversations(tmp_path):
    from trl import extract_prompt

    u = {"role": "user", "content": "What color is the sky?"}
    row = {"chosen": [u, {"role": "assistant", "content": "It is blue."}],
           "rejected": [u, {"role": "assistant", "content": "It is green."}]}  # fmt: skip
    got = read_offline(jsonl(tmp_path, [row])).to_pylist()[0]
    theirs = extract_prompt(row)
    assert got["prompt"] == theirs["prompt"][0]["content"] and got["chosen"] == theirs["chosen"][0]["content"]


def test_revision_on_a_local_path_is_refused(tmp_path):
    from pipeline.config import DataSource

    p = jsonl(tmp_path, [{"prompt": "x"}])
    with pytest.raises(ArtifactError, match=r"revision applies to Hub dataset ids; .* is a local path: remove revision"):
        read_prompts(DataSource(path=str(p), revision="v1.0"))
