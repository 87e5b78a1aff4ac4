"""Typed configuration of a dice run, loaded from `conf/*.yaml` with `key=value` overrides.

One pydantic model per stage plus `RunConfig` for the run. `RunConfig()` with no arguments is the
embedded default: the tiny offline preset (`conf/tiny.yaml` states the same values explicitly).
Every field carries a one-line description: it shows in `dice --help`, in error messages and in the
Prefect UI's parameter form.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and the field."""


class LossType(str, Enum):
    """Preference losses (docs/methods.md), implemented in pipeline/method/losses.py. DICE trains `dpo`."""

    DPO = "dpo"  # sigmoid DPO; conservative DPO with label_smoothing > 0 (§1, §5)
    IPO = "ipo"  # offline IPO on per-token-averaged log-probs (§5)
    IPO_SOFT = "ipo_soft"  # IPO with a soft preference p: online IPO / IPO-MD (§3)
    SLIC = "slic"  # SLiC hinge (§5)
    IREPO = "irepo"  # regression of β·h onto logit(p̂) (§2)
    SR_DPO = "sr_dpo"  # DPO with the self-refinement term Δ (§4)
    SR_IPO = "sr_ipo"  # IPO with the self-refinement term Δ (§4)


class _Section(BaseModel):
    # Unknown keys are errors: a typo in YAML must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    policy: str = Field(
        "models/tiny",
        description="Initial policy: a local Hugging Face folder or hub id. With round0.mode=offline_dpo it is "
        "the SFT model that round 0 trains into π_0; with mode=skip it is π_0 itself (already DPO-trained).",
    )
    reference: str | None = Field(
        None,
        description="π_-1, the reference π_0 was trained against (mode=skip only). Empty: the policy itself.",
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) of a Hub `policy`; the commit it resolves to is fingerprinted."
    )
    reference_revision: str | None = Field(None, description="Hub revision of a Hub `reference`.")
    build_tiny_if_missing: bool = Field(
        True, description="Build the offline tiny model at `policy` when that folder does not exist (tiny preset)."
    )
    tiny_data: list[str] | None = Field(
        None, description="JSONL files the tiny model's tokenizer and supervised pass use (empty: data.prompts and data.offline)."
    )
    tiny_sft_steps: int = Field(300, ge=0, description="Supervised steps when building the tiny model.")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own Python code.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype for scoring and generation; auto: bfloat16 on GPU, float32 on CPU."
    )
    max_prompt_tokens: int = Field(256, gt=0, description="Prompts longer than this (after the chat template) are dropped and counted.")
    max_length: int = Field(
        512, gt=0, description="Maximum prompt+response tokens for scoring and training; longer pairs are dropped and counted."
    )


DATA_FIELDS = ("prompt", "prompt_id", "chosen", "rejected", "pair_id")  # what `columns` may map a dataset's columns to


class DataSource(_Section):
    """Where a dataset comes from: a file, a folder, or a Hub dataset id, with the split, subset and columns to read.

    A plain string in YAML is the `path` alone (`prompts: data/prompts.jsonl`)."""

    path: str = Field(
        min_length=1,
        description="A JSONL, JSON (a list of objects), CSV or Parquet file; a folder of data files in the Hugging Face "
        "Hub layout; a folder written by datasets' save_to_disk; or a Hub dataset id (e.g. "
        "HuggingFaceH4/ultrafeedback_binarized).",
    )
    split: str | None = Field(None, description="Split to read (e.g. train_prefs); empty: the only split there is.")
    name: str | None = Field(None, description="Subset (configuration) of a Hub-layout dataset; empty: its default.")
    revision: str | None = Field(
        None, description="Hub dataset revision (branch, tag or commit); empty: main. Hub ids only (a local path is refused)."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="dice field -> the dataset's column, e.g. {prompt: instruction} (fields: prompt, prompt_id, "
        "chosen, rejected, pair_id).",
    )
    on_bad_row: Literal["error", "skip"] | None = Field(
        None,
        description="A row dice cannot use (bad JSON, an empty prompt, chosen equal to rejected, ...): error stops "
        "with the file and row; skip leaves it out and counts it by reason. Empty: data.on_bad_row.",
    )
    # data.on_bad_row, set by RunConfig for its sources (a source on its own: error)
    _inherited_on_bad_row: Literal["error", "skip"] = PrivateAttr("error")

    @property
    def bad_rows(self) -> Literal["error", "skip"]:
        """The policy in force for bad rows: this source's on_bad_row, else data.on_bad_row."""
        return self.on_bad_row or self._inherited_on_bad_row

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("columns")
    @classmethod
    def _check_columns(cls, columns: dict[str, str]) -> dict[str, str]:
        unknown = [k for k in columns if k not in DATA_FIELDS]
        if unknown:
            raise ValueError(
                f"columns: {', '.join(map(repr, unknown))} {'is not a dice field' if len(unknown) == 1 else 'are not dice fields'} "
                f"({', '.join(DATA_FIELDS)}); the map reads {{dice field: your column}}, e.g. {{prompt: instruction}}"
            )
        twice = sorted({c for c in columns.values() if list(columns.values()).count(c) > 1})
        if twice:
            raise ValueError(f"columns: column {twice[0]!r} is mapped to more than one field; map each column once")
        return columns

    def plan_form(self) -> str | dict[str, Any]:
        """How a stage's config records this source: the path alone when nothing else is set (a plain file keeps the
        digests it has always had), else the path with the settings that differ from their defaults."""
        extra = self.model_dump(mode="json", exclude={"path", "on_bad_row"}, exclude_defaults=True)
        if self.bad_rows == "skip":  # skipping rows changes what is read; error (the default) changes nothing
            extra["on_bad_row"] = "skip"
        return {"path": self.path, **extra} if extra else self.path

    def __str__(self) -> str:
        extra = [f"{k}={v}" for k, v in (("split", self.split), ("name", self.name), ("revision", self.revision)) if v]
        return self.path + (f" ({', '.join(extra)})" if extra else "")


