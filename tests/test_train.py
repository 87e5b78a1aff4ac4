"""The train stage on the real DeepSpeed engine (ZeRO-3, gloo on CPU), launched as users launch it."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import LossType, save_config
from pipeline.data import schemas
from pipeline.data.artifacts import execute
from pipeline.run import rounds
from stages import pairs, reference


def _prepare_round0(cfg):
    """Round 0's pairs and reference log-probs, in process (fast), so training has its input."""
    for name, mod in (("pairs", pairs), ("reference", reference)):
        plan = rounds.plan(cfg, 0, name)
        execute(plan, lambda: mod.run(cfg, plan))


def _train(cfg, tmp_path, *extra):
    path = tmp_path / f"{cfg.name}-{cfg.train.num_processes}.yaml"
    save_config(cfg, path)
    return subprocess.run(
        [sys.executable, "-m", "stages.train", str(path), "--round", "0", *extra],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """The same round-0 training with 1 and with 2 processes (same global batch)."""
    from tests.conftest import tiny_config

    base = tmp_path_factory.mktemp("train")
    cfgs = {}
    for n in (1, 2):
        cfg = tiny_config(base / f"runs{n}", tiny_model, **{"train.num_processes": n, "train.micro_batch_size": 2,
                                                           "round0.max_pairs": 24, "train.learning_rate": 2e-4})  # fmt: skip
        if n == 1:
            _prepare_round0(cfg)
        else:  # identical inputs: copy round 0's pairs/reference (and their manifests)
            shutil.copytree(rounds.round_dir(cfgs[1], 0), rounds.round_dir(cfg, 0))
        proc = _train(cfg, base)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        cfgs[n] = cfg
    return cfgs


def test_two_processes_match_one(trained):
    m1 = pq.read_table(rounds.plan(trained[1], 0, "train").outputs["metrics"]).to_pandas()
    m2 = pq.read_table(rounds.plan(trained[2], 0, "train").outputs["metrics"]).to_pandas()
    assert len(m1) == len(m2) == math.ceil(24 / 8)
    np.testing.assert_allclose(m1.loss, m2.loss, rtol=1e-4)
    np.testing.assert_allclose(m1.margin, m2.margin, rtol=1e-3, atol=1e-5)
    assert m1.loss.iloc[0] == pytest.approx(math.log(2), abs=1e-4)  # step 1: policy == reference, h = 0
    assert (m1.grad_norm > 0).all() and (m1.tokens > 0).all()
    # linear warm-up over 2 steps, then constant: lr·1/3, lr·2/3, lr
    np.testing.assert_allclose(m1.learning_rate, [2e-4 / 3, 4e-4 / 3, 2e-4], rtol=1e-6)


def test_checkpoint_is_complete_and_trained(trained, tiny_model):
    from transformers import AutoModelForCausalLM

    from pipeline.compute.logprobs import encode, score

    out = rounds.plan(trained[2], 0, "train").outputs["checkpoint"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # safetensors only
    init = AutoModelForCausalLM.from_pretrained(tiny_model)
    new = AutoModelForCausalLM.from_pretrained(out)
    init_sd, new_sd = init.state_dict(), new.state_dict()
    assert init_sd.keys() == new_sd.keys()
    for name, value in init_sd.items():  # every trained parameter moved, nothing came back partitioned/empty
        assert new_sd[name].shape == value.shape, name
        assert not torch.equal(new_sd[name], value), name
    # the trained policy prefers the chosen answers more than the initial one did
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ref = pq.read_table(rounds.plan(trained[2], 0, "train").inputs["reference"]).to_pandas()
    c = [encode(tok, p, y) for p, y in zip(ref.prompt, ref.chosen)]
    r = [encode(tok, p, y) for p, y in zip(ref.prompt, ref.rejected)]
    margin_new = score(new.eval(), c, tok.pad_token_id, 8) - score(new, r, tok.pad_token_id, 8)
    margin_ref = ref.ref_chosen_logps - ref.ref_rejected_logps
    assert (margin_new - margin_ref).mean() > 0


def _broken_round(trained, tmp_path, mutate):
    cfg = trained[1].model_copy(update={"runs_dir": str(tmp_path / "runs")})
    shutil.copytree(rounds.round_dir(trained[1], 0), rounds.round_dir(cfg, 0))
    shutil.rmtree(rounds.round_dir(cfg, 0) / "checkpoint")
    path = rounds.plan(cfg, 0, "train").inputs["reference"]
    pq.write_table(mutate(pq.read_table(path)), path)
    return cfg, path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.drop_columns(["ref_chosen_logps"]), "missing column(s) ref_chosen_logps"),
        (lambda t: t.set_column(t.schema.get_field_index("ref_rejected_logps"), "ref_rejected_logps",
                                pa.array([float("nan")] * t.num_rows)), "ref_rejected_logps is not finite in row 0"),
        (lambda t: t.slice(0, 0), "no pairs to train on"),
    ],
)  # fmt: skip
def test_bad_training_input_is_a_clear_error(trained, tmp_path, mutate, message):
    cfg, path = _broken_round(trained, tmp_path, mutate)
    proc = _train(cfg, tmp_path, "--force")
    assert proc.returncode == 2
    assert str(path) in proc.stderr and message in proc.stderr
    assert not (rounds.round_dir(cfg, 0) / "checkpoint").exists()  # nothing half-written


