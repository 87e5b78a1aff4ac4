"""Stage `train`: preference training of π_k from π_{k-1} under DeepSpeed (ZeRO 0-3).

Reads `reference.parquet` (pairs + reference log-probs: no reference model is resident) and the initial
model; writes a consolidated Hugging Face safetensors checkpoint (`checkpoint/`, with the tokenizer) and
per-step metrics (`train_metrics.parquet`, TRAIN_METRICS).

Chosen and rejected responses of a micro-batch go through the model in one forward pass. By default
(`train.packing`) that pass is one padding-free row in which each pair is [prompt | chosen | rejected]: the
prompt is computed once, rejected attends to the prompt and to itself only, and the LM head runs only where a
response token is predicted (pipeline.compute.packing; exact, the same numbers as the padded pass). Models packing
cannot handle take padded micro-batches. Batches are length-grouped (pairs of similar length share a
micro-batch), which also keeps the padded path's padding low. The data order
is a seeded permutation; a global batch is split evenly across processes and micro-batches, so 1 and N
processes see the same global batches. A global batch that runs short at the end is filled by wrapping
around to the start, so every pair is trained on.

Processes: `train.num_processes = 1` trains in this process; N > 1 runs N ranks of this module under the
DeepSpeed launcher (pipeline.compute.launch, shared with the scoring stages: gloo on CPU, NCCL on GPU, a free master
port, `train.hostfile` for several nodes), and every rank's output appears in this process's output.

    python -m stages.train conf/tiny.yaml --round 1
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.compute import launch
from pipeline.config import LossType, RunConfig
from pipeline.data import schemas
from pipeline.data.artifacts import (
    StagePlan,
    iter_parquet,
    plan_digest,
    read_parquet,
    replace_dir,
    write_json_atomic,
    write_parquet,
)
from pipeline.run import tracking

# ---------------------------------------------------------------------------------------------- data


def load_pairs(path: Path, tokenizer, cfg: RunConfig) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Encode the round's pairs with what the configured loss needs; returns (examples, counts of dropped ones).

    Raises on input that would train on garbage: missing reference columns, NaN reference log-probs,
    an empty file. Pairs with chosen == rejected (zero signal) and pairs over `model.max_length` are
    dropped and counted. Each example holds the (prompt, response) ids of chosen and rejected, their
    reference log-probs in the configured reduction, the smoothed preference p̂ (ipo_soft, irepo), and
    for sr_dpo/sr_ipo the ids of both responses after the quality-prefixed prompt. The ids are reference.parquet's
    (the sampled tokens of generated pairs, offline pairs as the reference stage tokenised them); a file written
    before ids were stored is tokenised here, as it was then.
    """
    import torch

    from pipeline.compute.logprobs import encode_prompts, encode_rows, stored_ids
    from pipeline.data.chat import prompts_of, with_prefix
    from pipeline.method.losses import SR_QUALITY_PREFIX, smooth_preference

    t = cfg.train
    logps = read_parquet(path, schemas.REFERENCE, columns=["ref_chosen_logps", "ref_rejected_logps"])
    if logps.num_rows == 0:
        raise ValueError(f"{path}: no pairs to train on")
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        bad = [i for i, v in enumerate(logps[col].to_pylist()) if v is None or not math.isfinite(v)]
        if bad:
            raise ValueError(f"{path}: column {col} is not finite in row {bad[0]} ({len(bad)} rows); re-run the reference stage")
    refined = t.loss in (LossType.SR_DPO, LossType.SR_IPO)

    def encoded(prompts: list, chosen: list[str], rejected: list[str], ids: list[list]) -> tuple[list, list]:
        # (chosen, rejected) encodings: the pairs' token ids as the reference stage scored them (`ids`: the prompt,
        # chosen and rejected columns), the texts tokenised only for pairs written without them (each prompt rendered
        # once); int32 arrays, 4 bytes a token (a Python list costs ~36): the examples live for the whole training
        p_ids, c_ids, r_ids = ids
        both = [(np.asarray(p, np.int32), np.asarray(y, np.int32))
                for p, y in encode_rows(tokenizer, prompts * 2, chosen + rejected, p_ids * 2, c_ids + r_ids)]  # fmt: skip
        return both[: len(prompts)], both[len(prompts) :]

    examples, identical, too_long = [], 0, 0
    columns = ["prompt", "prompt_messages", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps", "chosen_tokens",
               "rejected_tokens", "annotators", "preference"]  # fmt: skip
    id_columns = ["prompt_token_ids", "chosen_token_ids", "rejected_token_ids"]
    # a row group at a time: the examples keep views of each group's ids, its texts are let go
    batches = (b for group in iter_parquet(path, schemas.REFERENCE, columns + id_columns)
               for b in group.to_batches(max_chunksize=2048))  # fmt: skip
    for batch in batches:  # texts: Python a batch at a time
        d, prompts = batch.select(columns).to_pydict(), prompts_of(batch)  # the conversation where the pair has one
        ids = [stored_ids(batch.column(c)) for c in id_columns]
        chosen, rejected = encoded(prompts, d["chosen"], d["rejected"], ids)
        if refined:  # Δ's forward passes see P ⊕ x (METHODS §4), before the last user turn's text: that prompt is
            # tokenised here, the responses are the same ids
            prefixed = [np.asarray(p, np.int32) for p in encode_prompts(tokenizer, [with_prefix(p, SR_QUALITY_PREFIX)
                                                                                    for p in prompts])]  # fmt: skip
            chosen_p = [(p, y) for p, (_, y) in zip(prefixed, chosen)]
            rejected_p = [(p, y) for p, (_, y) in zip(prefixed, rejected)]
        for i in range(batch.num_rows):
            if d["chosen"][i] == d["rejected"][i]:
                identical += 1
                continue
            ex: dict[str, Any] = {"chosen": chosen[i], "rejected": rejected[i]}
            if refined:
                ex["chosen_prefixed"], ex["rejected_prefixed"] = chosen_p[i], rejected_p[i]
            if max(len(p) + len(y) for p, y in ex.values()) > cfg.model.max_length:
                too_long += 1
                continue
            # reference.parquet stores summed log-probs; the per-token mean divides by the same response tokens
            ex["ref_chosen"] = d["ref_chosen_logps"][i] / (d["chosen_tokens"][i] if t.reduction == "mean" else 1)
            ex["ref_rejected"] = d["ref_rejected_logps"][i] / (d["rejected_tokens"][i] if t.reduction == "mean" else 1)
            n = d["annotators"][i]
            ex["preference"] = smooth_preference(
                torch.tensor([d["preference"][i] * n], dtype=torch.float64), n, t.preference_smoothing, t.preference_clip
            ).item() if t.loss == LossType.IREPO else d["preference"][i]  # fmt: skip
            examples.append(ex)
    if not examples:
        raise ValueError(f"{path}: every pair was dropped ({identical} identical, {too_long} too long)")
    return examples, {"dropped_identical": identical, "dropped_too_long": too_long}


