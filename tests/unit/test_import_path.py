"""The worker's start-up path stays lean: its engine never pulls in the web, database,
Kubernetes or transformers stacks (start-up time is the product)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

FORBIDDEN = ("fastapi", "starlette", "sqlalchemy", "asyncpg", "alembic", "kubernetes",
             "transformers", "nats")
ENGINE_MODULES = [
    "services.worker.engine.engine",
    "services.worker.engine.tokenizer",
    "services.worker.engine.loader",
    "services.worker.engine.models.llama",
    "services.worker.engine.models.opt",
    "services.worker.engine.models.falcon",
    "libs.common.watermark",
    "hydraserve.cli",
    "hydraserve.generate",
]


def test_engine_modules_import_none_of_the_heavy_stacks() -> None:
    script = (
        "import importlib, json, sys\n"
        f"for name in {ENGINE_MODULES!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert json.loads(result.stdout) == []


def test_building_and_loading_a_stage_does_not_import_torch_dynamo(tmp_path: object) -> None:
    """Initialising `meta` parameters runs torch's reference ops, whose first use imports
    torch._dynamo (seconds on a cold start); the engine's modules skip that init."""
    from services.worker.demo_model import write_demo_model

    folder = write_demo_model(tmp_path / "demo")  # type: ignore[operator]
    script = (
        "import sys\n"
        "from services.worker.engine.engine import LLMEngine, generate\n"
        f"engine = LLMEngine.from_model_dir({str(folder)!r})\n"
        "engine.load()\n"
        "generate(engine, ['hello'])\n"
        "print('torch._dynamo' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
