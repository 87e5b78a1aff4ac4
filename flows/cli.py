"""The `dice` command line: run the flow locally, serve the `iterate` deployment, inspect rounds, build a tiny model."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="dice: iterative self-alignment rounds (DICE) on vLLM, DeepSpeed and Prefect.")
console = Console(soft_wrap=True)  # printed lines never folded at the terminal width (tables still fit it)
err = Console(stderr=True, soft_wrap=True)  # error lines stay whole (paths are long; users grep them)


def _prefect_env() -> None:
    """Defaults that must be in place before Prefect is imported: a per-project home, no analytics."""
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    # Prefect's default of 20 s to start the temporary local server fails on a loaded machine (seen here on 2
    # busy cores: "Timed out while attempting to connect to ephemeral Prefect API server").
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _load(config: str | None, overrides: list[str] | None):
    from pipeline.config import ConfigError, load_config

    overrides = list(overrides or [])
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `dice run rounds=1`: no file given, only overrides
        config = None
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


def _stage_line(msg: str) -> str:
    """A failed stage's message as one line: the flow's "round k stage failed (exit code n). Last output: ..." with
    the stage's own error line (naming the file, row or field) in place of its last output."""
    head, sep, tail = msg.partition(". Last output:\n")
    if sep:
        ours = [line.split(": error: ", 1)[1] for line in tail.splitlines()
                if line.startswith("dice ") and ": error: " in line]  # fmt: skip
        if ours:
            return f"{head.split(' (exit code')[0]}: {ours[-1]}"
    return msg


