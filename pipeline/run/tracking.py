"""Dashboards: each training step and each round's summary sent to TensorBoard, W&B and MLflow (`log.report_to`).

One dashboard run per dice run (run folder). Several processes write to it, one after the other: rank 0 of every
round's train stage (each optimizer step, as it happens) and the flow (each round's summary, when the round is
published). They find the same dashboard run through `<run folder>/.dice/dashboards.json`, the ledger, which
holds the W&B run id and the MLflow run id, and what has been sent already.

Steps. The training metrics of all rounds share one axis, the global step: optimizer step i of round k is global
step `step_offset(k) + i`, where `step_offset(k)` counts the optimizer steps of every earlier round plus one step
per earlier round for its summary (the step after that round's last training step). W&B needs that slot: it keeps
one increasing step per run and drops what a later process logs at a lower or equal step. Round summaries are
plotted against the round index (`round/*`: TensorBoard and MLflow at step k; W&B through
`define_metric("round/*", step_metric="round")`).

Resume. A stage that is skipped (done) logs nothing. A training that resumes (from its DeepSpeed checkpoint, or
from the start after a kill) does not send again the steps the ledger records as sent for the same work (the
train plan's digest), so no step appears twice. A training whose work changed (another config, other inputs)
sends its steps again: TensorBoard hides the earlier ones (the writer's `purge_step`), MLflow keeps both values of
a step in its history, and W&B keeps the first values it received. A round summary is sent again only when its
numbers changed.

A dashboard that cannot be opened is an error naming it (before training starts); one that fails while logging is
reported once and dropped for the rest of the process: the Parquet metrics stay the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import RunConfig
from pipeline.data.artifacts import StagePlan, plan_digest, write_json_atomic
from pipeline.run.rounds import round_dir

LEDGER = Path(".dice") / "dashboards.json"


# ---------------------------------------------------------------------------------------------- steps and ledger


def train_steps(cfg: RunConfig, k: int) -> int:
    """Optimizer steps round k's training took (rows of its train_metrics.parquet; 0 if it has none)."""
    import pyarrow.parquet as pq

    path = round_dir(cfg, k) / "train_metrics.parquet"
    return pq.read_metadata(path).num_rows if path.is_file() else 0


def step_offset(cfg: RunConfig, k: int) -> int:
    """The global step of round k's first training step: earlier rounds' steps, plus one summary slot each."""
    return sum(train_steps(cfg, j) + 1 for j in range(k))


def ledger_path(cfg: RunConfig) -> Path:
    return cfg.run_dir / LEDGER


