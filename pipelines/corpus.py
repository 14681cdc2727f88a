"""Corpus input: which files, which documents, which split. Pure Python; no Ray.

Driver side: `resolve()` turns --corpus arguments (files, directories, globs; local, s3://,
gs://, or `sample`) into `Source`s, checking what can be checked without reading the corpus, and
`plan()` cuts them into segments that Ray tasks read independently.
Worker side: `item_documents()` yields the documents of a work item (a list of segments).

What a document is:
  .txt             the whole file; with --doc_per_line (or --pretokenized) each line, without
                   its line break
  .jsonl/.ndjson   each line's JSON object's text field (--text_field)
  .parquet         each row's text column (--text_field)
Documents of only whitespace are skipped. A document longer than --max_doc_bytes is cut into
chunks that are documents from then on: chunk k holds the lines that start in bytes
[k*M, (k+1)*M) of it (a line is never cut), so one big .txt file is read by many tasks in
parallel and still gives a validation split. The rule depends only on the document itself, so
chunks -- and therefore the split -- never change when other files are added.

Split: a document goes to validation when the first 8 bytes of its BLAKE2b hash, read as a
fraction of 2**64, fall below a threshold (--val_fraction, or just above the smallest hash when
no document falls below it); identical documents always land in the same split.

UTF-8: bytes are decoded with replacement (U+FFFD per invalid sequence) and the replaced bytes
are counted per file; the caller warns, or refuses a file where they are too many.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import hashlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipelines import sample

FORMATS = {".txt": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
REFUSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".json")
SEGMENT_BYTES = 4 << 20  # line formats are read in pieces of this size (a line is never cut)
SAMPLE = "sample"
SAMPLE_SCHEME = "sample://"  # a sample file, found (or fetched) in each node's own cache
# read through pyarrow's filesystems; file:// takes the same path, so tests cover it
REMOTE = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "file://")


class CorpusError(ValueError):
    """A corpus input is wrong; the message is one sentence naming it and the fix."""


@dataclass(frozen=True)
class Source:
    """One input file and how to read it."""

    uri: str  # absolute local path, s3://…, gs://…, or sample://<name>
    fmt: str  # text (file = document) | lines | jsonl | parquet
    size: int
    mtime_ns: int
    role: str  # auto (split by hash) | train | val
    row_groups: tuple[int, ...] = ()  # parquet: bytes of each row group


# --- driver: resolve inputs -----------------------------------------------------------------

def resolve(paths: list[str], *, role: str, per_line: bool, text_field: str) -> list[Source]:
    """--corpus arguments -> sources, in a stable order (arguments in order, each sorted)."""
    sources = []
    for arg in paths:
        files = _sample_files() if arg == SAMPLE else _expand(arg)
        for uri, size, mtime_ns in files:
            fmt = _format(uri, per_line)
            sources.append(_checked(Source(uri, fmt, size, mtime_ns, role), text_field))
    return sources


def _expand(arg: str) -> list[tuple[str, int, int]]:
    """(uri, size, mtime_ns) for a file, a glob (any name) or a directory (FORMATS only)."""
    if arg.startswith(REMOTE):
        return _expand_remote(arg)
    path = os.path.abspath(os.path.expanduser(arg))
    if glob.has_magic(path):
        found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not found:
            raise CorpusError(f"--corpus {arg} matches no files; check the pattern.")
        return [_local(p) for p in found]
    if os.path.isdir(path):
        found = sorted(str(p) for p in Path(path).rglob("*") if p.is_file()
                       and p.suffix in FORMATS and not _hidden(p.relative_to(path)))
        if not found:
            raise CorpusError(f"directory {arg} holds no .txt, .jsonl or .parquet files.")
        return [_local(p) for p in found]
    if not os.path.isfile(path):
        raise CorpusError(f"corpus path {arg} does not exist; pass an existing file, "
                          "directory or glob.")
    return [_local(path)]


def _local(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return path, st.st_size, st.st_mtime_ns


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _expand_remote(arg: str) -> list[tuple[str, int, int]]:
    """The same for s3://, gs://, … through pyarrow's filesystems (credentials from the env)."""
    import pyarrow.fs as pafs

    scheme, rest = arg.split("://", 1)
    magic = glob.has_magic(rest)
    try:
        base = rest[:rest.rindex("/", 0, min(rest.index(c) for c in "*?[" if c in rest))] \
            if magic else rest
        fs, path = pafs.FileSystem.from_uri(f"{scheme}://{base}")
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File and not magic:
            return [(arg, info.size, info.mtime_ns or 0)]
        infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True,
                                                               allow_not_found=True))
                 if i.is_file and (fnmatch.fnmatch(i.path, rest) if magic
                                   else Path(i.path).suffix in FORMATS)]
    except (OSError, ValueError) as e:
        raise CorpusError(f"cannot list corpus {arg} ({e}); check the URI and credentials.") \
            from e
    if not infos:
        raise CorpusError(f"corpus {arg} does not exist or holds no .txt, .jsonl or .parquet "
                          "files.")
    return [(f"{scheme}://{i.path}", i.size, i.mtime_ns or 0)
            for i in sorted(infos, key=lambda i: i.path)]


