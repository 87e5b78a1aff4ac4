"""Shared fixtures: a tiny model built offline once per session, and configs pointing at temp folders.

Real components only: the vLLM engine (CPU build) is started once per session in this process, DeepSpeed
and Prefect run for real in the stage processes the flow starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Before anything imports vLLM or Prefect.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny chat model, built from the shipped data (shorter supervised pass than the preset's)."""
    from pipeline.run.tiny import TinySpec, build_tiny_model

    data, spec = [REPO / "data/prompts.jsonl", REPO / "data/offline_prefs.jsonl"], TinySpec(sft_steps=150)
    cache = os.environ.get("DICE_TEST_MODEL_CACHE")  # developers' loop: reuse a model built from the same inputs
    if cache:
        import hashlib
        import shutil

        h = hashlib.sha256((REPO / "pipeline/run/tiny.py").read_bytes() + repr(spec).encode())
        for f in data:
            h.update(f.read_bytes())
        path = Path(cache) / h.hexdigest()[:16] / "tiny"
        if not (path / "config.json").is_file():
            tmp = path.with_name(f"tiny.{os.getpid()}")
            build_tiny_model(tmp, data, spec)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        return path
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", data, spec)


def tiny_config(runs_dir: Path, model: Path, **overrides):
    """A RunConfig for tests: the tiny preset, smaller, in a temp folder, with the session's model."""
    from pipeline.config import load_config

    base = [
        f"runs_dir={runs_dir}",
        f"model.policy={model}",
        "model.build_tiny_if_missing=false",
        f"data.prompts={REPO / 'data/prompts.jsonl'}",
        f"data.offline={REPO / 'data/offline_prefs.jsonl'}",
        "data.prompts_per_round=12",
        "round0.max_pairs=48",
        "generate.max_tokens=128",
        "train.global_batch_size=8",
        # off unless a test turns it on (tests/test_flow_e2e.py does): every flow test would pay for its engines
        "eval.enabled=false",
    ]
    return load_config(REPO / "conf/tiny.yaml", base + [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture
def make_config(tmp_path, tiny_model):
    def make(**overrides):
        return tiny_config(tmp_path / "runs", tiny_model, **overrides)

    return make


@pytest.fixture(scope="session")
def llm(tiny_model):
    """One in-process vLLM engine on the tiny model for the whole session."""
    from pipeline.compute.engine import make_llm
    from pipeline.config import EngineConfig

    engine = make_llm(str(tiny_model), EngineConfig(), dtype="float32", seed=0, trust_remote_code=False)
    yield engine
    del engine



def perturbed_copy(src: Path, dest: Path, scale: float) -> Path:
    """Save a copy of the model at `src` with its tokenizer and seeded Gaussian noise of `scale` on every weight."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(src).eval(), AutoTokenizer.from_pretrained(src)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def perturbed_model(tiny_model, tmp_path_factory):
    """A second model with the tiny model's tokenizer and slightly different weights (a stand-in π_{k-2})."""
    return perturbed_copy(tiny_model, tmp_path_factory.mktemp("models") / "perturbed", 0.02)

BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, every: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM a process group started with start_new_session, SIGKILL it if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on loopback, as the README runs it; yields the environment that points at it."""
    tmp = tmp_path_factory.mktemp("prefect-server")
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "PREFECT_WORKER_QUERY_SECONDS": "2"}  # fmt: skip
    log = open(tmp / "server.log", "w")
    port = api.split(":")[-1].split("/")[0]
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: _healthy(api), 120, "the Prefect server")
        yield env
    finally:
        stop(server)
        log.close()


def hub_repo(cache: Path, repo_id: str, src: Path, repo_type: str = "model", commit: str | None = None) -> str:
    """Lay `src` (a folder) out in a huggingface_hub cache as `repo_id`'s snapshot at `commit`, with refs/main
    pointing at it: what a download leaves, so HF_HUB_OFFLINE=1 serves it. Returns the commit."""
    import hashlib
    import shutil

    commit = commit or hashlib.sha1(f"{repo_id}:{src}".encode()).hexdigest()
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    shutil.copytree(src, repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A local Hugging Face cache with the Hub unreachable (HF_HUB_OFFLINE), for this process and its children."""
    import huggingface_hub.constants as hf

    import pipeline.data.models

    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pipeline.data.models, "_resolved", {})
    return cache
