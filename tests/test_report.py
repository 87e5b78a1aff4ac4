"""`dice report`, `dice inspect --sql` and `dice diff` on a run folder written by hand.

The fake run has the real schemas and minimal stage manifests (round 0: offline pairs and training; rounds 1
and 2: every stage, evaluation included), so these tests need neither vLLM nor DeepSpeed. Round 1's pairs have one annotator
(DICE's implicit reward), round 2's have several, so both kinds of label-agreement plot are drawn. The HTML
is opened in headless Chromium, which must decode every plot; without Chromium that test is skipped
(.ci/run installs it).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows import cli
from flows.cli import app
from pipeline.data import schemas
from pipeline.data.artifacts import MANIFEST_DIR, write_json_atomic, write_parquet
from pipeline.run.html_report import build_report, round_diff, round_markdown
from tests.conftest import CHROMIUM, headless_chromium

PLOTS = ("rewards", "lengths", "pair-lengths", "agreement", "training")
EXPECTED = ["plot-eval", "plot-alpha", "plot-round0-training"] + [
    f"plot-round{k}-{p}" for k in (1, 2) for p in PLOTS
]

# Prompts p00..p11 in round 1, p06..p17 in round 2: six prompts are answered in both rounds.
ROUND_PROMPTS = {1: range(12), 2: range(6, 18)}
K = 4  # responses per prompt


def _manifest(
    rd: Path, stage: str, outputs: dict[str, Path], stats: dict, config: dict | None = None
) -> None:
    """A stage manifest as pipeline.data.artifacts.execute writes it (the fields the report reads)."""
    write_json_atomic(
        rd / MANIFEST_DIR / f"{stage}.json",
        {
            "stage": stage,
            "round": int(rd.name.split("-")[1]),
            "inputs": {},
            "outputs": {
                n: {"path": str(p), "rows": pq.read_metadata(p).num_rows} for n, p in outputs.items()
            },
            "config": config or {},
            "config_digest": "fake",
            "roles": {},
            "stats": stats,
            "started_at": "2026-01-01T00:00:00Z",
            "duration_s": 1.0,
        },
    )


def _train(rd: Path, rng: np.random.Generator, steps: int, pairs: int) -> None:
    m = pd.DataFrame({
        "step": np.arange(steps), "epoch": np.arange(steps) / steps,
        "loss": np.linspace(0.69, 0.4, steps) + rng.normal(0, 0.02, steps),
        "chosen_reward": rng.normal(0.1, 0.05, steps), "rejected_reward": rng.normal(-0.1, 0.05, steps),
        "margin": np.linspace(0, 0.8, steps), "accuracy": rng.uniform(0.4, 1, steps),
        "grad_norm": rng.uniform(1, 2, steps), "learning_rate": np.full(steps, 1e-5),
        "tokens": np.full(steps, 2048), "tokens_per_s": np.full(steps, 5000.0), "seconds": np.full(steps, 0.4),
    })  # fmt: skip
    path = rd / "train_metrics.parquet"
    write_parquet(pa.Table.from_pandas(m), path, schemas.TRAIN_METRICS)
    (rd / "checkpoint").mkdir(exist_ok=True)
    last = m.iloc[-1]
    _manifest(rd, "train", {"metrics": path}, {"pairs": pairs, "steps": steps, "final_loss": float(last.loss),
              "final_accuracy": float(last.accuracy), "final_margin": float(last.margin), "tokens_per_s": 5000.0})  # fmt: skip


def _reference(rd: Path, pairs: pd.DataFrame, rng: np.random.Generator) -> None:
    ref = pairs.assign(
        chosen_tokens=rng.integers(5, 60, len(pairs)), rejected_tokens=rng.integers(5, 60, len(pairs)),
        ref_chosen_logps=rng.normal(-40, 5, len(pairs)), ref_rejected_logps=rng.normal(-45, 5, len(pairs)),
    )  # fmt: skip
    path = rd / "reference.parquet"
    write_parquet(pa.Table.from_pandas(ref, preserve_index=False), path, schemas.REFERENCE)
    _manifest(rd, "reference", {"reference": path}, {"pairs": len(ref)})


def _offline(k: int, n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "pair_id": [f"off-{i}" for i in range(n)], "prompt_id": [f"off-{i}" for i in range(n)],
        "prompt": [f"offline prompt {i}" for i in range(n)], "chosen": ["good answer"] * n,
        "rejected": ["bad"] * n, "source": ["offline"] * n, "chosen_reward": [None] * n,
        "rejected_reward": [None] * n, "chosen_len": [None] * n, "rejected_len": [None] * n, "alpha": [None] * n,
        "preference": [1.0] * n, "annotators": [1] * n, "round": [k] * n,
    })  # fmt: skip


def _dice_round(run_dir: Path, k: int, rng: np.random.Generator) -> None:
    rd = run_dir / f"round-{k}"
    rows = []
    for p in ROUND_PROMPTS[k]:
        for s in range(K):
            n_tok = (
                int(rng.integers(10, 120)) if k == 1 else int(rng.integers(5, 80))
            )  # round 2 answers shorter
            text = " ".join(["word"] * n_tok) + f" (prompt {p}, round {k}, sample {s})"
            rows.append({
                "prompt_id": f"p{p:02d}", "prompt": f"Question number {p}?", "sample_idx": s, "response": text,
                "num_tokens": n_tok, "num_chars": len(text), "finish_reason": "length" if n_tok > 110 else "stop",
                "cumulative_logprob": -float(n_tok), "seed": 1000 + p, "model": f"pi_{k - 1}", "round": k,
            })  # fmt: skip
    resp = pd.DataFrame(rows)
    write_parquet(pa.Table.from_pandas(resp), rd / "responses.parquet", schemas.RESPONSES)
    n_cut = int((resp.finish_reason == "length").sum())
    _manifest(rd, "generate", {"responses": rd / "responses.parquet"},
              {"prompts": resp.prompt_id.nunique(), "responses": len(resp), "finish_length": n_cut,
               "mean_tokens": float(resp.num_tokens.mean())})  # fmt: skip

    labels = resp.assign(
        policy_logp=rng.normal(-50, 5, len(resp)), reference_logp=rng.normal(-50, 5, len(resp))
    )
    labels["reward"] = 0.1 * (labels.policy_logp - labels.reference_logp)
    labels.loc[0, "reward"] = np.nan  # one response could not be scored
    labels = labels.assign(labeller="implicit_reward", label_error=[None] * len(labels))
    labels.loc[0, "label_error"] = "too_long"
    write_parquet(pa.Table.from_pandas(labels), rd / "labels.parquet", schemas.LABELS)
    scored = labels.reward.dropna()
    _manifest(rd, "label", {"labels": rd / "labels.parquet"},
              {"responses": len(labels), "reward_mean": float(scored.mean()), "reward_std": float(scored.std(ddof=0))})  # fmt: skip

    gen = []
    for pid, g in labels[labels.reward.notna() & (labels.finish_reason == "stop")].groupby("prompt_id"):
        if len(g) < 2:
            continue
        w, l_ = g.loc[g.reward.idxmax()], g.loc[g.reward.idxmin()]
        annotators = 1 if k == 1 else 5
        gen.append({
            "pair_id": f"r{k}-{pid}", "prompt_id": pid, "prompt": w.prompt, "chosen": w.response, "rejected": l_.response,
            "source": "generated", "chosen_reward": w.reward, "rejected_reward": l_.reward,
            "chosen_len": w.num_tokens, "rejected_len": l_.num_tokens, "alpha": 0.002 * k,
            "preference": 1.0 if k == 1 else float(rng.choice([0.6, 0.8, 1.0])), "annotators": annotators, "round": k,
        })  # fmt: skip
    gen = pd.DataFrame(gen)
    pairs = pd.concat([gen, _offline(k, 4)], ignore_index=True)
    write_parquet(pa.Table.from_pandas(pairs), rd / "pairs.parquet", schemas.PAIRS)
    gap = float((gen.chosen_len - gen.rejected_len).mean())
    _manifest(rd, "pairs", {"pairs": rd / "pairs.parquet"},
              {"alpha": 0.002 * k, "length_gap_alpha0": gap + 10.0, "length_gap": gap, "pairs_generated": len(gen),
               "pairs_offline": 4, "mean_chosen_len": float(gen.chosen_len.mean()),
               "mean_rejected_len": float(gen.rejected_len.mean())},
              {"pairs": {"length_unit": "tokens"}})  # fmt: skip
    _reference(rd, pairs, rng)
    _train(rd, rng, steps=6, pairs=len(pairs))
    _evaluate(rd, k, rng)
    write_json_atomic(rd / "manifest.json", {"round": k})


def _evaluate(rd: Path, k: int, rng: np.random.Generator) -> None:
    """eval.parquet and the evaluate manifest: 10 held-out prompts × 2 samples against π_0, one judge; the stats are
    computed with the real metric functions (round 2 wins more and answers longer)."""
    from pipeline.method import evaluation

    n = 20
    pids = [f"e{i // 2:02d}" for i in range(n)]
    tokens, base_tokens = rng.integers(20, 60, n) + 10 * k, rng.integers(20, 60, n)
    p = np.clip(rng.normal(0.45 + 0.1 * k, 0.2, n), 0, 1)
    ev = pd.DataFrame({
        "prompt_id": pids, "prompt": [f"Held-out {q}?" for q in pids], "sample_idx": [i % 2 for i in range(n)],
        "response": ["x " * t for t in tokens], "baseline_response": ["y " * t for t in base_tokens],
        "tokens": tokens, "baseline_tokens": base_tokens, "chars": 2 * tokens, "baseline_chars": 2 * base_tokens,
        "finish_reason": ["stop"] * n, "baseline_finish_reason": ["stop"] * n, "seed": np.arange(n), "p": p,
        "annotators": [1] * n, "metric": [None] * n, "baseline_metric": [None] * n, "reward": [None] * n,
        "baseline_reward": [None] * n, "model": [f"pi_{k}"] * n, "baseline": ["pi_0"] * n, "round": [k] * n,
        "p_judge": p, "error_judge": [None] * n,
    })  # fmt: skip
    schema = schemas.eval_schema(["judge"])
    write_parquet(pa.Table.from_pandas(ev, preserve_index=False), rd / "eval.parquet", schema)
    lc = evaluation.length_controlled(p, ev.chars, ev.baseline_chars)
    _manifest(rd, "evaluate", {"eval": rd / "eval.parquet"}, {
        "baseline": "π_0", "win_rate": float(p.mean()), "win_rate_ci": list(evaluation.win_rate_interval(p, pids, 200)),
        "lc_win_rate": lc.lc_win_rate, "lc_win_rate_ci": list(evaluation.lc_interval(p, ev.chars, ev.baseline_chars, pids, 200)),
        "mean_tokens": float(tokens.mean()), "baseline_mean_tokens": float(base_tokens.mean()),
        "mean_chars": float(2 * tokens.mean()), "baseline_mean_chars": float(2 * base_tokens.mean()),
        "agreement": None, "comparisons_failed": 0,
    })  # fmt: skip


def make_run(run_dir: Path) -> Path:
    rng = np.random.default_rng(0)
    rd0 = run_dir / "round-0"
    pairs = _offline(0, 16)
    write_parquet(pa.Table.from_pandas(pairs), rd0 / "pairs.parquet", schemas.PAIRS)
    _manifest(
        rd0,
        "pairs",
        {"pairs": rd0 / "pairs.parquet"},
        {"pairs": 16, "pairs_offline": 16, "pairs_generated": 0},
    )
    _reference(rd0, pairs, rng)
    _train(rd0, rng, steps=10, pairs=16)
    write_json_atomic(rd0 / "manifest.json", {"round": 0})
    for k in (1, 2):
        _dice_round(run_dir, k, rng)
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("report") / "runs" / "fake")


def _cli(*args: str):
    # the CLI's consoles took their width when flows.cli was imported (from this shell's terminal or COLUMNS);
    # a wide one here, whatever the terminal running the tests, so table cells are not folded mid-phrase
    widths = cli.console.width, cli.err.width
    cli.console.width = cli.err.width = 200
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        cli.console.width, cli.err.width = widths


# ---------------------------------------------------------------------------------------------- report


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (.ci/run installs it: apt-get install chromium)"
)
def test_report_renders_every_plot_in_headless_chromium(run_dir, tmp_path):
    out = tmp_path / "report.html"
    res = _cli("report", str(run_dir), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert out.is_file()

    # --virtual-time-budget lets the load event (and the page's counting script) run before the DOM is dumped
    dom = headless_chromium("--virtual-time-budget=10000", "--dump-dom", out.as_uri(), profile=tmp_path / "p1").stdout
    body = re.search(r"<body\b[^>]*>", dom)
    assert body, dom[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
    assert int(attrs["data-plots"]) == len(EXPECTED)
    assert int(attrs["data-plots-loaded"]) == len(EXPECTED)  # every <img> decoded, naturalWidth > 0
    imgs = dict(re.findall(r'<img id="([\w-]+)" alt="([^"]+)"', dom))
    assert sorted(imgs) == sorted(EXPECTED)
    assert all(alt for alt in imgs.values())

    shot = tmp_path / "report.png"
    headless_chromium(
        "--hide-scrollbars",
        "--window-size=1280,3000",
        f"--screenshot={shot}",
        out.as_uri(),
        profile=tmp_path / "p2",
    )
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_report_is_self_contained_with_a_caption_per_plot(run_dir):
    res = _cli("report", str(run_dir))
    assert res.exit_code == 0, res.output
    page = (run_dir / "report.html").read_text()  # the default --out
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from the network
    assert "<link" not in page and "<script src" not in page
    for plot_id in EXPECTED:
        figure = re.search(
            rf"<img id='{plot_id}'[^>]*src='data:image/png;base64,[^']+'>\s*<figcaption>(.*?)</figcaption>",
            page,
        )
        assert figure and len(figure.group(1)) > 40, plot_id
    assert "plot-round0-rewards" not in page and "generates nothing" in page  # round 0 has no responses
    assert "no inter-annotator agreement" in page  # round 1: one annotator per pair, said so
    assert "have several annotators" in page  # round 2
    assert "<th>round 2</th>" in page and "final_loss" in page  # the summary table
    assert "<td>lc_win_rate</td>" in page and "<td>win_rate_ci</td>" in page
    assert "round 2 vs π_0: win" in page  # the evaluation plot's caption gives every round's numbers


def test_round_in_progress_shows_the_plots_its_files_allow(run_dir, tmp_path):
    run = tmp_path / "fake"
    shutil.copytree(run_dir, run)
    rd = run / "round-2"
    for f in (
        "labels.parquet",
        "pairs.parquet",
        "reference.parquet",
        "train_metrics.parquet",
        "manifest.json",
    ):
        (rd / f).unlink()
    for f in ("label", "pairs", "reference", "train"):
        (rd / MANIFEST_DIR / f"{f}.json").unlink()
    _, plots = build_report(run)
    assert [p.id for p in plots if "round2" in p.id] == [
        "plot-round2-lengths"
    ]  # from responses.parquet alone


def test_round_markdown_embeds_the_rounds_plots(run_dir):
    md = round_markdown(run_dir, 1, run_dir / "report.html")
    assert md.count("](data:image/png;base64,") == len(PLOTS) + 1  # and the evaluation across rounds
    assert "## Evaluation" in md
    assert str((run_dir / "report.html").resolve()) in md
    assert round_markdown(run_dir, 0, run_dir / "report.html").count("![") == 1  # training only


def test_publish_round_writes_the_report_and_a_markdown_artifact(run_dir, tmp_path):
    """The flow's publish_round (under prefect_test_harness, no stage run): the table artifact, then the
    report rewritten and the round's plots as a markdown artifact."""
    from prefect import flow
    from prefect.artifacts import Artifact
    from prefect.testing.utilities import prefect_test_harness

    from flows.dice import _artifact_key, publish_round
    from pipeline.config import load_config
    from tests.conftest import REPO

    shutil.copytree(run_dir, tmp_path / "runs" / "fake")
    cfg = load_config(REPO / "conf/tiny.yaml", [f"runs_dir={tmp_path / 'runs'}", "name=fake"])
    with prefect_test_harness(server_startup_timeout=120):
        flow(name="publish")(publish_round)(cfg, 1)
        table, plots = (
            Artifact.get(_artifact_key("fake", 1)),
            Artifact.get(_artifact_key("fake", 1) + "-plots"),
        )
    assert table.type == "table" and plots.type == "markdown"
    assert plots.data.count("](data:image/png;base64,") == len(PLOTS) + 1
    assert (
        str((cfg.run_dir / "report.html").resolve()) in plots.data and (cfg.run_dir / "report.html").is_file()
    )


