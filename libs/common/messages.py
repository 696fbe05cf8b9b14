"""The payloads that cross process boundaries, defined once.

Every message is a Pydantic model serialized with `model_dump_json()` and read with
`model_validate_json()`. Unknown fields are ignored on read, so a newer sender can add a field
without breaking an older reader during a rolling upgrade.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from libs.common.errors import HydraError
from libs.common.subjects import EVENT_KIND

FinishReason = Literal["stop", "length", "abort", "error"]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(Message):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingOptions(Message):
    """What the engine's `SamplingParams` takes; the worker validates the values again."""

    # None: as many as fit in the model's context
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # 0: no top-k cut
    top_k: int = Field(default=0, ge=0)
    # The gateway always sets one, so a redelivered request samples the same tokens again and
    # the chunks of the two attempts agree seq by seq.
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=4)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True


class GenerateRequest(Message):
    """One generation request, queued on `hs.req.<model>` by the gateway."""

    request_id: str = Field(min_length=1)
    model: str = Field(min_length=1)
    # Exactly one of prompt, prompt_token_ids and messages is set.
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    # chat turns, rendered with the model's chat template by the worker
    messages: list[ChatMessage] | None = None
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    # the client asked for a stream (recorded in events; the worker streams either way)
    stream: bool = False
    # unix time (s) the gateway accepted the request; queue wait and TTFT are measured from it
    created: float = Field(default_factory=time.time)
    # Unix time (s) by which the first token must exist; past it the gateway has answered 503,
    # so a worker that pulls the request later drops it.
    deadline: float | None = None
    tenant_id: str | None = None
    # the gateway's id of the API key that sent the request (never the key itself)
    api_key_id: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> Self:
        given = [self.prompt is not None, self.prompt_token_ids is not None,
                 self.messages is not None]
        if sum(given) != 1:
            raise ValueError("set exactly one of prompt, prompt_token_ids and messages")
        return self


class Usage(Message):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorInfo(Message):
    """A failed request, as the worker reports it; the gateway maps it to an OpenAI error."""

    # HydraError.code, e.g. "context_length_exceeded"
    code: str
    message: str
    # the request field at fault, e.g. "max_tokens"
    param: str | None = None
    # the HTTP status the gateway answers with
    http_status: int = 500

    @classmethod
    def from_error(cls, error: HydraError) -> ErrorInfo:
        return cls(code=error.code, message=error.message, param=error.param,
                   http_status=error.http_status)

    def to_error(self) -> HydraError:
        error = HydraError(self.message, param=self.param)
        error.code = self.code
        error.http_status = self.http_status
        return error


class TokenChunk(Message):
    """A piece of one request's answer, published on `hs.tok.<request_id>`."""

    request_id: str
    # 0, 1, 2, ... per request. A redelivered request starts again at 0, so the gateway keeps
    # the first chunk of each seq and drops repeats; it also restores order.
    seq: int = Field(ge=0)
    # the text these tokens completed ("" while a character or a stop string is pending)
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    # None until the last chunk
    finish_reason: FinishReason | None = None
    # the stop string or stop token id that ended the request, if any
    stop_reason: str | int | None = None
    # on the last chunk only
    usage: Usage | None = None
    # set when finish_reason is "error"
    error: ErrorInfo | None = None
    # the worker that produced the chunk (debugging; a change means a redelivery)
    worker_id: str | None = None

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None


