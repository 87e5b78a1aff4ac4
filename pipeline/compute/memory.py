"""Memory planned, not discovered: each stage's memory per GPU, from the models' config.json alone (no weights read).

`plan(cfg, gpus, device_bytes)` estimates, per GPU-using stage of a round, what one GPU holds at its peak:

- vLLM engines (generate, evaluate's generation and local judges, label's local judges): the weights (÷ the tensor-
  parallel size), vLLM's profiling reserve for activations and the sampler, and the KV cache: what the engine's
  share `gpu_memory_utilization` of the GPU leaves (on CPU: `kv_cache_memory_bytes`). It fits when the KV cache
  holds at least one sequence of the engine's context length (vLLM refuses to start otherwise).
- Scoring (label's implicit reward / reward model, reference): the weights per rank (whole at ZeRO-0; a 1/N
  partition plus the largest layer gathered at ZeRO-3) and the activations of the longest row a forward pass can
  see at the batch size (`batch_size` sequences of `model.max_length`), inference only: one layer's temporaries and
  the LM head's float32 log-softmax over the vocabulary at the predicted positions.
- Training: the model states of the ZeRO stage and offload, in DeepSpeed's own accounting (bf16 mixed precision with
  AdamW: 16-bit weights and gradients, float32 master weights, gradients and the two moments, `18·P/N + 4·largest
  layer` at ZeRO-3, `2·P + 18·P/N` at ZeRO-2: `deepspeed.runtime.zero.stage3/stage_1_and_2.estimate_*_mem_needs`,
  which tests/test_memory.py checks against), DeepSpeed's bucket buffers, and the activations of the longest packed
  row of a micro-batch (`micro_batch_size` pairs of prompt + chosen + rejected, at most 2·max_length tokens each)
  kept for the backward pass: every decoder layer's saved tensors, or with `train.gradient_checkpointing` only each
  layer's input plus one layer recomputed, and the LM head's float32 logits and their gradient.

Every estimate adds the CUDA context and library workspaces of a process (`RUNTIME_BYTES`) and checks the total
against the GPU's memory. A stage that does not fit names the change that would (`remedy`): the first of the
stage's ladder (ZeRO-3, optimizer offload, gradient checkpointing, a smaller micro-batch, more GPUs for training)
that fits, computed by planning each candidate, with the changes it did not need taken away again.

The activation model counts the tensors a Llama-family decoder layer keeps for backward (RMSNorm's float32 input
and normalised output, the q/k/v projections' input, the rotated q and k and v, the attention output twice (the
kernel's own and the o-projection's input), the MLP's input, gate, activation, up and product), checked against
the measured peaks of the tiny and a 25M model on CPU (tests/test_memory.py). Attention kernels that keep no
(T, T) score matrix are assumed (flash / varlen attention on GPU, the packed path's kernels).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig

GIB = 1 << 30
# CUDA context, cuBLAS/NCCL workspaces and the caching allocator's slack of one process (measured ~0.5-1 GiB with
# CUDA 12-13; the allocator's fragmentation grows with the activations, so they are counted 10% over)
RUNTIME_BYTES = 1 * GIB
FRAGMENTATION = 1.10
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# DeepSpeed's defaults when the config does not set them (deepspeed/runtime/zero/config.py)
DS_REDUCE_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000
# vLLM's profiling run: the batch of tokens and of sequences it sizes activations and the sampler for
VLLM_PROFILE_TOKENS = 8192
VLLM_PROFILE_SEQS = 256


# ---------------------------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Shape:
    """The shape of a decoder-only transformer, as its config.json states it."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False
    qkv_bias: bool = False  # qwen2: biases on q, k, v
    attention_bias: bool = False  # llama/mistral attention_bias: biases on q, k, v and o
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3: RMSNorm on each head's q and k
    context: int | None = None  # max_position_embeddings
    source: str = ""

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.qkv_bias or self.attention_bias:
            attn += q + 2 * kv
        if self.attention_bias:
            attn += h
        mlp = 3 * h * self.intermediate + (2 * self.intermediate + h if self.mlp_bias else 0)
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return attn + mlp + norms

    @property
    def params(self) -> int:
        """All parameters (a tied LM head counted once, as DeepSpeed and `model.num_parameters()` count them)."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden

    @property
    def largest_layer(self) -> int:
        """DeepSpeed's "largest layer": the most parameters one module holds itself (the embedding or LM head, or
        an MLP projection)."""
        h = self.hidden
        return max(self.vocab * h, h * self.intermediate + (self.intermediate if self.mlp_bias else 0),
                   h * self.heads * self.head_dim)  # fmt: skip

    def kv_bytes_per_token(self, dtype_bytes: int, tensor_parallel: int = 1) -> int:
        """KV-cache bytes one token takes on one GPU of a tensor-parallel engine (KV heads split, never below 1)."""
        kv_heads = max(self.kv_heads // tensor_parallel, 1) if self.kv_heads >= tensor_parallel else 1
        return 2 * self.layers * kv_heads * self.head_dim * dtype_bytes


def shape_from_config(config: dict[str, Any], source: str = "") -> Shape:
    """The `Shape` of a config.json's contents (a multimodal model's `text_config`).

    Raises:
        ValueError: naming the source and the missing key, for a config without a decoder's dimensions.
    """
    c = config.get("text_config") or config
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in c]
    if missing:
        raise ValueError(f"{source or 'config.json'}: no {', '.join(missing)}; dice's memory plan needs a decoder's "
                         "dimensions (set memory_check=false to start without a plan)")  # fmt: skip
    h, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    model_type = str(config.get("model_type") or c.get("model_type") or "")
    return Shape(
        model_type=model_type,
        vocab=int(c["vocab_size"]),
        hidden=h,
        intermediate=int(c.get("intermediate_size") or 4 * h),
        layers=int(c["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or h // heads),
        tied=bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        qkv_bias=model_type == "qwen2",
        attention_bias=bool(c.get("attention_bias", False)),
        mlp_bias=bool(c.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        context=c.get("max_position_embeddings"),
        source=source,
    )


def read_shape(model: str) -> Shape:
    """The `Shape` of a model from its config.json alone: a local folder's, or the Hub snapshot's (only config.json
    is fetched; the local cache serves it offline). No weights are read."""
    from pipeline.data.models import looks_local, split_revision

    if looks_local(model):
        path = Path(model).expanduser() / "config.json"
        if not path.is_file():
            raise ValueError(f"model {model}: no config.json to plan its memory from")
    else:
        from huggingface_hub import hf_hub_download

        repo, revision = split_revision(model)
        try:
            path = Path(hf_hub_download(repo, "config.json", revision=revision))
        except Exception as e:  # noqa: BLE001 (offline without a cached copy, a missing repo: one line)
            raise ValueError(f"model {model}: its config.json could not be read from the Hub or its cache "
                             f"({type(e).__name__}); download it once, or point at a local folder") from None  # fmt: skip
    try:
        return shape_from_config(json.loads(path.read_text()), str(path))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model {model}: {path} cannot be read ({e})") from None


# ---------------------------------------------------------------------------------------------- activations


def layer_saved_bytes(s: Shape, b: int) -> int:
    """Bytes one token keeps in one decoder layer for its backward pass (module docstring), b = bytes per value."""
    h, q, kv, i = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    norms = 2 * (4 * h + b * h)  # each RMSNorm: its float32 input and its normalised output (b)
    attention = b * h + b * (q + 2 * kv) + 2 * b * q + 4 * s.heads  # q/k/v input; rotated q, k and v; output ×2; lse
    mlp = b * h + 4 * b * i  # input; gate, activation, up, product
    return norms + attention + mlp


def layer_transient_bytes(s: Shape, b: int) -> int:
    """Bytes per token one layer's forward (no grad) holds at once: the residual, q/k/v, the attention output and the
    MLP's gate, up and product."""
    h, q, kv, i = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    return b * (3 * h + q + 2 * kv + q) + 4 * h + 3 * b * i


