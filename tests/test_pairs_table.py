"""Layer 3 for stages/pairs.py::generated_pairs: a LABELS table in, PAIRS columns and statistics out.

METHODS.md §1.3-1.4: drop responses cut at the token limit, degenerate and unscored ones; keep prompts with at
least `pairs.min_valid` valid responses; chosen = argmax, rejected = argmin of r − α·len; ties are dropped.
"""

import math

import pyarrow as pa
import pytest

from pipeline.config import RunConfig
from pipeline.data import schemas
from stages import pairs as stage


def generated_pairs(*args, **kwargs):
    """`stages.pairs.generated_pairs` with its Arrow columns (texts and token ids) as lists, to compare with lists;
    every other column must already be a list."""
    out, stats = stage.generated_pairs(*args, **kwargs)
    assert {c for c, v in out.items() if not isinstance(v, list)} <= set(stage.ARROW_COLUMNS)
    for c in stage.ARROW_COLUMNS:  # typed as PAIRS has them, so they go into pairs.parquet as they are
        assert isinstance(out[c], pa.Array) and out[c].type == schemas.PAIRS.field(c).type, c
    return {c: v.to_pylist() if isinstance(v, pa.Array) else v for c, v in out.items()}, stats


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


def test_whitespace_class_is_pythons():
    """The RE2 class the degenerate filter counts with is exactly str.isspace(), over every code point."""
    import pyarrow.compute as pc

    from stages.pairs import WHITESPACE

    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    found = pc.match_substring_regex(pa.array(chars), pattern=f"^[{WHITESPACE}]$").to_pylist()
    assert [c for c, f in zip(chars, found) if f != c.isspace()] == []


def test_max_chars_drops_long_responses():
    table = [
        ("q", "x" * 30, 9.0, "stop", 1),  # 30 characters > max_chars=20: dropped, despite the top reward
        ("q", "a b c", 1.0, "stop", 3),  # chosen
        ("q", "xyz", 0.0, "stop", 3),  # rejected
    ]
    out, stats = generated_pairs(label_rows(table), cfg(max_chars=20), k=1)
    assert (out["chosen"], out["rejected"]) == (["a b c"], ["xyz"])
    assert stats["dropped_over_max_chars"] == 1 and stats["dropped_degenerate"] == 0


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
    out, stats = generated_pairs(label_rows(table), cfg(debias_length=True), k=1)
    # exact curve: gap +90 on [0, 0.1/90], 0 on (0.1/90, 0.5/90) (best), −90 after: α = the middle of the best interval
    assert stats["alpha"] == pytest.approx((0.1 / 90 + 0.5 / 90) / 2)
    assert stats["alpha_search"] == "exact"
    assert stats["length_gap_alpha0"] == pytest.approx(90.0)
    assert stats["length_gap"] == pytest.approx(0.0)
    assert out["chosen"] == ["a short", "b long"]
    assert out["rejected"] == ["a long", "b short"]
    assert out["alpha"] == [pytest.approx(stats["alpha"])] * 2
    assert all(math.isclose(r, x) for r, x in zip(out["chosen_reward"], [0.9, 1.5]))  # rewards are r, not s


def test_grid_search_runs_in_the_reference_units():
    table = [
        ("a", "a long", 1.0, "stop", 100),  # the reference's reward is r/β = 10: flips once α_ref > 1/90 ≈ 0.0111
        ("a", "a short", 0.9, "stop", 10),
        ("b", "b long", 1.5, "stop", 100),  # flips once α_ref > 5/90 ≈ 0.0556
        ("b", "b short", 1.0, "stop", 10),
    ]
    out, stats = generated_pairs(label_rows(table), cfg(debias_length=True, alpha_search="grid", alpha_step=0.001), k=1)
    # grid on r/β (β = 0.1): α_ref = 0 … 0.011 -> gap +90; 0.012 -> 0 (best); … 0.056 -> −90: stop
    assert stats["alpha_reference_units"] == pytest.approx(0.012)
    assert stats["alpha"] == pytest.approx(0.0012)  # in the labels' units (r = β·Δlogp): α_ref·β
    assert out["chosen"] == ["a short", "b long"] and stats["length_gap"] == 0.0
    # the same grid on a python reward (no β to remove): α = 0.002 in the reward's own units
    py = RunConfig.model_validate({"label": {"labeller": "python", "python_reward": "m:f"},
                                   "pairs": {"alpha_search": "grid"}})  # fmt: skip
    _, stats = generated_pairs(label_rows(table), py, k=1)
    assert stats["alpha"] == pytest.approx(0.002) and stats["alpha_reference_units"] == pytest.approx(0.002)


# ---------------------------------------------------------------------------------------------- soft labels


def judge_cfg(**pairs):
    return RunConfig.model_validate(
        {"label": {"labeller": "judge", "judges": [{"backend": "python", "function": "m:f"}]}, "pairs": pairs}
    )


