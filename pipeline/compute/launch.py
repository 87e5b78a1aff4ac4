"""One way to run a stage on many processes, and the rules every one of them follows.

DeepSpeed ranks (`train`, `label`, `reference`): `run(stage, cfg, plan, n, worker, job)` runs
`worker(cfg, plan, **job)` on n processes. With n = 1 it runs in this process. With n > 1 it re-launches the
stage's module under the DeepSpeed launcher (`python -m deepspeed.launcher.runner`, as users launch DeepSpeed):
a free `--master_port`, `--hostfile` for several nodes (n is then the processes per node; 0: each host's
`slots`), gloo with the cores split between the ranks (`OMP_NUM_THREADS`) and `DS_ACCELERATOR=cpu` on CPU, NCCL
on GPU. Every rank's output goes to this process's output as it is printed. A rank that fails writes its
traceback to `round-k/.dice/<stage>.rank<r>.error`, which becomes the stage's error; rank 0's return value comes
back. The stage module runs its worker when started with `--worker JOB` (`stages.common.worker_main`), so each
stage file still tells its whole story.

vLLM engine processes (`generate`, local judges in `label`) are not DeepSpeed ranks: `engine_workers` starts one
process per engine, each on its own `tensor_parallel_size` GPUs (CUDA_VISIBLE_DEVICES), and streams their output.

The rules (each enforced here, so a stage cannot forget one):

- **A rank's device.** `device()` is the rank's GPU (LOCAL_RANK among the stage's GPUs) or the CPU, and
  `bind_device()` makes it the current CUDA device before anything else touches CUDA, in every rank. DeepSpeed's
  launcher replaces CUDA_VISIBLE_DEVICES by the indices 0..n-1; each rank puts the stage's own GPUs back (they
  may be UUIDs, which `--include` cannot name).
- **Collectives.** `sum_across`, `max_across`, `barrier` and `all_reduce` are the only collectives dice's own
  code calls (tests/test_processes.py fails on any other use of torch.distributed or deepspeed.comm): the first
  two build their tensor on `device()` themselves, and `all_reduce` refuses a tensor on another device (NCCL
  takes only the rank's GPU tensors; gloo would hide the mistake on CPU).
- **Processes die with the stage.** Every process tree the stage starts (`spawn`) runs in its own process group,
  and a small reaper process kills those groups as soon as the stage is gone, however it ended (SIGKILL
  included), through any number of hops (DeepSpeed runner → launcher → ranks; engine worker → vLLM's own
  processes). Each rank also watches the stage itself (`watch_owner`: its PID on the same host, a heartbeat file
  on other nodes) and ends when it is gone, which is what reaches ranks on other nodes.
- **Several nodes.** The variables dice's ranks need (Hugging Face cache and offline mode, DeepSpeed and dice
  settings) go into the env file DeepSpeed's pdsh launcher exports on every node (`DS_ENV_FILE`); every rank
  first checks that it sees the run folder the launching host wrote (a shared filesystem at the same path), or
  fails with one line naming its host.

`check` fails early, before anything is launched or scored, on a layout that cannot run: more processes than
visible GPUs, several processes on MIG instances, a hostfile that is missing, or names a host that does not
resolve or accept SSH connections.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pipeline.compute import gpus
from pipeline.config import RunConfig, save_config
from pipeline.data.artifacts import MANIFEST_DIR, StagePlan, write_json_atomic

Worker = Callable[..., dict[str, Any]]

RANK_DEVICES = "DICE_RANK_DEVICES"  # the stage's GPUs on this node (CUDA_VISIBLE_DEVICES entries), for its ranks
OWNER = "DICE_OWNER"  # host:pid:start of the stage process that owns this one
LAUNCH_MARK = "DICE_LAUNCH_MARK"  # path:nonce of the file the stage wrote into the run folder before launching
HEARTBEAT_S = 10.0  # how often the stage touches its launch mark while ranks run
# A rank on another node gives its stage up after this long without a touch (NFS caches attributes up to 60 s).
HEARTBEAT_STALE_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


# ---------------------------------------------------------------------------------------------- layout


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


def resolve_processes(n: int, hostfile: str | None = None) -> int:
    """Processes per node for a `num_processes` field: n; or (0) each host's `slots` with a hostfile (returned as
    0: the launcher reads them), else every visible GPU, 1 without a GPU."""
    if n or hostfile:
        return n
    return max(visible_gpus(), 1)


def world_size(n: int, hostfile: str | None = None) -> int:
    """All processes of a launch: n per node over the hostfile's hosts (n = 0: the sum of their slots), else n."""
    if not hostfile:
        return n
    return sum(n or slots for _, _, slots in parse_hostfile(hostfile))


