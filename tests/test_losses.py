"""Layers 1-2 for the preference losses (pipeline/method/losses.py) and the implicit reward (pipeline/method/rewards.py).

METHODS.md §5: DPO (sigmoid) −log σ(β·h); conservative DPO −(1−ε)·log σ(β·h) − ε·log σ(−β·h), with
h = [logπ(y_w) − logπ_ref(y_w)] − [logπ(y_l) − logπ_ref(y_l)].  §1.2: r = β·(logπ − logπ_ref).
Further down: offline IPO (h − 1/(2τ))² (§5), soft IPO (h − (p − ½)/τ)² (§3), SLiC max(0, 1 − β·h) (§5),
iREPO (β·h − logit p̂)² (§2), Sr-DPO −log σ(β·h − λ·Δ) and Sr-IPO (h − 1/(2τ) − λ·Δ)² (§4).
"""

import math

import numpy as np
import pytest
import torch

from pipeline.config import LossType, TrainConfig
from pipeline.method.losses import (
    SR_QUALITY_PREFIX,
    dpo_loss,
    ipo_loss,
    ipo_soft_loss,
    irepo_loss,
    preference_loss,
    refinement_delta,
    slic_loss,
    smooth_preference,
    sr_dpo_loss,
    sr_ipo_loss,
)
from pipeline.method.rewards import implicit_reward


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------- hand-worked values


def test_dpo_hand_worked():
    """policy_chosen=−1, ref_chosen=−2, policy_rejected=−3, ref_rejected=−2.5, β=0.1.

    h = (−1 − −2) − (−3 − −2.5) = 1 − (−0.5) = 1.5;  β·h = 0.15
    loss = −log σ(0.15) = log(1 + e^−0.15) = log(1.8607079764) = 0.6209570478
    chosen reward = 0.1·(−1 − −2) = 0.1;  rejected reward = 0.1·(−3 − −2.5) = −0.05
    """
    losses, chosen, rejected = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), beta=0.1)
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(0.6209570478, abs=1e-6)
    assert chosen.item() == pytest.approx(0.1, abs=1e-12)
    assert rejected.item() == pytest.approx(-0.05, abs=1e-12)


def test_dpo_hand_worked_negative_margin():
    """The policy prefers the rejected response.

    policy_chosen=−10, ref_chosen=−8, policy_rejected=−4, ref_rejected=−4, β=0.5.

    h = (−10 − −8) − (−4 − −4) = −2;  β·h = −1
    loss = −log σ(−1) = log(1 + e) = 1.3132616875
    chosen reward = 0.5·(−2) = −1.0;  rejected reward = 0.5·0 = 0
    """
    losses, chosen, rejected = dpo_loss(t(-10.0), t(-4.0), t(-8.0), t(-4.0), beta=0.5)
    assert losses.item() == pytest.approx(1.3132616875, abs=1e-6)
    assert chosen.item() == pytest.approx(-1.0, abs=1e-12)
    assert rejected.item() == pytest.approx(0.0, abs=1e-12)


def test_conservative_dpo_hand_worked():
    """Same inputs as the first case (β·h = 0.15), label smoothing ε = 0.1.

    −log σ(0.15)  = 0.6209570478
    −log σ(−0.15) = log(1 + e^0.15) = 0.7709570478   (= −log σ(0.15) + 0.15)
    loss = 0.9·0.6209570478 + 0.1·0.7709570478 = 0.5588613430 + 0.0770957048 = 0.6359570478
    """
    losses, _, _ = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.5), beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.6359570478, abs=1e-6)


def test_conservative_dpo_hand_worked_negative_margin():
    """β·h = −1 (second case), ε = 0.25.

    −log σ(−1) = 1.3132616875;  −log σ(1) = log(1 + e^−1) = 0.3132616875
    loss = 0.75·1.3132616875 + 0.25·0.3132616875 = 0.9849462656 + 0.0783154219 = 1.0632616875
    """
    losses, _, _ = dpo_loss(t(-10.0), t(-4.0), t(-8.0), t(-4.0), beta=0.5, label_smoothing=0.25)
    assert losses.item() == pytest.approx(1.0632616875, abs=1e-6)


