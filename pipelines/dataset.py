"""The dataset dir (prepare -> train/evaluate/tune): its manifest, its rows, their reading.

Layout:
    manifest.json        what follows; written last, so a dir without it is not a dataset
    tokenizer.json       (+ vocab.json, merges.txt for BPE) the tokenizer the ids belong to
    train/00000.parquet  rows, in order
    val/00000.parquet

Rows. Each split is one token stream: <eos> doc1 <eos> doc2 <eos> … docN <eos> -- every document
followed by eos, and one eos in front so the first document is predicted too. Row r holds
stream[r*L : r*L + L + 1] (L = seq_len): consecutive rows overlap by one token, so a row's
inputs are tokens[:-1], its targets tokens[1:], and every token after the leading eos is a target
exactly once. Packing runs over the whole split in document order, so only the split's last row
can be short: its `length` (valid tokens, >= 2) is then below L + 1 and the rest is eos padding,
not to be used as targets. Parquet columns (zstd; about 1.4 bytes a token at vocab 8192):
    tokens  fixed_size_list<uint16 | int32>[L + 1]   uint16 when vocab_size <= 65536
    length  int32                                    L + 1 but for a short last row
Bits per byte of a split = (sum of its targets' losses in nats) / ln 2 / its `bytes`.

manifest.json (format_version 1):
    format, format_version       "gpt2-ray-dataset", 1
    tokenizer {file, sha256}     sha256 of tokenizer.json as written (Tokenizer.sha256())
    vocab_size, eos_id, seq_len, dtype
    splits {train, val}: documents, bytes (UTF-8 bytes of the source documents, for bits per
        byte), tokens (targets: document tokens + one eos each; sum of length - 1 over rows),
        rows, shards [{file, rows, tokens}]
    source {files, bytes, invalid_utf8_bytes, encoder}   how it was made
    config, fingerprint, created  the prepare flags; a hash of inputs + flags for reruns

Reading: `load_manifest(dir)` checks a dataset dir and names what is wrong; `read_shard(path)` and
`read_split(dir, split)` give (tokens (rows, L + 1), length (rows,)) numpy arrays; a Ray Data
batch's `tokens` column (an object array of rows) stacks with `stack_rows`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gpt2core import storage

FORMAT = "gpt2-ray-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class DatasetError(ValueError):
    """A dataset dir is missing or wrong; the message names it and the fix."""


@dataclass
class Shard:
    file: str  # relative to the dataset dir
    rows: int
    tokens: int


@dataclass
class Split:
    documents: int = 0
    bytes: int = 0
    tokens: int = 0
    rows: int = 0
    shards: list[Shard] = field(default_factory=list)


@dataclass
class Manifest:
    tokenizer: dict  # {"file": "tokenizer.json", "sha256": …}
    vocab_size: int
    eos_id: int
    seq_len: int
    dtype: str
    splits: dict[str, Split]
    source: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    fingerprint: str = ""
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def table(self) -> str:
        """The splits as a console table: documents, MB, tokens, bytes/token, rows, shards."""
        lines = [f"{'split':<6}{'documents':>12}{'MB':>10}{'tokens':>14}{'bytes/token':>13}"
                 f"{'rows':>10}{'shards':>8}"]
        lines += [f"{name:<6}{s.documents:>12,}{s.bytes / 1e6:>10.2f}{s.tokens:>14,}"
                  f"{s.bytes / max(1, s.tokens):>13.2f}{s.rows:>10,}{len(s.shards):>8}"
                  for name, s in self.splits.items()]
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        splits = {name: Split(**{**s, "shards": [Shard(**x) for x in s["shards"]]})
                  for name, s in d["splits"].items()}
        return cls(**{**d, "splits": splits})


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


def load_manifest(path: str | os.PathLike, check_files: bool = True) -> Manifest:
    """Read and check a dataset dir's manifest (or the manifest file itself); local or a URI."""
    path = str(path).rstrip("/")
    root = path[:-len(MANIFEST) - 1] if path.endswith("/" + MANIFEST) else path
    file = storage.join(root, MANIFEST)
    try:
        text = storage.read_text(file)
    except FileNotFoundError:
        what = "has no " + MANIFEST if storage.is_dir(root) else "does not exist"
        raise DatasetError(f"dataset {root} {what}; make one with `gpt2 prepare --out {root}` "
                           "(the manifest is written last: a dir without it is incomplete)."
                           ) from None
    try:
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise DatasetError(f"{file} is not a gpt2-ray dataset manifest; re-run prepare.")
        if raw.get("format_version") != FORMAT_VERSION:
            raise DatasetError(f"{file} has format_version {raw.get('format_version')}, this "
                               f"code reads {FORMAT_VERSION}; re-run prepare with --overwrite.")
        manifest = Manifest.from_dict(raw)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{file} is damaged ({e}); re-run prepare with --overwrite.") from e
    if set(manifest.splits) != set(SPLITS) or manifest.seq_len < 2:
        raise DatasetError(f"{file} lacks a train or val split; re-run prepare --overwrite.")
    if check_files:
        names = [manifest.tokenizer["file"]] + [s.file for split in manifest.splits.values()
                                                for s in split.shards]
        present = storage.files(root)  # one listing, not a request per shard
        missing = [n for n in names if n not in present]
        if missing:
            raise DatasetError(f"dataset {root} is incomplete ({missing[0]} is missing); "
                               "re-run prepare with --overwrite.")
    return manifest


