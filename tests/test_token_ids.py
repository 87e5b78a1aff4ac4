"""Tokens once: what generate sampled is what label, reference and train score and train on.

A tiny round on the real engines (the session's vLLM engine, transformers scoring); the ids the scorers hand to the
packed forward pass (`pipeline.compute.packing.pack`, watched, not replaced) are compared with responses.parquet's.
A round written before ids were stored (the columns dropped) still runs: its texts are tokenised as they were.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.compute import logprobs
from pipeline.compute.logprobs import encode, encode_many, load_causal_lm, prompt_ids, score
from pipeline.data import schemas
from pipeline.data.artifacts import execute, read_manifest, read_parquet
from pipeline.data.chat import prompts_of
from pipeline.run import rounds
from stages import generate, label, pairs, reference
from stages.train import load_pairs

RESPONSE_IDS = ["prompt_token_ids", "response_token_ids"]
PAIR_IDS = ["prompt_token_ids", "chosen_token_ids", "rejected_token_ids"]


def _run(cfg, stage, fn, k=1, force=False):
    plan = rounds.plan(cfg, k, stage)
    return plan, execute(plan, fn(plan), force=force)


@pytest.fixture
def packed(monkeypatch):
    """Every (prompt ids, response ids) the scorer packs into a forward pass, in order."""
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real = logprobs.pack

    def watch(groups):
        for prompt, responses in groups:
            seen.extend((tuple(int(t) for t in prompt), tuple(int(t) for t in r)) for r in responses)
        return real(groups)

    monkeypatch.setattr(logprobs, "pack", watch)
    return seen


@pytest.fixture(scope="module")
def round1(tmp_path_factory, tiny_model, perturbed_model, llm):
    """A tiny round 1 (12 prompts × 4 samples, implicit reward against a perturbed reference), with offline replay."""
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path_factory.mktemp("tokens") / "runs", tiny_model,
                      **{"round0.mode": "skip", "pairs.replay_ratio": 0.5, "model.reference": str(perturbed_model)})  # fmt: skip
    _run(cfg, "generate", lambda plan: lambda: generate.run(cfg, plan, llm=llm))
    return cfg


def _ids(table, column):
    return [tuple(x) if x is not None else None for x in table.column(column).to_pylist()]


def test_generate_stores_what_the_engine_received_and_sampled(round1, tiny_model):
    cfg = round1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    plan = rounds.plan(cfg, 1, "generate")
    table = read_parquet(plan.outputs["responses"], schemas.RESPONSES)
    assert pq.read_schema(plan.outputs["responses"]).field("response_token_ids").type == schemas.TOKEN_IDS
    prompts, responses = prompts_of(table), table["response"].to_pylist()
    p_ids, r_ids = _ids(table, "prompt_token_ids"), _ids(table, "response_token_ids")
    # the prompt as the engine got it: the chat template rendered, with the generation prompt
    assert all(p == tuple(prompt_ids(tok, x)) for p, x in zip(p_ids, prompts))
    assert [len(r) for r in r_ids] == table["num_tokens"].to_pylist()
    for r, reason in zip(r_ids, table["finish_reason"].to_pylist()):  # EOS as sampled: there when it stopped there
        assert (r[-1] == tok.eos_token_id) == (reason == "stop")
    # the texts decode from the sampled ids
    assert all(tok.decode(list(r), skip_special_tokens=True) == y for r, y in zip(r_ids, responses))
    # how many texts would not tokenise back to the sampled ids: counted, reported in the manifest, not assumed zero
    again = encode_many(tok, prompts, responses)
    differ = [(tuple(p), tuple(y)) != (pi, ri) for (p, y), pi, ri in zip(again, p_ids, r_ids)]
    cut = [f == "length" for f in table["finish_reason"].to_pylist()]
    stats = read_manifest(plan.manifest_path)["stats"]
    assert stats["reencoded_differently"] == sum(differ) >= sum(cut)  # a cut response has no EOS; its re-encoding has
    assert stats["reencoded_differently_not_cut"] == sum(d and not c for d, c in zip(differ, cut))
    print(f"\ntiny round: {stats['reencoded_differently']} of {table.num_rows} responses re-encode differently "
          f"({stats['reencoded_differently_not_cut']} not cut at the token limit)")


def test_label_scores_the_generated_ids(round1, tiny_model, packed):
    cfg = round1
    plan, _ = _run(cfg, "label", lambda plan: lambda: label.run(cfg, plan))
    responses = read_parquet(rounds.plan(cfg, 1, "generate").outputs["responses"], schemas.RESPONSES)
    generated = list(zip(_ids(responses, "prompt_token_ids"), _ids(responses, "response_token_ids")))
    # each model (policy, then reference) packed exactly the generated ids, every response once
    assert sorted(packed) == sorted(generated * 2)
    labels = read_parquet(plan.outputs["labels"], schemas.LABELS)
    assert _ids(labels, "response_token_ids") == [g[1] for g in generated]  # carried into labels.parquet
    model, tok = load_causal_lm(str(tiny_model), "float32")
    direct = score(model, [(list(p), list(r)) for p, r in generated], tok.pad_token_id, 8, packing=False)
    np.testing.assert_allclose(labels["policy_logp"].to_numpy(), direct, atol=1e-3)


def test_pairs_reference_and_train_use_the_same_ids(round1, tiny_model, packed):
    cfg = round1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    _run(cfg, "label", lambda plan: lambda: label.run(cfg, plan))  # done already unless this test runs alone
    plan, _ = _run(cfg, "pairs", lambda plan: lambda: pairs.run(cfg, plan))
    packed.clear()
    table = read_parquet(plan.outputs["pairs"], schemas.PAIRS)
    labels = read_parquet(rounds.plan(cfg, 1, "label").outputs["labels"], schemas.LABELS)
    sampled = {(pid, y): ids for pid, y, ids in zip(labels["prompt_id"].to_pylist(), labels["response"].to_pylist(),
                                                   _ids(labels, "response_token_ids"))}  # fmt: skip
    gen = [s == "generated" for s in table["source"].to_pylist()]
    assert any(gen) and not all(gen)  # replay mixed offline pairs in
    rows = table.to_pylist()
    for row, g in zip(rows, gen):
        if g:  # the sampled ids of both responses, as generated
            assert tuple(row["chosen_token_ids"]) == sampled[(row["prompt_id"], row["chosen"])]
            assert tuple(row["rejected_token_ids"]) == sampled[(row["prompt_id"], row["rejected"])]
        else:  # offline: tokenised by the reference stage, which has the tokenizer
            assert row["prompt_token_ids"] is None and row["chosen_token_ids"] is None

    plan, manifest = _run(cfg, "reference", lambda plan: lambda: reference.run(cfg, plan))
    ref = read_parquet(plan.outputs["reference"], schemas.REFERENCE)
    assert all(ref[c].null_count == 0 for c in PAIR_IDS)
    # the run's offline set tokenised once, before the ranks; its pairs' ids found there
    assert manifest["stats"]["offline_ids"] == "tokenised"
    assert manifest["stats"]["offline_pairs_with_kept_ids"] == gen.count(False)
    by_pair = {r["pair_id"]: r for r in rows}
    expected = []
    for r, prompt in zip(ref.to_pylist(), prompts_of(ref)):
        if r["source"] == "generated":
            src = by_pair[r["pair_id"]]
            assert [r[c] for c in PAIR_IDS] == [src[c] for c in PAIR_IDS]
        else:  # tokenised once, as the text has always been tokenised
            p, c = encode(tok, prompt, r["chosen"])
            assert (r["prompt_token_ids"], r["chosen_token_ids"]) == (p, c)
            assert r["rejected_token_ids"] == encode(tok, prompt, r["rejected"])[1]
        assert r["chosen_tokens"] == len(r["chosen_token_ids"]) and r["rejected_tokens"] == len(r["rejected_token_ids"])
        expected += [(tuple(r["prompt_token_ids"]), tuple(r[f"{s}_token_ids"])) for s in ("chosen", "rejected")]
    assert sorted(packed) == sorted(expected)  # the reference scored exactly the stored ids

    examples, _ = load_pairs(plan.outputs["reference"], tok, cfg)  # what training trains on
    got = sorted((tuple(e[s][0].tolist()), tuple(e[s][1].tolist())) for e in examples for s in ("chosen", "rejected"))
    assert got == sorted(expected)

    # the stage again (a later round's is the same work): the kept ids, not the tokenizer, and the same file
    packed.clear()
    _, again = _run(cfg, "reference", lambda plan: lambda: reference.run(cfg, plan), force=True)
    assert again["stats"]["offline_ids"] == "reused" and sorted(packed) == sorted(expected)
    assert read_parquet(plan.outputs["reference"], schemas.REFERENCE).equals(ref)


def test_a_round_written_without_ids_is_tokenised_as_before(round1, tiny_model, tmp_path):
    """responses.parquet, pairs.parquet and reference.parquet of a round written before ids were stored (the columns
    dropped): the next stage runs and tokenises the texts, as it did then."""
    cfg = round1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    responses_path = rounds.plan(cfg, 1, "generate").outputs["responses"]
    old = pq.read_table(responses_path).drop_columns(RESPONSE_IDS)
    pq.write_table(old, responses_path)
    plan, _ = _run(cfg, "label", lambda plan: lambda: label.run(cfg, plan))  # the input changed: label runs again
    labels = read_parquet(plan.outputs["labels"], schemas.LABELS)
    assert labels["response_token_ids"].null_count == labels.num_rows and labels["label_error"].null_count == labels.num_rows
    model, _ = load_causal_lm(str(tiny_model), "float32")
    texts = encode_many(tok, prompts_of(labels), labels["response"].to_pylist())
    np.testing.assert_allclose(labels["policy_logp"].to_numpy(), score(model, texts, tok.pad_token_id, 8), atol=1e-3)

    pairs_path = rounds.plan(cfg, 1, "pairs").outputs["pairs"]
    _run(cfg, "pairs", lambda plan: lambda: pairs.run(cfg, plan))
    pq.write_table(pq.read_table(pairs_path).drop_columns(PAIR_IDS), pairs_path)
    plan, _ = _run(cfg, "reference", lambda plan: lambda: reference.run(cfg, plan))
    ref = read_parquet(plan.outputs["reference"], schemas.REFERENCE)
    for r, prompt in zip(ref.to_pylist(), prompts_of(ref)):  # every pair tokenised from its texts
        assert (r["prompt_token_ids"], r["chosen_token_ids"]) == encode(tok, prompt, r["chosen"])

    ref_path = tmp_path / "reference.parquet"
    pq.write_table(pq.read_table(plan.outputs["reference"]).drop_columns(PAIR_IDS), ref_path)
    with_ids, _ = load_pairs(plan.outputs["reference"], tok, cfg)
    without, _ = load_pairs(ref_path, tok, cfg)
    assert [(e["chosen"][1].tolist(), e["rejected"][1].tolist()) for e in without] == \
        [(e["chosen"][1].tolist(), e["rejected"][1].tolist()) for e in with_ids]  # fmt: skip
