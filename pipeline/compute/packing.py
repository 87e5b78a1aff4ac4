"""Padding-free, prompt-sharing forward passes for per-sequence response log-probs ("packing").

A *group* is one prompt with K >= 1 responses: a training pair is a group of 2 (chosen, rejected), the label
stage's K samples of a prompt are a group of K. `pack` lays every group of a micro-batch out in ONE row,
without padding and with each prompt once:

    [prompt | response 1 | response 2 | ... | response K] [prompt' | response' 1 | ...] ...

- `position_ids` restart at 0 on each prompt; response k >= 2 continues from len(prompt), i.e. every response
  sits at exactly the positions it has after its prompt in the padded layout.
- Attention is cut into *calls* that partition the row's queries in order: the prompt with response 1 is one
  causal block; response k >= 2 attends to its prompt's keys/values and causally to itself, never to the
  other responses. `packed_attention_forward` (registered with transformers' `AttentionInterface` as
  "dice_packed") runs one SDPA per call on CPU (a bottom-right causal mask of shape (L, P + L) when a prefix is
  attended), or one varlen flash-attention kernel over all calls on CUDA. No (N, N) mask is ever built: the
  "dice_packed" mask function returns None for packed rows.
- The LM head runs only at the positions that predict a response token; the first token of every response is
  predicted from its prompt's last position.

So every linear layer sees each prompt once and no padding, and the result is the padded computation up to
float rounding (tests/test_packing.py checks values and parameter gradients against the padded path).

Only decoders whose attention is known to be exactly this (causal softmax attention over rotary positions
from `position_ids`, no sliding window, no soft-capping) are packed: `packing_unsupported` names the reason
for any other model, and callers then take the padded path of `pipeline.compute.logprobs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "dice_packed"
# Decoder families whose attention modules pass kwargs through to the AttentionInterface function and whose
# full-attention layers are plain causal softmax attention (each is checked against the padded path in
# tests/test_packing.py).
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The attention implementations a packed model may have been loaded with (the packed path replaces them; a
# padded forward of a packed model runs transformers' SDPA).
REPLACEABLE_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", ATTN_IMPLEMENTATION)

Group = tuple[Sequence[int], Sequence[Sequence[int]]]  # (prompt ids, [response ids, ...])


@dataclass
class PackedAttention:
    """Where each query of a packed row may look, passed to the attention function as the `dice_packed` kwarg.

    Call c holds the queries [cu_q[c], cu_q[c+1]) of the row (the calls partition the row in order) and the
    keys/values kv_index[cu_k[c]:cu_k[c+1]]: an optional prefix (the group's prompt) then the queries' own
    positions, causal with the last query seeing every key (bottom-right aligned).
    """

    kv_index: torch.Tensor  # (M,) positions of the row gathered as keys/values, call after call
    cu_q: torch.Tensor  # (C+1,) int32 query offsets of the calls
    cu_k: torch.Tensor  # (C+1,) int32 offsets of the calls in kv_index
    max_q: int
    max_k: int
    bounds: list[tuple[int, int, int, int]]  # per call (q_start, q_end, k_start, k_end), as Python ints
    masks: list[torch.Tensor | None]  # per call: (Lq, Lk) bool, True = attend; None = square causal block

    def sizes(self) -> tuple[list[int], list[int]]:
        """Per call, the number of queries and of keys/values: the calls' parts of the row and of kv_index."""
        return [q1 - q0 for q0, q1, _, _ in self.bounds], [k1 - k0 for _, _, k0, k1 in self.bounds]

    def to(self, device: torch.device) -> PackedAttention:
        masks = [None if m is None else m.to(device, non_blocking=True) for m in self.masks]
        return PackedAttention(
            self.kv_index.to(device), self.cu_q.to(device), self.cu_k.to(device), self.max_q, self.max_k, self.bounds, masks
        )


@dataclass
class PackedBatch:
    """One packed row of groups and what is needed to read per-sequence log-probs off it.

    Sequences are numbered group after group, response after response (a list of pairs packed as groups
    [chosen, rejected] gives chosen_0, rejected_0, chosen_1, ...).
    """

    input_ids: torch.Tensor  # (1, N), N = Σ over groups of len(prompt) + Σ (len(response) - 1)
    position_ids: torch.Tensor  # (1, N)
    attention: PackedAttention
    head_index: torch.Tensor  # (Np,) row positions whose hidden state predicts a response token
    targets: torch.Tensor  # (Np,) the predicted token ids
    seq_index: torch.Tensor  # (Np,) the sequence each prediction belongs to
    num_seqs: int
    predicted: torch.Tensor  # (S,) predicted response tokens per sequence (the mean's divisor)
    tokens: int  # logical tokens: Σ over sequences of len(prompt) + len(response), as if padded and unshared

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device), self.position_ids.to(device), self.attention.to(device),
            self.head_index.to(device), self.targets.to(device), self.seq_index.to(device), self.num_seqs,
            self.predicted.to(device), self.tokens,
        )  # fmt: skip


