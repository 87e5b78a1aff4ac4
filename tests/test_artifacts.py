"""pipeline/data/artifacts.py: atomic Parquet I/O, fingerprints, manifest-last stage execution, the run lock."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.data.artifacts as artifacts
from pipeline.data.artifacts import (
    ArtifactError,
    RunLocked,
    StagePlan,
    execute,
    fingerprint,
    iter_parquet,
    read_parquet,
    run_lock,
    take_rows,
    write_parquet,
)

ROOT = Path(__file__).resolve().parents[1]

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("n", pa.int32(), nullable=False),
        pa.field("score", pa.float64()),
    ]
)


def good_table(n=3):
    ids = [f"x{i}" for i in range(n)]
    return pa.table({"score": [0.5] * n, "n": list(range(n)), "id": ids, "extra": ["e"] * n})


# ---------------------------------------------------------------------------------------------- write_parquet


def test_write_parquet_casts_to_the_schema(tmp_path):
    path = tmp_path / "sub" / "t.parquet"  # the folder is created
    rows = write_parquet(good_table(), path, SCHEMA)  # int64 -> int32, columns reordered, `extra` dropped
    assert rows == 3
    on_disk = pq.read_schema(path)
    assert on_disk.names == SCHEMA.names
    assert [f.type for f in on_disk] == [pa.string(), pa.int32(), pa.float64()]
    assert pq.read_table(path).column("n").to_pylist() == [0, 1, 2]


def test_write_parquet_leaves_no_temp_file(tmp_path):
    path = tmp_path / "t.parquet"
    write_parquet(good_table(), path, SCHEMA)
    write_parquet(good_table(5), path, SCHEMA)  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]
    assert pq.read_metadata(path).num_rows == 5


@pytest.mark.parametrize(
    "bad, error",
    [
        (pa.table({"id": ["a"], "score": [1.0]}), KeyError),  # missing schema column `n`
        (pa.table({"id": ["a"], "n": ["not a number"], "score": [1.0]}), pa.ArrowInvalid),  # uncastable value
        (pa.table({"id": [None], "n": [1], "score": [1.0]}), ValueError),  # null in a non-nullable column
    ],
)
def test_failed_write_leaves_the_previous_file_intact(tmp_path, bad, error):
    path = tmp_path / "t.parquet"
    write_parquet(good_table(), path, SCHEMA)
    before = path.read_bytes()
    with pytest.raises(error):
        write_parquet(bad, path, SCHEMA)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


def test_crash_during_the_write_leaves_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    """A failure after the temp file was started (disk full): the old file stays, the half-written temp goes."""
    path = tmp_path / "t.parquet"
    write_parquet(good_table(), path, SCHEMA)
    before = path.read_bytes()

    def half_write(self, table, **kwargs):  # the writer has opened the temp file and written its header
        raise OSError("No space left on device")

    monkeypatch.setattr(artifacts.pq.ParquetWriter, "write_table", half_write)
    with pytest.raises(OSError, match="No space"):
        write_parquet(good_table(9), path, SCHEMA)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


# ---------------------------------------------------------------------------------------------- read_parquet


def test_read_parquet_round_trip(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(good_table(), path)  # written by someone else: int64, extra column, other order
    t = read_parquet(path, SCHEMA)
    assert t.schema == SCHEMA
    assert t.column("id").to_pylist() == ["x0", "x1", "x2"]


def test_read_parquet_missing_file(tmp_path):
    path = tmp_path / "labels.parquet"
    with pytest.raises(ArtifactError) as e:
        read_parquet(path, SCHEMA)
    assert str(path) in str(e.value) and "not found" in str(e.value)


def test_read_parquet_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": ["a"], "score": [1.0]}), path)
    with pytest.raises(ArtifactError) as e:
        read_parquet(path, SCHEMA)
    assert str(path) in str(e.value) and "missing column(s) n" in str(e.value)


def test_read_parquet_several_missing_columns(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": ["a"]}), path)
    with pytest.raises(ArtifactError) as e:
        read_parquet(path, SCHEMA)
    assert "n, score" in str(e.value)


def test_read_parquet_not_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ArtifactError) as e:
        read_parquet(path, SCHEMA)
    assert str(path) in str(e.value)


def test_read_parquet_wrong_type(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": ["a"], "n": ["seven"], "score": [1.0]}), path)
    with pytest.raises(ArtifactError) as e:
        read_parquet(path, SCHEMA)
    assert str(path) in str(e.value) and "type" in str(e.value)


def test_row_groups_are_read_one_at_a_time_and_rows_taken_across_them(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "ROW_GROUP_ROWS", 4)
    path = tmp_path / "t.parquet"
    write_parquet(good_table(10), path, SCHEMA)
    assert pq.ParquetFile(path).num_row_groups == 3  # 4 + 4 + 2 rows
    groups = list(iter_parquet(path, SCHEMA, ["id", "n"]))
    assert [g.num_rows for g in groups] == [4, 4, 2] and groups[0].schema == pa.schema([SCHEMA.field("id"), SCHEMA.field("n")])
    assert sum((g["n"].to_pylist() for g in groups), []) == list(range(10))
    rows = [9, 0, 5, 5, 3, 8]  # any order, across groups, a repeat
    t = take_rows(path, SCHEMA, ["id", "score"], rows)
    assert t["id"].to_pylist() == [f"x{i}" for i in rows] and t.schema.names == ["id", "score"]
    assert take_rows(path, SCHEMA, ["id"], []).num_rows == 0


def test_groups_read_ahead_come_in_order_and_stop_cleanly(tmp_path, monkeypatch):
    """Row groups are read READ_AHEAD at a time on threads: more groups than threads still come in file order, sorted
    and unsorted takes agree, and a reader that stops early leaves no thread behind."""
    import threading

    monkeypatch.setattr(artifacts, "ROW_GROUP_ROWS", 3)
    path = tmp_path / "t.parquet"
    write_parquet(good_table(40), path, SCHEMA)  # 14 groups
    assert pq.ParquetFile(path).num_row_groups == 14 > artifacts.READ_AHEAD
    assert read_parquet(path, SCHEMA)["n"].to_pylist() == list(range(40))
    rows = [39, 1, 2, 17, 17, 0, 25]
    assert take_rows(path, SCHEMA, ["n"], rows)["n"].to_pylist() == rows
    assert take_rows(path, SCHEMA, ["n"], sorted(rows))["n"].to_pylist() == sorted(rows)
    first = next(iter_parquet(path, SCHEMA, ["n"]))
    assert first["n"].to_pylist() == [0, 1, 2]
    import gc

    gc.collect()  # the abandoned reader is closed: its pool shut down
    assert not [t for t in threading.enumerate() if t.name.startswith("dice-parquet")]


def test_a_damaged_row_group_names_the_file_and_group(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "ROW_GROUP_ROWS", 4)
    path = tmp_path / "t.parquet"
    write_parquet(pa.table({"id": [f"row {i} " * 50 for i in range(40)], "n": list(range(40)), "score": [0.5] * 40}), path, SCHEMA)
    meta = pq.ParquetFile(path).metadata.row_group(6).column(0)
    data = bytearray(path.read_bytes())
    start = meta.data_page_offset
    data[start : start + meta.total_compressed_size] = b"\x00" * meta.total_compressed_size  # one group's texts zeroed
    path.write_bytes(bytes(data))
    for read in (lambda: read_parquet(path, SCHEMA), lambda: take_rows(path, SCHEMA, ["id"], [1, 27])):
        with pytest.raises(ArtifactError, match="row group 6") as e:
            read()
        assert str(path) in str(e.value)


def test_iter_parquet_and_take_rows_name_the_file_of_a_missing_column(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": ["a"], "score": [1.0]}), path)
    for read in (lambda: list(iter_parquet(path, SCHEMA)), lambda: take_rows(path, SCHEMA, ["id", "n"], [0])):
        with pytest.raises(ArtifactError) as e:
            read()
        assert str(path) in str(e.value) and "missing column(s) n" in str(e.value)


# ---------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_of_a_file_follows_its_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    first = fingerprint(f)
    assert fingerprint(f) == first  # stable
    f.write_text("hello")  # rewritten with the same bytes (new mtime)
    assert fingerprint(f) == first
    f.write_text("hellO")  # same size, one byte different
    assert fingerprint(f) != first
    f.write_text("hello")
    assert fingerprint(f) == first  # back to the original content
    assert fingerprint(str(f)) == first  # str or Path


def test_fingerprint_of_a_folder(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "weights.bin").write_bytes(b"\x00\x01\x02")
    first = fingerprint(d)
    assert fingerprint(d) == first

    (d / ".hidden").write_text("ignored")  # hidden files are not content
    (d / ".weights.bin.1234abcd.tmp").write_text("ignored")  # nor temp files
    (d / ".dice").mkdir()
    (d / ".dice" / "train.json").write_text("ignored")  # nor hidden folders
    assert fingerprint(d) == first

    (d / "sub" / "weights.bin").write_bytes(b"\x00\x01\x03")  # a nested file changes
    changed = fingerprint(d)
    assert changed != first
    (d / "sub" / "weights.bin").write_bytes(b"\x00\x01\x02")
    assert fingerprint(d) == first

    (d / "sub" / "weights.bin").rename(d / "sub" / "weights2.bin")  # a rename changes it (names are hashed)
    assert fingerprint(d) != first
    (d / "sub" / "weights2.bin").rename(d / "sub" / "weights.bin")

    (d / "tokenizer.json").write_text("{}")  # a new file changes it
    assert fingerprint(d) != first


def test_fingerprint_of_a_name_that_is_not_on_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = fingerprint("princeton-nlp/Llama-3-Base-8B-SFT")
    assert a == fingerprint("princeton-nlp/Llama-3-Base-8B-SFT")
    assert a != fingerprint("princeton-nlp/Llama-3-Base-8B-SFT-DPO")
    # once a folder of that name exists, its content decides
    Path("princeton-nlp/Llama-3-Base-8B-SFT").mkdir(parents=True)
    Path("princeton-nlp/Llama-3-Base-8B-SFT/config.json").write_text("{}")
    assert fingerprint("princeton-nlp/Llama-3-Base-8B-SFT") != a


def test_fingerprint_of_large_files_uses_head_and_tail(tmp_path, monkeypatch):
    """Files above the full-hash limit are hashed by size + head + tail (limits shrunk so the test stays small)."""
    monkeypatch.setattr(artifacts, "_FULL_HASH_LIMIT", 64)
    monkeypatch.setattr(artifacts, "_CHUNK", 16)
    f = tmp_path / "big.bin"
    data = bytearray(range(200))
    f.write_bytes(bytes(data))
    first = fingerprint(f)
    for pos in (0, 199):  # head and tail changes are seen
        changed = bytearray(data)
        changed[pos] ^= 0xFF
        f.write_bytes(bytes(changed))
        assert fingerprint(f) != first
    f.write_bytes(bytes(data) + b"!")  # a size change is seen
    assert fingerprint(f) != first
    f.write_bytes(bytes(data))
    assert fingerprint(f) == first


# ---------------------------------------------------------------------------------------------- execute


class Stage:
    """A stage function that records its calls and writes the plan's output."""

    def __init__(self, plan, fail=False):
        self.plan, self.fail, self.calls, self.manifest_seen = plan, fail, 0, []

    def __call__(self):
        self.calls += 1
        self.manifest_seen.append(self.plan.manifest_path.exists())
        if self.fail:
            raise RuntimeError("stage crashed")
        src = Path(self.plan.inputs["src"]).read_text()
        table = pa.table({"id": [src], "n": [len(src)], "score": [1.0]})
        write_parquet(table, self.plan.outputs["out"], SCHEMA)
        return {"rows": 1, "alpha": 0.002}


