"""Implicit-reward scoring throughput: dice's scorer against what a user would write instead, same run.

    .venv/bin/python benchmarks/label_throughput.py [--prompts 64 --k 8 --repeats 3 --wait-quiet 300]
    .venv/bin/python benchmarks/label_throughput.py --processes 2     # also the label stage on 1 and 2 processes
    .venv/bin/python benchmarks/label_throughput.py --vllm            # also vLLM's prompt_logprobs as the scorer
    .venv/bin/python benchmarks/label_throughput.py --device cuda     # on a GPU machine

The label stage's implicit reward r = β·[logp(π, x, y) − logp(π_ref, x, y)] is two log-prob passes over the
K responses of every prompt; this measures one such pass, on the same model and the same responses for all:

- dice: `pipeline.compute.logprobs.score`, as the label stage's ranks call it (`label.batch_size` 16 sequences per
  forward, `reference.packing` on): the K responses of a prompt packed behind ONE copy of the prompt, no
  padding, the LM head only where a response token is predicted.
- dice (padded): the same scorer with `packing=False` (length-sorted padded batches).
- batched: what a user writes with transformers: padded batches of the same size (16), in the table's order
  (a prompt's K responses together), right padding with an attention mask, full logits, log-softmax over the
  vocabulary, the response tokens gathered and summed.
- naive: one transformers forward per (prompt, response), batch of one, full logits.

Scored tokens count prompt + response of every response (what the naive loop computes), the same number for
all. The table has tokens/s, the ratios to naive and to batched, and the largest |difference| of the log-probs
against the naive ones.

`--processes N` runs the label stage itself (`python -m stages.label`, implicit reward, the same responses in
shards of 8 prompts) with `label.num_processes` 1 and N, and prints the stage's scoring rate (first shard's start
to last shard's end, per model; process start and model loading excluded) in all and per process. On a CPU the
N processes share its cores (gloo ranks, the threads split); on GPUs each has its own.

`--vllm` scores the same token ids with vLLM (`prompt_logprobs`, in a process of its own per model: the policy
and a perturbed copy as π_ref) and prints max and mean |Δ logp| per sequence against dice, how many
best-vs-worst pairs (argmax / argmin of logp(π) − logp(π_ref) per prompt) change, and its tokens/s (engine
start excluded).

Responses: `--prompts` prompts of the shipped offline set, each with K responses: its own chosen and rejected
answer and K − 2 others drawn from the set's answers (20-460 tokens: the lengths of real samples vary as much).
The model is the train benchmark's tiny Llama (5.8M parameters), built once into benchmarks/out/models/.
Writes `benchmarks/out/label_throughput.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import OUT, alternate, child_env, median, ratio_line, ratios, run_child, shown, wait_quiet  # noqa: I001
from benchmarks.train_throughput import DATA, add_model_args, build_model, percentiles  # the train benchmark's model


def build_groups(tokenizer, args: argparse.Namespace) -> list[tuple[str, str]]:
    """(prompt, response) rows, K per prompt, a prompt's responses adjacent as the generate stage writes them."""
    from pipeline.compute.logprobs import encode

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    pool = [r[side] for r in rows for side in ("chosen", "rejected")]
    rng = random.Random(args.seed)
    out = []
    for i in range(args.prompts):
        row = rows[i % len(rows)]
        responses = [row["chosen"], row["rejected"]] + rng.sample(pool, args.k - 2)
        for y in responses[: args.k]:
            p, r = encode(tokenizer, row["prompt"], y)
            if len(p) + len(r) <= args.max_len:
                out.append((row["prompt"], y))
    return out


def naive_logps(model, encoded: list[tuple[list[int], list[int]]]):
    """One forward per sequence, batch of one, full logits: log_softmax over the vocabulary at every position."""
    import numpy as np
    import torch

    device = next(model.parameters()).device
    out = np.empty(len(encoded))
    with torch.no_grad():
        for i, (p, r) in enumerate(encoded):
            ids = torch.tensor([p + r], device=device)  # (1, T)
            logits = model(input_ids=ids).logits[0, :-1].float()  # (T-1, V): position t predicts t+1
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)  # (T-1,)
            out[i] = logp[len(p) - 1 :].sum().item()  # the response tokens only
    return out


