"""label and reference on several processes: real DeepSpeed ranks (gloo on CPU) started by the stages themselves
(`python -m stages.label`, as users and the flow run them), ZeRO-3 partitioned inference, and resume after SIGKILL.

Each configuration is launched once (module fixtures): a 2-process launch costs tens of seconds here. The 1-process
tables are computed in this process and are what every other layout must reproduce (max |Δ| ≤ 1e-4).

    launch                                  what it shows
    label implicit_reward, 2 ranks          2 processes = 1 process
    label reward_model, 2 ranks, ZeRO-3     2 processes = 1 process; ZeRO-3 = unsharded; weights really split; 3
                                            shards over 2 ranks (the last step: one rank's passes only) finish
    reference, 2 ranks, ZeRO-3              the same for reference (3 shards, unequal pairs per shard)
    label implicit_reward, 2 ranks, ZeRO-3, a resume with 1 policy shard missing (fewer than ranks), then 3
      resumed                               reference shards: both models finish and equal 1 process
    reference, 2 ranks, ZeRO-3, resumed     1 shard missing: finishes, equals 1 process
    reference on 2 "nodes"                  a hostfile of 2 hosts reached through stand-in pdsh and ssh commands
                                            that give each node a bare environment: the variables dice needs
                                            arrive (DeepSpeed's env file), num_processes 0 takes the hostfile's
                                            slots, ranks check the shared run folder; equals 1 process
    label, a vLLM judge on 2 engines        the preferences of 1 engine
    label, 2 ranks ZeRO-3, SIGKILLed        the stage process alone is killed: no launcher or rank is left 30 s later;
                                            a re-run on 1 process without ZeRO-3 scores only the missing shards
    reference, 2 ranks, SIGKILLed           the same for reference

Every ZeRO-3 layout above once hung (ranks disagreeing on the number of collective passes): `_finish` waits at most
`LAUNCH_TIMEOUT_S` for each.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.compute import launch
from pipeline.config import save_config
from pipeline.data import schemas
from pipeline.data.artifacts import execute, plan_digest, write_parquet
from pipeline.run import rounds
from stages import label, pairs, reference
from tests.conftest import REPO, free_port, tiny_config
from tests.test_label_reward_model import _build_rm
from tests.test_processes import processes_of

N_PROMPTS, K = 12, 4
LAUNCH_TIMEOUT_S = 600  # a 2-process launch takes tens of seconds here; a hang is stopped and reported
LOGPS = {"labels": ["policy_logp", "reference_logp", "reward"], "reference": ["ref_chosen_logps", "ref_rejected_logps"]}


def _responses(path: Path, model: Path) -> None:
    """Round 1's responses.parquet: 12 prompts of the shipped offline set × K = 4 answers of varied length (its own
    chosen and rejected and two drawn from the set), adjacent per prompt as the generate stage writes them. Every
    other prompt's rows carry token ids (as generate stores them: the ranks score those), the others none (a round
    written before ids were stored: the ranks tokenise the text); the pairs then carry ids into the reference stage."""
    from transformers import AutoTokenizer

    from pipeline.compute.logprobs import encode

    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in (REPO / "data/offline_prefs.jsonl").read_text().splitlines() if line.strip()]
    pool = [r[side] for r in rows for side in ("chosen", "rejected")]
    rng = random.Random(0)
    out = []
    for i, row in enumerate(rows[:N_PROMPTS]):
        for j, text in enumerate([row["chosen"], row["rejected"], *rng.sample(pool, K - 2)]):
            p_ids, r_ids = encode(tok, row["prompt"], text) if i % 2 == 0 else (None, None)
            out.append({"prompt_id": f"p{i}", "prompt": row["prompt"], "sample_idx": j, "response": text,
                        "num_tokens": max(len(text) // 4, 1), "num_chars": len(text), "finish_reason": "stop",
                        "cumulative_logprob": -1.0, "seed": 0, "model": "m", "round": 1, "prompt_token_ids": p_ids,
                        "response_token_ids": r_ids})  # fmt: skip
    write_parquet(pa.Table.from_pylist(out, schema=schemas.RESPONSES), path, schemas.RESPONSES)


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tiny_model, perturbed_model):
    """The configs (π_0 = the tiny model, π_-1 = its perturbed copy, a reward model with its own tokenizer; shards of
    2 prompts) and the 1-process tables: label (implicit reward and reward model), pairs, reference."""
    base = tmp_path_factory.mktemp("scale")
    rm = _build_rm(base / "rm", vocab_size=700)

    def config(name: str, **over):
        return tiny_config(base / name, tiny_model, **{
            "round0.mode": "skip", "model.reference": str(perturbed_model), "data.prompts_per_round": N_PROMPTS,
            "label.shard_size": 2, "reference.shard_size": 2, "label.num_processes": 1, "reference.num_processes": 1,
            "label.reward_model": str(rm), **over})  # fmt: skip

    one = config("one")
    _responses(rounds.round_dir(one, 1) / "responses.parquet", tiny_model)
    tables = {}
    for stage, mod in (("label", label), ("pairs", pairs), ("reference", reference)):
        plan = rounds.plan(one, 1, stage)
        execute(plan, lambda: mod.run(one, plan))
    tables["labels"] = pd.read_parquet(rounds.round_dir(one, 1) / "labels.parquet")
    tables["reference"] = pd.read_parquet(rounds.round_dir(one, 1) / "reference.parquet")
    # every pair leaves with its ids (generated ones as stored, the rest tokenised by the reference stage); the
    # layouts below must write the same (`_same` compares every column)
    assert tables["reference"][["prompt_token_ids", "chosen_token_ids", "rejected_token_ids"]].notna().all().all()
    assert tables["labels"]["response_token_ids"].notna().sum() == N_PROMPTS // 2 * K
    rm_one = config("one-rm", **{"label.labeller": "reward_model"})
    shutil.copytree(rounds.round_dir(one, 1), rounds.round_dir(rm_one, 1))
    plan = rounds.plan(rm_one, 1, "label")
    execute(plan, lambda: label.run(rm_one, plan), force=True)
    tables["labels-rm"] = pd.read_parquet(plan.outputs["labels"])
    return {"base": base, "config": config, "one": one, "tables": tables}


# ---------------------------------------------------------------------------------------------- layouts it cannot run


def test_a_layout_that_cannot_run_fails_before_scoring(setting, tmp_path):
    """More processes than GPUs, a hostfile host that does not resolve or does not accept SSH, ZeRO-3 for a
    quantized checkpoint: clear errors before any process starts or any shard is written."""
    with pytest.raises(ValueError, match=r"label.num_processes=4, but only 2 GPU\(s\) are visible"):
        launch.check(4, None, "label.num_processes", devices=["0", "1"])
    launch.check(4, None, "label.num_processes", devices=[])  # CPU: gloo processes share the cores
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nlocalhost slots=2\nno-such-host.invalid slots=2\n")
    cfg = setting["config"]("hosts", **{"label.num_processes": 2, "train.hostfile": str(hostfile)})
    _inputs(setting, cfg, "responses.parquet")
    plan = rounds.plan(cfg, 1, "label")
    with pytest.raises(ValueError, match=rf"hostfile {hostfile}, line 3: host 'no-such-host.invalid' does not resolve"):
        label.run(cfg, plan)
    hostfile.write_text("127.0.0.2 slots=2\n")  # resolves, but nothing listens on the port
    with pytest.raises(ValueError, match=r"line 1: host '127.0.0.2' does not accept SSH connections"):
        launch.check(2, str(hostfile), "reference.num_processes", ssh_port=free_port())
    with pytest.raises(ValueError, match=r"reference.num_processes=4 processes per node, but .* has slots=2"):
        launch.check(4, str(hostfile), "reference.num_processes")

    quantized = tmp_path / "quantized"
    shutil.copytree(setting["one"].model.policy, quantized)
    mc = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**mc, "quantization_config": {"quant_method": "bitsandbytes"}}))
    cfg = setting["config"]("quantized", **{"model.policy": str(quantized), "reference.zero_stage": 3})
    _inputs(setting, cfg, "pairs.parquet")
    plan = rounds.plan(cfg, 1, "reference")
    with pytest.raises(ValueError, match=r"reference.zero_stage=3: model .*quantized: ZeRO-3 cannot shard it: it is a "
                                         r"quantized checkpoint \(quantization_config: quant_method bitsandbytes\)"):
        reference.run(cfg, plan)
    assert not (rounds.round_dir(cfg, 1) / ".dice").exists()  # nothing was scored


def test_layout_is_not_fingerprinted_and_claims_a_slot_per_process(setting):
    one = setting["one"]
    spread = setting["config"]("one", **{"label.num_processes": 8, "label.zero_stage": 3, "reference.num_processes": 8,
                                         "reference.zero_stage": 3, "label.engine.data_parallel_size": 4})  # fmt: skip
    for stage in ("label", "reference"):
        assert rounds.plan(spread, 1, stage).config == rounds.plan(one, 1, stage).config
        assert rounds.gpus_used(spread, stage) == 8
    # 0 = every visible GPU: on this CPU machine, one process
    auto = setting["config"]("one", **{"label.num_processes": 0, "reference.num_processes": 0})
    assert rounds.gpus_used(auto, "label") == rounds.gpus_used(auto, "reference") == max(launch.visible_gpus(), 1)


# ---------------------------------------------------------------------------------------------- 2 processes, ZeRO-3, SIGKILL


def _inputs(setting, cfg, *files: str) -> None:
    """Copy round 1's input files of the 1-process run into cfg's run folder (not the manifests: every stage runs)."""
    rd = rounds.round_dir(cfg, 1)
    rd.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(rounds.round_dir(setting["one"], 1) / f, rd / f)


def _start(setting, stage: str, cfg, *overrides: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """`python -m stages.<stage> CONF [overrides] --round 1`, as a user runs it, its output going to a file, in a
    session of its own (to SIGKILL the stage and everything it started at once); `env`: added to the environment."""
    name = f"{Path(cfg.runs_dir).name}-{stage}-{len(overrides)}"  # runs_dir: one per configuration
    conf, log = setting["base"] / f"{name}.yaml", setting["base"] / f"{name}.log"
    save_config(cfg, conf)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}", str(conf), *overrides, "--round", "1"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})  # fmt: skip
    return proc, log


def _finish(started: tuple[subprocess.Popen, Path]) -> tuple[str, dict]:
    """Wait for a stage started by `_start` (at most LAUNCH_TIMEOUT_S: a hang fails the test); its output and stats."""
    proc, log = started
    try:
        proc.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and its ranks (started in a session of their own)
        proc.wait()
        raise AssertionError(f"did not finish in {LAUNCH_TIMEOUT_S} s (a hang):\n{log.read_text()[-4000:]}") from None
    out = log.read_text()
    assert proc.returncode == 0, out[-6000:]
    return out, json.loads(out.split("DICE_STAGE_RESULT ")[1])["stats"]


def _same(got: pd.DataFrame, expected: pd.DataFrame, logps: list[str]) -> None:
    """The same table row for row: every column equal, the log-prob columns to 1e-4."""
    assert got.drop(columns=logps).equals(expected.drop(columns=logps))
    for col in logps:
        np.testing.assert_allclose(got[col].to_numpy(float), expected[col].to_numpy(float), atol=1e-4, rtol=0)


def _written(shards: Path) -> list[int]:
    return sorted(int(p.stem[6:]) for p in shards.glob("shard-*.json"))


def _left_by_a_killed_run(cfg, stage: str, todo) -> None:
    """Score some shards in this process (1 process, no ZeRO-3: neither is fingerprinted), as a run killed after
    them leaves them on disk."""
    section = getattr(cfg, stage).model_copy(update={"num_processes": 1, "zero_stage": 0})
    one = cfg.model_copy(update={stage: section})
    plan = rounds.plan(one, 1, stage)
    (label if stage == "label" else reference)._score_worker(one, plan, todo=todo, digest=plan_digest(plan))


FAKE_SSH = """#!{python}
# ssh HOST CMD: runs CMD here (the DeepSpeed runner's reachability check and its `hostname -I` for the master)
import subprocess, sys
args = sys.argv[1:]
while args[0].startswith("-"):
    args = args[2:] if args[0] in ("-o", "-p") else args[1:]
