"""Implicit-reward scoring throughput: dice's scorer against a naive per-sample transformers forward, same run.

    .venv/bin/python benchmarks/label_throughput.py [--prompts 64 --k 8 --repeats 3 --wait-quiet 300]

The label stage's implicit reward r = β·[logp(π, x, y) − logp(π_ref, x, y)] is two log-prob passes over the
K responses of every prompt; this measures one such pass, on the same model and the same responses for both:

- dice: `pipeline.logprobs.score`, as the label stage's `_logps_under` calls it (`label.batch_size` 16
  sequences per forward, `reference.packing` on): the K responses of a prompt packed behind ONE copy of the
  prompt, no padding, the LM head only where a response token is predicted.
- naive: one transformers forward per (prompt, response), batch of one, full logits, log-softmax over the
  vocabulary, summed over the response tokens.
- dice (padded) is reported too: the same scorer with `packing=False` (length-sorted padded batches).

Scored tokens count prompt + response of every response (what the naive loop computes), the same number for
all. The table has tokens/s, the ratios to naive, and the largest |difference| of the log-probs against the naive
ones. Writes `benchmarks/out/label_throughput.json`.

Responses: `--prompts` prompts of the shipped offline set, each with K responses: its own chosen and rejected
answer and K − 2 others drawn from the set's answers (20-460 tokens: the lengths of real samples vary as much).
The model is the train benchmark's tiny Llama (5.8M parameters), built once into benchmarks/out/models/.
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

from benchmarks.train_throughput import DATA, OUT, add_model_args, build_model, percentiles, shown, wait_quiet  # noqa: E402


def build_groups(tokenizer, args: argparse.Namespace) -> list[tuple[str, str]]:
    """(prompt, response) rows, K per prompt, a prompt's responses adjacent as the generate stage writes them."""
    from pipeline.logprobs import encode

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


