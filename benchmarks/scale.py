"""A DICE round at the paper's scale, without a model: wall time and peak RSS of each stage's data path.

    .venv/bin/python benchmarks/scale.py                          # 20,000 × 16, then 62,500 × 16 (1M responses)
    .venv/bin/python benchmarks/scale.py --sizes 2000x16          # a quick run (seconds)
    .venv/bin/python benchmarks/scale.py --stages pairs           # label, the offline set (once) and pairs only

`conf/recipes/gpu/dice.yaml` labels 20,000 prompts × 16 responses of up to 2,048 tokens per round. This builds
such a round synthetically (no model, no GPU) and runs, each in a fresh process so its peak RSS is its own:

- label: the real stage (`stages.label.run` under `execute`, manifest included) with the python labeller
  (`label.python_reward=benchmarks.scale:crc_reward`, a hash of each response: the stage's own work, not a
  reward function's, is what is measured);
- offline read (once), offline ids (once): what a run does once with its offline set of max(61,000, 2 × prompts)
  pairs, the first time a round needs it (pipeline.data.offline_cache): read and check it (`offline_table`, in
  round 1's pairs stage), then tokenize it after each prompt's chat template with the tiny model's tokenizer
  (`offline_ids`, in round 1's reference stage, before its ranks start: the Rust tokenizer's batch parallelism over
  every core). Every later round reads both back;
- pairs: the real stage (`stages.pairs.run`) as every round runs it once the run has read its offline set, DICE's
  settings (best vs worst, min_valid 8, α in characters, replay γ = 0.5, so every generated pair is kept);
- reference (data): what the reference stage does before any forward pass, summed over all shards: find the run's
  offline ids (`stages.reference._offline_ids`), read pairs.parquet with the offline pairs' ids filled in, cut it
  into shards of whole prompts, and take every pair's token ids (`_pairs_by_shard`, `_encode_pairs`);
- train (data): `stages.train.load_pairs`, the training stage's read of reference.parquet's token ids.

Responses carry token ids as generate stores them (random ids of the texts' token counts, so nothing reads them
as text); reference.parquet has every pair's ids, as the reference stage writes it.

Lengths are UltraFeedback-like: prompts log-normal around 250 characters (σ 0.9, 20-4,000), responses
log-normal around 1,000 characters (σ 0.85) with a long tail cut at 2,048 tokens (8,192 characters: such
responses are `finish_reason: length`), texts cut from the shipped data. For each stage it prints the wall time
of the stage call, the process's peak RSS (VmHWM), its RSS after imports, the in-memory (Arrow) size of the
stage's input table, and (peak − imports) / input. The wall time is the stage call (`execute` for label and pairs):
the plan, made before it, is not in it. Writes `benchmarks/out/scale.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import OUT, RESULT, run_child

STAGES = ("label", "offline read (once)", "offline ids (once)", "pairs", "reference (data)", "train (data)")
MAX_TOKENS, CHARS_PER_TOKEN = 2048, 4


def crc_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward that costs almost nothing (a CRC of the response's head in [0, 1)): the label stage's own work is
    what the benchmark measures, not a reward function's."""
    return [zlib.crc32(r[:64].encode()) / 2**32 for r in responses]


# ---------------------------------------------------------------------------------------------- the synthetic round


def _corpus(min_chars: int) -> str:
    """Text of the shipped data repeated to at least `min_chars` characters."""
    parts = []
    for f in ("data/prompts.jsonl", "data/offline_prefs.jsonl"):
        for line in (REPO / f).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                parts += [row[k] for k in ("prompt", "chosen", "rejected") if k in row]
    text = " ".join(parts)
    return text * (min_chars // len(text) + 1)


def _texts(rng, corpus: str, lengths) -> list[str]:
    starts = rng.integers(0, len(corpus) - int(lengths.max()) - 1, size=len(lengths))
    return [corpus[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist())]


def _ids(seqs: list) -> Any:
    """A list<int32> column of int32 arrays, built from one concatenation (not a Python int per token)."""
    import numpy as np
    import pyarrow as pa

    offsets = np.r_[0, np.cumsum([len(x) for x in seqs])].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(seqs) if seqs else np.zeros(0, np.int32)))