def batched_logps(model, encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int):
    """What a user writes: padded batches of `batch_size` in table order, full logits, log-softmax, gathered and
    masked to the response tokens."""
    import numpy as np
    import torch

    device = next(model.parameters()).device
    out = np.empty(len(encoded))
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(len(p) + len(r) for p, r in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
            attention = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, T): -100 outside the response
            for i, (p, r) in enumerate(batch):
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                attention[i, : len(p) + len(r)] = 1
                labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
            ids, attention, labels = ids.to(device), attention.to(device), labels.to(device)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()  # (B, T-1, V)
            logp = torch.log_softmax(logits, dim=-1)  # (B, T-1, V)
            target = labels[:, 1:]  # (B, T-1)
            mask = target != -100
            token = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            out[start : start + len(batch)] = (token * mask).sum(-1).double().cpu().numpy()
    return out


def linear_flops(model, encoded: list[tuple[list[int], list[int]]], batch_size: int) -> dict[str, float]:
    """Multiply-add FLOPs of the linear layers (decoder projections + LM head; attention scores left out) that
    each scorer runs: 2 · weights · positions through them.

    naive: every position of prompt + response through the decoder and the head. dice (packed): each prompt once
    per chunk of `batch_size` of its responses (as `score` packs them), a response's last token never through
    the decoder, the head only where a response token is predicted."""
    import torch

    from pipeline.compute.packing import group_by_prompt

    decoder = sum(m.weight.numel() for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings().weight.numel()
    tokens = sum(len(p) + len(r) for p, r in encoded)
    dec_pos = head_pos = 0
    for prompt, idx in group_by_prompt(encoded):
        dec_pos += len(prompt) * -(-len(idx) // batch_size) + sum(len(encoded[i][1]) - 1 for i in idx)
        head_pos += sum(len(encoded[i][1]) for i in idx)
    return {"naive": 2.0 * (decoder + head) * tokens, "dice": 2.0 * (decoder * dec_pos + head * head_pos)}


def gemm_peak(hidden: int, intermediate: int, device, seconds: float = 2.0) -> float:
    """This machine's float32 GEMM rate (FLOP/s) on the model's MLP shape, (2048 × hidden) @ (hidden × intermediate)
    (`harness.gemm_flops`): the ceiling any scorer of this model can reach on its linear layers."""
    from benchmarks.harness import gemm_flops

    return next(iter(gemm_flops([(2048, hidden, intermediate)], device, seconds).values()))


# ---------------------------------------------------------------------------------------------- the stage, 1 and N processes


def stage_processes(args: argparse.Namespace, model: Path, rows: list[tuple[str, str]]) -> dict[str, Any]:
    """The label stage (implicit reward, π = π_ref = the model) on 1 and `--processes` processes, the same shards."""
    import pyarrow as pa

    from pipeline.config import load_config, save_config
    from pipeline.data import schemas
    from pipeline.data.artifacts import write_parquet
    from pipeline.run import rounds

    root = OUT / "label-processes"
    out: dict[str, Any] = {}
    print(f"\nthe label stage (python -m stages.label, implicit reward: {2 * len(rows)} sequences over two models, "
          "shards of 8 prompts)")  # fmt: skip
    print(f"{'processes':>9} {'tokens/s':>9} {'per process':>11} {'scoring s':>9} {'stage s':>8}")
    for n in sorted({1, args.processes}):
        cfg = load_config(REPO / "conf/tiny.yaml", [
            f"runs_dir={root}", f"name=p{n}", "round0.mode=skip", f"model.policy={model}", f"model.reference={model}",
            "model.build_tiny_if_missing=false", "model.dtype=float32", f"model.max_length={args.max_len}",
            f"label.batch_size={args.batch_size}", "label.shard_size=8", f"label.num_processes={n}",
            f"generate.num_samples={args.k}",
        ])  # fmt: skip
        prompts = {p: i for i, p in enumerate(dict.fromkeys(p for p, _ in rows))}
        table = pa.Table.from_pylist([
            {"prompt_id": f"p{prompts[p]}", "prompt": p, "sample_idx": j, "response": y, "num_tokens": 1,
             "num_chars": len(y), "finish_reason": "stop", "cumulative_logprob": 0.0, "seed": 0, "model": "m", "round": 1}
            for j, (p, y) in enumerate(rows)], schema=schemas.RESPONSES)  # fmt: skip
        write_parquet(table, rounds.round_dir(cfg, 1) / "responses.parquet", schemas.RESPONSES)
        conf = root / f"p{n}.yaml"
        save_config(cfg, conf)
        env = child_env()  # no OMP_NUM_THREADS: dice's launcher splits the cores between its ranks
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        child = run_child([sys.executable, "-m", "stages.label", str(conf), "--round", "1", "--force"],
                          OUT / "logs" / f"label-stage-p{n}.log", wait_s=args.wait_quiet or None, env=env)  # fmt: skip
        stats, wall = child["result"]["stats"], child["process_wall_s"]
        rate = stats["tokens_per_s"]
        out[str(n)] = {"tokens_per_s": rate, "per_process": rate / n, "scoring_s": stats["scoring_s"], "stage_s": wall,
                       "scored_tokens": stats["scored_tokens"]}  # fmt: skip
        print(f"{n:>9} {rate:>9.0f} {rate / n:>11.0f} {stats['scoring_s']:>9.1f} {wall:>8.1f}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- vLLM as a scorer


def perturbed(model: Path) -> Path:
    """A copy of the model with seeded noise on every weight (a stand-in π_ref), built once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = model.with_name(model.name + "-perturbed")
    if (dest / "model.safetensors").is_file():
        return dest
    m = AutoModelForCausalLM.from_pretrained(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    m.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(model).save_pretrained(dest)
    return dest


def vllm_worker(args: argparse.Namespace, model: str, inp: str, out: str) -> None:
    """In its own process: log-probs of the given token ids under `model` with vLLM's prompt_logprobs."""
    from pipeline.compute.engine import make_llm
    from pipeline.config import EngineConfig

    encoded = json.loads(Path(inp).read_text())
    llm = make_llm(model, EngineConfig(max_model_len=max(len(p) + len(r) for p, r in encoded) + 8),
                   dtype=args.dtype, seed=0, trust_remote_code=False)  # fmt: skip
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    prompts = [TokensPrompt(prompt_token_ids=p + r) for p, r in encoded]
    llm.generate(prompts[:16], params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    logps = []
    for (p, r), res in zip(encoded, results):
        seq = p + r  # position t's entry is log P(token t | tokens < t); the response starts at len(p)
        logps.append(sum(res.prompt_logprobs[t][seq[t]].logprob for t in range(len(p), len(seq))))
    Path(out).write_text(json.dumps({"logps": logps, "seconds": median(times), "seconds_runs": times}))


def vllm_scorer(args, model: Path, encoded, dice_logps, dice_model, tok, tokens: int) -> dict[str, Any]:
    """vLLM's prompt_logprobs against dice's scorer: |Δ logp|, best-vs-worst pairs changed, throughput."""
    import numpy as np

    from pipeline.compute.logprobs import load_causal_lm, score

    ref = perturbed(model)
    ref_model, _ = load_causal_lm(str(ref), "float32", device=dice_model.device)
    dice = {"policy": np.asarray(dice_logps), "reference": score(ref_model, encoded, tok.pad_token_id, args.batch_size)}
    inp = OUT / "vllm_scorer_in.json"
    inp.write_text(json.dumps(encoded))
    got: dict[str, Any] = {}
    for role, path in (("policy", model), ("reference", ref)):
        res = OUT / f"vllm_scorer_{role}.json"
        run_child([sys.executable, __file__, "--vllm-worker", str(path), str(inp), str(res), "--repeats",
                   str(args.repeats), "--dtype", args.dtype], OUT / "logs" / f"label-vllm-{role}.log",
                  env=child_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"))  # fmt: skip
        got[role] = json.loads(res.read_text())
    vllm = {role: np.asarray(got[role]["logps"]) for role in got}
    delta = np.abs(vllm["policy"] - dice["policy"])
    # best vs worst per prompt on r = logp(π) − logp(π_ref) (β and α left out: they do not change which is which at α=0)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (p, _) in enumerate(encoded):
        groups.setdefault(tuple(p), []).append(i)
    changed = 0
    for idx in groups.values():
        r_d = dice["policy"][idx] - dice["reference"][idx]
        r_v = vllm["policy"][idx] - vllm["reference"][idx]
        changed += (np.argmax(r_d), np.argmin(r_d)) != (np.argmax(r_v), np.argmin(r_v))
    rate = tokens / got["policy"]["seconds"]
    out = {"max_abs_dlogp": float(delta.max()), "mean_abs_dlogp": float(delta.mean()),
           "max_abs_dreward": float(np.abs((vllm["policy"] - vllm["reference"]) - (dice["policy"] - dice["reference"])).max()),
           "pairs_changed": int(changed), "prompts": len(groups), "tokens_per_s": rate,
           "seconds": got["policy"]["seconds"], "dtype": args.dtype}  # fmt: skip
    print(f"\nvLLM prompt_logprobs as the scorer ({args.dtype}; engine start excluded, median of {args.repeats} runs):")
    print(f"  |Δ logp| per sequence vs dice: max {out['max_abs_dlogp']:.2e}, mean {out['mean_abs_dlogp']:.2e}; "
          f"|Δ r| max {out['max_abs_dreward']:.2e}")  # fmt: skip
    print(f"  best-vs-worst pairs changed: {changed} of {len(groups)} prompts")
    print(f"  {rate:.0f} tokens/s, median (dice's scorer above: the 'dice' row, median of its runs, which ran earlier)")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64, help="prompts scored")
    ap.add_argument("--k", type=int, default=8, help="responses per prompt (>= 2; DICE's paper: 16)")
    ap.add_argument("--batch-size", type=int, default=16, help="dice's sequences per forward (label.batch_size)")
    ap.add_argument("--max-len", type=int, default=512, help="drop prompt+response longer than this (model.max_length)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each scorer, alternating; every run's ratios and their median are reported")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each timed run, wait up to S seconds for other processes to leave the CPUs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: the cores)")
    ap.add_argument("--device", default="cpu", help="torch device of the scorers (cpu; cuda on a GPU machine)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="vLLM's dtype (--vllm)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT / "label_throughput.json"))
    ap.add_argument("--processes", type=int, default=0, metavar="N",
                    help="also run the label stage on 1 and N processes (label.num_processes)")
    ap.add_argument("--vllm", action="store_true", help="also score with vLLM's prompt_logprobs (CPU build here)")
    ap.add_argument("--vllm-worker", nargs=3, metavar=("MODEL", "IN", "OUT"), help=argparse.SUPPRESS)
    add_model_args(ap)  # the train benchmark's model: same flags, same folder
    args = ap.parse_args(argv)
    if args.vllm_worker:
        vllm_worker(args, *args.vllm_worker)
        return
    if args.k < 2:
        sys.exit("--k must be >= 2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()

    import numpy as np
    import torch

    from pipeline.compute.logprobs import encode, load_causal_lm, score

    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    path, built_s = build_model(args)
    device = torch.device(args.device)
    model, tok = load_causal_lm(str(path), "float32", device=device)
    rows = build_groups(tok, args)
    encoded = [encode(tok, p, y) for p, y in rows]
    tokens = sum(len(p) + len(r) for p, r in encoded)
    lengths = {
        "prompt_tokens": percentiles([len(p) for p, _ in encoded]),
        "response_tokens": percentiles([len(r) for _, r in encoded]),
    }
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {shown(path)}: {n_params:,} parameters; {f'built in {built_s:.0f} s' if built_s else 'reused'}")
    print(f"{len(encoded)} responses ({args.prompts} prompts × K={args.k}), {tokens} scored tokens (prompt + response each)")
    for k, v in lengths.items():
        print(f"  {k:<16} " + "  ".join(f"{q} {x:g}" for q, x in v.items()))

    from transformers import AutoModelForCausalLM

    # the naive loop runs an untouched model (transformers' default attention); score() switches its model to the
    # packed attention, so each has its own copy of the same weights
    naive_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval().to(device)
    scorers = {
        "dice": lambda: score(model, encoded, tok.pad_token_id, args.batch_size),
        "dice (padded)": lambda: score(model, encoded, tok.pad_token_id, args.batch_size, packing=False),
        "batched": lambda: batched_logps(naive_model, encoded, args.batch_size, tok.pad_token_id),
        "naive": lambda: naive_logps(naive_model, encoded),
    }
    # untimed warm-up of each (allocator, kernels)
    score(model, encoded[:64], tok.pad_token_id, args.batch_size)
    score(model, encoded[:64], tok.pad_token_id, args.batch_size, packing=False)
    batched_logps(naive_model, encoded[:32], args.batch_size, tok.pad_token_id)
    naive_logps(naive_model, encoded[:16])
    logps: dict[str, Any] = {}

    def timed(name: str, fn):
        def one(rep: int) -> float:
            if args.wait_quiet:
                wait_quiet(args.wait_quiet)
            t = time.perf_counter()
            logps[name] = fn()  # returns numpy on the CPU: the device's work is done when it returns
            seconds = time.perf_counter() - t
            print(f"  run {rep + 1}/{args.repeats} {name}: {tokens / seconds:.0f} tokens/s", flush=True)
            return seconds

        return one

    runs = alternate({name: timed(name, fn) for name, fn in scorers.items()}, args.repeats)
    # repeat i of every scorer ran back to back, so ratios are taken within a repeat; the table shows each scorer's
    # median time and the median of the per-repeat ratios, and every repeat's ratio is printed
    med = {k: median(v) for k, v in runs.items()}
    per_rep = {base: {k: ratios(runs[base], runs[k]) for k in scorers} for base in ("naive", "batched")}
    ratio = {base: {k: median(v) for k, v in r.items()} for base, r in per_rep.items()}
    diffs = {k: float(np.max(np.abs(logps[k] - logps["naive"]))) for k in scorers if k != "naive"}
    flops = linear_flops(model, encoded, args.batch_size)
    peak = gemm_peak(model.config.hidden_size, model.config.intermediate_size, device)
    print()
    print(f"{'scorer':<14} {'tokens/s':>9} {'median s':>8} {'vs naive':>9} {'vs batched':>10} {'max |Δ logp| vs naive':>22} "
          f"{'linear GFLOP/s':>15} {'of GEMM peak':>13}   tokens/s of every run")  # fmt: skip
    for k in scorers:
        d = f"{diffs[k]:.2e}" if k in diffs else "-"
        rate = f"{flops[k] / med[k] / 1e9:.1f}" if k in flops else "-"
        share = f"{100 * flops[k] / med[k] / peak:.0f}%" if k in flops else "-"
        every = ", ".join(f"{tokens / s:.0f}" for s in runs[k])
        print(f"{k:<14} {tokens / med[k]:>9.0f} {med[k]:>8.2f} {ratio['naive'][k]:>8.2f}x {ratio['batched'][k]:>9.2f}x "
              f"{d:>22} {rate:>15} {share:>13}   {every}")  # fmt: skip
    print(ratio_line("dice / batched per repeat", per_rep["batched"]["dice"]))
    print(ratio_line("dice / naive per repeat", per_rep["naive"]["dice"]) + f" (bar: x5); the same log-probs: max |Δ| "
          f"{diffs['dice']:.2e}")  # fmt: skip
    # the roofline: with dice's linear-layer FLOPs, the naive time / x at the GEMM peak bounds any ratio here
    bound = med["naive"] / (flops["dice"] / peak)
    print(f"GEMM peak of this machine (float32, {model.config.hidden_size}x{model.config.intermediate_size} MLP shape): "
          f"{peak / 1e9:.1f} GFLOP/s; dice's linear layers do {flops['dice'] / flops['naive']:.2f}x the naive FLOPs, "
          f"so no scorer of these FLOPs can exceed x{bound:.2f} over this naive run on this device")  # fmt: skip
    if diffs["dice"] > 1e-3:
        print("WARNING: dice's log-probs differ from the naive ones by more than 1e-3")
    processes = stage_processes(args, path, rows) if args.processes else None
    vllm = vllm_scorer(args, path, encoded, logps["dice"], model, tok, tokens) if args.vllm else None

    report = {
        "settings": {**vars(args), "cpu_count": os.cpu_count()},
        "model": {"path": shown(path), "parameters": n_params},
        "responses": len(encoded),
        "scored_tokens": tokens,
        "lengths": lengths,
        "seconds_runs": runs,
        "tokens_per_s_median": {k: tokens / s for k, s in med.items()},
        "ratio_per_repeat": per_rep,
        "ratio_median": ratio,
        "max_abs_logp_diff_vs_naive": diffs,
        "linear_flops": flops,
        "gemm_peak_flops_per_s": peak,
        "ratio_bound_at_gemm_peak": bound,
        "stage_processes": processes,
        "vllm": vllm,
        "benchmark_wall_s": time.perf_counter() - started,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} (benchmark took {report['benchmark_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
