"""`hydraserve demo-model` and `hydraserve generate` as a user runs them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hydraserve.cli import main
from services.worker.engine.engine import LLMEngine, generate
from services.worker.engine.sequence import SamplingParams

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo-model", str(out), "--seed", "1"]) == 0
    return out


def expected_text(folder: Path, prompt: str, max_tokens: int) -> str:
    engine = LLMEngine.from_model_dir(folder)
    engine.load()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return generate(engine, [prompt], params)[0].text


def test_generate_streams_the_greedy_completion_to_stdout(
    demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", str(demo), "The river", "--max-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert out == expected_text(demo, "The river", 12)
    assert "prompt_tokens=" in err and "loaded" in err


def test_generate_through_a_chain_of_stages_prints_the_same_text(
    demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", str(demo), "The river", "--max-tokens", "12",
                 "--stages", "0,1,2"]) == 0
    out, err = capsys.readouterr()
    assert out == expected_text(demo, "The river", 12)
    assert "stages [0,1), [1,2)" in err


def test_generate_names_a_missing_model_folder_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", str(tmp_path / "nope"), "hi"]) == 2
    assert f"model folder '{tmp_path / 'nope'}' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(("command", "module"), [("storage", "services.storage"),
                                                 ("node-agent", "services.prefetcher")])
def test_a_service_command_hands_its_arguments_to_the_service(
    command: str, module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module}")


@pytest.mark.parametrize(("cores", "nodes", "threads"), [(2, 4, 1), (8, 4, 2), (16, 4, 4),
                                                         (2, 1, 2), (3, 2, 1)])
def test_up_splits_the_cores_between_the_emulated_nodes(
        monkeypatch: pytest.MonkeyPatch, cores: int, nodes: int, threads: int) -> None:
    from hydraserve.up import worker_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert worker_threads(nodes) == threads


def test_the_worker_threads_flag_sets_torchs_pool_and_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from services.worker.__main__ import parse_args, set_threads

    base = ["--model-dir", "m", "--model", "m"]
    assert parse_args([*base, "--threads", "3"]).threads == 3
    with pytest.raises(SystemExit):
        parse_args([*base, "--threads", "0"])
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "unset")  # restored (or removed) afterwards
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_up_passes_the_policy_launcher_and_threads_to_the_services(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from hydraserve.cli import build_parser
    from hydraserve.up import node_agent_argv, scheduler_argv
    from services.scheduler.policy import DEFAULT_POLICY, POLICIES, PolicyConfig

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    args = build_parser().parse_args(["up", "--nodes", "2", "--policy", "single_worker",
                                      "--launcher", "forkserver", "--nic-gbps", "8",
                                      "--max-endpoints", "2"])
    assert scheduler_argv(args, nats_url="nats://n", database_url="pg://d",
                          storage_url="http://s") == [
        "-m", "services.scheduler", "--nats", "nats://n", "--database-url", "pg://d",
        "--storage-url", "http://s", "--policy", "single_worker", "--max-endpoints", "2"]
    assert node_agent_argv(args, 1, state=tmp_path, nats_url="nats://n",
                           storage_url="http://s") == [
        "-m", "services.prefetcher", "--node-id", "node-1", "--gpu-memory-gb", "16.0",
        "--nic-gbps", "8.0", "--storage-url", "http://s", "--nats", "nats://n",
        "--work-dir", str(tmp_path / "nodes" / "node-1"), "--launcher", "forkserver",
        "--worker-arg=--threads=4"]
    defaults = build_parser().parse_args(["up"])
    assert (defaults.policy, defaults.launcher, defaults.max_endpoints) == (
        DEFAULT_POLICY, "local", PolicyConfig.max_endpoints_per_model)
    # every policy the scheduler has, and only those
    for name in POLICIES:
        assert build_parser().parse_args(["up", "--policy", name]).policy == name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--policy", "round_robin"])
