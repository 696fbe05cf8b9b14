"""The worker's tokenizer against transformers' AutoTokenizer, and the incremental detokenizer.

Fixture folders are small tokenizers trained on the demo corpus in the layouts of the three
families: Llama-2 (SentencePiece-style byte fallback, LlamaTokenizer), OPT (GPT-2 byte-level,
`</s>` as BOS, GPT2Tokenizer) and Falcon (byte-level, no BOS, PreTrainedTokenizerFast), plus the
demo model (Llama-3-style byte-level with `<s>`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from services.worker.demo_model import CORPUS, write_demo_model
from services.worker.engine.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "The 7:42 to the coast leaves from platform nine; it is never on time.",
    "  two  spaces, a\ttab and\nnew lines\n\n",
    " leading space",
    "café naïve 東京 🐈 привет",
    "<s>[INST] special tokens inside text [/INST] ok </s><s>again",
    "a</s>b",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a river. "},
    {"role": "assistant", "content": "The Nile.", "tool_calls": None},
    {"role": "user", "content": "Another, with a café in Tōkyō 東京?"},
]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' -}}\n"
    "{% endif %}"
)
FALCON_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: "
    "{{ message['content'] | tojson }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _train_byte_level(special_tokens: list[str], vocab_size: int, pre: Any) -> Backend:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(True), trainer)
    return backend


def _train_sentencepiece_style() -> Backend:
    """Llama-2's tokenizer.json layout: legacy normalizer, byte-fallback BPE, <0xNN> tokens."""
    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,'▁"))
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  show_progress=False)
    backend.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer)
    data = json.loads(backend.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{i:02X}>": 3 + i for i in range(256)}
    for token, _ in sorted(data["model"]["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    data["model"]["vocab"] = vocab
    data["added_tokens"] = [{**t, "id": vocab[t["content"]]} for t in data["added_tokens"]]
    backend = Backend.from_str(json.dumps(data))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return backend


def _write_folder(folder: Path, backend: Backend, files: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    backend.save(str(folder / "tokenizer.json"))
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    opt = _train_byte_level(["<s>", "<pad>", "</s>", "<unk>"], 700,
                            pre_tokenizers.ByteLevel(add_prefix_space=False))
    opt.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)])
    falcon = _train_byte_level(
        [">>TITLE<<", ">>ABSTRACT<<", "<|endoftext|>"], 700,
        pre_tokenizers.Sequence([pre_tokenizers.Punctuation("contiguous"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False),
                                 pre_tokenizers.Digits(individual_digits=False)]))
    eos = {"content": "</s>", "lstrip": False, "rstrip": False, "normalized": True,
           "single_word": False, "__type": "AddedToken"}
    return {
        "demo": write_demo_model(root / "demo"),
        "llama2": _write_folder(root / "llama2", _train_sentencepiece_style(), {
            "config.json": {"model_type": "llama"},
            "tokenizer_config.json": {
                "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                "unk_token": "<unk>", "add_bos_token": True, "legacy": False},
        }),
        "opt": _write_folder(root / "opt", opt, {
            "config.json": {"model_type": "opt"},
            "tokenizer_config.json": {
                "tokenizer_class": "GPT2Tokenizer", "bos_token": eos, "eos_token": eos,
                "unk_token": eos, "pad_token": "<pad>", "add_bos_token": True},
            "generation_config.json": {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1},
            "chat_template.jinja": CHATML,
        }),
        "falcon": _write_folder(root / "falcon", falcon, {
            "config.json": {"model_type": "falcon"},
            "tokenizer_config.json": {
                "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                "add_prefix_space": False,
                "chat_template": [{"name": "default", "template": FALCON_TEMPLATE},
                                  {"name": "tool_use", "template": "{{ raise_exception('no') }}"}]},
            "generation_config.json": {"eos_token_id": [1, 2]},
        }),
    }


def _load(folders: dict[str, Path], name: str) -> tuple[Tokenizer, Any]:
    return (Tokenizer.from_model_dir(folders[name]),
            transformers.AutoTokenizer.from_pretrained(folders[name]))


@pytest.mark.parametrize("name", ["demo", "llama2", "opt", "falcon"])
def test_encode_equals_transformers_with_and_without_special_tokens(
        folders: dict[str, Path], name: str) -> None:
    ours, hf = _load(folders, name)
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf(
            text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("name", ["demo", "llama2", "opt", "falcon"])
def test_decode_equals_transformers_with_and_without_special_tokens(
        folders: dict[str, Path], name: str) -> None:
    ours, hf = _load(folders, name)
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), text


@pytest.mark.parametrize("name", ["demo", "llama2", "opt", "falcon"])
def test_vocab_size_and_bos_equal_transformers(folders: dict[str, Path], name: str) -> None:
    ours, hf = _load(folders, name)
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id


def test_opt_style_bos_is_the_eos_token_added_once(folders: dict[str, Path]) -> None:
    ours = Tokenizer.from_model_dir(folders["opt"])
    assert ours.bos_token_id == 2
    assert ours.encode("Hello")[0] == 2
    assert ours.encode("Hello")[1] != 2


def test_eos_ids_join_generation_config_and_tokenizer_config(folders: dict[str, Path]) -> None:
    falcon = Tokenizer.from_model_dir(folders["falcon"])
    assert falcon.eos_token_ids == frozenset({1, 2})  # <|endoftext|> is id 2 here
    assert Tokenizer.from_model_dir(folders["demo"]).eos_token_ids == frozenset({2})
    assert Tokenizer.from_model_dir(folders["opt"]).eos_token_ids == frozenset({2})


@pytest.mark.parametrize("name", ["demo", "opt", "falcon"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_exactly_like_transformers(
        folders: dict[str, Path], name: str, add_generation_prompt: bool) -> None:
    ours, hf = _load(folders, name)
    expected = hf.apply_chat_template(MESSAGES, tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt) \
        == expected


@pytest.mark.parametrize("name", ["demo", "opt", "falcon"])
def test_chat_prompt_ids_equal_transformers(folders: dict[str, Path], name: str) -> None:
    ours, hf = _load(folders, name)
    expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert ours.encode_chat(MESSAGES) == list(expected)


def test_demo_chat_template_places_one_bos_per_user_turn(folders: dict[str, Path]) -> None:
    ours = Tokenizer.from_model_dir(folders["demo"])
    ids = ours.encode_chat(MESSAGES)
    assert ids[0] == 1
    assert ids.count(1) == 2
    assert ours.apply_chat_template(MESSAGES[1:2]) == "<s>[INST] Name a river. [/INST]"


def test_template_raise_exception_becomes_a_tokenizer_error(folders: dict[str, Path]) -> None:
    ours = Tokenizer.from_model_dir(folders["demo"])
    bad_order = [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hi"}]
    with pytest.raises(TokenizerError, match="Conversation roles must alternate"):
        ours.apply_chat_template(bad_order)


def test_chat_prompt_for_a_model_without_template_names_the_model(
        folders: dict[str, Path]) -> None:
    ours = Tokenizer.from_model_dir(folders["llama2"])
    with pytest.raises(TokenizerError, match=r"llama2 has no chat template"):
        ours.encode_chat(MESSAGES)


def test_folder_without_tokenizer_json_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"missing tokenizer\.json"):
        Tokenizer.from_model_dir(tmp_path)


def _stream(tokenizer: Tokenizer, prompt: list[int], ids: list[int], **kwargs: Any,
            ) -> tuple[list[str], str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, prompt, **kwargs)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush(), detok


@pytest.mark.parametrize("name", ["demo", "opt", "falcon"])
def test_deltas_of_random_ids_concatenate_to_the_full_decode(
        folders: dict[str, Path], name: str) -> None:
    ours = Tokenizer.from_model_dir(folders[name])
    rng = random.Random(7)
    for _ in range(300):
        prompt = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(0, 12))]
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))]
        deltas, tail, detok = _stream(ours, prompt, ids)
        full = ours.decode(ids)
        assert "".join(deltas) + tail == full == detok.text
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("name", ["demo", "llama2", "opt", "falcon"])
def test_multibyte_text_streams_without_replacement_characters(
        folders: dict[str, Path], name: str) -> None:
    ours = Tokenizer.from_model_dir(folders[name])
    prompt = ours.encode("A word:")
    text = " café naïve 東京, привет 🐈🎉 — done"
    ids = ours.encode(text, add_special_tokens=False)
    deltas, tail, _ = _stream(ours, prompt, ids)
    assert "".join(deltas) + tail == text
    assert tail == ""
    assert not any("\ufffd" in d for d in deltas)


