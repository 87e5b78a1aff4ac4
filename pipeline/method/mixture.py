"""IPO-MD's geometric-mixture sampler: responses from π_mix ∝ π_θ^(1-β)·π_ref^β, token by token.

Munos et al. 2023 / Calandriello et al. 2024 (arXiv 2403.08635, IPO-MD; ../shared/METHODS.md §3): both
responses of a pair are sampled from the geometric mixture of the policy and its reference, implemented per
token as

    log π_mix(· | x, y_<t) = log_softmax((1 − β)·ℓ_θ + β·ℓ_ref)

where ℓ are the two models' next-token logits, followed by the usual temperature / top-p sampling. vLLM cannot
combine two models' logits inside its sampler, so this is a transformers decoding loop:

- batched, with a KV cache for BOTH models (transformers `DynamicCache`); prompts are left-padded and every
  row gets its own position ids from its attention mask, so padding changes nothing;
- each prompt is prefilled once and its cache repeated for its K samples (prefix sharing);
- finished rows (EOS / stop token / max_tokens / context end) leave the batch, caches included;
- every sample draws its uniforms from its own generator seeded by (prompt seed, sample index), so its tokens
  do not depend on which other prompts share its batch.

β = 0 is plain policy sampling and β = 1 plain reference sampling: the other model's forward pass is skipped,
the loop is otherwise the same (it does NOT delegate to vLLM; `generate.sampler: vllm` is the fast path for
plain policy sampling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


def mixture_logprobs(
    policy_logits: torch.Tensor, reference_logits: torch.Tensor | None, beta: float
) -> torch.Tensor:
    """Next-token log-probs of the geometric mixture, METHODS.md §3.

    Args:
        policy_logits: (B, V) logits of π_θ (ignored when beta = 1; may be None then).
        reference_logits: (B, V) logits of π_ref (ignored when beta = 0; may be None then).
        beta: β_m in [0, 1].
    Returns:
        (B, V) float32 log-probs, log_softmax((1 − β)·ℓ_θ + β·ℓ_ref).
    """
    if beta == 0:
        mixed = policy_logits.float()
    elif beta == 1:
        mixed = reference_logits.float()  # type: ignore[union-attr]
    else:
        mixed = (1 - beta) * policy_logits.float() + beta * reference_logits.float()  # type: ignore[union-attr]
    return torch.log_softmax(mixed, dim=-1)  # (B, V)


def sampling_probs(logprobs: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution actually sampled: softmax(logprobs / T) restricted to the top-p nucleus, renormalised.

    Args:
        logprobs: (B, V) next-token log-probs (the mixture's).
        temperature: > 0 (greedy decoding is handled by the caller).
        top_p: nucleus threshold in (0, 1]; the smallest set of most likely tokens whose mass reaches top_p.
    Returns:
        (B, V) float32 probabilities.
    """
    probs = torch.softmax(logprobs / temperature, dim=-1)  # (B, V)
    if top_p >= 1:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V)
    mass_before = sorted_p.cumsum(-1) - sorted_p  # (B, V): mass of strictly more likely tokens
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)  # the most likely token always stays
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)  # (B, V)
    return kept / kept.sum(-1, keepdim=True)


