"""Operating dice with Prefect workers: a process work pool, a worker, and a scheduled `iterate` deployment
that continues a named run by one round at each tick."""

from __future__ import annotations

import json
import subprocess

from pipeline.config import save_config
from pipeline.run import rounds
from tests.conftest import BIN, REPO, stop, tiny_config, wait_for


def _prefect(env, *args, check=True):
    out = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert not check or out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_scheduled_deployment_continues_a_run_one_round_per_tick(prefect_server, tmp_path, tiny_model, perturbed_model):
    env = prefect_server
    # round0.mode=skip (the tiny model is π_0, a perturbed copy π_-1) and offline rounds (pairs → reference → train:
    # what the schedule does does not depend on the stages a round has): each tick is one round, nothing else
    cfg = tiny_config(tmp_path / "runs", tiny_model, name="nightly", offline_rounds="true", **{
                      "data.offline_per_round": 16, "round0.mode": "skip", "model.reference": str(perturbed_model)})  # fmt: skip
    save_config(cfg, tmp_path / "nightly.yaml")
    pool = "dice-test-pool"
    _prefect(env, "work-pool", "create", pool, "--type", "process")
    params = {"config": cfg.model_dump(mode="json"), "more_rounds": 1}
    _prefect(env, "--no-prompt", "deploy", "--name", "iterate", "--pool", pool, "--interval", "20",
             "--params", json.dumps(params))  # fmt: skip
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    manifests = {}
    try:
        # tick 1: no round finished yet -> round 1 (round 0 has no stages); tick 2: round 1 finished -> round 2
        r1 = rounds.round_dir(cfg, 1) / "manifest.json"
        wait_for(r1.is_file, 600, "round 1 from the first scheduled run", every=2)
        manifests = {p.name: p.read_text() for p in (rounds.round_dir(cfg, 1) / ".dice").glob("*.json")}
        wait_for((rounds.round_dir(cfg, 2) / "manifest.json").is_file, 600, "round 2 from a later tick", every=2)
    finally:
        _prefect(env, "deployment", "delete", "dice/iterate", check=False)  # no more ticks
        stop(worker)
        log.close()
    # a later tick continued the run: round 1 was not redone, round 2 trained from round 1's checkpoint
    assert {p.name: p.read_text() for p in (rounds.round_dir(cfg, 1) / ".dice").glob("*.json")} == manifests
    train = json.loads((rounds.round_dir(cfg, 2) / ".dice/train.json").read_text())
    assert train["inputs"]["init"]["path"] == str(rounds.round_dir(cfg, 1) / "checkpoint")


def test_gpu_stages_queue_for_gpu_slots(prefect_server, tmp_path, tiny_model):
    """With the `gpu` limit's only slot held elsewhere, a run does its CPU stage (pairs) and then waits at the
    first GPU stage (reference) until the slot frees up; then it finishes."""
    import time

    env = prefect_server
    _prefect(env, "gcl", "create", "gpu-test", "--limit", "1")
    flag, release = tmp_path / "held", tmp_path / "release"
    holder = subprocess.Popen(
        [str(BIN / "python"), "-c",
         "import pathlib, time\n"
         "from prefect.concurrency.sync import concurrency\n"
         "with concurrency('gpu-test', occupy=1, strict=True):\n"
         f"    pathlib.Path({str(flag)!r}).touch()\n"
         f"    while not pathlib.Path({str(release)!r}).exists(): time.sleep(0.5)\n"],
        env=env, start_new_session=True,
    )  # fmt: skip
    cfg = tiny_config(tmp_path / "runs", tiny_model, name="queued", rounds=0, gpu_slots="gpu-test",
                      **{"round0.max_pairs": 16})  # fmt: skip
    conf = tmp_path / "queued.yaml"
    save_config(cfg, conf)
    run = None
    try:
        wait_for(flag.exists, 120, "the slot holder")
        run = subprocess.Popen([str(BIN / "dice"), "run", str(conf)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        rd = rounds.round_dir(cfg, 0)
        wait_for((rd / "pairs.parquet").is_file, 300, "the CPU stage")
        time.sleep(8)
        assert not (rd / "reference.parquet").exists()  # queued behind the held GPU slot
        released_at = time.time()
        release.touch()
        assert run.wait(timeout=600) == 0
        assert (rd / "reference.parquet").stat().st_mtime > released_at
        assert (rd / "checkpoint" / "model.safetensors").is_file()
    finally:
        release.touch()
        stop(holder)
        if run is not None and run.poll() is None:
            stop(run)
