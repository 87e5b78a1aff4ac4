"""Which files and models each stage of each round reads and writes: the wiring, in one place.

Round 0 (round0.mode = offline_dpo) trains π_0 from the initial policy with DPO on the offline set.
Round k ≥ 1 is a DICE round (../shared/METHODS.md §1): generate from π_{k-1}, label with
β·[logp(π_{k-1}) − logp(π_{k-2})], build pairs (+ replay), reference log-probs under π_{k-1}, train π_k
from π_{k-1}. Both the flow and `python -m stages.<name>` use these plans, so they cannot disagree.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DataSource, RunConfig, settled
from pipeline.data.artifacts import StagePlan
from pipeline.data.datasets import plan_input
from pipeline.data.models import with_revision

STAGES = ("generate", "label", "pairs", "reference", "train")
ROUND0_STAGES = ("pairs", "reference", "train")
EVAL_STAGE = "evaluate"  # last in a round, when cfg.eval.enabled

# The file each stage writes in its round folder.
OUTPUT_FILES = {
    "generate": {"responses": "responses.parquet"},
    "label": {"labels": "labels.parquet", "preferences": "preferences.parquet"},
    "pairs": {"pairs": "pairs.parquet"},
    "reference": {"reference": "reference.parquet"},
    "train": {"checkpoint": "checkpoint", "metrics": "train_metrics.parquet"},
    "evaluate": {"eval": "eval.parquet", "controls": "eval_controls.parquet"},
}


def round_dir(cfg: RunConfig, k: int) -> Path:
    return cfg.run_dir / f"round-{k}"


def stages_of_round(cfg: RunConfig, k: int) -> tuple[str, ...]:
    if k == 0:
        base = ROUND0_STAGES if cfg.round0.mode == "offline_dpo" else ()
    else:
        base = ROUND0_STAGES if cfg.offline_rounds else STAGES
    return base + (EVAL_STAGE,) if evaluates(cfg, k) else base


def evaluates(cfg: RunConfig, k: int) -> bool:
    """Whether round k ends with `evaluate`: every round ≥ 1 when eval.enabled; round 0 only when its comparison
    is not π_0 against itself: a reference-outputs file, or `previous` with π_{-1} ≠ π_0 (π_0 against the model
    round 0 started from)."""
    if not cfg.eval.enabled:
        return False
    if k >= 1 or cfg.eval.baseline not in ("initial", "previous"):
        return True
    return cfg.eval.baseline == "previous" and model_of(cfg, -1) != model_of(cfg, 0)


def eval_baseline(cfg: RunConfig, k: int) -> tuple[str, str, str]:
    """(kind, model or file, role) of round k's evaluation baseline: ("model", π_0 or π_{k-1}, "π_j") or
    ("file", the reference outputs, "reference outputs")."""
    b = cfg.eval.baseline
    if b == "initial":
        return "model", model_of(cfg, 0), "π_0"
    if b == "previous":
        return "model", model_of(cfg, k - 1), f"π_{k - 1}"
    return "file", b, "reference outputs"


def policy_name(cfg: RunConfig) -> str:
    """model.policy as the plans name it: `org/name@revision` for a Hub id with model.revision (pipeline/data/models.py)."""
    return with_revision(cfg.model.policy, cfg.model.revision)


def reference_name(cfg: RunConfig) -> str | None:
    return with_revision(cfg.model.reference, cfg.model.reference_revision) if cfg.model.reference else None


def model_of(cfg: RunConfig, j: int) -> str:
    """π_j as a path or hub id: j = -1 is the reference of π_0, j = 0 is π_0, j ≥ 1 a round's checkpoint."""
    offline_round0 = cfg.round0.mode == "offline_dpo"
    if j < -1:
        raise ValueError(f"no model π_{j}")
    if j == -1:
        return policy_name(cfg) if offline_round0 else (reference_name(cfg) or policy_name(cfg))
    if j == 0 and not offline_round0:
        return policy_name(cfg)
    return str(round_dir(cfg, j) / OUTPUT_FILES["train"]["checkpoint"])


