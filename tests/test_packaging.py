"""Images, compose file, work-pool templates and CI: valid, and installing the way the README says."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import BIN, REPO


def test_ci_runs_the_readme_commands():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci/run").read_text()
    assert "bash scripts/setup.sh && .venv/bin/dice run" in readme
    assert ".venv/bin/python -m pytest" in readme
    assert re.search(r"^bash scripts/setup\.sh$", ci, re.M) and re.search(r"^\.venv/bin/python -m pytest$", ci, re.M)


@pytest.mark.parametrize("name, target", [("Dockerfile.cpu", "cpu"), ("Dockerfile.gpu", "gpu")])
def test_images_install_with_the_readme_setup(name, target):
    text = (REPO / "docker" / name).read_text()
    assert re.search(rf"RUN (PYTHON=\S+ )?bash scripts/setup\.sh {target}$", text, re.M)
    instructions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "pip install" not in instructions  # one install path: scripts/setup.sh


@pytest.mark.skipif(not (BIN / "hadolint").exists() and not shutil.which("hadolint"), reason="hadolint not installed")
def test_dockerfiles_lint_clean():
    hadolint = str(BIN / "hadolint") if (BIN / "hadolint").exists() else shutil.which("hadolint")
    out = subprocess.run([hadolint, "docker/Dockerfile.cpu", "docker/Dockerfile.gpu"], cwd=REPO,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_runs_server_on_postgres_and_a_worker():
    compose = yaml.safe_load((REPO / "docker/compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "worker"} <= set(services)
    server = services["prefect-server"]
    assert "prefect server start" in server["command"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert services["worker"]["command"] == "dice serve"
    assert services["worker"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    gpu = services["worker-gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for svc in services.values():  # every build uses an image this repo defines
        if "build" in svc:
            assert (REPO / "docker" / ".." / svc["build"]["dockerfile"]).is_file()


def test_kubernetes_template_requests_gpus_and_declares_its_variables():
    template = json.loads((REPO / "docker/work-pools/kubernetes-gpu.json").read_text())
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used <= declared, used - declared
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    assert set(deployments["iterate-kubernetes"]["work_pool"]["job_variables"]) <= declared
    docker = deployments["iterate-docker"]["work_pool"]["job_variables"]
    assert docker["container_create_kwargs"]["device_requests"][0]["Capabilities"] == [["gpu"]]
    for d in deployments.values():
        assert d["entrypoint"] == ("flows/dice.py:generate_shards" if d["name"] == "generate-shards" else "flows/dice.py:dice")