class DataConfig(_Section):
    prompts: DataSource = Field(
        default_factory=lambda: DataSource(path="data/prompts.jsonl"),
        description="Prompts: `prompt` (text, or a conversation of {role, content} messages ending with a user "
        "turn) and optional `prompt_id`. A path, or {path, split, name, revision, columns, on_bad_row}.",
    )
    offline: DataSource = Field(
        default_factory=lambda: DataSource(path="data/offline_prefs.jsonl"),
        description="Offline preference set for round 0 and replay: prompt, chosen, rejected as text or TRL's "
        "conversational format (chosen/rejected may repeat the prompt turns, as UltraFeedback binarized does; "
        "without a prompt, their shared beginning is the prompt, as TRL's extract_prompt takes it).",
    )
    prompts_per_round: int = Field(
        32, gt=0, description="Prompts used per round; rounds take consecutive disjoint slices of the prompt file."
    )
    offline_per_round: int | None = Field(
        None, gt=0, description="With offline_rounds: offline pairs sampled for each round ≥ 1 (empty: all of them)."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="Rows dice cannot use in data.prompts, data.offline and eval.prompts (unless a source sets its "
        "own on_bad_row): error stops before round 0 naming the file, row and field; skip leaves them out and "
        "counts them by reason (in the stage manifests and dice data check).",
    )


class Round0Config(_Section):
    mode: Literal["offline_dpo", "skip"] = Field(
        "offline_dpo",
        description="offline_dpo: train π_0 from the policy with DPO on the offline set (reference = policy); "
        "skip: model.policy already is π_0 and model.reference is π_-1.",
    )
    max_pairs: int | None = Field(None, gt=0, description="Cap on offline pairs used in round 0 (empty: all).")