def processes_here(n: int, hostfile: str | None = None) -> int:
    """The processes of a launch that run on this node (the GPUs it occupies here): n, or with a hostfile this
    host's line (n, or its slots for n = 0; 0 when the hostfile does not list this host)."""
    if not hostfile:
        return resolve_processes(n)
    return next((n or slots for _, host, slots in parse_hostfile(hostfile) if _is_local(host)), 0)


def _cuda_devices() -> list[str]:
    """The GPUs this process may use ([] on a machine without CUDA)."""
    return gpus.visible() if visible_gpus() else []


def check(n: int, hostfile: str | None, field: str, *, devices: Sequence[str] | None = None, ssh_port: int = 22,
          timeout_s: float = 5.0) -> None:  # fmt: skip
    """Fail before launching when `n` processes (per node, with a hostfile; 0: its slots) cannot run here.

    Args:
        n: the resolved process count; field: the config field it comes from (named in errors).
        devices: the visible GPUs (default: this process's); [] means a CPU machine, where n gloo processes share
            the cores.
    Raises:
        ValueError: naming the field, hostfile, line and host at fault.
    """
    devices = _cuda_devices() if devices is None else list(devices)
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
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    if devices and n > len(devices):
        raise ValueError(f"{field}={n}, but only {len(devices)} GPU(s) are visible{shown}; lower it (0: every visible "
                         "GPU) or give the stage more GPUs")  # fmt: skip
    if n > 1 and gpus.is_mig(devices[:n]):
        raise ValueError(f"{field}={n} on MIG instances{shown}: a CUDA process sees one MIG instance and NCCL does not "
                         "run across them; use 1 (one MIG instance per stage) or whole GPUs")  # fmt: skip


def check_engines(engines: int, per_engine: int, field: str, devices: Sequence[str] | None = None) -> None:
    """Fail before starting engines when `engines` × `per_engine` GPUs are more than are visible (an engine would
    get no GPU). `field`: the engine section, e.g. "generate.engine". On a CPU machine, engines share the cores."""
    devices = _cuda_devices() if devices is None else list(devices)
    if devices and engines * per_engine > len(devices):
        raise ValueError(f"{field}.data_parallel_size × {field}.tensor_parallel_size = {engines} × {per_engine} GPUs, "
                         f"but {len(devices)} are visible ({','.join(devices)}); lower one of them "
                         "(data_parallel_size 0: as many engines as the GPUs hold)")  # fmt: skip


# ---------------------------------------------------------------------------------------------- a rank's device


def device():
    """This rank's device: its GPU (LOCAL_RANK among the stage's GPUs) or the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def bind_device() -> None:
    """Give this rank the stage's GPUs back and make its own the current device, before anything touches CUDA:
    without it every rank's stray allocations (CUDA context, default-device tensors) land on GPU 0."""
    if devices := os.environ.get(RANK_DEVICES):
        os.environ["CUDA_VISIBLE_DEVICES"] = devices  # the launcher set 0..n-1; the stage's GPUs may be others
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(device())


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
        torch.cuda.set_device(device())
    else:
        # The shared-memory all-reduce op is JIT-compiled on first use (~1 min); gloo alone is enough here.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")


# ---------------------------------------------------------------------------------------------- collectives


def check_on_device(t, expected=None) -> None:
    """Refuse a tensor that is not on this rank's device (`expected`, default `device()`) before a collective sees
    it: NCCL takes only tensors on the rank's own GPU, and gloo on CPU would hide the mistake until a GPU run."""
    expected = device() if expected is None else expected
    if t.device != expected:
        raise RuntimeError(f"a collective got a tensor on {t.device}, but rank {rank()}'s device is {expected}: build "
                           "it on pipeline.compute.launch.device()")  # fmt: skip


def all_reduce(t, op: Literal["sum", "max"] = "sum", *, expected=None):
    """All-reduce `t` in place across the ranks (it must be on this rank's device; `expected` overrides it for
    tests); returns it."""
    import torch.distributed as dist

    check_on_device(t, expected)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def sum_across(values: Sequence[float]) -> list[float]:
    """Each value summed over the ranks (float64, on this rank's device)."""
    import torch

    return all_reduce(torch.tensor(list(values), dtype=torch.float64, device=device()), "sum").tolist()


