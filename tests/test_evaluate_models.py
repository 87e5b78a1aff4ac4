"""The evaluate stage on real models. `dice eval --model A --baseline B` on two model folders (the session's tiny
model and its perturbed copy), the real vLLM engine in the command's own process; then against a file of reference
outputs; bad input, which must stop before any engine starts with one line naming the file; and a local vLLM judge
(the session's engine) annotating rows in both orders. The flow runs the stage in tests/test_flow_e2e.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import RunConfig
from pipeline.run import rounds
from stages import evaluate
from tests.conftest import REPO

DICE = str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "dice")
DATA = [f"data.prompts={REPO / 'data/prompts.jsonl'}", f"data.offline={REPO / 'data/offline_prefs.jsonl'}"]


def _dice_eval(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run([DICE, "eval", "--config", str(REPO / "conf/tiny.yaml"), *args, f"runs_dir={tmp_path}", *DATA],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=900)  # fmt: skip


def test_dice_eval_two_model_folders_then_a_reference_file(tmp_path, tiny_model, perturbed_model):
    out = tmp_path / "out"
    common = ["--model", str(perturbed_model), "--out", str(out), "eval.max_prompts=8",
              "eval.python_metric=pipeline.method.rewards:prompt_coverage"]  # fmt: skip
    done = _dice_eval(tmp_path, *common, "--baseline", str(tiny_model))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ev = pd.read_parquet(out / "eval.parquet")
    assert len(ev) == 8 * 2 and set(ev.model) == {str(perturbed_model)} and set(ev.baseline) == {str(tiny_model)}
    assert ev["round"].isna().all() and (ev.annotators == 2).all()
    st = json.loads((out / ".dice/evaluate.json").read_text())["stats"]
    assert f"{st['win_rate']:.3f}" in done.stdout and "LC win rate" in done.stdout
    assert st["responses_cached"] == {"policy": False, "baseline": False}

    # AlpacaEval-style reference outputs: the baseline's first sample of each prompt, as a JSON list
    first = ev[ev.sample_idx == 0]
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps([{"instruction": p, "output": o} for p, o in zip(first.prompt, first.baseline_response)]))
    vs_file = _dice_eval(tmp_path, *common, "--baseline", str(ref))
    assert vs_file.returncode == 0, vs_file.stdout[-3000:] + vs_file.stderr[-3000:]
    ev2 = pd.read_parquet(out / "eval.parquet")
    st2 = json.loads((out / ".dice/evaluate.json").read_text())["stats"]
    assert st2["responses_cached"] == {"policy": True, "baseline": None}  # the policy's responses from the cache
    assert set(ev2.baseline) == {str(ref)} and ev2.baseline_finish_reason.isna().all()
    s0 = ev2[ev2.sample_idx == 0].set_index("prompt_id")
    assert (s0.baseline_response == first.set_index("prompt_id").baseline_response).all()


def test_dice_eval_bad_input_is_one_line_naming_the_file(tmp_path, tiny_model):
    """Before any engine starts: held-out prompts that are all training prompts; a reference file missing prompts;
    a model folder that is not there."""
    overlap = _dice_eval(tmp_path, "--model", str(tiny_model), "--baseline", str(tiny_model), "--out", str(tmp_path / "o"),
                         f"eval.prompts={REPO / 'data/prompts.jsonl'}")  # fmt: skip
    assert overlap.returncode == 2
    assert f"{REPO / 'data/prompts.jsonl'}: all 320 held-out prompts also appear in" in overlap.stderr
    assert "Traceback" not in overlap.stderr

    ref = tmp_path / "partial.jsonl"
    ref.write_text(json.dumps({"instruction": "Why are flamingos pink?", "output": "Their food."}) + "\n")
    partial = _dice_eval(tmp_path, "--model", str(tiny_model), "--baseline", str(ref), "--out", str(tmp_path / "p"))
    assert partial.returncode == 2 and f"{ref}: no output for 39 of the 40 held-out prompts" in partial.stderr

    missing = _dice_eval(tmp_path, "--model", str(tmp_path / "nope"), "--baseline", str(tiny_model), "--out",
                         str(tmp_path / "m"))  # fmt: skip
    assert missing.returncode == 2 and f"model {tmp_path / 'nope'}: the folder does not exist" in missing.stderr
    usage = subprocess.run([DICE, "eval", "--model", str(tiny_model)], cwd=REPO, capture_output=True, text=True)
    assert usage.returncode == 2 and "--model needs --baseline" in usage.stderr


def test_a_local_vllm_judge_annotates_rows_in_both_orders(llm, tiny_model, tmp_path):
    """eval.judges with backend vllm: an empty model is π_0 (here the tiny model, round0.mode=skip), served by the
    engine passed in; p is the symmetrised answer, so swapping policy and baseline gives 1 − p."""
    from pipeline.method.judges import VllmJudge, compare, load_template

    cfg = RunConfig.model_validate({"runs_dir": str(tmp_path), "round0": {"mode": "skip"},
                                    "model": {"policy": str(tiny_model)},
                                    "eval": {"judges": [{"id": "self", "backend": "vllm"}]}})  # fmt: skip
    plan = rounds.plan(cfg, 1, "evaluate")
    assert plan.inputs["judge:self"] == str(tiny_model) and plan.roles["judge:self"] == "π_0"
    prompts = ["Why are flamingos pink?", "Write a short riddle whose answer is a lost sock."]
    a, b = ["Because of the shrimp and algae they eat.", "sock"], ["Pink.", "I have one twin and no shoes: a sock."]
    p, errors, _, stats = evaluate.annotate(cfg, plan, prompts, a, b, engines={str(tiny_model): llm})
    q, _, _, _ = evaluate.annotate(cfg, plan, prompts, b, a, engines={str(tiny_model): llm})
    assert stats["comparisons_failed"] == 0 and errors == [[None, None]]
    from transformers import AutoTokenizer

    judge = VllmJudge("self", cfg.eval.judges[0], load_template(cfg.eval.judges[0].template), llm,
                      AutoTokenizer.from_pretrained(tiny_model), str(tiny_model))  # fmt: skip
    # each order asked on its own: p̂ is ½(P(a first) + 1 − P(b first)), worked here from the two raw answers; the
    # tiny judge has a position bias (the two raw answers do not sum to 1), which the symmetrised p̂ must not carry
    ab = [r.p for r in judge.ask(list(zip(prompts, a, b)))]
    ba = [r.p for r in judge.ask(list(zip(prompts, b, a)))]
    np.testing.assert_allclose(p[:, 0], [0.5 * (x + 1 - y) for x, y in zip(ab, ba)], atol=1e-9)
    np.testing.assert_allclose(q[:, 0], [0.5 * (y + 1 - x) for x, y in zip(ab, ba)], atol=1e-9)
    assert max(abs(x + y - 1) for x, y in zip(ab, ba)) > 1e-6  # so the symmetrisation did something
    np.testing.assert_allclose(p[:, 0], [c.p for c in compare(judge, list(zip(prompts, a, b)))])
