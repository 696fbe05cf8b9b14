"""OpenAI response bodies and stream chunks, for text completions and chat completions.

The shapes follow OpenAI's API exactly (`logprobs: null` included), so the official clients
parse them: a whole answer, the chunks of a stream, and with `stream_options.include_usage`
a `"usage": null` on every chunk plus a last chunk with empty `choices` and the usage.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from libs.common.messages import Usage

DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class ResponseContext:
    request_id: str
    # unix time (s), OpenAI's `created`
    created: int
    model: str
    include_usage: bool = False


@dataclass
class Answer:
    """A whole answer, collected from its chunks."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None


class ResponseFormat:
    """What a text completion and a chat completion differ in."""

    id_prefix: str
    object_name: str
    chunk_object_name: str

    def new_id(self) -> str:
        return f"{self.id_prefix}{uuid.uuid4().hex}"

    def full(self, ctx: ResponseContext, answer: Answer) -> dict[str, Any]:
        usage = answer.usage.model_dump() if answer.usage else None
        return {"id": ctx.request_id, "object": self.object_name, "created": ctx.created,
                "model": ctx.model, "choices": [self.full_choice(answer)], "usage": usage}

    def first_chunks(self, ctx: ResponseContext) -> list[dict[str, Any]]:
        return []

    def text_chunk(self, ctx: ResponseContext, text: str,
                   finish_reason: str | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def last_chunks(self, ctx: ResponseContext, text: str,
                    finish_reason: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def usage_chunk(self, ctx: ResponseContext, usage: Usage) -> dict[str, Any]:
        return {"id": ctx.request_id, "object": self.chunk_object_name, "created": ctx.created,
                "model": ctx.model, "choices": [], "usage": usage.model_dump()}

    def full_choice(self, answer: Answer) -> dict[str, Any]:
        raise NotImplementedError

    def _chunk(self, ctx: ResponseContext, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = {"id": ctx.request_id, "object": self.chunk_object_name,
                 "created": ctx.created, "model": ctx.model, "choices": [choice]}
        if ctx.include_usage:
            chunk["usage"] = None
        return chunk


class CompletionFormat(ResponseFormat):
    id_prefix = "cmpl-"
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def full_choice(self, answer: Answer) -> dict[str, Any]:
        return {"index": 0, "text": answer.text, "logprobs": None,
                "finish_reason": answer.finish_reason}

    def text_chunk(self, ctx: ResponseContext, text: str,
                   finish_reason: str | None = None) -> dict[str, Any]:
        return self._chunk(ctx, {"index": 0, "text": text, "logprobs": None,
                                 "finish_reason": finish_reason})

    def last_chunks(self, ctx: ResponseContext, text: str,
                    finish_reason: str) -> list[dict[str, Any]]:
        # OpenAI sends the last piece of text together with the finish reason
        return [self.text_chunk(ctx, text, finish_reason)]


class ChatFormat(ResponseFormat):
    id_prefix = "chatcmpl-"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def full_choice(self, answer: Answer) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": answer.text},
                "logprobs": None, "finish_reason": answer.finish_reason}

    def first_chunks(self, ctx: ResponseContext) -> list[dict[str, Any]]:
        return [self._delta(ctx, {"role": "assistant", "content": ""})]

    def text_chunk(self, ctx: ResponseContext, text: str,
                   finish_reason: str | None = None) -> dict[str, Any]:
        return self._delta(ctx, {"content": text}, finish_reason)

    def last_chunks(self, ctx: ResponseContext, text: str,
                    finish_reason: str) -> list[dict[str, Any]]:
        # OpenAI ends a chat stream with an empty delta that carries the finish reason
        chunks = [self.text_chunk(ctx, text)] if text else []
        return [*chunks, self._delta(ctx, {}, finish_reason)]

    def _delta(self, ctx: ResponseContext, delta: dict[str, Any],
               finish_reason: str | None = None) -> dict[str, Any]:
        return self._chunk(ctx, {"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish_reason})


COMPLETION = CompletionFormat()
CHAT = ChatFormat()