class EngineConfig(_Section):
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per vLLM engine (tensor parallelism).")
    data_parallel_size: int = Field(
        0,
        ge=0,
        description="vLLM engines run at once, each its own process on tensor_parallel_size GPUs "
        "(CUDA_VISIBLE_DEVICES), sharing out the prompt shards; 0: as many as the visible GPUs allow.",
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="GPU: the share of each GPU's memory the engine takes (weights, activations, "
        "KV cache); `dice plan` shows what it leaves for the KV cache."
    )
    kv_cache_memory_bytes: int | None = Field(
        None, gt=0, description="KV-cache size in bytes; empty: 256 MiB on CPU (vLLM's CPU memory check needs a fixed "
        "size), the gpu_memory_utilization share on GPU."
    )
    enforce_eager: bool = Field(True, description="Skip CUDA graphs / torch.compile (faster start, slower decode).")
    enable_prefix_caching: bool = Field(True, description="Reuse the prompt's KV cache across the K samples.")
    in_process: bool = Field(True, description="Run the vLLM engine in the stage process (2-5 s start instead of 13-28 s).")
    max_model_len: int | None = Field(None, gt=0, description="Context length of the engine (empty: the model's).")

    def resolved_data_parallel_size(self) -> int:
        """Engines to run: `data_parallel_size`, or (0) the visible GPUs // tensor_parallel_size, at least 1."""
        if self.data_parallel_size:
            return self.data_parallel_size
        import torch

        return max(torch.cuda.device_count() // self.tensor_parallel_size, 1)


class GenerateConfig(_Section):
    num_samples: int = Field(4, ge=2, description="K: responses sampled per prompt (paper: 16).")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature (paper: 0.7-0.9).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (paper: 0.9-1.0).")
    max_tokens: int = Field(160, gt=0, description="Response token limit; responses cut here are dropped by pairs (paper: 2048).")
    stop: list[str] = Field(
        default_factory=list, description="Stop strings: a response ends before the first one (finish_reason stop)."
    )
    stop_token_ids: list[int] = Field(
        default_factory=list, description="Token ids that end a response, besides the tokenizer's EOS (e.g. <|eot_id|>)."
    )
    sampler: Literal["vllm", "mixture"] = Field(
        "vllm",
        description="vllm: sample π_{k-1} with vLLM; mixture: IPO-MD's geometric mixture π_{k-1}^(1-β_m)·π_0^(β_m), "
        "token by token with transformers (pipeline/method/mixture.py).",
    )
    mixture_beta: float = Field(
        0.0, ge=0, le=1, description="β_m of sampler=mixture: weight of the reference π_0's logits (0: the policy)."
    )
    mixture_batch_size: int = Field(32, gt=0, description="Sequences decoded together by the mixture sampler.")
    shard_size: int = Field(
        256,
        gt=0,
        description="Prompts per shard: each shard's responses are written as it completes, so a killed "
        "generation resumes at the shards not yet written; also the unit handed to engines and machines.",
    )
    shard_deployment: str | None = Field(
        None,
        description="Prefect deployment (e.g. dice-generate-shards/generate-shards) that the flow hands prompt "
        "shards to, so workers on several machines generate them; empty: one generate task on this machine.",
    )
    shard_runs: int = Field(
        2, ge=1, description="Flow runs of shard_deployment per round (e.g. one per machine); each takes every N-th shard."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine settings.")


_SECRET_QUERY = ("key", "token", "secret", "password", "passwd", "auth", "signature", "sig")


def _check_url(url: str) -> None:
    """An http(s) URL without secrets in it: a URL is stored in the run's config.yaml and in Prefect's database.

    The message never repeats the URL (it may hold the secret)."""
    import urllib.parse

    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("url must be an http(s) URL such as http://127.0.0.1:8000/v1")
    if parsed.username is not None or parsed.password is not None:
        raise ValueError(
            "url must not carry credentials (user:password@host): they would be saved in the run's config.yaml and "
            "Prefect's database; put the key in an environment variable and name it in api_key_env"
        )
    names = [k.lower() for k, _ in urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)]
    if any(s in n for n in names for s in _SECRET_QUERY):
        raise ValueError(
            "url must not carry a key or token in its query string: it would be saved in the run's config.yaml "
            "and Prefect's database; put the key in an environment variable and name it in api_key_env"
        )


class JudgeConfig(_Section):
    """One AI annotator (docs/methods.md, Labellers): a backend, a pairwise template, and how to reach it."""

    id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._:-]+$", description="Annotator id in preferences.parquet (empty: judge-<index>)."
    )
    backend: Literal["vllm", "http", "python"] = Field(
        "vllm",
        description="vllm: a local model on the vLLM engine; http: an OpenAI-compatible server; python: a "
        "callable 'module:function'(prompt, response_a, response_b, **options) -> P(a ≻ b).",
    )
    model: str | None = Field(
        None, description="vllm: the judge model (folder or hub id; empty: π_{k-1}); http: the server's model name."
    )
    revision: str | None = Field(None, description="vllm: Hub revision of a Hub judge model.")
    template: str = Field(
        "conf/judges/pairwise.txt",
        description="Pairwise prompt template with {instruction}, {response_a} and {response_b} (vllm, http).",
    )
    format: Literal["chat", "completion"] = Field(
        "chat",
        description="chat: the filled template is one user message under the judge's chat template (http: "
        "/v1/chat/completions); completion: the filled template is the raw prompt (http: /v1/completions).",
    )
    answer_tokens: tuple[str, str] = Field(
        ("A", "B"), description="The answer tokens meaning 'response A is better' and 'response B is better'."
    )
    top_logprobs: int = Field(
        20, ge=2, le=20, description="Top log-probs read from the first answer token (an answer token outside them fails)."
    )
    seed: int = Field(0, description="Request seed (vllm, http); annotators may differ only by seed or template.")
    url: str | None = Field(None, description="http: the server's base URL, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="http: NAME of the environment variable holding the API key (never the key itself).",
    )
    concurrency: int = Field(8, ge=1, description="http: requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="http: seconds before a request times out (then retried).")
    max_retries: int = Field(3, ge=0, description="http: retries of a timed-out or 408/429/5xx request.")
    backoff_s: float = Field(0.5, ge=0, description="http: first retry delay in seconds, doubled on each retry.")
    function: str | None = Field(
        None, description="python: 'module:function' returning P(response_a ≻ response_b); runs your code."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="python: keyword arguments passed to the function (e.g. noise, seed)."
    )

    @model_validator(mode="after")
    def _check_backend(self) -> JudgeConfig:
        if self.backend == "http" and not (self.url and self.model):
            raise ValueError("an http judge needs `url` and `model`")
        if self.url is not None:
            _check_url(self.url)
        if self.backend == "python" and not self.function:
            raise ValueError("a python judge needs `function` ('module:function')")
        if self.answer_tokens[0] == self.answer_tokens[1]:
            raise ValueError(f"answer_tokens must differ (got {list(self.answer_tokens)})")
        return self


class LabelConfig(_Section):
    labeller: Literal["implicit_reward", "python", "judge", "reward_model"] = Field(
        "implicit_reward",
        description="implicit_reward: β·[logp(π_{k-1}) − logp(π_{k-2})] (DICE); python: the function in python_reward; "
        "judge: AI annotators in `judges` compare every pair (iREPO, online IPO); reward_model: `reward_model` scores.",
    )
    python_reward: str | None = Field(
        None,
        description="'module:function' taking (prompts: list[str], responses: list[str]) and returning list[float]; "
        "used when labeller=python. It runs your code: name only modules you trust.",
    )
    batch_size: int = Field(16, gt=0, description="Sequences per forward pass when scoring.")
    num_processes: int = Field(
        0,
        ge=0,
        description="implicit_reward and reward_model: scoring processes, DeepSpeed ranks each taking every N-th "
        "shard (one per GPU; train.hostfile for several nodes, N per node); 0: every visible GPU, 1 on CPU.",
    )
    zero_stage: Literal[0, 3] = Field(
        0,
        description="3: ZeRO-3 partitioned inference, each model's weights sharded across the processes (a model "
        "larger than one GPU); 0: every process holds the whole model.",
    )
    shard_size: int = Field(
        64,
        gt=0,
        description="Prompts per shard (a prompt's K responses are never split): each shard is written as it "
        "is scored, so a killed stage resumes at the shards not yet written; also the unit handed to processes.",
    )
    judges: list[JudgeConfig] = Field(
        default_factory=list, description="labeller=judge: the N annotators; p̂ is the mean of their probabilities."
    )
    ranking: Literal["bradley_terry", "copeland"] = Field(
        "bradley_terry",
        description="labeller=judge: per-response score from the pairwise p̂ (the `reward` column): Bradley-Terry "
        "(Zermelo) maximum likelihood on soft outcomes, or Copeland (wins − losses at p̂ ≠ ½).",
    )
    ranking_prior: float = Field(
        0.01, gt=0, description="bradley_terry: L2 weight on the scores, so all-win/all-loss responses stay finite."
    )
    reward_model: str | None = Field(
        None, description="labeller=reward_model: a sequence-classification model (one output) with its own tokenizer."
    )
    reward_model_revision: str | None = Field(None, description="Hub revision of a Hub reward_model.")
    reward_model_format: str | None = Field(
        None,
        description="Fallback text '…{prompt}…{response}…' for a reward model whose tokenizer has no chat template.",
    )
    trust_remote_code: bool = Field(False, description="Allow judge and reward models to run their own Python code.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine settings of local judges.")
    min_annotators: int = Field(
        1, ge=1, description="labeller=judge: a comparison counts (ranking, pairs) only with this many annotators' p."
    )

    def judge_ids(self) -> list[str]:
        """The annotators' ids: `id`, or judge-<index>."""
        return [j.id or f"judge-{i}" for i, j in enumerate(self.judges)]


class PairsConfig(_Section):
    strategy: Literal["best_worst", "all_pairs", "random"] = Field(
        "best_worst",
        description="best_worst: one pair per prompt, max vs min score (DICE); all_pairs: every compared pair "
        "(soft-label losses); random: random_pairs_per_prompt disjoint random pairs (online IPO).",
    )
    random_pairs_per_prompt: int = Field(1, ge=1, description="strategy=random: disjoint pairs drawn per prompt.")
    preference_from_rewards: Literal["auto", "hard", "sigmoid"] = Field(
        "auto",
        description="Soft label of scalar-reward pairs: hard (1.0), sigmoid σ(r_chosen − r_rejected); auto: sigmoid "
        "for reward_model, hard otherwise. Judges always use their p̂.",
    )
    min_annotators: int = Field(1, ge=1, description="Judges: drop comparisons fewer annotators answered without failure.")
    min_preference_margin: float = Field(
        0.0, ge=0, lt=0.5, description="Judges: drop pairs whose |p̂ − ½| is not above this (0: drop exact ties)."
    )
    min_valid: int = Field(2, ge=2, description="Keep a prompt only if at least this many of its responses are valid (paper: 8 of 16).")
    min_chars: int = Field(
        1, ge=0, le=1000, description="Responses with fewer non-whitespace characters are degenerate and dropped "
        "(reference code: 4 characters, counted with whitespace)."
    )
    max_chars: int | None = Field(
        None, gt=0, description="Responses longer than this many characters are dropped (reference code: 6699); empty: no limit."
    )
    length_unit: Literal["tokens", "chars"] = Field(
        "tokens", description="Unit of len(y) in the length-regularised score r − α·len(y) (reference code: chars)."
    )
    debias_length: bool = Field(
        True, description="Search α so that the mean chosen−rejected length gap is ≈ 0 (best_worst on scalar rewards)."
    )
    alpha_search: Literal["exact", "grid"] = Field(
        "exact",
        description="exact: apply the reference's rule (scan α up from 0, keep the smallest |gap|, stop when it grows) "
        "to the exact gap(α) curve, whatever the rewards' scale; grid: the reference's grid α = 0, step, 2·step, … "
        "on rewards in its units (implicit rewards without β; lengths in length_unit, chars in the reference).",
    )
    alpha_step: float = Field(0.001, gt=0, description="alpha_search=grid: step of the α grid (reference code: 0.001).")
    alpha_max_steps: int = Field(1000, ge=0, description="alpha_search=grid: number of grid steps (reference code: 1000).")
    min_margin: float = Field(
        0.0,
        ge=0,
        description="Drop pairs whose score margin s(chosen) − s(rejected) is not above this (s: r − α·len, or the "
        "judges' ranking score).",
    )
    replay_ratio: float = Field(0.5, ge=0, lt=1, description="γ: share of offline pairs mixed into each round (paper best: 0.5).")


class ReferenceConfig(_Section):
    batch_size: int = Field(16, gt=0, description="Sequences per forward pass.")
    num_processes: int = Field(
        0,
        ge=0,
        description="Scoring processes, DeepSpeed ranks each taking every N-th shard (one per GPU; train.hostfile "
        "for several nodes, N per node); 0: every visible GPU, 1 on CPU.",
    )
    zero_stage: Literal[0, 3] = Field(
        0,
        description="3: ZeRO-3 partitioned inference, the reference's weights sharded across the processes (a model "
        "larger than one GPU); 0: every process holds the whole model.",
    )
    shard_size: int = Field(
        128,
        gt=0,
        description="Prompts per shard (a prompt's pairs are never split): each shard is written as it is scored, "
        "so a killed stage resumes at the shards not yet written; also the unit handed to processes.",
    )
    packing: bool = Field(
        True,
        description="Score padding-free rows with each prompt once (exact), here and for the label stage's implicit "
        "reward; off, or a model packing cannot handle: padded batches.",
    )
    model: Literal["previous", "initial"] = Field(
        "previous",
        description="The reference of round k's training: previous = π_{k-1}, the model training starts from (DICE, "
        "iterative DPO); initial = π_0 in every round (online IPO, IPO-MD: the reference stays the regulariser).",
    )


class TrainConfig(_Section):
    loss: LossType = Field(LossType.DPO, description="Preference loss.")
    beta: float = Field(0.1, gt=0, description="β of DPO, SLiC, iREPO and Sr-DPO; also scales the DICE implicit reward.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative-DPO label smoothing ε (loss=dpo only).")
    tau: float = Field(0.1, gt=0, description="τ of the IPO losses (ipo, ipo_soft, sr_ipo): the target margin is 1/(2τ).")
    sr_lambda: float = Field(0.5, ge=0, description="λ, the weight of the self-refinement term Δ in sr_dpo and sr_ipo.")
    preference_smoothing: Literal["clip", "laplace"] = Field(
        "clip", description="How irepo keeps p̂ off 0 and 1: clip to [ε, 1−ε], or laplace (k+½)/(N+1)."
    )
    preference_clip: float = Field(0.01, gt=0, lt=0.5, description="ε of preference_smoothing=clip.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (paper: 5e-7 at 8B; the tiny default is larger).")
    lr_schedule: Literal["constant_with_warmup", "cosine"] = Field("constant_with_warmup", description="Learning-rate schedule.")
    warmup_steps: int = Field(2, ge=0, description="Linear warm-up optimizer steps (paper: 50).")
    epochs: int = Field(1, ge=1, description="Passes over the round's pairs.")
    micro_batch_size: int = Field(2, ge=1, description="Pairs per process per forward pass.")
    global_batch_size: int = Field(8, ge=1, description="Pairs per optimizer step over all processes (paper: 32).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    num_processes: int = Field(1, ge=1, description="Training processes (GPUs; on CPU, gloo processes).")
    zero_stage: Literal[0, 1, 2, 3, "auto"] = Field(
        "auto",
        description="DeepSpeed ZeRO stage; auto: on GPUs, the smallest stage whose memory plan fits them "
        "(pipeline/compute/memory.py; `dice plan` shows it); on CPU, 3 with several processes; offloaded parameters "
        "need 3, an offloaded optimizer 2 or 3.",
    )

    def resolved_zero_stage(self, world: int) -> int:
        """The ZeRO stage in force for `world` processes when no memory plan decides (CPU): the stage given, or for
        auto 3 with several processes or offloaded parameters, 2 with an offloaded optimizer, else 0. On GPUs
        `pipeline.compute.memory.choose_zero_stage` decides auto by the memory plan."""
        if self.zero_stage != "auto":
            return self.zero_stage
        if world > 1 or self.offload_params:
            return 3
        return 2 if self.offload_optimizer else 0
    bf16: bool | None = Field(None, description="bfloat16 training; empty: on when a GPU is present.")
    deepspeed_config: str | None = Field(
        None, description="Optional DeepSpeed JSON whose settings override the ones dice derives from this section."
    )
    logp_reduction: Literal["sum", "mean"] | None = Field(
        None,
        description="Sum or per-token mean of response log-probs (policy and reference alike); empty: the loss's "
        "own convention, mean for offline ipo (as TRL, confirmed with the IPO authors), sum for the others.",
    )
    offload_optimizer: bool = Field(False, description="ZeRO: keep optimizer states in CPU memory (ZeRO-Offload).")
    offload_params: bool = Field(False, description="ZeRO-3: keep parameters in CPU memory between uses.")
    hostfile: str | None = Field(
        None,
        description="DeepSpeed hostfile for several nodes, used by train, label and reference; their num_processes "
        "is then the GPUs used per node.",
    )
    checkpoint_every: int = Field(
        0, ge=0, description="Save a DeepSpeed checkpoint every N optimizer steps so a killed training resumes (0: off)."
    )
    packing: bool = Field(
        True,
        description="Padding-free micro-batches: one row per micro-batch, each pair's prompt once with chosen and "
        "rejected after it (exact); models packing cannot handle train padded (docs: The stages in detail, Training).",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in the backward pass instead of keeping them "
        "(non-reentrant torch checkpointing): the same losses and gradients, ~1/3 more compute, activations of one "
        "layer instead of all; `dice plan` shows the difference.",
    )

    @property
    def reduction(self) -> Literal["sum", "mean"]:
        """The log-prob reduction in force: `logp_reduction`, or the loss's convention when it is empty."""
        if self.logp_reduction is not None:
            return self.logp_reduction
        return "mean" if self.loss == LossType.IPO else "sum"


class EvalConfig(_Section):
    """Per-round evaluation (docs/methods.md, Evaluation metrics; stages/evaluate.py): π_k against a baseline on held-out prompts."""

    enabled: bool = Field(True, description="Run the evaluate stage at the end of every round (and round 0 where it compares two models).")
    prompts: DataSource = Field(
        default_factory=lambda: DataSource(path="data/eval_prompts.jsonl"),
        description="Held-out prompts, a data source like data.prompts (a file, folder or Hub id with split, name, "
        "revision, columns; e.g. {path: tatsu-lab/alpaca_eval, name: alpaca_eval, columns: {prompt: instruction}}); "
        "any also in data.prompts or data.offline (same text) is refused and counted.",
    )
    max_prompts: int | None = Field(None, gt=0, description="Evaluate only the first N held-out prompts (empty: all).")
    baseline: str = Field(
        "initial",
        min_length=1,
        description="initial: π_0; previous: π_{k-1}; or a file of reference outputs (JSON/JSONL/Parquet with "
        "AlpacaEval's `instruction` and `output`) with an output for every held-out prompt.",
    )
    num_samples: int = Field(2, ge=1, description="Responses per prompt, each compared with the baseline's of the same seed.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature of both sides (0: greedy, with num_samples 1).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold of both sides.")
    max_tokens: int = Field(160, gt=0, description="Response token limit of both sides (cut responses are kept and counted).")
    judges: list[JudgeConfig] = Field(
        # the tiny preset's annotator: a rule-based Python judge, no extra model (set `judges: []` to drop it)
        default_factory=lambda: [JudgeConfig(id="overlap", backend="python", function="pipeline.method.judges:overlap_judge")],
        description="AI annotators, as label.judges (empty vllm model: π_0, the same judge every round); each "
        "compares policy and baseline in both orders. Default: pipeline.method.judges:overlap_judge.",
    )
    reward_model: str | None = Field(
        None, description="An annotator: a sequence-classification reward model; p = σ(r_policy − r_baseline)."
    )
    reward_model_format: str | None = Field(
        None, description="Fallback text '…{prompt}…{response}…' for a reward model without a chat template."
    )
    python_metric: str | None = Field(
        None,
        description="An annotator: 'module:function'(prompts, responses) -> list[float] scoring each response "
        "(e.g. pipeline.run.toy:true_rewards); p = 1, ½ or 0 as the policy's score is above, equal or below. Runs your code.",
    )
    min_annotators: int = Field(1, ge=1, description="A row counts only when this many annotators answered it without failure.")
    length_unit: Literal["chars", "tokens"] = Field(
        "chars", description="Length in the LC fit: characters (as AlpacaEval) or tokens of the policy's tokenizer."
    )
    lc_controls: bool = Field(
        True,
        description="Also judge each side's samples against each other (equal quality in expectation; needs "
        "num_samples >= 2) so the LC fit learns the judges' length preference where the policy is longer on most rows.",
    )
    lc_l2: float = Field(
        0.01, gt=0, description="λ: L2 weight on (θ, φ) in the LC fit; keeps separable preferences finite (pipeline/method/evaluation.py)."
    )
    bootstrap: int = Field(1000, ge=0, description="Bootstrap replicates over prompts for the 95% intervals (0: none).")
    batch_size: int = Field(16, gt=0, description="Sequences per forward pass of the reward model and calls of the Python metric.")
    trust_remote_code: bool = Field(False, description="Allow judge and reward models to run their own Python code.")
    allow_self_judge: bool = Field(
        False,
        description="Let a judge or reward model be the evaluated model or the baseline (e.g. π_0 judging π_k against "
        "π_0's own outputs); refused by default, since a model tends to prefer its own answers.",
    )
    stop_after_no_gain: int | None = Field(
        None,
        ge=1,
        description="Stop the run (or a more_rounds tick) after N evaluated rounds in a row without a gain: the lower "
        "95% bound of the round's paired LC gain not above min_gain (empty: never stop early).",
    )
    min_gain: float = Field(
        0.0, ge=0, description="A round gains when the lower 95% bound of its LC gain (paired over prompts) exceeds this."
    )

    def annotator_ids(self) -> list[str]:
        """The annotators' ids in eval.parquet: the judges' (id or judge-<index>), then reward_model, python_metric."""
        ids = [j.id or f"judge-{i}" for i, j in enumerate(self.judges)]
        return ids + ["reward_model"] * bool(self.reward_model) + ["python_metric"] * bool(self.python_metric)

    @model_validator(mode="after")
    def _check_eval(self) -> EvalConfig:
        ids = self.annotator_ids()
        if self.enabled and not ids:
            raise ValueError("eval.enabled needs an annotator: eval.judges, eval.reward_model or eval.python_metric")
        if len(set(ids)) != len(ids):
            raise ValueError(f"eval: annotator ids must be unique (got {ids})")
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError("eval.temperature 0 (greedy) gives identical samples: set eval.num_samples to 1")
        if self.min_annotators > max(len(ids), 1):
            raise ValueError(f"eval.min_annotators ({self.min_annotators}) exceeds the {len(ids)} annotator(s)")
        return self


# Each dashboard: the module its library provides and the extra of pyproject.toml that installs it.
DASHBOARDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


class LogConfig(_Section):
    """Dashboards a run reports to (pipeline/run/tracking.py): each training step and each round's summary."""

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Dashboards that receive every training step's metrics and every round's summary, one dashboard "
        "run per dice run: tensorboard, wandb, mlflow (each an extra: pip install -e '.[dashboards]'). Empty: none.",
    )
    project: str = Field("dice", min_length=1, description="W&B project and MLflow experiment the run is filed under.")
    tensorboard_dir: str | None = Field(None, description="TensorBoard log folder (empty: <run folder>/tensorboard).")
    wandb_mode: Literal["online", "offline"] | None = Field(
        None,
        description="W&B mode; offline writes the run under <run folder>/wandb for `wandb sync` later. Empty: "
        "W&B's own setting (WANDB_MODE, else online).",
    )
    wandb_entity: str | None = Field(None, description="W&B entity (user or team); empty: W&B's default (WANDB_ENTITY).")
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI, e.g. http://mlflow-host:5000; empty: MLFLOW_TRACKING_URI, else a SQLite "
        "file in the run folder (sqlite:///<run folder>/mlflow.db).",
    )

    @model_validator(mode="after")
    def _check_installed(self) -> LogConfig:
        import importlib.util

        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"report_to lists a dashboard twice (got {self.report_to})")
        for name in self.report_to:
            module, extra = DASHBOARDS[name]
            if importlib.util.find_spec(module) is None:  # without importing it: wandb and mlflow take seconds
                raise ValueError(
                    f"report_to lists {name}, but the {module} package is not installed: "
                    f"pip install -e '.[{extra}]' (or '.[dashboards]' for all three)"
                )
        return self