if args[1:] == ["hostname", "-I"]:
    print("127.0.0.1")
    sys.exit(0)
sys.exit(subprocess.call(["bash", "-c", " ".join(args[1:])]))
"""

FAKE_PDSH = """#!{python}
# pdsh -S -f N -w HOST,HOST CMD: runs CMD once per host here, %n the host's rank, each in an environment as bare as
# a fresh SSH login (PATH and HOME only): what reaches the ranks is what the command exports. Logs each command.
import os, pathlib, subprocess, sys
args, hosts = sys.argv[1:], []
while args[0].startswith("-"):
    if args[0] == "-w":
        hosts = args[1].split(",")
    args = args[2:] if args[0] in ("-w", "-f", "-R") else args[1:]
cmd = " ".join(args)
with open(pathlib.Path(__file__).with_name("pdsh.log"), "a") as log:
    log.write(cmd + "\\n")
bare = {{"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"]}}
procs = [subprocess.Popen(["bash", "-c", cmd.replace("%n", str(r))], env=bare) for r in range(len(hosts))]
sys.exit(max(p.wait() for p in procs))
"""


def _two_nodes(base: Path) -> tuple[Path, dict[str, str]]:
    """A hostfile of two "nodes" (both this machine, 1 slot each) and the environment that reaches them through
    stand-in pdsh and ssh commands (their folder first on PATH)."""
    bin_dir = base / "fake-bin"
    bin_dir.mkdir()
    for name, text in (("ssh", FAKE_SSH), ("pdsh", FAKE_PDSH)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    hostfile = base / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HOME": str(base / "hf-home"), "HF_HUB_OFFLINE": "1",
           "HF_TOKEN": "hf_not_a_real_token"}  # fmt: skip
    return hostfile, env


@pytest.fixture(scope="module")
def launches(setting):
    """Every multi-process launch of the module, started together (most of a launch is single-threaded imports:
    together they keep both cores busy): the 2-process runs to compare with the 1-process tables (two of them
    resuming from shards a killed run left), one on two stand-in nodes, and two 2-process runs whose stage process
    alone is SIGKILLed (not its launcher or ranks) as soon as their first shard's done-record exists, then re-run on
    1 process with the same command once nothing of theirs is left (at most 30 s)."""
    config = setting["config"]
    hostfile, nodes_env = _two_nodes(setting["base"])
    equal = {  # (stage, config, input, environment)
        "labels": ("label", config("two", **{"label.num_processes": 2}), "responses.parquet", None),
        # 3 shards (5, 5 and 2 prompts) over 2 ranks
        "labels-rm": ("label", config("two-rm", **{"label.labeller": "reward_model", "label.num_processes": 2,
                                                   "label.zero_stage": 3, "label.shard_size": 5}),
                      "responses.parquet", None),
        # 5 shards over 2 ranks, 2 or 3 packed rows each
        "reference": ("reference", config("two-ref", **{"reference.num_processes": 2, "reference.zero_stage": 3,
                                                        "reference.shard_size": 5, "reference.batch_size": 4}),
                      "pairs.parquet", None),
        "resume-label": ("label", config("resumed", **{"label.num_processes": 2, "label.zero_stage": 3,
                                                       "label.shard_size": 5, "label.batch_size": 8}),
                         "responses.parquet", None),
        "resume-ref": ("reference", config("resumed-ref", **{"reference.num_processes": 2, "reference.zero_stage": 3,
                                                             "reference.shard_size": 5}), "pairs.parquet", None),
        "nodes": ("reference", config("nodes", **{"reference.num_processes": 0, "train.hostfile": str(hostfile),
                                                  "reference.shard_size": 5}), "pairs.parquet", nodes_env),
    }  # fmt: skip
    killed = {  # (stage, config, input, the shard folder watched, the re-run's overrides)
        "label": ("label", config("killed", **{"label.num_processes": 2, "label.zero_stage": 3, "label.shard_size": 1}),
                  "responses.parquet", "label-policy", ["label.num_processes=1", "label.zero_stage=0"]),
        "reference": ("reference", config("killed-ref", **{"reference.num_processes": 2, "reference.shard_size": 1}),
                      "pairs.parquet", "reference", ["reference.num_processes=1"]),
    }  # fmt: skip
    # a local vLLM judge (the policy judging its own samples) on 2 engine processes and a simulated annotator in the
    # stage's own process, 4 shards of 3 prompts
    judges = "[{id: self, backend: vllm}, {id: sim, backend: python, function: 'pipeline.method.judges:overlap_judge'}]"
    equal["judges"] = ("label", config("two-judges", **{"label.labeller": "judge", "label.judges": judges,
                                                        "label.shard_size": 3, "label.engine.data_parallel_size": 2}),
                       "responses.parquet", None)  # fmt: skip
    for key, (stage, cfg, inputs, _) in equal.items():
        _inputs(setting, cfg, inputs)
    # what killed runs left: 2 of the 3 policy shards (1 missing: fewer than the ranks), none of the reference's;
    # every reference shard but the last
    _left_by_a_killed_run(equal["resume-label"][1], "label", {"policy": [0, 1], "reference": []})
    ref_shards = -(-pd.read_parquet(rounds.round_dir(setting["one"], 1) / "pairs.parquet").prompt_id.nunique() // 5)
    _left_by_a_killed_run(equal["resume-ref"][1], "reference", list(range(ref_shards - 1)))
    procs, victims = {}, {}
    for key, (stage, cfg, _, env) in equal.items():
        procs[key] = _start(setting, stage, cfg, env=env)
    for key, (stage, cfg, inputs, shard_set, _) in killed.items():
        _inputs(setting, cfg, inputs)
        victims[key] = _start(setting, stage, cfg)
    out: dict = {"killed": {}, "ref_shards": ref_shards, "pdsh_log": setting["base"] / "fake-bin" / "pdsh.log"}
    deadline = time.monotonic() + 900
    while len(out["killed"]) < len(killed):
        for key, (stage, cfg, _, shard_set, _) in killed.items():
            shards = rounds.round_dir(cfg, 1) / ".dice" / f"{shard_set}-shards"
            if key in out["killed"] or not list(shards.glob("shard-*.json")):
                proc, log = victims[key]
                assert key in out["killed"] or proc.poll() is None, log.read_text()[-4000:]
                continue
            os.kill(victims[key][0].pid, signal.SIGKILL)  # the stage process alone: it owns what it started
            victims[key][0].wait()
            out["killed"][key] = {"written": _written(shards), "killed_at": time.monotonic()}
        assert time.monotonic() < deadline, "no shard written in 900 s"
        time.sleep(0.02)
    for key, (stage, cfg, _, shard_set, _) in killed.items():  # the launcher and the ranks end with their stage
        run, pid = out["killed"][key], victims[key][0].pid
        while (left := processes_of(f"{Path(cfg.runs_dir)}/", pid)) and time.monotonic() - run["killed_at"] < 30:
            time.sleep(0.2)
        output = rounds.round_dir(cfg, 1) / ("labels.parquet" if stage == "label" else "reference.parquet")
        run.update(left=left, log=victims[key][1].read_text(), output_before_rerun=output.exists(),
                   written_after=_written(rounds.round_dir(cfg, 1) / ".dice" / f"{shard_set}-shards"))  # fmt: skip
    reruns = {key: _start(setting, stage, cfg, *over) for key, (stage, cfg, _, _, over) in killed.items()}
    for key, (stage, cfg, _, _) in equal.items():
        output = "labels.parquet" if stage == "label" else "reference.parquet"
        stdout, stats = _finish(procs[key])
        out[key] = {"stats": stats, "table": pd.read_parquet(rounds.round_dir(cfg, 1) / output), "stdout": stdout,
                    "cfg": cfg}  # fmt: skip
    out["judges"]["prefs"] = pd.read_parquet(rounds.round_dir(equal["judges"][1], 1) / "preferences.parquet")
    for key, (stage, cfg, *_) in killed.items():
        output = "labels.parquet" if stage == "label" else "reference.parquet"
        stdout, stats = _finish(reruns[key])
        out["killed"][key].update(stdout=stdout, stats=stats, cfg=cfg,
                                  table=pd.read_parquet(rounds.round_dir(cfg, 1) / output))  # fmt: skip
    return out


def test_two_processes_label_the_same_as_one(setting, launches):
    stats, table = launches["labels"]["stats"], launches["labels"]["table"]
    assert stats["processes"] == 2 and stats["shards"] == 2 * N_PROMPTS // 2 and stats["shards_scored"] == 12
    _same(table, setting["tables"]["labels"], LOGPS["labels"])
    assert table.label_error.isna().all() and table.reward.std() > 0


def test_zero3_reward_model_on_two_processes_equals_unsharded(setting, launches):
    stats, table = launches["labels-rm"]["stats"], launches["labels-rm"]["table"]
    assert stats["processes"] == 2 and stats["zero_stage"] == 3 and stats["shards"] == 3  # the last: rank 0's alone
    assert stats["weights_held_per_rank"]["reward_model"] < 0.6  # each rank held about half of the weights
    _same(table, setting["tables"]["labels-rm"], ["reward"])
    assert table.reward.std() > 0


def test_zero3_reference_on_two_processes_equals_unsharded(setting, launches):
    stats, table = launches["reference"]["stats"], launches["reference"]["table"]
    assert stats["processes"] == 2 and stats["zero_stage"] == 3 and stats["weights_held_per_rank"] < 0.6
    assert stats["shards"] == launches["ref_shards"] and stats["shards"] % 2 == 1  # the last: rank 0's alone
    _same(table, setting["tables"]["reference"], LOGPS["reference"])
    assert len(table) == len(setting["tables"]["reference"]) > N_PROMPTS  # generated and replayed offline pairs


def test_zero3_label_resumed_with_fewer_missing_shards_than_ranks(setting, launches):
    """label.zero_stage=3 on 2 ranks, resuming with 1 of π_{k-1}'s 3 shards missing (rank 1 has none of it) and
    all 3 of π_{k-2}'s (the last step is rank 0's alone, whose packed rows differ): finishes, equals 1 process."""
    run = launches["resume-label"]
    stats, out = run["stats"], run["stdout"]
    assert stats["processes"] == 2 and stats["zero_stage"] == 3
    assert (stats["shards"], stats["shards_reused"], stats["shards_scored"]) == (6, 2, 4)
    ranks = [f"label round 1 {role} (rank {r} of 2)" for role in ("policy", "reference") for r in (0, 1)]
    # policy: only rank 0 had a shard; reference: rank 0 had 2 shards (3 packed rows, then 1), rank 1 one (3 rows)
    assert [_redone(out, what) for what in ranks] == [[2], [], [0, 2], [1]]
    _same(run["table"], setting["tables"]["labels"], LOGPS["labels"])


def test_zero3_reference_resumed_with_fewer_missing_shards_than_ranks(setting, launches):
    run, n = launches["resume-ref"], launches["ref_shards"]
    stats = run["stats"]
    assert stats["processes"] == 2 and stats["zero_stage"] == 3
    assert (stats["shards"], stats["shards_reused"], stats["shards_scored"]) == (n, n - 1, 1)
    _same(run["table"], setting["tables"]["reference"], LOGPS["reference"])


def test_reference_on_two_nodes_gets_the_environment_it_needs(setting, launches):
    """A hostfile of 2 hosts with `reference.num_processes: 0`: one rank per host from the hostfile's slots (not
    this machine's GPU count), started by DeepSpeed's pdsh launcher into bare environments; the variables dice
    needs reach them through DeepSpeed's env file, a secret does not; the ranks found the run folder shared."""
    run = launches["nodes"]
    assert run["stats"]["processes"] == 2 and launch.visible_gpus() == 0
    _same(run["table"], setting["tables"]["reference"], LOGPS["reference"])
    cmds = launches["pdsh_log"].read_text().splitlines()
    assert len(cmds) == 1, cmds  # one pdsh command started both nodes
    hf_home = str(setting["base"] / "hf-home")
    for export in (f"export HF_HOME={hf_home};", "export HF_HUB_OFFLINE=1;", "export DS_ACCELERATOR=cpu;"):
        assert export in cmds[0], cmds[0]
    assert "HF_TOKEN" not in cmds[0] and "hf_not_a_real_token" not in cmds[0]
    assert "DICE_LAUNCH_MARK=" in cmds[0] and "DICE_OWNER=" in cmds[0]
    assert not (rounds.round_dir(run["cfg"], 1) / ".dice/reference.launch").exists()  # removed after the launch


