"""The warm request path end to end: the `openai` client -> gateway -> NATS -> a warm worker
-> tokens back, for completions and chat completions, streamed and not; and the OpenAI error
objects for bad requests."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import nats
import openai
import pytest

from libs.common.bus import ensure_request_consumer
from libs.common.messages import GenerateRequest, TokenChunk
from libs.common.subjects import REQUESTS_STREAM, token_subject

if TYPE_CHECKING:
    from services.worker.engine.engine import Completion, LLMEngine
    from tests.e2e.conftest import WarmStack

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"
CHAT = [{"role": "system", "content": "You tell stories."},
        {"role": "user", "content": "Tell me a story"}]


def reference(engine: LLMEngine, max_tokens: int, *, prompt: str | list[int] | None = None,
              messages: list[dict[str, str]] | None = None) -> Completion:
    """The engine's own greedy answer, computed in this process."""
    from services.worker.engine.engine import Completion
    from services.worker.engine.sequence import SamplingParams

    engine.add_request("reference", prompt, SamplingParams(max_tokens=max_tokens,
                                                           temperature=0.0), messages=messages)
    result = Completion("reference")
    while engine.has_unfinished():
        for out in engine.step():
            result.token_ids += out.new_token_ids
            result.text += out.text
            result.prompt_tokens = out.prompt_tokens
            result.finish_reason = out.finish_reason
    return result


@pytest.fixture
def client(warm_stack: WarmStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{warm_stack.base_url}/v1", api_key=warm_stack.user_key,
                         max_retries=0, timeout=30)


def post(stack: WarmStack, path: str, body: Any, *, key: str | None = "user",
         raw: bytes | None = None) -> httpx.Response:
    """POST as the user (key="user"), with another key, or with none (key=None)."""
    key = stack.user_key if key == "user" else key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{stack.base_url}{path}", content=content, timeout=30,
                      headers={**headers, "Content-Type": "application/json"})


def test_completion_text_and_usage_equal_the_engines_greedy_answer(
    client: openai.OpenAI, warm_stack: WarmStack, reference_engine: LLMEngine,
) -> None:
    expected = reference(reference_engine, 20, prompt=PROMPT)

    response = client.completions.create(model=warm_stack.model, prompt=PROMPT,
                                         max_tokens=20, temperature=0)

    assert response.id.startswith("cmpl-") and response.model == warm_stack.model
    assert (response.choices[0].text, response.choices[0].finish_reason) == (
        expected.text, "length")
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens,
            response.usage.total_tokens) == (expected.prompt_tokens, 20,
                                             expected.prompt_tokens + 20)


def test_completion_of_a_token_id_prompt_equals_the_engines_answer_to_those_ids(
    client: openai.OpenAI, warm_stack: WarmStack, reference_engine: LLMEngine,
) -> None:
    prompt_ids = [1, 300, 301, 302, 303]
    expected = reference(reference_engine, 12, prompt=prompt_ids)

    response = client.completions.create(model=warm_stack.model, prompt=prompt_ids,
                                         max_tokens=12, temperature=0)

    assert response.choices[0].text == expected.text
    assert response.usage is not None and response.usage.prompt_tokens == len(prompt_ids)


def test_streamed_completion_concatenates_to_the_greedy_answer_and_ends_with_usage(
    client: openai.OpenAI, warm_stack: WarmStack, reference_engine: LLMEngine,
) -> None:
    expected = reference(reference_engine, 20, prompt=PROMPT)

    chunks = list(client.completions.create(
        model=warm_stack.model, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))

    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        expected.prompt_tokens, 20)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_chat_completion_answers_with_the_greedy_reply_to_the_chat_template(
    client: openai.OpenAI, warm_stack: WarmStack, reference_engine: LLMEngine,
) -> None:
    expected = reference(reference_engine, 16, messages=CHAT)

    response = client.chat.completions.create(
        model=warm_stack.model, messages=CHAT, max_completion_tokens=16,  # type: ignore[arg-type]
        temperature=0)

    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    message = response.choices[0].message
    assert (message.role, message.content) == ("assistant", expected.text)
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (
        expected.prompt_tokens, len(expected.token_ids))


def test_streamed_chat_sends_role_then_content_then_finish_then_usage_then_done(
    warm_stack: WarmStack, reference_engine: LLMEngine,
) -> None:
    expected = reference(reference_engine, 16, messages=CHAT)
    body = {"model": warm_stack.model, "messages": CHAT, "max_tokens": 16, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}

    response = post(warm_stack, "/v1/chat/completions", body)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(event.startswith("data: {") for event in events[:-2])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
    assert content == expected.text
    assert (chunks[-2]["choices"][0]["delta"], chunks[-2]["choices"][0]["finish_reason"]) == (
        {}, expected.finish_reason)
    assert (chunks[-1]["choices"], chunks[-1]["usage"]) == ([], {
        "prompt_tokens": expected.prompt_tokens, "completion_tokens": len(expected.token_ids),
        "total_tokens": expected.prompt_tokens + len(expected.token_ids)})
    assert {c["id"] for c in chunks} == {response.headers["x-request-id"]}


def test_models_lists_the_configured_models_for_the_admin_key(warm_stack: WarmStack) -> None:
    response = httpx.get(f"{warm_stack.base_url}/v1/models",
                         headers={"Authorization": f"Bearer {warm_stack.admin_key}"})

    assert response.status_code == 200
    assert sorted(m["id"] for m in response.json()["data"]) == sorted(
        [warm_stack.model, warm_stack.idle_model, warm_stack.stalled_model])


# stands for the served model in a bad request's body
SERVED = "<served model>"


