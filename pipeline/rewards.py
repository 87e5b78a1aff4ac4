"""Rewards: the DPO implicit reward (DICE's labeller and training's reward metric) and Python-callable rewards."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")  # np.ndarray or torch.Tensor: the same arithmetic serves both

RewardFn = Callable[[list[str], list[str]], list[float]]


def implicit_reward(policy_logps: T, reference_logps: T, beta: float) -> T:
    """DPO implicit reward r(x, y) = β·[logp(π, x, y) − logp(π_ref, x, y)] (DICE, arXiv 2406.09760, §3.1).

    Args:
        policy_logps: (N,) summed response log-probs under the policy.
        reference_logps: (N,) the same under its reference.
        beta: the β the policy was trained with (rankings do not depend on it; α's scale does).
    Returns:
        (N,) rewards, same type as the inputs.
    """
    return beta * (policy_logps - reference_logps)


def load_reward_fn(spec: str) -> RewardFn:
    """Import 'module:function' named in `label.python_reward`. The user names their own trusted code."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"label.python_reward={spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"label.python_reward={spec!r}: cannot import it ({e})") from e
    if not callable(fn):
        raise ValueError(f"label.python_reward={spec!r} is not callable")
    return fn


def prompt_coverage(prompts: list[str], responses: list[str]) -> list[float]:
    """A rule-based example reward: the share of the prompt's distinct words (4+ letters) the response uses.

    Usable as `label.python_reward=pipeline.rewards:prompt_coverage`; mainly a template for your own.
    """
    scores = []
    for prompt, response in zip(prompts, responses):
        words = {w.strip(".,;:!?\"'()").lower() for w in prompt.split()}
        words = {w for w in words if len(w) >= 4}
        used = {w.strip(".,;:!?\"'()").lower() for w in response.split()}
        scores.append(len(words & used) / len(words) if words else 0.0)
    return scores
