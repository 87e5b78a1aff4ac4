"""Layers 1-3 for evaluation (pipeline/method/evaluation.py, EvalConfig, the evaluate plan, the annotators of
stages/evaluate.py on given responses): hand-checked win rates and intervals, the length-controlled win rate's
defining properties on synthetic judges, agreement, the stopping rule, and bad input. No engine is started here:
tests/test_flow_e2e.py runs the stage in the real flow and `dice eval` on two real models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.data.artifacts import ArtifactError
from pipeline.data.datasets import prompt_texts, read_reference_outputs, text_key
from pipeline.method import evaluation
from pipeline.run import rounds
from stages import evaluate

from .conftest import REPO

# ---------------------------------------------------------------------------------------------- win rate


def test_win_rate_counts_ties_half():
    """p̂ = 1, 0, ½, ½: one win, one loss, two ties -> (1 + 0 + ½ + ½)/4 = 0.5; soft p̂ 0.9 and 0.3 -> 0.6."""
    assert evaluation.win_rate(np.array([1.0, 0.0, 0.5, 0.5])) == 0.5
    assert evaluation.win_rate(np.array([0.9, 0.3])) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="no comparisons"):
        evaluation.win_rate(np.array([]))


def test_bootstrap_resamples_prompts_not_rows():
    """Prompt a has four rows all won, prompt b four rows all lost. Resampling prompts, a replicate holds 0, 1 or 2
    copies of a out of 2 prompts: its win rate is 0, ½ or 1, nothing else; resampling rows would give eighths."""
    p = np.array([1.0] * 4 + [0.0] * 4)
    pids = ["a"] * 4 + ["b"] * 4
    seen = set()
    evaluation.bootstrap_interval(lambda idx: seen.add(float(p[idx].mean())) or 0.0, pids, 200, seed=0)
    assert seen == {0.0, 0.5, 1.0}
    lo, hi = evaluation.win_rate_interval(p, pids, 2000, seed=0)
    assert (lo, hi) == (0.0, 1.0)  # P(all a or all b) = ½ each draw-pair: both ends are in the 2.5%/97.5% tails


def test_win_rate_interval_matches_the_generic_bootstrap_and_is_seeded():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, 60)
    pids = [f"q{i // 3}" for i in range(60)]  # 20 prompts × 3 samples
    fast = evaluation.win_rate_interval(p, pids, 500, seed=7)
    assert fast == evaluation.win_rate_interval(p, pids, 500, seed=7)
    assert fast[0] < evaluation.win_rate(p) < fast[1]
    # the same seed draws the same prompts in both (one (B, G) matrix = B rows of G draws from one stream): the
    # vectorised interval is the generic one to rounding, so a wrong sum or count in the fast path cannot hide
    slow = evaluation.bootstrap_interval(lambda idx: p[idx].mean(), pids, 500, seed=7)
    assert fast == pytest.approx(slow, abs=1e-12)
    assert fast != evaluation.win_rate_interval(p, pids, 500, seed=8)  # the seed matters
    assert evaluation.win_rate_interval(p, pids, 0) is None


# ---------------------------------------------------------------------------------------------- length control


def _lengths(n: int, seed: int, longer_by: float):
    """Lengths in hundreds of characters: the baseline's ~ N(3, 0.8), the policy's `longer_by` longer on average
    (difference std 1)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(3, 0.8, n).clip(0.1)
    pol = (base + rng.normal(longer_by, 1.0, n)).clip(0.1)
    return pol, base


@pytest.mark.parametrize("seed", range(5))
def test_length_only_judge_raw_win_rate_high_lc_near_half(seed):
    """A judge that prefers the longer response and nothing else, p = σ(len_a − len_b) (lengths in hundreds of
    characters): a policy that answers longer (by 100 chars on average) wins far more than half the raw comparisons,
    yet at equal length the judge has no preference, so the LC win rate is ½ (to 0.02, over five seeds)."""
    pol, base = _lengths(400, seed, longer_by=1.0)
    p = 1 / (1 + np.exp(-(pol - base)))
    raw, lc = evaluation.win_rate(p), evaluation.length_controlled(p, pol, base)
    assert raw > 0.65
    assert abs(lc.lc_win_rate - 0.5) < 0.02
    assert lc.phi > 1  # the length term carries the preference


def test_step_like_length_judge_is_pulled_towards_half():
    """The limit of the tanh form (AlpacaEval's too): a judge whose length preference is a near step,
    p = σ(100·(len_a − len_b)), is not a logistic-tanh curve, so the LC win rate keeps a residual; it still moves
    from raw ≈ 0.7 to within 0.12 of ½ (five seeds)."""
    for seed in range(5):
        pol, base = _lengths(400, seed, longer_by=0.6)
        p = 1 / (1 + np.exp(-100 * (pol - base)))
        assert evaluation.win_rate(p) > 0.65
        assert abs(evaluation.length_controlled(p, pol, base).lc_win_rate - 0.5) < 0.12


def test_a_tanh_length_judge_is_fitted_exactly():
    """A judge whose preference is exactly the model's form, logit p = 2·tanh(Δ/σ_Δ), gives back θ = 0, φ = 2."""
    pol, base = _lengths(400, 0, longer_by=1.0)
    q = 1 / (1 + np.exp(-2.0 * np.tanh((pol - base) / (pol - base).std(ddof=1))))
    fit = evaluation.length_controlled(q, pol, base, l2=1e-6)
    assert fit.theta == pytest.approx(0.0, abs=1e-3) and fit.phi == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize("seed", range(5))