class EventKind:
    """The event kinds emitted so far (`<entity>.<verb>`)."""

    REQUEST_RECEIVED = "request.received"
    REQUEST_FIRST_TOKEN = "request.first_token"
    REQUEST_DONE = "request.done"
    # pulled after its deadline: dropped unanswered
    REQUEST_EXPIRED = "request.expired"
    WORKER_STARTED = "worker.started"
    WORKER_READY = "worker.ready"
    WORKER_STOPPING = "worker.stopping"
    WORKER_STOPPED = "worker.stopped"
    # --- cold start: scheduler and node agent ---
    # the scheduler sent a PlaceWorkerCommand / StopWorkerCommand
    WORKER_PLACED = "worker.placed"
    WORKER_STOP_REQUESTED = "worker.stop_requested"
    # the node agent spawned the worker process (pid in data)
    WORKER_LAUNCHED = "worker.launched"
    # scheduler: a model's spec as the policy got it (replay rebuilds the policy's models)
    MODEL_REGISTERED = "model.registered"
    NODE_REGISTERED = "node.registered"
    NODE_HEARTBEAT = "node.heartbeat"
    # the scheduler took the node for gone (heartbeat timeout)
    NODE_DOWN = "node.down"
    FETCH_STARTED = "fetch.started"
    FETCH_PROGRESS = "fetch.progress"
    FETCH_DONE = "fetch.done"
    FETCH_FAILED = "fetch.failed"
    # --- pipelines and consolidation (issue 4) ---
    # scheduler: every stage of a degree > 1 endpoint is ready ("neighbours ready"); the
    # stage-0 worker starts serving. data: {"degree": p, "stages": [PipelineStage, ...]}
    ENDPOINT_PIPELINE_READY = "endpoint.pipeline_ready"
    # scheduler: the full-size worker (always stage 0) is to take over the whole model.
    # data: ConsolidateCommand fields (degree, stages to fetch, partial worker ids)
    ENDPOINT_CONSOLIDATE = "endpoint.consolidate"
    # stage-0 worker: asked the other stages for the KV cache of its running sequences
    KV_HANDOVER = "kv.handover"
    # a partial stage sent its KV to the stage-0 worker (data: num_seqs, num_bytes)
    KV_EXPORTED = "kv.exported"
    # the stage-0 worker imported every stage's KV (data: num_seqs, num_bytes, pause_s)
    KV_MIGRATED = "kv.migrated"
    # the full-size worker now serves the whole model alone; the scheduler releases the
    # partial workers (worker.stop_requested) on this event
    WORKER_CONSOLIDATED = "worker.consolidated"
    # the full-size worker could not take over (data: error); the pipeline keeps serving
    CONSOLIDATION_FAILED = "worker.consolidation_failed"


class Event(Message):
    """The envelope of every state change, stored in the `HS_EVENTS` stream."""

    # unique; also the JetStream message id, so a re-published event is stored once
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    kind: str = Field(pattern=rf"^{EVENT_KIND.pattern}$")
    # unix time (s) of the change
    time: float = Field(default_factory=time.time)
    model: str | None = None
    endpoint_id: str | None = None
    worker_id: str | None = None
    node_id: str | None = None
    request_id: str | None = None
    # kind-specific facts, e.g. {"load_s": 1.2} for worker.ready
    data: dict[str, Any] = Field(default_factory=dict)


# --- commands (HS_COMMANDS, `hs.cmd.node.<node_id>`) and node reports -----------------------


class PlaceWorkerCommand(Message):
    """Fetch a stage of a model into the node's shared memory and launch its worker, at once.

    Idempotent: a node agent that already runs (or ran) `worker_id` does nothing again.
    """

    type: Literal["place_worker"] = "place_worker"
    # unique per command; a redelivered command carries the same id
    command_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    worker_id: str = Field(min_length=1)
    endpoint_id: str = Field(min_length=1)
    node_id: str = Field(min_length=1)
    model: str = Field(min_length=1)
    # pipeline degree and stage index of the partition to fetch (1, 0: the whole model)
    degree: int = Field(default=1, ge=1)
    stage: int = Field(default=0, ge=0)
    # decoder layers [start_layer, end_layer) the worker serves
    start_layer: int = Field(ge=0)
    end_layer: int = Field(ge=1)
    # GPU memory reserved for the worker (weights + KV cache)
    gpu_bytes: int = Field(ge=0)
    # sized for the whole model: the stage-0 worker that survives consolidation
    is_full_size: bool = True
    # True: fetch and launch at once, the worker loads behind the watermark (HydraServe and
    # `single_worker`). False: fetch the whole partition, then launch (`serverless_vllm`).
    overlap: bool = True
    # the model store the partition comes from; None: the node agent's own setting
    storage_url: str | None = None
    # the model's name in that store (`models.storage_path`); None: the same as `model`
    storage_model: str | None = None
    # unix time (s) the scheduler decided
    issued_at: float = Field(default_factory=time.time)


