"""A tiny Llama-architecture chat model built offline, for the tiny preset, tests and benchmarks.

The tokenizer is a byte-level BPE trained on the shipped data; the model is random-initialised and then
given a short supervised pass over the offline set's chosen answers, so that it writes English-shaped
text of varied length that ends with EOS (a purely random model almost never emits EOS, and every
response would be cut at the token limit). Head size stays >= 32: vLLM's CPU attention needs it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class TinySpec:
    """Shape of the tiny model. The default has ~1M parameters; `hidden=512, layers=8` gives ~25M."""

    vocab_size: int = 2048
    hidden: int = 128
    intermediate: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 1024
    sft_steps: int = 300
    seed: int = 0


def _read_texts(files: Iterable[Path]) -> list[dict[str, str]]:
    rows = []
    for f in files:
        for line in Path(f).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def build_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE on `texts` and wrap it as a PreTrainedTokenizerFast with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: str | Path, data_files: Iterable[str | Path], spec: TinySpec = TinySpec()) -> Path:
    """Build tokenizer + model from the shipped JSONL data and save them (safetensors) at `path`.

    Args:
        path: output folder; written to a temp folder and renamed, so a crash leaves no half model.
        data_files: JSONL files with `prompt` and optionally `chosen`/`rejected` fields.
        spec: model shape and the length of the supervised pass.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.compute.logprobs import encode
    from pipeline.data.artifacts import replace_dir

    rows = _read_texts(Path(f) for f in data_files)
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected") if r.get(k)]
    if not texts:
        raise ValueError(f"no text found in {', '.join(map(str, data_files))} to train the tiny tokenizer on")
    tokenizer = build_tokenizer(texts, spec.vocab_size)

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    sft = [encode(tokenizer, r["prompt"], r["chosen"]) for r in rows if r.get("chosen")]
    if spec.sft_steps and sft:
        _supervised_pass(model, sft, tokenizer.pad_token_id, spec)
    model.generation_config.do_sample = True

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.building")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, final)
    return final


def _supervised_pass(model, examples: list[tuple[list[int], list[int]]], pad_id: int, spec: TinySpec) -> None:
    """A few hundred AdamW steps of next-token loss on the response tokens (prompt masked)."""
    import torch

    from pipeline.compute.logprobs import collate

    rng = random.Random(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(spec.sft_steps):
        batch = rng.sample(examples, min(16, len(examples)))
        input_ids, attention, response_mask = collate(batch, pad_id)
        logits = model(input_ids=input_ids, attention_mask=attention).logits  # (B, T, V)
        targets = input_ids[:, 1:]
        mask = response_mask[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none")
        loss = (loss * mask.flatten()).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        for g in opt.param_groups:  # linear decay to 10%: stable at the end, fast at the start
            g["lr"] = 3e-3 * (1 - 0.9 * step / spec.sft_steps)
        opt.step()
    model.eval()
