"""Layer 3 for pipeline/method/length.py: best-vs-worst with length debiasing, the α sweep, experience-replay counts.

METHODS.md §1.4-1.5. Tables in, tables out, one comment per row.
"""

from fractions import Fraction
from math import floor

import numpy as np
import pytest

import pipeline.method.length as length_mod
from pipeline.method.length import best_worst, replay_counts, search_alpha, search_alpha_exact

nan = np.nan


# ---------------------------------------------------------------------------------------------- best_worst


def test_nan_entries_are_never_chosen_nor_rejected():
    rewards = np.array(
        [
            [1.0, nan, 3.0, 0.5],  # NaN in the middle: chosen 3.0 (col 2), rejected 0.5 (col 3)
            [nan, 2.0, nan, 1.0],  # NaN in col 0 (where a raw np.argmax/argmin of NaN would land): chosen col 1, rejected col 3
            [-5.0, nan, nan, nan],  # one valid entry then padding: chosen = rejected = col 0, margin 0
            [nan, 0.0, -1.0, 9.0],  # a NaN before the maximum: chosen col 3, rejected col 2
        ]
    )
    lengths = np.array(
        [
            [10.0, 999.0, 20.0, 30.0],
            [999.0, 5.0, 999.0, 7.0],
            [3.0, 0.0, 0.0, 0.0],
            [999.0, 4.0, 6.0, 8.0],
        ]
    )
    sel = best_worst(rewards, lengths, 0.0)
    assert sel.chosen.tolist() == [2, 1, 0, 3]
    assert sel.rejected.tolist() == [3, 3, 0, 2]
    np.testing.assert_allclose(sel.margin, [2.5, 1.0, 0.0, 10.0])
    # gap = mean(len_w − len_l) = mean(20−30, 5−7, 3−3, 8−6) = mean(−10, −2, 0, 2) = −2.5
    assert sel.gap == pytest.approx(-2.5)
    assert sel.alpha == 0.0


def test_ties_choose_the_lowest_index():
    rewards = np.array(
        [
            [2.0, 2.0, 1.0, 1.0],  # two best and two worst: chosen col 0, rejected col 2
            [1.0, 1.0, 1.0, 1.0],  # all equal: chosen = rejected = col 0, margin 0 (a tie the stage drops)
            [nan, 5.0, 5.0, 0.0],  # a tie behind a NaN: chosen col 1 (the lowest valid index)
            [3.0, 0.0, 3.0, 0.0],  # ties at both ends: chosen col 0, rejected col 1
        ]
    )
    lengths = np.zeros_like(rewards)
    sel = best_worst(rewards, lengths, 0.0)
    assert sel.chosen.tolist() == [0, 0, 1, 0]
    assert sel.rejected.tolist() == [2, 0, 3, 1]
    np.testing.assert_allclose(sel.margin, [1.0, 0.0, 5.0, 3.0])


def test_alpha_trades_reward_against_length():
    rewards = np.array([[1.0, 1.2]])  # the long response (col 1) is slightly better
    lengths = np.array([[10.0, 100.0]])
    # α = 0: s = [1.0, 1.2] -> the long response wins, gap = 100 − 10 = +90
    at0 = best_worst(rewards, lengths, 0.0)
    assert (at0.chosen[0], at0.rejected[0], at0.gap) == (1, 0, 90.0)
    assert at0.margin[0] == pytest.approx(0.2)
    # α = 0.01: s = [1.0 − 0.1, 1.2 − 1.0] = [0.9, 0.2] -> the short one wins, gap = −90, margin 0.7
    at1 = best_worst(rewards, lengths, 0.01)
    assert (at1.chosen[0], at1.rejected[0], at1.gap) == (0, 1, -90.0)
    assert at1.margin[0] == pytest.approx(0.7)
    assert at1.alpha == 0.01