def initial_models(cfg: RunConfig) -> dict[str, str]:
    """The models a run's config names (not the checkpoints its rounds write): config field -> folder or Hub id."""
    found = {"model.policy": policy_name(cfg)}
    if cfg.model.reference:
        found["model.reference"] = reference_name(cfg)
    if cfg.label.labeller == "reward_model" and cfg.label.reward_model:
        found["label.reward_model"] = with_revision(cfg.label.reward_model, cfg.label.reward_model_revision)
    if cfg.label.labeller == "judge":
        for i, j in enumerate(cfg.label.judges):
            if j.backend == "vllm" and j.model:
                found[f"label.judges[{i}].model"] = with_revision(j.model, j.revision)
    return found


def check_initial_models(cfg: RunConfig) -> None:
    """Refuse, before a run writes anything, a model the config names that dice must not or cannot load: a local
    folder that does not exist, or one with pickle weights (pipeline/data/models.py). The tiny preset's policy, built
    on first use, is skipped while it does not exist."""
    from pipeline.data.models import check_model

    for field, name in initial_models(cfg).items():
        if field == "model.policy" and cfg.model.build_tiny_if_missing and not Path(name).exists():
            continue
        check_model(name, field)


def training_reference(cfg: RunConfig, k: int) -> int:
    """j of the reference π_j that round k's training is regularised towards: π_{k-1} (reference.model=previous),
    or π_0 in every round ≥ 1 (reference.model=initial: online IPO, IPO-MD)."""
    if k >= 1 and cfg.reference.model == "initial":
        return 0
    return k - 1


def _source(key: str, src: DataSource) -> dict:
    """A dataset's split, subset, revision, column map and skipping of bad rows for a plan's config (its path is an
    input); nothing when all are defaults, so a plain file's stages keep the digests they had before these options
    existed."""
    form = src.plan_form()
    extra = {k: v for k, v in form.items() if k != "path"} if isinstance(form, dict) else {}
    return {key: extra} if extra else {}


def _out(cfg: RunConfig, k: int, stage: str) -> dict[str, Path]:
    return {name: round_dir(cfg, k) / f for name, f in OUTPUT_FILES[stage].items()}


