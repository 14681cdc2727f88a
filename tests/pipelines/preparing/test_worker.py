"""pipelines/preparing/worker.py: one work item sampled and tokenized without Ray: its shards,
its record, found again (and checked) on a rerun, redone when damaged."""

from gpt2core.tokenizer import Tokenizer
from pipelines.common import dataset
from pipelines.preparing import worker as prepare_worker
from pipelines.text import corpus
from pipelines.text.encoding import encoder_spec


def expected(tokenizer: Tokenizer, docs: list[str]) -> list[int]:
    return [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_id]]


def test_tasks_work_on_one_item_without_ray(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("alpha\nbeta\n\ngamma\n")
    (tmp_path / "b.jsonl").write_text('{"text": "delta"}\n{"text": 1}\n')
    sources = corpus.resolve([str(tmp_path / "a.txt")], role="auto", per_line=True,
                             text_field="text")
    segments = list(corpus.plan(sources, 99))
    got = prepare_worker.sample_item(segments, 8, cut=0, text_field="text", max_doc_bytes=99)
    assert got == prepare_worker.Sample(["alpha", "bet"])  # an 8-byte quota
    tok = Tokenizer.train(["alpha beta gamma delta"] * 20, vocab_size=300)
    spec = prepare_worker.TaskSpec(
        str(tmp_path / "out"), "f" * 12, 2**64, tok.sha256(),
        encoder_spec(tok, pretokenized=False, probe=[]), "<u2",
        seq_len=2, shard_rows=2, group_rows=1, text_field="text", max_doc_bytes=99,
        max_invalid_utf8=0.01)  # every document hashes below the cut: all go to val
    monkeypatch.setattr(prepare_worker, "ENCODE_BYTES", 5)  # a run per 5 bytes of text or more
    record = prepare_worker.tokenize_item(segments, 7, spec)
    val = record.splits["val"]
    assert (record.error, record.reused, val.documents, val.bytes) == ("", False, 3, 14)
    assert record.splits["train"].documents == 0 and record.low == 2**64 - 1
    assert val.rows >= 4 and [s.rows for s in val.shards][:-1] == [2] * (len(val.shards) - 1)
    assert [s.file for s in val.shards] == [f"val/ffffffffffff-000007-{i:05d}.parquet"
                                            for i in range(len(val.shards))]  # 2 rows a shard
    rows = [dataset.read_shard(tmp_path / "out" / s.file) for s in val.shards]
    ids = [int(t) for r, n in rows for row, k in zip(r, n) for t in row[1:k]]
    assert ids == expected(tok, ["alpha", "beta", "gamma"])
    again = prepare_worker.tokenize_item(segments, 7, spec)  # found, checked, not redone
    assert again.reused and again.splits == record.splits
    (tmp_path / "out" / val.shards[1].file).write_bytes(b"damaged")
    redone = prepare_worker.tokenize_item(segments, 7, spec)
    assert not redone.reused and redone.splits == record.splits
    low = prepare_worker.tokenize_item(segments, 7, spec, cut=0)  # another cut: another name
    assert low.splits["train"].documents == 3 and low.low_count == 1
    assert low.splits["train"].shards[0].file.startswith("train/ffffffffffff-000007-0000000")
    bad = corpus.resolve([str(tmp_path / "b.jsonl")], role="auto", per_line=False,
                         text_field="text")
    segments = list(corpus.plan(bad, 99))
    assert "b.jsonl line 2 has no string field" in \
        prepare_worker.tokenize_item(segments, 8, spec).error
    assert not (tmp_path / "out" / ".prepare" / "ffffffffffff-000008.json").exists()
