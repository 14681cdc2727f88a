"""gpt2core.quant: int8 and bfloat16 inference hold perplexity, decode with the KV cache and
sampling, keep rows independent, and `auto` follows its rule."""

import copy
import math
import pydoc_data.topics
from pathlib import Path

import pytest
import torch

from gpt2core import GPT2, GPT2Config, KVCache, generate
from gpt2core.modelfile import ModelFileError
from gpt2core.quant import (
    Int8Linear,
    Int8Weight,
    fbgemm_available,
    inference_dtype,
    quantize_weight,
    resolve_dtype,
    to_inference_dtype,
)
from gpt2core.sampling import decode_head

CTX = 64


def tiny(**kw) -> GPT2Config:
    return GPT2Config(**{**dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4),
                         **kw})


def converted(model: GPT2, dtype: str) -> GPT2:
    return to_inference_dtype(copy.deepcopy(model), dtype)


@pytest.fixture(scope="module")
def text_bytes() -> torch.Tensor:
    """~750 KB of English prose that every CPython ships (the reference's topic pages), as bytes:
    the same text on CI and here, no download, no tokenizer to train (byte ids, vocab 256)."""
    data = Path(pydoc_data.topics.__file__).read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


@pytest.fixture(scope="module")
def trained(text_bytes) -> GPT2:
    """A byte-level model trained on 90 % of the text until it is far from uniform (~10 s)."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=256, n_positions=CTX, n_embd=64, n_layer=2, n_head=4))
    train = text_bytes[: int(0.9 * len(text_bytes))]
    opt = model.configure_optimizer(lr=4e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(train) - CTX - 1, (16,), generator=g)
        batch = torch.stack([train[s:s + CTX + 1] for s in starts])
        _, loss = model(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss.item() < 0.6 * math.log(256), "the fixture model did not learn"
    return model.eval()


def held_out(text_bytes: torch.Tensor, rows: int = 48) -> torch.Tensor:
    """(rows, CTX + 1) windows of the last 10 % of the text, which training never saw."""
    test = text_bytes[int(0.9 * len(text_bytes)):]
    step = (len(test) - CTX - 1) // rows
    return torch.stack([test[i * step:i * step + CTX + 1] for i in range(rows)])


def perplexity(model: GPT2, windows: torch.Tensor) -> float:
    with torch.inference_mode():
        _, loss = model(windows[:, :-1], targets=windows[:, 1:])
    return math.exp(loss.item())


def greedy_agreement(a: GPT2, b: GPT2, prompts: torch.Tensor, n: int) -> float:
    """Share of greedy tokens b produces equal to a's, each row compared up to its first miss."""
    ra = generate(a, prompts, n, temperature=0)
    rb = generate(b, prompts, n, temperature=0)
    same = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), n) for p, q in zip(ra, rb)]
    return sum(same) / (n * len(same))


# --- Quality on a trained model -----------------------------------------------------------------


@pytest.mark.slow
def test_perplexity_held_within_the_targets_and_greedy_mostly_equal(trained, text_bytes):
    windows = held_out(text_bytes)
    base = perplexity(trained, windows)
    assert base < 0.5 * 256  # trained: far below a uniform guess
    prompts = windows[:8, :16]
    for dtype, bound in (("int8", 0.01), ("bfloat16", 0.005)):
        model = converted(trained, dtype)
        ppl = perplexity(model, windows)
        assert abs(ppl / base - 1) < bound, (dtype, ppl, base)
        # int8/bf16 logits differ from float32's by ~1e-2: a near-tie can flip a greedy token,
        # and the rows then diverge; 32 tokens agree before any flip on most rows
        assert greedy_agreement(trained, model, prompts, 32) > 0.5, dtype


@pytest.mark.slow
def test_a_transformers_gpt2_dir_loads_in_each_dtype(trained, text_bytes, tmp_path):
    """A model dir written by transformers' own save_pretrained (the fixture's weights: no
    pretrained GPT-2 is available offline) against transformers' float32 perplexity."""
    transformers = pytest.importorskip("transformers")
    trained.save_pretrained(tmp_path / "ours")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    hf.save_pretrained(tmp_path / "hf")
    windows = held_out(text_bytes)
    with torch.inference_mode():
        base = math.exp(_hf_loss(hf, windows))
    for dtype, bound in (("float32", 1e-4), ("int8", 0.01), ("bfloat16", 0.005)):
        model = GPT2.from_pretrained(tmp_path / "hf", dtype=dtype)
        assert inference_dtype(model) == dtype
        assert abs(perplexity(model, windows) / base - 1) < bound, dtype


def _hf_loss(hf, windows: torch.Tensor) -> float:
    logits = hf(windows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).double(),
                                             windows[:, 1:].reshape(-1)).item()


