"""The device check (`bash scripts/device-check.sh [--cpu]`): dice's GPU paths on one GPU in one bounded run.

Each step runs in its own process under its own time limit, within the whole run's budget (GPU: 540 s, CPU: 180 s),
and what it found goes into one JSON (`device-check.json`) and a table (`device-check.md`) in the output folder:

1. environment: versions, the device, and (GPU) the bf16 matmul rate measured here (8192³, best of 10): the peak
   MFU is quoted against.
2. model: a random-initialised Llama-architecture model of realistic shape built on the device (GPU: 1.1B
   parameters, TinyLlama's shape; --cpu: the tiny model), with the tiny BPE tokenizer.
3. gpu tests: `pytest -o addopts= -m gpu tests/test_gpu.py -k "not vllm"` (one process: the check machine has no
   pytest-xdist; vLLM does not travel to it).
4. pairs → reference → train, round 0 on the offline pairs, in bf16 (GPU; float32 on CPU) at ZeRO-0 and ZeRO-3 on
   one process, gradient checkpointing off and on: each stage's peak memory (GPU: `max_memory_allocated`; CPU: the
   resident high-water mark over the process's size before the stage), next to `dice plan`'s estimate of the same
   layout; step 0's DPO margin (policy = reference, so the margin is the masking/packing disagreement: ≈ 0) and
   the per-token log-prob disagreement |Δ| it implies (bf16 tolerance 0.02 nats, float32 1e-4).
5. benchmarks, through their command lines: `benchmarks/train_throughput.py` (dice against TRL's DPOTrainer,
   every repeat's ratio and the median; MFU = 6·params·tokens/s over the measured matmul peak) and
   `benchmarks/label_throughput.py` (the label scorer against batched transformers), `--device cuda` on GPU.

A step that fails is recorded with its output's tail and the run goes on; a step with no time left is skipped. Exit
status 1 when a step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = {"gpu": 540.0, "cpu": 180.0}  # the run's default budgets (--budget changes them)
# TinyLlama-1.1B's shape: realistic for throughput and memory (the weights are random: neither depends on them)
GPU_MODEL = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 4096}  # fmt: skip
CPU_MODEL = {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}  # fmt: skip
MARGIN_TOLERANCE = {"gpu": 0.02, "cpu": 1e-4}  # per-token |log-prob| disagreement of policy and reference at step 0


class Check:
    """The run's steps, their results and the deadline they share."""

    def __init__(self, mode: str, out: Path, budget: float):
        self.mode, self.out, self.budget = mode, out, budget
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.steps: list[dict[str, Any]] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
                    "PYTHONWARNINGS": "ignore"}  # fmt: skip
        if mode == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], limit: float, **record: Any) -> dict[str, Any]:
        """Run `cmd` under min(limit, time left); record its status, seconds and output tail."""
        step: dict[str, Any] = {"step": name, **record}
        self.steps.append(step)
        limit = min(limit, self.left() - 5)
        if limit < 10:
            step.update(status="skipped", reason="no time left in the run's budget")
            return step
        started = time.monotonic()
        log = self.out / "logs" / f"{name.replace(' ', '_').replace('/', '-')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=limit)
            output, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            output += f"\n(timed out after {limit:.0f} s)"
            code = None
        log.write_text(output)
        step.update(seconds=round(time.monotonic() - started, 1), log=str(log.relative_to(self.out)))
        step["status"] = "ok" if code == 0 else "timeout" if code is None else "failed"
        if code != 0:
            step["tail"] = output[-2500:]
        step["_output"] = output
        return step

    def result(self, step: dict[str, Any], marker: str) -> Any:
        """The JSON a step's process printed after `marker` (its last such line)."""
        lines = [ln for ln in step.get("_output", "").splitlines() if ln.startswith(marker)]
        return json.loads(lines[-1][len(marker):]) if lines else None


# ---------------------------------------------------------------------------------------------- child modes


