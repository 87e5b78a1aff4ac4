"""`dice data check`: what a config's datasets hold, as dice will read them, before a long run.

For `data.prompts` and `data.offline`: where they come from (and the Hub commit), the rows read, the
conversations among them, token-length percentiles under the policy's chat template (prompts; chosen and
rejected responses with EOS; pairs as prompt + longer response), what the rounds would drop (prompts over
`model.max_prompt_tokens`, pairs over `model.max_length`), duplicates, and prompts present in both sets (replay
takes offline pairs only from prompts a round's generated pairs do not use). A row dice cannot read at all stops
the check with the error a run would stop with (file, split, row, column).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import RunConfig
from pipeline.data.chat import prompts_of
from pipeline.data.datasets import is_hub_dataset, read_offline, read_prompts


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}  # fmt: skip


def _source(src) -> str:
    text = str(src)
    if is_hub_dataset(src.path):
        from pipeline.data.models import hub_commit, local_dataset

        text += f" @ {hub_commit(local_dataset(src.path, src.revision, 'dataset'))}"
    return text


def _tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer

    from pipeline.data.models import local_model, looks_local

    policy = cfg.model.policy
    if looks_local(policy) and not Path(policy).exists():
        return None  # built on first use (the tiny preset): nothing to measure with yet
    return AutoTokenizer.from_pretrained(local_model(policy), trust_remote_code=cfg.model.trust_remote_code)


def check_data(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The report, per dataset (module docstring)."""
    from pipeline.compute.logprobs import encode, prompt_ids

    tok = _tokenizer(cfg)
    prompts = read_prompts(cfg.data.prompts)
    offline = read_offline(cfg.data.offline)
    report: dict[str, dict[str, Any]] = {}

    texts = prompts.column("prompt").to_pylist()
    conv = sum(m is not None for m in prompts.column("prompt_messages").to_pylist())
    p = {"source": _source(cfg.data.prompts), "rows": prompts.num_rows, "conversations": conv,
         "duplicate_prompts": sum(c - 1 for c in Counter(texts).values() if c > 1)}  # fmt: skip
    if tok is not None:
        lengths = [len(prompt_ids(tok, x)) for x in prompts_of(prompts)]
        p["prompt_tokens"] = _percentiles(lengths)
        p[f"over_max_prompt_tokens ({cfg.model.max_prompt_tokens}, dropped by generate)"] = int(
            sum(n > cfg.model.max_prompt_tokens for n in lengths)
        )
    else:
        p["prompt_tokens"] = f"not measured: {cfg.model.policy} is built on the first run"
    report["prompts"] = p

    d = offline.to_pydict()
    o_texts = d["prompt"]
    pairs = list(zip(o_texts, d["chosen"], d["rejected"]))
    o = {"source": _source(cfg.data.offline), "rows": offline.num_rows,
         "conversations": sum(m is not None for m in d["prompt_messages"]),
         "duplicate_pairs": sum(c - 1 for c in Counter(pairs).values() if c > 1),
         "prompts_also_in_data.prompts": len(set(o_texts) & set(texts))}  # fmt: skip
    if tok is not None:
        chosen, rejected, total = [], [], []
        for prompt, c, r in zip(prompts_of(offline), d["chosen"], d["rejected"]):
            p_ids, c_ids = encode(tok, prompt, c)
            _, r_ids = encode(tok, prompt, r)
            chosen.append(len(c_ids))
            rejected.append(len(r_ids))
            total.append(len(p_ids) + max(len(c_ids), len(r_ids)))
        o["chosen_tokens"], o["rejected_tokens"] = _percentiles(chosen), _percentiles(rejected)
        o["pair_tokens"] = _percentiles(total)
        o[f"over_max_length ({cfg.model.max_length}, dropped by reference)"] = int(sum(n > cfg.model.max_length for n in total))
    report["offline"] = o
    return report