def build_round(root: Path, n_prompts: int, k: int, seed: int, n_offline: int) -> Path:
    """round-1/responses.parquet, an offline set of n_offline pairs, the tokenizer, and the config; returns the config."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import load_config, save_config
    from pipeline.data import schemas

    rng = np.random.default_rng(seed)
    corpus = _corpus(40 << 20)
    tok_dir = OUT / "scale-tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():  # the tiny model's tokenizer (byte-level BPE, chat template)
        from pipeline.run.tiny import build_tokenizer

        build_tokenizer(corpus[: 4 << 20].split(". "), 2048).save_pretrained(tok_dir)
    cfg = load_config(REPO / "conf/tiny.yaml", [
        f"runs_dir={root}", "name=scale", "round0.mode=skip", f"model.policy={tok_dir}", "model.build_tiny_if_missing=false",
        "model.max_length=3072", "model.max_prompt_tokens=1024", f"generate.num_samples={k}", f"data.prompts_per_round={n_prompts}",
        f"data.offline={root / 'offline.parquet'}", "label.labeller=python",
        "label.python_reward=benchmarks.scale:crc_reward", "label.batch_size=1024",
        "pairs.min_valid=8", "pairs.length_unit=chars", "pairs.replay_ratio=0.5",
    ])  # fmt: skip
    rd = root / "scale" / "round-1"
    rd.mkdir(parents=True, exist_ok=True)
    prompt_len = np.clip(rng.lognormal(math.log(250), 0.9, n_prompts), 20, 4000).astype(int)
    prompts = [f"Question {i}: {t}" for i, t in enumerate(_texts(rng, corpus, prompt_len))]
    # token ids as generate stores them (random ids of the texts' token counts: no stage reads them as text)
    prompt_ids = [rng.integers(4, 2048, n // CHARS_PER_TOKEN + 8, dtype=np.int32) for n in prompt_len]
    with pq.ParquetWriter(rd / "responses.parquet", schemas.RESPONSES, compression="zstd") as w:
        step = max(1, 50_000 // k)  # prompts per row group
        for s in range(0, n_prompts, step):
            idx = np.arange(s, min(s + step, n_prompts))
            n = len(idx) * k
            chars = rng.lognormal(math.log(1000), 0.85, n).astype(int).clip(1, None)
            cut = chars >= MAX_TOKENS * CHARS_PER_TOKEN
            chars = chars.clip(None, MAX_TOKENS * CHARS_PER_TOKEN)
            texts = _texts(rng, corpus, chars)
            tokens = np.minimum(-(-chars // CHARS_PER_TOKEN), MAX_TOKENS)
            w.write_table(pa.table({
                "prompt_id": [f"s{i:07d}" for i in idx for _ in range(k)],
                "prompt": [prompts[i] for i in idx for _ in range(k)],
                "sample_idx": np.tile(np.arange(k), len(idx)).astype(np.int32),
                "response": texts, "num_tokens": tokens.astype(np.int32), "num_chars": chars.astype(np.int32),
                "finish_reason": np.where(cut, "length", "stop").tolist(), "cumulative_logprob": -1.5 * tokens,
                "seed": np.repeat(idx, k).astype(np.int64), "model": ["synthetic"] * n, "round": np.ones(n, np.int32),
                "prompt_messages": pa.nulls(n, schemas.MESSAGES),  # single user turns
                "prompt_token_ids": _ids([prompt_ids[i] for i in idx for _ in range(k)]),
                "response_token_ids": _ids([rng.integers(4, 2048, t, dtype=np.int32) for t in tokens]),
            }, schema=schemas.RESPONSES))  # fmt: skip
    offline_len = np.clip(rng.lognormal(math.log(250), 0.9, n_offline), 20, 4000).astype(int)
    offline_prompt = [f"Offline {i}: {t}" for i, t in enumerate(_texts(rng, corpus, offline_len))]
    chosen = _texts(rng, corpus, rng.lognormal(math.log(1000), 0.85, n_offline).astype(int).clip(1, 8000))
    rejected = _texts(rng, corpus, rng.lognormal(math.log(800), 0.85, n_offline).astype(int).clip(1, 8000))
    rejected = [r if r != c else r + "." for c, r in zip(chosen, rejected)]
    pq.write_table(pa.table({"prompt": offline_prompt, "chosen": chosen, "rejected": rejected}), root / "offline.parquet")
    conf = root / "config.yaml"
    save_config(cfg, conf)
    return conf


def write_reference_input(conf: Path) -> None:
    """reference.parquet for the train (data) step: pairs.parquet + token counts + placeholder log-probs (training
    reads the log-probs and re-tokenizes the texts itself)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.data import schemas
    from pipeline.data.artifacts import write_parquet
    from pipeline.run import rounds

    cfg = load_config(conf)
    rd = rounds.round_dir(cfg, 1)
    t = pq.read_table(rd / "pairs.parquet")
    n = t.num_rows
    c = pa.compute.utf8_length(t["chosen"]).to_numpy() // CHARS_PER_TOKEN + 1
    r = pa.compute.utf8_length(t["rejected"]).to_numpy() // CHARS_PER_TOKEN + 1
    rng = np.random.default_rng(0)
    # every row of reference.parquet has its ids (the reference stage tokenised the offline pairs): random ones of
    # those lengths where pairs.parquet has none
    p = pa.compute.utf8_length(t["prompt"]).to_numpy() // CHARS_PER_TOKEN + 8
    for name, lengths in (("prompt_token_ids", p), ("chosen_token_ids", c), ("rejected_token_ids", r)):
        have = t[name].is_valid().to_numpy(zero_copy_only=False)
        stored = t[name].to_pylist()
        filled = [x if h else rng.integers(4, 2048, n, dtype=np.int32) for x, h, n in zip(stored, have, lengths)]
        t = t.set_column(t.schema.get_field_index(name), name, _ids([np.asarray(x, np.int32) for x in filled]))
    for name, value in (("chosen_tokens", c.astype(np.int32)), ("rejected_tokens", r.astype(np.int32)),
                        ("ref_chosen_logps", -1.5 * c + rng.normal(size=n)), ("ref_rejected_logps", -1.5 * r + rng.normal(size=n))):  # fmt: skip
        t = t.append_column(name, pa.array(value))
    write_parquet(t, rd / "reference.parquet", schemas.REFERENCE)