def test_length_blind_judge_raw_and_lc_agree(seed):
    """A judge that ignores length, on a policy that answers longer: soft p̂ = σ(ε) with ε ~ N(0.9, 1) independent
    of the lengths: raw and LC agree to 0.02; hard votes (win with probability 0.7) to 0.05, their sampling noise
    (the fitted φ is noise, and x = tanh(Δ/σ_Δ) has a non-zero mean, so it moves θ)."""
    pol, base = _lengths(1000, seed, longer_by=1.0)
    rng = np.random.default_rng(100 + seed)
    soft = 1 / (1 + np.exp(-rng.normal(0.9, 1.0, 1000)))
    assert evaluation.length_controlled(soft, pol, base).lc_win_rate == pytest.approx(evaluation.win_rate(soft), abs=0.02)
    hard = (rng.uniform(size=1000) < 0.7).astype(float)
    assert evaluation.length_controlled(hard, pol, base).lc_win_rate == pytest.approx(evaluation.win_rate(hard), abs=0.05)
    constant = np.full(1000, 0.62)  # constant soft p̂: the fit is the intercept alone (up to the small L2)
    assert evaluation.length_controlled(constant, pol, base).lc_win_rate == pytest.approx(0.62, abs=1e-3)


def test_lc_hand_checked_forms():
    """No length variation: the length term drops out and σ(θ) is the mean p̂ (intercept-only logistic MLE, λ → 0).
    Separable data (every p̂ = 1, equal lengths) stay finite through the L2 term: the optimum has
    n·(1 − σ(θ)) = λ·θ, with n = 10 and λ = 0.01 θ = 5.2452 (bisection), LC = σ(θ) = 0.99475."""
    fit = evaluation.length_controlled(np.array([1.0, 0.0, 1.0, 1.0]), np.full(4, 50), np.full(4, 50), l2=1e-9)
    assert fit.sigma_len == 0 and fit.phi == 0 and fit.lc_win_rate == pytest.approx(0.75, abs=1e-6)
    allwin = evaluation.length_controlled(np.ones(10), np.full(10, 5.0), np.full(10, 5.0), l2=0.01)
    assert allwin.theta == pytest.approx(5.2452, abs=1e-4) and allwin.lc_win_rate == pytest.approx(0.99475, abs=1e-5)
    # with a length term too, the first-order conditions hold at the optimum (both parameters penalised)
    lens = np.arange(10) + 5.0
    fit = evaluation.length_controlled(np.ones(10), lens, np.full(10, 5.0), l2=0.01)
    x = np.tanh((lens - 5.0) / (lens - 5.0).std(ddof=1))
    resid = 1 - 1 / (1 + np.exp(-(fit.theta + fit.phi * x)))
    assert abs(resid.sum() - 0.01 * fit.theta) < 1e-8 and abs((resid * x).sum() - 0.01 * fit.phi) < 1e-8
    assert math.isfinite(fit.theta) and fit.predict(np.array([0.0]))[0] == pytest.approx(fit.lc_win_rate)


def test_lc_interval_is_the_prompt_bootstrap_of_the_refitted_model():
    """lc_interval is the generic prompt bootstrap of σ(θ) refitted per replicate, same seed, same draws: equal to
    rounding (σ is monotone, so the percentile of σ(θ) is σ of the percentile of θ up to the interpolation between two
    neighbouring replicates). For a length-only judge on 300 rows the interval holds ½ and excludes the raw rate."""
    pol, base = _lengths(300, seed=3, longer_by=0.5)
    p = 1 / (1 + np.exp(-(pol - base)))
    pids = [f"q{i // 3}" for i in range(300)]
    lo, hi = evaluation.lc_interval(p, pol, base, pids, 200, seed=0)
    generic = evaluation.bootstrap_interval(lambda idx: evaluation.length_controlled(p[idx], pol[idx], base[idx]).theta,
                                            pids, 200, seed=0)  # fmt: skip
    assert (lo, hi) == pytest.approx(tuple(1 / (1 + np.exp(-np.array(generic)))), abs=1e-12)
    assert lo < 0.5 < hi and hi < evaluation.win_rate(p)


# ---------------------------------------------------------------------------------------------- controls (LC identified)


