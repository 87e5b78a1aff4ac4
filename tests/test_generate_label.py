"""The generate and label stages on the real vLLM engine (CPU build) and real transformers models."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.compute.logprobs import encode, score
from pipeline.data import schemas
from pipeline.data.artifacts import execute, read_parquet
from pipeline.run import rounds
from stages import generate, label


def _generate(cfg, llm, k=1):
    plan = rounds.plan(cfg, k, "generate")
    execute(plan, lambda: generate.run(cfg, plan, llm=llm))
    return read_parquet(plan.outputs["responses"], schemas.RESPONSES)


def _model_and_tokenizer(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_generate_k_samples_per_prompt_seeded(make_config, llm, tmp_path):
    cfg = make_config(**{"round0.mode": "skip"})
    table = _generate(cfg, llm).to_pandas()
    k = cfg.generate.num_samples
    # every selected prompt has K samples, indexed 0..K-1, no duplicates
    assert table.groupby("prompt_id").sample_idx.apply(sorted).map(lambda s: s == list(range(k))).all()
    assert table.prompt_id.nunique() == cfg.data.prompts_per_round
    assert set(table.finish_reason) <= {"stop", "length"}
    assert (table.num_tokens > 0).all() and (table.num_tokens <= cfg.generate.max_tokens).all()
    assert (table.finish_reason == "length").eq(table.num_tokens == cfg.generate.max_tokens).all()
    # the same config in another folder samples exactly the same responses (per-prompt seeds)
    again = _generate(cfg.model_copy(update={"runs_dir": str(tmp_path / "other")}), llm).to_pandas()
    assert again.response.tolist() == table.response.tolist()
    # the next round takes the next, disjoint slice of prompts
    from pipeline.data.datasets import read_prompts

    round2 = generate.select_prompts(read_prompts(cfg.data.prompts), 2, cfg.data.prompts_per_round)
    assert round2.num_rows == cfg.data.prompts_per_round
    assert not set(round2["prompt_id"].to_pylist()) & set(table.prompt_id)


def test_scoring_matches_vllm_sampler_logprobs(llm, tiny_model):
    """Our batched response log-probs (collate + sequence_logps) over the sampled tokens equal vLLM's own
    cumulative log-prob of each sample: the same model, two independent implementations."""
    from vllm import SamplingParams, TokensPrompt

    from pipeline.compute.logprobs import prompt_ids

    model, tok = _model_and_tokenizer(tiny_model)
    prompts = ["Explain why the sky is blue.", "Write a haiku about rain.", "What is 12 times 7?"]
    ids = [prompt_ids(tok, p) for p in prompts]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=96, seed=3, logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
    pairs, expected = [], []
    for p_ids, result in zip(ids, outs):
        for o in result.outputs:
            pairs.append((p_ids, list(o.token_ids)))
            expected.append(o.cumulative_logprob)
    ours = score(model, pairs, tok.pad_token_id, batch_size=5)  # batches mix lengths: padding must not leak
    np.testing.assert_allclose(ours, expected, atol=2e-3, rtol=1e-4)
    assert len(set(np.round(ours, 3))) > 6  # varied samples, not one repeated answer


def test_label_implicit_reward(make_config, llm, tiny_model, perturbed_model):
    """reward = β·[logp(policy) − logp(reference)], with logp checked against a plain one-sequence forward."""
    cfg = make_config(**{"round0.mode": "skip", "model.reference": str(perturbed_model), "train.beta": 0.25})
    _generate(cfg, llm)
    plan = rounds.plan(cfg, 1, "label")
    assert str(plan.inputs["policy"]) == str(tiny_model) and str(plan.inputs["reference"]) == str(perturbed_model)
    execute(plan, lambda: label.run(cfg, plan))
    labels = read_parquet(plan.outputs["labels"], schemas.LABELS).to_pandas()
    assert labels.label_error.isna().all()
    np.testing.assert_allclose(labels.reward, 0.25 * (labels.policy_logp - labels.reference_logp), rtol=1e-12)
    assert labels.reward.std() > 0

    # one row by hand: log_softmax over a single unpadded sequence, summed over the response positions, over the
    # tokens generate sampled (the prompt as the engine got it: the chat template of the prompt)
    row = labels.iloc[3]
    for path, column in ((tiny_model, "policy_logp"), (perturbed_model, "reference_logp")):
        model, tok = _model_and_tokenizer(path)
        p_ids, r_ids = row.prompt_token_ids.tolist(), row.response_token_ids.tolist()
        assert p_ids == encode(tok, row.prompt, row.response)[0] and len(r_ids) == row.num_tokens
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        expected = sum(logp[len(p_ids) - 1 + t, tok_id].item() for t, tok_id in enumerate(r_ids))
        assert row[column] == pytest.approx(expected, abs=1e-3)


def test_label_python_reward_and_too_long(make_config, llm):
    from pipeline.method.rewards import prompt_coverage

    cfg = make_config(
        **{"round0.mode": "skip", "label.labeller": "python", "label.python_reward": "pipeline.method.rewards:prompt_coverage"}
    )
    _generate(cfg, llm)
    plan = rounds.plan(cfg, 1, "label")
    execute(plan, lambda: label.run(cfg, plan))
    labels = pq.read_table(plan.outputs["labels"]).to_pandas()
    assert labels.reward.tolist() == pytest.approx(prompt_coverage(labels.prompt.tolist(), labels.response.tolist()))
    assert (labels.labeller == "python").all()

    # implicit reward with a tiny max_length: long responses are kept, unscored, with the reason recorded
    cfg = make_config(**{"round0.mode": "skip", "model.max_length": 60})
    plan = rounds.plan(cfg, 1, "label")
    execute(plan, lambda: label.run(cfg, plan))
    labels = pq.read_table(plan.outputs["labels"]).to_pandas()
    too_long = labels.label_error == "too_long"
    assert too_long.any() and (~too_long).any()
    assert labels.reward[too_long].isna().all() and labels.reward[~too_long].notna().all()