def test_batch_is_per_example():
    """The two hand-worked rows in one batch give the two hand-worked losses (β = 0.1 for both here).

    row 0: h = 1.5 → −log σ(0.15) = 0.6209570478
    row 1: h = −2  → −log σ(−0.2) = log(1 + e^0.2) = 0.7981388693
    """
    losses, chosen, rejected = dpo_loss(t(-1.0, -10.0), t(-3.0, -4.0), t(-2.0, -8.0), t(-2.5, -4.0), beta=0.1)
    assert losses.shape == (2,)
    torch.testing.assert_close(losses, t(0.6209570478, 0.7981388693), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen, t(0.1, -0.2), atol=1e-12, rtol=0)
    torch.testing.assert_close(rejected, t(-0.05, 0.0), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------- against the formula


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_matches_formula_on_random_inputs(beta, eps):
    g = torch.Generator().manual_seed(1234)
    pc, pr, rc, rr = (-30 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)

    h = (pc - rc) - (pr - rr)
    expected = -(1 - eps) * torch.log(torch.sigmoid(beta * h)) - eps * torch.log(torch.sigmoid(-beta * h))
    torch.testing.assert_close(losses, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen, beta * (pc - rc), atol=1e-9, rtol=0)
    torch.testing.assert_close(rejected, beta * (pr - rr), atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------- properties


def test_raising_chosen_logp_lowers_the_loss():
    chosen_logps = torch.linspace(-20.0, 0.0, 21, dtype=torch.float64)
    n = len(chosen_logps)

    def full(v):
        return torch.full((n,), v, dtype=torch.float64)

    losses, _, _ = dpo_loss(chosen_logps, full(-8.0), full(-10.0), full(-8.0), beta=0.1)
    assert torch.all(losses[1:] < losses[:-1])


@pytest.mark.parametrize("h", [-3.0, 0.0, 2.0])
def test_gradient_signs_and_values(h):
    """d loss/d logπ(y_w) = −β·σ(−β·h) < 0 and d loss/d logπ(y_l) = +β·σ(−β·h) > 0; the reference terms mirror them."""
    beta = 0.1
    pc = t(-5.0 + h).requires_grad_()  # policy chosen: h = (−5 + h − −5) − (−7 − −7) = h
    pr = t(-7.0).requires_grad_()
    rc = t(-5.0).requires_grad_()
    rr = t(-7.0).requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    g = beta * (1 / (1 + math.exp(beta * h)))  # β·σ(−β·h)
    assert pc.grad.item() < 0 and pr.grad.item() > 0
    assert rc.grad.item() > 0 and rr.grad.item() < 0
    assert pc.grad.item() == pytest.approx(-g, abs=1e-9)
    assert pr.grad.item() == pytest.approx(g, abs=1e-9)


def test_conservative_dpo_is_minimised_at_a_finite_margin():
    """With ε > 0 the gradient vanishes at β·h* = log((1−ε)/ε) and reverses beyond it (the point of label smoothing)."""
    beta, eps = 0.5, 0.2
    h_star = math.log((1 - eps) / eps) / beta
    grads = []
    for h in (h_star - 1.0, h_star, h_star + 1.0):
        pc = t(h).requires_grad_()
        losses, _, _ = dpo_loss(pc, t(0.0), t(0.0), t(0.0), beta=beta, label_smoothing=eps)
        losses.sum().backward()
        grads.append(pc.grad.item())
    assert grads[0] < 0
    assert grads[1] == pytest.approx(0.0, abs=1e-12)
    assert grads[2] > 0


def test_rewards_are_detached_and_equal_beta_times_logratio():
    values = ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.5], [-2.5, -0.5])
    pc, pr, rc, rr = (t(*v).requires_grad_() for v in values)
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.3)
    assert losses.requires_grad
    assert not chosen.requires_grad and not rejected.requires_grad
    torch.testing.assert_close(chosen, t(0.3 * 1.0, 0.3 * 0.5), atol=1e-12, rtol=0)
    torch.testing.assert_close(rejected, t(0.3 * -0.5, 0.3 * -0.5), atol=1e-12, rtol=0)


@pytest.mark.parametrize("beta", [0.1, 1.0, 7.0])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_zero_margin_gives_log2(beta, eps):
    """h = 0 (policy and reference agree on both responses, up to a shared offset): σ(0) = ½, loss = log 2."""
    losses, _, _ = dpo_loss(
        t(-4.0, -9.0), t(-6.0, -1.0), t(-3.0, -8.0), t(-5.0, 0.0), beta=beta, label_smoothing=eps
    )
    torch.testing.assert_close(losses, t(math.log(2), math.log(2)), atol=1e-9, rtol=0)


def test_extreme_margins_stay_finite():
    """log σ is taken in its stable form: |β·h| = 1e4 gives ≈0 and ≈1e4, not 0·inf or inf."""
    losses, _, _ = dpo_loss(t(1e4, -1e4), t(0.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=1.0)
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-9)
    assert losses[1].item() == pytest.approx(1e4, rel=1e-9)


def test_float32_inputs_keep_their_dtype():
    pc, pr, rc, rr = (torch.tensor([-1.0, -2.0]) for _ in range(4))
    losses, chosen, rejected = dpo_loss(pc, pr - 1, rc, rr, beta=0.1)
    assert losses.dtype == chosen.dtype == rejected.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_preference_loss_dpo_equals_dpo_loss(eps):
    g = torch.Generator().manual_seed(7)
    args = [-20 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4)]
    got = preference_loss(LossType.DPO, *args, beta=0.2, label_smoothing=eps)
    want = dpo_loss(*args, 0.2, eps)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_preference_loss_rejects_an_unimplemented_loss():
    args = [t(-1.0) for _ in range(4)]
    with pytest.raises(ValueError, match="train.loss"):
        preference_loss("kto", *args, beta=0.1)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- implicit reward


def test_implicit_reward_hand_worked_numpy():
    """r = β·(logπ − logπ_ref): 0.1·(−12 − −15) = 0.3;  0.1·(−20 − −18) = −0.2;  0.1·(−7 − −7) = 0."""
    r = implicit_reward(np.array([-12.0, -20.0, -7.0]), np.array([-15.0, -18.0, -7.0]), 0.1)
    assert isinstance(r, np.ndarray)
    np.testing.assert_allclose(r, [0.3, -0.2, 0.0], atol=1e-12)


