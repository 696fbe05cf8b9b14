"""Loading a stage while its partition file is still being written behind a watermark."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from libs.common.watermark import PartitionFailedError, SharedWatermark, watermark_path
from services.worker.engine.config import EngineConfig
from services.worker.engine.loader import SafetensorsReader, checkpoint_tensors
from services.worker.engine.model_runner import ModelRunner
from tests.hf_reference import SavedModel, hf_logits, prefill_logits

pytestmark = pytest.mark.unit

PROMPT = [1, 5, 9, 200, 31]


@pytest.fixture(scope="module")
def saved(save_hf_model: Callable[..., SavedModel]) -> SavedModel:
    from transformers import LlamaConfig

    return save_hf_model(LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=128,
    ))


def write_partition(folder: Path, runner: ModelRunner, out: Path) -> bytes:
    """The stage's own tensors as one safetensors file (what storage serves for a stage)."""
    owned = set(runner.model.weight_targets())
    tensors = {name: t.clone() for name, t in checkpoint_tensors(folder) if name in owned}
    save_file(tensors, out)
    return out.read_bytes()


class SlowWriter(threading.Thread):
    """Fills a partition file the way the node agent does: size first, then bytes in order,
    advancing the watermark; it pauses halfway until `resume` is set."""

    def __init__(self, data: bytes, path: Path, *, fail_halfway: bool = False) -> None:
        super().__init__(daemon=True)
        self.data, self.path, self.fail_halfway = data, path, fail_halfway
        self.resume = threading.Event()
        with open(path, "wb") as f:
            f.truncate(len(data))
        self.watermark = SharedWatermark.create(watermark_path(path), len(data))

    def run(self) -> None:
        half = len(self.data) // 2
        with open(self.path, "r+b") as f:
            for start, end in ((0, half), (half, len(self.data))):
                if start == half:
                    if self.fail_halfway:
                        self.watermark.fail()
                        return
                    assert self.resume.wait(30), "the loader never took a tensor"
                f.seek(start)
                for chunk in range(start, end, 4096):
                    f.write(self.data[chunk:min(chunk + 4096, end)])
                    f.flush()
                    self.watermark.advance(min(chunk + 4096, end))
        self.watermark.finish()


def test_a_stage_loads_tensors_as_their_bytes_arrive_and_matches_the_whole_file(
    saved: SavedModel, tmp_path: Path,
) -> None:
    folder, hf = saved
    runner = ModelRunner(EngineConfig(model_path=folder))
    writer = SlowWriter(write_partition(folder, runner, tmp_path / "src"), tmp_path / "part")
    writer.start()
    reader = SafetensorsReader(tmp_path / "part", SharedWatermark.open(writer.watermark.path))
    received: list[str] = []

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in reader.stream(timeout=30):
            received.append(name)
            # The first tensors arrive while the second half of the file is still unwritten.
            writer.resume.set()
            yield name, tensor

    stats = runner.load(tensors())
    writer.join(10)
    assert received == [e.name for e in reader.entries()]
    assert stats.num_tensors == len(received)
    assert runner.model.meta_parameters() == []
    assert torch.allclose(prefill_logits(runner, [PROMPT]), hf_logits(hf, PROMPT), atol=1e-4)


def test_as_loaded_packing_packs_each_layer_while_later_bytes_are_still_due(
    saved: SavedModel, tmp_path: Path,
) -> None:
    folder, hf = saved
    runner = ModelRunner(EngineConfig(model_path=folder, weight_packing="as_loaded"))
    path = tmp_path / "part"
    path.write_bytes(write_partition(folder, runner, tmp_path / "src"))
    layers = runner.model.model.layers
    # name of each tensor -> which layers had packed q/k/v and gate/up when it was handed over
    packed_before: dict[str, list[int]] = {}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in SafetensorsReader(path).stream():
            packed_before[name] = [int(i) for i, layer in layers.items()
                                   if layer.self_attn.qkv is not None
                                   and layer.mlp.gate_up is not None]
            yield name, tensor

    runner.load(tensors())
    assert packed_before["model.layers.0.input_layernorm.weight"] == []
    assert packed_before["model.layers.1.input_layernorm.weight"] == [0]
    assert packed_before["model.layers.3.input_layernorm.weight"] == [0, 1, 2]
    assert all(layer.self_attn.qkv is not None for layer in layers.values())
    assert runner.model.lm_head.packed is not None
    assert torch.allclose(prefill_logits(runner, [PROMPT]), hf_logits(hf, PROMPT), atol=1e-4)


def test_loaded_weights_are_views_of_the_mapped_file_not_copies(saved: SavedModel) -> None:
    folder, _ = saved
    runner = ModelRunner(EngineConfig(model_path=folder))
    runner.load()
    entries = {e.name: e for e in SafetensorsReader(folder / "model.safetensors").entries()}
    a = runner.model.get_parameter("model.layers.0.self_attn.q_proj.weight")
    b = runner.model.get_parameter("model.layers.3.mlp.down_proj.weight")
    expected = (entries["model.layers.3.mlp.down_proj.weight"].start
                - entries["model.layers.0.self_attn.q_proj.weight"].start)
    assert b.data_ptr() - a.data_ptr() == expected


def test_a_later_stage_loads_only_its_own_tensors_from_its_partition(
    saved: SavedModel, tmp_path: Path,
) -> None:
    folder, _ = saved
    stage = ModelRunner(EngineConfig(model_path=folder, start_layer=2, end_layer=4))
    data = write_partition(folder, stage, tmp_path / "part")
    names = {e.name for e in SafetensorsReader(tmp_path / "part").entries()}
    assert names == set(stage.model.weight_targets())
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" in names
    assert "model.layers.1.mlp.up_proj.weight" not in names
    stats = stage.load(SafetensorsReader(tmp_path / "part").stream())
    assert stats.num_bytes < len(data)
    assert stage.model.meta_parameters() == []


def test_a_failed_fill_stops_the_loader_with_a_named_error(
    saved: SavedModel, tmp_path: Path,
) -> None:
    folder, _ = saved
    runner = ModelRunner(EngineConfig(model_path=folder))
    writer = SlowWriter(write_partition(folder, runner, tmp_path / "src"), tmp_path / "part",
                        fail_halfway=True)
    writer.start()
    reader = SafetensorsReader(tmp_path / "part", SharedWatermark.open(writer.watermark.path))
    with pytest.raises(PartitionFailedError, match=r"filling .*part\.wm failed"):
        runner.load(reader.stream(timeout=30))
    writer.join(10)


def test_a_partition_still_filling_packs_as_loaded_and_a_complete_one_as_configured(
    tmp_path: Path,
) -> None:
    from services.worker.partition import packing_mode

    writer = SharedWatermark.create(tmp_path / "part.wm", 100)
    reader = SharedWatermark.open(tmp_path / "part.wm")
    assert packing_mode(reader, "background") == "as_loaded"
    assert packing_mode(reader, "off") == "off"
    writer.advance(100)
    writer.finish()
    assert packing_mode(reader, "background") == "background"
    assert packing_mode(reader, "sync") == "sync"