def make_plan(tmp_path, config=None, inputs=None):
    src = tmp_path / "src.txt"
    if not src.exists():
        src.write_text("input v1")
    return StagePlan(
        stage="pairs",
        round=1,
        round_dir=tmp_path / "round-1",
        inputs=inputs or {"src": src},
        outputs={"out": tmp_path / "round-1" / "out.parquet"},
        config=config if config is not None else {"min_valid": 2, "alpha_step": 0.001},
    )


def test_execute_runs_once_and_writes_a_manifest(tmp_path):
    plan = make_plan(tmp_path)
    fn = Stage(plan)
    m = execute(plan, fn)
    assert fn.calls == 1 and m["skipped"] is False
    assert fn.manifest_seen == [False]  # the manifest does not exist while the stage runs
    on_disk = json.loads(plan.manifest_path.read_text())
    assert plan.manifest_path == tmp_path / "round-1" / ".dice" / "pairs.json"
    assert on_disk["stats"] == {"rows": 1, "alpha": 0.002}
    assert on_disk["outputs"]["out"]["rows"] == 1
    assert on_disk["outputs"]["out"]["fingerprint"] == fingerprint(plan.outputs["out"])
    assert on_disk["inputs"]["src"]["fingerprint"] == fingerprint(tmp_path / "src.txt")
    assert on_disk["config"] == plan.config
    assert "skipped" not in on_disk


