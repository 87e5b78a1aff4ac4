"""Shared fixtures: a tiny model built offline once per session, and configs pointing at temp folders.

Real components only: the vLLM engine (CPU build) is started once per session in this process, DeepSpeed
and Prefect run for real in the stage processes the flow starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
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
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the default, pyproject.toml): two workers share the cores, one compute thread each (and each
    # stage process they start); two threads per worker would spin against each other at every OpenMP barrier
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The modules that take longest, first: `pytest -n` hands out whole modules (`--dist loadfile`) in collection
# order, so a long one started last would leave the other worker idle until it ends. Measured with --durations=0.
LONGEST_FIRST = ["test_flow_e2e", "test_scale_scoring", "test_train", "test_schedule", "test_faults",
                 "test_device_check", "test_benchmarks", "test_memory", "test_generate", "test_deployment",
                 "test_generate_distributed", "test_data_sources", "test_evaluate_models", "test_label_judges",
                 "test_artifacts"]  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))  # stable: in-file order kept


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def headless_chromium(*args: str, profile: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run headless chromium with its profile in `profile`.

    Chromium puts its singleton socket under TMPDIR and aborts ("Socket path too long") when that path passes the
    107-byte limit of a unix socket; it gets a short temporary folder of its own, whatever TMPDIR the tests run with.
    """
    with tempfile.TemporaryDirectory(prefix="dice-chromium-", dir="/tmp") as short_tmp:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout, check=False, env={**os.environ, "TMPDIR": short_tmp},
        )  # fmt: skip


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny chat model, built from the shipped data (shorter supervised pass than the preset's), once per test
    run: the workers of `pytest -n` share it (each one's temporary folder sits in the run's)."""
    import fcntl
    import hashlib
    import shutil

    from pipeline.run.tiny import TinySpec, build_tiny_model

    data, spec = [REPO / "data/prompts.jsonl", REPO / "data/offline_prefs.jsonl"], TinySpec(sft_steps=150)
    h = hashlib.sha256((REPO / "pipeline/run/tiny.py").read_bytes() + repr(spec).encode())
    for f in data:
        h.update(f.read_bytes())
    # developers' loop: DICE_TEST_MODEL_CACHE keeps the model between runs (rebuilt when its inputs change)
    root = os.environ.get("DICE_TEST_MODEL_CACHE")
    if not root:
        root = tmp_path_factory.getbasetemp()
        root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    path = Path(root) / h.hexdigest()[:16] / "tiny"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builds, the others wait for it
        if not (path / "config.json").is_file():
            tmp = path.with_name(f"tiny.{os.getpid()}")
            build_tiny_model(tmp, data, spec)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
    return path


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
