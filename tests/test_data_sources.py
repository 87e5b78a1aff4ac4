"""Bring your own data: Hugging Face datasets (Hub layout, save_to_disk, a Hub id from an offline cache) and
conversations in, TRL-exact preference data out.

The datasets are built here, offline, from the shipped data: UltraFeedback binarized's columns and splits (chosen
and rejected as message lists that repeat the prompt turn), and multi-turn prompts with system messages. Each
source runs a round end to end on the real engines (the session's vLLM engine, transformers scoring, DeepSpeed
training, in this process as tests/test_recipes.py does), and TRL's own DPOTrainer reads the exported round.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataSource, load_config
from pipeline.data.artifacts import ArtifactError, execute, read_manifest
from pipeline.run import rounds
from tests.conftest import BIN, REPO, hub_repo

SYSTEM = "You are a concise assistant. Answer in one paragraph."


def _shipped(name: str) -> list[dict]:
    return [json.loads(line) for line in (REPO / "data" / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ufb_folder(tmp_path_factory) -> Path:
    """A folder in the Hub layout with UltraFeedback binarized's columns and its two preference splits."""
    root = tmp_path_factory.mktemp("datasets") / "ultrafeedback-mini"
    (root / "data").mkdir(parents=True)
    rows = [
        {"prompt": r["prompt"], "prompt_id": f"uf{i:04d}",
         "chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}],
         "messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
         "score_chosen": 8.0, "score_rejected": 4.0}
        for i, r in enumerate(_shipped("offline_prefs.jsonl"))
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows[:200]), root / "data" / "train_prefs-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[200:]), root / "data" / "test_prefs-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="module")
def multiturn_saved(tmp_path_factory) -> Path:
    """Multi-turn prompts with a system message, written by `datasets`' save_to_disk (a DatasetDict, split train)."""
    from datasets import Dataset, DatasetDict

    prompts = _shipped("prompts.jsonl")
    rows = [
        {"id": f"mt{i:04d}", "conversation": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompts[i]["prompt"]},
            {"role": "assistant", "content": "Here is a first answer."},
            {"role": "user", "content": prompts[i + 1]["prompt"]},
        ]}
        for i in range(0, 60, 2)
    ]  # fmt: skip
    out = tmp_path_factory.mktemp("datasets") / "multiturn"
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(out))
    return out


def _config(tmp_path, policy, reference, prompts, offline, **extra):
    return load_config(REPO / "conf/tiny.yaml", [
        f"runs_dir={tmp_path / 'runs'}", f"model.policy={policy}", f"model.reference={reference}",
        "model.build_tiny_if_missing=false", "round0.mode=skip", "rounds=1", "data.prompts_per_round=6",
        "generate.max_tokens=64", "train.global_batch_size=4", "train.micro_batch_size=2", "eval.enabled=false",
        f"data.prompts={json.dumps(prompts)}", f"data.offline={json.dumps(offline)}",
        *[f"{k}={v}" for k, v in extra.items()],
    ])  # fmt: skip


def _run_round(cfg, llm):
    for stage in rounds.stages_of_round(cfg, 1):
        plan = rounds.plan(cfg, 1, stage)
        module = importlib.import_module(f"stages.{stage}")
        kwargs = {"llm": llm} if stage == "generate" else {}
        execute(plan, lambda: module.run(cfg, plan, **kwargs))
    return rounds.round_dir(cfg, 1)


@pytest.fixture(scope="module")
def conversational_round(tmp_path_factory, tiny_model, perturbed_model, ufb_folder, multiturn_saved, llm):
    """Round 1 from multi-turn prompts (save_to_disk) and UltraFeedback-style offline pairs (Hub-layout folder)."""
    tmp = tmp_path_factory.mktemp("conv")
    cfg = _config(tmp, tiny_model, perturbed_model,
                  {"path": str(multiturn_saved), "split": "train", "columns": {"prompt": "conversation", "prompt_id": "id"}},
                  {"path": str(ufb_folder), "split": "train_prefs"})  # fmt: skip
    return cfg, _run_round(cfg, llm)


