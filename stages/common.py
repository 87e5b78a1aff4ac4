"""The command line every stage shares: `python -m stages.<name> CONF [key=value ...] --round K [--force]`."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.compute import launch, memory
from pipeline.config import ConfigError, RunConfig, load_config, resolve_runtime
from pipeline.data.artifacts import MANIFEST_DIR, ArtifactError, StagePlan, execute
from pipeline.data.datasets import skipped_rows
from pipeline.data.models import check_model
from pipeline.run import rounds

StageFn = Callable[[RunConfig, StagePlan], dict[str, Any]]


def parse_args(stage: str, argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"Run the {stage} stage of one round.")
    ap.add_argument("config", help="run configuration YAML (e.g. conf/tiny.yaml or runs/<run>/config.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. generate.num_samples=8")
    ap.add_argument("--round", type=int, required=True, dest="round_", help="round index (0 = offline DPO round)")
    ap.add_argument("--force", action="store_true", help="run even if the stage's manifest says it is done")
    return ap.parse_args(argv)


def error_line(e: BaseException) -> str:
    """One line for a stage's failure: the message of dice's own errors (they name the file, row or field); for an
    OS error (a full disk, a permission, a read-only filesystem) the path, the errno's name and its text; for
    anything else (a safetensors file that will not load, ...) the exception's type and message."""
    if isinstance(e, (ConfigError, ArtifactError, ValueError, RuntimeError)) and not isinstance(e, OSError):
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # a message over several lines ("rank0 failed:\n<its error>", a config's fields) joined into one
        joined = "".join(f"{line}{' ' if line.endswith(':') else '; '}" for line in lines[:-1]) + (lines[-1] if lines else "")
        return joined or type(e).__name__
    if isinstance(e, OSError) and e.errno is not None:
        paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
        name = errno.errorcode.get(e.errno, str(e.errno))
        return f"{paths + ': ' if paths else ''}{name} (errno {e.errno}): {e.strerror}"
    return f"{type(e).__name__}: {e}"


def remove_launcher_files(plan: StagePlan, stage: str) -> None:
    """Delete what `pipeline.compute.launch.run` left for the stage's ranks (their config, job and stats files, any
    rank's error) once the stage succeeded: they describe a launch, not the result, and the manifest holds that."""
    d = plan.round_dir / MANIFEST_DIR
    for suffix in ("config.yaml", "job.json", "stats.json"):
        (d / f"{stage}.{suffix}").unlink(missing_ok=True)
    for stale in d.glob(f"{stage}.rank*.error"):
        stale.unlink(missing_ok=True)


def warn_dropped(stage: str, k: int, cfg: RunConfig, stats: dict[str, Any]) -> None:
    """Say in the log what a stage dropped that the user may not expect: prompts over model.max_prompt_tokens."""
    n = stats.get("prompts_too_long") or 0
    if n:
        ids = stats.get("too_long_ids") or []
        first = f"; first ids: {', '.join(map(str, ids[:5]))}" if ids else ""
        print(f"warning: {stage} round {k}: {n} prompts dropped, longer than model.max_prompt_tokens="
              f"{cfg.model.max_prompt_tokens} tokens (or the model's context) under the chat template{first}",
              file=sys.stderr, flush=True)  # fmt: skip


def main(stage: str, fn: StageFn, argv: list[str] | None = None) -> None:
    """Load the config, plan the stage, run it unless done, print its manifest summary as one JSON line.

    Any failure ends the process with one line on stderr (`error_line`) and exit code 2; what earlier stages wrote is
    untouched (every output is written to a temporary name and renamed, the manifest last)."""
    args = parse_args(stage, argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecation noise in logs

    def run(cfg: RunConfig, plan: StagePlan) -> dict[str, Any]:
        with skipped_rows() as skipped:
            stats = fn(cfg, plan)
        if skipped:  # rows left out of the datasets this stage read (on_bad_row: skip): label -> reason -> count
            stats = {**stats, "rows_skipped": skipped}
        return stats

    try:
        # device, dtype and bf16 made concrete (a GPU config without CUDA is refused here) before the plan's digest
        cfg = resolve_runtime(load_config(args.config, args.overrides))
        plan = rounds.plan(cfg, args.round_, stage)
        for name, value in plan.inputs.items():
            if isinstance(value, str) and not value.startswith("hf://"):  # plans name models by str, files by Path
                check_model(value, f"{stage} input {name!r}:")
        def planned_run() -> dict[str, Any]:
            memory.preflight(cfg, stage)  # a layout that cannot fit the GPUs is refused before anything loads
            return run(cfg, plan)

        manifest = execute(plan, planned_run, force=args.force)
        if not manifest["skipped"]:
            remove_launcher_files(plan, stage)
    except Exception as e:  # noqa: BLE001 (one line, never a traceback; DICE_DEBUG=1 shows it)
        if os.environ.get("DICE_DEBUG"):
            raise
        print(f"dice {stage}: error: {error_line(e)}", file=sys.stderr)
        print("(set DICE_DEBUG=1 for the full traceback)", file=sys.stderr)
        sys.exit(2)
    status = "skipped (already done)" if manifest["skipped"] else f"done in {manifest['duration_s']:.1f}s"
    print(f"dice {stage} round {args.round_}: {status}")
    if not manifest["skipped"]:
        warn_dropped(stage, args.round_, cfg, manifest["stats"])
    print("DICE_STAGE_RESULT " + json.dumps({"stage": stage, "round": args.round_, "stats": manifest["stats"]}))


def worker_main(stage: str, worker: launch.Worker, argv: list[str] | None = None) -> None:
    """The entry point of one rank: `python -m stages.<stage> CONF --round K --worker JOB` (started by
    `pipeline.compute.launch.run`). Before anything else the rank checks it sees the run folder the stage wrote
    (several nodes need a shared filesystem), starts watching the stage (it dies with it), and binds its own GPU
    (before anything touches CUDA)."""
    launch.check_shared_folder()
    launch.watch_owner()
    launch.bind_device()
    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"One rank of the {stage} stage.")
    ap.add_argument("config")
    ap.add_argument("--round", type=int, required=True, dest="round_")
    ap.add_argument("--worker", required=True, metavar="JOB", help="the job file written by pipeline.compute.launch.run")
    args = ap.parse_args(argv)
    cfg = resolve_runtime(load_config(args.config))  # this rank's node has CUDA if the run's device says so
    plan = rounds.plan(cfg, args.round_, stage)
    spec = json.loads(Path(args.worker).read_text())
    try:
        stats = worker(cfg, plan, **spec["job"])
    except BaseException as e:  # record this rank's error for the launcher's message (one line: the traceback is
        # in the rank's output above it), then fail as usual
        line = error_line(e) if isinstance(e, Exception) else type(e).__name__
        (plan.round_dir / MANIFEST_DIR / f"{stage}.rank{launch.rank()}.error").write_text(line)
        raise
    if launch.rank() == 0:
        Path(spec["stats_file"]).write_text(json.dumps(stats))
