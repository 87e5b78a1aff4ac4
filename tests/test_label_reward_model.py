"""labeller=reward_model on a real (tiny, random) sequence-classification model built offline, with a tokenizer of
its own — different from the policy's — and the label and pairs stages end to end.

"A different tokenizer" (issue 4) is, for a reward model, the normal case: it never sees the policy's token ids.
Each (prompt, response) is re-encoded from text as a user/assistant conversation under the reward model's own
chat template. Errors are: no chat template and no `label.reward_model_format`, a saved tokenizer whose ids
exceed the model's embeddings (it does not belong to the model), and a model with more than one output.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import RunConfig
from pipeline.data.artifacts import execute
from pipeline.method.rewards import load_reward_model, reward_model_ids, score_reward_model
from pipeline.run import rounds
from stages import label, pairs
from tests.conftest import REPO
from tests.test_judges import write_responses

RM_TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{{ eos_token }}"
)


def _build_rm(
    path, vocab_size: int, num_labels: int = 1, chat_template: str | None = RM_TEMPLATE, seed: int = 0
):
    """A random 2-layer Llama sequence classifier with its own BPE tokenizer (trained here, `vocab_size` tokens)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from pipeline.run.tiny import build_tokenizer

    texts = [
        json.loads(line)["prompt"] for line in (REPO / "data/prompts.jsonl").read_text().splitlines() if line
    ]
    tok = build_tokenizer(texts, vocab_size)
    tok.chat_template = chat_template
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, num_labels=num_labels,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    model = LlamaForSequenceClassification(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    return _build_rm(tmp_path_factory.mktemp("models") / "rm", vocab_size=700)


SPEC = {
    "p0": [
        "A short answer.",
        "A much longer answer that explains the question in some detail.",
        "No idea",
        "Yes.",
    ],
    "p1": ["Sure: first this, then that.", "Nope.", "It depends on what you mean by it."],
}


def _cfg(tmp_path, rm, **label_kw) -> RunConfig:
    return RunConfig.model_validate({
        "runs_dir": str(tmp_path / "runs"), "round0": {"mode": "skip"},
        "label": {"labeller": "reward_model", "reward_model": str(rm), "batch_size": 3, **label_kw},
        "pairs": {"replay_ratio": 0.0}, "data": {"offline": "data/offline_prefs.jsonl"},
    })  # fmt: skip


def test_reward_model_labels_and_pairs(tmp_path, reward_model, tiny_model):
    """Scores equal a one-sequence forward of the reward model on its own encoding of the conversation
    (batching and padding do not leak); pairs take p = σ(r_chosen − r_rejected)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = _cfg(tmp_path, reward_model)
    write_responses(cfg, SPEC)
    plan = rounds.plan(cfg, 1, "label")
    assert plan.inputs["reward_model"] == str(reward_model) and "policy" not in plan.inputs
    stats = execute(plan, lambda: label.run(cfg, plan))["stats"]
    labels = pd.read_parquet(plan.outputs["labels"])
    assert (
        stats["scored"] == 7 and (labels.labeller == "reward_model").all() and labels.label_error.isna().all()
    )
    assert len(pd.read_parquet(plan.outputs["preferences"])) == 0  # per-comparison table: judges only

    # by hand: the reward model's tokenizer (not the policy's), its chat template, one unpadded sequence
    tok = AutoTokenizer.from_pretrained(reward_model)
    assert tok.get_vocab() != AutoTokenizer.from_pretrained(tiny_model).get_vocab()
    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    for row in labels.itertuples():
        text = f"### user: {row.prompt}\n### assistant: {row.response}\n{tok.eos_token}"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, 0].item()
        assert row.reward == pytest.approx(expected, abs=1e-4)
    assert labels.reward.std() > 0

    pplan = rounds.plan(cfg, 1, "pairs")
    execute(pplan, lambda: pairs.run(cfg, pplan))
    out = pd.read_parquet(pplan.outputs["pairs"])
    assert len(out) == 2
    np.testing.assert_allclose(out.preference, 1 / (1 + np.exp(-(out.chosen_reward - out.rejected_reward))))
    assert (out.preference > 0.5).all()
    # preference_from_rewards=hard: DICE's hard label instead
    cfg = cfg.model_copy(update={"pairs": cfg.pairs.model_copy(update={"preference_from_rewards": "hard"})})
    pplan = rounds.plan(cfg, 1, "pairs")
    execute(pplan, lambda: pairs.run(cfg, pplan))
    assert (pd.read_parquet(pplan.outputs["pairs"]).preference == 1.0).all()


def test_reward_model_without_chat_template(tmp_path):
    """No chat template and no fallback format: an error naming the model and label.reward_model_format; with the
    fallback format, the text is that format."""
    rm = _build_rm(tmp_path / "rm-plain", vocab_size=600, chat_template=None)
    _, tok = load_reward_model(str(rm))
    with pytest.raises(
        ValueError, match=r"rm-plain: its tokenizer has no chat template; set label.reward_model_format"
    ):
        reward_model_ids(tok, "q", "a", None, str(rm))
    ids = reward_model_ids(tok, "Why?", "Because.", "Q: {prompt}\nA: {response}", str(rm))
    assert tok.decode(ids, skip_special_tokens=True) == "Q: Why?\nA: Because."

    cfg = _cfg(tmp_path, rm)
    write_responses(cfg, SPEC)
    plan = rounds.plan(cfg, 1, "label")
    with pytest.raises(ValueError, match="no chat template"):
        label.run(cfg, plan)
    cfg = _cfg(tmp_path, rm, reward_model_format="Q: {prompt}\nA: {response}")
    execute(plan := rounds.plan(cfg, 1, "label"), lambda: label.run(cfg, plan))
    with pytest.raises(ValueError, match=r"reward_model_format: needs exactly \{prompt\} and \{response\}"):
        label.run(_cfg(tmp_path, rm, reward_model_format="Q: {question}"), plan)


def test_reward_model_with_a_foreign_tokenizer_or_outputs(tmp_path):
    """A tokenizer saved with the model that produces ids beyond its embeddings, and a 2-output classifier: errors."""
    from transformers import AutoTokenizer

    rm = _build_rm(tmp_path / "rm-small", vocab_size=300)
    big = _build_rm(tmp_path / "rm-big", vocab_size=900)
    AutoTokenizer.from_pretrained(big).save_pretrained(rm)  # the wrong tokenizer in the model's folder
    model, tok = load_reward_model(str(rm))
    ids = [reward_model_ids(tok, "Explain the weather patterns", "Clouds and rain move with the wind", None)]
    with pytest.raises(
        ValueError, match=r"rm-small: its tokenizer produced token id \d+, but the model has \d+ embeddings"
    ):
        score_reward_model(model, tok, ids, 2, str(rm))
    two = _build_rm(tmp_path / "rm-two", vocab_size=300, num_labels=2)
    with pytest.raises(ValueError, match="rm-two: it has 2 outputs; dice needs a single-score model"):
        load_reward_model(str(two))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_reward_model_matches_cpu(tmp_path, reward_model):
    """On a GPU the reward model runs there (bf16 with dtype auto); its scores match the CPU float32 ones."""
    cpu_model, tok = load_reward_model(str(reward_model), "float32")
    cpu_model = cpu_model.cpu()
    ids = [reward_model_ids(tok, p, r, None) for p, rs in SPEC.items() for r in rs]
    cpu = score_reward_model(cpu_model, tok, ids, 4)
    gpu_model, _ = load_reward_model(str(reward_model), "auto")
    assert next(gpu_model.parameters()).is_cuda
    np.testing.assert_allclose(score_reward_model(gpu_model, tok, ids, 4), cpu, atol=5e-2)
