"""Training throughput: dice's `train` stage against TRL's DPOTrainer, same model, same pairs, same run.

    .venv/bin/python benchmarks/train_throughput.py [--pairs 256 --hidden 256 --layers 6 --device cpu ...]

What it does (benchmarks/README.md has the settings and a measured run):

1. Builds a tiny Llama with `pipeline.run.tiny.build_tiny_model` once into `benchmarks/out/models/<shape>/` and
   reuses it.
2. Builds N preference pairs from `data/offline_prefs.jsonl` (240 pairs, replicated; a share of them get
   other pairs' responses appended, for a long tail of lengths) and prints the token-length distribution.
3. Scores the reference log-probs ONCE (`pipeline.compute.logprobs.score`, the initial model, fp32) and hands the
   same numbers to both trainers: dice reads them from `round-0/reference.parquet` (REFERENCE schema),
   TRL from the dataset columns `ref_chosen_logps`/`ref_rejected_logps` with `precompute_ref_log_probs=True`
   (its own precomputation pass is skipped, so it trains on exactly these numbers).
4. Runs each trainer in its own subprocess (`benchmarks.harness.run_child`): dice as users launch it
   (`python -m stages.train CONF --round 0`), TRL through this file's `--worker trl` mode, both on `--device`
   (cpu: fp32; cuda: bf16, dice's `device: cuda` and `train.bf16`, TRL's `bf16` without `use_cpu`). The parent
   timestamps every step's end as it appears on the child's stdout (dice prints one line per optimizer
   step; the TRL worker prints one from a callback's `on_step_end`). The timed region is the end of warm-up
   step 2 to the end of the last step: model loading, data preparation and dice's checkpoint
   consolidation are outside it. Peak memory is the child's RSS high-water mark (`os.wait4` rusage).
5. Runs each trainer at every micro-batch of `--micro-batch` (default 1,2,4,8; the global batch is fixed), and
   with `--repeats N` all of them N times, micro-batch by micro-batch with the trainers side by side. Each repeat's
   ratio is dice's fastest run of the repeat over TRL's (each at its best setting); prints every repeat's ratio and
   their median, the headline number, and the same ratios at each micro-batch (where memory is compared); the
   tables show each (trainer, micro-batch)'s median run and each trainer's median best run.
   Checks that TRL's trainer holds no reference model (`ref_model is None` under precompute_ref_log_probs).
6. Prints a table and writes `benchmarks/out/train_throughput.json`.

7. Measures the machine's GEMM peak in the same run (`--worker gemm`: fp32 `torch.mm` on the trainers' device
   and threads, the model's own layer shapes and large squares, before and after the trainers; the best is the
   peak) and reports each trainer's FLOP/s against it: executed (the positions its forward passes ran, padding and
   TRL's full-sequence LM head included; attention over the (query, key) pairs its kernels compute) and useful (the
   same model FLOPs of the counted tokens for both: each sequence causal, unpadded). 6 FLOPs per parameter per
   position (forward 2, backward 4), 12·hidden per attention pair per layer.

`--profile-dice` adds a third, smaller dice run under timers (forward / log-probs / backward / step /
collate) and torch.profiler, written to `benchmarks/out/dice_profile*.txt`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import OUT, RESULT, alternate, child_env, foreign_share, git_state, median, middle  # noqa: I001
from benchmarks.harness import ratio_line, ratios, run_child, shown, versions

DATA = REPO / "data" / "offline_prefs.jsonl"
DICE_STEP = re.compile(r"^train round 0 step (\d+)/(\d+) ")
TRL_STEP = re.compile(r"^BENCH_STEP (\d+)")


# ---------------------------------------------------------------------------------------------- inputs


def model_dir(args: argparse.Namespace) -> Path:
    """The tiny model's folder, named after its shape flags (the label benchmark shares it)."""
    return OUT / "models" / (f"h{args.hidden}-i{args.intermediate}-l{args.layers}-a{args.heads}-kv{args.kv_heads}"
                             f"-v{args.vocab}-sft{args.sft_steps}-s{args.seed}")  # fmt: skip


def build_model(args: argparse.Namespace) -> tuple[Path, float]:
    """Build the tiny model once (reused when the folder exists). Returns (path, seconds spent building)."""
    from pipeline.run.tiny import TinySpec, build_tiny_model

    path, started = model_dir(args), time.perf_counter()
    if (path / "model.safetensors").is_file():
        return path, 0.0
    spec = TinySpec(vocab_size=args.vocab, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                    heads=args.heads, kv_heads=args.kv_heads, max_positions=1024, sft_steps=args.sft_steps,
                    seed=args.seed)  # fmt: skip
    build_tiny_model(path, [REPO / "data/prompts.jsonl", DATA], spec)
    return path, time.perf_counter() - started


