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


def _baseline_kind(k: int, st: dict[str, Any]) -> str:
    """The baseline kind a round's evaluation recorded; older runs recorded only the role (π_0, π_{k-1}, or a file)."""
    if st.get("baseline_kind"):
        return st["baseline_kind"]
    role = str(st.get("baseline") or "")
    if role == "π_0" and k != 1:
        return "initial"
    if role == f"π_{k - 1}":
        return "previous" if k != 1 else "initial"  # round 1: π_0 either way, the same comparison
    return "file"


def eval_round_rows(round_dir: Path, st: dict[str, Any]) -> Any:
    """A round's evaluated rows as `evaluation.RoundRows` (policy rows with a p̂; the control rows when the round wrote
    them: older runs did not), lengths in the unit the round's LC used; None when eval.parquet cannot be read."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.method.evaluation import Controls, RoundRows

    unit = st.get("length_unit") or "chars"
    try:
        t = pq.read_table(round_dir / "eval.parquet", columns=["prompt_id", "p", unit, f"baseline_{unit}"]).to_pydict()
    except Exception:  # noqa: BLE001 (missing or damaged: this round cannot be compared)
        return None
    keep = [i for i, v in enumerate(t["p"]) if v is not None]
    pick = lambda col: np.array([t[col][i] for i in keep], dtype=float)  # noqa: E731
    ids = np.array([t["prompt_id"][i] for i in keep], dtype=object)
    control, cids = None, None
    cpath = round_dir / "eval_controls.parquet"
    if cpath.is_file():
        c = pq.read_table(cpath, columns=["prompt_id", "p", f"{unit}_a", f"{unit}_b"]).to_pydict()
        ck = [i for i, v in enumerate(c["p"]) if v is not None]
        if ck:
            control = Controls(*(np.array([c[col][i] for i in ck], dtype=float) for col in ("p", f"{unit}_a", f"{unit}_b")))
            cids = np.array([c["prompt_id"][i] for i in ck], dtype=object)
    return RoundRows(pick("p"), pick(unit), pick(f"baseline_{unit}"), ids, control, cids)


def eval_progress(run_dir: str | Path, ev: Any, seed: int, only: set[int] | None = None) -> Any:
    """The stopping rule (pipeline.method.evaluation.progress) on a run's evaluated rounds, each with the baseline
    kind it recorded, a gain counting only when the lower 95% bound of its paired LC gain exceeds eval.min_gain.
    `only`: the rounds to consider (the flow's published ones). None when no round has an LC win rate."""
    from pipeline.method.evaluation import paired_gain_interval, progress

    done: dict[int, tuple[Path, dict[str, Any]]] = {}
    for k, d in round_dirs(run_dir):
        st = stage_manifests(d).get("evaluate", {}).get("stats") or {}
        if st.get("win_rate") is not None and (only is None or k in only):
            done[k] = (d, st)
    lcs = [(k, st["lc_win_rate"]) for k, (_, st) in done.items() if st.get("lc_win_rate") is not None]
    if not lcs:
        return None
    kinds = {k: _baseline_kind(k, st) for k, (_, st) in done.items()}
    rows: dict[int, Any] = {}

    def of(k: int) -> Any:
        if k not in rows:
            rows[k] = eval_round_rows(*done[k])
        return rows[k]

    def lower_bound(k: int, ref: int | None) -> float | None:
        st = done[k][1]
        if ref is None and st.get("lc_win_rate_ci"):
            return float(st["lc_win_rate_ci"][0]) - 0.5  # the round's own interval: against ½ nothing is paired
        a, b = of(k), (None if ref is None else of(ref))
        if a is None or (ref is not None and b is None):
            return None
        out = paired_gain_interval(a, b, min(ev.bootstrap, 1000) or 200, 0.95, seed, ev.lc_l2)
        return None if out is None else out[1]

    return progress(lcs, ev.baseline if ev.baseline in ("initial", "previous") else "file", ev.min_gain,
                    ev.stop_after_no_gain, lower_bound, kinds)  # fmt: skip
