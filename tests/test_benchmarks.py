"""The benchmarks run, on a model small enough for CI, and check what they measure: the same tokens and first
loss for the trainer, the same log-probs for every scorer. Their numbers are not asserted (a timing is not a
test); what is asserted would break if the benchmark's bookkeeping did."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from benchmarks.harness import alternate, median, middle, ratio_line, ratios, run_child
from tests.conftest import BIN, REPO

SHAPE = ["--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2",
         "--vocab", "512", "--sft-steps", "1"]  # fmt: skip


def test_harness_alternates_and_takes_the_median_of_per_repeat_ratios():
    """Contenders run in turn within each repeat (A B, A B, A B); repeat i's ratio pairs A's run i with B's run i, and
    the headline is their median, never the best of A over the best of B (here 30/10 = x3.00)."""
    order = []
    runs = alternate({"a": lambda r: order.append(("a", r)) or [10.0, 30.0, 20.0][r],
                      "b": lambda r: order.append(("b", r)) or [5.0, 20.0, 4.0][r]}, 3)  # fmt: skip
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert runs == {"a": [10.0, 30.0, 20.0], "b": [5.0, 20.0, 4.0]}
    per = ratios(runs["a"], runs["b"])
    assert per == [2.0, 1.5, 5.0] and median(per) == 2.0  # sorted 1.5, 2.0, 5.0
    assert median([1.0, 2.0, 4.0, 8.0]) == 3.0  # an even count: the mean of the two middle ratios
    assert ratio_line("a / b", per) == "a / b: x2.00, x1.50, x5.00; median x2.00"
    # the median run is one that happened: the lower middle for an even count
    assert middle([{"t": 3}, {"t": 1}, {"t": 4}, {"t": 2}], "t") == {"t": 2}
    with pytest.raises(ValueError, match="same repeat"):
        ratios([1.0, 2.0], [1.0])


def test_harness_child_gives_its_result_line_step_times_and_log(tmp_path):
    """run_child reads the child's RESULT line, timestamps each step line in order, keeps the whole output in the
    log, and a failing child raises with the log's tail."""
    code = "print('BENCH_STEP 1'); print('noise'); print('BENCH_STEP 2'); print('BENCH_RESULT {\"tokens\": [3, 4]}')"
    child = run_child([sys.executable, "-c", code], tmp_path / "child.log", re.compile(r"^BENCH_STEP (\d+)"))
    assert child["result"] == {"tokens": [3, 4]}
    assert len(child["step_ends"]) == len(child["step_cpu"]) == 2 and child["step_ends"][0] <= child["step_ends"][1]
    assert "noise" in (tmp_path / "child.log").read_text() and child["peak_rss_mib"] > 0
    with pytest.raises(RuntimeError, match=r"exited with 3(.|\n)*the last words"):
        run_child([sys.executable, "-c", "print('the last words'); raise SystemExit(3)"], tmp_path / "fail.log")


