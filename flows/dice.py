"""The Prefect flow `dice`: round 0 (offline DPO), then DICE rounds 1..R, each stage a task; with eval.enabled each
round ends by evaluating π_k against its baseline, and `eval.stop_after_no_gain` ends the run when rounds stop helping.

The flow only wires stages: every task runs `python -m stages.<name>` in its own process (so vLLM's and
DeepSpeed's memory is released when the stage ends), streams that process's output into the task's logs,
and passes file paths, never data or models. Resuming is the stages' own manifests: a re-run skips every
finished stage without starting a process.

Its one parameter is the typed `RunConfig`, so the Prefect UI shows the config as a form and bad values
are rejected before a flow run is created. The deployment `iterate` (prefect.yaml) serves this flow.
"""

# No `from __future__ import annotations` here: Prefect builds the flow's parameter model from the real
# RunConfig annotation, and a string annotation fails to resolve when a deployment loads this file.

import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Annotated, Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.concurrency.sync import concurrency
from pydantic import Field

from pipeline.compute import gpus
from pipeline.config import RunConfig, config_hash, resolve_runtime, save_config
from pipeline.data.artifacts import is_done, read_manifest, run_lock, write_json_atomic
from pipeline.method.evaluation import Progress
from pipeline.run import rounds, tracking
from pipeline.run.datacheck import validate_data
from pipeline.run.html_report import round_markdown, write_report
from pipeline.run.report import eval_progress as report_progress
from pipeline.run.report import round_summary, stage_manifests

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- the Prefect API
# With PREFECT_API_URL set, the flow reports to that server. Prefect's client retries a lost server for minutes
# (and then waits on its log and event queues at exit), which is right for a server restarting and wrong for one
# that is gone: `dice run` checks the API before the flow and watches it during the flow, and ends with one line
# naming PREFECT_API_URL when it does not answer.


class PrefectUnreachable(RuntimeError):
    """The Prefect API that PREFECT_API_URL names does not answer."""


def prefect_api_url() -> str | None:
    """The Prefect API this process reports to (PREFECT_API_URL, from the environment or the Prefect profile); None:
    a temporary local server is started for the run."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def api_answers(url: str, timeout_s: float) -> str | None:
    """None when the API at `url` answers (any HTTP status: it is there), else why not."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None  # it answered (an auth error from Prefect Cloud, say)
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"{type(reason).__name__}: {reason}"


def unreachable_message(url: str, why: str) -> str:
    from pipeline.config import _redact

    return (f"the Prefect API at {_redact(url)} (PREFECT_API_URL) does not answer ({why}); start a server with "
            "`prefect server start` (it then answers at http://127.0.0.1:4200/api), or unset PREFECT_API_URL to let "
            "dice run on a temporary local server")  # fmt: skip


def check_prefect_api(wait_s: float = 10.0) -> None:
    """Refuse at once a PREFECT_API_URL that does not answer (a server still starting gets `wait_s`).

    Raises:
        PrefectUnreachable: naming PREFECT_API_URL and how to start a server.
    """
    import time

    url = prefect_api_url()
    if url is None:
        return
    deadline = time.monotonic() + wait_s
    while (why := api_answers(url, 5.0)) is not None:
        if time.monotonic() > deadline:
            raise PrefectUnreachable(unreachable_message(url, why))
        time.sleep(1.0)


class watch_prefect_api:
    """While the body runs, ask the Prefect API every `every_s` seconds whether it answers; once it has not for
    `grace_s` seconds (a restarting server is back well within that), print one line naming PREFECT_API_URL to
    stderr, stop this process's children (the stage in flight: a re-run resumes it) and exit with `code`, without
    waiting on Prefect's queues of logs and events for a server that is gone."""

    def __init__(self, grace_s: float = 20.0, every_s: float = 5.0, code: int = 4):
        self.grace_s, self.every_s, self.code = grace_s, every_s, code
        self.url = prefect_api_url()
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dice-prefect-watch", daemon=True)

    def __enter__(self) -> "watch_prefect_api":
        if self.url is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _watch(self) -> None:
        import time

        assert self.url is not None
        lost = None
        while not self._stop.wait(self.every_s):
            why = api_answers(self.url, min(self.every_s, 5.0))
            if why is None:
                lost = None
                continue
            lost = lost or time.monotonic()
            if time.monotonic() - lost >= self.grace_s and not self._stop.is_set():
                give_up(unreachable_message(self.url, f"{why}, for {time.monotonic() - lost:.0f} s"), self.code)