class RunConfig(_Section):
    """A whole dice run: where it lives, how many rounds, and each stage's settings."""

    name: str = Field("tiny", pattern=r"^[A-Za-z0-9._-]+$", description="Run name; its files live in runs_dir/name.")
    runs_dir: str = Field("runs", description="Folder holding all runs.")
    rounds: int = Field(2, ge=0, description="DICE rounds after round 0 (paper: 2-3).")
    offline_rounds: bool = Field(
        False,
        description="Rounds ≥ 1 train on freshly sampled offline pairs only, without generating or labelling: the "
        "offline baseline of a recipe (continued offline training, same steps per round as data.offline_per_round).",
    )
    seed: int = Field(0, description="Seed of prompt selection, sampling, pair sampling and training order.")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="cuda: every stage runs on CUDA GPUs, and a machine without a working CUDA GPU is refused before "
        "anything starts (GPU recipes); cpu: CPU only (GPUs are hidden from the stages); auto: CUDA when available.",
    )
    memory_check: bool = Field(
        True,
        description="Before a stage starts on GPUs, refuse a layout whose memory plan (`dice plan`) does not fit them, "
        "naming the change that would fit; off: start it anyway.",
    )
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="GPU memory (GiB) the memory plan assumes per GPU; empty: what the GPUs have."
    )
    gpu_slots: str | None = Field(
        None,
        description="Prefect global concurrency limit whose slots GPU stages hold, one per GPU they use, so stages "
        "queue for GPUs (e.g. gpu, after: prefect gcl create gpu --limit <GPUs>). Empty: no queueing.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="Models.")
    data: DataConfig = Field(default_factory=DataConfig, description="Shipped or user datasets.")
    round0: Round0Config = Field(default_factory=Round0Config, description="How π_0 is obtained.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Sampling K responses per prompt.")
    label: LabelConfig = Field(default_factory=LabelConfig, description="Scoring responses.")
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="Building preference pairs.")
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig, description="Reference log-probs.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Preference training.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Per-round evaluation of π_k against a baseline.")
    log: LogConfig = Field(default_factory=LogConfig, description="Dashboards (TensorBoard, W&B, MLflow).")

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        for src in (self.data.prompts, self.data.offline, self.eval.prompts):  # data.on_bad_row, unless set per source
            src._inherited_on_bad_row = self.data.on_bad_row
        if self.label.labeller == "python" and not self.label.python_reward:
            raise ValueError("label.python_reward must be set when label.labeller is 'python'")
        if self.label.labeller == "judge" and not self.label.judges:
            raise ValueError("label.judges must list at least one annotator when label.labeller is 'judge'")
        if self.label.labeller == "reward_model" and not self.label.reward_model:
            raise ValueError("label.reward_model must be set when label.labeller is 'reward_model'")
        ids = self.label.judge_ids()
        if len(set(ids)) != len(ids):
            raise ValueError(f"label.judges: annotator ids must be unique (got {ids})")
        if self.pairs.min_valid > self.generate.num_samples:
            raise ValueError(
                f"pairs.min_valid ({self.pairs.min_valid}) exceeds generate.num_samples ({self.generate.num_samples})"
            )
        per_step = self.train.micro_batch_size * self.train.num_processes
        if self.train.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size × train.num_processes ({per_step})"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  field {loc}: {e['msg']}")
    return "\n".join(lines)


