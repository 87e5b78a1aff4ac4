"""Bad days: each fault ends in one line and a prompt exit, and what finished survives it (docs/reliability.md).

- the Prefect API that PREFECT_API_URL names is not there (at the start, and gone mid-run);
- an OS error in a stage (a full disk: ENOSPC injected where the kernel reports it on a real one, at fsync);
- a run folder copied elsewhere is resumed without redoing anything; the launcher's files go once a stage is done;
- data: a bad row found before round 0, not at round 1; skipped rows counted in the manifest; dropped prompts said.

One small real run (`dice run`: round 0's pairs, reference on 2 DeepSpeed ranks, train) serves the run-folder tests.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import save_config
from pipeline.run import rounds
from tests.conftest import BIN, REPO, free_port, tiny_config

DICE = str(BIN / "dice")


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": str(REPO), **extra}  # fmt: skip
    if "PREFECT_API_URL" not in extra:
        env.pop("PREFECT_API_URL", None)
    return env


def _conf(tmp: Path, cfg) -> Path:
    path = tmp / f"{cfg.name}.yaml"
    save_config(cfg, path)
    return path


def _manifests(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): p.read_text() for p in sorted(run_dir.glob("round-*/.dice/*.json"))}


def _ours(stderr: str) -> list[str]:
    """dice's own lines of a stderr (not Prefect's time-stamped log lines)."""
    import re

    return [line for line in stderr.splitlines() if line.strip() and not re.match(r"\d\d:\d\d:\d\d", line)]


# ---------------------------------------------------------------------------------------------- the Prefect API


def test_a_prefect_api_that_is_not_there_ends_dice_run_at_once(tmp_path, tiny_model):
    """PREFECT_API_URL names a closed port: `dice run` exits 4 within seconds with one line naming PREFECT_API_URL and
    how to start a server, before anything is written (Prefect alone retried for minutes, then hung at exit)."""
    cfg = tiny_config(tmp_path / "runs", tiny_model, name="noapi")
    url = f"http://127.0.0.1:{free_port()}/api"
    out = subprocess.run([DICE, "run", str(_conf(tmp_path, cfg))], cwd=REPO, env=_env(tmp_path, PREFECT_API_URL=url),
                         capture_output=True, text=True, timeout=60)  # fmt: skip  (a process still alive fails here)
    assert out.returncode == 4, out.stdout + out.stderr
    lines = _ours(out.stderr)
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"the Prefect API at {url} (PREFECT_API_URL) does not answer" in lines[0]
    assert "prefect server start" in lines[0]
    assert not cfg.run_dir.exists()


def test_a_prefect_server_lost_mid_run_ends_it_promptly(tmp_path, tiny_model):
    """The server goes away while a stage runs and does not come back: `dice run` stops the stage, says so in one
    line naming PREFECT_API_URL, and exits 4 within the grace period (DICE_PREFECT_GRACE_S, 20 s by default; 5 here)
    plus a check; the finished stages stay finished."""
    from tests.conftest import _healthy, stop, wait_for

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = _env(tmp_path, PREFECT_API_URL=url, DICE_PREFECT_GRACE_S="5", PREFECT_RUNNER_POLL_FREQUENCY="2")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: _healthy(url), 120, "the Prefect server")
        cfg = tiny_config(tmp_path / "runs", tiny_model, name="lost", rounds=0, **{"round0.max_pairs": 16})
        run = subprocess.Popen([DICE, "run", str(_conf(tmp_path, cfg))], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        pairs = rounds.round_dir(cfg, 0) / ".dice" / "pairs.json"
        wait_for(lambda: pairs.is_file() or run.poll() is not None, 180, "round 0's pairs stage", every=0.5)
        assert run.poll() is None, run.communicate()
        stop(server)
        lost = time.monotonic()
        try:
            _, err = run.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            raise AssertionError("dice run still alive 60 s after its Prefect server went away") from None
        assert time.monotonic() - lost < 60
    finally:
        stop(server)
    assert run.returncode == 4, err
    last = err.strip().splitlines()[-2:]  # dice's line is the last word, after whatever Prefect logged before it
    assert last[0].startswith(f"error: the Prefect API at {url} (PREFECT_API_URL) does not answer"), err[-3000:]
    assert last[1].startswith("Finished stages are kept")
    assert pairs.is_file()  # the stage finished before the loss is kept


def test_giving_up_starts_a_line_of_its_own():
    """Prefect's "--- Error logging to API ---" note ends without a new line (seen in CI: "All connection attempts
    failederror: ..."); dice's last word after such a note still starts its own line."""
    code = ("import sys; sys.stderr.write('--- Error logging to API ---\\nAll connection attempts failed'); "
            "from flows.dice import give_up; give_up('the Prefect API at X does not answer', 4)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 4, done.stderr
    lines = done.stderr.splitlines()
    assert lines[-3:] == ["All connection attempts failed", "error: the Prefect API at X does not answer",
                          "Finished stages are kept; run the same command again once the server answers, to resume."]


# ---------------------------------------------------------------------------------------------- OS errors


INJECT = """
import errno, os, runpy, sys
def full_disk(fd):  # where a full disk shows on a real filesystem: data is flushed at fsync
    raise OSError(errno.{name}, os.strerror(errno.{name}))
os.fsync = full_disk
sys.argv = ["stages.{stage}", *sys.argv[1:]]
runpy.run_module("stages.{stage}", run_name="__main__")
"""


def _stage(stage: str, conf: Path, k: int, tmp: Path, inject: str | None = None) -> subprocess.CompletedProcess:
    code = ["-m", f"stages.{stage}"] if inject is None else ["-c", INJECT.format(name=inject, stage=stage)]
    return subprocess.run([sys.executable, *code, str(conf), "--round", str(k)], cwd=REPO, env=_env(tmp),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_a_full_disk_in_a_stage_is_one_line_and_touches_nothing_earlier(tmp_path, tiny_model):
    """ENOSPC while the reference stage writes: one line naming the file and the errno, exit 2, no traceback; the
    pairs stage's table and manifest are untouched, no temporary is left and no manifest claims the stage done. The
    first file it writes is the run's kept token ids of its offline set (round 0's pairs are all offline): none is
    left half-written to be read later."""
    cfg = tiny_config(tmp_path / "runs", tiny_model, name="full", **{"round0.max_pairs": 16})
    conf = _conf(tmp_path, cfg)
    assert _stage("pairs", conf, 0, tmp_path).returncode == 0
    rd = rounds.round_dir(cfg, 0)
    before = {p: p.read_bytes() for p in rd.rglob("*") if p.is_file()}
    out = _stage("reference", conf, 0, tmp_path, inject="ENOSPC")
    assert out.returncode == 2
    lines = _ours(out.stderr)
    kept = cfg.run_dir / ".dice" / "offline"
    assert lines[0].startswith(f"dice reference: error: {kept}/") and "-ids-" in lines[0], lines
    assert lines[0].endswith(": ENOSPC (errno 28): No space left on device"), lines
    assert lines[1:] == ["(set DICE_DEBUG=1 for the full traceback)"] and "Traceback" not in out.stderr
    assert {p: p.read_bytes() for p in before} == before  # pairs.parquet, its manifest: as they were
    assert not (rd / "reference.parquet").exists() and not (rd / ".dice" / "reference.json").exists()
    assert not [p for p in cfg.run_dir.rglob("*.tmp")] and not list(kept.glob("*-ids-*"))


@pytest.mark.parametrize("name, errnum", [("EACCES", errno.EACCES), ("EROFS", errno.EROFS), ("ENOSPC", errno.ENOSPC)])
def test_an_os_error_is_told_by_path_and_errno(name, errnum, tmp_path):
    """The one line of any OS error: the path, the errno's name and its text, also for pyarrow's errors that carry
    the errno only in their text (a real one here: pyarrow writing to /dev/full, a device that is always full)."""
    from pipeline.data.artifacts import with_path
    from stages.common import error_line

    e = OSError(errnum, os.strerror(errnum), str(tmp_path / "round-1" / "labels.parquet"))
    assert error_line(e) == f"{tmp_path / 'round-1' / 'labels.parquet'}: {name} (errno {errnum}): {os.strerror(errnum)}"
    if name == "ENOSPC" and Path("/dev/full").exists():
        import pyarrow as pa

        with pytest.raises(OSError) as raised:
            pq.write_table(pa.table({"x": list(range(100000))}), "/dev/full")
        assert raised.value.filename is None
        named = with_path(raised.value, tmp_path / "t.parquet")
        assert error_line(named) == f"{tmp_path / 't.parquet'}: ENOSPC (errno 28): No space left on device"


# ---------------------------------------------------------------------------------------------- run folders


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    """Round 0 run to the end by `dice run`, its reference scored on 2 DeepSpeed ranks (the launcher's files)."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = tiny_config(tmp / "runs", tiny_model, name="done", rounds=0,
                      **{"round0.max_pairs": 16, "reference.num_processes": 2})  # fmt: skip
    conf = _conf(tmp, cfg)
    out = subprocess.run([DICE, "run", str(conf)], cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return {"cfg": cfg, "tmp": tmp}


def test_launcher_files_are_removed_after_success(finished_run):
    cfg = finished_run["cfg"]
    d = rounds.round_dir(cfg, 0) / ".dice"
    assert json.loads((d / "reference.json").read_text())["stats"]["processes"] == 2  # it ran under the launcher
    left = [p.name for p in d.iterdir() if p.name.endswith((".config.yaml", ".job.json", ".stats.json", ".error"))]
    assert left == []
    assert sorted(p.name for p in d.iterdir() if p.is_file()) == ["pairs.json", "reference.json", "train.json"]


def test_a_copied_run_folder_skips_every_stage(finished_run):
    """The run folder copied under another name (runs_dir/other) and run there: every stage is already done, nothing
    is recomputed, the copy's manifests are the original's."""
    cfg, tmp = finished_run["cfg"], finished_run["tmp"]
    copy = cfg.model_copy(update={"name": "copied", "runs_dir": str(tmp / "elsewhere")})
    shutil.copytree(cfg.run_dir, copy.run_dir)
    before = _manifests(copy.run_dir)
    out = subprocess.run([DICE, "run", str(_conf(tmp, copy))], cwd=tmp, env=_env(tmp), capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (out.stdout + out.stderr).count("already done, skipped") == len(rounds.stages_of_round(copy, 0)) == 3
    assert _manifests(copy.run_dir) == before == _manifests(cfg.run_dir)


# ---------------------------------------------------------------------------------------------- data


def test_a_bad_prompt_stops_dice_run_before_round_0(tmp_path, tiny_model):
    """A malformed prompts file, read only from round 1 on: `dice run` checks every dataset first and stops before
    round 0 trains, naming the file, line and field of the first problems; nothing ran."""
    prompts = tmp_path / "prompts.jsonl"
    lines = (REPO / "data/prompts.jsonl").read_text().splitlines()[:20]
    prompts.write_text("\n".join(lines[:5] + ['{"prompt": ""}'] + lines[5:9] + ['{"prompt": "unterminated'] + lines[9:]) + "\n")
    cfg = tiny_config(tmp_path / "runs", tiny_model, name="badprompts", **{"data.prompts": str(prompts)})
    out = subprocess.run([DICE, "run", str(_conf(tmp_path, cfg))], cwd=REPO, env=_env(tmp_path), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    tail = out.stderr[out.stderr.rindex("error: "):]
    assert (f"data.prompts: 2 rows (1 bad_prompt, 1 invalid_json) dice cannot use: {prompts}: line 6: field 'prompt' "
            f"must be a non-empty string or a conversation; {prompts}: line 11: not valid JSON") in " ".join(tail.split())
    assert len(_ours(out.stderr)) == 1 and "Traceback" not in out.stderr
    assert not cfg.run_dir.exists()  # checked before anything ran (and before Prefect started)


def test_skipped_rows_are_counted_in_the_manifest(tmp_path, tiny_model, capfd):
    """data.on_bad_row: skip: the pairs stage leaves the bad offline rows out, says so once in its log, and its
    manifest counts them by reason and dataset."""
    from stages import pairs
    from stages.common import main

    offline = tmp_path / "offline.jsonl"
    good = (REPO / "data/offline_prefs.jsonl").read_text().splitlines()[:30]
    offline.write_text("\n".join(good + ['{"prompt": "p", "chosen": "same", "rejected": "same"}', "not json",
                                         '{"prompt": "q", "chosen": "", "rejected": "r"}']) + "\n")  # fmt: skip
    cfg = tiny_config(tmp_path / "runs", tiny_model, name="skip", **{"data.offline": str(offline), "data.on_bad_row": "skip"})
    main("pairs", pairs.run, [str(_conf(tmp_path, cfg)), "--round", "0"])
    stats = json.loads((rounds.round_dir(cfg, 0) / ".dice" / "pairs.json").read_text())["stats"]
    assert stats["rows_skipped"] == {str(offline): {"identical": 1, "invalid_json": 1, "bad_chosen": 1}}
    assert pq.read_metadata(rounds.round_dir(cfg, 0) / "pairs.parquet").num_rows == 30
    err = capfd.readouterr().err
    assert err.count(f"warning: {offline}: skipped 3 rows (1 bad_chosen, 1 identical, 1 invalid_json)") == 1


def test_dropped_prompts_are_said_with_their_count_and_the_limit(tmp_path, tiny_model, llm, capfd):
    """Prompts over model.max_prompt_tokens are dropped by generate: its log says how many, and the limit."""
    from transformers import AutoTokenizer

    from pipeline.compute.logprobs import prompt_ids
    from pipeline.data.datasets import read_prompts
    from stages import generate
    from stages.common import main

    cfg = tiny_config(tmp_path / "runs", tiny_model, name="drop", **{"round0.mode": "skip", "model.max_prompt_tokens": 24,
                                                                      "data.prompts_per_round": 8, "generate.max_tokens": 8})  # fmt: skip
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = generate.select_prompts(read_prompts(cfg.data.prompts), 1, 8).column("prompt").to_pylist()
    n = sum(len(prompt_ids(tok, p)) > 24 for p in prompts)
    assert 0 < n < 8
    main("generate", lambda c, p: generate.run(c, p, llm=llm), [str(_conf(tmp_path, cfg)), "--round", "1"])
    err = capfd.readouterr().err
    assert f"warning: generate round 1: {n} prompts dropped, longer than model.max_prompt_tokens=24 tokens" in err