# ---------------------------------------------------------------------------------------------- --sql


def test_sql_views_are_the_union_of_rounds_with_a_round_column(run_dir):
    for view, file in (("responses", "responses"), ("labels", "labels"), ("pairs", "pairs"),
                       ("reference", "reference"), ("train_metrics", "train_metrics"), ("eval", "eval")):  # fmt: skip
        res = _cli(
            "inspect",
            str(run_dir),
            "--sql",
            f"select round, count(*) as n from {view} group by round order by round",
        )
        assert res.exit_code == 0, res.output
        expected = {
            int(p.parent.name.split("-")[1]): pq.read_metadata(p).num_rows
            for p in run_dir.glob(f"round-*/{file}.parquet")
        }
        got = {int(k): int(n) for k, n in re.findall(r"│\s*(\d+)\s*│\s*(\d+)\s*│", res.stdout)}
        assert got == expected, (view, res.stdout)


def test_sql_errors_exit_2_with_a_message(run_dir):
    bad = _cli("inspect", str(run_dir), "--sql", "select * from nonsense")
    assert bad.exit_code == 2
    assert "nonsense" in bad.stderr and "train_metrics" in bad.stderr  # names the missing table and the views
    syntax = _cli("inspect", str(run_dir), "--sql", "selec round from pairs")
    assert syntax.exit_code == 2 and "syntax error" in syntax.stderr.lower()
    both = _cli("inspect", str(run_dir), "--round", "1", "--sql", "select 1")
    assert both.exit_code == 2 and "where round" in both.stderr


