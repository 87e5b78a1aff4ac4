"""Training throughput: dice's `train` stage against TRL's DPOTrainer, same model, same pairs, same run.

    .venv/bin/python benchmarks/train_throughput.py [--pairs 256 --hidden 256 --layers 6 ...]

What it does (benchmarks/README.md has the settings and a measured run):

1. Builds a tiny Llama with `pipeline.run.tiny.build_tiny_model` once into `benchmarks/out/models/<shape>/` and
   reuses it.
2. Builds N preference pairs from `data/offline_prefs.jsonl` (240 pairs, replicated; a share of them get
   other pairs' responses appended, for a long tail of lengths) and prints the token-length distribution.
3. Scores the reference log-probs ONCE (`pipeline.compute.logprobs.score`, the initial model, fp32) and hands the
   same numbers to both trainers: dice reads them from `round-0/reference.parquet` (REFERENCE schema),
   TRL from the dataset columns `ref_chosen_logps`/`ref_rejected_logps` with `precompute_ref_log_probs=True`
   (its own precomputation pass is skipped, so it trains on exactly these numbers).
4. Runs each trainer in its own subprocess, one after the other: dice as users launch it
   (`python -m stages.train CONF --round 0`), TRL through this file's `--worker trl` mode. The parent
   timestamps every step's end as it appears on the child's stdout (dice prints one line per optimizer
   step; the TRL worker prints one from a callback's `on_step_end`). The timed region is the end of warm-up
   step 2 to the end of the last step: model loading, data preparation and dice's checkpoint
   consolidation are outside it. Peak memory is the child's RSS high-water mark (`os.wait4` rusage).
5. With `--repeats N`, runs dice and TRL alternately N times; prints each repeat's ratio (dice run i / TRL run
   i, back to back) and their median, the headline number; the table shows each trainer's median run.
   Checks that TRL's trainer holds no reference model (`ref_model is None` under precompute_ref_log_probs).
6. Prints a table and writes `benchmarks/out/train_throughput.json`.

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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# everything the benchmarks write (models, runs, logs, JSON); DICE_BENCH_OUT moves it (the smoke tests do)
OUT = Path(os.environ.get("DICE_BENCH_OUT") or REPO / "benchmarks" / "out").resolve()
DATA = REPO / "data" / "offline_prefs.jsonl"
DICE_STEP = re.compile(r"^train round 0 step (\d+)/(\d+) ")
TRL_STEP = re.compile(r"^BENCH_STEP (\d+)")
RESULT = "BENCH_RESULT "


# ---------------------------------------------------------------------------------------------- inputs


def shown(path: Path) -> str:
    """`path` relative to the repository when it is inside it (as printed and recorded), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def model_dir(args: argparse.Namespace) -> Path:
    tag = (
        f"h{args.hidden}-i{args.intermediate}-l{args.layers}-a{args.heads}-kv{args.kv_heads}"
        f"-v{args.vocab}-sft{args.sft_steps}-s{args.seed}"
    )
    return OUT / "models" / tag


def build_model(args: argparse.Namespace) -> tuple[Path, float]:
    """Build the tiny model once (reused when the folder exists). Returns (path, seconds spent building)."""
    from pipeline.run.tiny import TinySpec, build_tiny_model

    path = model_dir(args)
    if (path / "model.safetensors").is_file():
        return path, 0.0
    started = time.perf_counter()
    spec = TinySpec(
        vocab_size=args.vocab, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
        heads=args.heads, kv_heads=args.kv_heads, max_positions=1024, sft_steps=args.sft_steps, seed=args.seed,
    )  # fmt: skip
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
    prompt = [len(p["enc_c"][0]) for p in pairs]
    chosen = [len(p["enc_c"][1]) for p in pairs]
    rejected = [len(p["enc_r"][1]) for p in pairs]
    per_pair = [2 * a + b + c for a, b, c in zip(prompt, chosen, rejected)]
    return {
        "prompt_tokens": percentiles(prompt),
        "chosen_tokens": percentiles(chosen),
        "rejected_tokens": percentiles(rejected),
        "pair_tokens (prompt+chosen + prompt+rejected)": percentiles(per_pair),
    }


