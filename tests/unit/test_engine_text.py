"""Text in and out of the engine: tokenization, chat prompts, streaming text and stop strings,
on the demo model (a real BPE tokenizer and chat template)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.worker.demo_model import write_demo_model
from services.worker.engine.engine import LLMEngine, generate
from services.worker.engine.sequence import SamplingParams

pytestmark = pytest.mark.unit

PROMPT = "The old lighthouse keeper"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    folder = write_demo_model(tmp_path_factory.mktemp("demo") / "model", seed=3)
    engine = LLMEngine.from_model_dir(Path(folder))
    engine.load()
    return engine


def greedy(max_tokens: int = 40, **extra: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          **extra)  # type: ignore[arg-type]


def test_streamed_text_equals_the_decoded_tokens_and_usage_counts_tokens(
    engine: LLMEngine,
) -> None:
    assert engine.tokenizer is not None
    result = generate(engine, [PROMPT], greedy())[0]
    assert result.prompt_tokens == len(engine.tokenizer.encode(PROMPT))
    assert len(result.token_ids) == 40
    assert result.text == engine.tokenizer.decode(result.token_ids)
    assert result.finish_reason == "length"


def test_a_stop_string_ends_the_text_just_before_it(engine: LLMEngine) -> None:
    full = generate(engine, [PROMPT], greedy())[0].text
    stop = full[10:13]
    cut = full.index(stop)
    engine.add_request("s", PROMPT, greedy(stop=[stop]))
    text, last = "", None
    while engine.has_unfinished():
        for out in engine.step():
            text += out.text
            last = out
    assert text == full[:cut]
    assert last is not None and last.finished
    assert (last.finish_reason, last.stop_reason) == ("stop", stop)


def test_chat_messages_go_through_the_models_chat_template(engine: LLMEngine) -> None:
    assert engine.tokenizer is not None
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    seq = engine.add_request("chat", None, greedy(4), messages=messages)
    assert seq.prompt_token_ids == engine.tokenizer.encode_chat(messages)
    rendered = engine.tokenizer.apply_chat_template(messages)
    assert "Tell me about rivers." in rendered
    engine.abort("chat")


def test_eos_ends_a_request_with_stop_unless_ignored(engine: LLMEngine) -> None:
    assert engine.tokenizer is not None
    tokens = generate(engine, [PROMPT], greedy())[0].token_ids
    eos = tokens[7]
    # Pretend the 8th greedy token is EOS: the engine must stop there and emit no text for it.
    original = engine.tokenizer.eos_token_ids
    engine.tokenizer.eos_token_ids = frozenset({eos})
    try:
        result = generate(engine, [PROMPT], SamplingParams(temperature=0.0, max_tokens=40))[0]
    finally:
        engine.tokenizer.eos_token_ids = original
    first = tokens.index(eos)
    assert result.token_ids == tokens[:first + 1]
    assert result.finish_reason == "stop"
    assert result.text == engine.tokenizer.decode(tokens[:first])
