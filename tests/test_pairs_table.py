"""Layer 3 for stages/pairs.py::generated_pairs: a LABELS table in, PAIRS columns and statistics out.

METHODS.md §1.3-1.4: drop responses cut at the token limit, degenerate and unscored ones; keep prompts with at
least `pairs.min_valid` valid responses; chosen = argmax, rejected = argmin of r − α·len; ties are dropped.
"""

import math

import pyarrow as pa
import pytest

from pipeline import schemas
from pipeline.config import RunConfig
from stages.pairs import generated_pairs


def label_rows(spec):
    """spec: (prompt_id, response, reward, finish_reason, num_tokens[, num_chars]) -> LABELS rows."""
    rows, idx = [], {}
    for prompt_id, response, reward, finish, tokens, *chars in spec:
        i = idx[prompt_id] = idx.get(prompt_id, -1) + 1
        rows.append(
            {
                "prompt_id": prompt_id,
                "prompt": f"prompt of {prompt_id}",
                "sample_idx": i,
                "response": response,
                "num_tokens": tokens,
                "num_chars": chars[0] if chars else len(response),
                "finish_reason": finish,
                "cumulative_logprob": -1.0,
                "seed": 0,
                "model": "models/tiny",
                "round": 1,
                "policy_logp": None if reward is None else -10.0,
                "reference_logp": None if reward is None else -10.0 - reward,
                "reward": reward,
                "labeller": "implicit_reward",
                "label_error": "too_long" if reward is None else None,
            }
        )
    return pa.Table.from_pylist(rows, schema=schemas.LABELS)


def cfg(**pairs):
    return RunConfig.model_validate({"pairs": {"debias_length": False, **pairs}})


# prompt_id, response, reward, finish_reason, num_tokens
TABLE = [
    ("p1", "p1 short", 1.0, "stop", 4),  # p1 rejected: the lowest reward among the valid
    ("p1", "p1 best", 3.0, "stop", 6),  # p1 chosen: the highest reward among the valid
    ("p1", "p1 cut high", 5.0, "length", 64),  # cut at the token limit: never chosen despite the top reward
    ("p1", "p1 cut low", -9.0, "length", 64),  # cut at the token limit: never rejected despite the lowest reward
    ("p2", "p2 only", 2.0, "stop", 3),  # p2's single valid response -> p2 is below min_valid=2, dropped
    ("p2", "   \n", 9.0, "stop", 2),  # whitespace only: degenerate
    ("p2", "p2 unscored", None, "stop", 5),  # null reward: unscored
    ("p3", "p3 a", 2.0, "stop", 3),  # p3: both rewards equal -> margin 0, a tie, dropped
    ("p3", "p3 b", 2.0, "stop", 7),
    ("p4", "p4 mid", 0.5, "stop", 10),
    ("p4", "p4 worst", -1.0, "stop", 20),  # p4 rejected
    ("p4", "p4 top", 0.7, "stop", 5),  # p4 chosen
    ("p4", "\t", 50.0, "stop", 1),  # degenerate with the highest reward: never chosen
    ("p4", " ", None, "length", 64),  # cut, blank and unscored: counted once, as cut
    ("p5", "same text", 1.0, "stop", 2),  # p5: two identical texts with different rewards -> dropped as a tie
    ("p5", "same text", 0.0, "stop", 2),
]


def test_best_vs_worst_without_length_debiasing():
    out, stats = generated_pairs(label_rows(TABLE), cfg(), k=1)
    assert out["prompt_id"] == ["p1", "p4"]  # in the labels' prompt order
    assert out["chosen"] == ["p1 best", "p4 top"]
    assert out["rejected"] == ["p1 short", "p4 worst"]
    assert out["chosen_reward"] == [3.0, 0.7]
    assert out["rejected_reward"] == [1.0, -1.0]
    assert out["chosen_len"] == [6, 5] and out["rejected_len"] == [4, 20]  # length_unit = tokens
    assert out["pair_id"] == ["r1-p1", "r1-p4"]
    assert out["prompt"] == ["prompt of p1", "prompt of p4"]
    assert out["source"] == ["generated", "generated"]
    assert out["alpha"] == [0.0, 0.0] and out["round"] == [1, 1]
    assert set(out) == set(schemas.PAIRS.names)
    pa.table(out, schema=schemas.PAIRS)  # the columns build a PAIRS table


