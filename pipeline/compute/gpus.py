"""Which GPUs a process may use, and claiming some of them so that no other stage on the machine uses them too.

GPUs are named as `CUDA_VISIBLE_DEVICES` names them: an index (`0`), a GPU UUID (`GPU-8f2c…`) or a MIG instance
(`MIG-…`). `visible()` lists the ones this process may use.

A claim (`claim`, used by the flow when `gpu_slots` is set) locks specific GPUs with one OS file lock per GPU in a
machine-wide folder (`$DICE_GPU_LOCKS`, default `<tmp>/dice-gpu-locks`), named by the GPU's UUID where `nvidia-smi`
gives it, so claimants that see the GPUs under different `CUDA_VISIBLE_DEVICES` still meet on the same lock. The
locks are `flock`s: the kernel releases them when the last process holding one ends, killed or not, so a dead
claimant never keeps a GPU. The stage then runs with `CUDA_VISIBLE_DEVICES` set to its GPUs and holds the lock
files open itself, so its GPUs stay claimed while it runs even if whoever started it is gone.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

LOCKS_ENV = "DICE_GPU_LOCKS"


def lock_dir() -> Path:
    """The machine-wide folder of the per-GPU lock files (every dice process on the machine must use the same)."""
    return Path(os.environ.get(LOCKS_ENV) or Path(tempfile.gettempdir()) / "dice-gpu-locks")


def _nvidia_smi_uuids() -> list[str]:
    """The machine's GPU UUIDs in nvidia-smi's index order ([] without the driver's tool)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def visible() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries: its own CUDA_VISIBLE_DEVICES when set (an
    empty value: none), else every GPU of the machine (UUIDs from nvidia-smi; indices from torch without it)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    if uuids := _nvidia_smi_uuids():
        return uuids
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def is_mig(devices: Sequence[str]) -> bool:
    """True when the list names MIG instances."""
    return any(d.startswith("MIG-") for d in devices)


def _lock_name(device: str, uuids: list[str]) -> str:
    """The lock file of a GPU: its UUID (an index is translated through nvidia-smi when it can be), file-safe."""
    if device.isdigit() and int(device) < len(uuids):
        device = uuids[int(device)]
    return re.sub(r"[^A-Za-z0-9._-]", "_", device) + ".lock"


@dataclass
class Claim:
    """GPUs locked for one stage: `devices` (CUDA_VISIBLE_DEVICES entries) and the open lock files holding them."""

    devices: list[str]
    fds: list[int] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """The environment additions that give a process exactly these GPUs (none when nothing was claimed)."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.devices)} if self.devices else {}

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)  # closing the last descriptor of a lock file releases its flock
        self.fds = []


def _open_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        os.fchmod(fd, 0o666)  # other users' stages lock the same file
    except OSError:
        pass  # another user's file: reading it is enough to lock it
    return fd


def try_claim(n: int, pool: Sequence[str], folder: Path | None = None) -> Claim | None:
    """Lock n GPUs of `pool` that no other claimant holds, in pool order; None when fewer than n are free.

    Raises:
        ValueError: when the pool has fewer than n GPUs (waiting would never end).
    """
    if n > len(pool):
        raise ValueError(f"{n} GPUs wanted, but only {len(pool)} are visible ({','.join(pool) or 'none'})")
    folder = folder or lock_dir()
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            folder.chmod(0o1777)  # every user of the machine claims GPUs here (sticky: only owners delete)
        except OSError:
            pass
    uuids = _nvidia_smi_uuids() if any(d.isdigit() for d in pool) else []
    got = Claim([])
    for device in pool:
        fd = _open_lock(folder / _lock_name(device, uuids))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        got.devices.append(device)
        got.fds.append(fd)
        if len(got.devices) == n:
            return got
    got.release()
    return None


def claim(n: int, pool: Sequence[str] | None = None, folder: Path | None = None, *, poll_s: float = 2.0,
          what: str = "stage") -> Claim:  # fmt: skip
    """Lock n GPUs of `pool` (default: `visible()`) that no other claimant holds, waiting until n are free.

    Without GPUs (a CPU machine) nothing is claimed and the claim's environment is empty."""
    pool = visible() if pool is None else list(pool)
    if not pool or n <= 0:
        return Claim([])
    if n > len(pool):
        raise ValueError(f"{what}: needs {n} GPUs, but only {len(pool)} are visible ({','.join(pool)})")
    waited = False
    while (got := try_claim(n, pool, folder)) is None:
        if not waited:
            print(f"{what}: waiting for {n} free GPU(s) of {len(pool)}: the others are claimed by other stages "
                  f"({folder or lock_dir()})", file=sys.stderr, flush=True)  # fmt: skip
            waited = True
        time.sleep(poll_s)
    return got


@contextmanager
def claimed(n: int, pool: Sequence[str] | None = None, folder: Path | None = None, *,
            what: str = "stage") -> Iterator[Claim]:  # fmt: skip
    """`claim`, released when the block ends."""
    got = claim(n, pool, folder, what=what)
    try:
        yield got
    finally:
        got.release()
