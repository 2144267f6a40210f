"""Megatron-Core's indexed dataset format (`<prefix>.bin` + `<prefix>.idx`): reader and writer.

Datasets tokenized for Megatron-LM, NeMo or NxD Training read here unchanged, and
the ones written here read there. `<prefix>.bin` holds the tokens of every sequence
back to back; `<prefix>.idx` says where each one starts, little-endian:

    b"MMIDIDX\\x00\\x00"        9 bytes
    version                 <Q   1
    token dtype code        <B   see DTYPES
    sequence count N        <Q
    document index count    <Q   D + 1 for D documents
    sequence lengths        int32[N]      in tokens
    sequence pointers       int64[N]      byte offsets into .bin
    document indices        int64[D + 1]  0, then the sequence count at each document's end
    sequence modes          int8[N]       only in multimodal datasets

A document is one or more consecutive sequences (Megatron's prepare script makes one
per sentence when it splits sentences, else one per document).
"""

from __future__ import annotations

import os
import shutil
import struct
from array import array
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from trntrain.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document indices
HEADER_SIZE = _HEADER.size  # 34

# Megatron-Core's DType enum: the code stored in the .idx for each token dtype.
DTYPES: dict[int, np.dtype] = {
    code: np.dtype(name).newbyteorder("<")
    for code, name in {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64",
                       6: "float64", 7: "float32", 8: "uint16"}.items()
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}

