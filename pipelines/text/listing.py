"""Which files a --corpus argument names, streamed in a stable order. Pure Python; no Ray.

    for uri, size, mtime_ns in listing.walk("s3://bucket/web/", suffixes): ...

A file is itself; a directory is every file under it whose name ends in one of `suffixes`
(hidden names skipped); a glob (`*`, `?`, `[..]` within a name, `**` across directories) is
every file it matches under its non-magic prefix, as `glob.glob(recursive=True)` would. Local
paths and URIs (s3://, gs://, file://, through pyarrow.fs) take the same path. Files come out
in the order of their full paths, one directory listing at a time: the driver never holds a
list of the corpus, only of the directory it is in (a flat directory of millions of files is
still listed whole, by the filesystem too).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator

from gpt2core.errors import UserError

# read through pyarrow's filesystems; file:// takes the same path, so tests cover it
REMOTE = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "file://")


class ListingError(UserError):
    """A path that does not exist, or matches nothing, or the sample corpus that cannot be
    fetched; one sentence."""


def walk(arg: str, suffixes: tuple[str, ...]) -> Iterator[tuple[str, int, int]]:
    """(uri, size, mtime_ns) of each file `arg` names, in full-path order."""
    remote = arg.startswith(REMOTE)
    fs = _Remote(arg) if remote else _Local()
    path = fs.inner(arg) if remote else os.path.abspath(os.path.expanduser(arg))
    found = False
    if glob.has_magic(path):
        pattern = _glob_regex(path)
        base = path[:path.rfind("/", 0, _first_magic(path))] or "/"
        depth = None if "**" in path else path.count("/") - base.count("/")
        for entry in fs.tree(base, depth, hidden=False):
            if pattern.fullmatch(entry[0]):
                found = True
                yield fs.uri(entry)
        if not found:
            raise ListingError(f"--corpus {arg} matches no files; check the pattern.")
        return
    kind = fs.kind(path)
    if kind == "file":
        yield fs.uri(fs.stat(path))
        return
    if kind == "dir":
        for entry in fs.tree(path, None, hidden=False):
            if entry[0].lower().endswith(suffixes):
                found = True
                yield fs.uri(entry)
    if not found:
        formats = ".txt, .jsonl or .parquet files (or .txt and .jsonl as .gz, .zst, .xz, .bz2)"
        if remote:
            raise ListingError(f"corpus {arg} does not exist or holds no {formats}.")
        if kind == "dir":
            raise ListingError(f"directory {arg} holds no {formats}.")
        raise ListingError(f"corpus path {arg} does not exist; pass an existing file, "
                           "directory or glob.")


def _first_magic(path: str) -> int:
    return min(i for i in (path.find(c) for c in "*?[") if i >= 0)


def _glob_regex(pattern: str) -> re.Pattern:
    """glob(recursive=True) as a regex on full paths: `*` stays within a name and does not
    match a leading dot, `**/` matches any number of directories."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append(r"(?:[^/.][^/]*/)*")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(r"(?:[^/.][^/]*(?:/[^/.][^/]*)*)?")
            i += 2
            continue
        start = i == 0 or pattern[i - 1] == "/"
        if c == "*":
            out.append(r"(?!\.)[^/]*" if start else "[^/]*")
        elif c == "?":
            out.append(r"[^/.]" if start else "[^/]")
        elif c == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


class _Local:
    """The local filesystem: os.scandir, one directory at a time."""

    def inner(self, arg: str) -> str:
        return arg

    def kind(self, path: str) -> str:
        return "file" if os.path.isfile(path) else "dir" if os.path.isdir(path) else "none"

    def stat(self, path: str) -> tuple[str, int, int]:
        st = os.stat(path)
        return path, st.st_size, st.st_mtime_ns

    def uri(self, entry: tuple[str, int, int]) -> tuple[str, int, int]:
        return entry

    def tree(self, root: str, depth: int | None, hidden: bool) -> Iterator[tuple[str, int, int]]:
        try:
            with os.scandir(root) as it:
                entries = sorted((e.name + "/" * e.is_dir(), e) for e in it
                                 if hidden or not e.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return
        for key, entry in entries:  # "a.txt" < "a/": the order of full paths
            if key.endswith("/"):
                if depth is None or depth > 1:
                    yield from self.tree(entry.path, None if depth is None else depth - 1,
                                         hidden)
            elif entry.is_file():
                st = entry.stat()
                yield entry.path, st.st_size, st.st_mtime_ns


class _Remote:
    """A pyarrow filesystem (s3://, gs://, file://): one non-recursive listing at a time."""

    def __init__(self, arg: str):
        import pyarrow.fs as pafs

        self.pafs, self.scheme = pafs, arg.split("://", 1)[0]
        rest = arg.split("://", 1)[1]
        root = rest[:rest.rfind("/", 0, _first_magic(rest))] if glob.has_magic(rest) else rest
        try:
            self.fs, _ = pafs.FileSystem.from_uri(f"{self.scheme}://{root}")
        except (OSError, ValueError) as e:
            raise ListingError(f"cannot list corpus {arg} ({e}); check the URI and "
                               "credentials.") from e
        self.arg = arg

    def inner(self, arg: str) -> str:
        rest = arg.split("://", 1)[1].rstrip("/")
        return "/" + rest if self.scheme == "file" and not rest.startswith("/") else rest

    def _info(self, selector_or_path):
        try:
            return self.fs.get_file_info(selector_or_path)
        except (OSError, ValueError) as e:
            raise ListingError(f"cannot list corpus {self.arg} ({e}); check the URI and "
                               "credentials.") from e

    def kind(self, path: str) -> str:
        info = self._info(path)
        if info.type == self.pafs.FileType.File:
            return "file"
        if info.type == self.pafs.FileType.Directory:
            return "dir"
        # object storage: a prefix with objects under it need not exist as an object itself
        found = self._info(self.pafs.FileSelector(path, allow_not_found=True))
        return "dir" if found else "none"

    def stat(self, path: str) -> tuple[str, int, int]:
        info = self._info(path)
        return path, info.size, info.mtime_ns or 0

    def uri(self, entry: tuple[str, int, int]) -> tuple[str, int, int]:
        return f"{self.scheme}://{entry[0].lstrip('/') if self.scheme != 'file' else entry[0]}", \
            entry[1], entry[2]

    def tree(self, root: str, depth: int | None, hidden: bool) -> Iterator[tuple[str, int, int]]:
        infos = self._info(self.pafs.FileSelector(root, allow_not_found=True))
        entries = sorted((i.base_name + "/" * (i.type == self.pafs.FileType.Directory), i)
                         for i in infos if hidden or not i.base_name.startswith("."))
        for key, info in entries:
            if key.endswith("/"):
                if depth is None or depth > 1:
                    yield from self.tree(info.path, None if depth is None else depth - 1,
                                         hidden)
            elif info.type == self.pafs.FileType.File:
                yield info.path, info.size, info.mtime_ns or 0