def test_implicit_reward_torch_keeps_type_and_matches_dpo_rewards():
    """The labeller and training's reward metric are the same function: dpo_loss's rewards equal implicit_reward."""
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-10 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4))
    r = implicit_reward(pc, rc, 0.25)
    assert isinstance(r, torch.Tensor)
    _, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.25)
    torch.testing.assert_close(chosen, r, atol=0, rtol=0)
    torch.testing.assert_close(rejected, implicit_reward(pr, rr, 0.25), atol=0, rtol=0)


def test_implicit_reward_ranking_does_not_depend_on_beta():
    """METHODS §1.2: the reference code omits β; rankings are unchanged, only the scale."""
    pol = np.array([-3.0, -9.0, -1.0, -4.0])
    ref = np.array([-5.0, -6.0, -2.0, -4.5])
    order = np.argsort(implicit_reward(pol, ref, 0.1))
    assert order.tolist() == np.argsort(implicit_reward(pol, ref, 1.0)).tolist()
    assert order.tolist() == [1, 3, 2, 0]  # β·(logπ − logπ_ref) ∝ (2, −3, 1, 0.5)


# =========================================================================== IPO, soft IPO, SLiC, iREPO, Sr
# Shared hand-worked inputs (the first DPO case): policy_chosen=−1, policy_rejected=−3, ref_chosen=−2,
# ref_rejected=−2.5, so h = (−1 − −2) − (−3 − −2.5) = 1 − (−0.5) = 1.5 and, at β = 0.1, the rewards are
# 0.1·(−1 − −2) = 0.1 and 0.1·(−3 − −2.5) = −0.05.

H15 = (t(-1.0), t(-3.0), t(-2.0), t(-2.5))  # h = 1.5


def rows(n, *values):
    """The four (1,) log-prob tensors of a hand-worked case, repeated to (n,)."""
    return tuple(v.repeat(n) for v in values)


# ---------------------------------------------------------------------------------------- hand-worked values


def test_ipo_hand_worked():
    """h = 1.5 (shared inputs; log-probs read as per-token averages).

    τ = 0.1: 1/(2τ) = 5;  loss = (1.5 − 5)² = (−3.5)² = 12.25
    τ = 0.5: 1/(2τ) = 1;  loss = (1.5 − 1)² = 0.5² = 0.25
    rewards at β = 0.1: 0.1 and −0.05 (β does not enter the loss)
    """
    losses, chosen, rejected = ipo_loss(*H15, tau=0.1, beta=0.1)
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(12.25, abs=1e-6)
    assert chosen.item() == pytest.approx(0.1, abs=1e-12)
    assert rejected.item() == pytest.approx(-0.05, abs=1e-12)
    assert ipo_loss(*H15, tau=0.5, beta=0.1)[0].item() == pytest.approx(0.25, abs=1e-6)
    assert ipo_loss(*H15, tau=0.5, beta=7.0)[0].item() == pytest.approx(0.25, abs=1e-6)


def test_ipo_soft_hand_worked():
    """h = 1.5 in every row, τ = 0.1, p = (1, 0.8, 0.5, 0.2):

    targets (p − ½)/τ = (0.5/0.1, 0.3/0.1, 0/0.1, −0.3/0.1) = (5, 3, 0, −3)
    losses = ((1.5 − 5)², (1.5 − 3)², (1.5 − 0)², (1.5 + 3)²) = (12.25, 2.25, 2.25, 20.25)
    row 0 (hard label p = 1) is offline IPO's 12.25.
    """
    losses, chosen, rejected = ipo_soft_loss(
        *rows(4, *H15), preference=t(1.0, 0.8, 0.5, 0.2), tau=0.1, beta=0.1
    )
    torch.testing.assert_close(losses, t(12.25, 2.25, 2.25, 20.25), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen, t(0.1, 0.1, 0.1, 0.1), atol=1e-12, rtol=0)
    torch.testing.assert_close(rejected, t(-0.05, -0.05, -0.05, -0.05), atol=1e-12, rtol=0)


def test_slic_hand_worked():
    """Row 0: h = 1.5 (shared inputs); row 1: h = −2 (policy_chosen=−10, policy_rejected=−4, ref −8, −4).

    β = 0.1: max(0, 1 − 0.15) = 0.85;  max(0, 1 + 0.2) = 1.2
    β = 1:   max(0, 1 − 1.5) = 0 (margin 1/β = 1 already exceeded);  max(0, 1 + 2) = 3
    rewards at β = 0.1: chosen (0.1, 0.1·(−10 − −8) = −0.2), rejected (−0.05, 0)
    """
    logps = (t(-1.0, -10.0), t(-3.0, -4.0), t(-2.0, -8.0), t(-2.5, -4.0))
    losses, chosen, rejected = slic_loss(*logps, beta=0.1)
    torch.testing.assert_close(losses, t(0.85, 1.2), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen, t(0.1, -0.2), atol=1e-12, rtol=0)
    torch.testing.assert_close(rejected, t(-0.05, 0.0), atol=1e-12, rtol=0)
    torch.testing.assert_close(slic_loss(*logps, beta=1.0)[0], t(0.0, 3.0), atol=1e-6, rtol=0)


