"""Per-round summaries read from the stage manifests: what `dice inspect` prints and the flow's artifacts show."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.data.artifacts import MANIFEST_DIR, read_manifest

STAGE_ORDER = ("generate", "label", "pairs", "reference", "train", "evaluate")


def round_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The run's round folders, in round order."""
    found = []
    for p in Path(run_dir).glob("round-*"):
        m = re.fullmatch(r"round-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def stage_manifests(round_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for stage in STAGE_ORDER:
        m = read_manifest(round_dir / MANIFEST_DIR / f"{stage}.json")
        if m is not None:
            out[stage] = m
    return out


def round_summary(round_dir: Path) -> dict[str, Any]:
    """One row of numbers for a round: counts, α, lengths, reward statistics, training results, durations."""
    ms = stage_manifests(round_dir)
    s = {stage: m.get("stats", {}) for stage, m in ms.items()}
    g, lab, p, ref, t, ev = (s.get(k, {}) for k in STAGE_ORDER)
    row: dict[str, Any] = {
        "round": int(round_dir.name.split("-")[1]),
        "stages_done": "/".join(st for st in STAGE_ORDER if st in ms) or "-",
        "complete": (round_dir / "manifest.json").is_file(),
        "prompts": g.get("prompts"),
        "responses": g.get("responses"),
        "cut_at_limit": g.get("finish_length"),
        "mean_tokens": g.get("mean_tokens"),
        "reward_mean": lab.get("reward_mean"),
        "reward_std": lab.get("reward_std"),
        "label_unscored": lab.get("unscored"),
        # judges: comparisons asked (pairs × annotators), failed ones (recorded, excluded), HTTP retries
        "label_comparisons": lab.get("comparisons"),
        "label_failed": lab.get("comparisons_failed"),
        "label_retries": lab.get("retries"),
        "alpha": p.get("alpha"),
        "gap_alpha0": p.get("length_gap_alpha0"),
        "gap": p.get("length_gap"),
        "chosen_len": p.get("mean_chosen_len"),
        "rejected_len": p.get("mean_rejected_len"),
        "pairs_generated": p.get("pairs_generated"),
        "pairs_offline": p.get("pairs_offline"),
        "pairs_trained": t.get("pairs", ref.get("pairs")),
        "train_steps": t.get("steps"),
        "final_loss": t.get("final_loss"),
        "final_accuracy": t.get("final_accuracy"),
        "final_margin": t.get("final_margin"),
        "train_tokens_per_s": t.get("tokens_per_s"),
        # evaluate: π_k against its baseline on held-out prompts (stages/evaluate.py); 95% prompt-bootstrap intervals
        "eval_baseline": ev.get("baseline"),
        "win_rate": ev.get("win_rate"),
        "win_rate_ci": _interval(ev.get("win_rate_ci")),
        "lc_win_rate": ev.get("lc_win_rate"),
        "lc_win_rate_ci": _interval(ev.get("lc_win_rate_ci")),
        "lc_note": ev.get("lc_note"),  # why the LC win rate is missing (not identified); absent in older runs
        "eval_judged_by": "; ".join(ev["judged_by"]) if ev.get("judged_by") else None,
        "eval_tokens": ev.get("mean_tokens"),
        "baseline_tokens": ev.get("baseline_mean_tokens"),
        "eval_chars": ev.get("mean_chars"),
        "baseline_chars": ev.get("baseline_mean_chars"),
        "eval_metric": ev.get("metric_mean"),
        "baseline_metric": ev.get("baseline_metric_mean"),
        "eval_agreement": ev.get("agreement"),
        "eval_failed": ev.get("comparisons_failed"),
        "seconds": round(sum(m.get("duration_s", 0.0) for m in ms.values()), 1),
    }
    return row


def _interval(ci: list[float] | None) -> str | None:
    """A stored [low, high] as text for tables, e.g. "0.412–0.587"."""
    return f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else None


def run_summary(run_dir: str | Path) -> list[dict[str, Any]]:
    return [round_summary(d) for _, d in round_dirs(run_dir)]
