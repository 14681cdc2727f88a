"""Byte-level BPE tokenizer: train, load, save, encode, decode.

A thin wrapper over Hugging Face `tokenizers` (the Rust BPE; no merge loop in Python). With the
original GPT-2 files it gives exactly the ids of tiktoken's `gpt2` encoding.

`Tokenizer.from_pretrained(path)` reads, in this order of preference:
  1. tokenizer.json            Hugging Face `tokenizers` file (what `save` writes first)
  2. vocab.json + merges.txt   Hugging Face GPT-2 layout
  3. encoder.json + vocab.bpe  OpenAI's GPT-2 release (same content as 2.)
  4. vocab.txt                 WordPiece vocab of affjljoo3581/GPT2: ids <s>=0, </s>=1, <pad>=2,
                               then the words of vocab.txt in order; eos is </s>.
`path` is a directory holding one of these, or one of the files itself.

decode(encode(x)) == x holds for byte-level BPE only: WordPiece lowercases and drops whitespace.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from gpt2core.errors import UserError

EOS_TOKEN = "<|endoftext|>"
# the original WordPiece project puts these three before the words of vocab.txt, in this order
WORDPIECE_SPECIALS = ("<s>", "</s>", "<pad>")
WORDPIECE_EOS, WORDPIECE_UNK = "</s>", "<unk>"
# vocab file -> merges file, for the two GPT-2 layouts (HF's, then OpenAI's)
BPE_FILE_PAIRS = {"vocab.json": "merges.txt", "encoder.json": "vocab.bpe"}
EXPECTED = ("tokenizer.json, vocab.json + merges.txt, encoder.json + vocab.bpe, "
            "or a WordPiece vocab.txt")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".jsonl", ".png")  # not fetched for a tokenizer


class TokenizerError(UserError):
    """A tokenizer file or argument is wrong; the message names it and the fix."""


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer`: ids in, ids out, no special tokens added on encode."""

    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str = EOS_TOKEN):
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise TokenizerError(f"the tokenizer has no token {eos_token!r}; "
                                 "pass eos_token= one of its tokens.")
        specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        if eos_token not in specials:
            # registered as special so "<|endoftext|>" in text maps to one id, never to pieces
            # (the token is already in the vocab, so its id does not change)
            backend.add_special_tokens([eos_token])
        self._backend, self._eos_token, self._eos_id = backend, eos_token, eos_id

    # --- construction -------------------------------------------------------------------

    @classmethod
    def train(cls, files_or_texts: Iterable[str | os.PathLike] | str | os.PathLike,
              vocab_size: int, min_frequency: int = 2,
              show_progress: bool = False) -> Tokenizer:
        """Train a GPT-2 style byte-level BPE.

        Rule for the input: each `pathlib.Path` (any `os.PathLike`) is a UTF-8 text file to read;
        each `str` is text itself, never a file name. A single Path or str is one item.
        """
        if vocab_size <= 256 + 1:
            raise TokenizerError(f"vocab_size={vocab_size} is too small: byte-level BPE needs "
                                 f"more than 257 (256 bytes + {EOS_TOKEN}); pass a larger one.")
        single = isinstance(files_or_texts, str | os.PathLike)
        items = [files_or_texts] if single else list(files_or_texts)
        for item in items:
            if isinstance(item, os.PathLike) and not Path(item).is_file():
                raise TokenizerError(f"training file {item} is not a file; pass existing files.")
            if not isinstance(item, str | os.PathLike):
                raise TokenizerError(f"cannot train on a {type(item).__name__}; pass str texts "
                                     "or pathlib.Path files.")
        backend = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
            # all 256 bytes from the start, so any text is encodable whatever the corpus
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
        backend.train_from_iterator(_texts(items), trainer=trainer)
        return cls(backend)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, eos_token: str | None = None) -> Tokenizer:
        """Load from a directory or a file (formats in the module docstring).

        eos_token defaults to "<|endoftext|>", or "</s>" where only that one exists. A URI
        (s3://…) is read through gpt2core.storage: only its tokenizer files are fetched.
        """
        from gpt2core import storage

        if storage.is_uri(path):
            if not storage.exists(path):
                raise TokenizerError(f"tokenizer path {path} does not exist; expected "
                                     f"{EXPECTED}.")
            with storage.local_copy(path, skip=WEIGHT_SUFFIXES) as local:
                return cls.from_pretrained(local, eos_token)
        path = Path(path)
        if not path.exists():
            raise TokenizerError(f"tokenizer path {path} does not exist; expected {EXPECTED}.")
        if path.is_dir():
            backend = _load_dir(path)
        else:
            backend = _load_file(path)
        if eos_token is None:
            has_eos = backend.token_to_id(EOS_TOKEN) is not None
            eos_token = EOS_TOKEN if has_eos or backend.token_to_id(WORDPIECE_EOS) is None \
                else WORDPIECE_EOS
        return cls(backend, eos_token)

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, and for BPE also vocab.json + merges.txt (HF GPT-2 layout)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # the file is exactly backend.to_str(), so sha256() == sha256sum tokenizer.json
        files = {"tokenizer.json": self._backend.to_str()}
        if isinstance(self._backend.model, models.BPE):
            model = json.loads(files["tokenizer.json"])["model"]
            vocab = dict(model["vocab"])
            added = self._backend.get_added_tokens_decoder()
            vocab.update({t.content: i for i, t in added.items()})
            vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
            # merges are [a, b] pairs in newer tokenizer.json files, "a b" strings in older ones
            merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            files["vocab.json"] = json.dumps(vocab, ensure_ascii=False)
            files["merges.txt"] = "#version: 0.2\n" + "".join(m + "\n" for m in merges)
        for name, text in files.items():
            _write_atomic(directory / name, text)

    # --- use ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Adds nothing; "<|endoftext|>" inside text becomes eos_id."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts -> ids, in parallel in Rust (the fast path skips offset tracking)."""
        return [e.ids for e in self._backend.encode_batch_fast(list(texts),
                                                               add_special_tokens=False)]

    def decode(self, ids, *, partial: bool = False) -> str:
        """Ids (list, numpy or torch 1-D) -> text. Special tokens are kept, so round trips hold.

        partial: the ids were cut short (a generation stopped at its length limit), so a
        character whose UTF-8 bytes they end inside is left out, not shown as U+FFFD; bytes
        that are not UTF-8 anywhere else still are.
        """
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        text = self._backend.decode(ids, skip_special_tokens=False)
        if partial and text.endswith("\ufffd") and _incomplete_utf8(self._tail_bytes(ids)):
            return text[:-1]  # the decoder shows an unfinished character as one U+FFFD
        return text

    def _tail_bytes(self, ids: list[int]) -> bytes:
        """The bytes of the last few tokens of a byte-level BPE (b"" for WordPiece, whose
        tokens are whole characters)."""
        if not isinstance(self._backend.decoder, decoders.ByteLevel):
            return b""
        table = _unicode_to_byte()
        return bytes(table.get(c, 0x3F) for i in ids[-4:] for c in self._backend.id_to_token(i))

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: the embedding rows a model needs."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    def sha256(self) -> str:
        """sha256 of the canonical tokenizer.json text: identifies the tokenizer in manifests."""
        return hashlib.sha256(self._backend.to_str().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        kind = type(self._backend.model).__name__
        return f"Tokenizer({kind}, vocab_size={self.vocab_size}, eos={self._eos_token!r})"


# --- helpers ------------------------------------------------------------------------------

@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a token string uses -> its byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + n): b for n, b in enumerate(moved)}}


