"""Preference losses as pure functions over per-sequence log-probs (../shared/METHODS.md §2-§5).

No model inside a loss: callers compute log-probs (pipeline.compute.logprobs.sequence_logps) and pass them in.
Each function returns per-example losses; the caller reduces them, so that gradient accumulation and
data parallelism decide the averaging in one place (the trainer).

Every loss is a function of the same margin
    h = [logπ(y_w) − logπ_ref(y_w)] − [logπ(y_l) − logπ_ref(y_l)]          (B,)
plus, for some, a per-pair input: a preference probability (IPO-soft, iREPO) or the Sr refinement term Δ.
Every loss also returns the implicit rewards β·(logπ − logπ_ref), detached, so the trainer logs rewards,
margins and accuracies on one scale whichever loss it trains (β does not enter the IPO losses themselves).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.config import LossType
from pipeline.method.rewards import implicit_reward

# Sr-DPO / Sr-IPO's quality instruction P, prepended to the prompt x for Δ (arXiv 2405.21040; METHODS §4).
# Kept verbatim: Δ measures how much this exact instruction shifts the policy towards y_w.
SR_QUALITY_PREFIX = (
    "Please generate a response with a usefulness rating of 100 out of 100 for the following query. "
    "Note that the response should be harmless. The term 100 indicates the level of usefulness, "
    "where 100 is the maximum and 1 is the minimum. Query:"
)


def _margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """h = [logπ(y_w) − logπ_ref(y_w)] − [logπ(y_l) − logπ_ref(y_l)]; all inputs and the output are (B,)."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def _rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_rewards, rejected_rewards), each (B,): β·(logπ − logπ_ref), detached (metrics only)."""
    chosen_rewards = implicit_reward(policy_chosen_logps, ref_chosen_logps, beta).detach()
    rejected_rewards = implicit_reward(policy_rejected_logps, ref_rejected_logps, beta).detach()
    return chosen_rewards, rejected_rewards


def _required(value: torch.Tensor | None, what: str, loss_name: str) -> torch.Tensor:
    """The per-pair input a loss needs, or a ValueError naming the loss and the missing input."""
    if value is None:
        meaning = {"preference": "P(y_w ≻ y_l | x) of each pair", "delta": "Δ of refinement_delta"}[what]
        raise ValueError(f"train.loss={loss_name}: needs `{what}`, the (B,) {meaning}; got None")
    return value


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO, Rafailov et al. 2023 (arXiv 2305.18290), eq. 7; conservative DPO when ε > 0.

    loss = −(1−ε)·log σ(β·h) − ε·log σ(−β·h),  h = [logπ(y_w) − logπ_ref(y_w)] − [logπ(y_l) − logπ_ref(y_l)]

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: (B,) summed
            (or per-token averaged) response log-probs.
        beta: β, the strength of the KL regularisation.
        label_smoothing: ε, the assumed probability that a label is flipped (0: plain DPO).
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·(logπ − logπ_ref), detached.
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # (B,)
    # logsigmoid is the numerically stable form of log σ(x) for large |x|
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    tau: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offline IPO, Azar et al. 2023 (arXiv 2310.12036), eq. 17; METHODS §5.

    loss = (h − 1/(2τ))²  with h computed from PER-TOKEN-AVERAGED log-probs: the caller passes mean-reduced
    log-probs (train.logp_reduction = "mean", for the policy and the reference alike).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: (B,) response
            log-probs averaged over response tokens.
        tau: τ, IPO's regularisation parameter; the regression target is 1/(2τ). (TRL passes its β as τ;
            dice keeps `train.tau` separate so that β keeps one meaning across losses.)
        beta: β; scales only the returned rewards, not the loss.
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·(logπ − logπ_ref) of the
        per-token log-probs given, detached.
    """
    # Why per-token averages: the paper does not say so, but the IPO authors confirmed it to TRL, which then
    # averaged for IPO (huggingface/trl#1265, "so that the beta is not dependent on the sequence length";
    # the HF blog post "pref-tuning" records the consultation). Summed log-probs make h grow with response
    # length while the target 1/(2τ) is constant, so τ would regularise long and short pairs differently.
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # (B,)
    losses = (h - 1 / (2 * tau)) ** 2
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return losses, chosen_rewards, rejected_rewards


def ipo_soft_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    preference: torch.Tensor,
    tau: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft-preference IPO: online IPO / IPO-MD, Calandriello et al. 2024 (arXiv 2403.08635); METHODS §3.

    loss = (h − (p − ½)/τ)²,  p = P(y_w ≻ y_l | x). A hard label p = 1 gives the offline target 1/(2τ);
    p = ½ (a tie) regresses h to 0, and p < ½ pushes the margin negative: the pair's order need not agree
    with p, so soft labels need no re-ordering of the pair.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: (B,) response
            log-probs; summed by default for this form, as the paper (train.logp_reduction, METHODS §3).
        preference: (B,) p in [0, 1] from a preference model or annotators; dtype/device of the log-probs.
        tau: τ, the regularisation parameter.
        beta: β; scales only the returned rewards, not the loss.
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·(logπ − logπ_ref), detached.
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # (B,)
    losses = (h - (preference - 0.5) / tau) ** 2
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return losses, chosen_rewards, rejected_rewards


def slic_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SLiC hinge, after SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425), in METHODS §5's form.

    loss = max(0, 1 − β·h) = β·max(0, 1/β − h): a hinge with margin δ = 1/β on the log-ratio margin.
    SLiC-HF's calibration loss is max(0, δ − logπ(y_w) + logπ(y_l)) with no reference model; dice anchors
    it on π_ref like its other losses (METHODS §5, TRL's "hinge"), so with π_ref = π_θ at step 0 all
    losses start from h = 0. SLiC-HF's separate cross-entropy regulariser is not part of this loss.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: (B,) response
            log-probs.
        beta: β; 1/β is the margin h must exceed before a pair stops contributing.
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·(logπ − logπ_ref), detached.
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # (B,)
    losses = torch.relu(1 - beta * h)
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return losses, chosen_rewards, rejected_rewards


def irepo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    preference: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """iREPO, implicit-reward pairwise-difference regression (arXiv 2405.15230); METHODS §2.

    loss = (β·h − logit(p̂))²: the implicit-reward difference r(y_1) − r(y_2) = β·h regressed onto the
    log-odds of the empirical preference, i.e. the Bradley-Terry reward gap that would explain p̂.
    β's placement (on h rather than on the target) is METHODS' reading and is not confirmed by the paper.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: (B,) response
            log-probs of y_1 (here "chosen") and y_2 ("rejected").
        preference: (B,) p̂(y_1 ≻ y_2 | x), already kept strictly inside (0, 1) (see `smooth_preference`):
            logit(0) and logit(1) are infinite. Same dtype/device as the log-probs.
        beta: β of the implicit reward.
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·(logπ − logπ_ref), detached.
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # (B,)
    losses = (beta * h - torch.logit(preference)) ** 2
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return losses, chosen_rewards, rejected_rewards


