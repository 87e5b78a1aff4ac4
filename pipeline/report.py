"""Per-round summaries read from the stage manifests: what `dice inspect` prints and the flow's artifacts show."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.artifacts import MANIFEST_DIR, read_manifest

STAGE_ORDER = ("generate", "label", "pairs", "reference", "train")


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
    g, lab, p, ref, t = (s.get(k, {}) for k in STAGE_ORDER)
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
        "seconds": round(sum(m.get("duration_s", 0.0) for m in ms.values()), 1),
    }
    return row


def run_summary(run_dir: str | Path) -> list[dict[str, Any]]:
    return [round_summary(d) for _, d in round_dirs(run_dir)]


def round_diff(run_dir: str | Path, a: int, b: int, examples: int = 2) -> dict[str, Any]:
    """Numbers of rounds a and b side by side, and example prompts answered in both rounds."""
    import numpy as np
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    sa, sb = round_summary(run_dir / f"round-{a}"), round_summary(run_dir / f"round-{b}")

    def responses(k: int):
        p = run_dir / f"round-{k}" / "labels.parquet"
        return pq.read_table(p).to_pandas() if p.is_file() else None

    ra, rb = responses(a), responses(b)
    metrics: dict[str, tuple[Any, Any]] = {key: (sa.get(key), sb.get(key)) for key in sa if key not in ("round",)}
    for name, fn in (("median_tokens", lambda r: float(np.median(r.num_tokens))), ("mean_chars", lambda r: float(r.num_chars.mean()))):
        metrics[name] = (fn(ra) if ra is not None else None, fn(rb) if rb is not None else None)
    shown = []
    if ra is not None and rb is not None:
        common = sorted(set(ra.prompt) & set(rb.prompt))
        ga, gb = ra.groupby("prompt"), rb.groupby("prompt")
        if common:
            change = [gb.get_group(p).num_tokens.mean() - ga.get_group(p).num_tokens.mean() for p in common]
            metrics["shared_prompts"] = (len(common), len(common))
            metrics["mean_length_change_on_shared_prompts"] = (0.0, float(np.mean(change)))
        for p in common[:examples]:
            shown.append({"prompt": p, "a": ga.get_group(p).response.iloc[0], "b": gb.get_group(p).response.iloc[0]})
    return {"metrics": metrics, "examples": shown}
