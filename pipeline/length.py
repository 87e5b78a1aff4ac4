"""Best-vs-worst selection with DICE's length debiasing (arXiv 2406.09760, §3.2; ../shared/METHODS.md §1.4).

Responses of one prompt are a row of a (P, K) matrix; prompts with fewer than K valid responses are padded
with NaN rewards. The length-regularised score is s = r − α·len; chosen = argmax s, rejected = argmin s.
α is searched per round so that the mean signed length gap mean(len_w − len_l) is closest to 0, with the
reference code's procedure: sweep α = 0, step, 2·step, … and stop at the first α whose |gap| exceeds the
best so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Selection:
    chosen: np.ndarray  # (P,) column index of the chosen response
    rejected: np.ndarray  # (P,) column index of the rejected response
    margin: np.ndarray  # (P,) s(chosen) − s(rejected), >= 0
    gap: float  # mean(len_w − len_l) over the P pairs
    alpha: float


def best_worst(rewards: np.ndarray, lengths: np.ndarray, alpha: float) -> Selection:
    """Chosen/rejected per row at a given α.

    Args:
        rewards: (P, K) float, NaN where a response is missing or invalid (never chosen nor rejected).
        lengths: (P, K) float lengths in the configured unit.
        alpha: length penalty per unit.
    """
    s = rewards - alpha * lengths  # (P, K)
    valid = np.isfinite(s)
    chosen = np.where(valid, s, -np.inf).argmax(axis=1)  # (P,) ties: the lowest sample index
    rejected = np.where(valid, s, np.inf).argmin(axis=1)  # (P,)
    rows = np.arange(s.shape[0])
    margin = s[rows, chosen] - s[rows, rejected]
    gap = float(np.mean(lengths[rows, chosen] - lengths[rows, rejected])) if len(rows) else 0.0
    return Selection(chosen, rejected, margin, gap, alpha)


def search_alpha(rewards: np.ndarray, lengths: np.ndarray, step: float, max_steps: int) -> Selection:
    """The reference α sweep: keep the α with the smallest |gap|, stop when |gap| grows past the best."""
    best = best_worst(rewards, lengths, 0.0)
    for i in range(1, max_steps + 1):
        cur = best_worst(rewards, lengths, i * step)
        if abs(cur.gap) > abs(best.gap):
            break
        if abs(cur.gap) < abs(best.gap):
            best = cur
    return best


def replay_counts(n_generated: int, n_offline: int, gamma: float) -> tuple[int, int]:
    """How many generated and offline pairs a round keeps under experience replay with ratio γ.

    n_gen = min(⌊N_off·(1−γ)⌋, |generated|), n_off = ⌊γ·n_gen/(1−γ)⌋ (DICE's mixing rule, §3.3).
    γ = 0 means no replay: every generated pair, no offline pair (the rule would otherwise cap the round
    at the offline set's size).
    """
    if gamma <= 0:
        return n_generated, 0
    # 1e-9 guards floor() against binary rounding (1 − 0.9 = 0.0999…98 would floor 10·0.1 to 0)
    n_gen = min(int(np.floor(n_offline * (1 - gamma) + 1e-9)), n_generated)
    n_off = int(np.floor(gamma * n_gen / (1 - gamma) + 1e-9))
    return n_gen, n_off