def max_across(n: int) -> int:
    """The largest n of any rank: how ranks agree on a count before the collective steps it counts."""
    import torch

    return int(all_reduce(torch.tensor([n], dtype=torch.long, device=device()), "max").item())


def barrier() -> None:
    """Wait for every rank (NCCL: on this rank's GPU, not one guessed from the rank number)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[device().index])
    else:
        dist.barrier()


# ---------------------------------------------------------------------------------------------- process ownership


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat field 22): with the PID, an identity that
    outlives PID reuse. "" where /proc does not exist but the process does; None when no such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if not Path("/proc/self/stat").exists():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return ""
        return None
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def owner_token() -> str:
    """This process as the owner its children watch: host:pid:start."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid()) or ''}"


_REAPER = """
import os, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the stage's to handle
owner, groups = int(sys.argv[1]), set()
def read():
    for line in sys.stdin:  # +PGID: a group the stage started; -PGID: one it has ended itself
        (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
reader = threading.Thread(target=read, daemon=True)
reader.start()
while os.getppid() == owner:  # the stage is our parent until it ends (then we are re-parented)
    time.sleep(0.2)
reader.join(timeout=1.0)  # the lines it wrote before it died
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class _Reaper:
    """One small process per stage that kills the stage's process groups when the stage is gone."""

    proc: subprocess.Popen | None = None
    lock = threading.Lock()

    @classmethod
    def tell(cls, line: str) -> None:
        with cls.lock:
            if cls.proc is None or cls.proc.poll() is not None:
                # -I -S: no site-packages, nothing but the standard library: starts in milliseconds
                cls.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _REAPER, str(os.getpid())],
                                            stdin=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
            assert cls.proc.stdin is not None
            cls.proc.stdin.write(line + "\n")
            cls.proc.stdin.flush()


def spawn(cmd: list[str], *, env: Mapping[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """Start `cmd` as a process tree this stage owns: in its own process group (ended as one by `end`), killed by
    the reaper if this process dies first, its processes told who their owner is (`OWNER`, for `watch_owner`)."""
    env = {**(os.environ if env is None else env), OWNER: owner_token()}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, **popen)
    _Reaper.tell(f"+{proc.pid}")
    return proc


def end(proc: subprocess.Popen) -> None:
    """End everything left of a tree `spawn` started: its whole process group, whether its first process is still
    running (the stage is failing or interrupted) or has ended and left others behind."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    _Reaper.tell(f"-{proc.pid}")


def watch_owner(poll_s: float = 1.0) -> None:
    """End this process when the stage that started it (`OWNER`) is gone: a daemon thread checks its PID and start
    time on the same host, or on another node the launch mark's heartbeat (the stage touches it every HEARTBEAT_S;
    a mark unchanged for HEARTBEAT_STALE_S, or removed, means the stage is gone)."""
    token = os.environ.get(OWNER)
    if not token:
        return
    host, pid, start = token.rsplit(":", 2)
    if host == socket.gethostname():

        def alive() -> bool:
            return _start_time(int(pid)) == start if start else _start_time(int(pid)) is not None
    else:
        mark = Path(os.environ.get(LAUNCH_MARK, "").rsplit(":", 1)[0])
        seen = {"mtime": None, "at": time.monotonic()}

        def alive() -> bool:
            try:
                mtime = mark.stat().st_mtime
            except OSError:
                return False
            if mtime != seen["mtime"]:
                seen.update(mtime=mtime, at=time.monotonic())
            return time.monotonic() - seen["at"] < HEARTBEAT_STALE_S

    def watch() -> None:
        while alive():
            time.sleep(poll_s)
        print(f"dice: the stage process {pid} on {host} that started this process is gone; exiting",
              file=sys.stderr, flush=True)  # fmt: skip
        os.kill(os.getpid(), signal.SIGKILL)  # now, whatever the other threads hold (a collective never returns)

    threading.Thread(target=watch, name="dice-owner-watch", daemon=True).start()


# ---------------------------------------------------------------------------------------------- several nodes

# Variables the ranks on other nodes need, by prefix: the Hugging Face cache and offline mode, DeepSpeed's and
# torch's settings, dice's own; DeepSpeed's pdsh launcher itself exports only PYTHON*, NCCL*, MLFLOW*, MV2*, UCX*.
FORWARDED = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "XDG_CACHE_HOME", "TORCH_", "TRITON_", "DS_", "DICE_", "OMP_",
             "TOKENIZERS_")  # fmt: skip
_SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|CREDENTIAL|(^|_)KEY($|_)", re.IGNORECASE)
_NOT_FORWARDED = {"DS_ENV_FILE", "DICE_RANK_DEVICES"}  # the launcher's own; this node's GPUs
_SHELL_UNSAFE = re.compile(r"[\"`$\\\n]")  # DeepSpeed writes `export K="V";` into a shell command line


def _user_env_files() -> list[Path]:
    """The env files DeepSpeed's runner would read without dice (DS_ENV_FILE or .deepspeed_env, in ~ and here)."""
    name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    return [p for p in (Path.home() / name, Path.cwd() / name) if p.is_file()]


