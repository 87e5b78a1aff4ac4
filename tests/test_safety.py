"""Safe by default, as the README promises: safetensors only, no secrets in URLs, no unpickling of artifacts, and
clear messages where the cause is the user's input (a missing folder, a labeller that raises or scores nothing, a
prompts file without its column). Each refusal happens before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.models import check_model, looks_local
from tests.conftest import REPO, tiny_config

DICE = str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "dice")


@pytest.fixture(scope="module")
def bin_only_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model saved as a pickle checkpoint (pytorch_model.bin) and nothing else."""
    import shutil

    import torch
    from safetensors.torch import load_file

    dest = tmp_path_factory.mktemp("models") / "pickled"
    shutil.copytree(tiny_model, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    # what an older checkpoint holds (transformers 5 writes safetensors whatever it is asked)
    torch.save(load_file(tiny_model / "model.safetensors"), dest / "pytorch_model.bin")
    assert (dest / "config.json").is_file() and not list(dest.glob("*.safetensors"))
    return dest


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    return env


# ---------------------------------------------------------------------------------------------- models


def test_local_or_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert looks_local("models/tinyy")  # its first part is a folder here
    assert looks_local("./x") and looks_local("/abs/x") and looks_local("runs/a/round-1/checkpoint")
    assert not looks_local("princeton-nlp/Llama-3-Base-8B-SFT-DPO") and not looks_local("gpt2")


def test_a_missing_local_folder_is_named_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("models/tinyy", str(tmp_path / "nope"), "runs/tiny/round-3/checkpoint"):
        with pytest.raises(ValueError, match=rf"model {name}: the folder does not exist"):
            check_model(name)
    check_model("some-org/some-model")  # a Hub id: the engines load it (safetensors only)


def test_pickle_weights_are_refused_with_a_conversion_hint(bin_only_model, tiny_model):
    check_model(str(tiny_model))  # safetensors: fine
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors only.*save_pretrained") as e:
        check_model(str(bin_only_model), "model.policy")
    assert str(bin_only_model) in str(e.value) and "model.policy" in str(e.value)


def test_vllm_engine_refuses_pickle_weights_before_starting(bin_only_model):
    from pipeline.compute.engine import make_llm
    from pipeline.config import EngineConfig

    with pytest.raises(ValueError, match="pickle"):
        make_llm(str(bin_only_model), EngineConfig(), dtype="float32", seed=0, trust_remote_code=False)


def test_vllm_itself_is_told_to_load_safetensors_only(bin_only_model, tmp_path):
    """Past dice's own check, the engine must still refuse pickle weights (vLLM's default load_format, "auto",
    loads them): a separate process, since one process holds one in-process engine."""
    code = (
        "import pipeline.data.models as m; m.check_model = lambda *a, **k: None\n"
        "from pipeline.config import EngineConfig; from pipeline.compute.engine import make_llm\n"
        f"make_llm({str(bin_only_model)!r}, EngineConfig(), dtype='float32', seed=0, trust_remote_code=False)\n"
        "print('LOADED')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})  # fmt: skip
    assert out.returncode != 0 and "LOADED" not in out.stdout
    # vLLM looked for safetensors only and found none (with load_format "auto" it would have loaded the .bin)
    assert "cannot find any model weights" in (out.stdout + out.stderr).lower()


def test_dice_run_refuses_pickle_weights_before_writing_anything(bin_only_model, tmp_path):
    cfg = tiny_config(tmp_path / "runs", bin_only_model, name="pickled")
    out = subprocess.run([DICE, "run", str(REPO / "conf/tiny.yaml"), f"runs_dir={tmp_path / 'runs'}",
                          f"model.policy={bin_only_model}", "model.build_tiny_if_missing=false", "name=pickled"],
                         cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert "pytorch_model.bin" in out.stderr and "safetensors only" in out.stderr
    assert not cfg.run_dir.exists() and not (tmp_path / "prefect").exists()  # nothing written, no flow run


def test_the_flow_refuses_them_too(bin_only_model, tmp_path):
    """A deployment runs the flow without the CLI: the same check comes first there, before the run folder."""
    from flows.dice import dice

    cfg = tiny_config(tmp_path / "runs", bin_only_model, **{"round0.mode": "skip"})
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        dice.fn(config=cfg)  # the flow's body, without a Prefect server: it must fail before needing one
    assert not cfg.run_dir.exists()


# ---------------------------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "url", ["http://user:s3cret@127.0.0.1:8000/v1", "https://:s3cret@host/v1", "http://host/v1?api_key=s3cret"]
)
def test_a_judge_url_with_credentials_is_refused_when_the_config_loads(url, tmp_path):
    override = f'label.judges=[{{backend: http, url: "{url}", model: judge}}]'
    out = subprocess.run([DICE, "run", str(REPO / "conf/tiny.yaml"), f"runs_dir={tmp_path / 'runs'}",
                          "label.labeller=judge", override],
                         cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2
    assert "api_key_env" in out.stderr and "s3cret" not in out.stdout + out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "prefect").exists()


def test_the_flow_parameter_refuses_it_too():
    """Prefect validates the flow's typed parameter before it creates a flow run: the same validator."""
    from pydantic import ValidationError

    from pipeline.config import RunConfig

    bad = {"label": {"labeller": "judge", "judges": [{"backend": "http", "url": "http://u:p@h/v1", "model": "m"}]}}
    with pytest.raises(ValidationError, match="credentials"):
        RunConfig.model_validate(bad)


# ---------------------------------------------------------------------------------------------- resume checkpoints


def test_deepspeed_resume_checkpoints_load_without_unpickling_code(tmp_path):
    """The engine's checkpoint loader accepts tensors, containers and DeepSpeed's ZeRO bookkeeping classes, and
    refuses any other global (the classic pickle payload)."""
    import torch
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from stages.train import weights_only_loading

    class Engine:  # the attribute DeepSpeedEngine.load_checkpoint reads its loader from
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    weights_only_loading(engine)
    good = tmp_path / "optim.pt"
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0),
                "state": {"exp_avg": torch.ones(3)}, "step": 7}, good)  # fmt: skip
    back = engine.checkpoint_engine.load(str(good), map_location="cpu")
    assert back["zero_stage"] == ZeroStageEnum.weights and back["step"] == 7
    torch.testing.assert_close(back["state"]["exp_avg"], torch.ones(3))

    evil = tmp_path / "evil.pt"
    torch.save({"payload": subprocess.Popen}, evil)  # a global outside the allow-list
    with pytest.raises(Exception, match="Unsupported global"):
        engine.checkpoint_engine.load(str(evil), map_location="cpu")