def score_reference(model_path: Path, pairs: list[dict[str, Any]]) -> float:
    """Reference log-probs of every pair under the initial model, in place. Returns seconds."""
    import torch

    from pipeline.compute.logprobs import load_causal_lm, score

    started = time.perf_counter()
    model, tok = load_causal_lm(str(model_path), "float32", device=torch.device("cpu"))
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
        "pair_id": [p["pair_id"] for p in pairs],
        "prompt_id": [p["pair_id"].split("-", 1)[1] for p in pairs],
        "prompt": [p["prompt"] for p in pairs],
        "chosen": [p["chosen"] for p in pairs],
        "rejected": [p["rejected"] for p in pairs],
        "source": ["offline"] * n,
        "preference": [1.0] * n,  # a hard label, as for offline pairs
        "annotators": [1] * n,
        "round": [0] * n,
        "chosen_tokens": [len(p["enc_c"][1]) for p in pairs],
        "rejected_tokens": [len(p["enc_r"][1]) for p in pairs],
        "ref_chosen_logps": [p["ref_chosen_logps"] for p in pairs],
        "ref_rejected_logps": [p["ref_rejected_logps"] for p in pairs],
    }
    columns = {}
    for field in schemas.REFERENCE:
        if field.name in known:
            columns[field.name] = pa.array(known[field.name], field.type)
        elif field.nullable:  # offline pairs carry no reward, length or α
            columns[field.name] = pa.nulls(n, field.type)
        else:
            raise ValueError(f"REFERENCE column {field.name} is required and this benchmark does not know how to fill it")
    write_parquet(pa.table(columns), path, schemas.REFERENCE)


def dice_config(args: argparse.Namespace, model: Path, zero_stage: int, name: str):
    from pipeline.config import TrainConfig, load_config

    # Periodic resume checkpoints (when this dice version has them) would land inside the timed steps: off.
    extra = ["train.checkpoint_every=0"] if "checkpoint_every" in TrainConfig.model_fields else []
    return load_config(
        None,
        extra + [
            f"name={name}",
            f"runs_dir={OUT / 'runs'}",
            f"model.policy={model}",
            "model.build_tiny_if_missing=false",
            "model.dtype=float32",
            "model.max_length=1024",
            f"data.offline={DATA}",
            "round0.mode=offline_dpo",
            "train.loss=dpo",
            f"train.beta={args.beta}",
            f"train.learning_rate={args.lr}",
            "train.lr_schedule=constant_with_warmup",
            "train.warmup_steps=0",
            "train.epochs=1",
            f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_size={args.global_batch}",
            "train.max_grad_norm=1.0",
            "train.weight_decay=0.0",
            "train.num_processes=1",
            f"train.zero_stage={zero_stage}",
            "train.bf16=false",
            f"seed={args.seed}",
        ],
    )


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


# ---------------------------------------------------------------------------------------------- children


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # the same thread count for both trainers
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def cpu_jiffies(pid: int) -> tuple[int, int]:
    """(busy jiffies of the whole machine, CPU jiffies of process `pid`), to tell whether something else ran."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return busy, int(stat[11]) + int(stat[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0, 0


WAIT_QUIET_S = 0.0  # --wait-quiet


def wait_quiet(limit_s: float) -> None:
    """Wait (up to `limit_s`) until other processes use < 10% of the CPUs over a 2 s sample."""
    deadline = time.perf_counter() + limit_s
    hz, ncpu = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    while True:
        b0, c0 = cpu_jiffies(os.getpid())
        time.sleep(2)
        b1, c1 = cpu_jiffies(os.getpid())
        share = ((b1 - b0) - (c1 - c0)) / hz / (2 * ncpu)
        if share < 0.1:
            return
        if time.perf_counter() > deadline:
            print(f"  (the machine is still busy: {100 * share:.0f}% of the CPUs used by others; going on)", flush=True)
            return
        time.sleep(8)


def run_child(cmd: list[str], step_re: re.Pattern, log: Path) -> dict[str, Any]:
    """Run `cmd`, timestamping step lines on arrival. Returns step end times, the RESULT payload, peak RSS."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if WAIT_QUIET_S:
        wait_quiet(WAIT_QUIET_S)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    step_ends: dict[int, float] = {}
    step_cpu: dict[int, tuple[int, int]] = {}
    result: dict[str, Any] = {}
    with open(log, "w") as f:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter()
            f.write(line)
            m = step_re.match(line)
            if m:
                step_ends[int(m.group(1))] = now
                step_cpu[int(m.group(1))] = cpu_jiffies(proc.pid)
            elif line.startswith(RESULT):
                result = json.loads(line[len(RESULT) :])
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: ru_maxrss is its RSS high-water mark (KiB)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}; log {log}:\n{tail}")
    return {
        "step_ends": [step_ends[k] for k in sorted(step_ends)],
        "step_cpu": [step_cpu[k] for k in sorted(step_cpu)],
        "result": result,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "process_wall_s": time.perf_counter() - started,
        "log": shown(log),
    }


