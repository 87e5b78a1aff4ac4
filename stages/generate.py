"""Stage `generate`: K sampled responses per prompt from the current policy, with the real vLLM engine.

Reads the prompt file and π_{k-1}; writes `responses.parquet` (RESPONSES schema). Round k takes the k-th
consecutive slice of `data.prompts_per_round` prompts (wrapping around), as the paper uses a fresh part of
the prompt set per iteration. Each prompt has its own seed, derived from (run seed, round, prompt_id), so
its samples do not depend on batch composition. Prompts longer than `model.max_prompt_tokens` are dropped
and counted.

    python -m stages.generate conf/tiny.yaml --round 1
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

from pipeline import schemas
from pipeline.artifacts import StagePlan, write_parquet
from pipeline.config import RunConfig
from pipeline.datasets import read_prompts


def prompt_seed(run_seed: int, k: int, prompt_id: str) -> int:
    """A 31-bit seed unique to (run seed, round, prompt)."""
    return int(hashlib.sha256(f"{run_seed}:{k}:{prompt_id}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def select_prompts(prompts: pa.Table, k: int, per_round: int) -> pa.Table:
    """Round k's slice: prompts [(k-1)·n, k·n) modulo the file's length (n capped at the file's length)."""
    n_total = prompts.num_rows
    n = min(per_round, n_total)
    start = ((k - 1) * n) % n_total
    idx = [(start + i) % n_total for i in range(n)]
    return prompts.take(idx)


def run(cfg: RunConfig, plan: StagePlan, llm: Any = None) -> dict[str, Any]:
    """Generate round k's responses. `llm`: an already started vLLM engine for the same policy (tests, notebooks)."""
    from transformers import AutoTokenizer

    from pipeline.engine import make_llm
    from pipeline.logprobs import prompt_ids, require_model

    k, policy = plan.round, str(plan.inputs["policy"])
    require_model(policy)
    prompts = select_prompts(read_prompts(plan.inputs["prompts"]), k, cfg.data.prompts_per_round)
    tokenizer = AutoTokenizer.from_pretrained(policy, trust_remote_code=cfg.model.trust_remote_code)

    kept: list[tuple[str, str, list[int]]] = []
    too_long = 0
    for pid, text in zip(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist()):
        ids = prompt_ids(tokenizer, text)
        if len(ids) > cfg.model.max_prompt_tokens:
            too_long += 1
            continue
        kept.append((pid, text, ids))
    if not kept:
        raise ValueError(
            f"{plan.inputs['prompts']}: all {prompts.num_rows} prompts of round {k} exceed "
            f"model.max_prompt_tokens={cfg.model.max_prompt_tokens}"
        )

    from vllm import SamplingParams, TokensPrompt

    g = cfg.generate
    seeds = [prompt_seed(cfg.seed, k, pid) for pid, _, _ in kept]
    params = [
        SamplingParams(
            n=g.num_samples, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens, seed=s, logprobs=0
        )
        for s in seeds
    ]
    if llm is None:
        llm = make_llm(policy, g.engine, dtype=cfg.model.dtype, seed=cfg.seed, trust_remote_code=cfg.model.trust_remote_code)
    results = llm.generate([TokensPrompt(prompt_token_ids=ids) for _, _, ids in kept], params, use_tqdm=False)

    cols: dict[str, list] = {name: [] for name in schemas.RESPONSES.names}
    for (pid, text, _), seed, result in zip(kept, seeds, results):
        for j, out in enumerate(result.outputs):
            cols["prompt_id"].append(pid)
            cols["prompt"].append(text)
            cols["sample_idx"].append(j)
            cols["response"].append(out.text)
            cols["num_tokens"].append(len(out.token_ids))
            cols["num_chars"].append(len(out.text))
            cols["finish_reason"].append(out.finish_reason or "unknown")
            cols["cumulative_logprob"].append(out.cumulative_logprob)
            cols["seed"].append(seed)
            cols["model"].append(policy)
            cols["round"].append(k)
    table = pa.table(cols, schema=schemas.RESPONSES)
    rows = write_parquet(table, plan.outputs["responses"], schemas.RESPONSES)
    n_tokens = sum(cols["num_tokens"])
    return {
        "prompts": len(kept),
        "prompts_too_long": too_long,
        "responses": rows,
        "finish_length": cols["finish_reason"].count("length"),
        "mean_tokens": n_tokens / max(rows, 1),
        "generated_tokens": n_tokens,
    }


if __name__ == "__main__":
    from stages.common import main

    main("generate", run)
