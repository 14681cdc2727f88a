"""pipelines/preparing/worker.py: one work item sampled, read, packed and written without Ray:
its shards, its record, found again (and checked) on a rerun, refused when damaged."""

import numpy as np
import pytest

from gpt2core.tokenizer import Tokenizer
from pipelines.common import dataset
from pipelines.preparing import worker as prepare_worker
from pipelines.text import corpus
from pipelines.text.encoding import encoder_spec


def expected(tokenizer: Tokenizer, docs: list[str]) -> list[int]:
    return [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_id]]


def one_item(spec, segments, item, cut, **kw):
    record, texts = prepare_worker.read_item(segments, item, cut, "text", 99, 0.01)
    packed = {s: prepare_worker.pack_split(texts[s], spec) for s in dataset.SPLITS}
    return prepare_worker.write_item(record, packed, spec), texts


def test_one_item_without_ray(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("alpha\nbeta\n\ngamma\n")
    (tmp_path / "b.jsonl").write_text('{"text": "delta"}\n{"text": 1}\n')
    sources = corpus.resolve([str(tmp_path / "a.txt")], role="auto", per_line=True,
                             text_field="text")
    segments = list(corpus.plan(sources, 99))
    got = prepare_worker.sample_item(segments, 8, cut=0, text_field="text", max_doc_bytes=99)
    assert got == ["alpha", "bet"]  # an 8-byte quota
    tok = Tokenizer.train(["alpha beta gamma delta"] * 20, vocab_size=300)
    spec = prepare_worker.TaskSpec(
        str(tmp_path / "out"), "f" * 12, 2**64, tok.sha256(),
        encoder_spec(tok, pretokenized=False, probe=[]), "<u2",
        seq_len=2, shard_rows=2, group_rows=1)  # every document hashes below the cut: val
    monkeypatch.setattr(prepare_worker, "ENCODE_BYTES", 5)  # a run per 5 bytes of text or more
    record, texts = one_item(spec, segments, 7, spec.cut)
    assert texts == {"train": [], "val": ["alpha", "beta", "gamma"]}
    val = record.splits["val"]
    assert (record.reused, val.documents, val.bytes) == (False, 3, 14)
    assert record.splits["train"].documents == 0 and record.low == 2**64 - 1
    assert val.rows >= 4 and [s.rows for s in val.shards][:-1] == [2] * (len(val.shards) - 1)
    assert [s.file for s in val.shards] == [f"val/ffffffffffff-000007-{i:05d}.parquet"
                                            for i in range(len(val.shards))]  # 2 rows a shard
    rows = [dataset.read_shard(tmp_path / "out" / s.file) for s in val.shards]
    ids = [int(t) for r, n in rows for row, k in zip(r, n) for t in row[1:k]]
    assert ids == expected(tok, ["alpha", "beta", "gamma"])
    assert val.tokens == len(ids) and val.padding == val.rows * 2 - val.tokens

    digest = prepare_worker.segments_digest(segments)
    again = prepare_worker.intact(spec, 7, spec.cut, digest)  # found, checked
    assert again.reused and again.splits == record.splits
    assert prepare_worker.intact(spec, 7, spec.cut, "other segments") is None
    assert prepare_worker.intact(spec, 8, spec.cut, digest) is None  # no record
    (tmp_path / "out" / val.shards[1].file).write_bytes(b"damaged")
    assert prepare_worker.intact(spec, 7, spec.cut, digest) is None

    low, _ = one_item(spec, segments, 7, 0)  # another cut: another name
    assert low.splits["train"].documents == 3 and low.low_count == 1
    assert low.splits["train"].shards[0].file.startswith("train/ffffffffffff-000007-0000000")
    bad = corpus.resolve([str(tmp_path / "b.jsonl")], role="auto", per_line=False,
                         text_field="text")
    with pytest.raises(corpus.CorpusError, match="b.jsonl line 2 has no string field"):
        prepare_worker.read_item(list(corpus.plan(bad, 99)), 8, spec.cut, "text", 99, 0.01)


def test_pack_split_rows_overlap_by_one_and_the_last_is_short(tmp_path):
    tok = Tokenizer.train(["alpha beta gamma delta"] * 20, vocab_size=300)
    spec = prepare_worker.TaskSpec(str(tmp_path), "f" * 12, 0, tok.sha256(),
                                   encoder_spec(tok, pretokenized=False, probe=[]), "<u2",
                                   seq_len=4, shard_rows=8, group_rows=2)
    rows, lengths, tokens = prepare_worker.pack_split(["alpha beta", "gamma"], spec)
    stream = [tok.eos_id] + expected(tok, ["alpha beta", "gamma"])
    assert tokens == len(stream) - 1 and rows.shape[1] == 5 and rows.dtype == np.uint16
    assert list(lengths[:-1]) == [5] * (len(rows) - 1) and 2 <= lengths[-1] <= 5
    assert [int(t) for row, n in zip(rows, lengths) for t in row[:n - 1]] + \
        [int(rows[-1][lengths[-1] - 1])] == stream
    empty = prepare_worker.pack_split([], spec)
    assert empty[0].shape == (0, 5) and empty[2] == 0
