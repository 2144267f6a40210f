"""Tokenizers from local files: the built-in byte-level one, a Hugging Face
`tokenizer.json`, a tiktoken BPE file. Nothing is downloaded.

`data.tokenizer` is `byte`, or the path of a `tokenizer.json` (or of a directory
holding one), or the path of a tiktoken file (lines of `<base64 token> <rank>`,
such as Llama 3's `tokenizer.model`). Every tokenizer encodes a document without
special tokens; the sources put `eot_id` between documents.

Chat data (`data.source=chat`, docs/fine-tuning.md) renders conversations with a
tokenizer's `chat_template()`: the byte tokenizer's built-in one, or the template of a
Hugging Face tokenizer directory (chat_template.jinja, or tokenizer_config.json's
`chat_template`), which renders through `transformers`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from trntrain.data.indexed import optimal_dtype
from trntrain.errors import UserError

# The split pattern of tiktoken's cl100k_base, which Llama 3 uses unchanged.
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3 reserves 256 special tokens after the BPE ranks; the second ends a text.
TIKTOKEN_SPECIAL_TOKENS = 256
# Tried in order when data.eot_token is null.
EOT_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eot_id|>")


class Tokenizer:
    """What a source needs: the id range, the end-of-text id, and text to ids."""

    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` (the narrowest dtype for the vocabulary), without special
        tokens."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor | np.ndarray | list[int]) -> str:
        raise NotImplementedError

    def chat_template(self) -> ChatTemplate:
        """How conversations render to tokens (UserError where the tokenizer has none)."""
        raise UserError(f"data.tokenizer={self.name!r} has no chat template; valid for chat "
                        f"data: byte (its built-in template) or a Hugging Face tokenizer "
                        f"directory with a chat template.")


class ByteTokenizer(Tokenizer):
    """Token i < 256 is byte i of the UTF-8 text; 256 ends a document."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, data: bytes | str) -> np.ndarray:
        """Token ids (uint8, a view of the bytes) of `data`, without an end-of-text token."""
        return np.frombuffer(data.encode("utf-8") if isinstance(data, str) else data,
                             dtype=np.uint8)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, tokens: torch.Tensor | np.ndarray | list[int]) -> str:
        ids = tokens.tolist() if hasattr(tokens, "tolist") else tokens
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def chat_template(self) -> ChatTemplate:
        return ByteChatTemplate()


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, through the `tokenizers` library."""

    def __init__(self, path: Path, eot_token: str | None) -> None:
        tokenizers = _import("tokenizers", path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - the library's errors name no file
            raise UserError(f"data.tokenizer={str(path)!r} is not a readable Hugging Face "
                            f"tokenizer.json ({err}).") from None
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.eot_id = _eot_id(vocab, eot_token, path)
        self._chat: ChatTemplate | None = None

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # The fast variant skips the character offsets, which nothing here uses.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [np.asarray(e.ids, dtype=optimal_dtype(self.vocab_size))
                for e in encode(texts, add_special_tokens=False)]

    def decode(self, tokens: torch.Tensor | np.ndarray | list[int]) -> str:
        ids = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        return self._tok.decode(ids, skip_special_tokens=False)

    def chat_template(self) -> ChatTemplate:
        if self._chat is None:
            self._chat = HFChatTemplate(Path(self.name), self.vocab_size)
        return self._chat


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE file with cl100k's split pattern and Llama 3's special tokens:
    ranks 0..n-1 are BPE tokens, n..n+255 are reserved, n+1 ends a text."""

    def __init__(self, path: Path, eot_token: str | None) -> None:
        tiktoken = _import("tiktoken", path)
        from tiktoken.load import load_tiktoken_bpe

        try:
            ranks = load_tiktoken_bpe(str(path))
        except Exception as err:  # noqa: BLE001
            raise UserError(f"data.tokenizer={str(path)!r} is neither a tokenizer.json nor a "
                            f"tiktoken file of '<base64 token> <rank>' lines ({err}).") from None
        n = len(ranks)
        special = {"<|begin_of_text|>": n, "<|end_of_text|>": n + 1}
        special.update({f"<|reserved_special_token_{i}|>": n + i
                        for i in range(2, TIKTOKEN_SPECIAL_TOKENS)})
        self._enc = tiktoken.Encoding(name=path.name, pat_str=CL100K_PATTERN,
                                      mergeable_ranks=ranks, special_tokens=special)
        self.name = str(path)
        self.vocab_size = n + TIKTOKEN_SPECIAL_TOKENS
        self.eot_id = _eot_id(special, eot_token, path)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # Special-token text in a document is ordinary text, never a control token.
        return [np.asarray(ids, dtype=optimal_dtype(self.vocab_size))
                for ids in self._enc.encode_ordinary_batch(texts, num_threads=1)]

    def decode(self, tokens: torch.Tensor | np.ndarray | list[int]) -> str:
        ids = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        return self._enc.decode(ids)