# Validation and merging walk the index in slices of this many entries, so that their
# temporaries stay small whatever the dataset's size.
_CHUNK = 1 << 22
_COPY_BYTES = 16 << 20
_INT32_MAX = np.iinfo(np.int32).max


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def optimal_dtype(vocab_size: int | None) -> np.dtype:
    """The token dtype Megatron's prepare script picks: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 \
        else np.dtype(np.int32)


def dtype_code(dtype: npt.DTypeLike) -> int:
    """The .idx code of a token dtype; UserError for a dtype the format cannot store."""
    try:
        return _CODES[np.dtype(dtype).newbyteorder("<")]
    except (KeyError, TypeError) as e:
        valid = ", ".join(d.name for d in DTYPES.values())
        raise UserError(f"token dtype {dtype!r} cannot be stored in a Megatron indexed dataset; "
                        f"valid: {valid}.") from e


def _bad(path: Path, problem: str, valid: str) -> UserError:
    return UserError(f"{path}: {problem}. Valid: {valid}. If the file was being written or "
                     f"copied, wait for that to finish; otherwise prepare the dataset again.")


class IndexedDataset:
    """A Megatron indexed dataset opened through memory maps: nothing is read until used.

    Sequences are numpy views into the .bin, valid while any of them is referenced.
    Pickling carries only the prefix, so a DataLoader worker reopens the files rather
    than copying them.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        self.idx_path = idx_path(prefix)
        self.bin_path = bin_path(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise UserError(
                    f"{path} does not exist; an indexed dataset is two files, {self.idx_path.name} "
                    f"and {self.bin_path.name}, named by their common prefix "
                    f"{self.prefix!r} (give the prefix without .bin or .idx).")
        self._open_index()
        self._open_tokens()

    def _open_index(self) -> None:
        path = self.idx_path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
        cut_in_magic = len(head) < len(MAGIC) and MAGIC.startswith(head)
        if not head.startswith(MAGIC) and not cut_in_magic:
            raise _bad(path, f"starts with {head[:len(MAGIC)]!r}, not the magic {MAGIC!r} of a "
                       f"Megatron indexed dataset index", "an .idx written by Megatron-Core's "
                       "IndexedDatasetBuilder or trntrain's IndexedDatasetWriter")
        if len(head) < HEADER_SIZE:
            raise _bad(path, f"is {size} bytes, shorter than the {HEADER_SIZE}-byte header "
                       f"(truncated)", f"at least {HEADER_SIZE} bytes")
        _, version, code, n, n_doc_idx = _HEADER.unpack(head)
        if version != VERSION:
            raise _bad(path, f"has format version {version}", f"version {VERSION}")
        if code not in DTYPES:
            valid = ", ".join(f"{c} ({d.name})" for c, d in DTYPES.items())
            raise _bad(path, f"has token dtype code {code}", f"one of {valid}")
        self.dtype = DTYPES[code]
        expected = HEADER_SIZE + n * (4 + 8) + n_doc_idx * 8
        if size < expected:
            raise _bad(path, f"is {size} bytes but its header announces {n} sequences and "
                       f"{n_doc_idx} document indices, which take {expected} bytes (truncated)",
                       f"{expected} bytes, or {expected + n} with sequence modes")
        multimodal = n > 0 and size == expected + n
        if size != expected and not multimodal:
            raise _bad(path, f"is {size} bytes but its header announces {n} sequences and "
                       f"{n_doc_idx} document indices, which take {expected} bytes",
                       f"{expected} bytes, or {expected + n} with sequence modes")
        buf = np.memmap(path, dtype=np.uint8, mode="r")
        offset = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(buf, "<i4", n, offset)
        offset += 4 * n
        self.sequence_pointers = np.frombuffer(buf, "<i8", n, offset)
        offset += 8 * n
        self.document_indices = np.frombuffer(buf, "<i8", n_doc_idx, offset)
        offset += 8 * n_doc_idx
        self.sequence_modes = np.frombuffer(buf, np.int8, n, offset) if multimodal else None
        self._validate_index()

    def _validate_index(self) -> None:
        path, n = self.idx_path, len(self.sequence_lengths)
        docs = self.document_indices
        if len(docs) == 0 or docs[0] != 0:
            raise _bad(path, "has document indices that do not start with 0",
                       "document indices 0 = d_0 <= d_1 <= ... <= d_D = the sequence count")
        if docs[-1] != n:
            raise _bad(path, f"has a last document index {int(docs[-1])} but {n} sequences",
                       "document indices that end at the sequence count")
        itemsize = self.dtype.itemsize
        total = 0  # tokens before the current slice
        for lo in range(0, max(n, len(docs)), _CHUNK):
            d = docs[lo:lo + _CHUNK + 1]
            if len(d) > 1 and (np.diff(d) < 0).any():
                raise _bad(path, "has decreasing document indices",
                           "non-decreasing document indices (a document holds consecutive "
                           "sequences)")
            lengths = self.sequence_lengths[lo:lo + _CHUNK].astype(np.int64)
            if (lengths < 0).any():
                raise _bad(path, "has negative sequence lengths", "lengths >= 0")
            starts = np.cumsum(lengths) - lengths + total
            bad = np.flatnonzero(self.sequence_pointers[lo:lo + _CHUNK] != starts * itemsize)
            if len(bad):
                i = lo + int(bad[0])
                raise _bad(path, f"says sequence {i} starts at byte "
                           f"{int(self.sequence_pointers[i])} of the .bin, but the sequences "
                           f"before it end at byte {int(starts[bad[0]]) * itemsize}",
                           "sequences stored back to back in order, as Megatron-Core writes "
                           "them (pointer i = the byte size of sequences 0..i-1)")
            total += int(lengths.sum())
        self.num_tokens = total

    def _open_tokens(self) -> None:
        size = self.bin_path.stat().st_size
        expected = self.num_tokens * self.dtype.itemsize
        if size != expected:
            raise _bad(self.bin_path, f"is {size} bytes but {self.idx_path.name} describes "
                       f"{self.num_tokens} {self.dtype.name} tokens, {expected} bytes"
                       + (" (truncated)" if size < expected else ""),
                       f"the .bin written together with {self.idx_path.name}, {expected} bytes")
        if size == 0:  # mmap cannot map an empty file
            self.tokens: np.ndarray = np.empty(0, self.dtype)
        else:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        # Plain ndarray views slice faster than np.memmap ones; same bytes.
        self._flat = np.frombuffer(self.tokens, self.dtype) if size else self.tokens

    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["prefix"])

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}: {len(self)} sequences, {self.num_documents} "
                f"documents, {self.num_tokens} {self.dtype.name} tokens)")

    @staticmethod
    def exists(prefix: str | os.PathLike) -> bool:
        return idx_path(prefix).is_file() and bin_path(prefix).is_file()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def _sequence(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences in {self.prefix}")
        return i % n

    def _start(self, i: int) -> int:
        return int(self.sequence_pointers[i]) // self.dtype.itemsize

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        """The tokens of sequence i (a view), or a list of them for a slice."""
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = self._sequence(int(i))
        start = self._start(i)
        return self._flat[start:start + int(self.sequence_lengths[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i; length None runs to its end."""
        i = self._sequence(int(i))
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence "
                             f"{i} of {n} tokens in {self.prefix}")
        start = self._start(i) + offset
        return self._flat[start:start + length]

    def document(self, d: int) -> np.ndarray:
        """The tokens of document d: all its sequences, one view."""
        n = self.num_documents
        if not -n <= d < n:
            raise IndexError(f"document {d} out of range for {n} documents in {self.prefix}")
        first, end = (int(x) for x in self.document_indices[d % n:d % n + 2])
        if first == end:
            return self._flat[:0]
        stop = self._start(end - 1) + int(self.sequence_lengths[end - 1])
        return self._flat[self._start(first):stop]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IndexedDatasetWriter:
    """Writes `<prefix>.bin` and `<prefix>.idx` so that they appear complete or not at all.

    Tokens go to `<prefix>.bin.tmp`; finalize() writes `<prefix>.idx.tmp`, syncs both,
    removes any old `<prefix>.idx` and then renames the .bin before the .idx. A crash
    therefore leaves the old dataset, the new one, or a .bin without an .idx, which
    readers refuse; never an index next to data it does not describe. An exception
    in a `with` block removes the temporaries; a clean exit finalizes.

        with IndexedDatasetWriter("data/train", optimal_dtype(vocab_size)) as w:
            for doc in docs:
                w.add_document(tokenizer.encode(doc))
    """

    def __init__(self, prefix: str | os.PathLike, dtype: npt.DTypeLike) -> None:
        self.prefix = os.fspath(prefix)
        self.code = dtype_code(dtype)
        self.dtype = DTYPES[self.code]
        self.idx_path, self.bin_path = idx_path(prefix), bin_path(prefix)
        self._idx_tmp = Path(f"{self.idx_path}.tmp")
        self._bin_tmp = Path(f"{self.bin_path}.tmp")
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._lengths = array("q")
        self._document_indices = array("q", [0])
        self._file = open(self._bin_tmp, "wb", buffering=_COPY_BYTES)  # noqa: SIM115
        self._done = False

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._document_indices) - 1

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"IndexedDatasetWriter({self.prefix!r}) is already finalized "
                               f"or aborted")

    def _as_tokens(self, tokens: npt.ArrayLike) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
        if arr.dtype == self.dtype or len(arr) == 0 or np.can_cast(arr.dtype, self.dtype):
            return np.ascontiguousarray(arr, dtype=self.dtype)
        if self.dtype.kind in "iu":
            if arr.dtype.kind not in "biu":
                raise ValueError(f"tokens must be integers for {self.dtype.name}, got "
                                 f"{arr.dtype}")
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise UserError(
                    f"{self.bin_path}: token id {lo if lo < info.min else hi} does not fit the "
                    f"dataset's {self.dtype.name} tokens; valid: ids in [{info.min}, "
                    f"{info.max}], or a wider dtype (optimal_dtype(vocab_size) picks int32 for "
                    f"vocabularies of 65500 ids or more).")
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def add_sequence(self, tokens: npt.ArrayLike) -> None:
        """Append one sequence to the open document (end it with end_document())."""
        self._check_open()
        arr = self._as_tokens(tokens)
        if len(arr) > _INT32_MAX:
            raise UserError(f"{self.idx_path}: a sequence of {len(arr)} tokens does not fit "
                            f"the format's int32 lengths; valid: at most {_INT32_MAX} tokens "
                            f"per sequence (split the document into several sequences).")
        self._file.write(arr.data)
        self._lengths.append(len(arr))

    def end_document(self) -> None:
        """Close the open document: the sequences added since the previous one."""
        self._check_open()
        self._document_indices.append(len(self._lengths))

    def add_document(self, tokens: npt.ArrayLike, lengths: Sequence[int] | None = None) -> None:
        """Append a document: one sequence, or several of the given lengths."""
        if lengths is None:
            self.add_sequence(tokens)
        else:
            arr = self._as_tokens(tokens)
            if sum(lengths) != len(arr) or any(n < 0 for n in lengths):
                raise ValueError(f"lengths {list(lengths)} do not split {len(arr)} tokens")
            for start, n in zip(np.cumsum([0, *lengths[:-1]]), lengths, strict=True):
                self.add_sequence(arr[start:start + n])
        self.end_document()

    def _end_open_document(self) -> None:
        if self._document_indices[-1] != len(self._lengths):
            self.end_document()

    def add_index(self, prefix: str | os.PathLike) -> None:
        """Append every document of another dataset of the same dtype (its .bin copied whole).

        Sequences added since the last end_document() become a document first.
        """
        self._check_open()
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise UserError(f"{other.idx_path}: holds {other.dtype.name} tokens but "
                            f"{self.bin_path} is being written with {self.dtype.name}; valid: "
                            f"datasets of one dtype (write every shard with the same dtype).")
        if other.sequence_modes is not None:
            raise UserError(f"{other.idx_path}: is multimodal (has sequence modes); valid: "
                            f"text datasets, the only kind this writer produces.")
        self._end_open_document()
        base = len(self._lengths)
        for lo in range(0, len(other), _CHUNK):
            self._lengths.frombytes(
                other.sequence_lengths[lo:lo + _CHUNK].astype(np.int64).tobytes())
        for lo in range(1, len(other.document_indices), _CHUNK):
            docs = other.document_indices[lo:lo + _CHUNK] + base
            self._document_indices.frombytes(docs.astype(np.int64).tobytes())
        del other
        with open(bin_path(prefix), "rb") as src:
            shutil.copyfileobj(src, self._file, _COPY_BYTES)

    def finalize(self) -> None:
        """Write the index and move both files into place (sequences left open form a document)."""
        self._check_open()
        self._end_open_document()
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            lengths = np.frombuffer(self._lengths, np.int64)
            pointers = np.empty_like(lengths)
            if len(lengths):
                pointers[0] = 0
                np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
            docs = np.frombuffer(self._document_indices, np.int64)
            with open(self._idx_tmp, "wb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, self.code, len(lengths), len(docs)))
                f.write(lengths.astype("<i4").data)
                f.write(pointers.astype("<i8", copy=False).data)
                f.write(docs.astype("<i8", copy=False).data)
                f.flush()
                os.fsync(f.fileno())
            # The old index goes first: from here until the last rename, no .idx exists.
            self.idx_path.unlink(missing_ok=True)
            _fsync_dir(self.idx_path.parent)
            os.replace(self._bin_tmp, self.bin_path)
            os.replace(self._idx_tmp, self.idx_path)
            _fsync_dir(self.idx_path.parent)
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Drop what was written; an existing dataset at the prefix stays as it was."""
        self._done = True
        self._file.close()
        self._bin_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)


def merge(prefixes: Sequence[str | os.PathLike], out_prefix: str | os.PathLike) -> None:
    """Concatenate datasets of one dtype, in order, into `out_prefix` (shards of a prepare)."""
    if not prefixes:
        raise UserError(f"{out_prefix}: nothing to merge; valid: one or more dataset prefixes.")
    with IndexedDatasetWriter(out_prefix, IndexedDataset(prefixes[0]).dtype) as writer:
        for prefix in prefixes:
            writer.add_index(prefix)
