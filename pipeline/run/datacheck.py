"""What a config's datasets hold, as dice will read them: `dice data check`, and the check `dice run` makes before
round 0 (`validate_data`).

The same rules as the stages (pipeline/data/datasets.py), applied to every row instead of stopping at the first bad
one: the rows dice cannot use are counted by reason and the first few named (file, split, row, field); with
`on_bad_row: error` any of them stops the run before round 0, with `skip` they are left out and counted. Every
prompt is rendered under the policy's chat template, so a template that refuses a row (one that requires
alternating user/assistant roles, say) names that row with the template's own message before a long run; such a
row stops the run whatever `on_bad_row` says, because generation and scoring could not render it either.

`dice data check` also reports, per dataset: where it comes from (and the Hub commit), rows and conversations,
token-length percentiles under the chat template (prompts; chosen and rejected responses with EOS; pairs as prompt +
longer response), what the rounds would drop (prompts over `model.max_prompt_tokens`, pairs over
`model.max_length`), duplicates, prompts present in two sets (replay takes offline pairs only from prompts a
round's generated pairs do not use; held-out prompts also trained on are not evaluated), whether the rounds would
reuse prompts (rounds × prompts_per_round over the prompts there are), and the first prompt as the policy sees it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import DataSource, RunConfig
from pipeline.data.artifacts import ArtifactError
from pipeline.data.chat import as_messages, prompts_of
from pipeline.data.datasets import BadRows, RowError, is_hub_dataset, read_offline_rows, read_prompts_rows
from pipeline.run import rounds


class DataError(ArtifactError):
    """The datasets a run would read hold rows that stop it (`validate_data`); nothing has run yet."""


@dataclass
class Checked:
    """One dataset as read for a check: its table, where each row came from, and the rows that could not be used."""

    key: str  # data.prompts, data.offline, eval.prompts
    src: DataSource
    table: pa.Table
    wheres: list[str]
    bad: BadRows
    refused: BadRows  # rows the chat template refuses (an error whatever on_bad_row says)
    usable: list[int] = field(default_factory=list)  # rows the template renders


@dataclass
class DataReport:
    datasets: dict[str, dict[str, Any]]  # per dataset: what `dice data check` shows
    errors: list[str]  # what stops a run before round 0 (one line each)
    warnings: list[str]
    rendered: str | None  # the first prompt under the policy's chat template


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}  # fmt: skip


def _source(src: DataSource) -> str:
    text = str(src)
    if is_hub_dataset(src.path):
        from pipeline.data.models import dataset_commit

        text += f" @ {dataset_commit(src.path.removeprefix('hf://datasets/'), src.revision)}"
    return text


def policy_tokenizer(cfg: RunConfig):
    """The policy's tokenizer (a Hub policy's tokenizer files alone, at model.revision), or None while the tiny
    preset's model is not built yet (build_tiny_if_missing: the first run builds it)."""
    from transformers import AutoTokenizer

    from pipeline.data.models import local_tokenizer

    if cfg.model.build_tiny_if_missing and not Path(cfg.model.policy).exists():
        return None
    folder = local_tokenizer(rounds.policy_name(cfg), "model.policy")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.policy {rounds.policy_name(cfg)}: its tokenizer could not be loaded ({e})") from None


def _render(tok, prompt) -> str:
    if tok.chat_template:
        return tok.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)
    if not isinstance(prompt, str):
        raise ValueError("the tokenizer has no chat template, so it cannot render a conversation")
    return prompt


def _template_check(tok, checked: Checked, model: str) -> None:
    """Render every distinct prompt of `checked` under the chat template; a refusal is counted against its row."""
    import jinja2

    seen: dict[str, str | None] = {}  # prompt key -> the template's message, None when it renders
    checked.usable = []
    for i, prompt in enumerate(prompts_of(checked.table)):
        key = repr(prompt)
        if key not in seen:
            try:
                _render(tok, prompt)
                seen[key] = None
            except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
                seen[key] = str(e).splitlines()[0] if str(e) else type(e).__name__
        if seen[key] is None:
            checked.usable.append(i)
        else:
            checked.refused.add(checked.wheres[i], RowError(
                "template_error", f"the chat template of {model} refuses this prompt: {seen[key]}"), i)  # fmt: skip