class StopWorkerCommand(Message):
    """Stop a worker: terminate its process, cancel its fetch, delete its shared memory.

    Idempotent: stopping a worker the node does not run only reports it stopped again.
    """

    type: Literal["stop_worker"] = "stop_worker"
    command_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    worker_id: str = Field(min_length=1)
    node_id: str = Field(min_length=1)
    issued_at: float = Field(default_factory=time.time)


class ConsolidateCommand(Message):
    """Fetch the layers a full-size worker lacks, so it can take over the whole model.

    Sent to the full-size (stage-0) worker's node agent, which pulls partitions
    `degree`/`stages` into shared memory next to the worker's own partition
    (`consolidation_partition(...)`), behind watermarks. The worker learns of it from the
    `endpoint.consolidate` event and loads those files as their bytes arrive. Idempotent.
    """

    type: Literal["consolidate"] = "consolidate"
    command_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    worker_id: str = Field(min_length=1)
    endpoint_id: str = Field(min_length=1)
    node_id: str = Field(min_length=1)
    model: str = Field(min_length=1)
    # the pipeline's degree, and the stages (of that degree's partitioning) to fetch
    degree: int = Field(ge=2)
    stages: list[int] = Field(min_length=1)
    # the workers of those stages, released once the consolidated worker serves alone
    partial_worker_ids: list[str] = Field(default_factory=list)
    storage_url: str | None = None
    storage_model: str | None = None
    issued_at: float = Field(default_factory=time.time)


class PipelineStage(Message):
    """One stage of a pipeline endpoint, in `endpoint.pipeline_ready`."""

    worker_id: str
    node_id: str
    stage: int = Field(ge=0)
    start_layer: int = Field(ge=0)
    end_layer: int = Field(ge=1)


def consolidation_partition(worker_partition: str | Path, degree: int, stage: int) -> Path:
    """Where a consolidating worker's node agent puts stage `stage` of a degree-`degree`
    partitioning: next to the worker's own partition file."""
    own = Path(worker_partition)
    return own.with_name(f"{own.stem}-d{degree}s{stage}.safetensors")


NodeCommand = Annotated[PlaceWorkerCommand | StopWorkerCommand | ConsolidateCommand,
                        Field(discriminator="type")]
_NODE_COMMAND: TypeAdapter[PlaceWorkerCommand | StopWorkerCommand | ConsolidateCommand] = \
    TypeAdapter(NodeCommand)


def parse_node_command(data: bytes) -> PlaceWorkerCommand | StopWorkerCommand | \
        ConsolidateCommand:
    """A command message from `hs.cmd.node.<id>` (raises pydantic.ValidationError)."""
    return _NODE_COMMAND.validate_json(data)


class NodeInfo(Message):
    """What a node agent says about its node: the data of node.registered / node.heartbeat."""

    node_id: str = Field(min_length=1)
    # "cpu" for an emulated node
    gpu_type: str = "cpu"
    gpu_memory_bytes: int = Field(ge=0)
    # the NIC share the node agent lets its fetches use
    nic_bandwidth_bytes_per_s: int = Field(ge=0)
    # worker ids running on the node
    worker_ids: list[str] = Field(default_factory=list)
    # partitions in the node's host-memory cache, as `<model>/<degree>/<stage>`: a worker of
    # one of them placed here starts without a fetch
    cached: list[str] = Field(default_factory=list)
