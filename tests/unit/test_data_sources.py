"""The file sources (jsonl, text, hf, indexed), blending, and which samples each rank
reads, against streams and counts computed here by hand."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from trntrain.config import validate
from trntrain.data import StepBatches, build_data_source
from trntrain.data.base import is_validation
from trntrain.data.blend import BLOCK, blend_entries
from trntrain.data.indexed import IndexedDatasetWriter
from trntrain.distributed import World
from trntrain.errors import UserError

EOT = 256
DOCS = [f"document {i}: " + "lorem ipsum dolor " * (i % 7 + 1) for i in range(60)]


def expected_streams(keys: list[str], texts: list[str], val_fraction: float) -> dict:
    out: dict[str, list[int]] = {"train": [], "val": []}
    for key, text in zip(keys, texts, strict=True):
        out["val" if is_validation(key, val_fraction) else "train"] += [*text.encode(), EOT]
    return out


def streams(source) -> dict[str, list[int]]:
    return {s: source._streams[s].tolist() for s in ("train", "val")}


def write_jsonl(path, texts: list[str], bad: dict[int, str] | None = None) -> list[str]:
    """Writes one JSON object per line; returns each document's key (name@byte offset)."""
    keys, offset, lines = [], 0, []
    for i, text in enumerate(texts):
        if bad and i in bad:
            lines.append(bad[i] + "\n")
            offset += len(lines[-1].encode())
        line = json.dumps({"text": text, "id": i}) + "\n"
        keys.append(f"{path.name}@{offset}")
        lines.append(line)
        offset += len(line.encode())
    path.write_text("".join(lines))
    return keys


def test_jsonl_documents_end_with_eot_and_split_by_key(tmp_path):
    keys = write_jsonl(tmp_path / "a.jsonl", DOCS)
    cfg = tiny_config("data=jsonl", f"data.path={tmp_path / 'a.jsonl'}", "data.val_fraction=0.2",
                      "train.seq_len=16")
    source = build_data_source(cfg)
    assert streams(source) == expected_streams(keys, DOCS, 0.2)
    assert 0 < source.num_tokens("val") < source.num_tokens("train")


def test_malformed_jsonl_line_fails_or_is_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "a.jsonl"
    keys = write_jsonl(path, DOCS, bad={3: "{broken", 10: '{"title": "no text"}'})
    cfg = tiny_config("data=jsonl", f"data.path={path}", "train.seq_len=16")
    with pytest.raises(UserError, match=rf"{path}:4: not valid JSON.*data.on_bad_line=skip"):
        build_data_source(cfg)
    cfg = tiny_config("data=jsonl", f"data.path={path}", "train.seq_len=16",
                      "data.on_bad_line=skip")
    with caplog.at_level("WARNING"):
        source = build_data_source(cfg)
    assert streams(source) == expected_streams(keys, DOCS, 0.02)
    assert f"skipped 2 malformed line(s), the first at {path}:4" in caplog.text


def test_text_files_are_documents(tmp_path):
    for i, text in enumerate(DOCS[:30]):
        (tmp_path / f"doc{i:02d}.txt").write_text(text)
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    cfg = tiny_config("data=text", f"data.path={tmp_path}", "train.seq_len=16",
                      "data.val_fraction=0.2")
    keys = [str(tmp_path / f"doc{i:02d}.txt") for i in range(30)]
    assert streams(build_data_source(cfg)) == expected_streams(keys, DOCS[:30], 0.2)


def test_missing_and_empty_paths_are_clear(tmp_path):
    with pytest.raises(UserError, match="data.path='/no/such.jsonl' names no"):
        build_data_source(tiny_config("data=jsonl", "data.path=/no/such.jsonl"))
    with pytest.raises(UserError, match="data.path is not set"):
        build_data_source(tiny_config("data=jsonl"))
    with pytest.raises(UserError, match="data.path=None is invalid"):
        validate(tiny_config("data=indexed"), 1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("hf")
    ds = datasets.Dataset.from_dict({"text": DOCS, "ids": [[i, i + 1, i + 2] for i in
                                                            range(len(DOCS))]})
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds, "other": ds.select(range(5))}).save_to_disk(
        str(root / "dict"))
    (root / "parquet").mkdir()
    ds.select(range(30)).to_parquet(str(root / "parquet" / "part0.parquet"))
    ds.select(range(30, 60)).to_parquet(str(root / "parquet" / "part1.parquet"))
    return root


@pytest.mark.parametrize("where", ["saved", "dict", "parquet"])
def test_hf_dataset_on_disk(hf_dir, where):
    cfg = tiny_config("data=hf", f"data.path={hf_dir / where}", "train.seq_len=16",
                      "data.val_fraction=0.2")
    keys = [str(i) for i in range(len(DOCS))]
    assert streams(build_data_source(cfg)) == expected_streams(keys, DOCS, 0.2)


