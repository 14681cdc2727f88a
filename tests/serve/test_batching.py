"""serve/batching.py without Ray: continuous batching on the engine's slots (text release:
tests/gpt2core/test_detokenize.py)."""

import pytest
import torch

from gpt2core import GPT2, GPT2Config, Tokenizer, generate
from serve.batching import Decoder, Generation

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


JOBS = [("ROMEO:", 12, 1.0, 0.9, 1), ("The quick brown", 5, 0.7, 1.0, 2),
        ("naïve", 20, 1.0, 0.5, 3), ("What light", 30, 0.0, 1.0, 4),
        ("ROMEO: What light through yonder window", 9, 1.2, 0.8, 5)]


def jobs(tok):
    return [Generation(tok.encode(p), n, t, top_p, seed) for p, n, t, top_p, seed in JOBS]


def decode(decoder: Decoder, schedule: dict[int, list[tuple[int, Generation]]]
           ) -> tuple[dict, list]:
    """Run `decoder`, admitting schedule[s] before step s; texts, finish reasons, batch sizes."""
    text, finish, sizes, s = {}, {}, [], 0
    while decoder.rows or any(k >= s for k in schedule):
        new = schedule.get(s, [])
        for key, _ in new:
            text[key] = ""
        deltas = decoder.step(new)
        sizes.append(len(deltas))
        for key, d in deltas:
            assert key not in finish, "a row spoke after its last delta"
            text[key] += d.text
            if d.finish_reason:
                finish[key] = d.finish_reason
        s += 1
    assert set(finish) == set(text), "every job ends with a finish_reason"
    return text, sizes


def test_a_job_decodes_the_same_alone_or_joining_a_running_batch(tok, model):
    js = jobs(tok)
    alone = [decode(Decoder(model, tok, 1), {0: [(i, j)]})[0][i] for i, j in enumerate(js)]
    # rows come and go: a newcomer takes the lowest free slot, between running rows
    decoder = Decoder(model, tok, 3)
    together, sizes = decode(decoder, {0: [(0, js[0]), (1, js[1])], 3: [(2, js[2])],
                                       6: [(3, js[3])], 14: [(4, js[4])]})
    assert [together[i] for i in range(len(js))] == alone
    assert max(sizes) == 3
    ids = generate(model, js[0].prompt_ids, 12, top_p=0.9, seed=[1], eos_id=tok.eos_id)
    assert together[0] == tok.decode(ids)  # and the same as gpt2core's own sampler


@pytest.mark.slow
def test_a_compiled_decoder_warmed_up_decodes_the_eager_text_and_compiles_nothing_more(
        tok, model):
    from torch._dynamo.utils import counters

    # no nucleus here: a tiny random model's probabilities tie exactly at the cut now and
    # then, and an ulp of difference between the steps then keeps one token more or less
    js = [Generation(j.prompt_ids, j.max_tokens, j.temperature, 1.0, j.seed) for j in jobs(tok)]
    js[1] = Generation(js[1].prompt_ids, 5, 0.7, seed=2, frequency_penalty=1.0,
                       logit_bias=((tok.encode("e")[0], 3.0),))
    schedule = {0: [(0, js[0]), (1, js[1])], 3: [(2, js[2])], 6: [(3, js[3])],
                14: [(4, js[4])]}
    compiled = Decoder(model, tok, 3, compile=True)
    assert compiled.warm_up() > 0 and compiled.engine.sizes == [1, 2, 3]
    graphs = counters["stats"]["unique_graphs"]
    assert decode(compiled, schedule) == decode(Decoder(model, tok, 3), schedule)
    assert counters["stats"]["unique_graphs"] == graphs


def test_finish_reasons_and_cancel(tok, model):
    decoder = Decoder(model, tok, 4)
    greedy = Generation(tok.encode("ROMEO:"), 6, 0.0)
    (_, d), = decoder.step([("a", greedy)])
    assert d.tokens == 1 and d.finish_reason is None and decoder.free == 3
    decoder.cancel("a")
    assert decoder.rows == [] and decoder.free == 4
    text, _ = decode(decoder, {0: [("b", greedy)]})
    ids = generate(model, greedy.prompt_ids, 6, temperature=0.0)
    assert text["b"] == tok.decode(ids)
    # eos ends a row with "stop": a model whose head always picks eos
    eos = GPT2(model.config).eval()
    with torch.no_grad():
        eos.lm_head.weight.zero_()
        eos.lm_head.weight[tok.eos_id] = 1.0
        eos.transformer.ln_f.bias.fill_(1.0)
    (_, d), = Decoder(eos, tok, 1).step([("c", greedy)])
    assert (d.text, d.tokens, d.finish_reason) == ("", 0, "stop")
    with pytest.raises(ValueError, match="room for 1"):
        Decoder(model, tok, 1).step([("x", greedy), ("y", greedy)])


def test_a_failed_step_costs_a_prefill_not_the_rows(tok, model):
    """The engine's step fails once mid-batch (a fault in a CUDA graph, say): the decoder
    takes every row up again in a new engine from what it generated, and each row's text is
    the uninterrupted one, its seeded stream and penalties going on where they were."""
    js = [Generation(tok.encode("ROMEO:"), 12, 1.0, 1.0, 1, frequency_penalty=0.8),
          Generation(tok.encode("The quick brown"), 9, 0.0, seed=2),
          Generation(tok.encode("What light"), 10, 0.7, seed=3)]
    schedule = {0: [(0, js[0]), (1, js[1])], 2: [(2, js[2])]}
    whole = decode(Decoder(model, tok, 3), schedule)
    decoder = Decoder(model, tok, 3)
    real, calls = decoder.engine.step, []

    def failing(n):
        calls.append(n)
        if len(calls) == 4:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(n)

    decoder.engine.step = failing
    assert decode(decoder, schedule) == whole
    assert len(calls) == 4  # the fourth step failed, and the rest ran in a new engine
