"""Corpus input: which files, which documents, which split. Pure Python; no Ray.

Driver: `sources()` streams --corpus arguments (files, dirs, globs; local, s3://, gs://, or
`sample`) as `Source`s in a stable order (listing.py); `plan()` and `iter_groups()` cut them
into segments and work items as they come, so nothing holds the file list (`resolve()` lists and
checks every file, for small inputs). Worker: `item_documents()` yields a work item's documents.

A document: a .txt file (each line with --doc_per_line or --pretokenized), each .jsonl/.ndjson
line's --text_field, each .parquet row's --text_field column. .txt and .jsonl may be compressed
(.gz, .zst, .xz, .bz2; compressed.py); a file named or globbed is text whatever its name.
Whitespace-only documents are skipped. A document over --max_doc_bytes M becomes chunks: chunk
k holds the lines starting in bytes [k*M, (k+1)*M), so a big .txt is read by many tasks and has
a validation split; chunks (and the split) never change when other files are added.

Split: a document goes to validation when the first 8 bytes of its BLAKE2b hash, as a fraction of
2**64, fall below --val_fraction (or just above the smallest hash when none does); identical
documents always land in the same split. Invalid UTF-8 becomes U+FFFD, counted per file (the caller
warns, or refuses a file with too much).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from gpt2core.errors import UserError
from pipelines.text import listing
from pipelines.text import sample_corpus as sample
from pipelines.text.compressed import CODECS, DecompressError, decompressed, head, line_pieces

FORMATS = {".txt": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
REFUSED = (".zip", ".json", ".tar", ".tgz", ".7z", ".rar")
SUFFIXES = tuple(FORMATS) + tuple(f + c for f in (".txt", ".jsonl", ".ndjson") for c in CODECS)
SEGMENT_BYTES = 4 << 20  # line formats and Parquet are read in pieces of this size
PIECE_BYTES = 1 << 20  # a compressed line file is decoded and split this much at a time
ITEMS_PER_CPU, ITEM_BYTES = 4, (256 << 10, 8 << 20)  # work items: see item_bytes
SAMPLE = "sample"
SAMPLE_SCHEME = "sample://"  # a sample file, found (or fetched) in each node's own cache
REMOTE = listing.REMOTE


class CorpusError(UserError):
    """A corpus input is wrong; the message is one sentence naming it and the fix."""


@dataclass(frozen=True)
class Source:
    """One input file and how to read it."""

    uri: str  # absolute local path, s3://…, gs://…, or sample://<name>
    fmt: str  # text (file = document) | lines | jsonl | parquet
    size: int  # bytes as stored (compressed ones: compressed)
    mtime_ns: int
    role: str  # auto (split by hash) | train | val
    codec: str = ""  # "" or one of compressed.CODECS


# --- driver: list inputs --------------------------------------------------------------------

def sources(paths: list[str], *, role: str, per_line: bool, text_field: str,
            check: str = "first") -> Iterator[Source]:
    """--corpus arguments -> sources in a stable order (arguments in order, each sorted by path).
    check="first": the first file of each kind is checked here (Parquet column, first JSON line),
    the others by the tasks that read them; "all": every file."""
    checked = set()
    for arg in paths:
        for uri, size, mtime_ns in _sample_files() if arg == SAMPLE else _expand(arg):
            fmt, codec = _format(uri, per_line)
            src = Source(uri, fmt, size, mtime_ns, role, codec)
            if check == "all" or (fmt, codec) not in checked:
                _checked(src, text_field)
                checked.add((fmt, codec))
            yield src


def resolve(paths: list[str], *, role: str, per_line: bool, text_field: str) -> list[Source]:
    """sources() as a list, every file checked (for inputs small enough to list)."""
    return list(sources(paths, role=role, per_line=per_line, text_field=text_field,
                        check="all"))


def _expand(arg: str) -> Iterator[tuple[str, int, int]]:
    try:
        yield from listing.walk(arg, SUFFIXES)
    except listing.ListingError as e:
        raise CorpusError(str(e)) from None


def _format(uri: str, per_line: bool) -> tuple[str, str]:
    name = uri.rsplit("/", 1)[-1].lower()  # string ops: pathlib costs ~50 us a file
    codec = next((c for c in CODECS if name.endswith(c)), "")
    suffix = os.path.splitext(name[:len(name) - len(codec)])[1]
    if suffix in REFUSED or (codec and suffix == ".parquet"):
        raise CorpusError(f"{uri} is a {suffix}{codec} file; prepare reads plain text, JSON "
                          "Lines (.jsonl, one object per line) or Parquet, the first two also "
                          "as .gz, .zst, .xz or .bz2: convert or decompress it.")
    fmt = FORMATS.get(suffix, "text")  # a file named or globbed is text whatever its name
    return ("lines" if fmt == "text" and per_line else fmt), codec


def _checked(src: Source, text_field: str) -> None:
    """Check what is cheap to check now: the parquet column, the first JSON line."""
    if src.fmt == "parquet":
        import pyarrow.parquet as pq

        with _open(src.uri) as f:
            _check_column(pq.ParquetFile(f).schema_arrow, src.uri, text_field)
    elif src.fmt == "jsonl" and src.size:
        head, whole = _head(src, 1 << 20)
        lines = head.split(b"\n")
        complete = lines if whole else lines[:-1]  # the last may be cut short
        first = next(((n, line) for n, line in enumerate(complete, 1) if line.strip()), None)
        if first is not None:
            _json_text(decode_utf8(first[1])[0], text_field, f"{src.uri} line {first[0]}")


def _head(src: Source, n: int) -> tuple[bytes, bool]:
    """The first n bytes of a file (decompressed), and whether that is all of it."""
    with _open(src.uri) as f:
        if not src.codec:
            data = f.read(n)
            return data, len(data) == src.size
        try:
            return head(f, src.codec, src.uri, n)
        except DecompressError as e:
            raise CorpusError(str(e)) from None


def _check_column(schema, uri: str, text_field: str) -> None:
    import pyarrow as pa

    if text_field not in schema.names:
        raise CorpusError(f"{uri} has no column {text_field!r} (it has "
                          f"{', '.join(schema.names)}); pass --text_field.")
    kind = schema.field(text_field).type
    if not pa.types.is_string(kind) and not pa.types.is_large_string(kind):
        raise CorpusError(f"column {text_field!r} of {uri} is {kind}, not text; pass "
                          "--text_field.")


def _sample_files() -> Iterator[tuple[str, int, int]]:
    for p in sample.sample_corpus():
        yield SAMPLE_SCHEME + p.name, p.stat().st_size, p.stat().st_mtime_ns


# --- driver: plan the reads -----------------------------------------------------------------

def plan(sources: Iterable[Source], max_doc_bytes: int) -> Iterator[dict]:
    """Segments in corpus order: dicts a Ray task can read on its own (see read_documents).
    A compressed file is one segment (it can only be read from its start); a Parquet segment
    holds the row groups that start in its byte range; a line format's, the lines that do."""
    for src in sources:
        if src.codec:
            step = max(1, src.size)
        else:  # a .txt document bigger than M is read chunk by chunk: segment k = chunk k
            step = max_doc_bytes if src.fmt == "text" else SEGMENT_BYTES
        for s in range(0, src.size, step):
            yield dict(uri=src.uri, fmt=src.fmt, role=src.role, size=src.size, start=s,
                       end=min(s + step, src.size), bytes=min(step, src.size - s),
                       codec=src.codec)