def pack(groups: Sequence[Group]) -> PackedBatch:
    """Lay `groups` out in one padding-free row (module docstring), each prompt once.

    A response's last token (EOS) is only ever a target: nothing reads its hidden state (it predicts nothing
    scored, and no later query attends to it), so it is left out of the row."""
    ids: list[np.ndarray] = []
    pos: list[np.ndarray] = []
    kv: list[np.ndarray] = []
    head: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    seqs: list[np.ndarray] = []
    cu_q, cu_k, bounds, masks = [0], [0], [], []
    predicted: list[int] = []
    offset = tokens = 0
    for prompt, responses in groups:
        if not responses:
            raise ValueError("pack: a group needs at least one response")
        p = len(prompt)
        ids.append(np.asarray(prompt, dtype=np.int64))
        pos.append(np.arange(p))
        start = offset + p  # where the next response begins in the row
        for k, response in enumerate(responses):
            n = len(response)
            if n == 0:
                raise ValueError("pack: an empty response (responses end with EOS, so have >= 1 token)")
            response_arr = np.asarray(response, dtype=np.int64)
            m = n - 1  # tokens of the response in the row: all but the last
            ids.append(response_arr[:m])
            pos.append(np.arange(p, p + m))
            own = np.arange(start, start + m)
            if k == 0:  # one causal block: the prompt and its first response
                q_start, keys, mask = offset, np.arange(offset, start + m), None
            else:  # the prompt's keys, then causally its own
                q_start, keys = start, np.concatenate([np.arange(offset, offset + p), own])
                mask = torch.ones(m, p + m, dtype=torch.bool).tril(p) if p else None
            if start + m > q_start:  # a call with no queries (a 1-token response after a prompt) is left out
                bounds.append((q_start, start + m, cu_k[-1], cu_k[-1] + len(keys)))
                kv.append(keys)
                cu_q.append(start + m)
                cu_k.append(cu_k[-1] + len(keys))
                masks.append(mask)
            # position t predicts token t+1: response token 0 from the prompt's last position, token j from j-1
            if p:
                sources, scored = np.concatenate([[offset + p - 1], own]), response_arr
            else:  # no prompt: the first token is not predicted (as in the padded layout)
                sources, scored = own, response_arr[1:]
            head.append(sources)
            targets.append(scored)
            seqs.append(np.full(len(sources), len(predicted)))
            predicted.append(len(sources))
            tokens += p + n
            start += m
        offset = start
    q_lens, k_lens = np.diff(cu_q), np.diff(cu_k)
    attention = PackedAttention(
        kv_index=torch.from_numpy(np.concatenate(kv) if kv else np.zeros(0, np.int64)),
        cu_q=torch.tensor(cu_q, dtype=torch.int32),
        cu_k=torch.tensor(cu_k, dtype=torch.int32),
        max_q=int(q_lens.max(initial=0)),
        max_k=int(k_lens.max(initial=0)),
        bounds=bounds,
        masks=masks,
    )
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate(ids)).unsqueeze(0),
        position_ids=torch.from_numpy(np.concatenate(pos)).unsqueeze(0),
        attention=attention,
        head_index=torch.from_numpy(np.concatenate(head).astype(np.int64)),
        targets=torch.from_numpy(np.concatenate(targets)),
        seq_index=torch.from_numpy(np.concatenate(seqs).astype(np.int64)),
        num_seqs=len(predicted),
        predicted=torch.tensor(predicted, dtype=torch.float32),
        tokens=tokens,
    )


