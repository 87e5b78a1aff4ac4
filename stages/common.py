"""The command line every stage shares: `python -m stages.<name> CONF [key=value ...] --round K [--force]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.compute import launch, memory
from pipeline.config import ConfigError, RunConfig, load_config, resolve_runtime
from pipeline.data.artifacts import MANIFEST_DIR, ArtifactError, StagePlan, execute
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


def main(stage: str, fn: StageFn, argv: list[str] | None = None) -> None:
    """Load the config, plan the stage, run it unless done, print its manifest summary as one JSON line."""
    args = parse_args(stage, argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecation noise in logs
    try:
        # device, dtype and bf16 made concrete (a GPU config without CUDA is refused here) before the plan's digest
        cfg = resolve_runtime(load_config(args.config, args.overrides))
        plan = rounds.plan(cfg, args.round_, stage)
        for name, value in plan.inputs.items():
            if isinstance(value, str) and not value.startswith("hf://"):  # plans name models by str, files by Path
                check_model(value, f"{stage} input {name!r}:")

        def run() -> dict[str, Any]:
            memory.preflight(cfg, stage)  # a layout that cannot fit the GPUs is refused before anything loads
            return fn(cfg, plan)

        manifest = execute(plan, run, force=args.force)
    except (ConfigError, ArtifactError, ValueError, RuntimeError) as e:
        if os.environ.get("DICE_DEBUG"):
            raise
        print(f"dice {stage}: error: {e}", file=sys.stderr)
        print("(set DICE_DEBUG=1 for the full traceback)", file=sys.stderr)
        sys.exit(2)
    status = "skipped (already done)" if manifest["skipped"] else f"done in {manifest['duration_s']:.1f}s"
    print(f"dice {stage} round {args.round_}: {status}")
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
    except BaseException:  # record this rank's error for the launcher's message, then fail as usual
        (plan.round_dir / MANIFEST_DIR / f"{stage}.rank{launch.rank()}.error").write_text(traceback.format_exc()[-4000:])
        raise
    if launch.rank() == 0:
        Path(spec["stats_file"]).write_text(json.dumps(stats))