def give_up(message: str, code: int) -> None:
    """Stop this process's children, print `message` as dice's last line (on a line of its own), and exit now with
    `code` (atexit handlers skipped: Prefect's would retry a server that is gone). The other threads' output is
    silenced first: the flow would log the stopped stage's failure, with its traceback, after dice's line."""
    import psutil

    sys.stdout.flush()
    sys.stderr.flush()
    ours = os.dup(2)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=15)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    # A new line first: Prefect's "--- Error logging to API ---" note, written just before when the server went
    # away, ends without one, and dice's line must start a line of its own (users and scripts read the last lines).
    os.write(ours, f"\nerror: {message}\nFinished stages are kept; run the same command again once the server answers, "
                   "to resume.\n".encode())  # fmt: skip
    os._exit(code)


def is_connection_loss(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a failure to reach a server (Prefect's client raises httpx's)."""
    import httpx

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, ConnectionError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _stream(cmd: list[str], what: str, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()) -> str | None:
    """Run `cmd` (with `env` added to this process's environment, `pass_fds` open in it), sending each output line
    to the Prefect log; return its DICE_STAGE_RESULT payload."""
    logger = get_run_logger()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore::FutureWarning", "TQDM_DISABLE": "1",
           **(env or {})}  # fmt: skip
    tail: deque[str] = deque(maxlen=30)
    result = None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=os.getcwd(),
                            pass_fds=pass_fds)  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line.startswith("DICE_STAGE_RESULT "):
            result = line.removeprefix("DICE_STAGE_RESULT ")
            continue
        tail.append(line)
        logger.info(line)
    if proc.wait() != 0:
        raise RuntimeError(f"{what} failed (exit code {proc.returncode}). Last output:\n" + "\n".join(tail))
    return result


_data_checked: dict[str, list[str]] = {}  # config hash -> warnings: checked by `dice run`, not yet by its flow


def check_run_data(cfg: RunConfig, *, before_flow: bool = False) -> list[str]:
    """`pipeline.run.datacheck.validate_data` for a run of `cfg`, once: `dice run` checks before Prefect starts
    (`before_flow`: a data error costs no server start) and its flow then uses that result; a flow started
    otherwise (a deployment, a second call in one process) checks for itself.

    Raises:
        DataError: naming the file, split, row and field of the first problems.
    """
    key = config_hash(cfg)
    if before_flow:
        _data_checked[key] = validate_data(cfg)
        return _data_checked[key]
    found = _data_checked.pop(key, None)
    return found if found is not None else validate_data(cfg)


@task(name="tiny-model", cache_policy=NONE)
def build_tiny_model(path: str, data: list[str], sft_steps: int) -> str:
    """Build the offline tiny model (tiny and toy presets) when it is not on disk yet."""
    files = [arg for f in data for arg in ("--data", f)]
    _stream([sys.executable, "-m", "flows.cli", "tiny-model", path, *files, "--sft-steps", str(sft_steps)], "tiny-model")
    return path


@task(name="stage", cache_policy=NONE)  # resuming is the manifests' job
def run_stage(config_path: str, cfg: RunConfig, k: int, stage: str) -> dict[str, Any]:
    """Run one stage of one round in its own process, unless its manifest says it is done."""
    logger = get_run_logger()
    plan = rounds.plan(cfg, k, stage)
    if is_done(plan):
        logger.info(f"round {k} {stage}: already done, skipped")
        manifest = read_manifest(plan.manifest_path) or {}
        return manifest.get("stats", {})
    cmd = [sys.executable, "-m", f"stages.{stage}", config_path, "--round", str(k)]
    slots = rounds.gpus_used(cfg, stage)
    if cfg.gpu_slots and slots:
        # Queue for GPUs instead of oversubscribing them: hold one slot of the `gpu_slots` limit per GPU (a no-op
        # when no such limit exists, e.g. on a laptop), then lock that many specific GPUs no other stage on this
        # machine holds (pipeline/compute/gpus.py) and run the stage on them alone; the stage holds the locks too,
        # so they stay claimed while it runs.
        with concurrency(cfg.gpu_slots, occupy=slots, strict=False), gpus.claimed(slots, what=f"round {k} {stage}") as got:
            result = _stream(cmd, f"round {k} {stage}", got.env(), tuple(got.fds))
    else:
        result = _stream(cmd, f"round {k} {stage}")
    return json.loads(result)["stats"] if result else {}


# ---------------------------------------------------------------------------------------------- shard fan-out
# With `generate.shard_deployment` set, the flow hands round k's missing prompt shards to that deployment
# (`generate-shards` in prefect.yaml): `generate.shard_runs` flow runs, run i taking every N-th missing shard,
# picked up by workers on any machine that serves the pool (`prefect worker start --pool dice-generate`).
# Workers must see the same files at the same paths (a shared filesystem, started from the repo root). When
# they are done, the ordinary generate task runs and finds every shard written: it only concatenates them.


@flow(name="dice-generate-shards", log_prints=True)
def generate_shards(config_path: str, k: int, shards: list[int]) -> None:
    """Generate some prompt shards of round k (`python -m stages.generate --shards`), on the worker's machine."""
    cmd = [sys.executable, "-m", "stages.generate", config_path, "--round", str(k), "--shards", ",".join(map(str, shards))]
    _stream(cmd, f"round {k} generate shards {shards}")


@task(name="generate-shards", cache_policy=NONE)
def _shard_run(deployment: str, config_path: str, k: int, shards: list[int]) -> str:
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run = run_deployment(deployment, parameters={"config_path": config_path, "k": k, "shards": shards},
                             flow_run_name=f"round-{k}-shards-{shards[0]}-every-{shards[1] - shards[0] if len(shards) > 1 else 1}",
                             timeout=None, poll_interval=2)  # fmt: skip
    except ObjectNotFound:
        raise RuntimeError(
            f"generate.shard_deployment: the Prefect server has no deployment {deployment!r} (deploy it first: "
            "prefect --no-prompt deploy --name generate-shards; docs/stages.md, generate)"
        ) from None
    if run.state is None or not run.state.is_completed():
        raise RuntimeError(f"round {k}: flow run {run.name} ({run.id}) of {deployment} for shards {shards} ended "
                           f"{run.state.name if run.state else 'without a state'}")  # fmt: skip
    return str(run.id)


def hand_out_generate_shards(config_path: str, cfg: RunConfig, k: int) -> list[str]:
    """Fan round k's missing shards out to `cfg.generate.shard_deployment` and wait for every flow run."""
    from stages.generate import missing_shards

    plan = rounds.plan(cfg, k, "generate")
    if is_done(plan):
        return []
    missing = missing_shards(cfg, plan)
    n = cfg.generate.shard_runs
    groups = [missing[i::n] for i in range(n) if missing[i::n]]
    get_run_logger().info(f"round {k} generate: {len(missing)} shards to {cfg.generate.shard_deployment} "
                          f"in {len(groups)} flow runs")  # fmt: skip
    path = str(Path(config_path).resolve())
    futures = [_shard_run.with_options(task_run_name=f"round-{k}-generate-shards-{g[0]}")
               .submit(cfg.generate.shard_deployment, path, k, g) for g in groups]  # fmt: skip
    return [f.result() for f in futures]


def _artifact_key(name: str, k: int) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes only
    safe = "".join(c if c.isalnum() else "-" for c in name.lower())
    return f"dice-{safe}-round-{k}"


def publish_round(cfg: RunConfig, k: int) -> dict[str, Any]:
    """Write the round's manifest (last: it means the round is complete) and its Prefect table artifact."""
    rd = rounds.round_dir(cfg, k)
    manifests = stage_manifests(rd)
    write_json_atomic(
        rd / "manifest.json",
        {
            "round": k,
            "run": cfg.name,
            "models": {
                "policy": rounds.model_of(cfg, k - 1),
                "reference_of_policy": rounds.model_of(cfg, k - 2) if k >= 1 else None,
                "trained": rounds.model_of(cfg, k),
            },
            "files": {name: out for m in manifests.values() for name, out in m["outputs"].items()},
            "stages": manifests,
            "config": cfg.model_dump(mode="json"),
        },
    )
    summary = round_summary(rd)
    table = [{"metric": key, "value": "" if v is None else (round(v, 4) if isinstance(v, float) else v)} for key, v in summary.items()]
    create_table_artifact(table=table, key=_artifact_key(cfg.name, k), description=f"dice run {cfg.name}, round {k}")
    try:  # the dashboards of log.report_to, like the report, must never stop the rounds
        tracking.log_round(cfg, k, summary)
    except Exception as e:  # noqa: BLE001
        get_run_logger().warning(f"round {k}: the round summary could not be sent to the dashboards ({e})")
    try:  # the report is for people: a file it cannot read or draw must never stop the rounds
        report = write_report(cfg.run_dir)  # the whole run's HTML, regenerated as each round lands
        create_markdown_artifact(
            key=_artifact_key(cfg.name, k) + "-plots",
            markdown=round_markdown(cfg.run_dir, k, report),
            description=f"dice run {cfg.name}, round {k}: plots (full report: {report})",
        )
    except Exception as e:  # noqa: BLE001
        get_run_logger().warning(f"round {k}: the HTML report could not be written ({type(e).__name__}: {e})")
    return summary


@flow(name="dice", log_prints=True)
def dice(
    config: RunConfig = RunConfig(),  # noqa: B008 (the default is immutable in use)
    more_rounds: Annotated[
        Optional[int],
        Field(ge=1, description="Continue the run by this many rounds after its latest finished round "
              "(scheduled deployments); empty: run config.rounds."),
    ] = None,  # fmt: skip
) -> list[dict[str, Any]]:
    """Iterative self-alignment rounds (DICE): round 0 offline DPO, then generate → label → pairs → reference → train
    (→ evaluate)."""
    # A GPU config on a machine without CUDA is refused before anything is written; dtype/bf16 `auto` become what
    # this machine runs, so the plans fingerprint it.
    config = resolve_runtime(config)
    # Models the config names are checked before anything is written: a missing folder or pickle weights
    # (pytorch_model.bin) is refused here, not after a round of generation.
    rounds.check_initial_models(config)
    check_memory(config)
    logger = get_run_logger()
    with run_lock(config.run_dir):
        cfg = config
        if more_rounds is not None:
            latest = rounds.latest_complete_round(config)
            cfg = config.model_copy(update={"rounds": max(latest, 0) + more_rounds})
            logger.info(f"run {cfg.name}: latest finished round {latest}; continuing to round {cfg.rounds}")
        # Every dataset the rounds will read, checked with the stages' own rules before anything runs (a bad row
        # found at round 1's generate would come after round 0 has trained); every prompt is rendered under the
        # policy's chat template once the policy exists (the tiny preset's, built below, is dice's own).
        for line in check_run_data(cfg):
            logger.warning(line)
        config_path = cfg.run_dir / "config.yaml"
        save_config(cfg, config_path)
        if cfg.model.build_tiny_if_missing and not Path(cfg.model.policy).exists():
            data = cfg.model.tiny_data or [cfg.data.prompts.path, cfg.data.offline.path]
            build_tiny_model(cfg.model.policy, data, cfg.model.tiny_sft_steps)
        summaries = []
        state, stopped = None, None
        for k in range(0, cfg.rounds + 1):
            stages = rounds.stages_of_round(cfg, k)
            if not stages:
                continue
            if state is not None and state.stop and not (rounds.round_dir(cfg, k) / "manifest.json").is_file():
                # finished rounds are still published; a round not yet run is not started
                logger.info(f"round {k} not started: {state.reason} (eval.stop_after_no_gain="
                            f"{cfg.eval.stop_after_no_gain}, eval.min_gain={cfg.eval.min_gain}); stopping the run")  # fmt: skip
                stopped = k
                break
            logger.info(f"round {k}: {' → '.join(stages)}")
            for stage in stages:
                if stage == "generate" and cfg.generate.shard_deployment:
                    hand_out_generate_shards(str(config_path), cfg, k)  # then the stage only concatenates
                run_stage.with_options(task_run_name=f"round-{k}-{stage}")(str(config_path), cfg, k, stage)
            summaries.append(publish_round(cfg, k))
            state = eval_progress(cfg, summaries)
            if state is not None and "evaluate" in stages:
                lc = summaries[-1].get("lc_win_rate")
                logger.info(f"round {k} evaluation: win rate {summaries[-1].get('win_rate'):.3f}, LC win rate "
                            f"{'not identified' if lc is None else f'{lc:.3f}'}; best round so far {state.best_round}")  # fmt: skip
        create_markdown_artifact(
            key=_artifact_key(cfg.name, 999).replace("-round-999", "-summary"),
            markdown=_summary_markdown(cfg, summaries, state, stopped),
            description=f"dice run {cfg.name}: all rounds",
        )
    return summaries


def check_memory(cfg: RunConfig) -> None:
    """Every GPU stage of the run planned against this machine's GPUs before round 0 starts (pipeline/compute/memory.py):
    a training that cannot fit is refused now, not after a round of generation. Skipped without GPUs (and without
    `gpu_memory_gib`) or with `memory_check: false`; each stage checks again when it starts."""
    from pipeline.compute import memory

    if not cfg.memory_check:
        return
    if cfg.model.build_tiny_if_missing and not Path(cfg.model.policy).exists():
        return  # the tiny model is built below; each stage checks when it starts
    gpus, device_bytes = memory.device_memory(cfg)
    if device_bytes is None:
        return
    stages = dict.fromkeys(s for k in range(cfg.rounds + 1) for s in rounds.stages_of_round(cfg, k))
    for stage in stages:
        memory.preflight(cfg, stage)


def eval_progress(cfg: RunConfig, summaries: list[dict[str, Any]]) -> Progress | None:
    """The stopping rule on the rounds published so far (pipeline.run.report.eval_progress: each round's recorded
    baseline kind, gains by the lower 95% bound of the paired LC gain); None without evaluation."""
    if not cfg.eval.enabled or not any(s.get("lc_win_rate") is not None for s in summaries):
        return None
    return report_progress(cfg.run_dir, cfg.eval, cfg.seed, {s["round"] for s in summaries})


def _summary_markdown(
    cfg: RunConfig, summaries: list[dict[str, Any]], state: Progress | None = None, stopped: int | None = None
) -> str:
    cols = ["round", "pairs_generated", "pairs_offline", "alpha", "gap_alpha0", "gap", "chosen_len", "rejected_len",
            "reward_mean", "final_loss", "final_accuracy", "win_rate", "win_rate_ci", "lc_win_rate", "lc_win_rate_ci",
            "eval_chars", "baseline_chars", "seconds"]  # fmt: skip
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# dice run `{cfg.name}`", "", f"Folder: `{cfg.run_dir}`", "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]  # fmt: skip
    lines += ["| " + " | ".join(fmt(s.get(c)) for c in cols) + " |" for s in summaries]
    if state is not None:
        lines += ["", f"**best_round: {state.best_round}** (LC win rate {fmt(state.best_lc)}, baseline "
                  f"`{cfg.eval.baseline}`); rounds without a gain since: {state.rounds_without_gain}."]  # fmt: skip
        if stopped is not None:
            lines += ["", f"**Stopped before round {stopped}**: {state.reason} (eval.stop_after_no_gain = "
                      f"{cfg.eval.stop_after_no_gain}, eval.min_gain = {cfg.eval.min_gain:g})."]  # fmt: skip
    return "\n".join(lines)