def _bench(tmp_path, script: str, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "DICE_BENCH_OUT": str(tmp_path / "bench"), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([str(BIN / "python"), f"benchmarks/{script}.py", *SHAPE, *args, "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_label_benchmark_scores_the_same_log_probs_four_ways(tmp_path):
    r = _bench(tmp_path, "label_throughput", "--prompts", "6", "--k", "3", "--repeats", "2")
    assert r["responses"] > 6 and set(r["tokens_per_s_median"]) == {"dice", "dice (padded)", "batched", "naive"}
    # the headline is the median of repeat-by-repeat ratios (scorers back to back), never best against best
    runs = r["seconds_runs"]
    per_rep = [b / d for b, d in zip(runs["batched"], runs["dice"])]
    assert r["ratio_per_repeat"]["batched"]["dice"] == per_rep and len(per_rep) == 2
    assert math.isclose(r["ratio_median"]["batched"]["dice"], sum(per_rep) / 2)
    assert max(r["max_abs_logp_diff_vs_naive"].values()) < 1e-3  # the batched baseline too
    # dice's packed scorer runs fewer linear-layer FLOPs than the naive loop (prompt once, head at responses only)
    assert 0 < r["linear_flops"]["dice"] < r["linear_flops"]["naive"]
    assert r["gemm_peak_flops_per_s"] > 0 and r["ratio_bound_at_gemm_peak"] > 0


def test_train_benchmark_runs_dice_and_trl_on_every_pair(tmp_path):
    r = _bench(tmp_path, "train_throughput", "--pairs", "48", "--global-batch", "16", "--micro-batch", "4,8",
               "--repeats", "2")  # fmt: skip
    dice, trl = r["results"]["dice"], r["results"]["trl"]
    # each trainer at its best: every repeat's run is that trainer's fastest micro-batch in the repeat
    per_mb = r["per_micro_batch"]
    assert set(per_mb) == {"dice mb4", "trl mb4", "dice mb8", "trl mb8"}
    for name, t in (("dice", dice), ("trl", trl)):
        fastest = [max(per_mb[f"{name} mb4"]["tokens_per_s_runs"][i], per_mb[f"{name} mb8"]["tokens_per_s_runs"][i])
                   for i in range(2)]  # fmt: skip
        assert t["tokens_per_s_runs"] == fastest and t["micro_batch"] in (4, 8)
    # and both at the same micro-batch, repeat by repeat (memory is compared there)
    same = r["ratios"]["dice / trl at mb8"]
    assert same["peak_rss_runs"] == [a / b for a, b in zip(per_mb["dice mb8"]["peak_rss_mib_runs"], per_mb["trl mb8"]["peak_rss_mib_runs"])]
    assert dice["steps"] == 3 and dice["timed_steps"] == 1
    assert math.isclose(dice["first_step_loss"], math.log(2), abs_tol=1e-5)  # policy == reference at step 1
    assert abs(dice["first_step_margin"]) < 1e-5 and abs(trl["first_step_margin"]) < 1e-4
    # every token of every pair counted once, and the packed rows ran fewer positions than that
    per_pair = r["pairs"]["lengths"]["pair_tokens (prompt+chosen + prompt+rejected)"]["mean"]  # rounded to 0.1
    assert abs(dice["all_steps_tokens"] - per_pair * r["pairs"]["count"]) <= 0.05 * r["pairs"]["count"] + 1
    assert dice["all_steps_tokens"] == trl["all_steps_tokens"]  # the same work for both trainers
    assert 0.5 < dice["computed_per_token"] < 1.0
    # TRL at its best settings: no reference model resident
    assert trl["ref_model_is_none"] is True
    # the headline is the median of run-by-run ratios (dice run i / TRL run i), never best against best
    q = r["ratios"]["dice / trl"]
    runs = [a / b for a, b in zip(dice["tokens_per_s_runs"], trl["tokens_per_s_runs"])]
    assert q["tokens_per_s_runs"] == runs and len(runs) == 2
    assert math.isclose(q["tokens_per_s"], sum(runs) / 2)
    # the distance to the limit: FLOP/s against the GEMM peak measured in the same run; TRL executes at least the
    # useful FLOPs (padding, full-width attention, the head everywhere), dice's packed rows fewer per counted token
    g = r["gemm"]
    assert g["peak_flops_per_s"] == max(x["peak"] for x in g["runs"]) > 0 and len(g["runs"]) == 2
    for t in (dice, trl):
        assert t["useful_flops_per_s"] == t["tokens_per_s"] * g["useful_flops_per_token"]
        assert 0 < t["useful_of_peak"] and 0 < t["executed_of_peak"]
    assert trl["executed_flops_per_s"] / trl["tokens_per_s"] > g["useful_flops_per_token"]
    assert dice["executed_flops_per_s"] / dice["tokens_per_s"] < g["useful_flops_per_token"]


def test_scale_benchmark_measures_every_stage(tmp_path):
    """benchmarks/scale.py on a small synthetic round: every stage ran on the whole round, in its own process."""
    out = tmp_path / "scale.json"
    env = {**os.environ, "DICE_BENCH_OUT": str(tmp_path / "bench")}
    proc = subprocess.run([str(BIN / "python"), "benchmarks/scale.py", "--sizes", "200x16", "--offline", "400",
                           "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = {x["stage"]: x for x in json.loads(out.read_text())["results"]}
    assert list(r) == ["label", "offline read (once)", "offline ids (once)", "pairs", "reference (data)", "train (data)"]
    assert r["label"]["input_rows"] == r["label"]["responses"] == 200 * 16
    # the run's offline set read once and tokenised once, before the rounds' stages that read both back
    assert r["offline read (once)"]["pairs"] == r["offline read (once)"]["input_rows"] == 400
    assert r["offline ids (once)"]["tokenised"] is True
    assert r["pairs"]["pairs_generated"] > 100 and r["pairs"]["pairs_offline"] > 0  # min_valid 8 of 16, replay γ=0.5
    # the reference and train data paths read every pair the pairs stage wrote; every offline pair found its kept ids
    assert r["reference (data)"]["pairs"] == r["pairs"]["pairs"] == r["train (data)"]["input_rows"]
    assert r["reference (data)"]["offline_with_kept_ids"] == r["pairs"]["pairs_offline"]
    assert r["reference (data)"]["tokens"] > 0 and r["train (data)"]["pairs"] > 0
    assert all(x["wall_s"] > 0 and x["peak_rss_mb"] >= x["imports_mb"] > 0 and x["input_mb"] > 0 for x in r.values())


def test_methods_findings_rest_on_paired_differences():
    """benchmarks/methods.py on made-up per-seed results (no run): π_0's R varies by ±0.05 across five seeds and
    `dice` is 0.02 above it in every seed, `dpo` 0.02 ± 0.001 above too, `online-ipo` 0.05 above. Unpaired, the seed
    means' intervals overlap; paired within a seed, dice − π_0 = +0.02 ± 0 separates, dice − dpo does not, and
    online-ipo − dpo does. A finding is stated only where the paired interval excludes 0."""
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("methods_bench", REPO / "benchmarks" / "methods.py")
    methods = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(methods)
    seeds = [0, 1, 2, 3, 4]
    pi0 = [0.10, 0.15, 0.05, 0.12, 0.08]

    def rows(gain, jitter=0.0):
        return {s: [{"round": 0, "true_reward": r0, "tokens": 20.0},
                    {"round": 1, "true_reward": r0 + gain + jitter * (-1) ** s, "lc_win_rate": 0.5 + gain,
                     "win_rate": 0.5 + gain, "tokens": 21.0}] for s, r0 in zip(seeds, pi0)}  # fmt: skip

    per_seed = {"dice": rows(0.02), "dpo": rows(0.02, 0.001), "online-ipo": rows(0.05)}
    pair = {n: methods.paired_differences(per_seed, n, seeds, 1) for n in per_seed}
    assert pair["dice"]["true_reward_vs_pi0"]["mean"] == pytest.approx(0.02)
    assert methods.excludes_zero(pair["dice"]["true_reward_vs_pi0"]) == 1
    assert methods.excludes_zero(pair["dice"]["true_reward_vs_dpo"]) == 0
    assert methods.excludes_zero(pair["online-ipo"]["true_reward_vs_dpo"]) == 1
    unpaired = methods.t_interval([r[1]["true_reward"] for r in per_seed["dice"].values()])
    assert unpaired["hw"] > 0.02  # the seed means alone could not tell dice from π_0
    recs = {n: {"rounds": [{k: methods.t_interval([per_seed[n][s][r].get(k) for s in seeds])
                            for k in ("true_reward", "lc_win_rate", "win_rate", "tokens")} for r in (0, 1)],
                "paired": pair[n]} for n in per_seed}  # fmt: skip
    _, lines = methods.findings({"rounds": 1, "seeds": seeds, "recipes": recs})
    text = "\n".join(lines)
    assert "R at round 1 minus π_0's R, paired within a seed" in text
    vs_dpo = next(line for line in lines if line.startswith("R at round 1 minus `dpo`"))
    assert "above 0 for `online-ipo`" in vs_dpo and "does not separate from 0 for `dice`" in vs_dpo
