"""The README's deployment path: a local Prefect server, `dice serve`, `prefect deployment run dice/iterate`."""

from __future__ import annotations

import json
import subprocess

import pytest

from pipeline.config import save_config
from pipeline.run import rounds
from tests.conftest import BIN, REPO, stop, tiny_config, wait_for


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory, tiny_model, perturbed_model):
    tmp = tmp_path_factory.mktemp("deploy")
    env = prefect_server
    cfg = tiny_config(tmp / "runs", tiny_model, name="served", rounds=1,
                      **{"data.prompts_per_round": 8, "round0.mode": "skip",  # one DICE round from the tiny π_0
                         "model.reference": str(perturbed_model)})  # fmt: skip
    conf = tmp / "served.yaml"
    save_config(cfg, conf)
    log = open(tmp / "serve.log", "w")
    serve = subprocess.Popen([str(BIN / "dice"), "serve", "--config", str(conf)], cwd=REPO, env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        def deployed() -> bool:
            r = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", "dice/iterate"], env=env,
                               capture_output=True, text=True)  # fmt: skip
            return r.returncode == 0

        wait_for(deployed, 120, "the dice/iterate deployment")
        yield {"env": env, "cfg": cfg, "tmp": tmp}
    finally:
        stop(serve)  # before the server, as the README says
        log.close()


def _deployment_run(env, *args, timeout=900):
    return subprocess.run([str(BIN / "prefect"), "deployment", "run", "dice/iterate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_bad_parameters_are_rejected_before_a_run_exists(served):
    out = _deployment_run(served["env"], "--params", json.dumps({"config": {"rounds": -1}}))
    assert out.returncode != 0
    text = " ".join((out.stdout + out.stderr).split())  # Prefect's CLI wraps its message to the terminal's width
    assert "config.rounds" in text and "minimum of 0" in text
    assert not served["cfg"].run_dir.exists()


def test_prefect_deployment_run_completes_a_run(served):
    out = _deployment_run(served["env"], "--watch", "--watch-timeout", "900")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:] + (served["tmp"] / "serve.log").read_text()[-4000:]
    assert "Completed" in text
    cfg = served["cfg"]
    assert (rounds.round_dir(cfg, 1) / "manifest.json").is_file()
    assert (rounds.round_dir(cfg, 1) / "checkpoint" / "model.safetensors").is_file()
