"""Every recipe in conf/recipes/ runs a short round end to end on the tiny model, on the toy task's data.

The stages run in this process with the session's vLLM engine (the policy of round 1 is the session's tiny model,
`round0.mode=skip`), and each recipe's defining choices are checked in what the round wrote: the labeller, the
pair strategy and its soft labels, the sampler, the reference model, the loss. benchmarks/methods.py runs the
full-size versions through the Prefect flow; tests/test_flow_e2e.py covers the flow itself.
"""

from __future__ import annotations

import importlib
import json
import math

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.data.artifacts import execute, read_manifest
from pipeline.run import rounds

from .conftest import REPO

RECIPES = sorted((REPO / "conf" / "recipes").glob("*.yaml"))
GPU_RECIPES = sorted((REPO / "conf" / "recipes" / "gpu").glob("*.yaml"))


def test_every_recipe_has_a_gpu_twin():
    assert {p.stem for p in RECIPES} == {p.stem for p in GPU_RECIPES}
    assert {"dice", "irepo", "online-ipo", "ipo-md", "sr-dpo", "sr-ipo", "dpo", "ipo", "slic"} <= {p.stem for p in RECIPES}
    for tiny, gpu in zip(RECIPES, GPU_RECIPES):
        t, g = load_config(tiny), load_config(gpu)
        # the same method: same loss, labeller, sampler, pair strategy and reference
        assert (t.train.loss, t.label.labeller != "python", t.generate.sampler, t.pairs.strategy, t.reference.model,
                t.offline_rounds) == (g.train.loss, g.label.labeller != "python", g.generate.sampler, g.pairs.strategy,
                                      g.reference.model, g.offline_rounds), tiny.stem  # fmt: skip
        assert g.train.bf16 and g.train.num_processes >= 8 and g.model.build_tiny_if_missing is False
        assert "/" in g.model.policy  # a hub model id, not the toy model
        # every recipe evaluates its rounds: the toy by its true reward on held-out prompts, the GPU twin with an
        # AI judge served over HTTP (`vllm serve`), its key read from an environment variable
        assert t.eval.enabled and t.eval.python_metric == "pipeline.run.toy:true_rewards" and t.eval.prompts.path.startswith("data/toy/")
        assert g.eval.enabled and g.eval.judges and all(j.backend == "http" and j.api_key_env for j in g.eval.judges)


def _short(path, tmp_path, tiny_model, reference):
    """The recipe, shortened: one round from the session's tiny model, a handful of prompts, two optimizer steps."""
    return load_config(path, [
        f"runs_dir={tmp_path / 'runs'}", f"model.policy={tiny_model}", "model.build_tiny_if_missing=false",
        "round0.mode=skip", f"model.reference={reference}", "rounds=1", "data.prompts_per_round=6", "data.offline_per_round=16",
        "generate.max_tokens=128", "pairs.min_valid=2",
        "eval.enabled=false",  # evaluating π_1 needs a second engine beside the session's: tests/test_flow_e2e.py runs it
        f"data.prompts={REPO / 'data/toy/prompts.jsonl'}", f"data.offline={REPO / 'data/toy/offline_prefs.jsonl'}",
    ])  # fmt: skip


def _run_round(cfg, k, llm):
    for stage in rounds.stages_of_round(cfg, k):
        plan = rounds.plan(cfg, k, stage)
        module = importlib.import_module(f"stages.{stage}")
        kwargs = {"llm": llm} if stage == "generate" and cfg.generate.sampler == "vllm" else {}
        execute(plan, lambda: module.run(cfg, plan, **kwargs))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_a_round_end_to_end(path, tmp_path, tiny_model, perturbed_model, llm):
    # π_-1 differs from π_0, so the implicit reward is not identically zero
    cfg = _short(path, tmp_path, tiny_model, perturbed_model)
    _run_round(cfg, 1, llm)
    rd = rounds.round_dir(cfg, 1)
    pairs = pq.read_table(rd / "pairs.parquet").to_pandas()
    metrics = pq.read_table(rd / "train_metrics.parquet").to_pandas()
    assert len(pairs) > 0 and (rd / "checkpoint" / "model.safetensors").is_file()
    assert metrics.loss.map(math.isfinite).all()
    ref_manifest = read_manifest(rd / ".dice" / "reference.json")
    assert ref_manifest["inputs"]["reference"]["path"] == rounds.model_of(cfg, rounds.training_reference(cfg, 1))

    if cfg.offline_rounds:  # offline baselines: fresh offline pairs, nothing generated
        assert not (rd / "responses.parquet").exists()
        assert (pairs.source == "offline").all() and len(pairs) == cfg.data.offline_per_round
        return
    labels = pq.read_table(rd / "labels.parquet").to_pandas()
    assert set(labels.labeller) == {cfg.label.labeller}
    gen = pairs[pairs.source == "generated"]
    assert len(gen) > 0
    if cfg.label.labeller == "judge":
        prefs = pq.read_table(rd / "preferences.parquet").to_pandas()
        assert prefs.annotator.nunique() == len(cfg.label.judges)
        assert (gen.annotators == len(cfg.label.judges)).all()
        if cfg.train.loss.value in ("irepo", "ipo_soft"):  # soft labels reach training
            assert gen.preference.between(0, 1).all() and (gen.preference < 1).any()
    if cfg.pairs.strategy == "random":
        assert gen.groupby("prompt_id").size().max() <= cfg.pairs.random_pairs_per_prompt
    if cfg.label.labeller == "implicit_reward" and cfg.pairs.debias_length:
        assert gen.alpha.notna().all()
    if cfg.generate.sampler == "mixture":
        stats = read_manifest(rd / ".dice" / "generate.json")
        assert "mixture_reference" in stats["inputs"]
    train_cfg = json.loads(json.dumps(read_manifest(rd / ".dice" / "train.json")["config"]))
    assert train_cfg["train"]["loss"] == cfg.train.loss.value


def test_reference_model_initial_keeps_pi0_as_the_regulariser(tmp_path):
    online = load_config(REPO / "conf/recipes/online-ipo.yaml", [f"runs_dir={tmp_path}"])
    dice = load_config(REPO / "conf/recipes/dice.yaml", [f"runs_dir={tmp_path}"])
    for k in (1, 2, 3):
        assert rounds.plan(online, k, "reference").inputs["reference"] == rounds.model_of(online, 0)
        assert rounds.plan(dice, k, "reference").inputs["reference"] == rounds.model_of(dice, k - 1)
    # the label stage's implicit reward is unaffected: π_{k-1} against π_{k-2}
    assert rounds.plan(dice, 2, "label").inputs["reference"] == rounds.model_of(dice, 0)


def test_offline_rounds_skip_generation_and_labelling(tmp_path):
    cfg = load_config(REPO / "conf/recipes/dpo.yaml", [f"runs_dir={tmp_path}"])
    assert rounds.stages_of_round(cfg, 0) == ("pairs", "reference", "train")
    assert rounds.stages_of_round(cfg, 2) == ("pairs", "reference", "train", "evaluate")  # π_2 against π_0
    assert "labels" not in rounds.plan(cfg, 1, "pairs").inputs
