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
    from pipeline.compute.logprobs import load_causal_lm, prompt_ids, score
    from pipeline.data.chat import prompts_of

    cfg, rd = conversational_round
    labels = pq.read_table(rd / "labels.parquet")
    convs = prompts_of(labels)
    assert all(isinstance(c, list) and c[0] == {"role": "system", "content": SYSTEM} and len(c) == 4 for c in convs)
    assert labels.column("prompt").to_pylist()[0].startswith(f"System: {SYSTEM}\n\nUser: ")  # the readable text
    model, tok = load_causal_lm(str(tiny_model), "float32")
    # generation saw the conversation: the engine's prompt ids are the whole conversation under the chat template
    sent = labels.column("prompt_token_ids").to_pylist()
    assert all(ids == prompt_ids(tok, c) for ids, c in zip(sent, convs))
    rows = list(range(0, labels.num_rows, 7))
    sampled = labels.column("response_token_ids").to_pylist()
    direct = score(model, [(sent[i], sampled[i]) for i in rows], tok.pad_token_id, 8)
    np.testing.assert_allclose(labels.column("policy_logp").to_numpy()[rows], direct, atol=2e-3)
    last_turn_only = score(model, [(prompt_ids(tok, convs[i][-1]["content"]), sampled[i]) for i in rows],
                           tok.pad_token_id, 8)  # fmt: skip
    assert np.abs(direct - last_turn_only).max() > 0.5  # the earlier turns mattered


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

    from pipeline.compute.logprobs import encode
    from pipeline.data.chat import prompts_of

    cfg, rd = conversational_round
    out = tmp_path / "round1.parquet"
    # dice scored the generated responses' sampled ids; TRL tokenises text. Pairs whose text does not tokenise back to
    # those ids cannot be exported exactly: the export fails naming them, or leaves them out with --skip-inexact
    ref = pq.read_table(rd / "reference.parquet")
    n = ref.num_rows
    d, tok = ref.to_pydict(), AutoTokenizer.from_pretrained(str(tiny_model))
    inexact = sum(any(encode(tok, p, d[s][i]) != (d["prompt_token_ids"][i], d[f"{s}_token_ids"][i]) for s in ("chosen", "rejected"))
                  for i, p in enumerate(prompts_of(ref)))  # fmt: skip
    export = [str(BIN / "dice"), "export", str(cfg.run_dir), "--round", "1", "--format", "trl", "--out", str(out)]
    done = subprocess.run(export, cwd=REPO, capture_output=True, text=True, check=False)
    if inexact:
        assert done.returncode == 2 and "dice scored the sampled token ids" in " ".join(done.stderr.split())
        done = subprocess.run(export + ["--skip-inexact"], cwd=REPO, capture_output=True, text=True, check=False)
        assert f"{inexact} pairs left out" in " ".join(done.stdout.split())
    assert done.returncode == 0, done.stderr
    ds = load_dataset("parquet", data_files=str(out), split="train")
    n -= inexact
    assert n >= 2 and ds.num_rows == n and {"prompt", "chosen", "rejected", "dice_ref_chosen_logps"} <= set(ds.column_names)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-5,
                     precompute_ref_log_probs=True, use_cpu=True, bf16=False, report_to="none", logging_strategy="no",
                     save_strategy="no", gradient_checkpointing=False, max_length=cfg.model.max_length,
                     disable_tqdm=True)  # fmt: skip  (docs/data.md's recipe: the run's max_length)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(str(tiny_model)))
    theirs = trainer.train_dataset
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(theirs[f"ref_{side}_logps"], theirs[f"dice_ref_{side}_logps"], atol=1e-3)
    trainer.train()
    assert trainer.state.global_step == 2
    for fmt, path in (("jsonl", tmp_path / "r1.jsonl"), ("hf", tmp_path / "r1-hf")):
        done = subprocess.run([str(BIN / "dice"), "export", str(cfg.run_dir), "--round", "1", "--format", fmt, "--out",
                               str(path), "--skip-inexact"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
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
         "row 0: the turns chosen and rejected share (the prompt): the conversation has no user turn"),
        ({"prompt": [U, A], "chosen": "x", "rejected": "y"}, "row 0: field 'prompt': the prompt ends with a assistant turn"),
        ({"chosen": [U, A], "rejected": [{"role": "user", "content": "Another question?"}, B]},
         "row 0: chosen and rejected repeat different prompt turns"),
        ({"chosen": [U, A, U], "rejected": [U, B]}, "field 'chosen' is a conversation that does not end with an assistant turn"),
        ({"chosen": "x", "rejected": "y"}, "row 0: no 'prompt' field, and chosen and rejected share no beginning"),
        ({"prompt": [{"role": "system", "content": " "}, U], "chosen": "x", "rejected": "y"},
         "row 0: field 'prompt': message 0 (system) has empty content"),
        ({"chosen": [U, {"role": "assistant", "content": ""}], "rejected": [U, B]},
         "row 0: field 'chosen (its assistant turn)' must be a non-empty string"),
        ({"chosen": [{"role": "user", "content": ""}, A], "rejected": [{"role": "user", "content": ""}, B]},
         "row 0: field 'chosen': message 0 (user) has empty content"),
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


# ---------------------------------------------------------------------------------------------- TRL, exactly


def _pairs_table(rows: list[dict]) -> pa.Table:
    """The columns of a REFERENCE table that the export reads."""
    n = len(rows)
    return pa.table({"pair_id": [f"p{i}" for i in range(n)], "prompt_id": [f"q{i}" for i in range(n)],
                     "prompt": [r["prompt"] for r in rows], "prompt_messages": pa.nulls(n, pa.list_(pa.struct(
                         [("role", pa.string()), ("content", pa.string())]))),
                     "chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows],
                     "ref_chosen_logps": [-1.0] * n, "ref_rejected_logps": [-2.0] * n, "source": ["offline"] * n,
                     "preference": [1.0] * n, "round": [1] * n})  # fmt: skip


def test_trl_trains_on_dices_tokens_for_long_pairs_and_responses_ending_in_eos(tiny_model, tmp_path):
    """docs/data.md's recipe gives DPOConfig the run's model.max_length: a pair longer than TRL's default of 1024
    tokens then reaches TRL's collator whole, the same tokens dice scored (with the default it would be cut). A
    response that already ends with EOS gets no second one, in TRL (it adds EOS only when missing) as in dice."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from pipeline.compute.logprobs import encode
    from pipeline.run.export import trl_rows

    tok = AutoTokenizer.from_pretrained(tiny_model)
    shipped = _shipped("offline_prefs.jsonl")
    long_answer = ""
    for r in shipped:  # an answer of 1100-1900 tokens: over TRL's default, under the run's max_length
        long_answer = f"{long_answer} {r['chosen']}".strip()
        if len(tok(long_answer)["input_ids"]) > 1100:
            break
    rows = [{"prompt": shipped[0]["prompt"], "chosen": long_answer, "rejected": shipped[0]["rejected"]},
            {"prompt": shipped[1]["prompt"], "chosen": shipped[1]["chosen"] + tok.eos_token, "rejected": shipped[1]["rejected"]}]  # fmt: skip
    ours = [encode(tok, r["prompt"], r[side]) for r in rows for side in ("chosen", "rejected")]
    assert 1100 < len(ours[0][0]) + len(ours[0][1]) < 2048  # longer than TRL's default max_length, within dice's
    assert ours[2][1].count(tok.eos_token_id) == 1 and ours[2][1][-1] == tok.eos_token_id  # one EOS, not two
    exported, bad = trl_rows(_pairs_table(rows), tok)
    assert not bad
    dice_max_length = 2048  # the GPU recipes' model.max_length
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_length=dice_max_length, precompute_ref_log_probs=False,
                     use_cpu=True, bf16=False, report_to="none", disable_tqdm=True)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(exported), processing_class=tok)
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    batch = trainer.data_collator(examples)  # rows: chosen of each pair, then rejected of each
    theirs = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert theirs == [p + y for p, y in (ours[0], ours[2], ours[1], ours[3])]
    completions = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["completion_mask"])]
    assert completions == [y for _, y in (ours[0], ours[2], ours[1], ours[3])]
    # TRL's default would train on other tokens than dice scored: the long pair cut at 1024
    assert DPOConfig.__dataclass_fields__["max_length"].default == 1024
    cut = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=1024)(examples)
    assert cut["attention_mask"][0].sum().item() == 1024 < len(theirs[0])


def test_export_from_another_folder(tmp_path, tiny_model, monkeypatch):
    """A run started with a relative runs_dir (runs/tiny/...) names its checkpoints relative to where it started;
    `dice export` given the run's absolute path from another folder still finds the model that scored the round
    (the manifest records it relative to the run)."""
    import shutil

    from pipeline.run.export import export_round

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    shutil.copytree(tiny_model, work / "models" / "tiny")
    cfg = load_config(REPO / "conf/tiny.yaml", [
        "runs_dir=runs", "model.policy=models/tiny", "model.build_tiny_if_missing=false", "rounds=1",
        "round0.max_pairs=8", "offline_rounds=true", "data.offline_per_round=8", "eval.enabled=false",
        f"data.prompts={REPO / 'data/prompts.jsonl'}", f"data.offline={REPO / 'data/offline_prefs.jsonl'}",
    ])  # fmt: skip
    shutil.copytree(tiny_model, rounds.model_of(cfg, 0))  # π_0 where round 0's training leaves it
    for k, stage in ((0, "pairs"), (0, "reference"), (1, "pairs"), (1, "reference")):
        plan = rounds.plan(cfg, k, stage)
        module = importlib.import_module(f"stages.{stage}")
        execute(plan, lambda: module.run(cfg, plan))
    recorded = read_manifest(rounds.round_dir(cfg, 1) / ".dice/reference.json")["inputs"]["reference"]
    assert recorded["path"] == "runs/tiny/round-0/checkpoint" and recorded["in_run"] == "round-0/checkpoint"
    for k in (1, 0):  # round 0's reference is model.policy, a relative path outside the run
        out = tmp_path / f"round{k}.parquet"
        done = subprocess.run([str(BIN / "dice"), "export", str(work / cfg.run_dir), "--round", str(k), "--out", str(out)],
                              cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert pq.read_metadata(out).num_rows == pq.read_metadata(rounds.round_dir(cfg, k) / "reference.parquet").num_rows
        assert "DPOConfig(max_length=512)" in " ".join(done.stdout.split())
    moved = tmp_path / "moved"
    shutil.move(str(work / "runs" / "tiny"), moved)  # the whole run folder elsewhere: still exportable
    monkeypatch.chdir(tmp_path)
    assert export_round(moved, 1, "jsonl", tmp_path / "r1.jsonl")["model"] == str(moved / "round-0/checkpoint")


# ---------------------------------------------------------------------------------------------- the Hub


@pytest.fixture
def alpaca_eval_hub(offline_hub, tmp_path):
    """tatsu-lab/alpaca_eval as the Hub holds it (a loading script, one JSON file per configuration, split `eval`),
    in an offline Hugging Face cache; its instructions are made up here."""
    repo = tmp_path / "alpaca_eval-repo"
    repo.mkdir()
    (repo / "alpaca_eval.py").write_text("raise SystemExit('a loading script: dice must never run it')\n")
    rows = [{"instruction": f"Explain topic {i} in two sentences.", "output": f"Topic {i} is ...",
             "generator": "text_davinci_003", "dataset": "helpful_base"} for i in range(805)]  # fmt: skip
    (repo / "alpaca_eval.json").write_text(json.dumps(rows, indent=2))
    (repo / "alpaca_eval_gpt4_baseline.json").write_text(json.dumps(rows[:5], indent=2))
    (repo / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# AlpacaEval\n")
    hub_repo(offline_hub, "tatsu-lab/alpaca_eval", repo, "dataset")
    return rows


def test_alpaca_eval_is_read_from_the_hub_by_id(alpaca_eval_hub):
    """Every GPU recipe evaluates on AlpacaEval's 805 instructions, read from the Hub by id and subset: the JSON file
    the repository's script would read, never the script."""
    from pipeline.data.artifacts import input_record
    from pipeline.data.datasets import read_prompts

    gpu = sorted((REPO / "conf/recipes/gpu").glob("*.yaml")) + [REPO / "conf/dice-llama3-8b.yaml"]
    src = DataSource(path="tatsu-lab/alpaca_eval", name="alpaca_eval", columns={"prompt": "instruction"})
    assert all(load_config(p).eval.prompts == src for p in gpu)
    table = read_prompts(src)
    assert table.num_rows == 805 and table.column("prompt").to_pylist()[:2] == [r["instruction"] for r in alpaca_eval_hub[:2]]
    cfg = load_config(gpu[0])
    plan = rounds.plan(cfg, 1, "evaluate")
    assert plan.inputs["prompts"] == "hf://datasets/tatsu-lab/alpaca_eval"
    assert input_record(StagePlan_like(plan))["prompts"]["revision"]  # fingerprinted by the snapshot's commit
    with pytest.raises(ArtifactError, match=r"loading script \(alpaca_eval.py\), which dice never runs; name the subset"):
        read_prompts(DataSource(path="tatsu-lab/alpaca_eval"))
    with pytest.raises(ArtifactError, match=r"subset 'alpaca_eval' is the one file alpaca_eval.json: remove split='eval'"):
        read_prompts(DataSource(path="tatsu-lab/alpaca_eval", name="alpaca_eval", split="eval"))


def StagePlan_like(plan):
    """`plan` with only its prompts input (its models do not exist here)."""
    from pipeline.data.artifacts import StagePlan

    return StagePlan(plan.stage, plan.round, plan.round_dir, {"prompts": plan.inputs["prompts"]}, {}, {})


def test_a_stage_reads_the_commit_its_manifest_records(tmp_path, offline_hub):
    """The manifest records the commit `main` resolved to when the stage started; a branch that moves while the
    stage runs does not change what the stage reads."""
    from pipeline.data.artifacts import StagePlan
    from pipeline.data.datasets import plan_input, read_prompts

    versions = {}
    for v in ("1", "2"):
        folder = tmp_path / f"v{v}"
        folder.mkdir()
        (folder / "train.jsonl").write_text("".join(json.dumps({"prompt": f"v{v} prompt {i}"}) + "\n" for i in range(3)))
        versions[v] = folder
    first = hub_repo(offline_hub, "dice-test/moving", versions["1"], "dataset", commit="1" * 40)
    src = DataSource(path="dice-test/moving")
    plan = StagePlan("generate", 1, tmp_path / "run" / "round-1", {"prompts": plan_input(src)}, {}, {})

    def stage() -> dict:
        hub_repo(offline_hub, "dice-test/moving", versions["2"], "dataset", commit="2" * 40)  # main moves meanwhile
        return {"prompts": read_prompts(src).column("prompt").to_pylist()}

    m = execute(plan, stage)
    assert m["inputs"]["prompts"]["revision"] == first
    assert m["stats"]["prompts"] == [f"v1 prompt {i}" for i in range(3)]


def test_a_hub_download_fetches_only_the_split_asked_for(tmp_path, offline_hub, ufb_folder, monkeypatch):
    """The Hub cannot be reached here: its two answers dice uses (the repository's commit and file list, then the
    download of the files asked for) are played by a folder laid out as UltraFeedback binarized's repository, README
    configs included. Only the README and the split asked for are downloaded."""
    import fnmatch
    import shutil
    from types import SimpleNamespace

    import huggingface_hub
    import huggingface_hub.constants as hf

    from pipeline.data.datasets import read_offline

    remote = tmp_path / "remote"
    shutil.copytree(ufb_folder, remote)
    (remote / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                      "  - split: train_prefs\n    path: data/train_prefs-*\n"
                                      "  - split: test_prefs\n    path: data/test_prefs-*\n---\n")  # fmt: skip
    names = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())
    commit = "3" * 40
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)

    def dataset_info(self, repo_id, *, revision=None, **kw):
        return SimpleNamespace(sha=commit, siblings=[SimpleNamespace(rfilename=n) for n in names])

    def snapshot_download(repo_id, *, repo_type=None, revision=None, allow_patterns=None, **kw):
        dest = offline_hub / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots" / revision
        for n in names:
            if allow_patterns is None or any(fnmatch.fnmatch(n, p) for p in allow_patterns):
                (dest / n).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(remote / n, dest / n)
        return str(dest)

    real_snapshot_download = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    table = read_offline(DataSource(path="dice-test/ultrafeedback", split="test_prefs"))
    assert table.num_rows == pq.read_metadata(remote / "data/test_prefs-00000-of-00001.parquet").num_rows
    snapshot = offline_hub / "datasets--dice-test--ultrafeedback" / "snapshots" / commit
    on_disk = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    assert on_disk == ["README.md", "data/test_prefs-00000-of-00001.parquet"]
    # offline (HF_HUB_OFFLINE=1 on a cluster node), the cache serves the split it holds, and says which it lacks
    (offline_hub / "datasets--dice-test--ultrafeedback" / "refs").mkdir()
    (offline_hub / "datasets--dice-test--ultrafeedback" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", None)  # never asked offline
    monkeypatch.setattr(huggingface_hub, "snapshot_download", real_snapshot_download)  # the real cache lookup
    import pipeline.data.models

    pipeline.data.models._resolved.clear()  # a new process
    assert read_offline(DataSource(path="dice-test/ultrafeedback", split="test_prefs")).equals(table)
    with pytest.raises(ArtifactError, match=r"\(split=train_prefs\): not in the local Hugging Face cache \(it holds "
                                            r"data/test_prefs-00000-of-00001.parquet of this dataset\)"):
        read_offline(DataSource(path="dice-test/ultrafeedback", split="train_prefs"))


# ---------------------------------------------------------------------------------------------- dice data check

# Mistral-style: roles must alternate user/assistant, a system message is refused (raise_exception, as Mistral's does)
ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}"
               "{% endfor %}")  # fmt: skip