def _world(longer_by: float, seed: int, judge: str, hard: bool = False, prompts: int = 100, k: int = 4):
    """100 prompts × 4 samples per side. Lengths (hundreds of characters): the baseline's ~ N(3, 0.8), the policy's
    the baseline's sample plus N(longer_by, 1), so Δ's mean/sd is `longer_by` and the policy is longer on nearly every
    row at 3 and 10. Each response has a quality ~ N(μ, 0.5), μ = 1.3 for the policy, 0 for the baseline.

    judge "blind": p = σ(q_a − q_b), length plays no part; "length": p = σ(3·tanh(Δ)), quality plays no part (a
    preference that saturates with the length difference, the form the LC model assumes). `hard`: a 0/1 vote drawn
    with that probability. Returns the policy rows (p, len_policy, len_baseline, prompt ids) and the control rows:
    every pair of one side's samples of a prompt (6 per side per prompt), as the evaluate stage forms them."""
    from itertools import combinations

    rng = np.random.default_rng(seed)
    lb = rng.normal(3, 0.8, (prompts, k))
    lp = lb + rng.normal(longer_by, 1.0, (prompts, k))
    qb, qp = rng.normal(0, 0.5, (prompts, k)), rng.normal(1.3, 0.5, (prompts, k))

    def pref(qa, qb_, la, lb_):
        pr = 1 / (1 + np.exp(-((qa - qb_) if judge == "blind" else 3 * np.tanh(la - lb_))))
        return (rng.uniform(size=pr.size) < pr).astype(float) if hard else pr

    pids = np.repeat(np.arange(prompts), k).astype(str)
    p = pref(qp.ravel(), qb.ravel(), lp.ravel(), lb.ravel())
    ia, ib = zip(*combinations(range(k), 2))
    ia, ib = list(ia), list(ib)
    a = np.concatenate([lb[:, ia].ravel(), lp[:, ia].ravel()])
    b = np.concatenate([lb[:, ib].ravel(), lp[:, ib].ravel()])
    pc = pref(np.concatenate([qb[:, ia].ravel(), qp[:, ia].ravel()]), np.concatenate([qb[:, ib].ravel(), qp[:, ib].ravel()]), a, b)
    cids = np.concatenate([np.repeat(np.arange(prompts), len(ia))] * 2).astype(str)
    return p, lp.ravel(), lb.ravel(), pids, evaluation.Controls(pc, a, b), cids


@pytest.mark.parametrize("longer_by", [3.0, 10.0])
@pytest.mark.parametrize("seed", range(5))
def test_lc_with_controls_length_blind_judge_policy_longer_everywhere(seed, longer_by):
    """A length-blind judge that prefers the policy on ~77% of rows, the policy longer on (nearly) every row: without
    control rows tanh(Δ/σ_Δ) is almost constant there, θ and φ are not identified and the fit said so; with them φ is
    learnt where quality is equal and ≈ 0, so LC lies inside the raw win rate's 95% interval (soft p̂). With 0/1 votes
    φ is noisier; the raw rate then lies inside LC's own 95% interval."""
    p, lp, lb, pids, control, cids = _world(longer_by, seed, "blind")
    assert (lp > lb).mean() > 0.99
    alone = evaluation.length_controlled(p, lp, lb)
    assert not alone.identified and math.isnan(alone.lc_win_rate) and "not identified" in alone.reason
    assert evaluation.lc_interval(p, lp, lb, pids, 50) is None
    fit = evaluation.length_controlled(p, lp, lb, control=control)
    lo, hi = evaluation.win_rate_interval(p, pids, 1000, seed=0)
    assert fit.identified and fit.control_rows == 1200 and lo <= fit.lc_win_rate <= hi
    assert abs(fit.phi) < 0.2
    p, lp, lb, pids, control, cids = _world(longer_by, seed, "blind", hard=True)
    fit = evaluation.length_controlled(p, lp, lb, control=control)
    lo, hi = evaluation.lc_interval(p, lp, lb, pids, 200, control=control, control_prompt_ids=cids)
    assert lo <= evaluation.win_rate(p) <= hi and lo < fit.lc_win_rate < hi and hi - lo < 0.15


@pytest.mark.parametrize("longer_by", [3.0, 10.0])
@pytest.mark.parametrize("seed", range(5))
def test_lc_with_controls_length_only_judge_is_half(seed, longer_by):
    """A judge that prefers length only, the policy longer on (nearly) every row: raw ≈ 0.95, yet at equal length the
    judge has no preference, so LC = ½ ± 0.03; the control rows carry φ ≈ 3 (the judge's own weight)."""
    p, lp, lb, pids, control, cids = _world(longer_by, seed, "length")
    fit = evaluation.length_controlled(p, lp, lb, control=control)
    assert evaluation.win_rate(p) > 0.9
    assert fit.lc_win_rate == pytest.approx(0.5, abs=0.03) and fit.phi == pytest.approx(3.0, abs=0.2)


def test_lc_identification_rule_without_controls():
    """Without control rows σ(θ) extrapolates to Δ = 0 from the policy rows; it is reported only when at least 5% of
    them lie on each side of Δ = 0. Δ = −1 on 1 row of 40 (2.5%): not identified; on 2 of 40 (5%): identified; equal
    lengths everywhere: the intercept alone, identified. Too few control rows do not help."""
    lb = np.full(40, 10.0)
    lp = lb + np.r_[-1.0, np.arange(1.0, 40.0)]
    p = np.linspace(0.2, 0.9, 40)
    assert not evaluation.length_controlled(p, lp, lb).identified
    lp[1] = 9.0
    assert evaluation.length_controlled(p, lp, lb).identified
    assert evaluation.length_controlled(p, lb, lb).identified
    lp[1] = 12.0
    few = evaluation.Controls(np.full(5, 0.5), np.arange(5.0), np.arange(5.0)[::-1])
    fit = evaluation.length_controlled(p, lp, lb, control=few)
    assert not fit.identified and "only 5 control rows" in fit.reason


