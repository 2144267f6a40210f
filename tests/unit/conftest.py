"""Fixtures of the unit tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny models run in milliseconds on one, while a
    thread pool on a shared 2-core machine makes them seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hf_tokenizer_json(tmp_path_factory):
    """A small byte-level BPE tokenizer.json trained here (nothing is downloaded), with
    <s> and </s> as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = ["def train(model, steps=100):\n    return model.fit(steps)\n",
             "Tokenizers split text into ids; ids go back to text. ÄÖÜ é 漢字 🚀"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts * 20, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path