def _tokenizer_only(tiny_model, dest: Path, template: str | None = None) -> Path:
    """The tiny model's tokenizer and config, without weights (optionally with another chat template)."""
    import shutil

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(dest)
    shutil.copy(tiny_model / "config.json", dest / "config.json")
    return dest


def test_data_check_names_the_row_a_chat_template_refuses(tmp_path, tiny_model):
    """A Mistral-style template that requires alternating roles refuses a prompt with a system message: `dice data
    check` names the file and line with the template's own message and exits 2; the other rows are measured."""
    model = _tokenizer_only(tiny_model, tmp_path / "strict", ALTERNATING)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "What is DPO?"}, {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi?"}]},
            {"prompt": "Name a river."}]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([str(BIN / "dice"), "data", "check", str(REPO / "conf/tiny.yaml"), f"model.policy={model}",
                          "model.build_tiny_if_missing=false", f"data.prompts={prompts}",
                          f"data.offline={REPO / 'data/offline_prefs.jsonl'}", "eval.enabled=false"],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert (f"{prompts}: line 2: the chat template of {model} refuses this prompt: Conversation roles must "
            "alternate user/assistant") in out.stderr
    assert "Traceback" not in out.stderr and "[INST] What is DPO? [/INST]" in out.stdout  # the first prompt, rendered


def test_data_check_reads_a_hub_tokenizer_without_weights_at_model_revision(tmp_path, tiny_model, offline_hub,
                                                                              multiturn_saved):  # fmt: skip
    """A Hub policy's tokenizer is read from its tokenizer files alone (no weights in the cache), at model.revision:
    `main` holds the alternating-roles template, which refuses these prompts; the pinned revision's accepts them."""
    from transformers import AutoTokenizer

    from pipeline.data.chat import prompts_of
    from pipeline.data.datasets import read_prompts
    from pipeline.run.datacheck import check_data

    strict = hub_repo(offline_hub, "dice-test/chat", _tokenizer_only(tiny_model, tmp_path / "a", ALTERNATING), commit="a" * 40)
    plain = hub_repo(offline_hub, "dice-test/chat", _tokenizer_only(tiny_model, tmp_path / "b"), commit="b" * 40)
    (offline_hub / "models--dice-test--chat" / "refs" / "main").write_text(strict)
    src = {"path": str(multiturn_saved), "split": "train", "columns": {"prompt": "conversation", "prompt_id": "id"}}
    overrides = ["model.policy=dice-test/chat", "model.build_tiny_if_missing=false", f"data.prompts={json.dumps(src)}",
                 f"data.offline={REPO / 'data/offline_prefs.jsonl'}", "eval.enabled=false"]  # fmt: skip
    on_main = check_data(load_config(REPO / "conf/tiny.yaml", overrides))
    assert on_main.errors and "30 prompts the chat template refuses" in on_main.errors[0]
    pinned = check_data(load_config(REPO / "conf/tiny.yaml", [*overrides, f"model.revision={plain}"]))
    assert not pinned.errors and pinned.datasets["data.prompts"]["rows"] == 30
    tok = AutoTokenizer.from_pretrained(tmp_path / "b")
    conv = prompts_of(read_prompts(DataSource(**src)))[0]
    assert pinned.rendered == tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)