def test_statistics():
    _, stats = generated_pairs(label_rows(TABLE), cfg(), k=1)
    assert stats["responses"] == 16
    assert stats["dropped_length"] == 3  # p1 cut high, p1 cut low, p4 " "
    assert stats["dropped_degenerate"] == 2  # p2 "   \n", p4 "\t" (p4 " " is counted as cut)
    assert stats["dropped_unscored"] == 1  # p2 unscored (p4 " " is counted as cut)
    assert stats["prompts"] == 5
    assert stats["prompts_below_min_valid"] == 1  # p2
    assert stats["dropped_ties"] == 2  # p3 (equal rewards), p5 (identical texts)
    assert stats["alpha"] == 0.0
    # the kept pairs: (6 − 4, 5 − 20) -> mean −6.5
    assert stats["length_gap"] == pytest.approx(-6.5)
    # before tie dropping, over p1, p3, p4, p5 at α = 0: (2, 0 [p3: chosen = rejected = col 0], −15, 0) -> −3.25
    assert stats["length_gap_alpha0"] == pytest.approx(-3.25)


def test_min_valid_three():
    out, stats = generated_pairs(label_rows(TABLE), cfg(min_valid=3), k=2)
    # p1 and p4 have 2 and 3 valid responses: only p4 keeps 3 or more; p3 and p5 have 2
    assert out["prompt_id"] == ["p4"]
    assert out["pair_id"] == ["r2-p4"] and out["round"] == [2]
    assert stats["prompts_below_min_valid"] == 4  # p1, p2, p3, p5
    assert stats["dropped_ties"] == 0


def test_min_chars_drops_short_responses():
    table = [
        ("q", "ab", 9.0, "stop", 1),  # 2 non-space characters < 3: degenerate
        ("q", "a b c", 1.0, "stop", 3),  # 3 non-space characters: valid (chosen)
        ("q", "  xyz  ", 0.0, "stop", 3),  # valid (rejected)
    ]
    out, stats = generated_pairs(label_rows(table), cfg(min_chars=3), k=1)
    assert (out["chosen"], out["rejected"]) == (["a b c"], ["  xyz  "])
    assert stats["dropped_degenerate"] == 1


def test_min_margin_drops_close_pairs():
    table = [
        ("a", "a good", 1.0, "stop", 3),  # margin 1.0 > 0.5: kept
        ("a", "a bad", 0.0, "stop", 3),
        ("b", "b good", 0.3, "stop", 3),  # margin 0.3 <= 0.5: dropped
        ("b", "b bad", 0.0, "stop", 3),
        ("c", "c good", 1.5, "stop", 3),  # margin exactly 0.5: not above min_margin, dropped
        ("c", "c bad", 1.0, "stop", 3),
    ]
    out, stats = generated_pairs(label_rows(table), cfg(min_margin=0.5), k=1)
    assert out["prompt_id"] == ["a"]
    assert stats["dropped_ties"] == 2


def test_nothing_valid():
    table = [
        ("a", "a1", 1.0, "length", 64),  # every response cut
        ("a", "a2", 0.0, "length", 64),
    ]
    out, stats = generated_pairs(label_rows(table), cfg(), k=1)
    assert out["pair_id"] == [] and stats["prompts_below_min_valid"] == 1
    assert stats["length_gap"] is None


def test_length_unit_chars():
    table = [
        ("a", "a long and good answer", 1.0, "stop", 5, 22),  # chosen: 22 chars, 5 tokens
        ("a", "a bad", 0.0, "stop", 3, 5),  # rejected
    ]
    out, _ = generated_pairs(label_rows(table), cfg(length_unit="chars"), k=1)
    assert (out["chosen_len"], out["rejected_len"]) == ([22], [5])
    out, _ = generated_pairs(label_rows(table), cfg(length_unit="tokens"), k=1)
    assert (out["chosen_len"], out["rejected_len"]) == ([5], [3])


def test_length_debiasing_flips_the_cheaper_prompt():
    table = [
        ("a", "a long", 1.0, "stop", 100),  # α = 0: chosen (long), flips once α > 0.1/90 ≈ 0.0011
        ("a", "a short", 0.9, "stop", 10),
        ("b", "b long", 1.5, "stop", 100),  # α = 0: chosen (long), flips once α > 0.5/90 ≈ 0.0056
        ("b", "b short", 1.0, "stop", 10),
    ]
    out, stats = generated_pairs(label_rows(table), cfg(debias_length=True, alpha_step=0.001), k=1)
    # sweep: α = 0 -> gap +90; 0.001 -> +90; 0.002 -> (−90 + 90)/2 = 0 (best); … 0.006 -> −90: stop
    assert stats["alpha"] == pytest.approx(0.002)
    assert stats["length_gap_alpha0"] == pytest.approx(90.0)
    assert stats["length_gap"] == pytest.approx(0.0)
    assert out["chosen"] == ["a short", "b long"]
    assert out["rejected"] == ["a long", "b short"]
    assert out["alpha"] == [pytest.approx(0.002)] * 2
    assert all(math.isclose(r, x) for r, x in zip(out["chosen_reward"], [0.9, 1.5]))  # rewards are r, not s