def test_empty_matrix():
    sel = best_worst(np.zeros((0, 3)), np.zeros((0, 3)), 0.5)
    assert sel.chosen.size == 0 and sel.gap == 0.0


# ---------------------------------------------------------------------------------------------- search_alpha

# Four prompts, each a long (length 10) and a short (length 0) response; the long one is better by r,
# so it is chosen until α > r/10. The flips happen at α = 0.1, 0.3, 0.5 and 10 (never within the sweep).
FLIP_REWARDS = np.array(
    [
        [1.0, 0.0],  # flips at α = 0.1
        [3.0, 0.0],  # flips at α = 0.3
        [5.0, 0.0],  # flips at α = 0.5
        [100.0, 0.0],  # flips at α = 10
    ]
)
FLIP_LENGTHS = np.array([[10.0, 0.0]] * 4)


def test_search_alpha_picks_the_smallest_abs_gap():
    # step 0.2: α = 0 -> gap (10+10+10+10)/4 = 10; α = 0.2 -> (−10+10+10+10)/4 = 5;
    #           α = 0.4 -> (−10−10+10+10)/4 = 0 (best); α = 0.6 -> (−10−10−10+10)/4 = −5 (|gap| grows: stop)
    sel = search_alpha(FLIP_REWARDS, FLIP_LENGTHS, step=0.2, max_steps=50)
    assert sel.alpha == pytest.approx(0.4)
    assert sel.gap == 0.0
    assert sel.chosen.tolist() == [1, 1, 0, 0]  # the two low-reward prompts now choose the short response


def test_search_alpha_follows_the_stop_rule(monkeypatch):
    """Sweep 0, step, 2·step, … and stop at the first α whose |gap| exceeds the best so far.

    The mean gap is non-increasing in α, so the final α alone cannot tell the stop rule from a full sweep;
    a pass-through spy on best_worst records which α were evaluated.
    """
    seen = []
    real = length_mod.best_worst

    def spy(rewards, lengths, alpha):
        seen.append(alpha)
        return real(rewards, lengths, alpha)

    monkeypatch.setattr(length_mod, "best_worst", spy)
    sel = search_alpha(FLIP_REWARDS, FLIP_LENGTHS, step=0.2, max_steps=50)
    assert sel.alpha == pytest.approx(0.4)
    # gaps 10, 5, 0, −5: the sweep stops at α = 0.6, the first whose |gap| exceeds the best (0)
    assert seen == pytest.approx([0.0, 0.2, 0.4, 0.6])


def test_search_alpha_keeps_the_first_alpha_on_equal_abs_gap_and_continues(monkeypatch):
    seen = []
    real = length_mod.best_worst
    monkeypatch.setattr(length_mod, "best_worst", lambda r, l, a: (seen.append(a), real(r, l, a))[1])
    rewards = FLIP_REWARDS[[0, 1, 3]]  # flips at 0.1, 0.3 and 10
    lengths = FLIP_LENGTHS[:3]
    # α = 0: 10; α = 0.2: (−10+10+10)/3 = 3.33; α = 0.4, 0.6, 0.8: (−10−10+10)/3 = −3.33 (equal |gap|: not an
    # improvement, not a reason to stop) -> the sweep runs to max_steps and keeps α = 0.2
    sel = search_alpha(rewards, lengths, step=0.2, max_steps=4)
    assert sel.alpha == pytest.approx(0.2)
    assert sel.gap == pytest.approx(10 / 3)
    assert seen == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])


def test_search_alpha_is_bounded_by_max_steps():
    # the gap is still shrinking at the last step: the answer is max_steps·step
    sel = search_alpha(FLIP_REWARDS, FLIP_LENGTHS, step=0.2, max_steps=1)
    assert sel.alpha == pytest.approx(0.2) and sel.gap == 5.0
    # max_steps = 0: only α = 0
    sel = search_alpha(FLIP_REWARDS, FLIP_LENGTHS, step=0.2, max_steps=0)
    assert sel.alpha == 0.0 and sel.gap == 10.0


