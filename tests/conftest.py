"""Shared fixtures: a tiny model built offline once per session, and configs pointing at temp folders.

Real components only: the vLLM engine (CPU build) is started once per session in this process, DeepSpeed
and Prefect run for real in the stage processes the flow starts.
"""

from __future__ import annotations

import os
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
    from pipeline.tiny import TinySpec, build_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    return build_tiny_model(
        path, [REPO / "data/prompts.jsonl", REPO / "data/offline_prefs.jsonl"], TinySpec(sft_steps=150)
    )


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
    from pipeline.config import EngineConfig
    from pipeline.engine import make_llm

    engine = make_llm(str(tiny_model), EngineConfig(), dtype="float32", seed=0, trust_remote_code=False)
    yield engine
    del engine

