"""Stage `label`: score every response.

labeller = implicit_reward (DICE, ../shared/METHODS.md §1.2): r = β·[logp(π_{k-1}, x, y) − logp(π_{k-2}, x, y)],
the current policy against its own reference, both scored over the same tokens: the ids generate sampled
(responses.parquet's `prompt_token_ids`/`response_token_ids`; the text tokenised for a round written without them,
pipeline.compute.logprobs.encode_rows).
labeller = python: the function named in `label.python_reward`, called on batches of (prompts, responses).
labeller = reward_model: a sequence-classification model's score r, each text re-encoded with the reward
model's own tokenizer and chat template (pipeline/method/rewards.py); pairs take p = σ(r_1 − r_2).
labeller = judge (METHODS.md §6, pipeline/method/judges.py): every annotator in `label.judges` compares every pair of a
prompt's responses that were not cut at the token limit, in both orders; p = ½(p_AB + 1 − p_BA) per annotator,
p̂ = their mean, and the response's `reward` is its ranking score from p̂ (`label.ranking`). A failed comparison
(timeout, HTTP error, unparseable output, missing log-probs, answer token absent) is retried where retryable,
then recorded with its reason and excluded, and counted in the stats; the round goes on.

Reads `responses.parquet`; writes `labels.parquet` (LABELS: every response column plus the log-probs, the
reward, and `label_error` where a response could not be scored: too_long, non_finite, cut, no_comparisons) and
`preferences.parquet` (PREFERENCES: one row per prompt, response pair and annotator with p_ab, p_ba, p and the
error; empty for scalar labellers). Nothing is dropped here; the pairs stage decides what is valid.

    python -m stages.label conf/tiny.yaml --round 1
"""

from __future__ import annotations

import gc
import itertools
import math
import sys
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.data import schemas
from pipeline.data.artifacts import StagePlan, plan_digest, read_parquet, write_parquet
from pipeline.data.chat import prompts_of
from pipeline.data.shards import Progress, Shards, assign, group_shards
from pipeline.method.rewards import implicit_reward, load_reward_fn

# ---------------------------------------------------------------------------------------------- scoring, sharded
# implicit_reward and reward_model score every response under a model. The responses are cut into shards of
# `label.shard_size` whole prompts (a prompt's K responses together, so packing computes the prompt once), and
# `label.num_processes` DeepSpeed ranks (pipeline.compute.launch) each score every N-th missing shard, writing each as it
# finishes (pipeline.data.shards); this process then reads the shards back in row order. The implicit reward scores
# every shard under π_{k-1}, then every shard under π_{k-2}: one model in memory at a time, two shard sets
# (`label-policy`, `label-reference`), so a kill during the second model's pass keeps the first's.

SCORES = pa.schema([("row", pa.int64()), ("value", pa.float64()), ("too_long", pa.bool_())])  # a shard's rows


def _roles(cfg: RunConfig) -> list[str]:
    """The models every response is scored under, in order: each one's scores are one set of shards."""
    return ["policy", "reference"] if cfg.label.labeller == "implicit_reward" else ["reward_model"]


def _preflight(cfg: RunConfig, plan: StagePlan) -> None:
    """Fail before any process starts or any shard is scored: missing models, tokenizers that cannot serve, a model
    ZeRO-3 cannot shard."""
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.compute import zero3
    from pipeline.compute.logprobs import require_model
    from pipeline.method.rewards import check_format, reward_model_ids

    lab = cfg.label
    paths = {role: require_model(str(plan.inputs[role])) for role in _roles(cfg)}  # local folders (Hub: snapshots)
    for role, path in paths.items():
        if lab.zero_stage == 3 and (reason := zero3.unsupported(path)):
            raise ValueError(f"label.zero_stage=3: {role} model {path}: ZeRO-3 cannot shard it: {reason}")
    if lab.labeller == "implicit_reward":
        vocabs = {}
        for role, path in paths.items():
            try:
                vocabs[role] = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code).get_vocab()
            except (OSError, ValueError) as e:
                raise ValueError(f"model {path}: its tokenizer could not be loaded ({e})") from e
        if vocabs["policy"] != vocabs["reference"]:
            raise ValueError(f"model {paths['reference']}: its tokenizer differs from the policy's; implicit rewards "
                             "need both models to share one tokenizer")  # fmt: skip
        return
    path = paths["reward_model"]
    check_format(lab.reward_model_format)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=lab.trust_remote_code)
        labels = AutoConfig.from_pretrained(path, trust_remote_code=lab.trust_remote_code).num_labels
    except (OSError, ValueError) as e:
        raise ValueError(f"reward model {path}: could not be loaded ({e})") from e
    if labels != 1:
        raise ValueError(f"reward model {path}: it has {labels} outputs; dice needs a single-score model (num_labels=1)")
    reward_model_ids(tokenizer, "question", "answer", lab.reward_model_format, path)  # no template, no fallback: error


