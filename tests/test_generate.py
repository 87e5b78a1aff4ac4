"""The generate stage at scale: shards written as they complete, resume after SIGKILL, engine processes
(data parallelism), progress lines, bad input, and the in-process engine's release. Real vLLM (CPU build)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from pipeline.config import save_config
from pipeline.data import schemas
from pipeline.data.artifacts import ArtifactError, execute, read_parquet
from pipeline.run import rounds
from stages import generate
from tests.conftest import REPO


def _run_stage(cfg, llm=None, k=1):
    plan = rounds.plan(cfg, k, "generate")
    manifest = execute(plan, lambda: generate.run(cfg, plan, llm=llm))
    return read_parquet(plan.outputs["responses"], schemas.RESPONSES).to_pandas(), manifest["stats"]


def test_sigkill_mid_generation_resumes_missing_shards_on_two_engines(make_config, llm, tmp_path):
    """`python -m stages.generate` SIGKILLed after some shards: the re-run (now with 2 engine processes)
    generates only the missing shards and ends with the same table as an uninterrupted run."""
    cfg = make_config(**{"round0.mode": "skip", "generate.shard_size": 1})  # 12 prompts -> 12 shards
    expected, stats = _run_stage(cfg.model_copy(update={"runs_dir": str(tmp_path / "uninterrupted")}), llm)
    assert stats["shards"] == 12 and stats["shards_generated"] == 12
    conf = tmp_path / "gen.yaml"
    save_config(cfg, conf)
    plan = rounds.plan(cfg, 1, "generate")
    shards = generate.shard_dir(plan)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stages.generate", str(conf), "--round", "1"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(shards.glob("shard-*.json")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no shard written in 300 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = proc.stdout.read()
    written = sorted(p.name for p in shards.glob("shard-*.json"))
    assert 1 <= len(written) < 12, written
    assert "shard 0 done; shards 1/12, prompts 1/12" in first  # a progress line per shard (not a terminal)
    assert not plan.outputs["responses"].exists() and not plan.manifest_path.exists()

    again = subprocess.run([sys.executable, "-m", "stages.generate", str(conf), "generate.engine.data_parallel_size=2",
                            "--round", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    result = json.loads(again.stdout.split("DICE_STAGE_RESULT ")[1])["stats"]
    assert result["shards_reused"] == len(written) and result["shards_generated"] == 12 - len(written)
    assert result["engines"] == (2 if 12 - len(written) > 1 else 1)
    assert f"{len(written)} of 12 shards already written, generating {12 - len(written)}" in again.stdout
    if result["engines"] == 2:
        assert (
            "[engine 0] generate round 1: shard" in again.stdout
            and "[engine 1] generate round 1: shard" in again.stdout
        )
    # the shards written before the kill were not rewritten (checked before the stage removed the folder)
    assert all(f"shard {int(n[6:11])} done" not in again.stdout for n in written)
    assert not shards.exists()  # folded into responses.parquet
    resumed = read_parquet(plan.outputs["responses"], schemas.RESPONSES).to_pandas()
    assert resumed.equals(expected)


def test_shards_of_another_config_are_not_reused(make_config, llm):
    cfg = make_config(**{"round0.mode": "skip", "generate.shard_size": 5, "data.prompts_per_round": 10})
    plan = rounds.plan(cfg, 1, "generate")
    # a stale shard from a run at another temperature sits in the shard folder
    hot = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"temperature": 1.3})})
    hot_plan = rounds.plan(hot, 1, "generate")
    generate.generate_shards(hot, hot_plan, [0], llm=llm)
    stale = pq.read_table(generate.shard_paths(plan, 0)[0]).to_pandas()
    table, stats = _run_stage(cfg, llm)
    assert stats["shards_reused"] == 0 and stats["shards_generated"] == 2
    assert table.response.head(len(stale)).tolist() != stale.response.tolist()
    # data parallelism and the shard fan-out are not part of the result's fingerprint; shard size is
    assert rounds.plan(cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"shard_runs": 5})}), 1,
                       "generate").config == plan.config  # fmt: skip
    assert "data_parallel_size" not in plan.config["generate"]["engine"]


def test_prompts_too_long_dropped_and_counted(make_config, llm, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.compute.logprobs import prompt_ids
    from pipeline.data.datasets import read_prompts

    cfg = make_config(**{"round0.mode": "skip", "generate.shard_size": 4})
    tok = AutoTokenizer.from_pretrained(cfg.model.policy)
    prompts = generate.select_prompts(
        read_prompts(cfg.data.prompts), 1, cfg.data.prompts_per_round
    ).to_pylist()
    lengths = {p["prompt_id"]: len(prompt_ids(tok, p["prompt"])) for p in prompts}
    limit = sorted(lengths.values())[len(lengths) // 2]
    too_long = {pid for pid, n in lengths.items() if n > limit}
    assert 0 < len(too_long) < len(lengths)
    # the model's context (here engine.max_model_len) drops prompts as max_prompt_tokens does: both are limits
    for override in ({"model.max_prompt_tokens": limit}, {"generate.engine.max_model_len": limit + 1}):
        c = make_config(**{"round0.mode": "skip", "generate.shard_size": 4, **override})
        table, stats = _run_stage(c, llm)
        assert stats["prompts_too_long"] == len(too_long) and set(stats["too_long_ids"]) == too_long
        assert set(table.prompt_id) == set(lengths) - too_long
    with pytest.raises(
        ValueError, match=r"prompts\.jsonl: all 12 prompts of round 1 exceed model\.max_prompt_tokens=2"
    ):
        _run_stage(make_config(**{"round0.mode": "skip", "model.max_prompt_tokens": 2}), llm)


def test_empty_prompt_file_and_a_model_vllm_cannot_load(make_config, tmp_path, tiny_model):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ArtifactError, match=r"empty\.jsonl: no prompts"):
        _run_stage(make_config(**{"round0.mode": "skip", "data.prompts": str(empty)}))
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(ValueError, match=rf"model {broken}: the vLLM engine could not start"):
        _run_stage(make_config(**{"round0.mode": "skip", "model.policy": str(broken)}))
    with pytest.raises(ValueError, match=rf"model {tmp_path / 'missing'}: the folder does not exist"):
        _run_stage(make_config(**{"round0.mode": "skip", "model.policy": str(tmp_path / "missing")}))


RELEASE_CHECK = """
import gc, json, sys, weakref
import pipeline.compute.engine
from pipeline.run import rounds
from pipeline.data.artifacts import execute
from pipeline.config import load_config
from stages import generate

