"""Rewards: the DPO implicit reward (DICE's labeller and training's reward metric), Python-callable rewards, and
sequence-classification reward models (labeller=reward_model)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from pipeline.data.chat import Prompt, as_messages, plain_text

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


def load_callable(spec: str, field: str) -> Callable[..., Any]:
    """Import the 'module:function' named in config field `field`. The user names their own trusted code."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{field}={spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{field}={spec!r}: cannot import it ({e})") from e
    if not callable(fn):
        raise ValueError(f"{field}={spec!r} is not callable")  # noqa: TRY004 -- a config error, reported as such
    return fn


def load_reward_fn(spec: str) -> RewardFn:
    """Import 'module:function' named in `label.python_reward`."""
    return load_callable(spec, "label.python_reward")


def prompt_coverage(prompts: list[str], responses: list[str]) -> list[float]:
    """A rule-based example reward: the share of the prompt's distinct words (4+ letters) the response uses.

    Usable as `label.python_reward=pipeline.method.rewards:prompt_coverage`; mainly a template for your own.
    """
    scores = []
    for prompt, response in zip(prompts, responses):
        words = {w.strip(".,;:!?\"'()").lower() for w in prompt.split()}
        words = {w for w in words if len(w) >= 4}
        used = {w.strip(".,;:!?\"'()").lower() for w in response.split()}
        scores.append(len(words & used) / len(words) if words else 0.0)
    return scores


# ---------------------------------------------------------------------------------------------- reward models
#
# A reward model has its OWN tokenizer and chat template: it never sees the policy's token ids. Each
# (prompt, response) is re-encoded from text as a two-turn conversation under the reward model's chat template
# (or `label.reward_model_format` when it has none), so a reward model with a tokenizer different from the
# policy's is expected, not an error. What IS an error: no chat template and no fallback format, a tokenizer
# whose ids do not fit the model's embedding (the tokenizer does not belong to the model), or more than one output.


def load_reward_model(path: str, dtype: str = "auto", trust_remote_code: bool = False, device=None,
                      zero_stage: int = 0):  # fmt: skip
    """A sequence-classification reward model and its tokenizer (eval mode, safetensors only).

    zero_stage=3: every weight partitioned across the ranks as it loads (pipeline/compute/zero3.py); score through
    `pipeline.compute.zero3.scoring(model, model.config)`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.compute.logprobs import default_device, require_model, resolve_dtype

    folder = require_model(path)
    device = device or default_device()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if zero_stage == 3:
            from pipeline.compute import zero3

            model = zero3.load(folder, AutoModelForSequenceClassification, resolve_dtype(dtype, device),
                               trust_remote_code, "reward model")  # fmt: skip
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code,
                use_safetensors=True,
            ).to(device)
    except (OSError, ValueError) as e:
        if str(e).startswith(f"reward model {path}:"):
            raise
        raise ValueError(f"reward model {path}: could not be loaded ({e})") from e
    if model.config.num_labels != 1:
        raise ValueError(
            f"reward model {path}: it has {model.config.num_labels} outputs; "
            "dice needs a single-score model (num_labels=1)"
        )
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"reward model {path}: its tokenizer has no pad token and no EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads the last non-pad position
    return model.eval(), tokenizer


def reward_model_ids(tokenizer, prompt: Prompt, response: str, fallback: str | None, model: str = "") -> list[int]:
    """Token ids of one (prompt, response) under the reward model's chat template (the whole conversation, then the
    response as the assistant's turn), or the fallback format (with the prompt as plain text).

    Raises:
        ValueError: naming the model and `label.reward_model_format` when there is neither.
    """
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [*as_messages(prompt), {"role": "assistant", "content": response}], tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if fallback is None:
        raise ValueError(
            f"reward model {model}: its tokenizer has no chat template; set label.reward_model_format "
            "(e.g. 'Question: {prompt}\\nAnswer: {response}')"
        )
    return tokenizer(fallback.format(prompt=plain_text(prompt), response=response), add_special_tokens=True)["input_ids"]


def check_format(fallback: str | None) -> None:
    """`label.reward_model_format` must name {prompt} and {response}."""
    if fallback is None:
        return
    import string

    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(fallback) if f is not None}
    except ValueError as e:
        raise ValueError(f"label.reward_model_format: not a valid format ({e})") from e
    if fields != {"prompt", "response"}:
        raise ValueError(
            f"label.reward_model_format: needs exactly {{prompt}} and {{response}} (has {sorted(fields)})"
        )


def score_reward_model(model, tokenizer, encoded: list[list[int]], batch_size: int, name: str = "", *,
                       engine=None, passes=None):  # fmt: skip
    """Scores r of already-encoded sequences, batched by length with right padding. Returns (N,) float64.

    ZeRO-3 partitioned inference (pipeline/compute/zero3.py): `engine` is the DeepSpeed engine around `model`, through which
    every forward pass goes, and `passes(n)` the most forward passes any rank makes, agreed before the first one;
    the difference is made up with one-token passes whose results are dropped (as `pipeline.compute.logprobs.score`
    does).

    Raises:
        ValueError: when an id is outside the model's vocabulary (its tokenizer does not belong to it).
    """
    import numpy as np
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    top = max((max(x) for x in encoded if x), default=-1)
    if top >= vocab:
        raise ValueError(
            f"reward model {name}: its tokenizer produced token id {top}, but the model has {vocab} "
            "embeddings; "
            "the tokenizer saved with it does not belong to this model"
        )
    forward = engine if engine is not None else model
    device = engine.device if engine is not None else next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    out = np.empty(len(encoded), dtype=np.float64)
    with torch.no_grad():
        for step in range(passes(len(batches)) if passes else len(batches)):  # agreed before any pass (ZeRO-3)
            if step >= len(batches):  # another rank's pass: this one only takes part in the gathers
                one = torch.ones((1, 1), dtype=torch.long, device=device)  # (1, 1)
                forward(input_ids=one, attention_mask=one)
                continue
            idx = batches[step]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
            attention = torch.zeros((len(idx), width), dtype=torch.long)  # (B, T)
            for row, i in enumerate(idx):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                attention[row, : len(encoded[i])] = 1
            logits = forward(input_ids=ids.to(device), attention_mask=attention.to(device)).logits  # (B, 1)
            out[idx] = logits[:, 0].double().cpu().numpy()
    return out
