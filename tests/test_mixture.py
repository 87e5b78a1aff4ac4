"""IPO-MD's geometric-mixture sampler (pipeline/method/mixture.py) on two different tiny models: its next-token
distribution is the normalised geometric mixture of both models' logits, β = 0 / β = 1 are the policy / the
reference, sampling is exactly the temperature/top-p distribution, and seeds fix the samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import schemas
from pipeline.data.artifacts import execute, read_parquet
from pipeline.method.mixture import (
    MixtureSampler,
    mixture_logprobs,
    naive_mixture_generate,
    sample_tokens,
    sampling_probs,
)
from pipeline.run import rounds
from stages import generate

from .conftest import perturbed_copy

PROMPTS = [
    "Explain why the sky is blue.",
    "Hi",
    "Write a haiku about rain and the sea at night, in three lines.",
]


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """(policy, reference, tokenizer, reference path): the session tiny model and a perturbed copy of it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = perturbed_copy(tiny_model, tmp_path_factory.mktemp("models") / "perturbed-mix", 0.05)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    return policy, reference, tok, path


def _sampler(models, beta):
    policy, reference, tok, _ = models
    return MixtureSampler(policy, reference, beta=beta, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                          max_context=1024)  # fmt: skip


def _prompt_ids(tok):
    from pipeline.compute.logprobs import prompt_ids

    return [prompt_ids(tok, p) for p in PROMPTS]


@torch.no_grad()
def _direct(model, seq: list[int]) -> torch.Tensor:
    """Next-token logits at every position of one unpadded sequence, no cache: (T, V)."""
    return model(torch.tensor([seq])).logits[0]


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_next_token_distribution_is_the_geometric_mixture(models, beta):
    """At every sampled token, the sampler's (batched, left-padded, KV-cached) next-token distribution equals
    log_softmax((1−β)·ℓ_θ + β·ℓ_ref) computed directly from both models' full forward passes; at β = 0 that
    is the policy's own log_softmax, at β = 1 the reference's."""
    policy, reference, tok, _ = models
    prompts = _prompt_ids(tok)
    samples = _sampler(models, beta).generate(prompts, [11, 12, 13], num_samples=3, temperature=1.0, top_p=1.0,
                                              max_tokens=40, batch_size=9)  # fmt: skip
    assert {len(set(map(tuple, (s.token_ids for s in per)))) for per in samples} != {1}  # samples vary
    checked = 0
    for p, per in zip(prompts, samples):
        for s in per:
            seq = p + s.token_ids
            lp_pol = torch.log_softmax(_direct(policy, seq).double(), -1)  # (T, V)
            lp_ref = torch.log_softmax(_direct(reference, seq).double(), -1)  # (T, V)
            # normalised geometric mixture, from the definition: π_θ^(1−β)·π_ref^β / Σ_v (same)
            log_unnorm = (1 - beta) * lp_pol + beta * lp_ref  # (T, V)
            mix = log_unnorm - torch.logsumexp(log_unnorm, -1, keepdim=True)  # (T, V)
            pos = torch.arange(len(p) - 1, len(seq) - 1)  # positions predicting the response tokens
            expected = mix[pos, torch.tensor(s.token_ids)].numpy()
            np.testing.assert_allclose(s.token_logprobs, expected, atol=2e-4)
            if beta in (0.0, 1.0):
                plain = (lp_pol if beta == 0 else lp_ref)[pos, torch.tensor(s.token_ids)].numpy()
                np.testing.assert_allclose(s.token_logprobs, plain, atol=2e-4)
            checked += len(s.token_ids)
    assert checked > 100


def test_full_next_token_distribution_matches_direct_mixture(models):
    """The whole (V,) distribution at the first response token, for a batch with unequal prompt lengths."""
    policy, reference, tok, _ = models
    beta = 0.5
    prompts = _prompt_ids(tok)
    ours = mixture_logprobs(*[_batched_last(m, prompts, tok.pad_token_id) for m in (policy, reference)], beta)
    for i, p in enumerate(prompts):
        expected = torch.log_softmax(0.5 * _direct(policy, p)[-1] + 0.5 * _direct(reference, p)[-1], -1)
        torch.testing.assert_close(ours[i], expected, atol=2e-5, rtol=0)
    # and it differs from both models' own distributions (the two models are really different)
    own = torch.log_softmax(_direct(policy, prompts[0])[-1], -1)
    assert (ours[0] - own).abs().max() > 0.05


@torch.no_grad()
def _batched_last(model, prompts, pad_id):
    """Last-position logits of a left-padded batch, through the same prefill call the sampler makes."""
    from transformers import DynamicCache

    from pipeline.method.mixture import _forward_last

    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return _forward_last(model, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), DynamicCache())  # (B, V)