# ---------------------------------------------------------------------------------------------- one stage, one process


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MiB: VmRSS (resident now) or VmHWM (the peak of this program).

    Not `ru_maxrss`: Linux keeps the forked parent's resident size in it across exec, so a child of a large
    parent would report the parent's size; VmHWM belongs to the program's own address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the peak so far


def child(stage: str, conf: str) -> None:
    """Run one stage's data path in this (fresh) process and print its result line."""
    import importlib

    # the reference stage tokenises offline pairs as it runs: with the Rust tokenizer's batch parallelism over every
    # core (its default; a multi-rank launch gives each rank its share, RAYON_NUM_THREADS)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if stage.startswith(("offline", "reference", "train")) else "false"
    from pipeline.config import load_config
    from pipeline.data.artifacts import execute
    from pipeline.run import rounds

    cfg = load_config(conf)
    module = importlib.import_module("stages." + ("pairs" if stage.startswith("offline") else stage.split()[0]))
    if stage in ("offline ids (once)", "reference (data)", "train (data)"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy)
    # the stage's plan (settling the config imports torch to ask for CUDA: a flow process has it already) before the
    # clock starts: what is timed is the stage call itself
    plan = rounds.plan(cfg, 1, "pairs" if stage.startswith("offline") else stage.split()[0])
    imports_mb = _status_mb("VmRSS")
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if stage in ("label", "pairs"):
        extra = execute(plan, lambda: module.run(cfg, plan), force=True)["stats"]
        extra = {k: extra[k] for k in ("responses", "pairs", "pairs_generated", "pairs_offline", "alpha") if k in extra}
    elif stage == "offline read (once)":
        from pipeline.data.offline_cache import offline_table

        extra = {"pairs": offline_table(cfg.data.offline, cfg.run_dir).num_rows}
    elif stage == "offline ids (once)":
        from pipeline.compute.logprobs import encode_many
        from pipeline.data.offline_cache import offline_ids

        encode = lambda prompts, responses: encode_many(tokenizer, prompts, responses)  # noqa: E731  as the stage does
        extra = {"tokenised": offline_ids(cfg.data.offline, cfg.run_dir, tokenizer, encode)[1]}
    elif stage == "reference (data)":
        reference = module
        ids_path, _ = reference._offline_ids(cfg, plan, tokenizer)
        texts, shards, _, kept = reference._pairs_by_shard(cfg, plan, str(ids_path) if ids_path else None)
        n_tokens = 0
        for idx in shards:  # what the ranks do between them, before their forward passes
            c, r, fits, _ = reference._encode_pairs(tokenizer, texts, idx, cfg.model.max_length, kept)
            n_tokens += sum(len(x[0]) + len(x[1]) for x in c + r)
        extra = {"pairs": sum(len(s) for s in shards), "offline_with_kept_ids": kept.found if kept else 0,
                 "shards": len(shards), "tokens": n_tokens}  # fmt: skip
    else:
        examples, dropped = module.load_pairs(plan.inputs["reference"], tokenizer, cfg)
        extra = {"pairs": len(examples), **dropped}
    wall = time.perf_counter() - started
    result = {"wall_s": wall, "imports_mb": imports_mb, "peak_rss_mb": _status_mb("VmHWM"), **extra}
    print(RESULT + json.dumps(result), flush=True)