def test_search_alpha_stays_at_zero_when_zero_is_best():
    rewards = np.array(
        [
            [1.0, 0.0],  # the long response is better: gap +10 at α = 0
            [0.0, 1.0],  # the short response is better: gap −10 at α = 0 -> mean 0 already
        ]
    )
    lengths = np.array([[10.0, 0.0], [10.0, 0.0]])
    sel = search_alpha(rewards, lengths, step=0.001, max_steps=1000)
    assert sel.alpha == 0.0 and sel.gap == 0.0


# ---------------------------------------------------------------------------------------------- search_alpha_exact


def test_exact_search_on_the_flip_table():
    # breakpoints 0.1, 0.3, 0.5, 10; gaps: [0, 0.1] 10, (0.1, 0.3) 5, (0.3, 0.5) 0 (best), (0.5, 10) −5: stop
    sel = search_alpha_exact(FLIP_REWARDS, FLIP_LENGTHS)
    assert sel.alpha == pytest.approx(0.4)  # the middle of (0.3, 0.5)
    assert sel.gap == 0.0 and sel.chosen.tolist() == [1, 1, 0, 0]
    # the last interval is unbounded: twice its breakpoint
    sel = search_alpha_exact(FLIP_REWARDS[:1], FLIP_LENGTHS[:1])  # gap 10 up to 0.1, −10 after: |gap| equal
    assert sel.alpha == 0.0 and sel.gap == 10.0  # equal |gap| is no improvement: α = 0 stays
    sel = search_alpha_exact(np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]), np.array([[10.0, 0.0]] * 3))
    # α = 0: (10 − 10 + 10)/3; after 0.1: (−10 − 10 + 10)/3 — equal |gap|; after 0.2: −10 — stop
    assert sel.alpha == 0.0


def _crossings(r: np.ndarray, l: np.ndarray) -> list[float]:
    """Every α > 0 where two valid lines of one row meet, merged within a relative 1e-9 (brute force)."""
    cross = sorted(
        (r[p, i] - r[p, j]) / (l[p, i] - l[p, j])
        for p in range(r.shape[0]) for i in range(r.shape[1]) for j in range(r.shape[1])
        if l[p, i] != l[p, j] and np.isfinite(r[p, i]) and np.isfinite(r[p, j])
    )  # fmt: skip
    merged: list[float] = []
    for x in cross:
        if x > 0 and merged and x - merged[-1] <= 1e-9 * x:
            merged[-1] = x
        elif x > 0:
            merged.append(x)
    return merged


def _random_set(rng, p_max=7, k_max=7, integral=True):
    P, K = int(rng.integers(1, p_max)), int(rng.integers(2, k_max))
    lengths = rng.integers(1, 40, (P, K)).astype(float)
    rewards = rng.integers(-5, 5, (P, K)).astype(float) + 0.1 * lengths * rng.uniform(0, 2)
    if not integral:  # generic rewards: no two crossings coincide
        rewards += rng.normal(size=(P, K)) * 0.01
    rewards[rng.random((P, K)) < 0.15] = np.nan
    return rewards, lengths


