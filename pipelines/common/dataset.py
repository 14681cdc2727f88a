"""The dataset dir (prepare -> train/evaluate/tune): its manifest, its rows, their reading.

Layout:
    manifest.json        what follows; written last, so a dir without it is not a dataset
    tokenizer.json       (+ vocab.json, merges.txt for BPE) the tokenizer the ids belong to
    train/<item>-00000.parquet   rows of one work item (corpus order, item by item)
    val/<item>-00000.parquet
    .prepare/            while prepare runs: state.json, then a record per finished work item
                         (what lets a rerun resume); removed once the manifest is written

Rows. Each work item of prepare packs its documents of a split as one token stream:
<eos> doc1 <eos> doc2 <eos> … docN <eos> -- every document followed by eos, and one eos in front
so the first document is predicted too. Row r holds stream[r*L : r*L + L + 1] (L = seq_len):
consecutive rows overlap by one token, so a row's inputs are tokens[:-1], its targets tokens[1:],
and every token after the leading eos is a target exactly once. Only an item's last row can be
short: its `length` (valid tokens, >= 2) is then below L + 1 and the rest is eos padding, not to
be used as targets (the split's `padding` counts those positions). Parquet columns (zstd; about
1.4 bytes a token at vocab 8192), in row groups of `group_rows` rows (the last of a shard fewer),
the unit training reads in a shuffled order:
    tokens  fixed_size_list<uint16 | int32>[L + 1]   uint16 when vocab_size <= 65536
    length  int32                                    L + 1 but for a short last row
Bits per byte of a split = (sum of its targets' losses in nats) / ln 2 / its `bytes`.

manifest.json (format_version 2; 1, where only a split's last row was short and shards carry
no checksum, still reads):
    format, format_version       "gpt2-ray-dataset", 2
    tokenizer {file, sha256}     sha256 of tokenizer.json as written (Tokenizer.sha256())
    vocab_size, eos_id, seq_len, dtype, group_rows
    splits {train, val}: documents, bytes (UTF-8 bytes of the source documents, for bits per
        byte), tokens (targets: document tokens + one eos each; sum of length - 1 over rows),
        rows, padding (rows * seq_len - tokens), shards [{file, rows, tokens, bytes, sha256}]
    source {files, bytes, invalid_utf8_bytes, encoder, items}   how it was made
    config, fingerprint, created  the prepare flags; a hash of inputs + flags for reruns

Reading: `load_manifest(dir)` checks a dataset dir and names what is wrong; `read_shard(path)` and
`read_split(dir, split)` give (tokens (rows, L + 1), length (rows,)) numpy arrays; a Ray Data
batch's `tokens` column (an object array of rows) stacks with `stack_rows`; `row_groups` and
`read_groups` read a split by row group, in any order.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gpt2core import storage
from gpt2core.errors import UserError

FORMAT = "gpt2-ray-dataset"
FORMAT_VERSION = 2
READABLE = (1, 2)
MANIFEST = "manifest.json"
STATE = ".prepare/state.json"  # an unfinished prepare: {fingerprint, config}
SPLITS = ("train", "val")


class DatasetError(UserError):
    """A dataset dir is missing or wrong; the message names it and the fix."""


@dataclass
class Shard:
    file: str  # relative to the dataset dir
    rows: int
    tokens: int
    bytes: int = 0  # the file's size, and its sha256: how a resumed prepare checks it
    sha256: str = ""


@dataclass
class Split:
    documents: int = 0
    bytes: int = 0
    tokens: int = 0
    rows: int = 0
    shards: list[Shard] = field(default_factory=list)
    padding: int = 0  # positions of short rows that are not targets

    def add(self, other: Split) -> None:
        """Counts and shards of `other` (a later part of the split) appended to these."""
        for name in ("documents", "bytes", "tokens", "rows", "padding"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.shards += other.shards

    @classmethod
    def from_dict(cls, d: dict) -> Split:
        return cls(**{**d, "shards": [Shard(**x) for x in d["shards"]]})


@dataclass
class Manifest:
    tokenizer: dict  # {"file": "tokenizer.json", "sha256": …}
    vocab_size: int
    eos_id: int
    seq_len: int
    dtype: str
    splits: dict[str, Split]
    group_rows: int = 0  # rows per Parquet row group; 0 (format 1): a shard is one unit
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
        splits = {name: Split.from_dict(s) for name, s in d["splits"].items()}
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
        if raw.get("format_version") not in READABLE:
            raise DatasetError(f"{file} has format_version {raw.get('format_version')}, this "
                               f"code reads {' and '.join(map(str, READABLE))}; re-run prepare "
                               "with --overwrite.")
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


def check_out(out: str, fingerprint: str, config: dict, overwrite: bool) -> str:
    """What `out` (local or a URI) holds, for a prepare with this fingerprint: "done" (this
    dataset, complete), "resume" (this prepare, unfinished) or "new" (nothing, or something
    `overwrite` lets go). Raises DatasetError where it must not be touched.

    A dataset or an unfinished prepare made from other inputs or flags is replaced only with
    `overwrite`; a directory that is neither (no manifest.json, no .prepare/) never is.
    """
    if storage.is_file(out):
        raise DatasetError(f"--out {out} is a file; pass a directory.")
    present = storage.files(out)
    if not present:
        return "new"
    if MANIFEST not in present:
        if STATE not in present:
            raise DatasetError(f"--out {out} exists and is not a dataset dir (no {MANIFEST}); "
                               "pass a new or empty directory.")
        try:
            old = json.loads(storage.read_text(storage.join(out, STATE)))
            same = old["fingerprint"] == fingerprint
        except (ValueError, KeyError, TypeError):
            old, same = {}, False
        if same and not overwrite:
            return "resume"
        if overwrite:
            return "new"
        raise DatasetError(f"--out {out} holds an unfinished prepare of other inputs or flags "
                           f"(changed: {_changed(old.get('config', {}), config)}); pass "
                           "--overwrite to replace it.")
    try:
        old = load_manifest(out)
    except DatasetError as e:
        if overwrite:
            return "new"
        raise DatasetError(f"--out {out} holds a damaged dataset ({e}); pass --overwrite to "
                           "replace it.") from e
    if overwrite:
        return "new"
    if old.fingerprint == fingerprint:
        return "done"
    if old.format_version != FORMAT_VERSION:
        raise DatasetError(f"--out {out} holds a dataset of format {old.format_version}, made "
                           "by an older prepare; pass --overwrite to prepare it again.")
    raise DatasetError(f"--out {out} holds a dataset made from other inputs or flags (changed: "
                       f"{_changed(old.config, config)}); pass --overwrite to replace it.")


def _changed(old: dict, new: dict) -> str:
    return ", ".join([k for k in new if old.get(k) != new[k]] or ["the input files"])


def clear(out: str) -> None:
    """Empty `out` (a dataset or an unfinished prepare, as check_out found it): the manifest
    goes first, so nothing ever looks complete while the rest is deleted."""
    storage.delete(storage.join(out, MANIFEST))
    for name in storage.listdir(out):
        storage.delete(storage.join(out, name))


def commit(tmp: Path, out: Path) -> None:
    """Rename the finished temp dir to `out`; an existing `out` is moved aside only then."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def read_shard(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (rows, seq_len + 1), length (rows,)) of one shard, as numpy."""
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(path)
    table = pq.read_table(inner, filesystem=fs)
    column = table.column("tokens").combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy().reshape(-1, width), table.column("length").to_numpy()