def global_batches(n: int, lengths: list[int], global_batch: int, epochs: int, seed: int) -> list[list[int]]:
    """Seeded, length-grouped global batches of example indices.

    Each epoch: a seeded permutation, cut into windows of 8 global batches, sorted by length inside each
    window (so micro-batches hold similar lengths), cut into global batches, whose order is shuffled again.
    """
    rng = random.Random(seed)
    batches: list[list[int]] = []
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        if len(order) % global_batch:
            order += order[: global_batch - len(order) % global_batch]  # wrap around: no pair left out
        window = global_batch * 8
        epoch_batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
            epoch_batches += [chunk[j : j + global_batch] for j in range(0, len(chunk), global_batch)]
        rng.shuffle(epoch_batches)
        batches += epoch_batches
    return batches


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def deepspeed_config(cfg: RunConfig, world: int, on_gpu: bool) -> dict[str, Any]:
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * world):
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size × processes "
            f"({t.micro_batch_size} × {world})"
        )
    bf16 = t.bf16 if t.bf16 is not None else on_gpu
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world),
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": {
            "stage": t.resolved_zero_stage(world),
            "stage3_gather_16bit_weights_on_model_save": True,
            **({"offload_optimizer": {"device": "cpu", "pin_memory": on_gpu}} if t.offload_optimizer else {}),
            **({"offload_param": {"device": "cpu", "pin_memory": on_gpu}} if t.offload_params else {}),
        },
        # dice passes a torch AdamW unless the DeepSpeed JSON names an optimizer: no JIT-built op is needed,
        # and ZeRO-Offload accepts it (DeepSpeedCPUAdam is faster: name it in train.deepspeed_config).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.deepspeed_config:
        p = Path(t.deepspeed_config)
        try:
            override = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: cannot read the DeepSpeed config: {e}") from e
        _merge(ds, override)
    return ds