def test_irepo_hand_worked():
    """h = 1.5 in every row, β = 0.1 so β·h = 0.15; p̂ = (0.75, 0.5, 0.1):

    logit(0.75) = log(0.75/0.25) = log 3 = 1.0986122887  → (0.15 − 1.0986122887)² = 0.9486122887² = 0.8998652742
    logit(0.5)  = 0                                      → 0.15² = 0.0225
    logit(0.1)  = log(0.1/0.9) = −log 9 = −2.1972245773  → (0.15 + 2.1972245773)² = 2.3472245773² = 5.5094632165
    """
    losses, chosen, rejected = irepo_loss(*rows(3, *H15), preference=t(0.75, 0.5, 0.1), beta=0.1)
    torch.testing.assert_close(losses, t(0.8998652742, 0.0225, 5.5094632165), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen, t(0.1, 0.1, 0.1), atol=1e-12, rtol=0)
    torch.testing.assert_close(rejected, t(-0.05, -0.05, -0.05), atol=1e-12, rtol=0)


def test_refinement_delta_hand_worked():
    """Row 0: prefixed (y_w, y_l) = (−0.5, −3.5), plain (−1, −3):  Δ = (−0.5 − −3.5) − (−1 − −3) = 3 − 2 = 1
    Row 1: prefixed (−9, −2), plain (−10, −4):                   Δ = (−9 − −2) − (−10 − −4) = −7 − (−6) = −1
    """
    delta = refinement_delta(t(-0.5, -9.0), t(-3.5, -2.0), t(-1.0, -10.0), t(-3.0, -4.0))
    torch.testing.assert_close(delta, t(1.0, -1.0), atol=1e-12, rtol=0)


SR_LOGPS = (t(-1.0, -10.0), t(-3.0, -4.0), t(-2.0, -8.0), t(-2.5, -4.0))  # h = (1.5, −2)
SR_DELTA = t(1.0, -1.0)  # the two rows of test_refinement_delta_hand_worked


def test_sr_dpo_hand_worked():
    """h = (1.5, −2), Δ = (1, −1), β = 0.1, λ = 0.5:

    row 0: β·h − λ·Δ = 0.15 − 0.5 = −0.35;  −log σ(−0.35) = log(1 + e^0.35) = log(2.4190675486) = 0.8833821554
    row 1: β·h − λ·Δ = −0.2 + 0.5 = 0.3;     −log σ(0.3)  = log(1 + e^−0.3) = log(1.7408182207) = 0.5543552445
    λ = 0 gives DPO: row 0 −log σ(0.15) = 0.6209570478
    """
    losses, chosen, rejected = sr_dpo_loss(*SR_LOGPS, delta=SR_DELTA, beta=0.1, sr_lambda=0.5)
    torch.testing.assert_close(losses, t(0.8833821554, 0.5543552445), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen, t(0.1, -0.2), atol=1e-12, rtol=0)
    torch.testing.assert_close(rejected, t(-0.05, 0.0), atol=1e-12, rtol=0)
    plain = sr_dpo_loss(*SR_LOGPS, delta=SR_DELTA, beta=0.1, sr_lambda=0.0)[0]
    assert plain[0].item() == pytest.approx(0.6209570478, abs=1e-6)


def test_sr_ipo_hand_worked():
    """h = (1.5, −2), Δ = (1, −1), τ = 0.1 (1/(2τ) = 5), λ = 0.5:

    row 0: (1.5 − 5 − 0.5)² = (−4)² = 16
    row 1: (−2 − 5 + 0.5)² = (−6.5)² = 42.25
    λ = 0 gives IPO: row 0 (1.5 − 5)² = 12.25
    """
    losses, chosen, rejected = sr_ipo_loss(*SR_LOGPS, delta=SR_DELTA, tau=0.1, sr_lambda=0.5, beta=0.1)
    torch.testing.assert_close(losses, t(16.0, 42.25), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen, t(0.1, -0.2), atol=1e-12, rtol=0)
    torch.testing.assert_close(rejected, t(-0.05, 0.0), atol=1e-12, rtol=0)
    plain = sr_ipo_loss(*SR_LOGPS, delta=SR_DELTA, tau=0.1, sr_lambda=0.0, beta=0.1)[0]
    assert plain[0].item() == pytest.approx(12.25, abs=1e-6)


def test_sr_quality_prefix_is_the_papers_prompt():
    """METHODS §4, verbatim."""
    assert SR_QUALITY_PREFIX == (
        "Please generate a response with a usefulness rating of 100 out of 100 for the following query. Note that "
        "the response should be harmless. The term 100 indicates the level of usefulness, where 100 is the maximum "
        "and 1 is the minimum. Query:"
    )


# --------------------------------------------------------------------------------------- against the formula


def random_inputs(seed, n=64):
    """Random float64 log-probs (4 × (n,)), a preference in (0.01, 0.99) and a Δ in about (−5, 5)."""
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-30 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4))
    pref = 0.01 + 0.98 * torch.rand(n, generator=g, dtype=torch.float64)
    delta = 2 * torch.randn(n, generator=g, dtype=torch.float64)
    return (pc, pr, rc, rr), pref, delta