def test_local_judge_on_two_engines_equals_one(setting, launches, llm, tiny_model):
    """label.engine.data_parallel_size=2: two vLLM engine processes, each judging every other shard of the
    comparisons, give the preferences and rankings one engine gives (the session's engine, in this process)."""
    stats, table, prefs, out, cfg = (launches["judges"][k] for k in ("stats", "table", "prefs", "stdout", "cfg"))
    assert stats["engines"] == 2 and stats["shards"] == 2 * 4 and stats["shards_judged"] == 2 * 4  # 2 groups
    assert "[engine 0] label round 1 judges" in out and "[engine 1] label round 1 judges" in out
    one = cfg.model_copy(update={"runs_dir": str(setting["base"] / "one-judge")})
    _inputs(setting, one, "responses.parquet")
    plan = rounds.plan(one, 1, "label")
    stats1 = execute(plan, lambda: label.run(one, plan, engines={str(tiny_model): llm}))["stats"]
    assert stats1["engines"] == 1 and stats1["comparisons"] == stats["comparisons"] == 2 * N_PROMPTS * K * (K - 1) // 2
    expected = pd.read_parquet(plan.outputs["preferences"])
    _same(prefs, expected, ["p_ab", "p_ba", "p"])
    _same(table, pd.read_parquet(plan.outputs["labels"]), ["reward"])


