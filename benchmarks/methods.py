"""Every recipe on the toy task with a known true reward: does each method do what its paper says?

    .venv/bin/python benchmarks/methods.py                      # all recipes, 2 rounds (~40-60 min on 2 cores)
    .venv/bin/python benchmarks/methods.py --recipes dice,dice-alpha0 --rounds 2
    .venv/bin/python benchmarks/methods.py --update-readme      # also rewrite the README's table from the results

What it does:
1. Builds the toy model (pipeline/toy.py: the toy corpus, `pipeline.tiny.build_tiny_model`) once.
2. Trains ONE π_0 for everybody: `dice run conf/recipes/dice.yaml rounds=0` (offline DPO on the toy preference
   set). Every recipe then starts from that π_0 (`round0.mode=skip`, `model.reference` = the SFT model), so the
   rounds are the only difference: same seeds, same prompts per round, same training batch, same number of
   rounds (the budget).
3. Runs each recipe as users do, `dice run conf/recipes/<recipe>.yaml ...` (the Prefect flow, every stage its own
   process), timing it. Variants are the same preset with overrides: `dice-alpha0` (no length debiasing),
   `irepo-noise*` (annotator noise), `ipo-md-beta0` (β_m = 0, which must match online IPO).
4. Evaluates π_0 and every round's checkpoint on the held-out `data/toy/eval_prompts.jsonl` (96 prompts × 4
   samples, the same per-prompt seeds for every model): mean true reward, win rate against π_0 on the same
   (prompt, sample) — ties count ½ — mean response tokens, and from the round's pairs.parquet the mean
   chosen−rejected length gap (tokens) of the pairs it trained on.
5. Writes `benchmarks/results/methods.md` (the table), `benchmarks/results/methods.json` and PNG plots
   (`methods_reward.png`, `methods_length.png`); `--update-readme` puts the table into README.md between the
   `<!-- methods:begin -->` / `<!-- methods:end -->` markers. Run folders stay in `benchmarks/out/methods/`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OUT = REPO / "benchmarks" / "out" / "methods"
RESULTS = REPO / "benchmarks" / "results"
EVAL_PROMPTS = REPO / "data" / "toy" / "eval_prompts.jsonl"
EVAL_SAMPLES = 4
MARK_BEGIN, MARK_END = "<!-- methods:begin -->", "<!-- methods:end -->"


def _judges(n: int, noise: float, temperature: float = 0.25) -> str:
    """A `label.judges=[...]` override: N simulated annotators of the given reward noise (flow-style YAML)."""
    items = [
        f"{{id: sim-{i}, backend: python, function: 'pipeline.toy:simulated_preference', "
        f"options: {{noise: {noise}, temperature: {temperature}, seed: {i}}}}}"
        for i in range(n)
    ]
    return "label.judges=[" + ", ".join(items) + "]"


# name -> (preset, extra overrides, what it shows)
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "dice": ("dice", [], "DICE: implicit reward, α debiasing, replay γ=0.5"),
    "dice-alpha0": ("dice", ["pairs.debias_length=false"], "DICE without length debiasing (α = 0)"),
    "dpo": ("dpo", [], "offline DPO continued for the same steps"),
    "ipo": ("ipo", [], "offline IPO"),
    "slic": ("slic", [], "offline SLiC"),
    "sr-dpo": ("sr-dpo", [], "Sr-DPO (offline, refinement term)"),
    "sr-ipo": ("sr-ipo", [], "Sr-IPO (offline, refinement term)"),
    "dpo-iterative": ("dpo-iterative", [], "iterative DPO, annotator labels"),
    "ipo-iterative": ("ipo-iterative", [], "iterative IPO, annotator labels"),
    "slic-iterative": ("slic-iterative", [], "iterative SLiC, annotator labels"),
    "irepo-noise0": ("irepo", [_judges(3, 0.0)], "iREPO, 3 annotators, noise 0"),
    "irepo": ("irepo", [], "iREPO, 3 annotators, noise 0.2"),
    "irepo-noise0.6": ("irepo", [_judges(3, 0.6)], "iREPO, 3 annotators, noise 0.6"),
    "online-ipo": ("online-ipo", [], "online IPO, soft preference model"),
    "ipo-md": ("ipo-md", [], "IPO-MD, mixture β_m = 0.25"),
    "ipo-md-beta0": ("ipo-md", ["generate.mixture_beta=0.0"], "IPO-MD with β_m = 0 (= online IPO)"),
}


def dice_cmd(preset: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", str(REPO / "conf" / "recipes" / f"{preset}.yaml"), *overrides]


def child_env() -> dict[str, str]:
    return {**os.environ, "PREFECT_HOME": str(OUT / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def run_logged(cmd: list[str], log: Path) -> float:
    """Run a command (cwd = repo), output to `log`; returns wall seconds; raises with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd[2:5])} failed ({proc.returncode}); log {log}:\n{tail}")
    return wall


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(model: str, seed: int) -> dict[str, Any]:
    """True reward, lengths and per-sample rewards of `model` on the eval prompts (vLLM, per-prompt seeds)."""
    import gc

    from transformers import AutoTokenizer
    from vllm import SamplingParams, TokensPrompt

    from pipeline.config import EngineConfig
    from pipeline.engine import make_llm
    from pipeline.logprobs import prompt_ids
    from pipeline.toy import true_reward
    from stages.generate import prompt_seed

    rows = [json.loads(line) for line in EVAL_PROMPTS.read_text().splitlines() if line.strip()]
    tok = AutoTokenizer.from_pretrained(model)
    llm = make_llm(model, EngineConfig(), dtype="float32", seed=seed, trust_remote_code=False)
    params = [
        SamplingParams(n=EVAL_SAMPLES, temperature=1.0, max_tokens=64, seed=prompt_seed(seed, 999, r["prompt_id"]))
        for r in rows
    ]
    outs = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids(tok, r["prompt"])) for r in rows], params, use_tqdm=False)
    rewards = [true_reward(r["prompt"], o.text) for r, res in zip(rows, outs) for o in res.outputs]
    tokens = [len(o.token_ids) for res in outs for o in res.outputs]
    cut = sum(o.finish_reason == "length" for res in outs for o in res.outputs)
    del llm
    gc.collect()
    return {"rewards": rewards, "true_reward": sum(rewards) / len(rewards), "tokens": sum(tokens) / len(tokens),
            "cut_share": cut / len(tokens)}  # fmt: skip