def _alpaca_minimal_lc(p: np.ndarray, len_model: np.ndarray, len_baseline: np.ndarray, c: float = 100.0) -> tuple[float, float]:
    """alpaca_eval's `length_controlled_minimal` (src/alpaca_eval/metrics/glm_winrate.py), written from its
    description, not its code: features tanh(std_delta_len) with std_delta_len = (len_1 − len_2)/std(len_1 − len_2),
    output_1 the BASELINE, and not_gamed_baseline (1 on every row: the intercept); no fitted intercept; p̂ the soft
    preference for the model (its preference − 1); each row entered twice, label 1 with weight p̂ and label 0 with
    weight 1 − p̂; L1 penalty with inverse strength C (liblinear minimises ‖w‖₁ + C·Σ weighted log-losses). The LC win
    rate is the mean prediction at std_delta_len = 0, in percent. Returns (LC in percent, the length weight)."""
    d = len_baseline - len_model
    x = np.column_stack([np.tanh(d / d.std(ddof=1)), np.ones_like(p)])  # (N, 2): [length, not_gamed_baseline]
    w = np.zeros(2)
    for _ in range(200):  # Newton on C·loss + ‖w‖₁, smooth where no weight is 0 (both are far from 0 here)
        s = 1 / (1 + np.exp(-(x @ w)))
        grad = c * x.T @ (s - p) + np.sign(w)
        hess = c * (x.T * (s * (1 - s))) @ x
        w = w - np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
    return 100 / (1 + np.exp(-w[1])), float(w[0])


def test_lc_matches_alpaca_evals_minimal_glm():
    """On the same annotations (soft p̂, the policy longer on average, Δ changing sign), dice's LC equals alpaca_eval's
    `length_controlled_minimal` form to 0.05 percentage points, after the departures are matched: a fraction, not a
    percent; Δ = policy − baseline, so φ has the opposite sign; dice's small L2 against its L1 with C = 100."""
    pol, base = _lengths(400, 0, longer_by=0.8)
    rng = np.random.default_rng(5)
    p = 1 / (1 + np.exp(-(0.4 + 1.5 * np.tanh((pol - base) / (pol - base).std(ddof=1)) + rng.normal(0, 1, 400))))
    ours = evaluation.length_controlled(p, pol, base, l2=1e-4)
    theirs, weight = _alpaca_minimal_lc(p, pol, base)
    assert 100 * ours.lc_win_rate == pytest.approx(theirs, abs=0.05)
    assert ours.phi == pytest.approx(-weight, abs=0.01) and ours.phi > 1


# ---------------------------------------------------------------------------------------------- annotators


def test_agreement_counts_sides_over_annotator_pairs():
    """Rows × 3 annotators. Pairs (0,1): rows 0,1,2 -> sides agree on 0 and 2 (row 1: > vs <): 2/3. Pairs (0,2):
    row 0 and 1 (row 2 failed for annotator 2): agree on row 1 only (row 0: > vs =): 1/2. Pairs (1,2): rows 0,1:
    agree on none: 0/2. Total (2 + 1 + 0)/(3 + 2 + 2) = 3/7."""
    p = np.array([[0.9, 0.8, 0.5], [0.6, 0.4, 0.7], [0.2, 0.1, np.nan]])
    assert evaluation.agreement(p) == pytest.approx(3 / 7)
    assert evaluation.agreement(p[:, :1]) is None


def test_scalar_and_reward_preferences():
    np.testing.assert_array_equal(
        evaluation.scalar_preference(np.array([1.0, 0.2, 0.5, np.nan]), np.array([0.5, 0.3, 0.5, 1.0])),
        [1.0, 0.0, 0.5, np.nan],
    )
    assert evaluation.reward_preference(np.array([2.0]), np.array([2.0]))[0] == 0.5
    assert evaluation.reward_preference(np.array([1.0]), np.array([0.0]))[0] == pytest.approx(1 / (1 + math.exp(-1)))


# ---------------------------------------------------------------------------------------------- stopping


def test_stopping_rule_initial_baseline():
    """Against π_0, round 0 counts as ½. LC 0.60, 0.66, 0.65, 0.655 with min_gain 0.01: round 1 and 2 improve, 3
    and 4 do not beat 0.66 + 0.01: two rounds without a gain -> patience 2 stops, best round 2."""
    lcs = [(1, 0.60), (2, 0.66), (3, 0.65), (4, 0.655)]
    state = evaluation.progress(lcs, "initial", 0.01, 2)
    assert (state.best_round, state.best_lc, state.rounds_without_gain, state.stop) == (2, 0.66, 2, True)
    assert "rounds 3, 4" in state.reason and "best round 2" in state.reason
    assert not evaluation.progress(lcs[:3], "initial", 0.01, 2).stop
    assert not evaluation.progress(lcs, "initial", 0.01, None).stop  # no patience: never stops
    # a first round that does not beat π_0 is already a round without gain
    assert evaluation.progress([(1, 0.49)], "initial", 0.0, 1).stop


def test_stopping_rule_previous_and_file_baselines():
    """previous: each LC already compares with the round before, so a gain is LC > ½ + min_gain; best_round is the
    last round that beat its predecessor. file: the first evaluated round (even round 0) sets the bar."""
    prev = evaluation.progress([(1, 0.7), (2, 0.52), (3, 0.51)], "previous", 0.05, 2)
    assert (prev.best_round, prev.stop) == (1, True)
    file = evaluation.progress([(0, 0.3), (1, 0.4), (2, 0.39)], "file", 0.0, 1)
    assert (file.best_round, file.best_lc, file.stop) == (1, 0.4, True)


# ---------------------------------------------------------------------------------------------- config and plans


def _cfg(tmp_path, **eval_kw) -> RunConfig:
    return RunConfig.model_validate({"runs_dir": str(tmp_path / "runs"), "eval": eval_kw})


