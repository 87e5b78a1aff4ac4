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


def test_cuda_vllm_generate_and_score(make_config, perturbed_model, tiny_model):
    """The generate stage on CUDA vLLM (bf16) and the label stage's implicit rewards on the GPU, checked against a
    float32 CPU scoring of the same texts: a broken GPU path (wrong logits, wrong masking) cannot pass."""
    from pipeline.logprobs import encode, load_causal_lm, score
    from stages import generate, label

    cfg = make_config(**{"round0.mode": "skip", "model.reference": str(perturbed_model),
                         "generate.engine.kv_cache_memory_bytes": "null",
                         "generate.engine.gpu_memory_utilization": 0.3, "model.dtype": "auto"})  # fmt: skip
    for stage, mod in (("generate", generate), ("label", label)):
        plan = rounds.plan(cfg, 1, stage)
        execute(plan, lambda: mod.run(cfg, plan))
    labels = pq.read_table(rounds.round_dir(cfg, 1) / "labels.parquet").to_pandas()
    assert len(labels) == cfg.data.prompts_per_round * cfg.generate.num_samples
    cpu = {}
    for name, path in (("policy", tiny_model), ("reference", perturbed_model)):
        model, tok = load_causal_lm(str(path), "float32", device=torch.device("cpu"))
        enc = [encode(tok, p, r) for p, r in zip(labels.prompt, labels.response)]
        cpu[name] = score(model, enc, tok.pad_token_id, 16)
    tokens = labels.num_tokens.to_numpy()
    for name in ("policy", "reference"):
        per_token = np.abs(labels[f"{name}_logp"].to_numpy() - cpu[name]) / tokens
        assert per_token.max() < 0.05, (name, per_token.max())  # bf16 on the GPU vs float32 on the CPU
    reward = labels.reward.to_numpy()
    reward_cpu = cfg.train.beta * (cpu["policy"] - cpu["reference"])
    assert reward.std() > 0 and np.corrcoef(reward, reward_cpu)[0, 1] > 0.95
    # vLLM's own sampled-token log-probs (bf16) agree with the float32 scoring of what it generated (EOS included)
    stopped = labels.finish_reason.to_numpy() == "stop"
    gap = np.abs(labels.cumulative_logprob.to_numpy() - cpu["policy"]) / tokens
    assert np.median(gap[stopped]) < 0.05


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