def pair_gap(run_dir: Path, k: int, tokenizer) -> dict[str, float | None]:
    """Mean chosen−rejected length gap (tokens) of round k's training pairs: generated ones, and all."""
    import pyarrow.parquet as pq

    path = run_dir / f"round-{k}" / "pairs.parquet"
    if not path.is_file():
        return {"gap_generated": None, "gap_all": None}
    t = pq.read_table(path, columns=["chosen", "rejected", "source"]).to_pydict()
    n = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    gaps = [(n(c) - n(r), s) for c, r, s in zip(t["chosen"], t["rejected"], t["source"])]
    gen = [g for g, s in gaps if s == "generated"]
    return {
        "gap_generated": sum(gen) / len(gen) if gen else None,
        "gap_all": sum(g for g, _ in gaps) / len(gaps) if gaps else None,
    }


def win_rate(rewards: list[float], base: list[float]) -> float:
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, base)) / len(base)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=",".join(VARIANTS), help="comma-separated variants (default: all)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds after the shared π_0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    ap.add_argument("--fresh", action="store_true", help="delete earlier run folders first (else finished rounds are reused)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.fresh and OUT.exists():
        import shutil

        shutil.rmtree(OUT / "runs", ignore_errors=True)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from pipeline.tiny import TinySpec, build_tiny_model

    sft = OUT / "models" / "toy-sft"
    if not (sft / "model.safetensors").is_file():
        print("building the toy model ...", flush=True)
        build_tiny_model(sft, [REPO / "data/toy/sft.jsonl"], TinySpec(sft_steps=400, seed=args.seed))
    runs = OUT / "runs"
    common = [f"runs_dir={runs}", f"seed={args.seed}", "model.build_tiny_if_missing=false"]
    print("π_0: offline DPO on the toy preference set ...", flush=True)
    wall0 = run_logged(dice_cmd("dice", [*common, "name=pi0", "rounds=0", f"model.policy={sft}"]), OUT / "logs" / "pi0.log")
    pi0 = runs / "pi0" / "round-0" / "checkpoint"

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pi0)
    evals: dict[str, dict[str, Any]] = {}
    cache = OUT / "evals.json"
    if cache.is_file():
        evals = json.loads(cache.read_text())

    def evaluated(model: Path) -> dict[str, Any]:
        from pipeline.artifacts import fingerprint

        key = f"{model}@{fingerprint(model)}:{args.seed}"
        if key not in evals:
            evals[key] = evaluate(str(model), args.seed)
            cache.write_text(json.dumps(evals))
        return evals[key]

    base = evaluated(pi0)
    results: dict[str, Any] = {"rounds": args.rounds, "seed": args.seed, "pi0_seconds": wall0, "recipes": {}}
    earlier = RESULTS / "methods.json"
    if earlier.is_file():  # a subset run updates its rows and keeps the others of the same settings
        old = json.loads(earlier.read_text())
        if (old.get("rounds"), old.get("seed")) == (args.rounds, args.seed):
            results["recipes"] = {n: r for n, r in old["recipes"].items() if n in VARIANTS}
    for name in names:
        preset, extra, what = VARIANTS[name]
        overrides = [*common, f"name={name}", f"rounds={args.rounds}", "round0.mode=skip",
                     f"model.policy={pi0}", f"model.reference={sft}", *extra]  # fmt: skip
        print(f"{name}: dice run conf/recipes/{preset}.yaml {' '.join(extra)}", flush=True)
        wall = run_logged(dice_cmd(preset, overrides), OUT / "logs" / f"{name}.log")
        per_round = [{"round": 0, "true_reward": base["true_reward"], "win_rate": 0.5, "tokens": base["tokens"],
                      "cut_share": base["cut_share"], "gap_generated": None, "gap_all": None}]  # fmt: skip
        for k in range(1, args.rounds + 1):
            ev = evaluated(runs / name / f"round-{k}" / "checkpoint")
            per_round.append({"round": k, "true_reward": ev["true_reward"], "win_rate": win_rate(ev["rewards"], base["rewards"]),
                              "tokens": ev["tokens"], "cut_share": ev["cut_share"], **pair_gap(runs / name, k, tokenizer)})  # fmt: skip
            r = per_round[-1]
            print(f"  round {k}: true reward {r['true_reward']:+.3f}  win {r['win_rate']:.3f}  tokens {r['tokens']:.1f}", flush=True)
        results["recipes"][name] = {"preset": preset, "overrides": extra, "what": what, "seconds": wall, "rounds": per_round}
    results["recipes"] = {n: results["recipes"][n] for n in VARIANTS if n in results["recipes"]}  # table order
    write_results(results, args.update_readme)


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def table(results: dict[str, Any]) -> str:
    """The Markdown table: one row per recipe, the last round's numbers and the per-round true reward."""
    rounds = results["rounds"]
    head = ["recipe", "what", *[f"R round {k}" for k in range(rounds + 1)], f"win vs π_0 (round {rounds})",
            "tokens (π_0 → last)", "gap chosen−rejected (last round)", "wall s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rec in results["recipes"].items():
        rs = rec["rounds"]
        last = rs[-1]
        gap = last["gap_generated"] if last["gap_generated"] is not None else last["gap_all"]
        lines.append("| " + " | ".join([
            f"`{name}`", rec["what"], *[_fmt(r["true_reward"], "+.3f") for r in rs], _fmt(last["win_rate"], ".3f"),
            f"{rs[0]['tokens']:.1f} → {last['tokens']:.1f}", _fmt(gap, "+.1f"), f"{rec['seconds']:.0f}",
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def write_results(results: dict[str, Any], update_readme: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "methods.json").write_text(json.dumps(results, indent=2))
    md = table(results)
    cmd = "`.venv/bin/python benchmarks/methods.py`"
    pi0 = next(iter(results["recipes"].values()))["rounds"][0]["true_reward"]  # round 0 is the shared π_0
    note = (f"Toy task, {results['rounds']} rounds from one shared π_0, seed {results['seed']}; R = mean true reward "
            f"of 96 held-out prompts × {EVAL_SAMPLES} samples (π_0: {pi0:+.3f}); produced by {cmd}.")  # fmt: skip
    (RESULTS / "methods.md").write_text(note + "\n\n" + md + "\n")
    plot(results)
    print("\n" + md)
    if update_readme:
        readme = REPO / "README.md"
        text = readme.read_text()
        if MARK_BEGIN not in text or MARK_END not in text:
            raise SystemExit(f"README.md has no {MARK_BEGIN} … {MARK_END} block to update")
        start, end = text.index(MARK_BEGIN) + len(MARK_BEGIN), text.index(MARK_END)
        readme.write_text(text[:start] + "\n" + note + "\n\n" + md + "\n" + text[end:])
        print("README.md updated")


def plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, ylabel, fname in (("true_reward", "mean true reward (eval prompts)", "methods_reward.png"),
                               ("tokens", "mean response tokens", "methods_length.png")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, rec in results["recipes"].items():
            xs = [r["round"] for r in rec["rounds"]]
            ax.plot(xs, [r[key] for r in rec["rounds"]], marker="o", label=name)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(results["rounds"] + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(RESULTS / fname, dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