def adamw(params: list[Any], lr: float, weight_decay: float):
    """torch's AdamW, fused (one kernel for every tensor's update, the optimizer TRL picks: `adamw_torch_fused`)
    where torch has the fused kernel for the parameters' device and dtypes (CPU and CUDA: float32, bfloat16,
    float16); else its default implementation. The same update either way, up to float rounding."""
    import torch

    fusable = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params
    )
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fusable or None)


def _merge(base: dict, override: dict) -> None:
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


# ---------------------------------------------------------------------------------------------- resume


def deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed 0.19's checkpoints hold besides tensors and plain containers (ZeRO-1/2/3 optimizer
    state: the ZeRO stage enum and the loss scaler object), allowed to `torch.load(weights_only=True)`."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def weights_only_loading(engine) -> None:
    """Make the engine read its checkpoints with `torch.load(weights_only=True)`: DeepSpeed's own loader unpickles
    anything (weights_only=False), and a resume checkpoint is a file on disk like any other artifact. Only tensors,
    plain containers and the classes of `deepspeed_safe_globals` are accepted; anything else fails the load."""
    import torch
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(
            f"train.deepspeed_config selects the {type(current).__name__} checkpoint engine; dice resumes only "
            "from DeepSpeed's torch checkpoint engine, which it loads without unpickling code"
        )

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    current.__class__ = WeightsOnlyCheckpointEngine


class TrainState:
    """DeepSpeed checkpoints every `train.checkpoint_every` steps, so a killed training resumes mid-way.

    `resume.json` (written after the checkpoint, atomically) records the tag, the metrics so far and the
    digest of the plan (config + input fingerprints): a checkpoint of different work is never resumed.
    """

    def __init__(self, directory: Path, digest: str):
        self.dir, self.digest = directory, digest
        self.info = self.dir / "resume.json"

    def resume(self, engine) -> list[dict[str, Any]]:
        try:
            info = json.loads(self.info.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return []
        if info.get("digest") != self.digest:
            return []
        weights_only_loading(engine)
        engine.load_checkpoint(str(self.dir), tag=info["tag"])
        return info["metrics"]

    def save(self, engine, metrics: list[dict[str, Any]], rank: int) -> None:
        tag = f"step-{len(metrics)}"
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)  # every rank writes its shard
        launch.barrier()
        if rank == 0:
            write_json_atomic(self.info, {"digest": self.digest, "tag": tag, "metrics": metrics})
            for old in self.dir.glob("step-*"):
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        launch.barrier()


# ---------------------------------------------------------------------------------------------- worker