started, make_llm = [], pipeline.compute.engine.make_llm

def track(llm):
    started.append(weakref.ref(llm))
    return llm

def recording_make_llm(*args, **kwargs):  # the real engine; only a weak reference is kept, to watch it go
    # no local variable for the engine here: vLLM keeps a traceback through this frame from its start-up
    return track(make_llm(*args, **kwargs))

pipeline.compute.engine.make_llm = recording_make_llm
cfg = load_config(sys.argv[1])
plan = rounds.plan(cfg, 1, "generate")
stats = execute(plan, lambda: generate.run(cfg, plan))["stats"]
gc.collect()
print("RELEASE " + json.dumps({"engines": len(started), "alive": started[0]() is not None, "stats": stats}))
"""


def test_in_process_engine_is_released(make_config, tmp_path):
    """run() without an engine starts one in its process and releases it before returning (nothing refers to it
    any more). In its own process: releasing an in-process vLLM engine tears down vLLM's process-wide parallel
    state, which would break the session's engine."""
    conf = tmp_path / "release.yaml"
    save_config(make_config(**{"round0.mode": "skip", "data.prompts_per_round": 4}), conf)
    out = subprocess.run([sys.executable, "-c", RELEASE_CHECK, str(conf)], cwd=REPO, capture_output=True, text=True,
                         timeout=600, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.split("RELEASE ")[1])
    assert result["engines"] == 1 and not result["alive"]
    assert result["stats"]["responses"] == 4 * 4 and result["stats"]["engines"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_engines_data_parallel_and_mixture(make_config, tmp_path):
    """On 2+ GPUs: one engine process per GPU gives the same table as one engine (on one GPU there is nothing to
    compare, and that part is left out); the mixture sampler runs both models on the GPU."""
    import torch

    gpu = {"round0.mode": "skip", "generate.engine.kv_cache_memory_bytes": "null", "model.dtype": "auto",
           "generate.engine.gpu_memory_utilization": 0.3, "generate.shard_size": 3}  # fmt: skip
    tables = {}
    # float32: the engines' batches differ, and bf16 kernels may round differently per batch
    for dp in ([1, torch.cuda.device_count()] if torch.cuda.device_count() > 1 else []):
        gpu["model.dtype"] = "float32"
        cfg = make_config(**gpu, runs_dir=str(tmp_path / f"dp{dp}"), **{"generate.engine.data_parallel_size": dp})
        conf = tmp_path / f"dp{dp}.yaml"
        save_config(cfg, conf)
        out = subprocess.run([sys.executable, "-m", "stages.generate", str(conf), "--round", "1"], cwd=REPO,
                             capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert json.loads(out.stdout.split("DICE_STAGE_RESULT ")[1])["stats"]["engines"] == dp
        tables[dp] = read_parquet(rounds.plan(cfg, 1, "generate").outputs["responses"], schemas.RESPONSES).to_pandas()
    if tables:  # one engine per GPU generates what one engine does (per-prompt seeds)
        one, many = tables[1], tables[torch.cuda.device_count()]
        cols = ["prompt_id", "sample_idx", "seed", "response", "finish_reason"]
        assert one[cols].equals(many[cols])
    gpu["model.dtype"] = "auto"
    cfg = make_config(**gpu, **{"generate.sampler": "mixture", "generate.mixture_beta": 0.5})
    table, stats = _run_stage(cfg)
    assert len(table) == cfg.data.prompts_per_round * cfg.generate.num_samples and stats["sampler"] == "mixture"
