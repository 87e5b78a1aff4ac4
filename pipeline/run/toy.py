"""The toy alignment task: a synthetic corpus whose responses differ in a quality we can measure exactly.

dice's proving ground for its recipes (benchmarks/methods.py): the papers' benchmarks (AlpacaEval 2, MT-Bench)
need GPU-days and API judges; this task runs on 2 CPU cores in minutes and still has a TRUE reward, so a method's
effect is measured, not guessed.

The task. A prompt asks about one of six topics ("Tell me about the weather, as a short note (ref 412).").
A response is a sequence of words: words of the prompt's topic, words of other topics, and filler words. The
true reward is the topic precision of the response,

    R(x, y) = (#on-topic words − #off-topic words) / #words      ∈ [−1, 1]  (−1 for an empty response)

which does not grow with length: a longer response is not a better one.

The data, written by `write_toy_data` (shipped in data/toy/, regenerated and checked by the tests):
- `sft.jsonl`: the corpus the toy model is pretrained on (prompt, chosen = the response). The on-topic rate q of
  each response is drawn from U(0.15, 0.85), its length from U(3, 30) words, so the model learns a policy whose
  responses vary in quality and length. A quarter of the corpus puts Sr-DPO's quality instruction in front of the
  prompt (pipeline.method.losses.SR_QUALITY_PREFIX) and answers with q in U(0.85, 1): the model learns what the
  instruction means, so Sr-DPO's refinement term Δ carries signal here (it would be noise otherwise).
- `offline_prefs.jsonl`: preference pairs labelled by the true reward WITH A LENGTH BIAS, as human preference
  sets have one: in 80 % of the pairs the chosen response is also the longer one. A DPO-trained π_0 then carries
  a length preference in its implicit reward, which is what DICE's α debiasing exists to remove.
- `prompts.jsonl` (training rounds) and `eval_prompts.jsonl` (held out, for the benchmark's true reward and
  win rate: built from templates and styles of their own, `EVAL_TEMPLATES` and `EVAL_STYLES`, so no held-out
  prompt is a training prompt with another "(ref N)" tag).

Simulated annotators (`simulated_preference`) give soft preferences from the true reward plus per-annotator
Gaussian noise of a configurable size, for iREPO, online IPO and IPO-MD.

    python -m pipeline.run.toy data/toy        # rewrite the shipped files (deterministic)
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

TOPICS: dict[str, tuple[str, ...]] = {
    "animals": ("cat", "dog", "horse", "rabbit", "tiger", "eagle", "whale", "fox", "owl", "bear", "mouse", "deer"),
    "food": ("bread", "cheese", "apple", "soup", "rice", "pasta", "honey", "salad", "cake", "pepper", "onion", "plum"),
    "weather": ("rain", "snow", "wind", "cloud", "storm", "sunshine", "fog", "thunder", "frost", "breeze", "hail", "mist"),
    "sports": ("football", "tennis", "goal", "runner", "swimming", "match", "coach", "team", "racket", "score", "race", "medal"),
    "music": ("guitar", "piano", "melody", "drum", "song", "violin", "rhythm", "choir", "chord", "flute", "singer", "tempo"),
    "space": ("planet", "star", "rocket", "moon", "comet", "galaxy", "orbit", "asteroid", "telescope", "nebula", "meteor", "astronaut"),
}
FILLER: tuple[str, ...] = ("the", "and", "a", "is", "very", "with", "of", "some", "really", "then", "also", "many")
TEMPLATES: tuple[str, ...] = (
    "Tell me about {t}", "Write about {t}", "Describe {t}", "Say something about {t}", "Talk about {t}",
    "Give me words about {t}", "Share a few thoughts on {t}", "What comes to mind with {t}",
)  # fmt: skip
STYLES: tuple[str, ...] = (
    "", ", as a short note", ", for a child", ", in simple words", ", like a poet", ", for a friend",
    ", quickly", ", in the morning", ", for a postcard", ", with care",
)  # fmt: skip
# Held-out prompts are built from their own templates and styles, none used by the SFT corpus, the offline pairs or
# the training prompts: with the "(ref N)" tag removed and case, spacing and punctuation normalised, no evaluation
# prompt equals a training one (tests/test_toy.py checks it), so the evaluation measures more than recall.
EVAL_TEMPLATES: tuple[str, ...] = (
    "Explain {t}", "Jot down a few lines on {t}", "Let me hear about {t}", "Paint a picture of {t}",
    "Note some things about {t}", "Chat about {t}",
)  # fmt: skip
EVAL_STYLES: tuple[str, ...] = ("", ", for a letter", ", in one breath", ", for a class", ", at night", ", as a list")
TOPIC_NAMES: dict[str, str] = {
    "animals": "animals", "food": "food", "weather": "the weather", "sports": "sports", "music": "music",
    "space": "outer space",
}  # fmt: skip
_WORD_TOPIC = {w: t for t, words in TOPICS.items() for w in words}
_NAME_TOPIC = {name: t for t, name in TOPIC_NAMES.items()}


def prompt_topic(prompt: str) -> str:
    """The topic a toy prompt asks about (the last topic name it mentions; prefixes such as Sr-DPO's are ignored)."""
    best, where = None, -1
    for name, topic in _NAME_TOPIC.items():
        i = prompt.rfind(f" {name}")
        if i > where:
            best, where = topic, i
    if best is None:
        raise ValueError(f"not a toy-task prompt (no topic named): {prompt[:80]!r}")
    return best


def true_reward(prompt: str, response: str) -> float:
    """R(x, y) = (#on-topic − #off-topic words) / #words, in [−1, 1]; −1 for a response with no words."""
    topic = prompt_topic(prompt)
    words = [w.strip(".,;:!?").lower() for w in response.split()]
    words = [w for w in words if w]
    if not words:
        return -1.0
    on = sum(_WORD_TOPIC.get(w) == topic for w in words)
    off = sum(_WORD_TOPIC.get(w) not in (None, topic) for w in words)
    return (on - off) / len(words)


def true_rewards(prompts: list[str], responses: list[str]) -> list[float]:
    """Batch form of `true_reward`: usable as `label.python_reward=pipeline.run.toy:true_rewards` (an oracle labeller)."""
    return [true_reward(p, r) for p, r in zip(prompts, responses)]


def _noise(seed: int, prompt: str, response: str) -> float:
    """A standard-normal draw fixed by (annotator seed, prompt, response): an annotator judges a response the same
    way every time it sees it, so asking both orders gives consistent answers."""
    digest = hashlib.sha256(f"{seed}\0{prompt}\0{response}".encode()).digest()
    u1 = (int.from_bytes(digest[:8], "big") + 0.5) / 2**64
    u2 = (int.from_bytes(digest[8:16], "big") + 0.5) / 2**64
    return math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)