def stage_peak(argv: list[str]) -> None:
    """`device_check.py --stage-peak STAGE CONF --round K [...]`: the stage in this process, then its peak memory."""
    import torch

    stage = argv[0]
    base = _rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the resident high-water mark restarts here
    module = __import__(f"stages.{stage}", fromlist=["run"])
    from stages.common import main

    main(stage, module.run, argv[1:])
    if torch.cuda.is_available():
        peak = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
    else:
        peak = {"allocated": _status("VmHWM") - base, "reserved": _status("VmHWM")}
    print("CHECK_PEAK " + json.dumps(peak), flush=True)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    return _status("VmRSS")


def matmul_peak(mode: str) -> None:
    """The dense matmul rate of this device: bf16 8192³ on GPU (float32 1024³ on CPU), best of 10 (FLOP/s)."""
    import torch

    gpu = mode == "gpu"
    n, dtype = (8192, torch.bfloat16) if gpu else (1024, torch.float32)
    device = "cuda" if gpu else "cpu"
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(12):
        if gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    info = {"flops": 2 * n**3 / best, "shape": f"{n}³", "dtype": str(dtype).removeprefix("torch."),
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
                         **{k: ver(k) for k in ("transformers", "deepspeed", "pydantic", "trl", "datasets")}}}  # fmt: skip
    if gpu:
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}")
    print("CHECK_MATMUL " + json.dumps(info), flush=True)