def _scorer(cfg: RunConfig, plan: StagePlan, role: str):
    """This rank's scorer under one model, fn(rows of responses.parquet) -> (scores, too_long mask, scored tokens),
    and the share of the model's weights this rank holds.

    The model is loaded whole on this rank's device, or (label.zero_stage 3) partitioned across the ranks; then every
    call is a collective and each rank must make the same calls (the worker pads with empty ones)."""
    from pipeline.compute import launch, zero3
    from pipeline.compute.logprobs import ResponseScorer, encode_rows, load_causal_lm, score, stored_ids
    from pipeline.method.rewards import load_reward_model, reward_model_ids, score_reward_model

    lab, path, device = cfg.label, str(plan.inputs[role]), launch.device()
    if role == "reward_model":
        model, tokenizer = load_reward_model(path, cfg.model.dtype, lab.trust_remote_code, device, lab.zero_stage)
        zero = zero3.scoring(model, model.config) if lab.zero_stage == 3 else {}
        context = getattr(model.config, "max_position_embeddings", None) or cfg.model.max_length
        limit = min(cfg.model.max_length, context)

        def reward(part: pa.Table):
            # the reward model's own tokenizer and template, on the texts (what the model was trained to read)
            prompts, responses = prompts_of(part), part["response"].to_pylist()
            encoded = [reward_model_ids(tokenizer, p, r, lab.reward_model_format, path) for p, r in zip(prompts, responses)]
            too_long = np.array([len(x) > limit for x in encoded], dtype=bool)
            ok = np.flatnonzero(~too_long)
            scores = np.full(len(encoded), np.nan)
            scores[ok] = score_reward_model(model, tokenizer, [encoded[i] for i in ok], lab.batch_size, path, **zero)
            return scores, too_long, sum(len(encoded[i]) for i in ok)

        return reward, zero3.share_held(model)
    model, tokenizer = load_causal_lm(path, cfg.model.dtype, cfg.model.trust_remote_code, device, lab.zero_stage)
    zero = zero3.scoring(ResponseScorer(model), model.config) if lab.zero_stage == 3 else {}

    def logps(part: pa.Table):
        # the sampled tokens as generated (responses.parquet's ids); texts only for rows written without them
        encoded = encode_rows(tokenizer, prompts_of(part), part["response"].to_pylist(),
                              stored_ids(part["prompt_token_ids"]), stored_ids(part["response_token_ids"]))  # fmt: skip
        too_long = np.array([len(p) + len(r) > cfg.model.max_length for p, r in encoded], dtype=bool)
        ok = np.flatnonzero(~too_long)
        scores = np.full(len(encoded), np.nan)
        # packed: the K responses of a prompt in one padding-free group, the prompt computed once (exact)
        scores[ok] = score(model, [encoded[i] for i in ok], tokenizer.pad_token_id, lab.batch_size,
                           packing=cfg.reference.packing, max_length=cfg.model.max_length, **zero)  # fmt: skip
        return scores, too_long, sum(len(encoded[i][0]) + len(encoded[i][1]) for i in ok)

    return logps, zero3.share_held(model)


