"""The Megatron indexed dataset (.bin + .idx): bytes checked by hand, bad files refused,
atomic writes, merging, and both directions against Megatron-Core when it is installed."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from trntrain.data.indexed import (
    DTYPES,
    MAGIC,
    IndexedDataset,
    IndexedDatasetWriter,
    dtype_code,
    merge,
    optimal_dtype,
)
from trntrain.errors import UserError

# Three documents: two sequences, one, two.
SEQUENCES = [[1, 2, 3], [4], [5, 6, 7, 8], [9], [10, 11]]
DOCUMENT_INDICES = [0, 2, 3, 5]
DOCUMENTS = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]


def index_bytes(code: int, lengths: list[int], pointers: list[int], docs: list[int],
                version: int = 1, magic: bytes = MAGIC, modes: list[int] | None = None) -> bytes:
    n = len(lengths)
    out = magic + struct.pack("<QBQQ", version, code, n, len(docs))
    out += struct.pack(f"<{n}i", *lengths) + struct.pack(f"<{n}q", *pointers)
    out += struct.pack(f"<{len(docs)}q", *docs)
    if modes is not None:
        out += struct.pack(f"<{n}b", *modes)
    return out


EXAMPLE_IDX = index_bytes(8, [3, 1, 4, 1, 2], [0, 6, 8, 16, 18], DOCUMENT_INDICES)
EXAMPLE_BIN = struct.pack("<11H", *range(1, 12))


def write_example(tmp_path, idx: bytes = EXAMPLE_IDX, bin_: bytes = EXAMPLE_BIN) -> str:
    prefix = str(tmp_path / "ds")
    with open(prefix + ".idx", "wb") as f:
        f.write(idx)
    with open(prefix + ".bin", "wb") as f:
        f.write(bin_)
    return prefix


def write_example_with_writer(prefix, dtype=np.uint16) -> None:
    with IndexedDatasetWriter(prefix, dtype) as w:
        w.add_sequence(SEQUENCES[0])
        w.add_sequence(np.array(SEQUENCES[1]))
        w.end_document()
        w.add_document(SEQUENCES[2])
        w.add_document(SEQUENCES[3] + SEQUENCES[4], lengths=[1, 2])


def read_bytes(prefix) -> tuple[bytes, bytes]:
    with open(f"{prefix}.idx", "rb") as i, open(f"{prefix}.bin", "rb") as b:
        return i.read(), b.read()


# --- the format, by hand ---------------------------------------------------------------

def test_writer_produces_the_hand_built_bytes(tmp_path):
    write_example_with_writer(tmp_path / "ds")
    assert read_bytes(tmp_path / "ds") == (EXAMPLE_IDX, EXAMPLE_BIN)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]


def test_reads_a_hand_built_dataset(tmp_path):
    ds = IndexedDataset(write_example(tmp_path))
    assert ds.dtype == np.uint16
    assert (len(ds), ds.num_documents, ds.num_tokens) == (5, 3, 11)
    assert ds.sequence_lengths.tolist() == [3, 1, 4, 1, 2]
    assert ds.sequence_pointers.tolist() == [0, 6, 8, 16, 18]
    assert ds.document_indices.tolist() == DOCUMENT_INDICES
    assert ds.sequence_modes is None
    assert [ds[i].tolist() for i in range(len(ds))] == SEQUENCES
    assert ds[-1].tolist() == [10, 11]
    assert [s.tolist() for s in ds[1:3]] == SEQUENCES[1:3]
    assert [ds.document(d).tolist() for d in range(3)] == DOCUMENTS
    assert ds.document(-1).tolist() == DOCUMENTS[-1]
    assert ds.get(2, offset=1).tolist() == [6, 7, 8]
    assert ds.get(2, offset=1, length=2).tolist() == [6, 7]
    assert ds.get(2, offset=4).tolist() == []
    assert ds.tokens.tolist() == list(range(1, 12))
    assert isinstance(ds.tokens, np.memmap)
    # Views of the mapped file, not copies.
    assert not ds[2].flags.owndata and not ds[2].flags.writeable
    assert np.shares_memory(ds[2], ds.tokens)


def test_out_of_range_access_raises_index_error(tmp_path):
    ds = IndexedDataset(write_example(tmp_path))
    for bad in (lambda: ds[5], lambda: ds[-6], lambda: ds.document(3),
                lambda: ds.get(0, offset=2, length=2), lambda: ds.get(0, offset=-1)):
        with pytest.raises(IndexError):
            bad()


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_every_dtype_round_trips(tmp_path, code):
    dtype = DTYPES[code]
    write_example_with_writer(tmp_path / "ds", dtype)
    idx, bin_ = read_bytes(tmp_path / "ds")
    assert idx[17] == code == dtype_code(dtype)
    assert bin_ == np.arange(1, 12, dtype=dtype.newbyteorder("<")).tobytes()
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.dtype == dtype
    assert [ds[i].tolist() for i in range(len(ds))] == SEQUENCES
    assert ds.sequence_pointers.tolist() == (np.array([0, 3, 4, 8, 9]) * dtype.itemsize).tolist()


def test_megatron_dtype_codes():
    names = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64",
             7: "float32", 8: "uint16"}
    assert {code: d.name for code, d in DTYPES.items()} == names
    with pytest.raises(UserError, match="uint16"):
        dtype_code(np.float16)


def test_optimal_dtype_follows_megatron():
    assert optimal_dtype(256) == np.uint16
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(128256) == np.int32
    assert optimal_dtype(None) == np.int32


def test_empty_dataset_and_empty_documents(tmp_path):
    with IndexedDatasetWriter(tmp_path / "empty", np.uint16):
        pass
    ds = IndexedDataset(tmp_path / "empty")
    assert (len(ds), ds.num_documents, ds.num_tokens, len(ds.tokens)) == (0, 0, 0, 0)
    assert read_bytes(tmp_path / "empty") == (index_bytes(8, [], [], [0]), b"")

    with IndexedDatasetWriter(tmp_path / "holes", np.int32) as w:
        w.end_document()            # a document without sequences
        w.add_document([])          # one empty sequence
        w.add_document([7, 8])
    ds = IndexedDataset(tmp_path / "holes")
    assert ds.document_indices.tolist() == [0, 0, 1, 2]
    assert [ds.document(d).tolist() for d in range(3)] == [[], [], [7, 8]]


def test_open_sequences_become_the_last_document(tmp_path):
    with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as w:
        w.add_document([1])
        w.add_sequence([2])
        w.add_sequence([3])
    assert IndexedDataset(tmp_path / "ds").document_indices.tolist() == [0, 1, 3]


def test_tokens_that_do_not_fit_the_dtype_are_refused(tmp_path):
    with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as w:
        w.add_document(np.array([0, 65535], dtype=np.int64))
        with pytest.raises(UserError, match=r"ds\.bin.*65536.*int32"):
            w.add_document([1, 65536])
        with pytest.raises(UserError, match="-1"):
            w.add_document([-1])
        with pytest.raises(ValueError, match="integers"):
            w.add_document([1.5])
        with pytest.raises(ValueError, match="1-D"):
            w.add_document([[1, 2]])
        with pytest.raises(ValueError, match="split"):
            w.add_document([1, 2, 3], lengths=[1, 1])
    assert IndexedDataset(tmp_path / "ds")[0].tolist() == [0, 65535]


def test_accepts_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    with IndexedDatasetWriter(tmp_path / "ds", np.int32) as w:
        w.add_document(torch.tensor([5, 100_000]))
    assert IndexedDataset(tmp_path / "ds")[0].tolist() == [5, 100_000]


def test_multimodal_index_is_read_with_its_modes(tmp_path):
    idx = index_bytes(8, [3, 1, 4, 1, 2], [0, 6, 8, 16, 18], DOCUMENT_INDICES,
                      modes=[0, 1, 0, 1, 1])
    prefix = write_example(tmp_path, idx=idx)
    ds = IndexedDataset(prefix)
    assert ds.sequence_modes.tolist() == [0, 1, 0, 1, 1]
    assert [ds[i].tolist() for i in range(len(ds))] == SEQUENCES
    with IndexedDatasetWriter(tmp_path / "out", np.uint16) as w, \
            pytest.raises(UserError, match="multimodal"):
        w.add_index(prefix)


def test_pickle_reopens_the_files(tmp_path):
    ds = IndexedDataset(write_example(tmp_path))
    blob = pickle.dumps(ds)
    assert len(blob) < 200  # the prefix, not the data
    again = pickle.loads(blob)
    assert [again[i].tolist() for i in range(len(again))] == SEQUENCES


# --- bad inputs ------------------------------------------------------------------------

def test_missing_files(tmp_path):
    prefix = write_example(tmp_path)
    os.remove(prefix + ".idx")
    with pytest.raises(UserError, match=r"ds\.idx does not exist.*prefix"):
        IndexedDataset(prefix)
    prefix = write_example(tmp_path)
    os.remove(prefix + ".bin")
    with pytest.raises(UserError, match=r"ds\.bin does not exist"):
        IndexedDataset(prefix)
    with pytest.raises(UserError, match=r"ds\.bin\.idx does not exist.*without \.bin"):
        IndexedDataset(prefix + ".bin")


GOOD = dict(code=8, lengths=[3, 1, 4, 1, 2], pointers=[0, 6, 8, 16, 18], docs=DOCUMENT_INDICES)


@pytest.mark.parametrize("idx, message", [
    (index_bytes(**GOOD, magic=b"TNTIDX\x00\x00\x00"), "magic"),
    (b"MMID", r"shorter than the 34-byte header \(truncated\)"),
    (b"", "truncated"),
    (EXAMPLE_IDX[:30], "truncated"),
    (EXAMPLE_IDX[:-8], r"take 126 bytes \(truncated\)"),
    (EXAMPLE_IDX + b"\x00\x00", "which take 126 bytes.*Valid: 126 bytes, or 131"),
    (index_bytes(**GOOD, version=2), "version 2.*Valid: version 1"),
    (index_bytes(**{**GOOD, "code": 9}), r"dtype code 9.*8 \(uint16\)"),
    (index_bytes(**{**GOOD, "code": 0}), "dtype code 0"),
    (index_bytes(**{**GOOD, "docs": [1, 2, 3, 5]}), "do not start with 0"),
    (index_bytes(**{**GOOD, "docs": [0, 3, 2, 5]}), "decreasing"),
    (index_bytes(**{**GOOD, "docs": [0, 2, 3, 4]}), "last document index 4 but 5 sequences"),
    (index_bytes(**{**GOOD, "docs": []}), "do not start with 0"),
    (index_bytes(**{**GOOD, "pointers": [0, 6, 10, 16, 18]}), "sequence 2 starts at byte 10"),
    (index_bytes(**{**GOOD, "pointers": [0, 6, 8, 16, 18][::-1]}), "sequence 0 starts"),
    (index_bytes(**{**GOOD, "lengths": [3, 1, 4, 3, -1]}), "negative"),
])
def test_bad_index_is_refused_naming_the_file(tmp_path, idx, message):
    prefix = write_example(tmp_path, idx=idx)
    with pytest.raises(UserError, match=message) as e:
        IndexedDataset(prefix)
    assert str(e.value).startswith(prefix + ".idx: ")


@pytest.mark.parametrize("bin_, message", [
    (EXAMPLE_BIN[:-2], r"is 20 bytes but ds\.idx describes 11 uint16 tokens, 22 bytes \(trunc"),
    (b"", r"is 0 bytes.*\(truncated\)"),
    (EXAMPLE_BIN + b"\x00\x00", "is 24 bytes but"),
])
def test_bad_bin_is_refused_naming_the_file(tmp_path, bin_, message):
    prefix = write_example(tmp_path, bin_=bin_)
    with pytest.raises(UserError, match=message) as e:
        IndexedDataset(prefix)
    assert str(e.value).startswith(prefix + ".bin: ")


# --- atomic writes ---------------------------------------------------------------------

def test_exception_in_writer_leaves_nothing(tmp_path):
    with pytest.raises(KeyError), IndexedDatasetWriter(tmp_path / "ds", np.uint16) as w:
        w.add_document([1, 2, 3])
        raise KeyError("tokenizer failed")
    assert os.listdir(tmp_path) == []


def test_exception_while_rewriting_keeps_the_old_dataset(tmp_path):
    write_example_with_writer(tmp_path / "ds")
    with pytest.raises(KeyError), IndexedDatasetWriter(tmp_path / "ds", np.int32) as w:
        w.add_document([7] * 100)
        raise KeyError
    assert read_bytes(tmp_path / "ds") == (EXAMPLE_IDX, EXAMPLE_BIN)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]


def test_rewrite_replaces_the_dataset_whole(tmp_path):
    with IndexedDatasetWriter(tmp_path / "ds", np.int64) as w:
        for i in range(50):
            w.add_document(np.arange(i * 10))
    write_example_with_writer(tmp_path / "ds")
    assert read_bytes(tmp_path / "ds") == (EXAMPLE_IDX, EXAMPLE_BIN)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]


def test_failure_between_the_renames_leaves_no_index(tmp_path, monkeypatch):
    """A crash after the .bin is in place and before the .idx is never a readable pair."""
    write_example_with_writer(tmp_path / "ds")
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"), \
            IndexedDatasetWriter(tmp_path / "ds", np.int32) as w:
        w.add_document([7] * 100)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin"]
    with pytest.raises(UserError, match="ds.idx does not exist"):
        IndexedDataset(tmp_path / "ds")


def test_writer_cannot_be_used_after_finalize(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "ds", np.uint16)
    w.add_document([1])
    w.finalize()
    with pytest.raises(RuntimeError, match="finalized"):
        w.add_document([2])
    assert IndexedDataset(tmp_path / "ds").num_tokens == 1


# --- merging ---------------------------------------------------------------------------

def random_documents(seed: int, count: int, vocab: int) -> list[list[np.ndarray]]:
    """Documents of 1-3 sequences of 0-40 tokens each."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, vocab, rng.integers(0, 40)) for _ in range(rng.integers(1, 4))]
            for _ in range(count)]