def _incomplete_utf8(data: bytes) -> bool:
    """Whether `data` ends inside a UTF-8 character: a lead byte followed by fewer
    continuation bytes than it announces."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: the last lead (or ASCII) byte
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 \
                else 4 if byte & 0xF8 == 0xF0 else 1
            return back < need
    return False


def _byte_level(model: models.Model) -> tokenizers.Tokenizer:
    """GPT-2's pipeline: its regex split, bytes mapped to printable chars, no post-processor."""
    backend = tokenizers.Tokenizer(model)
    # add_prefix_space=False: " " is not prepended to the text, as in GPT-2/tiktoken
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _texts(items: list[str | os.PathLike]) -> Iterator[str]:
    """Training texts: str items as they are, files line by line (newlines kept)."""
    for item in items:
        if isinstance(item, str):
            yield item
            continue
        try:
            with open(item, encoding="utf-8") as f:
                yield from f
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read training file {item} as UTF-8 text ({e}).") from e


def _load_dir(path: Path) -> tokenizers.Tokenizer:
    if (path / "tokenizer.json").is_file():
        return _load_tokenizer_json(path / "tokenizer.json")
    for vocab_name, merges_name in BPE_FILE_PAIRS.items():
        if (path / vocab_name).is_file() and (path / merges_name).is_file():
            return _load_bpe(path / vocab_name, path / merges_name)
    if (path / "vocab.txt").is_file():
        return _load_wordpiece(path / "vocab.txt")
    raise TokenizerError(f"directory {path} holds no tokenizer files; expected {EXPECTED}.")