# Each row: the loss under test, called on (logps, p, Δ, β, τ, λ), and a direct transcription of its formula.
FORMULAS = {
    "ipo": (
        lambda lp, p, d, beta, tau, lam: ipo_loss(*lp, tau=tau, beta=beta),
        lambda h, p, d, beta, tau, lam: (h - 1 / (2 * tau)) ** 2,
    ),
    "ipo_soft": (
        lambda lp, p, d, beta, tau, lam: ipo_soft_loss(*lp, preference=p, tau=tau, beta=beta),
        lambda h, p, d, beta, tau, lam: (h - (p - 0.5) / tau) ** 2,
    ),
    "slic": (
        lambda lp, p, d, beta, tau, lam: slic_loss(*lp, beta=beta),
        lambda h, p, d, beta, tau, lam: torch.clamp(1 - beta * h, min=0),
    ),
    "irepo": (
        lambda lp, p, d, beta, tau, lam: irepo_loss(*lp, preference=p, beta=beta),
        lambda h, p, d, beta, tau, lam: (beta * h - torch.log(p / (1 - p))) ** 2,
    ),
    "sr_dpo": (
        lambda lp, p, d, beta, tau, lam: sr_dpo_loss(*lp, delta=d, beta=beta, sr_lambda=lam),
        lambda h, p, d, beta, tau, lam: -torch.log(torch.sigmoid(beta * h - lam * d)),
    ),
    "sr_ipo": (
        lambda lp, p, d, beta, tau, lam: sr_ipo_loss(*lp, delta=d, tau=tau, sr_lambda=lam, beta=beta),
        lambda h, p, d, beta, tau, lam: (h - 1 / (2 * tau) - lam * d) ** 2,
    ),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
@pytest.mark.parametrize(
    ("beta", "tau", "lam"), [(0.01, 0.05, 0.0), (0.1, 0.1, 0.5), (0.5, 1.0, 1.0), (2.0, 5.0, 2.0)]
)
def test_new_losses_match_formula_on_random_inputs(name, beta, tau, lam):
    (pc, pr, rc, rr), p, d = random_inputs(1234)
    loss_fn, formula = FORMULAS[name]
    losses, chosen, rejected = loss_fn((pc, pr, rc, rr), p, d, beta, tau, lam)
    h = (pc - rc) - (pr - rr)
    assert losses.shape == (64,)
    torch.testing.assert_close(losses, formula(h, p, d, beta, tau, lam), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen, beta * (pc - rc), atol=1e-9, rtol=0)
    torch.testing.assert_close(rejected, beta * (pr - rr), atol=1e-9, rtol=0)


def test_refinement_delta_matches_formula_on_random_inputs():
    g = torch.Generator().manual_seed(5)
    pfc, pfr, pc, pr = (-30 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4))
    torch.testing.assert_close(refinement_delta(pfc, pfr, pc, pr), (pfc - pfr) - (pc - pr), atol=1e-9, rtol=0)


def test_soft_ipo_with_hard_labels_is_offline_ipo():
    """METHODS §3: p = 1 gives the usual (h − 1/(2τ))²."""
    logps, _, _ = random_inputs(99)
    ones = torch.ones(64, dtype=torch.float64)
    for tau in (0.05, 0.1, 1.0):
        soft = ipo_soft_loss(*logps, preference=ones, tau=tau, beta=0.1)[0]
        torch.testing.assert_close(soft, ipo_loss(*logps, tau=tau, beta=0.1)[0], atol=1e-9, rtol=0)


def test_sr_losses_with_zero_lambda_are_dpo_and_ipo():
    """λ = 0 switches the refinement term off."""
    logps, _, d = random_inputs(8)
    torch.testing.assert_close(
        sr_dpo_loss(*logps, delta=d, beta=0.2, sr_lambda=0.0)[0],
        dpo_loss(*logps, beta=0.2)[0],
        atol=1e-9,
        rtol=0,
    )
    torch.testing.assert_close(
        sr_ipo_loss(*logps, delta=d, tau=0.3, sr_lambda=0.0, beta=0.2)[0],
        ipo_loss(*logps, tau=0.3, beta=0.2)[0],
        atol=1e-9,
        rtol=0,
    )


# ---------------------------------------------------------------------------------------------- properties


def test_raising_chosen_logp_lowers_the_monotone_losses():
    """SLiC and Sr-DPO are non-increasing in h; Sr-DPO strictly, SLiC strictly until its margin is met (β·h ≥ 1)."""
    chosen_logps = torch.linspace(-20.0, 0.0, 21, dtype=torch.float64)  # h = chosen + 10 ∈ [−10, 10]
    n = len(chosen_logps)

    def full(v):
        return torch.full((n,), v, dtype=torch.float64)

    logps = (chosen_logps, full(-8.0), full(-10.0), full(-8.0))
    sr = sr_dpo_loss(*logps, delta=full(1.0), beta=0.1, sr_lambda=0.5)[0]
    assert torch.all(sr[1:] < sr[:-1])
    slic = slic_loss(*logps, beta=0.2)[0]  # active while h < 1/β = 5, i.e. chosen < −5 (the first 15 points)
    assert torch.all(slic[1:16] < slic[:15])
    assert torch.all(slic[15:] == 0)


# (name, call with h set by the policy's chosen log-prob, the target margin h* in h units)
SQUARED = {
    "ipo": (lambda lp: ipo_loss(*lp, tau=0.25, beta=0.1), 1 / (2 * 0.25)),  # 1/(2τ) = 2
    "ipo_soft": (
        lambda lp: ipo_soft_loss(*lp, preference=t(0.8), tau=0.25, beta=0.1),
        (0.8 - 0.5) / 0.25,
    ),  # 1.2
    "irepo": (lambda lp: irepo_loss(*lp, preference=t(0.75), beta=0.5), math.log(3) / 0.5),  # logit(p̂)/β
    "sr_ipo": (
        lambda lp: sr_ipo_loss(*lp, delta=t(1.0), tau=0.25, sr_lambda=0.5, beta=0.1),
        1 / (2 * 0.25) + 0.5 * 1.0,  # 1/(2τ) + λ·Δ = 2.5
    ),
}


