"""Generation throughput: dice's generate stage against raw vLLM and transformers `generate`, and IPO-MD's
mixture sampler against a naive two-model loop, all in the same run on the same ~25M-parameter model.

    .venv/bin/python benchmarks/generate_throughput.py [--prompts 64 --samples 4 --max-tokens 128 --repeats 1]

What it does (benchmarks/README.md has the settings and a measured run):

1. Builds a tiny Llama (`pipeline.run.tiny.TinySpec(hidden=512, intermediate=1376, layers=8, heads=8, kv_heads=4)`,
   ~25M parameters, a short supervised pass so that it ends answers with EOS) once into
   `benchmarks/out/models/<shape>/` and reuses it; a perturbed copy of it is the mixture's reference.
2. Runs each contender in its own subprocess, one after the other (`--repeats` alternating rounds):
   - dice: `python -m stages.generate CONF --round 1`, as users run it (the config's engine settings, shards,
     per-prompt seeds, Parquet writes); its tokens/s is the stage's own `tokens_per_s` (generated tokens over the
     wall time from the first shard's start to the last shard's end: engine start-up is excluded);
   - vllm: `vllm.LLM` with the same engine arguments (`pipeline.compute.engine.make_llm`), the same chat-templated
     token ids and the same `SamplingParams` (per-prompt seeds), one `LLM.generate` call over all prompts, timed;
   - transformers: `model.generate` on batches of `--hf-batch` sequences (prompts × K `num_return_sequences`),
     left padding, sampling at the same temperature / top-p with top-k and the repetition penalty off (as vLLM's
     SamplingParams), stopping at EOS; generated tokens counted up to and including each sequence's EOS. By
     default three batch sizes are measured — all the sequences at once (vLLM's batch), half and a quarter — and
     the fastest of each repeat is the baseline.
   - mixture: `pipeline.method.mixture.MixtureSampler` (β = 0.5, KV cache for both models, batched) against
     `naive_mixture_generate` (one sequence at a time, both models over the whole prefix at every token) on a
     small subset (`--mix-prompts`, `--mix-max-tokens`): the naive loop is quadratic.
3. Prints every run's tokens/s, each repeat's ratios (contenders run back to back, `benchmarks.harness.alternate`)
   and their median, and writes `benchmarks/out/generate_throughput.json`.

Bars (issue 5): dice ≥ 0.9× raw vLLM, ≥ 2× transformers generate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import OUT, RESULT, alternate, git_state, median, middle, ratio_line, ratios, run_child  # noqa: I001
from benchmarks.harness import versions


# ---------------------------------------------------------------------------------------------- inputs


def model_dir(args: argparse.Namespace) -> Path:
    return OUT / "models" / f"gen-h{args.hidden}-i{args.intermediate}-l{args.layers}-sft{args.sft_steps}"


def build_models(args: argparse.Namespace) -> tuple[Path, Path, float]:
    """(the model, its perturbed copy, seconds spent building); both reused when on disk."""
    import torch

    from pipeline.run.tiny import TinySpec, build_tiny_model

    path, ref = model_dir(args), model_dir(args).with_name(model_dir(args).name + "-perturbed")
    started = time.perf_counter()
    if not (path / "model.safetensors").is_file():
        spec = TinySpec(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=8, kv_heads=4,
                        sft_steps=args.sft_steps)  # fmt: skip
        build_tiny_model(path, [REPO / "data/prompts.jsonl", REPO / "data/offline_prefs.jsonl"], spec)
    if not (ref / "model.safetensors").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * p.std() * torch.randn(p.shape, generator=gen))
        model.save_pretrained(ref, safe_serialization=True)
        AutoTokenizer.from_pretrained(path).save_pretrained(ref)
    return path, ref, time.perf_counter() - started


def bench_config(args: argparse.Namespace, model: Path, name: str, shard_size: int):
    from pipeline.config import load_config, save_config

    cfg = load_config(
        REPO / "conf/tiny.yaml",
        [f"runs_dir={OUT / 'runs'}", f"name={name}", f"model.policy={model}", "model.build_tiny_if_missing=false",
         "round0.mode=skip", "model.dtype=float32", f"data.prompts={REPO / 'data/prompts.jsonl'}",
         f"data.prompts_per_round={args.prompts}", f"generate.num_samples={args.samples}",
         f"generate.max_tokens={args.max_tokens}", f"generate.temperature={args.temperature}",
         f"generate.top_p={args.top_p}", f"generate.shard_size={shard_size}"],
    )  # fmt: skip
    conf = OUT / "configs" / f"{name}.yaml"
    save_config(cfg, conf)
    return cfg, conf


def prompt_batch(cfg) -> tuple[list[list[int]], list[int]]:
    """Round 1's chat-templated prompt ids and per-prompt seeds, exactly as the stage computes them."""
    from transformers import AutoTokenizer

    from pipeline.compute.logprobs import prompt_ids
    from pipeline.data.datasets import read_prompts
    from stages.generate import prompt_seed, select_prompts

    tok = AutoTokenizer.from_pretrained(cfg.model.policy)
    rows = select_prompts(read_prompts(cfg.data.prompts), 1, cfg.data.prompts_per_round).to_pylist()
    return [prompt_ids(tok, r["prompt"]) for r in rows], [
        prompt_seed(cfg.seed, 1, r["prompt_id"]) for r in rows
    ]


