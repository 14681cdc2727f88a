"""The Ray tasks of pipelines/prepare.py, and what crosses the boundary to and from them.

Pure functions of one work item (a list of corpus segments), run and tested without Ray:

    sample_item(segments, quota, cut, text_field, max_doc_bytes) -> Sample
        the first `quota` bytes of the item's train documents, for the tokenizer; reads
        only that much
    tokenize_item(segments, item, spec, cut=None) -> ItemRecord
        every document read once, its split decided by its hash as it comes, encoded in runs
        of ~ENCODE_BYTES, packed into rows (an item's own stream: its last row may be short)
        and written as Parquet shards straight to the dataset dir; then the item's record is
        written beside them. The record is the item's commit marker: a rerun with the same
        flags finds it, checks the shards it names (size and sha256), and returns it without
        reading the corpus. Shards without a record are never used.

A task's memory is a few runs of text and ids plus one shard being assembled (--shard_mb),
however big the item.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from gpt2core import storage
from pipelines.common import dataset
from pipelines.common.packing import PackWriter
from pipelines.text import corpus
from pipelines.text.encoding import get_encoder

ENCODE_BYTES = 1 << 20  # a task encodes documents in runs of about this much text
RECORDS = ".prepare"  # beside the shards: a record per finished work item
NO_HASH = 2**64 - 1


@dataclass(frozen=True)
class TaskSpec:
    """What every tokenize task needs beside its item (sent once, through the object store)."""

    out: str  # the dataset dir, local or a URI
    prefix: str  # the flags' fingerprint, cut short: names an item's shards and record
    cut: int  # documents hashed below it go to validation (role "auto")
    tokenizer_sha256: str
    encoder: dict  # encoding.encoder_spec, with "eos_id"
    dtype: str
    seq_len: int
    shard_rows: int
    group_rows: int
    text_field: str
    max_doc_bytes: int
    max_invalid_utf8: float


@dataclass
class Sample:
    texts: list[str]
    error: str = ""


@dataclass
class ItemRecord:
    """What a tokenize task tells the driver (and leaves in its record file)."""

    item: int
    cut: int
    tokenizer_sha256: str
    segments: str  # sha256 of the item's segments: a record is reused for the same item only
    splits: dict[str, dataset.Split] = field(default_factory=dict)
    low: int = NO_HASH  # the lowest hash of a train document of role "auto", and how many
    low_count: int = 0
    invalid: int = 0  # bytes replaced by U+FFFD, in files this item read whole
    invalid_files: int = 0
    # uri -> [invalid, read, bytes planned here, size] of files only partly in this item
    partial: dict[str, list[int]] = field(default_factory=dict)
    error: str = ""
    reused: bool = False
    seconds: float = 0.0  # the task's wall time (what a rate per CPU is measured from)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ItemRecord:
        raw = json.loads(text)
        splits = {k: dataset.Split.from_dict(v) for k, v in raw.pop("splits").items()}
        return cls(**raw, splits=splits)


def item_key(spec: TaskSpec, item: int, cut: int) -> str:
    """An item's name: the flags, its place in the corpus, and a cut other than the usual
    (when no document fell below --val_fraction and the lowest hash decides)."""
    return f"{spec.prefix}-{item:06d}" + ("" if cut == spec.cut else f"-{cut:016x}")


def record_path(spec: TaskSpec, key: str) -> str:
    return storage.join(spec.out, RECORDS, f"{key}.json")


def sample_item(segments: list[dict], quota: int, cut: int, text_field: str,
                max_doc_bytes: int) -> Sample:
    texts, taken = [], 0
    try:
        for text, data, h, role in corpus.item_documents(segments, text_field, max_doc_bytes,
                                                         {}):
            if taken >= quota:
                break
            if not corpus.is_val(role, h, cut):
                texts.append(text[:quota - taken])
                taken += len(data)
    except corpus.CorpusError as e:
        return Sample([], str(e))
    return Sample(texts)


def tokenize_item(segments: list[dict], item: int, spec: TaskSpec,
                  cut: int | None = None) -> ItemRecord:
    start, cut = time.perf_counter(), spec.cut if cut is None else cut
    key = item_key(spec, item, cut)
    record = ItemRecord(item, cut, spec.tokenizer_sha256, hashlib.sha256(
        json.dumps(segments, sort_keys=True).encode()).hexdigest())
    done = _finished(spec, key, record)
    if done is not None:
        return done
    encode, dtype = get_encoder(spec.encoder), np.dtype(spec.dtype)
    eos = np.array([spec.encoder["eos_id"]], dtype)
    writer = PackWriter(spec.out, key + "-", spec.seq_len, spec.encoder["eos_id"], dtype,
                        spec.shard_rows, spec.group_rows)
    texts = {s: [] for s in dataset.SPLITS}
    count = {s: [0, 0] for s in dataset.SPLITS}  # documents, bytes

    def flush() -> None:
        for s in dataset.SPLITS:
            ids = [a for doc in encode(texts[s]) for a in (doc.astype(dtype), eos)]
            writer.add(s, np.concatenate(ids) if ids else np.zeros(0, dtype), *count[s])
            texts[s], count[s] = [], [0, 0]

    invalid, waiting = {}, 0
    try:
        for text, data, h, role in corpus.item_documents(segments, spec.text_field,
                                                         spec.max_doc_bytes, invalid):
            split = "val" if corpus.is_val(role, h, cut) else "train"
            if role == "auto" and split == "train" and h <= record.low:
                record.low_count = record.low_count + 1 if h == record.low else 1
                record.low = h
            texts[split].append(text)
            count[split] = [count[split][0] + 1, count[split][1] + len(data)]
            waiting += len(data)
            if waiting >= ENCODE_BYTES:
                flush()
                waiting = 0
        flush()
        _utf8(segments, invalid, spec.max_invalid_utf8, record)
    except corpus.CorpusError as e:
        return ItemRecord(item, cut, spec.tokenizer_sha256, record.segments, error=str(e))
    record.splits = writer.close()
    record.seconds = time.perf_counter() - start
    storage.write_text(record_path(spec, key), record.to_json())
    return record


def _utf8(segments: list[dict], invalid: dict[str, list[int]], max_fraction: float,
          record: ItemRecord) -> None:
    """Judge the files this item read whole; hand the others' counts to the driver."""
    planned: dict[str, int] = {}
    for seg in segments:
        planned[seg["uri"]] = planned.get(seg["uri"], 0) + seg["bytes"]
    sizes = {seg["uri"]: seg["size"] for seg in segments}
    for uri, (bad, n) in invalid.items():
        if planned[uri] < sizes[uri]:
            record.partial[uri] = [bad, n, planned[uri], sizes[uri]]
            continue
        corpus.check_file_utf8(uri, bad, n, max_fraction)
        record.invalid += bad
        record.invalid_files += bad > 0


def _finished(spec: TaskSpec, key: str, new: ItemRecord) -> ItemRecord | None:
    """This item's record from an earlier run of the same prepare, if its shards are intact."""
    try:
        record = ItemRecord.from_json(storage.read_text(record_path(spec, key)))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    same = ("item", "cut", "tokenizer_sha256", "segments")
    if any(getattr(record, k) != getattr(new, k) for k in same):
        return None
    for split in record.splits.values():
        for shard in split.shards:
            try:
                data = storage.read_bytes(storage.join(spec.out, shard.file))
            except FileNotFoundError:
                return None
            if len(data) != shard.bytes or hashlib.sha256(data).hexdigest() != shard.sha256:
                return None
    record.reused = True
    return record
