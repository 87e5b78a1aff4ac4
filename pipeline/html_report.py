"""A run's rounds as one self-contained HTML page of plots (`dice report`, and the flow's round artifacts).

Everything is inline (CSS, PNG plots as data URIs), so the page opens offline, attached to an email or in a
Prefect artifact. Per round: reward and length distributions of the responses, chosen vs rejected lengths,
the length gap before and after α debiasing, label agreement, and the training curves.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.report import round_dirs, run_summary


@dataclass(frozen=True)
class Plot:
    id: str  # stable element id, e.g. "plot-round1-rewards"
    title: str
    caption: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=100)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _read(path: Path, columns: list[str]):
    return pq.read_table(path, columns=columns).to_pandas() if path.is_file() else None


def round_plots(round_dir: Path) -> list[Plot]:
    """The plots one round's files allow (round 0 has no responses; a round in progress has fewer files)."""
    k = int(round_dir.name.split("-")[1])
    plots: list[Plot] = []
    labels = _read(round_dir / "labels.parquet", ["reward", "num_tokens", "finish_reason"])
    if labels is not None:
        plt, fig, ax = _figure()
        ax.hist(labels.reward.dropna(), bins=30, color="#4477aa")
        ax.set(xlabel="reward", ylabel="responses", title=f"round {k}: rewards of responses")
        plots.append(Plot(f"plot-round{k}-rewards", "Rewards", "Distribution of the label of every scored response.", _png(plt, fig)))
        plt, fig, ax = _figure()
        for reason, color in (("stop", "#228833"), ("length", "#ee6677")):
            sub = labels[labels.finish_reason == reason].num_tokens
            if len(sub):
                ax.hist(sub, bins=30, alpha=0.7, color=color, label=f"{reason} ({len(sub)})")
        ax.set(xlabel="tokens", ylabel="responses", title=f"round {k}: response lengths")
        ax.legend()
        plots.append(Plot(f"plot-round{k}-lengths", "Response lengths",
                          "Generated tokens per response; 'length' ones were cut at the limit and dropped.", _png(plt, fig)))  # fmt: skip
    pairs = _read(round_dir / "pairs.parquet", ["source", "chosen_len", "rejected_len", "chosen_reward", "rejected_reward"])
    if pairs is not None:
        gen = pairs[pairs.source == "generated"]
        if len(gen):
            plt, fig, ax = _figure()
            ax.scatter(gen.rejected_len, gen.chosen_len, s=12, color="#aa3377")
            lim = max(gen.chosen_len.max(), gen.rejected_len.max())
            ax.plot([0, lim], [0, lim], color="grey", lw=1)
            ax.set(xlabel="rejected length", ylabel="chosen length", title=f"round {k}: chosen vs rejected lengths")
            plots.append(Plot(f"plot-round{k}-pair-lengths", "Chosen vs rejected lengths",
                              "One dot per generated pair; above the diagonal the chosen response is longer.",
                              _png(plt, fig)))  # fmt: skip
            agree = float((gen.chosen_reward > gen.rejected_reward).mean())
            plt, fig, ax = _figure()
            ax.bar(["chosen reward > rejected", "otherwise"], [agree, 1 - agree], color=["#228833", "#bbbbbb"])
            ax.set(ylim=(0, 1), ylabel="share of generated pairs", title=f"round {k}: label agreement")
            plots.append(Plot(f"plot-round{k}-agreement", "Label agreement",
                              "Share of generated pairs whose chosen response has the higher raw reward (with α > 0 "
                              "the length penalty can prefer a lower-reward, shorter response). Single-labeller "
                              "rounds have no inter-annotator agreement to show.", _png(plt, fig)))  # fmt: skip
    metrics = _read(round_dir / "train_metrics.parquet", ["step", "loss", "accuracy", "margin"])
    if metrics is not None and len(metrics):
        plt, fig, ax = _figure()
        ax.plot(metrics.step + 1, metrics.loss, label="loss", color="#4477aa")
        ax.plot(metrics.step + 1, metrics.accuracy, label="accuracy", color="#228833")
        ax.plot(metrics.step + 1, metrics.margin, label="margin", color="#ee6677")
        ax.set(xlabel="optimizer step", title=f"round {k}: training")
        ax.legend()
        plots.append(Plot(f"plot-round{k}-training", "Training", "Per-step loss, preference accuracy and reward margin.", _png(plt, fig)))
    return plots


def alpha_plot(summary: list[dict[str, Any]]) -> Plot | None:
    rows = [r for r in summary if r.get("alpha") is not None]
    if not rows:
        return None
    plt, fig, ax = _figure()
    ks = [r["round"] for r in rows]
    ax.plot(ks, [r["gap_alpha0"] for r in rows], "o--", label="gap at α = 0", color="#bbbbbb")
    ax.plot(ks, [r["gap"] for r in rows], "o-", label="gap at the chosen α", color="#4477aa")
    ax.axhline(0, color="black", lw=0.5)
    for r in rows:
        ax.annotate(f"α={r['alpha']:.3g}", (r["round"], r["gap"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set(xlabel="round", ylabel="mean len(chosen) − len(rejected)", title="length debiasing")
    ax.set_xticks(ks)
    ax.legend()
    return Plot("plot-alpha", "Length debiasing", "Mean chosen−rejected length gap before and after the α search.", _png(plt, fig))


def build_report(run_dir: str | Path) -> tuple[str, list[Plot]]:
    """The HTML page and its plots."""
    run_dir = Path(run_dir)
    summary = run_summary(run_dir)
    plots: list[Plot] = []
    sections = []
    a = alpha_plot(summary)
    if a:
        plots.append(a)
        sections.append(("Across rounds", [a]))
    for k, d in round_dirs(run_dir):
        rp = round_plots(d)
        plots += rp
        if rp:
            sections.append((f"Round {k}", rp))
    cols = [c for c in (summary[0] if summary else {}) if c != "round"]

    def cell(v: Any) -> str:
        return "–" if v is None else html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))

    table = "<table><tr><th>metric</th>" + "".join(f"<th>round {r['round']}</th>" for r in summary) + "</tr>"
    table += "".join(f"<tr><td>{c}</td>" + "".join(f"<td>{cell(r.get(c))}</td>" for r in summary) + "</tr>" for c in cols)
    table += "</table>"
    body = "".join(
        f"<section><h2>{html.escape(title)}</h2><div class='grid'>"
        + "".join(
            f"<figure><img id='{p.id}' alt='{html.escape(p.title)}' src='{p.data_uri}'>"
            f"<figcaption><b>{html.escape(p.title)}.</b> {html.escape(p.caption)}</figcaption></figure>"
            for p in ps
        )
        + "</div></section>"
        for title, ps in sections
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dice run {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
td:first-child {{ text-align: left; }} .grid {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; width: 520px; }} figcaption {{ font-size: 0.8em; color: #555; }}
</style></head>
<body data-plots="{len(plots)}">
<h1>dice run <code>{html.escape(str(run_dir))}</code></h1>
<h2>Summary</h2>{table}
{body}
<script>
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
    page, _ = build_report(run_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out


def round_markdown(run_dir: str | Path, k: int, report_path: Path) -> str:
    """Markdown for a round's Prefect artifact: the same plots as the HTML report, as data-URI images."""
    rd = Path(run_dir) / f"round-{k}"
    lines = [f"# Round {k}", "", f"Full report: `{report_path}`", ""]
    for p in round_plots(rd):
        lines += [f"## {p.title}", "", f"![{p.title}]({p.data_uri})", "", p.caption, ""]
    return "\n".join(lines)
