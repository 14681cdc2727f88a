"""gpt2core.sampling: nucleus exactness, temperature and top-k, per-row parameters, the cached
CPU decode head. generate and stream: tests/gpt2core/test_generation.py."""

import pytest
import torch

from gpt2core import GPT2, GPT2Config, generate
from gpt2core.sampling import nucleus_mask, sample

PROBS = torch.tensor([0.05, 0.4, 0.25, 0.15, 0.1, 0.05])  # nucleus(0.8) = {1, 2, 3}


def test_nucleus_mask_is_the_smallest_set_reaching_top_p():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert nucleus_mask(p, torch.tensor([0.8])).tolist() == [[True, True, False, False]]
    assert nucleus_mask(p, torch.tensor([0.81])).tolist() == [[True, True, True, False]]
    assert nucleus_mask(p, torch.tensor([0.01])).tolist() == [[True, False, False, False]]
    assert nucleus_mask(p, torch.tensor([1.0])).all()
    shuffled = torch.tensor([[0.05, 0.3, 0.5, 0.15]])  # order of the vocab does not matter
    assert nucleus_mask(shuffled, torch.tensor([0.8])).tolist() == [[False, True, True, False]]



@pytest.mark.parametrize("top_p", [5e-324, 1e-45, 0.0])
def test_a_top_p_that_underflows_keeps_the_top_token(top_p):
    """5e-324 is positive in float64 but 0 in float32: the nucleus is still the top token
    (it was empty, and sampling indexed column -1 of the vocabulary)."""
    assert torch.tensor(top_p, dtype=torch.float32) == 0 or top_p == 1e-45
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.6, 0.1]])
    assert nucleus_mask(p, torch.tensor([top_p, top_p])).tolist() == [
        [True, False, False, False], [False, False, True, False]]
    logits = torch.randn(8, 50_257, generator=torch.Generator().manual_seed(0))
    out = sample(logits, top_p=top_p, generator=torch.Generator().manual_seed(1))
    assert out.tolist() == logits.argmax(dim=-1).tolist()


def test_a_tiny_temperature_is_greedy_not_nan():
    """1e-40 is a positive float32: logits / t overflowed to inf, softmax gave NaN, and the
    sampled id was V, outside the vocabulary."""
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    for t in (1e-40, 1e-30):
        out = sample(logits, temperature=t, generator=torch.Generator().manual_seed(1))
        assert out.tolist() == logits.argmax(dim=-1).tolist()

CHI2_P001 = {1: 10.83, 2: 13.82, 5: 20.52}  # chi-square critical values, p = 0.001, by dof


@pytest.mark.parametrize("top_p,top_k,support", [
    (0.8, 0, [1, 2, 3]),  # nucleus of 0.8: 0.4 + 0.25 + 0.15
    (1.0, 0, [0, 1, 2, 3, 4, 5]),  # no filter: the full distribution
    (0.7, 3, [1, 2]),  # top-3 renormalised to (0.5, 0.3125, 0.1875), then its 0.7 nucleus
])
def test_sampling_matches_the_exact_distribution(top_p, top_k, support):
    n = 30_000
    logits = PROBS.log().expand(n, -1)
    g = torch.Generator().manual_seed(1234)
    counts = torch.bincount(sample(logits, top_p=top_p, top_k=top_k, generator=g), minlength=6)
    outside = [i for i in range(6) if i not in support]
    assert counts[outside].sum() == 0  # never outside the kept set
    expected = PROBS[support] / PROBS[support].sum() * n
    chi2 = ((counts[support].float() - expected) ** 2 / expected).sum().item()
    assert chi2 < CHI2_P001[len(support) - 1]


def test_temperature_and_top_k():
    logits = PROBS.log().expand(20_000, -1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, top_k=2, generator=g).tolist()) == {1, 2}
    assert set(sample(logits, temperature=0.0).tolist()) == {1}  # greedy
    # a high temperature flattens the distribution: the rare tokens become common
    hot = torch.bincount(sample(logits, temperature=5.0, generator=g), minlength=6)
    assert hot[0] > 0.1 * 20_000


def test_per_row_parameters():
    logits = PROBS.log().expand(4, -1)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        out = sample(logits, temperature=[0.0, 1.0, 1.0, 1.0], top_p=[1.0, 0.01, 1.0, 0.8],
                     top_k=[0, 0, 1, 0], generator=g)
        assert out[0] == 1 and out[1] == 1 and out[2] == 1 and out[3] in (1, 2, 3)


def test_decoding_follows_weight_updates():
    """The CPU decode head is a cached copy: an in-place update (an optimizer step) renews it."""
    from gpt2core.sampling import decode_head

    torch.manual_seed(0)
    m = GPT2(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    head = decode_head(m)
    assert torch.equal(head, m.lm_head.weight.t()) and decode_head(m) is head  # cached
    with torch.no_grad():
        m.lm_head.weight.add_(torch.randn(50, 16))
    assert torch.equal(decode_head(m), m.lm_head.weight.t())
    out = generate(m, [1, 2, 3], 5, temperature=0.0)
    seq = torch.tensor([[1, 2, 3]])
    for _ in range(5):
        seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out == seq[0, 3:].tolist()