def read_checked(key: str, src: DataSource, offline: bool) -> Checked:
    """Every row of `src` read with the stages' rules, the unusable ones collected instead of stopping the read."""
    bad = BadRows(str(src), "collect")
    table, wheres = (read_offline_rows if offline else read_prompts_rows)(src, bad)
    return Checked(key, src, table, wheres, bad, BadRows(str(src), "collect"), list(range(table.num_rows)))


def sources_read(cfg: RunConfig) -> dict[str, tuple[DataSource, bool, bool]]:
    """The datasets a run of `cfg` reads: key -> (source, is offline pairs, required). The evaluate stage also reads
    data.prompts and data.offline, when they exist, to refuse held-out prompts the run trains on."""
    stages = {s for k in range(cfg.rounds + 1) for s in rounds.stages_of_round(cfg, k)}
    evaluates = rounds.EVAL_STAGE in stages
    found: dict[str, tuple[DataSource, bool, bool]] = {}
    if "generate" in stages or evaluates:
        found["data.prompts"] = (cfg.data.prompts, False, "generate" in stages)
    if "pairs" in stages or evaluates:
        found["data.offline"] = (cfg.data.offline, True, "pairs" in stages)
    if evaluates:
        found["eval.prompts"] = (cfg.eval.prompts, False, True)
    return found


def _exists(src: DataSource) -> bool:
    return Path(src.path).expanduser().exists() or is_hub_dataset(src.path)


def prompt_reuse(cfg: RunConfig, n_prompts: int) -> str | None:
    """A warning when the generating rounds need more prompts than data.prompts holds: the rounds' slices then wrap
    around (stages.generate.select_prompts) and later rounds generate from prompts earlier rounds used."""
    generating = [k for k in range(1, cfg.rounds + 1) if "generate" in rounds.stages_of_round(cfg, k)]
    if not generating or not n_prompts:
        return None
    per = min(cfg.data.prompts_per_round, n_prompts)
    last = max(generating)
    if last * per <= n_prompts:
        return None
    first = n_prompts // per + 1
    return (f"data.prompts {cfg.data.prompts}: {n_prompts} usable prompts, but {last} rounds × prompts_per_round "
            f"{cfg.data.prompts_per_round} need {last * cfg.data.prompts_per_round}: from round {first} on, rounds "
            "reuse prompts earlier rounds generated from (add prompts, or lower prompts_per_round or rounds)")  # fmt: skip


def _problems(checked: Checked) -> list[str]:
    """The lines that stop a run: rows the template refuses; with on_bad_row error, rows dice cannot use."""
    lines = []
    if checked.bad.total and checked.src.bad_rows == "error":
        lines.append(f"{checked.key}: {checked.bad.summary()} dice cannot use: {'; '.join(checked.bad.first[:3])} "
                     "(fix them, or set data.on_bad_row: skip to leave them out and count them)")  # fmt: skip
    if checked.refused.total:
        lines.append(f"{checked.key}: {checked.refused.total} prompts the chat template refuses: "
                     f"{'; '.join(checked.refused.first[:3])} (skipping cannot help: generation and scoring render "
                     "every prompt; fix the rows or use a model whose template accepts them)")  # fmt: skip
    return lines


def validate_data(cfg: RunConfig, tokenizer: Any = None) -> list[str]:
    """Check every dataset a run of `cfg` will read, before round 0, with the stages' rules; returns warnings.

    `tokenizer`: the policy's (default: loaded when the policy exists), to render every prompt under its template.

    Raises:
        DataError: one line per dataset at fault, naming the file, split, row and field of its first problems.
    """
    tok = tokenizer if tokenizer is not None else policy_tokenizer(cfg)
    errors, warnings = [], []
    for key, (src, offline, required) in sources_read(cfg).items():
        if not required and not _exists(src):
            continue
        checked = read_checked(key, src, offline)
        if tok is not None:
            _template_check(tok, checked, rounds.policy_name(cfg))
        errors += _problems(checked)
        if checked.bad.total and checked.src.bad_rows == "skip":
            warnings.append(f"{key}: {checked.bad.summary()} will be skipped (on_bad_row: skip); first: "
                            f"{'; '.join(checked.bad.first[:3])}")  # fmt: skip
        if key == "data.prompts" and (reuse := prompt_reuse(cfg, checked.table.num_rows)):
            warnings.append(reuse)
    baseline = cfg.eval.baseline
    if cfg.eval.enabled and baseline not in ("initial", "previous") and Path(baseline).is_file():
        from pipeline.data.datasets import read_reference_outputs

        read_reference_outputs(baseline)
    if errors:
        raise DataError(" | ".join(errors))
    return warnings


