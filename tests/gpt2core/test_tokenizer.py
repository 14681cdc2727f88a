"""gpt2core.tokenizer: training, round trips, tiktoken parity, every file format, errors."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2core.tokenizer import EOS_TOKEN, Tokenizer, TokenizerError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "gpt2"
ENCODER_SHA = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
CORPUS = [  # tiny and inline, as in nanochat: the test must not depend on a data dir
    "First Citizen: Before we proceed any further, hear me speak.\n",
    "All: Speak, speak. You are all resolved rather to die than to famish?\n",
    "def main(argv=None):\n    return 0  # the end\n\n",
    "naïve café 你好 🙂 — 1234 5678 they'll I'm it's\n",
] * 10
TRICKY = [
    "", " ", "  ", "\n", "a  \n\n  b   ", "I'm they'll we've she'd it's", "I'M THEY'LL",
    "123456789", "3.14159 1,000,000", "naïve café 你好 🙂", "Hello, world!", "\t\tindented\n",
    "trailing spaces   ", "   leading", "\r\nwindows\r\n", "ümlaut Ωmega Ελληνικά русский العربية",
    "👨‍👩‍👧 family 🇫🇷 flag", "x\u00a0y\u3000z\u2028w", "def f(x):\n    return x ** 2  # sq\n",
    "'s'd'm't'll've're", "multiple    spaces\tand\ttabs", "\x00\x01\x7f control",
    "a\u0301 combining",
]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=320, min_frequency=2)


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.from_pretrained(ASSETS)


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    """tiktoken's `gpt2` encoding built from the local files (it cannot download here)."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache written outside tmp
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(ASSETS / "vocab.bpe"), vocab_bpe_hash=VOCAB_BPE_SHA,
            encoder_json_file=str(ASSETS / "encoder.json"), encoder_json_hash=ENCODER_SHA)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOS_TOKEN: 50256}, explicit_n_vocab=50257)


def big_text() -> str:
    """~100 kB of varied text: prose, code, numbers, whitespace runs, several scripts."""
    parts = []
    for i in range(300):
        parts += [f"Sentence {i}: the quick brown fox jumps over {i * 37 % 1000} lazy dogs.",
                  "  \n\n   " * (i % 4), f"def f_{i}(x):\n\treturn x * {i}  # comment\n",
                  "Ça va? 你好世界 🙂🚀 naïve coöperation — “quotes” ‘single’ …" * (i % 3),
                  " " * (i % 7), "I'm sure they'll say it's fine; we've done it.\r\n"]
    return "".join(parts)


# --- training ------------------------------------------------------------------------------

def test_train_honours_vocab_size_and_round_trips(trained):
    assert 257 < trained.vocab_size <= 320
    assert 0 <= trained.eos_id < trained.vocab_size
    assert trained.decode([trained.eos_id]) == EOS_TOKEN
    text = "First Citizen: speak, speak!"
    ids = trained.encode(text)
    assert len(ids) < len(text.encode())  # merges were learned, not just bytes
    assert trained.decode(ids) == text