def sample_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row i takes the first token whose cumulative probability exceeds uniforms[i].

    Args:
        probs: (B, V) probabilities.
        uniforms: (B,) draws from U[0, 1).
    Returns:
        (B,) token ids.
    """
    cdf = probs.double().cumsum(-1)  # (B, V); float64 so the last bucket does not vanish in rounding
    u = uniforms.double().unsqueeze(-1) * cdf[:, -1:]  # (B, 1): scale to the (≈1) total mass
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # (B,)
    return idx.clamp(max=probs.shape[-1] - 1)


@dataclass
class MixtureSample:
    """One sampled response: its tokens (EOS / stop token included when emitted), why it ended, its log-probs."""

    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(
        default_factory=list
    )  # log π_mix(y_t | x, y_<t), temperature 1, no top-p
    finish_reason: str = "length"  # "stop" (EOS, stop token or stop string) or "length"

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.token_logprobs))


@torch.no_grad()
def _forward_last(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True)  # fmt: skip
    return out.logits[:, -1]  # (B, V)


class MixtureSampler:
    """Samples responses from the geometric mixture of two causal LMs that share a tokenizer.

    Args:
        policy: π_θ, a transformers causal LM in eval mode.
        reference: π_ref, same vocabulary, on the same device.
        beta: β_m in [0, 1]; 0 skips the reference's forward pass, 1 the policy's.
        eos_ids: token ids that end a response (finish_reason "stop").
        pad_id: id used for left padding (never attended to).
        max_context: prompt + response token limit of the models (responses reaching it end with "length").
    """

    def __init__(
        self, policy, reference, *, beta: float, eos_ids: Sequence[int], pad_id: int, max_context: int
    ):
        if not 0 <= beta <= 1:
            raise ValueError(f"mixture beta must be in [0, 1], got {beta}")
        self.models = [(m, w) for m, w in ((policy, 1 - beta), (reference, beta)) if w > 0]
        self.policy, self.reference, self.beta = policy, reference, beta
        self.eos_ids = {int(i) for i in eos_ids}
        self.pad_id = pad_id
        self.max_context = max_context
        self.device = next(policy.parameters()).device

    def _logprobs(self, outs: list[torch.Tensor]) -> torch.Tensor:
        by_model = dict(zip((id(m) for m, _ in self.models), outs))
        return mixture_logprobs(
            by_model.get(id(self.policy)), by_model.get(id(self.reference)), self.beta
        )  # (B, V)

    def generate(
        self,
        prompts: Sequence[list[int]],
        seeds: Sequence[int],
        *,
        num_samples: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        batch_size: int = 32,
        stop_check: Callable[[list[int]], int | None] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[list[MixtureSample]]:
        """K samples per prompt.

        Args:
            prompts: token ids of each prompt (chat template applied).
            seeds: one seed per prompt; sample j of a prompt draws from a generator seeded by (seed, j).
            num_samples: K.
            temperature: 0 is greedy decoding.
            top_p: nucleus threshold.
            max_tokens: response token limit.
            batch_size: sequences decoded together (at least K: one prompt's samples always share a batch).
            stop_check: called with a row's response ids after each token; returns the number of tokens to keep
                when a stop string has appeared (the row then ends with "stop"), else None.
            on_batch: called with the number of prompts finished after each batch (progress).
        Returns:
            For each prompt, its K samples in sample order.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        results: list[list[MixtureSample]] = [[] for _ in prompts]
        per_batch = max(batch_size // num_samples, 1)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
        for start in range(0, len(order), per_batch):
            idx = order[start : start + per_batch]
            samples = self._generate_batch([prompts[i] for i in idx], [seeds[i] for i in idx], num_samples,
                                           temperature, top_p, max_tokens, stop_check)  # fmt: skip
            for n, i in enumerate(idx):
                results[i] = samples[n * num_samples : (n + 1) * num_samples]
            if on_batch is not None:
                on_batch(len(idx))
        return results

    def _generate_batch(
        self, prompts, seeds, k, temperature, top_p, max_tokens, stop_check
    ) -> list[MixtureSample]:
        dev = self.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's last position is its last prompt token
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (P, T): each row counts from its first real token
        from transformers import DynamicCache

        caches = [DynamicCache() for _ in self.models]
        last = [
            _forward_last(m, ids, mask, positions, c) for (m, _), c in zip(self.models, caches)
        ]  # each (P, V)
        # K samples per prompt: repeat the prefilled caches instead of prefilling K times
        for c in caches:
            c.batch_repeat_interleave(k)
        last = [x.repeat_interleave(k, dim=0) for x in last]  # each (B, V), B = P·K
        mask = mask.repeat_interleave(k, dim=0)  # (B, T)
        next_pos = positions[:, -1].repeat_interleave(k) + 1  # (B,)
        prompt_len = torch.tensor([len(p) for p in prompts]).repeat_interleave(k)  # (B,)
        rngs = [np.random.default_rng([seed, j]) for seed in seeds for j in range(k)]
        samples = [MixtureSample() for _ in rngs]
        alive = list(range(len(rngs)))  # sample index of each row still in the batch
        step = 0
        while alive:
            logprobs = self._logprobs(last)  # (B, V)
            if temperature == 0:
                tokens = logprobs.argmax(-1)  # (B,)
            else:
                u = torch.tensor([rngs[s].random() for s in alive])  # (B,)
                tokens = sample_tokens(sampling_probs(logprobs, temperature, top_p), u.to(dev))  # (B,)
            chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B,)
            step += 1
            keep_rows = []
            for row, (s, tok, lp) in enumerate(zip(alive, tokens.tolist(), chosen.tolist())):
                sample = samples[s]
                sample.token_ids.append(tok)
                sample.token_logprobs.append(lp)
                if tok in self.eos_ids:
                    sample.finish_reason = "stop"
                    continue
                cut = stop_check(sample.token_ids) if stop_check is not None else None
                if cut is not None:
                    del sample.token_ids[cut:], sample.token_logprobs[cut:]
                    sample.finish_reason = "stop"
                    continue
                if step >= max_tokens or int(prompt_len[row]) + step >= self.max_context:
                    sample.finish_reason = "length"
                    continue
                keep_rows.append(row)
            if not keep_rows:
                break
            if len(keep_rows) < len(alive):  # finished rows leave the batch, and their cache rows with them
                sel = torch.tensor(keep_rows, device=dev)
                for c in caches:
                    c.batch_select_indices(sel)
                tokens, mask, next_pos = tokens[sel], mask[sel], next_pos[sel]
                prompt_len = prompt_len[sel.cpu()]
                alive = [alive[r] for r in keep_rows]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=-1)  # (B, T+1)
            step_ids, step_pos = tokens.unsqueeze(-1), next_pos.unsqueeze(-1)  # (B, 1) each
            last = [_forward_last(m, step_ids, mask, step_pos, c) for (m, _), c in zip(self.models, caches)]
            next_pos = next_pos + 1
        return samples


@torch.no_grad()
def naive_mixture_generate(policy, reference, prompt: list[int], *, beta: float, seed: int, num_samples: int,
                           temperature: float, top_p: float, max_tokens: int, eos_ids: Sequence[int]) -> list[list[int]]:  # fmt: skip
    """The baseline the sampler is measured against (benchmarks/generate_throughput.py): one sequence at a
    time, both models re-run over the whole prefix at every token, no KV cache. Same seeding as MixtureSampler,
    so at equal numerics it draws the same tokens."""
    dev = next(policy.parameters()).device
    eos = set(eos_ids)
    out = []
    for j in range(num_samples):
        rng = np.random.default_rng([seed, j])
        seq = list(prompt)
        for _ in range(max_tokens):
            x = torch.tensor([seq], device=dev)  # (1, T)
            lp = mixture_logprobs(policy(x).logits[:, -1], reference(x).logits[:, -1], beta)  # (1, V)
            if temperature == 0:
                tok = int(lp.argmax(-1))
            else:
                tok = int(
                    sample_tokens(sampling_probs(lp, temperature, top_p), torch.tensor([rng.random()]))[0]
                )
            seq.append(tok)
            if tok in eos:
                break
        out.append(seq[len(prompt) :])
    return out
