"""ZeRO-3 partitioned inference: scoring a model larger than one device, its parameters sharded across the ranks.

How TRL and OpenRLHF hold reference models under DeepSpeed: the model is loaded with a ZeRO-3 config alive
(transformers' `HfDeepSpeedConfig`), so `from_pretrained` partitions each weight as it loads (no rank ever holds
the whole model), then wrapped by `deepspeed.initialize` with no optimizer. In every forward pass each layer's
parameters are gathered from all ranks just before the layer runs and released after it: ranks hold 1/N of
the weights, and compute exactly what one device holding all of them computes (tests/test_scale_scoring.py).

Gathers are collective, so every rank must run the same number of forward passes, and agree on that number
BEFORE any of them: a rank still gathering parameters for its own pass while another waits in the count's
all-reduce never meets it. The scorers (`pipeline.compute.logprobs.score`, `pipeline.method.rewards.score_reward_model`)
first plan their batches, then call `passes(n)` (an all-reduce MAX of every rank's count), then run their own
batches followed by one-token passes whose results are dropped, up to the agreed count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Weights DeepSpeed cannot partition: quantized checkpoints keep packed integer weights and their own loaders.
_QUANTIZED = "quantization_config"


def unsupported(path: str) -> str | None:
    """Why the model at `path` cannot be loaded partitioned (None: it can), read from its config.json before
    anything is loaded. A hub id is checked after loading, by `check_partitioned`."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"its config.json cannot be read ({e})"
    if cfg.get(_QUANTIZED):
        method = cfg[_QUANTIZED].get("quant_method", "?") if isinstance(cfg[_QUANTIZED], dict) else "?"
        return (f"it is a quantized checkpoint ({_QUANTIZED}: quant_method {method}); ZeRO-3 partitions floating-point "
                "weights only: score it unsharded (zero_stage 0) or from its unquantized weights")  # fmt: skip
    return None


def config(dtype: Any, hidden_size: int | None) -> dict[str, Any]:
    """The DeepSpeed config of ZeRO-3 inference (no optimizer; TRL's `prepare_deepspeed` bucket sizes): parameters
    smaller than 10 × hidden (norms, biases) stay whole on every rank, everything else is partitioned."""
    import torch

    zero: dict[str, Any] = {"stage": 3}
    if hidden_size:
        zero.update(stage3_param_persistence_threshold=10 * hidden_size, reduce_bucket_size=hidden_size * hidden_size,
                    stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size))  # fmt: skip
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def load(path: str, auto_class: Any, dtype: Any, trust_remote_code: bool, what: str):
    """`auto_class.from_pretrained(path)` with every weight partitioned across the ranks as it loads.

    The process group must exist (pipeline.compute.launch.init_distributed). Returns the model, in eval mode, whose
    parameters are this rank's partitions (shape (0,), `ds_shape` the full shape).

    Raises:
        ValueError: naming the model and why, when it cannot be partitioned.
    """
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    reason = unsupported(path)
    if reason:
        raise ValueError(f"{what} {path}: ZeRO-3 cannot shard it: {reason}")
    mc = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    hidden = getattr(getattr(mc, "text_config", None) or mc, "hidden_size", None)
    keep = HfDeepSpeedConfig(config(dtype, hidden))  # alive through from_pretrained: weights are partitioned as they load
    try:
        model = auto_class.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path}: could not be loaded partitioned ({e})") from e
    whole = [name for name, p in model.named_parameters() if not hasattr(p, "ds_id")]
    if whole:
        raise ValueError(f"{what} {path}: ZeRO-3 cannot shard it: parameters {whole[:3]} were created outside "
                         "DeepSpeed's partitioned init (model code that builds weights after loading, e.g. remote "
                         "code); use zero_stage 0")  # fmt: skip
    del keep  # later loads in this process are not partitioned unless asked again
    return model.eval()


def scoring(module, model_config) -> dict[str, Any]:
    """What the scorers need to run `module` (a partitioned model, or a wrapper of one) under ZeRO-3: its DeepSpeed
    engine (no optimizer, eval mode) and `passes(n)`, the most forward passes any rank makes given this rank's n (an
    all-reduce MAX on the rank's device, called before any pass). Pass them on:
    `score(model, ..., **zero3.scoring(ResponseScorer(model), model.config))`."""
    import deepspeed

    from pipeline.compute import launch

    dtype = next(module.parameters()).dtype
    hidden = getattr(getattr(model_config, "text_config", None) or model_config, "hidden_size", None)
    engine, *_ = deepspeed.initialize(model=module, config=config(dtype, hidden))
    engine.eval()
    return {"engine": engine, "passes": launch.max_across}


def share_held(model) -> float:
    """The share of `model`'s weights this rank holds (1/N plus the small persistent ones; 1.0 unpartitioned)."""
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return held / max(total, 1)