def test_train_path_items_are_files_and_str_items_are_text(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("zebra crossing\n" * 50, encoding="utf-8")
    from_file = Tokenizer.train([corpus], vocab_size=300)
    from_name = Tokenizer.train([str(corpus)], vocab_size=300)  # a str is text, even a path
    assert len(from_file.encode("zebra crossing")) <= 3
    assert len(from_name.encode("zebra crossing")) > 3
    assert Tokenizer.train(corpus, vocab_size=300).encode("zebra") == from_file.encode("zebra")


def test_train_errors(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size=257"):
        Tokenizer.train(CORPUS, vocab_size=257)
    with pytest.raises(TokenizerError, match="missing.txt"):
        Tokenizer.train([tmp_path / "missing.txt"], vocab_size=300)
    with pytest.raises(TokenizerError, match="bytes"):
        Tokenizer.train([b"raw bytes"], vocab_size=300)


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["trained", "gpt2"])
@pytest.mark.parametrize("text", ["naïve café 你好 🙂", f"1{EOS_TOKEN}2 {EOS_TOKEN}\n", *TRICKY])
def test_round_trip_examples(request, name, text):
    tok = request.getfixturevalue(name)
    assert tok.decode(tok.encode(text)) == text


def test_eos_inside_text_is_one_special_token(trained, gpt2):
    for tok in (trained, gpt2):
        ids = tok.encode(f"a{EOS_TOKEN}b")
        assert ids.count(tok.eos_id) == 1
    assert gpt2.eos_id == 50256 and gpt2.vocab_size == 50257


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(trained, gpt2, text):
    assert trained.decode(trained.encode(text)) == text
    assert gpt2.decode(gpt2.encode(text)) == text


def test_encode_batch_and_decode_inputs(gpt2):
    texts = [*TRICKY, big_text()[:5000]]
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]
    ids = gpt2.encode("naïve café 你好 🙂")
    for as_array in (np.array(ids), torch.tensor(ids), tuple(ids)):
        assert gpt2.decode(as_array) == "naïve café 你好 🙂"


# --- tiktoken parity -----------------------------------------------------------------------

@pytest.mark.parametrize("text", TRICKY)
def test_tiktoken_parity_tricky(gpt2, tiktoken_gpt2, text):
    assert gpt2.encode(text) == tiktoken_gpt2.encode_ordinary(text)


@settings(max_examples=200, deadline=None)
@given(st.text().filter(lambda s: EOS_TOKEN not in s))
def test_tiktoken_parity_any_unicode(gpt2, tiktoken_gpt2, text):
    assert gpt2.encode(text) == tiktoken_gpt2.encode_ordinary(text)


def test_tiktoken_parity_large_text(gpt2, tiktoken_gpt2):
    text = big_text()
    assert gpt2.encode(text) == tiktoken_gpt2.encode_ordinary(text)
    text_with_eos = f"{text}{EOS_TOKEN}{text[:999]}"
    assert gpt2.encode(text_with_eos) == tiktoken_gpt2.encode(text_with_eos, allowed_special="all")


# --- file formats --------------------------------------------------------------------------

def test_save_writes_hf_gpt2_layout_atomically(gpt2, tmp_path):
    out = tmp_path / "new" / "dir"
    gpt2.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "tokenizer.json", "vocab.json"]
    assert (out / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert vocab[EOS_TOKEN] == 50256 and len(vocab) == 50257
    assert hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest() == gpt2.sha256()


def test_every_format_loads_to_the_same_ids(gpt2, tmp_path):
    text = big_text()[:3000]
    want = gpt2.encode(text)
    gpt2.save(tmp_path / "saved")
    bpe_only = tmp_path / "bpe_only"
    bpe_only.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tmp_path / "saved" / name, bpe_only / name)
    openai = tmp_path / "openai"
    shutil.copytree(ASSETS, openai)
    renamed = tmp_path / "renamed.json"
    shutil.copy(tmp_path / "saved" / "tokenizer.json", renamed)
    paths = [tmp_path / "saved", tmp_path / "saved" / "tokenizer.json", renamed, bpe_only,
             bpe_only / "vocab.json", bpe_only / "merges.txt", openai, openai / "encoder.json",
             openai / "vocab.bpe", str(ASSETS / "encoder.json")]
    for path in paths:
        tok = Tokenizer.from_pretrained(path)
        assert tok.encode(text) == want, path
        assert (tok.eos_id, tok.vocab_size) == (50256, 50257), path
    # the manifest's hash: a reload of what we saved is the same tokenizer
    assert Tokenizer.from_pretrained(tmp_path / "saved").sha256() == gpt2.sha256()


def test_trained_tokenizer_survives_save_and_load(trained, tmp_path):
    trained.save(tmp_path)
    for path in (tmp_path, tmp_path / "vocab.json"):
        tok = Tokenizer.from_pretrained(path)
        assert tok.encode(CORPUS[0] + EOS_TOKEN) == trained.encode(CORPUS[0] + EOS_TOKEN)
        assert tok.eos_id == trained.eos_id and tok.vocab_size == trained.vocab_size


