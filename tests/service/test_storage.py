"""The storage service over real HTTP (uvicorn on a free port) and the node agent's fetcher."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest
import torch
import uvicorn

from libs.common.errors import FetchFailedError, NotFoundError
from libs.common.watermark import FillState, SharedWatermark, watermark_path
from services.prefetcher.fetch import FetchResult, default_model_dir, fetch_partition
from services.storage.app import create_app
from services.storage.schemas import Manifest
from services.storage.store import ModelStore
from services.storage.throttle import TokenBucket
from services.worker.engine.config import EngineConfig
from services.worker.engine.loader import SafetensorsReader
from services.worker.engine.model_runner import ModelRunner
from tests.hf_reference import SavedModel, hf_logits

pytestmark = [pytest.mark.service, pytest.mark.anyio]

MODEL = "tiny-llama"
PROMPT = [1, 5, 9, 200, 31]
TIMEOUT_S = 30.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> SavedModel:
    """A 4-layer Llama with tied embeddings and a tokenizer.json, as an HF folder. The
    embedding is about half a layer, so first and last stages are 1.5 layers each."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=64, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("hf-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tokenizer.save(str(folder / "tokenizer.json"))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, hf


@contextmanager
def running_server(root: Path, *, egress: TokenBucket | None = None) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(ModelStore(root), egress=egress)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT_S)
        sock.close()


