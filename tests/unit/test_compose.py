"""docker-compose.yml: valid for docker-compose, one HydraServe image for every service, and
commands that name modules the repository has."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from hydraserve.cli import build_parser

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRASTRUCTURE = {"nats", "postgres"}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def hydraserve_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if name not in INFRASTRUCTURE}


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose is not installed (apt-get install docker-compose)")
def test_docker_compose_accepts_the_file() -> None:
    result = subprocess.run(["docker-compose", "config", "-q"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HYDRASERVE_ADMIN_KEY": "sk-admin-test"})
    assert result.returncode == 0, result.stderr


def test_the_system_has_nats_postgres_storage_scheduler_two_node_agents_and_a_gateway(
    services: dict[str, dict[str, Any]],
) -> None:
    modules = sorted(s["command"][2] for s in hydraserve_services(services).values()
                     if s["command"][:2] == ["python", "-m"])
    assert set(services) >= INFRASTRUCTURE
    assert modules == ["services.gateway", "services.prefetcher", "services.prefetcher",
                       "services.scheduler", "services.storage"]
    assert services["gateway"]["ports"] == ["8000:8000"]
    assert services["nats"]["image"].startswith("nats:2")
    assert "-js" in " ".join(services["nats"]["command"])
    assert "max_payload: 8MB" in " ".join(services["nats"]["command"])
    assert services["postgres"]["image"] == "postgres:16" and services["postgres"]["volumes"]


def test_every_hydraserve_service_runs_the_one_image_built_from_the_dockerfile(
    services: dict[str, dict[str, Any]],
) -> None:
    ours = hydraserve_services(services)
    assert {(s["image"], s["build"]) for s in ours.values()} == {("hydraserve:latest", ".")}
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "pip install torch==2.13.0" in dockerfile and "pip install ." in dockerfile


def test_node_agents_get_shared_memory_and_distinct_node_ids(
    services: dict[str, dict[str, Any]],
) -> None:
    agents = {name: s for name, s in services.items()
              if s.get("command", [])[:3] == ["python", "-m", "services.prefetcher"]}
    node_ids = [s["command"][s["command"].index("--node-id") + 1] for s in agents.values()]
    assert len(agents) == 2 and len(set(node_ids)) == 2
    assert all(s.get("shm_size") for s in agents.values())


def test_every_command_names_a_module_or_cli_command_the_repository_has(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in hydraserve_services(services).items():
        command = service["command"]
        if command[0] == "hydraserve":
            build_parser().parse_args(command[1:])  # exits (SystemExit) on an unknown one
        else:
            assert command[:2] == ["python", "-m"], name
            assert importlib.util.find_spec(command[2]) is not None, f"{name}: {command[2]}"