def build_model(mode: str, path: str) -> None:
    """A random-initialised Llama of the mode's shape with the tiny BPE tokenizer, saved (safetensors) at `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.run.tiny import _read_texts, build_tokenizer

    started = time.perf_counter()
    rows = _read_texts([REPO / "data/prompts.jsonl", REPO / "data/offline_prefs.jsonl"])
    tokenizer = build_tokenizer([r[k] for r in rows for k in ("prompt", "chosen", "rejected") if r.get(k)], 2048)
    shape = dict(GPU_MODEL if mode == "gpu" else CPU_MODEL)
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    config = LlamaConfig(**shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)  # fmt: skip
    device = "cuda" if mode == "gpu" else "cpu"
    dtype = torch.bfloat16 if mode == "gpu" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    print("CHECK_MODEL " + json.dumps({"path": path, "params": params, "seconds": time.perf_counter() - started,
                                       **shape}), flush=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------- the run


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _overrides(mode: str, model: str, runs: Path, extra: dict[str, Any]) -> list[str]:
    gpu = mode == "gpu"
    base = {
        "name": "check", "runs_dir": str(runs), "device": "cuda" if gpu else "cpu", "model.policy": model,
        "model.build_tiny_if_missing": "false", "model.max_length": 512, "round0.max_pairs": 64 if gpu else 8,
        "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.learning_rate": 1e-6, "train.warmup_steps": 0,
        "train.num_processes": 1, "reference.num_processes": 1, "reference.batch_size": 8, "eval.enabled": "false",
        "data.offline": str(REPO / "data/offline_prefs.jsonl"), "data.prompts": str(REPO / "data/prompts.jsonl"),
    }  # fmt: skip
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def _save(check: Check, name: str, overrides: list[str]) -> Path:
    sys.path.insert(0, str(REPO))
    from pipeline.config import load_config, save_config

    path = check.out / "configs" / f"{name}.yaml"
    save_config(load_config(REPO / "conf/tiny.yaml", overrides), path)
    return path


def _estimate(check: Check, conf: Path, stage: str, device_bytes: int | None) -> dict[str, Any]:
    """`dice plan`'s estimate of one stage's layout (the same code: pipeline.compute.memory), in bytes."""
    from pipeline.compute import memory
    from pipeline.config import load_config

    cfg = load_config(conf)
    on_gpu = check.mode == "gpu"
    if not on_gpu:  # plan a CPU run as it runs: float32, no fixed device size
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "float32"}),
                                     "train": cfg.train.model_copy(update={"bf16": False})})  # fmt: skip
    (est,) = memory.plan_stage(cfg, stage, 1, device_bytes, on_gpu=on_gpu).estimates
    parts = dict(est.parts)
    runtime = parts.pop("runtime", 0)
    return {"total": est.total, "without_runtime": est.total - runtime, "parts": parts, "fits": est.fits,
            "what": est.what}  # fmt: skip


def _margin(conf: Path) -> dict[str, Any]:
    """Step 0 of the training: margin, chosen reward and the per-token disagreement of policy and reference."""
    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.run import rounds

    cfg = load_config(conf)
    rd = rounds.round_dir(cfg, 0)
    m = pq.read_table(rd / "train_metrics.parquet").to_pylist()[0]
    ref = pq.read_table(rd / "reference.parquet", columns=["chosen_tokens", "rejected_tokens"]).to_pandas()
    tokens = float((ref.chosen_tokens + ref.rejected_tokens).mean() / 2)
    beta = cfg.train.beta
    per_token = max(abs(m["chosen_reward"]), abs(m["rejected_reward"])) / beta / tokens
    return {"margin": m["margin"], "chosen_reward": m["chosen_reward"], "loss": m["loss"],
            "per_token_disagreement": per_token, "mean_response_tokens": tokens}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--out", default=str(REPO / "runs" / "device-check"))
    ap.add_argument("--model", help="use this model folder instead of building one (cpu: e.g. the tests' tiny model)")
    ap.add_argument("--skip-benchmarks", action="store_true", help="leave out step 5")
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default: 540 on GPU, 180 on CPU); a "
                    "step that would start with less than 10 s left is skipped")  # fmt: skip
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    check = Check(args.mode, out, args.budget or BUDGET_S[args.mode])
    gpu = args.mode == "gpu"
    me = str(Path(__file__).resolve())
    report: dict[str, Any] = {"mode": args.mode, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "python": platform.python_version(), "budget_s": check.budget}  # fmt: skip
    peak = check.run("environment, matmul peak", _py(me, "--matmul", args.mode), 90)
    report["matmul"] = check.result(peak, "CHECK_MATMUL ")
    report["versions"] = (report["matmul"] or {}).pop("versions", None)
    device_bytes = (report["matmul"] or {}).get("memory_bytes") if gpu else None

    model = args.model
    if model is None:
        model = str(out / "model")
        built = check.run("build model", _py(me, "--build-model", args.mode, model), 240 if gpu else 60)
        report["model"] = check.result(built, "CHECK_MODEL ")
    else:
        report["model"] = {"path": model}
    if not Path(model, "config.json").is_file():
        report["steps"] = check.steps
        return finish(check, report)
    from pipeline.compute import memory

    shape = memory.read_shape(model)
    report["model"]["params"] = shape.params

    tests = check.run("gpu tests (no vLLM)", _py("-m", "pytest", "-q", "-o", "addopts=", "-m", "gpu", "tests/test_gpu.py",
                                                 "-k", "not vllm", "-p", "no:cacheprovider"), 200 if gpu else 60)  # fmt: skip
    tail = [ln for ln in tests.get("_output", "").splitlines() if " passed" in ln or " skipped" in ln or " failed" in ln]
    tests["summary"] = tail[-1].strip("= ") if tail else None
    if tests["status"] == "failed" and tests["summary"] and " failed" not in tests["summary"] and "error" not in tests["summary"]:
        tests["status"] = "ok"  # pytest's exit 5 (everything skipped: no CUDA) is not a failure
        tests.pop("tail", None)

    # pairs -> reference once; then train on copies of round 0 in each layout
    runs = out / "runs"
    base = _save(check, "base", _overrides(args.mode, model, runs / "base", {}))
    for stage in ("pairs", "reference"):
        step = check.run(stage, _py(me, "--stage-peak", stage, str(base), "--round", "0"), 120)
        step["peak"] = check.result(step, "CHECK_PEAK ")
        if stage == "reference":
            step["estimate"] = _estimate(check, base, "reference", device_bytes)
    layouts = [(z, ck) for z in (0, 3) for ck in (False, True)]
    for zero, ckpt in layouts:
        name = f"train zero{zero} {'ckpt' if ckpt else 'full'}"
        conf = _save(check, name.replace(" ", "-"), _overrides(args.mode, model, runs / name.replace(" ", "-"), {
            "train.zero_stage": zero, "train.gradient_checkpointing": str(ckpt).lower()}))  # fmt: skip
        src, dst = runs / "base" / "check" / "round-0", runs / name.replace(" ", "-") / "check" / "round-0"
        if not (src / "reference.parquet").is_file():
            check.steps.append({"step": name, "status": "skipped", "reason": "no reference.parquet"})
            continue
        shutil.copytree(src, dst, dirs_exist_ok=True)
        step = check.run(name, _py(me, "--stage-peak", "train", str(conf), "--round", "0"), 150,
                         zero_stage=zero, gradient_checkpointing=ckpt)  # fmt: skip
        step["peak"] = check.result(step, "CHECK_PEAK ")
        step["estimate"] = _estimate(check, conf, "train", device_bytes)
        if step["status"] == "ok":
            step["step0"] = s0 = _margin(conf)
            if s0["per_token_disagreement"] > MARGIN_TOLERANCE[args.mode]:
                step["status"] = "failed"
                step["reason"] = (f"step 0: policy and reference disagree by {s0['per_token_disagreement']:.3g} nats a "
                                  f"token (tolerance {MARGIN_TOLERANCE[args.mode]})")  # fmt: skip
        shutil.rmtree(dst / "checkpoint", ignore_errors=True)  # 2 GB each on GPU

    if not args.skip_benchmarks:
        benchmarks(check, report, args.mode, shape)
    report["steps"] = check.steps
    return finish(check, report)


def benchmarks(check: Check, report: dict[str, Any], mode: str, shape: Any) -> None:
    """Step 5: the two throughput benchmarks through their command lines, with MFU against the measured peak."""
    gpu = mode == "gpu"
    m = GPU_MODEL if gpu else CPU_MODEL
    model_flags = ["--hidden", str(m["hidden_size"]), "--intermediate", str(m["intermediate_size"]), "--layers",
                   str(m["num_hidden_layers"]), "--heads", str(m["num_attention_heads"]), "--kv-heads",
                   str(m["num_key_value_heads"]), "--vocab", str(m["vocab_size"]), "--sft-steps", "0"]  # fmt: skip
    device = ["--device", "cuda"] if gpu else []
    bench_env = {"DICE_BENCH_OUT": str(check.out / "bench")}
    check.env.update(bench_env)
    sizes = ["--pairs", "256", "--micro-batch", "4", "--global-batch", "16", "--repeats", "3"] if gpu else \
        ["--pairs", "16", "--micro-batch", "2", "--global-batch", "4", "--warmup", "1", "--repeats", "1"]  # fmt: skip
    out = check.out / "train_throughput.json"
    step = check.run("train benchmark", _py("benchmarks/train_throughput.py", *device, *model_flags, *sizes,
                                            "--out", str(out)), 240 if gpu else 180)  # fmt: skip
    if out.is_file():
        step["result"] = _train_summary(json.loads(out.read_text()), shape, report.get("matmul"))
    out = check.out / "label_throughput.json"
    sizes = ["--prompts", "64", "--k", "8", "--batch-size", "16", "--repeats", "3"] if gpu else \
        ["--prompts", "8", "--k", "2", "--batch-size", "8", "--repeats", "1", "--threads", "1"]  # fmt: skip
    step = check.run("label benchmark", _py("benchmarks/label_throughput.py", *(device or ["--device", "cpu"]),
                                            *model_flags, *sizes, "--out", str(out)), 150 if gpu else 60)  # fmt: skip
    if out.is_file():
        data = json.loads(out.read_text())
        # dice's scorer over batched transformers: every repeat's ratio and the median
        ratios = {k: (v.get("batched") or {}).get("dice") if isinstance(v, dict) else None for k, v in data.items()
                  if k.startswith("ratio")}  # fmt: skip
        step["result"] = {f"dice/batched {k}": v for k, v in ratios.items() if v is not None} or \
            {k: v for k, v in data.items() if "ratio" in k}  # fmt: skip


def _train_summary(data: dict[str, Any], shape: Any, matmul: dict[str, Any] | None) -> dict[str, Any]:
    """Every repeat's dice/TRL ratio, the median, and dice's MFU: 6·params·tokens/s (forward and backward of the
    linear layers; attention left out) over the matmul rate measured in this run."""
    found: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
        elif "ratio" in path or path.endswith("tokens_per_s") or path.endswith("tokens_per_s_runs"):
            found[path] = node

    walk(data, "")
    dice_tps = found.get("results.dice.tokens_per_s")  # the median run of dice at its default ZeRO stage
    if dice_tps and matmul and matmul.get("flops"):
        found["dice_mfu"] = 6 * shape.params * dice_tps / matmul["flops"]
    return found


def finish(check: Check, report: dict[str, Any]) -> int:
    for step in check.steps:
        step.pop("_output", None)
    report["wall_s"] = round(time.monotonic() - check.started, 1)
    report["failed"] = [s["step"] for s in check.steps if s["status"] in ("failed", "timeout")]
    (check.out / "device-check.json").write_text(json.dumps(report, indent=1, default=str))
    table = _table(report)
    (check.out / "device-check.md").write_text(table + "\n")
    print(table)
    print(f"\n{check.out / 'device-check.json'}: {len(check.steps)} steps in {report['wall_s']} s"
          + (f"; FAILED: {', '.join(report['failed'])}" if report["failed"] else "; no step failed"))  # fmt: skip
    return 1 if report["failed"] else 0


def _gib(x: Any) -> str:
    return f"{x / (1 << 30):.2f}" if isinstance(x, (int, float)) else ""


def _table(report: dict[str, Any]) -> str:
    mm = report.get("matmul") or {}
    lines = [f"# device check ({report['mode']}), {report['started_at']}", "",
             f"versions: {json.dumps(report.get('versions'))}",
             f"matmul peak: {mm.get('flops', 0) / 1e12:.1f} TFLOP/s ({mm.get('dtype')} {mm.get('shape')}) "
             f"{mm.get('device', '')}", f"model: {(report.get('model') or {}).get('params', 0) / 1e9:.3f}B parameters", "",
             "Peaks: GPU, torch's max_memory_allocated; CPU, the resident high-water mark over the process's size "
             "before the stage (libraries it loads included, so above the estimate there).", "",
             "| step | status | s | peak GiB (measured) | estimate GiB (dice plan, no runtime) | notes |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for s in report.get("steps", []):
        peak = (s.get("peak") or {}).get("allocated")
        est = (s.get("estimate") or {}).get("without_runtime")
        notes = []
        if "step0" in s:
            notes.append(f"step-0 margin {s['step0']['margin']:.2e}, |Δlogp|/token {s['step0']['per_token_disagreement']:.1e}")
        for key in ("summary", "reason"):
            if s.get(key):
                notes.append(str(s[key]))
        if s.get("result"):
            r = s["result"]
            text = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in list(r.items())[:6])
            notes.append(text if len(text) < 300 else text[:297] + "...")
        lines.append(f"| {s['step']} | {s['status']} | {s.get('seconds', '')} | {_gib(peak)} | {_gib(est)} | "
                     f"{'; '.join(notes)} |")  # fmt: skip
    lines.append(f"\nwall: {report.get('wall_s')} s of {report['budget_s']:.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if len(sys.argv) > 1 and sys.argv[1] == "--stage-peak":
        stage_peak(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--matmul":
        matmul_peak(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "--build-model":
        build_model(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