def summarize(child: dict[str, Any], tokens: list[int], computed: list[int], warmup: int) -> dict[str, Any]:
    """Timed region: from the end of warm-up step `warmup` to the end of the last step."""
    step_ends = child["step_ends"]
    if len(step_ends) != len(tokens) or len(step_ends) <= warmup:
        raise RuntimeError(f"saw {len(step_ends)} step ends for {len(tokens)} steps (warm-up {warmup})")
    wall = step_ends[-1] - step_ends[warmup - 1] if warmup else None
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
        # CPU time other processes used during the timed region, as a share of all cores: ~0 on a quiet machine
        "foreign_cpu_share": _foreign_share(child["step_cpu"], warmup, wall),
    }


def _foreign_share(step_cpu: list[tuple[int, int]], warmup: int, wall: float) -> float | None:
    (b0, c0), (b1, c1) = step_cpu[warmup - 1], step_cpu[-1]
    if not b1:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, ((b1 - b0) - (c1 - c0)) / hz) / (wall * (os.cpu_count() or 1))


def run_dice(args, model: Path, pairs, zero_stage: int, rep: int = 0) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from pipeline.config import save_config
    from pipeline.run import rounds

    name = f"bench-zero{zero_stage}"
    cfg = dice_config(args, model, zero_stage, name)
    write_reference(pairs, rounds.round_dir(cfg, 0) / "reference.parquet")
    conf = OUT / "runs" / f"{name}.yaml"
    save_config(cfg, conf)
    cmd = [sys.executable, "-m", "stages.train", str(conf), "--round", "0", "--force"]
    child = run_child(cmd, DICE_STEP, OUT / "logs" / f"dice-zero{zero_stage}-run{rep + 1}.log")
    metrics = pq.read_table(rounds.plan(cfg, 0, "train").outputs["metrics"]).to_pylist()
    tokens = [m["tokens"] for m in metrics]
    out = summarize(child, tokens, dice_computed_tokens(pairs, args, cfg.train.packing), args.warmup)
    out["self_reported_s"] = sum(m["seconds"] for m in metrics[args.warmup :])  # dice's own `seconds` column
    out["first_step_loss"] = metrics[0]["loss"]
    out["first_step_margin"] = metrics[0]["margin"]
    out["last_step_loss"] = metrics[-1]["loss"]
    out.update({k: child[k] for k in ("peak_rss_mib", "process_wall_s", "log")})
    out["command"] = " ".join(["python", "-m", "stages.train", shown(conf), "--round", "0", "--force"])
    return out


def run_trl(args, model: Path, pairs, rep: int = 0) -> dict[str, Any]:
    data = OUT / "trl_pairs.jsonl"
    with open(data, "w") as f:
        for p in pairs:
            f.write(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")}) + "\n")
    spec = {
        "model": str(model), "data": str(data), "output_dir": str(OUT / "trl"), "beta": args.beta, "lr": args.lr,
        "micro_batch": args.micro_batch, "global_batch": args.global_batch, "seed": args.seed,
    }  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "trl", "--worker-spec", json.dumps(spec)]
    child = run_child(cmd, TRL_STEP, OUT / "logs" / f"trl-run{rep + 1}.log")
    r = child["result"]
    out = summarize(child, r["tokens"], r["padded"], args.warmup)
    out["self_reported_s"] = sum(r["step_seconds"][args.warmup :])  # callback on_step_end intervals, in the child
    out["first_step_margin"] = r["first_step_margin"]
    out["trl_options"] = r["options"]
    out["ref_model_is_none"] = r["ref_model_is_none"]
    out.update({k: child[k] for k in ("peak_rss_mib", "process_wall_s", "log")})
    return out