@dataclass(frozen=True)
class BadRequest:
    body: dict[str, Any] | None
    status: int
    message_start: str
    param: str | None
    code: str | None
    # sent instead of `body` when set
    raw: bytes | None = None
    # "user": the user's key; None: no Authorization header
    key: str | None = "user"

    def send(self, stack: WarmStack) -> httpx.Response:
        body = {k: stack.model if v == SERVED else v for k, v in (self.body or {}).items()}
        return post(stack, "/v1/completions", body, key=self.key, raw=self.raw)


BAD_REQUESTS = {
    "malformed json": BadRequest(None, 400, "We could not parse the JSON body", None, None,
                                 raw=b'{"model": "x", "prompt": '),
    "unknown model": BadRequest({"model": "no/such-model", "prompt": "hi"}, 404,
                                "The model `no/such-model` does not exist", "model",
                                "model_not_found"),
    "missing key": BadRequest({"model": SERVED, "prompt": "hi"}, 401,
                              "You didn't provide an API key", None, "invalid_api_key",
                              key=None),
    "wrong key": BadRequest({"model": SERVED, "prompt": "hi"}, 401,
                            "Incorrect API key provided: sk-...6789", None, "invalid_api_key",
                            key="sk-wrong-0123456789"),
    "temperature above 2": BadRequest({"model": SERVED, "prompt": "hi", "temperature": 5}, 400,
                                      "Input should be less than or equal to 2", "temperature",
                                      None),
    "two choices": BadRequest({"model": SERVED, "prompt": "hi", "n": 2}, 400,
                              "only n=1 is supported", "n", None),
    "logprobs": BadRequest({"model": SERVED, "prompt": "hi", "logprobs": 2}, 400,
                           "logprobs are not supported", "logprobs", None),
    "prompt longer than the context": BadRequest(
        {"model": SERVED, "prompt": "tale " * 2100, "max_tokens": 4}, 400,
        "this model's maximum context length is 2048 tokens", "prompt",
        "context_length_exceeded"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_its_status_and_an_openai_error_object(
    warm_stack: WarmStack, case: str,
) -> None:
    bad = BAD_REQUESTS[case]

    response = bad.send(warm_stack)

    assert response.status_code == bad.status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"].startswith(bad.message_start), error["message"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error", bad.param, bad.code)
    assert response.headers["x-request-id"].startswith(("req-", "cmpl-"))


def test_openai_client_raises_typed_errors_for_an_unknown_model_and_a_wrong_key(
    client: openai.OpenAI, warm_stack: WarmStack,
) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="no/such-model", prompt="hi")
    wrong_key = client.with_options(api_key="sk-wrong-0123456789")
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        wrong_key.chat.completions.create(model=warm_stack.model,
                                          messages=[{"role": "user", "content": "hi"}])

    assert (not_found.value.status_code, not_found.value.code) == (404, "model_not_found")
    assert (unauthorized.value.status_code, unauthorized.value.code) == (401, "invalid_api_key")


def test_model_without_a_worker_gets_503_with_retry_after_once_the_timeout_passes(
    warm_stack: WarmStack,
) -> None:
    response = post(warm_stack, "/v1/completions",
                    {"model": warm_stack.idle_model, "prompt": "hi"})

    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"
    assert response.json()["error"]["type"] == "server_error"
    assert response.json()["error"]["code"] == "service_unavailable"


@pytest.mark.anyio
async def test_stream_that_stalls_after_its_first_token_ends_with_an_error_event_and_done(
    nats_url: str, warm_stack: WarmStack,
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    consumer = await ensure_request_consumer(js, warm_stack.stalled_model, ack_wait_s=30,
                                             max_deliver=1)
    psub = await js.pull_subscribe_bind(durable=consumer, stream=REQUESTS_STREAM)

    async def worker_that_goes_silent() -> None:
        (msg,) = await psub.fetch(1, timeout=10)
        request = GenerateRequest.model_validate_json(msg.data)
        chunk = TokenChunk(request_id=request.request_id, seq=0, text="Hi", token_ids=[5])
        await nc.publish(token_subject(request.request_id), chunk.model_dump_json().encode())
        await msg.ack()

    try:
        silent_worker = asyncio.create_task(worker_that_goes_silent())
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.post(
                f"{warm_stack.base_url}/v1/completions",
                headers={"Authorization": f"Bearer {warm_stack.user_key}"},
                json={"model": warm_stack.stalled_model, "prompt": "hi", "stream": True})
        await silent_worker
    finally:
        await nc.close()

    events = response.text.split("\n\n")
    assert response.status_code == 200
    assert events[-2:] == ["data: [DONE]", ""]
    text_chunk, error = (json.loads(event.removeprefix("data: ")) for event in events[:-2])
    assert (text_chunk["choices"][0]["text"], text_chunk["choices"][0]["finish_reason"]) == (
        "Hi", None)
    assert error["error"]["message"].startswith("The model stopped answering for 2s")
    assert (error["error"]["type"], error["error"]["code"]) == (
        "server_error", "service_unavailable")


def test_gateway_keeps_serving_after_every_kind_of_bad_request(
    client: openai.OpenAI, warm_stack: WarmStack, reference_engine: LLMEngine,
) -> None:
    statuses = [bad.send(warm_stack).status_code for bad in BAD_REQUESTS.values()]
    expected = reference(reference_engine, 8, prompt=PROMPT)

    response = client.completions.create(model=warm_stack.model, prompt=PROMPT,
                                         max_tokens=8, temperature=0)

    assert statuses == [bad.status for bad in BAD_REQUESTS.values()]
    assert response.choices[0].text == expected.text