def test_execute_skips_a_done_stage(tmp_path):
    plan = make_plan(tmp_path)
    fn = Stage(plan)
    first = execute(plan, fn)
    again = execute(make_plan(tmp_path), fn)  # a fresh but identical plan
    assert fn.calls == 1
    assert again["skipped"] is True
    assert again["stats"] == first["stats"]


def test_execute_reruns_when_the_config_changes(tmp_path):
    fn = Stage(make_plan(tmp_path))
    execute(make_plan(tmp_path), fn)
    m = execute(make_plan(tmp_path, config={"min_valid": 3, "alpha_step": 0.001}), fn)
    assert fn.calls == 2 and m["skipped"] is False
    assert execute(make_plan(tmp_path, config={"min_valid": 3, "alpha_step": 0.001}), fn)["skipped"] is True
    # key order does not matter: the digest sorts keys
    assert execute(make_plan(tmp_path, config={"alpha_step": 0.001, "min_valid": 3}), fn)["skipped"] is True
    assert fn.calls == 2


def test_execute_reruns_when_an_input_changes(tmp_path):
    plan = make_plan(tmp_path)
    fn = Stage(plan)
    execute(plan, fn)
    (tmp_path / "src.txt").write_text("input v2")
    m = execute(plan, fn)
    assert fn.calls == 2 and m["skipped"] is False
    assert pq.read_table(plan.outputs["out"]).column("id").to_pylist() == ["input v2"]


