"""One way to run a stage on many processes.

DeepSpeed ranks (`train`, `label`, `reference`): `run(stage, cfg, plan, n, worker, job)` runs
`worker(cfg, plan, **job)` on n processes. With n = 1 it runs in this process. With n > 1 it re-launches the
stage's module under the DeepSpeed launcher (`python -m deepspeed.launcher.runner`, as users launch DeepSpeed):
a free `--master_port`, `--hostfile` for several nodes (n is then the processes per node), gloo with the cores
split between the ranks (`OMP_NUM_THREADS`) and `DS_ACCELERATOR=cpu` on CPU, NCCL on GPU. Every rank's output
goes to this process's output as it is printed. A rank that fails writes its traceback to
`round-k/.dice/<stage>.rank<r>.error`, which becomes the stage's error; rank 0's return value comes back. The
stage module runs its worker when started with `--worker JOB` (`stages.common.worker_main`), so each stage file still tells
its whole story.

vLLM engine processes (`generate`, local judges in `label`) are not DeepSpeed ranks: `engine_workers` starts one
process per engine, each on its own `tensor_parallel_size` GPUs (CUDA_VISIBLE_DEVICES), and streams their output.

`check` fails early, before anything is launched or scored, on a layout that cannot run: more processes than
visible GPUs, a hostfile that is missing, or names a host that does not resolve or accept SSH connections.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, save_config
from pipeline.data.artifacts import MANIFEST_DIR, StagePlan, write_json_atomic

Worker = Callable[..., dict[str, Any]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_processes(n: int) -> int:
    """Processes to run for a `num_processes` field: n, or (0) every visible GPU, 1 without a GPU."""
    return n or max(visible_gpus(), 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------------------------------------- early checks


def parse_hostfile(path: str) -> list[tuple[int, str, int]]:
    """(line number, host, slots) of a DeepSpeed hostfile (`host slots=N` lines, # comments)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"hostfile {p}: file not found")
    hosts = []
    for no, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [x for x in parts[1:] if x.startswith("slots=")]
        if len(parts) < 2 or not slots or not slots[0][6:].isdigit():
            raise ValueError(f"hostfile {p}, line {no}: expected 'HOST slots=N', got {raw.strip()!r}")
        hosts.append((no, parts[0], int(slots[0][6:])))
    if not hosts:
        raise ValueError(f"hostfile {p}: names no host")
    return hosts


def _is_local(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn())


def check(n: int, hostfile: str | None, field: str, *, gpus: int | None = None, ssh_port: int = 22,
          timeout_s: float = 5.0) -> None:  # fmt: skip
    """Fail before launching when `n` processes (per node, with a hostfile) cannot run here.

    Args:
        n: the resolved process count; field: the config field it comes from (named in errors).
        gpus: visible GPUs (default: torch's count); 0 means a CPU machine, where n gloo processes share the cores.
    Raises:
        ValueError: naming the field, hostfile, line and host at fault.
    """
    gpus = visible_gpus() if gpus is None else gpus
    if hostfile:
        for no, host, slots in parse_hostfile(hostfile):
            where = f"hostfile {hostfile}, line {no}: host {host!r}"
            if n > slots:
                raise ValueError(f"{field}={n} processes per node, but {where} has slots={slots}")
            try:
                socket.getaddrinfo(host, ssh_port)
            except OSError as e:
                raise ValueError(f"{where} does not resolve ({e}); fix the name or remove the line") from None
            if _is_local(host):
                continue
            try:
                with socket.create_connection((host, ssh_port), timeout=timeout_s):
                    pass
            except OSError as e:
                raise ValueError(f"{where} does not accept SSH connections on port {ssh_port} ({e}); the DeepSpeed "
                                 "launcher starts remote ranks over SSH (pdsh)") from None  # fmt: skip
    elif gpus and n > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ValueError(f"{field}={n}, but only {gpus} GPU(s) are visible{shown}; lower it (0: every visible GPU) "
                         "or give the stage more GPUs")  # fmt: skip


# ---------------------------------------------------------------------------------------------- DeepSpeed ranks


def _files(plan: StagePlan, stage: str) -> dict[str, Path]:
    d = plan.round_dir / MANIFEST_DIR
    return {"config": d / f"{stage}.config.yaml", "job": d / f"{stage}.job.json", "stats": d / f"{stage}.stats.json"}


def run(stage: str, cfg: RunConfig, plan: StagePlan, n: int, worker: Worker, job: dict[str, Any] | None = None, *,
        hostfile: str | None = None, what: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Run `worker(cfg, plan, **job)` on n processes; return rank 0's result.

    n = 1 (and no hostfile): in this process. Otherwise `python -m stages.<stage> CONF --round K --worker JOB` on
    n ranks per node under the DeepSpeed launcher; a rank's failure raises RuntimeError with its traceback."""
    job = job or {}
    if n == 1 and not hostfile:
        return worker(cfg, plan, **job)
    import torch

    files = _files(plan, stage)
    files["stats"].unlink(missing_ok=True)
    for stale in plan.round_dir.glob(f"{MANIFEST_DIR}/{stage}.rank*.error"):
        stale.unlink()
    save_config(cfg, files["config"])  # the exact config of this process (overrides included), for the ranks
    write_json_atomic(files["job"], {"job": job, "stats_file": str(files["stats"])})
    env = dict(os.environ)
    resources = ["--num_gpus", str(n)]
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible and not hostfile:
            # the launcher drops CUDA_VISIBLE_DEVICES when told --num_gpus and would use GPUs 0..n-1 of the machine;
            # name the stage's own GPUs instead
            resources = ["--include", "localhost:" + ",".join(visible.split(",")[:n])]
    else:
        # gloo ranks on one CPU machine: split the cores, or each rank's threads fight the others' (25x slower)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
        env.setdefault("DS_ACCELERATOR", "cpu")
    hosts = ["--hostfile", hostfile] if hostfile else []
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", *hosts, *resources, "--master_port", str(free_port()),
        "--no_local_rank", "--module", f"stages.{stage}", str(files["config"]), "--round", str(plan.round),
        "--worker", str(files["job"]),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        errors = sorted(plan.round_dir.glob(f"{MANIFEST_DIR}/{stage}.rank*.error"))
        detail = f"{errors[0].stem.split('.')[-1]} failed:\n{errors[0].read_text()}" if errors else "see the rank output above"
        raise RuntimeError(f"round {plan.round}: {what or stage} failed (deepspeed exited with {proc.returncode}); {detail}")
    return json.loads(files["stats"].read_text())


def init_distributed() -> None:
    """Join the ranks' process group (NCCL on GPU, gloo on CPU); one process without a launcher is a world of 1."""
    import importlib

    import deepspeed
    import torch

    if "WORLD_SIZE" not in os.environ:  # in-process, one rank: without these DeepSpeed tries MPI discovery
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        # The shared-memory all-reduce op is JIT-compiled on first use (~1 min); gloo alone is enough here.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")


def device():
    """This rank's device: its GPU (LOCAL_RANK) or the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------- vLLM engines


def engine_env(w: int, devices_per_engine: int) -> dict[str, str]:
    """Engine process w's environment: its own `devices_per_engine` GPUs (CUDA_VISIBLE_DEVICES)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    import torch

    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(d) for d in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[w * devices_per_engine : (w + 1) * devices_per_engine])
    return env


def engine_workers(cmds: list[list[str]], devices_per_engine: int, on_line: Callable[[int, str], None],
                   what: str) -> None:  # fmt: skip
    """Run one process per command (engine w on its own GPUs), passing each output line to on_line(w, line).

    One failing engine stops the others (the stage cannot finish); raises RuntimeError with its last output."""
    procs, tails, lock = [], [], threading.Lock()

    def pump(w: int, proc: subprocess.Popen, tail: deque[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            with lock:
                on_line(w, line)

    threads = []
    for w, cmd in enumerate(cmds):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=engine_env(w, devices_per_engine))  # fmt: skip
        tail: deque[str] = deque(maxlen=20)
        t = threading.Thread(target=pump, args=(w, proc, tail), daemon=True)
        t.start()
        procs.append(proc), tails.append(tail), threads.append(t)
    failed = None
    try:
        for w, proc in enumerate(procs):
            if proc.wait() != 0 and failed is None:
                failed = w
                for other in procs:  # one engine failed: the stage cannot finish, stop the others
                    if other.poll() is None:
                        other.terminate()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for t in threads:
            t.join(timeout=5)
    if failed is not None:
        raise RuntimeError(f"{what} engine worker {failed} failed. Last output:\n" + "\n".join(tails[failed]))