def test_transformers_loads_what_we_save(gpt2, tmp_path):
    transformers = pytest.importorskip("transformers")
    gpt2.save(tmp_path)
    text = big_text()[:3000] + EOS_TOKEN + "tail"
    want = gpt2.encode(text)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast(text, add_special_tokens=False)["input_ids"] == want
    # vocab.json + merges.txt alone, as older GPT-2 dirs ship them (from_pretrained: the
    # constructor's keyword names changed between transformers 4 and 5)
    (tmp_path / "tokenizer.json").unlink()
    hf_gpt2 = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    assert hf_gpt2(text, add_special_tokens=False)["input_ids"] == want
    assert hf_gpt2.eos_token_id == gpt2.eos_id


def test_wordpiece_vocab_txt(tmp_path):
    words = ["<unk>", "hello", "world", "##s", "un", "##believ", "##able", ",", "!"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    for path in (tmp_path, tmp_path / "vocab.txt"):
        tok = Tokenizer.from_pretrained(path)
        assert tok.eos_id == 1 and tok.eos_token == "</s>"
        assert tok.vocab_size == 3 + len(words)
        ids = tok.encode("Hello worlds, unbelievable! zzz</s>")
        # <s>, </s>, <pad> come first, so each word's id is its line index + 3; zzz -> <unk>
        assert ids == [4, 5, 6, 10, 7, 8, 9, 11, 3, 1]
        assert tok.decode(ids[:7]) == "hello worlds, unbelievable"  # lossy: lowercased
    tok.save(tmp_path / "saved")
    assert [p.name for p in (tmp_path / "saved").iterdir()] == ["tokenizer.json"]
    reloaded = Tokenizer.from_pretrained(tmp_path / "saved")
    assert reloaded.eos_id == 1 and reloaded.encode("hello worlds") == [4, 5, 6]


# --- errors --------------------------------------------------------------------------------

def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="nowhere"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="empty.*expected tokenizer.json"):
        Tokenizer.from_pretrained(empty)
    (tmp_path / "tokenizer.json").write_text('{"model": oops', encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json is not a valid"):
        Tokenizer.from_pretrained(tmp_path)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(ASSETS / "encoder.json", lonely / "encoder.json")
    with pytest.raises(TokenizerError, match="vocab.bpe"):
        Tokenizer.from_pretrained(lonely / "encoder.json")
    (lonely / "vocab.bpe").write_text("#version: 0.2\nĠ t\nnot-a-merge\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="vocab.bpe line 3"):
        Tokenizer.from_pretrained(lonely)
    (lonely / "encoder.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TokenizerError, match="encoder.json must be a JSON object"):
        Tokenizer.from_pretrained(lonely)
    (tmp_path / "vocab.txt").write_text("hello\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="no <unk>"):
        Tokenizer.from_pretrained(tmp_path / "vocab.txt")


def test_missing_eos_token_is_an_error(trained):
    with pytest.raises(TokenizerError, match="<nope>"):
        Tokenizer(trained.backend, eos_token="<nope>")


@pytest.mark.parametrize("text", ["naïve café 你好 🙂", "🙂🚀 ok", "a\u00e9"])
def test_a_partial_decode_never_ends_inside_a_character(trained, gpt2, text):
    for tok in (trained, gpt2):
        ids = tok.encode(text)
        for cut in range(1, len(ids) + 1):
            partial = tok.decode(ids[:cut], partial=True)
            assert "\ufffd" not in partial, (tok, text, cut)
            assert text.startswith(partial)  # nothing lost but the unfinished character
        assert tok.decode(ids, partial=True) == text


def test_a_partial_decode_keeps_a_genuine_replacement_character(gpt2):
    ids = gpt2.encode("x \ufffd y")
    assert gpt2.decode(ids, partial=True) == "x \ufffd y"
