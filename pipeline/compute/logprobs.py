"""Tokenising (prompt, response) pairs and computing per-sequence response log-probs.

One encoding serves every consumer, so the implicit reward of the label stage, the reference log-probs
and the policy log-probs in training are all computed over exactly the same tokens. A generated response is its
token ids as the engine received and sampled them (`prompt_token_ids`, `response_token_ids` of responses.parquet,
carried into pairs.parquet and reference.parquet): text is never tokenised again, which would not always give
back the sampled tokens. A text without stored ids (an offline pair, a round written before ids were stored) is
tokenised once (`encode_many`, `encode_rows`):
    prompt tokens   = the chat template applied to the prompt (one user turn or a conversation: pipeline/data/chat.py),
                      with the generation prompt (what generation gives the engine: `prompt_ids`)
    response tokens = the response text tokenised without special tokens, followed by EOS unless the text already
                      ends with the EOS token (as TRL adds it, so an exported pair is the same tokens there)
`logp(π, x, y)` is the sum (or mean) over response tokens of log π(y_t | x, y_<t); prompt tokens are masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from pipeline.compute.packing import PackedBatch, enable_packing, group_by_prompt, is_packed, pack
from pipeline.data.chat import Prompt, as_messages

Reduction = Literal["sum", "mean"]


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of `prompt` (one user turn, or a whole conversation) under the tokenizer's chat template, ready
    for the reply. Without a chat template, a single user turn is its plain text; a conversation is an error."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if not isinstance(prompt, str):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')}: no chat template, so it cannot render a "
            "conversation; use a model with a chat template or single-turn prompts"
        )
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def _eos(tokenizer, response: str) -> list[int]:
    """The EOS id to append to `response`: none when the text already ends with the EOS token (it tokenises to it)."""
    eos = tokenizer.eos_token
    return [] if eos and response.endswith(eos) else [tokenizer.eos_token_id]


def encode(tokenizer, prompt: Prompt, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + EOS) for one pair."""
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return prompt_ids(tokenizer, prompt), response_ids + _eos(tokenizer, response)


def encode_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """`prompt_ids` of many prompts, with the same ids: each distinct prompt is rendered and tokenised once, and the
    rendered texts go to the tokenizer in one batch (its Rust side, not one Python call per text)."""
    keys = [p if isinstance(p, str) else repr(as_messages(p)) for p in prompts]
    distinct: dict[str, Prompt] = {}  # key -> the prompt, in first-seen order
    for k, p in zip(keys, prompts):
        distinct.setdefault(k, p)
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template(as_messages(p), add_generation_prompt=True, tokenize=False)
                 for p in distinct.values()]  # fmt: skip
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    else:
        ids = [prompt_ids(tokenizer, p) for p in distinct.values()]
    by_prompt = dict(zip(distinct, ids))
    return [by_prompt[k] for k in keys]