def check_out(out: str, fingerprint: str, config: dict, overwrite: bool) -> bool:
    """True if `out` (local or a URI) already holds this dataset; raises DatasetError where it
    must not be touched.

    A dataset made from other inputs or flags is replaced only with `overwrite`; a directory
    that is not a dataset (no manifest.json) never is.
    """
    if storage.is_file(out):
        raise DatasetError(f"--out {out} is a file; pass a directory.")
    present = storage.files(out)
    if not present:
        return False
    if MANIFEST not in present:
        raise DatasetError(f"--out {out} exists and is not a dataset dir (no {MANIFEST}); "
                           "pass a new or empty directory.")
    try:
        old = load_manifest(out)
    except DatasetError as e:
        if overwrite:
            return False
        raise DatasetError(f"--out {out} holds a damaged dataset ({e}); pass --overwrite to "
                           "replace it.") from e
    if overwrite:
        return False
    if old.fingerprint == fingerprint:
        return True
    changed = [k for k in config if old.config.get(k) != config[k]] or ["the input files"]
    raise DatasetError(f"--out {out} holds a dataset made from other inputs or flags (changed: "
                       f"{', '.join(changed)}); pass --overwrite to replace it.")


def publish(tmp: Path, out: str) -> None:
    """The finished local dir `tmp` becomes `out`. Locally: a rename. On object storage (no
    rename): the old manifest is deleted first, then every file is uploaded, manifest last,
    so no reader ever sees a manifest beside shards it does not describe."""
    if not storage.is_uri(out):
        commit(tmp, Path(out))
        return
    storage.delete(storage.join(out, MANIFEST))
    storage.delete(out)
    storage.upload(tmp, out, last=[MANIFEST])


def commit(tmp: Path, out: Path) -> None:
    """Rename the finished temp dir to `out`; an existing `out` is moved aside only then."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


class RowPacker:
    """Cuts one split's token stream into rows of seq_len + 1 tokens overlapping by one."""

    def __init__(self, seq_len: int, eos_id: int, dtype: np.dtype):
        self.seq_len, self.eos_id, self.dtype = seq_len, eos_id, dtype
        self.pending = np.array([eos_id], dtype)  # the stream starts with eos

    def add(self, tokens: np.ndarray) -> np.ndarray:
        """Append tokens; return the rows now complete, (k, seq_len + 1)."""
        L = self.seq_len
        buf = np.concatenate([self.pending, tokens.astype(self.dtype, copy=False)])
        k = (len(buf) - 1) // L
        rows = np.empty((k, L + 1), self.dtype)
        rows[:, :L] = buf[:k * L].reshape(k, L)
        rows[:, L] = buf[L:k * L + 1:L]  # each row's last token starts the next row
        self.pending = buf[k * L:]
        return rows

    def finish(self) -> tuple[np.ndarray, int] | None:
        """The last, short row (eos padded) and its length; None if no target is left."""
        n = len(self.pending)
        if n < 2:
            return None
        row = np.full(self.seq_len + 1, self.eos_id, self.dtype)
        row[:n] = self.pending
        return row, n