# --- Decoding: KV cache, sampling, rows --------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_cached_decode_equals_full_forward_and_the_cache_follows_the_dtype(dtype):
    torch.manual_seed(0)
    model = converted(GPT2(tiny()), dtype)
    x = torch.randint(0, 97, (2, 12))
    with torch.inference_mode():
        full = model(x).float()
        cache = KVCache(model.config, 2, 12, dtype=next(model.parameters()).dtype)
        pos = torch.arange(12).expand(2, 12)
        steps = [model(x[:, :5], kv_cache=cache, input_pos=pos[:, :5])[:, -1]]
        steps += [model(x[:, t:t + 1], kv_cache=cache, input_pos=pos[:, t:t + 1])[:, -1]
                  for t in range(5, 12)]
    # int8: rows are quantized one by one, so a row's logits are the same alone or in a prompt
    # (float32 attention sums aside); bf16: the attention sums round to 8 bits
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "int8" else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(torch.stack(steps, 1).float(), full[:, 4:], **tol)
    assert cache.k.dtype == (torch.float32 if dtype == "int8" else torch.bfloat16)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_batched_rows_equal_single_prompts_under_per_row_seeds(dtype):
    torch.manual_seed(0)
    model = converted(GPT2(tiny()), dtype)
    a, b = [5, 6, 7, 8], [9, 10]
    ids = torch.tensor([a, [0, 0] + b])  # left-padded
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    rows = generate(model, ids, [12, 7], top_p=0.9, seed=[11, 22], attention_mask=mask)
    assert rows[0] == generate(model, a, 12, top_p=0.9, seed=11)
    assert rows[1] == generate(model, b, 7, top_p=0.9, seed=22)


def test_int8_rows_do_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48))
    x = torch.randn(6, 64)
    x[3] *= 1000  # a row with huge activations would coarsen a per-tensor scale for all
    # int32 sums are exact; only the fp32 rescale may round apart (kernels for AVX2 and AVX-512
    # differ: 1e-4): a shared per-tensor scale would move row 1 by ~1e-1
    torch.testing.assert_close(layer(x)[1:2], layer(x[1:2]), rtol=1e-4, atol=1e-5)


def test_decode_head_multiplies_in_int8():
    torch.manual_seed(0)
    model = converted(GPT2(tiny()), "int8")
    head = decode_head(model)  # what gpt2core.sampling and serve multiply hidden states by
    assert isinstance(head, Int8Weight)
    h = torch.randn(3, 32)
    torch.testing.assert_close(h @ head, model.lm_head(h), rtol=0, atol=0)
    # anything but a matmul sees the dequantized float matrix
    torch.testing.assert_close(head.float(), model.lm_head.dequantize().t())


# --- int8 arithmetic ---------------------------------------------------------------------------


def test_quantize_weight_is_symmetric_per_channel():
    w = torch.randn(8, 100) * torch.logspace(-3, 1, 8)[:, None]  # rows of very different size
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert (q.abs().amax(dim=1) == 127).all()  # each row uses its full range
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()


def test_int8_linear_is_close_to_float():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 5, 256)
    expected = torch.nn.functional.linear(x.double(), linear.weight.double(),
                                          linear.bias.double())
    got = layer(x)
    assert got.shape == (2, 5, 96) and got.dtype == torch.float32
    # 8-bit weights and 7-bit activations: ~1 % relative error in each output
    assert ((got.double() - expected).norm() / expected.norm()).item() < 0.03


# --- Choosing and converting -------------------------------------------------------------------


def test_auto_follows_the_cpu_rule():
    int8_ok = "fbgemm" in torch.backends.quantized.supported_engines
    assert resolve_dtype("auto", "cpu", {"avx2"}) == ("int8" if int8_ok else "float32")
    assert resolve_dtype("auto", "cpu", {"avx512_bf16"}) == "bfloat16"  # no avx2: no FBGEMM
    assert resolve_dtype("auto", "cpu", set()) == "float32"
    assert resolve_dtype("int8", "cpu", set()) == "int8"  # asked for: the slow path runs
    with pytest.raises(ValueError, match="float16.*not one of"):
        resolve_dtype("float16")
    with pytest.raises(ValueError, match="CPUs only"):
        resolve_dtype("int8", "cuda")


def test_int8_without_fbgemm_runs_the_dequantized_path(monkeypatch):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 16))
    x = torch.randn(3, 64)
    monkeypatch.setattr("gpt2core.quant.fbgemm_available", lambda flags=None: False)
    expected = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)
    torch.testing.assert_close(layer(x), expected)


def test_float32_is_unchanged_and_converted_models_are_not_saved(tmp_path):
    torch.manual_seed(0)
    model = GPT2(tiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert to_inference_dtype(model, "float32") is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied, still trainable
    model.save_pretrained(tmp_path / "m")
    int8 = GPT2.from_pretrained(tmp_path / "m", dtype="int8")
    assert inference_dtype(int8) == "int8" and not int8.training
    with pytest.raises(ModelFileError, match="int8"):
        int8.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="already int8"):
        to_inference_dtype(int8, "bfloat16")


@pytest.mark.skipif(not fbgemm_available(), reason="FBGEMM's int8 kernels need x86 with AVX2")
def test_fbgemm_is_used_where_available():
    assert resolve_dtype("auto", "cpu") == "int8"