@pytest.fixture(scope="module")
def store_root(saved: SavedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    ModelStore(root).import_model(saved[0], MODEL)
    return root


@pytest.fixture(scope="module")
def base_url(store_root: Path) -> Iterator[str]:
    with running_server(store_root) as url:
        yield url


def expected_partition(folder: Path, manifest: Manifest) -> bytes:
    """The partition file assembled locally from the manifest and the source folder."""
    data = bytearray(manifest.header)
    for tensor in manifest.tensors:
        data += (folder / tensor.file).read_bytes()[tensor.src_start:tensor.src_end]
    return bytes(data)


async def get_manifest(base_url: str, degree: int, stage: int) -> Manifest:
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.get(f"/models/{MODEL}/partitions/{degree}/{stage}/manifest")
    assert response.status_code == 200
    return Manifest.model_validate_json(response.content)


async def test_an_imported_model_is_listed_and_described_with_partitions_for_degrees_1_to_4(
    base_url: str,
) -> None:
    async with httpx.AsyncClient(base_url=base_url) as client:
        listed = (await client.get("/models")).json()
        described = (await client.get(f"/models/{MODEL}")).json()
    assert [m["name"] for m in listed] == [MODEL]
    assert (described["architecture"], described["num_layers"], described["max_degree"]) == \
        ("LlamaForCausalLM", 4, 4)
    assert [[(s["start_layer"], s["end_layer"]) for s in described["partitions"][str(d)]]
            for d in range(1, 5)] == [[(0, 4)], [(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)],
                                      [(0, 1), (1, 2), (2, 3), (3, 4)]]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= \
        {f["path"] for f in described["files"]}


# the header is ~1.5 KB: 1000-4999 spans header and tensor bytes; the last two run to the end
@pytest.mark.parametrize(("header", "start", "end"), [
    ("bytes=0-99", 0, 100), ("bytes=1000-4999", 1000, 5000), ("bytes=-300", -300, None),
    ("bytes=5000-", 5000, None), ("bytes=0-99999999", 0, None),
])
async def test_a_range_request_returns_exactly_those_partition_bytes_with_206(
    base_url: str, saved: SavedModel, header: str, start: int, end: int | None,
) -> None:
    manifest = await get_manifest(base_url, 2, 1)
    expected = expected_partition(saved[0], manifest)
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.get(f"/models/{MODEL}/partitions/2/1/data",
                                    headers={"Range": header})
    wanted = expected[start:end]
    first = start if start >= 0 else len(expected) + start
    assert response.status_code == 206
    assert response.headers["content-range"] == \
        f"bytes {first}-{first + len(wanted) - 1}/{len(expected)}"
    assert response.content == wanted


async def test_a_request_without_range_returns_the_whole_partition_with_200(
    base_url: str, saved: SavedModel,
) -> None:
    manifest = await get_manifest(base_url, 3, 0)
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.get(f"/models/{MODEL}/partitions/3/0/data")
    assert (response.status_code, response.headers["accept-ranges"]) == (200, "bytes")
    assert response.content == expected_partition(saved[0], manifest)


async def test_a_range_past_the_end_is_answered_416_with_the_size(base_url: str) -> None:
    manifest = await get_manifest(base_url, 1, 0)
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.get(f"/models/{MODEL}/partitions/1/0/data",
                                    headers={"Range": f"bytes={manifest.num_bytes}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{manifest.num_bytes}"
    assert response.json()["error"]["code"] == "range_not_satisfiable"


@pytest.mark.parametrize("header", ["bytes=0-9,20-29", "bytes=9-0", "items=0-9"])
async def test_a_range_that_is_not_one_byte_range_is_refused_400(
    base_url: str, header: str,
) -> None:
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.get(f"/models/{MODEL}/partitions/1/0/data",
                                    headers={"Range": header})
    error = response.json()["error"]
    assert (response.status_code, error["code"], error["param"]) == \
        (400, "invalid_request_error", "Range")


async def test_model_files_are_served_whole_and_by_range(
    base_url: str, saved: SavedModel,
) -> None:
    config = (saved[0] / "config.json").read_bytes()
    async with httpx.AsyncClient(base_url=base_url) as client:
        whole = await client.get(f"/models/{MODEL}/files/config.json")
        part = await client.get(f"/models/{MODEL}/files/config.json",
                                headers={"Range": "bytes=2-9"})
        missing = await client.get(f"/models/{MODEL}/files/..%2Fmodel.json")
    assert (whole.status_code, whole.content) == (200, config)
    assert (part.status_code, part.content) == (206, config[2:10])
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize("stage", [0, 1])
async def test_fetch_with_4_streams_writes_the_partition_byte_for_byte_and_completes(
    base_url: str, saved: SavedModel, tmp_path: Path, stage: int,
) -> None:
    progress: list[tuple[int, int]] = []
    result = await fetch_partition(base_url, MODEL, 2, stage, tmp_path / "p.safetensors",
                                   num_streams=4, chunk_bytes=16 << 10,
                                   on_progress=lambda n, total: progress.append((n, total)))
    assert result.path.read_bytes() == expected_partition(saved[0], result.manifest)
    watermark = SharedWatermark.open(result.watermark_path)
    assert watermark.read() == (result.num_bytes, result.num_bytes, FillState.COMPLETE)
    assert {p.name for p in result.model_dir.iterdir()} == {
        "config.json", "generation_config.json", "tokenizer.json", "manifest.json",
        "model.safetensors"}
    assert (result.model_dir / "model.safetensors").resolve() == result.path.resolve()
    # 16 KiB chunks over 4 streams: the watermark moved many times, only ever forward
    assert len(progress) > 10 and progress == sorted(set(progress))
    assert progress[-1] == (result.num_bytes, result.num_bytes)


async def test_a_stage_loads_while_its_partition_arrives_and_the_pipeline_matches_hf(
    base_url: str, saved: SavedModel, tmp_path: Path,
) -> None:
    dest = tmp_path / "stage0.safetensors"
    manifest = await get_manifest(base_url, 2, 0)
    cap = manifest.num_bytes / 0.8  # bytes per second: the fetch takes ~0.8 s
    seen_at_first_tensor: list[tuple[int, int, FillState]] = []

    def load_stage0() -> ModelRunner:
        watermark = SharedWatermark.open(watermark_path(dest), timeout=TIMEOUT_S)
        watermark.wait_for(1, TIMEOUT_S)  # past 0: the model folder is complete
        runner = stage_runner(default_model_dir(dest))
        reader = SafetensorsReader(dest, watermark)

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in reader.stream(timeout=TIMEOUT_S):
                if not seen_at_first_tensor:
                    seen_at_first_tensor.append(watermark.read())
                yield name, tensor

        runner.load(tensors())
        return runner

    fetched: list[FetchResult] = []
    loaded: list[ModelRunner] = []
    async with anyio.create_task_group() as group:
        async def fetch() -> None:
            fetched.append(await fetch_partition(base_url, MODEL, 2, 0, dest, num_streams=4,
                                                 chunk_bytes=16 << 10,
                                                 bandwidth_cap_bytes_per_s=cap))

        async def load() -> None:
            loaded.append(await anyio.to_thread.run_sync(load_stage0))

        group.start_soon(fetch)
        group.start_soon(load)
    stage1 = await fetch_partition(base_url, MODEL, 2, 1, tmp_path / "stage1.safetensors")
    received, total, state = seen_at_first_tensor[0]
    assert state is FillState.FILLING and received < total
    assert fetched[0].seconds >= 0.9 * (manifest.num_bytes - len(manifest.header)) / cap
    logits = pipeline_logits(loaded[0], stage_runner(stage1.model_dir, load=True), PROMPT)
    assert torch.allclose(logits, hf_logits(saved[1], PROMPT), atol=1e-4)


def stage_runner(model_dir: Path, *, load: bool = False) -> ModelRunner:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    runner = ModelRunner(EngineConfig(model_path=model_dir, start_layer=manifest["start_layer"],
                                      end_layer=manifest["end_layer"], weight_packing="sync"))
    if load:
        runner.load()  # model.safetensors links to the completed partition
    return runner


def pipeline_logits(first: ModelRunner, last: ModelRunner, prompt: list[int]) -> torch.Tensor:
    batches = [r.new_batch(is_prefill=True, slot_ids=[0], context_lens=[0],
                           query_lens=[len(prompt)]) for r in (first, last)]
    hidden = first.forward(torch.tensor(prompt), batches[0])  # [num_tokens, hidden]
    return last.logits(last.forward(hidden, batches[1]), batches[1], all_tokens=True)


async def test_an_egress_cap_paces_a_fetch_to_at_least_its_size_over_the_cap(
    store_root: Path, tmp_path: Path,
) -> None:
    cap = 1_000_000.0
    with running_server(store_root, egress=TokenBucket(cap)) as url:
        result = await fetch_partition(url, MODEL, 1, 0, tmp_path / "p.st", num_streams=4,
                                       chunk_bytes=64 << 10)
    data_bytes = result.num_bytes - len(result.manifest.header)
    assert result.seconds >= 0.9 * data_bytes / cap
    assert result.seconds < 3 * data_bytes / cap + 1.0


async def test_concurrent_responses_share_the_egress_cap_fairly(store_root: Path) -> None:
    cap, size = 1_000_000.0, 250_000
    finished: list[float] = []
    with running_server(store_root, egress=TokenBucket(cap)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            started = time.monotonic()

            async def get(offset: int) -> None:
                response = await client.get(f"/models/{MODEL}/partitions/1/0/data", headers={
                    "Range": f"bytes={offset}-{offset + size - 1}"})
                assert len(response.content) == size
                finished.append(time.monotonic() - started)

            async with anyio.create_task_group() as group:
                group.start_soon(get, 0)
                group.start_soon(get, size)
    # both share the cap to the end: each takes about 2 * size / cap, neither size / cap
    assert min(finished) >= 0.8 * 2 * size / cap
    assert max(finished) - min(finished) < 0.15


async def test_a_fetch_from_a_stopped_server_fails_with_a_named_error_and_a_failed_watermark(
    store_root: Path, tmp_path: Path,
) -> None:
    with running_server(store_root) as url:
        manifest = await get_manifest(url, 2, 0)
        await fetch_partition(url, MODEL, 1, 0, tmp_path / "warm.st")  # the server works
    dest = tmp_path / "p.st"
    with pytest.raises(FetchFailedError, match="ConnectError"):
        await fetch_partition(url, MODEL, 2, 0, dest, manifest=manifest)
    assert SharedWatermark.open(watermark_path(dest)).read()[2] is FillState.FAILED
    with pytest.raises(FetchFailedError, match="ConnectError"):
        await fetch_partition(url, MODEL, 2, 0, tmp_path / "q.st")


async def test_fetching_a_model_the_store_lacks_raises_not_found(
    base_url: str, tmp_path: Path,
) -> None:
    with pytest.raises(NotFoundError, match="404"):
        await fetch_partition(base_url, "absent", 1, 0, tmp_path / "p.st")


async def test_an_import_without_safetensors_is_refused_422_with_a_named_code(
    base_url: str, saved: SavedModel, tmp_path: Path,
) -> None:
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((saved[0] / name).read_bytes())
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.post("/models", json={"path": str(tmp_path), "name": "x"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "model_format_error"
    assert "no *.safetensors" in response.json()["error"]["message"]


async def test_an_import_of_an_unsupported_architecture_is_refused_422_naming_it(
    base_url: str, saved: SavedModel, tmp_path: Path,
) -> None:
    config = json.loads((saved[0] / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.post("/models", json={"path": str(tmp_path), "name": "x"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "unsupported_model"
    assert "GPT2LMHeadModel" in response.json()["error"]["message"]


async def test_an_import_under_a_taken_name_is_409_and_a_deleted_model_is_404(
    base_url: str, saved: SavedModel,
) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT_S) as client:
        taken = await client.post("/models", json={"path": str(saved[0]), "name": MODEL})
        created = await client.post("/models", json={"path": str(saved[0]), "name": "copy"})
        deleted = await client.delete("/models/copy")
        gone = await client.get("/models/copy/partitions/1/0/manifest")
    assert (taken.status_code, taken.json()["error"]["code"]) == (409, "conflict")
    assert (created.status_code, deleted.status_code) == (201, 204)
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "not_found")
