"""gpt2core/detokenize.py: text released token by token, whole characters, stop strings held
back, a few tokens decoded per token however long the text."""

import pytest

from gpt2core import TextStream, Tokenizer

TEXTS = ["ROMEO: What light through yonder window breaks?", "naïve café 你好 🙂",
         "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=300)


def run_text(tok, text: str, stop=()) -> tuple[list[str], TextStream]:
    ts = TextStream(tok, stop)
    pieces = []
    for i in tok.encode(text):
        pieces.append(ts.push(i))
        if ts.stopped:
            break
    pieces.append(ts.finish())
    return pieces, ts


def test_text_stream_releases_exactly_the_text(tok):
    text = "naïve café 你好 🙂 ROMEO"
    pieces, _ = run_text(tok, text)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # split UTF-8 characters are held back


def test_text_stream_cuts_at_a_stop_string_across_tokens(tok):
    pieces, ts = run_text(tok, "ROMEO: What light through", stop=("light", "zzz"))
    assert ts.stopped and "".join(pieces) == "ROMEO: What "
    assert not any("l" in p for p in pieces)  # the held-back start of the stop never leaked


def test_text_stream_decodes_a_few_tokens_per_push_however_long_the_text(tok, tools):
    ids = tok.encode(" ".join(TEXTS) * 12)
    counting = tools.CountingTokenizer(tok)
    ts = TextStream(counting, stop=("zzz",))
    text = "".join(ts.push(i) for i in ids) + ts.finish()
    assert len(ids) > 400 and text == tok.decode(ids)
    assert max(counting.lengths) <= 6  # a character's bytes and the tokens before it


def test_text_stream_shows_bytes_that_are_not_utf8_at_once(tok):
    from pipelines.text.encoding import byte_decoder

    stray = tok.backend.token_to_id({b: c for c, b in byte_decoder().items()}[0x80])
    ts = TextStream(tok)
    assert [ts.push(i) for i in tok.encode("ab")] == ["a", "b"]
    assert ts.push(stray) == "\ufffd"  # a lone continuation byte: no character to wait for
    first = tok.encode("é")
    assert len(first) == 2 and ts.push(first[0]) == ""  # é's first byte waits for its second
    assert ts.push(first[1]) == "é" and ts.finish() == ""


def test_finish_partial_leaves_out_a_character_the_ids_end_inside(tok):
    ids = tok.encode("ab你")
    assert len(tok.encode("你")) == 3  # one byte a token at this vocabulary
    cut, whole = TextStream(tok), TextStream(tok)
    assert "".join(cut.push(i) for i in ids[:-1]) == "ab"  # the first two bytes wait
    assert cut.finish(partial=True) == "" and cut.text == "ab"
    for i in ids[:-1]:
        whole.push(i)
    assert whole.finish() == "\ufffd"  # without partial: the cut character shows as U+FFFD
