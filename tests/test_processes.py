"""The rules of many processes (pipeline/compute/launch.py, pipeline/compute/gpus.py), with real processes:

- collectives: dice's code calls none but launch's, and those refuse a tensor off the rank's device;
- processes die with the stage that started them: a stage SIGKILLed alone (not its process group) leaves no engine
  worker behind (DeepSpeed ranks: tests/test_scale_scoring.py); a rank whose stage is gone ends itself, on its host
  (the stage's PID) and on another node (the stage's heartbeat);
- a rank on a node that does not share the run folder fails in one line naming its host;
- the layout: num_processes 0 with a hostfile, the global batch over every node, engines that do not fit the GPUs,
  MIG instances, GPU UUIDs;
- GPU claims (`gpu_slots`) on fake GPU lists: concurrent claimants get disjoint GPUs, a dead claimant's are freed.
"""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.compute import gpus, launch
from pipeline.config import save_config
from pipeline.run import rounds
from tests.conftest import REPO, tiny_config

# ---------------------------------------------------------------------------------------------- collectives

COLLECTIVE_MODULES = ("torch.distributed", "deepspeed.comm")


def _collective_uses(path: Path) -> list[str]:
    """Where `path` reaches torch.distributed or deepspeed.comm: imports of them (any form) and attribute chains."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute):
            names = [ast.unparse(node)]
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args:
            names = [ast.literal_eval(node.args[0])] if isinstance(node.args[0], ast.Constant) else []
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names
                  if any(n == m or n.startswith(m + ".") for m in COLLECTIVE_MODULES)]  # fmt: skip
    return found


def test_collectives_go_through_launch_only():
    """Every collective dice's own code makes is one of launch's (which build their tensors on the rank's device
    or refuse one that is not there): no other module touches torch.distributed or deepspeed.comm."""
    files = [p for top in ("pipeline", "stages", "flows", "benchmarks", "scripts") for p in (REPO / top).rglob("*.py")]
    uses = [u for p in files if p != REPO / "pipeline/compute/launch.py" for u in _collective_uses(p)]
    assert uses == []
    assert _collective_uses(REPO / "pipeline/compute/launch.py")  # the check sees them where they are


def test_a_collective_refuses_a_tensor_off_the_rank_device():
    """On a GPU rank a CPU tensor never reaches NCCL: the check fails first, naming both devices (here the rank's
    device is given as cuda:0; on CPU the rank's own device is the CPU, which the check accepts)."""
    import torch

    with pytest.raises(RuntimeError, match=r"a collective got a tensor on cpu, but rank 0's device is cuda:0"):
        launch.all_reduce(torch.zeros(6, dtype=torch.float64), expected=torch.device("cuda", 0))
    launch.check_on_device(torch.zeros(1, device=launch.device()))


def _count_passes(model):
    """(forward passes so far, passes(n) that records the passes made before it is called and asks for 2 more)."""
    made, agreed_after = [0], []
    model.register_forward_hook(lambda *_: made.__setitem__(0, made[0] + 1))

    def passes(n: int) -> int:  # what ZeRO-3's all-reduce MAX returns when another rank has 2 more batches
        agreed_after.append(made[0])
        return n + 2

    return made, agreed_after, passes


def test_scorers_agree_on_the_pass_count_before_the_first_pass(tiny_model):
    """ZeRO-3's gathers are collective: a scorer asks how many passes every rank makes BEFORE it makes any (a
    rank gathering for its own pass while another waits in the count's all-reduce never meets it), then pads its
    own passes with dropped ones up to that count, leaving its scores as they are."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from pipeline.compute.logprobs import encode_many, load_causal_lm, score
    from pipeline.method.rewards import score_reward_model

    model, tok = load_causal_lm(str(tiny_model), "float32", device=torch.device("cpu"))
    encoded = encode_many(tok, ["Say hi.", "Say hi.", "Name a colour."] * 3, ["Hi!", "Hello there.", "Blue."] * 3)
    for packing in (True, False):
        made, agreed_after, passes = _count_passes(model.model)
        plain = score(model, encoded, tok.pad_token_id, 4, packing=packing)
        own, made[0] = made[0], 0
        padded = score(model, encoded, tok.pad_token_id, 4, packing=packing, passes=passes)
        assert own == 3 and agreed_after == [0] and made[0] == own + 2  # own rows or batches, then 2 dropped ones
        assert (padded == plain).all()
        model.model._forward_hooks.clear()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                    pad_token_id=0)).eval()  # fmt: skip
    rm_tok = type("Tok", (), {"pad_token_id": 0})()
    ids = [[1, 5, 9], [1, 7], [1, 2, 3, 4], [1, 8, 8]]
    plain = score_reward_model(rm, rm_tok, ids, 2)
    made, agreed_after, passes = _count_passes(rm)
    assert (score_reward_model(rm, rm_tok, ids, 2, passes=passes) == plain).all()
    assert agreed_after == [0] and made[0] == 2 + 2
    made, agreed_after, passes = _count_passes(rm)  # a rank with nothing to score still takes part
    assert score_reward_model(rm, rm_tok, [], 2, passes=passes).shape == (0,) and made[0] == 2


# ---------------------------------------------------------------------------------------------- process ownership


def processes_of(marker: str, victim: int) -> list[str]:
    """Processes still alive that belong to a killed stage: their command line names `marker` (the run's folder),
    or their environment names the stage as their owner, or they are its reaper."""
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (proc / "environ").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue  # already dead, waiting for its parent to read its status
        owned = f"{launch.OWNER}={socket.gethostname()}:{victim}:" in env
        reaper = "os.killpg(pgid" in cmd and cmd.rstrip().endswith(f" {victim}")
        if marker in cmd or owned or reaper:
            left.append(f"{proc.name}: {cmd}")  # whole: a long temp path must not push flags out of sight
    return left


def _wait_for(pred, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        assert time.monotonic() < deadline, f"{what} not seen in {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    return got


def test_a_stage_killed_alone_leaves_no_engine_worker_behind(tmp_path, tiny_model):
    """SIGKILL to the generate stage's process only (not its group) while its 2 engine workers start their engines
    (one 32-prompt shard each): within 30 s no engine worker is left, and none wrote a shard. (Left alone, an engine
    worker would generate and write its shard before its next print found the stage's pipe closed.) DeepSpeed ranks
    killed the same way: tests/test_scale_scoring.py, whose SIGKILLed label and reference runs kill the stage alone."""
    cfg = tiny_config(tmp_path / "runs", tiny_model, **{"round0.mode": "skip", "data.prompts_per_round": 64,
                                                        "generate.engine.data_parallel_size": 2,
                                                        "generate.shard_size": 32})  # fmt: skip
    conf, log = tmp_path / "generate.yaml", tmp_path / "generate.log"
    save_config(cfg, conf)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stages.generate", str(conf), "--round", "1"], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    marker, shards = str(tmp_path / "runs"), rounds.round_dir(cfg, 1) / ".dice/generate-shards"
    _wait_for(lambda: len([p for p in processes_of(marker, proc.pid) if "--shards" in p]) == 2 or proc.poll() is not None,
              600, "2 engine workers", log)  # fmt: skip
    time.sleep(2)  # the engine workers are importing vLLM / starting their engines
    assert proc.poll() is None, log.read_text()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)  # the stage process alone
    proc.wait()
    killed_at = time.monotonic()
    while (left := processes_of(marker, proc.pid)) and time.monotonic() - killed_at < 30:
        time.sleep(0.2)
    assert left == [] and not list(shards.glob("shard-*.json"))


def _watcher(owner: str, *, env: dict[str, str] | None = None, stale_s: float = 180.0) -> subprocess.Popen:
    """A process that watches `owner` as a rank does (launch.watch_owner), then sleeps."""
    code = (f"from pipeline.compute import launch\nlaunch.HEARTBEAT_STALE_S = {stale_s}\nprint('watching', flush=True)\n"
            "launch.watch_owner(0.1)\nimport time\ntime.sleep(120)\n")  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {}), launch.OWNER: owner})  # fmt: skip


def test_a_rank_ends_when_its_stage_is_gone(tmp_path):
    """On the stage's host the rank watches the stage's PID (and start time: a reused PID is not the stage); on
    another node, the launch mark the stage touches: untouched for HEARTBEAT_STALE_S means gone."""
    stage = subprocess.Popen(["sleep", "60"])
    start = launch._start_time(stage.pid)
    here = _watcher(f"{socket.gethostname()}:{stage.pid}:{start}")
    reused = _watcher(f"{socket.gethostname()}:{stage.pid}:{int(start) + 1}")  # the PID, but a later process
    mark = tmp_path / "reference.launch"
    mark.write_text("nonce")
    remote = _watcher(f"another-node:{stage.pid}:{start}", env={launch.LAUNCH_MARK: f"{mark}:nonce"}, stale_s=3.0)
    for watcher in (here, reused, remote):
        assert watcher.stdout.readline() == "watching\n"
    assert reused.wait(timeout=10) == -signal.SIGKILL
    for _ in range(16):  # the stage's heartbeat, every 0.25 s for 4 s (longer than stale_s): the remote rank stays
        os.utime(mark)
        time.sleep(0.25)
    assert here.poll() is None and remote.poll() is None
    assert remote.wait(timeout=15) == -signal.SIGKILL  # no heartbeat for 3 s
    assert "is gone; exiting" in remote.stderr.read()
    stage.kill()
    stage.wait()
    assert here.wait(timeout=10) == -signal.SIGKILL


def test_a_node_without_the_run_folder_fails_in_one_line(tmp_path, monkeypatch, capsys):
    mark = tmp_path / "label.launch"
    mark.write_text("abc123")
    monkeypatch.setenv(launch.LAUNCH_MARK, f"{mark}:abc123")
    launch.check_shared_folder()  # seen as written: nothing happens
    for text, why in (("another launch", "holds another launch"), (None, "is missing")):
        if text is None:
            mark.unlink()
        else:
            mark.write_text(text)
        with pytest.raises(SystemExit) as e:
            launch.check_shared_folder()
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"host {socket.gethostname()} does not see the run folder" in err
        assert f"({mark} {why})" in err and "shared filesystem mounted at the same path" in err


def test_env_file_carries_what_ranks_need_and_no_secret(tmp_path, monkeypatch):
    """The DeepSpeed env file: the user's own .deepspeed_env lines, then the Hugging Face, DeepSpeed and dice
    variables; never a token, CUDA_VISIBLE_DEVICES or the env file's own pointer; a value no shell line can carry
    is an error naming the variable."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    (tmp_path / "home/.deepspeed_env").write_text("NCCL_SOCKET_IFNAME=eth0\n# a comment\nHF_HOME=/old\n")
    env = {"HF_HOME": "/shared/hf", "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_secret", "DS_ACCELERATOR": "cuda",
           "DICE_OWNER": "h:1:2", "CUDA_VISIBLE_DEVICES": "0,1", "DS_ENV_FILE": "/x", "HOME": "/home/u",
           "TORCH_EXTENSIONS_DIR": "/shared/ext", "AWS_SECRET_ACCESS_KEY": "x"}  # fmt: skip
    path = launch.env_file(tmp_path / "run/.dice/label.deepspeed_env", env)
    lines = path.read_text().splitlines()
    assert lines == ["NCCL_SOCKET_IFNAME=eth0", "HF_HOME=/shared/hf", "DICE_OWNER=h:1:2", "DS_ACCELERATOR=cuda",
                     "HF_HUB_OFFLINE=1", "TORCH_EXTENSIONS_DIR=/shared/ext"]  # fmt: skip
    with pytest.raises(ValueError, match=r"environment variable HF_HOME='/a/\$b': DeepSpeed's multi-node launcher"):
        launch.env_file(path, {"HF_HOME": "/a/$b"})


# ---------------------------------------------------------------------------------------------- layout


def test_layouts_over_nodes_and_gpus(tmp_path, tiny_model):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{socket.gethostname()} slots=2\nnode-b slots=3\n")
    # num_processes 0 with a hostfile: each host's slots, not this machine's GPUs
    assert launch.resolve_processes(0, str(hostfile)) == 0 and launch.world_size(0, str(hostfile)) == 5
    assert launch.world_size(2, str(hostfile)) == 4 and launch.world_size(3, None) == 3
    assert launch.processes_here(0, str(hostfile)) == 2 and launch.processes_here(1, str(hostfile)) == 1
    (tmp_path / "other").write_text("node-b slots=3\n")
    assert launch.processes_here(0, str(tmp_path / "other")) == 0  # this host launches, runs no rank
    cfg = tiny_config(tmp_path / "runs", tiny_model, **{"label.num_processes": 0, "train.hostfile": str(hostfile)})
    assert rounds.gpus_used(cfg, "label") == 2  # the gpu_slots this node's share holds

    # UUIDs are fine (each rank gets them back); MIG instances are one per process
    uuids = ["GPU-8f2c0c1e", "GPU-19a0d3b7"]
    launch.check(2, None, "label.num_processes", devices=uuids)
    with pytest.raises(ValueError, match=r"label.num_processes=3, but only 2 GPU\(s\) are visible"):
        launch.check(3, None, "label.num_processes", devices=uuids)
    with pytest.raises(ValueError, match=r"reference.num_processes=2 on MIG instances.*use 1"):
        launch.check(2, None, "reference.num_processes", devices=["MIG-4d1e", "MIG-77a2"])
    launch.check(1, None, "reference.num_processes", devices=["MIG-4d1e", "MIG-77a2"])

    # engines: each its own GPUs, or refused before any starts
    assert [launch.engine_env(w, 2, ["a", "b", "c", "d"])["CUDA_VISIBLE_DEVICES"] for w in (0, 1)] == ["a,b", "c,d"]
    with pytest.raises(ValueError, match=r"generate.engine.data_parallel_size × generate.engine.tensor_parallel_size"
                                         r" = 3 × 2 GPUs, but 4 are visible"):  # fmt: skip
        launch.check_engines(3, 2, "generate.engine", ["a", "b", "c", "d"])
    launch.check_engines(8, 4, "label.engine", [])  # CPU: engines share the cores


def test_global_batch_over_every_node_is_checked_before_launching(tmp_path, tiny_model):
    """8 pairs per step, micro-batch 4, 2 processes per node: one node's 2 × 4 divides 8 (the config's own check
    passes), but 2 nodes make 4 processes × 4 = 16: refused before any process starts."""
    from stages import train

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n127.0.0.1 slots=2\n")
    cfg = tiny_config(tmp_path / "runs", tiny_model, **{"train.num_processes": 2, "train.micro_batch_size": 4,
                                                        "train.hostfile": str(hostfile)})  # fmt: skip
    plan = rounds.plan(cfg, 0, "train")
    with pytest.raises(ValueError, match=r"train.global_batch_size=8 is not a multiple of train.micro_batch_size × "
                                         r"processes \(4 × 4: train.num_processes=2 on each host"):  # fmt: skip
        train.run(cfg, plan)
    assert not (plan.round_dir / ".dice").exists()  # nothing launched


# ---------------------------------------------------------------------------------------------- GPU claims

CLAIMANT = """
import sys, time
from pathlib import Path
from pipeline.compute import gpus
got = gpus.claim(int(sys.argv[1]), sys.argv[2].split(","), Path(sys.argv[3]), poll_s=0.1)
print(",".join(got.devices), flush=True)
time.sleep(120)
"""


def _claimant(n: int, pool: list[str], folder: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLAIMANT, str(n), ",".join(pool), str(folder)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_concurrent_claimants_get_disjoint_gpus_and_a_dead_ones_are_freed(tmp_path):
    pool = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc", "GPU-dddd"]
    folder = tmp_path / "locks"
    a, b = _claimant(2, pool, folder), _claimant(2, pool, folder)
    got = [set(p.stdout.readline().strip().split(",")) for p in (a, b)]
    assert len(got[0]) == len(got[1]) == 2 and got[0] | got[1] == set(pool)  # disjoint, every GPU used once
    waiting = _claimant(1, pool, folder)  # every GPU is held: it waits
    time.sleep(1.5)
    assert waiting.poll() is None and "waiting for 1 free GPU(s) of 4" in waiting.stderr.readline()
    assert gpus.try_claim(1, pool, folder) is None  # and so would this process
    a.kill()  # SIGKILL: the kernel releases its locks
    a.wait()
    assert set(waiting.stdout.readline().strip().split(",")) < got[0]  # one of the dead claimant's GPUs
    with gpus.claimed(1, pool, folder) as mine:  # the other one, here; released when the block ends
        assert set(mine.devices) < got[0] and mine.env() == {"CUDA_VISIBLE_DEVICES": mine.devices[0]}
    with gpus.claimed(1, pool, folder) as again:
        assert again.devices == mine.devices
    for p in (b, waiting):
        p.kill()
        p.wait()
    with pytest.raises(ValueError, match=r"round 1 train: needs 5 GPUs, but only 4 are visible"):
        gpus.claim(5, pool, folder, what="round 1 train")
    assert gpus.claim(2, [], folder).env() == {}  # a CPU machine: nothing to claim


def test_claims_name_gpus_by_uuid(tmp_path, monkeypatch):
    """An index claims the lock of the GPU's UUID (nvidia-smi's order; a stand-in nvidia-smi here), so claimants
    seeing the machine through different CUDA_VISIBLE_DEVICES meet on the same lock; without CUDA_VISIBLE_DEVICES
    the GPUs are nvidia-smi's, by UUID."""
    bin_dir, locks = tmp_path / "bin", tmp_path / "locks"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nprintf 'GPU-aaaa\\nGPU-bbbb\\n'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with gpus.claimed(1, ["1"], locks) as by_index:
        assert by_index.devices == ["1"] and [p.name for p in locks.iterdir()] == ["GPU-bbbb.lock"]
        assert gpus.try_claim(1, ["GPU-bbbb"], locks) is None  # the same GPU, named by its UUID
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpus.visible() == ["GPU-aaaa", "GPU-bbbb"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
    assert gpus.visible() == ["GPU-bbbb"]


def test_engine_sockets_fit_a_long_temporary_directory(tmp_path):
    """vLLM names its engine sockets under the temporary directory; a Unix socket path holds 107 bytes. Under a
    TMPDIR too long for that, engines get a short private socket folder; otherwise nothing changes."""
    from pipeline.compute.engine import short_rpc_path

    long = "/" + "t" * 119
    env = short_rpc_path({"TMPDIR": long})
    base = Path(env["VLLM_RPC_BASE_PATH"])
    assert base.is_dir() and len(str(base)) + 1 + 36 <= 107 and base.stat().st_mode & 0o077 == 0
    assert "VLLM_RPC_BASE_PATH" not in short_rpc_path({"TMPDIR": str(tmp_path)[:40]})
    assert short_rpc_path({"TMPDIR": long, "VLLM_RPC_BASE_PATH": "/mine"})["VLLM_RPC_BASE_PATH"] == "/mine"
