"""A run's rounds for people: one self-contained HTML page of plots (`dice report`, the flow's round
artifacts) and a side-by-side comparison of two rounds (`dice diff`).

Everything on the page is inline (CSS, PNG plots as data URIs, one small script), so it opens offline,
attached to an email or from a Prefect artifact. Per round: the reward and length distributions of the
responses, chosen vs rejected lengths, label agreement and the training curves; across rounds: the evaluation
(win rate and length-controlled win rate against the baseline, with their intervals, and both sides' response
length) and α with the length gap it removes. Every number is read from the round's Parquet files and stage manifests, so a
round in progress (or round 0, which generates nothing) shows the plots its files allow.
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.run.report import round_dirs, round_summary, run_summary, stage_manifests

# Paul Tol's colour-blind-safe palette
BLUE, GREEN, RED, PURPLE, GREY = "#4477aa", "#228833", "#ee6677", "#aa3377", "#bbbbbb"


class ReportError(ValueError):
    """A round's file could not be read for the report; the page shows the message in place of the plots."""


@dataclass(frozen=True)
class Plot:
    id: str  # stable element id, e.g. "plot-round1-rewards": tests and links rely on it
    title: str
    caption: str  # what the plot shows and how to read it, with the numbers behind it
    alt: str
    png: bytes

    @property
    def width(self) -> int:
        return int.from_bytes(self.png[16:20], "big")  # the PNG header's IHDR width, in pixels

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()


def _figure(ncols: int = 1):
    # matplotlib's object API, not pyplot: no global figure state, safe inside a Prefect worker's threads
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6 if ncols == 1 else 3.2 * ncols, 3.0), dpi=100)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _counts(ax) -> None:
    """Whole numbers on a histogram's count axis."""
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _pi(j: int) -> str:
    """π_j with a subscript index, e.g. π₋₁."""
    return "π" + str(j).translate(str.maketrans("-0123456789", "₋₀₁₂₃₄₅₆₇₈₉"))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")  # a bare Figure renders with the Agg canvas
    return buf.getvalue()


def _read(path: Path, columns: list[str] | None = None) -> dict[str, np.ndarray] | None:
    """A Parquet file as numpy columns (nulls are NaN in numeric columns), or None when it is not there.

    numpy rather than pandas: pandas is not among dice's base dependencies.
    """
    if not path.is_file():
        return None
    try:
        t = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:  # a damaged file: the page says so instead of failing
        raise ReportError(f"{path.name} could not be read ({type(e).__name__}: {e})") from None
    return {c: t.column(c).to_numpy() for c in t.column_names}


def responses_of(round_dir: Path) -> dict[str, np.ndarray] | None:
    """The round's responses (labels.parquet when labelled, else responses.parquet), or None."""
    for name in ("labels.parquet", "responses.parquet"):
        cols = _read(
            round_dir / name,
            ["num_tokens", "num_chars", "finish_reason"] + (["reward"] if name == "labels.parquet" else []),
        )
        if cols is not None:
            return cols
    return None