@app.command()
def run(
    config: Optional[str] = typer.Argument(None, help="YAML preset, e.g. conf/tiny.yaml (default: the embedded tiny preset)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. rounds=3 generate.num_samples=8."),
) -> None:
    """Run the `dice` flow in this process (Prefect starts a temporary local server unless PREFECT_API_URL is set).

    Exit codes: 0 done; 1 a stage or the flow failed (finished stages are kept: run again to resume); 2 bad
    configuration or data; 3 the run folder is being run by another process; 4 the Prefect API does not answer."""
    from rich.markup import escape

    cfg = _load(config, overrides)
    from pipeline.config import resolve_runtime
    from pipeline.run.rounds import check_initial_models

    try:  # before Prefect starts and before the run folder exists (the flow checks again, for deployments)
        cfg = resolve_runtime(cfg)  # a GPU config (device: cuda) on a machine without CUDA: refused here
        check_initial_models(cfg)
    except ValueError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    _prefect_env()
    from flows.dice import (
        PrefectUnreachable,
        check_prefect_api,
        check_run_data,
        dice,
        give_up,
        is_connection_loss,
        prefect_api_url,
        unreachable_message,
        watch_prefect_api,
    )
    from pipeline.data.artifacts import ArtifactError, RunLocked
    from pipeline.run.datacheck import DataError

    try:  # a server that is not there is said at once, not after Prefect's minutes of retries
        check_prefect_api()
    except PrefectUnreachable as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(4) from None
    try:  # every dataset the rounds will read, before anything runs (the flow does not check it again)
        for line in check_run_data(cfg, before_flow=True):
            err.print(f"[yellow]warning:[/yellow] {escape(line)}")
    except (DataError, ArtifactError, ValueError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    try:
        with watch_prefect_api(grace_s=float(os.environ.get("DICE_PREFECT_GRACE_S", "20"))):
            dice(config=cfg)
    except RunLocked as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(3) from None
    except Exception as e:  # noqa: BLE001 (a stage failed, with its own message naming the file, row or field;
        # or something unexpected: either way one line, not a traceback; DICE_DEBUG=1 shows the traceback)
        if os.environ.get("DICE_DEBUG"):
            raise
        from flows.dice import api_answers

        url = prefect_api_url()
        if url and is_connection_loss(e) and (why := api_answers(url, 5.0)) is not None:
            give_up(unreachable_message(url, why), 4)  # exits now: Prefect's queues would retry a server that is gone
        if isinstance(e, DataError):  # the data check before round 0: nothing ran
            err.print(f"[red]error:[/red] {escape(str(e))}")
            raise typer.Exit(2) from None
        msg = _stage_line(str(e)) if isinstance(e, (RuntimeError, ValueError)) else f"{type(e).__name__}: {e}"
        err.print(f"[red]error:[/red] {escape(msg)}")
        err.print(f"Finished stages are kept; fix the cause and run the same command again to resume ({cfg.run_dir}). "
                  "DICE_DEBUG=1 shows the traceback.")  # fmt: skip
        raise typer.Exit(1) from None
    _print_summary(cfg.run_dir)


@app.command()
def serve(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML preset whose values become the deployment's default parameters."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides of those defaults."),
    deployment: str = typer.Option("iterate", help="Deployment name in prefect.yaml."),
    prefect_yaml: Path = typer.Option(Path("prefect.yaml"), help="Where the deployment is declared."),
    more_rounds: Optional[int] = typer.Option(None, min=1, help="Each flow run continues the run by N rounds (for schedules)."),
    interval: Optional[int] = typer.Option(None, min=1, help="Schedule: start a flow run every N seconds."),
    cron: Optional[str] = typer.Option(None, help='Schedule: a cron string, e.g. "0 3 * * *".'),
) -> None:
    """Serve the `dice/iterate` deployment declared in prefect.yaml; then `prefect deployment run dice/iterate`."""
    import yaml

    spec: dict[str, Any] = {}
    if prefect_yaml.is_file():
        for d in (yaml.safe_load(prefect_yaml.read_text()) or {}).get("deployments", []) or []:
            if d.get("name") == deployment:
                spec = d
    if not spec:
        err.print(f"[red]error:[/red] {prefect_yaml}: no deployment named {deployment!r}")
        raise typer.Exit(2)
    parameters = dict(spec.get("parameters") or {})
    if config or overrides:
        parameters["config"] = _load(config, overrides).model_dump(mode="json")
    if more_rounds is not None:
        parameters["more_rounds"] = more_rounds
    schedule: dict[str, Any] = {}
    for s in spec.get("schedules") or []:
        for key in ("cron", "interval"):
            if s.get(key) is not None:
                schedule[key] = s[key]
    if interval is not None:
        schedule = {"interval": interval}
    if cron is not None:
        schedule = {"cron": cron}
    _prefect_env()
    from flows.dice import dice

    dice.serve(
        name=deployment,
        parameters=parameters,
        description=spec.get("description"),
        tags=spec.get("tags"),
        limit=spec.get("concurrency_limit"),
        **schedule,
    )


@app.command()
def inspect(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. runs/tiny."),
    round_: Optional[int] = typer.Option(None, "--round", help="Show rows of this round (with --stage)."),
    stage: Optional[str] = typer.Option(None, help="generate | label | pairs | reference | train | evaluate (its Parquet output)."),
    head: int = typer.Option(5, help="Rows to show."),
    sql: Optional[str] = typer.Option(
        None, help="A duckdb query over all rounds: views responses, labels, pairs, reference, train_metrics, eval (with `round`)."
    ),
) -> None:
    """Print a per-round table of a run; with --round and --stage, the first rows of that stage's Parquet; with
    --sql, a duckdb query's result (e.g. --sql "select round, avg(reward) from labels group by round")."""
    if not run_dir.is_dir():
        err.print(f"[red]error:[/red] {run_dir}: no such run folder")
        raise typer.Exit(2)
    if sql is not None:
        if round_ is not None or stage is not None:
            err.print("[red]error:[/red] --sql queries all rounds; filter with `where round = K` instead of --round/--stage")
            raise typer.Exit(2)
        _print_sql(run_dir, sql)
        return
    if stage is None and round_ is None:
        _print_summary(run_dir)
        return
    _print_rows(run_dir, round_ if round_ is not None else 1, stage or "pairs", head)


def _fmt(v: Any, width: int = 60) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v).replace("\n", "⏎")
    return s if len(s) <= width else s[: width - 1] + "…"