# ---------------------------------------------------------------------------------------------- workers


def worker_vllm(conf: str) -> dict[str, Any]:
    from pipeline.compute.engine import make_llm
    from pipeline.config import load_config

    cfg = load_config(conf)
    g = cfg.generate
    ids, seeds = prompt_batch(cfg)
    llm = make_llm(cfg.model.policy, g.engine, dtype=cfg.model.dtype, seed=cfg.seed, trust_remote_code=False)
    from vllm import SamplingParams, TokensPrompt

    params = [SamplingParams(n=g.num_samples, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens,
                             seed=s) for s in seeds]  # fmt: skip  (as stages/generate.py asks)
    started = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
    wall = time.perf_counter() - started
    tokens = sum(len(o.token_ids) for r in outs for o in r.outputs)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def worker_hf(conf: str, batch: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import load_config

    cfg = load_config(conf)
    g = cfg.generate
    ids, _ = prompt_batch(cfg)
    tok = AutoTokenizer.from_pretrained(cfg.model.policy)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.policy, dtype=torch.float32).eval()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    per = max(batch // g.num_samples, 1)
    torch.manual_seed(0)
    tokens, started = 0, time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(ids), per):
            chunk = ids[s : s + per]
            width = max(map(len, chunk))
            x = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # (P, T) left-padded
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            # the same sampling as vLLM's SamplingParams: temperature and top-p only (generate's default top_k=50
            # is switched off, as are the generation config's other processors)
            out = model.generate(input_ids=x, attention_mask=mask, do_sample=True, temperature=g.temperature,
                                 top_p=g.top_p, top_k=0, repetition_penalty=1.0, max_new_tokens=g.max_tokens,
                                 num_return_sequences=g.num_samples, eos_token_id=eos, pad_token_id=pad)  # fmt: skip
            new = out[:, width:]  # (P·K, ≤ max_tokens)
            for row in new.tolist():
                tokens += row.index(eos) + 1 if eos in row else len(row)
    wall = time.perf_counter() - started
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def worker_mixture(conf: str, ref: str, mode: str, n_prompts: int, max_tokens: int) -> dict[str, Any]:
    import torch

    from pipeline.compute.logprobs import load_causal_lm
    from pipeline.config import load_config
    from pipeline.method.mixture import MixtureSampler, naive_mixture_generate

    cfg = load_config(conf)
    g = cfg.generate
    ids, seeds = prompt_batch(cfg)
    ids, seeds = ids[:n_prompts], seeds[:n_prompts]
    policy, tok = load_causal_lm(cfg.model.policy, "float32", device=torch.device("cpu"))
    reference, _ = load_causal_lm(ref, "float32", device=torch.device("cpu"))
    started = time.perf_counter()
    if mode == "cached":
        sampler = MixtureSampler(policy, reference, beta=0.5, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                                 max_context=1024)  # fmt: skip
        out = sampler.generate(ids, seeds, num_samples=g.num_samples, temperature=g.temperature, top_p=g.top_p,
                               max_tokens=max_tokens, batch_size=g.mixture_batch_size)  # fmt: skip
        tokens = sum(len(s.token_ids) for per in out for s in per)
    else:
        tokens = 0
        for p, seed in zip(ids, seeds):
            for seq in naive_mixture_generate(policy, reference, p, beta=0.5, seed=seed, num_samples=g.num_samples,
                                              temperature=g.temperature, top_p=g.top_p, max_tokens=max_tokens,
                                              eos_ids=[tok.eos_token_id]):  # fmt: skip
                tokens += len(seq)
    wall = time.perf_counter() - started
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


