"""Paths that may be local or on object storage (s3://, gs://, …), through pyarrow.fs.

Every path a user gives — a corpus, a dataset dir, a run's storage, a checkpoint, a model dir —
goes through these few functions, so a local path and a URI behave the same everywhere:

    storage.read_text("s3://bucket/data/manifest.json")
    storage.upload(Path("tmp/model"), "s3://bucket/runs/r1/model", last=["config.json"])
    with storage.local_copy("s3://bucket/runs/r1/model") as d:   # a local copy, removed after
        model = GPT2.from_pretrained(d)

URIs go to `pyarrow.fs.FileSystem.from_uri`, which reads credentials and `AWS_ENDPOINT_URL`
(an S3-compatible server) from the environment, as Ray Train and Ray Data do. Object storage
has no rename, so a directory is published file by file with its completeness marker last
(`upload(..., last=...)`); readers look for the marker, never for the directory.

Errors a user can cause (an endpoint that does not answer, a missing bucket, missing or refused
credentials) become StorageError: one sentence naming the path and the fix. pyarrow is imported
where used, so `import gpt2core` stays light.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from gpt2core.errors import UserError


class StorageError(UserError):
    """A path that cannot be read or written; the message names it and the fix."""


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://…` paths (s3, gs, hdfs, file, …); False for plain local paths."""
    return "://" in str(path)