def _print_summary(run_dir: Path) -> None:
    from pipeline.run.report import run_summary

    rows = run_summary(run_dir)
    if not rows:
        console.print(f"{run_dir}: no rounds yet")
        return
    # One column per round, one row per metric: readable in an 80-column terminal for any number of rounds.
    table = Table(title=f"dice run {run_dir}")
    table.add_column("metric")
    for r in rows:
        table.add_column(f"round {r['round']}", justify="right")
    for key in rows[0]:
        if key != "round":
            table.add_row(key, *[_fmt(r.get(key), 24) for r in rows])
    console.print(table)
    best = _best_round(run_dir, rows)
    if best:
        console.print(best)


def _best_round(run_dir: Path, rows: list[dict[str, Any]]) -> str | None:
    """One line naming the best round by LC win rate (the flow's stopping rule, with the run's saved config)."""
    from pipeline.config import ConfigError, load_config
    from pipeline.run.report import eval_progress

    lcs = [(r["round"], r["lc_win_rate"]) for r in rows if r.get("lc_win_rate") is not None]
    conf = run_dir / "config.yaml"
    if not lcs or not conf.is_file():
        return None
    try:
        cfg = load_config(conf)
    except ConfigError:
        return None
    ev = cfg.eval
    state = eval_progress(run_dir, ev, cfg.seed)
    if state is None:
        return None
    line = f"best round by LC win rate: {state.best_round} (against {ev.baseline}"
    line += f", LC {state.best_lc:.3f})" if state.best_lc is not None else ")"
    if state.stop:
        line += f"; stopping rule met: {state.reason}"
    return line


