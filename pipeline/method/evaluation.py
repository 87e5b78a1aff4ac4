"""Evaluating a round: win rate, its bootstrap interval, the length-controlled win rate, annotator agreement, and
the rule that stops a run when rounds stop helping. Pure functions over arrays (../shared/METHODS.md §8).

The inputs are one row per (prompt, sample): p̂ = P(policy ≻ baseline) from the annotators (soft, ties ½), the
lengths of both responses, and the prompt each row belongs to. Every interval resamples PROMPTS, not rows: the
samples of one prompt are not independent of each other, so a row bootstrap would give intervals too narrow.

Length control (Dubois et al. 2024, "Length-Controlled AlpacaEval", arXiv 2404.04475). Judges prefer longer
answers, so a raw win rate rewards a policy that only grew longer. AlpacaEval 2 fits a logistic regression of the
judge's preference on the length difference and reports the preference it predicts at zero length difference.
`length_controlled` fits, by Newton's method on the penalised log-likelihood below,

    logit P(a ≻ b | row i) = θ·[i is a policy row] + φ·tanh(Δ_i / σ_Δ),   Δ_i = len(a_i) − len(b_i)

    maximise  Σ_i [p̂_i·log σ(z_i) + (1 − p̂_i)·log σ(−z_i)] − (λ/2)·(θ² + φ²)

over two kinds of rows: the policy rows (a = the policy's response, b = the baseline's) and, where given, CONTROL
rows: one side's sample against another sample of the same side for the same prompt (the baseline against itself,
the policy against itself). A control pair is equal in quality in expectation and its Δ is symmetric around 0, so it
carries no intercept: those rows show how the judge's preference moves with length alone, and φ is learnt there.
p̂_i is the soft target (a Bernoulli log-likelihood with fractional outcomes, as alpaca_eval's `is_ytrue_proba` fit),
σ_Δ is the sample standard deviation (ddof 1) of Δ over the policy rows (alpaca_eval's scale), length is counted in
`eval.length_unit` (characters by default) and λ = `eval.lc_l2`. The LC win rate is σ(θ): the fitted preference of
the policy at Δ = 0.

Why the control rows. An iterative method's policy tends to grow longer each round; once it is longer on nearly
every row, tanh(Δ/σ_Δ) is nearly constant over the policy rows, θ and φ describe the same column, and only the small
penalty splits the preference between them (a length-blind judge then gives LC anywhere from ½ to 1). The control
rows span Δ on both sides of 0 whatever the policy does, which pins φ. Without them (one sample per prompt, or
`eval.lc_controls: false`), σ(θ) is reported only when at least 5% of the policy rows lie on each side of Δ = 0;
otherwise the fit is "not identified": LC is NaN and `reason` says why, never a confident number.

What the model still assumes: the judge's length preference is φ·tanh(Δ/σ_Δ) at every Δ. When the policy's Δ lies
beyond the control rows' range (a policy longer by many standard deviations), σ(θ) extrapolates that curve: right
for a preference that saturates as tanh does (tested: a length-only judge gives ½ ± 0.03 at mean/sd of Δ of 3 and
10), wrong for one that keeps growing linearly in Δ or is a near step (tests/test_evaluation.py measures the step).

Where this departs from alpaca_eval's `length_controlled_minimal` (`src/alpaca_eval/metrics/glm_winrate.py`: the
features tanh(std_delta_len) and not_gamed_baseline, i.e. an intercept and the length term, without the
instruction-difficulty term of `length_controlled_v1`):
  - a fraction in [0, 1], not a percent; an interval from a prompt bootstrap, not the standard error of the
    predictions (which is 0 for the minimal form: every prediction at Δ = 0 is σ(θ));
  - several samples per prompt (eval.num_samples), each a row; the bootstrap resamples prompts, so they stay together;
  - p̂ is each annotator's preference averaged over both orders (position bias cancelled), then over annotators;
  - Δ is policy − baseline (alpaca_eval's column is baseline − model): φ has the opposite sign;
  - a fixed small L2 penalty on (θ, φ) instead of an L1 penalty with its strength chosen by 5-fold cross-validation;
  - control rows from the run's own samples in place of alpaca_eval's "gamed" baselines (its baseline made verbose
    or concise), which `length_controlled_v1` mixes in with weight 0.2 and the minimal form drops.
tests/test_evaluation.py re-derives the minimal form from that description and checks dice against it.
With no length variation (σ_Δ = 0) the length term is dropped and σ(θ) is the (penalised) mean of p̂.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def win_rate(p: np.ndarray) -> float:
    """Mean p̂ over rows: a row's p̂ is P(policy ≻ baseline), so a tie (p̂ = ½) counts half (METHODS.md §8)."""
    p = np.asarray(p, dtype=float)
    if p.size == 0:
        raise ValueError("win rate of no comparisons")
    return float(p.mean())


