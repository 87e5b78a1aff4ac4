"""Stage `generate`: K sampled responses per prompt from the current policy.

Reads the prompt file and π_{k-1} (and π_0 for IPO-MD's mixture); writes `responses.parquet` (RESPONSES).

- Prompts: round k takes the k-th consecutive slice of `data.prompts_per_round` prompts (wrapping around), as
  the paper uses a fresh part of the prompt set per iteration. Each prompt goes through the chat template
  (`pipeline.logprobs.prompt_ids`); prompts longer than `model.max_prompt_tokens` or than the model's context
  are dropped and counted (`prompts_too_long`, the first ids in `too_long_ids`).
- Seeds: each prompt has its own seed, from (run seed, round, prompt_id), so its samples do not depend on
  which prompts share its batch: same seeds and config, same responses.
- Shards: the round's prompts are cut into shards of `generate.shard_size`, in order. Each shard is generated
  by one engine call and written, as it completes, to `.dice/generate-shards/shard-NNNNN.parquet` with a
  done-record `shard-NNNNN.json` (written last) holding the plan's digest; shards whose record carries another
  digest (another config, model or prompt file) are never reused. A killed generation re-run generates only
  the missing shards; `responses.parquet` is then the shards concatenated in prompt order, the same table as
  an uninterrupted run, and the shard folder is removed.
- Engines: `generate.sampler: vllm` uses vLLM (tensor parallel from `engine.tensor_parallel_size`, prefix
  caching for the K samples). With `engine.data_parallel_size` > 1 this process starts that many engine
  processes, each with its own CUDA_VISIBLE_DEVICES, that share out the missing shards (every N-th one).
  `sampler: mixture` samples IPO-MD's geometric mixture of π_{k-1} and π_0 (pipeline/mixture.py).
- Progress: a bar when stdout is a terminal, otherwise one line per finished shard (what the Prefect task
  streams into its logs). In-process use (`run(cfg, plan)` from Python) releases the engine it started
  before returning; the flow runs every stage in its own process anyway.

    python -m stages.generate conf/tiny.yaml --round 1
    python -m stages.generate conf/tiny.yaml --round 1 --shards 0,2,4   # only those shards (engine workers,
                                                                         # the flow's shard fan-out); no output table
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schemas
from pipeline.artifacts import (
    MANIFEST_DIR,
    StagePlan,
    plan_digest,
    read_manifest,
    write_json_atomic,
    write_parquet,
)
from pipeline.config import RunConfig, save_config
from pipeline.chat import messages_column, prompts_of
from pipeline.datasets import read_prompts

SHARD_RESULT = (
    "DICE_SHARD_DONE "  # the line an engine worker prints per finished shard (parsed by the parent)
)


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


# ---------------------------------------------------------------------------------------------- shards


def shard_dir(plan: StagePlan) -> Path:
    return plan.round_dir / MANIFEST_DIR / "generate-shards"


def shard_paths(plan: StagePlan, i: int) -> tuple[Path, Path]:
    """(the shard's Parquet, its done-record)."""
    d = shard_dir(plan)
    return d / f"shard-{i:05d}.parquet", d / f"shard-{i:05d}.json"


def round_prompts(cfg: RunConfig, plan: StagePlan) -> pa.Table:
    return select_prompts(read_prompts(cfg.data.prompts), plan.round, cfg.data.prompts_per_round)


def shard_slices(n_prompts: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) prompt ranges of the shards, in prompt order."""
    return [(s, min(s + shard_size, n_prompts)) for s in range(0, n_prompts, shard_size)]


def done_record(plan: StagePlan, i: int, digest: str) -> dict[str, Any] | None:
    """The shard's done-record when the shard is complete for this exact plan, else None."""
    table, record = shard_paths(plan, i)
    rec = read_manifest(record)
    if rec is None or rec.get("digest") != digest or not table.is_file():
        return None
    return rec


def missing_shards(cfg: RunConfig, plan: StagePlan) -> list[int]:
    """Indices of the round's shards not yet written for this plan (what a re-run or the fan-out generates)."""
    digest = plan_digest(plan)
    n = len(shard_slices(round_prompts(cfg, plan).num_rows, cfg.generate.shard_size))
    return [i for i in range(n) if done_record(plan, i, digest) is None]


# ---------------------------------------------------------------------------------------------- progress


class Progress:
    """Shards done / prompts / tokens/s: a tqdm bar on a terminal, else one plain line per shard."""

    def __init__(self, k: int, n_shards: int, n_prompts: int, done_shards: int, done_prompts: int):
        self.k, self.n_shards, self.n_prompts = k, n_shards, n_prompts
        self.shards, self.prompts, self.tokens = done_shards, done_prompts, 0
        self.started = time.monotonic()
        self.bar = None
        if sys.stdout.isatty() and not os.environ.get("TQDM_DISABLE"):
            from tqdm import tqdm

            self.bar = tqdm(total=n_prompts, initial=done_prompts, desc=f"generate round {k}", unit="prompt")

    def shard_done(self, rec: dict[str, Any]) -> None:
        self.shards += 1
        self.prompts += rec["prompts_total"]
        self.tokens += rec["tokens"]
        rate = rec["tokens"] / max(rec["seconds"], 1e-9)  # the shard's own generation rate (no engine start)
        if self.bar is not None:
            self.bar.update(rec["prompts_total"])
            self.bar.set_postfix_str(f"shards {self.shards}/{self.n_shards}, {rate:,.0f} tok/s")
        else:
            print(
                f"generate round {self.k}: shard {rec['shard']} done; shards {self.shards}/{self.n_shards}, "
                f"prompts {self.prompts}/{self.n_prompts}, {self.tokens} tokens, {rate:,.0f} tok/s, "
                f"{time.monotonic() - self.started:.0f} s elapsed",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------- samplers


def _context_limit(cfg: RunConfig, policy: str) -> int:
    """The longest prompt+response the engine accepts: engine.max_model_len, else the model's positions."""
    if cfg.generate.engine.max_model_len:
        return cfg.generate.engine.max_model_len
    from transformers import AutoConfig

    from pipeline.models import local_model

    mc = AutoConfig.from_pretrained(local_model(policy), trust_remote_code=cfg.model.trust_remote_code)
    mc = getattr(mc, "text_config", None) or mc
    return int(getattr(mc, "max_position_embeddings", None) or 1 << 30)


class _VllmSampler:
    """K samples per prompt with vLLM: one `generate` call per shard (one seed per prompt)."""

    def __init__(self, cfg: RunConfig, policy: str, llm: Any = None):
        from pipeline.engine import make_llm

        self.cfg, self.owned = cfg, llm is None
        self.llm = (
            llm
            if llm is not None
            else make_llm(
                policy,
                cfg.generate.engine,
                dtype=cfg.model.dtype,
                seed=cfg.seed,
                trust_remote_code=cfg.model.trust_remote_code,
            )
        )

    def sample(self, ids: list[list[int]], seeds: list[int]) -> list[list[dict[str, Any]]]:
        from vllm import SamplingParams, TokensPrompt

        g = self.cfg.generate
        params = [
            SamplingParams(n=g.num_samples, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens, seed=s,
                           stop=g.stop or None, stop_token_ids=g.stop_token_ids or None, logprobs=0)
            for s in seeds
        ]  # fmt: skip
        results = self.llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
        return [
            [
                {"text": o.text, "num_tokens": len(o.token_ids), "finish_reason": o.finish_reason or "unknown",
                 "cumulative_logprob": o.cumulative_logprob}
                for o in r.outputs
            ]
            for r in results
        ]  # fmt: skip

    def close(self) -> None:
        if self.owned:
            del self.llm
            gc.collect()


class _MixtureSampler:
    """K samples per prompt from π_{k-1}^(1-β_m)·π_0^(β_m) (pipeline/mixture.py), both models in transformers."""

    def __init__(self, cfg: RunConfig, policy: str, reference: str, tokenizer, context: int):
        from pipeline.logprobs import load_causal_lm
        from pipeline.mixture import MixtureSampler

        g = cfg.generate
        self.cfg, self.tokenizer = cfg, tokenizer
        pol, _ = load_causal_lm(policy, cfg.model.dtype, cfg.model.trust_remote_code)
        ref, _ = load_causal_lm(reference, cfg.model.dtype, cfg.model.trust_remote_code)
        v_pol, v_ref = pol.get_output_embeddings().out_features, ref.get_output_embeddings().out_features
        if v_pol != v_ref:
            raise ValueError(f"model {reference}: vocabulary of {v_ref} tokens, but the policy {policy} has {v_pol}; "
                             "the mixture needs both models on one tokenizer")  # fmt: skip
        eos = {tokenizer.eos_token_id, *g.stop_token_ids}
        gen_eos = getattr(pol.generation_config, "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.eos = {int(e) for e in eos if e is not None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.sampler = MixtureSampler(pol, ref, beta=g.mixture_beta, eos_ids=sorted(self.eos), pad_id=pad,
                                      max_context=context)  # fmt: skip

    def _text(self, token_ids: list[int]) -> str:
        text = self.tokenizer.decode([t for t in token_ids if t not in self.eos], skip_special_tokens=True)
        cuts = [text.find(s) for s in self.cfg.generate.stop if s in text]
        return text[: min(cuts)] if cuts else text  # as vLLM: the stop string itself is not in the text

    def _stop_check(self, token_ids: list[int]) -> int | None:
        stops = self.cfg.generate.stop
        if not stops:
            return None
        tail = self.tokenizer.decode(
            token_ids[-16:], skip_special_tokens=True
        )  # a stop string ends in the tail
        return len(token_ids) if any(s in tail for s in stops) else None

    def sample(self, ids: list[list[int]], seeds: list[int]) -> list[list[dict[str, Any]]]:
        g = self.cfg.generate
        results = self.sampler.generate(ids, seeds, num_samples=g.num_samples, temperature=g.temperature, top_p=g.top_p,
                                        max_tokens=g.max_tokens, batch_size=g.mixture_batch_size,
                                        stop_check=self._stop_check if g.stop else None)  # fmt: skip
        return [
            [{"text": self._text(s.token_ids), "num_tokens": len(s.token_ids), "finish_reason": s.finish_reason,
              "cumulative_logprob": s.cumulative_logprob} for s in samples]
            for samples in results
        ]  # fmt: skip

    def close(self) -> None:
        del self.sampler
        gc.collect()


# ---------------------------------------------------------------------------------------------- generation


def _load_tokenizer(cfg: RunConfig, policy: str):
    from transformers import AutoTokenizer

    from pipeline.logprobs import require_model

    folder = require_model(policy)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"model {policy}: its tokenizer could not be loaded ({e})") from e


def generate_shards(cfg: RunConfig, plan: StagePlan, shard_ids: list[int], *, llm: Any = None,
                    on_done=None) -> list[dict[str, Any]]:  # fmt: skip
    """Generate the given shards (skipping any already done), writing each shard's Parquet then its record.

    Returns the done-records of the shards generated here. `on_done(record)` is called after each shard.
    """
    from pipeline.logprobs import prompt_ids

    k, policy, g = plan.round, str(plan.inputs["policy"]), cfg.generate
    digest = plan_digest(plan)
    prompts = round_prompts(cfg, plan)
    slices = shard_slices(prompts.num_rows, g.shard_size)
    todo = [i for i in shard_ids if done_record(plan, i, digest) is None]
    if not todo:
        return []
    tokenizer = _load_tokenizer(cfg, policy)
    context = _context_limit(cfg, policy)
    limit = min(cfg.model.max_prompt_tokens, context - 1)  # at least one response token must fit
    if g.sampler == "mixture":
        reference = str(plan.inputs["mixture_reference"])
        _load_tokenizer(cfg, reference)  # names the reference if it is missing
        sampler: Any = _MixtureSampler(cfg, policy, reference, tokenizer, context)
    else:
        sampler = _VllmSampler(cfg, policy, llm)
    records = []
    try:
        for i in todo:
            started, started_at = time.monotonic(), time.time()
            start, end = slices[i]
            part = prompts.slice(start, end - start)
            kept, too_long = [], []
            for pid, text, prompt in zip(part["prompt_id"].to_pylist(), part["prompt"].to_pylist(), prompts_of(part)):
                ids = prompt_ids(tokenizer, prompt)  # the whole conversation under the policy's chat template
                (too_long if len(ids) > limit else kept).append((pid, text, ids, prompt))
            seeds = [prompt_seed(cfg.seed, k, pid) for pid, _, _, _ in kept]
            outputs = sampler.sample([ids for _, _, ids, _ in kept], seeds) if kept else []
            cols: dict[str, list] = {name: [] for name in schemas.RESPONSES.names}
            for (pid, text, _, prompt), seed, outs in zip(kept, seeds, outputs):
                for j, out in enumerate(outs):
                    cols["prompt_id"].append(pid)
                    cols["prompt"].append(text)
                    cols["prompt_messages"].append(messages_column([prompt])[0])
                    cols["sample_idx"].append(j)
                    cols["response"].append(out["text"])
                    cols["num_tokens"].append(out["num_tokens"])
                    cols["num_chars"].append(len(out["text"]))
                    cols["finish_reason"].append(out["finish_reason"])
                    cols["cumulative_logprob"].append(out["cumulative_logprob"])
                    cols["seed"].append(seed)
                    cols["model"].append(policy)
                    cols["round"].append(k)
            table_path, record_path = shard_paths(plan, i)
            rows = write_parquet(pa.table(cols, schema=schemas.RESPONSES), table_path, schemas.RESPONSES)
            rec = {
                "digest": digest, "shard": i, "prompts_total": end - start, "prompts": len(kept),
                "prompts_too_long": len(too_long), "too_long_ids": [pid for pid, _, _, _ in too_long][:20],
                "responses": rows, "tokens": sum(cols["num_tokens"]),
                "finish_length": cols["finish_reason"].count("length"),
                "seconds": round(time.monotonic() - started, 3), "started_at": started_at, "ended_at": time.time(),
                "host": socket.gethostname(), "pid": os.getpid(),
            }  # fmt: skip
            write_json_atomic(record_path, rec)  # last: its existence means the shard is complete
            records.append(rec)
            if on_done is not None:
                on_done(rec)
    finally:
        sampler.close()
    return records


def _worker_env(w: int, tp: int) -> dict[str, str]:
    """Engine worker w's environment: its own tensor_parallel_size GPUs (CUDA_VISIBLE_DEVICES)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    import torch

    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(d) for d in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[w * tp : (w + 1) * tp])
    return env


def _run_engine_workers(
    cfg: RunConfig, plan: StagePlan, missing: list[int], n: int, progress: Progress
) -> None:
    """Data parallelism: n engine processes (`--shards`), worker w taking missing shards w, w+n, w+2n, …"""
    conf = shard_dir(plan) / "config.yaml"
    save_config(cfg, conf)  # the exact config of this process (overrides included), for the workers
    procs, tails, lock = [], [], threading.Lock()

    def pump(w: int, proc: subprocess.Popen, tail: deque[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            with lock:
                if line.startswith(SHARD_RESULT):
                    progress.shard_done(json.loads(line.removeprefix(SHARD_RESULT)))
                elif line:
                    print(f"[engine {w}] {line}", flush=True)

    threads = []
    for w in range(n):
        mine = missing[w::n]
        if not mine:
            continue
        cmd = [sys.executable, "-m", "stages.generate", str(conf), "--round", str(plan.round),
               "--shards", ",".join(map(str, mine))]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=_worker_env(w, cfg.generate.engine.tensor_parallel_size))  # fmt: skip
        tail: deque[str] = deque(maxlen=20)
        t = threading.Thread(target=pump, args=(w, proc, tail), daemon=True)
        t.start()
        procs.append(proc), tails.append(tail), threads.append(t)
    failed = None
    try:
        for w, proc in enumerate(procs):
            if proc.wait() != 0 and failed is None:
                failed = w
                for other in procs:  # one engine failed: the round cannot finish, stop the others
                    if other.poll() is None:
                        other.terminate()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for t in threads:
            t.join(timeout=5)
    if failed is not None:
        raise RuntimeError(
            f"generate engine worker {failed} failed. Last output:\n" + "\n".join(tails[failed])
        )


def run(cfg: RunConfig, plan: StagePlan, llm: Any = None) -> dict[str, Any]:
    """Generate round k's responses. `llm`: an already started vLLM engine for the same policy (tests, notebooks)."""
    g = cfg.generate
    digest = plan_digest(plan)
    prompts = round_prompts(cfg, plan)
    slices = shard_slices(prompts.num_rows, g.shard_size)
    done = {i: rec for i in range(len(slices)) if (rec := done_record(plan, i, digest)) is not None}
    missing = [i for i in range(len(slices)) if i not in done]
    progress = Progress(plan.round, len(slices), prompts.num_rows, len(done),
                        sum(done[i]["prompts_total"] for i in done))  # fmt: skip
    if done:
        print(f"generate round {plan.round}: {len(done)} of {len(slices)} shards already written, "
              f"generating {len(missing)}", flush=True)  # fmt: skip
    n_engines = 1 if llm is not None else g.engine.resolved_data_parallel_size()
    try:
        if missing and n_engines > 1 and len(missing) > 1:
            _run_engine_workers(cfg, plan, missing, n_engines, progress)
        elif missing:
            generate_shards(cfg, plan, missing, llm=llm, on_done=progress.shard_done)
    finally:
        progress.close()
    records = [done_record(plan, i, digest) for i in range(len(slices))]
    if any(r is None for r in records):
        lost = [i for i, r in enumerate(records) if r is None]
        raise RuntimeError(f"generate round {plan.round}: shards {lost} were not written")
    table = pa.concat_tables(
        pq.read_table(shard_paths(plan, i)[0], schema=schemas.RESPONSES) for i in range(len(slices))
    )
    n_kept = sum(r["prompts"] for r in records)
    if n_kept == 0:
        raise ValueError(
            f"{plan.inputs['prompts']}: all {prompts.num_rows} prompts of round {plan.round} exceed "
            f"model.max_prompt_tokens={cfg.model.max_prompt_tokens} (or the model's context)"
        )
    rows = write_parquet(table, plan.outputs["responses"], schemas.RESPONSES)
    shutil.rmtree(shard_dir(plan), ignore_errors=True)  # the round's table now holds every shard
    n_tokens = sum(r["tokens"] for r in records)
    fresh = [records[i] for i in missing]
    # wall time from the first generated shard's start to the last one's end (engines in parallel overlap)
    gen_s = max(r["ended_at"] for r in fresh) - min(r["started_at"] for r in fresh) if fresh else 0.0
    return {
        "prompts": n_kept,
        "prompts_too_long": sum(r["prompts_too_long"] for r in records),
        "too_long_ids": [pid for r in records for pid in r["too_long_ids"]][:20],
        "responses": rows,
        "finish_length": sum(r["finish_length"] for r in records),
        "mean_tokens": n_tokens / max(rows, 1),
        "generated_tokens": n_tokens,
        "shards": len(slices),
        "shards_reused": len(done),
        "shards_generated": len(missing),
        "engines": min(n_engines, max(len(missing), 1)),
        "sampler": g.sampler,
        "generation_s": round(gen_s, 3),
        "tokens_per_s": sum(r["tokens"] for r in fresh) / gen_s if gen_s else None,
    }


def _shard_main(argv: list[str]) -> None:
    """`--shards i,j,…`: generate only those shards of the round (no responses.parquet, no manifest)."""
    import argparse

    from pipeline import rounds
    from pipeline.artifacts import ArtifactError
    from pipeline.config import ConfigError, load_config

    ap = argparse.ArgumentParser(
        prog="python -m stages.generate", description="Generate some shards of one round."
    )
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--round", type=int, required=True, dest="round_")
    ap.add_argument("--shards", required=True, help="comma-separated shard indices")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        plan = rounds.plan(cfg, args.round_, "generate")
        ids = [int(s) for s in args.shards.split(",") if s.strip()]
        n = len(shard_slices(round_prompts(cfg, plan).num_rows, cfg.generate.shard_size))
        if bad := [i for i in ids if not 0 <= i < n]:
            raise ValueError(f"--shards {args.shards}: round {args.round_} has shards 0..{n - 1}, not {bad}")

        def report(rec: dict[str, Any]) -> None:
            rate = rec["tokens"] / max(rec["seconds"], 1e-9)
            print(f"generate round {plan.round}: shard {rec['shard']} written ({rec['prompts']} prompts, "
                  f"{rec['responses']} responses, {rec['tokens']} tokens in {rec['seconds']:.1f} s, {rate:,.0f} tok/s)",
                  flush=True)  # fmt: skip
            print(SHARD_RESULT + json.dumps(rec), flush=True)

        generate_shards(cfg, plan, ids, on_done=report)
    except (ConfigError, ArtifactError, ValueError, RuntimeError) as e:
        if os.environ.get("DICE_DEBUG"):
            raise
        print(f"dice generate: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if "--shards" in sys.argv[1:] or any(a.startswith("--shards=") for a in sys.argv[1:]):
        _shard_main(sys.argv[1:])
    else:
        from stages.common import main

        main("generate", run)