def test_exact_search_applies_the_rule_to_the_whole_curve():
    """Brute force: evaluate α = 0 and one α inside every interval between crossings of any two lines, in order,
    with the reference's rule; the exact search must pick the same pairs (coinciding crossings included)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        rewards, lengths = _random_set(rng, integral=bool(rng.integers(2)))
        b = _crossings(rewards, lengths)
        points = [0.0] + ([b[0] / 2] if b else []) + [(x + y) / 2 for x, y in zip(b, b[1:])] + ([2 * b[-1]] if b else [])
        best = best_worst(rewards, lengths, 0.0)
        for a in points[1:]:
            cur = best_worst(rewards, lengths, a)
            if abs(cur.gap) > abs(best.gap) + 1e-12:
                break
            if abs(cur.gap) < abs(best.gap) - 1e-12:
                best = cur
        sel = search_alpha_exact(rewards, lengths)
        assert (sel.chosen.tolist(), sel.rejected.tolist()) == (best.chosen.tolist(), best.rejected.tolist())
        assert sel.gap == pytest.approx(best.gap)
        at = best_worst(rewards, lengths, sel.alpha)  # the reported α selects exactly these pairs
        assert (at.chosen.tolist(), at.rejected.tolist()) == (sel.chosen.tolist(), sel.rejected.tolist())


@pytest.mark.parametrize("c", [1e-4, 0.1, 3.0, 250.0])
def test_exact_search_does_not_depend_on_the_reward_scale(c):
    rng = np.random.default_rng(1)
    for _ in range(100):
        rewards, lengths = _random_set(rng, p_max=30, k_max=17, integral=False)
        a, b = search_alpha_exact(rewards, lengths), search_alpha_exact(c * rewards, lengths)
        assert (a.chosen.tolist(), a.rejected.tolist()) == (b.chosen.tolist(), b.rejected.tolist())
        assert b.alpha == pytest.approx(c * a.alpha, rel=1e-9)  # α is in the rewards' units per length unit
        assert b.gap == a.gap


def test_exact_search_equals_a_grid_that_resolves_the_curve():
    """A grid finer than every interval between crossings visits the curve's steps in order: same pairs."""
    rng = np.random.default_rng(2)
    checked = 0
    for _ in range(100):
        rewards, lengths = _random_set(rng, integral=False)
        b = _crossings(rewards, lengths)
        if not b:
            continue
        step = min(np.diff([0.0] + b)) / 2.5  # at least two grid points inside every interval
        if 2 * b[-1] / step > 3000:  # a grid that fine is slow to sweep; the other sets check the same thing
            continue
        checked += 1
        grid = search_alpha(rewards, lengths, step, int(np.ceil(2 * b[-1] / step)) + 1)
        sel = search_alpha_exact(rewards, lengths)
        assert (sel.chosen.tolist(), sel.rejected.tolist()) == (grid.chosen.tolist(), grid.rejected.tolist())
    assert checked >= 40


def test_exact_search_is_never_worse_than_the_grid():
    rng = np.random.default_rng(3)
    for _ in range(200):
        rewards, lengths = _random_set(rng, p_max=40, k_max=17, integral=False)
        sel = search_alpha_exact(rewards, lengths)
        for step in (0.001, 0.01, 0.05):
            assert abs(sel.gap) <= abs(search_alpha(rewards, lengths, step, 1000).gap) + 1e-12


def test_gentle_length_slope_at_beta():
    """The issue's case: 16 samples per prompt, rewards = β·(noise + a gentle slope per character). The 0.001
    grid on β-scaled rewards is 1/β coarser than the reference's (in its units, rewards without β): it stops at
    α = 0 with a chosen − rejected gap of hundreds of characters. The exact search does not care about β."""
    rng = np.random.default_rng(4)
    lengths = np.exp(rng.normal(6.6, 0.6, (64, 16))).round()  # characters, UltraFeedback-like
    reference_units = rng.normal(0, 1, (64, 16)) + 0.0043 * lengths  # logπ − logπ_ref, no β
    beta = 0.1
    coarse = search_alpha(beta * reference_units, lengths, 0.001, 1000)  # dice before: grid on β·r
    assert coarse.alpha == 0.0 and coarse.gap > 1000
    exact = search_alpha_exact(beta * reference_units, lengths)
    assert abs(exact.gap) <= 15  # characters
    same = search_alpha_exact(reference_units, lengths)  # the reference's units: the same pairs
    assert (exact.chosen.tolist(), exact.rejected.tolist()) == (same.chosen.tolist(), same.rejected.tolist())