def test_a_character_split_over_byte_tokens_is_held_until_complete(
        folders: dict[str, Path]) -> None:
    ours = Tokenizer.from_model_dir(folders["demo"])
    ids = ours.encode("🐈", add_special_tokens=False)
    assert len(ids) > 1
    deltas, _, _ = _stream(ours, ours.encode("Cat:"), ids)
    assert deltas == [""] * (len(ids) - 1) + ["🐈"]


def test_flush_emits_an_incomplete_character_as_the_full_decode_does(
        folders: dict[str, Path]) -> None:
    ours = Tokenizer.from_model_dir(folders["demo"])
    ids = ours.encode("🐈", add_special_tokens=False)[:-1]
    deltas, tail, _ = _stream(ours, [], ids)
    assert deltas == [""] * len(ids)
    assert tail == ours.decode(ids) == "\ufffd"


def test_llama2_style_first_token_keeps_its_space_after_the_prompt(
        folders: dict[str, Path]) -> None:
    ours = Tokenizer.from_model_dir(folders["llama2"])
    prompt = ours.encode("The capital of France is")
    ids = ours.encode(" Paris.", add_special_tokens=False)
    _, _, detok = _stream(ours, prompt, ids)
    assert detok.text == " Paris."
    assert ours.decode(ids) == "Paris."