def group_by_prompt(encoded: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[list[int], list[int]]]:
    """Indices of `encoded` (prompt ids, response ids) pairs grouped by identical prompt ids, in first-seen order.

    Returns [(prompt ids, [indices of its responses])]."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt, _) in enumerate(encoded):  # ids as lists or arrays (stored ids): the same prompt either way
        groups.setdefault(tuple(prompt.tolist() if isinstance(prompt, np.ndarray) else prompt), []).append(i)
    return [(list(p), idx) for p, idx in groups.items()]


# ---------------------------------------------------------------------------------------------- attention


def _varlen_kernel():
    """The CUDA varlen attention kernel available: flash-attn's if installed, else torch's (torch >= 2.10)."""
    try:
        from flash_attn import flash_attn_varlen_func

        return "flash_attn", flash_attn_varlen_func
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        return "torch", varlen_attn
    except ImportError:
        return None, None


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    dice_packed: PackedAttention | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of a packed row (transformers' AttentionInterface signature).

    Args:
        query: (1, Hq, N, D); key, value: (1, Hkv, N, D), rotary positions already applied.
        dice_packed: the row's calls; without it (a padded batch) this is transformers' SDPA attention.
    Returns:
        ((1, N, Hq, D) attention output, None).
    """
    if dice_packed is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row; got a batch of {query.shape[0]}")
    window = kwargs.get("sliding_window")
    if window is not None and dice_packed.max_k > window:  # enable_packing's max_length check was bypassed
        raise ValueError(f"a packed sequence of {dice_packed.max_k} tokens exceeds the sliding window ({window})")
    p = dropout if module.training else 0.0
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        kind, kernel = _varlen_kernel()
        if kernel is not None:
            a = dice_packed
            q = query[0].transpose(0, 1)  # (N, Hq, D)
            k = key[0].transpose(0, 1).index_select(0, a.kv_index)  # (M, Hkv, D)
            v = value[0].transpose(0, 1).index_select(0, a.kv_index)  # (M, Hkv, D)
            if kind == "flash_attn":  # causal is bottom-right aligned when Lq < Lk (flash-attn >= 2.1)
                out = kernel(q, k, v, a.cu_q, a.cu_k, a.max_q, a.max_k, dropout_p=p, softmax_scale=scaling, causal=True)
            else:
                if p:
                    raise ValueError("attention dropout needs flash-attn for packed batches on GPU (pip install flash-attn)")
                out = kernel(q, k, v, a.cu_q, a.cu_k, a.max_q, a.max_k, scale=scaling, window_size=(-1, 0),
                             enable_gqa=q.shape[1] != k.shape[1])  # fmt: skip
            return out.unsqueeze(0), None  # (1, N, Hq, D)
    # Gather every call's keys/values once per layer, then one SDPA per call on the parts of the row. The parts
    # come from `split` (the calls partition the queries and the gathered keys in order), whose backward is one
    # concatenation of the parts' gradients; slicing per call would zero-fill and add a full-row gradient per call.
    # SDPA's own GQA broadcasting (enable_gqa) reads each key/value head for its query heads without copies.
    gqa = query.shape[1] != key.shape[1]
    k_all = key.index_select(2, dice_packed.kv_index)  # (1, Hkv, M, D)
    v_all = value.index_select(2, dice_packed.kv_index)  # (1, Hkv, M, D)
    q_sizes, k_sizes = dice_packed.sizes()
    parts = zip(query.split(q_sizes, 2), k_all.split(k_sizes, 2), v_all.split(k_sizes, 2), dice_packed.masks)
    outs = []
    for q, k, v, mask in parts:  # q: (1, Hq, Lq, D); k, v: (1, Hkv, Lk, D)
        if mask is None:  # square block: top-left = bottom-right causal
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scaling, enable_gqa=gqa)
        outs.append(out)
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (1, Hq, N, D)
    return out.transpose(1, 2), None  # (1, N, Hq, D)


def _packed_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """The mask function of "dice_packed": no mask for a packed row (attention_mask None; the calls in the
    `dice_packed` kwarg say who sees whom), transformers' SDPA mask for a padded batch."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Register "dice_packed" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _packed_mask)


# ---------------------------------------------------------------------------------------------- models


def packing_unsupported(model, max_length: int | None = None) -> str | None:
    """Why `model` cannot take the packed path (None: it can). The padded path is exact for every model.

    Args:
        max_length: the longest prompt + response that will be scored; a sliding-window model is packable when
            every sequence fits in its window (then the window never binds).
    """
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in PACKABLE_MODEL_TYPES:
        return f"model type {model_type!r} is not one of the packable decoders {', '.join(PACKABLE_MODEL_TYPES)}"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in REPLACEABLE_ATTENTION:
        return f"attention implementation {impl!r} is not one packing replaces ({', '.join(REPLACEABLE_ATTENTION[:-1])})"
    layer_types = getattr(cfg, "layer_types", None) or []
    sliding = set(layer_types) - {"full_attention"}
    if sliding - {"sliding_attention"}:
        return f"layers of type {sorted(sliding - {'sliding_attention'})}"
    window = getattr(cfg, "sliding_window", None)
    # A window no sequence outgrows is full attention: exact when every sequence fits in it.
    if window is not None and (sliding or model_type == "mistral") and (max_length is None or max_length > window):
        return f"sliding-window attention (sliding_window={window} < the longest sequence, {max_length})"
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, name, None) is not None:
            return f"{name}={getattr(cfg, name)}"
    if not hasattr(model, "get_decoder") or not hasattr(model, "set_attn_implementation"):
        return "not a transformers causal LM with a decoder"
    return None


def enable_packing(model, max_length: int | None = None) -> str | None:
    """Switch `model` to the "dice_packed" attention if it is packable. Returns None when it did, else the reason
    it did not (the model is left unchanged and callers use the padded path). Padded forwards of a switched model
    still run transformers' SDPA attention with the usual mask."""
    reason = packing_unsupported(model, max_length)
    if reason is None:
        register()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return reason


def is_packed(model) -> bool:
    """True when `enable_packing` switched `model` to the packed attention."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTN_IMPLEMENTATION
