"""GPU-only paths. Run on a GPU machine: `pytest -m gpu -n 0`; `-k "not vllm"` leaves out the tests that need CUDA vLLM
(scripts/device-check.sh runs those on its single GPU without vLLM).

One GPU: bf16 training in one process (NCCL, a world of one) at ZeRO-0 and ZeRO-3 from the reference stage's bf16
log-probs, with step 0's margin ≈ 0; gradient checkpointing's same losses and lower peak; the memory plan against the
real GPU (the preflight, zero_stage auto); CUDA vLLM generation and scoring; evaluate's engine sequence (policy,
baseline, a local judge) each at the default 0.85 memory share, released one after another. Two GPUs: multi-GPU
ZeRO-3 training under the DeepSpeed launcher, label and reference as DeepSpeed ranks (ZeRO-0 and ZeRO-3 inference)
and local judges on two engines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import save_config
from pipeline.data.artifacts import execute
from pipeline.run import rounds

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_vllm_generate_and_score(make_config, perturbed_model, tiny_model):
    """The generate stage on CUDA vLLM (bf16) and the label stage's implicit rewards on the GPU, checked against a
    float32 CPU scoring of the same sampled tokens: a broken GPU path (wrong logits, wrong masking) cannot pass."""
    from pipeline.compute.logprobs import load_causal_lm, score
    from stages import generate, label

    cfg = make_config(**{"round0.mode": "skip", "model.reference": str(perturbed_model),
                         "generate.engine.kv_cache_memory_bytes": "null",
                         "generate.engine.gpu_memory_utilization": 0.3, "model.dtype": "auto"})  # fmt: skip
    for stage, mod in (("generate", generate), ("label", label)):
        plan = rounds.plan(cfg, 1, stage)
        execute(plan, lambda: mod.run(cfg, plan))
    labels = pq.read_table(rounds.round_dir(cfg, 1) / "labels.parquet").to_pandas()
    assert len(labels) == cfg.data.prompts_per_round * cfg.generate.num_samples
    cpu = {}
    for name, path in (("policy", tiny_model), ("reference", perturbed_model)):
        model, tok = load_causal_lm(str(path), "float32", device=torch.device("cpu"))
        enc = [(list(p), list(r)) for p, r in zip(labels.prompt_token_ids, labels.response_token_ids)]  # as sampled
        cpu[name] = score(model, enc, tok.pad_token_id, 16)
    tokens = labels.num_tokens.to_numpy()
    for name in ("policy", "reference"):
        per_token = np.abs(labels[f"{name}_logp"].to_numpy() - cpu[name]) / tokens
        assert per_token.max() < 0.05, (name, per_token.max())  # bf16 on the GPU vs float32 on the CPU
    reward = labels.reward.to_numpy()
    reward_cpu = cfg.train.beta * (cpu["policy"] - cpu["reference"])
    assert reward.std() > 0 and np.corrcoef(reward, reward_cpu)[0, 1] > 0.95


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_zero3_matches_one(make_config, tmp_path):
    from stages import pairs, reference

    losses = {}
    for n in (1, 2):
        cfg = make_config(**{"runs_dir": str(tmp_path / f"runs{n}"), "train.num_processes": n, "train.bf16": "false"})
        for stage, mod in (("pairs", pairs), ("reference", reference)):
            plan = rounds.plan(cfg, 0, stage)
            execute(plan, lambda: mod.run(cfg, plan))
        conf = tmp_path / f"c{n}.yaml"
        save_config(cfg, conf)
        proc = subprocess.run([sys.executable, "-m", "stages.train", str(conf), "--round", "0"], capture_output=True,
                              text=True, timeout=900)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[n] = pq.read_table(rounds.round_dir(cfg, 0) / "train_metrics.parquet").column("loss").to_numpy()
    np.testing.assert_allclose(losses[1], losses[2], rtol=1e-3)


def _stage_process(tmp_path, stage: str, cfg, cpu: bool = False) -> dict:
    """`python -m stages.<stage>` in its own process (CUDA hidden with cpu=True); returns the stage's stats."""
    import json
    import os

    conf = tmp_path / f"{stage}-{Path(cfg.runs_dir).name}.yaml"
    save_config(cfg, conf)
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})}
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", str(conf), "--round", "1"], capture_output=True,
                          text=True, timeout=1800, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("DICE_STAGE_RESULT ")[1])["stats"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_label_and_reference_match_cpu(make_config, tmp_path, perturbed_model):
    """label (implicit reward) and reference on 2 GPUs as DeepSpeed ranks (NCCL), whole (ZeRO-0) and partitioned
    (ZeRO-3), bf16, against one CPU process in float32: the same rows, log-probs within bf16 tolerance."""
    import shutil

    import pandas as pd

    from tests.test_scale_scoring import _responses

    common = {"round0.mode": "skip", "model.reference": str(perturbed_model), "label.shard_size": 2,
              "reference.shard_size": 2, "data.prompts_per_round": 12}  # fmt: skip
    cpu = make_config(**common, runs_dir=str(tmp_path / "cpu"), **{"model.dtype": "float32", "label.num_processes": 1,
                                                                     "reference.num_processes": 1})  # fmt: skip
    _responses(rounds.round_dir(cpu, 1) / "responses.parquet", cpu.model.policy)
    _stage_process(tmp_path, "label", cpu, cpu=True)
    _stage_process(tmp_path, "pairs", cpu, cpu=True)
    _stage_process(tmp_path, "reference", cpu, cpu=True)
    expected = {name: pd.read_parquet(rounds.round_dir(cpu, 1) / f"{name}.parquet") for name in ("labels", "reference")}
    by_stage = {}
    for zero in (0, 3):
        gpu = make_config(**common, runs_dir=str(tmp_path / f"gpu-zero{zero}"), **{
            "model.dtype": "bfloat16", "label.num_processes": 2, "label.zero_stage": zero,
            "reference.num_processes": 2, "reference.zero_stage": zero})  # fmt: skip
        rounds.round_dir(gpu, 1).mkdir(parents=True)
        for f in ("responses.parquet", "pairs.parquet"):
            shutil.copy(rounds.round_dir(cpu, 1) / f, rounds.round_dir(gpu, 1) / f)
        for stage, name, cols in (("label", "labels", ["policy_logp", "reference_logp"]),
                                  ("reference", "reference", ["ref_chosen_logps", "ref_rejected_logps"])):  # fmt: skip
            stats = _stage_process(tmp_path, stage, gpu)
            assert stats["processes"] == 2 and stats["zero_stage"] == zero
            held = stats["weights_held_per_rank"]
            assert max(held.values() if isinstance(held, dict) else [held]) < (0.6 if zero == 3 else 1.01)
            got = pd.read_parquet(rounds.round_dir(gpu, 1) / f"{name}.parquet")
            assert got.prompt_id.tolist() == expected[name].prompt_id.tolist()
            for col in cols:
                np.testing.assert_allclose(got[col], expected[name][col], rtol=0.03, atol=1.0)  # bf16 vs float32
            by_stage.setdefault(name, []).append(got[cols].to_numpy())
    for name, (zero0, zero3) in by_stage.items():  # the same bf16 weights and kernels: partitioning changes nothing
        np.testing.assert_allclose(zero3, zero0, atol=5e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_vllm_judge_engines_match_one(make_config, tmp_path):
    """A local vLLM judge on 2 engine processes, one GPU each (label.engine.data_parallel_size 2), gives the
    preferences one engine gives."""
    import pandas as pd

    from tests.test_scale_scoring import _responses

    prefs = {}
    for dp in (1, 2):
        cfg = make_config(runs_dir=str(tmp_path / f"dp{dp}"), **{
            "round0.mode": "skip", "label.labeller": "judge", "label.judges": "[{id: self, backend: vllm}]",
            "label.shard_size": 3, "label.engine.data_parallel_size": dp, "label.engine.kv_cache_memory_bytes": "null",
            "label.engine.gpu_memory_utilization": 0.3, "data.prompts_per_round": 12})  # fmt: skip
        _responses(rounds.round_dir(cfg, 1) / "responses.parquet", cfg.model.policy)
        stats = _stage_process(tmp_path, "label", cfg)
        assert stats["engines"] == dp and rounds.gpus_used(cfg, "label") == dp
        prefs[dp] = pd.read_parquet(rounds.round_dir(cfg, 1) / "preferences.parquet")
    assert prefs[2][["prompt_id", "idx_a", "idx_b", "error"]].equals(prefs[1][["prompt_id", "idx_a", "idx_b", "error"]])
    np.testing.assert_allclose(prefs[2].p.astype(float), prefs[1].p.astype(float), atol=2e-2)


def test_collectives_run_on_the_rank_gpu():
    """NCCL (a world of one, as a one-GPU stage runs): launch's collectives build their tensors on the rank's GPU,
    return the sums and maxima, and refuse a CPU tensor before NCCL sees it."""
    code = """
import torch
from pipeline.compute import launch
launch.init_distributed()
import torch.distributed as dist
assert dist.get_backend() == "nccl" and launch.device() == torch.device("cuda", 0)
assert launch.sum_across([1.5, 2.0, 3.0]) == [1.5, 2.0, 3.0] and launch.max_across(7) == 7
launch.barrier()
try:
    launch.all_reduce(torch.zeros(2))
except RuntimeError as e:
    assert "tensor on cpu" in str(e)
else:
    raise AssertionError("a CPU tensor reached NCCL")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("zero", [0, 3])
def test_one_gpu_training_steps(make_config, tmp_path, zero):
    """Training on one GPU (NCCL, a world of one) at ZeRO-0 and ZeRO-3, bf16: every step's metrics are summed on
    the GPU (a CPU tensor in the step's all-reduce crashes NCCL at step 1), and every step's loss is finite."""
    from stages import pairs, reference

    cfg = make_config(**{"runs_dir": str(tmp_path / "runs"), "train.num_processes": 1, "train.zero_stage": zero,
                         "model.dtype": "auto", "round0.max_pairs": 16})  # fmt: skip
    for stage, mod in (("pairs", pairs), ("reference", reference)):
        plan = rounds.plan(cfg, 0, stage)
        execute(plan, lambda: mod.run(cfg, plan))
    conf = tmp_path / "train.yaml"
    save_config(cfg, conf)
    proc = subprocess.run([sys.executable, "-m", "stages.train", str(conf), "--round", "0"], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = pq.read_table(rounds.round_dir(cfg, 0) / "train_metrics.parquet").to_pandas()
    assert len(metrics) == 2 and np.isfinite(metrics.loss).all() and (metrics.tokens > 0).all()


def test_zero3_scoring_on_one_gpu_equals_unsharded(make_config, tmp_path):
    """reference.zero_stage 3 in one process on the GPU (NCCL): the pass count is agreed on the GPU before any
    pass, and the log-probs equal ZeRO-0's (float32)."""
    import pandas as pd

    from stages import pairs

    tables = {}
    for zero in (0, 3):
        cfg = make_config(**{"runs_dir": str(tmp_path / f"z{zero}"), "reference.num_processes": 1,
                             "reference.zero_stage": zero, "model.dtype": "float32", "round0.max_pairs": 16})  # fmt: skip
        plan = rounds.plan(cfg, 0, "pairs")
        execute(plan, lambda: pairs.run(cfg, plan))
        conf = tmp_path / f"reference-z{zero}.yaml"
        save_config(cfg, conf)  # its own process: ZeRO-3 starts a process group, which must not outlive the stage
        proc = subprocess.run([sys.executable, "-m", "stages.reference", str(conf), "--round", "0"],
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        tables[zero] = pd.read_parquet(rounds.round_dir(cfg, 0) / "reference.parquet")
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        np.testing.assert_allclose(tables[3][col], tables[0][col], atol=1e-3)


def _gpu_uuids() -> list[str]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ranks_use_their_own_gpu_named_by_uuid(make_config, tmp_path, perturbed_model):
    """label on 2 ZeRO-0 ranks with CUDA_VISIBLE_DEVICES naming 2 GPUs by UUID, in reverse order: the stage runs
    (DeepSpeed's --include cannot name UUIDs), and while it runs each rank's process is on exactly one GPU, a
    different one for each rank, among the two named (no rank touches GPU 0 unless it was given it)."""
    import threading

    from tests.test_scale_scoring import _responses

    uuids = _gpu_uuids()[:2][::-1]
    cfg = make_config(**{"runs_dir": str(tmp_path / "runs"), "round0.mode": "skip", "model.reference": str(perturbed_model),
                         "label.num_processes": 2, "label.shard_size": 1, "data.prompts_per_round": 12})  # fmt: skip
    _responses(rounds.round_dir(cfg, 1) / "responses.parquet", cfg.model.policy)
    conf = tmp_path / "label.yaml"
    save_config(cfg, conf)
    seen: dict[int, set[str]] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
                                 capture_output=True, text=True).stdout  # fmt: skip
            for line in out.splitlines():
                pid, _, uuid = line.partition(",")
                if pid.strip().isdigit():
                    seen.setdefault(int(pid), set()).add(uuid.strip())
            done.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    proc = subprocess.run([sys.executable, "-m", "stages.label", str(conf), "--round", "1"], capture_output=True,
                          text=True, timeout=1800, env={**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(uuids)})  # fmt: skip
    done.set()
    watcher.join()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    on = [gpus for pid, gpus in seen.items()]
    assert all(len(g) == 1 and g <= set(uuids) for g in on), seen
    assert {next(iter(g)) for g in on} == set(uuids), seen  # two ranks, one GPU each



# ---------------------------------------------------------------------------------------------- one GPU, no vLLM

REPO = Path(__file__).resolve().parent.parent


def _stage_run(tmp_path, stage: str, cfg, k: int, *extra: str) -> tuple[dict, dict]:
    """`python -m stages.<stage>` on the GPU through scripts/device_check.py's wrapper: (the stage's stats, its peak
    CUDA memory: max_memory_allocated / max_memory_reserved)."""
    import json

    conf = tmp_path / f"{stage}-{Path(cfg.runs_dir).parent.name}-{Path(cfg.runs_dir).name}.yaml"
    save_config(cfg, conf)
    proc = subprocess.run([sys.executable, str(REPO / "scripts/device_check.py"), "--stage-peak", stage, str(conf),
                           "--round", str(k), *extra], capture_output=True, text=True, timeout=1200, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = json.loads(proc.stdout.split("DICE_STAGE_RESULT ")[1].splitlines()[0])["stats"]
    peak = json.loads(proc.stdout.split("CHECK_PEAK ")[1].splitlines()[0])
    return stats, peak


@pytest.fixture(scope="module")
def gpu_round0(tmp_path_factory, tiny_model):
    """Round 0's pairs and its reference log-probs scored on the GPU in bf16 (dtype auto on a GPU)."""
    from tests.conftest import tiny_config

    base = tmp_path_factory.mktemp("gpu-round0")
    cfg = tiny_config(base / "runs", tiny_model, **{"round0.max_pairs": 32, "train.learning_rate": 1e-5})
    _stage_run(base, "pairs", cfg, 0)
    stats, _ = _stage_run(base, "reference", cfg, 0)
    assert stats["processes"] == 1
    return cfg


def _train_copy(gpu_round0, tmp_path, name: str, **train):
    import shutil

    cfg = gpu_round0.model_copy(update={"runs_dir": str(tmp_path / name)})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})
    shutil.copytree(rounds.round_dir(gpu_round0, 0), rounds.round_dir(cfg, 0),
                    ignore=shutil.ignore_patterns("checkpoint", "train_metrics.parquet"))  # fmt: skip
    return cfg


def test_reference_on_gpu_matches_float32_on_cpu(gpu_round0, tmp_path):
    """The reference stage on the GPU (bf16) scores what one CPU process scores in float32, within bf16's noise."""
    import pandas as pd

    cpu = _train_copy(gpu_round0, tmp_path, "cpu")
    cpu = cpu.model_copy(update={"model": cpu.model.model_copy(update={"dtype": "float32"})})
    (rounds.round_dir(cpu, 0) / "reference.parquet").unlink()
    _stage_process_round(tmp_path, "reference", cpu, 0, cpu_only=True)
    got = pd.read_parquet(rounds.round_dir(gpu_round0, 0) / "reference.parquet")
    want = pd.read_parquet(rounds.round_dir(cpu, 0) / "reference.parquet")
    assert got.prompt_id.tolist() == want.prompt_id.tolist()
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        np.testing.assert_allclose(got[col], want[col], rtol=0.03, atol=1.0)


def _stage_process_round(tmp_path, stage: str, cfg, k: int, cpu_only: bool = False) -> dict:
    import json
    import os

    conf = tmp_path / f"{stage}-{k}-{Path(cfg.runs_dir).name}.yaml"
    save_config(cfg, conf)
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if cpu_only else {})}
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", str(conf), "--round", str(k)], capture_output=True,
                          text=True, timeout=1800, env=env, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("DICE_STAGE_RESULT ")[1])["stats"]