class ShardWriter:
    """Rows -> `<split>/00000.parquet`, … of about `shard_rows` rows each, written as they come."""

    def __init__(self, root: Path, split: str, seq_len: int, dtype: np.dtype, shard_rows: int):
        self.root, self.split, self.width, self.dtype = root, split, seq_len + 1, dtype
        self.shard_rows = max(1, shard_rows)
        self.group_rows = max(1, min(self.shard_rows, (8 << 20) // (self.width * dtype.itemsize)))
        self.buffer: list[tuple[np.ndarray, np.ndarray]] = []
        self.buffered = 0
        self.writer, self.shards = None, []
        (root / split).mkdir(parents=True, exist_ok=True)

    def add(self, rows: np.ndarray, lengths: np.ndarray | None = None) -> None:
        if len(rows):
            lengths = np.full(len(rows), self.width, np.int32) if lengths is None \
                else np.asarray(lengths, np.int32)
            self.buffer.append((rows, lengths))
            self.buffered += len(rows)
            if self.buffered >= self.group_rows:
                self._flush()

    def close(self) -> list[Shard]:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.shards

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buffer:
            return
        rows = np.concatenate([r for r, _ in self.buffer])
        lengths = np.concatenate([n for _, n in self.buffer])
        self.buffer, self.buffered = [], 0
        while len(rows):
            if self.writer is None:
                name = f"{self.split}/{len(self.shards):05d}.parquet"
                self.shards.append(Shard(name, 0, 0))
                # zstd over the dictionary-coded ids: ~1.4 bytes a token, and fast to read back
                self.writer = pq.ParquetWriter(self.root / name, _schema(self.width, self.dtype),
                                               compression="zstd")
            shard = self.shards[-1]
            n = min(len(rows), self.shard_rows - shard.rows)
            tokens = pa.FixedSizeListArray.from_arrays(pa.array(rows[:n].reshape(-1)), self.width)
            self.writer.write_table(pa.table({"tokens": tokens, "length": lengths[:n]}))
            shard.rows += n
            shard.tokens += int(lengths[:n].sum()) - n
            rows, lengths = rows[n:], lengths[n:]
            if shard.rows == self.shard_rows:
                self.writer.close()
                self.writer = None


class DatasetWriter:
    """Each split's token stream in -> packed rows in shards, and the split's counts, out."""

    def __init__(self, root: Path, seq_len: int, eos_id: int, dtype: np.dtype, shard_mb: int):
        shard_rows = (shard_mb << 20) // ((seq_len + 1) * dtype.itemsize)
        self.dtype, self.splits = dtype, {s: Split() for s in SPLITS}
        self.packers = {s: RowPacker(seq_len, eos_id, dtype) for s in SPLITS}
        self.writers = {s: ShardWriter(root, s, seq_len, dtype, shard_rows) for s in SPLITS}

    def add(self, split: str, ids: np.ndarray, documents: int, nbytes: int) -> None:
        """The next ids of `split` (its documents' tokens, each followed by eos), in order."""
        s = self.splits[split]
        s.documents, s.bytes, s.tokens = s.documents + documents, s.bytes + nbytes, \
            s.tokens + len(ids)
        self.writers[split].add(self.packers[split].add(ids))

    def close(self) -> dict[str, Split]:
        for name, split in self.splits.items():
            last = self.packers[name].finish()
            if last is not None:
                self.writers[name].add(last[0][None], np.array([last[1]], np.int32))
            split.shards = self.writers[name].close()
            split.rows = sum(x.rows for x in split.shards)
        return self.splits


def _schema(width: int, dtype: np.dtype):
    import pyarrow as pa

    return pa.schema([("tokens", pa.list_(pa.from_numpy_dtype(dtype), width)),
                      ("length", pa.int32())])


def read_shard(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (rows, seq_len + 1), length (rows,)) of one shard, as numpy."""
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(path)
    table = pq.read_table(inner, filesystem=fs)
    column = table.column("tokens").combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy().reshape(-1, width), table.column("length").to_numpy()


def stack_rows(column) -> np.ndarray:
    """A Ray Data numpy batch's `tokens` column (an object array of rows) -> (rows, L + 1)."""
    column = np.asarray(column)
    return np.stack(column) if column.dtype == object else column


def read_split(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All rows of a split in order (small datasets and tests; train streams shards instead)."""
    manifest = load_manifest(root)
    parts = [read_shard(storage.join(root, s.file)) for s in manifest.splits[split].shards]
    return np.concatenate([t for t, _ in parts]), np.concatenate([n for _, n in parts])