def resolve(path: str | os.PathLike) -> str:
    """A URI as given (without a trailing slash), a local path made absolute."""
    path = str(path)
    return path.rstrip("/") if is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/…`, for URIs and local paths alike."""
    base = str(base)
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def filesystem(path: str | os.PathLike):
    """(pyarrow FileSystem, the path within it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), resolve(path)
    try:
        fs, inner = pafs.FileSystem.from_uri(str(path).rstrip("/"))
    except (OSError, ValueError) as e:
        raise _error(str(path), e) from None
    return fs, inner


def info(path: str | os.PathLike):
    """pyarrow FileInfo of `path` (type NotFound when it does not exist)."""
    fs, inner = filesystem(path)
    try:
        return fs.get_file_info(inner)
    except OSError as e:
        raise _error(str(path), e) from None


def is_file(path: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return info(path).type == pafs.FileType.File


def is_dir(path: str | os.PathLike) -> bool:
    """A directory, or on object storage a prefix that holds objects."""
    import pyarrow.fs as pafs

    return info(path).type == pafs.FileType.Directory or (is_uri(path) and bool(listdir(path)))


def exists(path: str | os.PathLike) -> bool:
    return is_file(path) or is_dir(path)


def listdir(path: str | os.PathLike) -> list[str]:
    """Names directly under `path`, sorted; [] when it does not exist."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    try:
        found = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    except OSError as e:
        if "not a directory" in str(e).lower():
            return []
        raise _error(str(path), e) from None
    return sorted(i.base_name for i in found)


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(inner, compression=None) as f:  # bytes as stored
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            raise FileNotFoundError(f"{path} does not exist") from None
        raise _error(str(path), e) from None


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole file; locally through a temp file and a rename, so never half a file."""
    if not is_uri(path):
        target = Path(resolve(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return
    fs, inner = filesystem(path)
    try:
        # compression=None: the bytes as given (pyarrow would compress x.gz by its name); an
        # S3 object appears whole or not at all
        with fs.open_output_stream(inner, compression=None) as f:
            f.write(data)
    except OSError as e:
        raise _error(str(path), e) from None


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def delete(path: str | os.PathLike) -> None:
    """Remove a file or a directory tree; nothing when it does not exist."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    kind = info(path).type
    try:
        if kind == pafs.FileType.File:
            fs.delete_file(inner)
        elif kind == pafs.FileType.Directory or is_uri(path):
            fs.delete_dir(inner)
    except FileNotFoundError:
        pass
    except OSError as e:
        if "not found" not in str(e).lower():
            raise _error(str(path), e) from None


def upload(src: str | os.PathLike, dst: str | os.PathLike, last: Sequence[str] = ()) -> None:
    """Copy the local directory `src` to `dst` (local or URI), the files named in `last` after
    all others, in that order: they are the marker that says `dst` is complete."""
    src = Path(src)
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    order = [f for f in files if f not in last] + [f for f in last if f in files]
    if not is_uri(dst):
        for rel in order:
            target = Path(resolve(dst), rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            shutil.copyfile(src / rel, tmp)
            os.replace(tmp, target)
        return
    import pyarrow.fs as pafs

    fs, inner = filesystem(dst)
    local = pafs.LocalFileSystem()
    try:
        for rel in order:
            pafs.copy_files(str(src / rel), f"{inner}/{rel}", source_filesystem=local,
                            destination_filesystem=fs)
    except OSError as e:
        raise _error(str(dst), e) from None


def download(src: str | os.PathLike, dst: str | os.PathLike, skip: Sequence[str] = ()) -> Path:
    """Copy the directory `src` (local or URI) into the local directory `dst`, but for files
    whose names end with one of `skip`; returns `dst`."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        for rel in sorted(files(src)):
            if not rel.endswith(tuple(skip)):
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(f"{inner}/{rel}", str(dst / rel), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
    except OSError as e:
        raise _error(str(src), e) from None
    return dst


def files(path: str | os.PathLike) -> set[str]:
    """Every file under the directory `path`, as paths relative to it; empty when none."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    try:
        found = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    except OSError as e:
        if "not a directory" in str(e).lower():
            return set()
        raise _error(str(path), e) from None
    return {i.path[len(inner):].lstrip("/") for i in found if i.type == pafs.FileType.File}


@contextmanager
def local_copy(path: str | os.PathLike, skip: Sequence[str] = ()) -> Iterator[Path]:
    """A local path holding `path` (a file or a directory): the path itself when local, else a
    temporary copy under the same name (a directory's files but those ending in `skip`),
    removed on exit."""
    if not is_uri(path):
        yield Path(resolve(path))
        return
    name = Path(str(path).rstrip("/")).name
    with tempfile.TemporaryDirectory(prefix="gpt2ray-") as tmp:
        if is_file(path):
            target = Path(tmp, name)
            target.write_bytes(read_bytes(path))
            yield target
        else:
            yield download(path, Path(tmp, name), skip)


def check_bucket(path: str | os.PathLike, what: str = "path") -> None:
    """For a URI: the bucket answers with these credentials, or StorageError naming the fix.
    Nothing for local paths. Call it on the driver, before any worker starts."""
    if not is_uri(path):
        return
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    bucket = inner.split("/", 1)[0]
    try:
        found = fs.get_file_info(bucket)
    except OSError as e:
        raise _error(str(path), e, what) from None
    if found.type == pafs.FileType.NotFound:
        raise StorageError(f"{what} {path}: bucket {bucket!r} does not exist; create it "
                           f"(aws s3 mb s3://{bucket}) or fix the URI.")


_HINTS = [  # (pattern in pyarrow's message, what the user should do)
    (r"NETWORK_CONNECTION|curlCode|Could not connect|Connection refused|resolve host",
     "the storage endpoint does not answer; check the URI and AWS_ENDPOINT_URL (or your "
     "network)"),
    (r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|credentials|"
     r"\b403\b|Forbidden",
     "access was refused; set credentials that may use it (AWS_ACCESS_KEY_ID/"
     "AWS_SECRET_ACCESS_KEY, an instance role, or GOOGLE_APPLICATION_CREDENTIALS)"),
    (r"NoSuchBucket|Bucket .* not found|bucket does not exist",
     "the bucket does not exist; create it or fix the URI"),
    (r"Unrecognized filesystem type|not a recognized|Cannot parse URI",
     "pyarrow does not know this kind of URI; use a local path, s3:// or gs://"),
]


def _error(path: str, e: BaseException, what: str = "path") -> StorageError:
    """pyarrow's error as one sentence naming the path and the fix."""
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    for pattern, hint in _HINTS:
        if re.search(pattern, str(e), re.IGNORECASE):
            return StorageError(f"{what} {path}: {hint} ({message[:200]}).")
    return StorageError(f"{what} {path} cannot be used ({message[:200]}); check the path "
                        "and its permissions.")
