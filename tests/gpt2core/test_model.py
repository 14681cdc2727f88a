"""gpt2core.model: shapes, causality, KV cache, left padding, init, loss falls."""

import math

import pytest
import torch

from gpt2core import GPT2, GPT2Config, KVCache


def tiny(**kw) -> GPT2Config:
    return GPT2Config(**{**dict(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=4),
                         **kw})


@pytest.fixture
def model() -> GPT2:
    torch.manual_seed(0)
    return GPT2(tiny()).eval()


def test_logits_shape_and_loss(model):
    x = torch.randint(0, 97, (3, 11))
    logits = model(x)
    assert logits.shape == (3, 11, 97)
    logits2, loss = model(x, targets=x)
    torch.testing.assert_close(logits, logits2)
    # float64 reference, float32 tolerance: a float32 log-sum-exp and mean sum in a different
    # order on AVX2 and AVX-512 (4.5e-6 apart on a Xeon): a one-in-a-million bound held on one
    # CPU kind only
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 97).double(), x.reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # an untrained model is close to uniform over the vocabulary (random targets: with
    # targets == inputs, tied embeddings already favour the input token)
    _, loss = model(x, targets=torch.randint(0, 97, (3, 11)))
    assert abs(loss.item() - math.log(97)) < 0.15


def test_ignore_index_in_targets(model):
    x = torch.randint(0, 97, (1, 8))
    t = x.clone()
    t[0, :4] = -100
    logits, loss = model(x, targets=t)
    expected = torch.nn.functional.cross_entropy(logits[0, 4:].double(), x[0, 4:])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)  # as above


def test_causality(model):
    x = torch.randint(0, 97, (1, 16))
    base = model(x)
    for t in (0, 5, 15):
        y = x.clone()
        y[0, t] = (y[0, t] + 1) % 97
        out = model(y)
        torch.testing.assert_close(out[0, :t], base[0, :t])  # nothing before t changes
        assert not torch.allclose(out[0, t], base[0, t])  # position t itself does


def test_kv_cache_decoding_equals_full_forward(model):
    x = torch.randint(0, 97, (2, 20))
    full = model(x)
    cache = KVCache(model.config, batch_size=2, max_len=20)
    pos = torch.arange(20).expand(2, 20)  # positions are the caller's to keep
    pieces = [model(x[:, :7], kv_cache=cache, input_pos=pos[:, :7])]  # prefill 7, then 1 by 1
    for t in range(7, 20):
        pieces.append(model(x[:, t:t + 1], kv_cache=cache, input_pos=pos[:, t:t + 1]))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs input_pos"):
        model(x[:, :1], kv_cache=cache)