# ---------------------------------------------------------------------------------------------- driver


def run(cmd: list[str], log: Path, wait_s: float) -> dict[str, Any]:
    """One contender's run (`harness.run_child`): its tokens, timed seconds and tokens/s, the dice stage's from its
    own result line (first shard's start to last shard's end), with the CPUs' foreign share before it started."""
    child = run_child(cmd, log, wait_s=wait_s)
    payload = child["result"]
    if "stats" in payload:  # the dice stage's own result line
        s = payload["stats"]
        payload = {"tokens": s["generated_tokens"], "wall_s": s["generation_s"], "tokens_per_s": s["tokens_per_s"],
                   "shards": s["shards"]}  # fmt: skip
    return {**payload, **{k: child[k] for k in ("process_wall_s", "busy_before", "peak_rss_mib", "log")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64, help="prompts (round 1's slice of data/prompts.jsonl)")
    ap.add_argument("--samples", type=int, default=4, help="K samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument(
        "--shard-size", type=int, default=None, help="dice's generate.shard_size (default: dice's own)"
    )
    ap.add_argument("--hf-batch", default="auto",
                    help="sequences per transformers generate call, comma-separated sizes each measured (the best is "
                         "the baseline); auto: all prompts × K at once (what vLLM gets), half and a quarter of it")  # fmt: skip
    ap.add_argument("--mix-prompts", type=int, default=4)
    ap.add_argument("--mix-max-tokens", type=int, default=48)
    ap.add_argument("--no-mixture", action="store_true", help="skip the mixture sampler comparison")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument(
        "--repeats", type=int, default=1, help="alternating rounds; each round's ratios and their median are reported"
    )
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each run, wait up to S seconds for other processes to leave the CPUs")  # fmt: skip
    ap.add_argument("--out", default=str(OUT / "generate_throughput.json"))
    ap.add_argument("--worker", choices=["vllm", "hf", "mix-cached", "mix-naive"], help=argparse.SUPPRESS)
    ap.add_argument("--conf", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        if args.worker == "vllm":
            res = worker_vllm(args.conf)
        elif args.worker == "hf":
            res = worker_hf(args.conf, int(args.hf_batch))
        else:
            mode = args.worker.removeprefix("mix-")
            res = worker_mixture(args.conf, args.ref, mode, args.mix_prompts, args.mix_max_tokens)
        print(RESULT + json.dumps(res), flush=True)
        return

    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    model, ref, build_s = build_models(args)
    from pipeline.config import GenerateConfig

    shard = args.shard_size or GenerateConfig().shard_size
    _, conf = bench_config(args, model, "bench-generate", shard)
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--conf", str(conf), "--mix-prompts", str(args.mix_prompts),
              "--mix-max-tokens", str(args.mix_max_tokens), "--ref", str(ref)]  # fmt: skip
    sequences = args.prompts * args.samples
    hf_batches = ([sequences, max(sequences // 2, args.samples), max(sequences // 4, args.samples)]
                  if args.hf_batch == "auto" else [int(b) for b in args.hf_batch.split(",")])  # fmt: skip
    commands = {
        "dice": [sys.executable, "-m", "stages.generate", str(conf), "--round", "1", "--force"],
        "vllm": [*me, "--worker", "vllm", *common],
    }
    for b in dict.fromkeys(hf_batches):
        commands[f"transformers b{b}"] = [*me, "--worker", "hf", "--hf-batch", str(b), *common]
    if not args.no_mixture:
        commands["mixture (KV cache)"] = [*me, "--worker", "mix-cached", *common]
        commands["mixture (naive)"] = [*me, "--worker", "mix-naive", *common]

    def contender(name: str, cmd: list[str]):
        def one(r: int) -> dict[str, Any]:
            res = run(cmd, OUT / "logs" / f"generate-{name.split()[0]}-{name.count('naive')}-{r}.log", args.wait_quiet)
            busy = "n/a" if res["busy_before"] is None else f"{100 * res['busy_before']:.0f}%"
            print(f"  {name:<20} run {r + 1}: {res['tokens_per_s']:8.0f} tokens/s ({res['tokens']} tokens, "
                  f"{res['wall_s']:.1f} s timed, {res['process_wall_s']:.0f} s process, "
                  f"CPU {busy} used by others before)", flush=True)  # fmt: skip
            return res

        return one

    runs = alternate({name: contender(name, cmd) for name, cmd in commands.items()}, args.repeats)
    # Run by run (contenders ran back to back, so the machine's drift hits them alike): the ratios of repeat r, and
    # their median. The transformers baseline of a repeat is its best batch size in that repeat.
    tps = {name: [x["tokens_per_s"] for x in rs] for name, rs in runs.items()}
    hf_names = [n for n in runs if n.startswith("transformers")]
    best_hf_batch = [max(hf_names, key=lambda n: tps[n][r]) for r in range(args.repeats)]
    hf = [tps[n][r] for r, n in enumerate(best_hf_batch)]
    per_repeat = {"dice / vllm": ratios(tps["dice"], tps["vllm"]), "dice / transformers": ratios(tps["dice"], hf),
                  "vllm / transformers": ratios(tps["vllm"], hf)}  # fmt: skip
    if not args.no_mixture:
        per_repeat["mixture KV cache / naive"] = ratios(tps["mixture (KV cache)"], tps["mixture (naive)"])
    median_tps = {name: float(middle(rs, "tokens_per_s")["tokens_per_s"]) for name, rs in runs.items()}
    print()
    print(f"{'contender':<20} {'median tokens/s':>15} {'tokens':>8}   tokens/s of every run")
    for name, rs in runs.items():
        print(f"{name:<20} {median_tps[name]:15.0f} {rs[0]['tokens']:8d}   " + ", ".join(f"{x:.0f}" for x in tps[name]))
    print(f"transformers baseline = its best batch size in each repeat: {', '.join(best_hf_batch)}")
    for k, v in per_repeat.items():
        print(ratio_line(f"{k} run by run", v))
    Path(args.out).write_text(json.dumps({
        "settings": vars(args) | {"shard_size": shard, "model": str(model), "reference": str(ref)},
        "versions": versions(("torch", "transformers", "vllm")), "commit": git_state()["commit"][:7],
        "model_build_s": build_s, "runs": runs, "median_tokens_per_s": median_tps, "ratios_per_repeat": per_repeat,
        "ratios": {k: median(v) for k, v in per_repeat.items()}, "transformers_best_batch": best_hf_batch,
        "total_s": time.perf_counter() - t0,
    }, indent=2))  # fmt: skip
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s in all)")

if __name__ == "__main__":
    main()
