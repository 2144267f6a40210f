"""Tokenizers from local files against the libraries that define them: a Hugging Face
tokenizer.json through transformers, a tiktoken file through tiktoken itself."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from trntrain.data.tokenizer import (
    CL100K_PATTERN,
    TIKTOKEN_SPECIAL_TOKENS,
    ByteTokenizer,
    build_tokenizer,
)
from trntrain.errors import UserError

TEXTS = [
    "def train(model, steps=100):\n    return model.fit(steps)\n",
    "Tokenizers split text into ids; ids go back to text. ÄÖÜ é 漢字 🚀",
    "",
    "<|end_of_text|> is ordinary text inside a document",
]


def test_byte_tokenizer_is_utf8():
    tok = ByteTokenizer()
    ids = tok.encode(TEXTS[1])
    assert ids.tolist() == list(TEXTS[1].encode())
    assert tok.decode([*ids.tolist(), tok.eot_id]) == TEXTS[1]
    assert [a.tolist() for a in tok.encode_batch(TEXTS)] == [list(t.encode()) for t in TEXTS]


def test_hf_tokenizer_json_matches_transformers(hf_tokenizer_json):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(tokenizer_file=str(hf_tokenizer_json))
    tok = build_tokenizer(str(hf_tokenizer_json))
    for text, ids in zip(TEXTS, tok.encode_batch(TEXTS), strict=True):
        assert ids.tolist() == reference.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.vocab_size == len(reference)
    assert tok.eot_id == reference.convert_tokens_to_ids("</s>")
    # A directory holding tokenizer.json names it too; eot_token picks another special.
    assert build_tokenizer(str(hf_tokenizer_json.parent), "<s>").eot_id == \
        reference.convert_tokens_to_ids("<s>")


def test_hf_tokenizer_without_known_eot_asks_for_one(tmp_path, hf_tokenizer_json):
    data = json.loads(hf_tokenizer_json.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "</s>"]
    data["model"]["vocab"].pop("</s>")
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="set data.eot_token"):
        build_tokenizer(str(path))
    with pytest.raises(UserError, match="data.eot_token='<nope>' is not a token"):
        build_tokenizer(str(hf_tokenizer_json), "<nope>")


def write_tiktoken_file(path, merges: list[bytes]) -> dict[bytes, int]:
    ranks = {bytes([i]): i for i in range(256)}
    for m in merges:
        ranks[m] = len(ranks)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def test_tiktoken_file_matches_tiktoken(tmp_path):
    import tiktoken

    path = tmp_path / "tokenizer.model"
    ranks = write_tiktoken_file(path, [b"de", b"def", b" t", b"ra", b"in", b" train", b"\n "])
    tok = build_tokenizer(str(path))
    reference = tiktoken.Encoding("ref", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={})
    for text, ids in zip(TEXTS, tok.encode_batch(TEXTS), strict=True):
        assert ids.tolist() == reference.encode_ordinary(text)
        assert tok.decode(ids) == text
    assert tok.encode("def train").tolist() == [ranks[b"def"], ranks[b" train"]]
    # Llama 3's layout: the ranks, then 256 reserved specials, the second ends a text.
    assert tok.vocab_size == len(ranks) + TIKTOKEN_SPECIAL_TOKENS
    assert tok.eot_id == len(ranks) + 1
    # Special-token text inside a document stays text.
    assert len(tok.encode("<|end_of_text|>")) > 1


def test_bad_tokenizer_paths_are_clear(tmp_path):
    with pytest.raises(UserError, match="data.tokenizer='/nope': no such file"):
        build_tokenizer("/nope")
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        build_tokenizer(str(broken))
    garbage = tmp_path / "vocab.bin"
    garbage.write_bytes(np.arange(50, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match="neither a tokenizer.json nor a tiktoken file"):
        build_tokenizer(str(garbage))