def plan(cfg: RunConfig, k: int, stage: str) -> StagePlan:
    """The StagePlan of `stage` in round `k` (`dtype: auto` and the like planned as this machine runs them)."""
    cfg = settled(cfg)
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
        gen_inputs: dict[str, Path | str] = {"policy": policy, "prompts": plan_input(cfg.data.prompts)}
        gen_roles = {"policy": f"π_{k - 1}"}
        if cfg.generate.sampler == "mixture":
            # IPO-MD's regulariser is the run's initial model π_0, whatever the round (METHODS.md §3)
            gen_inputs["mixture_reference"] = model_of(cfg, 0)
            gen_roles["mixture_reference"] = "π_0"
        # How the work is spread (engines, machines) does not change the responses: not fingerprinted, so a
        # generation killed on one layout resumes its shards on another.
        generate_cfg = cfg.generate.model_dump(mode="json", exclude={"shard_deployment", "shard_runs"})
        generate_cfg["engine"].pop("data_parallel_size")
        return StagePlan(
            stage, k, rd,
            inputs=gen_inputs,
            outputs=_out(cfg, k, stage),
            config={
                "generate": generate_cfg,
                "prompts_per_round": cfg.data.prompts_per_round,
                **_source("prompts_source", cfg.data.prompts),
                "max_prompt_tokens": cfg.model.max_prompt_tokens,
                "seed": cfg.seed,
                "dtype": cfg.model.dtype,
                "trust_remote_code": cfg.model.trust_remote_code,
            },
            roles=gen_roles,
        )
    if stage == "label":
        lab = cfg.label
        label_inputs: dict[str, Path | str] = {"responses": rd / OUTPUT_FILES["generate"]["responses"]}
        label_roles: dict[str, str] = {}
        if lab.labeller == "implicit_reward":
            label_inputs.update(policy=policy, reference=reference)
            label_roles.update(policy=f"π_{k - 1}", reference=f"π_{k - 2}")
        elif lab.labeller == "reward_model":
            label_inputs["reward_model"] = with_revision(str(lab.reward_model), lab.reward_model_revision)
        else:  # judge: the judge models and templates are inputs; an http judge's secrets never are
            for jid, j in zip(lab.judge_ids(), lab.judges):
                if j.backend == "vllm":
                    label_inputs[f"judge:{jid}"] = with_revision(j.model, j.revision) if j.model else policy
                    label_roles[f"judge:{jid}"] = j.model or f"π_{k - 1}"
                if j.backend != "python":
                    label_inputs[f"template:{jid}"] = Path(j.template)
        # How the scoring is spread (processes, ZeRO-3 partitioning, judge engines) does not change the labels:
        # not fingerprinted, so a stage killed on one layout resumes its shards on another.
        label_cfg = lab.model_dump(mode="json", exclude={"num_processes", "zero_stage"})
        label_cfg["engine"].pop("data_parallel_size")
        return StagePlan(
            stage, k, rd,
            inputs=label_inputs,
            outputs=_out(cfg, k, stage),
            config={"label": label_cfg, "beta": cfg.train.beta, **scoring},
            roles=label_roles,
        )
    if stage == "pairs":
        inputs: dict[str, Path | str] = {"offline": plan_input(cfg.data.offline)}
        if k >= 1 and not cfg.offline_rounds:
            inputs["labels"] = rd / OUTPUT_FILES["label"]["labels"]
            if cfg.label.labeller == "judge":
                inputs["preferences"] = rd / OUTPUT_FILES["label"]["preferences"]
        return StagePlan(
            stage, k, rd, inputs=inputs, outputs=_out(cfg, k, stage),
            config={
                "pairs": cfg.pairs.model_dump(mode="json"),
                "labeller": cfg.label.labeller,
                "min_annotators": cfg.label.min_annotators,
                "round0": cfg.round0.model_dump(mode="json"),
                "offline_rounds": cfg.offline_rounds,
                "offline_per_round": cfg.data.offline_per_round,
                **_source("offline_source", cfg.data.offline),
                "seed": cfg.seed,
            },
        )
    if stage == "reference":
        ref_j = training_reference(cfg, k)
        return StagePlan(
            stage, k, rd,
            inputs={"pairs": rd / OUTPUT_FILES["pairs"]["pairs"], "reference": model_of(cfg, ref_j)},
            outputs=_out(cfg, k, stage),
            config={"batch_size": cfg.reference.batch_size, "shard_size": cfg.reference.shard_size, **scoring},
            roles={"reference": f"π_{ref_j}"},
        )
    if stage == EVAL_STAGE:
        return _eval_plan(cfg, k, rd, model_of(cfg, k), f"π_{k}", eval_baseline(cfg, k), model_of(cfg, 0), "π_0")
    # train
    return StagePlan(
        stage, k, rd,
        inputs={"reference": rd / OUTPUT_FILES["reference"]["reference"], "init": policy},
        outputs=_out(cfg, k, stage),
        config={"train": cfg.train.model_dump(mode="json"), "seed": cfg.seed, **scoring},
        roles={"init": f"π_{k - 1}", "output": f"π_{k}"},
    )