def preference_rows(spec):
    """spec: (prompt_id, idx_a, idx_b, annotator, p or None) -> PREFERENCES rows (p_ab/p_ba chosen to give p)."""
    rows = [
        {"prompt_id": pid, "idx_a": a, "idx_b": b, "annotator": who, "p_ab": None if p is None else p,
         "p_ba": None if p is None else 1 - p, "p": p, "error": "timeout" if p is None else None,
         "error_detail": None, "attempts": 2, "round": 1}
        for pid, a, b, who, p in spec
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=schemas.PREFERENCES)


# prompt_id, response, ranking score, finish_reason, num_tokens
JUDGED = [
    ("q1", "q1 best", 2.0, "stop", 50),  # q1 chosen by the ranking (long: no α for judges)
    ("q1", "q1 mid", 0.0, "stop", 10),
    ("q1", "q1 worst", -2.0, "stop", 5),  # q1 rejected
    ("q2", "q2 a", 1.0, "stop", 5),  # q2: best/worst compared by nobody without failure -> dropped
    ("q2", "q2 b", -1.0, "stop", 5),
    ("q3", "q3 a", 0.5, "stop", 5),  # q3: p̂ = ½ exactly -> a preference tie, dropped
    ("q3", "q3 b", -0.5, "stop", 5),
]
PREFS = [
    ("q1", 0, 1, "j1", 0.9), ("q1", 0, 1, "j2", 0.7),  # p̂(best ≻ mid) = 0.8
    ("q1", 0, 2, "j1", 0.6), ("q1", 0, 2, "j2", 1.0),  # p̂(best ≻ worst) = 0.8 from 2 annotators
    ("q1", 1, 2, "j1", 0.2), ("q1", 1, 2, "j2", None),  # p̂(mid ≻ worst) = 0.2, one annotator failed
    ("q2", 0, 1, "j1", None), ("q2", 0, 1, "j2", None),  # both failed
    ("q3", 0, 1, "j1", 0.4), ("q3", 0, 1, "j2", 0.6),  # p̂ = 0.5
]  # fmt: skip


def test_judges_best_worst_uses_ranking_and_p_hat():
    out, stats = generated_pairs(label_rows(JUDGED), judge_cfg(), k=1, preferences=preference_rows(PREFS))
    assert out["prompt_id"] == ["q1"] and (out["chosen"], out["rejected"]) == (["q1 best"], ["q1 worst"])
    assert out["preference"] == [pytest.approx(0.8)] and out["annotators"] == [2]  # mean of 0.6 and 1.0
    assert out["alpha"] == [0.0] and stats["alpha"] == 0.0  # length gap +45 left alone: the ranking decides
    assert stats["dropped_no_comparison"] == 1 and stats["dropped_preference_ties"] == 1


def test_judges_all_pairs_oriented_by_p_hat_and_min_annotators():
    out, stats = generated_pairs(label_rows(JUDGED), judge_cfg(strategy="all_pairs"), k=1, preferences=preference_rows(PREFS))
    # q1: (best, mid) 0.8; (best, worst) 0.8; (mid, worst) p̂ 0.2 -> flipped: worst ≻ mid at 0.8, from 1 annotator
    assert list(zip(out["chosen"], out["rejected"])) == [("q1 best", "q1 mid"), ("q1 best", "q1 worst"), ("q1 worst", "q1 mid")]
    assert out["preference"] == [pytest.approx(0.8)] * 3 and out["annotators"] == [2, 2, 1]
    assert out["pair_id"] == ["r1-q1-0-1", "r1-q1-0-2", "r1-q1-2-1"]
    assert stats["dropped_no_comparison"] == 1 and stats["dropped_preference_ties"] == 1  # q2, q3
    cfg = judge_cfg(strategy="all_pairs")
    cfg.label.min_annotators = 2  # the one-annotator comparison no longer counts
    out, stats = generated_pairs(label_rows(JUDGED), cfg, k=1, preferences=preference_rows(PREFS))
    assert len(out["pair_id"]) == 2 and stats["dropped_no_comparison"] == 2