def test_identical_pairs_are_dropped_and_counted(trained, tmp_path):
    def make_identical(t):
        rejected = t.column("rejected").to_pylist()
        rejected[0] = t.column("chosen")[0].as_py()
        return t.set_column(t.schema.get_field_index("rejected"), "rejected", pa.array(rejected))

    cfg, _ = _broken_round(trained, tmp_path, make_identical)
    proc = _train(cfg, tmp_path, "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"dropped_identical": 1' in proc.stdout
    assert pq.read_metadata(rounds.plan(cfg, 0, "train").outputs["metrics"]).num_rows == 3
    assert schemas.TRAIN_METRICS.names == pq.read_schema(rounds.plan(cfg, 0, "train").outputs["metrics"]).names


def test_killed_training_resumes_from_its_deepspeed_checkpoint(trained, tmp_path):
    """SIGKILL after step 2 of 3, run again: it resumes from the saved DeepSpeed state and ends exactly where
    the uninterrupted run (same config, no checkpoints) ended."""
    import os
    import signal

    from safetensors.torch import load_file

    cfg = trained[1].model_copy(update={"runs_dir": str(tmp_path / "runs")})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_every": 1})})
    shutil.copytree(rounds.round_dir(trained[1], 0), rounds.round_dir(cfg, 0))
    for p in ("checkpoint", "train_metrics.parquet", ".dice/train.json"):
        target = rounds.round_dir(cfg, 0) / p
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    conf = tmp_path / "resume.yaml"
    save_config(cfg, conf)
    cmd = [sys.executable, "-u", "-m", "stages.train", str(conf), "--round", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        if "step 2/3" in line:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (rounds.round_dir(cfg, 0) / "checkpoint").exists()
    assert (rounds.round_dir(cfg, 0) / ".dice/train-state/resume.json").is_file()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming after step" in again.stdout
    assert not (rounds.round_dir(cfg, 0) / ".dice/train-state").exists()  # cleaned up once the model is saved
    resumed = pq.read_table(rounds.round_dir(cfg, 0) / "train_metrics.parquet").to_pandas()
    straight = pq.read_table(rounds.round_dir(trained[1], 0) / "train_metrics.parquet").to_pandas()
    np.testing.assert_allclose(resumed.loss, straight.loss, rtol=1e-5)
    a = load_file(rounds.round_dir(cfg, 0) / "checkpoint/model.safetensors")
    b = load_file(rounds.round_dir(trained[1], 0) / "checkpoint/model.safetensors")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "loss, first_step_loss",
    [
        # step 1: the policy IS the reference, so h = 0 for every pair; what remains is each loss at h = 0
        ("dpo", math.log(2)),  # −log σ(0)
        ("ipo", (0 - 1 / (2 * 0.1)) ** 2),  # (h − 1/(2τ))² = 25; only 25 if the reference is per-token mean too
        ("ipo_soft", (0 - (1.0 - 0.5) / 0.1) ** 2),  # hard label p = 1: (h − (p − ½)/τ)² = 25
        ("slic", 1.0),  # max(0, 1 − β·0)
        ("irepo", math.log(0.99 / 0.01) ** 2),  # p = 1 clipped to 0.99: (β·0 − logit 0.99)² = 21.1
        ("sr_dpo", None),  # depends on Δ ≠ 0
        ("sr_ipo", None),
    ],
)
def test_every_loss_trains_through_the_stage(trained, tmp_path, loss, first_step_loss):
    cfg = trained[1].model_copy(update={"runs_dir": str(tmp_path / "runs")})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"loss": LossType(loss)})})
    shutil.copytree(rounds.round_dir(trained[1], 0), rounds.round_dir(cfg, 0))
    shutil.rmtree(rounds.round_dir(cfg, 0) / "checkpoint")
    proc = _train(cfg, tmp_path, "--force")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m = pq.read_table(rounds.round_dir(cfg, 0) / "train_metrics.parquet").to_pandas()
    assert np.isfinite(m.loss).all() and len(m) == 3
    if first_step_loss is not None:
        assert m.loss.iloc[0] == pytest.approx(first_step_loss, rel=1e-4)
    assert m.margin.iloc[0] == pytest.approx(0, abs=1e-5)  # h = 0 at the start, whatever the loss
    assert m.margin.iloc[-1] != 0


