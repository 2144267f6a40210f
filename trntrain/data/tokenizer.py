"""Tokenizers from local files: the built-in byte-level one, a Hugging Face
`tokenizer.json`, a tiktoken BPE file. Nothing is downloaded.

`data.tokenizer` is `byte`, or the path of a `tokenizer.json` (or of a directory
holding one), or the path of a tiktoken file (lines of `<base64 token> <rank>`,
such as Llama 3's `tokenizer.model`). Every tokenizer encodes a document without
special tokens; the sources put `eot_id` between documents.
"""

from __future__ import annotations

import functools
import json
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

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # The fast variant skips the character offsets, which nothing here uses.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [np.asarray(e.ids, dtype=optimal_dtype(self.vocab_size))
                for e in encode(texts, add_special_tokens=False)]

    def decode(self, tokens: torch.Tensor | np.ndarray | list[int]) -> str:
        ids = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        return self._tok.decode(ids, skip_special_tokens=False)


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