def test_hf_token_column_is_read_as_is(hf_dir):
    cfg = tiny_config("data=hf", f"data.path={hf_dir / 'saved'}", "data.tokens_key=ids",
                      "train.seq_len=4", "data.val_fraction=0.2")
    expected: dict[str, list[int]] = {"train": [], "val": []}
    for i in range(len(DOCS)):
        expected["val" if is_validation(str(i), 0.2) else "train"] += [i, i + 1, i + 2]
    assert streams(build_data_source(cfg)) == expected


def test_hf_bad_column_and_split_are_clear(hf_dir):
    with pytest.raises(UserError, match="data.text_key='body' is not a column.*'text'"):
        build_data_source(tiny_config("data=hf", f"data.path={hf_dir / 'saved'}",
                                      "data.text_key=body"))
    with pytest.raises(UserError, match=r"data.split='test' is not a split.*\['other', 'train'\]"):
        build_data_source(tiny_config("data=hf", f"data.path={hf_dir / 'dict'}",
                                      "data.split=test"))


def write_indexed(prefix, documents: list[list[int]], dtype=np.uint16) -> None:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            writer.add_document(doc)


def test_indexed_source_holds_out_the_last_documents(tmp_path):
    docs = [[d * 10 + k for k in range(d % 5 + 3)] + [EOT] for d in range(50)]
    write_indexed(tmp_path / "ds", docs)
    cfg = tiny_config("data=indexed", f"data.path={tmp_path / 'ds'}", "data.val_fraction=0.1",
                      "train.seq_len=4")
    source = build_data_source(cfg)
    flat = lambda ds: [t for d in ds for t in d]
    assert streams(source) == {"train": flat(docs[:45]), "val": flat(docs[45:])}
    window = source.windows("train", torch.tensor([2]))
    assert window.tolist() == [flat(docs[:45])[8:13]]


def test_indexed_token_beyond_the_vocabulary_is_caught_on_read(tmp_path):
    write_indexed(tmp_path / "ds", [[1, 2, 3, 5000] * 20] * 4)
    cfg = tiny_config("data=indexed", f"data.path={tmp_path / 'ds'}", "data.val_fraction=0.25",
                      "train.seq_len=8")
    batches = StepBatches(build_data_source(cfg), "train", 8, 8, 0, 1,
                          vocab_size=cfg.model.vocab_size)
    with pytest.raises(UserError, match=rf"{tmp_path / 'ds'}.*token id 5000 in the train split "
                       rf"is outside model.vocab_size={cfg.model.vocab_size}"):
        batches.step(0)


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    """Three datasets whose tokens tell them apart: source d holds ids [100 d, 100 d + 50)."""
    root = tmp_path_factory.mktemp("blend")
    gen = np.random.default_rng(0)
    for d, n_docs in enumerate((40, 25, 60)):
        docs = [gen.integers(100 * d, 100 * d + 50, size=gen.integers(20, 60)).tolist()
                for _ in range(n_docs)]
        write_indexed(root / f"s{d}", docs)
    return root


def blend_config(root, weights, *extra):
    entries = ",".join(f"{{weight:{w},path:{root / f's{d}'}}}" for d, w in enumerate(weights))
    return tiny_config("data=indexed", f"data.path={root / 's0'}", f"data.blend=[{entries}]",
                       "train.seq_len=8", *extra)