def run_stage(stage: str, conf: Path) -> dict[str, Any]:
    """The stage's data path in a fresh process (`harness.run_child`): its result, with its own peak RSS."""
    log = OUT / "logs" / f"scale-{stage.split()[0]}.log"
    return run_child([sys.executable, __file__, "--child", stage, str(conf)], log)["result"]


def input_mb(stage: str, conf: Path) -> tuple[float, int]:
    """The in-memory (Arrow) size of the stage's input table, and its rows (read in a process of its own: this one
    stays small)."""
    code = ("import sys, pyarrow.parquet as pq; t = pq.read_table(sys.argv[1]); print(t.nbytes / 2**20, t.num_rows)")
    from pipeline.config import load_config
    from pipeline.run import rounds

    rd = rounds.round_dir(load_config(conf), 1)
    name = {"label": "responses", "pairs": "labels", "reference (data)": "pairs", "train (data)": "reference"}.get(stage)
    path = rd / f"{name}.parquet" if name else conf.parent / "offline.parquet"
    size, rows = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                                text=True, check=True).stdout.split()  # fmt: skip
    return float(size), int(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="20000x16,62500x16", help="PROMPTSxK, comma-separated, run in order")
    ap.add_argument("--offline", type=int, default=0, metavar="N",
                    help="offline pairs for replay (0: max(61,000, 2 × prompts): UltraFeedback's binarized set has "
                    "~61k, and γ = 0.5 then keeps every generated pair)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated, a subset of: {', '.join(STAGES)} (label, the offline set's two steps before pairs, and pairs "
                    "before the data paths, run anyway: they write what the later stages read)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic rounds under benchmarks/out/scale/")
    ap.add_argument("--out", default=str(OUT / "scale.json"))
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    import shutil

    chosen = [x.strip() for x in args.stages.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
    if set(chosen) & {"reference (data)", "train (data)"}:
        chosen.append("pairs")
    if "pairs" in chosen:  # what every round after the first reads
        chosen += ["offline read (once)", "offline ids (once)"]
    report = []
    for size in args.sizes.split(","):
        n_prompts, k = (int(x) for x in size.lower().split("x"))
        root = OUT / "scale" / size
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        conf = build_round(root, n_prompts, k, args.seed, args.offline or max(61_000, 2 * n_prompts))
        print(f"\n{n_prompts} prompts × {k} responses = {n_prompts * k:,} responses (synthetic round built in "
              f"{time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
        print(f"{'stage':<19} {'input rows':>10} {'input MiB':>9} {'wall s':>7} {'s per 1M responses':>18} "
              f"{'peak RSS MiB':>12} {'after imports':>13} {'(peak-imports)/input':>20}")  # fmt: skip
        for stage in STAGES:
            if stage not in chosen and stage != "label":  # label writes what every other stage reads
                continue
            if stage == "train (data)":
                write_reference_input(conf)
            size_mb, rows = input_mb(stage, conf)
            r = run_stage(stage, conf)
            r.update(stage=stage, prompts=n_prompts, k=k, input_rows=rows, input_mb=size_mb,
                     growth=(r["peak_rss_mb"] - r["imports_mb"]) / size_mb)  # fmt: skip
            per_m = r["wall_s"] / (n_prompts * k) * 1e6
            print(f"{stage:<19} {rows:>10,} {size_mb:>9.0f} {r['wall_s']:>7.1f} {per_m:>18.1f} {r['peak_rss_mb']:>12.0f} "
                  f"{r['imports_mb']:>13.0f} {r['growth']:>19.2f}x", flush=True)  # fmt: skip
            report.append(r)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu_count": os.cpu_count(), "results": report}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