def _redone(stdout: str, what: str) -> list[int]:
    """Shards the progress lines of `what` (e.g. "label round 1 policy") report as scored."""
    return sorted(int(line.split()[len(what.split()) + 1]) for line in stdout.splitlines()
                  if line.startswith(what + ": shard "))  # fmt: skip


def test_a_stage_killed_alone_leaves_no_rank_behind(launches):
    """The label (ZeRO-3: ranks inside collectives) and reference stages SIGKILLed alone, not their process group:
    within 30 s no DeepSpeed runner, launcher or rank of theirs is left, and no shard is written after the kill
    but the ones being written at that instant (left alone, the ranks would score every shard to the end)."""
    for key in ("label", "reference"):
        run = launches["killed"][key]
        assert run["left"] == [], run["left"]
        assert len(run["written_after"]) <= len(run["written"]) + 2, (run["written"], run["written_after"])


def test_sigkill_mid_label_redoes_only_the_missing_shards(setting, launches):
    """Killed on 2 ranks with ZeRO-3 after π_{k-1}'s first shards; re-run on 1 process without ZeRO-3 (neither is
    fingerprinted): only the missing shards are scored, and labels.parquet equals the uninterrupted run's."""
    run = launches["killed"]["label"]
    written, out, stats = run["written_after"], run["stdout"], run["stats"]
    assert 1 <= len(written) < N_PROMPTS and not run["output_before_rerun"], run["log"][-3000:]
    # 12 policy shards and 12 reference shards; the policy shards on disk were not scored again
    assert stats["shards"] == 2 * N_PROMPTS and stats["shards_reused"] == len(written)
    assert stats["shards_scored"] == 2 * N_PROMPTS - len(written)
    assert f"label round 1 policy: {len(written)} of {N_PROMPTS} shards already written" in out
    assert _redone(out, "label round 1 policy") == sorted(set(range(N_PROMPTS)) - set(written))
    assert _redone(out, "label round 1 reference") == list(range(N_PROMPTS))
    assert not (rounds.round_dir(run["cfg"], 1) / ".dice/label-policy-shards").exists()  # folded into labels.parquet
    _same(run["table"], setting["tables"]["labels"], LOGPS["labels"])


def test_sigkill_mid_reference_redoes_only_the_missing_shards(setting, launches):
    run = launches["killed"]["reference"]
    written, out, stats = run["written_after"], run["stdout"], run["stats"]
    total = pd.read_parquet(rounds.round_dir(setting["one"], 1) / "pairs.parquet").prompt_id.nunique()  # 1 per shard
    assert 1 <= len(written) < total and not run["output_before_rerun"], run["log"][-3000:]
    assert stats["shards"] == total and stats["shards_reused"] == len(written)
    assert stats["shards_scored"] == total - len(written)
    assert _redone(out, "reference round 1") == sorted(set(range(total)) - set(written))
    _same(run["table"], setting["tables"]["reference"], LOGPS["reference"])