def test_sampling_is_exactly_the_temperature_top_p_distribution():
    """Inverse-CDF sampling over a fine grid of uniforms reproduces the target probabilities to 1/N."""
    logprobs = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 1.5]]), -1)
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.3, 0.8)):
        probs = sampling_probs(logprobs, temperature, top_p)[0]
        p = torch.softmax(logprobs[0] / temperature, -1)
        keep = torch.zeros_like(p, dtype=torch.bool)
        order = p.argsort(descending=True)
        mass = 0.0
        for t in order.tolist():  # the nucleus by hand: most likely first, until the mass reaches top_p
            if mass >= top_p:
                break
            keep[t] = True
            mass += p[t].item()
        target = torch.where(keep, p, 0) / p[keep].sum()
        torch.testing.assert_close(probs, target.float())
        n = 100_000
        u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        counts = torch.bincount(sample_tokens(probs.expand(n, -1), u), minlength=6).double() / n
        torch.testing.assert_close(counts, target.double(), atol=2 / n, rtol=0)


def test_same_seed_same_samples_independent_of_batching(models):
    _, _, tok, _ = models
    prompts = _prompt_ids(tok)
    s = _sampler(models, 0.5)
    kw = {"num_samples": 4, "temperature": 0.9, "top_p": 0.95, "max_tokens": 30}
    a = s.generate(prompts, [1, 2, 3], batch_size=12, **kw)
    b = s.generate(prompts, [1, 2, 3], batch_size=4, **kw)  # one prompt per batch instead of three
    c = s.generate(prompts, [1, 2, 4], batch_size=12, **kw)

    def ids(r):
        return [x.token_ids for per in r for x in per]

    assert ids(a) == ids(b)
    assert ids(a)[:8] == ids(c)[:8] and ids(a)[8:] != ids(c)[8:]  # a prompt's seed only moves its samples
    assert all(x.finish_reason in ("stop", "length") for per in a for x in per)
    assert all(x.finish_reason == "length" and len(x.token_ids) == 30 or x.token_ids[-1] == tok.eos_token_id
               for per in a for x in per)  # fmt: skip


def test_kv_cached_sampler_draws_what_the_naive_loop_draws(models):
    """The benchmark's baseline (no cache, one sequence at a time, both models over the whole prefix) with the
    same seeds samples the same tokens: the cache and the batching change the cost, not the samples."""
    policy, reference, tok, _ = models
    p = _prompt_ids(tok)[0]
    ours = _sampler(models, 0.5).generate([p], [5], num_samples=2, temperature=1.0, top_p=1.0, max_tokens=20)[
        0
    ]
    naive = naive_mixture_generate(policy, reference, p, beta=0.5, seed=5, num_samples=2, temperature=1.0, top_p=1.0,
                                   max_tokens=20, eos_ids=[tok.eos_token_id])  # fmt: skip
    assert [s.token_ids for s in ours] == naive


def test_generate_stage_with_the_mixture_sampler(make_config, models):
    """sampler=mixture: π_0 is a fingerprinted input of the plan; K samples per prompt, reproducible."""
    _, _, _, ref_path = models
    over = {"round0.mode": "skip", "model.policy": str(ref_path), "data.prompts_per_round": 3,
            "generate.sampler": "mixture", "generate.mixture_beta": 0.5, "generate.max_tokens": 24,
            "generate.shard_size": 2, "generate.stop": "['.']"}  # fmt: skip
    cfg = make_config(**over)
    plan = rounds.plan(cfg, 1, "generate")
    assert (
        plan.inputs["mixture_reference"] == rounds.model_of(cfg, 0)
        and plan.roles["mixture_reference"] == "π_0"
    )
    assert (
        "mixture_reference" not in rounds.plan(make_config(**{"round0.mode": "skip"}), 1, "generate").inputs
    )
    manifest = execute(plan, lambda: generate.run(cfg, plan))
    assert manifest["inputs"]["mixture_reference"]["path"] == str(ref_path)
    table = read_parquet(plan.outputs["responses"], schemas.RESPONSES).to_pandas()
    assert len(table) == 3 * cfg.generate.num_samples and manifest["stats"]["shards"] == 2
    assert not table.response.str.contains(".", regex=False).any()  # cut before the stop string
    assert set(table.finish_reason) <= {"stop", "length"}
    again = execute(plan, lambda: generate.run(cfg, plan), force=True)
    assert not again["skipped"]
    assert read_parquet(plan.outputs["responses"], schemas.RESPONSES).to_pandas().equals(table)
