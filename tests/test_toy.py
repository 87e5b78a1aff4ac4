"""The toy task (pipeline/run/toy.py): its true reward, its simulated annotators and its shipped data."""

from __future__ import annotations

import json
import math
import random

import pytest

from pipeline.method.losses import SR_QUALITY_PREFIX
from pipeline.run import toy

from .conftest import REPO

ANIMALS = "Tell me about animals, for a child (ref 101)."


def test_true_reward_hand_worked():
    # "cat dog the rain.": cat, dog on topic (+2), rain is a weather word (−1), "the" is filler: (2 − 1) / 4
    assert toy.true_reward(ANIMALS, "cat dog the rain.") == pytest.approx(0.25)
    # all on topic, punctuation and case ignored: 3/3
    assert toy.true_reward(ANIMALS, "Cat, OWL! fox.") == 1.0
    # only words of other topics: −2/2; only filler: 0
    assert toy.true_reward(ANIMALS, "rocket piano") == -1.0
    assert toy.true_reward(ANIMALS, "the and very") == 0.0
    # no words at all is the worst response
    assert toy.true_reward(ANIMALS, "  ") == -1.0


def test_true_reward_does_not_grow_with_length():
    short, long_ = "cat the", "cat the " * 10
    assert toy.true_reward(ANIMALS, short) == toy.true_reward(ANIMALS, long_.strip()) == 0.5


def test_prompt_topic_sees_through_the_quality_prefix():
    assert toy.prompt_topic("Describe the weather quickly (ref 5).") == "weather"
    assert toy.prompt_topic(f"{SR_QUALITY_PREFIX} Talk about outer space (ref 7).") == "space"
    with pytest.raises(ValueError, match="not a toy-task prompt"):
        toy.prompt_topic("What is the capital of France?")


def test_noiseless_annotator_is_the_bradley_terry_of_the_true_reward():
    a, b = "cat dog owl.", "cat rain rocket."  # R = 1 and −1/3
    p = toy.simulated_preference(ANIMALS, a, b, noise=0.0, temperature=0.5)
    assert p == pytest.approx(1 / (1 + math.exp(-(1 - (-1 / 3)) / 0.5)))


def test_an_annotator_is_consistent_across_orders_and_seeds_differ():
    rng = random.Random(0)
    pairs = [(toy.sample_response(rng, "animals", rng.random(), 8), toy.sample_response(rng, "animals", rng.random(), 8))
             for _ in range(50)]  # fmt: skip
    for a, b in pairs:
        # one annotator judges each response the same way whichever side it is on
        p_ab = toy.simulated_preference(ANIMALS, a, b, noise=0.5, seed=3)
        p_ba = toy.simulated_preference(ANIMALS, b, a, noise=0.5, seed=3)
        assert p_ab + p_ba == pytest.approx(1.0)
    assert [toy.simulated_preference(ANIMALS, a, b, noise=0.5, seed=0) for a, b in pairs] != [
        toy.simulated_preference(ANIMALS, a, b, noise=0.5, seed=1) for a, b in pairs
    ]


def test_more_noise_agrees_less_with_the_true_reward():
    rng = random.Random(1)
    pairs = []
    while len(pairs) < 400:
        a, b = (toy.sample_response(rng, "food", rng.uniform(0.1, 0.9), rng.randint(3, 20)) for _ in range(2))
        if toy.true_reward("Describe food (ref 1).", a) != toy.true_reward("Describe food (ref 1).", b):
            pairs.append((a, b))

    def agreement(noise: float) -> float:
        prompt = "Describe food (ref 1)."
        right = 0
        for a, b in pairs:
            truth = toy.true_reward(prompt, a) > toy.true_reward(prompt, b)
            right += (toy.simulated_preference(prompt, a, b, noise=noise, seed=0) > 0.5) == truth
        return right / len(pairs)

    assert agreement(0.0) == 1.0
    assert agreement(0.0) > agreement(0.3) > agreement(1.5) > 0.5


def test_shipped_toy_data_is_what_the_generator_writes(tmp_path):
    """data/toy/ is generated, not hand-edited: regenerating it gives the same bytes."""
    written = toy.write_toy_data(tmp_path)
    for name, path in written.items():
        assert path.read_text() == (REPO / "data" / "toy" / f"{name}.jsonl").read_text(), name


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (REPO / "data" / "toy" / f"{name}.jsonl").read_text().splitlines()]


def test_offline_set_prefers_better_responses_with_a_length_bias():
    pairs = _rows("offline_prefs")
    assert all(toy.true_reward(p["prompt"], p["chosen"]) > toy.true_reward(p["prompt"], p["rejected"]) for p in pairs)
    longer = sum(len(p["chosen"].split()) > len(p["rejected"].split()) for p in pairs) / len(pairs)
    assert 0.7 < longer < 0.9  # the set's length bias: the chosen response is usually also the longer one


def test_prompt_texts_are_unique_across_files():
    """Replay keys on prompt text: a training prompt must never equal an offline or eval prompt."""
    texts = [r["prompt"] for name in ("prompts", "offline_prefs", "eval_prompts") for r in _rows(name)]
    assert len(texts) == len(set(texts))
    sft = {r["prompt"] for r in _rows("sft")}
    assert not sft & set(texts)


def test_held_out_prompts_share_no_template_with_training():
    """The evaluation prompts are held out in substance, not by their "(ref N)" tag alone: with the tag removed and
    case, spacing and punctuation normalised as the evaluate stage's overlap check does, none equals a prompt of the
    SFT corpus, the offline pairs or the training prompts; and the stage's check (which sees the SFT corpus through
    model.tiny_data) refuses none of them under the toy recipes' config."""
    import re

    from pipeline.config import load_config
    from pipeline.run import rounds
    from stages.evaluate import held_out_prompts, overlap_key

    strip = lambda t: overlap_key(re.sub(r"\(ref \d+\)", "", t))  # noqa: E731
    train = {strip(r["prompt"]) for name in ("sft", "offline_prefs", "prompts") for r in _rows(name)}
    held = [strip(r["prompt"]) for r in _rows("eval_prompts")]
    assert len(held) == 96 and not set(held) & train
    assert all(toy.prompt_topic(r["prompt"]) for r in _rows("eval_prompts"))
    cfg = load_config(REPO / "conf/recipes/dice.yaml")
    kept, stats = held_out_prompts(cfg, rounds.plan(cfg, 1, "evaluate"))
    assert len(kept) == 96 and stats["prompts_overlap"] == 0
    assert str(REPO / "data/toy/sft.jsonl") in stats["overlap_checked"] or "data/toy/sft.jsonl" in stats["overlap_checked"]