def test_multi_turn_prompts_reach_every_model(conversational_round, tiny_model):
    """The whole conversation, system message included, under the chat template: in generation (the engine's
    prompt), in the implicit reward's scoring and in the reference log-probs."""
    from pipeline.compute.logprobs import encode, load_causal_lm, score
    from pipeline.data.chat import prompts_of

    cfg, rd = conversational_round
    labels = pq.read_table(rd / "labels.parquet")
    convs = prompts_of(labels)
    assert all(isinstance(c, list) and c[0] == {"role": "system", "content": SYSTEM} and len(c) == 4 for c in convs)
    assert labels.column("prompt").to_pylist()[0].startswith(f"System: {SYSTEM}\n\nUser: ")  # the readable text
    model, tok = load_causal_lm(str(tiny_model), "float32")
    rows = list(range(0, labels.num_rows, 7))
    responses = labels.column("response").to_pylist()
    direct = score(model, [encode(tok, convs[i], responses[i]) for i in rows], tok.pad_token_id, 8)
    np.testing.assert_allclose(labels.column("policy_logp").to_numpy()[rows], direct, atol=2e-3)
    last_turn_only = score(model, [encode(tok, convs[i][-1]["content"], responses[i]) for i in rows], tok.pad_token_id, 8)
    assert np.abs(direct - last_turn_only).max() > 0.5  # the earlier turns mattered
    # generation saw the conversation too: vLLM's cumulative log-prob of its own sample equals the scoring above
    # (up to the odd response whose text re-tokenises into other tokens than were sampled)
    cum = labels.column("cumulative_logprob").to_numpy()[rows]
    stopped = np.array(labels.column("finish_reason").to_pylist())[rows] == "stop"
    assert np.median(np.abs(cum[stopped] - direct[stopped])) < 1e-2


def test_ultrafeedback_pairs_train_as_conversations(conversational_round, tiny_model):
    cfg, rd = conversational_round
    ref = pq.read_table(rd / "reference.parquet").to_pandas()
    offline = ref[ref.source == "offline"]
    assert len(offline) > 0 and (ref.source == "generated").any()
    # UltraFeedback repeats the prompt turn in chosen/rejected: the shared turn is the prompt, the answers alone remain
    assert offline.prompt_messages.isna().all()  # one user turn: stored as the prompt text
    uf = {r["prompt"]: r for r in _shipped("offline_prefs.jsonl")}
    assert all(uf[p]["chosen"] == c for p, c in zip(offline.prompt, offline.chosen))
    metrics = pq.read_table(rd / "train_metrics.parquet").to_pandas()
    assert len(metrics) > 0 and np.isfinite(metrics.loss).all()
    manifest = read_manifest(rd / ".dice" / "pairs.json")
    assert manifest["config"]["offline_source"] == {"split": "train_prefs"}  # the split is part of the plan