# ---------------------------------------------------------------------------------------------- diff


def test_diff_numbers_match_pandas(run_dir):
    result = round_diff(run_dir, 1, 2, examples=3)
    m = result["metrics"]
    for i, k in enumerate((1, 2)):
        rd = run_dir / f"round-{k}"
        lab = pd.read_parquet(rd / "labels.parquet")
        pairs = pd.read_parquet(rd / "pairs.parquet")
        gen = pairs[pairs.source == "generated"]
        tm = pd.read_parquet(rd / "train_metrics.parquet").sort_values("step")
        expected = {
            "prompts": lab.prompt_id.nunique(), "responses": len(lab),
            "cut_at_limit": int((lab.finish_reason == "length").sum()),
            "mean_tokens": lab.num_tokens.mean(), "median_tokens": lab.num_tokens.median(),
            "mean_chars": lab.num_chars.mean(), "median_chars": lab.num_chars.median(),
            "reward_mean": lab.reward.mean(), "reward_std": lab.reward.std(ddof=0),
            "pairs": len(pairs), "pairs_generated": len(gen), "pairs_offline": len(pairs) - len(gen),
            "chosen_len": gen.chosen_len.mean(), "rejected_len": gen.rejected_len.mean(), "alpha": 0.002 * k,
            "train_steps": len(tm), "final_loss": tm.loss.iloc[-1], "final_accuracy": tm.accuracy.iloc[-1],
            "final_margin": tm.margin.iloc[-1],
        }  # fmt: skip
        for name, value in expected.items():
            assert m[name][i] == pytest.approx(value), (k, name)
        ev = json.loads((rd / ".dice/evaluate.json").read_text())["stats"]
        assert m["win_rate"][i] == ev["win_rate"] and m["lc_win_rate"][i] == ev["lc_win_rate"]
        assert m["eval_tokens"][i] == pytest.approx(pd.read_parquet(rd / "eval.parquet").tokens.mean())
        stats = json.loads((rd / ".dice/pairs.json").read_text())["stats"]
        assert (
            m["length_gap"][i] == stats["length_gap"]
            and m["length_gap_alpha0"][i] == stats["length_gap_alpha0"]
        )

    a, b = (
        pd.read_parquet(run_dir / f"round-{k}/labels.parquet").groupby("prompt_id").num_tokens.mean()
        for k in (1, 2)
    )
    change = (b - a).dropna()  # prompts answered in both rounds
    assert result["shared"]["prompts"] == len(change) == 6
    assert result["shared"]["mean_tokens_change"] == pytest.approx(change.mean())
    top = change.abs().sort_values(ascending=False).index[:3]
    assert [e["prompt_id"] for e in result["examples"]] == list(top)
    ex = result["examples"][0]
    assert (
        f"prompt {int(ex['prompt_id'][1:])}, round 1, sample 0" in ex["a"]
    )  # the first sample of each round
    assert f"prompt {int(ex['prompt_id'][1:])}, round 2, sample 0" in ex["b"]


def test_diff_cli_prints_both_rounds(run_dir):
    res = _cli("diff", str(run_dir), "1", "2")
    assert res.exit_code == 0, res.output
    result = round_diff(run_dir, 1, 2)
    (t1, t2), (l1, l2) = result["metrics"]["mean_tokens"], result["metrics"]["final_loss"]
    for v in (t1, t2, t2 - t1, l1, l2):
        assert f"{abs(v):.4g}" in res.stdout
    assert "6 prompts answered in both rounds" in res.stdout
    assert "round 1, sample 0" in res.stdout and "round 2, sample 0" in res.stdout

    zero = _cli("diff", str(run_dir), "0", "1")  # round 0 has no responses
    assert zero.exit_code == 0 and "Round 0 has no responses" in zero.stdout
    missing = _cli("diff", str(run_dir), "1", "9")
    assert missing.exit_code == 2 and "round-9" in missing.stderr