def _print_rows(run_dir: Path, k: int, stage: str, head: int) -> None:
    import pyarrow.parquet as pq

    from pipeline.run.rounds import OUTPUT_FILES

    if stage not in OUTPUT_FILES:
        err.print(f"[red]error:[/red] --stage must be one of {', '.join(OUTPUT_FILES)}")
        raise typer.Exit(2)
    files = [f for f in OUTPUT_FILES[stage].values() if f.endswith(".parquet")]
    path = run_dir / f"round-{k}" / files[0]
    if not path.is_file():
        err.print(f"[red]error:[/red] {path}: not written yet")
        raise typer.Exit(2)
    pf = pq.ParquetFile(path)
    rows = pf.read_row_group(0).slice(0, head).to_pylist() if pf.num_row_groups else []
    console.print(f"{path}: {pf.metadata.num_rows} rows, showing {len(rows)}")
    # One small field/value table per row: long texts wrap instead of squeezing every column.
    for i, r in enumerate(rows):
        table = Table(title=f"row {i}", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for c in pf.schema_arrow.names:
            table.add_row(c, _fmt(r[c], 2000))
        console.print(table)


def _duckdb(run_dir: Path):
    """A duckdb connection with one view per stage output: the union over rounds, with a `round` column."""
    import duckdb

    from pipeline.run.rounds import OUTPUT_FILES

    con = duckdb.connect()
    for files in OUTPUT_FILES.values():
        for f in files.values():
            if not f.endswith(".parquet") or not list(run_dir.glob(f"round-*/{f}")):
                continue
            name = Path(f).stem  # responses, labels, pairs, reference, train_metrics
            pattern = str(run_dir / "round-*" / f).replace("'", "''")
            src = f"read_parquet('{pattern}', filename = true, union_by_name = true)"
            cols = [r[0] for r in con.execute(f"describe select * from {src}").fetchall()]
            # train_metrics has no `round` column: the name of the file's folder gives it
            from_folder = "" if "round" in cols else ", cast(regexp_extract(filename, 'round-(\\d+)/[^/]*$', 1) as integer) as round"
            con.execute(f"create view {name} as select * exclude (filename){from_folder} from {src}")
    return con


def _views(con) -> list[str]:
    return [r[0] for r in con.execute("select view_name from duckdb_views() where not internal order by view_name").fetchall()]


def _print_sql(run_dir: Path, sql: str) -> None:
    import duckdb

    views: list[str] = []
    try:
        con = _duckdb(run_dir)
        views = _views(con)
        rel = con.execute(sql)
        if rel.description is None:  # a statement without a result (e.g. `create table`)
            console.print("(no result)")
            return
        names = [d[0] for d in rel.description]
        rows = rel.fetchall()
    except duckdb.Error as e:
        err.print(f"[red]error:[/red] --sql: {e}")
        err.print(f"views over {run_dir}: {', '.join(views) or 'none (no round has written a Parquet file yet)'}")
        raise typer.Exit(2) from None
    shown = rows[:1000]
    table = Table(title=f"{len(rows)} rows" + (f" (the first {len(shown)} shown)" if len(shown) < len(rows) else ""))
    for n in names:
        table.add_column(n, overflow="fold")
    for r in shown:
        table.add_row(*[_fmt(v, 80) for v in r])
    console.print(table)


@app.command("eval")
def eval_(
    args: Optional[list[str]] = typer.Argument(
        None, help="RUN folder (with --round), then key=value overrides; with --model: overrides of --config only."
    ),
    round_: Optional[int] = typer.Option(None, "--round", help="The round of RUN to evaluate (its evaluate stage: same plan, same files)."),
    model: Optional[str] = typer.Option(None, "--model", help="Instead of a run: a model folder or hub id to evaluate."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="With --model: the baseline model, or a reference-outputs file (instruction/output)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="With --model: the YAML whose eval section is used (default: the embedded tiny preset)."),
    out: Optional[Path] = typer.Option(None, "--out", help="With --model: the output folder (default: RUNS_DIR/eval/<model>-vs-<baseline>)."),
    force: bool = typer.Option(False, "--force", help="Evaluate again even when the stage's manifest says it is done."),
) -> None:
    """Evaluate a model against a baseline: win rate and length-controlled win rate on held-out prompts.

    `dice eval RUN --round K` runs round K's evaluate stage of a run (skipped when done) and prints its metrics;
    `dice eval --model A --baseline B --config CONF` evaluates any two models (or a model and a file of reference
    outputs) with CONF's eval settings, writing DIR/eval.parquet.
    """
    from pipeline.config import ConfigError, load_config
    from pipeline.data.artifacts import ArtifactError, RunLocked, execute, run_lock
    from pipeline.run import rounds
    from stages import evaluate

    args = list(args or [])
    overrides = [a for a in args if "=" in a and not Path(a).exists()]
    positional = [a for a in args if a not in overrides]

    def fail(message: str) -> None:
        from rich.markup import escape

        err.print(f"[red]error:[/red] {escape(message)}")
        raise typer.Exit(2)

    try:
        if model is not None:
            if positional or round_ is not None:
                fail("--model evaluates two models outside a run: give no RUN folder and no --round")
            if baseline is None:
                fail("--model needs --baseline (a model folder, a hub id, or a reference-outputs file)")
            cfg = load_config(config, ["eval.enabled=true", *overrides])
            name = lambda m: "".join(c if c.isalnum() or c in "._-" else "-" for c in m.strip("/").split("/")[-1])  # noqa: E731
            import hashlib

            tag = hashlib.sha256(f"{model}\0{baseline}".encode()).hexdigest()[:8]
            out = out or Path(cfg.runs_dir) / "eval" / f"{name(model)}-vs-{name(baseline)}-{tag}"
            plan = rounds.standalone_eval_plan(cfg, model, baseline, out)
            manifest = execute(plan, lambda: evaluate.run(cfg, plan), force=force)
        else:
            if len(positional) != 1 or round_ is None:
                fail("give a RUN folder and --round K (or --model A --baseline B --config CONF)")
            run_dir = Path(positional[0])
            conf = run_dir / "config.yaml"
            if not conf.is_file():
                fail(f"{conf}: not found; is {run_dir} a dice run folder?")
            cfg = load_config(conf, ["eval.enabled=true", *overrides])
            if not rounds.evaluates(cfg, round_):
                fail(f"round {round_} has nothing to evaluate: with eval.baseline={cfg.eval.baseline} it would compare "
                     "π_0 with itself (use eval.baseline=previous or a reference-outputs file)")  # fmt: skip
            plan = rounds.plan(cfg, round_, rounds.EVAL_STAGE)
            with run_lock(cfg.run_dir):
                manifest = execute(plan, lambda: evaluate.run(cfg, plan), force=force)
    except typer.Exit:
        raise
    except (ConfigError, ArtifactError, ValueError, RuntimeError, RunLocked) as e:
        if os.environ.get("DICE_DEBUG"):
            raise
        fail(str(e))
    _print_eval(manifest, plan.outputs["eval"])


def _print_eval(manifest: dict[str, Any], path: Path) -> None:
    st = manifest["stats"]
    ci = lambda v: f"  [{v[0]:.3f}, {v[1]:.3f}]" if v else ""  # noqa: E731
    status = "already done, skipped" if manifest.get("skipped") else f"done in {manifest['duration_s']:.1f}s"
    # the status and the two sides on lines of their own (plain print: a terminal's width never folds them)
    print(f"evaluate: {status}")
    print(f"model:    {manifest['inputs']['policy']['path']}")
    print(f"baseline: {st['baseline_path']}")
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("prompts × samples", f"{st['prompts']} × {st['samples']} = {st['rows']} rows ({st['rows_excluded']} excluded"
         + (f": policy {st['rows_excluded_policy']}, baseline {st['rows_excluded_baseline']}, pair {st['rows_excluded_pair']})"
            if "rows_excluded_policy" in st else ")")),
        ("held-out prompts refused (overlap)", st["prompts_overlap"]),
        ("win rate (95% CI)", f"{st['win_rate']:.3f}{ci(st['win_rate_ci'])}"),
        ("LC win rate (95% CI)", f"{st['lc_win_rate']:.3f}{ci(st['lc_win_rate_ci'])}" if st.get("lc_win_rate") is not None
         else st.get("lc_note") or "not identified"),
        ("LC control rows (each side against itself)", st.get("lc_control_rows")),
        ("wins / ties / losses", f"{st['wins']} / {st['ties']} / {st['losses']}"),
        ("mean tokens (model / baseline)", f"{st['mean_tokens']:.1f} / {st['baseline_mean_tokens']:.1f}"),
        ("mean chars (model / baseline)", f"{st['mean_chars']:.1f} / {st['baseline_mean_chars']:.1f}"),
        ("annotators", ", ".join(st["annotators"])),
        ("judged by", "; ".join(st["judged_by"]) if st.get("judged_by") else None),
        ("annotator agreement", st["agreement"]),
        ("comparisons failed", st["comparisons_failed"]),
    ]
    if st.get("metric_mean") is not None:
        rows.append(("python metric (model / baseline)", f"{st['metric_mean']:.4g} / {st['baseline_metric_mean']:.4g}"))
    if st.get("reward_mean") is not None:
        rows.append(("reward model (model / baseline)", f"{st['reward_mean']:.4g} / {st['baseline_reward_mean']:.4g}"))
    for name, value in rows:
        table.add_row(name, _fmt(value, 400))
    console.print(table)
    if st.get("exclusion_warning"):
        console.print(f"[yellow]warning:[/yellow] {st['exclusion_warning']}")
    console.print(f"rows: {path}")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. runs/tiny."),
    out: Optional[Path] = typer.Option(None, help="Output HTML (default: RUN_DIR/report.html)."),
) -> None:
    """Write a self-contained HTML page of plots per round: rewards, lengths, α, agreement, training curves."""
    from pipeline.run.html_report import write_report

    if not run_dir.is_dir():
        err.print(f"[red]error:[/red] {run_dir}: no such run folder")
        raise typer.Exit(2)
    console.print(f"report written to {write_report(run_dir, out)}")