def build_pairs(tokenizer, args: argparse.Namespace) -> list[dict[str, Any]]:
    """N pairs from the offline set: replicated, and a share (`--long-frac`) made long by appending other pairs'
    responses of the same side, as long as prompt+response stays within `--max-len` tokens."""
    from pipeline.compute.logprobs import encode

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    rng = random.Random(args.seed)
    pairs = []
    for i in range(args.pairs):
        base = rows[i % len(rows)]
        prompt, sides = base["prompt"], {"chosen": base["chosen"], "rejected": base["rejected"]}
        if rng.random() < args.long_frac:
            for side in sides:
                for _ in range(rng.randint(1, 4)):  # 1-4 more responses: a tail up to ~`max_len` tokens
                    longer = sides[side] + "\n\n" + rng.choice(rows)[side]
                    p, y = encode(tokenizer, prompt, longer)
                    if len(p) + len(y) > args.max_len:
                        break
                    sides[side] = longer
        if sides["chosen"] == sides["rejected"]:
            continue
        c, r = encode(tokenizer, prompt, sides["chosen"]), encode(tokenizer, prompt, sides["rejected"])
        if max(len(c[0]) + len(c[1]), len(r[0]) + len(r[1])) > args.max_len:
            continue  # never here for the shipped data; kept so both trainers see the same pairs whatever the flags
        pairs.append({"pair_id": f"b{i:05d}-{base['pair_id']}", "prompt": prompt, **sides, "enc_c": c, "enc_r": r})
    return pairs