def _import(module: str, path: Path):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"data.tokenizer={str(path)!r} needs the {module!r} package: "
                        f"pip install 'trntrain[hf]'.") from None


def _eot_id(vocab: dict[str, int], eot_token: str | None, path: Path) -> int:
    if eot_token is not None:
        if eot_token not in vocab:
            raise UserError(f"data.eot_token={eot_token!r} is not a token of {path}; valid: "
                            f"one of its special tokens, e.g. {_specials(vocab)}.")
        return vocab[eot_token]
    for candidate in EOT_CANDIDATES:
        if candidate in vocab:
            return vocab[candidate]
    raise UserError(f"{path} has none of the usual end-of-text tokens {list(EOT_CANDIDATES)}; "
                    f"set data.eot_token to the token that separates documents, e.g. one of "
                    f"{_specials(vocab)}.")


def _specials(vocab: dict[str, int]) -> list[str]:
    return sorted((t for t in vocab if t.startswith("<") and t.endswith(">")),
                  key=vocab.get)[:5]


def build_tokenizer(spec: str, eot_token: str | None = None) -> Tokenizer:
    """The tokenizer `data.tokenizer` names: byte, a tokenizer.json or a tiktoken file.
    Loaded once per process and file version: validation, the sources and `prepare`'s
    forked workers share it."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"data.tokenizer={spec!r}: no such file; valid: byte, the path of a "
                        f"Hugging Face tokenizer.json (or its directory), or of a tiktoken file.")
    stat = path.stat()
    return _load(spec, path.resolve(), stat.st_mtime_ns, stat.st_size, eot_token)


@functools.lru_cache(maxsize=8)
def _load(spec: str, path: Path, mtime_ns: int, size: int, eot_token: str | None) -> Tokenizer:
    with path.open("rb") as f:
        is_json = f.read(1) == b"{"
    if is_json:
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"data.tokenizer={spec!r} is not valid JSON ({err}); valid: a "
                            f"Hugging Face tokenizer.json.") from None
        return HFTokenizer(path, eot_token)
    return TiktokenTokenizer(path, eot_token)


# -- chat templates ----------------------------------------------------------------------------

# The markers of the byte tokenizer's built-in template: plain bytes, and the end-of-text
# id 256 ends each assistant turn (the token a model trained on it stops generating at).
BYTE_CHAT_HEADER = "<|{role}|>\n"
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                      "cls_token", "mask_token")


class ChatError(ValueError):
    """A conversation its chat template cannot render (a one-line reason; the chat
    source names the file and line)."""


class ChatTemplate:
    """Conversations (lists of {role, content}) to token ids and the mask of the tokens
    the template marks as the assistant's."""

    description: str
    # The tokens a reply ends at (what generation stops at).
    stop_ids: tuple[int, ...] = ()

    def render(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, bool mask of the assistant's tokens), both of one length; raises
        ChatError."""
        raise NotImplementedError

    def prompt(self, messages: list[dict]) -> np.ndarray:
        """The token ids of `messages` followed by the start of an assistant turn: what a
        model continues to reply."""
        raise NotImplementedError


class ByteChatTemplate(ChatTemplate):
    """`<|role|>\\n` then the content; a system or user turn ends with a newline, an
    assistant turn with the end-of-text token 256. The assistant's content and its 256
    are its tokens. As Jinja (`{% generation %}` marking the assistant's tokens):

        {% for m in messages %}<|{{ m.role }}|>\\n{% if m.role == 'assistant' %}
        {% generation %}{{ m.content }}<256>{% endgeneration %}{% else %}{{ m.content }}\\n
        {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\\n{% endif %}
    """

    description = "the byte tokenizer's built-in template"
    stop_ids = (ByteTokenizer.eot_id,)

    def render(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        ids: list[int] = []
        mask: list[bool] = []
        for m in messages:
            head = BYTE_CHAT_HEADER.format(role=m["role"]).encode()
            body = list(m["content"].encode("utf-8"))
            ids += head
            mask += [False] * len(head)
            if m["role"] == "assistant":
                ids += [*body, ByteTokenizer.eot_id]
                mask += [True] * (len(body) + 1)
            else:
                ids += [*body, ord("\n")]
                mask += [False] * (len(body) + 1)
        return np.asarray(ids, dtype=np.uint16), np.asarray(mask, dtype=bool)

    def prompt(self, messages: list[dict]) -> np.ndarray:
        head = np.frombuffer(BYTE_CHAT_HEADER.format(role="assistant").encode(), np.uint8)
        return np.concatenate([self.render(messages)[0], head.astype(np.uint16)])


def hf_chat_template(tokenizer_json: Path) -> tuple[str, str, dict]:
    """(template, where it was found, tokenizer_config.json) of the directory holding a
    tokenizer.json: its chat_template.jinja, else tokenizer_config.json's `chat_template`
    (a string, or a list of named templates: the one named default)."""
    directory = tokenizer_json.parent
    config_path = directory / "tokenizer_config.json"
    config: dict = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{config_path} is not valid JSON ({err}); valid: a Hugging Face "
                            f"tokenizer_config.json.") from None
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja), config
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template, f"{config_path} (chat_template)", config
    raise UserError(f"data.tokenizer={str(tokenizer_json)!r}: {directory} has no chat template "
                    f"(neither chat_template.jinja nor a chat_template in tokenizer_config.json); "
                    f"valid for chat data: a tokenizer directory with one (add a "
                    f"chat_template.jinja), or data.tokenizer=byte and its built-in template.")


class HFChatTemplate(ChatTemplate):
    """A Hugging Face chat template, rendered through `transformers` as
    `apply_chat_template` renders it (its Jinja environment, the special tokens of
    tokenizer_config.json as variables; control tokens in the content stay control
    tokens, as there).

    The assistant's tokens: where the template marks them with `{% generation %}`,
    transformers' `return_assistant_tokens_mask`. Otherwise they are found by rendering
    prefixes: the text of the conversation up to assistant turn i followed by the
    generation prompt (`add_generation_prompt=True`) and the text through turn i
    (without it); the characters between the two, in the rendering of the whole
    conversation, are turn i's, and every token overlapping them is marked. This needs
    each prefix to render as a prefix of the whole conversation (else a ChatError asks
    for generation tags), and counts as the assistant's whatever the template writes
    after the turn's end-of-turn token and before the next message (such as a newline).
    """

    def __init__(self, tokenizer_json: Path, vocab_size: int) -> None:
        self.template, self.origin, config = hf_chat_template(tokenizer_json)
        self.tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.generation = bool(GENERATION_TAG.search(self.template))
        how = "{% generation %} marks" if self.generation else "prefix rendering"
        self.description = f"the chat template of {self.origin} (assistant tokens: {how})"
        self.specials = {}
        for key in SPECIAL_TOKEN_KEYS:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                self.specials[key] = value
        self._tok = None

    @property
    def tokenizer(self):
        """The `transformers` tokenizer of the tokenizer.json (built on first use)."""
        if self._tok is None:
            _import("transformers", self.tokenizer_json)
            from transformers import PreTrainedTokenizerFast

            self._tok = PreTrainedTokenizerFast(tokenizer_file=str(self.tokenizer_json),
                                                **self.specials)
            self._tok.chat_template = self.template
            self.stop_ids = tuple(i for i in (self._tok.eos_token_id,) if i is not None)
        return self._tok

    def render(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        tok = self.tokenizer
        with rendering(self.origin):
            if self.generation:
                out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
                ids, mask = out["input_ids"], out["assistant_masks"]
            else:
                ids, mask = self._by_prefixes(messages)
        return (np.asarray(ids, dtype=optimal_dtype(self.vocab_size)),
                np.asarray(mask, dtype=bool).reshape(-1))

    def prompt(self, messages: list[dict]) -> np.ndarray:
        with rendering(self.origin):
            text = self._text(messages, generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=optimal_dtype(self.vocab_size))

    def _text(self, messages: list[dict], generation_prompt: bool) -> str:
        if messages:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt)
        # transformers refuses an empty conversation; its renderer renders one.
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[[]], chat_template=self.template,
            add_generation_prompt=generation_prompt, **self.tokenizer.special_tokens_map)
        return rendered[0]

    def _by_prefixes(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        full = self._text(messages, generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._text(messages[:i], generation_prompt=True)
            through = self._text(messages[:i + 1], generation_prompt=False)
            if not (through.startswith(before) and full.startswith(through)):
                raise ChatError(
                    f"the chat template of {self.origin} does not render the conversation up "
                    f"to its assistant turn {i} as the start of the whole, so that turn's "
                    f"tokens cannot be found by prefix rendering; valid: a template that "
                    f"marks the assistant's tokens with {{% generation %}}...{{% endgeneration %}}")
            spans.append((len(before), len(through)))
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], span_mask(enc["offset_mapping"], spans)


@contextlib.contextmanager
def rendering(origin: str) -> Iterator[None]:
    """A template's errors as a ChatError (the conversation's fault), or a UserError
    naming the template where it is not valid Jinja."""
    import jinja2

    try:
        yield
    except ChatError:
        raise
    except jinja2.TemplateSyntaxError as err:
        raise UserError(f"{origin}: the chat template is not valid Jinja (line {err.lineno} of "
                        f"the template: {err.message}).") from None
    except Exception as err:  # noqa: BLE001 - a template may raise anything
        why = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ChatError(f"the chat template of {origin} fails to render it "
                        f"({type(err).__name__}{': ' + why if why else ''})") from None


def span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token (character offsets) that overlaps one of the ordered character
    spans: the rule of transformers' return_assistant_tokens_mask."""
    mask = [0] * len(offsets)
    span = 0
    for i, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if end > spans[span][0]:
            mask[i] = 1
    return mask
