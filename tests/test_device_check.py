"""`bash scripts/device-check.sh --cpu`: the single-GPU device check's every step, on the tiny model on this CPU, so
the check cannot rot before a GPU runs it (docs/gpu-clusters.md, The device check)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ["environment, matmul peak", "build model", "gpu tests (no vLLM)", "pairs", "reference", "train zero0 full",
         "train zero0 ckpt", "train zero3 full", "train zero3 ckpt", "train benchmark", "label benchmark"]  # fmt: skip


def test_device_check_on_cpu(tmp_path):
    """Every step runs and passes: the model is built, the gpu tests collect (and skip without CUDA), pairs →
    reference → train at ZeRO-0 and ZeRO-3 with checkpointing off and on, each with its measured peak next to
    `dice plan`'s estimate and step 0's margin at float32 precision, and both benchmarks through their command
    lines. The budget is widened from the check's 180 s: a shared CI machine is slower than a quiet one; the wall
    time is in the report."""
    out = tmp_path / "check"
    proc = subprocess.run(["bash", "scripts/device-check.sh", "--cpu", "--out", str(out), "--budget", "900"], cwd=REPO,
                          capture_output=True, text=True, timeout=1000)  # fmt: skip
    report_file = out / "device-check.json"
    assert report_file.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_file.read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == STEPS
    bad = {name: s.get("reason") or s.get("tail", "")[-1500:] for name, s in steps.items() if s["status"] != "ok"}
    assert not bad and proc.returncode == 0, bad
    assert report["versions"]["torch"] and report["matmul"]["flops"] > 0
    assert (out / "device-check.md").is_file()
    for name in STEPS[5:9]:
        s = steps[name]
        assert s["step0"]["per_token_disagreement"] < 1e-4  # policy = reference at step 0, float32
        assert abs(s["step0"]["loss"] - 0.6931) < 1e-3
        assert s["peak"]["allocated"] > 0 and s["estimate"]["without_runtime"] > 0
    assert steps["reference"]["estimate"]["without_runtime"] > 0
    assert any("ratio" in k for k in steps["train benchmark"]["result"])
    assert steps["label benchmark"]["result"]