def train_worker(cfg: RunConfig, plan: StagePlan) -> dict[str, Any]:
    """One rank's training. Rank 0 writes the outputs. Returns stats (rank 0)."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline.compute.logprobs import ResponseScorer, collate, require_model
    from pipeline.compute.packing import enable_packing, pack
    from pipeline.method.losses import preference_loss, refinement_delta

    on_gpu = torch.cuda.is_available()
    launch.init_distributed()
    rank, world = launch.rank(), launch.world()
    t = cfg.train
    torch.manual_seed(cfg.seed)
    init = str(plan.inputs["init"])
    init = require_model(init)  # the local folder (a Hub id's snapshot)
    tokenizer = AutoTokenizer.from_pretrained(init, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples, dropped = load_pairs(Path(plan.inputs["reference"]), tokenizer, cfg)

    ds_config = deepspeed_config(cfg, world, on_gpu)
    bf16 = ds_config["bf16"]["enabled"]
    # Kept alive through from_pretrained so ZeRO-3 partitions weights as they load (no full copy per rank).
    hf_ds = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None  # noqa: F841
    model = AutoModelForCausalLM.from_pretrained(
        init,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=True,
    )
    # Packed micro-batches (pipeline.compute.packing): one padding-free row, each pair as [prompt | chosen | rejected].
    unpackable = enable_packing(model, cfg.model.max_length) if t.packing else "train.packing is off"
    if rank == 0 and t.packing and unpackable:
        print(f"train round {plan.round}: padded micro-batches ({unpackable})", flush=True)
    packed = unpackable is None
    if t.gradient_checkpointing:
        # Each decoder layer keeps only its input and is recomputed in the backward pass. Non-reentrant torch
        # checkpointing: the recompute gets the layer's keyword arguments (the packed attention's calls) as they
        # were, and ZeRO-3 gathers the layer's parameters again through its module hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(pairs: list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]]) -> tuple[Any, int]:
        """(2b,) response log-probs of b (chosen, rejected) encodings, chosen rows first; and the logical tokens."""
        if packed:
            batch = pack([(c[0], [c[1], r[1]]) for c, r in pairs]).to(device)  # chosen and rejected share the prompt
            logps = engine(packed=batch, reduction=t.reduction)  # (2b,) c_0, r_0, c_1, r_1, ...
            return logps.view(len(pairs), 2).t().reshape(-1), batch.tokens  # (2b,) chosen then rejected
        input_ids, attention, response = (
            x.to(device) for x in collate([c for c, _ in pairs] + [r for _, r in pairs], tokenizer.pad_token_id)
        )
        return engine(input_ids, attention, response, t.reduction), int(attention.sum().item())  # (2b,)

    lengths = [len(e["chosen"][0]) + max(len(e["chosen"][1]), len(e["rejected"][1])) for e in examples]
    batches = global_batches(len(examples), lengths, t.global_batch_size, t.epochs, cfg.seed)
    total_steps = len(batches)
    scorer = ResponseScorer(model)  # the engine's forward returns (2b,) response log-probs
    if "optimizer" in ds_config:  # the user's DeepSpeed JSON chose the optimizer (e.g. DeepSpeedCPUAdam)
        engine, optimizer, _, _ = deepspeed.initialize(model=scorer, model_parameters=scorer.parameters(), config=ds_config)
    else:
        optimizer = adamw(list(scorer.parameters()), t.learning_rate, t.weight_decay)
        engine, optimizer, _, _ = deepspeed.initialize(model=scorer, optimizer=optimizer, config=ds_config)
    # The schedule drives the torch optimizer inside DeepSpeed's ZeRO wrapper; the engine steps it at
    # accumulation boundaries and saves/restores it with its checkpoints.
    base_optimizer = getattr(optimizer, "optimizer", optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(base_optimizer, lr_lambda(t.lr_schedule, t.warmup_steps, total_steps))
    engine.lr_scheduler = scheduler
    engine.train()
    device = engine.device
    mb, per_rank = t.micro_batch_size, t.global_batch_size // world
    stage = ds_config["zero_optimization"]["stage"]
    own_grad_norm = None
    steps_per_epoch = total_steps / t.epochs
    state = TrainState(plan.round_dir / ".dice" / "train-state", plan_digest(plan)) if t.checkpoint_every else None
    metrics: list[dict[str, Any]] = state.resume(engine) if state else []
    if metrics and rank == 0:
        print(f"train round {plan.round}: resuming after step {len(metrics)}/{total_steps} from {state.dir}", flush=True)
    tracker = tracking.train_tracker(cfg, plan, rank)  # log.report_to's dashboards, from rank 0
    for step, batch in enumerate(batches):
        if step < len(metrics):  # done before an interruption; the seeded order makes the rest identical
            continue
        started = time.perf_counter()
        lr_used = scheduler.get_last_lr()[0]  # the rate this step's update uses (the engine steps the schedule after)
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        sums = [0.0] * 6  # loss, chosen_r, rejected_r, correct, pairs, tokens: this rank's, then every rank's
        for start in range(0, per_rank, mb):
            ex = [examples[i] for i in mine[start : start + mb]]
            b = len(ex)
            prefixed = None
            if t.loss in (LossType.SR_DPO, LossType.SR_IPO):
                # Δ's extra pass: the same responses after the quality-prefixed prompt, current policy, no
                # gradient. Run before the training forward so ZeRO-3's parameter fetch order stays the same.
                with torch.no_grad():
                    prefixed, _ = forward([(e["chosen_prefixed"], e["rejected_prefixed"]) for e in ex])  # (2b,)
            # chosen and rejected in one forward pass: [0, b) chosen, [b, 2b) rejected
            logps, tokens = forward([(e["chosen"], e["rejected"]) for e in ex])  # (2b,) response log-probs
            as_tensor = lambda key: torch.tensor([e[key] for e in ex], dtype=logps.dtype, device=device)  # noqa: E731
            delta = None if prefixed is None else refinement_delta(prefixed[:b], prefixed[b:], logps[:b], logps[b:])
            losses, cr, rr = preference_loss(
                t.loss, logps[:b], logps[b:], as_tensor("ref_chosen"), as_tensor("ref_rejected"),
                beta=t.beta, label_smoothing=t.label_smoothing, tau=t.tau, preference=as_tensor("preference"),
                delta=delta, sr_lambda=t.sr_lambda,
            )  # fmt: skip
            engine.backward(losses.mean())
            if stage == 0 and engine.is_gradient_accumulation_boundary():
                # ZeRO-0 reports no gradient norm: take it (before clipping, as ZeRO does) from the full grads
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                own_grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
            engine.step()
            step_sums = (losses.detach().sum().item(), cr.sum().item(), rr.sum().item(), (cr > rr).sum().item(), b, tokens)
            sums = [a + x for a, x in zip(sums, step_sums)]
        # summed on the rank's device (launch.sum_across): NCCL takes no CPU tensor
        loss, cr_sum, rr_sum, correct, n, tokens = launch.sum_across(sums)
        elapsed = time.perf_counter() - started
        if not math.isfinite(loss):
            raise FloatingPointError(f"round {plan.round}: training loss became {loss} at step {step}; lower train.learning_rate")
        grad_norm = engine.get_global_grad_norm() if stage else own_grad_norm
        metrics.append(
            {
                "step": step,
                "epoch": (step + 1) / steps_per_epoch,
                "loss": loss / n,
                "chosen_reward": cr_sum / n,
                "rejected_reward": rr_sum / n,
                "margin": (cr_sum - rr_sum) / n,
                "accuracy": correct / n,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "learning_rate": lr_used,
                "tokens": int(tokens),
                "tokens_per_s": tokens / max(elapsed, 1e-9),
                "seconds": elapsed,
            }
        )
        tracker.log_step(metrics[-1])
        if rank == 0:
            m = metrics[-1]
            print(
                f"train round {plan.round} step {step + 1}/{total_steps} loss {m['loss']:.4f} "
                f"acc {m['accuracy']:.2f} margin {m['margin']:.4f} lr {m['learning_rate']:.2e} "
                f"{m['tokens_per_s']:.0f} tok/s",
                flush=True,
            )
        if state and (step + 1) % t.checkpoint_every == 0 and step + 1 < total_steps:
            state.save(engine, metrics, rank)
    tracker.close()

    # The trained engine's own log-probs of two chosen responses: the saved checkpoint must reproduce them.
    engine.eval()
    with torch.no_grad():
        probe = [examples[i]["chosen"] for i in range(min(2, len(examples)))]
        ids, att, resp = (x.to(device) for x in collate(probe, tokenizer.pad_token_id))
        probe_logps = engine(ids, att, resp, "sum").tolist()

    # Consolidate the (possibly partitioned) weights: every rank takes part, rank 0 writes.
    if ds_config["zero_optimization"]["stage"] == 3:
        weights = engine._zero3_consolidated_16bit_state_dict()
    else:
        weights = engine.module.state_dict() if rank == 0 else None
    if weights is not None:  # keys of the wrapper are "lm.<name>": the checkpoint is the bare model
        weights = {k.removeprefix("lm."): v for k, v in weights.items()}
    if rank == 0:
        final = Path(plan.outputs["checkpoint"])
        tmp = final.with_name(f".{final.name}.writing")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.lm.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_parquet(pa.Table.from_pylist(metrics, schema=schemas.TRAIN_METRICS), plan.outputs["metrics"], schemas.TRAIN_METRICS)
        replace_dir(tmp, final)
        if state:
            shutil.rmtree(state.dir, ignore_errors=True)  # the final checkpoint supersedes it
    launch.barrier()
    last = metrics[-1]
    return {
        "pairs": len(examples),
        **dropped,
        "steps": total_steps,
        "processes": world,
        "zero_stage": stage,
        "gradient_checkpointing": t.gradient_checkpointing,
        "final_loss": last["loss"],
        "final_accuracy": last["accuracy"],
        "final_margin": last["margin"],
        "mean_loss_first_step": metrics[0]["loss"],
        "tokens_per_s": float(np.mean([m["tokens_per_s"] for m in metrics])),
        "probe_chosen_logps": probe_logps,
    }


# ---------------------------------------------------------------------------------------------- launching


def planned_zero_stage(cfg: RunConfig, plan: StagePlan) -> RunConfig:
    """cfg with `train.zero_stage: auto` decided by the memory plan on GPUs (the smallest stage that fits them,
    pipeline.compute.memory.choose_zero_stage), once here so every rank gets the same; unchanged on CPU."""
    from pipeline.compute import memory
    from pipeline.compute.logprobs import require_model

    t = cfg.train
    if t.zero_stage != "auto":
        return cfg
    _, device_bytes = memory.device_memory(cfg)
    if device_bytes is None:
        return cfg
    shape = memory.read_shape(require_model(str(plan.inputs["init"])))
    stage = memory.choose_zero_stage(cfg, shape, t.num_processes, device_bytes)
    print(f"train round {plan.round}: zero_stage auto -> {stage} (the smallest that fits {device_bytes / memory.GIB:.0f} "
          "GiB per GPU)", flush=True)  # fmt: skip
    return cfg.model_copy(update={"train": t.model_copy(update={"zero_stage": stage})})


def run(cfg: RunConfig, plan: StagePlan) -> dict[str, Any]:
    """Train in this process (1 process) or on N DeepSpeed ranks (pipeline.compute.launch)."""
    from pipeline.compute.logprobs import require_model

    t = cfg.train
    n, hostfile = t.num_processes, t.hostfile
    launch.check(n, hostfile, "train.num_processes")
    world = launch.world_size(n, hostfile)  # every node's processes share each global batch
    if t.global_batch_size % (t.micro_batch_size * world):
        raise ValueError(f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size × "
                         f"processes ({t.micro_batch_size} × {world}: train.num_processes={n} on each host of "
                         f"train.hostfile {hostfile})")  # fmt: skip
    require_model(str(plan.inputs["init"]))  # a Hub model fetched once here, before any rank (or node) needs it
    cfg = planned_zero_stage(cfg, plan)
    return launch.run("train", cfg, plan, n, train_worker, hostfile=hostfile, what="training")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        from stages.common import worker_main

        worker_main("train", train_worker)
    else:
        from stages.common import main

        main("train", run)
