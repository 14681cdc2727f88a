"""The prepare job's Ray Data pipeline (pipelines/preparing/passes.py runs it, once per pass):

    items_dataset(items, read)     ray.data.read_datasource(WorkItems(...)): a read task
                                   per work item, its documents split by hash, one row
        .map_batches(tokenize)     encoded and packed into rows          = tokenized(...)
        .write_datasink(Shards)    shards + record written by the workers; on_write_complete
                                   hands the records to the driver

A work item is a few paths and byte ranges (pipelines/text/corpus.py plans them) and travels
the pipeline as ONE row, so its rows are packed and named as one stream whatever Ray Data
does with blocks; Ray Data fuses the three steps into one task per item. The tokenizer loads
once per worker process (encoding.get_encoder caches it), so tasks suffice: an actor pool
would only hold CPUs between passes. What each step does is pipelines/preparing/worker.py.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import ray.data
from ray.data import Datasink, Datasource, ReadTask
from ray.data.block import BlockMetadata

from pipelines.common import dataset
from pipelines.preparing.worker import (
    ItemRecord,
    TaskSpec,
    intact,
    pack_split,
    read_item,
    sample_item,
    write_item,
)

Item = tuple[int, list[dict]]  # (index in the corpus, segments)


class WorkItems(Datasource):
    """A dataset of work items: `read(index, segments)` -> a one-row pyarrow Table per item."""

    def __init__(self, items: list[Item], read: Callable[[int, list[dict]], pa.Table]):
        super().__init__()
        self.items, self.read = items, read

    def estimate_inmemory_data_size(self) -> int:
        return sum(s["bytes"] for _, segments in self.items for s in segments)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_read_one, self.read, i, segments),
                         BlockMetadata(num_rows=1, size_bytes=sum(s["bytes"] for s in segments),
                                       input_files=None, exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for i, segments in self.items]


def items_dataset(items: list[Item], read):
    """A dataset with one read task, and one row, per work item (as many blocks as items:
    Ray Data then neither splits them nor keeps the read from fusing with what follows)."""
    return ray.data.read_datasource(WorkItems(items, read), override_num_blocks=max(1, len(items)))


def tokenized(items: list[Item], read, spec: TaskSpec):
    """The tokenize pass up to its write: read and tokenize fuse into one task per item
    (batch_size=None: a batch is the item's one-row block), and the write after them."""
    return items_dataset(items, read).map_batches(
        tokenize, fn_kwargs={"spec": spec}, batch_size=None, batch_format="pyarrow",
        zero_copy_batch=True)


def _read_one(read, index: int, segments: list[dict]) -> Iterable[pa.Table]:
    yield read(index, segments)


def read_text(cut: int, text_field: str, max_doc_bytes: int, max_invalid_utf8: float,
              index: int, segments: list[dict]) -> pa.Table:
    """The tokenize pass's read: the item's record so far, and each split's documents."""
    record, texts = read_item(segments, index, cut, text_field, max_doc_bytes,
                              max_invalid_utf8)
    return pa.table({"record": [record.to_json()],
                     **{s: pa.array([texts[s]], pa.list_(pa.large_string()))
                        for s in dataset.SPLITS}})


def read_sample(budget: int, total: int, cut: int, text_field: str, max_doc_bytes: int,
                index: int, segments: list[dict]) -> pa.Table:
    """The sample pass's read: the item's share of `budget` of its train documents, from its
    start."""
    quota = math.ceil(budget * sum(s["bytes"] for s in segments) / total)
    texts = sample_item(segments, quota, cut, text_field, max_doc_bytes)
    return pa.table({"item": [index], "texts": pa.array([texts], pa.list_(pa.large_string()))})


def check_record(spec: TaskSpec, cut: int, row: dict) -> dict:
    """A resumed run's check of one finished item (its shards' sizes and sha256)."""
    record = intact(spec, row["item"], cut, row["segments"])
    return {"item": row["item"], "record": record.to_json() if record else ""}


def tokenize(batch: pa.Table, spec: TaskSpec) -> pa.Table:
    """Items' documents -> their packed rows (as bytes) and lengths, per split."""
    out: dict[str, list] = {"record": []}
    for i in range(batch.num_rows):
        start = time.perf_counter()
        record = ItemRecord.from_json(batch["record"][i].as_py())
        for s in dataset.SPLITS:
            rows, lengths, tokens = pack_split(batch[s][i].as_py(), spec)
            record.splits[s].tokens = tokens
            out.setdefault(f"{s}_rows", []).append(rows.tobytes())
            out.setdefault(f"{s}_lengths", []).append(lengths.tobytes())
        record.seconds += time.perf_counter() - start
        out["record"].append(record.to_json())
    return pa.table({k: pa.array(v, pa.large_binary() if k != "record" else pa.string())
                     for k, v in out.items()})


class Shards(Datasink[list[str]]):
    """Writes each item's shards and then its record (from the workers); on the driver,
    `records` holds every item's record once the write completes."""

    def __init__(self, spec: TaskSpec):
        self.spec, self.records = spec, {}

    def write(self, blocks: Iterable, ctx) -> list[str]:
        spec, done = self.spec, []
        for block in blocks:
            for i in range(block.num_rows):
                record = ItemRecord.from_json(block["record"][i].as_py())
                packed = {}
                for s in dataset.SPLITS:
                    rows = np.frombuffer(block[f"{s}_rows"][i].as_buffer(), spec.dtype)
                    packed[s] = (rows.reshape(-1, spec.seq_len + 1),
                                 np.frombuffer(block[f"{s}_lengths"][i].as_buffer(), np.int32),
                                 record.splits[s].tokens)
                done.append(write_item(record, packed, spec).to_json())
        return done

    def on_write_complete(self, write_result) -> None:
        for returned in write_result.write_returns:
            for text in returned:
                record = ItemRecord.from_json(text)
                self.records[record.item] = record