def _redact(text: str) -> str:
    """Text for a message with URL credentials masked (an override may carry a URL the user should not have)."""
    import re

    text = re.sub(r"://[^/@\s]*@", "://***@", text)
    secret = "|".join(_SECRET_QUERY)
    return re.sub(rf"([?&][^=&\s]*(?:{secret})[^=&\s]*=)[^&\s\"']*", r"\1***", text, flags=re.IGNORECASE)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in place; returns it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. generate.num_samples=8")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from YAML (or the embedded default when path is None) and apply overrides.

    Raises:
        ConfigError: naming the file and each offending field.
    """
    data: dict[str, Any] = {}
    source = "embedded default"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: configuration file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded or {}
    if overrides:
        source += " + overrides " + _redact(" ".join(overrides))
        apply_overrides(data, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e)) from None


def cuda_status() -> tuple[int, str]:
    """(CUDA GPUs this process can use, why none when 0). Asks the driver for the count; creates no CUDA context."""
    import os

    import torch

    if torch.version.cuda is None:
        return 0, f"torch {torch.__version__} is a CPU-only build (install the CUDA build: pip install -e '.[gpu]')"
    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except RuntimeError as e:  # a driver/runtime mismatch surfaces here
        return 0, f"CUDA failed to initialise ({e})"
    if n:
        return n, ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = f" with CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return 0, (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU{hidden}; check the driver "
               "with nvidia-smi")  # fmt: skip


def resolve_runtime(cfg: RunConfig, cuda: int | None = None) -> RunConfig:
    """The config a run executes: `device`, `model.dtype: auto` and `train.bf16: empty` made concrete for this
    machine, so plans fingerprint what runs (float32 shards scored on a CPU never count as a bfloat16 GPU run's).

    device=cuda on a machine without a usable CUDA GPU is refused here, before anything is written: a GPU recipe
    never falls back to a float32 run on gloo. device=cpu hides the GPUs from this process and its children
    (CUDA_VISIBLE_DEVICES=""), before anything touches CUDA.

    Args:
        cuda: the usable CUDA GPUs (default: asked of torch, `cuda_status`).
    Raises:
        ConfigError: device=cuda without a usable CUDA GPU; the message names CUDA and the cause.
    """
    import os

    if cfg.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        cuda, why = 0, ""
    elif cuda is None:
        cuda, why = cuda_status()
    else:
        why = "no CUDA GPU"
    if cfg.device == "cuda" and not cuda:
        raise ConfigError(
            f"run {cfg.name}: device is cuda, but CUDA is not usable on this machine: {why}. Run it on a CUDA GPU "
            "machine, or set device=auto (or cpu) to run on the CPU"
        )
    return settled(cfg, cuda)


def settled(cfg: RunConfig, cuda: int | None = None) -> RunConfig:
    """`device: auto`, `model.dtype: auto` and `train.bf16: empty` made what this machine runs (bf16 on a usable CUDA
    GPU unless device=cpu, else float32), with no check and no change to the environment. `rounds.plan` plans from
    it, so every reader of a run (the flow, a stage process, a worker's shards, `dice eval`, a test holding the
    config it wrote) fingerprints the same work; a config already settled is returned as it is."""
    if cfg.device != "auto" and cfg.model.dtype != "auto" and cfg.train.bf16 is not None:
        return cfg
    if cuda is None:
        cuda = 0 if cfg.device == "cpu" else cuda_status()[0]
    on_gpu = bool(cuda) and cfg.device != "cpu"
    model = cfg.model.model_copy(
        update={"dtype": ("bfloat16" if on_gpu else "float32") if cfg.model.dtype == "auto" else cfg.model.dtype}
    )
    train = cfg.train.model_copy(update={"bf16": on_gpu if cfg.train.bf16 is None else cfg.train.bf16})
    return cfg.model_copy(update={"device": "cuda" if on_gpu else "cpu", "model": model, "train": train})


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the fully resolved config as YAML (atomically), so stage processes read exactly what the flow ran."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)


def config_hash(section: BaseModel | dict[str, Any]) -> str:
    """Stable hash of a config section (or dict), used in stage fingerprints."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