def row_groups(manifest: Manifest, split: str, root: str | os.PathLike,
               seed: int | None = None) -> list[dict]:
    """A split's row groups as {"file": path or URI, "group": index (-1: the whole shard)},
    in shard order, or shuffled by `seed` (what training reads: every group a unit)."""
    units = []
    for shard in manifest.splits[split].shards:
        path = storage.join(root, shard.file)
        groups = -(-shard.rows // manifest.group_rows) if manifest.group_rows else 0
        units += [{"file": path, "group": g} for g in range(groups)] or \
            [{"file": path, "group": -1}]
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(units))
        units = [units[i] for i in order]
    return units


def read_groups(batch: dict[str, np.ndarray]):
    """Ray Data UDF: row_groups() rows -> their rows, in that order, as a pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for path, group in zip(batch["file"], batch["group"]):
        fs, inner = storage.filesystem(str(path))
        with fs.open_input_file(inner) as f:
            pf = pq.ParquetFile(f)
            tables.append(pf.read() if group < 0 else pf.read_row_group(int(group)))
    return pa.concat_tables(tables)


def stack_rows(column) -> np.ndarray:
    """A Ray Data numpy batch's `tokens` column (an object array of rows) -> (rows, L + 1)."""
    column = np.asarray(column)
    return np.stack(column) if column.dtype == object else column


def read_split(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All rows of a split in order (small datasets and tests; train streams shards instead)."""
    manifest = load_manifest(root)
    parts = [read_shard(storage.join(root, s.file)) for s in manifest.splits[split].shards]
    return np.concatenate([t for t, _ in parts]), np.concatenate([n for _, n in parts])
