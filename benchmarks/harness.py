"""What every benchmark here shares: a quiet machine, its child processes, alternating repeats, ratios and medians.

A benchmark compares contenders (dice against a baseline) on a shared machine whose speed drifts. So it waits for
the other processes to leave the CPUs (`wait_quiet`), runs each contender in its own process (`run_child`: a log,
the RESULT line, the step lines timestamped on arrival, the peak RSS), runs the contenders in turn over N repeats
(`alternate`: A B, A B, ...), and reports every repeat's ratio of runs that ran back to back and their median
(`ratios`, `ratio_line`), never the best run of one against the best of the other.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
# everything the benchmarks write (models, runs, logs, JSON); DICE_BENCH_OUT moves it (the smoke tests do)
OUT = Path(os.environ.get("DICE_BENCH_OUT") or REPO / "benchmarks" / "out").resolve()
RESULT = "BENCH_RESULT "  # a child's result line: RESULT + one JSON object (dice's stages print DICE_STAGE_RESULT)
T = TypeVar("T")


def shown(path: Path | str) -> str:
    """`path` relative to the repository when it is inside it (as printed and recorded), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def child_env(**defaults: str) -> dict[str, str]:
    """This process's environment for a child: quiet progress bars, unbuffered output, the repository importable,
    and `defaults` (e.g. OMP_NUM_THREADS) where the environment does not already set them."""
    env = dict(os.environ)
    quiet = {"TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
             "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}  # fmt: skip
    for key, value in {**quiet, **defaults}.items():
        env.setdefault(key, value)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def git_state() -> dict[str, Any]:
    """The commit measured, and the files of `stages/` and `pipeline/` that differed from it (uncommitted edits)."""

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):  # no git here, or it hung
            return ""

    return {"commit": git("rev-parse", "HEAD"), "uncommitted": git("status", "--porcelain", "stages", "pipeline").splitlines()}


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Installed version of each package: its distribution's, else its module's `__version__` (vLLM's CPU build is
    installed under another distribution name), else "not installed"."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            found = importlib.util.find_spec(pkg) is not None
            out[pkg] = str(getattr(importlib.import_module(pkg), "__version__", "?")) if found else "not installed"
    return out


def cpu_jiffies(pid: int) -> tuple[int, int]:
    """(busy jiffies of the whole machine, CPU jiffies of process `pid`): their difference is the others' work."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(fields) - fields[3] - fields[4], int(stat[11]) + int(stat[12])  # all but idle, iowait; utime+stime
    except (OSError, IndexError, ValueError):
        return 0, 0


def foreign_share(start: tuple[int, int], end: tuple[int, int], wall_s: float) -> float | None:
    """Share of all CPUs that processes other than the measured one used between two `cpu_jiffies` samples."""
    if not end[0]:
        return None  # no /proc here
    others = (end[0] - start[0]) - (end[1] - start[1])
    return max(0.0, others / os.sysconf("SC_CLK_TCK")) / (wall_s * (os.cpu_count() or 1))


def wait_quiet(limit_s: float, sample_s: float = 2.0) -> float | None:
    """Wait (up to `limit_s`; 0: one sample) until other processes use < 10% of the CPUs over `sample_s`.
    Returns the last share seen (None where /proc is missing)."""
    deadline = time.perf_counter() + limit_s
    while True:
        start = cpu_jiffies(os.getpid())
        time.sleep(sample_s)
        share = foreign_share(start, cpu_jiffies(os.getpid()), sample_s)
        if share is None or share < 0.1:
            return share
        if time.perf_counter() > deadline:
            if limit_s:
                print(f"  (the machine is still busy: {100 * share:.0f}% of the CPUs used by others; going on)", flush=True)
            return share
        time.sleep(8)


def run_child(cmd: list[str], log: Path, step_re: re.Pattern | None = None, wait_s: float | None = None,
              env: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run `cmd` in the repository (after `wait_quiet(wait_s)` unless None), its output into `log`.

    Returns `result` (the last RESULT or DICE_STAGE_RESULT line's JSON), `step_ends` / `step_cpu` (when each line
    matching `step_re` arrived, and `cpu_jiffies` of the child then), its `peak_rss_mib` (its own RSS high-water
    mark, from `os.wait4`), `process_wall_s`, `busy_before` and `log`. Raises with the log's tail if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    busy_before = wait_quiet(wait_s) if wait_s is not None else None
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)  # fmt: skip
    steps: dict[int, tuple[float, tuple[int, int]]] = {}
    result: dict[str, Any] = {}
    with open(log, "w") as f:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter()
            f.write(line)
            if step_re and (m := step_re.match(line)):
                steps[int(m.group(1))] = (now, cpu_jiffies(proc.pid))
            elif line.startswith((RESULT, "DICE_STAGE_RESULT ")):
                result = json.loads(line.split(" ", 1)[1])
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: ru_maxrss is its RSS high-water mark (KiB)
    if (code := os.waitstatus_to_exitcode(status)) != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{' '.join(cmd[:5])} ... exited with {code}; log {log}:\n{tail}")
    return {"result": result, "step_ends": [steps[k][0] for k in sorted(steps)],
            "step_cpu": [steps[k][1] for k in sorted(steps)], "peak_rss_mib": usage.ru_maxrss / 1024,
            "process_wall_s": time.perf_counter() - started, "busy_before": busy_before, "log": shown(log)}  # fmt: skip


def alternate(contenders: dict[str, Callable[[int], T]], repeats: int) -> dict[str, list[T]]:
    """Run every contender once per repeat, in turn (A B, A B, ...), so repeat i's runs ran back to back and a slow
    spell of the machine hits them alike. `contenders` maps a name to a function of the repeat's index."""
    runs: dict[str, list[T]] = {name: [] for name in contenders}
    for rep in range(repeats):
        for name, run in contenders.items():
            print(f"running {name}" + (f" (run {rep + 1}/{repeats})" if repeats > 1 else "") + " ...", flush=True)
            runs[name].append(run(rep))
    return runs


def ratios(a: list[float], b: list[float]) -> list[float]:
    """a's run i over b's run i, for every repeat i (the two ran back to back)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} runs against {len(b)}: ratios pair runs of the same repeat")
    return [x / y for x, y in zip(a, b)]


def median(values: list[float]) -> float:
    """The median (the mean of the two middle values for an even count): the headline of per-repeat ratios."""
    return float(statistics.median(values))


def middle(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose `key` is the median one (the lower middle for an even count): a run that happened."""
    return sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]


def ratio_line(label: str, values: list[float]) -> str:
    """Every repeat's ratio and their median, the one format all benchmarks print: `label: x1.39, x1.66; median x1.52`."""
    return f"{label}: " + ", ".join(f"x{v:.2f}" for v in values) + f"; median x{median(values):.2f}"


def gemm_flops(shapes: list[tuple[int, int, int]], device: Any, seconds: float = 1.0) -> dict[str, float]:
    """This machine's float32 GEMM rate (FLOP/s) for each (m, k, n) in `shapes`, (m × k) @ (k × n) on `device`, the
    best of repeated timings of 10 products over `seconds` each: the ceiling a model's linear layers can reach."""
    import torch

    out = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        best, deadline = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t) / 10)
        out[f"{m}x{k}x{n}"] = 2.0 * m * k * n / best
    return out
