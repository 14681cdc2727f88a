"""The Ray side of the prepare job (pipelines/prepare.py): passes over the work items.

    passes = Passes(cfg, out, target, listing(cfg), fingerprint, NOT_FINGERPRINTED)
    tokenizer, sample_s = passes.tokenizer(given, config, resume=False)   # sample pass (+ BPE)
    records, invalid = passes.tokenize(None)                              # tokenize pass
    manifest = passes.manifest(records, invalid)                          # split rules, counts

Each pass plans its work items from a fresh, streamed listing (`items`: a few paths and byte
ranges each, so the driver's list grows with the files, not the bytes) and runs them as a Ray
Data pipeline (pipelines/preparing/dataflow.py); the driver gets back small records, never
text or ids. What the workers do is pipelines/preparing/worker.py. (dataflow, and Ray, load
only when a pass runs: bad input ends the command before Ray is imported.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from gpt2core import storage
from pipelines.common import dataset, ray_session
from pipelines.common.flags import verbose
from pipelines.preparing.config import PrepareConfig
from pipelines.preparing.worker import (
    RECORDS,
    ItemRecord,
    TaskSpec,
    item_key,
    sample_item,
    segments_digest,
)
from pipelines.text import corpus
from pipelines.text.encoding import encoder_spec

if TYPE_CHECKING:
    from gpt2core.tokenizer import Tokenizer

PROBE_BYTES = 64 << 10  # text compared between tiktoken and tokenizers before trusting tiktoken
GROUP_BYTES = 1 << 20  # Parquet row groups of about this much: training's unit of shuffling


@dataclass
class Listing:
    """The inputs, as one streamed listing saw them."""

    files: int = 0
    bytes: int = 0
    val_bytes: int = 0  # of --eval_corpus
    digest: str = ""  # sha256 over (uri, size, mtime, role, format) of every file, in order


def _sources(cfg: PrepareConfig, check: str) -> Iterator[corpus.Source]:
    per_line = cfg.doc_per_line or cfg.pretokenized
    yield from corpus.sources(cfg.corpus, role="train" if cfg.eval_corpus else "auto",
                              per_line=per_line, text_field=cfg.text_field, check=check)
    yield from corpus.sources(cfg.eval_corpus, role="val", per_line=per_line,
                              text_field=cfg.text_field, check=check)


def listing(cfg: PrepareConfig) -> Listing:
    """One pass over the inputs (the first file of each kind checked): counts and a digest."""
    found = Listing()
    for s in _digested(_sources(cfg, "first"), found):
        found.files, found.bytes = found.files + 1, found.bytes + s.size
        found.val_bytes += s.size if s.role == "val" else 0
    if not found.bytes:
        raise corpus.CorpusError("the corpus is empty: every input file is empty.")
    if cfg.eval_corpus and not found.val_bytes:
        raise corpus.CorpusError("the validation split is empty: every --eval_corpus file is "
                                 "empty.")
    return found


def _digested(sources: Iterator[corpus.Source], into: Listing) -> Iterator[corpus.Source]:
    """The sources, passed through; at the end, into.digest is their digest."""
    digest = hashlib.sha256()
    for s in sources:
        digest.update(f"{s.uri}\0{s.size}\0{s.mtime_ns}\0{s.role}\0{s.fmt}\n".encode())
        yield s
    into.digest = digest.hexdigest()


@dataclass
class Passes:
    """The Ray part of one prepare: the passes over the work items, as tasks."""

    cfg: PrepareConfig
    out: str
    target: int  # bytes per work item
    inputs: Listing
    fingerprint: str
    not_fingerprinted: tuple[str, ...]  # flags left out of the fingerprint and the manifest
    spec: TaskSpec | None = None  # set with the tokenizer
    vocab_size: int = 0
    redone: int = 0  # items tokenized again because the lowest hash went to validation

    def items(self) -> Iterator[tuple[int, list[dict]]]:
        """(index, segments) of every work item, from a fresh listing; raises if the inputs
        changed since the first."""
        seen = Listing()
        sources = _digested(_sources(self.cfg, "none"), seen)
        yield from enumerate(corpus.iter_groups(corpus.plan(sources, self.cfg.max_doc_bytes),
                                                self.target))
        if seen.digest != self.inputs.digest:
            raise corpus.CorpusError("the corpus changed while it was being prepared (files "
                                     "added, removed or rewritten); run prepare again.")

    def tokenizer(self, given: Tokenizer | None, config: dict,
                  resume: bool) -> tuple[Tokenizer, float]:
        """The tokenizer (given, an interrupted run's, or trained on a sample), saved in --out
        with the state file that marks an unfinished prepare; also the encoder spec."""
        cfg, start = self.cfg, time.perf_counter()
        saved = _saved_tokenizer(self.out, self.fingerprint) if resume and not given else None
        training = given is None and saved is None
        texts = self.sample(cfg.tokenizer_sample_bytes if training else PROBE_BYTES, training)
        sample_s = time.perf_counter() - start
        tokenizer = given or saved or _train_tokenizer(texts, cfg.vocab_size)
        if not resume or training:
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer.save(tmp)
                storage.upload(tmp, self.out)
            storage.write_text(storage.join(self.out, dataset.STATE), json.dumps(
                {"fingerprint": self.fingerprint, "config": config, "item_bytes": self.target,
                 "tokenizer_sha256": tokenizer.sha256()}))
        spec = encoder_spec(tokenizer, pretokenized=cfg.pretokenized, probe=_probe(texts),
                            prefer_tiktoken=cfg.tiktoken)
        dtype, self.vocab_size = dataset.dtype_for(tokenizer.vocab_size), tokenizer.vocab_size
        row = (cfg.seq_len + 1) * dtype.itemsize
        self.spec = TaskSpec(
            self.out, self.fingerprint[:12], corpus.threshold(cfg.val_fraction),
            tokenizer.sha256(), spec, dtype.str, cfg.seq_len,
            (cfg.shard_mb << 20) // row, max(1, GROUP_BYTES // row))
        return tokenizer, sample_s

    def sample(self, budget: int, spread: bool) -> list[str]:
        """Text of the train split for the tokenizer: each item's share of `budget`, from its
        start, read by a Ray Data pass (spread); or the first `budget` bytes, read here (a
        probe of 64 KiB: a pass would cost more than it reads)."""
        from pipelines.preparing import dataflow

        cfg, cut = self.cfg, corpus.threshold(self.cfg.val_fraction)
        if not spread:
            texts, taken = [], 0
            for _, segments in self.items():
                texts += sample_item(segments, budget - taken, cut, cfg.text_field,
                                     cfg.max_doc_bytes)
                taken = sum(map(len, texts))
                if taken >= budget:
                    break
            return texts
        read = functools.partial(dataflow.read_sample, budget, self.inputs.bytes, cut,
                                 cfg.text_field, cfg.max_doc_bytes)
        with _execution():
            rows = dataflow.items_dataset(list(self.items()), read).take_all()
        return [t for row in sorted(rows, key=lambda r: r["item"]) for t in row["texts"]]

    def tokenize(self, only: set[int] | None,
                 cut: int | None = None) -> tuple[dict[int, ItemRecord], list[int]]:
        """The tokenize pass (or, with `only`, its rerun of those items with another cut):
        records by item, and [replaced bytes, files with some]. Items an interrupted run
        finished are checked and skipped before the dataset is built."""
        from pipelines.preparing import dataflow

        cfg, cut = self.cfg, self.spec.cut if cut is None else cut
        items = [(i, segs) for i, segs in self.items() if only is None or i in only]
        records = self._finished(items, cut)
        todo = [(i, segs) for i, segs in items if i not in records]
        if todo:
            sink = dataflow.Shards(self.spec)
            read = functools.partial(dataflow.read_text, cut, cfg.text_field,
                                     cfg.max_doc_bytes, cfg.max_invalid_utf8)
            with _execution():
                dataflow.tokenized(todo, read, self.spec).write_datasink(sink)
            records.update(sink.records)
        partial, invalid = {}, [0, 0]
        for record in records.values():
            invalid = [invalid[0] + record.invalid, invalid[1] + record.invalid_files]
            for uri, (bad, n, planned, size) in record.partial.items():
                seen = [a + b for a, b in zip(partial.pop(uri, [0, 0, 0]), (bad, n, planned))]
                if seen[2] < size:  # more of the file is in other items
                    partial[uri] = seen
                    continue
                corpus.check_file_utf8(uri, seen[0], seen[1], cfg.max_invalid_utf8)
                invalid = [invalid[0] + seen[0], invalid[1] + (seen[0] > 0)]
        return records, invalid

    def _finished(self, items: list[tuple[int, list[dict]]], cut: int) -> dict[int, ItemRecord]:
        """The records of items an interrupted run finished, their shards checked (size and
        sha256) on the cluster."""
        found = {name.removesuffix(".json") for name in
                 storage.listdir(storage.join(self.out, RECORDS))}
        candidates = [{"item": i, "segments": segments_digest(segs)} for i, segs in items
                      if item_key(self.spec, i, cut) in found]
        if not candidates:
            return {}
        from pipelines.preparing import dataflow

        with _execution():
            rows = ray_session.ray().data.from_items(candidates).map(
                functools.partial(dataflow.check_record, self.spec, cut)).take_all()
        return {r["item"]: ItemRecord.from_json(r["record"]) for r in rows if r["record"]}

    def manifest(self, records: dict[int, ItemRecord], invalid: list[int]) -> dataset.Manifest:
        """The records added up, in corpus order; the split rules applied (and, when no
        document fell below --val_fraction, the items holding the lowest hash redone)."""
        cfg = self.cfg
        splits = _add_up(records)
        documents, val_docs = splits["train"].documents + splits["val"].documents, \
            splits["val"].documents
        if documents == 0:
            raise corpus.CorpusError("the corpus is empty: no file holds a non-blank document.")
        if cfg.eval_corpus and val_docs == 0:
            raise corpus.CorpusError("the validation split is empty: --eval_corpus holds no "
                                     "non-blank document.")
        low = min(r.low for r in records.values())
        holding = {i for i, r in records.items() if r.low == low}
        if not val_docs:  # nothing hashed below --val_fraction: the lowest hash goes to val
            val_docs = sum(records[i].low_count for i in holding)
        if documents == val_docs:
            raise corpus.CorpusError(
                "the train split is empty: --corpus holds no non-blank document."
                if cfg.eval_corpus else f"the corpus is too small to split: its {documents} "
                "document(s) would all go to validation; add text, pass --eval_corpus, or "
                "lower --max_doc_bytes to cut it into more documents.")
        if not splits["val"].documents:  # costs a second pass over those items only
            records.update(self.tokenize(holding, cut=low + 1)[0])
            splits, self.redone = _add_up(records), len(holding)
        spec = self.spec
        corpus.warn_utf8(*invalid)
        return dataset.Manifest(
            tokenizer={"file": "tokenizer.json", "sha256": spec.tokenizer_sha256},
            vocab_size=self.vocab_size, eos_id=spec.encoder["eos_id"], seq_len=cfg.seq_len,
            dtype=np.dtype(spec.dtype).name, splits=splits, group_rows=spec.group_rows,
            source={"files": self.inputs.files, "bytes": self.inputs.bytes,
                    "encoder": spec.encoder["kind"], "invalid_utf8_bytes": invalid[0],
                    "items": len(records)},
            config={k: v for k, v in asdict(cfg).items() if k not in self.not_fingerprinted},
            fingerprint=self.fingerprint,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


@contextmanager
def _execution():
    """A pass's Ray Data execution, on all CPUs (ray_session.all_cpus). One that fails on bad
    input raises the CorpusError or TokenizerError a worker raised, as its one sentence (not
    Ray Data's wrapping, traceback and retry advice), once no task of the pass still runs (Ray
    Data cancels them without waiting; the caller may delete --out next). Any other failure is
    raised as it came, with its traceback. With --verbose Ray Data logs as it does."""
    from gpt2core.tokenizer import TokenizerError

    free, data_log = ray_session.free_cpus(), logging.getLogger("ray.data")
    level = data_log.level
    if not verbose():  # its ERROR lines repeat what is raised here
        data_log.setLevel(logging.CRITICAL)
    try:
        with ray_session.all_cpus():
            yield
    except Exception as e:  # noqa: BLE001 -- looked through, re-raised
        ray_session.wait_for_tasks(free)
        cause = e
        while cause is not None and type(cause) not in (corpus.CorpusError, TokenizerError):
            cause = getattr(cause, "cause", None) or cause.__cause__  # RayTaskError's first
        if cause is None:
            raise
        if cause.args and isinstance(cause.args[0], str):  # Ray Data appends its retry advice
            cause.args = (cause.args[0].partition("\nFailed to ")[0], *cause.args[1:])
        raise cause from None
    finally:
        data_log.setLevel(level)


def _add_up(records: dict[int, ItemRecord]) -> dict[str, dataset.Split]:
    splits = {s: dataset.Split() for s in dataset.SPLITS}
    for i in sorted(records):
        for name, part in records[i].splits.items():
            splits[name].add(part)
    return splits


def _saved_tokenizer(out: str, fingerprint: str) -> Tokenizer | None:
    """An interrupted run's tokenizer, if its state file vouches for it."""
    from gpt2core.tokenizer import Tokenizer, TokenizerError

    try:
        state = json.loads(storage.read_text(storage.join(out, dataset.STATE)))
        tokenizer = Tokenizer.from_pretrained(storage.join(out, "tokenizer.json"))
    except (FileNotFoundError, ValueError, TokenizerError):
        return None
    ok = state.get("fingerprint") == fingerprint and \
        state.get("tokenizer_sha256") == tokenizer.sha256()
    return tokenizer if ok else None


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


def tidy(out: str, manifest: dataset.Manifest) -> None:
    """After the manifest: the records go, and any shard it does not name (a killed task's)."""
    keep = {s.file for split in manifest.splits.values() for s in split.shards}
    for split in dataset.SPLITS:
        for name in storage.listdir(storage.join(out, split)):
            if f"{split}/{name}" not in keep:
                storage.delete(storage.join(out, split, name))
    storage.delete(storage.join(out, RECORDS))
