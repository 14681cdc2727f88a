"""serve/batching.py without Ray: text release, stop strings, and batch independence."""

import pytest
import torch

from gpt2core import GPT2, GPT2Config, Tokenizer, generate
from serve.batching import Job, TextStream, decode_batch, left_pad

TEXTS = ["ROMEO: What light through yonder window breaks?", "naïve café 你好 🙂",
         "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2,
                           n_head=2)).eval()


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


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_a_job_decodes_the_same_alone_or_in_a_batch(tok, model):
    jobs = [Job(tok.encode("ROMEO:"), 12, 1.0, 0.9, seed=1),
            Job(tok.encode("The quick brown"), 5, 0.7, 1.0, seed=2),
            Job(tok.encode("naïve"), 20, 1.0, 0.5, seed=3)]

    def texts(batch):
        out = [""] * len(batch)
        finish = [None] * len(batch)
        for step in decode_batch(model, tok, batch):
            for i, d in enumerate(step):
                if d is not None:
                    assert finish[i] is None, "a row spoke after its last delta"
                    out[i] += d.text
                    finish[i] = d.finish_reason
        assert all(finish), finish
        return out

    together = texts(jobs)
    alone = [texts([j])[0] for j in jobs]
    assert together == alone
    ids = generate(model, jobs[0].prompt_ids, 12, top_p=0.9, seed=[1], eos_id=tok.eos_id,
                   top_k=model.config.vocab_size)
    assert together[0] == tok.decode(ids)