def _eval_plan(cfg: RunConfig, k: int, rd: Path, policy: str, policy_role: str, baseline: tuple[str, str, str],
               default_judge: str, default_judge_role: str) -> StagePlan:  # fmt: skip
    """The evaluate stage's plan: every model and file its result depends on is an input (so changing the judges, the
    baseline or the prompts re-runs it), and every setting that changes the result is config; the stopping rule
    (stop_after_no_gain, min_gain) is the flow's, not the stage's, and does not re-run it."""
    ev = cfg.eval
    kind, base, base_role = baseline
    inputs: dict[str, Path | str] = {
        "policy": policy,
        "prompts": plan_input(ev.prompts),
        # the overlap check refuses held-out prompts that the run trains on
        "train_prompts": plan_input(cfg.data.prompts),
        "offline": plan_input(cfg.data.offline),
    }
    roles = {"policy": policy_role}
    if kind == "model":
        inputs["baseline"] = base
        roles["baseline"] = base_role
    else:
        inputs["baseline_outputs"] = Path(base)
        roles["baseline_outputs"] = base_role
    for jid, j in zip(ev.annotator_ids(), ev.judges):
        if j.backend == "vllm":  # an empty model: π_0, so every round is judged by the same judge
            inputs[f"judge:{jid}"] = j.model or default_judge
            roles[f"judge:{jid}"] = j.model or default_judge_role
        if j.backend != "python":
            inputs[f"template:{jid}"] = Path(j.template)
    if ev.reward_model:
        inputs["reward_model"] = ev.reward_model
    eval_cfg = ev.model_dump(mode="json", exclude={"enabled", "stop_after_no_gain", "min_gain", "allow_self_judge"})
    eval_cfg["prompts"] = ev.prompts.plan_form()  # a plain path, as it always was, unless more is set
    return StagePlan(
        EVAL_STAGE, k, rd,
        inputs=inputs,
        outputs={name: rd / f for name, f in OUTPUT_FILES[EVAL_STAGE].items()},
        config={
            "eval": eval_cfg,
            "seed": cfg.seed,
            "stop": cfg.generate.stop,
            "stop_token_ids": cfg.generate.stop_token_ids,
            "max_prompt_tokens": cfg.model.max_prompt_tokens,
            "max_model_len": cfg.generate.engine.max_model_len,
            "dtype": cfg.model.dtype,
            "trust_remote_code": cfg.model.trust_remote_code,
        },
        roles=roles,
    )


def standalone_eval_plan(cfg: RunConfig, model: str, baseline: str, out: Path) -> StagePlan:
    """`dice eval --model A --baseline B --out DIR`: A against B (a model, or a reference-outputs file) with the
    config's eval settings, written to DIR/eval.parquet with its manifest in DIR/.dice (round −1: no run)."""
    cfg = settled(cfg)
    is_file = Path(baseline).is_file()
    base = ("file", baseline, "reference outputs") if is_file else ("model", baseline, "baseline")
    judge = model if is_file else baseline
    return _eval_plan(cfg, -1, Path(out), model, "model", base, judge, "model" if is_file else "baseline")


def gpus_used(cfg: RunConfig, stage: str) -> int:
    """GPUs a stage occupies on this node while it runs (0 for CPU-only stages): what it holds of the `gpu_slots`
    limit, one slot per GPU: processes × GPUs per process (with `train.hostfile`, the processes of this node)."""
    from pipeline.compute.launch import processes_here

    if stage == "generate":  # each engine: tensor_parallel_size GPUs for vLLM, one for the mixture's two models
        g = cfg.generate
        return (1 if g.sampler == "mixture" else g.engine.tensor_parallel_size) * g.engine.resolved_data_parallel_size()
    if stage == "label":
        lab = cfg.label
        if lab.labeller in ("implicit_reward", "reward_model"):
            return processes_here(lab.num_processes, cfg.train.hostfile)
        if lab.labeller == "judge" and any(j.backend == "vllm" for j in lab.judges):
            return lab.engine.tensor_parallel_size * lab.engine.resolved_data_parallel_size()
        return 0
    if stage == "reference":
        return processes_here(cfg.reference.num_processes, cfg.train.hostfile)
    if stage == "train":
        return processes_here(cfg.train.num_processes, cfg.train.hostfile)
    if stage == EVAL_STAGE:  # generation on one engine; local judges and a reward model take one GPU after it
        return cfg.generate.engine.tensor_parallel_size
    return 0


def latest_complete_round(cfg: RunConfig) -> int:
    """The highest round whose manifest exists (-1 when none has finished)."""
    from pipeline.run.report import round_dirs

    return max((k for k, d in round_dirs(cfg.run_dir) if (d / "manifest.json").is_file()), default=-1)
