"""Pipeline execution and consolidation, in one process: the real driver and stage servers,
the real wire format, with the channel replaced by direct hand-off between inboxes (the NATS
channel is exercised by the end-to-end tests)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from services.worker.engine.config import EngineConfig
from services.worker.engine.engine import LLMEngine
from services.worker.engine.model_runner import ModelRunner
from services.worker.engine.sequence import SamplingParams
from services.worker.pipeline.driver import PipelineDriver
from services.worker.pipeline.stage import StageServer
from tests.hf_reference import SavedModel, hf_greedy, make_engine

pytestmark = pytest.mark.unit

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
PROMPTS: list[list[int]] = [[1, 9, 33, 4], [1, 200, 14, 14, 90, 2, 61], [1, 3], [1, 77, 8],
                            [1, 5, 6, 7, 8, 9]]


def sampled(seed: int) -> SamplingParams:
    return SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=seed, max_tokens=20,
                          ignore_eos=True)


@pytest.fixture(scope="module")
def saved(save_hf_model: Callable[..., SavedModel]) -> SavedModel:
    from transformers import LlamaConfig

    return save_hf_model(LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=128,
    ))


class Pipeline:
    """A driver over stage [0, b1) and stage servers for the rest, wired inbox to inbox."""

    def __init__(self, folder: Path, boundaries: list[int], *, max_num_seqs: int = 8) -> None:
        self.folder = folder
        self.boundaries = boundaries
        self.config = {"weight_packing": "sync", "max_num_seqs": max_num_seqs}
        engine = make_engine(folder, boundaries=boundaries[:2], **self.config)
        self.servers: list[StageServer] = []
        self.driver = PipelineDriver(engine, degree=len(boundaries) - 1, send=self._send)
        for stage, runner in enumerate(self.runners(boundaries[1:]), start=1):
            server = StageServer(runner, stage=stage, send=self._send)
            server.start()
            self.servers.append(server)
        self.driver.connect(timeout_s=10)

    def runners(self, boundaries: list[int]) -> list[ModelRunner]:
        runners = []
        for start, end in itertools.pairwise(boundaries):
            runner = ModelRunner(EngineConfig(model_path=self.folder, start_layer=start,
                                              end_layer=end, **self.config))  # type: ignore[arg-type]
            runner.load()
            runners.append(runner)
        return runners

    def _send(self, stage: int, frame: bytes) -> None:
        (self.driver.inbox if stage == 0 else self.servers[stage - 1].inbox).put(frame)

    def close(self) -> None:
        for server in self.servers:
            server.stop(5)


def run(driver: PipelineDriver | LLMEngine, *, on_step: Callable[[int], None] | None = None,
        max_steps: int = 10_000) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for step in range(max_steps):
        if not driver.has_unfinished():
            return tokens
        if on_step is not None:
            on_step(step)
        for out in driver.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    raise AssertionError("the pipeline did not finish")


def reference(folder: Path, requests: dict[str, tuple[list[int], SamplingParams]]
              ) -> dict[str, list[int]]:
    engine = make_engine(folder, max_num_seqs=8)
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    return run(engine)


@pytest.mark.parametrize("boundaries", [[0, 3, 6], [0, 1, 3, 4, 6]])
def test_a_pipeline_gives_the_greedy_tokens_of_hugging_face(saved: SavedModel,
                                                            boundaries: list[int]) -> None:
    folder, hf_model = saved
    pipeline = Pipeline(folder, boundaries)
    try:
        for i, prompt in enumerate(PROMPTS):
            pipeline.driver.add_request(f"r{i}", prompt, GREEDY)
        tokens = run(pipeline.driver)
    finally:
        pipeline.close()
    assert tokens == {f"r{i}": hf_greedy(hf_model, prompt, 20) for i, prompt in enumerate(PROMPTS)}


def test_stages_build_each_decode_batch_ahead(saved: SavedModel) -> None:
    """One request alone: every decode step after the first finds the batch its stage built
    while the later stages computed the step before; the tokens stay HF's."""
    folder, hf_model = saved
    pipeline = Pipeline(folder, [0, 2, 4, 6])
    try:
        pipeline.driver.add_request("r0", PROMPTS[1], GREEDY)
        tokens = run(pipeline.driver)
        hits = [server.num_prepared_hits for server in pipeline.servers]
        steps = [server.num_steps for server in pipeline.servers]
    finally:
        pipeline.close()
    assert tokens == {"r0": hf_greedy(hf_model, PROMPTS[1], 20)}
    # 20 tokens: the prefill step, then 19 decode steps, each one token further
    assert steps == [20, 20]
    assert hits == [19, 19]


