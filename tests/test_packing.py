"""Packed, prompt-sharing log-probs (pipeline.compute.packing) against the padded path they replace.

The padded path (`collate` + `response_logps`) is the definition; the packed path must give the same per-sequence
log-probs and the same parameter gradients, for every decoder family it accepts, and refuse (so callers pad) the
models it cannot handle.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline.compute.logprobs import collate, encode, packed_response_logps, response_logps, score
from pipeline.compute.packing import enable_packing, group_by_prompt, is_packed, pack, packing_unsupported


def _tiny(model_type: str, **extra):
    """A random-init decoder of `model_type`, 2 layers, GQA (4 query / 2 key-value heads), fp32, built offline."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512, **extra,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _groups(seed: int, n_groups: int = 5, max_k: int = 4) -> list[tuple[list[int], list[list[int]]]]:
    """Random groups: prompts of 1-24 tokens with 1-`max_k` responses of 1-40 tokens (1 = EOS only)."""
    rng = random.Random(seed)
    return [
        ([rng.randrange(300) for _ in range(rng.randint(1, 24))],
         [[rng.randrange(300) for _ in range(rng.randint(1, 40))] for _ in range(rng.randint(1, max_k))])
        for _ in range(n_groups)
    ]  # fmt: skip


def _padded(model, groups, reduction="sum"):
    seqs = [(p, r) for p, rs in groups for r in rs]
    ids, att, resp = collate(seqs, pad_id=0)
    return response_logps(model, ids, att, resp, reduction)  # (S,)


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_pack_layout_by_hand():
    """Prompt [7, 8] with responses [1, 2, 3] and [4, 5]; prompt [9] with response [6].

    Row (each response's last token, EOS here, is only a target): 7 8 | 1 2 | 4 | 9
      positions: 0 1 | 2 3 | 2 (continues from len(prompt)) | 0
    calls: [7 8 1 2] causal; [4] sees keys 7 8 4 (prefix + itself); [9] causal.
    predictions (position -> token): 8->1 1->2 2->3 | 8->4 4->5 | 9->6
    """
    b = pack([([7, 8], [[1, 2, 3], [4, 5]]), ([9], [[6]])])
    assert b.input_ids.tolist() == [[7, 8, 1, 2, 4, 9]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 2, 0]]
    assert b.attention.bounds == [(0, 4, 0, 4), (4, 5, 4, 7), (5, 6, 7, 8)]
    assert b.attention.kv_index.tolist() == [0, 1, 2, 3, 0, 1, 4, 5]
    assert b.attention.cu_q.tolist() == [0, 4, 5, 6] and b.attention.cu_k.tolist() == [0, 4, 7, 8]
    assert b.attention.masks[0] is None and b.attention.masks[2] is None
    assert b.attention.masks[1].tolist() == [[True, True, True]]  # the prompt's 2 keys and itself
    assert b.head_index.tolist() == [1, 2, 3, 1, 4, 5]
    assert b.targets.tolist() == [1, 2, 3, 4, 5, 6]
    assert b.seq_index.tolist() == [0, 0, 0, 1, 1, 2]
    assert b.predicted.tolist() == [3, 2, 1]
    assert b.tokens == (2 + 3) + (2 + 2) + (1 + 1)  # as if padded and unshared: prompt + response per sequence


def test_bottom_right_causal_mask():
    """Response k >= 2 of length 3 after a 2-token prompt: query j sees both prompt keys and its own 0..j."""
    b = pack([([1, 2], [[3, 4], [5, 6, 7, 8]])])
    assert b.attention.masks[1].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_equals_padded_values_and_gradients(model_type, seed):
    """Random groups of varied lengths (1-token responses, K = 1..4): per-sequence log-probs to 1e-5, sum and mean,
    and the gradient of every parameter to 1e-5 relative to its largest entry."""
    extra = {"sliding_window": None} if model_type == "mistral" else {}
    model = _tiny(model_type, **extra)
    groups = _groups(seed)
    weights = torch.randn(sum(len(rs) for _, rs in groups))  # an arbitrary loss of the log-probs
    padded = _padded(model, groups)
    (padded * weights).sum().backward()
    g_padded = _grads(model)
    assert enable_packing(model) is None and is_packed(model)
    batch = pack(groups)
    packed = packed_response_logps(model, batch)
    (packed * weights).sum().backward()
    g_packed = _grads(model)
    torch.testing.assert_close(packed, padded.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_response_logps(model, batch, "mean"), _padded(model, groups, "mean"), atol=1e-5, rtol=1e-5)
    assert g_packed.keys() == g_padded.keys() == {n for n, _ in model.named_parameters()}
    for name, g in g_padded.items():
        scale = g.abs().max().clamp(min=1e-12)
        assert ((g_packed[name] - g).abs().max() / scale).item() < 1e-5, name