def simulated_preference(
    prompt: str, response_a: str, response_b: str, *, noise: float = 0.0, temperature: float = 0.1, seed: int = 0
) -> float:
    """P(a ≻ b | x) of a simulated annotator: σ((R̃(a) − R̃(b)) / temperature), R̃ = R + noise·ε, ε ~ N(0, 1).

    Args:
        prompt, response_a, response_b: the comparison.
        noise: standard deviation of the annotator's error on each response's reward (R spans [−1, 1];
            responses of the toy policy have R's standard deviation ≈ 0.35).
        temperature: how sharp the annotator's probabilities are.
        seed: the annotator's identity; different seeds are independent annotators.
    """
    ra = true_reward(prompt, response_a) + noise * _noise(seed, prompt, response_a)
    rb = true_reward(prompt, response_b) + noise * _noise(seed, prompt, response_b)
    z = (ra - rb) / temperature
    return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))


def length_biased_preference(
    prompt: str, response_a: str, response_b: str, *, bonus: float = 0.03, temperature: float = 0.1
) -> float:
    """P(a ≻ b | x) of an annotator with a KNOWN length bias: σ((R(a) + bonus·words(a) − R(b) − bonus·words(b)) / τ).

    The true reward does not grow with length; this annotator does, by `bonus` per word (0.03: a response 10 words
    longer gains 0.3, about one standard deviation of the toy policy's R). The benchmark evaluates with it so the raw
    and the length-controlled win rates show what length control removes."""
    ra = true_reward(prompt, response_a) + bonus * len(response_a.split())
    rb = true_reward(prompt, response_b) + bonus * len(response_b.split())
    z = (ra - rb) / temperature
    return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))