@pytest.mark.parametrize("name", sorted(SQUARED))
def test_squared_losses_push_the_margin_towards_their_target(name):
    """Below the target margin h*, gradient descent raises logπ(y_w) and lowers logπ(y_l) (d/dπ_w < 0 < d/dπ_l);
    at h* the gradient vanishes; above it, it reverses (the regression, unlike DPO, does not push h to infinity)."""
    call, h_star = SQUARED[name]
    signs = []
    for h in (h_star - 1.0, h_star, h_star + 1.0):
        pc = t(-5.0 + h).requires_grad_()  # h = (−5 + h − −5) − (−7 − −7)
        pr = t(-7.0).requires_grad_()
        losses, _, _ = call((pc, pr, t(-5.0), t(-7.0)))
        losses.sum().backward()
        signs.append((pc.grad.item(), pr.grad.item()))
        if h == h_star:
            assert losses.item() == pytest.approx(0.0, abs=1e-12)
    (below_w, below_l), (at_w, at_l), (above_w, above_l) = signs
    assert below_w < 0 < below_l
    assert at_w == pytest.approx(0.0, abs=1e-9) and at_l == pytest.approx(0.0, abs=1e-9)
    assert above_w > 0 > above_l


def test_squared_loss_gradients_by_hand():
    """d/d logπ(y_w) of (h − target)² is 2·(h − target); of (β·h − logit p̂)² it is 2β·(β·h − logit p̂).

    IPO, h = 1.5, τ = 0.1: 2·(1.5 − 5) = −7.   iREPO, h = 1.5, β = 0.1, p̂ = 0.75: 0.2·(0.15 − log 3) = −0.1897224577
    """
    pc = t(-1.0).requires_grad_()
    ipo_loss(pc, *H15[1:], tau=0.1, beta=0.1)[0].sum().backward()
    assert pc.grad.item() == pytest.approx(-7.0, abs=1e-9)
    pc = t(-1.0).requires_grad_()
    irepo_loss(pc, *H15[1:], preference=t(0.75), beta=0.1)[0].sum().backward()
    assert pc.grad.item() == pytest.approx(-0.1897224577, abs=1e-9)


def all_losses_call(loss, logps, **kw):
    (_, pref, delta) = random_inputs(0, n=len(logps[0]))
    return preference_loss(loss, *logps, beta=0.3, tau=0.2, preference=pref, delta=delta, sr_lambda=0.5, **kw)


@pytest.mark.parametrize("loss", list(LossType))
def test_every_loss_returns_detached_rewards(loss):
    values = ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.5], [-2.5, -0.5])
    pc, pr, rc, rr = (t(*v).requires_grad_() for v in values)
    losses, chosen, rejected = all_losses_call(loss, (pc, pr, rc, rr))
    assert losses.shape == chosen.shape == rejected.shape == (2,)
    assert losses.requires_grad
    assert not chosen.requires_grad and not rejected.requires_grad
    torch.testing.assert_close(chosen, t(0.3 * 1.0, 0.3 * 0.5), atol=1e-12, rtol=0)
    torch.testing.assert_close(rejected, t(0.3 * -0.5, 0.3 * -0.5), atol=1e-12, rtol=0)


@pytest.mark.parametrize("loss", list(LossType))
def test_float32_inputs_keep_their_dtype_for_every_loss(loss):
    g = torch.Generator().manual_seed(2)
    logps = tuple(-10 * torch.rand(3, generator=g) for _ in range(4))
    pref, delta = torch.tensor([0.3, 0.5, 0.9]), torch.tensor([0.5, -1.0, 2.0])
    out = preference_loss(loss, *logps, beta=0.1, preference=pref, delta=delta)
    assert all(x.dtype == torch.float32 for x in out)


