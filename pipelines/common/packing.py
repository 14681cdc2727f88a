"""Writing a dataset dir's rows: token streams packed into rows, rows into Parquet shards.

The format is pipelines/common/dataset.py's. Prepare (pipelines/preparing/worker.py) packs an
item's stream with a RowPacker in its tokenize step and writes the rows with a ShardWriter in
its write step, straight to the dataset dir (local or object storage); PackWriter does both at
once for a whole dataset written in one process (DatasetWriter).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from gpt2core import storage
from pipelines.common.dataset import SPLITS, Shard, Split


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
    """Rows -> `<split>/<key>00000.parquet`, … of `shard_rows` rows each, in row groups of
    `group_rows`. Each shard is assembled in memory and written whole (locally under a temp
    name, then renamed; on object storage an object appears whole), so a reader never finds
    half a file; its size and sha256 go into its Shard."""

    def __init__(self, root: str | os.PathLike, split: str, key: str, seq_len: int,
                 dtype: np.dtype, shard_rows: int, group_rows: int):
        self.root, self.split, self.key = str(root), split, key
        self.width, self.dtype, self.group_rows = seq_len + 1, dtype, max(1, group_rows)
        self.shard_rows = max(1, shard_rows // self.group_rows) * self.group_rows
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.count = 0
        self.sink = self.writer = None
        self.shards: list[Shard] = []

    def add(self, rows: np.ndarray, lengths: np.ndarray | None = None) -> None:
        if len(rows):
            lengths = np.full(len(rows), self.width, np.int32) if lengths is None \
                else np.asarray(lengths, np.int32)
            self.pending.append((rows, lengths))
            self.count += len(rows)
            while self.count >= self.group_rows:
                self._write_group(self.group_rows)

    def close(self) -> list[Shard]:
        if self.count:
            self._write_group(self.count)
        if self.writer is not None:
            self._finish_shard()
        return self.shards

    def _write_group(self, n: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = np.concatenate([r for r, _ in self.pending])
        lengths = np.concatenate([x for _, x in self.pending])
        self.pending = [(rows[n:], lengths[n:])] if len(rows) > n else []
        self.count -= n
        if self.writer is None:
            self.shards.append(Shard(f"{self.split}/{self.key}{len(self.shards):05d}.parquet",
                                     0, 0))
            self.sink = pa.BufferOutputStream()
            # zstd over the dictionary-coded ids: ~1.4 bytes a token, and fast to read back
            self.writer = pq.ParquetWriter(self.sink, _schema(self.width, self.dtype),
                                           compression="zstd")
        tokens = pa.FixedSizeListArray.from_arrays(pa.array(rows[:n].reshape(-1)), self.width)
        self.writer.write_table(pa.table({"tokens": tokens, "length": lengths[:n]}),
                                row_group_size=n)
        shard = self.shards[-1]
        shard.rows += n
        shard.tokens += int(lengths[:n].sum()) - n
        if shard.rows >= self.shard_rows:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self.writer.close()
        data = self.sink.getvalue()
        shard = self.shards[-1]
        shard.bytes, shard.sha256 = data.size, hashlib.sha256(data).hexdigest()
        storage.write_bytes(storage.join(self.root, shard.file), data)
        self.sink = self.writer = None


class PackWriter:
    """Each split's token stream in -> packed rows in shards named `<split>/<key>…`, and the
    split's counts out. One per work item of prepare: its rows start with eos, its last row may
    be short."""

    def __init__(self, root: str | os.PathLike, key: str, seq_len: int, eos_id: int,
                 dtype: np.dtype, shard_rows: int, group_rows: int):
        self.seq_len, self.splits = seq_len, {s: Split() for s in SPLITS}
        self.packers = {s: RowPacker(seq_len, eos_id, dtype) for s in SPLITS}
        self.writers = {s: ShardWriter(root, s, key, seq_len, dtype, shard_rows, group_rows)
                        for s in SPLITS}

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
            split.padding = split.rows * self.seq_len - split.tokens
        return self.splits


class DatasetWriter(PackWriter):
    """A whole dataset's rows written as one work item: `<split>/00000.parquet`, …"""

    def __init__(self, root: str | os.PathLike, seq_len: int, eos_id: int, dtype: np.dtype,
                 shard_mb: int, group_rows: int = 1024):
        shard_rows = (shard_mb << 20) // ((seq_len + 1) * dtype.itemsize)
        super().__init__(root, "", seq_len, eos_id, dtype, shard_rows, group_rows)


def _schema(width: int, dtype: np.dtype):
    import pyarrow as pa

    return pa.schema([("tokens", pa.list_(pa.from_numpy_dtype(dtype), width)),
                      ("length", pa.int32())])