@app.command()
def diff(
    run_dir: Path = typer.Argument(..., help="A run folder."),
    a: int = typer.Argument(..., help="First round."),
    b: int = typer.Argument(..., help="Second round."),
    examples: int = typer.Option(2, help="Example prompts to show with one response from each round."),
) -> None:
    """Compare two rounds: counts, lengths, rewards, α, training results, and how responses changed."""
    from pipeline.run.html_report import round_diff

    for k in (a, b):
        if not (run_dir / f"round-{k}").is_dir():
            err.print(f"[red]error:[/red] {run_dir / f'round-{k}'}: no such round")
            raise typer.Exit(2)
    result = round_diff(run_dir, a, b, examples)
    table = Table(title=f"{run_dir}: round {a} → round {b}")
    for c, j in (("metric", "left"), (f"round {a}", "right"), (f"round {b}", "right"), ("change", "right")):
        table.add_column(c, justify=j)
    for name, (x, y) in result["metrics"].items():
        change = f"{y - x:+.4g}" if isinstance(x, (int, float)) and isinstance(y, (int, float)) else ""
        table.add_row(name, _fmt(x, 24), _fmt(y, 24), change)
    console.print(table)
    shared = result["shared"]
    if shared is None:
        missing = [str(k) for k, n in zip((a, b), result["metrics"]["responses"]) if n is None]
        why = (f"round {missing[0]} has no responses" if len(missing) == 1 else "neither round has responses" if missing
               else "no prompt was answered in both rounds")  # fmt: skip
        console.print(f"{why.capitalize()}: nothing to compare response by response.")
        return
    console.print(
        f"{shared['prompts']} prompts answered in both rounds: their mean response length changed by "
        f"{shared['mean_tokens_change']:+.4g} tokens ({shared['mean_chars_change']:+.4g} chars) from round {a} to round {b}."
    )
    for ex in result["examples"]:  # the shared prompts whose length changed most
        t = Table(title=f"prompt {ex['prompt_id']} (mean length {ex['change']:+.4g} tokens)", show_header=True, expand=True)
        t.add_column(f"round {a} ({ex['a_tokens']} tokens)", overflow="fold", ratio=1)
        t.add_column(f"round {b} ({ex['b_tokens']} tokens)", overflow="fold", ratio=1)
        t.add_row(_fmt(ex["a"], 600), _fmt(ex["b"], 600))
        console.print(f"[bold]{_fmt(ex['prompt'], 300)}[/bold]")
        console.print(t)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. runs/tiny (from any folder: its models are found inside it)."),
    round_: int = typer.Option(..., "--round", help="The round whose training pairs (reference.parquet) to export."),
    fmt: str = typer.Option("trl", "--format", help="trl (Parquet for TRL's DPOTrainer), jsonl, or hf (a save_to_disk folder)."),
    out: Path = typer.Option(..., help="Output file (trl, jsonl) or folder (hf)."),
    skip_inexact: bool = typer.Option(False, "--skip-inexact", help="Leave out (and count) the pairs whose text TRL "
                                      "would tokenise into other ids than dice scored, instead of failing."),
) -> None:
    """Export a round's pairs so another trainer sees exactly the tokens dice scored (docs/data.md, Exporting rounds)."""
    from rich.markup import escape

    from pipeline.data.artifacts import ArtifactError
    from pipeline.run.export import export_round

    if fmt not in ("trl", "jsonl", "hf"):
        err.print(f"[red]error:[/red] --format {fmt!r}: choose trl, jsonl or hf")
        raise typer.Exit(2)
    try:
        done = export_round(run_dir, round_, fmt, out, skip_inexact)  # type: ignore[arg-type]
    except (ArtifactError, ValueError, OSError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    console.print(f"{done['rows']} pairs of {run_dir} round {round_} written to {done['out']} ({fmt}; tokens checked "
                  f"against {done['model']}'s tokenizer)")  # fmt: skip
    if done["skipped"]:
        console.print(f"{done['skipped']} pairs left out: TRL would tokenise them into other ids than dice scored; "
                      f"first: {escape('; '.join(done['skipped_first']))}")  # fmt: skip
    if done.get("max_length"):
        console.print(f"train with DPOConfig(max_length={done['max_length']}) (the run's model.max_length): TRL's "
                      "default of 1024 would cut longer pairs")  # fmt: skip


data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Check the datasets a config reads.")
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    config: Optional[str] = typer.Argument(None, help="YAML preset (default: the embedded tiny preset)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides."),
) -> None:
    """What dice will read before a long run: rows per dataset, the rows it cannot use (counted by reason, the first
    named), token lengths under the policy's chat template (and the first prompt rendered), what would be dropped,
    duplicates, prompt reuse across rounds. Exits 2 when `dice run` would stop on the data."""
    from rich.markup import escape
    from rich.panel import Panel

    from pipeline.data.artifacts import ArtifactError
    from pipeline.run.datacheck import check_data

    cfg = _load(config, overrides)
    try:
        report = check_data(cfg)
    except (ArtifactError, ValueError, OSError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    for name, r in report.datasets.items():
        table = Table(title=escape(f"{name}: {r['source']}"), show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value", overflow="fold")
        for key, value in r.items():
            if key != "source":
                table.add_row(escape(key), escape(_fmt(value, 2000) if not isinstance(value, dict) else
                                                  ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())))  # fmt: skip
        console.print(table)
    if report.rendered is not None:
        console.print(Panel(escape(report.rendered), title="the first prompt as the policy sees it (chat template applied)",
                            expand=False))  # fmt: skip
    for line in report.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(line)}")
    for line in report.errors:
        err.print(f"[red]error:[/red] {escape(line)}")
    if report.errors:
        raise typer.Exit(2)