def test_export_is_what_trl_reads_and_scores(conversational_round, tiny_model, tmp_path):
    """`dice export --format trl`, then TRL's DPOTrainer reads it with load_dataset("parquet") alone, computes its own
    reference log-probs (precompute_ref_log_probs) equal to dice's, and trains a few steps."""
    import torch
    from datasets import load_dataset, load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cfg, rd = conversational_round
    out = tmp_path / "round1.parquet"
    done = subprocess.run([str(BIN / "dice"), "export", str(cfg.run_dir), "--round", "1", "--format", "trl", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    ds = load_dataset("parquet", data_files=str(out), split="train")
    n = pq.read_metadata(rd / "reference.parquet").num_rows
    assert ds.num_rows == n and {"prompt", "chosen", "rejected", "dice_ref_chosen_logps"} <= set(ds.column_names)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-5,
                     precompute_ref_log_probs=True, use_cpu=True, bf16=False, report_to="none", logging_strategy="no",
                     save_strategy="no", gradient_checkpointing=False, max_length=None, disable_tqdm=True)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(str(tiny_model)))
    theirs = trainer.train_dataset
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(theirs[f"ref_{side}_logps"], theirs[f"dice_ref_{side}_logps"], atol=1e-3)
    trainer.train()
    assert trainer.state.global_step == 2
    for fmt, path in (("jsonl", tmp_path / "r1.jsonl"), ("hf", tmp_path / "r1-hf")):
        done = subprocess.run([str(BIN / "dice"), "export", str(cfg.run_dir), "--round", "1", "--format", fmt, "--out",
                               str(path)], cwd=REPO, capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert len(load_dataset("json", data_files=str(tmp_path / "r1.jsonl"), split="train")) == n
    assert load_from_disk(str(tmp_path / "r1-hf")).num_rows == n


def test_hub_ids_from_an_offline_cache(tmp_path, tiny_model, perturbed_model, ufb_folder, offline_hub, llm):
    """Dataset and model Hub ids, served by a local cache with the Hub unreachable (HF_HUB_OFFLINE); the manifests
    record the commits they resolved to."""
    data_commit = hub_repo(offline_hub, "dice-test/ultrafeedback-mini", ufb_folder, "dataset")
    model_commit = hub_repo(offline_hub, "dice-test/tiny", tiny_model)
    cfg = _config(tmp_path, "dice-test/tiny", perturbed_model,
                  {"path": "dice-test/ultrafeedback-mini", "split": "test_prefs"},
                  {"path": "dice-test/ultrafeedback-mini", "split": "train_prefs"},
                  **{"model.revision": model_commit})  # fmt: skip
    rd = _run_round(cfg, llm)
    generate = read_manifest(rd / ".dice" / "generate.json")["inputs"]
    assert generate["policy"]["revision"] == model_commit and generate["policy"]["path"] == f"dice-test/tiny@{model_commit}"
    assert generate["prompts"]["revision"] == data_commit
    assert read_manifest(rd / ".dice" / "pairs.json")["inputs"]["offline"]["revision"] == data_commit
    assert (rd / "checkpoint" / "model.safetensors").is_file()


def test_data_check_reports_before_a_run(tmp_path, tiny_model, multiturn_saved, ufb_folder):
    src = {"path": str(multiturn_saved), "split": "train", "columns": {"prompt": "conversation", "prompt_id": "id"}}
    out = subprocess.run([str(BIN / "dice"), "data", "check", str(REPO / "conf/tiny.yaml"), f"model.policy={tiny_model}",
                          f"data.prompts={json.dumps(src)}", f"data.offline={json.dumps({'path': str(ufb_folder), 'split': 'train_prefs'})}",
                          "model.max_prompt_tokens=60"],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "conversations" in out.stdout and "│ 30 " in out.stdout  # 30 multi-turn prompts, all conversations
    assert "over_max_prompt_tokens (60" in out.stdout and "p50" in out.stdout and "over_max_length" in out.stdout


# ---------------------------------------------------------------------------------------------- bad input


def _offline_file(tmp_path, rows) -> Path:
    p = tmp_path / "offline.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    return p


U = {"role": "user", "content": "What is DPO?"}
A = {"role": "assistant", "content": "A preference loss."}
B = {"role": "assistant", "content": "No idea."}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"chosen": [{"role": "system", "content": "s"}, A], "rejected": [{"role": "system", "content": "s"}, B]},
         "row 0: field 'chosen' (the turns before its answer): the conversation has no user turn"),
        ({"prompt": [U, A], "chosen": "x", "rejected": "y"}, "row 0: field 'prompt': the prompt ends with a assistant turn"),
        ({"chosen": [U, A], "rejected": [{"role": "user", "content": "Another question?"}, B]},
         "row 0: chosen and rejected repeat different prompt turns"),
        ({"chosen": [U, A, U], "rejected": [U, B]}, "field 'chosen' is a conversation that does not end with an assistant turn"),
        ({"chosen": "x", "rejected": "y"}, "row 0: no 'prompt' field"),
    ],
)
def test_bad_conversations_name_the_row(tmp_path, row, message):
    from pipeline.data.datasets import read_offline

    with pytest.raises(ArtifactError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_offline(_offline_file(tmp_path, [row]))


def test_bad_sources_name_the_split_and_columns(ufb_folder, tmp_path):
    from datasets import Dataset, DatasetDict

    from pipeline.data.datasets import read_offline, read_prompts

    with pytest.raises(ArtifactError, match=r"no split 'train'; the splits are test_prefs, train_prefs"):
        read_offline(DataSource(path=str(ufb_folder), split="train"))
    with pytest.raises(ArtifactError, match=r"several splits \(test_prefs, train_prefs\); choose one with split"):
        read_prompts(DataSource(path=str(ufb_folder)))
    with pytest.raises(ArtifactError, match=r"columns \['instruction'\] \(from `columns`\) not found; the columns are prompt, prompt_id, chosen"):
        read_prompts(DataSource(path=str(ufb_folder), split="train_prefs", columns={"prompt": "instruction"}))
    empty = tmp_path / "empty"
    (empty / "data").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"prompt": ["x"]}), empty / "data" / "test-00000-of-00001.parquet")
    with pytest.raises(ArtifactError, match=r"empty \(split=train\): no prompts in split 'train'"):
        read_prompts(DataSource(path=str(empty), split="train"))
    no_prompt = tmp_path / "noprompt"
    DatasetDict({"train": Dataset.from_list([{"question": "x"}])}).save_to_disk(str(no_prompt))
    with pytest.raises(ArtifactError, match=r"no column 'prompt'; the file has 'question'"):
        read_prompts(DataSource(path=str(no_prompt), split="train"))


def test_a_hub_dataset_not_in_the_cache_is_a_clear_error(offline_hub):
    from pipeline.data.datasets import read_prompts

    with pytest.raises(ValueError, match=r"dice-test/absent: not in the local Hugging Face cache and the Hub cannot be reached"):
        read_prompts(DataSource(path="dice-test/absent", split="train"))


def test_encode_many_is_encode(tiny_model):
    """The batched encoding the scoring and training stages use gives exactly `encode`'s ids, conversations
    included (each distinct prompt rendered once)."""
    from transformers import AutoTokenizer

    from pipeline.compute.logprobs import encode, encode_many

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = _shipped("offline_prefs.jsonl")[:40]
    prompts = [r["prompt"] for r in rows] + [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["prompt"]}]
                                             for r in rows[:10]]  # fmt: skip
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows[:10]]
    assert encode_many(tok, prompts, responses) == [encode(tok, p, y) for p, y in zip(prompts, responses)]
    assert encode_many(tok, [], []) == []