def head_bytes(s: Shape, b: int, predicted: int, training: bool) -> int:
    """The LM head at `predicted` positions: its input rows and the (Np, V) logits, their float32 copy and the
    log-softmax's temporary; in training also the gradient of the float32 logits and its cast back."""
    if training:  # logits, float32 logits kept for the backward, log-softmax temporary; the gradient and its cast
        return predicted * (s.vocab * (b + 4 + 4 + 4 + b) + b * s.hidden)
    upcast = 4 if b != 4 else 0  # `.float()` of float32 logits is the same tensor
    return predicted * (s.vocab * (b + upcast + 4) + b * s.hidden)


def training_activation_bytes(s: Shape, tokens: int, b: int, checkpointing: bool, predicted: int | None = None) -> int:
    """Peak activation bytes of one packed row of `tokens` tokens, `predicted` of them scored (default: all, the
    bound) in training: the larger of the LM head's backward (everything saved so far plus the head) and, with
    checkpointing, one layer's recompute and backward."""
    predicted = tokens if predicted is None else predicted
    final_norm = (4 * s.hidden + b * s.hidden) * tokens
    grads = 2 * b * s.hidden * tokens  # the hidden-state gradient flowing down, and the one being formed
    if checkpointing:
        kept = s.layers * b * s.hidden * tokens  # each layer's input, for its recompute
        layer = layer_saved_bytes(s, b) * tokens + 2 * b * s.intermediate * tokens  # one layer recomputed + its backward
        return kept + grads + max(final_norm + head_bytes(s, b, predicted, True), layer)
    kept = s.layers * layer_saved_bytes(s, b) * tokens
    return kept + grads + final_norm + head_bytes(s, b, predicted, True)


