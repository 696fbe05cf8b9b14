"""`hydraserve up` as a newcomer runs it: everything from wheels, a cold request answered
through the openai client, and Ctrl-C leaving nothing running."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydraserve.up import read_banner
from services.worker.engine.engine import LLMEngine, generate
from services.worker.engine.sequence import SamplingParams

pytestmark = pytest.mark.e2e

START_TIMEOUT_S = 180.0


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc)."""
    found: set[int] = set()
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    pending.append(child)
    return found


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_up_serves_a_cold_request_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    from openai import OpenAI

    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HYDRASERVE_")}  # embedded servers, whatever the caller set
    env["OMP_NUM_THREADS"] = "1"
    up = subprocess.Popen(
        [sys.executable, "-m", "hydraserve.cli", "up", "--state-dir", str(tmp_path / "state"),
         "--port", str(port), "--nodes", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        banner = read_banner(up, timeout_s=START_TIMEOUT_S)
        admin_key = re.search(r"admin key\s+(\S+)", banner)
        assert admin_key is not None, banner
        assert f"http://127.0.0.1:{port}/v1" in banner
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=admin_key.group(1),
                        timeout=120)
        assert [m.id for m in client.models.list().data] == ["demo"]
        answer = client.completions.create(model="demo", prompt="Once upon a time",
                                           max_tokens=8, temperature=0)
        expected = _greedy(tmp_path / "state" / "demo-model", "Once upon a time", 8)
        assert answer.choices[0].text == expected.text
        assert answer.usage is not None
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == \
            (expected.prompt_tokens, len(expected.token_ids))
        running = descendants(up.pid)
        assert len(running) >= 6  # nats, postgres, storage, gateway, scheduler, nodes, worker
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
    deadline = time.monotonic() + 10
    while any(is_alive(pid) for pid in running) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in running if is_alive(pid)] == []


def _greedy(folder: Path, prompt: str, max_tokens: int):
    engine = LLMEngine.from_model_dir(folder)
    engine.load()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return generate(engine, [prompt], params)[0]