def write_documents(prefix, docs: list[list[np.ndarray]], dtype) -> None:
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in docs:
            for seq in doc:
                w.add_sequence(seq)
            w.end_document()


def test_merged_shards_equal_one_dataset_byte_for_byte(tmp_path):
    docs = random_documents(0, 60, 50_000)
    write_documents(tmp_path / "whole", docs, np.uint16)
    shards = [docs[:25], docs[25:26], [], docs[26:]]
    for k, shard in enumerate(shards):
        write_documents(tmp_path / f"shard{k}", shard, np.uint16)
    merge([tmp_path / f"shard{k}" for k in range(len(shards))], tmp_path / "merged")
    assert read_bytes(tmp_path / "merged") == read_bytes(tmp_path / "whole")

    with IndexedDatasetWriter(tmp_path / "mixed", np.uint16) as w:
        w.add_document(docs[0][0])
        w.add_index(tmp_path / "shard3")
    ds = IndexedDataset(tmp_path / "mixed")
    assert ds.num_documents == 1 + len(shards[3])
    assert ds.document(1).tolist() == np.concatenate(shards[3][0]).tolist()


def test_merge_refuses_mixed_dtypes(tmp_path):
    write_documents(tmp_path / "a", random_documents(1, 3, 100), np.uint16)
    write_documents(tmp_path / "b", random_documents(2, 3, 100), np.int32)
    with pytest.raises(UserError, match=r"b\.idx: holds int32 tokens.*uint16"):
        merge([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "b.bin", "b.idx"]


# --- Megatron-Core, both directions ----------------------------------------------------

@pytest.fixture(scope="module")
def mcore():
    return pytest.importorskip("megatron.core.datasets.indexed_dataset")


@pytest.mark.parametrize("dtype, vocab", [(np.uint16, 65_000), (np.int32, 200_000)])
def test_reads_what_megatron_core_writes(tmp_path, mcore, dtype, vocab):
    import torch

    docs = random_documents(3, 40, vocab)
    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=dtype)
    for k, doc in enumerate(docs):
        if k % 2:  # both of the builder's ways to add a document
            for seq in doc:
                builder.add_item(torch.from_numpy(seq))
            builder.end_document()
        else:
            builder.add_document(np.concatenate(doc), [len(s) for s in doc])
    builder.finalize(str(tmp_path / "m.idx"))

    ds = IndexedDataset(tmp_path / "m")
    theirs = mcore.IndexedDataset(str(tmp_path / "m"))
    assert ds.dtype == dtype and len(ds) == len(theirs)
    assert ds.num_documents == len(docs)
    assert ds.document_indices.tolist() == theirs.document_indices.tolist()
    for i in range(len(ds)):
        assert ds[i].tolist() == theirs[i].tolist()
    for d, doc in enumerate(docs):
        assert ds.document(d).tolist() == np.concatenate(doc).tolist()

    write_documents(tmp_path / "t", docs, dtype)
    assert read_bytes(tmp_path / "t") == read_bytes(tmp_path / "m")