def test_scalar_rewards_all_pairs_random_and_sigmoid():
    table = [
        ("a", "a1", 1.0, "stop", 3),
        ("a", "a2", 3.0, "stop", 3),
        ("a", "a3", 1.0, "stop", 3),  # a1 vs a3: equal rewards -> a tie, dropped
        ("a", "a4", 0.0, "stop", 3),
    ]
    out, stats = generated_pairs(label_rows(table), cfg(strategy="all_pairs"), k=1)
    assert len(out["pair_id"]) == 5 and stats["dropped_ties"] == 1  # C(4, 2) − 1
    assert all(c > r for c, r in zip(out["chosen_reward"], out["rejected_reward"]))
    assert out["preference"] == [1.0] * 5  # implicit reward: hard labels by default
    soft = RunConfig.model_validate({"pairs": {"strategy": "all_pairs", "preference_from_rewards": "sigmoid"}})
    out, _ = generated_pairs(label_rows(table), soft, k=1)
    assert out["preference"] == [pytest.approx(1 / (1 + math.exp(-(c - r)))) for c, r in
                                 zip(out["chosen_reward"], out["rejected_reward"])]  # fmt: skip
    rand = RunConfig.model_validate({"pairs": {"strategy": "random", "random_pairs_per_prompt": 5}})
    out, _ = generated_pairs(label_rows(table), rand, k=1)
    used = out["chosen"] + out["rejected"]
    assert len(used) == len(set(used)) and len(out["pair_id"]) <= 2  # disjoint, at most ⌊4/2⌋ per prompt
    again, _ = generated_pairs(label_rows(table), rand, k=1)
    assert again == out  # seeded by (seed, round)


def test_pairs_do_not_depend_on_the_reward_scale():
    """β (or any rescaling of the rewards) changes α by the same factor and leaves the pairs alone."""
    import numpy as np

    rng = np.random.default_rng(0)
    spec = []
    for p in range(20):
        for j in range(8):
            n = int(rng.integers(5, 300))
            spec.append((f"p{p}", f"p{p} response {j} " + "x" * n, float(rng.normal() + 0.004 * n), "stop", n))
    base, base_stats = generated_pairs(label_rows(spec), cfg(debias_length=True), k=1)
    assert base_stats["length_gap_alpha0"] > 50  # a real length bias to remove
    for c in (0.01, 0.1, 7.0):
        scaled = [(p, r, x * c, f, n) for p, r, x, f, n in spec]
        out, stats = generated_pairs(label_rows(scaled), cfg(debias_length=True), k=1)
        assert (out["chosen"], out["rejected"]) == (base["chosen"], base["rejected"])
        assert stats["alpha"] == pytest.approx(c * base_stats["alpha"])


def test_the_stage_reads_texts_and_ids_only_of_the_rows_it_pairs_across_row_groups(tmp_path, monkeypatch):
    """stages.pairs.run reads labels.parquet's small columns whole and its texts and ids a row group at a time, at the
    rows it pairs: the same pairs, texts and token ids as the in-memory selection, whatever the row groups."""
    import json

    import pyarrow.parquet as pq

    import pipeline.data.artifacts as artifacts
    from pipeline.data.artifacts import StagePlan

    table = label_rows(TABLE)
    ids = [[7 + i, 8 + i] for i in range(table.num_rows)]  # distinct ids per row: a mix-up shows
    table = table.set_column(table.schema.get_field_index("prompt_token_ids"), "prompt_token_ids",
                             pa.array([[1, i] for i in range(table.num_rows)], schemas.TOKEN_IDS))  # fmt: skip
    table = table.set_column(table.schema.get_field_index("response_token_ids"), "response_token_ids",
                             pa.array(ids, schemas.TOKEN_IDS))  # fmt: skip
    monkeypatch.setattr(artifacts, "ROW_GROUP_ROWS", 3)
    artifacts.write_parquet(table, tmp_path / "labels.parquet", schemas.LABELS)
    assert pq.ParquetFile(tmp_path / "labels.parquet").num_row_groups == 6
    offline = tmp_path / "offline.jsonl"
    offline.write_text("".join(json.dumps({"prompt": f"o{i}", "chosen": "c", "rejected": "r"}) + "\n" for i in range(4)))
    config = RunConfig.model_validate({"pairs": {"debias_length": False}, "data": {"offline": str(offline)}})
    plan = StagePlan("pairs", 1, tmp_path, {"labels": tmp_path / "labels.parquet"},
                     {"pairs": tmp_path / "pairs.parquet"}, {})  # fmt: skip
    stats = stage.run(config, plan)
    written = pq.read_table(tmp_path / "pairs.parquet").filter(pa.compute.equal(pa.compute.field("source"), "generated"))
    expected, _ = generated_pairs(table, config, k=1)
    assert stats["pairs_generated"] == written.num_rows == len(expected["pair_id"]) == 2
    for column in ("pair_id", "prompt", "chosen", "rejected", "prompt_token_ids", "chosen_token_ids", "rejected_token_ids"):
        got = written[column].to_pylist()
        want = expected[column] if isinstance(expected[column], list) else expected[column].to_pylist()
        assert sorted(map(str, got)) == sorted(map(str, want)), column
    by_text = dict(zip(table["response"].to_pylist(), ids))
    assert [by_text[t] for t in written["chosen"].to_pylist()] == written["chosen_token_ids"].to_pylist()
    assert [by_text[t] for t in written["rejected"].to_pylist()] == written["rejected_token_ids"].to_pylist()
