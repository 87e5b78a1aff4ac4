"""Layer 3 for pipeline/length.py: best-vs-worst with length debiasing, the α sweep, experience-replay counts.

METHODS.md §1.4-1.5. Tables in, tables out, one comment per row.
"""

from fractions import Fraction
from math import floor

import numpy as np
import pytest

import pipeline.length as length_mod
from pipeline.length import best_worst, replay_counts, search_alpha

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
