"""Layers 1-2 for the preference losses (pipeline/losses.py) and the implicit reward (pipeline/rewards.py).

METHODS.md §5: DPO (sigmoid) −log σ(β·h); conservative DPO −(1−ε)·log σ(β·h) − ε·log σ(−β·h), with
h = [logπ(y_w) − logπ_ref(y_w)] − [logπ(y_l) − logπ_ref(y_l)].  §1.2: r = β·(logπ − logπ_ref).
"""

import math

import numpy as np
import pytest
import torch

from pipeline.config import LossType
from pipeline.losses import dpo_loss, preference_loss
from pipeline.rewards import implicit_reward


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
        preference_loss("ipo", *args, beta=0.1)  # type: ignore[arg-type]


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
