"""pipelines/preparing/dataflow.py: the Ray Data pipeline over work items writes, for every
item, the shards and record that its worker functions write without Ray; an item stays one
row, and one stream of rows, even when Ray Data's blocks are tiny."""

import functools
from dataclasses import replace

import pytest

from gpt2core import storage
from gpt2core.tokenizer import Tokenizer
from pipelines.common import dataset
from pipelines.preparing import dataflow
from pipelines.preparing import worker as prepare_worker
from pipelines.text import corpus
from pipelines.text.encoding import encoder_spec


@pytest.mark.slow
def test_the_pipeline_writes_what_the_worker_functions_write(ray_local, tmp_path, capsys):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(12):
        (d / f"{i:02d}.txt").write_text(f"document {i} says " + "words and more " * (20 + i))
    sources = corpus.resolve([str(d)], role="auto", per_line=False, text_field="text")
    items = list(enumerate(corpus.group(corpus.plan(sources, 1 << 16), 1200)))
    assert len(items) >= 4
    tok = Tokenizer.train(["document says words and more"] * 20, vocab_size=300)
    cut = corpus.threshold(0.3)

    def spec(out):
        return prepare_worker.TaskSpec(str(out), "a" * 12, cut, tok.sha256(),
                                       encoder_spec(tok, pretokenized=False, probe=[]), "<u2",
                                       seq_len=16, shard_rows=8, group_rows=4)

    ctx = ray_local.data.DataContext.get_current()
    saved, ctx.target_max_block_size = ctx.target_max_block_size, 1024  # tiny blocks
    try:
        sink = dataflow.Shards(spec(tmp_path / "ray"))
        read = functools.partial(dataflow.read_text, cut, "text", 1 << 16, 0.01)
        ds = dataflow.tokenized(items, read, sink.spec)
        # one task per item reads and tokenizes it (and writes it: Write fuses after a map)
        ds.explain()
        assert "TaskPoolMapOperator[ReadWorkItems->MapBatches(tokenize)]\n+- InputDataBuffer" \
            in capsys.readouterr().out
        ds.write_datasink(sink)
    finally:
        ctx.target_max_block_size = saved
    assert sorted(sink.records) == [i for i, _ in items]

    alone = spec(tmp_path / "alone")
    for i, segments in items:
        record, texts = prepare_worker.read_item(segments, i, cut, "text", 1 << 16, 0.01)
        packed = {s: prepare_worker.pack_split(texts[s], alone) for s in dataset.SPLITS}
        record = prepare_worker.write_item(record, packed, alone)
        # all of it (counts, lowest hash, shards by name and sha256) but the time it took
        assert replace(sink.records[i], seconds=0) == replace(record, seconds=0)
    assert sum(r.splits["val"].documents for r in sink.records.values()) > 0
    # the records are the items' commit markers, beside their shards
    assert len(storage.listdir(tmp_path / "ray" / prepare_worker.RECORDS)) == len(items)


def test_the_driver_holds_under_a_kilobyte_per_input_file(tmp_path):
    """What the driver keeps for a pass is its work items and their read tasks: a few paths
    and byte ranges per item, so it grows with the files, never with their bytes; under 1 KB
    a file in memory and as Ray ships the tasks."""
    import tracemalloc

    from ray import cloudpickle

    d = tmp_path / "many"
    for i in range(2000):
        (d / f"{i // 100:02d}").mkdir(parents=True, exist_ok=True)
        (d / f"{i // 100:02d}" / f"{i:05d}.txt").write_text("words " * (i % 50 + 1))
    tracemalloc.start()
    sources = corpus.sources([str(d)], role="auto", per_line=False, text_field="text",
                             check="first")
    items = list(enumerate(corpus.iter_groups(corpus.plan(sources, 1 << 16), 64 << 10)))
    read = functools.partial(dataflow.read_text, 0, "text", 1 << 16, 0.01)
    tasks = dataflow.WorkItems(items, read).get_read_tasks(len(items))
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(tasks) == len(items) > 1 and all(t.metadata.num_rows == 1 for t in tasks)
    assert sum(len(s) for _, s in items) == 2000
    assert held / 2000 < 1024, held / 2000
    assert sum(len(cloudpickle.dumps(t)) for t in tasks) / 2000 < 1024