def test_eval_config_validation(tmp_path):
    assert RunConfig().eval.annotator_ids() == ["overlap"]  # the tiny preset's rule-based judge
    with pytest.raises(ValueError, match="needs an annotator"):
        _cfg(tmp_path, judges=[])
    assert _cfg(tmp_path, judges=[], enabled=False).eval.enabled is False
    with pytest.raises(ValueError, match="greedy"):
        _cfg(tmp_path, temperature=0, num_samples=2)
    with pytest.raises(ValueError, match="unique"):
        _cfg(tmp_path, judges=[{"id": "python_metric", "backend": "python", "function": "m:f"}], python_metric="m:f")
    with pytest.raises(ConfigError, match="field eval.bootstrap"):
        load_config(None, ["eval.bootstrap=-1"])
    cfg = _cfg(tmp_path, judges=[{"id": "a", "backend": "python", "function": "m:f"}], reward_model="rm",
               python_metric="m:g")  # fmt: skip
    assert cfg.eval.annotator_ids() == ["a", "reward_model", "python_metric"]


def test_evaluate_is_the_last_stage_where_it_compares_two_things(tmp_path):
    cfg = _cfg(tmp_path)
    assert rounds.stages_of_round(cfg, 1)[-1] == "evaluate"
    assert "evaluate" not in rounds.stages_of_round(cfg, 0)  # π_0 against π_0
    prev = _cfg(tmp_path, baseline="previous")
    assert rounds.stages_of_round(prev, 0)[-1] == "evaluate"  # π_0 against the SFT model round 0 started from
    skip = RunConfig.model_validate({"runs_dir": str(tmp_path), "round0": {"mode": "skip"}, "eval": {"baseline": "previous"}})
    assert rounds.stages_of_round(skip, 0) == ()  # π_-1 = π_0 without model.reference
    with_file = RunConfig.model_validate({"runs_dir": str(tmp_path), "round0": {"mode": "skip"},
                                          "eval": {"baseline": "ref.json"}})  # fmt: skip
    assert rounds.stages_of_round(with_file, 0) == ("evaluate",)
    off = _cfg(tmp_path, enabled=False)
    assert "evaluate" not in rounds.stages_of_round(off, 1)


def test_evaluate_plan_inputs_change_with_judges_and_baseline(tmp_path):
    """What re-runs the stage: its plan's inputs and config. The baseline model (π_0 / π_{k-1}) and every judge's
    model and template are inputs; the stopping rule is not (changing it must not re-evaluate)."""
    from pipeline.data.artifacts import plan_digest

    cfg = _cfg(tmp_path, judges=[{"id": "local", "backend": "vllm"}])
    plan = rounds.plan(cfg, 2, "evaluate")
    assert plan.inputs["policy"] == rounds.model_of(cfg, 2) and plan.inputs["baseline"] == rounds.model_of(cfg, 0)
    assert plan.inputs["judge:local"] == rounds.model_of(cfg, 0)  # the same judge every round: π_0
    assert {"prompts", "train_prompts", "offline", "template:local"} <= set(plan.inputs)
    prev = rounds.plan(_cfg(tmp_path, baseline="previous", judges=[{"id": "local", "backend": "vllm"}]), 2, "evaluate")
    assert prev.inputs["baseline"] == rounds.model_of(cfg, 1) and prev.roles["baseline"] == "π_1"
    stop = _cfg(tmp_path, judges=[{"id": "local", "backend": "vllm"}], stop_after_no_gain=2, min_gain=0.01)
    assert plan_digest(rounds.plan(stop, 2, "evaluate")) == plan_digest(plan)
    other = _cfg(tmp_path, judges=[{"id": "local", "backend": "vllm", "template": "conf/judges/pairwise-brief.txt"}])
    assert plan_digest(rounds.plan(other, 2, "evaluate")) != plan_digest(plan)
    standalone = rounds.standalone_eval_plan(cfg, "a/model", "b/model", tmp_path / "out")
    assert standalone.round == -1 and standalone.inputs["judge:local"] == "b/model"
    assert standalone.outputs["eval"] == tmp_path / "out" / "eval.parquet"


# ---------------------------------------------------------------------------------------------- data


def test_tiny_eval_prompts_are_held_out():
    """The shipped held-out prompts share no text with the tiny preset's training prompts or offline set (the stage
    would refuse them), and the toy task's neither."""
    for held, train, offline in (("data/eval_prompts.jsonl", "data/prompts.jsonl", "data/offline_prefs.jsonl"),
                                 ("data/toy/eval_prompts.jsonl", "data/toy/prompts.jsonl", "data/toy/offline_prefs.jsonl")):  # fmt: skip
        texts = prompt_texts(REPO / held)
        assert len(texts) >= 40
        assert not texts & (prompt_texts(REPO / train) | prompt_texts(REPO / offline, "offline"))