def test_data_check_before_the_tiny_model_is_built_and_prompt_reuse(tmp_path, monkeypatch):
    """On a fresh clone, models/tiny does not exist yet (built by the first run): the check still reads every dataset,
    says the lengths wait for the model, and warns when the rounds would reuse prompts. Skipped rows are counted."""
    from pipeline.run.datacheck import check_data

    monkeypatch.chdir(tmp_path)
    offline = tmp_path / "offline.jsonl"
    offline.write_text((REPO / "data/offline_prefs.jsonl").read_text() + '{"prompt": "p", "chosen": "same", "rejected": "same"}\n')
    cfg = load_config(None, [f"data.prompts={REPO / 'data/prompts.jsonl'}", f"data.offline={offline}", "rounds=3",
                             "data.prompts_per_round=200", "data.on_bad_row=skip",
                             f"eval.prompts={REPO / 'data/eval_prompts.jsonl'}"])  # fmt: skip
    assert cfg.model.policy == "models/tiny" and cfg.model.build_tiny_if_missing and not Path("models").exists()
    report = check_data(cfg)
    assert report.datasets["data.prompts"]["rows"] == 320 and "built on the first run" in report.datasets["data.prompts"]["prompt_tokens"]
    assert report.datasets["data.offline"]["rows dice cannot use (skipped)"] == "1 row (1 identical)"
    assert not report.errors and report.rendered is None
    assert any("320 usable prompts, but 3 rounds × prompts_per_round 200 need 600: from round 2 on" in w
               for w in report.warnings)  # fmt: skip