def item_bytes(total: int, cpus: int) -> int:
    """Work-item size: ITEMS_PER_CPU per CPU (an even tail), within ITEM_BYTES (task overhead
    and each item's one short row stay small; a rerun loses little)."""
    return min(ITEM_BYTES[1], max(ITEM_BYTES[0], total // (ITEMS_PER_CPU * cpus)))


def iter_groups(segments: Iterable[dict], target_bytes: int) -> Iterator[list[dict]]:
    """Consecutive segments into work items of about target_bytes (one Ray task each)."""
    current, size = [], 0
    for seg in segments:
        current.append(seg)
        size += seg["bytes"]
        if size >= target_bytes:
            yield current
            current, size = [], 0
    if current:
        yield current


def group(segments: Iterable[dict], target_bytes: int) -> list[list[dict]]:
    return list(iter_groups(segments, target_bytes))  # for inputs small enough to list


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
        yield from _parquet_documents(seg, text_field, max_doc_bytes)
        return
    counts = invalid.setdefault(seg["uri"], [0, 0])
    if seg.get("codec"):  # the whole file, streamed; pieces as the segments of a plain file
        step = max_doc_bytes if seg["fmt"] == "text" else PIECE_BYTES
        with _open(seg["uri"]) as f:
            line = 0
            try:
                for piece in line_pieces(decompressed(f, seg["codec"], seg["uri"]), step):
                    yield from _piece_documents(piece, seg, text_field, max_doc_bytes, counts,
                                                line)
                    line += piece.count(b"\n")
            except DecompressError as e:
                raise CorpusError(str(e)) from None
        return
    data = read_lines(seg["uri"], seg["start"], seg["end"], seg["size"])
    yield from _piece_documents(data, seg, text_field, max_doc_bytes, counts, None)


def _piece_documents(data: bytes, seg: dict, text_field: str, max_doc_bytes: int,
                     counts: list[int], line: int | None) -> Iterator[str]:
    """Whole lines' documents; `line`: lines before them (None: counted from the segment start)."""
    text, bad = decode_utf8(data)
    counts[0] += bad
    counts[1] += len(data)
    if seg["fmt"] == "text":
        if text.strip():
            yield text  # a whole file, or one chunk of a big one
        return
    for n, row in enumerate(text.split("\n"), start=(line or 0) + 1):
        row = row[:-1] if row.endswith("\r") else row
        if not row.strip():
            continue
        if seg["fmt"] == "lines":
            yield row
        else:
            where = f"{seg['uri']} line {n}" + (f" after byte {seg['start']}"
                                                if line is None and seg["start"] else "")
            yield from _documents(_json_text(row, text_field, where), max_doc_bytes)


def _parquet_documents(seg: dict, text_field: str, max_doc_bytes: int) -> Iterator[str]:
    """Rows of the row groups that start in the segment's byte range."""
    import pyarrow.parquet as pq

    with _open(seg["uri"]) as f:
        pf = pq.ParquetFile(f)
        _check_column(pf.schema_arrow, seg["uri"], text_field)
        for i in range(pf.metadata.num_row_groups):
            chunk = pf.metadata.row_group(i).column(0)
            offset = chunk.dictionary_page_offset if chunk.has_dictionary_page \
                else chunk.data_page_offset
            if seg["start"] <= offset < seg["end"]:
                column = pf.read_row_group(i, columns=[text_field]).column(text_field)
                for value in column.to_pylist():
                    if value is not None:
                        yield from _documents(value, max_doc_bytes)


def _documents(text: str, max_doc_bytes: int) -> Iterator[str]:
    for chunk in chunk_document(text, max_doc_bytes):
        if chunk.strip():
            yield chunk


def chunk_document(text: str, max_bytes: int) -> list[str]:
    """Cut text into chunks: chunk k = the lines starting in bytes [k*max, (k+1)*max)."""
    if len(text) * 4 <= max_bytes:  # a UTF-8 character is at most 4 bytes
        return [text]
    data = text.encode("utf-8", "surrogatepass")
    return [c.decode("utf-8", "surrogatepass") for c in line_pieces([data], max_bytes)]


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
        check_file_utf8(uri, bad, n, max_fraction)
    total = sum(bad for bad, _ in files.values())
    warn_utf8(total, sum(1 for b, _ in files.values() if b))
    return total


def check_file_utf8(uri: str, bad: int, n: int, max_fraction: float) -> None:
    if bad > max_fraction * n:
        raise CorpusError(f"{uri} is not UTF-8 text ({bad:,} of {n:,} bytes are invalid); "
                          "convert it (iconv -t utf-8) or leave it out.")


def warn_utf8(total: int, files: int) -> None:
    if total:
        print(f"warning: {total:,} bytes in {files} file(s) are not valid UTF-8 and were "
              "replaced by U+FFFD.", file=sys.stderr)


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