def check_data(cfg: RunConfig) -> DataReport:
    """The report of `dice data check` (module docstring)."""
    from pipeline.compute.logprobs import encode_many, prompt_ids

    tok = policy_tokenizer(cfg)
    model = rounds.policy_name(cfg)
    keys = {"data.prompts": (cfg.data.prompts, False), "data.offline": (cfg.data.offline, True)}
    if cfg.eval.enabled:
        keys["eval.prompts"] = (cfg.eval.prompts, False)
    checked = {key: read_checked(key, src, offline) for key, (src, offline) in keys.items()}
    report: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    warnings: list[str] = []
    rendered = None
    texts = {key: c.table.column("prompt").to_pylist() for key, c in checked.items()}
    for key, c in checked.items():
        if tok is not None:
            _template_check(tok, c, model)
        errors += _problems(c)
        t = c.table
        r: dict[str, Any] = {"source": _source(c.src), "rows": t.num_rows,
                             "conversations": sum(m is not None for m in t.column("prompt_messages").to_pylist())}  # fmt: skip
        if c.bad.total:
            r[f"rows dice cannot use ({'skipped' if c.src.bad_rows == 'skip' else 'errors'})"] = c.bad.summary()
            r["first of them"] = " | ".join(c.bad.first)
        if c.refused.total:
            r["prompts the chat template refuses (errors)"] = c.refused.total
            r["first refused"] = " | ".join(c.refused.first)
        every = prompts_of(t)
        prompts = [every[i] for i in c.usable]
        if key == "data.offline":
            d = t.to_pydict()
            r["duplicate_pairs"] = sum(n - 1 for n in Counter(zip(d["prompt"], d["chosen"], d["rejected"])).values() if n > 1)
            r["prompts_also_in_data.prompts"] = len(set(texts[key]) & set(texts["data.prompts"]))
            if tok is not None and c.usable:
                pairs = encode_many(tok, prompts + prompts, [d["chosen"][i] for i in c.usable] +
                                    [d["rejected"][i] for i in c.usable])  # fmt: skip
                n = len(c.usable)
                chosen, rejected = [len(y) for _, y in pairs[:n]], [len(y) for _, y in pairs[n:]]
                total = [len(pairs[i][0]) + max(chosen[i], rejected[i]) for i in range(n)]
                r["chosen_tokens"], r["rejected_tokens"] = _percentiles(chosen), _percentiles(rejected)
                r["pair_tokens"] = _percentiles(total)
                r[f"over_max_length ({cfg.model.max_length}, dropped by reference)"] = int(
                    sum(x > cfg.model.max_length for x in total))  # fmt: skip
        else:
            r["duplicate_prompts"] = sum(n - 1 for n in Counter(texts[key]).values() if n > 1)
            if key == "eval.prompts":
                # the evaluate stage's rule: case, spacing, punctuation
                from pipeline.data.datasets import overlap_key

                trained = {overlap_key(x) for x in set(texts["data.prompts"]) | set(texts["data.offline"])}
                r["also trained on (not evaluated)"] = sum(overlap_key(x) in trained for x in texts[key])
            if tok is not None and c.usable:
                lengths = [len(prompt_ids(tok, p)) for p in prompts]
                r["prompt_tokens"] = _percentiles(lengths)
                stage = "generate" if key == "data.prompts" else "evaluate"
                r[f"over_max_prompt_tokens ({cfg.model.max_prompt_tokens}, dropped by {stage})"] = int(
                    sum(n > cfg.model.max_prompt_tokens for n in lengths))  # fmt: skip
                if rendered is None and key == "data.prompts":
                    rendered = _render(tok, prompts[0])
            elif tok is None:
                r["prompt_tokens"] = f"not measured: {cfg.model.policy} is built on the first run"
        if key == "data.prompts" and (reuse := prompt_reuse(cfg, t.num_rows)):
            warnings.append(reuse)
        report[key] = r
    return DataReport(report, errors, warnings, rendered)