def encode_many(tokenizer, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """`encode` for many pairs at once, with the same ids: each distinct prompt is rendered and tokenised once, and
    the texts go to the tokenizer in batches (its Rust side, not one Python call per text)."""
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if len(responses) else []
    return [(p, r + _eos(tokenizer, y)) for p, r, y in zip(encode_prompts(tokenizer, prompts), response_ids, responses)]


def stored_ids(column) -> list[np.ndarray | None]:
    """Each row's token ids from a list<int32> column (pyarrow Array or ChunkedArray) as int32 arrays that view the
    column's buffer (no Python list per token), None where the row has none."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[np.ndarray | None] = []
    for chunk in chunks:
        if pa.types.is_null(chunk.type) or chunk.null_count == len(chunk):
            out += [None] * len(chunk)
            continue
        values = chunk.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        offsets = chunk.offsets.to_numpy()  # into chunk.values, the slice's own offset included
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        out += [values[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(len(chunk))]
    return out


def encode_rows(tokenizer, prompts: Sequence[Prompt], responses: Sequence[str],
                prompt_token_ids: Sequence | None = None, response_token_ids: Sequence | None = None) -> list[tuple]:  # fmt: skip
    """(prompt ids, response ids) of each row: its stored ids where it has both (`stored_ids`: a generated
    response exactly as the engine received and sampled it), else its texts through `encode_many` (offline pairs,
    rows written before ids were stored), all such rows in one batch."""
    n = len(responses)
    p_ids = prompt_token_ids if prompt_token_ids is not None else [None] * n
    r_ids = response_token_ids if response_token_ids is not None else [None] * n
    out: list[tuple] = [(p, r) if p is not None and r is not None and len(r) else None for p, r in zip(p_ids, r_ids)]
    todo = [i for i, x in enumerate(out) if x is None]
    if todo:
        for i, enc in zip(todo, encode_many(tokenizer, [prompts[i] for i in todo], [responses[i] for i in todo])):
            out[i] = enc
    return out


def collate(
    seqs: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (prompt, response) ids (lists or integer arrays) into (input_ids, attention_mask, response_mask),
    each (B, T)."""
    width = max(len(p) + len(r) for p, r in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    response = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.from_numpy(np.concatenate([np.asarray(p, np.int64), np.asarray(r, np.int64)]))
        attention[i, :n] = 1
        response[i, len(p) : n] = 1
    return input_ids, attention, response


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor, reduction: Reduction = "sum"
) -> torch.Tensor:
    """Per-sequence response log-probs.

    Args:
        logits: (B, T, V) model outputs for `input_ids`.
        input_ids: (B, T).
        response_mask: (B, T), 1 on response tokens.
        reduction: "sum" over response tokens (DPO) or "mean" per token (offline IPO).
    Returns:
        (B,) float32 log-probs.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    targets = input_ids[:, 1:]  # (B, T-1)
    mask = response_mask[:, 1:].float()  # (B, T-1)
    # gather − logsumexp avoids materialising a second (B, T, V) log_softmax tensor
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, T-1)
    total = (token_logps * mask).sum(-1)  # (B,)
    if reduction == "mean":
        return total / mask.sum(-1).clamp(min=1)
    return total


def _head_only_applies(model) -> bool:
    """True when logits are exactly lm_head(final hidden state): no soft-capping or scaling after the head."""
    cfg = model.config
    return (
        getattr(cfg, "final_logit_softcapping", None) is None
        and getattr(cfg, "logit_scale", None) in (None, 1.0)
        and not hasattr(model, "logit_scale")
        and model.get_output_embeddings() is not None
    )


def response_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, reduction: Reduction = "sum"
) -> torch.Tensor:
    """Per-sequence response log-probs of a causal LM, computing the LM head only where it is needed.

    The head (and the float32 log-softmax over the vocabulary) runs only at the positions that predict a
    response token, not at prompt or padding positions: with 128k-token vocabularies that is most of the
    memory of a forward pass. Models whose logits are more than the head of the last hidden state (soft-capping,
    scaling) take the plain path through `.logits`.

    Args:
        model: a transformers causal LM (or anything with get_decoder()/get_output_embeddings()).
        input_ids, attention_mask, response_mask: (B, T), as from `collate`.
    Returns:
        (B,) float32 log-probs.
    """
    if not _head_only_applies(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        return sequence_logps(logits, input_ids, response_mask, reduction)
    decoder = model.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, H)
    predicts = response_mask[:, 1:].bool()  # (B, T-1): position t predicts response token t+1
    rows = predicts.nonzero()[:, 0]  # (N,) the sequence of each kept position
    logits = model.get_output_embeddings()(hidden[:, :-1][predicts]).float()  # (N, V)
    targets = input_ids[:, 1:][predicts]  # (N,)
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (N,)
    total = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    total = total.index_add(0, rows, token_logps)  # (B,)
    if reduction == "mean":
        return total / predicts.sum(-1).clamp(min=1)
    return total


def packed_response_logps(model, batch: PackedBatch, reduction: Reduction = "sum") -> torch.Tensor:
    """Per-sequence response log-probs of a packed row (pipeline.compute.packing): the same numbers as `response_logps`
    on the padded batch, with each prompt computed once, no padding, and the LM head only where it is needed.

    Args:
        model: a causal LM switched to the packed attention by `pipeline.compute.packing.enable_packing`.
        batch: from `pipeline.compute.packing.pack`, on the model's device.
    Returns:
        (S,) float32 log-probs, sequences in the order of `pack` (group after group, response after response).
    """
    if batch.input_ids.shape[1] == 0:  # only 1-token responses without prompts: nothing is predicted
        return torch.zeros(batch.num_seqs, device=batch.input_ids.device)
    kw = {"position_ids": batch.position_ids, "use_cache": False, "dice_packed": batch.attention}
    if _head_only_applies(model):
        hidden = model.get_decoder()(input_ids=batch.input_ids, **kw).last_hidden_state  # (1, N, H)
        logits = model.get_output_embeddings()(hidden[0].index_select(0, batch.head_index)).float()  # (Np, V)
    else:  # soft-capped or scaled logits: the whole model, then the predicting positions
        logits = model(input_ids=batch.input_ids, **kw).logits[0].index_select(0, batch.head_index).float()  # (Np, V)
    token_logps = logits.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (Np,)
    total = torch.zeros(batch.num_seqs, dtype=token_logps.dtype, device=token_logps.device)
    total = total.index_add(0, batch.seq_index, token_logps)  # (S,)
    if reduction == "mean":
        return total / batch.predicted.clamp(min=1)
    return total


class ResponseScorer(torch.nn.Module):
    """A causal LM whose forward returns per-sequence response log-probs (what DeepSpeed's engine wraps in
    training, so its backward hooks see the (2B,) log-probs rather than a (2B, T, V) logits tensor).

    Called with padded tensors (input_ids, attention_mask, response_mask, from `collate`) or with `packed=` a
    `pipeline.compute.packing.PackedBatch` (the model must have been switched by `enable_packing`)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids=None, attention_mask=None, response_mask=None, reduction: Reduction = "sum", packed: PackedBatch | None = None
    ) -> torch.Tensor:
        if packed is not None:
            return packed_response_logps(self.lm, packed, reduction)
        return response_logps(self.lm, input_ids, attention_mask, response_mask, reduction)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def require_model(path: str) -> str:
    """The model's local folder (a Hub id's snapshot, fetched once); fails early, naming the model, when a local
    folder is missing or holds no safetensors weights (pipeline/data/models.py)."""
    from pipeline.data.models import local_model

    return local_model(path)