@pytest.mark.parametrize("dtype, vocab", [(np.uint16, 65_000), (np.int32, 200_000)])
def test_megatron_core_reads_what_trntrain_writes(tmp_path, mcore, dtype, vocab):
    docs = random_documents(4, 40, vocab)
    write_documents(tmp_path / "t", docs, dtype)
    theirs = mcore.IndexedDataset(str(tmp_path / "t"))
    assert theirs.index.dtype == dtype
    assert len(theirs) == sum(len(doc) for doc in docs)
    seqs = [seq for doc in docs for seq in doc]
    for i, seq in enumerate(seqs):
        assert theirs[i].tolist() == seq.tolist()
        if len(seq) > 2:
            assert theirs.get(i, offset=1, length=len(seq) - 2).tolist() == seq[1:-1].tolist()
    ends = np.cumsum([len(doc) for doc in docs]).tolist()
    assert theirs.document_indices.tolist() == [0, *ends]


def test_merge_equals_megatron_core_add_index(tmp_path, mcore):
    for k in range(3):
        write_documents(tmp_path / f"s{k}", random_documents(10 + k, 20, 1000), np.uint16)
    merge([tmp_path / f"s{k}" for k in range(3)], tmp_path / "t")
    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    for k in range(3):
        builder.add_index(str(tmp_path / f"s{k}"))
    builder.finalize(str(tmp_path / "m.idx"))
    assert read_bytes(tmp_path / "t") == read_bytes(tmp_path / "m")
