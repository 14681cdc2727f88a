"""gpt2core.generation: generate and stream on the decode engine, one prompt or a batch:
seeds, greedy = the full forward, per-row parameters and eos, the context limit."""

import pytest
import torch

from gpt2core import GPT2, GPT2Config, generate, stream


@pytest.fixture(scope="module")
def model() -> GPT2:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=2, n_head=2)
    return GPT2(cfg).eval()


def test_seed_determinism(model):
    a = generate(model, [1, 2, 3], 20, top_p=0.9, seed=7)
    b = generate(model, [1, 2, 3], 20, top_p=0.9, seed=7)
    c = generate(model, [1, 2, 3], 20, top_p=0.9, seed=8)
    assert a == b and a != c and len(a) == 20


def test_greedy_equals_argmax_of_full_forward(model):
    ids = [5, 6, 7]
    out = generate(model, ids, 10, temperature=0.0)
    seq = torch.tensor([ids])
    for _ in range(10):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out == seq[0, 3:].tolist()


def test_batched_rows_equal_single_prompts_under_per_row_seeds(model):
    a, b = [1, 2, 3, 4, 5], [9, 8]
    ids = torch.tensor([a, [0, 0, 0] + b])
    mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    rows = generate(model, ids, [12, 7], top_p=0.9, seed=[11, 22], attention_mask=mask)
    assert rows[0] == generate(model, a, 12, top_p=0.9, seed=11)
    assert rows[1] == generate(model, b, 7, top_p=0.9, seed=22)
    assert [len(r) for r in rows] == [12, 7]


def test_stop_at_eos_per_row(model):
    greedy = generate(model, [1, 2], 15, temperature=0.0)
    eos = greedy[4]  # make the 5th greedy token the end-of-text id
    first = greedy.index(eos)
    assert generate(model, [1, 2], 15, temperature=0.0, eos_id=eos) == greedy[:first]
    rows = generate(model, torch.tensor([[1, 2], [1, 2]]), 15, temperature=[0.0, 0.0],
                    eos_id=eos)
    assert rows == [greedy[:first]] * 2


def test_stream_yields_the_same_tokens_as_generate(model):
    steps = list(stream(model, [3, 4], 9, top_p=0.8, seed=3))
    assert steps == generate(model, [3, 4], 9, top_p=0.8, seed=3)
    batch = list(stream(model, torch.tensor([[3, 4], [5, 6]]), [2, 4], seed=0))
    assert len(batch) == 4 and batch[2][0] is None and batch[3][1] is not None


def test_generation_beyond_context_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) \+ max_new_tokens \(10\).*64"):
        generate(model, list(range(60)), 10)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [], 10)


def test_a_seeded_row_does_not_depend_on_the_other_rows_parameters(model):
    alone = generate(model, torch.tensor([[1, 2, 3]]), 10, seed=[5])  # top_p 1: no filtering
    batch = generate(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), 10, top_p=[1.0, 0.5],
                     top_k=[0, 3], seed=[5, 6])
    assert batch[0] == alone[0]
