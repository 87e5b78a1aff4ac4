"""GPU-only paths: CUDA vLLM generation and multi-GPU ZeRO-3 training. Run on a GPU machine: `pytest -m gpu`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import rounds
from pipeline.artifacts import execute
from pipeline.config import save_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_vllm_generate_and_score(make_config):
    """The generate stage on CUDA vLLM (bf16), and the label stage's scores on the GPU."""
    from stages import generate, label

    cfg = make_config(**{"round0.mode": "skip", "generate.engine.kv_cache_memory_bytes": "null",
                         "generate.engine.gpu_memory_utilization": 0.3, "model.dtype": "auto"})  # fmt: skip
    for stage, mod in (("generate", generate), ("label", label)):
        plan = rounds.plan(cfg, 1, stage)
        execute(plan, lambda: mod.run(cfg, plan))
    labels = pq.read_table(rounds.round_dir(cfg, 1) / "labels.parquet").to_pandas()
    assert len(labels) == cfg.data.prompts_per_round * cfg.generate.num_samples
    assert (labels.reward == 0).all()  # policy is its own reference in this setting: r = 0 exactly


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_zero3_matches_one(make_config, tmp_path):
    from stages import pairs, reference

    losses = {}
    for n in (1, 2):
        cfg = make_config(**{"runs_dir": str(tmp_path / f"runs{n}"), "train.num_processes": n, "train.bf16": "false"})
        for stage, mod in (("pairs", pairs), ("reference", reference)):
            plan = rounds.plan(cfg, 0, stage)
            execute(plan, lambda: mod.run(cfg, plan))
        conf = tmp_path / f"c{n}.yaml"
        save_config(cfg, conf)
        proc = subprocess.run([sys.executable, "-m", "stages.train", str(conf), "--round", "0"], capture_output=True,
                              text=True, timeout=900)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[n] = pq.read_table(rounds.round_dir(cfg, 0) / "train_metrics.parquet").column("loss").to_numpy()
    np.testing.assert_allclose(losses[1], losses[2], rtol=1e-3)