def _score_worker(cfg: RunConfig, plan: StagePlan, todo: dict[str, list[int]], digest: str) -> dict[str, Any]:
    """One rank: its share (every N-th) of the missing shards under each model in turn, each shard written as it ends."""
    from pipeline.compute import launch

    zero3 = cfg.label.zero_stage == 3
    if zero3:
        launch.init_distributed()
    rank, world = launch.rank(), launch.world()
    ids_columns = ["prompt_token_ids", "response_token_ids"] if cfg.label.labeller == "implicit_reward" else []
    texts = read_parquet(plan.inputs["responses"], schemas.RESPONSES,
                         columns=["prompt_id", "prompt", "prompt_messages", "response", *ids_columns])  # fmt: skip
    ids = texts["prompt_id"].to_pylist()
    rows = group_shards(ids, cfg.label.shard_size)
    n_prompts = [len({ids[j] for j in r}) for r in rows]
    del ids  # the texts stay in Arrow; each shard's become Python strings only while it is scored
    held = {}
    for role in _roles(cfg):
        missing = todo[role]
        mine = assign(missing, rank, world)
        if not mine and not zero3 or not missing:
            continue
        shards = Shards(plan, f"label-{role}", len(rows), digest)
        who = f" (rank {rank} of {world})" if world > 1 else ""
        fn, held[role] = _scorer(cfg, plan, role)
        progress = Progress(f"label round {plan.round} {role}{who}", len(mine), sum(n_prompts[i] for i in mine),
                            "prompts", bar=world == 1)  # fmt: skip
        # ZeRO-3: every rank runs as many shard steps as the busiest one (counted from the `todo` every rank was
        # given: agreed without a collective); its extra steps score nothing but take part in each pass
        for step in range(-(-len(missing) // world) if zero3 else len(mine)):
            i = mine[step] if step < len(mine) else None
            idx = rows[i] if i is not None else np.zeros(0, np.int64)
            started, started_at = time.monotonic(), time.time()
            part = texts.take(idx)  # what the models see: the sampled ids, or the conversation where there is one
            scores, too_long, tokens = fn(part)
            if i is None:
                continue
            seconds = round(time.monotonic() - started, 3)
            shards.write(i, pa.table({"row": idx, "value": pa.array(scores, mask=~np.isfinite(scores)),
                                      "too_long": too_long}, schema=SCORES),
                         SCORES, sequences=len(idx), tokens=tokens, seconds=seconds, started_at=started_at)  # fmt: skip
            progress.shard_done(i, n_prompts[i], len(idx), tokens, seconds)
        progress.close()
        del fn
        gc.collect()
    return {"weights_held_per_rank": held}  # rank 0's share of each model's weights


def _sharded_scores(cfg: RunConfig, plan: StagePlan, table: pa.Table) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """Every response's score under each model of `_roles` (NaN where unscored), the too-long mask, and stats."""
    from pipeline.compute import launch

    lab = cfg.label
    n = launch.resolve_processes(lab.num_processes, cfg.train.hostfile)  # per node; 0 with a hostfile: its slots
    launch.check(n, cfg.train.hostfile, "label.num_processes")
    _preflight(cfg, plan)
    rows = group_shards(table["prompt_id"].to_pylist(), lab.shard_size)
    digest = plan_digest(plan)
    stores = {role: Shards(plan, f"label-{role}", len(rows), digest) for role in _roles(cfg)}
    todo = {role: s.missing() for role, s in stores.items()}
    for role, s in stores.items():
        if len(todo[role]) < s.count:
            print(f"label round {plan.round} {role}: {s.count - len(todo[role])} of {s.count} shards already "
                  f"written, scoring {len(todo[role])}", flush=True)  # fmt: skip
    started, ranks = time.monotonic(), {}
    if any(todo.values()):
        ranks = launch.run("label", cfg, plan, n, _score_worker, {"todo": todo, "digest": digest},
                           hostfile=cfg.train.hostfile, what="labelling")  # fmt: skip
    scoring_s = time.monotonic() - started
    scores, too_long = {}, np.zeros(table.num_rows, dtype=bool)
    tokens, span = 0, 0.0
    for role, s in stores.items():
        got = s.read(SCORES)
        row = got["row"].to_numpy()
        scores[role] = np.full(table.num_rows, np.nan)
        scores[role][row] = got["value"].to_numpy(zero_copy_only=False)
        too_long[row] |= got["too_long"].to_numpy(zero_copy_only=False)
        if fresh := [s.record(i) for i in todo[role]]:  # first shard's start to last shard's end, per model
            tokens += sum(r["tokens"] for r in fresh)
            span += max(r["ended_at"] for r in fresh) - min(r["started_at"] for r in fresh)
    stats = {"processes": launch.world_size(n, cfg.train.hostfile), "zero_stage": lab.zero_stage,
             "shards": len(rows) * len(stores), "shards_reused": sum(s.count - len(todo[r]) for r, s in stores.items()),
             "shards_scored": sum(len(t) for t in todo.values()), "scoring_s": round(scoring_s, 3),
             "scored_tokens": tokens, "tokens_per_s": tokens / span if span else None, **ranks}  # fmt: skip
    return scores, too_long, stats


def _nullable(a: np.ndarray) -> pa.Array:
    return pa.array(a, mask=~np.isfinite(a), type=pa.float64())


def _scalar_stats(rewards: np.ndarray) -> dict[str, Any]:
    scored = rewards[np.isfinite(rewards)]
    return {
        "responses": int(rewards.size),
        "scored": int(scored.size),
        "unscored": int(rewards.size - scored.size),
        "reward_mean": float(scored.mean()) if scored.size else None,
        "reward_std": float(scored.std()) if scored.size else None,
        "reward_min": float(scored.min()) if scored.size else None,
        "reward_max": float(scored.max()) if scored.size else None,
    }


class _Texts:
    """A string column that becomes Python strings one slice at a time (`len` and slicing, as `_python_rewards`
    reads it): the labeller's batches, never the whole column at once."""

    def __init__(self, column: pa.ChunkedArray):
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, part: slice) -> list[str]:
        return self.column[part].to_pylist()


def _python_rewards(cfg: RunConfig, prompts: list[str], responses: list[str]) -> np.ndarray:
    assert cfg.label.python_reward is not None
    fn = load_reward_fn(cfg.label.python_reward)
    n = len(prompts)
    rewards = np.full(n, np.nan)
    for start in range(0, n, cfg.label.batch_size):
        stop = min(start + cfg.label.batch_size, n)
        try:
            out = list(fn(prompts[start:stop], responses[start:stop]))
        except Exception as e:  # noqa: BLE001 (the user's code: say whose, which exception, on which rows)
            raise ValueError(
                f"label.python_reward={cfg.label.python_reward} raised {type(e).__name__}: {e} "
                f"(on responses {start}-{stop - 1} of {n}; DICE_DEBUG=1 shows the traceback)"
            ) from e
        if len(out) != stop - start:
            raise ValueError(
                f"label.python_reward={cfg.label.python_reward}: returned {len(out)} scores for {stop - start} responses"
            )
        rewards[start:stop] = [math.nan if x is None else float(x) for x in out]
    return rewards


def _make_judges(cfg: RunConfig, plan: StagePlan, engines: dict[str, Any]) -> list[tuple[str | None, Any]]:
    """(vLLM model or None, factory(llm) -> judge) per annotator, in config order; templates checked up front."""
    from pipeline.method.judges import HttpJudge, PythonJudge, VllmJudge, load_template
    from pipeline.method.rewards import load_callable

    made: list[tuple[str | None, Any]] = []
    for i, (jid, j) in enumerate(zip(cfg.label.judge_ids(), cfg.label.judges)):
        if j.backend == "python":
            fn = load_callable(str(j.function), f"label.judges[{i}].function")
            made.append((None, lambda _llm, jid=jid, j=j, fn=fn: PythonJudge(jid, j, fn)))
            continue
        template = load_template(plan.inputs[f"template:{jid}"])
        if j.backend == "http":
            judge = HttpJudge(jid, j, template)  # checks the URL and that the key's variable is set
            made.append((None, lambda _llm, judge=judge: judge))
            continue
        model = str(plan.inputs[f"judge:{jid}"])

        def local(llm: Any, jid: str = jid, j: Any = j, template: Any = template, model: str = model) -> Any:
            from transformers import AutoTokenizer

            from pipeline.data.models import local_model

            tokenizer = AutoTokenizer.from_pretrained(local_model(model), trust_remote_code=cfg.label.trust_remote_code)
            return VllmJudge(jid, j, template, llm, tokenizer, model)

        made.append((model, local))
    return made


# ---------------------------------------------------------------------------------------------- judges, sharded
# Judges compare every pair of a prompt's uncut responses. The prompts are cut into shards of `label.shard_size`
# (pipeline.data.shards) and the annotators grouped by the engine they need: one group per local vLLM judge model, one
# for python and http judges (no engine). Each group writes its own set of shards (`label-judges-<g>`: the group's
# verdicts on the shard's comparisons). A vLLM group runs on `label.engine.data_parallel_size` engine processes
# (pipeline.compute.launch.engine_workers, each on its own tensor_parallel_size GPUs, as generate does), engine w taking
# missing shards w, w+N, ...; with one engine, and for the other group, the shards are judged in this process.

VERDICTS = pa.schema([("comparison", pa.int64()), ("annotator", pa.int32()), ("p_ab", pa.float64()),
                      ("p_ba", pa.float64()), ("p", pa.float64()), ("error", pa.string()), ("error_detail", pa.string()),
                      ("attempts", pa.int32())])  # fmt: skip
JUDGE_SHARDS = "--judge-shards"  # an engine process's argument: GROUP:SHARD,SHARD,...


def _comparisons(table: pa.Table, shard_size: int):
    """The judges' work: (the table's columns, label errors so far, judged rows per prompt, every unordered pair
    (a, b) of a prompt's judged responses with a before b in sample order, the comparisons of each shard)."""
    d = table.select(["prompt_id", "prompt", "response", "sample_idx", "finish_reason"]).to_pydict()
    errors: list[str | None] = [None] * table.num_rows
    groups: dict[str, list[int]] = defaultdict(list)
    for i, reason in enumerate(d["finish_reason"]):
        if reason == "length":
            errors[i] = "cut"  # never a pair (pairs drops cut responses): not worth a judge's time
        else:
            groups[d["prompt_id"][i]].append(i)
    comps: list[tuple[int, int]] = []
    shards: list[range] = []
    for rows in group_shards(d["prompt_id"], shard_size):  # whole prompts, in first-seen order
        start = len(comps)
        for pid in dict.fromkeys(d["prompt_id"][r] for r in rows):
            comps += itertools.combinations(sorted(groups.get(pid, []), key=lambda r: d["sample_idx"][r]), 2)
        shards.append(range(start, len(comps)))
    return d, errors, groups, comps, shards


def _judge_groups(factories: list[tuple[str | None, Any]]) -> list[tuple[str | None, list[int]]]:
    """(vLLM judge model, or None for python/http judges; the annotators it serves), in config order."""
    return [(m, [i for i, (mm, _) in enumerate(factories) if mm == m]) for m in dict.fromkeys(m for m, _ in factories)]


def _judge_shards(cfg: RunConfig, plan: StagePlan, g: int, shard_ids: list[int], llm: Any, digest: str,
                  work: tuple | None = None, factories: list | None = None, who: str = "") -> None:  # fmt: skip
    """Judge group g's annotators on the given shards' comparisons, each shard written as it ends.

    llm: the group's engine (None for python/http judges). work / factories: `_comparisons` and `_make_judges` of
    the caller, when it has them (an engine process computes its own)."""
    from pipeline.method.judges import compare

    if work is None:
        work = _comparisons(read_parquet(plan.inputs["responses"], schemas.RESPONSES), cfg.label.shard_size)
    d, _, _, comps, shards = work
    factories = factories or _make_judges(cfg, plan, {})
    model, members = _judge_groups(factories)[g]
    judges = [factories[i][1](llm) for i in members]
    store = Shards(plan, f"label-judges-{g}", len(shards), digest)
    n_prompts = [len({d["prompt_id"][a] for a, _ in (comps[c] for c in cs)}) for cs in shards]
    progress = Progress(f"label round {plan.round} judges {model or 'python/http'}{who}", len(shard_ids),
                        sum(n_prompts[s] for s in shard_ids), "prompts", bar=not who)  # fmt: skip
    for s in shard_ids:
        started, started_at = time.monotonic(), time.time()
        cs = list(shards[s])
        questions = [(d["prompt"][a], d["response"][a], d["response"][b]) for a, b in (comps[c] for c in cs)]
        cols: dict[str, list] = {name: [] for name in VERDICTS.names}
        for i, judge in zip(members, judges):
            for c, r in zip(cs, compare(judge, questions) if questions else []):
                for name, value in (("comparison", c), ("annotator", i), ("p_ab", r.p_ab), ("p_ba", r.p_ba), ("p", r.p),
                                    ("error", r.error), ("error_detail", r.detail), ("attempts", r.attempts)):  # fmt: skip
                    cols[name].append(value)
        seconds = round(time.monotonic() - started, 3)
        requests = 2 * len(cs) * len(members)
        store.write(s, pa.table(cols, schema=VERDICTS), VERDICTS, comparisons=len(cs), requests=requests,
                    seconds=seconds, started_at=started_at)  # fmt: skip
        progress.shard_done(s, n_prompts[s], requests, None, seconds)
    progress.close()


def _judge_labels(cfg: RunConfig, plan: StagePlan, table: pa.Table, engines: dict[str, Any]):
    """Every judge on every pair of a prompt's uncut responses, both orders, shard by shard.

    Returns:
        (rewards, label errors, the PREFERENCES table, stats).
    """
    from pipeline.compute import launch
    from pipeline.compute.engine import make_llm, release
    from pipeline.config import save_config
    from pipeline.method.judges import Comparison, bradley_terry, copeland

    lab, k = cfg.label, plan.round
    work = _comparisons(table, lab.shard_size)
    d, errors, groups, comps, shards = work
    n = table.num_rows
    factories = _make_judges(cfg, plan, engines)  # templates, URLs and keys checked before anything runs
    digest = plan_digest(plan)
    n_engines = 1 if engines else lab.engine.resolved_data_parallel_size()
    stores = [Shards(plan, f"label-judges-{g}", len(shards), digest) for g in range(len(_judge_groups(factories)))]
    reused = judged = 0
    for g, (model, _) in enumerate(_judge_groups(factories)):
        missing = stores[g].missing()
        reused, judged = reused + stores[g].count - len(missing), judged + len(missing)
        if len(missing) < stores[g].count:
            print(f"label round {k} judges {model or 'python/http'}: {stores[g].count - len(missing)} of "
                  f"{stores[g].count} shards already written, judging {len(missing)}", flush=True)  # fmt: skip
        if not missing:
            continue
        if model is not None and n_engines > 1 and len(missing) > 1:
            conf = stores[g].dir / "config.yaml"
            save_config(cfg, conf)  # the exact config of this process (overrides included), for the engines
            cmds = [[sys.executable, "-m", "stages.label", str(conf), "--round", str(k), JUDGE_SHARDS,
                     f"{g}:{','.join(map(str, mine))}"] for w in range(n_engines) if (mine := assign(missing, w, n_engines))]  # fmt: skip
            launch.engine_workers(cmds, lab.engine.tensor_parallel_size,
                                  lambda w, line: line and print(f"[engine {w}] {line}", flush=True), "label judges",
                                  "label.engine")  # fmt: skip
            continue
        llm = None
        if model is not None:  # one engine per judge model, released before the next starts
            llm = engines.get(model) or make_llm(model, lab.engine, dtype=cfg.model.dtype, seed=cfg.seed,
                                                 trust_remote_code=lab.trust_remote_code)  # fmt: skip
        try:
            _judge_shards(cfg, plan, g, missing, llm, digest, work, factories)
        finally:
            if model is not None and model not in engines:
                release(llm)
    results: dict[int, list[Any]] = {i: [None] * len(comps) for i in range(len(factories))}
    for store in stores:
        for v in store.read(VERDICTS).to_pylist():
            results[v["annotator"]][v["comparison"]] = Comparison(v["p_ab"], v["p_ba"], v["p"], v["error"],
                                                                  v["error_detail"], v["attempts"])  # fmt: skip

    ids = lab.judge_ids()
    cols: dict[str, list] = {name: [] for name in schemas.PREFERENCES.names}
    p_sum, p_cnt = np.zeros(len(comps)), np.zeros(len(comps), dtype=int)
    by_reason: Counter[str] = Counter()
    per_annotator: dict[str, dict[str, int]] = {}
    attempts = 0
    for i, jid in enumerate(ids):
        ok = failed = 0
        for c, ((a, b), r) in enumerate(zip(comps, results[i])):
            cols["prompt_id"].append(d["prompt_id"][a])
            cols["idx_a"].append(d["sample_idx"][a])
            cols["idx_b"].append(d["sample_idx"][b])
            cols["annotator"].append(jid)
            cols["p_ab"].append(r.p_ab)
            cols["p_ba"].append(r.p_ba)
            cols["p"].append(r.p)
            cols["error"].append(r.error)
            cols["error_detail"].append(r.detail)
            cols["attempts"].append(r.attempts)
            cols["round"].append(k)
            attempts += r.attempts
            if r.p is None:
                failed += 1
                by_reason[str(r.error)] += 1
            else:
                ok += 1
                p_sum[c] += r.p
                p_cnt[c] += 1
        per_annotator[jid] = {"ok": ok, "failed": failed}
        if comps and not ok:
            print(f"dice label: warning: annotator {jid} failed on all {failed} comparisons", file=sys.stderr)
    n_cmp = len(comps) * len(ids)
    n_failed = sum(by_reason.values())
    if n_cmp and n_failed == n_cmp:
        for store in stores:  # a configuration error (wrong URL, model, key, server down): nothing worth resuming
            store.remove()
        reason = by_reason.most_common(1)[0][0]
        detail = next(x for x, e in zip(cols["error_detail"], cols["error"]) if e == reason)
        raise ValueError(
            f"label: every judge comparison failed ({n_cmp}; most often {reason}: {detail}); check label.judges"
        )

    # Ranking per prompt from p̂ = mean over annotators (comparisons with fewer than min_annotators excluded)
    rewards = np.full(n, np.nan)
    counted = p_cnt >= lab.min_annotators
    p_hat = np.where(counted, p_sum / np.maximum(p_cnt, 1), np.nan)
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for c, (a, _) in enumerate(comps):
        by_prompt[d["prompt_id"][a]].append(c)
    for pid, rows in groups.items():
        local = {r: x for x, r in enumerate(rows)}
        cs = [c for c in by_prompt.get(pid, []) if counted[c]]
        ii = np.array([local[comps[c][0]] for c in cs], dtype=int)
        jj = np.array([local[comps[c][1]] for c in cs], dtype=int)
        pp = p_hat[cs] if cs else np.zeros(0)
        if lab.ranking == "bradley_terry":
            scores = bradley_terry(len(rows), ii, jj, pp, lab.ranking_prior)
        else:
            scores = copeland(len(rows), ii, jj, pp)
        for r, s in zip(rows, scores):
            rewards[r] = s
            if not np.isfinite(s):
                errors[r] = "no_comparisons"
    prefs = pa.table(cols, schema=schemas.PREFERENCES)
    stats = {
        "annotators": len(ids),
        "comparisons": n_cmp,
        "comparisons_ok": n_cmp - n_failed,
        "comparisons_failed": n_failed,
        "failures_by_reason": dict(by_reason),
        "per_annotator": per_annotator,
        "requests": 2 * n_cmp,
        "attempts": attempts,
        "retries": attempts - 2 * n_cmp,
        "pairs_compared": len(comps),
        "pairs_below_min_annotators": int((~counted).sum()),
        "not_judged_cut": errors.count("cut"),
        "ranking": lab.ranking,
        "shards": sum(st.count for st in stores),
        "shards_reused": reused,
        "shards_judged": judged,
        "engines": n_engines,
    }
    return rewards, errors, prefs, stats


def run(cfg: RunConfig, plan: StagePlan, engines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Label round k's responses. `engines`: started vLLM engines by judge model path (tests, notebooks)."""
    table = read_parquet(plan.inputs["responses"], schemas.RESPONSES)
    n = table.num_rows
    errors: list[str | None] = [None] * n
    policy_logps = ref_logps = np.full(n, np.nan)
    prefs = pa.table({name: [] for name in schemas.PREFERENCES.names}, schema=schemas.PREFERENCES)
    extra: dict[str, Any] = {}

    labeller = cfg.label.labeller
    if labeller in ("implicit_reward", "reward_model"):
        scores, too_long, extra = _sharded_scores(cfg, plan, table)
        if labeller == "implicit_reward":
            policy_logps, ref_logps = scores["policy"], scores["reference"]
            rewards = implicit_reward(policy_logps, ref_logps, cfg.train.beta)
        else:
            rewards = scores["reward_model"]
        for i in np.flatnonzero(too_long):
            errors[i] = "too_long"
    elif labeller == "judge":
        rewards, errors, prefs, extra = _judge_labels(cfg, plan, table, engines or {})
    else:
        rewards = _python_rewards(cfg, _Texts(table["prompt"]), _Texts(table["response"]))
    for i in np.flatnonzero(~np.isfinite(rewards)):
        errors[i] = errors[i] or "non_finite"

    labelled = table.append_column("policy_logp", _nullable(policy_logps))
    labelled = labelled.append_column("reference_logp", _nullable(ref_logps))
    labelled = labelled.append_column("reward", _nullable(rewards))
    labelled = labelled.append_column("labeller", pa.array([labeller] * n, pa.string()))
    labelled = labelled.append_column("label_error", pa.array(errors, pa.string()))
    write_parquet(labelled, plan.outputs["labels"], schemas.LABELS)
    write_parquet(prefs, plan.outputs["preferences"], schemas.PREFERENCES)
    shard_sets = [f"label-{role}" for role in _roles(cfg)] + [f"label-judges-{g}" for g in range(len(cfg.label.judges))]
    for name in shard_sets:  # labels.parquet and preferences.parquet now hold every shard
        Shards(plan, name, 0, digest="").remove()
    return {**_scalar_stats(rewards), **extra}


def _judge_engine_main(argv: list[str]) -> None:
    """An engine process of a judge group: `python -m stages.label CONF --round K --judge-shards G:I,J,...`."""
    import argparse
    import os

    from pipeline.compute.engine import engine
    from pipeline.config import ConfigError, load_config
    from pipeline.data.artifacts import ArtifactError
    from pipeline.run import rounds

    ap = argparse.ArgumentParser(prog="python -m stages.label", description="Judge some shards of one round.")
    ap.add_argument("config")
    ap.add_argument("--round", type=int, required=True, dest="round_")
    ap.add_argument(JUDGE_SHARDS, required=True, dest="shards", help="GROUP:SHARD,SHARD,...")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        plan = rounds.plan(cfg, args.round_, "label")
        g, _, ids = args.shards.partition(":")
        factories = _make_judges(cfg, plan, {})
        model = _judge_groups(factories)[int(g)][0]
        with engine(str(model), cfg.label.engine, dtype=cfg.model.dtype, seed=cfg.seed,
                    trust_remote_code=cfg.label.trust_remote_code) as llm:  # fmt: skip
            _judge_shards(cfg, plan, int(g), [int(i) for i in ids.split(",")], llm, plan_digest(plan),
                          factories=factories, who=f" (engine pid {os.getpid()})")  # fmt: skip
    except (ConfigError, ArtifactError, ValueError, RuntimeError) as e:
        if os.environ.get("DICE_DEBUG"):
            raise
        print(f"dice label: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if "--worker" in sys.argv:  # one rank of the scoring (pipeline.compute.launch)
        from stages.common import worker_main

        worker_main("label", _score_worker)
    elif any(a == JUDGE_SHARDS or a.startswith(JUDGE_SHARDS + "=") for a in sys.argv):  # a judge engine process
        _judge_engine_main(sys.argv[1:])
    else:
        from stages.common import main

        main("label", run)