@pytest.mark.parametrize(
    ("loss_fn", "kw"), [(sr_dpo_loss, {"beta": 0.1}), (sr_ipo_loss, {"tau": 0.1, "beta": 0.1})]
)
def test_delta_carries_no_gradient(loss_fn, kw):
    """Δ = sg(...): d loss/d prefixed log-probs is zero, and the unprefixed log-probs, which enter Δ too, get
    exactly the gradient they would get with Δ a constant."""
    values = ([-1.0, -10.0], [-3.0, -4.0])
    pc, pr = (t(*v).requires_grad_() for v in values)
    pfc, pfr = t(-0.5, -9.0).requires_grad_(), t(-3.5, -2.0).requires_grad_()
    delta = refinement_delta(pfc, pfr, pc, pr)
    assert not delta.requires_grad
    losses, _, _ = loss_fn(pc, pr, t(-2.0, -8.0), t(-2.5, -4.0), delta=delta, sr_lambda=0.5, **kw)
    losses.sum().backward()
    for g in (pfc.grad, pfr.grad):
        assert g is None or torch.all(g == 0)

    pc2, pr2 = (t(*v).requires_grad_() for v in values)
    const = SR_DELTA.clone()  # the same Δ = (1, −1), built as data
    loss_fn(pc2, pr2, t(-2.0, -8.0), t(-2.5, -4.0), delta=const, sr_lambda=0.5, **kw)[0].sum().backward()
    torch.testing.assert_close(pc.grad, pc2.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(pr.grad, pr2.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("loss_fn", "kw"), [(sr_dpo_loss, {"beta": 0.1}), (sr_ipo_loss, {"tau": 0.1, "beta": 0.1})]
)
def test_a_delta_with_gradient_is_detached_by_the_loss(loss_fn, kw):
    """A Δ built without refinement_delta (still attached to its inputs) leaks no gradient either."""
    pfc, pc = t(-0.5).requires_grad_(), t(-1.0).requires_grad_()
    delta = pfc - t(-3.5) - (pc - t(-3.0))  # Δ = 1, attached to pfc and pc
    loss_fn(pc, t(-3.0), t(-2.0), t(-2.5), delta=delta, sr_lambda=0.5, **kw)[0].sum().backward()
    assert pfc.grad is None
    pc2 = t(-1.0).requires_grad_()
    loss_fn(pc2, t(-3.0), t(-2.0), t(-2.5), delta=t(1.0), sr_lambda=0.5, **kw)[0].sum().backward()
    assert pc.grad.item() == pytest.approx(pc2.grad.item(), abs=1e-12)  # only the direct path through h


def test_irepo_is_finite_on_unanimous_votes_after_smoothing():
    """p̂ = k/N is 0 or 1 when the annotators agree; both smoothings keep logit(p̂) and the loss finite."""
    votes = torch.tensor([0, 4])
    for method in ("clip", "laplace"):
        pref = smooth_preference(votes, 4, method, 0.01)
        losses, _, _ = irepo_loss(*rows(2, *H15), preference=pref, beta=0.1)
        assert torch.isfinite(losses).all()


# -------------------------------------------------------------------------------------- smooth_preference


def test_smooth_preference_clip_table():
    """N = 4 hard votes, ε = 0.01: p̂ = clamp(k/4, 0.01, 0.99)."""
    table = [
        (0, 0.01),  # unanimous for y_2: 0 clipped up to ε
        (1, 0.25),
        (2, 0.5),  # a tie
        (3, 0.75),
        (4, 0.99),  # unanimous for y_1: 1 clipped down to 1 − ε
    ]
    votes = torch.tensor([k for k, _ in table])
    got = smooth_preference(votes, 4, "clip", 0.01)
    assert got.dtype == torch.float64  # integer counts become float64
    torch.testing.assert_close(got, t(*[p for _, p in table]), atol=1e-12, rtol=0)


def test_smooth_preference_laplace_table():
    """N = 4 hard votes: p̂ = (k + ½)/5; ε is unused."""
    table = [
        (0, 0.1),  # 0.5/5
        (1, 0.3),  # 1.5/5
        (2, 0.5),  # 2.5/5: a tie stays ½
        (3, 0.7),  # 3.5/5
        (4, 0.9),  # 4.5/5
    ]
    votes = torch.tensor([k for k, _ in table])
    torch.testing.assert_close(
        smooth_preference(votes, 4, "laplace", 0.01), t(*[p for _, p in table]), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        smooth_preference(votes, 4, "laplace", 0.3), t(*[p for _, p in table]), atol=1e-12, rtol=0
    )


def test_smooth_preference_soft_probabilities():
    """N = 3 soft annotators: pass N·(mean probability); clip then clips the mean, laplace adds half a vote each way."""
    table = [
        # (mean of the 3 annotators' P(y_1 ≻ y_2), clip ε = 0.05, laplace (3·mean + ½)/4)
        (0.0, 0.05, 0.125),  # all certain of y_2: clip → ε;        0.5/4
        (0.9, 0.9, 0.8),  # inside [ε, 1 − ε]: unchanged;          (2.7 + 0.5)/4 = 3.2/4
        (1.0, 0.95, 0.875),  # all certain of y_1: clip → 1 − ε;    3.5/4
        (0.5, 0.5, 0.5),  # undecided stays ½ under both
    ]
    means = t(*[m for m, _, _ in table])
    soft_votes = 3 * means  # (0, 2.7, 3, 1.5): real-valued "votes"
    torch.testing.assert_close(
        smooth_preference(soft_votes, 3, "clip", 0.05), t(*[c for _, c, _ in table]), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        smooth_preference(soft_votes, 3, "laplace", 0.05), t(*[lp for _, _, lp in table]), atol=1e-12, rtol=0
    )


def test_smooth_preference_keeps_float_dtype_and_tolerates_rounding():
    """Floating inputs keep their dtype; N·mean a rounding error above N is accepted and read as N."""
    votes = torch.tensor([3.0000001, 0.0], dtype=torch.float32)
    got = smooth_preference(votes, 3, "clip", 0.01)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([0.99, 0.01]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["clip", "laplace"])
@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_smooth_preference_is_strictly_inside_the_unit_interval(method, n):
    p = smooth_preference(torch.arange(n + 1), n, method, 0.01)
    assert torch.all(p > 0) and torch.all(p < 1)
    assert torch.all(p[1:] > p[:-1])  # more votes for y_1, higher p̂: smoothing keeps the order


@pytest.mark.parametrize(
    ("votes", "n", "method", "eps", "match"),
    [
        (torch.tensor([1]), 0, "clip", 0.01, "n=0"),  # no annotators
        (torch.tensor([5]), 4, "clip", 0.01, r"\[0, n=4\]"),  # more votes than annotators
        (torch.tensor([-1.0]), 4, "laplace", 0.01, r"\[0, n=4\]"),  # negative
        (torch.tensor([float("nan")]), 4, "clip", 0.01, r"\[0, n=4\]"),  # NaN
        (torch.tensor([1]), 4, "clip", 0.0, "preference_clip"),  # ε = 0 would leave p̂ = 0 possible
        (torch.tensor([1]), 4, "clip", 0.5, "preference_clip"),  # ε = ½ collapses everything to ½
        (torch.tensor([1]), 4, "median", 0.01, "preference_smoothing"),  # unknown method
    ],
)
def test_smooth_preference_rejects_bad_input(votes, n, method, eps, match):
    with pytest.raises(ValueError, match=match):
        smooth_preference(votes, n, method, eps)


# ---------------------------------------------------------------------------------------------- dispatch

# Each loss through preference_loss must equal the function it names, with the keyword arguments mapped.
DIRECT = {
    LossType.DPO: lambda lp, p, d: dpo_loss(*lp, 0.2, 0.0),
    LossType.IPO: lambda lp, p, d: ipo_loss(*lp, tau=0.3, beta=0.2),
    LossType.IPO_SOFT: lambda lp, p, d: ipo_soft_loss(*lp, preference=p, tau=0.3, beta=0.2),
    LossType.SLIC: lambda lp, p, d: slic_loss(*lp, beta=0.2),
    LossType.IREPO: lambda lp, p, d: irepo_loss(*lp, preference=p, beta=0.2),
    LossType.SR_DPO: lambda lp, p, d: sr_dpo_loss(*lp, delta=d, beta=0.2, sr_lambda=0.7),
    LossType.SR_IPO: lambda lp, p, d: sr_ipo_loss(*lp, delta=d, tau=0.3, sr_lambda=0.7, beta=0.2),
}


def test_every_loss_type_is_dispatched():
    assert set(DIRECT) == set(LossType)


@pytest.mark.parametrize("loss", list(LossType))
def test_preference_loss_equals_the_named_function(loss):
    logps, p, d = random_inputs(7, n=16)
    got = preference_loss(loss, *logps, beta=0.2, tau=0.3, preference=p, delta=d, sr_lambda=0.7)
    want = DIRECT[loss](logps, p, d)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("loss", list(LossType))
def test_preference_loss_accepts_the_plain_string(loss):
    """train.loss arrives as the enum, but a YAML-ish string dispatches the same (LossType is a str enum)."""
    logps, p, d = random_inputs(7, n=4)
    a = preference_loss(loss.value, *logps, beta=0.2, preference=p, delta=d)  # type: ignore[arg-type]
    b = preference_loss(loss, *logps, beta=0.2, preference=p, delta=d)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)