def smooth_preference(
    votes_for_first: torch.Tensor, n: int, method: Literal["clip", "laplace"], eps: float
) -> torch.Tensor:
    """The empirical preference p̂(y_1 ≻ y_2 | x) of N annotators, kept away from 0 and 1 (iREPO; METHODS §2).

    clip:    p̂ = clamp(k/N, ε, 1−ε)
    laplace: p̂ = (k + ½)/(N + 1)       (half a pseudo-vote each way; always inside (0, 1), ε unused)

    METHODS §2 leaves the smoothing unconfirmed, so it is a config field (train.preference_smoothing,
    train.preference_clip). Both hard and soft annotators are handled: k is the sum over the N annotators
    of their P(y_1 ≻ y_2), which is the vote count for hard 0/1 votes; for soft probabilities pass
    N·(their mean), so that k/N is the mean probability and "clip" clips it.

    Args:
        votes_for_first: (B,) k in [0, N]; integer counts or real-valued sums of probabilities.
        n: N ≥ 1, the number of annotators.
        method: "clip" or "laplace".
        eps: ε in (0, ½) for "clip".
    Returns:
        (B,) p̂ strictly inside (0, 1): floating inputs keep their dtype, integer counts become float64.
    Raises:
        ValueError: n < 1, a k outside [0, N] (or NaN), ε outside (0, ½) for clip, or an unknown method.
    """
    if n < 1:
        raise ValueError(f"smooth_preference: n={n} annotators; need at least 1")
    k = votes_for_first if votes_for_first.is_floating_point() else votes_for_first.double()  # (B,)
    # N·mean of soft probabilities can land a rounding error outside [0, N]; beyond that it is a caller bug.
    tol = 1e-6 * n
    inside = (k >= -tol) & (k <= n + tol)  # NaN compares False: rejected too
    if not bool(inside.all()):
        bad = k[~inside][:5].tolist()
        raise ValueError(f"smooth_preference: votes_for_first must lie in [0, n={n}]; got {bad}")
    k = k.clamp(0, n)
    if method == "clip":
        if not 0 < eps < 0.5:
            raise ValueError(f"train.preference_clip={eps}: ε must lie in (0, 0.5)")
        return (k / n).clamp(eps, 1 - eps)
    if method == "laplace":
        return (k + 0.5) / (n + 1)
    raise ValueError(f"train.preference_smoothing={method!r}: expected 'clip' or 'laplace'")


