"""Best-vs-worst selection with DICE's length debiasing (arXiv 2406.09760, §3.2; ../shared/METHODS.md §1.4).

Responses of one prompt are a row of a (P, K) matrix; prompts with fewer than K valid responses are padded
with NaN rewards. The length-regularised score is s = r − α·len; chosen = argmax s, rejected = argmin s (ties:
the lowest sample index). α is chosen per round so that the mean signed length gap mean(len_w − len_l) is
closest to 0, by the reference code's rule: scan α upwards from 0, keep the α with the smallest |gap| (the
first one on equal |gap|), and stop at the first α whose |gap| exceeds the best so far.

Two ways to apply that rule:
- `search_alpha_exact` (dice's default, `pairs.alpha_search: exact`): gap(α) is a step function that changes
  only at the α where some prompt's argmax or argmin changes (where two of its lines r − α·len cross). Those
  breakpoints are computed exactly, per prompt, by walking the upper and lower envelopes of the lines, and the
  rule is applied to the curve itself: the α=0 point, then each open interval between consecutive breakpoints.
  The result does not depend on the rewards' scale: multiplying every reward by c > 0 multiplies every
  breakpoint, and so the chosen α, by c, and leaves the pairs unchanged.
- `search_alpha` (`pairs.alpha_search: grid`): the reference's grid α = 0, step, 2·step, …, whose answer
  depends on the rewards' units (the reference's rewards carry no β; its lengths are characters).

Because the argmax moves to shorter responses and the argmin to longer ones as α grows, gap(α) is
non-increasing: the rule finds the first α of minimal |gap| on the exact curve, which the grid can only
approach (a grid point exactly on a breakpoint, where ties are broken by index, is the one exception).
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
    return _selection(rewards, lengths, chosen, rejected, alpha)


def _selection(rewards: np.ndarray, lengths: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, alpha: float) -> Selection:
    rows = np.arange(rewards.shape[0])
    s_w = rewards[rows, chosen] - alpha * lengths[rows, chosen]  # (P,)
    s_l = rewards[rows, rejected] - alpha * lengths[rows, rejected]  # (P,)
    gap = float(np.mean(lengths[rows, chosen] - lengths[rows, rejected])) if len(rows) else 0.0
    return Selection(chosen, rejected, s_w - s_l, gap, alpha)


def search_alpha(rewards: np.ndarray, lengths: np.ndarray, step: float, max_steps: int) -> Selection:
    """The reference α sweep on a grid: keep the α with the smallest |gap|, stop when |gap| grows past the best."""
    best = best_worst(rewards, lengths, 0.0)
    for i in range(1, max_steps + 1):
        cur = best_worst(rewards, lengths, i * step)
        if abs(cur.gap) > abs(best.gap):
            break
        if abs(cur.gap) < abs(best.gap):
            best = cur
    return best


def _envelope_events(r: np.ndarray, l: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, ...]:
    """Where argmax_j (r_j − α·l_j) changes as α grows from 0, for every row at once.

    Args:
        r: (P, K) rewards, NaN where invalid. l: (P, K) lengths. start: (P,) the argmax at α = 0.
    Returns:
        (alpha, row, old, new): one entry per change, in the order found (per row, α non-decreasing); from α
        just above `alpha` on, row's argmax is column `new` instead of `old`.
    """
    P = r.shape[0]
    rows = np.arange(P)
    valid = np.isfinite(r)
    cur, at = start.copy(), np.zeros(P)
    active = valid[rows, cur] if P else np.zeros(0, dtype=bool)
    out: list[tuple[np.ndarray, ...]] = []
    while active.any():
        idx = rows[active]
        rc, lc = r[idx, cur[idx]], l[idx, cur[idx]]  # (A,) the current winner's line
        rr, ll = r[idx], l[idx]  # (A, K)
        shorter = valid[idx] & (ll < lc[:, None])  # only a shorter response can overtake as α grows
        with np.errstate(divide="ignore", invalid="ignore"):
            cross = (rc[:, None] - rr) / (lc[:, None] - ll)  # (A, K) α where line j meets the winner's
        # the winner beats or ties every line at `at`, so its crossings lie at or after `at` (rounding aside)
        cross = np.where(shorter, np.maximum(cross, at[idx, None]), np.inf)  # (A, K)
        first = cross.min(axis=1)  # (A,)
        moves = np.isfinite(first)
        # among the lines meeting at that α, the shortest wins just after it (ties: the lowest index)
        meeting = np.where(cross == first[:, None], ll, np.inf)  # (A, K)
        new = meeting.argmin(axis=1)  # (A,)
        moved = idx[moves]
        out.append((first[moves], moved, cur[moved], new[moves]))
        cur[moved], at[moved] = new[moves], first[moves]
        active[idx[~moves]] = False
    if not out:
        empty_f, empty_i = np.zeros(0), np.zeros(0, dtype=np.int64)
        return empty_f, empty_i, empty_i, empty_i
    return tuple(np.concatenate(parts) for parts in zip(*out))


def search_alpha_exact(rewards: np.ndarray, lengths: np.ndarray) -> Selection:
    """The reference rule applied to the exact gap(α) curve (module docstring); the returned α is the middle of
    the chosen interval between breakpoints (twice the last breakpoint when the interval is unbounded), or 0.

    Args:
        rewards: (P, K) float, NaN where a response is missing or invalid.
        lengths: (P, K) float lengths.
    """
    at_zero = best_worst(rewards, lengths, 0.0)
    P = rewards.shape[0]
    if P == 0:
        return at_zero
    # argmin of r − α·l is argmax of (−r) − α·(−l): the lower envelope is the upper one of the mirrored lines
    up = _envelope_events(rewards, lengths, at_zero.chosen)
    down = _envelope_events(-rewards, -lengths, at_zero.rejected)
    alpha = np.concatenate([up[0], down[0]])
    row = np.concatenate([up[1], down[1]])
    old = np.concatenate([up[2], down[2]])
    new = np.concatenate([up[3], down[3]])
    is_chosen = np.concatenate([np.ones(len(up[0]), bool), np.zeros(len(down[0]), bool)])
    # change of Σ(len_w − len_l): a new chosen adds its length difference, a new rejected subtracts it
    delta = (lengths[row, new] - lengths[row, old]) * np.where(is_chosen, 1.0, -1.0)
    order = np.argsort(alpha, kind="stable")  # stable: a row's events keep their order
    alpha, row, old, new, is_chosen, delta = (a[order] for a in (alpha, row, old, new, is_chosen, delta))
    # Distinct breakpoints, ascending. Crossings equal in exact arithmetic can differ in the last bits (two
    # prompts whose lines meet at the same α): within a relative 1e-9 they are one breakpoint, not a sliver.
    if not len(alpha):  # one response per prompt, or identical ones: no α changes anything
        return at_zero
    split = np.r_[True, np.diff(alpha) > 1e-9 * np.abs(alpha[1:])]
    first_event = np.flatnonzero(split)  # index of each breakpoint's first event
    end_event = np.r_[first_event[1:], len(alpha)]  # one past each breakpoint's last event
    lo_of, hi_of = alpha[end_event - 1], alpha[first_event]  # each breakpoint's largest and smallest crossing
    # Σ gap on the open interval just above each breakpoint (integral lengths: the sums are exact)
    total0 = float(np.sum(lengths[np.arange(P), at_zero.chosen] - lengths[np.arange(P), at_zero.rejected]))
    after = total0 + np.cumsum(delta)[end_event - 1]

    # Scan: the point α = 0, then (0, b_1) (same pairs as α = 0 when b_1 > 0), then (b_i, b_{i+1}), ...
    best_total, best_i = total0, -1  # -1: α = 0 itself
    for i, total in enumerate(after):
        if abs(total) > abs(best_total):
            break
        if abs(total) < abs(best_total):
            best_total, best_i = total, i
    if best_i < 0:
        return at_zero
    lo = lo_of[best_i]
    if best_i + 1 < len(first_event):
        chosen_alpha = 0.5 * (lo + hi_of[best_i + 1])
    elif lo > 0:
        chosen_alpha = 2.0 * lo
    else:  # every breakpoint is at 0 (ties at α = 0 only): any α > 0 selects the same pairs
        spread_r = np.nanmax(rewards) - np.nanmin(rewards)
        spread_l = np.nanmax(lengths) - np.nanmin(lengths)
        chosen_alpha = float(spread_r / max(spread_l, 1.0)) or 1.0
    # the pairs of that interval: replay every event up to and including its breakpoint
    chosen, rejected = at_zero.chosen.copy(), at_zero.rejected.copy()
    upto = end_event[best_i]
    for target, mask in ((chosen, is_chosen[:upto]), (rejected, ~is_chosen[:upto])):
        rows_, news = row[:upto][mask], new[:upto][mask]
        _, last = np.unique(rows_[::-1], return_index=True)  # each row's last event: its state on the interval
        target[rows_[::-1][last]] = news[::-1][last]
    return _selection(rewards, lengths, chosen, rejected, float(chosen_alpha))


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