def test_checkpoint_reloads_to_the_engines_logps(trained):
    """The consolidated safetensors checkpoint (2 processes, ZeRO-3) gives the log-probs the engine gave."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.compute.logprobs import encode, score

    rd = rounds.round_dir(trained[2], 0)
    probe = json.loads((rd / ".dice/train.json").read_text())["stats"]["probe_chosen_logps"]
    model = AutoModelForCausalLM.from_pretrained(rd / "checkpoint").eval()
    tok = AutoTokenizer.from_pretrained(rd / "checkpoint")
    ref = pq.read_table(rd / "reference.parquet").slice(0, 2).to_pylist()
    ours = score(model, [encode(tok, r["prompt"], r["chosen"]) for r in ref], tok.pad_token_id, 2)
    np.testing.assert_allclose(ours, probe, atol=1e-4, rtol=1e-5)


def test_packed_training_equals_padded(trained, tmp_path):
    """The default packed micro-batches ([prompt | chosen | rejected], no padding) train exactly as padded ones
    (train.packing=false): same per-step losses, margins, gradient norms and logical token counts, same weights."""
    from safetensors.torch import load_file

    cfg = trained[1].model_copy(update={"runs_dir": str(tmp_path / "runs")})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"packing": False})})
    assert trained[1].train.packing  # the default
    shutil.copytree(rounds.round_dir(trained[1], 0), rounds.round_dir(cfg, 0))
    shutil.rmtree(rounds.round_dir(cfg, 0) / "checkpoint")
    proc = _train(cfg, tmp_path, "--force")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    padded = pq.read_table(rounds.round_dir(cfg, 0) / "train_metrics.parquet").to_pandas()
    packed = pq.read_table(rounds.round_dir(trained[1], 0) / "train_metrics.parquet").to_pandas()
    np.testing.assert_allclose(packed.loss, padded.loss, rtol=1e-5)
    np.testing.assert_allclose(packed.margin, padded.margin, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(packed.grad_norm, padded.grad_norm, rtol=1e-4)
    assert packed.tokens.tolist() == padded.tokens.tolist()  # prompt+chosen + prompt+rejected, counted alike
    a = load_file(rounds.round_dir(cfg, 0) / "checkpoint/model.safetensors")
    b = load_file(rounds.round_dir(trained[1], 0) / "checkpoint/model.safetensors")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_zero3_offload_trains_like_without(trained, tmp_path):
    cfg = trained[1].model_copy(update={"runs_dir": str(tmp_path / "runs")})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"offload_optimizer": True, "offload_params": True})})
    shutil.copytree(rounds.round_dir(trained[1], 0), rounds.round_dir(cfg, 0))
    shutil.rmtree(rounds.round_dir(cfg, 0) / "checkpoint")
    proc = _train(cfg, tmp_path, "--force")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    offloaded = pq.read_table(rounds.round_dir(cfg, 0) / "train_metrics.parquet").column("loss").to_numpy()
    straight = pq.read_table(rounds.round_dir(trained[1], 0) / "train_metrics.parquet").column("loss").to_numpy()
    np.testing.assert_allclose(offloaded, straight, rtol=1e-4)


def test_a_failing_rank_fails_the_stage_with_its_error(trained, tmp_path):
    def nan_logps(t):
        return t.set_column(t.schema.get_field_index("ref_chosen_logps"), "ref_chosen_logps",
                            pa.array([float("nan")] * t.num_rows))  # fmt: skip

    cfg, path = _broken_round(trained, tmp_path, nan_logps)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_processes": 2})})
    proc = _train(cfg, tmp_path, "--force")
    assert proc.returncode == 2
    assert "training failed" in proc.stderr and "failed:" in proc.stderr  # the rank's own traceback follows
    assert "ref_chosen_logps is not finite" in proc.stderr


def test_lr_schedules():
    from stages.train import lr_lambda

    const = lr_lambda("constant_with_warmup", 2, 10)
    assert [const(s) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    cos = lr_lambda("cosine", 0, 10)
    assert [cos(s) for s in (0, 5, 10)] == pytest.approx([1, 0.5, 0], abs=1e-12)  # half-way: ½(1 + cos π/2)


def test_adamw_is_torchs_fused_kernel_with_the_same_updates():
    """The stage's optimizer is torch's fused AdamW where the kernel exists (as TRL's `adamw_torch_fused`), and its
    steps are the plain per-tensor loop's up to float rounding."""
    from stages.train import adamw

    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (3, 5, 2)]
    fused_params = [torch.randn(s, requires_grad=True) for s in shapes]
    loop_params = [p.detach().clone().requires_grad_(True) for p in fused_params]
    fused = adamw(fused_params, lr=1e-2, weight_decay=0.1)
    loop = torch.optim.AdamW(loop_params, lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    for _ in range(5):
        grads = [torch.randn(s) for s in shapes]
        for params, opt in ((fused_params, fused), (loop_params, loop)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fused_params, loop_params):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # a device without torch's fused kernel (here "meta"): the default implementation
    on_meta = [torch.empty(4, device="meta", requires_grad=True)]
    assert not adamw(on_meta, lr=1e-3, weight_decay=0.0).defaults["fused"]