def test_micro_batches_overlap_and_late_requests_join(saved: SavedModel) -> None:
    folder, _ = saved
    requests = {f"r{i}": (prompt, sampled(i) if i % 2 else GREEDY)
                for i, prompt in enumerate(PROMPTS)}
    pipeline = Pipeline(folder, [0, 2, 4, 6])
    in_flight: list[int] = []
    late = dict(list(requests.items())[2:])

    def on_step(step: int) -> None:
        in_flight.append(len(pipeline.driver._in_flight))
        if step == 3:  # the rest arrive while the first two decode
            for request_id, (prompt, params) in late.items():
                pipeline.driver.add_request(request_id, prompt, params)

    try:
        for request_id, (prompt, params) in list(requests.items())[:2]:
            pipeline.driver.add_request(request_id, prompt, params)
        tokens = run(pipeline.driver, on_step=on_step)
    finally:
        pipeline.close()
    assert tokens == reference(folder, requests)
    assert max(in_flight) >= 2


def test_an_aborted_request_in_flight_leaves_the_others_exact(saved: SavedModel) -> None:
    folder, _ = saved
    requests = {f"r{i}": (prompt, sampled(10 + i)) for i, prompt in enumerate(PROMPTS)}
    pipeline = Pipeline(folder, [0, 3, 6])

    def on_step(step: int) -> None:
        if step == 12:
            assert pipeline.driver.abort("r1") is not None

    try:
        for request_id, (prompt, params) in requests.items():
            pipeline.driver.add_request(request_id, prompt, params)
        tokens = run(pipeline.driver, on_step=on_step)
    finally:
        pipeline.close()
    expected = reference(folder, requests)
    del expected["r1"], tokens["r1"]
    assert tokens == expected


@pytest.mark.parametrize("boundaries", [[0, 3, 6], [0, 2, 3, 5, 6]])
def test_consolidation_mid_stream_keeps_every_token(saved: SavedModel,
                                                    boundaries: list[int]) -> None:
    folder, _ = saved
    requests = {f"r{i}": (prompt, sampled(20 + i) if i % 2 else GREEDY)
                for i, prompt in enumerate(PROMPTS)}
    pipeline = Pipeline(folder, boundaries)
    tail = pipeline.runners(boundaries[1:])  # what the full-size worker fetched and loaded
    handovers = []

    def on_step(step: int) -> None:
        if step == 15:
            handovers.append(pipeline.driver.start_handover(tail))

    try:
        for request_id, (prompt, params) in requests.items():
            pipeline.driver.add_request(request_id, prompt, params)
        tokens = run(pipeline.driver, on_step=on_step)
        steps_after = sum(s.num_steps for s in pipeline.servers)
        # a request after the switch runs on the consolidated engine alone
        pipeline.driver.add_request("late", [1, 42, 43], GREEDY)
        late = run(pipeline.driver)
    finally:
        pipeline.close()
    stats = handovers[0].result(timeout=0)
    assert pipeline.driver.is_consolidated
    assert 0 < stats.num_seqs <= len(requests)
    assert stats.num_bytes > 0
    assert tokens == reference(folder, requests)
    assert sum(s.num_steps for s in pipeline.servers) == steps_after
    assert late == reference(folder, {"late": ([1, 42, 43], GREEDY)})


def test_consolidating_an_idle_pipeline_switches_at_once(saved: SavedModel) -> None:
    folder, _ = saved
    pipeline = Pipeline(folder, [0, 3, 6])
    try:
        future = pipeline.driver.start_handover(pipeline.runners([3, 6]))
        run(pipeline.driver)
    finally:
        pipeline.close()
    assert future.result(timeout=0).num_seqs == 0
    assert pipeline.driver.is_consolidated
    assert [r.stage.end_layer for r in pipeline.driver.engine.runners] == [3, 6]


def test_frames_round_trip_bf16_tensors() -> None:
    from libs.common.pipeline import StagePacket
    from services.worker.pipeline.wire import BlobWriter, decode, encode, read_tensor

    tensor = torch.randn(3, 5).to(torch.bfloat16)
    writer = BlobWriter()
    frame = encode(StagePacket(kind="batch", hidden=writer.add(tensor)), writer.getvalue())
    packet, blob = decode(frame, StagePacket)
    assert packet.hidden is not None
    assert torch.equal(read_tensor(blob, packet.hidden), tensor)