def test_stop_string_spanning_several_tokens_cuts_the_text_before_it(
        folders: dict[str, Path]) -> None:
    ours = Tokenizer.from_model_dir(folders["demo"])
    ids = ours.encode("The lighthouse keeper wrote in the logbook.", add_special_tokens=False)
    deltas, tail, detok = _stream(ours, [1], ids, stop=["in the log"])
    assert detok.text == "".join(deltas) == "The lighthouse keeper wrote "
    assert tail == ""
    assert detok.stopped
    assert detok.stop_reason == "in the log"
    assert detok.add(ids[0]) == ""


def test_stop_string_at_the_very_start_emits_nothing(folders: dict[str, Path]) -> None:
    ours = Tokenizer.from_model_dir(folders["demo"])
    ids = ours.encode("Stop here, please.", add_special_tokens=False)
    deltas, tail, detok = _stream(ours, [1], ids, stop=["Stop"])
    assert deltas == [""] * len(ids)
    assert (tail, detok.text, detok.stop_reason) == ("", "", "Stop")


def test_earliest_stop_string_in_the_text_wins(folders: dict[str, Path]) -> None:
    ours = Tokenizer.from_model_dir(folders["demo"])
    ids = ours.encode("one two three", add_special_tokens=False)
    _, _, detok = _stream(ours, [1], ids, stop=["three", "two"])
    assert (detok.text, detok.stop_reason) == ("one ", "two")


def test_text_that_may_begin_a_stop_string_is_held_until_it_cannot(
        folders: dict[str, Path]) -> None:
    ours = Tokenizer.from_model_dir(folders["demo"])
    detok = IncrementalDetokenizer(ours, [1], stop=["river!"])
    emitted = [detok.add(i) for i in ours.encode("The river", add_special_tokens=False)]
    assert "".join(emitted) == "The "
    rest = [detok.add(i) for i in ours.encode(" flows.", add_special_tokens=False)]
    assert "".join(emitted + rest) == "The river flows."
    assert not detok.stopped


def test_flush_emits_held_back_text_that_did_not_become_a_stop_string(
        folders: dict[str, Path]) -> None:
    ours = Tokenizer.from_model_dir(folders["demo"])
    ids = ours.encode("It ends with END", add_special_tokens=False)
    deltas, tail, detok = _stream(ours, [1], ids, stop=["END!", "\n\n"])
    assert "".join(deltas) == "It ends with "
    assert tail == "END"
    assert detok.text == "It ends with END"
    assert detok.stop_reason is None


def test_eos_text_is_kept_only_when_special_tokens_are_not_skipped(
        folders: dict[str, Path]) -> None:
    ours = Tokenizer.from_model_dir(folders["demo"])
    ids = [*ours.encode("Done.", add_special_tokens=False), 2]
    assert _stream(ours, [1], ids)[2].text == "Done."
    assert _stream(ours, [1], ids, skip_special_tokens=False)[2].text == "Done.</s>"


def test_template_helpers_render_like_transformers(folders: dict[str, Path]) -> None:
    ours, hf = _load(folders, "demo")
    template = (
        "{{ strftime_now('%Y') }}|{{ messages[1] | tojson }}|{{ messages[:2] | tojson(indent=1) }}|"
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.role }},"
        "{% endfor %}{% generation %}{{ eos_token }}{% endgeneration %}"
    )
    custom = Tokenizer(ours.backend, name="custom", special_tokens=ours.special_tokens,
                       eos_token_ids=ours.eos_token_ids, bos_token_id=ours.bos_token_id,
                       chat_template=template)
    expected = hf.apply_chat_template(MESSAGES, chat_template=template, tokenize=False)
    assert custom.apply_chat_template(MESSAGES, add_generation_prompt=False) == expected


def test_random_byte_fallback_ids_stream_without_errors(folders: dict[str, Path]) -> None:
    ours = Tokenizer.from_model_dir(folders["llama2"])
    rng = random.Random(3)
    for _ in range(300):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))]
        deltas, tail, _ = _stream(ours, [], ids)
        full = ours.decode(ids)
        # Byte-fallback decoding turns a valid byte into "\ufffd" when an invalid one follows
        # it, so only text without "\ufffd" is prefix-stable.
        if "\ufffd" not in full:
            assert "".join(deltas) + tail == full
