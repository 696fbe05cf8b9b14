"""The partitioner on small random Llama, OPT and Falcon checkpoints saved by transformers."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from libs.common.errors import InvalidRequestError
from services.storage.partitioner import Partition, Partitioner, plan_stages
from services.worker.engine.config import ModelConfig, StageSpec
from services.worker.engine.loader import SafetensorsReader, checkpoint_tensors
from services.worker.engine.models import build_stage_model
from tests.hf_reference import SavedModel

pytestmark = pytest.mark.unit


def _llama() -> object:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                       max_position_embeddings=64, tie_word_embeddings=False)


def _opt() -> object:
    from transformers import OPTConfig

    # OPT ties its LM head to the embedding by default
    return OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=5,
                     vocab_size=128, max_position_embeddings=64)


def _falcon() -> object:
    from transformers import FalconConfig

    return FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=3,
                        vocab_size=128, max_position_embeddings=64, multi_query=True,
                        parallel_attn=True, new_decoder_architecture=False)


CONFIGS: dict[str, Callable[[], object]] = {"llama": _llama, "opt": _opt, "falcon": _falcon}
CASES = [(family, degree) for family in CONFIGS for degree in range(1, 5)
         if not (family == "falcon" and degree == 4)]


@pytest.fixture(scope="module")
def saved(save_hf_model: Callable[..., SavedModel]) -> Callable[[str], SavedModel]:
    made: dict[str, SavedModel] = {}

    def get(family: str) -> SavedModel:
        if family not in made:
            made[family] = save_hf_model(CONFIGS[family]())
        return made[family]

    return get


@pytest.fixture(scope="module")
def partitioner(saved: Callable[[str], SavedModel]) -> Callable[[str], Partitioner]:
    made: dict[str, Partitioner] = {}

    def get(family: str) -> Partitioner:
        if family not in made:
            made[family] = Partitioner(saved(family)[0])
        return made[family]

    return get


def assemble(folder: Path, partition: Partition) -> bytes:
    """The partition file, built the plainest way: the header, then each source range."""
    data = bytearray(partition.header)
    for entry in partition.tensors:
        assert entry.dst_start == len(data)
        with open(folder / entry.file, "rb") as f:
            f.seek(entry.src_start)
            data += f.read(entry.num_bytes)
    return bytes(data)


def stage_targets(folder: Path, partition: Partition) -> list[str]:
    config = ModelConfig.from_model_dir(folder)
    spec = StageSpec(partition.start_layer, partition.end_layer, config.num_layers)
    return list(build_stage_model(config, spec).weight_targets())


@pytest.mark.parametrize(("family", "degree"), CASES)
def test_stages_are_contiguous_non_empty_and_cover_every_layer(
    partitioner: Callable[[str], Partitioner], family: str, degree: int,
) -> None:
    parts = partitioner(family).partitions(degree)
    num_layers = partitioner(family).num_layers
    assert [p.stage for p in parts] == list(range(degree))
    assert parts[0].start_layer == 0 and parts[-1].end_layer == num_layers
    assert all(a.end_layer == b.start_layer for a, b in itertools.pairwise(parts))
    assert all(p.start_layer < p.end_layer for p in parts)


@pytest.mark.parametrize(("family", "degree"), CASES)
def test_stage_bytes_are_optimal_and_within_one_layer_of_the_ideal(
    partitioner: Callable[[str], Partitioner], family: str, degree: int,
) -> None:
    model = partitioner(family)
    sizes = [p.weight_bytes for p in model.partitions(degree)]
    n = model.num_layers
    # brute force over every way to cut n layers into `degree` non-empty stages
    best = min(max(model.stage_bytes(a, b) for a, b in itertools.pairwise((0, *cuts, n)))
               for cuts in itertools.combinations(range(1, n), degree - 1))
    layer_bytes = max(model.stage_bytes(i, i + 1) for i in range(1, n - 1))
    ideal = sum(sizes) / degree
    assert max(sizes) == best
    assert all(abs(size - ideal) <= layer_bytes for size in sizes), (sizes, ideal, layer_bytes)


@pytest.mark.parametrize(("family", "degree"), CASES)
def test_each_tensor_is_in_exactly_the_stages_whose_model_owns_it(
    saved: Callable[[str], SavedModel], partitioner: Callable[[str], Partitioner],
    family: str, degree: int,
) -> None:
    folder = saved(family)[0]
    parts = partitioner(family).partitions(degree)
    for part in parts:
        assert [e.name for e in part.tensors] == stage_targets(folder, part)
    used = {e.name for p in parts for e in p.tensors}
    assert used == set(stage_targets(folder, Partitioner(folder).partitions(1)[0]))


def test_a_tied_embedding_goes_to_the_first_stage_and_to_the_last_as_its_lm_head(
    partitioner: Callable[[str], Partitioner],
) -> None:
    parts = partitioner("opt").partitions(3)
    holders = [p.stage for p in parts for e in p.tensors
               if e.name == "model.decoder.embed_tokens.weight"]
    assert holders == [0, 2]
    assert all(e.name != "lm_head.weight" for p in parts for e in p.tensors)


@pytest.mark.parametrize(("family", "degree"), CASES)
def test_the_partition_file_parses_with_safetensors_reader_and_holds_the_stage_tensors(
    saved: Callable[[str], SavedModel], partitioner: Callable[[str], Partitioner],
    tmp_path: Path, family: str, degree: int,
) -> None:
    folder = saved(family)[0]
    source = dict(_canonical_tensors(folder))
    for part in partitioner(family).partitions(degree):
        path = tmp_path / f"{degree}-{part.stage}.safetensors"
        path.write_bytes(assemble(folder, part))
        assert path.stat().st_size == part.num_bytes
        header_only = tmp_path / "header"
        header_only.write_bytes(part.header + bytes(part.weight_bytes))
        entries = SafetensorsReader(header_only).entries()
        assert [e.name for e in entries] == stage_targets(folder, part)
        assert [(e.start, e.end) for e in entries] == \
            [(t.dst_start, t.dst_end) for t in part.tensors]
        loaded = load_file(path)  # the reference reader accepts it as a safetensors file
        assert set(loaded) == set(stage_targets(folder, part))
        assert all(torch.equal(t, source[name]) for name, t in loaded.items())


def _canonical_tensors(folder: Path) -> list[tuple[str, torch.Tensor]]:
    config = ModelConfig.from_model_dir(folder)
    model = build_stage_model(config, StageSpec.whole(config.num_layers))
    return [(model.checkpoint_name(name), t.clone()) for name, t in checkpoint_tensors(folder)]


def test_a_sharded_checkpoint_gives_the_same_partition_bytes_from_several_files(
    saved: Callable[[str], SavedModel], partitioner: Callable[[str], Partitioner],
    tmp_path: Path,
) -> None:
    folder, hf = saved("llama")
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    sharded = Partitioner(tmp_path).partitions(2)
    whole = partitioner("llama").partitions(2)
    assert len({e.file for p in sharded for e in p.tensors}) > 1
    assert [assemble(tmp_path, p) for p in sharded] == [assemble(folder, p) for p in whole]


def test_partitioning_is_deterministic(saved: Callable[[str], SavedModel]) -> None:
    folder = saved("llama")[0]
    assert Partitioner(folder).partitions(3) == Partitioner(folder).partitions(3)


@pytest.mark.parametrize(("family", "degree"), [("falcon", 4), ("llama", 5), ("llama", 0)])
def test_a_degree_outside_1_to_min_4_and_the_layer_count_is_refused_with_a_named_error(
    partitioner: Callable[[str], Partitioner], family: str, degree: int,
) -> None:
    with pytest.raises(InvalidRequestError, match=f"pipeline degree {degree} is not") as info:
        partitioner(family).partitions(degree)
    assert (info.value.code, info.value.param) == ("invalid_request_error", "degree")


def test_the_plan_gives_a_stage_with_a_heavy_embedding_fewer_layers() -> None:
    # bytes per layer: 10, and a 25-byte embedding on layer 0
    unit = [35, 10, 10, 10, 10, 10]
    costs = [[sum(unit[a:b]) for b in range(7)] for a in range(7)]
    assert plan_stages(costs, 6, 2) == [(0, 2), (2, 6)]
    # the largest stage cannot go below 35; then the most even split of the rest
    assert plan_stages(costs, 6, 3) == [(0, 1), (1, 3), (3, 6)]
    assert plan_stages(costs, 6, 4) == [(0, 1), (1, 2), (2, 4), (4, 6)]