def test_execute_reruns_when_an_input_moves(tmp_path):
    plan = make_plan(tmp_path)
    fn = Stage(plan)
    execute(plan, fn)
    other = tmp_path / "elsewhere.txt"
    other.write_text("input v1")  # same content, another path
    execute(make_plan(tmp_path, inputs={"src": other}), fn)
    assert fn.calls == 2


def test_execute_reruns_when_an_output_is_deleted_or_changed(tmp_path):
    plan = make_plan(tmp_path)
    fn = Stage(plan)
    execute(plan, fn)
    plan.outputs["out"].unlink()
    assert execute(plan, fn)["skipped"] is False and fn.calls == 2
    write_parquet(pa.table({"id": ["tampered"], "n": [0], "score": [0.0]}), plan.outputs["out"], SCHEMA)
    assert execute(plan, fn)["skipped"] is False and fn.calls == 3
    assert execute(plan, fn)["skipped"] is True and fn.calls == 3


def _run_plan(run_dir: Path, outside: Path) -> StagePlan:
    """Round 1 of the run in `run_dir`, reading round 0's checkpoint (inside the run) and a data file (outside)."""
    return StagePlan(
        stage="reference", round=1, round_dir=run_dir / "round-1",
        inputs={"model": str(run_dir / "round-0" / "checkpoint"), "src": outside},
        outputs={"out": run_dir / "round-1" / "out.parquet"}, config={"batch_size": 4},
    )  # fmt: skip


def test_a_moved_or_copied_run_folder_matches_its_manifests(tmp_path):
    """Inputs inside the run folder (an earlier round's checkpoint or table) are recorded relative to the run, so a
    copy of the run elsewhere is done stage by stage; an input outside the run is still compared by its path."""
    import shutil

    run = tmp_path / "runs" / "first"
    (run / "round-0" / "checkpoint").mkdir(parents=True)
    (run / "round-0" / "checkpoint" / "model.safetensors").write_bytes(b"weights")
    outside = tmp_path / "data.txt"
    outside.write_text("input v1")
    fn = Stage(_run_plan(run, outside))
    m = execute(_run_plan(run, outside), fn)
    assert m["inputs"]["model"]["in_run"] == "round-0/checkpoint" and "in_run" not in m["inputs"]["src"]
    copy = tmp_path / "elsewhere" / "second"
    shutil.copytree(run, copy)
    assert execute(_run_plan(copy, outside), fn)["skipped"] is True and fn.calls == 1
    moved = tmp_path / "moved"
    run.rename(moved)
    assert execute(_run_plan(moved, outside), fn)["skipped"] is True and fn.calls == 1
    (copy / "round-0" / "checkpoint" / "model.safetensors").write_bytes(b"other weights")  # a different π_0 here
    assert execute(_run_plan(copy, outside), fn)["skipped"] is False and fn.calls == 2


def test_a_manifest_without_run_relative_paths_still_matches_in_place(tmp_path):
    """Manifests written before inputs were recorded relative to the run compare by path: a run resumed in place
    redoes nothing."""
    run = tmp_path / "run"
    (run / "round-0" / "checkpoint").mkdir(parents=True)
    (run / "round-0" / "checkpoint" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "data.txt").write_text("x")
    plan = _run_plan(run, tmp_path / "data.txt")
    fn = Stage(plan)
    execute(plan, fn)
    old = json.loads(plan.manifest_path.read_text())
    for record in old["inputs"].values():
        record.pop("in_run", None)
    plan.manifest_path.write_text(json.dumps(old))
    assert execute(plan, fn)["skipped"] is True and fn.calls == 1


