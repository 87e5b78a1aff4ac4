"""Every recipe on the toy task with a known true reward, over several seeds, with 95% intervals.

Does each method do what its paper says, and does the evaluate stage's length-controlled win rate rank the methods
as the true reward does?

    .venv/bin/python benchmarks/methods.py                      # all recipes, 2 rounds, 5 seeds (hours on 2 cores)
    .venv/bin/python benchmarks/methods.py --recipes dice,dice-alpha0,dpo,irepo,online-ipo --seeds 5
    .venv/bin/python benchmarks/methods.py --update-readme      # also rewrite the README's table from the results
    .venv/bin/python benchmarks/methods.py --reanalyse --update-readme   # only recompute findings from methods.json

What it does, for each seed s (`--seeds N`: s = seed, seed+1, …):
1. Builds the toy model (pipeline/run/toy.py: the toy corpus, `pipeline.run.tiny.build_tiny_model`) once, for all seeds.
2. Trains ONE π_0 per seed for everybody: `dice run conf/recipes/dice.yaml rounds=0 seed=s` (offline DPO on the toy
   preference set). Every recipe then starts from that π_0 (`round0.mode=skip`, `model.reference` = the SFT model),
   so the rounds are the only difference: same seeds, same prompts per round, same training batch, same number of
   rounds (the budget).
3. Runs each recipe as users do, `dice run conf/recipes/<recipe>.yaml ... seed=s` (the Prefect flow, every stage its
   own process), timing it. Variants are the same preset with overrides: `dice-alpha0` (no length debiasing),
   `irepo-noise*` (annotator noise), `ipo-md-beta0` (β_m = 0, which must match online IPO).
4. Reads each round's `evaluate` stage (every recipe's `eval:` block: π_k against π_0 on the held-out
   `data/toy/eval_prompts.jsonl`, 96 prompts × 4 samples, the same per-prompt seeds for every model, annotated by the
   toy's true reward): R = the mean true reward of π_k's responses (π_0's for round 0), the win rate against π_0
   (ties ½) and the length-controlled win rate, the mean response tokens, and from the round's pairs.parquet the mean
   chosen−rejected length gap (tokens) of the pairs it trained on.
5. Re-evaluates each run's last round with an annotator of KNOWN length bias (`--length-bias B`, default 0.03:
   `pipeline.run.toy:length_biased_preference`, the true reward plus B per word): `dice eval --model π_k --baseline
   π_0` with that judge alone, so its raw win rate rewards length and its LC win rate shows what length control
   removes (compare both with the true-reward win rate). `--length-bias 0` skips it.
6. Aggregates over seeds: mean ± the half-width of a 95% t-interval (Student's t, n−1 degrees of freedom) for R, the
   win rates and the mean tokens; and PAIRED differences within a seed — every recipe of a seed starts from the same
   π_0 and is evaluated on the same prompts with the same π_0 responses, so the seed's π_0 cancels: R(last) − R(π_0),
   and R, LC win rate and tokens against `dpo` (continued offline DPO) of the same seed, each a t-interval over the
   seeds' differences. Findings state a difference only where its paired interval excludes 0, and list plainly what
   does not separate. The Spearman rank correlation across recipes between the LC win rate (and the raw win rate)
   and R at the last round is reported with the number of recipes it rests on.
7. Writes `methods.md` (the table and findings), `methods.json` and PNG plots (`methods_reward.png`,
   `methods_length.png`) into `--results` (default benchmarks/results); `--update-readme` puts the table and findings
   into docs/recipes.md between the `<!-- methods:begin -->` / `<!-- methods:end -->` markers. Run folders stay in
   $DICE_BENCH_OUT/methods (default benchmarks/out/methods).
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

# everything the benchmark writes but its results (models, runs, logs); DICE_BENCH_OUT moves it, as for the others
OUT = Path(os.environ.get("DICE_BENCH_OUT") or REPO / "benchmarks" / "out").resolve() / "methods"
RESULTS = REPO / "benchmarks" / "results"
MARK_BEGIN, MARK_END = "<!-- methods:begin -->", "<!-- methods:end -->"
BASELINE = "dpo"  # the recipe every other one is compared with: continued offline DPO for the same steps
# t_{0.975, df} for df = 1..30 (two-sided 95%); beyond 30 the normal-approximation expansion below
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def _judges(n: int, noise: float, temperature: float = 0.25) -> str:
    """A `label.judges=[...]` override: N simulated annotators of the given reward noise (flow-style YAML)."""
    items = [
        f"{{id: sim-{i}, backend: python, function: 'pipeline.run.toy:simulated_preference', "
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


def round_eval(run_dir: Path, k: int) -> dict[str, Any]:
    """Round k's evaluate stage (π_k against π_0, annotated by the toy's true reward), from its manifest."""
    path = run_dir / f"round-{k}" / ".dice" / "evaluate.json"
    if not path.is_file():
        raise RuntimeError(f"{path}: round {k} was not evaluated (does the recipe have an `eval:` block?)")
    return json.loads(path.read_text())["stats"]


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


def t_interval(values: list[float]) -> dict[str, Any]:
    """Mean and the half-width of its two-sided 95% Student-t interval over seeds (None with fewer than 2 values)."""
    import statistics

    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "hw": None, "n": 0}
    if len(xs) < 2:
        return {"mean": xs[0], "hw": None, "n": 1}
    df = len(xs) - 1
    if df <= len(_T975):
        t = _T975[df - 1]
    else:  # Cornish-Fisher expansion of t around the normal quantile z = 1.96 (error < 1e-3 for df > 30)
        z = 1.959964
        t = z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    return {"mean": statistics.fmean(xs), "hw": t * statistics.stdev(xs) / len(xs) ** 0.5, "n": len(xs)}


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties): the Pearson correlation of the ranks."""
    import numpy as np

    if len(x) < 3:
        return None

    def ranks(v: list[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for value in np.unique(a):  # ties share their average rank
            r[a == value] = r[a == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def paired(a: list[float | None], b: list[float | None]) -> dict[str, Any]:
    """The t-interval of the within-seed differences a_s − b_s over the seeds where both exist (paired: what the two
    share in a seed, its π_0 and its prompts, cancels)."""
    return t_interval([x - y for x, y in zip(a, b) if x is not None and y is not None])


def excludes_zero(d: dict[str, Any]) -> int:
    """+1 if the interval lies wholly above 0, −1 if wholly below, 0 if it holds 0 (or is missing)."""
    if d.get("hw") is None or d.get("mean") is None:
        return 0
    if d["mean"] - d["hw"] > 0:
        return 1
    if d["mean"] + d["hw"] < 0:
        return -1
    return 0


def length_biased_eval(run_dir: Path, k: int, pi0: Path, preset: str, bonus: float, seed: int) -> dict[str, Any]:
    """Round k's policy against π_0, judged by an annotator with a known length bias alone (no true-reward metric):
    its raw and LC win rates, from `dice eval --model … --baseline …` (responses regenerated in its own folder)."""
    out = OUT / "lenbias" / f"{run_dir.name}-r{k}"
    judge = (f"eval.judges=[{{id: lenbias, backend: python, function: 'pipeline.run.toy:length_biased_preference', "
             f"options: {{bonus: {bonus}}}}}]")  # fmt: skip
    cmd = [sys.executable, "-m", "flows.cli", "eval", "--model", str(run_dir / f"round-{k}" / "checkpoint"),
           "--baseline", str(pi0), "--config", str(REPO / "conf" / "recipes" / f"{preset}.yaml"), "--out", str(out),
           judge, "eval.python_metric=null", f"seed={seed}"]  # fmt: skip
    run_logged(cmd, OUT / "logs" / f"lenbias-{run_dir.name}-r{k}.log")
    st = json.loads((out / ".dice" / "evaluate.json").read_text())["stats"]
    return {"win_rate": st["win_rate"], "lc_win_rate": st.get("lc_win_rate"), "lc_note": st.get("lc_note"),
            "tokens": st["mean_tokens"], "baseline_tokens": st["baseline_mean_tokens"]}  # fmt: skip


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=",".join(VARIANTS), help="comma-separated variants (default: all)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds after the shared π_0")
    ap.add_argument("--seed", type=int, default=0, help="the first seed")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per recipe (seed, seed+1, …): the intervals are over them")
    ap.add_argument("--length-bias", type=float, default=0.03,
                    help="per-word bonus of the length-biased annotator the last round is re-evaluated with (0: skip)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where methods.{md,json} and the plots go")
    ap.add_argument("--update-readme", action="store_true", help="write the table and findings into docs/recipes.md")
    ap.add_argument("--fresh", action="store_true", help="delete earlier run folders first (else finished rounds are reused)")
    ap.add_argument("--reanalyse", action="store_true",
                    help="run nothing: recompute the paired differences, table and findings from --results/methods.json")
    args = ap.parse_args(argv)
    if args.reanalyse:
        results = json.loads((args.results / "methods.json").read_text())
        for rec in results["recipes"].values():
            rec["per_seed"] = {int(s): rows for s, rows in rec["per_seed"].items()}
        per_seed = {n: rec["per_seed"] for n, rec in results["recipes"].items()}
        for name, rec in results["recipes"].items():
            rec["paired"] = paired_differences(per_seed, name, results["seeds"], results["rounds"])
        results["spearman"], results["findings"] = findings(results)
        write_results(results, args.results, args.update_readme)
        return
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    if args.fresh and OUT.exists():
        import shutil

        shutil.rmtree(OUT / "runs", ignore_errors=True)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from pipeline.run.tiny import TinySpec, build_tiny_model

    sft = OUT / "models" / "toy-sft"
    if not (sft / "model.safetensors").is_file():
        print("building the toy model ...", flush=True)
        build_tiny_model(sft, [REPO / "data/toy/sft.jsonl"], TinySpec(sft_steps=400, seed=args.seed))
    runs = OUT / "runs"
    seeds = [args.seed + i for i in range(args.seeds)]
    results: dict[str, Any] = {"rounds": args.rounds, "seeds": seeds, "pi0_seconds": {}, "recipes": {}}
    earlier = args.results / "methods.json"
    if earlier.is_file():  # a subset run updates its rows and keeps the others of the same settings
        old = json.loads(earlier.read_text())
        if (old.get("rounds"), old.get("seeds")) == (args.rounds, seeds):
            results["recipes"] = {n: r for n, r in old["recipes"].items() if n in VARIANTS}
    from transformers import AutoTokenizer

    per_seed: dict[str, dict[int, Any]] = {name: {} for name in names}
    walls: dict[str, dict[int, float]] = {name: {} for name in names}
    for seed in seeds:
        common = [f"runs_dir={runs}", f"seed={seed}", "model.build_tiny_if_missing=false"]
        print(f"seed {seed}: π_0 by offline DPO on the toy preference set ...", flush=True)
        results["pi0_seconds"][seed] = run_logged(
            dice_cmd("dice", [*common, f"name=pi0-s{seed}", "rounds=0", f"model.policy={sft}"]), OUT / "logs" / f"pi0-s{seed}.log"
        )
        pi0 = runs / f"pi0-s{seed}" / "round-0" / "checkpoint"
        tokenizer = AutoTokenizer.from_pretrained(pi0)
        for name in names:
            preset, extra, what = VARIANTS[name]
            run = f"{name}-s{seed}"
            overrides = [*common, f"name={run}", f"rounds={args.rounds}", "round0.mode=skip", "eval.enabled=true",
                         f"model.policy={pi0}", f"model.reference={sft}", *extra]  # fmt: skip
            print(f"{name} (seed {seed}): dice run conf/recipes/{preset}.yaml {' '.join(extra)}", flush=True)
            walls[name][seed] = run_logged(dice_cmd(preset, overrides), OUT / "logs" / f"{run}.log")
            first = round_eval(runs / run, 1)  # its baseline side is π_0
            rows = [{"round": 0, "true_reward": first["baseline_metric_mean"], "win_rate": None, "lc_win_rate": None,
                     "tokens": first["baseline_mean_tokens"], "gap_generated": None, "gap_all": None}]  # fmt: skip
            for k in range(1, args.rounds + 1):
                ev = round_eval(runs / run, k)
                rows.append({"round": k, "true_reward": ev["metric_mean"], "win_rate": ev["win_rate"],
                             "lc_win_rate": ev["lc_win_rate"], "tokens": ev["mean_tokens"],
                             **pair_gap(runs / run, k, tokenizer)})  # fmt: skip
                r = rows[-1]
                print(f"  round {k}: true reward {r['true_reward']:+.3f}  win {r['win_rate']:.3f}  "
                      f"LC {_fmt(r['lc_win_rate'], '.3f')}  tokens {r['tokens']:.1f}", flush=True)  # fmt: skip
            if args.length_bias > 0:
                biased = length_biased_eval(runs / run, args.rounds, pi0, preset, args.length_bias, seed)
                rows[-1].update({"biased_win_rate": biased["win_rate"], "biased_lc_win_rate": biased["lc_win_rate"]})
                print(f"  length-biased annotator (+{args.length_bias:g}/word): win {biased['win_rate']:.3f}  "
                      f"LC {_fmt(biased['lc_win_rate'], '.3f')}", flush=True)  # fmt: skip
            per_seed[name][seed] = rows
    for name in names:
        preset, extra, what = VARIANTS[name]
        agg = []
        for k in range(args.rounds + 1):
            at = [per_seed[name][s][k] for s in seeds]
            gap = [r["gap_generated"] if r["gap_generated"] is not None else r["gap_all"] for r in at]
            agg.append({"round": k, **{key: t_interval([r.get(key) for r in at]) for key in
                                       ("true_reward", "win_rate", "lc_win_rate", "tokens", "biased_win_rate",
                                        "biased_lc_win_rate")}, "gap": t_interval(gap)})  # fmt: skip
        results["recipes"][name] = {"preset": preset, "overrides": extra, "what": what, "seconds": walls[name],
                                    "per_seed": per_seed[name], "rounds": agg}  # fmt: skip
    for name in names:  # paired within a seed: against the seed's π_0 and the seed's continued offline DPO
        results["recipes"][name]["paired"] = paired_differences(per_seed, name, seeds, args.rounds)
    results["recipes"] = {n: results["recipes"][n] for n in VARIANTS if n in results["recipes"]}  # table order
    results["spearman"], results["findings"] = findings(results)
    write_results(results, args.results, args.update_readme)


def paired_differences(per_seed: dict[str, dict[int, Any]], name: str, seeds: list[int], last: int) -> dict[str, Any]:
    """Within-seed differences at the last round, as t-intervals over seeds: R against the seed's π_0 (round 0, the
    same model for every recipe of the seed), and R, LC win rate and tokens against `dpo` of the same seed."""
    mine = [per_seed[name].get(s) for s in seeds]
    get = lambda rows, k, key: None if rows is None else rows[k].get(key)  # noqa: E731
    out = {"true_reward_vs_pi0": paired([get(r, last, "true_reward") for r in mine], [get(r, 0, "true_reward") for r in mine]),
           "tokens_vs_pi0": paired([get(r, last, "tokens") for r in mine], [get(r, 0, "tokens") for r in mine])}  # fmt: skip
    if name != BASELINE and BASELINE in per_seed:
        base = [per_seed[BASELINE].get(s) for s in seeds]
        for key in ("true_reward", "lc_win_rate", "win_rate", "tokens"):
            out[f"{key}_vs_{BASELINE}"] = paired([get(r, last, key) for r in mine], [get(b, last, key) for b in base])
    return out


def findings(results: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The rank correlations and the conclusions the intervals allow, as Markdown bullet lines."""
    last = results["rounds"]
    recs = results["recipes"]
    lcs = {n: r["rounds"][last]["lc_win_rate"]["mean"] for n, r in recs.items()}
    wins = {n: r["rounds"][last]["win_rate"]["mean"] for n, r in recs.items()}
    rs = {n: r["rounds"][last]["true_reward"]["mean"] for n, r in recs.items()}
    names = [n for n in recs if None not in (lcs[n], wins[n], rs[n])]
    rho = {"lc_win_rate_vs_true_reward": spearman([lcs[n] for n in names], [rs[n] for n in names]),
           "win_rate_vs_true_reward": spearman([wins[n] for n in names], [rs[n] for n in names]),
           "recipes": len(names)}  # fmt: skip
    lines = []
    if len(results["seeds"]) < 2:
        lines.append("One seed: no intervals, so no difference below is established.")
    pair = {n: r.get("paired") or {} for n, r in recs.items()}

    def verdict(key: str, what: str, spec: str = "+.3f") -> None:
        have = {n: p[key] for n, p in pair.items() if p.get(key, {}).get("hw") is not None}
        if not have:
            return
        sides = {n: excludes_zero(d) for n, d in have.items()}
        show = lambda ns: ", ".join(f"`{n}` ({have[n]['mean']:{spec}} ± {have[n]['hw']:.3f})" for n in ns) or "none"  # noqa: E731
        lines.append(f"{what}, paired within a seed (95% t-interval of the differences): above 0 for "
                     f"{show([n for n, v in sides.items() if v > 0])}; below 0 for {show([n for n, v in sides.items() if v < 0])}; "
                     f"does not separate from 0 for {show([n for n, v in sides.items() if v == 0])}.")  # fmt: skip

    verdict("true_reward_vs_pi0", f"R at round {last} minus π_0's R")
    verdict(f"true_reward_vs_{BASELINE}", f"R at round {last} minus `{BASELINE}`'s (continued offline DPO)")
    verdict(f"lc_win_rate_vs_{BASELINE}", f"LC win rate vs π_0 at round {last} minus `{BASELINE}`'s")
    verdict(f"tokens_vs_{BASELINE}", f"Mean response tokens at round {last} minus `{BASELINE}`'s", "+.1f")
    biased = {n: r["rounds"][last] for n, r in recs.items() if r["rounds"][last].get("biased_win_rate", {}).get("mean") is not None}
    if biased:
        lines.append("With an annotator that adds a known bonus per word to the true reward: " + "; ".join(
            f"`{n}` raw win {_pm(r['biased_win_rate'], '.3f')}, LC {_pm(r['biased_lc_win_rate'], '.3f')}, true-reward "
            f"win {_pm(r['win_rate'], '.3f')}" for n, r in biased.items()) + " (LC should sit nearer the true-reward win "
            "rate than the raw rate does where the policy grew longer).")  # fmt: skip
    if rho["lc_win_rate_vs_true_reward"] is not None:
        lines.append(f"Rank correlation (Spearman) across the {len(names)} recipes at round {last}, seed means: LC win "
                     f"rate vs R ρ = {rho['lc_win_rate_vs_true_reward']:+.2f}; raw win rate vs R ρ = "
                     f"{_fmt(rho['win_rate_vs_true_reward'], '+.2f')} (seed means only: recipes whose paired "
                     "differences do not separate can swap ranks by noise).")  # fmt: skip
    else:
        lines.append(f"Rank correlation between LC win rate and R: not computed ({len(names)} recipe(s); it needs 3 "
                     "with distinct values).")  # fmt: skip
    return rho, lines


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _pm(x: dict[str, Any], spec: str) -> str:
    """mean ± half-width of the 95% interval (just the mean with one seed)."""
    if x["mean"] is None:
        return "–"
    return format(x["mean"], spec) + (f" ± {x['hw']:.3f}" if x["hw"] is not None else "")


def table(results: dict[str, Any]) -> str:
    """The Markdown table: one row per recipe, R per round and the last round's win rates, lengths and gap."""
    rounds = results["rounds"]
    head = ["recipe", "what", *[f"R round {k}" for k in range(rounds + 1)], f"win vs π_0 (round {rounds})",
            f"LC win vs π_0 (round {rounds})", "ΔR vs π_0 (paired)", f"ΔR vs {BASELINE} (paired)",
            "length-biased annotator: win / LC", "tokens (π_0 → last)", "gap chosen−rejected (last round)",
            "wall s per seed"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rec in results["recipes"].items():
        rs = rec["rounds"]
        last = rs[-1]
        wall = sum(rec["seconds"].values()) / max(len(rec["seconds"]), 1)
        lines.append("| " + " | ".join([
            f"`{name}`", rec["what"], *[_pm(r["true_reward"], "+.3f") for r in rs], _pm(last["win_rate"], ".3f"),
            _pm(last["lc_win_rate"], ".3f"), _pm(rec.get("paired", {}).get("true_reward_vs_pi0", {"mean": None}), "+.3f"),
            _pm(rec.get("paired", {}).get(f"true_reward_vs_{BASELINE}", {"mean": None}), "+.3f"),
            f"{_pm(last.get('biased_win_rate', {'mean': None}), '.3f')} / {_pm(last.get('biased_lc_win_rate', {'mean': None}), '.3f')}",
            f"{_fmt(rs[0]['tokens']['mean'], '.1f')} → {_fmt(last['tokens']['mean'], '.1f')}",
            _fmt(last["gap"]["mean"], "+.1f"), f"{wall:.0f}",
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def write_results(results: dict[str, Any], out: Path, update_readme: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.json").write_text(json.dumps(results, indent=2))
    md = table(results)
    cmd = "`.venv/bin/python benchmarks/methods.py`"
    seeds = results["seeds"]
    note = (f"Toy task, {results['rounds']} rounds from one π_0 per seed, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); "
            "R = mean true reward of π_k on 96 held-out prompts × 4 samples (the evaluate stage, π_0 as baseline; "
            "round 0: π_0), mean ± the half-width of a 95% t-interval over seeds; win and LC win rates against π_0 "
            f"(ties ½); produced by {cmd}.")  # fmt: skip
    found = "\n".join(f"- {line}" for line in results["findings"])
    body = note + "\n\n" + md + "\n\nFindings (written by the command; a difference only where its paired 95% interval excludes 0):\n" + found + "\n"
    (out / "methods.md").write_text(body)
    plot(results, out)
    print("\n" + md + "\n\n" + found)
    if update_readme:
        readme = REPO / "docs/recipes.md"
        text = readme.read_text()
        if MARK_BEGIN not in text or MARK_END not in text:
            raise SystemExit(f"docs/recipes.md has no {MARK_BEGIN} … {MARK_END} block to update")
        start, end = text.index(MARK_BEGIN) + len(MARK_BEGIN), text.index(MARK_END)
        readme.write_text(text[:start] + "\n" + body + text[end:])
        print("docs/recipes.md updated")


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, ylabel, fname in (("true_reward", "mean true reward (eval prompts)", "methods_reward.png"),
                               ("tokens", "mean response tokens", "methods_length.png")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, rec in results["recipes"].items():
            xs = [r["round"] for r in rec["rounds"]]
            ys = [r[key]["mean"] for r in rec["rounds"]]
            err = [r[key]["hw"] or 0.0 for r in rec["rounds"]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=2, label=name)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel + " (95% interval over seeds)")
        ax.set_xticks(range(results["rounds"] + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