def linear_flops(model, encoded: list[tuple[list[int], list[int]]], batch_size: int) -> dict[str, float]:
    """Multiply-add FLOPs of the linear layers (decoder projections + LM head; attention scores left out) that
    each scorer runs: 2 · weights · positions through them.

    naive: every position of prompt + response through the decoder and the head. dice (packed): each prompt once
    per chunk of `batch_size` of its responses (as `score` packs them), a response's last token never through
    the decoder, the head only where a response token is predicted."""
    import torch

    from pipeline.packing import group_by_prompt

    decoder = sum(m.weight.numel() for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings().weight.numel()
    tokens = sum(len(p) + len(r) for p, r in encoded)
    dec_pos = head_pos = 0
    for prompt, idx in group_by_prompt(encoded):
        dec_pos += len(prompt) * -(-len(idx) // batch_size) + sum(len(encoded[i][1]) - 1 for i in idx)
        head_pos += sum(len(encoded[i][1]) for i in idx)
    return {"naive": 2.0 * (decoder + head) * tokens, "dice": 2.0 * (decoder * dec_pos + head * head_pos)}


def gemm_peak(hidden: int, intermediate: int, device, seconds: float = 2.0) -> float:
    """This machine's float32 GEMM rate (FLOP/s) on the model's MLP shape, (2048 × hidden) @ (hidden × intermediate),
    best of repeated timings: the ceiling any scorer of this model can reach on its linear layers."""
    import torch

    a = torch.randn(2048, hidden, device=device)
    b = torch.randn(hidden, intermediate, device=device)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / 10)
    return 2.0 * 2048 * hidden * intermediate / best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64, help="prompts scored")
    ap.add_argument("--k", type=int, default=8, help="responses per prompt (>= 2; DICE's paper: 16)")
    ap.add_argument("--batch-size", type=int, default=16, help="dice's sequences per forward (label.batch_size)")
    ap.add_argument("--max-len", type=int, default=512, help="drop prompt+response longer than this (model.max_length)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each scorer, alternating; the fastest is kept")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each timed run, wait up to S seconds for other processes to leave the CPUs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: the cores)")
    ap.add_argument("--device", default="cpu", help="torch device of both scorers (cpu; cuda on a GPU machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT / "label_throughput.json"))
    add_model_args(ap)  # the train benchmark's model: same flags, same folder
    args = ap.parse_args(argv)
    if args.k < 2:
        sys.exit("--k must be >= 2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()

    import numpy as np
    import torch

    from pipeline.logprobs import encode, load_causal_lm, score

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
        "naive": lambda: naive_logps(naive_model, encoded),
    }
    # untimed warm-up of each (allocator, kernels)
    score(model, encoded[:64], tok.pad_token_id, args.batch_size)
    score(model, encoded[:64], tok.pad_token_id, args.batch_size, packing=False)
    naive_logps(naive_model, encoded[:16])
    runs: dict[str, list[float]] = {k: [] for k in scorers}
    logps: dict[str, Any] = {}
    for rep in range(args.repeats):
        for name, fn in scorers.items():
            if args.wait_quiet:
                wait_quiet(args.wait_quiet)
            t = time.perf_counter()
            logps[name] = fn()  # returns numpy on the CPU: the device's work is done when it returns
            runs[name].append(time.perf_counter() - t)
            print(f"  run {rep + 1}/{args.repeats} {name}: {tokens / runs[name][-1]:.0f} tokens/s", flush=True)

    best = {k: min(v) for k, v in runs.items()}
    diffs = {k: float(np.max(np.abs(logps[k] - logps["naive"]))) for k in scorers if k != "naive"}
    flops = linear_flops(model, encoded, args.batch_size)
    peak = gemm_peak(model.config.hidden_size, model.config.intermediate_size, device)
    print()
    print(f"{'scorer':<14} {'tokens/s':>9} {'best s':>7} {'vs naive':>9} {'max |Δ logp| vs naive':>22} "
          f"{'linear GFLOP/s':>15} {'of GEMM peak':>13}   tokens/s of every run")  # fmt: skip
    for k in scorers:
        ratio = best["naive"] / best[k]
        d = f"{diffs[k]:.2e}" if k in diffs else "-"
        rate = f"{flops[k] / best[k] / 1e9:.1f}" if k in flops else "-"
        share = f"{100 * flops[k] / best[k] / peak:.0f}%" if k in flops else "-"
        every = ", ".join(f"{tokens / s:.0f}" for s in runs[k])
        print(f"{k:<14} {tokens / best[k]:>9.0f} {best[k]:>7.2f} {ratio:>8.2f}x {d:>22} {rate:>15} {share:>13}   {every}")
    print(f"dice / naive: x{best['naive'] / best['dice']:.2f} (bar: x5); the same log-probs: max |Δ| {diffs['dice']:.2e}")
    # the roofline: with dice's linear-layer FLOPs, the naive time / x at the GEMM peak bounds any ratio here
    bound = best["naive"] / (flops["dice"] / peak)
    print(f"GEMM peak of this machine (float32, {model.config.hidden_size}x{model.config.intermediate_size} MLP shape): "
          f"{peak / 1e9:.1f} GFLOP/s; dice's linear layers do {flops['dice'] / flops['naive']:.2f}x the naive FLOPs, "
          f"so no scorer of these FLOPs can exceed x{bound:.2f} over this naive run on this device")  # fmt: skip
    if diffs["dice"] > 1e-3:
        print("WARNING: dice's log-probs differ from the naive ones by more than 1e-3")

    report = {
        "settings": {**vars(args), "cpu_count": os.cpu_count()},
        "model": {"path": shown(path), "parameters": n_params},
        "responses": len(encoded),
        "scored_tokens": tokens,
        "lengths": lengths,
        "seconds_runs": runs,
        "tokens_per_s": {k: tokens / s for k, s in best.items()},
        "ratio_vs_naive": {k: best["naive"] / s for k, s in best.items()},
        "max_abs_logp_diff_vs_naive": diffs,
        "linear_flops": flops,
        "gemm_peak_flops_per_s": peak,
        "ratio_bound_at_gemm_peak": bound,
        "benchmark_wall_s": time.perf_counter() - started,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} (benchmark took {report['benchmark_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