def _format(uri: str, per_line: bool) -> str:
    suffix = Path(uri).suffix.lower()
    if suffix in REFUSED:
        raise CorpusError(f"{uri} is a {suffix} file; prepare reads plain text, JSON Lines "
                          "(.jsonl, one object per line) or Parquet: convert or decompress it.")
    fmt = FORMATS.get(suffix, "text")  # a file named or globbed is text whatever its name
    return "lines" if fmt == "text" and per_line else fmt


def _checked(src: Source, text_field: str) -> Source:
    """Check what is cheap to check now: the parquet column, the first JSON line."""
    if src.fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with _open(src.uri) as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
        if text_field not in schema.names:
            raise CorpusError(f"{src.uri} has no column {text_field!r} (it has "
                              f"{', '.join(schema.names)}); pass --text_field.")
        if not pa.types.is_string(schema.field(text_field).type) and \
                not pa.types.is_large_string(schema.field(text_field).type):
            raise CorpusError(f"column {text_field!r} of {src.uri} is "
                              f"{schema.field(text_field).type}, not text; pass --text_field.")
        sizes = tuple(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        return Source(src.uri, src.fmt, src.size, src.mtime_ns, src.role, sizes)
    if src.fmt == "jsonl" and src.size:
        with _open(src.uri) as f:
            head = f.read(min(src.size, 1 << 20))
        lines = head.split(b"\n")
        complete = lines if len(head) == src.size else lines[:-1]  # the last may be cut short
        first = next(((n, line) for n, line in enumerate(complete, 1) if line.strip()), None)
        if first is not None:
            _json_text(decode_utf8(first[1])[0], text_field, f"{src.uri} line {first[0]}")
    return src


def _sample_files() -> list[tuple[str, int, int]]:
    return [(SAMPLE_SCHEME + p.name, *_local(str(p))[1:])
            for p in sample.sample_corpus()]


# --- driver: plan the reads -----------------------------------------------------------------

def plan(sources: list[Source], max_doc_bytes: int) -> list[dict]:
    """Segments in corpus order: dicts a Ray task can read on its own (see read_documents)."""
    segments = []
    for src in sources:
        if src.fmt == "parquet":
            spans = [(i, i + 1, size) for i, size in enumerate(src.row_groups)]
        else:
            # a .txt document bigger than M is read chunk by chunk: segment k = chunk k
            step = max_doc_bytes if src.fmt == "text" else SEGMENT_BYTES
            spans = [(s, min(s + step, src.size), min(step, src.size - s))
                     for s in range(0, src.size, step)]
        segments += [dict(uri=src.uri, fmt=src.fmt, role=src.role, size=src.size, start=s,
                          end=e, bytes=n) for s, e, n in spans]
    return segments


def group(segments: list[dict], target_bytes: int) -> list[list[dict]]:
    """Consecutive segments into work items of about target_bytes (one Ray task each)."""
    items, current, size = [], [], 0
    for seg in segments:
        current.append(seg)
        size += seg["bytes"]
        if size >= target_bytes:
            items.append(current)
            current, size = [], 0
    return items + ([current] if current else [])


# --- worker: documents ----------------------------------------------------------------------

def item_documents(segments: list[dict], text_field: str, max_doc_bytes: int,
                   invalid: dict[str, list[int]]) -> Iterator[tuple[str, bytes, int, str]]:
    """(text, its UTF-8 bytes, its hash, its role) for each document of a work item, in order."""
    for seg in segments:
        try:
            for text in read_documents(seg, text_field, max_doc_bytes, invalid):
                text, data = clean(text)
                yield text, data, doc_hash(data), seg["role"]
        except OSError as e:
            raise CorpusError(f"cannot read {seg['uri']} ({e}).") from e


def read_documents(seg: dict, text_field: str, max_doc_bytes: int,
                   invalid: dict[str, list[int]]) -> Iterator[str]:
    """The documents of one segment; invalid[uri] += [replaced bytes, bytes read]."""
    if seg["fmt"] == "parquet":
        import pyarrow.parquet as pq

        with _open(seg["uri"]) as f:
            column = pq.ParquetFile(f).read_row_group(seg["start"], columns=[text_field])
        for value in column.column(text_field).to_pylist():
            if value is not None:
                yield from _documents(value, max_doc_bytes)
        return
    data = read_lines(seg["uri"], seg["start"], seg["end"], seg["size"])
    text, bad = decode_utf8(data)
    counts = invalid.setdefault(seg["uri"], [0, 0])
    counts[0] += bad
    counts[1] += len(data)
    if seg["fmt"] == "text":
        if text.strip():
            yield text  # a whole file, or one chunk of a big one
        return
    for n, line in enumerate(text.split("\n"), start=1):
        line = line[:-1] if line.endswith("\r") else line
        if not line.strip():
            continue
        if seg["fmt"] == "lines":
            yield line
        else:
            where = f"{seg['uri']} line {n}" + (f" after byte {seg['start']}"
                                               if seg["start"] else "")
            yield from _documents(_json_text(line, text_field, where), max_doc_bytes)


def _documents(text: str, max_doc_bytes: int) -> Iterator[str]:
    for chunk in chunk_document(text, max_doc_bytes):
        if chunk.strip():
            yield chunk


def chunk_document(text: str, max_bytes: int) -> list[str]:
    """Cut text into chunks: chunk k = the lines starting in bytes [k*max, (k+1)*max)."""
    if len(text) * 4 <= max_bytes:  # a UTF-8 character is at most 4 bytes
        return [text]
    data = text.encode("utf-8", "surrogatepass")
    chunks, start = [], 0
    boundary = max_bytes
    while boundary < len(data):
        newline = data.find(b"\n", boundary - 1)
        if newline < 0 or newline + 1 >= len(data):
            break
        cut = newline + 1  # the first line start at or after the boundary
        chunks.append(data[start:cut])
        start = cut
        boundary = (cut // max_bytes + 1) * max_bytes
    chunks.append(data[start:])
    return [c.decode("utf-8", "surrogatepass") for c in chunks]


def _json_text(line: str, field: str, where: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{where} is not valid JSON ({e.msg}); each line of a .jsonl file "
                          "must be one JSON object.") from e
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        raise CorpusError(f"{where} has no string field {field!r}; pass --text_field with the "
                          "field that holds the text.")
    return obj[field]


def read_lines(uri: str, start: int, end: int, size: int) -> bytes:
    """Bytes of the lines that start in [start, end) (a line starts at 0 or after a b'\\n')."""
    with _open(uri) as f:
        if start > 0:
            f.seek(start - 1)
            head = f.read(end - start + 1)
            first = head.find(b"\n", 0, end - start)
            if first < 0:
                return b""  # no line starts here: the previous segment's line runs through
            data = head[first + 1:]
        else:
            data = f.read(end)
        if end < size and not data.endswith(b"\n"):
            tail = []  # finish the last line, which may run past `end`
            while chunk := f.read(1 << 16):
                newline = chunk.find(b"\n")
                if newline >= 0:
                    tail.append(chunk[:newline + 1])
                    break
                tail.append(chunk)
            data += b"".join(tail)
    return data


def _open(uri: str):
    if uri.startswith(SAMPLE_SCHEME):
        path = sample.path(uri[len(SAMPLE_SCHEME):])
        return open(path, "rb")
    if uri.startswith(REMOTE):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(uri)
        return fs.open_input_file(path)
    return open(uri, "rb")


# --- UTF-8 and hashing ----------------------------------------------------------------------

_replaced = threading.local()


def _count_and_replace(error: UnicodeDecodeError) -> tuple[str, int]:
    _replaced.n += error.end - error.start
    return "\ufffd", error.end


codecs.register_error("gpt2ray-count", _count_and_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """(text, invalid bytes): like errors="replace", also counting the bytes replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        _replaced.n = 0
        text = data.decode("utf-8", "gpt2ray-count")
        return text, _replaced.n


def check_utf8(counts: list[dict[str, list[int]]], max_fraction: float) -> int:
    """Per-item {uri: [invalid, read]} -> total invalid bytes, warned about; raises for a file
    where more than max_fraction of the bytes are invalid (it is not text, or not UTF-8)."""
    files: dict[str, list[int]] = {}
    for item in counts:
        for uri, (bad, n) in item.items():
            files[uri] = [a + b for a, b in zip(files.get(uri, [0, 0]), (bad, n))]
    for uri, (bad, n) in files.items():
        if bad > max_fraction * n:
            raise CorpusError(f"{uri} is not UTF-8 text ({bad:,} of {n:,} bytes are invalid); "
                              "convert it (iconv -t utf-8) or leave it out.")
    total = sum(bad for bad, _ in files.values())
    if total:
        print(f"warning: {total:,} bytes in {sum(1 for b, _ in files.values() if b)} file(s) "
              "are not valid UTF-8 and were replaced by U+FFFD.", file=sys.stderr)
    return total


def clean(text: str) -> tuple[str, bytes]:
    """(text, its UTF-8 bytes); lone surrogates (JSON can escape them) become U+FFFD."""
    try:
        return text, text.encode("utf-8")
    except UnicodeEncodeError:
        text = re.sub("[\ud800-\udfff]", "\ufffd", text)
        return text, text.encode("utf-8")


def doc_hash(data: bytes) -> int:
    """A document's place on [0, 2**64): the split compares it with a threshold."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def threshold(val_fraction: float) -> int:
    return int(val_fraction * 2**64)


def is_val(role: str, h: int, cut: int) -> bool:
    return role == "val" or (role == "auto" and h < cut)
