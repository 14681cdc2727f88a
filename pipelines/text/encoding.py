"""Fast document encoding for the Ray workers: the same ids as gpt2core.Tokenizer, sooner.

A byte-level BPE (ours, or OpenAI's GPT-2 files) converts to a tiktoken `Encoding`, which
encodes about 5x faster than `tokenizers` on one core: each vocabulary string maps back to its
bytes through GPT-2's byte-to-unicode table, the token ids become tiktoken's merge ranks, and
the special tokens stay special. tiktoken merges by rank where `tokenizers` merges by rule; the two
agree when ids follow merge order, which `convertible` checks, and `encoder_spec` also compares
both on sample text before choosing tiktoken. Anything else (WordPiece, other pre-tokenizers)
encodes with `tokenizers`, one thread per task. `--pretokenized` text (subwords separated by
spaces, as the original project's Expanda wrote it) is a vocabulary lookup, unknown words -> <unk>.

    spec = encoder_spec(tokenizer, pretokenized=False, probe=texts)  # on the driver; picklable
    encode = get_encoder(spec)                                       # in a worker; cached
    ids = encode(["some text", "more"])                              # list of 1-D arrays
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # gpt2core imports torch: a second of start-up each worker need not pay
    from gpt2core.tokenizer import Tokenizer


# GPT-2's pre-tokenizer regex, as tokenizers' ByteLevel(use_regex=True) and tiktoken's gpt2 use it
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PROBE = "naïve café 你好 🙂\n\n  x\t'll 's <|endoftext|>  \r\n Hello,   world!! 1234567"
UNK = "<unk>"

Encoder = Callable[[list[str]], list[np.ndarray]]
_cache: dict[str, Encoder] = {}


def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def convertible(tokenizer_json: str) -> bool:
    """True when a tokenizer.json is a GPT-2 style byte-level BPE tiktoken can run as it is."""
    spec = json.loads(tokenizer_json)
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or spec.get("normalizer") is not None:
        return False
    if pre != {**pre, "type": "ByteLevel", "add_prefix_space": False, "use_regex": True}:
        return False
    if model.get("dropout") or model.get("byte_fallback") or model.get("ignore_merges") or \
            model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return False
    if any(not t.get("special") for t in spec.get("added_tokens", [])):
        return False
    vocab, decoder, specials = model["vocab"], byte_decoder(), _specials(spec)
    if not all(c in decoder for token in vocab for c in token if token not in specials):
        return False
    if len({decoder[t] for t in vocab if len(t) == 1 and t in decoder}) < 256:
        return False  # tiktoken needs every single byte as a token
    # merge i makes token a+b; tiktoken applies merges in id order, so ids must rise with i
    merged = [vocab.get("".join(m.split(" ") if isinstance(m, str) else m))
              for m in model.get("merges", [])]
    return None not in merged and all(a < b for a, b in zip(merged, merged[1:]))


def _specials(spec: dict) -> dict[str, int]:
    return {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}


def to_tiktoken(tokenizer_json: str):
    """The tiktoken Encoding for a convertible tokenizer.json (see `convertible`)."""
    import tiktoken

    spec = json.loads(tokenizer_json)
    specials, decoder = _specials(spec), byte_decoder()
    ranks = {bytes(decoder[c] for c in token): i for token, i in spec["model"]["vocab"].items()
             if token not in specials}
    return tiktoken.Encoding("gpt2ray", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials)


def encoder_spec(tokenizer: Tokenizer, *, pretokenized: bool, probe: list[str],
                 prefer_tiktoken: bool = True) -> dict:
    """How workers should encode: {"kind", "tokenizer", "eos_token", "eos_id"}; small and
    picklable."""
    spec = {"tokenizer": tokenizer.backend.to_str(), "eos_token": tokenizer.eos_token,
            "eos_id": tokenizer.eos_id, "key": tokenizer.sha256()}
    if pretokenized:
        from gpt2core.tokenizer import TokenizerError

        if tokenizer.backend.token_to_id(UNK) is None:
            raise TokenizerError(f"--pretokenized needs a vocabulary with an {UNK} token for words "
                             "it does not know; the one from --vocab_path has none.")
        return {**spec, "kind": "lookup"}
    if prefer_tiktoken and convertible(spec["tokenizer"]):
        fast = {**spec, "kind": "tiktoken"}
        texts = [PROBE, *probe]
        if _same(get_encoder(fast)(texts), tokenizer.encode_batch(texts)):
            return fast
    return {**spec, "kind": "tokenizers"}


def _same(a: list[np.ndarray], b: list[list[int]]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def get_encoder(spec: dict) -> Encoder:
    """texts -> list of 1-D integer id arrays; built once per process and tokenizer."""
    key = f"{spec['kind']}:{spec['key']}"
    if key not in _cache:
        _cache[key] = _build(spec)
    return _cache[key]


def _build(spec: dict) -> Encoder:
    if spec["kind"] == "tiktoken":
        enc = to_tiktoken(spec["tokenizer"])
        return lambda texts: [enc.encode_to_numpy(t, allowed_special="all") for t in texts]
    import tokenizers

    backend = tokenizers.Tokenizer.from_str(spec["tokenizer"])
    if spec["kind"] == "lookup":
        vocab = backend.get_vocab(with_added_tokens=True)
        unk = vocab[UNK]
        return lambda texts: [np.fromiter((vocab.get(w, unk) for w in t.split()), np.int64)
                              for t in texts]
    # one thread: Ray gives each task one CPU, and tokenizers would otherwise use them all
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return lambda texts: [np.asarray(e.ids, np.int32) for e in
                          backend.encode_batch_fast(texts, add_special_tokens=False)]
