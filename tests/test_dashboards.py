"""`log.report_to`: the real train stage on the tiny model reports each step to TensorBoard, W&B (offline) and MLflow
(a SQLite store in the run folder); round summaries follow on the same dashboard run; nothing is sent twice.

What the dashboards received is read back from their own files: TensorBoard's event files with its
EventAccumulator, the W&B offline run's transaction log (run-<id>.wandb: W&B's LevelDB-style record log of
protobuf records, read by `_wandb_records`), MLflow through its client.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config, save_config
from pipeline.data.artifacts import execute
from pipeline.run import rounds, tracking
from pipeline.run.report import round_summary
from tests.conftest import REPO, tiny_config

ALL = "[tensorboard, wandb, mlflow]"


def _wandb_records(path: Path):
    """The protobuf records of a W&B transaction log: a 7-byte header (':W&B', magic, version), then LevelDB log
    blocks of 32 KiB whose chunks have a 7-byte header (CRC32C, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_history(run_dir: Path) -> list[tuple[str, list[dict]]]:
    """Per offline run folder (one per process), in start order: ((id, name, project), history rows with `_step`)."""
    out = []
    for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        ident, started, rows = None, None, []
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ident = (record.run.run_id, record.run.display_name, record.run.project)
                started = record.run.start_time.ToNanoseconds()
            elif kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        out.append((started, ident, rows))
    return [(ident, rows) for _, ident, rows in sorted(out, key=lambda x: x[0])]


def _tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow(cfg, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    known = tracking.read_ledger(cfg)["mlflow"]
    history = MlflowClient(tracking_uri=known["uri"]).get_metric_history(known["run_id"], key)
    return sorted((m.step, m.value) for m in history)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    """Round 0 trained by the real train stage (2 steps) with every dashboard on, W&B offline as users set it."""
    from stages import pairs, reference

    tmp = tmp_path_factory.mktemp("dashboards")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # not the user's home
            env.setenv(var, str(tmp / "wandb-home"))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves the machine
        cfg = tiny_config(tmp / "runs", tiny_model, offline_rounds="true", rounds=1, **{"round0.max_pairs": 16,
                          "data.offline_per_round": 16, "log.report_to": ALL})  # fmt: skip
        for name, mod in (("pairs", pairs), ("reference", reference)):
            plan = rounds.plan(cfg, 0, name)
            execute(plan, lambda mod=mod, plan=plan: mod.run(cfg, plan))
        conf = tmp / "run.yaml"
        save_config(cfg, conf)
        proc = subprocess.run([sys.executable, "-m", "stages.train", str(conf), "--round", "0"], cwd=REPO,
                              capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield cfg


def test_each_training_step_reaches_every_dashboard(run):
    metrics = pq.read_table(rounds.round_dir(run, 0) / "train_metrics.parquet").to_pandas()
    assert len(metrics) == 2  # 16 pairs, 8 per step
    expected = list(zip(metrics.step, metrics.loss))

    tb = _tensorboard(run.run_dir)
    assert [s for s, _ in tb["train/loss"]] == [0, 1]
    for (step, value), (s, v) in zip(expected, tb["train/loss"]):
        assert v == pytest.approx(value, rel=1e-6)  # TensorBoard stores float32
    for key in ("accuracy", "margin", "chosen_reward", "rejected_reward", "grad_norm", "learning_rate", "tokens_per_s"):
        assert [v for _, v in tb[f"train/{key}"]] == pytest.approx(list(metrics[key]), rel=1e-6), key

    (ident, rows), = _wandb_history(run.run_dir)  # fmt: skip
    assert ident == (tracking.read_ledger(run)["wandb_id"], run.name, "dice")
    assert [(r["_step"], r["train/loss"]) for r in rows] == [(int(s), pytest.approx(v)) for s, v in expected]
    assert all(r["train/round"] == 0 for r in rows)

    assert _mlflow(run, "train/loss") == [(int(s), pytest.approx(v)) for s, v in expected]
    assert _mlflow(run, "train/learning_rate") == [(int(s), pytest.approx(v)) for s, v in zip(metrics.step, metrics.learning_rate)]


def test_round_summaries_and_later_rounds_continue_the_same_dashboard_run(run):
    """The flow's round summary (tracking.log_round, what publish_round calls), then round 1's training: its
    steps continue after round 0's steps and summary slot, and W&B's steps only ever increase across processes."""
    summary = round_summary(rounds.round_dir(run, 0))
    assert tracking.log_round(run, 0, summary)
    assert not tracking.log_round(run, 0, summary)  # published again (a re-run flow): the same numbers are not re-sent

    # round 1's training as its stage reports it (with round 0's rows: the tracker is what is under test here)
    rows = pq.read_table(rounds.round_dir(run, 0) / "train_metrics.parquet").to_pylist()
    tracker = tracking.train_tracker(run, rounds.plan(run, 1, "train"), rank=0)
    for row in rows:
        tracker.log_step(row)
    tracker.close()
    assert tracking.step_offset(run, 1) == 3  # round 0's 2 steps + its summary slot

    tb = _tensorboard(run.run_dir)
    assert [s for s, _ in tb["train/loss"]] == [0, 1, 3, 4]
    assert [v for _, v in tb["train/round"]] == [0, 0, 1, 1]
    assert tb["round/pairs_offline"] == [(0, summary["pairs_offline"])]  # round metrics: x = the round
    assert tb["round/final_loss"] == [(0, pytest.approx(summary["final_loss"], rel=1e-6))]
    assert "round/stages_done" not in tb  # text columns stay in the Prefect table

    history = _wandb_history(run.run_dir)
    assert len(history) == 3 and len({ident for ident, _ in history}) == 1  # three processes, one W&B run
    steps = [r["_step"] for _, rows_ in history for r in rows_]
    assert steps == [0, 1, 2, 3, 4] and steps == sorted(set(steps))  # increasing: nothing W&B would drop
    summary_row = history[1][1][0]
    assert summary_row["round"] == 0 and summary_row["round/train_steps"] == 2
    assert summary_row["round/final_loss"] == pytest.approx(summary["final_loss"])

    assert [s for s, _ in _mlflow(run, "train/loss")] == [0, 1, 3, 4]
    assert _mlflow(run, "round/pairs_offline") == [(0, summary["pairs_offline"])]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.read_ledger(run)["mlflow"]["uri"])
    (only,) = client.search_runs([client.get_experiment_by_name("dice").experiment_id])  # one MLflow run per dice run
    assert only.info.run_name == run.name and only.data.params["train.beta"] == "0.1"


def test_a_resumed_training_sends_no_step_twice_and_changed_work_replaces_it(run):
    """A training that runs again for the same work (resumed after a kill, or --force) sends nothing already sent;
    one whose work changed sends its steps again, and TensorBoard shows only the new values."""
    plan = rounds.plan(run, 0, "train")
    rows = pq.read_table(plan.outputs["metrics"]).to_pylist()
    before = {"tb": _tensorboard(run.run_dir)["train/loss"], "mlflow": _mlflow(run, "train/loss")}

    again = tracking.train_tracker(run, plan, rank=0)  # as the stage makes it on resume
    for row in rows:
        again.log_step(row)
    again.close()
    assert _tensorboard(run.run_dir)["train/loss"] == before["tb"]
    assert _mlflow(run, "train/loss") == before["mlflow"]
    assert tracking.train_tracker(run, plan, rank=1).__class__ is not tracking.TrainTracker  # other ranks: nothing

    # other work for round 0 (its ledger entry's digest no longer matches): sent again from its first step
    tracking._update_ledger(run, train={"0": {"digest": "another-plan", "last_step": 1}})
    changed = tracking.train_tracker(run, plan, rank=0)
    for row in rows:
        changed.log_step({**row, "loss": row["loss"] + 1.0})
    changed.close()
    tb = _tensorboard(run.run_dir)["train/loss"]
    assert [s for s, _ in tb] == [0, 1]  # the later rounds' events at steps ≥ 0 are purged too, until they re-run
    assert [v for _, v in tb] == pytest.approx([r["loss"] + 1.0 for r in rows], rel=1e-6)
    assert tracking.read_ledger(run)["train"]["0"]["last_step"] == 1


def test_a_missing_dashboard_library_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed: find_spec sees no module
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "conf/tiny.yaml", ["log.report_to=[tensorboard, wandb]"])
    assert "field log" in str(err.value) and "pip install -e '.[wandb]'" in str(err.value)
    with pytest.raises(ConfigError, match="log.report_to.0"):
        load_config(REPO / "conf/tiny.yaml", ["log.report_to=[comet]"])
    assert load_config(REPO / "conf/tiny.yaml").log.report_to == []  # none by default


def test_no_dashboards_by_default_writes_nothing(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path / "runs", tiny_model)
    assert tracking.log_round(cfg, 0, {"round": 0, "pairs_offline": 8}) is False
    assert not cfg.run_dir.exists()


def test_a_dashboard_that_cannot_be_opened_is_one_error_naming_it(tmp_path, tiny_model, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow 3 refuses its file-system store without MLFLOW_ALLOW_FILE_STORE: a store that cannot be opened
    cfg = tiny_config(tmp_path / "runs", tiny_model, **{"log.report_to": "[mlflow]",
                      "log.mlflow_tracking_uri": (tmp_path / "mlruns").as_uri()})  # fmt: skip
    with pytest.raises(RuntimeError, match=r"^log.report_to mlflow: cannot open the dashboard run: MlflowException"):
        tracking.Dashboards(cfg)
    assert not tracking.ledger_path(cfg).exists()  # nothing recorded for a run that was never opened