@pytest.mark.parametrize(
    ("loss", "missing"),
    [
        (LossType.IPO_SOFT, "preference"),
        (LossType.IREPO, "preference"),
        (LossType.SR_DPO, "delta"),
        (LossType.SR_IPO, "delta"),
    ],
)
def test_preference_loss_names_a_missing_input(loss, missing):
    logps, p, d = random_inputs(3, n=4)
    given = {"preference": p, "delta": d}
    given[missing] = None
    with pytest.raises(ValueError, match=rf"train.loss={loss.value}: needs `{missing}`"):
        preference_loss(loss, *logps, beta=0.1, **given)


@pytest.mark.parametrize("loss", [m for m in LossType if m != LossType.DPO])
def test_label_smoothing_is_refused_outside_dpo(loss):
    """Only dpo implements ε; asking for it with another loss is an error, not a silent no-op."""
    logps, p, d = random_inputs(3, n=4)
    with pytest.raises(ValueError, match="train.label_smoothing"):
        preference_loss(loss, *logps, beta=0.1, label_smoothing=0.1, preference=p, delta=d)


def test_losses_that_do_not_read_preference_or_delta_ignore_them():
    logps, p, d = random_inputs(4, n=8)
    for loss in (LossType.DPO, LossType.IPO, LossType.SLIC):
        a = preference_loss(loss, *logps, beta=0.1, preference=p, delta=d)[0]
        b = preference_loss(loss, *logps, beta=0.1)[0]
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_train_config_new_fields():
    """Defaults as the brief (τ = 0.1, λ = 0.5, clip with ε = 0.01); the closed choices are validated."""
    cfg = TrainConfig()
    assert (cfg.tau, cfg.sr_lambda, cfg.preference_smoothing, cfg.preference_clip) == (0.1, 0.5, "clip", 0.01)
    assert TrainConfig(loss="sr_ipo").loss is LossType.SR_IPO
    assert [m.value for m in LossType] == ["dpo", "ipo", "ipo_soft", "slic", "irepo", "sr_dpo", "sr_ipo"]
    for bad in (
        {"preference_smoothing": "median"},
        {"tau": 0.0},
        {"preference_clip": 0.5},
        {"sr_lambda": -1.0},
    ):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    for name in ("tau", "sr_lambda", "preference_smoothing", "preference_clip"):
        assert TrainConfig.model_fields[name].description