def _where(cols: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {c: v[mask] for c, v in cols.items()}


def _length_unit(round_dir: Path) -> str:
    cfg = stage_manifests(round_dir).get("pairs", {}).get("config", {})
    return (cfg.get("pairs") or {}).get("length_unit", "tokens")


def _g(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3g}"


# ---------------------------------------------------------------------------------------------- plots


def round_plots(round_dir: Path) -> list[Plot]:
    """The plots one round's files allow (round 0 has no responses; a round in progress has fewer files)."""
    k = int(round_dir.name.split("-")[1])
    plots: list[Plot] = []
    resp = responses_of(round_dir)
    n = len(resp["num_tokens"]) if resp is not None else 0
    if n and "reward" in resp and np.isfinite(resp["reward"]).any():
        r = resp["reward"][np.isfinite(resp["reward"])]
        fig, ax = _figure()
        ax.hist(r, bins=30, color=BLUE)
        ax.axvline(r.mean(), color="black", lw=1, ls="--", label=f"mean {r.mean():.3g}")
        ax.set(xlabel="reward", ylabel="responses", title=f"round {k}: rewards of the responses")
        _counts(ax)
        ax.legend()
        plots.append(Plot(
            f"plot-round{k}-rewards", "Rewards",
            f"The label of each of the {len(r)} scored responses (mean {r.mean():.3g}, std {r.std():.3g}"
            + (f"; {n - len(r)} could not be scored" if n > len(r) else "") + "). DICE's implicit reward "
            f"β·[logp({_pi(k - 1)}) − logp({_pi(k - 2)})]: how far the last round moved the policy towards the response.",
            f"Histogram of the rewards of round {k}'s responses", _png(fig),
        ))  # fmt: skip
    if n:
        tokens, cut = resp["num_tokens"], resp["finish_reason"] == "length"
        fig, ax = _figure()
        bins = np.histogram_bin_edges(tokens, bins=30)
        for label, mask, color in (("stop", ~cut, GREEN), ("cut at the limit", cut, RED)):
            if mask.any():
                ax.hist(
                    tokens[mask], bins=bins, alpha=0.75, color=color, label=f"{label} ({int(mask.sum())})"
                )
        ax.set(xlabel="tokens", ylabel="responses", title=f"round {k}: response lengths")
        _counts(ax)
        ax.legend()
        plots.append(Plot(
            f"plot-round{k}-lengths", "Response lengths",
            f"Generated tokens of each of the {n} responses (mean {tokens.mean():.3g}, median "
            f"{np.median(tokens):.3g}); "
            + (f"{int(cut.sum())} were cut at the token limit (red) and are dropped before pairing." if cut.any()
               else "none was cut at the token limit."),
            f"Histogram of the token counts of round {k}'s responses", _png(fig),
        ))  # fmt: skip
    pairs = _read(round_dir / "pairs.parquet")
    gen = _where(pairs, pairs["source"] == "generated") if pairs is not None else None
    if gen is not None and np.isfinite(gen["chosen_len"] + gen["rejected_len"]).any():
        unit = _length_unit(round_dir)
        ok = np.isfinite(gen["chosen_len"] + gen["rejected_len"])
        cl, rl = gen["chosen_len"][ok], gen["rejected_len"][ok]
        fig, (ax, ax2) = _figure(2)
        ax.scatter(rl, cl, s=12, color=PURPLE, alpha=0.7)
        lim = float(max(cl.max(), rl.max())) * 1.05
        ax.plot([0, lim], [0, lim], color=GREY, lw=1)
        ax.set(xlabel=f"rejected ({unit})", ylabel=f"chosen ({unit})", title="one dot per pair")
        bins = np.histogram_bin_edges(np.concatenate([cl, rl]), bins=20)
        ax2.hist(cl, bins=bins, alpha=0.6, color=GREEN, label="chosen")
        ax2.hist(rl, bins=bins, alpha=0.6, color=RED, label="rejected")
        ax2.set(xlabel=unit, ylabel="pairs", title="lengths")
        _counts(ax2)
        ax2.legend()
        fig.suptitle(f"round {k}: chosen vs rejected lengths", fontsize=10)
        plots.append(Plot(
            f"plot-round{k}-pair-lengths", "Chosen vs rejected lengths",
            f"The {len(cl)} generated pairs: mean chosen {cl.mean():.3g} vs rejected {rl.mean():.3g} {unit}; "
            f"the chosen response is the longer one in {int((cl > rl).sum())} pairs and the shorter in "
            f"{int((cl < rl).sum())}. Above the diagonal the chosen response is longer; length debiasing (α) aims "
            "for a mean gap of about 0.",
            f"Scatter and histograms of chosen and rejected lengths in round {k}", _png(fig),
        ))  # fmt: skip
        plots.append(_agreement_plot(k, gen))
    m = _read(round_dir / "train_metrics.parquet", ["step", "loss", "accuracy", "margin"])
    if m is not None and len(m["step"]):
        order = np.argsort(m["step"], kind="stable")
        m = _where(m, order)
        steps = m["step"] + 1
        fig, axes = _figure(3)
        for ax, col, color in zip(axes, ("loss", "accuracy", "margin"), (BLUE, GREEN, RED)):
            ax.plot(steps, m[col], color=color, marker="." if len(steps) < 30 else None)
            ax.set(xlabel="optimizer step", title=col)
        axes[1].set_ylim(-0.05, 1.05)
        fig.suptitle(f"round {k}: training", fontsize=10)
        plots.append(Plot(
            f"plot-round{k}-training", "Training",
            f"Per optimizer step ({len(steps)} steps): preference loss, accuracy (share of pairs whose chosen "
            f"implicit reward beats the rejected one) and reward margin. Last step: loss {m['loss'][-1]:.3g}, "
            f"accuracy {m['accuracy'][-1]:.3g}, margin {m['margin'][-1]:.3g}.",
            f"Loss, accuracy and margin per training step in round {k}", _png(fig),
        ))  # fmt: skip
    return plots


def _agreement_plot(k: int, gen: dict[str, np.ndarray]) -> Plot:
    """Annotator agreement where pairs have several annotators; otherwise how often the raw rewards agree."""
    multi = gen["annotators"] > 1
    fig, ax = _figure()
    if multi.any():
        pref = gen["preference"][multi]
        agree = np.maximum(pref, 1 - pref)  # share of annotators on the majority's side
        ax.hist(agree, bins=np.linspace(0.5, 1, 11), color=GREEN)
        ax.set(xlabel="share of annotators agreeing", ylabel="pairs", title=f"round {k}: label agreement")
        _counts(ax)
        caption = (f"{int(multi.sum())} of the {len(multi)} generated pairs have several annotators (mean "
                   f"{gen['annotators'][multi].mean():.3g}); mean agreement {agree.mean():.3g}, where 1 is unanimous "
                   "and 0.5 an even split.")  # fmt: skip
        return Plot(f"plot-round{k}-agreement", "Label agreement", caption,
                    f"Histogram of annotator agreement in round {k}", _png(fig))  # fmt: skip
    margin = gen["chosen_reward"] - gen["rejected_reward"]
    margin = margin[
        np.isfinite(margin)
    ]  # pairs without rewards (a labeller that gives none) have nothing to show
    share = float((margin > 0).mean()) if len(margin) else float("nan")
    if len(margin):
        ax.hist(margin, bins=30, color=GREEN)
    else:
        ax.text(0.5, 0.5, "no rewards recorded on these pairs", ha="center", transform=ax.transAxes)
    ax.axvline(0, color="black", lw=1)
    _counts(ax)
    ax.set(xlabel="chosen reward − rejected reward", ylabel="pairs",
           title=f"round {k}: chosen reward > rejected in {share:.0%}" if len(margin) else f"round {k}: rewards")  # fmt: skip
    caption = (
        "These pairs have one annotator each (annotators = 1: the implicit reward), so there is no "
        "inter-annotator agreement to show. Shown instead: the reward margin of each generated pair; "
        + (f"{share:.1%} of the {len(margin)} pairs have a chosen reward above the rejected one. Pairs left of 0 "
           "are ones the length penalty α·len turned around." if len(margin) else "no pair has both rewards.")
    )  # fmt: skip
    return Plot(f"plot-round{k}-agreement", "Label agreement (single annotator: reward agreement)", caption,
                f"Histogram of chosen minus rejected reward in round {k}", _png(fig))  # fmt: skip


def alpha_plot(summary: list[dict[str, Any]]) -> Plot | None:
    """Across rounds: the mean chosen−rejected length gap at α = 0 and at the α the pairs stage chose."""
    rows = [r for r in summary if r.get("alpha") is not None and r.get("gap") is not None]
    if not rows:
        return None
    fig, ax = _figure()
    ks = [r["round"] for r in rows]
    ax.plot(ks, [r["gap"] for r in rows], "o-", label="gap at the chosen α", color=BLUE)
    # drawn second, dashed and hollow, so it stays visible where α = 0 puts both lines on top of each other
    ax.plot(
        ks, [r["gap_alpha0"] for r in rows], "o--", label="gap at α = 0", color="#777777", mfc="none", ms=10
    )
    ax.axhline(0, color="black", lw=0.5)
    for r in rows:
        ax.annotate(
            f"α = {r['alpha']:.3g}",
            (r["round"], r["gap"]),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=8,
        )
    ax.set(xlabel="round", ylabel="mean len(chosen) − len(rejected)", title="length debiasing across rounds")
    ax.set_xticks(ks)
    ax.legend()
    caption = (
        "Mean length of the chosen minus the rejected response, with pairs picked best-vs-worst on the raw "
        "reward (α = 0, grey) and on r − α·len with the round's α (blue). α is swept up from 0 and the α whose gap "
        "is closest to 0 is kept; a gap already at or below 0 keeps α = 0 (the penalty only favours shorter "
        "responses). "
        + "; ".join(
            f"round {r['round']}: α = {_g(r['alpha'])}, gap {_g(r['gap_alpha0'])} → {_g(r['gap'])}"
            for r in rows
        )
        + "."
    )
    return Plot(
        "plot-alpha",
        "Length debiasing (α)",
        caption,
        "Length gap at α = 0 and at the chosen α, per round",
        _png(fig),
    )


def eval_plot(run_dir: str | Path) -> Plot | None:
    """Across rounds: win rate and LC win rate of π_k against its baseline (95% prompt-bootstrap intervals), and the
    mean response length of both sides; None when no round was evaluated."""
    rows = []
    for k, d in round_dirs(run_dir):
        st = stage_manifests(d).get("evaluate", {}).get("stats") or {}
        if st.get("win_rate") is not None:
            rows.append((k, st))
    if not rows:
        return None
    fig, (ax, ax2) = _figure(2)
    ks = [k for k, _ in rows]
    for key, label, color, dx in (("win_rate", "win rate", BLUE, -0.05), ("lc_win_rate", "LC win rate", GREEN, 0.05)):
        # an LC win rate that was not identified is stored as null: a gap in the line, not a point
        ys = np.array([np.nan if st.get(key) is None else st[key] for _, st in rows], dtype=float)
        ci = np.array([st.get(f"{key}_ci") or [np.nan, np.nan] for _, st in rows], dtype=float)  # (R, 2)
        ax.errorbar(np.array(ks) + dx, ys, yerr=[ys - ci[:, 0], ci[:, 1] - ys], fmt="o-", color=color, capsize=3,
                    label=label)  # fmt: skip
    ax.axhline(0.5, color=GREY, lw=1, ls="--")
    ax.set(xlabel="round", ylabel="P(π_k ≻ baseline)", title="against the baseline", ylim=(0, 1))
    ax.set_xticks(ks)
    ax.legend(fontsize=8)
    ax2.plot(ks, [st["mean_tokens"] for _, st in rows], "o-", color=PURPLE, label="π_k")
    ax2.plot(ks, [st["baseline_mean_tokens"] for _, st in rows], "s--", color="#777777", mfc="none", label="baseline")
    ax2.set(xlabel="round", ylabel="mean tokens", title="response length")
    ax2.set_xticks(ks)
    ax2.legend(fontsize=8)
    fig.suptitle("evaluation on held-out prompts", fontsize=10)

    def ci(st: dict[str, Any], key: str) -> str:
        v = st.get(f"{key}_ci")
        return f" [{v[0]:.3f}, {v[1]:.3f}]" if v else ""

    caption = (
        "π_k against its baseline on the held-out prompts (both orders of every judge, position bias cancelled): "
        "win rate = mean P(π_k ≻ baseline), ties ½; LC win rate = the preference a logistic fit on the length "
        "difference predicts at equal length (AlpacaEval 2's length control, without its instruction term); bars: "
        "95% intervals from prompt resamples; dashed: ½. Right: mean response tokens of both sides. "
        + "; ".join(
            f"round {k} vs {st.get('baseline')}: win {st['win_rate']:.3f}{ci(st, 'win_rate')}, LC "
            + (f"{st['lc_win_rate']:.3f}{ci(st, 'lc_win_rate')}" if st.get("lc_win_rate") is not None else "not identified")
            + f", tokens {st['mean_tokens']:.1f} vs "
            f"{st['baseline_mean_tokens']:.1f}"
            for k, st in rows
        )
        + "."
    )
    return Plot("plot-eval", "Evaluation", caption,
                "Win rate and LC win rate against the baseline, and response lengths, per round", _png(fig))  # fmt: skip


# ---------------------------------------------------------------------------------------------- the page

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1180px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta, .note { color: #666; font-size: 0.9em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; font-size: 0.85em; font-variant-numeric: tabular-nums; }
td, th { border: 1px solid #ddd; padding: 2px 10px; text-align: right; }
th { background: #f4f4f4; } td:first-child { text-align: left; font-family: ui-monospace, monospace; }
.grid { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure { margin: 0; max-width: 100%; } figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.85em; color: #444; margin-top: 0.3em; }
"""


def _figure_html(p: Plot) -> str:
    return (
        f"<figure style='width: {p.width}px'><img id='{p.id}' alt='{html.escape(p.alt, quote=True)}' src='{p.data_uri}'>"
        f"<figcaption><b>{html.escape(p.title)}.</b> {html.escape(p.caption)}</figcaption></figure>"
    )


def _summary_table(summary: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return "–" if v is None else html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))

    cols = [c for c in (summary[0] if summary else {}) if c != "round"]
    head = "<tr><th>metric</th>" + "".join(f"<th>round {r['round']}</th>" for r in summary) + "</tr>"
    rows = "".join(
        f"<tr><td>{c}</td>" + "".join(f"<td>{cell(r.get(c))}</td>" for r in summary) + "</tr>" for c in cols
    )
    return f"<table id='summary'>{head}{rows}</table>"


def _missing_note(k: int, round_dir: Path) -> str:
    files = {"labels.parquet": "responses", "pairs.parquet": "pairs", "train_metrics.parquet": "training"}
    absent = [what for f, what in files.items() if not (round_dir / f).is_file()]
    if k == 0 and not (round_dir / "responses.parquet").is_file():
        return "Round 0 trains π₀ on the offline preference set: it generates nothing, so it has no reward or length plots."
    if absent:
        return f"Not written yet: {', '.join(absent)} (the round is in progress or stopped early)."
    return ""


def build_report(run_dir: str | Path) -> tuple[str, list[Plot]]:
    """The HTML page of a run and the plots on it."""
    run_dir = Path(run_dir)
    summary = run_summary(run_dir)
    plots: list[Plot] = []
    sections: list[tuple[str, str, str, list[Plot]]] = []  # (anchor, title, note, plots)
    try:
        across = [p for p in (eval_plot(run_dir), alpha_plot(summary)) if p is not None]
    except Exception:  # noqa: BLE001 (a damaged eval.parquet: the rounds' own plots still show)
        across = [a] if (a := alpha_plot(summary)) is not None else []
    if across:
        plots += across
        sections.append(("across-rounds", "Across rounds", "", across))
    for k, d in round_dirs(run_dir):
        try:
            rp, note = round_plots(d), _missing_note(k, d)
        except Exception as e:  # noqa: BLE001 (a report must never stop the pipeline: say what failed instead)
            rp, note = [], f"The plots of round {k} could not be drawn: {e}. A re-run of the round redoes a damaged stage."
        plots += rp
        sections.append((f"round-{k}", f"Round {k}", note, rp))
    nav = " ".join(f"<a href='#{anchor}'>{html.escape(title)}</a>" for anchor, title, _, _ in sections)
    body = "".join(
        f"<section id='{anchor}'><h2>{html.escape(title)}</h2>"
        + (f"<p class='note'>{html.escape(note)}</p>" if note else "")
        + "<div class='grid'>"
        + "".join(_figure_html(p) for p in ps)
        + "</div></section>"
        for anchor, title, note, ps in sections
    )
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>dice run {html.escape(run_dir.name)}</title>
<style>{_CSS}</style></head>
<body data-plots="{len(plots)}">
<h1>dice run <code>{html.escape(run_dir.name)}</code></h1>
<p class="meta">{html.escape(str(run_dir.resolve()))} · {len(summary)} round(s) · {len(plots)} plots · generated {when}
by <code>dice report</code></p>
<nav><a href="#summary-section">Summary</a> {nav}</nav>
<section id="summary-section"><h2>Summary</h2>
<p class="note">One column per round, from the stage manifests (what <code>dice inspect</code> prints).</p>
{_summary_table(summary)}</section>
{body}
<script>
// For headless checks: how many plots the browser decoded into real images.
window.addEventListener("load", () => {{
  const imgs = [...document.querySelectorAll("figure img")];
  document.body.dataset.plotsLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""
    return page, plots


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's report (default: <run>/report.html) atomically; returns its path."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    page, _ = build_report(run_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def round_markdown(run_dir: str | Path, k: int, report_path: Path) -> str:
    """Markdown for a round's Prefect artifact: the round's plots from the HTML report (and, for an evaluated round,
    the evaluation across rounds), as data-URI images."""
    rd = Path(run_dir) / f"round-{k}"
    lines = [f"# Round {k}", "", f"Full report (all rounds): `{Path(report_path).resolve()}`", ""]
    try:
        evaluated = "evaluate" in stage_manifests(rd)
        plots = round_plots(rd) + ([e] if evaluated and (e := eval_plot(run_dir)) is not None else [])
    except Exception as e:  # noqa: BLE001 (as in build_report)
        return "\n".join(lines + [f"The plots of round {k} could not be drawn: {e}"])
    for p in plots:
        lines += [f"## {p.title}", "", f"![{p.alt}]({p.data_uri})", "", p.caption, ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- dice diff

_ROUND_NUMBERS = """
with r as (select * from {responses}),
     p as (select * from {pairs}),
     g as (select * from p where source = 'generated'),
     m as (select * from {metrics})
select
  (select count(distinct prompt_id) from r) as prompts,
  (select count(*) from r) as responses,
  (select count(*) filter (where finish_reason = 'length') from r) as cut_at_limit,
  (select avg(num_tokens) from r) as mean_tokens,
  (select median(num_tokens) from r) as median_tokens,
  (select avg(num_chars) from r) as mean_chars,
  (select median(num_chars) from r) as median_chars,
  (select avg(reward) from r) as reward_mean,
  (select stddev_pop(reward) from r) as reward_std,
  (select count(*) from p) as pairs,
  (select count(*) from g) as pairs_generated,
  (select count(*) from p where source = 'offline') as pairs_offline,
  (select avg(chosen_len) from g) as chosen_len,
  (select avg(rejected_len) from g) as rejected_len,
  (select any_value(alpha) from g) as alpha,
  (select count(*) from m) as train_steps,
  (select arg_max(loss, step) from m) as final_loss,
  (select arg_max(accuracy, step) from m) as final_accuracy,
  (select arg_max(margin, step) from m) as final_margin
"""

# Stand-ins for files a round does not have (round 0: no responses): same columns, no rows, so every number
# of the query above comes out as NULL (or 0 for counts, then reported as None).
_EMPTY = {
    "responses": "(select null::varchar as prompt_id, null::varchar as finish_reason, null::int as num_tokens, "
                 "null::int as num_chars, null::double as reward limit 0)",
    "pairs": "(select null::varchar as source, null::int as chosen_len, null::int as rejected_len, "
             "null::double as alpha limit 0)",
    "metrics": "(select null::int as step, null::double as loss, null::double as accuracy, "
               "null::double as margin limit 0)",
}  # fmt: skip


def _source(path: Path, empty: str, extra: str = "") -> str:
    if not path.is_file():
        return empty
    return f"(select *{extra} from read_parquet('{str(path).replace(chr(39), chr(39) * 2)}'))"


def _responses_file(round_dir: Path) -> Path:
    labels = round_dir / "labels.parquet"
    return labels if labels.is_file() else round_dir / "responses.parquet"


def _round_numbers(con, round_dir: Path) -> dict[str, Any]:
    """One round's numbers from its Parquet files; None where the file behind a number is not there."""
    resp = _responses_file(round_dir)
    sql = _ROUND_NUMBERS.format(
        # responses.parquet (a round still being labelled) has no reward column yet
        responses=_source(
            resp, _EMPTY["responses"], "" if resp.name == "labels.parquet" else ", null::double as reward"
        ),
        pairs=_source(round_dir / "pairs.parquet", _EMPTY["pairs"]),
        metrics=_source(round_dir / "train_metrics.parquet", _EMPTY["metrics"]),
    )
    cur = con.execute(sql)
    row = dict(zip([d[0] for d in cur.description], cur.fetchone()))
    present = {"responses": resp.is_file(), "pairs": (round_dir / "pairs.parquet").is_file(),
               "train": (round_dir / "train_metrics.parquet").is_file()}  # fmt: skip
    for name in ("prompts", "responses", "cut_at_limit"):
        row[name] = row[name] if present["responses"] else None
    for name in ("pairs", "pairs_generated", "pairs_offline"):
        row[name] = row[name] if present["pairs"] else None
    row["train_steps"] = row["train_steps"] if present["train"] else None
    return {k: float(v) if isinstance(v, float) else v for k, v in row.items()}


def round_diff(run_dir: str | Path, a: int, b: int, examples: int = 2) -> dict[str, Any]:
    """Rounds a and b side by side, computed from their Parquet files.

    Returns {"metrics": {name: (value in a, value in b)}, "shared": {...} or None, "examples": [...]}. `shared`
    compares the prompts (by prompt_id) answered in both rounds: the mean over those prompts of the change of
    their mean response length. The examples are the shared prompts whose mean length changed most, each
    with its first response (lowest sample_idx) of each round.
    """
    import duckdb

    run_dir = Path(run_dir)
    da, db = run_dir / f"round-{a}", run_dir / f"round-{b}"
    con = duckdb.connect()
    na, nb = _round_numbers(con, da), _round_numbers(con, db)
    metrics: dict[str, tuple[Any, Any]] = {name: (na[name], nb[name]) for name in na}
    sa, sb = round_summary(da), round_summary(db)
    for name in ("gap_alpha0", "gap"):  # the gap before the α search is only in the pairs stage's manifest
        metrics[f"length_{name}"] = (sa.get(name), sb.get(name))
    # the evaluate stage's numbers (π_k against its baseline), from its manifest
    for name in ("win_rate", "lc_win_rate", "eval_tokens", "baseline_tokens", "eval_chars", "baseline_chars",
                 "eval_metric"):  # fmt: skip
        metrics[name] = (sa.get(name), sb.get(name))
    ra, rb = _responses_file(da), _responses_file(db)
    if not (ra.is_file() and rb.is_file()):
        return {"metrics": metrics, "shared": None, "examples": []}
    con.execute(f"create view ra as select * from {_source(ra, '')}")
    con.execute(f"create view rb as select * from {_source(rb, '')}")
    per_prompt = """
        with pa as (select prompt_id, any_value(prompt) as prompt, avg(num_tokens) as t, avg(num_chars) as c
                    from ra group by prompt_id),
             pb as (select prompt_id, avg(num_tokens) as t, avg(num_chars) as c from rb group by prompt_id)
        select pa.prompt_id, pa.prompt, pb.t - pa.t as dt, pb.c - pa.c as dc
        from pa join pb using (prompt_id)"""
    n, dt, dc = con.execute(f"select count(*), avg(dt), avg(dc) from ({per_prompt})").fetchone()
    if not n:
        return {"metrics": metrics, "shared": None, "examples": []}
    shared = {"prompts": n, "mean_tokens_change": float(dt), "mean_chars_change": float(dc)}
    first = "select response, num_tokens from {t} where prompt_id = ? order by sample_idx limit 1"
    shown = []
    for pid, prompt, change, _ in con.execute(
        f"{per_prompt} order by abs(dt) desc, prompt_id limit ?", [examples]
    ).fetchall():
        (x, xt), (y, yt) = (con.execute(first.format(t=t), [pid]).fetchone() for t in ("ra", "rb"))
        shown.append({"prompt_id": pid, "prompt": prompt, "change": float(change),
                      "a": x, "a_tokens": xt, "b": y, "b_tokens": yt})  # fmt: skip
    return {"metrics": metrics, "shared": shared, "examples": shown}
