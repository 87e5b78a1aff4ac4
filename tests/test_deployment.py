"""The README's deployment path: a local Prefect server, `dice serve`, `prefect deployment run dice/iterate`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline import rounds
from pipeline.config import save_config
from tests.conftest import REPO, tiny_config

BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("deploy")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}  # fmt: skip
    logs = {name: open(tmp / f"{name}.log", "w") for name in ("server", "serve")}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=logs["server"], stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    procs = [server]
    try:
        _wait(lambda: _healthy(api), 120, "the Prefect server")
        cfg = tiny_config(tmp / "runs", tiny_model, name="served", rounds=1, **{"data.prompts_per_round": 8})
        conf = tmp / "served.yaml"
        save_config(cfg, conf)
        serve = subprocess.Popen([str(BIN / "dice"), "serve", "--config", str(conf)], cwd=REPO, env=env,
                                 stdout=logs["serve"], stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        procs.insert(0, serve)

        def deployed() -> bool:
            r = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", "dice/iterate"], env=env,
                               capture_output=True, text=True)  # fmt: skip
            return r.returncode == 0

        _wait(deployed, 120, "the dice/iterate deployment")
        yield {"env": env, "cfg": cfg, "tmp": tmp}
    finally:
        for p in procs:  # serve first, then the server (SIGTERM: serve deregisters cleanly)
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for f in logs.values():
            f.close()


def _deployment_run(env, *args, timeout=900):
    return subprocess.run([str(BIN / "prefect"), "deployment", "run", "dice/iterate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_bad_parameters_are_rejected_before_a_run_exists(served):
    out = _deployment_run(served["env"], "--params", json.dumps({"config": {"rounds": -1}}))
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "config.rounds" in text and "minimum of 0" in text
    assert not served["cfg"].run_dir.exists()


def test_prefect_deployment_run_completes_a_run(served):
    out = _deployment_run(served["env"], "--watch", "--watch-timeout", "900")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:] + (served["tmp"] / "serve.log").read_text()[-4000:]
    assert "Completed" in text
    cfg = served["cfg"]
    for k in (0, 1):
        assert (rounds.round_dir(cfg, k) / "manifest.json").is_file()
        assert (rounds.round_dir(cfg, k) / "checkpoint" / "model.safetensors").is_file()
