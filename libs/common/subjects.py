"""Every NATS subject, stream and consumer name, in one place.

- Requests: JetStream stream `HS_REQUESTS` (work-queue retention), one subject per model,
  `hs.req.<model>`. The gateway publishes; the workers of the model share one durable pull
  consumer, so each request goes to exactly one of them and is removed once acknowledged.
- Tokens back: core NATS, `hs.tok.<request_id>`; the gateway subscribes before it publishes.
- Events: JetStream stream `HS_EVENTS` (time-limited retention),
  `hs.evt.<entity>.<verb>.<model>` (`_` where an event concerns no model), so a consumer can
  filter by kind (`hs.evt.worker.ready.*`) or by model (`hs.evt.*.*.<model>`).
- Commands: JetStream stream `HS_COMMANDS`, `hs.cmd.node.<node_id>` / `hs.cmd.worker.<id>`.
- Pipeline data plane: core NATS, `hs.pipe.<endpoint_id>.<stage>` (`pipe_subject`); a stage's
  direct-socket address is asked for on `hs.pipe.<endpoint_id>.<stage>.addr`.

Names that come from users (model names such as `meta-llama/Llama-2-7b-chat-hf`, ids) may hold
characters a subject token cannot (`.`, `*`, `>`, whitespace) or a consumer name cannot (`/`).
`encode_token` maps any non-empty string to a token of `[A-Za-z0-9_-]` only, reversibly.
"""

from __future__ import annotations

import re
from typing import Literal

REQUESTS_STREAM = "HS_REQUESTS"
REQUESTS_PREFIX = "hs.req"
REQUESTS_SUBJECTS = f"{REQUESTS_PREFIX}.>"

TOKENS_PREFIX = "hs.tok"

EVENTS_STREAM = "HS_EVENTS"
EVENTS_PREFIX = "hs.evt"
EVENTS_SUBJECTS = f"{EVENTS_PREFIX}.>"
# the model token of an event about no model; `encode_token` never yields a lone "_"
NO_MODEL_TOKEN = "_"

COMMANDS_STREAM = "HS_COMMANDS"
COMMANDS_PREFIX = "hs.cmd"
COMMANDS_SUBJECTS = f"{COMMANDS_PREFIX}.>"

# What an event kind looks like: `<entity>.<verb>`, e.g. "worker.ready", "request.first_token".
EVENT_KIND = re.compile(r"[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_ESCAPE = re.compile(r"_([0-9A-F]{2})")


def encode_token(name: str) -> str:
    """`name` as one subject token: letters, digits and `-` stay, every other UTF-8 byte
    becomes `_XX` (upper-case hex), `_` itself included, so decoding is unambiguous.

    `meta-llama/Llama-2-7b` -> `meta-llama_2FLlama-2-7b`; `my model.v1` -> `my_20model_2Ev1`.
    """
    if not name:
        raise ValueError("a subject token needs a non-empty name")
    return "".join(chr(b) if b in _SAFE else f"_{b:02X}" for b in name.encode("utf-8"))


def decode_token(token: str) -> str:
    """The name `encode_token` turned into `token`."""
    if not token or any(c != "_" and ord(c) not in _SAFE for c in token):
        raise ValueError(f"{token!r} is not an encoded subject token")
    if "_" in _ESCAPE.sub("", token):
        raise ValueError(f"{token!r} has a `_` that does not start an `_XX` escape")
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), token).encode("latin-1").decode()


def request_subject(model: str) -> str:
    """Where requests for `model` are queued: `hs.req.<model token>`."""
    return f"{REQUESTS_PREFIX}.{encode_token(model)}"


def request_consumer(model: str) -> str:
    """The durable pull consumer that the workers of `model` share."""
    return f"workers-{encode_token(model)}"


def token_subject(request_id: str) -> str:
    """Where the chunks of one request's answer go: `hs.tok.<request id token>`."""
    return f"{TOKENS_PREFIX}.{encode_token(request_id)}"


def event_subject(kind: str, model: str | None = None) -> str:
    """`hs.evt.<entity>.<verb>.<model token or _>` for an event of `kind` ("worker.ready")."""
    if not EVENT_KIND.fullmatch(kind):
        raise ValueError(f"event kind {kind!r} is not of the form <entity>.<verb>")
    model_token = encode_token(model) if model else NO_MODEL_TOKEN
    return f"{EVENTS_PREFIX}.{kind}.{model_token}"


def event_filter(kind: str | None = None, model: str | None = None) -> str:
    """A subject filter over the events of one kind and/or one model (None: any)."""
    kind_part = kind if kind is not None else "*.*"
    model_part = encode_token(model) if model is not None else "*"
    return f"{EVENTS_PREFIX}.{kind_part}.{model_part}"


def command_subject(target: Literal["node", "worker"], target_id: str) -> str:
    """Commands for one node agent or one worker: `hs.cmd.<node|worker>.<id token>`."""
    return f"{COMMANDS_PREFIX}.{target}.{encode_token(target_id)}"


PIPE_PREFIX = "hs.pipe"


def pipe_subject(endpoint_id: str, stage: int) -> str:
    """The data-plane inbox of one stage of a pipeline endpoint: `hs.pipe.<endpoint>.<stage>`.

    Core NATS (no stream): activations flow stage s -> s + 1, sampled tokens and KV hand-over
    from every stage back to stage 0, whose inbox is stage 0's subject.
    """
    if stage < 0:
        raise ValueError(f"a stage index is >= 0, got {stage}")
    return f"{PIPE_PREFIX}.{encode_token(endpoint_id)}.{stage}"


def pipe_address_subject(endpoint_id: str, stage: int) -> str:
    """Where a stage answers with its data-plane socket's `host:port` (request-reply)."""
    return f"{pipe_subject(endpoint_id, stage)}.addr"