def test_exact_search_edge_cases():
    assert search_alpha_exact(np.zeros((0, 4)), np.zeros((0, 4))).chosen.size == 0
    one = search_alpha_exact(np.array([[1.0, nan, nan]]), np.array([[5.0, 1.0, 2.0]]))  # one valid response
    assert (one.chosen[0], one.rejected[0], one.alpha) == (0, 0, 0.0)
    # equal rewards, different lengths: the tie at α = 0 goes to the lowest index; any α > 0 prefers the short one
    tie = search_alpha_exact(np.array([[1.0, 1.0]]), np.array([[10.0, 2.0]]))
    assert tie.alpha == 0.0 and tie.gap == 0.0  # α = 0: chosen = rejected = col 0, gap 0 already


# ---------------------------------------------------------------------------------------------- replay_counts


def formula(n_generated: int, n_offline: int, gamma: str) -> tuple[int, int]:
    """METHODS §1.5 in exact arithmetic: n_gen = min(⌊N_off·(1−γ)⌋, |gen|), n_off = ⌊γ·n_gen/(1−γ)⌋."""
    g = Fraction(gamma)
    n_gen = min(floor(n_offline * (1 - g)), n_generated)
    return n_gen, floor(g * n_gen / (1 - g))


REPLAY_ROWS = [
    # n_generated, n_offline, γ, expected (n_gen, n_off)
    (100, 10, "0.5", (5, 5)),  # the paper's γ: capped by the offline set, half and half
    (3, 10, "0.5", (3, 3)),  # few generated pairs: all kept, as many offline ones
    (100, 7, "0.5", (3, 3)),  # ⌊7·0.5⌋ = 3 generated, 3 offline
    (0, 10, "0.5", (0, 0)),  # nothing generated: no offline pairs either
    (100, 10, "0.3", (7, 3)),  # ⌊10·0.7⌋ = 7, ⌊0.3·7/0.7⌋ = 3
    (100, 8, "0.25", (6, 2)),  # ⌊8·0.75⌋ = 6, ⌊0.25·6/0.75⌋ = 2
    (100, 10, "0.6", (4, 6)),  # ⌊10·0.4⌋ = 4, ⌊0.6·4/0.4⌋ = 6
    (5, 100, "0.1", (5, 0)),  # ⌊0.1·5/0.9⌋ = ⌊0.56⌋ = 0: too few generated pairs for one offline pair
    (50, 100, "0.2", (50, 12)),  # ⌊0.2·50/0.8⌋ = 12 (12.5 rounded down)
]


@pytest.mark.parametrize("n_generated, n_offline, gamma, expected", REPLAY_ROWS)
def test_replay_counts(n_generated, n_offline, gamma, expected):
    assert formula(n_generated, n_offline, gamma) == expected  # the table itself follows the formula
    assert replay_counts(n_generated, n_offline, float(gamma)) == expected


@pytest.mark.parametrize(
    "n_generated, n_offline, expected",
    [
        (100, 10, (100, 0)),  # γ = 0 is documented as "no replay": every generated pair, even beyond N_off·(1−γ) = 10
        (7, 10, (7, 0)),  # fewer generated pairs than offline ones: all of them
        (0, 10, (0, 0)),  # nothing generated
    ],
)
def test_replay_counts_gamma_zero_means_no_replay(n_generated, n_offline, expected):
    assert replay_counts(n_generated, n_offline, 0.0) == expected


@pytest.mark.parametrize(
    "n_generated, n_offline, gamma",
    [
        (100, 10, "0.9"),  # formula: (1, 9); code: (0, 0) — the round gets no pair at all
        (1000, 100, "0.9"),  # formula: (10, 90); code: (9, 81)
        (100, 10, "0.8"),  # formula: (2, 8); code: (1, 4)
    ],
)
def test_replay_counts_exact_for_gammas_not_representable_in_binary(n_generated, n_offline, gamma):
    assert replay_counts(n_generated, n_offline, float(gamma)) == formula(n_generated, n_offline, gamma)