def read_ledger(cfg: RunConfig) -> dict[str, Any]:
    """The run's ledger: dashboard run ids, steps sent per round's training, round summaries sent."""
    try:
        data = json.loads(ledger_path(cfg).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        data = {}
    data.setdefault("train", {})
    data.setdefault("rounds", {})
    return data


def _update_ledger(cfg: RunConfig, **changes: Any) -> None:
    """Re-read the ledger and write it back with `changes` (top-level keys; `train`/`rounds` entries merged)."""
    data = read_ledger(cfg)
    for key, value in changes.items():
        if key in ("train", "rounds"):
            data[key].update(value)
        else:
            data[key] = value
    write_json_atomic(ledger_path(cfg), data)


# ---------------------------------------------------------------------------------------------- backends


class _Backend(Protocol):
    def log_train(self, values: dict[str, float], step: int) -> None: ...
    def log_round(self, values: dict[str, float], k: int, step: int) -> None: ...
    def close(self) -> None: ...


class _TensorBoard:
    """Event files under `log.tensorboard_dir` (default `<run folder>/tensorboard`), through torch's SummaryWriter."""

    def __init__(self, cfg: RunConfig, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(cfg.log.tensorboard_dir) if cfg.log.tensorboard_dir else cfg.run_dir / "tensorboard"
        # purge_step: TensorBoard hides events at or after it that earlier writers left (a training sent again)
        self.writer = SummaryWriter(str(self.dir), purge_step=purge_step)

    def log_train(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a step is seconds long: flushing each one keeps the dashboard live and a kill loses nothing

    def log_round(self, values: dict[str, float], k: int, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, k)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A W&B run resumed by id in every process (offline mode: one folder per process under `<run folder>/wandb`)."""

    def __init__(self, cfg: RunConfig, ledger: dict[str, Any]) -> None:
        import wandb

        run_id = ledger.get("wandb_id") or f"{re.sub(r'[^A-Za-z0-9_-]', '-', cfg.name)}-{secrets.token_hex(4)}"
        self.run = wandb.init(
            project=cfg.log.project,
            entity=cfg.log.wandb_entity,
            name=cfg.name,
            id=run_id,
            resume="allow",
            mode=cfg.log.wandb_mode,
            dir=str(cfg.run_dir),
            # the stage's output already goes to the terminal and the Prefect logs: W&B must not wrap it
            settings=wandb.Settings(console="off"),
        )
        # the config as this process ran it (a later process may have another `rounds`: more_rounds)
        self.run.config.update(cfg.model_dump(mode="json"), allow_val_change=True)
        self.run.define_metric("round/*", step_metric="round")
        self.id = run_id

    def log_train(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_round(self, values: dict[str, float], k: int, step: int) -> None:
        self.run.log({**values, "round": k}, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    """An MLflow run in experiment `log.project`; the default store is a SQLite file in the run folder."""

    def __init__(self, cfg: RunConfig, ledger: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        # MLflow 3 refuses its file-system store unless told to (MLFLOW_ALLOW_FILE_STORE): its local default is SQLite
        chosen = cfg.log.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.uri = chosen or f"sqlite:///{cfg.run_dir.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri)
        known = ledger.get("mlflow") or {}
        self.run_id = known.get("run_id") if known.get("uri") == self.uri else None
        if self.run_id is not None:
            try:
                self.client.get_run(self.run_id)
            except Exception:  # noqa: BLE001 (the store was replaced: start a new run there)
                self.run_id = None
        if self.run_id is None:
            self.run_id = self._create(cfg, in_run_folder=chosen is None)
        self.client.update_run(self.run_id, status="RUNNING")

    def _create(self, cfg: RunConfig, in_run_folder: bool) -> str:
        exp = self.client.get_experiment_by_name(cfg.log.project)
        if exp is not None:
            exp_id = exp.experiment_id
        else:  # in the run folder's own store, artifacts stay in the run folder too
            where = (cfg.run_dir.resolve() / "mlartifacts").as_uri() if in_run_folder else None
            exp_id = self.client.create_experiment(cfg.log.project, artifact_location=where)
        run = self.client.create_run(exp_id, run_name=cfg.name, tags={"dice.run": cfg.name, "dice.run_dir": str(cfg.run_dir)})
        from mlflow.entities import Param

        # the config as parameters, once: MLflow refuses to change a parameter's value later (e.g. `rounds`)
        params = [Param(k, v[:6000]) for k, v in _flatten(cfg.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 parameters a call
            self.client.log_batch(run.info.run_id, params=params[i : i + 100])
        return run.info.run_id

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_train(self, values: dict[str, float], step: int) -> None:
        self._log(values, step)

    def log_round(self, values: dict[str, float], k: int, step: int) -> None:
        self._log(values, k)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


# ---------------------------------------------------------------------------------------------- one process's link


class Dashboards:
    """The dashboards of `log.report_to`, opened for this process (resuming the run's dashboard run)."""

    def __init__(self, cfg: RunConfig, purge_step: int | None = None) -> None:
        self.backends: dict[str, _Backend] = {}
        ledger = read_ledger(cfg)
        ids: dict[str, Any] = {}
        for name in cfg.log.report_to:
            try:
                if name == "tensorboard":
                    self.backends[name] = _TensorBoard(cfg, purge_step)
                elif name == "wandb":
                    self.backends[name] = backend = _WandB(cfg, ledger)
                    ids["wandb_id"] = backend.id
                else:
                    self.backends[name] = backend = _MLflow(cfg, ledger)
                    ids["mlflow"] = {"uri": backend.uri, "run_id": backend.run_id}
            except Exception as e:  # any library error becomes one line naming the dashboard
                self.close()
                raise RuntimeError(f"log.report_to {name}: cannot open the dashboard run: {type(e).__name__}: {e}") from e
        if ids:
            _update_ledger(cfg, **ids)

    def _each(self, method: str, *args: Any) -> None:
        for name, backend in list(self.backends.items()):
            try:
                getattr(backend, method)(*args)
            except Exception as e:  # noqa: BLE001 (a dashboard never stops a training or a round)
                print(f"dashboards: {name} failed ({type(e).__name__}: {e}); not reporting to it any more", file=sys.stderr, flush=True)
                del self.backends[name]

    def log_train(self, values: dict[str, float], step: int) -> None:
        self._each("log_train", values, step)

    def log_round(self, values: dict[str, float], k: int, step: int) -> None:
        self._each("log_round", values, k, step)

    def close(self) -> None:
        self._each("close")
        self.backends.clear()


class TrainTracker:
    """The train stage's link to the dashboards (rank 0): `log_step` after each optimizer step, `close` at the end."""

    def __init__(self, cfg: RunConfig, plan: StagePlan) -> None:
        self.cfg, self.round = cfg, plan.round
        self.digest = plan_digest(plan)
        self.offset = step_offset(cfg, plan.round)
        sent = read_ledger(cfg)["train"].get(str(plan.round)) or {}
        self.sent = sent.get("last_step", -1) if sent.get("digest") == self.digest else -1
        # Sending this round's steps from its first one (new work): TensorBoard hides what an earlier attempt left there
        self.dashboards = Dashboards(cfg, purge_step=self.offset if self.sent < 0 else None)

    def log_step(self, metrics: dict[str, Any]) -> None:
        """Send one row of train_metrics (its `step` within the round) at global step offset + step."""
        step = int(metrics["step"])
        if step <= self.sent:  # sent before this training was interrupted
            return
        values = {f"train/{key}": float(v) for key, v in metrics.items() if key != "step" and v is not None}
        self.dashboards.log_train({**values, "train/round": float(self.round)}, self.offset + step)
        self.sent = step
        _update_ledger(self.cfg, train={str(self.round): {"digest": self.digest, "last_step": step}})

    def close(self) -> None:
        self.dashboards.close()


class _NoTracker:
    def log_step(self, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def train_tracker(cfg: RunConfig, plan: StagePlan, rank: int) -> TrainTracker | _NoTracker:
    """The train stage's tracker: rank 0 reports to `log.report_to`; other ranks and runs without dashboards do nothing."""
    return TrainTracker(cfg, plan) if rank == 0 and cfg.log.report_to else _NoTracker()


def round_values(summary: dict[str, Any]) -> dict[str, float]:
    """A round summary's numbers as `round/<name>` (text columns such as the intervals' "0.41–0.58" left out)."""
    return {
        f"round/{key}": float(v)
        for key, v in summary.items()
        if key != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def log_round(cfg: RunConfig, k: int, summary: dict[str, Any]) -> bool:
    """Send round k's summary (pipeline.run.report.round_summary) unless these numbers were sent already."""
    if not cfg.log.report_to:
        return False
    values = round_values(summary)
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
    if read_ledger(cfg)["rounds"].get(str(k)) == digest:
        return False
    dashboards = Dashboards(cfg)
    try:
        dashboards.log_round(values, k, step_offset(cfg, k) + train_steps(cfg, k))
    finally:
        dashboards.close()
    _update_ledger(cfg, rounds={str(k): digest})
    return True
