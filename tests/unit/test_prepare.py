"""`trntrain prepare`: its datasets hold exactly the documents of the inputs, whatever
the number of workers, readable by Megatron-Core; reruns are safe."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.unit.test_tokenizers import TEXTS
from trntrain.data import prepare as prepare_module
from trntrain.data.indexed import IndexedDataset
from trntrain.data.prepare import Settings, prepare
from trntrain.data.tokenizer import build_tokenizer
from trntrain.errors import UserError

DOCS = [f"doc {i} " + "αβγ text " * (i % 13) + TEXTS[i % len(TEXTS)] for i in range(300)]


@pytest.fixture
def inputs(tmp_path):
    """Two JSONL files and a text file: 301 documents in input order."""
    (tmp_path / "in").mkdir()
    with (tmp_path / "in" / "a.jsonl").open("w") as f:
        for text in DOCS[:200]:
            f.write(json.dumps({"text": text}) + "\n")
    with (tmp_path / "in" / "b.jsonl").open("w") as f:
        for text in DOCS[200:]:
            f.write(json.dumps({"text": text, "meta": 1}) + "\n")
    (tmp_path / "in" / "c.txt").write_text("a whole file is one document\n")
    return tmp_path / "in", [*DOCS, "a whole file is one document\n"]


def documents(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds.document(d).tolist() for d in range(ds.num_documents)]


def expected(texts: list[str], spec: str = "byte") -> list[list[int]]:
    tok = build_tokenizer(spec)
    return [[*tok.encode(t).tolist(), tok.eot_id] for t in texts]


def test_documents_in_input_order_with_eot(tmp_path, inputs):
    root, texts = inputs
    result = prepare([str(root)], str(tmp_path / "out" / "ds"), Settings(), progress=False)
    assert documents(tmp_path / "out" / "ds") == expected(texts)
    assert (result.documents, result.tokens) == (len(texts), sum(map(len, expected(texts))))
    assert IndexedDataset(tmp_path / "out" / "ds").dtype == np.uint16
    assert not (tmp_path / "out" / "ds.shards").exists()


def test_workers_and_units_do_not_change_the_bytes(tmp_path, inputs):
    root, texts = inputs
    prepare([str(root)], str(tmp_path / "one"), Settings(), workers=1, progress=False)
    # Units of 1 kB cut the JSONL files mid-line: each line goes to the unit it starts in.
    prepare([str(root)], str(tmp_path / "two"), Settings(), workers=2, progress=False,
            unit_bytes=1000)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
    # The byte tokenizer, by hand: a document is its UTF-8 bytes, then EOT id 256.
    assert documents(tmp_path / "two") == [list(t.encode()) + [256] for t in texts]


def test_hf_tokenizer(tmp_path, inputs, hf_tokenizer_json):
    root, texts = inputs
    prepare([str(root)], str(tmp_path / "ds"), Settings(tokenizer=str(hf_tokenizer_json)),
            progress=False)
    assert documents(tmp_path / "ds") == expected(texts, str(hf_tokenizer_json))
    # transformers reads the same tokenizer.json independently of trntrain's tokenizer.
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_tokenizer_json))
    eos = ref.convert_tokens_to_ids("</s>")
    assert documents(tmp_path / "ds") == [ref.encode(t, add_special_tokens=False) + [eos]
                                          for t in texts]


def test_parquet_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"body": DOCS[:100]})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=30)  # 4 row groups, 4 units
    prepare([str(tmp_path / "x.parquet")], str(tmp_path / "ds"), Settings(text_key="body"),
            progress=False)
    assert documents(tmp_path / "ds") == expected(DOCS[:100])
    with pytest.raises(UserError, match=r"x.parquet: no column 'text' \(--text-key\)"):
        prepare([str(tmp_path / "x.parquet")], str(tmp_path / "ds2"), Settings(),
                progress=False)


def test_megatron_core_reads_the_output(tmp_path, inputs):
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset

    root, texts = inputs
    prepare([str(root)], str(tmp_path / "ds"), Settings(), progress=False)
    ds = MegatronDataset(str(tmp_path / "ds"), multimodal=False, mmap=True)
    assert list(ds.document_indices) == list(range(len(texts) + 1))
    assert [ds[i].tolist() for i in range(len(ds))] == expected(texts)


def test_rerun_is_up_to_date_until_an_input_changes(tmp_path, inputs):
    root, texts = inputs
    out = str(tmp_path / "ds")
    prepare([str(root)], out, Settings(), progress=False)
    before = (tmp_path / "ds.bin").stat().st_mtime_ns
    again = prepare([str(root)], out, Settings(), progress=False)
    assert again.up_to_date and (tmp_path / "ds.bin").stat().st_mtime_ns == before
    (root / "c.txt").write_text("changed\n")
    rebuilt = prepare([str(root)], out, Settings(), progress=False)
    assert not rebuilt.up_to_date
    assert documents(out) == expected([*texts[:-1], "changed\n"])


def test_interrupted_run_resumes_from_finished_shards(tmp_path, inputs, monkeypatch):
    root, texts = inputs
    out = str(tmp_path / "ds")
    calls = []
    real = prepare_module.tokenize_unit

    def interrupted(task):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(task[0])
        return real(task)

    monkeypatch.setattr(prepare_module, "tokenize_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(root)], out, Settings(), progress=False, unit_bytes=2000)
    assert not (tmp_path / "ds.idx").exists() and not (tmp_path / "ds.bin").exists()
    finished = sorted(p.name for p in (tmp_path / "ds.shards").glob("*.idx"))
    assert len(finished) == 3

    finished_mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "ds.shards").glob("*.bin")}
    reused = []

    def resumed(task):
        result = real(task)
        shard = tmp_path / "ds.shards" / f"{task[1].rsplit('/', 1)[1]}.bin"
        if shard in finished_mtimes:
            reused.append(shard.stat().st_mtime_ns == finished_mtimes[shard])
        return result

    monkeypatch.setattr(prepare_module, "tokenize_unit", resumed)
    prepare([str(root)], out, Settings(), progress=False, unit_bytes=2000)
    assert documents(out) == expected(texts)
    assert reused == [True, True, True]  # the finished shards were kept, not rewritten
    assert not (tmp_path / "ds.shards").exists()


def test_bad_line_leaves_no_output_and_keeps_the_old_one(tmp_path, inputs):
    root, texts = inputs
    out = str(tmp_path / "ds")
    prepare([str(root)], out, Settings(), progress=False)
    old = (tmp_path / "ds.bin").read_bytes()
    with (root / "b.jsonl").open("a") as f:
        f.write('{"text": 5}\n')
    with pytest.raises(UserError, match=r"b.jsonl:101: no string field 'text'"):
        prepare([str(root)], out, Settings(), progress=False)
    assert (tmp_path / "ds.bin").read_bytes() == old
    assert documents(out) == expected(texts)
    result = prepare([str(root)], out, Settings(on_bad_line="skip"), progress=False)
    assert result.skipped_lines == 1 and documents(out) == expected(texts)


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(UserError, match="input='/nope/x.jsonl' names no"):
        prepare(["/nope/x.jsonl"], str(tmp_path / "ds"), Settings(), progress=False)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unknown suffix '.csv'"):
        prepare([str(tmp_path / "x.csv")], str(tmp_path / "ds"), Settings(), progress=False)
    with pytest.raises(UserError, match="--workers=0 is invalid"):
        prepare([str(tmp_path)], str(tmp_path / "ds"), Settings(), workers=0, progress=False)
