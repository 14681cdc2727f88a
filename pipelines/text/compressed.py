"""Streaming decompression of corpus files, and streams cut into line-aligned pieces.

    for piece in line_pieces(decompressed(raw, ".zst", uri), step=1 << 20): ...

`.gz`, `.bz2` and `.xz` go through the standard library, `.zst` through pyarrow's zstd codec (no
extra dependency); all read concatenated streams/members/frames, as `zcat` does. The raw file
is read through a counter, so a damaged or cut-short file is named with the byte offset where
decoding failed (DecompressError, one sentence). Nothing is ever held whole: a task reads a
multi-GB .jsonl.zst in 1 MiB pieces.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from collections.abc import Iterator

from gpt2core.errors import UserError

CODECS = (".gz", ".zst", ".xz", ".bz2")
CHUNK = 1 << 20  # decompressed bytes per read


class DecompressError(UserError):
    """A compressed file that cannot be decoded; the message names it and the byte offset."""


class _Counting:
    """A raw binary file that remembers how far it was read (the compressed offset)."""

    def __init__(self, raw):
        self.raw, self.start, self.end = raw, 0, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.start, self.end = self.end, self.end + len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        pass

    @property
    def closed(self) -> bool:
        return False


def decompressed(raw, codec: str, uri: str) -> Iterator[bytes]:
    """The decompressed bytes of the open binary file `raw`, CHUNK at a time."""
    counting = _Counting(raw)
    if codec == ".zst":
        import pyarrow as pa

        stream = pa.CompressedInputStream(pa.PythonFile(counting, mode="r"), "zstd")
    elif codec == ".gz":
        stream = gzip.GzipFile(fileobj=counting, mode="rb")
    elif codec == ".bz2":
        stream = bz2.BZ2File(counting)
    elif codec == ".xz":
        stream = lzma.LZMAFile(counting)
    else:
        raise ValueError(f"unknown compression {codec!r}")
    kind = codec[1:]
    while True:
        try:
            data = stream.read(CHUNK)
        except EOFError:
            raise DecompressError(f"{uri} is cut short: its {kind} data ends at byte "
                                  f"{counting.end:,} before the end of the stream; download or "
                                  "compress it again.") from None
        except (OSError, zlib.error, lzma.LZMAError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "truncated" in reason.lower():
                raise DecompressError(f"{uri} is cut short: its {kind} data ends at byte "
                                      f"{counting.end:,} before the end of the stream; "
                                      "download or compress it again.") from None
            raise DecompressError(f"{uri} is not valid {kind} data: decoding failed between "
                                  f"bytes {counting.start:,} and {counting.end:,} "
                                  f"({reason.rstrip('.')}); download or compress it "
                                  "again.") from None
        if not data:
            return
        yield data


def head(raw, codec: str, uri: str, n: int) -> tuple[bytes, bool]:
    """The first n decompressed bytes, and whether that is all there is."""
    parts, size = [], 0
    for chunk in decompressed(raw, codec, uri):
        parts.append(chunk)
        size += len(chunk)
        if size > n:
            return b"".join(parts)[:n], False
    return b"".join(parts), True


def line_pieces(chunks: Iterator[bytes], step: int) -> Iterator[bytes]:
    """The stream cut into pieces: piece k holds the lines that start in bytes
    [k*step, (k+1)*step) (a line is never cut; pieces holding no line start are skipped).
    The same rule cuts a big document (corpus.chunk_document) and plans a file's segments."""
    buf, start, boundary = b"", 0, step  # buf starts at a line start, at `start` in the stream
    for chunk in chunks:
        buf += chunk
        while boundary - 1 - start < len(buf):
            newline = buf.find(b"\n", max(0, boundary - 1 - start))
            if newline < 0 or newline + 1 >= len(buf):
                break  # the next line start is not known yet
            cut = newline + 1
            yield buf[:cut]
            buf, start = buf[cut:], start + cut
            boundary = (start // step + 1) * step
    if buf:
        yield buf
