"""pipelines/text/encoding.py: tiktoken gives exactly gpt2core.Tokenizer's ids, or is not used."""

from pathlib import Path

import numpy as np
import pytest

from gpt2core.tokenizer import Tokenizer, TokenizerError
from pipelines.text.encoding import PROBE, convertible, encoder_spec, get_encoder

GPT2_FILES = Path(__file__).resolve().parents[2] / "assets" / "gpt2"
TRICKY = [PROBE, "", " ", "\n\n\n", "a<|endoftext|>b", "  leading and trailing  ", "x" * 3000,
          "tabs\tand\r\nwindows\r\n", "numbers 12345678 and 1.5e-3", "emoji 🙂🙂 and 日本語"]


def same_ids(spec: dict, tokenizer: Tokenizer, texts: list[str]) -> bool:
    got = get_encoder(spec)(texts)
    return all(np.array_equal(a, b) for a, b in zip(got, tokenizer.encode_batch(texts)))


def test_trained_bpe_encodes_identically_with_tiktoken(shakespeare_path):
    text = shakespeare_path.read_text()
    tokenizer = Tokenizer.train([text[:300_000]], vocab_size=2048)
    spec = encoder_spec(tokenizer, pretokenized=False, probe=[])
    assert spec["kind"] == "tiktoken"
    # all of tinyshakespeare, in pieces, plus the awkward cases
    pieces = [text[i:i + 50_000] for i in range(0, len(text), 50_000)]
    assert same_ids(spec, tokenizer, pieces + TRICKY)


def test_openai_gpt2_files_encode_identically_with_tiktoken():
    tokenizer = Tokenizer.from_pretrained(GPT2_FILES)
    spec = encoder_spec(tokenizer, pretokenized=False, probe=[])
    assert spec["kind"] == "tiktoken" and same_ids(spec, tokenizer, TRICKY)


def test_other_tokenizers_fall_back_to_tokenizers(tmp_path):
    (tmp_path / "vocab.txt").write_text("hello\nworld\n##s\n<unk>\n")
    wordpiece = Tokenizer.from_pretrained(tmp_path / "vocab.txt")
    assert not convertible(wordpiece.backend.to_str())
    spec = encoder_spec(wordpiece, pretokenized=False, probe=["Hello worlds"])
    assert spec["kind"] == "tokenizers" and same_ids(spec, wordpiece, ["Hello worlds x"])
    bpe = Tokenizer.train(["some text to learn from " * 50], vocab_size=300)
    spec = encoder_spec(bpe, pretokenized=False, probe=[], prefer_tiktoken=False)
    assert spec["kind"] == "tokenizers" and same_ids(spec, bpe, TRICKY)


def test_pretokenized_lines_are_a_vocabulary_lookup(tmp_path):
    (tmp_path / "vocab.txt").write_text("hello\nworld\n##s\n<unk>\n")
    wordpiece = Tokenizer.from_pretrained(tmp_path / "vocab.txt")
    spec = encoder_spec(wordpiece, pretokenized=True, probe=[])
    # ids: <s>=0 </s>=1 <pad>=2, then the words of vocab.txt in order
    assert [a.tolist() for a in get_encoder(spec)(["hello world ##s", "hello nope"])] == \
        [[3, 4, 5], [3, 6]]
    (tmp_path / "no_unk.txt").write_text("hello\n<unk>\n")
    bpe = Tokenizer.train(["abc " * 20], vocab_size=300)
    with pytest.raises(TokenizerError, match="<unk>"):
        encoder_spec(bpe, pretokenized=True, probe=[])
