"""What runs on the workers of pipelines/prepare.py, and what crosses the boundary.

Pure functions of one work item (a list of corpus segments), run and tested without Ray; the
Ray Data pipeline that calls them is pipelines/preparing/dataflow.py:

    sample_item(segments, quota, cut, text_field, max_doc_bytes) -> texts
        the first `quota` bytes of the item's train documents, for the tokenizer; reads
        only that much
    read_item(segments, item, cut, text_field, max_doc_bytes, max_invalid_utf8)
        -> (ItemRecord, {split: texts})       every document read once, its split decided
        by its hash as it comes; counts, the lowest hash and UTF-8 damage in the record
    pack_split(texts, spec) -> (rows, lengths, tokens)
        one split's documents encoded in runs of ~ENCODE_BYTES, each followed by eos, and
        packed into rows (an item's own stream: its last row may be short)
    write_item(record, packed, spec) -> ItemRecord
        the rows as Parquet shards straight to the dataset dir, then the item's record beside
        them. The record is the item's commit marker: a rerun with the same flags finds it,
        checks the shards it names (`intact`: size and sha256) and skips the item. Shards
        without a record are never used.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from gpt2core import storage
from pipelines.common import dataset
from pipelines.common.packing import RowPacker, ShardWriter
from pipelines.text import corpus
from pipelines.text.encoding import get_encoder

ENCODE_BYTES = 1 << 20  # a task encodes documents in runs of about this much text
RECORDS = ".prepare"  # beside the shards: a record per finished work item
NO_HASH = 2**64 - 1


@dataclass(frozen=True)
class TaskSpec:
    """What tokenizing and writing an item need beside it (sent once per pass)."""

    out: str  # the dataset dir, local or a URI
    prefix: str  # the flags' fingerprint, cut short: names an item's shards and record
    cut: int  # documents hashed below it go to validation (role "auto")
    tokenizer_sha256: str
    encoder: dict  # encoding.encoder_spec, with "eos_id"
    dtype: str
    seq_len: int
    shard_rows: int
    group_rows: int


@dataclass
class ItemRecord:
    """What an item's pass through the pipeline tells the driver (and leaves in its record
    file): read_item starts it, write_item finishes it."""

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
    reused: bool = False
    seconds: float = 0.0  # read + encode + write time (what a rate per CPU is measured from)

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
                max_doc_bytes: int) -> list[str]:
    texts, taken = [], 0
    for text, data, h, role in corpus.item_documents(segments, text_field, max_doc_bytes, {}):
        if taken >= quota:
            break
        if not corpus.is_val(role, h, cut):
            texts.append(text[:quota - taken])
            taken += len(data)
    return texts


def segments_digest(segments: list[dict]) -> str:
    """sha256 of an item's segments: a record is reused for the same item only."""
    return hashlib.sha256(json.dumps(segments, sort_keys=True).encode()).hexdigest()


def read_item(segments: list[dict], item: int, cut: int, text_field: str, max_doc_bytes: int,
              max_invalid_utf8: float) -> tuple[ItemRecord, dict[str, list[str]]]:
    """The item's documents by split, and its record so far (counts, lowest hash, UTF-8).
    Raises CorpusError on a damaged input."""
    start = time.perf_counter()
    record = ItemRecord(item, cut, "", segments_digest(segments),
                        splits={s: dataset.Split() for s in dataset.SPLITS})
    texts: dict[str, list[str]] = {s: [] for s in dataset.SPLITS}
    invalid: dict[str, list[int]] = {}
    for text, data, h, role in corpus.item_documents(segments, text_field, max_doc_bytes,
                                                     invalid):
        split = "val" if corpus.is_val(role, h, cut) else "train"
        if role == "auto" and split == "train" and h <= record.low:
            record.low_count = record.low_count + 1 if h == record.low else 1
            record.low = h
        texts[split].append(text)
        counts = record.splits[split]
        counts.documents, counts.bytes = counts.documents + 1, counts.bytes + len(data)
    _utf8(segments, invalid, max_invalid_utf8, record)
    record.seconds = time.perf_counter() - start
    return record, texts


def pack_split(texts: list[str], spec: TaskSpec) -> tuple[np.ndarray, np.ndarray, int]:
    """One split's documents -> (rows (k, seq_len + 1), their lengths, tokens in the stream):
    encoded in runs of ~ENCODE_BYTES, each document followed by eos."""
    encode, dtype = get_encoder(spec.encoder), np.dtype(spec.dtype)
    eos = np.array([spec.encoder["eos_id"]], dtype)
    packer = RowPacker(spec.seq_len, spec.encoder["eos_id"], dtype)
    rows, tokens, run, size = [], 0, [], 0
    for i, text in enumerate(texts):
        run.append(text)
        size += len(text)
        if size >= ENCODE_BYTES or i == len(texts) - 1:
            ids = np.concatenate([a for doc in encode(run) for a in (doc.astype(dtype), eos)])
            rows.append(packer.add(ids))
            tokens, run, size = tokens + len(ids), [], 0
    lengths = [np.full(len(r), spec.seq_len + 1, np.int32) for r in rows]
    last = packer.finish()
    if last is not None:
        rows.append(last[0][None])
        lengths.append(np.array([last[1]], np.int32))
    if not rows:
        return np.zeros((0, spec.seq_len + 1), dtype), np.zeros(0, np.int32), 0
    return np.concatenate(rows), np.concatenate(lengths), tokens


def write_item(record: ItemRecord, packed: dict[str, tuple[np.ndarray, np.ndarray, int]],
               spec: TaskSpec) -> ItemRecord:
    """Each split's rows as shards `<split>/<key>-00000.parquet`, …, then the record."""
    start, key = time.perf_counter(), item_key(spec, record.item, record.cut)
    for name, (rows, lengths, tokens) in packed.items():
        writer = ShardWriter(spec.out, name, key + "-", spec.seq_len, np.dtype(spec.dtype),
                             spec.shard_rows, spec.group_rows)
        writer.add(rows, lengths)
        split = record.splits[name]
        split.shards, split.tokens, split.rows = writer.close(), tokens, len(rows)
        split.padding = split.rows * spec.seq_len - tokens
    record.tokenizer_sha256 = spec.tokenizer_sha256
    record.seconds += time.perf_counter() - start
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


def intact(spec: TaskSpec, item: int, cut: int, segments: str) -> ItemRecord | None:
    """This item's record from an earlier run of the same prepare, if its shards are intact."""
    try:
        record = ItemRecord.from_json(storage.read_text(record_path(
            spec, item_key(spec, item, cut))))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    expected = (item, cut, spec.tokenizer_sha256, segments)
    if (record.item, record.cut, record.tokenizer_sha256, record.segments) != expected:
        return None
    for split in record.splits.values():
        for shard in split.shards:
            try:
                data = storage.read_bytes(storage.join(spec.out, shard.file))
            except FileNotFoundError:
                return None
            if len(data) != shard.bytes or hashlib.sha256(data).hexdigest() != shard.sha256:
                return None
    record.reused, record.seconds = True, 0.0
    return record