def _load_file(path: Path) -> tokenizers.Tokenizer:
    # a file of a two-file layout finds its partner beside it, whichever of the two is named
    pairs = {**BPE_FILE_PAIRS, **{m: v for v, m in BPE_FILE_PAIRS.items()}}
    if path.name in pairs:
        other = path.with_name(pairs[path.name])
        if not other.is_file():
            raise TokenizerError(f"{path} needs {other.name} beside it, but {other} is missing.")
        vocab_file, merges_file = (path, other) if path.name in BPE_FILE_PAIRS else (other, path)
        return _load_bpe(vocab_file, merges_file)
    if path.suffix == ".json":
        return _load_tokenizer_json(path)
    if path.suffix == ".txt":
        return _load_wordpiece(path)
    raise TokenizerError(f"cannot tell the format of {path}; expected {EXPECTED}.")


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception for every parse error
        raise TokenizerError(f"{path} is not a valid Hugging Face tokenizer.json ({e}); "
                             "re-save it with Tokenizer.save or tokenizers.") from e


def _load_bpe(vocab_file: Path, merges_file: Path) -> tokenizers.Tokenizer:
    """GPT-2 byte-level BPE from vocab.json/encoder.json (token -> id) and merges/vocab.bpe."""
    vocab = _read_json(vocab_file)
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise TokenizerError(f"{vocab_file} must be a JSON object mapping token to integer id.")
    merges = []
    for n, line in enumerate(_read_text(merges_file).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise TokenizerError(f"{merges_file} line {n} is not a merge 'a b': {line!r}.")
        merges.append((pair[0], pair[1]))
    try:
        # explicit: dropout, byte fallback or vocab-first matching would all break tiktoken parity
        model = models.BPE(vocab, merges, dropout=None, byte_fallback=False, ignore_merges=False)
    except Exception as e:
        raise TokenizerError(f"{vocab_file} and {merges_file} do not form a BPE ({e}).") from e
    return _byte_level(model)


def _load_wordpiece(path: Path) -> tokenizers.Tokenizer:
    """WordPiece vocab.txt of affjljoo3581/GPT2; normalization mirrors its Tokenizer."""
    words = list(WORDPIECE_SPECIALS) + _read_text(path).split()
    vocab = {w: i for i, w in enumerate(words)}  # a repeated word keeps its last id, as there
    if WORDPIECE_UNK not in vocab:
        raise TokenizerError(f"WordPiece vocab {path} has no {WORDPIECE_UNK} line; add one.")
    backend = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=WORDPIECE_UNK,
                                                    max_input_chars_per_word=100))
    # the original lowercases, drops control chars and splits CJK chars and punctuation apart
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens([*WORDPIECE_SPECIALS, WORDPIECE_UNK])
    return backend


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer file {path} as UTF-8 text ({e}).") from e


def _read_json(path: Path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); expected {EXPECTED}.") from e


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temp name beside `path`, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