def _groups(prompt_ids: Sequence[str]) -> tuple[int, list[np.ndarray]]:
    _, inv = np.unique(np.asarray(prompt_ids, dtype=object).astype(str), return_inverse=True)
    n = int(inv.max()) + 1 if inv.size else 0
    return n, [np.flatnonzero(inv == g) for g in range(n)]


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    prompt_ids: Sequence[str],
    n_boot: int,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic` over PROMPTS.

    Each replicate draws as many prompts as there are, with replacement, and passes the row indices of every
    drawn prompt (all its samples, repeated as often as it was drawn) to `statistic`.

    Args:
        statistic: row indices (R,) -> the statistic on those rows.
        prompt_ids: (N,) the prompt of each row.
        n_boot: replicates; 0 gives None.
        level: coverage, e.g. 0.95 -> the 2.5th and 97.5th percentiles.
        seed: the replicates' RNG seed (the same seed, the same interval).
    Returns:
        (low, high), or None when n_boot is 0 or there are no rows.
    """
    n, rows_of = _groups(prompt_ids)
    if n_boot <= 0 or n == 0:
        return None
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, n, n)
        values[b] = statistic(np.concatenate([rows_of[g] for g in pick]))
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def win_rate_interval(
    p: np.ndarray, prompt_ids: Sequence[str], n_boot: int, level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """`bootstrap_interval` of the win rate, vectorised: per-prompt sums and counts, one matrix of draws."""
    p = np.asarray(p, dtype=float)
    n, rows_of = _groups(prompt_ids)
    if n_boot <= 0 or n == 0:
        return None
    sums = np.array([p[r].sum() for r in rows_of])  # (G,)
    counts = np.array([len(r) for r in rows_of], dtype=float)  # (G,)
    pick = np.random.default_rng(seed).integers(0, n, (n_boot, n))  # (B, G)
    values = sums[pick].sum(1) / counts[pick].sum(1)  # (B,)
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# A fit without control rows extrapolates σ(θ) to Δ = 0 from the policy rows alone: below this share of rows on the
# minority side of Δ = 0 (Δ ≤ 0 or Δ ≥ 0), tanh(Δ/σ_Δ) is nearly constant and θ, φ cannot be told apart.
MIN_SIGN_SHARE = 0.05
# Control rows (baseline against baseline) needed to fit the length term from them.
MIN_CONTROL_ROWS = 10


@dataclass(frozen=True)
class LengthControlled:
    """The fitted length-controlled model logit P = θ·[policy row] + φ·tanh(Δ/σ_Δ) and its LC win rate σ(θ).

    `identified` False: the data cannot tell θ from φ (`reason` says why); `lc_win_rate` is then NaN, and θ, φ are
    the penalised fit's values, kept only for diagnosis."""

    lc_win_rate: float
    theta: float
    phi: float
    sigma_len: float  # σ_Δ: std (ddof 1) of len(policy) − len(baseline) over the policy rows; 0: no length term
    iterations: int
    identified: bool = True
    reason: str | None = None
    control_rows: int = 0  # baseline-against-baseline rows fitted with the policy rows

    def predict(self, delta_len: np.ndarray) -> np.ndarray:
        """P(policy ≻ baseline) the model predicts at length differences `delta_len` (same unit as the fit)."""
        x = np.tanh(np.asarray(delta_len, dtype=float) / self.sigma_len) if self.sigma_len > 0 else 0.0
        return _sigmoid(self.theta + self.phi * x)


@dataclass(frozen=True)
class Controls:
    """Control rows: the baseline against a second sample of itself, equal in quality in expectation.

    p: (M,) P(a ≻ b); len_a, len_b: (M,) lengths of a and b, in the unit of the policy rows. Δ = len_a − len_b is
    symmetric around 0, so these rows show how the judge's preference moves with length alone."""

    p: np.ndarray
    len_a: np.ndarray
    len_b: np.ndarray

    def take(self, idx: np.ndarray) -> Controls:
        return Controls(*(np.asarray(a, dtype=float)[idx] for a in (self.p, self.len_a, self.len_b)))


def _sigmoid(z: np.ndarray | float) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, dtype=float)))


def _fit_logistic(x: np.ndarray, p: np.ndarray, l2: float, w0: np.ndarray) -> tuple[np.ndarray, int]:
    """Maximise Σ_i [p_i·log σ(z_i) + (1 − p_i)·log σ(−z_i)] − (λ/2)·‖w‖², z = x @ w, by damped Newton steps.

    x: (N, D) design; p: (N,) soft targets in [0, 1]; returns (w: (D,), iterations)."""

    def objective(v: np.ndarray) -> float:
        z = x @ v  # (N,)
        return float(np.sum(-p * np.logaddexp(0, -z) - (1 - p) * np.logaddexp(0, z)) - 0.5 * l2 * v @ v)

    w, it = w0.copy(), 0
    for it in range(1, 101):
        s = _sigmoid(x @ w)  # (N,)
        grad = x.T @ (p - s) - l2 * w  # (D,)
        hess = (x.T * (s * (1 - s))) @ x + l2 * np.eye(len(w))  # (D, D), the negated Hessian: positive definite
        step = np.linalg.solve(hess, grad)
        t, f0 = 1.0, objective(w)
        while objective(w + t * step) < f0 - 1e-12 and t > 1e-8:  # concave: backtracking always finds ascent
            t *= 0.5
        w = w + t * step
        if np.max(np.abs(t * step)) < 1e-10:
            break
    return w, it


def length_controlled(
    p: np.ndarray,
    len_policy: np.ndarray,
    len_baseline: np.ndarray,
    l2: float = 0.01,
    sigma_len: float | None = None,
    control: Controls | None = None,
) -> LengthControlled:
    """Fit the LC model of the module docstring by Newton's method; with `control`, jointly with the control rows.

    Args:
        p: (N,) p̂ = P(policy ≻ baseline) per row, in [0, 1] (soft targets).
        len_policy, len_baseline: (N,) response lengths, one unit for both.
        l2: λ, the L2 weight on (θ, φ); > 0 keeps separable data finite.
        sigma_len: σ_Δ to use instead of the sample std of the policy rows' Δ (None: computed from these rows).
        control: baseline-against-baseline rows (`Controls`); they carry the length term but no intercept, so φ is
            fitted where quality is equal in expectation and θ is the policy's preference beyond its length.
    Returns:
        LengthControlled with lc_win_rate = σ(θ), or NaN with `identified` False and the reason when neither the
        control rows nor the policy rows' own Δ (on both sides of 0) can separate θ from φ.
    """
    p = np.asarray(p, dtype=float)
    delta = np.asarray(len_policy, dtype=float) - np.asarray(len_baseline, dtype=float)  # (N,)
    if p.size == 0:
        raise ValueError("length-controlled win rate of no comparisons")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("p̂ must lie in [0, 1]")
    sigma = float(delta.std(ddof=1)) if sigma_len is None and delta.size > 1 else float(sigma_len or 0.0)
    m = 0
    if control is not None:
        cp = np.asarray(control.p, dtype=float)
        cdelta = np.asarray(control.len_a, dtype=float) - np.asarray(control.len_b, dtype=float)  # (M,)
        keep = np.isfinite(cp)
        cp, cdelta = cp[keep], cdelta[keep]
        if not np.all((cp >= 0) & (cp <= 1)):
            raise ValueError("control p̂ must lie in [0, 1]")
        m = cp.size
        if sigma <= 0 and m > 1:  # the policy rows have one length difference: the controls' spread sets the scale
            sigma = float(cdelta.std(ddof=1))
    else:
        cp, cdelta = np.empty(0), np.empty(0)
    if sigma > 0:
        x = np.column_stack([np.ones_like(p), np.tanh(delta / sigma)])  # (N, 2)
        xc = np.column_stack([np.zeros_like(cp), np.tanh(cdelta / sigma)])  # (M, 2): no intercept on control rows
    else:  # no length variation anywhere: the intercept alone
        sigma = 0.0
        x, xc = np.ones((p.size, 1)), np.zeros((cp.size, 1))  # (N, 1), (M, 1)
    w0 = np.zeros(x.shape[1])
    w0[0] = math.log((p.mean() + 1e-3) / (1 - p.mean() + 1e-3))  # start at the logit of the raw win rate
    w, it = _fit_logistic(np.vstack([x, xc]), np.concatenate([p, cp]), l2, w0)
    theta, phi = float(w[0]), float(w[1]) if len(w) > 1 else 0.0
    reason = _unidentified(delta, cdelta, sigma)
    lc = float(_sigmoid(theta)) if reason is None else math.nan
    return LengthControlled(lc, theta, phi, sigma, it, reason is None, reason, m)


def _unidentified(delta: np.ndarray, cdelta: np.ndarray, sigma: float) -> str | None:
    """Why θ cannot be told from φ on these rows, or None when it can.

    Control rows whose Δ varies pin φ wherever the policy's Δ lies. Without them, σ(θ) is the fitted preference at
    Δ = 0, which the policy rows alone support only when some of them are there: a policy longer (or shorter) on
    nearly every row makes tanh(Δ/σ_Δ) almost constant, and then the small L2 penalty, not the data, splits the
    preference between θ and φ."""
    if sigma == 0:
        return None  # every row at one length difference: with Δ = 0 θ is the mean preference; else see below
    if cdelta.size >= MIN_CONTROL_ROWS and np.ptp(cdelta) > 0:
        return None
    share = min(float(np.mean(delta <= 0)), float(np.mean(delta >= 0)))
    if share >= MIN_SIGN_SHARE:
        return None
    side = "longer" if np.mean(delta > 0) > 0.5 else "shorter"
    controls = f"only {cdelta.size} control rows" if cdelta.size else "no control rows (baseline against itself)"
    return (f"not identified: the policy is {side} than the baseline on {1 - share:.1%} of rows (Δ changes sign on "
            f"fewer than {MIN_SIGN_SHARE:.0%}) and there are {controls}, so the length effect cannot be told apart "
            "from quality; evaluate against a sampled baseline with eval.num_samples >= 2")  # fmt: skip


def lc_interval(
    p: np.ndarray,
    len_policy: np.ndarray,
    len_baseline: np.ndarray,
    prompt_ids: Sequence[str],
    n_boot: int,
    level: float = 0.95,
    seed: int = 0,
    l2: float = 0.01,
    control: Controls | None = None,
    control_prompt_ids: Sequence[str] | None = None,
) -> tuple[float, float] | None:
    """Prompt-bootstrap interval of the LC win rate: the model is refitted (σ_Δ included) on every replicate.

    With `control`, a replicate takes the control rows of the prompts it drew (as often as it drew them), so the
    policy and control rows of one prompt stay together. None when the point estimate is not identified."""
    p, lp, lb = (np.asarray(a, dtype=float) for a in (p, len_policy, len_baseline))
    if not length_controlled(p, lp, lb, l2, control=control).identified:
        return None
    if control is None:
        stat = lambda idx: length_controlled(p[idx], lp[idx], lb[idx], l2).theta  # noqa: E731
        lohi = bootstrap_interval(stat, prompt_ids, n_boot, level, seed)
        return None if lohi is None else (float(_sigmoid(lohi[0])), float(_sigmoid(lohi[1])))
    if control_prompt_ids is None or len(control_prompt_ids) != len(control.p):
        raise ValueError("lc_interval: control rows need their prompt ids (control_prompt_ids), one per row")
    pol_ids = np.asarray(prompt_ids, dtype=object).astype(str)
    ctl_ids = np.asarray(control_prompt_ids, dtype=object).astype(str)
    names = np.unique(np.concatenate([pol_ids, ctl_ids]))
    rows_of = [np.flatnonzero(pol_ids == g) for g in names]
    ctl_of = [np.flatnonzero(ctl_ids == g) for g in names]
    n = len(names)
    if n_boot <= 0 or n == 0:
        return None
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, n, n)
        idx = np.concatenate([rows_of[g] for g in pick])
        cidx = np.concatenate([ctl_of[g] for g in pick])
        # θ, not σ(θ) gated by identification: a replicate is the same data, resampled
        values[b] = length_controlled(p[idx], lp[idx], lb[idx], l2, control=control.take(cidx)).theta if idx.size else np.nan
    lo, hi = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(_sigmoid(lo)), float(_sigmoid(hi))


def agreement(p_by_annotator: np.ndarray) -> float | None:
    """Pairwise annotator agreement: over every pair of annotators and every row both answered, the share in which
    they pick the same side (p > ½, p < ½, or both exactly ½).

    Args:
        p_by_annotator: (N, A) each annotator's p per row; NaN where it failed.
    Returns:
        The share in [0, 1], or None with fewer than two annotators or no row two of them answered.
    """
    p = np.asarray(p_by_annotator, dtype=float)
    if p.ndim != 2 or p.shape[1] < 2:
        return None
    side = np.sign(p - 0.5)  # (N, A), NaN where failed
    same = total = 0
    for a in range(p.shape[1]):
        for b in range(a + 1, p.shape[1]):
            both = np.isfinite(side[:, a]) & np.isfinite(side[:, b])
            total += int(both.sum())
            same += int((side[both, a] == side[both, b]).sum())
    return same / total if total else None


def scalar_preference(policy: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """p = 1, ½ or 0 as a scalar metric of the policy's response is above, equal to or below the baseline's.

    A Python metric (e.g. the toy task's true reward) is compared, not put on a probability scale: its units are
    arbitrary. NaN where either value is not finite.
    """
    a, b = np.asarray(policy, dtype=float), np.asarray(baseline, dtype=float)
    out = np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))
    return np.where(np.isfinite(a) & np.isfinite(b), out, np.nan)


def reward_preference(policy: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """p = σ(r_policy − r_baseline) from a reward model's scores (Bradley-Terry, as pairs use it; METHODS.md §6)."""
    return _sigmoid(np.asarray(policy, dtype=float) - np.asarray(baseline, dtype=float))


# ---------------------------------------------------------------------------------------------- stopping


@dataclass(frozen=True)
class RoundRows:
    """One evaluated round's rows for paired comparisons: policy rows (p̂, lengths, prompt ids) and control rows."""

    p: np.ndarray
    len_policy: np.ndarray
    len_baseline: np.ndarray
    prompt_ids: np.ndarray
    control: Controls | None = None
    control_prompt_ids: np.ndarray | None = None

    def take(self, prompts: np.ndarray) -> RoundRows:
        """The rows of these prompts, each as often as it appears in `prompts` (a bootstrap draw)."""
        idx = np.concatenate([self._rows[g] for g in prompts]) if len(prompts) else np.zeros(0, int)
        control, cids = None, None
        if self.control is not None:
            cidx = np.concatenate([self._control_rows.get(g, np.zeros(0, int)) for g in prompts])
            control, cids = self.control.take(cidx), self.control_prompt_ids[cidx]
        return RoundRows(self.p[idx], self.len_policy[idx], self.len_baseline[idx], self.prompt_ids[idx], control, cids)

    @property
    def _rows(self) -> dict[str, np.ndarray]:
        return {g: np.flatnonzero(self.prompt_ids == g) for g in np.unique(self.prompt_ids)}

    @property
    def _control_rows(self) -> dict[str, np.ndarray]:
        ids = self.control_prompt_ids if self.control_prompt_ids is not None else np.array([], dtype=object)
        return {g: np.flatnonzero(ids == g) for g in np.unique(ids)}

    def lc(self, l2: float) -> LengthControlled:
        return length_controlled(self.p, self.len_policy, self.len_baseline, l2, control=self.control)


def paired_gain_interval(
    a: RoundRows, b: RoundRows | None, n_boot: int, level: float = 0.95, seed: int = 0, l2: float = 0.01
) -> tuple[float, float, float] | None:
    """The gain LC(a) − LC(b) (b None: LC(a) − ½) and its percentile interval, PAIRED over prompts.

    Two rounds evaluated against the same baseline on the same prompts share the baseline's responses and the
    prompts' difficulty; resampling the prompts once for both rounds lets that shared part cancel, so the interval is
    that of the difference, much narrower than two separate intervals would suggest. Only prompts both rounds
    evaluated are used. Returns (gain, low, high), or None when either LC is not identified or n_boot is 0."""
    a_ids = np.unique(a.prompt_ids)
    shared = a_ids if b is None else np.intersect1d(a_ids, np.unique(b.prompt_ids))
    if n_boot <= 0 or shared.size == 0:
        return None
    a0, b0 = a.take(shared), (None if b is None else b.take(shared))
    fa, fb = a0.lc(l2), (None if b0 is None else b0.lc(l2))
    if not fa.identified or (fb is not None and not fb.identified):
        return None
    gain = fa.lc_win_rate - (0.5 if fb is None else fb.lc_win_rate)
    rows_a, rows_b = a0._rows, (None if b0 is None else b0._rows)
    ctl_a, ctl_b = a0._control_rows, (None if b0 is None else b0._control_rows)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)

    def draw(r: RoundRows, rows: dict, ctl: dict, pick: np.ndarray) -> float:
        idx = np.concatenate([rows[g] for g in pick])
        control = None
        if r.control is not None:
            control = r.control.take(np.concatenate([ctl.get(g, np.zeros(0, int)) for g in pick]))
        fit = length_controlled(r.p[idx], r.len_policy[idx], r.len_baseline[idx], l2, control=control)
        return float(_sigmoid(fit.theta))

    for i in range(n_boot):
        pick = shared[rng.integers(0, shared.size, shared.size)]
        values[i] = draw(a0, rows_a, ctl_a, pick) - (0.5 if b0 is None else draw(b0, rows_b, ctl_b, pick))
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(gain), float(lo), float(hi)


# ---------------------------------------------------------------------------------------------- stopping


@dataclass(frozen=True)
class Progress:
    """Where a run stands by its LC win rates: the best round so far and how many rounds since it improved."""

    best_round: int | None
    best_lc: float | None
    rounds_without_gain: int
    stop: bool
    reason: str | None


# The reference a round's gain is measured against: ½ (π_0, or a `previous` round's own predecessor), or nothing yet
# (the first round evaluated against a reference-outputs file sets the bar).
HALF, FIRST = "half", "first"


def progress(
    lc_by_round: Sequence[tuple[int, float]],
    baseline: str,
    min_gain: float,
    patience: int | None,
    lower_bound: Callable[[int, int | None], float | None] | None = None,
    kinds: dict[int, str] | None = None,
) -> Progress:
    """Apply `eval.stop_after_no_gain` (patience N) and `eval.min_gain` to the evaluated rounds, in round order.

    A round's gain is measured against a reference that depends on its baseline kind (`kinds[k]`, the kind the round
    recorded; `baseline` for rounds not in `kinds`):
      - `initial` (π_0): the best round so far when that was also evaluated against π_0, else ½ (π_0 itself);
      - a reference-outputs file (`file`): the best round so far against a file; the first one sets the bar;
      - `previous` (π_{k-1}): ½, since round k's LC already measures π_k against π_{k-1}; rates of different rounds
        are not on one scale, so best_round is the last round that beat its predecessor (0 if none did).
    With `lower_bound(k, ref)` — the lower 95% bound of round k's LC gain over round `ref` (None: over ½), paired over
    the prompts both evaluated (`paired_gain_interval`), None when it cannot be computed — a round improves only when
    that bound exceeds min_gain: a gain inside the noise is no gain. Without it, the point estimates are compared.
    best_round follows the same rule. The run stops once the last N evaluated rounds all failed to improve.
    """
    kinds = kinds or {}
    best_round: int | None = None
    best: float | None = None
    best_kind: str | None = None
    if baseline in ("initial", "previous"):
        best_round, best, best_kind = 0, 0.5, "anchor"
    stale, since = 0, []
    for k, v in lc_by_round:
        kind = kinds.get(k, baseline)
        if kind == "initial" and k == 0:
            continue  # π_0 against itself: not a measurement
        if kind == "previous":
            ref: int | str = HALF
        elif kind == "initial":
            ref = best_round if best_kind == "initial" else HALF
        else:
            ref = best_round if best_kind == kind else FIRST
        if ref == FIRST:
            improved = True
        elif lower_bound is not None:
            low = lower_bound(k, None if ref == HALF else int(ref))
            improved = low is not None and low > min_gain
        else:
            improved = v - (0.5 if ref == HALF else best) > min_gain
        if improved:
            best_round, best, best_kind, stale, since = k, v, kind, 0, []
        else:
            stale += 1
            since.append(k)
    stop = patience is not None and stale >= patience
    reason = None
    if stop:
        ref_text = "½ (its predecessor)" if baseline == "previous" else f"{best:.4g} (round {best_round})"
        what = "the lower 95% bound of the paired LC gain has not exceeded" if lower_bound else "the LC win rate has not improved by more than"
        reason = (f"{what} {min_gain:g} over {ref_text} for {stale} round(s) "
                  f"(rounds {', '.join(map(str, since))}); best round {best_round}")  # fmt: skip
    return Progress(best_round, best, stale, stop, reason)
