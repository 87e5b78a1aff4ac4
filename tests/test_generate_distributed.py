"""Generation spread over machines, on one machine: the flow hands round 1's prompt shards to the
`generate-shards` deployment (prefect.yaml) on a process work pool, two `prefect worker start` processes
pick the flow runs up, and the ordinary generate task then only concatenates their shards."""

from __future__ import annotations

import json
import subprocess

from pipeline.config import save_config
from pipeline.data import schemas
from pipeline.data.artifacts import execute, read_parquet
from pipeline.run import rounds
from stages import generate
from tests.conftest import BIN, REPO, stop, tiny_config

DRIVER = """
import json, sys
from prefect import flow
from flows.dice import hand_out_generate_shards, run_stage
from pipeline.config import load_config

@flow(name="drive-generate")
def drive(conf: str) -> dict:
    cfg = load_config(conf)
    runs = hand_out_generate_shards(conf, cfg, 1)
    return {"flow_runs": runs, "stats": run_stage(conf, cfg, 1, "generate")}

print("DRIVER_RESULT " + json.dumps(drive(sys.argv[1])))
"""


def _prefect(env, *args):
    out = subprocess.run(
        [str(BIN / "prefect"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_two_workers_generate_the_shards_of_one_round(prefect_server, tmp_path, tiny_model, llm):
    env = prefect_server
    over = {"round0.mode": "skip", "data.prompts_per_round": 8, "generate.shard_size": 2, "generate.shard_runs": 2,
            "generate.shard_deployment": "dice-generate-shards/generate-shards"}  # fmt: skip
    cfg = tiny_config(tmp_path / "runs", tiny_model, name="spread", **over)
    conf = tmp_path / "spread.yaml"
    save_config(cfg, conf)
    pool = "dice-generate-test"
    _prefect(env, "work-pool", "create", pool, "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--name", "generate-shards", "--pool", pool)
    workers, logs = [], []
    try:
        for name in ("machine-a", "machine-b"):
            log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed in finally, after the worker)
            logs.append(log)
            workers.append(subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name, "--limit", "1"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        out = subprocess.run([str(BIN / "python"), "-c", DRIVER, str(conf)], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=900, check=False)  # fmt: skip
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    finally:
        for w in workers:
            stop(w)
        for log in logs:
            log.close()
    result = json.loads(out.stdout.split("DRIVER_RESULT ")[1])
    assert len(result["flow_runs"]) == 2
    # every shard came from the workers' flow runs: the generate task only concatenated them
    assert result["stats"]["shards"] == 4 and result["stats"]["shards_reused"] == 4
    assert result["stats"]["shards_generated"] == 0
    # the workers' flow runs wrote every shard exactly once between them (which worker wins which flow run is
    # Prefect's race: a worker that loses one logs its id too, so the shards written are what is counted)
    texts = [(tmp_path / f"{name}.log").read_text() for name in ("machine-a", "machine-b")]
    done = [json.loads(line.split("DICE_SHARD_DONE ", 1)[1])["shard"]
            for text in texts for line in text.splitlines() if "DICE_SHARD_DONE " in line]  # fmt: skip
    assert sorted(done) == [0, 1, 2, 3], "\n".join(t[-3000:] for t in texts)
    # the same table as one uninterrupted generation on this machine
    table = read_parquet(rounds.plan(cfg, 1, "generate").outputs["responses"], schemas.RESPONSES).to_pandas()
    local = cfg.model_copy(update={"runs_dir": str(tmp_path / "local")})
    plan = rounds.plan(local, 1, "generate")
    execute(plan, lambda: generate.run(local, plan, llm=llm))
    assert table.equals(read_parquet(plan.outputs["responses"], schemas.RESPONSES).to_pandas())