def load_causal_lm(path: str, dtype: str = "auto", trust_remote_code: bool = False, device: torch.device | None = None,
                   zero_stage: int = 0):  # fmt: skip
    """Load a causal LM and its tokenizer for scoring (eval mode, safetensors only).

    zero_stage=3: every weight partitioned across the ranks as it loads (pipeline/compute/zero3.py; the process group must
    exist); score through `pipeline.compute.zero3.scoring(ResponseScorer(model), model.config)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = require_model(path)
    device = device or default_device()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if zero_stage == 3:
            from pipeline.compute import zero3

            model = zero3.load(folder, AutoModelForCausalLM, resolve_dtype(dtype, device), trust_remote_code, "model")
        else:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code, use_safetensors=True
            ).to(device)
    except (OSError, ValueError) as e:
        if str(e).startswith(f"model {path}:"):
            raise
        raise ValueError(f"model {path}: could not be loaded ({e})") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _packed_rows(encoded: Sequence[tuple[list[int], list[int]]], batch_size: int) -> list[list[tuple[list[int], list[int]]]]:
    """Whole prompt groups per packed row, up to `batch_size` sequences: [[(prompt ids, [indices])...], ...]."""
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    size = 0
    for prompt, idx in group_by_prompt(encoded):
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            if size and size + len(part) > batch_size:
                rows.append([])
                size = 0
            rows[-1].append((prompt, part))
            size += len(part)
    return [row for row in rows if row]


@torch.no_grad()
def score(
    model,
    encoded: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
    reduction: Reduction = "sum",
    packing: bool = True,
    max_length: int | None = None,
    *,
    engine=None,
    passes=None,
) -> np.ndarray:
    """Response log-probs of already-encoded (prompt ids, response ids) pairs. Returns (N,) float64.

    With `packing` and a packable model (`pipeline.compute.packing.enable_packing` switches it), responses that share a
    prompt are scored as one group with the prompt computed once, `batch_size` sequences per padding-free row;
    otherwise padded batches of `batch_size` sequences, grouped by length (little padding). The numbers agree
    to float rounding (tests/test_packing.py). `max_length` (the longest prompt + response) lets sliding-window
    models whose window no sequence outgrows be packed.

    ZeRO-3 partitioned inference (pipeline/compute/zero3.py): `engine` is the DeepSpeed engine around
    `ResponseScorer(model)`, and every forward pass goes through it; `passes(n)` returns the most forward passes
    any rank makes in this call, given this rank's n. Parameters are gathered collectively, so every rank must
    make as many passes, and must know how many before the first: the batches are planned, the count agreed,
    then this rank's batches run, followed by one-token passes whose results are dropped."""
    forward = engine if engine is not None else ResponseScorer(model)
    device = engine.device if engine is not None else next(model.parameters()).device
    out = np.empty(len(encoded), dtype=np.float64)
    if packing and (is_packed(model) or enable_packing(model, max_length) is None):
        rows = _packed_rows(encoded, batch_size)
        for step in range(passes(len(rows)) if passes else len(rows)):  # agreed before any pass (ZeRO-3)
            batch = pack([(p, [encoded[i][1] for i in idx]) for p, idx in rows[step]]) if step < len(rows) else None
            if batch is None or (engine is not None and batch.input_ids.shape[1] == 0):
                # another rank's pass (or a row with nothing to compute, which would skip its collective gathers)
                forward(packed=pack([([0], [[0, 0]])]).to(device), reduction=reduction)  # prompt [0], response [0, 0]
                if batch is not None:
                    out[[i for _, idx in rows[step] for i in idx]] = 0.0  # what an empty row scores
                continue
            flat = [i for _, idx in rows[step] for i in idx]
            out[flat] = forward(packed=batch.to(device), reduction=reduction).double().cpu().numpy()
        return out
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for step in range(passes(len(batches)) if passes else len(batches)):  # agreed before any pass (ZeRO-3)
        if step >= len(batches):  # another rank's pass: this one only takes part in the gathers
            forward(*(x.to(device) for x in collate([([0], [0])], pad_id)), reduction)
            continue
        idx = batches[step]
        input_ids, attention, response = collate([encoded[i] for i in idx], pad_id)
        input_ids, attention, response = input_ids.to(device), attention.to(device), response.to(device)
        out[idx] = forward(input_ids, attention, response, reduction).double().cpu().numpy()
    return out