@app.command("tiny-model")
def tiny_model(
    path: Path = typer.Argument(..., help="Output folder."),
    data: Optional[list[Path]] = typer.Option(None, help="JSONL files for the tokenizer and the short supervised pass (default: the shipped data)."),
    hidden: int = typer.Option(128, help="Hidden size."),
    intermediate: int = typer.Option(256, help="MLP size."),
    layers: int = typer.Option(2, help="Decoder layers."),
    heads: int = typer.Option(4, help="Attention heads (hidden/heads >= 32 for vLLM's CPU attention)."),
    kv_heads: int = typer.Option(2, help="Key/value heads."),
    vocab: int = typer.Option(2048, help="BPE vocabulary size."),
    sft_steps: int = typer.Option(300, help="Supervised steps on the offline set's chosen answers (0: random weights)."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Build a small offline Llama-architecture chat model and tokenizer (safetensors) at PATH."""
    from pipeline.run.tiny import TinySpec, build_tiny_model

    if hidden % heads or hidden // heads < 32:
        err.print(f"[red]error:[/red] hidden/heads = {hidden}/{heads} must be an integer >= 32 (vLLM CPU attention)")
        raise typer.Exit(2)
    files = data or [Path("data/prompts.jsonl"), Path("data/offline_prefs.jsonl")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        err.print(f"[red]error:[/red] data file(s) not found: {', '.join(missing)}")
        raise typer.Exit(2)
    spec = TinySpec(vocab_size=vocab, hidden=hidden, intermediate=intermediate, layers=layers, heads=heads,
                    kv_heads=kv_heads, sft_steps=sft_steps, seed=seed)  # fmt: skip
    out = build_tiny_model(path, files, spec)
    console.print(f"tiny model written to {out}")


@app.command("plan")
def plan_memory(
    config: str = typer.Argument(..., help="YAML preset, e.g. conf/recipes/gpu/dice.yaml."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.micro_batch_size=1."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="GPUs of the machine (default: the visible ones)."),
    gpu_memory: Optional[float] = typer.Option(
        None, "--gpu-memory", min=0.01, help="Memory of each GPU in GiB, e.g. 80 (default: the visible GPUs')."
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the plan to this file as JSON."),
) -> None:
    """Plan each stage's memory per GPU from the models' config.json alone (no weights read): weights, gradients,
    optimizer states, activations, KV cache. Exits 1 when a stage cannot fit, naming the change that would."""
    import json

    from rich.markup import escape

    from pipeline.compute import memory
    from pipeline.run import rounds

    cfg = _load(config, overrides)
    if gpus is None or gpu_memory is None:
        seen, size = memory.device_memory(cfg.model_copy(update={"gpu_memory_gib": gpu_memory}))
        if size is None or not seen and gpus is None:
            err.print("[red]error:[/red] no CUDA GPU here: give --gpus N and --gpu-memory GIB (e.g. --gpus 8 --gpu-memory 80)")
            raise typer.Exit(2)
        gpus, gpu_memory = gpus or seen, gpu_memory or size / memory.GIB
    device = int(gpu_memory * memory.GIB)
    try:
        shapes = memory.read_shapes(cfg)
    except ValueError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    stages = [s for k in (0, 1) for s in rounds.stages_of_round(cfg, k) if s in memory.GPU_STAGES]
    plans = [memory.plan_stage(cfg, s, gpus, device, shapes) for s in dict.fromkeys(stages)]
    for name, shape in shapes.items():
        console.print(f"model {name}: {shape.params / 1e9:.2f}B parameters ({shape.layers} layers, hidden "
                      f"{shape.hidden}, vocabulary {shape.vocab:,})")  # fmt: skip
    for sp in plans:
        if not sp.estimates:
            continue
        table = Table(title=f"{sp.stage}: GiB per GPU ({gpus} × {gpu_memory:g} GiB)")
        table.add_column("")
        for e in sp.estimates:
            table.add_column(escape(e.what), justify="right", overflow="fold")
        parts = list(dict.fromkeys(k for e in sp.estimates for k in e.parts))
        for part in parts:
            table.add_row(part, *[f"{e.parts[part] / memory.GIB:.1f}" if part in e.parts else "" for e in sp.estimates])
        table.add_row("total", *[f"{e.total / memory.GIB:.1f}" for e in sp.estimates])
        table.add_row("fits", *["yes" if e.fits else "NO" for e in sp.estimates])
        console.print(table)
    failed = [sp for sp in plans if not sp.fits]
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({
            "gpus": gpus, "gpu_memory_gib": gpu_memory,
            "models": {n: {"params": s.params, "largest_layer": s.largest_layer} for n, s in shapes.items()},
            "stages": [{"stage": sp.stage, "fits": sp.fits, "fix": sp.fix, "fix_labels": sp.fix_labels,
                        "message": None if sp.fits else sp.message(),
                        "estimates": [e.as_dict() for e in sp.estimates]} for sp in plans],
        }, indent=1))  # fmt: skip
    for sp in failed:
        err.print(f"[red]{escape(sp.message())}[/red]")
    if failed:
        raise typer.Exit(1)
    console.print(f"every stage fits on {gpus} × {gpu_memory:g} GiB")


if __name__ == "__main__":
    app()
    sys.exit(0)