@pytest.mark.parametrize("weights", [(0.7, 0.3, None), (0.5, 0.3, 0.2), (1, 1, 6)])
def test_blend_proportions_within_one_percent(three_sources, weights):
    weights = [w for w in weights if w is not None]
    source = build_data_source(blend_config(three_sources, weights))
    total = sum(weights)
    for start in (0, 123_457, BLOCK - 5000):
        windows = source.samples("train", torch.arange(start, start + 10_000))
        counts = Counter((windows[:, 0] // 100).tolist())
        for d, w in enumerate(weights):
            assert abs(counts[d] / 10_000 - w / total) < 0.01, (start, counts)


def test_blend_reads_each_source_in_its_own_order(three_sources):
    cfg = blend_config(three_sources, [0.5, 0.3, 0.2])
    blend = build_data_source(cfg)
    again = build_data_source(cfg)
    windows = blend.samples("train", torch.arange(5000))
    assert torch.equal(windows, again.samples("train", torch.arange(5000)))
    source_of = windows[:, 0] // 100
    for d, component in enumerate(blend.components):
        mine = windows[source_of == d]
        # The k-th sample dealt to source d is that source's own k-th sample.
        assert torch.equal(mine, component.samples("train", torch.arange(len(mine))))


def test_blend_entries_are_checked(three_sources):
    with pytest.raises(UserError, match=r"data.blend\[1\].weight=-1 is invalid"):
        validate(blend_config(three_sources, [1, -1]), 1)
    bad_key = tiny_config("data=indexed", f"data.path={three_sources / 's0'}",
                          "data.blend=[{weight:1,pathh:x}]")
    with pytest.raises(UserError, match=r"data.blend\[0\].pathh is not a key of data source "
                       r"indexed; valid keys"):
        validate(bad_key, 1)
    mixed = tiny_config("data=indexed", f"data.path={three_sources / 's0'}",
                        "data.blend=[{weight:1},{weight:1,source:corpus,max_bytes:100000}]",
                        "train.seq_len=8")
    validate(mixed, 1)
    source = build_data_source(mixed)
    assert [c.cfg.source for c in source.components] == ["indexed", "corpus"]
    # A key the enclosing source leaves null (indexed's tokenizer) keeps the entry's default.
    with_jsonl = tiny_config("data=indexed", "data.blend=[{weight:1,path:a},"
                             "{weight:1,source:jsonl,path:b.jsonl,on_bad_line:skip}]")
    (_, indexed), (_, jsonl) = blend_entries(with_jsonl.data)
    assert (indexed.source, indexed.path, indexed.tokenizer) == ("indexed", "a", None)
    assert (jsonl.source, jsonl.path, jsonl.tokenizer, jsonl.on_bad_line) == (
        "jsonl", "b.jsonl", "byte", "skip")


def test_dp_ranks_read_disjoint_shares_that_cover_each_step(three_sources):
    source = build_data_source(tiny_config("data=indexed", f"data.path={three_sources / 's2'}",
                                           "train.seq_len=8"))
    n = source.num_samples("train")
    whole = StepBatches(source, "train", 16, 16, 0, 1)
    seen = []
    for step in range(n // 16):
        (x, y, *_), = whole.step(step)
        parts = [StepBatches(source, "train", 16, 2, rank, 4).step(step) for rank in range(4)]
        assert torch.equal(torch.cat([mb[0] for part in parts for mb in part]), x)
        assert torch.equal(torch.cat([mb[1] for part in parts for mb in part]), y)
        # A tp peer (the same dp rank) reads the very same batch.
        tp_peer = StepBatches(source, "train", 16, 2, 1, 4).step(step)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(parts[1], tp_peer, strict=True))
        seen += torch.cat([x, y[:, -1:]], 1).tolist()
    # Within the first epoch no window is read twice.
    every = set(map(tuple, source.windows("train", torch.arange(n)).tolist()))
    assert len(set(map(tuple, seen))) == len(seen) == n // 16 * 16
    assert set(map(tuple, seen)) <= every


def test_pipeline_stages_read_only_what_they_use(three_sources):
    source = build_data_source(tiny_config("data=indexed", f"data.path={three_sources / 's0'}",
                                           "train.seq_len=8"))
    full = StepBatches(source, "train", 8, 4, 0, 1).step(3)
    first = StepBatches(source, "train", 8, 4, 0, 1, labels=False).step(3)
    last = StepBatches(source, "train", 8, 4, 0, 1, inputs=False).step(3)
    middle = StepBatches(source, "train", 8, 4, 0, 1, inputs=False, labels=False).step(3)
    for (x, y, *_), (fx, fy, *_), (lx, ly, *_), (mx, my, *_) in zip(
            full, first, last, middle, strict=True):
        assert torch.equal(fx, x) and torch.equal(ly, y)
        assert fy.numel() == lx.numel() == mx.numel() == my.numel() == 0


@pytest.mark.parametrize("blended", [False, True])
def test_resume_continues_at_the_recorded_position(tmp_path, three_sources, blended):
    """A run resumed with another global batch size reads on from the sample where the
    first run stopped, not from step x new batch size (one source, or a blend)."""
    from trntrain.trainer import Trainer

    indexed = f"source:indexed,val_fraction:0.2,path:{three_sources / 's2'}"
    data = (f"data.blend=[{{weight:0.6,{indexed}}},{{weight:0.4}}]",) if blended else ()
    common = ("checkpoint=dcp", "train.max_steps=3", "checkpoint.every=3", *data)
    first = Trainer(tiny_config(*common), World(), run_dir=tmp_path)
    first.fit()
    consumed = first.train_batches.consumed_samples(3)
    assert consumed == 3 * 8
    second = Trainer(tiny_config(*common, "train.global_batch_size=16", "train.max_steps=5"),
                     World(), run_dir=tmp_path)
    assert second.resume_step() == 3
    (x, y, *_), = second.train_batches.step(3)
    expected = second.data.samples("train", torch.arange(consumed, consumed + 16))
    assert torch.equal(torch.cat([x, y[:, -1:]], 1), expected)
    # The uninterrupted run with the first batch size would have read the same samples.
    straight = StepBatches(first.data, "train", 8, 8, 0, 1)
    assert torch.equal(x[:8], straight.step(3)[0][0])
    # ... and its steps 3 and 4 together are exactly the resumed step-3 batch of 16.
    (x3, y3, *_), = straight.step(3)
    (x4, y4, *_), = straight.step(4)
    assert torch.equal(x, torch.cat([x3, x4])) and torch.equal(y, torch.cat([y3, y4]))
