"""gpt2core.storage against a local dir and a real S3-compatible server (moto, on 127.0.0.1)."""

import pytest

from gpt2core import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A directory to write under: a local path, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("bucket") + "/root"


def test_write_read_list_delete(root):
    storage.write_text(storage.join(root, "a.txt"), "naïve café")
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(root, "a.txt")) == "naïve café"
    assert storage.is_file(storage.join(root, "sub", "b.bin"))
    assert storage.is_dir(root) and storage.is_dir(storage.join(root, "sub"))
    assert storage.listdir(root) == ["a.txt", "sub"]
    assert storage.files(root) == {"a.txt", "sub/b.bin"}
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(root, "missing.txt"))
    storage.delete(root)
    assert not storage.exists(root) and storage.files(root) == set()
    storage.delete(root)  # deleting what is not there is fine


def test_upload_then_local_copy(root, tmp_path):
    src = tmp_path / "src"
    for name in ("z.txt", "config.json", "m/w.bin"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(name)
    storage.upload(src, root, last=["config.json"])
    assert storage.files(root) == {"z.txt", "config.json", "m/w.bin"}
    with storage.local_copy(root, skip=(".bin",)) as local:
        names = sorted(p.name for p in local.rglob("*") if p.is_file())
        # a local path is used as it is; a URI is copied without the skipped files
        assert names == (["config.json", "w.bin", "z.txt"] if local == src.parent / "root"
                         else ["config.json", "z.txt"])
        assert (local / "config.json").read_text() == "config.json"
        copy = local
    assert copy.exists() == (not storage.is_uri(root))  # a temporary copy is removed after
    with storage.local_copy(storage.join(root, "z.txt")) as one:
        assert one.read_text() == "z.txt"


def test_upload_order(bucket, tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    src = tmp_path / "src"
    src.mkdir()
    for name in ("b.txt", "manifest.json", "a.txt"):
        (src / name).write_text(name)
    copied = []
    real = pafs.copy_files
    monkeypatch.setattr(pafs, "copy_files", lambda s, d, **kw: (copied.append(d),
                                                                real(s, d, **kw)))
    storage.upload(src, bucket + "/ds", last=["manifest.json"])
    assert [c.rsplit("/", 1)[1] for c in copied] == ["a.txt", "b.txt", "manifest.json"]


def test_bad_buckets_and_endpoints_are_one_sentence(bucket, monkeypatch):
    storage.check_bucket(bucket + "/x")  # exists: nothing to say
    with pytest.raises(storage.StorageError, match="does not exist; create it"):
        storage.check_bucket("s3://no-such-bucket-here/x", "--out")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(storage.StorageError, match="endpoint does not answer") as e:
        storage.check_bucket(bucket + "/x", "--data")
    assert str(e.value).startswith(f"--data {bucket}/x:") and "\n" not in str(e.value)


def test_local_paths_resolve_and_join(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("runs") == str(tmp_path / "runs")
    assert storage.join("s3://b/runs/", "r1", "model") == "s3://b/runs/r1/model"
    assert not storage.is_uri("runs") and storage.is_uri("gs://b/x")


def test_refused_credentials_are_one_sentence(tmp_path, tools, monkeypatch):
    """moto checks credentials against its IAM when INITIAL_NO_AUTH_ACTION_COUNT is 0: a
    second server of that kind refuses any key it has not issued."""
    import os
    import subprocess
    import sys

    port = tools.free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        tools.wait_port(port, server, "moto server")
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTISSUED0000000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(storage.StorageError, match="access was refused; set credentials"):
            storage.check_bucket("s3://some-bucket/data", "--data")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_bytes_are_stored_as_given_whatever_the_name(root):
    """pyarrow's streams compress by file name unless told not to: a .gz or .zst written
    through storage must hold exactly its bytes."""
    import gzip

    data = gzip.compress(b"already compressed text\n")
    for name in ("a.txt.gz", "b.jsonl.zst"):
        storage.write_bytes(storage.join(root, name), data)
        assert storage.read_bytes(storage.join(root, name)) == data
        assert storage.info(storage.join(root, name)).size == len(data)