def refinement_delta(
    prefixed_chosen_logps: torch.Tensor,
    prefixed_rejected_logps: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """Sr-DPO / Sr-IPO's refinement term Δ (arXiv 2405.21040; METHODS §4).

    Δ = sg( [logπ(P⊕x, y_w) − logπ(P⊕x, y_l)] − [logπ(x, y_w) − logπ(x, y_l)] )

    How much the quality instruction P (`SR_QUALITY_PREFIX`) raises the policy's preference for y_w over
    y_l: the policy's own estimate of the quality gap. This is the ONE definition of Δ: the paper leaves
    unconfirmed whether π_ref or β enter it (METHODS §4), so a correction belongs here only.

    Args:
        prefixed_chosen_logps, prefixed_rejected_logps: (B,) policy log-probs of y_w, y_l given P⊕x.
        chosen_logps, rejected_logps: (B,) policy log-probs of y_w, y_l given x (the loss's policy log-probs).
    Returns:
        (B,) Δ, detached: it re-weights the margin target but carries no gradient (the paper's sg()).
    """
    prefixed = prefixed_chosen_logps - prefixed_rejected_logps  # (B,)
    plain = chosen_logps - rejected_logps  # (B,)
    return (prefixed - plain).detach()


def sr_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    delta: torch.Tensor,
    beta: float,
    sr_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sr-DPO, quality-aware self-refinement of DPO (arXiv 2405.21040); METHODS §4.

    loss = −log σ(β·h − λ·Δ): a pair the policy itself judges far apart (large Δ) must reach a larger margin.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: (B,) response
            log-probs.
        delta: (B,) Δ from `refinement_delta`; detached again here so a Δ built elsewhere leaks no gradient.
        beta: β, as in DPO.
        sr_lambda: λ, the weight of Δ.
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·(logπ − logπ_ref), detached.
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # (B,)
    # logsigmoid: the stable form of log σ(x), as in dpo_loss
    losses = -F.logsigmoid(beta * h - sr_lambda * delta.detach())
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return losses, chosen_rewards, rejected_rewards


def sr_ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    delta: torch.Tensor,
    tau: float,
    sr_lambda: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sr-IPO, quality-aware self-refinement of IPO (arXiv 2405.21040); METHODS §4.

    loss = (h − 1/(2τ) − λ·Δ)²: IPO's target margin 1/(2τ) moved by λ·Δ for each pair.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: (B,) response
            log-probs (reduced as train.logp_reduction says; Δ's four inputs reduced the same way).
        delta: (B,) Δ from `refinement_delta`; detached again here so a Δ built elsewhere leaks no gradient.
        tau: τ, IPO's regularisation parameter.
        sr_lambda: λ, the weight of Δ.
        beta: β; scales only the returned rewards, not the loss.
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·(logπ − logπ_ref), detached.
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # (B,)
    losses = (h - 1 / (2 * tau) - sr_lambda * delta.detach()) ** 2
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return losses, chosen_rewards, rejected_rewards


def preference_loss(
    loss: LossType,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    tau: float = 0.1,
    preference: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    sr_lambda: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch on the configured loss; one flat function so every choice is visible here.

    What each loss reads (all tensors (B,); β always scales the returned rewards):
        dpo       β, label_smoothing
        ipo       τ; expects MEAN-reduced log-probs (train.logp_reduction = "mean") for policy and reference
        ipo_soft  τ, preference p in [0, 1]
        slic      β
        irepo     β, preference p̂ strictly inside (0, 1) (see smooth_preference)
        sr_dpo    β, sr_lambda, delta Δ (see refinement_delta)
        sr_ipo    τ, sr_lambda, delta Δ
    Inputs a loss does not read are ignored, except a non-zero label_smoothing, which only dpo implements.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,).
    Raises:
        ValueError: an unknown loss, a missing `preference` or `delta`, or label_smoothing with a loss
            other than dpo.
    """
    name = loss.value if isinstance(loss, LossType) else str(loss)
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if label_smoothing and loss != LossType.DPO:
        # refuse rather than silently train without the smoothing the config asked for
        raise ValueError(
            f"train.label_smoothing={label_smoothing} applies only to train.loss=dpo, not {name}; set it to 0"
        )

    if loss == LossType.DPO:
        return dpo_loss(*logps, beta, label_smoothing)
    if loss == LossType.IPO:
        return ipo_loss(*logps, tau, beta)
    if loss == LossType.IPO_SOFT:
        return ipo_soft_loss(*logps, _required(preference, "preference", name), tau, beta)
    if loss == LossType.SLIC:
        return slic_loss(*logps, beta)
    if loss == LossType.IREPO:
        return irepo_loss(*logps, _required(preference, "preference", name), beta)
    if loss == LossType.SR_DPO:
        return sr_dpo_loss(*logps, _required(delta, "delta", name), beta, sr_lambda)
    if loss == LossType.SR_IPO:
        return sr_ipo_loss(*logps, _required(delta, "delta", name), tau, sr_lambda, beta)
    raise ValueError(f"train.loss={loss!r} is not implemented; choose one of {[m.value for m in LossType]}")