def inference_activation_bytes(s: Shape, tokens: int, b: int, predicted: int | None = None) -> int:
    """Peak activation bytes of a no-grad forward of `tokens` tokens, `predicted` of them scored (default: all):
    the larger of one layer's temporaries and the LM head's."""
    predicted = tokens if predicted is None else predicted
    return max(layer_transient_bytes(s, b) * tokens, head_bytes(s, b, predicted, False) + 2 * b * s.hidden * tokens)


# ---------------------------------------------------------------------------------------------- model states


def model_states(p: int, largest: int, stage: int, world: int, bf16: bool, offload_optimizer: bool,
                 offload_params: bool) -> dict[str, int]:  # fmt: skip
    """Per-GPU bytes of weights, gradients and optimizer states of AdamW training under DeepSpeed.

    bf16 (mixed precision): 16-bit weights and gradients on the GPU, float32 master weights, gradients and the two
    Adam moments in the optimizer. ZeRO-2 and ZeRO-3 are DeepSpeed's own accounting
    (`estimate_zero2_model_states_mem_needs`: 2·P + 18·P/N, offloaded 2·P; `estimate_zero3_model_states_mem_needs`:
    18·P/N + 4·largest, offloaded optimizer 2·P/N + 4·largest, offloaded parameters 4·largest); ZeRO-0 keeps
    everything whole (DeepSpeed's unfused bf16 optimizer: 2 + 2 + 16 bytes per parameter), ZeRO-1 partitions the
    optimizer only. float32 training has no master copy: 4-byte weights and gradients, 8 bytes of moments.
    """
    n = max(world, 1)
    if bf16:
        w16, g16, master = 2, 2, 16  # master: float32 weights 4, gradients 4, moments 8
        if stage == 0:
            return {"weights": w16 * p, "gradients": g16 * p, "optimizer": master * p}
        if stage == 1:
            return {"weights": w16 * p, "gradients": g16 * p, "optimizer": 0 if offload_optimizer else master * p // n}
        if stage == 2:
            if offload_optimizer:
                return {"weights": w16 * p, "gradients": 0, "optimizer": 0}
            return {"weights": w16 * p, "gradients": (g16 + 4) * p // n, "optimizer": 12 * p // n}
        gathered = 2 * largest  # the layer in use, gathered whole: its 16-bit weights, then its 16-bit gradient
        if offload_params:
            return {"weights": gathered, "gradients": gathered, "optimizer": 0}
        if offload_optimizer:
            return {"weights": w16 * p // n + gathered, "gradients": gathered, "optimizer": 0}
        return {"weights": w16 * p // n + gathered, "gradients": 4 * p // n + gathered, "optimizer": 12 * p // n}
    if stage == 0:
        return {"weights": 4 * p, "gradients": 4 * p, "optimizer": 8 * p}
    if stage == 1:
        return {"weights": 4 * p, "gradients": 4 * p, "optimizer": 0 if offload_optimizer else 8 * p // n}
    if stage == 2:
        return {"weights": 4 * p, "gradients": 0 if offload_optimizer else 4 * p // n,
                "optimizer": 0 if offload_optimizer else 8 * p // n}  # fmt: skip
    gathered = 4 * largest
    if offload_params:
        return {"weights": gathered, "gradients": gathered, "optimizer": 0}
    return {"weights": 4 * p // n + gathered, "gradients": gathered + (0 if offload_optimizer else 4 * p // n),
            "optimizer": 0 if offload_optimizer else 8 * p // n}  # fmt: skip


# ---------------------------------------------------------------------------------------------- estimates


@dataclass
class Estimate:
    """One stage's (or one engine's) memory on one GPU: named parts in bytes, and the GPU's memory."""

    stage: str
    what: str
    parts: dict[str, int]
    gpus: int
    device_bytes: int | None
    settings: dict[str, Any] = field(default_factory=dict)  # the config values this layout used (key=value form)
    problem: str | None = None  # a layout that cannot run whatever the memory (e.g. more processes than GPUs)
    minimum: int | None = None  # vLLM: the KV cache must reach this (one sequence of the context length)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        if self.problem:
            return False
        if self.minimum is not None:  # an engine takes its share; what counts is what it leaves the KV cache
            return self.parts.get("kv_cache", 0) >= self.minimum
        return self.device_bytes is None or self.total <= self.device_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "what": self.what, "gpus": self.gpus, "parts": self.parts, "total": self.total,
                "device_bytes": self.device_bytes, "fits": self.fits, "settings": self.settings,
                "problem": self.problem, "kv_cache_minimum": self.minimum}  # fmt: skip


def _bytes(cfg: RunConfig, on_gpu: bool) -> int:
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu else "float32"
    return DTYPE_BYTES[dtype]


def ds_buffers(ds: dict[str, Any], stage: int, p: int, b: int) -> int:
    """DeepSpeed's communication buckets on the GPU: the gradient reduce bucket (ZeRO ≥ 1) and, at ZeRO-3, the
    parameter prefetch bucket; capped by the model's size."""
    if stage == 0:
        return 0
    zero = ds.get("zero_optimization", {})
    out = min(int(float(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET))), p) * b
    if stage == 3:
        out += min(int(float(zero.get("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET))), p) * b
    return out


def train_estimate(cfg: RunConfig, shape: Shape, world: int, device_bytes: int | None, *, on_gpu: bool = True,
                   zero_stage: int | None = None, ds: dict[str, Any] | None = None) -> Estimate:  # fmt: skip
    """The train stage on one GPU of `world` (module docstring). `zero_stage`: the stage to plan (default: the
    config's, auto planned as `choose_zero_stage` decides)."""
    t = cfg.train
    bf16 = t.bf16 if t.bf16 is not None else on_gpu
    b = 2 if bf16 else 4
    stage = zero_stage if zero_stage is not None else (
        t.zero_stage if t.zero_stage != "auto" else choose_zero_stage(cfg, shape, world, device_bytes, on_gpu=on_gpu))
    states = model_states(shape.params, shape.largest_layer, stage, world, bf16, t.offload_optimizer and stage > 0,
                          t.offload_params and stage == 3)  # fmt: skip
    tokens = t.micro_batch_size * 2 * cfg.model.max_length  # the longest packed row: prompt + chosen + rejected
    act = training_activation_bytes(shape, tokens, b, t.gradient_checkpointing)
    parts = {**states, "activations": int(act * FRAGMENTATION), "buffers": ds_buffers(ds or {}, stage, shape.params, b),
             "runtime": RUNTIME_BYTES}  # fmt: skip
    settings = {"train.zero_stage": stage, "train.offload_optimizer": t.offload_optimizer,
                "train.offload_params": t.offload_params, "train.gradient_checkpointing": t.gradient_checkpointing,
                "train.micro_batch_size": t.micro_batch_size, "train.num_processes": world}  # fmt: skip
    what = (f"ZeRO-{stage}{' + optimizer offload' if t.offload_optimizer and stage else ''}"
            f"{' + parameter offload' if t.offload_params and stage == 3 else ''}, {world} process(es), micro-batch "
            f"{t.micro_batch_size} ({tokens:,} tokens a row), checkpointing {'on' if t.gradient_checkpointing else 'off'}, "
            f"{'bf16' if bf16 else 'float32'}")  # fmt: skip
    return Estimate("train", what, parts, world, device_bytes, settings)


def choose_zero_stage(cfg: RunConfig, shape: Shape, world: int, device_bytes: int | None, *, on_gpu: bool = True) -> int:
    """`train.zero_stage: auto`: the smallest ZeRO stage whose plan fits `device_bytes` (offloaded parameters need 3,
    an offloaded optimizer 2 or more); without a device size (CPU), `TrainConfig.resolved_zero_stage`. When none
    fits, 3 (the smallest footprint; the memory check then names what else is needed)."""
    t = cfg.train
    if device_bytes is None:
        return t.resolved_zero_stage(world)
    stages = [3] if t.offload_params else [2, 3] if t.offload_optimizer else [0, 1, 2, 3] if world > 1 else [0]
    for stage in stages:
        if train_estimate(cfg, shape, world, device_bytes, on_gpu=on_gpu, zero_stage=stage).fits:
            return stage
    return 3


def scoring_estimate(stage: str, cfg: RunConfig, shape: Shape, world: int, device_bytes: int | None, *,
                     on_gpu: bool = True, role: str = "") -> Estimate:  # fmt: skip
    """label (implicit reward, reward model) or reference scoring on one GPU of `world` ranks."""
    sec = cfg.label if stage == "label" else cfg.reference
    b = _bytes(cfg, on_gpu)
    if sec.zero_stage == 3:
        weights = b * shape.params // max(world, 1) + b * shape.largest_layer  # 1/N, plus the layer being used
    else:
        weights = b * shape.params
    tokens = sec.batch_size * cfg.model.max_length  # the longest row: batch_size sequences of max_length
    act = inference_activation_bytes(shape, tokens, b)
    parts = {"weights": weights, "activations": int(act * FRAGMENTATION), "runtime": RUNTIME_BYTES}
    settings = {f"{stage}.zero_stage": sec.zero_stage, f"{stage}.batch_size": sec.batch_size,
                f"{stage}.num_processes": world}  # fmt: skip
    what = (f"{role + ': ' if role else ''}ZeRO-{sec.zero_stage}, {world} process(es), batch {sec.batch_size} "
            f"({tokens:,} tokens a row)")  # fmt: skip
    return Estimate(stage, what, parts, world, device_bytes, settings)


def engine_estimate(stage: str, key: str, engine: Any, cfg: RunConfig, shape: Shape, device_bytes: int | None, *,
                    on_gpu: bool = True, role: str = "") -> Estimate:  # fmt: skip
    """A vLLM engine (`engine`: an EngineConfig at config path `key`) on one of its GPUs."""
    tp = engine.tensor_parallel_size
    b = _bytes(cfg, on_gpu)
    weights = b * shape.params // tp
    context = engine.max_model_len or shape.context or cfg.model.max_length
    # vLLM's profiling forward: one layer's temporaries over the token budget (the MLP split across the tensor-
    # parallel ranks), and the sampler's float32 logits and probabilities at the last token of a full batch
    split = replace(shape, intermediate=math.ceil(shape.intermediate / tp))
    activations = layer_transient_bytes(split, b) * VLLM_PROFILE_TOKENS + VLLM_PROFILE_SEQS * shape.vocab * 4 * 2
    kv_min = shape.kv_bytes_per_token(b, tp) * context
    settings = {f"{key}.tensor_parallel_size": tp, f"{key}.gpu_memory_utilization": engine.gpu_memory_utilization}
    what = f"{role + ': ' if role else ''}vLLM, tensor parallel {tp}, context {context:,} tokens"
    if on_gpu and device_bytes is not None and not engine.kv_cache_memory_bytes:
        share = int(engine.gpu_memory_utilization * device_bytes)
        kv = share - weights - activations - RUNTIME_BYTES
        parts = {"weights": weights, "activations": activations, "kv_cache": max(kv, 0), "runtime": RUNTIME_BYTES}
        what += f", {engine.gpu_memory_utilization:.0%} of the GPU"
        return Estimate(stage, what, parts, tp, device_bytes, settings, minimum=kv_min)
    kv = engine.kv_cache_memory_bytes or (256 << 20)
    parts = {"weights": weights, "activations": activations, "kv_cache": kv, "runtime": RUNTIME_BYTES}
    return Estimate(stage, what, parts, tp, device_bytes, settings, minimum=kv_min if on_gpu else None)


# ---------------------------------------------------------------------------------------------- a round's plan


def models(cfg: RunConfig) -> dict[str, str]:
    """The models a round loads, by role, as config.json sources: every π_k has the policy's shape."""
    out = {"policy": cfg.model.policy, "reference": cfg.model.reference or cfg.model.policy}
    for i, j in enumerate(cfg.label.judges):
        if j.backend == "vllm":
            out[f"label judge {j.id or i}"] = j.model or cfg.model.policy
    for i, j in enumerate(cfg.eval.judges):
        if j.backend == "vllm":
            out[f"eval judge {j.id or i}"] = j.model or cfg.model.policy
    if cfg.label.labeller == "reward_model" and cfg.label.reward_model:
        out["label reward model"] = cfg.label.reward_model
    if cfg.eval.enabled and cfg.eval.reward_model:
        out["eval reward model"] = cfg.eval.reward_model
    return out


def processes(n: int, gpus: int) -> int:
    """A `num_processes` field's count on `gpus` GPUs (0: every GPU, 1 without)."""
    return n or max(gpus, 1)


def stage_estimates(cfg: RunConfig, stage: str, gpus: int, device_bytes: int | None, shapes: dict[str, Shape], *,
                    on_gpu: bool = True) -> list[Estimate]:  # fmt: skip
    """The estimates of one stage on `gpus` GPUs of `device_bytes` each: one per engine or model it runs in turn
    (each is gone before the next starts); [] for a stage that uses no GPU."""
    policy = shapes[cfg.model.policy]
    out: list[Estimate] = []
    if stage == "generate":
        if cfg.generate.sampler == "mixture":  # two transformers models on one GPU, no grad
            one = scoring_estimate("generate", cfg, policy, 1, device_bytes, on_gpu=on_gpu, role="mixture")
            one.parts["weights"] *= 2
            return [one]
        return [engine_estimate("generate", "generate.engine", cfg.generate.engine, cfg, policy, device_bytes,
                                on_gpu=on_gpu, role="policy")]  # fmt: skip
    if stage == "label":
        lab = cfg.label
        if lab.labeller == "implicit_reward":
            n = processes(lab.num_processes, gpus)
            for role, name in (("policy", cfg.model.policy), ("reference", cfg.model.reference or cfg.model.policy)):
                out.append(scoring_estimate("label", cfg, shapes[name], n, device_bytes, on_gpu=on_gpu, role=role))
        elif lab.labeller == "reward_model" and lab.reward_model:
            n = processes(lab.num_processes, gpus)
            out.append(scoring_estimate("label", cfg, shapes[lab.reward_model], n, device_bytes, on_gpu=on_gpu,
                                        role="reward model"))  # fmt: skip
        elif lab.labeller == "judge":
            for i, j in enumerate(lab.judges):
                if j.backend == "vllm":
                    out.append(engine_estimate("label", "label.engine", lab.engine, cfg, shapes[j.model or cfg.model.policy],
                                               device_bytes, on_gpu=on_gpu, role=f"judge {j.id or i}"))  # fmt: skip
        return out
    if stage == "reference":  # π_{k-1} or π_0: the policy's shape either way
        n = processes(cfg.reference.num_processes, gpus)
        return [scoring_estimate("reference", cfg, policy, n, device_bytes, on_gpu=on_gpu)]
    if stage == "train":
        return [train_estimate(cfg, policy, cfg.train.num_processes, device_bytes, on_gpu=on_gpu,
                               ds=_user_ds(cfg))]  # fmt: skip
    if stage == "evaluate":
        g = cfg.generate.engine
        out.append(engine_estimate("evaluate", "generate.engine", g, cfg, policy, device_bytes, on_gpu=on_gpu,
                                   role="policy and baseline"))  # fmt: skip
        for i, j in enumerate(cfg.eval.judges):
            if j.backend == "vllm":
                out.append(engine_estimate("evaluate", "label.engine", cfg.label.engine, cfg,
                                           shapes[j.model or cfg.model.policy], device_bytes, on_gpu=on_gpu,
                                           role=f"judge {j.id or i}"))  # fmt: skip
        if cfg.eval.reward_model:
            est = scoring_estimate("evaluate", cfg, shapes[cfg.eval.reward_model], 1, device_bytes, on_gpu=on_gpu,
                                   role="reward model")  # fmt: skip
            out.append(est)
    return out


def _user_ds(cfg: RunConfig) -> dict[str, Any]:
    """The user's DeepSpeed JSON (`train.deepspeed_config`) as far as the buffers go; {} when none or unreadable (the
    train stage reports an unreadable one)."""
    if not cfg.train.deepspeed_config:
        return {}
    try:
        return json.loads(Path(cfg.train.deepspeed_config).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_shapes(cfg: RunConfig) -> dict[str, Shape]:
    """Every model of the round's shape, by its name in the config (config.json only)."""
    return {name: read_shape(name) for name in dict.fromkeys(models(cfg).values())}


# ---------------------------------------------------------------------------------------------- remedies


def _ladder(cfg: RunConfig, stage: str, gpus: int) -> list[tuple[str, dict[str, Any]]]:
    """The changes to try for a stage that does not fit, in order: (label, {config path: value})."""
    steps: list[tuple[str, dict[str, Any]]] = []
    if stage == "train":
        t = cfg.train
        steps.append(("ZeRO-3", {"train.zero_stage": 3}))
        steps.append(("optimizer offload", {"train.offload_optimizer": True}))
        steps.append(("gradient checkpointing", {"train.gradient_checkpointing": True}))
        mb = t.micro_batch_size
        while mb > 1:
            mb //= 2
            steps.append((f"micro-batch {mb}", {"train.micro_batch_size": mb}))
        n = t.num_processes
        while n < 4096:
            n *= 2
            steps.append((f"{n} GPUs", {"train.num_processes": n}))
    elif stage in ("label", "reference"):
        sec = cfg.label if stage == "label" else cfg.reference
        if stage == "label" and cfg.label.labeller == "judge":
            return _engine_ladder("label.engine", cfg.label.engine, gpus)
        steps.append(("ZeRO-3", {f"{stage}.zero_stage": 3}))
        bs = sec.batch_size
        while bs > 1:
            bs //= 2
            steps.append((f"batch {bs}", {f"{stage}.batch_size": bs}))
        n = processes(sec.num_processes, gpus)
        while n < 4096:
            n *= 2
            steps.append((f"{n} GPUs", {f"{stage}.num_processes": n}))
    elif stage in ("generate", "evaluate"):
        return _engine_ladder("generate.engine", cfg.generate.engine, gpus)
    return steps


def _engine_ladder(key: str, engine: Any, gpus: int) -> list[tuple[str, dict[str, Any]]]:
    steps: list[tuple[str, dict[str, Any]]] = []
    if engine.gpu_memory_utilization < 0.95:
        steps.append(("a 95% memory share", {f"{key}.gpu_memory_utilization": 0.95}))
    tp = engine.tensor_parallel_size
    while tp < 64:
        tp *= 2
        steps.append((f"tensor parallel {tp}", {f"{key}.tensor_parallel_size": tp}))
    return steps


def _with(cfg: RunConfig, changes: dict[str, Any]) -> RunConfig | None:
    """cfg with `changes` (config paths) applied and validated; None when the result is not a valid config (e.g.
    a global batch that no longer divides)."""
    from pydantic import ValidationError

    data = cfg.model_dump(mode="json")
    for path, value in changes.items():
        node = data
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError:
        return None


def remedy(cfg: RunConfig, stage: str, gpus: int, device_bytes: int | None, shapes: dict[str, Shape], *,
           on_gpu: bool = True, base: tuple[str, dict[str, Any]] | None = None) -> tuple[dict[str, Any], list[str]] | None:  # fmt: skip
    """The change that makes `stage` fit: walk the stage's ladder adding one change at a time until every estimate
    fits, then take back each change the fit does not need. `base`: a change every answer keeps (the processes the
    GPUs allow). Returns ({config path: value}, labels), or None when nothing on the ladder fits."""
    if base is not None:
        start = _with(cfg, base[1])
        if start is None:
            return None
        found = remedy(start, stage, gpus, device_bytes, shapes, on_gpu=on_gpu)
        if found is None:
            return ({**base[1]}, [base[0]]) if all(
                e.fits for e in stage_estimates(start, stage, gpus, device_bytes, shapes, on_gpu=on_gpu)) else None
        return {**base[1], **found[0]}, [base[0], *found[1]]

    def fits(changes: dict[str, Any]) -> bool:
        c = _with(cfg, changes)
        if c is None:
            return False
        need = max(gpus, _gpus_needed(c, stage, gpus))
        return all(e.fits for e in stage_estimates(c, stage, need, device_bytes, shapes, on_gpu=on_gpu))

    applied: list[tuple[str, dict[str, Any]]] = []
    found = False
    for label, change in _ladder(cfg, stage, gpus):
        # a step replaces an earlier one of the same setting (micro-batch 2 -> 1, 16 -> 32 GPUs)
        applied = [(lab, ch) for lab, ch in applied if not set(ch) & set(change)] + [(label, change)]
        if fits(_merge(applied)):
            found = True
            break
    if not found:
        return None
    for step in list(applied[:-1]):  # take back what the fit does not need, earliest first
        rest = [s for s in applied if s is not step]
        if fits(_merge(rest)):
            applied = rest
    return _merge(applied), [label for label, _ in applied]


def _merge(steps: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _, change in steps:
        out.update(change)
    return out


def _gpus_needed(cfg: RunConfig, stage: str, gpus: int) -> int:
    """GPUs the stage's layout asks for (its processes × GPUs each)."""
    if stage == "train":
        return cfg.train.num_processes
    if stage in ("label", "reference"):
        sec = cfg.label if stage == "label" else cfg.reference
        if stage == "label" and cfg.label.labeller == "judge":
            return cfg.label.engine.tensor_parallel_size
        return processes(sec.num_processes, gpus)
    if stage in ("generate", "evaluate"):
        return cfg.generate.engine.tensor_parallel_size
    return 0


@dataclass
class StagePlan:
    """A stage's estimates on the given GPUs and, when it does not fit, the change that would."""

    stage: str
    estimates: list[Estimate]
    fix: dict[str, Any] | None = None
    fix_labels: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(e.fits for e in self.estimates)

    def message(self) -> str:
        """One line for a stage that does not fit: what, how much, and the change that fits (or that none does)."""
        worst = next(e for e in self.estimates if not e.fits)
        if worst.problem:
            need = worst.problem
        elif worst.minimum is not None:
            need = (f"its KV cache gets {worst.parts['kv_cache'] / GIB:.1f} GiB of the engine's share, less than one "
                    f"sequence of its context ({worst.minimum / GIB:.1f} GiB)")  # fmt: skip
        else:
            need = (f"needs {worst.total / GIB:.1f} GiB per GPU ({worst.what}), the GPUs have "
                    f"{worst.device_bytes / GIB:.1f} GiB")  # fmt: skip
        head = f"{self.stage}: does not fit: {need}"
        if self.fix:
            overrides = " ".join(f"{k}={_yaml(v)}" for k, v in self.fix.items())
            return f"{head}; it fits with {' + '.join(self.fix_labels)}: {overrides}"
        return f"{head}; nothing dice can change fits it (more GPU memory per GPU, or a smaller model)"


def _yaml(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


GPU_STAGES = ("generate", "label", "reference", "train", "evaluate")


def plan_stage(cfg: RunConfig, stage: str, gpus: int, device_bytes: int | None, shapes: dict[str, Shape] | None = None,
               *, on_gpu: bool = True) -> StagePlan:  # fmt: skip
    """One stage's plan on `gpus` GPUs of `device_bytes` each (None: no fixed device memory, nothing to refuse)."""
    shapes = shapes if shapes is not None else read_shapes(cfg)
    estimates = stage_estimates(cfg, stage, gpus, device_bytes, shapes, on_gpu=on_gpu)
    need = _gpus_needed(cfg, stage, gpus)
    if gpus and need > gpus:
        for e in estimates:
            e.problem = f"its layout uses {need} GPUs, {gpus} are available"
    sp = StagePlan(stage, estimates)
    if not sp.fits and device_bytes is not None:
        base = None
        if gpus and need > gpus and stage in ("train", "label", "reference"):  # first, as many processes as GPUs
            key = "train.num_processes" if stage == "train" else f"{stage}.num_processes"
            base = (f"{gpus} process(es)", {key: gpus})
        found = remedy(cfg, stage, gpus, device_bytes, shapes, on_gpu=on_gpu, base=base)
        if found:
            sp.fix, sp.fix_labels = found
    return sp


def device_memory(cfg: RunConfig) -> tuple[int, int | None]:
    """(GPUs visible, bytes per GPU the plan assumes): `gpu_memory_gib`, or the smallest visible GPU's memory;
    (0, None) on a machine without CUDA and no `gpu_memory_gib` (nothing to plan against)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.gpu_memory_gib:
        return gpus, int(cfg.gpu_memory_gib * GIB)
    if not gpus:
        return 0, None
    return gpus, min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus))


def preflight(cfg: RunConfig, stage: str) -> StagePlan | None:
    """Refuse, before `stage` loads anything, a layout whose memory plan does not fit this machine's GPUs (or
    `gpu_memory_gib`); skipped on CPU without `gpu_memory_gib`, and with `memory_check: false`.

    Raises:
        ValueError: the stage does not fit; the message names the change that would (`StagePlan.message`).
    """
    if not cfg.memory_check or stage not in GPU_STAGES:
        return None
    gpus, device_bytes = device_memory(cfg)
    if device_bytes is None:
        return None
    if stage == "label" and cfg.label.labeller == "python":
        return None
    sp = plan_stage(cfg, stage, gpus, device_bytes, on_gpu=True)
    if not sp.fits:
        raise ValueError(f"memory plan: {sp.message()} (dice plan CONFIG --gpus N --gpu-memory GIB shows the table; "
                         "memory_check=false starts it anyway)")  # fmt: skip
    return sp