def test_overlap_is_refused_and_counted(tmp_path):
    prompts = tmp_path / "eval.jsonl"
    train = [json.loads(x)["prompt"] for x in (REPO / "data/prompts.jsonl").read_text().splitlines()[:2]]
    shout = train[1].upper().rstrip(".?!") + " !!"  # case and punctuation do not hide a copy either
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "A prompt only the SFT corpus has.", "chosen": "x"}) + "\n")
    rows = [{"prompt_id": "x0", "prompt": "  " + train[0].replace(" ", "  ")}, {"prompt_id": "x1", "prompt": "Fresh question?"},
            {"prompt_id": "x2", "prompt": shout}, {"prompt_id": "x3", "prompt": "a prompt, only the SFT corpus has"}]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"runs_dir={tmp_path}", f"eval.prompts={prompts}", f"model.tiny_data=[{sft}]",
                             f"data.prompts={REPO / 'data/prompts.jsonl'}", f"data.offline={REPO / 'data/offline_prefs.jsonl'}"])  # fmt: skip
    kept, stats = evaluate.held_out_prompts(cfg, rounds.plan(cfg, 1, "evaluate"))
    assert kept == [("x1", "Fresh question?")] and stats["prompts_overlap"] == 3  # whitespace does not hide a copy
    assert str(sft) in stats["overlap_checked"]
    assert evaluate.overlap_key("Hello,  World! (ref 12).") == "hello world ref 12"
    cfg = load_config(None, [f"runs_dir={tmp_path}", f"eval.prompts={REPO / 'data/prompts.jsonl'}",
                             f"data.prompts={REPO / 'data/prompts.jsonl'}"])  # fmt: skip
    with pytest.raises(ValueError, match=r"data/prompts.jsonl: all 320 held-out prompts also appear in"):
        evaluate.held_out_prompts(cfg, rounds.plan(cfg, 1, "evaluate"))


def test_reference_outputs_file(tmp_path):
    """AlpacaEval's `model_outputs.json` shape (a JSON list) or JSONL; errors name the file and the row."""
    good = tmp_path / "ref.json"
    good.write_text(json.dumps([{"instruction": "Say  hi.", "output": "hi", "generator": "gpt"}]))
    assert read_reference_outputs(good) == {text_key("Say hi."): "hi"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "x"}) + "\n" + json.dumps({"instruction": "b"}) + "\n")
    with pytest.raises(ArtifactError, match=r"bad.jsonl: line 2: field 'output' must be a string"):
        read_reference_outputs(bad)
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"instruction": "a", "output": "x"}, {"instruction": "a", "output": "y"}]))
    with pytest.raises(ArtifactError, match="dup.json: row 1: instruction 'a' appears twice"):
        read_reference_outputs(dup)
    notlist = tmp_path / "obj.json"
    notlist.write_text("{}")
    with pytest.raises(ArtifactError, match="obj.json: expected a JSON list"):
        read_reference_outputs(notlist)


def test_reference_outputs_missing_a_prompt_is_an_error_before_generation(tmp_path):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "q1", "prompt": "One?"}) + "\n" + json.dumps({"prompt_id": "q2", "prompt": "Two?"}) + "\n")
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps([{"instruction": "One?", "output": "1"}]))
    cfg = load_config(None, [f"runs_dir={tmp_path}", f"eval.prompts={prompts}", f"eval.baseline={ref}",
                             f"data.prompts={REPO / 'data/prompts.jsonl'}", f"data.offline={REPO / 'data/offline_prefs.jsonl'}"])  # fmt: skip
    plan = rounds.plan(cfg, 1, "evaluate")  # the policy π_1 does not exist: nothing may be generated before this check
    with pytest.raises(ValueError, match=r"ref.json: no output for 1 of the 2 held-out prompts \(first: prompt_id 'q2'"):
        evaluate.run(cfg, plan)
    missing = load_config(None, [f"runs_dir={tmp_path}", f"eval.prompts={prompts}", "eval.baseline=intial"])
    with pytest.raises(ValueError, match="eval.baseline intial: not 'initial', 'previous' or an existing"):
        evaluate.run(missing, rounds.plan(missing, 1, "evaluate"))


# ---------------------------------------------------------------------------------------------- annotators on given rows


def always_fails(prompt: str, a: str, b: str) -> float:
    raise RuntimeError("judge backend down")


def prefers_longer(prompt: str, a: str, b: str) -> float:
    """A length-only judge: p = σ(len(a) − len(b)) in characters."""
    return 1 / (1 + math.exp(-(len(a) - len(b))))


def test_annotators_on_given_rows(tmp_path):
    """Python judges (both orders, symmetrised) and the Python metric (compared scalars) on three rows."""
    cfg = _cfg(tmp_path, judges=[{"id": "long", "backend": "python", "function": "tests.test_evaluation:prefers_longer"}],
               python_metric="pipeline.method.rewards:prompt_coverage")  # fmt: skip
    plan = rounds.plan(cfg, 1, "evaluate")
    prompts = ["Name a red fruit", "Name a red fruit", "Describe winter weather"]
    policy = ["A red fruit: cherry, a fruit that is red", "x", "winter"]
    baseline = ["apple", "a red fruit", "winter weather is cold"]
    p, errors, scores, stats = evaluate.annotate(cfg, plan, prompts, policy, baseline)
    assert p.shape == (3, 2) and stats["comparisons_failed"] == 0
    np.testing.assert_allclose(p[:, 0], [prefers_longer("", a, b) for a, b in zip(policy, baseline)])
    # prompt_coverage: row 0 uses "fruit" (1 of 1 four-letter word... "Name","fruit") vs baseline none -> 1
    np.testing.assert_array_equal(p[:, 1], evaluation.scalar_preference(scores["metric"], scores["baseline_metric"]))
    assert p[0, 1] == 1.0 and p[1, 1] == 0.0