def test_execute_force(tmp_path):
    plan = make_plan(tmp_path)
    fn = Stage(plan)
    execute(plan, fn)
    assert execute(plan, fn, force=True)["skipped"] is False
    assert fn.calls == 2
    assert fn.manifest_seen == [False, False]  # the old manifest was removed before the re-run


def test_a_hub_input_is_fingerprinted_by_its_commit(tmp_path, monkeypatch, offline_hub, tiny_model):
    """A Hub model id is resolved to its snapshot; its commit is the fingerprint and is recorded in the manifest, so
    a branch that moved (refs/main -> another commit) is another input and the stage runs again."""
    from tests.conftest import hub_repo

    monkeypatch.chdir(tmp_path)
    src = tmp_path / "src.txt"
    src.write_text("x")
    first = hub_repo(offline_hub, "org/tiny", tiny_model, commit="1" * 40)
    plan = make_plan(tmp_path, inputs={"src": src, "model": "org/tiny"})
    fn = Stage(plan)
    m = execute(plan, fn)
    assert m["inputs"]["model"] == {"path": "org/tiny", "fingerprint": f"hub:{first}", "revision": first}
    assert execute(plan, fn)["skipped"] is True
    moved = hub_repo(offline_hub, "org/tiny", tiny_model, commit="2" * 40)  # main now points elsewhere
    import pipeline.data.models

    pipeline.data.models._resolved.clear()  # a new process would resolve again
    m = execute(plan, fn)
    assert m["skipped"] is False and m["inputs"]["model"]["revision"] == moved and fn.calls == 2
    pinned = make_plan(tmp_path, inputs={"src": src, "model": f"org/tiny@{first}"})  # model.revision pins it
    assert execute(pinned, fn)["inputs"]["model"]["revision"] == first


def test_failing_stage_writes_no_manifest(tmp_path):
    plan = make_plan(tmp_path)
    with pytest.raises(RuntimeError, match="stage crashed"):
        execute(plan, Stage(plan, fail=True))
    assert not plan.manifest_path.exists()


def test_failing_rerun_removes_the_stale_manifest(tmp_path):
    plan = make_plan(tmp_path)
    execute(plan, Stage(plan))
    assert plan.manifest_path.exists()
    changed = make_plan(tmp_path, config={"min_valid": 4})
    crashing = Stage(changed, fail=True)
    with pytest.raises(RuntimeError):
        execute(changed, crashing)
    assert crashing.manifest_seen == [False]  # removed before the stage started
    assert not plan.manifest_path.exists()  # and not written after the crash
    # even the original plan must run again: its manifest is gone
    fn = Stage(plan)
    assert execute(plan, fn)["skipped"] is False and fn.calls == 1
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "round-1" / ".dice").iterdir())


# ---------------------------------------------------------------------------------------------- run_lock

TRY_LOCK = """
import sys
from pipeline.data.artifacts import run_lock, RunLocked
try:
    with run_lock(sys.argv[1]):
        print("ACQUIRED")
except RunLocked as e:
    print("LOCKED:", e)
"""


def try_lock_elsewhere(run_dir):
    """Take the lock from another process (flock conflicts between processes for certain)."""
    r = subprocess.run(
        [sys.executable, "-c", TRY_LOCK, str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_run_lock_excludes_another_process(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    with run_lock(run_dir):
        out = try_lock_elsewhere(run_dir)
        assert out.startswith("LOCKED:")
        assert str(run_dir) in out  # names the folder
        assert f"pid {os.getpid()}" in out  # and the holder
    assert try_lock_elsewhere(run_dir) == "ACQUIRED"  # released after the with block


def test_run_lock_excludes_a_second_lock_in_the_same_process(tmp_path):
    """flock locks belong to the open file description: two os.open calls conflict even in one process."""
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        with pytest.raises(RunLocked) as e:
            with run_lock(run_dir):
                pass
        assert str(run_dir) in str(e.value)
        # the failed attempt closed its own descriptor; that must not release the held lock (it would with fcntl locks)
        assert try_lock_elsewhere(run_dir).startswith("LOCKED:")
    with run_lock(run_dir):  # free again
        pass


def test_run_lock_on_different_folders_is_independent(tmp_path):
    with run_lock(tmp_path / "a"):
        with run_lock(tmp_path / "b"):
            pass


def test_run_lock_is_released_when_the_body_raises(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with run_lock(tmp_path / "run"):
            1 / 0
    assert try_lock_elsewhere(tmp_path / "run") == "ACQUIRED"
