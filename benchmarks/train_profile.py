"""Where dice's training time goes: `benchmarks/train_throughput.py --profile-dice` runs this file on one of its runs.

    .venv/bin/python benchmarks/train_profile.py '{"config": CONF, "ops_out": TXT, "warmup_micro": 8}'

It runs dice's train stage in this process, as `python -m stages.train CONF --round 0` runs it on one process, with
timers around its phases (DeepSpeed's forward / backward / step, the log-prob functions, collation) and
torch.profiler over the whole stage; it writes the profiler's op table to `ops_out` and prints the phases' calls and
seconds after the warm-up micro-batches as a BENCH_RESULT line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import RESULT


def profile(spec: dict[str, Any]) -> None:
    """dice's train stage in this process (as `python -m stages.train` runs it with 1 process), with timers around
    its phases and torch.profiler over the whole run. Only the patched names are wrapped; nothing is edited."""
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    import pipeline.compute.logprobs as lp
    import stages.train as st
    from pipeline.config import load_config
    from pipeline.data.artifacts import execute
    from pipeline.run import rounds

    timers: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers.setdefault(name, []).append(time.perf_counter() - t)

        return wrapper

    DeepSpeedEngine.forward = timed("engine.forward (model forward incl. ZeRO hooks)", DeepSpeedEngine.forward)
    DeepSpeedEngine.backward = timed("engine.backward (autograd incl. ZeRO grad hooks)", DeepSpeedEngine.backward)
    DeepSpeedEngine.step = timed("engine.step (optimizer at boundary)", DeepSpeedEngine.step)
    labels = {
        "sequence_logps": "sequence_logps (log-softmax over the vocabulary of full logits)",
        "response_logps": "response_logps (decoder + LM head at response positions)",
    }
    for fn_name, label in labels.items():  # whichever of these this dice version's trainer calls
        if hasattr(lp, fn_name):
            setattr(lp, fn_name, timed(label, getattr(lp, fn_name)))
    lp.collate = timed("collate (padding)", lp.collate)
    cfg = load_config(spec["config"])
    plan = rounds.plan(cfg, 0, "train")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cfg.device != "cpu" and torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t = time.perf_counter()
        execute(plan, lambda: st.run(cfg, plan), force=True)
        total = time.perf_counter() - t
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    Path(spec["ops_out"]).write_text(table)
    skip = spec["warmup_micro"]  # leave out the warm-up steps' micro-batches
    # one backward per training micro-batch: later forward/collate calls (dice's post-training probe) are left out
    n = len(next(v for k, v in timers.items() if k.startswith("engine.backward")))
    summary = {name: {"calls": len(v[skip:n]), "seconds": sum(v[skip:n])} for name, v in timers.items()}
    print(RESULT + json.dumps({"phases": summary, "whole_stage_s": total}), flush=True)


if __name__ == "__main__":
    profile(json.loads(sys.argv[1]))