def env_file(path: Path, env: Mapping[str, str]) -> Path:
    """Write the env file DeepSpeed's multi-node runner exports on every node (point DS_ENV_FILE at it): the
    user's own `.deepspeed_env` lines, then the variables of `env` dice's ranks need (FORWARDED prefixes; secrets
    such as HF_TOKEN stay on this host: the stage has already fetched every model the ranks read).

    Raises:
        ValueError: naming a variable whose value cannot travel through the launcher's shell command.
    """
    lines: dict[str, str] = {}
    for f in _user_env_files():
        for raw in f.read_text().splitlines():
            if "=" in raw and not raw.lstrip().startswith("#"):
                key, value = raw.split("=", 1)
                lines[key.strip()] = value.strip()
    for key, value in sorted(env.items()):
        if not key.startswith(FORWARDED) or key in _NOT_FORWARDED or _SECRET.search(key):
            continue
        if _SHELL_UNSAFE.search(value):
            raise ValueError(f"environment variable {key}={value!r}: DeepSpeed's multi-node launcher passes variables "
                             "through a shell command line, which cannot carry \", `, $ or \\; change its value")  # fmt: skip
        lines[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))  # DeepSpeed splits every line at its first '='
    tmp.replace(path)
    return path.resolve()


def check_shared_folder() -> None:
    """In a rank, before anything else: the launch mark the stage wrote into the run folder must be visible here
    with the same nonce, else this node does not share the run folder; one line naming the host, exit 2."""
    mark = os.environ.get(LAUNCH_MARK)
    if not mark:
        return
    path, nonce = mark.rsplit(":", 1)
    try:
        seen = Path(path).read_text().strip()
    except OSError:
        seen = None
    if seen != nonce:
        print(f"dice: host {socket.gethostname()} does not see the run folder as the launching host wrote it ({path} "
              f"{'is missing' if seen is None else 'holds another launch'}): ranks on several nodes need the run "
              "folder on a shared filesystem mounted at the same path on every node", file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(2)


class _Heartbeat:
    """Touches the launch mark every HEARTBEAT_S while ranks run: the stage is alive (for ranks on other nodes)."""

    def __init__(self, path: Path):
        self.path, self.stopped = path, threading.Event()
        self.thread = threading.Thread(target=self._beat, name="dice-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------- DeepSpeed ranks


def _files(plan: StagePlan, stage: str) -> dict[str, Path]:
    d = plan.round_dir / MANIFEST_DIR
    return {"config": d / f"{stage}.config.yaml", "job": d / f"{stage}.job.json", "stats": d / f"{stage}.stats.json",
            "mark": d / f"{stage}.launch", "env": d / f"{stage}.deepspeed_env"}  # fmt: skip


def run(stage: str, cfg: RunConfig, plan: StagePlan, n: int, worker: Worker, job: dict[str, Any] | None = None, *,
        hostfile: str | None = None, what: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Run `worker(cfg, plan, **job)` on n processes (per node with a hostfile; 0: its slots); return rank 0's result.

    n = 1 (and no hostfile): in this process. Otherwise `python -m stages.<stage> CONF --round K --worker JOB` on
    n ranks per node under the DeepSpeed launcher; a rank's failure raises RuntimeError with its traceback."""
    job = job or {}
    if n == 1 and not hostfile:
        return worker(cfg, plan, **job)
    files = _files(plan, stage)
    files["stats"].unlink(missing_ok=True)
    for stale in plan.round_dir.glob(f"{MANIFEST_DIR}/{stage}.rank*.error"):
        stale.unlink()
    save_config(cfg, files["config"])  # the exact config of this process (overrides included), for the ranks
    write_json_atomic(files["job"], {"job": job, "stats_file": str(files["stats"])})
    nonce = secrets.token_hex(8)
    files["mark"].write_text(nonce)
    env = {**os.environ, LAUNCH_MARK: f"{files['mark'].resolve()}:{nonce}"}
    here = n or processes_here(n, hostfile) or 1  # ranks on this machine
    # the Rust tokenizer's batch parallelism (pairs a rank tokenises itself: those without ids of their own or kept
    # ones): the ranks on a machine share its cores instead of each taking them all
    env.setdefault("RAYON_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // here)))
    if devices := _cuda_devices():
        if os.environ.get("CUDA_VISIBLE_DEVICES") and not hostfile:
            # The launcher would ignore CUDA_VISIBLE_DEVICES (beside --num_gpus) and give the ranks 0..n-1, and its
            # --include takes no UUIDs: the ranks get the stage's GPUs from RANK_DEVICES instead (bind_device).
            env[RANK_DEVICES] = ",".join(devices[:n])
            del env["CUDA_VISIBLE_DEVICES"]
    else:
        # gloo ranks on one CPU machine: split the cores, or each rank's threads fight the others' (25x slower)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // here)))
        env.setdefault("DS_ACCELERATOR", "cpu")
    if hostfile:
        env["DS_ENV_FILE"] = str(env_file(files["env"], {**env, OWNER: owner_token()}))
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", *(["--hostfile", hostfile] if hostfile else []),
        *(["--num_gpus", str(n)] if n else []), "--master_port", str(free_port()), "--no_local_rank",
        "--module", f"stages.{stage}", str(files["config"]), "--round", str(plan.round), "--worker", str(files["job"]),
    ]  # fmt: skip
    proc = spawn(cmd, env=env)
    heartbeat = _Heartbeat(files["mark"])
    try:
        returncode = proc.wait()
    finally:
        heartbeat.stop()
        end(proc)  # what is left of the launch: nothing after a clean end; every rank after a failure or Ctrl-C
        files["mark"].unlink(missing_ok=True)
    if returncode != 0:
        errors = sorted(plan.round_dir.glob(f"{MANIFEST_DIR}/{stage}.rank*.error"))
        detail = f"{errors[0].stem.split('.')[-1]} failed:\n{errors[0].read_text()}" if errors else "see the rank output above"
        raise RuntimeError(f"round {plan.round}: {what or stage} failed (deepspeed exited with {returncode}); {detail}")
    return json.loads(files["stats"].read_text())


# ---------------------------------------------------------------------------------------------- vLLM engines


def engine_env(w: int, devices_per_engine: int, devices: Sequence[str] | None = None) -> dict[str, str]:
    """Engine process w's environment: its own `devices_per_engine` GPUs (CUDA_VISIBLE_DEVICES) of `devices`
    (default: this process's)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    devices = _cuda_devices() if devices is None else list(devices)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[w * devices_per_engine : (w + 1) * devices_per_engine])
    return env


def engine_workers(cmds: list[list[str]], devices_per_engine: int, on_line: Callable[[int, str], None],
                   what: str, field: str) -> None:  # fmt: skip
    """Run one process per command (engine w on its own GPUs), passing each output line to on_line(w, line).

    `field` is the engine's config section (e.g. "generate.engine"), named when the engines do not fit the visible
    GPUs (checked before any starts). One failing engine stops the others (the stage cannot finish); raises
    RuntimeError with its last output. Each engine's whole process tree dies with this process (`spawn`)."""
    devices = _cuda_devices()
    check_engines(len(cmds), devices_per_engine, field, devices)
    procs, tails, lock = [], [], threading.Lock()

    def pump(w: int, proc: subprocess.Popen, tail: deque[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            with lock:
                on_line(w, line)

    threads = []
    failed = None
    try:
        for w, cmd in enumerate(cmds):
            proc = spawn(cmd, env=engine_env(w, devices_per_engine, devices), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)  # fmt: skip
            tail: deque[str] = deque(maxlen=20)
            t = threading.Thread(target=pump, args=(w, proc, tail), daemon=True)
            t.start()
            procs.append(proc), tails.append(tail), threads.append(t)
        for w, proc in enumerate(procs):
            if proc.wait() != 0 and failed is None:
                failed = w
                for other in procs:  # one engine failed: the stage cannot finish, stop the others
                    if other.poll() is None:
                        other.terminate()
    finally:
        for proc in procs:
            end(proc)
        for t in threads:
            t.join(timeout=5)
    if failed is not None:
        raise RuntimeError(f"{what} engine worker {failed} failed. Last output:\n" + "\n".join(tails[failed]))