# ---------------------------------------------------------------------------------------------- messages


def boom(prompts, responses):
    raise KeyError("score")


def nothing(prompts, responses):
    return [float("nan")] * len(prompts)


def _responses(tmp_path: Path, cfg) -> None:
    from pipeline.data import schemas
    from pipeline.data.artifacts import write_parquet
    from pipeline.run import rounds

    rows = [{"prompt_id": f"p{i // 4}", "prompt": f"prompt {i // 4}", "sample_idx": i % 4, "response": f"answer {i}",
             "num_tokens": 3, "num_chars": 8, "finish_reason": "stop", "cumulative_logprob": -1.0, "seed": 1,
             "model": "m", "round": 1} for i in range(8)]  # fmt: skip
    write_parquet(pa.Table.from_pylist(rows, schema=schemas.RESPONSES), rounds.plan(cfg, 1, "label").inputs["responses"],
                  schemas.RESPONSES)  # fmt: skip


def test_a_python_labeller_that_raises_is_named(tmp_path, tiny_model):
    from pipeline.run import rounds
    from stages import label

    cfg = tiny_config(tmp_path / "runs", tiny_model, **{"label.labeller": "python",
                                                        "label.python_reward": "tests.test_safety:boom"})  # fmt: skip
    _responses(tmp_path, cfg)
    with pytest.raises(ValueError, match=r"label.python_reward=tests.test_safety:boom raised KeyError: 'score'"):
        label.run(cfg, rounds.plan(cfg, 1, "label"))


def test_a_labeller_that_scores_nothing_is_blamed_by_pairs(tmp_path, tiny_model):
    from pipeline.data.artifacts import execute
    from pipeline.run import rounds
    from stages import label, pairs

    cfg = tiny_config(tmp_path / "runs", tiny_model, **{"label.labeller": "python",
                                                        "label.python_reward": "tests.test_safety:nothing"})  # fmt: skip
    _responses(tmp_path, cfg)
    plan = rounds.plan(cfg, 1, "label")
    execute(plan, lambda: label.run(cfg, plan))
    with pytest.raises(ValueError) as e:
        pairs.run(cfg, rounds.plan(cfg, 1, "pairs"))
    msg = str(e.value)
    assert "the label stage scored none of the 8 responses" in msg and "8 non_finite" in msg and "labeller python" in msg
    assert "max_tokens" not in msg  # not the token limit's fault


def test_a_prompts_file_without_its_column_lists_the_columns(tmp_path):
    from pipeline.data.artifacts import ArtifactError
    from pipeline.data.datasets import read_offline, read_prompts

    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "id": [1, 2]}), path)
    with pytest.raises(ArtifactError, match=r"prompts.parquet: no column 'prompt'; the file has 'instruction', 'id'"):
        read_prompts(path)
    jsonl = tmp_path / "offline.jsonl"
    jsonl.write_text('{"prompt": "p", "chosen": "a", "reject": "b"}\n')
    with pytest.raises(ArtifactError, match="no column 'rejected'; the file has 'prompt', 'chosen', 'reject'"):
        read_offline(jsonl)


def test_stale_temporaries_of_a_rerun_stage_are_removed(tmp_path):
    from pipeline.data.artifacts import StagePlan, execute, write_parquet
    from pipeline.data.schemas import PROMPTS

    out = tmp_path / "round-1" / "labels.parquet"
    plan = StagePlan("label", 1, tmp_path / "round-1", inputs={}, outputs={"labels": out}, config={})
    out.parent.mkdir(parents=True)
    stale = [out.parent / ".labels.parquet.1a2b3c4d.tmp", out.parent / ".other.parquet.5e6f7a8b.tmp"]
    for s in stale:
        s.write_bytes(b"half a file")
    table = pa.table({"prompt_id": ["a"], "prompt": ["x"]})
    execute(plan, lambda: {"rows": write_parquet(table, out, PROMPTS)})
    assert not stale[0].exists()  # the stage's own temporary: gone
    assert stale[1].exists()  # another stage's: not this stage's to remove
    assert np.all(pq.read_table(out).column("prompt").to_pylist() == ["x"])
