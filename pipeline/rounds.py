"""Which files and models each stage of each round reads and writes: the wiring, in one place.

Round 0 (round0.mode = offline_dpo) trains π_0 from the initial policy with DPO on the offline set.
Round k ≥ 1 is a DICE round (../shared/METHODS.md §1): generate from π_{k-1}, label with
β·[logp(π_{k-1}) − logp(π_{k-2})], build pairs (+ replay), reference log-probs under π_{k-1}, train π_k
from π_{k-1}. Both the flow and `python -m stages.<name>` use these plans, so they cannot disagree.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import StagePlan
from pipeline.config import RunConfig

STAGES = ("generate", "label", "pairs", "reference", "train")
ROUND0_STAGES = ("pairs", "reference", "train")

# The file each stage writes in its round folder.
OUTPUT_FILES = {
    "generate": {"responses": "responses.parquet"},
    "label": {"labels": "labels.parquet"},
    "pairs": {"pairs": "pairs.parquet"},
    "reference": {"reference": "reference.parquet"},
    "train": {"checkpoint": "checkpoint", "metrics": "train_metrics.parquet"},
}


def round_dir(cfg: RunConfig, k: int) -> Path:
    return cfg.run_dir / f"round-{k}"


def stages_of_round(cfg: RunConfig, k: int) -> tuple[str, ...]:
    if k == 0:
        return ROUND0_STAGES if cfg.round0.mode == "offline_dpo" else ()
    return STAGES


def model_of(cfg: RunConfig, j: int) -> str:
    """π_j as a path or hub id: j = -1 is the reference of π_0, j = 0 is π_0, j ≥ 1 a round's checkpoint."""
    offline_round0 = cfg.round0.mode == "offline_dpo"
    if j < -1:
        raise ValueError(f"no model π_{j}")
    if j == -1:
        return cfg.model.policy if offline_round0 else (cfg.model.reference or cfg.model.policy)
    if j == 0 and not offline_round0:
        return cfg.model.policy
    return str(round_dir(cfg, j) / OUTPUT_FILES["train"]["checkpoint"])


def _out(cfg: RunConfig, k: int, stage: str) -> dict[str, Path]:
    return {name: round_dir(cfg, k) / f for name, f in OUTPUT_FILES[stage].items()}


def plan(cfg: RunConfig, k: int, stage: str) -> StagePlan:
    """The StagePlan of `stage` in round `k`."""
    if stage not in stages_of_round(cfg, k):
        raise ValueError(f"round {k} has no stage {stage!r} (stages: {', '.join(stages_of_round(cfg, k)) or 'none'})")
    rd = round_dir(cfg, k)
    scoring = {
        "dtype": cfg.model.dtype,
        "max_length": cfg.model.max_length,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    policy, reference = model_of(cfg, k - 1), model_of(cfg, k - 2) if k >= 1 else ""
    if stage == "generate":
        return StagePlan(
            stage, k, rd,
            inputs={"policy": policy, "prompts": Path(cfg.data.prompts)},
            outputs=_out(cfg, k, stage),
            config={
                "generate": cfg.generate.model_dump(mode="json"),
                "prompts_per_round": cfg.data.prompts_per_round,
                "max_prompt_tokens": cfg.model.max_prompt_tokens,
                "seed": cfg.seed,
                "dtype": cfg.model.dtype,
                "trust_remote_code": cfg.model.trust_remote_code,
            },
            roles={"policy": f"π_{k - 1}"},
        )
    if stage == "label":
        return StagePlan(
            stage, k, rd,
            inputs={
                "responses": rd / OUTPUT_FILES["generate"]["responses"],
                "policy": policy,
                "reference": reference,
            },
            outputs=_out(cfg, k, stage),
            config={"label": cfg.label.model_dump(mode="json"), "beta": cfg.train.beta, **scoring},
            roles={"policy": f"π_{k - 1}", "reference": f"π_{k - 2}"},
        )
    if stage == "pairs":
        inputs: dict[str, Path | str] = {"offline": Path(cfg.data.offline)}
        if k >= 1:
            inputs["labels"] = rd / OUTPUT_FILES["label"]["labels"]
        return StagePlan(
            stage, k, rd, inputs=inputs, outputs=_out(cfg, k, stage),
            config={
                "pairs": cfg.pairs.model_dump(mode="json"),
                "round0": cfg.round0.model_dump(mode="json"),
                "seed": cfg.seed,
            },
        )
    if stage == "reference":
        return StagePlan(
            stage, k, rd,
            inputs={"pairs": rd / OUTPUT_FILES["pairs"]["pairs"], "reference": policy},
            outputs=_out(cfg, k, stage),
            config={"batch_size": cfg.reference.batch_size, **scoring},
            roles={"reference": f"π_{k - 1}"},
        )
    # train
    return StagePlan(
        stage, k, rd,
        inputs={"reference": rd / OUTPUT_FILES["reference"]["reference"], "init": policy},
        outputs=_out(cfg, k, stage),
        config={"train": cfg.train.model_dump(mode="json"), "seed": cfg.seed, **scoring},
        roles={"init": f"π_{k - 1}", "output": f"π_{k}"},
    )


def gpus_used(cfg: RunConfig, stage: str) -> int:
    """GPUs a stage occupies while it runs (0 for CPU-only stages): what it holds of the `gpu_slots` limit."""
    return {
        "generate": cfg.generate.engine.tensor_parallel_size,
        "label": 1 if cfg.label.labeller == "implicit_reward" else 0,
        "reference": 1,
        "train": cfg.train.num_processes,
    }.get(stage, 0)


def latest_complete_round(cfg: RunConfig) -> int:
    """The highest round whose manifest exists (-1 when none has finished)."""
    from pipeline.report import round_dirs

    return max((k for k, d in round_dirs(cfg.run_dir) if (d / "manifest.json").is_file()), default=-1)