def test_an_annotator_failing_everywhere_is_an_error_naming_it(tmp_path):
    cfg = _cfg(tmp_path, judges=[{"id": "ok", "backend": "python", "function": "tests.test_evaluation:prefers_longer"},
                                 {"id": "down", "backend": "python", "function": "tests.test_evaluation:always_fails"}])  # fmt: skip
    plan = rounds.plan(cfg, 1, "evaluate")
    with pytest.raises(ValueError, match=r"annotator down \(eval.judges\) failed on all 2 comparisons \(most often "
                                         r"python_error: a first: RuntimeError: judge backend down\)"):
        evaluate.annotate(cfg, plan, ["q", "q"], ["a", "b"], ["c", "d"])


# ---------------------------------------------------------------------------------------------- self-judging, exclusions


def test_a_judge_that_is_the_evaluated_model_or_the_baseline_is_refused(tmp_path):
    """An empty vllm judge model is π_0; against π_0 (eval.baseline: initial) π_0 would judge its own outputs: refused
    before anything is generated, naming the judge and the way out. A judge that is the policy (standalone `dice eval
    --model A --baseline file` with A as judge) too. allow_self_judge: true accepts both, and the stats say who judged."""
    cfg = _cfg(tmp_path, judges=[{"id": "local", "backend": "vllm"}])
    plan = rounds.plan(cfg, 2, "evaluate")
    with pytest.raises(ValueError, match=r"eval.judges local is .*round-0/checkpoint \(π_0\), which is also the baseline"
                                         r".*eval.allow_self_judge: true"):
        evaluate.check_self_judge(cfg, plan)
    with pytest.raises(ValueError, match="which is also the baseline"):
        evaluate.run(cfg, plan)  # the stage refuses it first: π_2 does not even exist
    ref = tmp_path / "ref.json"
    ref.write_text("[]")
    standalone = rounds.standalone_eval_plan(cfg, "org/model-a", str(ref), tmp_path / "out")
    with pytest.raises(ValueError, match="eval.judges local is org/model-a.*which is also the evaluated model"):
        evaluate.check_self_judge(cfg, standalone)
    rm = _cfg(tmp_path, reward_model="org/model-a", judges=[])
    with pytest.raises(ValueError, match="eval.reward_model is org/model-a.*the evaluated model"):
        evaluate.check_self_judge(rm, rounds.standalone_eval_plan(rm, "org/model-a", "org/model-b", tmp_path / "o"))
    allowed = _cfg(tmp_path, judges=[{"id": "local", "backend": "vllm"}], allow_self_judge=True)
    evaluate.check_self_judge(allowed, rounds.plan(allowed, 2, "evaluate"))
    assert evaluate.judged_by(allowed, rounds.plan(allowed, 2, "evaluate")) == [
        f"local: {rounds.model_of(allowed, 0)} (π_0)"]
    other = _cfg(tmp_path, judges=[{"id": "big", "backend": "vllm", "model": "org/judge"}])
    evaluate.check_self_judge(other, rounds.plan(other, 2, "evaluate"))  # a separate judge model: fine
    # the switch does not change the stage's result, so it does not re-run it
    from pipeline.data.artifacts import plan_digest

    assert plan_digest(rounds.plan(allowed, 2, "evaluate")) == plan_digest(plan)


def test_exclusions_are_counted_per_side_and_a_length_skew_warns():
    """Six rows; the reward model could not score the policy's two longest responses (rows 4, 5: NaN, too long) and a
    judge failed on row 0's pair. Counted rows 1-3: Δ = 0, 10, 0 (mean 3.33); excluded rows 0, 4, 5: Δ = 0, 100, 120
    (mean 73.3): the shift 70 exceeds half the std of Δ over all rows (std 50.7 -> 25.4), so a warning."""
    cols = {"chars": [10, 30, 20, 40, 150, 170], "baseline_chars": [10, 30, 10, 40, 50, 50]}
    scores = {"reward": np.array([1.0, 1, 1, 1, np.nan, np.nan]), "baseline_reward": np.ones(6)}
    counted = np.array([False, True, True, True, False, False])
    out = evaluate._exclusions(cols, scores, counted, "chars")
    assert (out["rows_excluded_policy"], out["rows_excluded_baseline"], out["rows_excluded_pair"]) == (2, 0, 1)
    assert out["excluded_delta_mean"] == pytest.approx(220 / 3)
    assert "3 of 6 rows were excluded (policy 2, baseline 0, pair 1) and they skew by length" in out["exclusion_warning"]
    even = evaluate._exclusions({"chars": [10, 30, 20, 40], "baseline_chars": [10, 10, 20, 20]},
                                {}, np.array([False, False, True, True]), "chars")  # fmt: skip
    assert even["exclusion_warning"] is None and even["rows_excluded_pair"] == 2


# ---------------------------------------------------------------------------------------------- paired gains, stopping


def _round(prompt_effect: np.ndarray, gain: float, seed: int, k: int = 2) -> evaluation.RoundRows:
    """A round against π_0 on 60 prompts × k samples: logit p̂ = prompt difficulty + gain + noise (equal lengths, so
    LC = the fitted intercept). The prompt difficulty is shared by every round: it is what pairing cancels."""
    rng = np.random.default_rng(seed)
    n = prompt_effect.size
    z = np.repeat(prompt_effect, k) + gain + rng.normal(0, 0.3, n * k)
    ids = np.repeat(np.arange(n), k).astype(str).astype(object)
    return evaluation.RoundRows(1 / (1 + np.exp(-z)), np.full(n * k, 10.0), np.full(n * k, 10.0), ids)


