"""A model dir as evaluate and generate open it: its config, the tokenizer to use with it, and
the context length a run may use; each mismatch raises naming it.

Imports gpt2core lazily, so importing this module stays instant (`gpt2 --help`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gpt2core.errors import UserError

if TYPE_CHECKING:
    from gpt2core import GPT2Config, Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "encoder.json", "vocab.txt")
DTYPES = ("float32", "bfloat16", "int8", "auto")  # gpt2core.quant.DTYPES, without torch's import


def check_dtype(dtype: str | None) -> None:
    """--dtype: one of DTYPES, or None (float32 on CPUs, bf16/fp16 on GPUs)."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype is one of {', '.join(DTYPES)}, got {dtype}.")


def open_model(model_path: str, vocab_path: str | None) -> tuple[GPT2Config, Tokenizer]:
    """The model dir's config and the tokenizer to use with it; raises naming the mismatch.

    The tokenizer is --vocab_path's, else the model dir's own. When both exist they must map the
    same tokens to the same ids; either way it must fit the model's embedding.
    """
    from gpt2core import Tokenizer, TokenizerError
    from gpt2core.modelfile import read_config

    config = read_config(model_path)
    own = dir_tokenizer(model_path)
    if vocab_path is None and own is None:
        raise TokenizerError(f"model dir {model_path} has no tokenizer files; pass --vocab_path "
                             "with the vocabulary it was trained with.")
    tokenizer = Tokenizer.from_pretrained(vocab_path) if vocab_path else own
    if own is not None and vocab_path and not same_vocabulary(tokenizer, own):
        raise TokenizerError(f"--vocab_path {vocab_path} is not the vocabulary of the model in "
                             f"{model_path}; leave --vocab_path out to use the model's own.")
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model in "
                             f"{model_path} only {config.vocab_size}; pass the vocabulary it "
                             "was trained with.")
    return config, tokenizer


def has_tokenizer(path: str | Path) -> bool:
    """Whether a model or dataset dir (local or a URI) holds tokenizer files."""
    from gpt2core import storage

    return bool(set(TOKENIZER_FILES) & storage.files(path))


def dir_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer saved in a model or dataset dir; None when it has no tokenizer files."""
    from gpt2core import Tokenizer, TokenizerError

    if not has_tokenizer(path):
        return None
    try:
        return Tokenizer.from_pretrained(path)
    except TokenizerError as e:
        raise TokenizerError(f"the tokenizer files in {path} are unreadable ({e}); the dir is "
                             "corrupt.") from e


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Same tokens at the same ids (files may differ in layout and still agree)."""
    return a.sha256() == b.sha256() or (
        a.backend.get_vocab(with_added_tokens=True) == b.backend.get_vocab(with_added_tokens=True)
        and a.eos_id == b.eos_id)


def context_length(config: GPT2Config, seq_len: int | None) -> int:
    """--seq_len, else the model's n_positions; ValueError when it exceeds the model's context."""
    length = seq_len or config.n_positions
    if length > config.n_positions:
        raise UserError(f"--seq_len {length} exceeds the model's context of "
                        f"{config.n_positions} tokens; pass at most that.")
    return length