def test_responses_do_not_see_each_other():
    """Changing response 1 of a group changes no other response's log-prob (rejected never attends to chosen)."""
    model = _tiny("llama")
    enable_packing(model)
    prompt, responses = [5, 6, 7], [[10, 11, 12, 13], [20, 21, 22], [30, 31]]
    before = packed_response_logps(model, pack([(prompt, responses)]))
    after = packed_response_logps(model, pack([(prompt, [[40, 41, 42, 43, 44, 45]] + responses[1:])]))
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1:], after[1:], atol=1e-6, rtol=1e-6)


def test_padded_forward_of_a_packed_model_is_unchanged():
    """After enable_packing the model still runs padded batches (right-padded, with a mask) exactly as before."""
    model = _tiny("llama")
    groups = _groups(3)
    before = _padded(model, groups)
    enable_packing(model)
    torch.testing.assert_close(_padded(model, groups), before, atol=0, rtol=0)


@pytest.mark.parametrize(
    "model_type, extra, max_length, reason",
    [
        ("gpt2", {}, None, "model type 'gpt2' is not one of the packable decoders"),
        ("mistral", {"sliding_window": 64}, 512, "sliding-window attention (sliding_window=64"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}, 512, "sliding-window"),
    ],
)  # fmt: skip
def test_models_packing_cannot_handle_fall_back_to_padding(model_type, extra, max_length, reason):
    """enable_packing refuses with the reason and leaves the model as it was; score() then pads, same numbers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if model_type == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=300, n_embd=128, n_layer=2, n_head=4, n_positions=512)
    else:
        config = AutoConfig.for_model(
            model_type, vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, **extra,
        )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    impl = model.config._attn_implementation
    got = enable_packing(model, max_length)
    assert got is not None and reason in got
    assert model.config._attn_implementation == impl and not is_packed(model)
    groups = _groups(4)
    encoded = [(p, r) for p, rs in groups for r in rs]
    with torch.no_grad():
        expected = _padded(model, groups).double().numpy()
    np.testing.assert_allclose(score(model, encoded, 0, batch_size=4), expected, rtol=1e-6, atol=1e-5)
    assert not is_packed(model)


def test_sliding_window_model_is_packed_when_every_sequence_fits():
    """A window no sequence outgrows never binds: the model is packable given max_length <= window."""
    model = _tiny("mistral", sliding_window=128)
    assert packing_unsupported(model, max_length=128) is None
    assert "sliding-window" in packing_unsupported(model, max_length=129)
    assert "sliding-window" in packing_unsupported(model)  # unknown lengths: refuse


def test_group_by_prompt_keeps_first_seen_order():
    encoded = [([1, 2], [3]), ([4], [5]), ([1, 2], [6]), ([4], [7]), ([8], [9])]
    assert group_by_prompt(encoded) == [([1, 2], [0, 2]), ([4], [1, 3]), ([8], [4])]


def test_score_packed_equals_padded_on_the_tiny_model(tiny_model):
    """score(): the K responses of each prompt as packed groups (rows of up to batch_size sequences, groups larger
    than that split) equal padded batches on the session's tiny chat model and its real tokenizer."""
    from pipeline.compute.logprobs import load_causal_lm

    model, tok = load_causal_lm(str(tiny_model), "float32", device=torch.device("cpu"))
    rng = random.Random(0)
    words = ["the", "a", "cat", "sat", "on", "mat", "and", "then", "it", "ran", "far", "away", "quickly", "to"]
    prompts = [" ".join(rng.choices(words, k=rng.randint(2, 12))) for _ in range(6)]
    encoded = [
        encode(tok, p, " ".join(rng.choices(words, k=rng.randint(0, 30)))) for p in prompts for _ in range(rng.randint(1, 7))
    ]
    rng.shuffle(encoded)  # a prompt's responses need not be adjacent
    padded = score(model, encoded, tok.pad_token_id, batch_size=5, packing=False)
    assert not is_packed(model)
    packed = score(model, encoded, tok.pad_token_id, batch_size=5)
    assert is_packed(model)
    np.testing.assert_allclose(packed, padded, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(score(model, encoded, tok.pad_token_id, 5, "mean"),
                               score(model, encoded, tok.pad_token_id, 5, "mean", packing=False), rtol=1e-6, atol=1e-6)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_equals_padded_on_gpu(dtype):
    """On CUDA the packed path runs one varlen flash-attention kernel (flash-attn, else torch's varlen_attn) in
    bf16, and the per-call SDPA loop in fp32; both match the padded path (bf16: to its rounding)."""
    model = _tiny("llama").to("cuda", dtype)
    groups = _groups(5, n_groups=8, max_k=6)
    padded = _padded(model, [(p, rs) for p, rs in groups]).float()
    padded.sum().backward()
    g_padded = _grads(model)
    enable_packing(model)
    packed = packed_response_logps(model, pack(groups).to(torch.device("cuda"))).float()
    packed.sum().backward()
    g_packed = _grads(model)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(packed, padded.detach(), atol=tol * padded.abs().max().item(), rtol=tol)
    for name, g in g_padded.items():
        scale = g.float().abs().max().clamp(min=1e-12)
        assert ((g_packed[name].float() - g.float()).abs().max() / scale).item() < (5e-2 if dtype == torch.bfloat16 else 1e-4), name