def test_paired_gain_interval_cancels_what_rounds_share():
    """Two rounds on the same prompts, the second better by 0.15 logits, with a large prompt difficulty (sd 2) common to
    both: each round's own interval is wide (≈ ±0.1) and they overlap, yet the paired interval of the difference
    excludes 0 and is several times narrower. Against ½ (b None) the gain is LC − ½ with the round's own interval."""
    effect = np.random.default_rng(0).normal(0, 2, 60)
    a, b = _round(effect, 0.15, 1), _round(effect, 0.0, 2)
    gain, lo, hi = evaluation.paired_gain_interval(a, b, 500, seed=0)
    assert gain == pytest.approx(a.lc(0.01).lc_win_rate - b.lc(0.01).lc_win_rate)
    ia = evaluation.lc_interval(a.p, a.len_policy, a.len_baseline, list(a.prompt_ids), 500, seed=0)
    ib = evaluation.lc_interval(b.p, b.len_policy, b.len_baseline, list(b.prompt_ids), 500, seed=0)
    assert ia[0] < ib[1]  # the separate intervals overlap: unpaired, no conclusion
    assert 0 < lo < gain < hi and (hi - lo) < (ia[1] - ia[0]) / 3
    g, lo2, hi2 = evaluation.paired_gain_interval(a, None, 500, seed=0)
    assert g == pytest.approx(a.lc(0.01).lc_win_rate - 0.5)
    assert (lo2 + 0.5, hi2 + 0.5) == pytest.approx(ia, abs=1e-6)  # same draws; σ of interpolated θ vs interpolated σ(θ)


def test_stopping_rule_uses_the_lower_bound_and_each_rounds_baseline_kind():
    """Point gains 0.10, 0.02, 0.03 with min_gain 0.01 would all count; by the lower bounds (0.04, −0.01, −0.02) only
    round 1 does, so patience 2 stops after round 3 with best round 1. Every call names the reference: round 1 against
    ½ (π_0), rounds 2 and 3 paired with round 1. A round whose recorded kind is `previous` is measured against ½ even
    when the config now says initial, and a bound that cannot be computed (None) is no gain."""
    calls = []
    bounds = {(1, None): 0.04, (2, 1): -0.01, (3, 1): -0.02}
    lcs = [(1, 0.60), (2, 0.62), (3, 0.63)]
    state = evaluation.progress(lcs, "initial", 0.01, 2, lambda k, ref: calls.append((k, ref)) or bounds[(k, ref)])
    assert calls == [(1, None), (2, 1), (3, 1)]
    assert (state.best_round, state.stop) == (1, True) and "lower 95% bound of the paired LC gain" in state.reason
    assert not evaluation.progress(lcs, "initial", 0.01, 2).stop  # the point estimates: every round a gain
    mixed = evaluation.progress(lcs, "initial", 0.01, 5, lambda k, ref: calls.append((k, ref)) or 0.05,
                                kinds={1: "initial", 2: "previous", 3: "initial"})  # fmt: skip
    assert calls[-3:] == [(1, None), (2, None), (3, None)] and mixed.best_round == 3
    none = evaluation.progress([(1, 0.9)], "initial", 0.0, 1, lambda k, ref: None)
    assert none.stop and none.best_round == 0


def test_run_progress_reads_rounds_written_before_control_rows(tmp_path):
    """A run whose evaluate manifests and eval.parquet predate control rows, baseline kinds and judged_by (the report
    tests' synthetic run: rounds 1 and 2 against π_0): the stopping rule still reads them, each round's kind from
    its recorded role, round 2 paired with round 1 over their shared prompts, and `dice inspect` still prints."""
    import os
    import subprocess
    import sys

    from pipeline.config import save_config
    from pipeline.run import report
    from tests.test_report import make_run

    run_dir = tmp_path / "run"
    make_run(run_dir)
    cfg = RunConfig.model_validate({"runs_dir": str(tmp_path), "name": "run", "eval": {"bootstrap": 200}})
    save_config(cfg, run_dir / "config.yaml")
    rows = report.eval_round_rows(run_dir / "round-2", {})
    assert rows is not None and rows.control is None and rows.p.size == 20
    state = report.eval_progress(run_dir, cfg.eval, 0)
    stats = {k: json.loads((run_dir / f"round-{k}/.dice/evaluate.json").read_text())["stats"] for k in (1, 2)}
    r1, r2 = (report.eval_round_rows(run_dir / f"round-{k}", {}) for k in (1, 2))
    low1 = stats[1]["lc_win_rate_ci"][0] - 0.5  # round 1 against ½: its own interval
    expect = 1 if low1 > 0 else 0
    paired = evaluation.paired_gain_interval(r2, r1 if expect == 1 else None, 200, seed=0)
    low2 = stats[2]["lc_win_rate_ci"][0] - 0.5 if expect == 0 else paired[1]
    expect = 2 if low2 > 0 else expect
    assert state is not None and state.best_round == expect
    out = subprocess.run([sys.executable, "-m", "flows.cli", "inspect", str(run_dir)], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"}, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "best round by LC win rate:" in out.stdout and "lc_note" in out.stdout