def percentiles(values: list[int]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(values)
    q = dict(zip(["p0", "p10", "p50", "p90", "p99", "max"], np.percentile(a, [0, 10, 50, 90, 99, 100]).tolist()))
    return {**{k: round(v, 1) for k, v in q.items()}, "mean": round(float(a.mean()), 1)}


def length_stats(pairs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Percentiles of the prompt, chosen, rejected and whole-pair token counts (what both trainers see)."""
    prompt, chosen, rejected = ([len(p[k][i]) for p in pairs] for k, i in (("enc_c", 0), ("enc_c", 1), ("enc_r", 1)))
    per_pair = [2 * a + b + c for a, b, c in zip(prompt, chosen, rejected)]
    return {"prompt_tokens": percentiles(prompt), "chosen_tokens": percentiles(chosen),
            "rejected_tokens": percentiles(rejected), "pair_tokens (prompt+chosen + prompt+rejected)": percentiles(per_pair)}  # fmt: skip


def score_reference(model_path: Path, pairs: list[dict[str, Any]], device: str) -> float:
    """Reference log-probs of every pair under the initial model (fp32 on `device`), in place. Returns seconds."""
    import torch

    from pipeline.compute.logprobs import load_causal_lm, score

    started = time.perf_counter()
    model, tok = load_causal_lm(str(model_path), "float32", device=torch.device(device))
    encoded = [p["enc_c"] for p in pairs] + [p["enc_r"] for p in pairs]
    logps = score(model, encoded, tok.pad_token_id, batch_size=16)
    for i, p in enumerate(pairs):
        p["ref_chosen_logps"], p["ref_rejected_logps"] = float(logps[i]), float(logps[len(pairs) + i])
    del model
    return time.perf_counter() - started


def write_reference(pairs: list[dict[str, Any]], path: Path) -> None:
    """reference.parquet as the reference stage writes it for round 0's offline pairs (REFERENCE schema).

    Columns are filled by name from the schema in force, so added nullable columns stay empty."""
    import pyarrow as pa

    from pipeline.data import schemas
    from pipeline.data.artifacts import write_parquet

    n = len(pairs)
    known: dict[str, list[Any]] = {
        **{k: [p[k] for p in pairs] for k in ("pair_id", "prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")},
        "prompt_id": [p["pair_id"].split("-", 1)[1] for p in pairs],
        "source": ["offline"] * n, "preference": [1.0] * n, "annotators": [1] * n, "round": [0] * n,  # offline pairs
        "chosen_tokens": [len(p["enc_c"][1]) for p in pairs], "rejected_tokens": [len(p["enc_r"][1]) for p in pairs],
    }  # fmt: skip
    columns = {}
    for field in schemas.REFERENCE:
        if field.name in known:
            columns[field.name] = pa.array(known[field.name], field.type)
        elif field.nullable:  # offline pairs carry no reward, length or α
            columns[field.name] = pa.nulls(n, field.type)
        else:
            raise ValueError(f"REFERENCE column {field.name} is required and this benchmark does not know how to fill it")
    write_parquet(pa.table(columns), path, schemas.REFERENCE)


def dice_config(args: argparse.Namespace, model: Path, zero_stage: int | str, name: str):
    """sigmoid DPO on the benchmark's pairs, the same problem as TRL's; on cuda bf16, on cpu fp32 with no GPU seen."""
    from pipeline.config import load_config

    cuda = args.device == "cuda"
    return load_config(None, [
        f"name={name}", f"runs_dir={OUT / 'runs'}", f"seed={args.seed}", f"device={args.device}",
        f"model.policy={model}", "model.build_tiny_if_missing=false", "model.max_length=1024",
        f"model.dtype={'bfloat16' if cuda else 'float32'}", f"data.offline={DATA}", "round0.mode=offline_dpo",
        "train.loss=dpo", f"train.beta={args.beta}", f"train.learning_rate={args.lr}", "train.epochs=1",
        "train.lr_schedule=constant_with_warmup", "train.warmup_steps=0", "train.max_grad_norm=1.0",
        "train.weight_decay=0.0", f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.global_batch}", "train.num_processes=1", f"train.zero_stage={zero_stage}",
        f"train.bf16={str(cuda).lower()}",
        "train.checkpoint_every=0",  # periodic resume checkpoints would land inside the timed steps
    ])  # fmt: skip


def dice_computed_tokens(pairs: list[dict[str, Any]], args: argparse.Namespace, packing: bool) -> list[int]:
    """Positions dice's forward passes run per optimizer step, its batching replayed with its own functions:
    packed (`train.packing`, the default), each pair's row [prompt | chosen | rejected] with the prompt once and
    each response's last token only a target (pipeline.compute.packing); padded, rows × width per micro-batch."""
    from stages.train import global_batches

    lengths = [len(p["enc_c"][0]) + max(len(p["enc_c"][1]), len(p["enc_r"][1])) for p in pairs]
    row = [len(p["enc_c"][0]) + len(p["enc_c"][1]) + len(p["enc_r"][1]) - 2 for p in pairs]  # a pair's packed row
    out = []
    for batch in global_batches(len(pairs), lengths, args.global_batch, 1, args.seed):
        micro = [batch[s : s + args.micro_batch] for s in range(0, len(batch), args.micro_batch)]
        per_micro = (sum(row[i] for i in mb) if packing else 2 * len(mb) * max(lengths[i] for i in mb) for mb in micro)
        out.append(sum(per_micro))
    return out


def flop_model(conf) -> dict[str, float]:
    """Training FLOPs of the model's parts: per position through the decoder layers' linears, per position through
    the LM head, per (query, key) attention pair (all layers): 6 per parameter (forward 2, backward 4), 12·hidden per
    pair per layer (QKᵀ and AV, 2·hidden each, forward; backward twice that)."""
    h, i, layers = conf.hidden_size, conf.intermediate_size, conf.num_hidden_layers
    kv = conf.num_key_value_heads * (h // conf.num_attention_heads)
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i  # q, k, v, o, gate, up, down
    return {"decoder": 6.0 * layers * per_layer, "head": 6.0 * conf.vocab_size * h, "pair": 12.0 * h * layers}


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def useful_flops_per_token(pairs: list[dict[str, Any]], fm: dict[str, float]) -> float:
    """Model FLOPs per counted token, the same for both trainers: every sequence (prompt+chosen, prompt+rejected) on
    its own, causal, unpadded, the LM head at every position, averaged over all pairs."""
    seqs = [len(p[k][0]) + len(p[k][1]) for p in pairs for k in ("enc_c", "enc_r")]
    return fm["decoder"] + fm["head"] + fm["pair"] * sum(map(causal_pairs, seqs)) / sum(seqs)


def dice_executed_flops(pairs: list[dict[str, Any]], args: argparse.Namespace, fm: dict[str, float]) -> list[float]:
    """FLOPs dice's packed forward/backward passes execute per optimizer step (its batching replayed): each pair's row
    [prompt | chosen | rejected] (a response's last token only a target) through the decoder, the LM head at the c + r
    positions that predict a response token, attention causal within prompt+chosen and from each rejected position
    to the prompt and the rejected tokens before it."""
    from stages.train import global_batches

    lengths = [len(p["enc_c"][0]) + max(len(p["enc_c"][1]), len(p["enc_r"][1])) for p in pairs]

    def flops(pair: dict[str, Any]) -> float:
        n_p, n_c, n_r = len(pair["enc_c"][0]), len(pair["enc_c"][1]), len(pair["enc_r"][1])
        attention = causal_pairs(n_p + n_c - 1) + (n_r - 1) * n_p + causal_pairs(n_r - 1)
        return fm["decoder"] * (n_p + n_c + n_r - 2) + fm["head"] * (n_c + n_r) + fm["pair"] * attention

    return [sum(flops(pairs[i]) for i in batch)
            for batch in global_batches(len(pairs), lengths, args.global_batch, 1, args.seed)]  # fmt: skip


def trl_executed_flops(shapes: list[list[int]], ga: int, fm: dict[str, float]) -> list[float]:
    """FLOPs TRL executes per optimizer step from its micro-batches' (rows, width): every padded position through the
    decoder and the LM head (1.16's chunked head scores every position off CUDA), attention over every (query, key)
    pair of the width (a dense mask)."""
    per_micro = [rows * width * (fm["decoder"] + fm["head"]) + fm["pair"] * rows * width * width for rows, width in shapes]
    return [sum(per_micro[k * ga : (k + 1) * ga]) for k in range(len(per_micro) // ga)]


def gemm_worker(spec: dict[str, Any]) -> None:
    """fp32 matmul FLOP/s on this device and thread count (`harness.gemm_flops`): the model's layer shapes (a
    micro-batch of positions times hidden → intermediate, and back) and large squares."""
    import torch

    from benchmarks.harness import gemm_flops

    h, i, m = spec["hidden"], spec["intermediate"], spec["positions"]
    shapes = [(m, h, i), (m, i, h), (m, h, h), (1024, 1024, 1024), (2048, 2048, 2048)]
    rates = gemm_flops(shapes, torch.device(spec["device"]), seconds=1.0)
    print(RESULT + json.dumps({"flops_per_s": rates, "peak": max(rates.values()), "threads": torch.get_num_threads()}), flush=True)


def gemm_peak(args: argparse.Namespace, conf, when: str) -> dict[str, Any]:
    """The machine's fp32 GEMM FLOP/s now, in a child with the trainers' environment (`gemm_worker`)."""
    spec = {"device": args.device, "hidden": conf.hidden_size, "intermediate": conf.intermediate_size,
            "positions": 4 * max(args.micro_batch) * 128}  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "gemm", "--worker-spec", json.dumps(spec)]
    return run_child(cmd, OUT / "logs" / f"gemm-{when}.log", None, args.wait_quiet or None, trainer_env(args))["result"]


# ---------------------------------------------------------------------------------------------- the two trainers


def trainer_env(args: argparse.Namespace) -> dict[str, str]:
    """The same thread count for both trainers; on the CPU, DeepSpeed's CPU accelerator and no GPU visible."""
    env = child_env(OMP_NUM_THREADS=str(os.cpu_count() or 1), **({"DS_ACCELERATOR": "cpu"} if args.device == "cpu" else {}))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def summarize(child: dict[str, Any], tokens: list[int], computed: list[int], warmup: int,
              executed: list[float] | None = None) -> dict[str, Any]:  # fmt: skip
    """Timed region: from the end of warm-up step `warmup` to the end of the last step. `executed`: FLOPs per step."""
    step_ends = child["step_ends"]
    if len(step_ends) != len(tokens) or len(step_ends) <= warmup:
        raise RuntimeError(f"saw {len(step_ends)} step ends for {len(tokens)} steps (warm-up {warmup})")
    wall = step_ends[-1] - step_ends[warmup - 1]
    timed_tokens = sum(tokens[warmup:])
    return {
        "steps": len(tokens),
        "timed_steps": len(tokens) - warmup,
        "timed_tokens": timed_tokens,
        "timed_wall_s": wall,
        "tokens_per_s": timed_tokens / wall,
        "s_per_step": wall / (len(tokens) - warmup),
        # positions the forward passes ran (padding included, shared prompts once) per token counted
        "timed_computed_tokens": sum(computed[warmup:]),
        "computed_per_token": sum(computed[warmup:]) / timed_tokens,
        "all_steps_tokens": sum(tokens),
        "executed_flops_per_s": sum(executed[warmup:]) / wall if executed else None,
        # CPU time other processes used during the timed region, as a share of all cores: ~0 on a quiet machine
        "foreign_cpu_share": foreign_share(child["step_cpu"][warmup - 1], child["step_cpu"][-1], wall),
        **{k: child[k] for k in ("peak_rss_mib", "process_wall_s", "log")},
    }


def run_dice(args, model: Path, pairs, zero_stage: int | str, rep: int = 0) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from pipeline.config import save_config
    from pipeline.run import rounds

    name = f"bench-zero{zero_stage}"
    cfg = dice_config(args, model, zero_stage, name)
    write_reference(pairs, rounds.round_dir(cfg, 0) / "reference.parquet")
    conf = OUT / "runs" / f"{name}.yaml"
    save_config(cfg, conf)
    cmd = [sys.executable, "-m", "stages.train", str(conf), "--round", "0", "--force"]
    child = run_child(cmd, OUT / "logs" / f"dice-zero{zero_stage}-mb{args.micro_batch}-run{rep + 1}.log", DICE_STEP,
                      args.wait_quiet or None, trainer_env(args))  # fmt: skip
    metrics = pq.read_table(rounds.plan(cfg, 0, "train").outputs["metrics"]).to_pylist()
    executed = dice_executed_flops(pairs, args, args.flop_model) if cfg.train.packing else None
    out = summarize(child, [m["tokens"] for m in metrics], dice_computed_tokens(pairs, args, cfg.train.packing),
                    args.warmup, executed)  # fmt: skip
    out["self_reported_s"] = sum(m["seconds"] for m in metrics[args.warmup :])  # dice's own `seconds` column
    out["first_step_loss"] = metrics[0]["loss"]
    out["first_step_margin"] = metrics[0]["margin"]
    out["last_step_loss"] = metrics[-1]["loss"]
    out["command"] = " ".join(["python", "-m", "stages.train", shown(conf), "--round", "0", "--force"])
    out["micro_batch"] = args.micro_batch
    return out


def run_trl(args, model: Path, pairs, rep: int = 0) -> dict[str, Any]:
    data = OUT / "trl_pairs.jsonl"
    keys = ("prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")
    data.write_text("".join(json.dumps({k: p[k] for k in keys}) + "\n" for p in pairs))
    spec = {
        "model": str(model), "data": str(data), "output_dir": str(OUT / "trl"), "beta": args.beta, "lr": args.lr,
        "micro_batch": args.micro_batch, "global_batch": args.global_batch, "seed": args.seed, "device": args.device,
    }  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "trl", "--worker-spec", json.dumps(spec)]
    child = run_child(cmd, OUT / "logs" / f"trl-mb{args.micro_batch}-run{rep + 1}.log", TRL_STEP, args.wait_quiet or None,
                      trainer_env(args))  # fmt: skip
    r = child["result"]
    ga = args.global_batch // args.micro_batch
    out = summarize(child, r["tokens"], r["padded"], args.warmup, trl_executed_flops(r["shapes"], ga, args.flop_model))
    out["self_reported_s"] = sum(r["step_seconds"][args.warmup :])  # callback on_step_end intervals, in the child
    out["first_step_margin"] = r["first_step_margin"]
    out["trl_options"] = r["options"]
    out["ref_model_is_none"] = r["ref_model_is_none"]
    out["micro_batch"] = args.micro_batch
    return out


# ---------------------------------------------------------------------------------------------- TRL worker


def trl_worker(spec: dict[str, Any]) -> None:
    """TRL's DPOTrainer on the pairs file, at its best settings, on `spec["device"]`; a line per step, then RESULT."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from pipeline.compute.logprobs import prompt_ids

    class PrecomputedRefDPOTrainer(DPOTrainer):
        """DPOTrainer that trains on the dataset's own `ref_chosen_logps`/`ref_rejected_logps`.

        With `precompute_ref_log_probs=True`, TRL 1.16 reads the reference log-probs from these batch columns in
        `_compute_loss` and keeps no reference model; its `_precompute_ref_logps` would score them again and append
        a second copy of the columns. Given numbers, that pass is skipped here: nothing else changes.
        """

        def _precompute_ref_logps(self, dataset, name, batch_size):
            assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names), dataset.column_names
            return dataset

    tok = AutoTokenizer.from_pretrained(spec["model"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    records = []
    for r in rows:
        # dice's prompt is one user turn under the chat template; TRL appends EOS to the responses and tokenizes
        # prompt and prompt+response: the same token ids as dice's `encode` (checked: step 1 margins are ~0).
        p = prompt_ids(tok, r["prompt"])
        templated = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=False)
        n_c = len(tok(r["chosen"], add_special_tokens=False)["input_ids"]) + 1
        n_r = len(tok(r["rejected"], add_special_tokens=False)["input_ids"]) + 1
        records.append({**r, "prompt": templated, "length": len(p) + max(n_c, n_r)})
    dataset = Dataset.from_list(records)
    ga = spec["global_batch"] // spec["micro_batch"]
    options = {
        # same optimisation problem as dice
        "loss_type": ["sigmoid"], "beta": spec["beta"], "learning_rate": spec["lr"], "lr_scheduler_type": "constant",
        "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "num_train_epochs": 1,
        "per_device_train_batch_size": spec["micro_batch"], "gradient_accumulation_steps": ga,
        "bf16": spec["device"] == "cuda", "fp16": False, "use_cpu": spec["device"] == "cpu", "seed": spec["seed"],
        "max_length": None,
        "precompute_ref_log_probs": True,
        # speed: no recomputation, padding kept low, nothing but the steps
        "gradient_checkpointing": False,  # TRL's default is True (recomputes activations: slower; memory is no issue)
        "train_sampling_strategy": "group_by_length", "length_column_name": "length",
        "remove_unused_columns": False,  # keeps the `length` column for the sampler (the collator ignores the rest)
        "padding_free": False,  # TRL 1.16 disables it (warns and pads anyway); FlashAttention-only besides
        "pad_to_multiple_of": None,
        "dataloader_num_workers": 0, "dataloader_pin_memory": False,
        "logging_strategy": "no", "save_strategy": "no", "eval_strategy": "no", "report_to": "none",
        "disable_tqdm": True,
    }  # fmt: skip
    config = DPOConfig(output_dir=spec["output_dir"], **options)
    options["optim"] = str(config.optim.value if hasattr(config.optim, "value") else config.optim)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, use_safetensors=True)
    trainer = PrecomputedRefDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok)
    # the comparison is with TRL at its best: no reference model resident, its log-probs read from the data
    assert trainer.ref_model is None, "TRL holds a reference model: not the configuration this benchmark compares"

    padded: list[int] = []
    shapes: list[list[int]] = []
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        padded.append(batch["input_ids"].numel())
        shapes.append(list(batch["input_ids"].shape))  # (rows, width): chosen rows, then rejected rows, padded
        return batch

    trainer.data_collator = counting_collator

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends, self.tokens, self.last_tokens = [], [], 0

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's kernels done, as dice's step line (it reads the loss) waits
            self.ends.append(time.perf_counter())
            total = trainer._total_train_tokens  # Σ attention_mask: prompt+chosen + prompt+rejected, no padding
            self.tokens.append(total - self.last_tokens)
            self.last_tokens = total
            if state.global_step == 1:  # TRL's own metrics of the first step (cleared by its final log)
                self.first_margins = list(trainer._metrics["train"]["rewards/margins"][:ga])
            print(f"BENCH_STEP {state.global_step} {self.tokens[-1]}", flush=True)

    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    margins = clock.first_margins
    starts = [clock.begin] + clock.ends[:-1]
    result = {
        "tokens": clock.tokens,
        # the loader runs ahead of the steps: attribute micro-batch i (collation order) to step i // ga
        "padded": [sum(padded[k * ga : (k + 1) * ga]) for k in range(len(clock.ends))],
        "shapes": shapes[: len(clock.ends) * ga],
        "step_seconds": [e - s for s, e in zip(starts, clock.ends)],
        "first_step_margin": sum(margins) / len(margins),
        "total_train_tokens": trainer._total_train_tokens,
        "torch_threads": torch.get_num_threads(),
        "options": options,
        "ref_model_is_none": trainer.ref_model is None,
    }
    print(RESULT + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- dice profile


def run_profile(args, model: Path, pairs) -> dict[str, Any]:
    """A smaller dice run under benchmarks/train_profile.py's timers and torch.profiler; prints its phases."""
    from pipeline.config import save_config
    from pipeline.run import rounds

    n = min(len(pairs), args.profile_pairs)
    cfg = dice_config(args, model, args.profile_zero_stage, "bench-profile")
    write_reference(pairs[:n], rounds.round_dir(cfg, 0) / "reference.parquet")
    conf = OUT / "runs" / "bench-profile.yaml"
    save_config(cfg, conf)
    ops = OUT / f"dice_profile_ops_zero{args.profile_zero_stage}.txt"
    spec = {"config": str(conf), "ops_out": str(ops),
            "warmup_micro": args.warmup * args.global_batch // args.micro_batch}  # fmt: skip
    print(f"profiling dice (ZeRO-{args.profile_zero_stage}) on {n} pairs ...", flush=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_profile.py"), json.dumps(spec)]
    child = run_child(cmd, OUT / "logs" / "dice-profile.log", DICE_STEP, args.wait_quiet or None, trainer_env(args))
    phases = child["result"]["phases"]
    top = {k: v for k, v in phases.items() if k.startswith(("engine.", "collate"))}  # log-probs run inside forward
    total = sum(v["seconds"] for v in top.values())
    print("dice phases after warm-up (seconds, share of forward + backward + step + collate):")
    for name, v in sorted(phases.items(), key=lambda kv: (kv[0] not in top, -kv[1]["seconds"])):
        inner = "" if name in top else "  (inside engine.forward)"
        print(f"  {name:<58} {v['seconds']:7.2f}  {100 * v['seconds'] / total:5.1f}%  ({v['calls']} calls){inner}")
    print(f"  op-level table (self CPU time): {shown(ops)}")
    return {"pairs": n, "zero_stage": args.profile_zero_stage, **child["result"], "ops_table": shown(ops)}


# ---------------------------------------------------------------------------------------------- main


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The tiny model's shape flags (model_dir names the folder after them; the label benchmark shares them)."""
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--sft-steps", type=int, default=20, help="supervised steps of the tiny model build")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=256, help="preference pairs (one epoch over them)")
    ap.add_argument("--long-frac", type=float, default=0.2, help="share of pairs given 1-4 more responses per side")
    ap.add_argument("--max-len", type=int, default=512, help="cap on prompt+response tokens of a sequence")
    add_model_args(ap)
    ap.add_argument("--micro-batch", default="1,2,4,8", type=lambda v: [int(x) for x in v.split(",") if x.strip()],
                    help="pairs per forward pass, comma-separated: each trainer runs at each, and each repeat's ratio "
                    "is each trainer's fastest micro-batch in that repeat over the other's (each at its best)")
    ap.add_argument("--global-batch", type=int, default=16, help="pairs per optimizer step (both trainers)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=2, help="leading steps left out of the timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where both trainers run: cpu (fp32) or cuda (bf16: dice's device and train.bf16, TRL's bf16)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each trainer, alternating; every run's ratio and their median are reported")
    ap.add_argument("--dice-zero-stages", default="auto",
                    help="comma list of ZeRO stages to run dice with: auto (dice's default: 0 on one process), 0-3")
    ap.add_argument("--skip-trl", action="store_true", help="run only dice")
    ap.add_argument("--profile-dice", action="store_true", help="also profile a smaller dice run")
    ap.add_argument("--profile-pairs", type=int, default=96, help="pairs of the profiled run")
    ap.add_argument("--profile-zero-stage", type=int, default=3, help="ZeRO stage of the profiled run")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each trainer, wait up to S seconds for other processes to leave the CPUs (shared machines)")
    ap.add_argument("--out", default=str(OUT / "train_throughput.json"))
    ap.add_argument("--worker", choices=["trl", "gemm"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-spec", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def median_run(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median tokens/s (`harness.middle`), with every run's tokens/s, foreign CPU share and peak RSS, and
    the highest peak RSS of all runs."""
    out = dict(middle(rs, "tokens_per_s"))
    for key in ("tokens_per_s", "foreign_cpu_share", "peak_rss_mib"):
        out[f"{key}_runs"] = [r[key] for r in rs]
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rs)
    return out


def at_micro_batch(args: argparse.Namespace, mb: int) -> argparse.Namespace:
    """`args` with one micro-batch (what run_dice, run_trl and run_profile read) in place of the list."""
    return argparse.Namespace(**{**vars(args), "micro_batch": mb})


def best_per_repeat(settings_runs: dict[str, list[dict[str, Any]]], trainers: dict[str, Any], micro: list[int],
                    repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Per trainer, its fastest run of each repeat over the micro-batches (`<trainer> mb<N>` in `settings_runs`): each
    trainer at its best setting, repeat by repeat."""
    return {name: [max((settings_runs[f"{name} mb{mb}"][i] for mb in micro), key=lambda r: r["tokens_per_s"])
                   for i in range(repeats)] for name in trainers}  # fmt: skip


def repeat_ratios(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """a's run i over b's run i (they ran back to back, so the machine's drift hits both alike), and the medians."""
    per = {name: ratios([x[key] for x in a], [y[key] for y in b])
           for name, key in (("tokens_per_s", "tokens_per_s"), ("peak_rss", "peak_rss_mib"), ("timed_wall_s", "timed_wall_s"))}  # fmt: skip
    return {**{f"{k}_runs": v for k, v in per.items()}, **{k: median(v) for k, v in per.items()}}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    """One row per trainer (its median run)."""
    header = ["trainer", "tokens/s", "timed wall s", "s/step", "timed steps", "timed tokens", "computed", "peak RSS MiB", "process s", "foreign CPU"]
    widths = [16, 9, 12, 7, 11, 12, 7, 12, 9, 11]
    row = lambda cols: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))
    print("\n" + row(header))
    for k, r in results.items():
        share = "n/a" if r["foreign_cpu_share"] is None else f"{100 * r['foreign_cpu_share']:.1f}%"
        print(row([k, f"{r['tokens_per_s']:.0f}", f"{r['timed_wall_s']:.2f}", f"{r['s_per_step']:.2f}", str(r["timed_steps"]),
                   str(r["timed_tokens"]), f"x{r['computed_per_token']:.2f}", f"{r['peak_rss_mib']:.0f}",
                   f"{r['process_wall_s']:.1f}", share]))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker == "trl":
        return trl_worker(json.loads(args.worker_spec))
    if args.worker == "gemm":
        return gemm_worker(json.loads(args.worker_spec))
    if not args.micro_batch or any(mb < 1 or args.global_batch % mb for mb in args.micro_batch):
        sys.exit("every --micro-batch must divide --global-batch")
    if args.warmup < 1 or args.pairs < (args.warmup + 1) * args.global_batch:
        sys.exit("need --warmup >= 1 and at least (warmup + 1) × global-batch pairs")
    if not args.skip_trl and importlib.util.find_spec("trl") is None:
        sys.exit("TRL (the baseline) is not installed: .venv/bin/pip install -e '.[bench]'  (or pass --skip-trl)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: CUDA is not usable on this machine (torch.cuda.is_available() is False)")
    t_start = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    OUT.mkdir(parents=True, exist_ok=True)

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    model, built_s = build_model(args)
    conf = AutoConfig.from_pretrained(model)
    n_params = sum(t.numel() for t in load_file(str(model / "model.safetensors")).values())
    print(f"model {shown(model)}: {n_params:,} parameters (vocab {conf.vocab_size}, hidden {conf.hidden_size}, "
          f"{conf.num_hidden_layers} layers, {conf.num_attention_heads} heads / {conf.num_key_value_heads} kv, "
          f"MLP {conf.intermediate_size}); {'built in %.0f s' % built_s if built_s else 'reused'}", flush=True)  # fmt: skip
    pairs = build_pairs(AutoTokenizer.from_pretrained(model), args)
    lengths = length_stats(pairs)
    print(f"{len(pairs)} pairs; token lengths (prompt counts the chat template, responses count EOS):")
    for k, v in lengths.items():
        print(f"  {k:<46} " + "  ".join(f"{q} {x:g}" for q, x in v.items()))
    ref_s = score_reference(model, pairs, args.device)
    print(f"reference log-probs scored once in {ref_s:.1f} s (pipeline.compute.logprobs.score, fp32)", flush=True)

    args.flop_model = fm = flop_model(conf)
    useful_per_token = useful_flops_per_token(pairs, fm)
    gemm = [gemm_peak(args, conf, "before")]
    print(f"GEMM peak before the trainers: {gemm[0]['peak'] / 1e9:.1f} GFLOP/s (fp32, {gemm[0]['threads']} threads; "
          + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in gemm[0]["flops_per_s"].items()) + ")", flush=True)

    # every trainer at every micro-batch, run in turn each repeat (micro-batch by micro-batch, the trainers side by
    # side): a slow spell of the machine hits all alike
    trainers: dict[str, Any] = {}
    for z in (x.strip() if x.strip() == "auto" else int(x) for x in args.dice_zero_stages.split(",") if x.strip()):
        trainers["dice" if z == "auto" else f"dice (ZeRO-{z})"] = lambda a, rep, z=z: run_dice(a, model, pairs, z, rep)
    if not args.skip_trl:
        trainers["trl"] = lambda a, rep: run_trl(a, model, pairs, rep)
    contenders = {}
    for mb in args.micro_batch:
        at = at_micro_batch(args, mb)
        for name, run in trainers.items():
            contenders[f"{name} mb{mb}"] = lambda rep, run=run, at=at: run(at, rep)
    settings_runs = alternate(contenders, args.repeats)
    gemm.append(gemm_peak(args, conf, "after"))
    peak = max(g["peak"] for g in gemm)
    for rs in settings_runs.values():
        for r in rs:
            r["useful_flops_per_s"] = r["tokens_per_s"] * useful_per_token
            r["useful_of_peak"] = r["useful_flops_per_s"] / peak
            r["executed_of_peak"] = r["executed_flops_per_s"] / peak if r["executed_flops_per_s"] else None
    runs = best_per_repeat(settings_runs, trainers, args.micro_batch, args.repeats)
    results = {k: median_run(v) for k, v in runs.items()}
    per_micro_batch = {k: median_run(v) for k, v in settings_runs.items()}

    if len(args.micro_batch) > 1:
        print_table(per_micro_batch)
        print("each trainer at its fastest micro-batch in every repeat: "
              + "; ".join(f"{k} mb " + ", ".join(str(r["micro_batch"]) for r in rs) for k, rs in runs.items()))
    print_table(results)
    if args.repeats > 1:
        print("tokens/s of every run (the table shows the median run): "
              + "; ".join(f"{k} " + ", ".join(f"{x:.0f}" for x in r["tokens_per_s_runs"]) for k, r in results.items()))
    busy = [k for k, r in results.items() if (r["foreign_cpu_share"] or 0) > 0.05]
    if busy:
        print(f"WARNING: other processes used >5% of the CPUs during the timed steps of {', '.join(busy)}: "
              "the machine was not quiet, the numbers are noisy")
    pair_ratios: dict[str, dict[str, Any]] = {}
    if "trl" in results:
        for k in (k for k in results if k != "trl"):
            pair_ratios[f"{k} / trl"] = q = repeat_ratios(runs[k], runs["trl"])
            print(ratio_line(f"{k} / trl tokens/s run by run", q["tokens_per_s_runs"]))
            print(ratio_line(f"{k} / trl peak RSS run by run", q["peak_rss_runs"]))
            for mb in args.micro_batch if len(args.micro_batch) > 1 else []:  # both at the same micro-batch
                same = pair_ratios[f"{k} / trl at mb{mb}"] = repeat_ratios(settings_runs[f"{k} mb{mb}"], settings_runs[f"trl mb{mb}"])
                print(ratio_line(f"  at micro-batch {mb}: tokens/s", same["tokens_per_s_runs"]) + "; "
                      + ratio_line("peak RSS", same["peak_rss_runs"]))
        print(f"TRL kept no reference model (precompute_ref_log_probs): {all(r['ref_model_is_none'] for r in runs['trl'])}")
        print(f"tokens over all steps (must match): { {k: r['all_steps_tokens'] for k, r in results.items()} }")
    for k, r in results.items():
        print(f"{k}: self-reported timed seconds {r['self_reported_s']:.2f} (parent-observed {r['timed_wall_s']:.2f}); "
              f"step-1 margin {r['first_step_margin']:.2e} (policy == reference: ~0)")  # fmt: skip

    measured = ", ".join(f"{g['peak'] / 1e9:.1f}" for g in gemm)
    print(f"GEMM peak (fp32, the best of before / after the trainers: {measured}): {peak / 1e9:.1f} GFLOP/s; "
          f"model FLOPs per counted token {useful_per_token / 1e6:.1f} M")
    for k, rs in runs.items():
        executed = [r["executed_of_peak"] for r in rs]
        print(f"{k}: useful FLOP/s of the GEMM peak " + ", ".join(f"{100 * r['useful_of_peak']:.1f}%" for r in rs)
              + ("; executed " + ", ".join(f"{100 * x:.1f}%" for x in executed) if all(executed) else "")
              + " (run by run)")
    # the profile runs at dice's micro-batch of its median run
    mb = results["dice"]["micro_batch"] if "dice" in results else args.micro_batch[0]
    profile = run_profile(at_micro_batch(args, mb), model, pairs) if args.profile_dice else None
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "worker_spec")}
    report = {
        "dice_source": git_state(),
        "settings": {**settings, "threads": int(trainer_env(args)["OMP_NUM_THREADS"]), "cpu_count": os.cpu_count(),
                     "python": sys.version.split()[0]},
        "versions": versions(("torch", "transformers", "deepspeed", "trl", "accelerate", "datasets")),
        "model": {"path": shown(model), "parameters": n_params, "build_s": built_s},
        "pairs": {"count": len(pairs), "lengths": lengths},
        "reference_scoring_s": ref_s,
        "gemm": {"runs": gemm, "peak_flops_per_s": peak, "useful_flops_per_token": useful_per_token, "flop_model": fm},
        "results": results,
        "per_micro_batch": per_micro_batch,
        "ratios": pair_ratios,
        "dice_profile": profile,
        "benchmark_wall_s": time.perf_counter() - t_start,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {shown(args.out)} (benchmark took {report['benchmark_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
