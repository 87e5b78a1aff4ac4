"""Operating dice with Prefect workers: a process work pool, a worker, and a scheduled `iterate` deployment
that continues a named run by one round at each tick."""

from __future__ import annotations

import json
import subprocess

from pipeline import rounds
from pipeline.config import save_config
from tests.conftest import BIN, REPO, stop, tiny_config, wait_for


def _prefect(env, *args, check=True):
    out = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert not check or out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_scheduled_deployment_continues_a_run_one_round_per_tick(prefect_server, tmp_path, tiny_model):
    env = prefect_server
    cfg = tiny_config(tmp_path / "runs", tiny_model, name="nightly", **{"data.prompts_per_round": 6,
                                                                         "round0.max_pairs": 24})  # fmt: skip
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
        # tick 1: no round finished yet -> round 0 and round 1; tick 2: round 1 finished -> round 2
        r1 = rounds.round_dir(cfg, 1) / "manifest.json"
        wait_for(r1.is_file, 600, "round 1 from the first scheduled run", every=2)
        manifests = {p.name: p.read_text() for p in (rounds.round_dir(cfg, 1) / ".dice").glob("*.json")}
        wait_for((rounds.round_dir(cfg, 2) / "manifest.json").is_file, 600, "round 2 from a later tick", every=2)
    finally:
        _prefect(env, "deployment", "delete", "dice/iterate", check=False)  # no more ticks
        stop(worker)
        log.close()
    # a later tick continued the run: round 1 was not redone, round 2 generated from round 1's checkpoint
    assert {p.name: p.read_text() for p in (rounds.round_dir(cfg, 1) / ".dice").glob("*.json")} == manifests
    gen = json.loads((rounds.round_dir(cfg, 2) / ".dice/generate.json").read_text())
    assert gen["inputs"]["policy"]["path"] == str(rounds.round_dir(cfg, 1) / "checkpoint")
