"""Tokenizer and incremental detokenizer for HF model folders, without transformers.

`Tokenizer` reads `tokenizer.json` with the `tokenizers` library plus the sidecar JSON files and
reproduces what `transformers.AutoTokenizer` (v5) does with them: ids, decoding, chat templates.
`IncrementalDetokenizer` turns one sequence's generated ids into text deltas for streaming,
holding back incomplete UTF-8 and anything that may still become a stop string.
jinja2 is imported only when a chat template is first rendered: it is not on the start-up path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.decoders import DecodeStream

from libs.common.errors import InvalidRequestError

logger = logging.getLogger(__name__)


class TokenizerError(InvalidRequestError):
    """A model folder's tokenizer is missing or unusable, or cannot render a chat prompt."""


class Tokenizer:
    """One model's tokenizer: encode, decode and chat-template rendering."""

    def __init__(self, backend: Backend, *, name: str, special_tokens: dict[str, str],
                 eos_token_ids: frozenset[int], bos_token_id: int | None,
                 chat_template: str | None) -> None:
        self.backend = backend
        self.name = name
        # bos_token/eos_token/... -> their text, passed to chat templates as variables
        self.special_tokens = special_tokens
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template

    @classmethod
    def from_model_dir(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise TokenizerError(f"{folder}: missing tokenizer.json (the tokenizers-library file)")
        tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
        try:
            backend = Backend.from_str(tokenizer_json)
        except Exception as exc:  # the Rust side raises plain Exception
            raise TokenizerError(f"{folder}/tokenizer.json does not load: {exc}") from exc
        # transformers turns off the truncation and padding a tokenizer.json may carry.
        backend.no_truncation()
        backend.no_padding()
        config = _read_json(folder / "tokenizer_config.json")
        model_config = _read_json(folder / "config.json")
        tokenizer_class = str(config.get("tokenizer_class") or model_config.get("tokenizer_class")
                              or "").removesuffix("Fast")
        _rebuild_like_transformers(backend, tokenizer_class, config, tokenizer_json)

        # Every "*_token" entry (bos/eos/unk/pad/... and model-specific ones) is a special token
        # to transformers: matched whole in text, skipped in decoding, a chat-template variable.
        special_tokens: dict[str, str] = {}
        for key, value in config.items():
            if key.endswith("_token") and (token := _added_token(value)) is not None:
                special_tokens[key] = token.content
                backend.add_special_tokens([token])
        generation = _read_json(folder / "generation_config.json")
        generation_eos = generation.get("eos_token_id")
        eos_ids = list(generation_eos) if isinstance(generation_eos, list) else [generation_eos]
        eos_ids.append(backend.token_to_id(special_tokens.get("eos_token", "")))
        bos_id = backend.token_to_id(special_tokens.get("bos_token", ""))
        if bos_id is None and isinstance(generation.get("bos_token_id"), int):
            bos_id = generation["bos_token_id"]
        return cls(backend, name=str(folder), special_tokens=special_tokens,
                   eos_token_ids=frozenset(i for i in eos_ids if isinstance(i, int)),
                   bos_token_id=bos_id, chat_template=_find_chat_template(folder, config))

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included (len(AutoTokenizer))."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            add_generation_prompt: bool = True) -> str:
        """Render a chat prompt exactly as transformers' `apply_chat_template(tokenize=False)`."""
        if self.chat_template is None:
            raise TokenizerError(f"model {self.name} has no chat template; use a text prompt")
        import jinja2

        # transformers drops None-valued keys (OpenAI clients send content=None, tool_calls=None).
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return _compile(self.chat_template).render(
                messages=plain, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except (jinja2.TemplateError, TypeError) as exc:
            # TypeError: messages the template cannot handle, e.g. content parts where it
            # concatenates strings. Both are the request's fault, not the server's.
            raise TokenizerError(f"chat template of {self.name} failed: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, Any]], *,
                    add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids of a chat; the template itself places BOS, so none is added here."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _added_token(value: object) -> AddedToken | None:
    """A special token from tokenizer_config: a string, or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = ("single_word", "lstrip", "rstrip", "normalized")
        return AddedToken(value["content"], special=True,
                          **{k: bool(value[k]) for k in flags if k in value})
    return None


def _rebuild_like_transformers(backend: Backend, tokenizer_class: str, config: dict[str, Any],
                               tokenizer_json: str) -> None:
    """Match the pipelines transformers 5 rebuilds for some classes, ignoring tokenizer.json's.

    LlamaTokenizer (Llama-2, Mistral): for SentencePiece-style files it drops the "legacy"
    normalizer (Prepend + Replace) for a Metaspace pre-tokenizer, so no extra "▁" follows a
    special token. GPT2Tokenizer (OPT): ByteLevel pre-tokenizer and decoder, no normalizer.
    """
    add_prefix_space = config.get("add_prefix_space")
    if tokenizer_class == "LlamaTokenizer" and '"ByteLevel"' not in tokenizer_json:
        add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        scheme = "never" if not add_prefix_space else (
            "always" if config.get("legacy", False) else "first")
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme=scheme, split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        backend.decoder = decoders.Sequence(steps)
    elif tokenizer_class == "GPT2Tokenizer":
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(add_prefix_space))
        backend.decoder = decoders.ByteLevel()


def _find_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja (newer layout) wins over tokenizer_config's, as in transformers."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


@cache
def _compile(template: str) -> Any:
    """The chat-template environment of transformers' `_compile_jinja_template`."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for HF's masks; it renders
        # its body unchanged.
        tags = {"generation"}  # noqa: RUF012 (jinja2's own class attribute)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_render_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render_body(self, caller: Callable[[], str]) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # Unlike jinja2's own filter this does not HTML-escape, as in transformers.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"chat template does not parse: {exc}") from exc


class IncrementalDetokenizer:
    """Text deltas of one sequence's generated ids, with OpenAI-style stop strings.

    Text follows the prompt's last tokens, as in vLLM: a Llama-2 "▁Paris" after a prompt gives
    " Paris". Byte-level tokenizers (Llama-3, OPT, Falcon, the demo model) give deltas whose
    concatenation, `flush()` included, equals `decode(generated_ids)`. A character split over
    several tokens is held until complete. Text that may still become a stop string is held
    until it cannot; on a stop the text is cut just before it and nothing more is emitted.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], *,
                 skip_special_tokens: bool = True, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stops = tuple(s for s in stop if s)
        # Every proper prefix of a stop string: a text tail equal to one of them is held back.
        self._stop_prefixes = {s[:i] for s in self._stops for i in range(1, len(s))}
        self._max_held = max((len(s) - 1 for s in self._stops), default=0)
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        # The ids of the stream's last emitted piece and those it holds since, mirrored to
        # emit at flush() what it still holds back.
        self._window_ids: list[int] = []
        self._held_ids: list[int] = []
        for token_id in _clean_context(tokenizer, prompt_ids, skip_special_tokens):
            self._step(token_id)
        self._pending = ""
        self._parts: list[str] = []
        self.stop_reason: str | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._parts)

    def add(self, token_id: int) -> str:
        """Take one generated id; return the text now safe to emit (often "")."""
        if self.stopped:
            return ""
        piece = self._step(token_id)
        return self._emit(piece) if piece else ""

    def flush(self) -> str:
        """At the end of generation: emit what was held back and did not become a stop string."""
        if self.stopped:
            return ""
        out = ""
        if self._held_ids:
            # Bytes that never completed a character decode as "\ufffd", as in a full decode.
            skip = self._skip_special_tokens
            base = self._tokenizer.decode(self._window_ids, skip_special_tokens=skip)
            full = self._tokenizer.decode([*self._window_ids, *self._held_ids],
                                          skip_special_tokens=skip)
            self._held_ids = []
            out = self._emit(full[len(base):])
        if not self.stopped and self._pending:
            out += self._pending
            self._parts.append(self._pending)
            self._pending = ""
        return out

    def _step(self, token_id: int) -> str | None:
        try:
            piece = self._stream.step(self._tokenizer.backend, token_id)
        except Exception as exc:  # tokenizers raises plain Exception
            # Invalid byte-fallback sequences can decode to text that is not an extension of
            # the text before them ("Invalid prefix encountered"); restart from this token.
            if "Invalid prefix" not in str(exc):
                raise
            logger.debug("decode stream reset at token %d: %s", token_id, exc)
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            self._window_ids, self._held_ids = [], []
            piece = self._stream.step(self._tokenizer.backend, token_id)
        if piece is None:
            self._held_ids.append(token_id)
        else:
            self._window_ids, self._held_ids = [*self._held_ids, token_id], []
        return piece

    def _emit(self, piece: str) -> str:
        text = self._pending + piece
        if not self._stops:
            self._parts.append(text)
            self._pending = ""
            return text
        hits = [(i, len(s), s) for s in self._stops if (i := text.find(s)) >= 0]
        if hits:
            start, _, self.stop_reason = min(hits)
            out, self._pending = text[:start], ""
        else:
            held = next((k for k in range(min(len(text), self._max_held), 0, -1)
                         if text[-k:] in self._stop_prefixes), 0)
            out, self._pending = text[:len(text) - held], text[len(text) - held:]
        self._parts.append(out)
        return out


def _clean_context(tokenizer: Tokenizer, prompt_ids: Sequence[int],
                   skip_special_tokens: bool) -> list[int]:
    """The shortest prompt tail of 4 to 24 ids that decodes to whole characters, else none."""
    for n in range(min(4, len(prompt_ids)), min(len(prompt_ids), 24) + 1):
        tail = list(prompt_ids[-n:])
        if "\ufffd" not in tokenizer.decode(tail, skip_special_tokens=skip_special_tokens):
            return tail
    return []
