"""pipeline/data/offline_cache.py: the offline set read and checked once per run, tokenised once per tokenizer, its
ids found again by the pairs' content. Real files, the session's tiny tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.compute.logprobs import encode, encode_many
from pipeline.config import DataSource
from pipeline.data import offline_cache, schemas
from pipeline.data.artifacts import write_parquet
from pipeline.data.chat import prompts_of
from pipeline.data.datasets import read_offline, skipped_rows
from pipeline.data.offline_cache import ID_COLUMNS, find_ids, offline_ids, offline_table

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
ROWS = [
    {"pair_id": "a", "prompt": "Write a haiku about rain.", "chosen": "Soft rain on the roof.", "rejected": "Rain."},
    {"pair_id": "b", "prompt": "Explain DPO.", "chosen": "It fits a policy to preferences directly.", "rejected": "No."},
    {"pair_id": "c", "chosen": [*CONVERSATION, {"role": "assistant", "content": "Blue."}],
     "rejected": [*CONVERSATION, {"role": "assistant", "content": "Colours are hard."}]},
    {"pair_id": "d", "prompt": "Say hi.", "chosen": "hi", "rejected": "hi"},  # identical: skipped
]  # fmt: skip


def _encoder(tok):
    return lambda prompts, responses: encode_many(tok, prompts, responses)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataSource(path=str(path), on_bad_row="skip")


@pytest.fixture
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def test_the_set_is_read_once_and_again_after_an_edit(tmp_path, capsys):
    src, run = _write(tmp_path / "offline.jsonl", ROWS), tmp_path / "run"
    with skipped_rows() as skipped:
        first = offline_table(src, run)
    assert first.equals(read_offline(src)) and first.num_rows == 3
    assert skipped == {str(src): {"identical": 1}} and "skipped 1 row (1 identical)" in capsys.readouterr().err
    kept = list(offline_cache.folder(run).glob("*.parquet"))
    assert len(kept) == 1
    # the kept table, not the file, answers later reads: a changed kept table shows through
    write_parquet(first.set_column(3, "chosen", pa.array(["x", "y", "z"])), kept[0], schemas.OFFLINE)
    with skipped_rows() as skipped:
        again = offline_table(src, run)
    assert again["chosen"].to_pylist() == ["x", "y", "z"]
    assert skipped == {str(src): {"identical": 1}}, "the rows the first read skipped are logged and recorded again"
    assert "skipped 1 row (1 identical)" in capsys.readouterr().err
    # an edited file is another set: read again, never the stale one
    _write(tmp_path / "offline.jsonl", ROWS[:2] + [{"pair_id": "e", "prompt": "q", "chosen": "new", "rejected": "old"}])
    edited = offline_table(src, run)
    assert edited["pair_id"].to_pylist() == ["a", "b", "e"] and edited["chosen"].to_pylist()[2] == "new"
    # another on_bad_row is another read: the skipping one kept is not served to error
    same = _write(tmp_path / "same.jsonl", ROWS)
    assert offline_table(same, run).num_rows == 3
    with pytest.raises(ValueError, match="identical"):
        offline_table(same.model_copy(update={"on_bad_row": "error"}), run)


def test_a_damaged_kept_file_is_written_again(tmp_path):
    src, run = _write(tmp_path / "offline.jsonl", ROWS), tmp_path / "run"
    expected = offline_table(src, run)
    kept = next(offline_cache.folder(run).glob("*.parquet"))
    kept.write_bytes(kept.read_bytes()[:40])  # a torn file (a disk filled up, a copy cut short)
    assert offline_table(src, run).equals(expected)
    assert pq.read_table(kept).num_rows == 3


def test_ids_are_the_texts_tokenised_as_the_stages_tokenise_them(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(offline_cache, "TOKENIZE_BATCH_PAIRS", 2)  # several batches, several parts of the file
    src, run = _write(tmp_path / "offline.jsonl", ROWS), tmp_path / "run"
    path, tokenised = offline_ids(src, run, tok, _encoder(tok))
    assert tokenised and pq.ParquetFile(path).num_row_groups == 2
    ids, table = pq.read_table(path), offline_table(src, run)
    for i, prompt in enumerate(prompts_of(table)):
        p, c = encode(tok, prompt, table["chosen"][i].as_py())
        assert (ids["prompt_token_ids"][i].as_py(), ids["chosen_token_ids"][i].as_py()) == (p, c)
        assert ids["rejected_token_ids"][i].as_py() == encode(tok, prompt, table["rejected"][i].as_py())[1]
    assert offline_ids(src, run, tok, _encoder(tok)) == (path, False)  # once per run
    tok.chat_template = tok.chat_template.replace("<|", "<| ")  # another template: other prompt ids, another file
    other, tokenised = offline_ids(src, run, tok, _encoder(tok))
    assert tokenised and other != path


def _pairs(table, ids=None):
    """A PAIRS-like table of the offline rows, ids null unless given."""
    n = table.num_rows
    cols = {c: table[c] for c in ("prompt", "prompt_messages", "chosen", "rejected")}
    return pa.table({**cols, **{c: (ids[c] if ids else pa.nulls(n, schemas.TOKEN_IDS)) for c in ID_COLUMNS}})


def test_pairs_find_their_ids_by_content(tmp_path, tok):
    src, run = _write(tmp_path / "offline.jsonl", ROWS), tmp_path / "run"
    path, _ = offline_ids(src, run, tok, _encoder(tok))
    table, ids = offline_table(src, run), pq.read_table(path)
    generated = [[5, 6], [7, 8, 9], [10]]  # a pair that came with its ids keeps them
    pairs = pa.concat_tables([
        _pairs(table.take([2, 0])),  # two offline pairs, in another order
        _pairs(table.take([1])).set_column(2, "chosen", pa.array(["an edited answer"])),  # content not in the set
        _pairs(table.take([1]), {c: pa.array([v], schemas.TOKEN_IDS) for c, v in zip(ID_COLUMNS, generated)}),
    ])  # fmt: skip
    kept = find_ids(pairs, path)
    filled, n = kept.fill(pairs, np.arange(pairs.num_rows)), kept.found
    assert n == 2
    got = {c: filled[c].to_pylist() for c in ID_COLUMNS}
    for c in ID_COLUMNS:
        assert got[c][:2] == [ids[c][2].as_py(), ids[c][0].as_py()] and got[c][2] is None
    assert [got[c][3] for c in ID_COLUMNS] == generated
    assert find_ids(pairs, None) is None
