"""The corpus, the byte tokenizer and the step -> samples mapping, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import tiny_config
from trntrain.data import ByteTokenizer, StepBatches, build_data_source
from trntrain.data.base import is_validation
from trntrain.data.corpus import corpus_files
from trntrain.errors import UserError


def write_corpus(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é' * x\n"
    ids = tok.encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([*ids.tolist(), tok.eot_id]) == text


def test_corpus_streams_are_files_with_end_of_text(tmp_path):
    files = {f"pkg/mod{i}.py": f"x = {i}\n" * (i + 1) for i in range(40)}
    files["site-packages/third_party.py"] = "ignored = True\n"
    write_corpus(tmp_path, files)
    cfg = tiny_config(f"data.root={tmp_path}", "data.max_bytes=null", "train.seq_len=4",
                      "data.val_fraction=0.2")
    source = build_data_source(cfg)

    listed = [p.relative_to(tmp_path).as_posix() for p in corpus_files(tmp_path)]
    assert listed == sorted(f for f in files if not f.startswith("site-packages"))
    for split in ("train", "val"):
        names = [f for f in listed if is_validation(f, 0.2) == (split == "val")]
        expected = []
        for name in names:
            expected += [*files[name].encode(), 256]
        assert source._streams[split].tolist() == expected
    # Both splits are non-empty and held out by file.
    assert 0 < source.num_tokens("val") < source.num_tokens("train")


def test_windows_are_consecutive_slices(tmp_path):
    write_corpus(tmp_path, {f"m{i}.py": "abcdefghij" * 5 for i in range(20)})
    cfg = tiny_config(f"data.root={tmp_path}", "data.max_bytes=null", "train.seq_len=7",
                      "data.val_fraction=0.2")
    source = build_data_source(cfg)
    stream = source._streams["train"]
    assert source.num_samples("train") == (len(stream) - 1) // 7
    windows = source.windows("train", torch.tensor([0, 3]))
    assert windows.dtype == torch.int64
    assert windows[1].tolist() == stream[21:29].tolist()


def test_empty_corpus_is_a_clear_error(tmp_path):
    cfg = tiny_config(f"data.root={tmp_path}")
    with pytest.raises(UserError, match="data.root=.*holds no .py files"):
        build_data_source(cfg)
    cfg = tiny_config(f"data.root={tmp_path / 'missing'}")
    with pytest.raises(UserError, match="is not a directory"):
        build_data_source(cfg)


@pytest.fixture(scope="module")
def corpus_source():
    return build_data_source(tiny_config())


def test_max_bytes_reads_both_splits(corpus_source):
    total = corpus_source.num_tokens("train") + corpus_source.num_tokens("val")
    assert 200_000 <= total <= 200_000 + 2000  # bytes plus one end-of-text per file
    assert corpus_source.num_samples("val") > 0


def test_step_batches_shard_the_global_batch(corpus_source):
    full = StepBatches(corpus_source, "train", 8, 8, dp_rank=0, dp_size=1)
    for step in (0, 5):
        (x, y, *_), = full.step(step)
        assert x.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1])
        shards = []
        for rank in range(4):
            part = StepBatches(corpus_source, "train", 8, 1, dp_rank=rank, dp_size=4)
            micro = part.step(step)
            assert len(micro) == 2 and part.accumulation_steps == 2
            shards += [m[0] for m in micro]
        assert torch.equal(torch.cat(shards), x)


def test_epochs_visit_every_window_once_in_a_seeded_order(corpus_source):
    n = corpus_source.num_samples("train")
    windows = corpus_source.windows("train", torch.arange(n))
    sources = {seed: build_data_source(tiny_config(f"train.seed={seed}")) for seed in (7, 8)}

    def epoch(seed: int, step: int) -> torch.Tensor:
        (x, y, *_), = StepBatches(sources[seed], "train", n, n, 0, 1).step(step)
        return torch.cat([x, y[:, -1:]], dim=1)

    first, second = epoch(7, 0), epoch(7, 1)
    as_set = lambda t: sorted(map(tuple, t.tolist()))
    assert as_set(first) == as_set(windows) == as_set(second)
    assert not torch.equal(first, windows)
    assert not torch.equal(first, second)
    assert torch.equal(epoch(7, 0), first)
    # A source built afresh with the same seed orders the first epoch identically.
    fresh = build_data_source(tiny_config("train.seed=7"))
    (x, y, *_), = StepBatches(fresh, "train", n, n, 0, 1).step(0)
    assert fresh is not sources[7]
    assert torch.equal(torch.cat([x, y[:, -1:]], dim=1), first)
    assert not torch.equal(epoch(8, 0), first)


def test_validation_batches_are_fixed(corpus_source):
    val = StepBatches(corpus_source, "val", 8, 8, 0, 1, shuffle=False)
    (x, *_), = val.step(0)
    assert torch.equal(x, corpus_source.windows("val", torch.arange(8))[:, :-1])


def test_synthetic_source_covers_model_vocab():
    cfg = tiny_config("data=synthetic", "data.num_tokens=5000")
    source = build_data_source(cfg)
    tokens = torch.from_numpy(np.concatenate([source._streams["train"], source._streams["val"]]))
    assert len(tokens) == 5000
    assert tokens.max().item() < cfg.model.vocab_size and tokens.min().item() >= 0
    assert OmegaConf.select(cfg, "data.source") == "synthetic"
