"""Preference losses as pure functions over per-sequence log-probs (../shared/METHODS.md §5).

No model inside a loss: callers compute log-probs (pipeline.logprobs.sequence_logps) and pass them in.
Each function returns per-example losses; the caller reduces them, so that gradient accumulation and
data parallelism decide the averaging in one place (the trainer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config import LossType
from pipeline.rewards import implicit_reward


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
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    # logsigmoid is the numerically stable form of log σ(x) for large |x|
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = implicit_reward(policy_chosen_logps, ref_chosen_logps, beta).detach()
    rejected_rewards = implicit_reward(policy_rejected_logps, ref_rejected_logps, beta).detach()
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch on the configured loss; one flat function so every choice is visible here."""
    if loss == LossType.DPO:
        return dpo_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing
        )
    raise ValueError(f"train.loss={loss!r} is not implemented")