def make_prompt(rng: random.Random, topic: str, ref: int, held_out: bool = False) -> str:
    """A prompt about `topic`; `held_out`: from the evaluation templates and styles, never the training ones."""
    templates, styles = (EVAL_TEMPLATES, EVAL_STYLES) if held_out else (TEMPLATES, STYLES)
    style = rng.choice(styles)
    return f"{rng.choice(templates).format(t=TOPIC_NAMES[topic])}{style} (ref {ref})."


def sample_response(rng: random.Random, topic: str, q: float, n_words: int, filler: float = 0.3) -> str:
    """A response of `n_words` words: filler with probability `filler`, else on-topic with probability q, else a
    word of another topic."""
    others = [w for t, ws in TOPICS.items() if t != topic for w in ws]
    words = []
    for _ in range(n_words):
        u = rng.random()
        if u < filler:
            words.append(rng.choice(FILLER))
        elif rng.random() < q:
            words.append(rng.choice(TOPICS[topic]))
        else:
            words.append(rng.choice(others))
    return " ".join(words) + "."


def _prompts(rng: random.Random, n: int, refs: Sequence[int], held_out: bool = False) -> list[tuple[str, str]]:
    topics = list(TOPICS)
    return [(topics[i % len(topics)], make_prompt(rng, topics[i % len(topics)], refs[i], held_out)) for i in range(n)]


def write_toy_data(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the toy task's files into `folder` (deterministic for a seed). Returns name -> path."""
    from pipeline.method.losses import SR_QUALITY_PREFIX

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    # disjoint reference numbers make every prompt text unique across the four files (replay keys on prompt text)
    refs = list(range(100, 10000))
    rng.shuffle(refs)
    files: dict[str, list[dict]] = {"sft": [], "offline_prefs": [], "prompts": [], "eval_prompts": []}

    for topic, prompt in _prompts(rng, 3000, refs[:3000]):
        if rng.random() < 0.25:  # the quality instruction, answered well
            q, n = rng.uniform(0.85, 1.0), rng.randint(3, 30)
            prompt = f"{SR_QUALITY_PREFIX} {prompt}"
        else:
            q, n = rng.uniform(0.15, 0.85), rng.randint(3, 30)
        files["sft"].append({"prompt": prompt, "chosen": sample_response(rng, topic, q, n)})

    pair_prompts = _prompts(rng, 480, refs[3000:3480])
    for i, (topic, prompt) in enumerate(pair_prompts):
        long_wins = rng.random() < 0.8  # the length bias of the offline set
        while True:
            a = sample_response(rng, topic, rng.uniform(0.15, 0.85), rng.randint(3, 30))
            b = sample_response(rng, topic, rng.uniform(0.15, 0.85), rng.randint(3, 30))
            ra, rb = true_reward(prompt, a), true_reward(prompt, b)
            if abs(ra - rb) < 0.1 or len(a.split()) == len(b.split()):
                continue
            chosen, rejected = (a, b) if ra > rb else (b, a)
            if (len(chosen.split()) > len(rejected.split())) == long_wins:
                break
        files["offline_prefs"].append({"pair_id": f"toy{i:04d}", "prompt": prompt, "chosen": chosen, "rejected": rejected})

    for i, (_, prompt) in enumerate(_prompts(rng, 384, refs[3480:3864])):
        files["prompts"].append({"prompt_id": f"t{i:04d}", "prompt": prompt})
    for i, (_, prompt) in enumerate(_prompts(rng, 96, refs[3864:3960], held_out=True)):
        files["eval_prompts"].append({"prompt_id": f"e{i:04d}", "prompt": prompt})

    out = {}
    for name, rows in files.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = path
    return out


if __name__ == "__main__":
    import sys

    for name, path in write_toy_data(sys.argv[1] if len(sys.argv) > 1 else "data/toy").items():
        print(f"{name}: {path}")