@pytest.mark.parametrize("zero", [0, 3])
def test_bf16_training_on_one_gpu(gpu_round0, tmp_path, zero):
    """Training on the GPU in one process (a NCCL world of one: every collective on the GPU) in bf16 at ZeRO-0 and
    ZeRO-3, from the reference stage's bf16 log-probs: step 0's margin ≈ 0 (policy = reference, so masking and packing
    agree), finite losses, a bf16 checkpoint."""
    from safetensors import safe_open

    cfg = _train_copy(gpu_round0, tmp_path, f"zero{zero}", zero_stage=zero)
    stats, peak = _stage_run(tmp_path, "train", cfg, 0)
    assert stats["zero_stage"] == zero and stats["processes"] == 1
    m = pq.read_table(rounds.round_dir(cfg, 0) / "train_metrics.parquet").to_pandas()
    assert np.isfinite(m.loss).all() and len(m) == 4
    ref = pq.read_table(rounds.round_dir(cfg, 0) / "reference.parquet").to_pandas()
    tokens = (ref.chosen_tokens + ref.rejected_tokens).mean() / 2
    assert abs(m.chosen_reward.iloc[0]) / cfg.train.beta / tokens < 0.02  # nats a token: bf16 noise
    assert m.loss.iloc[0] == pytest.approx(np.log(2), abs=0.05)
    with safe_open(str(rounds.round_dir(cfg, 0) / "checkpoint/model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    assert peak["allocated"] > 0


def test_gradient_checkpointing_on_gpu(gpu_round0, tmp_path):
    """Checkpointing on the GPU: the same losses (bf16, flash attention recomputed) and a lower peak of CUDA memory."""
    runs = {}
    for ckpt in (False, True):
        cfg = _train_copy(gpu_round0, tmp_path, f"ckpt-{ckpt}", zero_stage=0, gradient_checkpointing=ckpt,
                          micro_batch_size=4)  # fmt: skip
        stats, peak = _stage_run(tmp_path, "train", cfg, 0)
        assert stats["gradient_checkpointing"] is ckpt
        runs[ckpt] = (pq.read_table(rounds.round_dir(cfg, 0) / "train_metrics.parquet").to_pandas(), peak)
    np.testing.assert_allclose(runs[True][0].loss, runs[False][0].loss, rtol=1e-2)
    assert runs[True][1]["allocated"] < runs[False][1]["allocated"]


def test_memory_plan_on_the_real_gpu(gpu_round0, tmp_path, tiny_model):
    """The plan reads this GPU's size; zero_stage auto trains at the stage the plan chooses (the tiny model fits
    ZeRO-0); a layout that cannot fit is refused before training starts, naming the fix."""
    from pipeline.compute import memory

    gpus, size = memory.device_memory(gpu_round0)
    assert gpus == torch.cuda.device_count() and size == min(torch.cuda.get_device_properties(i).total_memory
                                                               for i in range(gpus))  # fmt: skip
    cfg = _train_copy(gpu_round0, tmp_path, "auto", zero_stage="auto")
    stats, peak = _stage_run(tmp_path, "train", cfg, 0)
    assert stats["zero_stage"] == memory.choose_zero_stage(cfg, memory.read_shape(str(tiny_model)), 1, size) == 0
    (est,) = memory.plan_stage(cfg.model_copy(update={"train": cfg.train.model_copy(update={"zero_stage": 0})}),
                               "train", 1, size).estimates  # fmt: skip
    assert peak["allocated"] < est.total  # the plan bounds what training took
    huge = _train_copy(gpu_round0, tmp_path, "huge", micro_batch_size=4096, global_batch_size=4096)
    huge = huge.model_copy(update={"model": huge.model.model_copy(update={"max_length": 8192})})
    conf = tmp_path / "huge.yaml"
    save_config(huge, conf)
    proc = subprocess.run([sys.executable, "-m", "stages.train", str(conf), "--round", "0"], capture_output=True,
                          text=True, timeout=600, cwd=REPO)  # fmt: skip
    assert proc.returncode == 2 and "memory plan: train: does not fit" in proc.stderr
    assert not (rounds.round_dir(huge, 0) / "checkpoint").exists()


# ---------------------------------------------------------------------------------------------- vLLM on one GPU

EVAL_SEQUENCE = r"""
import json, sys, torch
from pathlib import Path
from pipeline.config import load_config
from pipeline.data.artifacts import execute
from pipeline.run import rounds
from stages import evaluate

cfg = load_config(sys.argv[1])
plan = rounds.standalone_eval_plan(cfg, sys.argv[2], sys.argv[3], Path(sys.argv[4]))
stats = execute(plan, lambda: evaluate.run(cfg, plan))["stats"]
free, total = torch.cuda.mem_get_info()
print("EVAL " + json.dumps({"stats": stats, "free": free, "total": total, "allocated": torch.cuda.memory_allocated()}))
"""


def test_vllm_evaluate_engine_sequence_at_the_default_memory_share(make_config, tiny_model, perturbed_model, tmp_path):
    """evaluate starts three CUDA vLLM engines one after another in one process (policy, baseline, a local judge),
    each taking the default 0.85 of the GPU: two would not fit at once, so this passes only when each is released
    before the next starts; afterwards the GPU's memory is free again."""
    import json

    cfg = make_config(**{"eval.enabled": "true", "eval.judges": "[{id: self, backend: vllm}]", "eval.allow_self_judge": "true", "eval.max_prompts": 8,
                         "eval.bootstrap": 0, "generate.engine.kv_cache_memory_bytes": "null"})  # fmt: skip
    assert cfg.generate.engine.gpu_memory_utilization == cfg.label.engine.gpu_memory_utilization == 0.85
    assert cfg.label.engine.kv_cache_memory_bytes is None  # the judge's engine: the share, not 256 MiB
    conf = tmp_path / "eval.yaml"
    save_config(cfg, conf)
    proc = subprocess.run([sys.executable, "-c", EVAL_SEQUENCE, str(conf), str(tiny_model), str(perturbed_model),
                           str(tmp_path / "eval")], capture_output=True, text=True, timeout=1800, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("EVAL ")[1])
    assert out["stats"]["per_annotator"]["self"]["ok"] > 0
    assert out["free"] > 0.8 * out["total"]  # every engine's share went back