# ---------------------------------------------------------------------------------------------- TRL worker


def trl_worker(spec: dict[str, Any]) -> None:
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
        "bf16": False, "fp16": False, "use_cpu": True, "seed": spec["seed"], "max_length": None,
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
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        padded.append(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting_collator

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends, self.tokens, self.last_tokens = [], [], 0

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
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
        "step_seconds": [e - s for s, e in zip(starts, clock.ends)],
        "first_step_margin": sum(margins) / len(margins),
        "total_train_tokens": trainer._total_train_tokens,
        "torch_threads": torch.get_num_threads(),
        "options": options,
        "ref_model_is_none": trainer.ref_model is None,
    }
    print(RESULT + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- dice profile


def dice_profile_worker(spec: dict[str, Any]) -> None:
    """dice's train stage in this process (as `python -m stages.train` runs it with 1 process), with timers around
    its phases and torch.profiler over the whole run. Only the patched names are wrapped; nothing is edited."""
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    import pipeline.compute.logprobs as lp
    import stages.train as st
    from pipeline.config import load_config
    from pipeline.data.artifacts import execute
    from pipeline.run import rounds

    timers: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers.setdefault(name, []).append(time.perf_counter() - t)

        return wrapper

    DeepSpeedEngine.forward = timed("engine.forward (model forward incl. ZeRO hooks)", DeepSpeedEngine.forward)
    DeepSpeedEngine.backward = timed("engine.backward (autograd incl. ZeRO grad hooks)", DeepSpeedEngine.backward)
    DeepSpeedEngine.step = timed("engine.step (optimizer at boundary)", DeepSpeedEngine.step)
    labels = {
        "sequence_logps": "sequence_logps (log-softmax over the vocabulary of full logits)",
        "response_logps": "response_logps (decoder + LM head at response positions)",
    }
    for fn_name, label in labels.items():  # whichever of these this dice version's trainer calls
        if hasattr(lp, fn_name):
            setattr(lp, fn_name, timed(label, getattr(lp, fn_name)))
    lp.collate = timed("collate (padding)", lp.collate)
    cfg = load_config(spec["config"])
    plan = rounds.plan(cfg, 0, "train")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        execute(plan, lambda: st.run(cfg, plan), force=True)
        total = time.perf_counter() - t
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    Path(spec["ops_out"]).write_text(table)
    skip = spec["warmup_micro"]  # leave out the warm-up steps' micro-batches
    # one backward per training micro-batch: later forward/collate calls (dice's post-training probe) are left out
    n = len(next(v for k, v in timers.items() if k.startswith("engine.backward")))
    summary = {name: {"calls": len(v[skip:n]), "seconds": sum(v[skip:n])} for name, v in timers.items()}
    print(RESULT + json.dumps({"phases": summary, "whole_stage_s": total}), flush=True)


def run_profile(args, model: Path, pairs) -> dict[str, Any]:
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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "dice-profile", "--worker-spec", json.dumps(spec)]
    child = run_child(cmd, DICE_STEP, OUT / "logs" / "dice-profile.log")
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
    ap.add_argument("--micro-batch", type=int, default=4, help="pairs per forward pass (both trainers)")
    ap.add_argument("--global-batch", type=int, default=16, help="pairs per optimizer step (both trainers)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=2, help="leading steps left out of the timing")
    ap.add_argument("--seed", type=int, default=0)
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
    ap.add_argument("--worker", choices=["trl", "dice-profile"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-spec", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def median_run(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median tokens/s (the lower middle one for an even count), with every run's tokens/s, foreign CPU
    share and peak RSS, and the highest peak RSS of all runs."""
    ordered = sorted(rs, key=lambda r: r["tokens_per_s"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["tokens_per_s_runs"] = [r["tokens_per_s"] for r in rs]
    out["foreign_cpu_share_runs"] = [r["foreign_cpu_share"] for r in rs]
    out["peak_rss_mib_runs"] = [r["peak_rss_mib"] for r in rs]
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rs)
    return out


def repeat_ratios(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """a's run i over b's run i (they ran back to back, so the machine's drift hits both alike), and the medians."""
    per = {
        "tokens_per_s": [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(a, b)],
        "peak_rss": [x["peak_rss_mib"] / y["peak_rss_mib"] for x, y in zip(a, b)],
        "timed_wall_s": [x["timed_wall_s"] / y["timed_wall_s"] for x, y in zip(a, b)],
    }
    return {**{f"{k}_runs": v for k, v in per.items()}, **{k: float(np.median(v)) for k, v in per.items()}}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def fmt_row(cols: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker == "trl":
        return trl_worker(json.loads(args.worker_spec))
    if args.worker == "dice-profile":
        return dice_profile_worker(json.loads(args.worker_spec))
    if args.global_batch % args.micro_batch:
        sys.exit("--global-batch must be a multiple of --micro-batch")
    if args.warmup < 1 or args.pairs < (args.warmup + 1) * args.global_batch:
        sys.exit("need --warmup >= 1 and at least (warmup + 1) × global-batch pairs")
    if not args.skip_trl and importlib.util.find_spec("trl") is None:
        sys.exit("TRL (the baseline) is not installed: .venv/bin/pip install -e '.[bench]'  (or pass --skip-trl)")
    global WAIT_QUIET_S
    WAIT_QUIET_S = args.wait_quiet
    t_start = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    OUT.mkdir(parents=True, exist_ok=True)

    from transformers import AutoConfig, AutoTokenizer

    model, built_s = build_model(args)
    conf = AutoConfig.from_pretrained(model)
    from safetensors.torch import load_file

    n_params = sum(t.numel() for t in load_file(str(model / "model.safetensors")).values())
    print(f"model {shown(model)}: {n_params:,} parameters (vocab {conf.vocab_size}, hidden {conf.hidden_size}, "
          f"{conf.num_hidden_layers} layers, {conf.num_attention_heads} heads / {conf.num_key_value_heads} kv, "
          f"MLP {conf.intermediate_size}); {'built in %.0f s' % built_s if built_s else 'reused'}", flush=True)  # fmt: skip

    tok = AutoTokenizer.from_pretrained(model)
    pairs = build_pairs(tok, args)
    lengths = length_stats(pairs)
    print(f"{len(pairs)} pairs; token lengths (prompt counts the chat template, responses count EOS):")
    for k, v in lengths.items():
        print(f"  {k:<46} " + "  ".join(f"{q} {x:g}" for q, x in v.items()))
    ref_s = score_reference(model, pairs)
    print(f"reference log-probs scored once in {ref_s:.1f} s (pipeline.compute.logprobs.score, fp32)", flush=True)

    runs: dict[str, list[dict[str, Any]]] = {}
    stages = [x.strip() if x.strip() == "auto" else int(x) for x in args.dice_zero_stages.split(",") if x.strip()]
    for rep in range(args.repeats):  # alternating, so a slow spell of the machine hits both
        tag = f" (run {rep + 1}/{args.repeats})" if args.repeats > 1 else ""
        for z in stages:
            key = "dice" if z == "auto" else f"dice (ZeRO-{z})"
            print(f"running {key}{tag} ...", flush=True)
            runs.setdefault(key, []).append(run_dice(args, model, pairs, z, rep))
        if not args.skip_trl:
            print(f"running TRL DPOTrainer{tag} ...", flush=True)
            runs.setdefault("trl", []).append(run_trl(args, model, pairs, rep))
    results = {k: median_run(v) for k, v in runs.items()}

    header = ["trainer", "tokens/s", "timed wall s", "s/step", "timed steps", "timed tokens", "computed", "peak RSS MiB", "process s", "foreign CPU"]
    widths = [16, 9, 12, 7, 11, 12, 7, 12, 9, 11]
    print()
    print(fmt_row(header, widths))
    for k, r in results.items():
        print(fmt_row([k, f"{r['tokens_per_s']:.0f}", f"{r['timed_wall_s']:.2f}", f"{r['s_per_step']:.2f}", str(r["timed_steps"]),
                       str(r["timed_tokens"]), f"x{r['computed_per_token']:.2f}", f"{r['peak_rss_mib']:.0f}",
                       f"{r['process_wall_s']:.1f}", _pct(r["foreign_cpu_share"])], widths))  # fmt: skip
    if args.repeats > 1:
        print("tokens/s of every run (the table shows the median run): "
              + "; ".join(f"{k} " + ", ".join(f"{x:.0f}" for x in r["tokens_per_s_runs"]) for k, r in results.items()))
    busy = [k for k, r in results.items() if (r["foreign_cpu_share"] or 0) > 0.05]
    if busy:
        print(f"WARNING: other processes used >5% of the CPUs during the timed steps of {', '.join(busy)}: "
              "the machine was not quiet, the numbers are noisy")
    ratios: dict[str, dict[str, Any]] = {}
    if "trl" in results:
        for k in results:
            if k == "trl":
                continue
            ratios[f"{k} / trl"] = q = repeat_ratios(runs[k], runs["trl"])
            print(f"{k} / trl, run by run: tokens/s " + ", ".join(f"x{x:.2f}" for x in q["tokens_per_s_runs"])
                  + f" (median x{q['tokens_per_s']:.2f}); peak RSS " + ", ".join(f"x{x:.2f}" for x in q["peak_rss_runs"])
                  + f" (median x{q['peak_rss']:.2f})")  # fmt: skip
        print(f"TRL kept no reference model (precompute_ref_log_probs): {all(r['ref_model_is_none'] for r in runs['trl'])}")
        same = {k: r["all_steps_tokens"] for k, r in results.items()}
        print(f"tokens over all steps (must match): {same}")
    for k, r in results.items():
        print(f"{k}: self-reported timed seconds {r['self_reported_s']:.2f} (parent-observed {r['timed_wall_s']:.2f}); "
              f"step-1 margin {r['first_step_margin']:.2e} (policy == reference: ~0)")  # fmt: skip

    profile = None
    if args.profile_dice:
        print(f"profiling dice (ZeRO-{args.profile_zero_stage}) on {min(len(pairs), args.profile_pairs)} pairs ...", flush=True)
        profile = run_profile(args, model, pairs)
        phases = profile["phases"]
        top = {k: v for k, v in phases.items() if k.startswith(("engine.", "collate"))}  # log-probs run inside forward
        total = sum(v["seconds"] for v in top.values())
        print("dice phases after warm-up (seconds, share of forward + backward + step + collate):")
        for name, v in sorted(phases.items(), key=lambda kv: (kv[0] not in top, -kv[1]["seconds"])):
            inner = "" if name in top else "  (inside engine.forward)"
            print(f"  {name:<58} {v['seconds']:7.2f}  {100 * v['seconds'] / total:5.1f}%  ({v['calls']} calls){inner}")
        print(f"  op-level table (self CPU time): {profile['ops_table']}")

    report = {
        "dice_source": _git_state(),
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("worker", "worker_spec")},
                     "threads": int(child_env()["OMP_NUM_THREADS"]), "cpu_count": os.cpu_count(),
                     "python": sys.version.split()[0]},  # fmt: skip
        "versions": _versions(),
        "model": {"path": shown(model), "parameters": n_params, "build_s": built_s},
        "pairs": {"count": len(pairs), "lengths": lengths},
        "reference_scoring_s": ref_s,
        "results": results,
        "ratios": ratios,
        "dice_profile": profile,
        "benchmark_wall_s": time.perf_counter() - t_start,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {shown(args.out)} "
          f"(benchmark took {report['benchmark_wall_s']:.0f} s)")  # fmt: skip


def _git_state() -> dict[str, Any]:
    """The commit measured, and whether the trainer's files differed from it (uncommitted edits)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "uncommitted": git("status", "--porcelain", "stages", "pipeline").splitlines()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "deepspeed", "trl", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


if __name__ == "__main__":
    main()
