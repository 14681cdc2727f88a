"""pipelines/preparing/passes.py: a prepare killed midway resumes, reusing the items that finished,
and ends with what an uninterrupted run makes; locally and on object storage."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gpt2core import storage
from pipelines import prepare
from pipelines.common import dataset
from pipelines.common.flags import parse
from pipelines.text import corpus

ROOT = Path(__file__).resolve().parents[3]
SMALL_ITEMS = (16 << 10, 16 << 10)  # work items of 16 KiB: many of them, even in a test


def run(*args: str) -> int:
    return prepare.main([str(a) for a in args])


KILLABLE = f"""
import sys
from pipelines import prepare
from pipelines.text import corpus
corpus.ITEM_BYTES = {SMALL_ITEMS}
sys.exit(prepare.main(sys.argv[1:]))
"""


def records(out: str) -> list[str]:
    return [f for f in storage.files(storage.join(out, ".prepare")) if f != "state.json"]


def same_dataset(a: str, b: str) -> None:
    """The same tokenizer, split totals and rows, shard by shard."""
    ma, mb = dataset.load_manifest(a), dataset.load_manifest(b)
    assert ma.tokenizer == mb.tokenizer and ma.source == mb.source
    for name in dataset.SPLITS:
        sa, sb = ma.splits[name], mb.splits[name]
        assert (sa.documents, sa.bytes, sa.tokens, sa.rows, sa.padding) == \
            (sb.documents, sb.bytes, sb.tokens, sb.rows, sb.padding)
        assert [(s.file, s.rows, s.sha256) for s in sa.shards] == \
            [(s.file, s.rows, s.sha256) for s in sb.shards]
        for x, y in zip(dataset.read_split(a, name), dataset.read_split(b, name)):
            assert np.array_equal(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_killed_prepare_resumes_with_the_same_rows(ray_local, tmp_path, monkeypatch, capsys,
                                                     shakespeare_path, where, request):
    """SIGKILL the driver midway (it runs apart, on this test's cluster); the same command
    again reuses the items that finished and ends with what an uninterrupted run makes."""
    out = str(tmp_path / "ds") if where == "local" else request.getfixturevalue("bucket") + "/ds"
    flags = ["--corpus", shakespeare_path, "--vocab_size", "300", "--seq_len", "64",
             "--max_doc_bytes", "4096", "--out", out]
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-c", KILLABLE, *map(str, flags), "--address",
             ray_local.get_runtime_context().gcs_address], cwd=ROOT, stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while len(records(out)) < 4:
        assert driver.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "driver.log").read_text()
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not storage.exists(storage.join(out, dataset.MANIFEST))  # nothing looks complete
    finished = len(records(out))
    capsys.readouterr()
    assert run(*flags, "--seq_len", "32") == 2  # other flags: refused, left as it is
    assert "holds an unfinished prepare of other inputs or flags (changed: seq_len)" in \
        capsys.readouterr().err and len(records(out)) == finished

    monkeypatch.setattr(corpus, "ITEM_BYTES", SMALL_ITEMS)
    cfg = parse(prepare.PrepareConfig, [str(f) for f in flags], "p")
    resumed = prepare.prepare(cfg)
    assert finished <= resumed["reused"] < resumed["items"]
    assert not storage.exists(storage.join(out, ".prepare"))
    whole = prepare.prepare(replace(cfg, out=str(tmp_path / "whole")))
    assert whole["reused"] == 0 and whole["items"] == resumed["items"]
    same_dataset(out, str(tmp_path / "whole"))
    if where == "local":  # every file the manifest names, and no other (no temp files)
        manifest = dataset.load_manifest(out)
        named = {s.file for split in manifest.splits.values() for s in split.shards}
        assert {f for f in storage.files(out) if f.endswith(".parquet") or ".tmp-" in f} == named