def test_left_padded_batch_equals_unpadded_rows(model):
    a = torch.randint(0, 97, (12,))
    b = torch.randint(0, 97, (5,))
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 7:], mask[1, 7:] = b, 1  # left-padded with token 0
    out = model(ids, attention_mask=mask)
    torch.testing.assert_close(out[0], model(a[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 7:], model(b[None])[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()  # pad queries do not produce NaN

    # and with the cache: rows of different lengths (right-padded), each continued by one
    # token at its own position, over the pad's stale keys in row 1
    cache = KVCache(model.config, 2, 13)
    right = torch.zeros(2, 12, dtype=torch.long)
    right[0], right[1, :5] = a, b
    model(right, kv_cache=cache, input_pos=torch.arange(12).expand(2, 12))
    nxt = torch.tensor([[3], [4]])
    step = model(nxt, kv_cache=cache, input_pos=torch.tensor([[12], [5]]))
    for row, seq in enumerate([a, b]):
        torch.testing.assert_close(step[row, 0], model(torch.cat([seq, nxt[row]])[None])[0, -1],
                                   atol=1e-5, rtol=1e-5)


def test_too_long_input_is_a_clear_error(model):
    with pytest.raises(ValueError, match="exceeds n_positions=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_weight_tying_and_param_count():
    m = GPT2(GPT2Config.from_preset("gpt2"))  # on CPU this takes ~1 s
    assert m.lm_head.weight is m.transformer.wte.weight
    assert m.num_params() == 124_439_808  # GPT-2 small, as published by Hugging Face
    assert m.num_params(exclude_embeddings=True) == 124_439_808 - 50257 * 768 - 1024 * 768


def test_gpt2_initialisation():
    torch.manual_seed(0)
    m = GPT2(tiny(n_embd=256, n_head=4, n_layer=8, vocab_size=512))
    proj = m.transformer.h[0].attn.c_proj.weight.std().item()
    fc = m.transformer.h[0].mlp.c_fc.weight.std().item()
    assert fc == pytest.approx(0.02, rel=0.05)
    assert proj == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert m.transformer.h[0].attn.c_attn.bias.abs().sum() == 0


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    m = GPT2(tiny())
    x = torch.randint(0, 97, (2, 16))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.grad_checkpointing = ckpt
        m(x, targets=x)[1].backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


def test_flops_and_mfu():
    m = GPT2(tiny())
    n = m.num_params() - 32 * 16
    assert m.flops_per_token(32) == 6 * n + 12 * 2 * 16 * 32
    assert m.estimate_mfu(1000.0, peak_flops=1000.0 * m.flops_per_token(32), seq_len=32) == \
        pytest.approx(1.0)


def test_optimizer_decays_matrices_only():
    m = GPT2(tiny())
    opt = m.configure_optimizer(lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"transformer.wte.weight",
                                                          "transformer.wpe.weight"}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_params()


def test_loss_falls_when_training():
    torch.manual_seed(0)
    m = GPT2(tiny(dropout=0.1))
    opt = m.configure_optimizer(lr=1e-2, weight_decay=0.0)
    x = torch.randint(0, 97, (4, 32))
    losses = []
    for _ in range(150):
        _, loss = m(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]  # memorises a fixed batch


def test_cross_entropy_matches_torch_value_and_gradient():
    from gpt2core.model import cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(20, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (20,))
    targets[[3, 7]] = -100
    ours = cross_entropy(logits, targets)
    (g_ours,) = torch.autograd.grad(ours * 3.0, logits)
    ref = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    (g_ref,) = torch.autograd.grad(ref * 3.0, logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)
    assert g_ours[3].abs().sum() == 0  # ignored rows get no gradient
    small = logits[:4].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, targets[:4]), (small,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_both_losses_agree_with_float64_on_fp32_and_bf16_logits(impl, dtype):
    """PyTorch's loss (on an fp32 copy) and the chunked one, against float64 on the same
    rounded logits: the loss in fp32, the gradient in the logits' dtype."""
    from gpt2core.model import cross_entropy

    torch.manual_seed(0)
    logits = (torch.randn(64, 300) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (64,))
    targets[[3, 7]] = -100
    loss = cross_entropy(logits, targets, impl)
    (grad,) = torch.autograd.grad(loss, logits)
    exact = logits.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(exact, targets, ignore_index=-100)
    (g_ref,) = torch.autograd.grad(ref, exact)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # in units of the largest gradient, so the absolute tolerance has a meaning; float32's
    # 1e-5 (rounding differs between CPU kinds), bf16's 8 bits of mantissa
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    scale = g_ref.abs().max()
    torch.testing.assert_close(grad.double() / scale, g_ref / scale, **tol)
    assert grad[3].abs().sum() == 0


def test_the_loss_is_pytorchs_where_its_fp32_copies_fit_and_chunked_where_not():
    from gpt2core.model import LOSS_BYTES, choose_loss

    rows, vocab = 16 * 1024, 50304  # GPT-2 124M at 16 x 1024: 9.9 GB of fp32 copies
    need = rows * vocab * LOSS_BYTES
    assert choose_loss(rows, vocab, torch.bfloat16, 4 * need) == "torch"
    assert choose_loss(rows, vocab, torch.bfloat16, 4 * need - 4) == "chunked"
    assert choose_loss(rows, vocab, torch.float16, None) == "chunked"  # free memory unknown
    assert choose_loss(rows, vocab, None, 0) == "torch"  # fp32 logits: there is no copy


def test_set_dropout_reaches_every_dropout_including_attention():
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8))
    model.set_dropout(0.3)
    assert model.config.dropout == 0.3
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    assert model.transformer.h[0].attn.dropout == 0.3
    ids = torch.randint(0, 16, (2, 8))
    model.train()
    assert not torch.equal(model(ids), model(ids))  # masks drawn each call
    model.set_dropout(0.0)
    assert torch.equal(model(ids), model(ids))
