"""gpt2core.precision (the dtype rule), the fp16 + GradScaler step, and the loss on bf16 logits.

No GPU runs these CPU tests: where the rule asks a GPU for its compute capability, the test
fakes torch.cuda's answer (monkeypatch), since no real part can run there. The `gpu`-marked
tests at the end check the same on a real GPU (make gpu-check).
"""

import math

import pytest
import torch

from gpt2core import GPT2, GPT2Config, precision
from gpt2core.model import _CrossEntropy, cross_entropy
from gpt2core.training import TrainState, rows_to_batch

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT2(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))


def fake_gpu(monkeypatch, capability):
    """A CUDA GPU of this compute capability, as far as torch.cuda's queries go. Its
    is_bf16_supported answers True, as torch's does on a T4 or V100 (emulated bf16)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.mark.parametrize("capability, expected", [
    ((9, 0), torch.bfloat16),  # H100/H200
    ((8, 0), torch.bfloat16),  # A100
    ((8, 6), torch.bfloat16),  # A10G
    ((7, 5), torch.float16),  # T4: bf16 only emulated
    ((7, 0), torch.float16),  # V100
])
def test_auto_on_gpus_is_bf16_from_ampere_and_fp16_below(monkeypatch, capability, expected):
    fake_gpu(monkeypatch, capability)
    assert precision.autocast_dtype("auto", CUDA) == expected
    assert precision.autocast_dtype("auto", CUDA, use_amp=True) == expected
    assert precision.inference_dtype(CUDA) == expected
    assert precision.needs_scaler(expected) == (expected == torch.float16)


def test_auto_on_cpus_is_fp32_unless_asked():
    assert precision.autocast_dtype("auto", CPU) is None
    assert precision.autocast_dtype("auto", "cpu", use_amp=True) == torch.bfloat16
    assert precision.inference_dtype(CPU) == torch.float32


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_explicit_precisions_mean_what_they_say(monkeypatch, device):
    fake_gpu(monkeypatch, (7, 5))
    assert precision.autocast_dtype("fp32", device, use_amp=True) is None
    assert precision.autocast_dtype("bf16", device) == torch.bfloat16
    assert precision.autocast_dtype("fp16", device) == torch.float16
    with pytest.raises(ValueError, match="--precision must be one of"):
        precision.autocast_dtype("fp8", device)


def test_tf32_is_switched_on_for_gpus_only():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        precision.enable_tf32(CPU)
        assert torch.get_float32_matmul_precision() == "highest"
        precision.enable_tf32(CUDA)  # only sets the switch: no GPU needed
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_batches_are_pinned_only_for_cuda(monkeypatch):
    def no_pinning(self, *a, **k):
        raise AssertionError("pinned for a CPU device")

    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinning)
    t = torch.arange(6).reshape(2, 3)
    assert precision.to_device(t, CPU) is t  # no copy, no pinning on CPUs


def test_for_inference_leaves_cpu_models_as_they_are():
    model = tiny()
    assert precision.for_inference(model) is model
    assert next(model.parameters()).dtype == torch.float32


def state_for(model, **kw):
    args = dict(lr=1e-2, weight_decay=0.01, warmup_steps=2, total_steps=20, min_lr=1e-3,
                device="cpu")
    return TrainState.create(model, **{**args, **kw})


def test_fp16_step_scales_the_loss_and_trains_on_cpu():
    """CPU autocast runs fp16 and torch.amp.GradScaler("cpu") scales: the real path."""
    state = state_for(tiny(), precision="fp16")
    assert state.dtype == torch.float16 and state.scaler.is_enabled()
    batch = rows_to_batch(torch.randint(0, 64, (8, 17)), None, 16)
    first, _ = map(float, state.step([batch], grad_clip=1.0))
    for _ in range(15):
        loss, norm = map(float, state.step([batch], grad_clip=1.0))
    assert loss < first - 1.0 and math.isfinite(norm)


def test_fp16_step_with_an_overflow_is_skipped_and_the_scale_backs_off():
    model = tiny()
    state = state_for(model, precision="fp16")
    scale = state.scaler.get_scale()
    before = [p.detach().clone() for p in model.parameters()]
    hook = model.lm_head.weight.register_hook(lambda g: g * math.inf)  # an fp16 overflow
    state.step([rows_to_batch(torch.randint(0, 64, (2, 17)), None, 16)], grad_clip=1.0)
    hook.remove()
    assert state.scaler.get_scale() == scale * state.scaler.get_backoff_factor()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # the optimizer skipped the step


def test_bf16_and_fp32_on_cpu_have_no_scaler():
    assert not state_for(tiny(), precision="bf16").scaler.is_enabled()
    fp32 = state_for(tiny(), precision="fp32", use_amp=True)
    assert fp32.dtype is None and not fp32.scaler.is_enabled()


# --- the loss on bf16 logits: chunked, never a full fp32 (N, V) copy -----------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_chunked_loss_matches_float64_on_the_same_logits(monkeypatch, dtype):
    monkeypatch.setattr(_CrossEntropy, "CHUNK", 7 * 50)  # 7 rows a chunk: 3 chunks of 20
    torch.manual_seed(0)
    logits = (torch.randn(20, 50) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (20,))
    targets[[3, 15]] = -100
    ours = cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(ours * 2.0, logits)
    ref_logits = logits.detach().double().requires_grad_()  # the same rounded values
    ref = torch.nn.functional.cross_entropy(ref_logits, targets, ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref * 2.0, ref_logits)
    assert ours.dtype == torch.float32 and grad.dtype == dtype
    # the loss: fp32 sums of 50 terms (AVX2 and AVX-512 sum in other orders); the gradient:
    # rounded once to the logits' dtype
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)
    tol = max(torch.finfo(dtype).eps, 1e-5)  # fp32: softmax's own error, ~1e-6 relative
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol * 2.0 / 18)
    assert grad[3].abs().sum() == 0


def test_model_loss_under_bf16_autocast_keeps_bf16_logits():
    model = tiny()
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, x)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert model.lm_head.weight.grad is not None
    ref = torch.nn.functional.cross_entropy(logits.detach().double().reshape(-1, 64),
                                            x.reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


# --- on a real GPU (make gpu-check) ------------------------------------------------------

@pytest.mark.gpu
def test_gpu_rule_and_pinned_copies():
    cuda = torch.device("cuda", torch.cuda.current_device())
    major, _ = torch.cuda.get_device_capability(cuda)
    expected = torch.bfloat16 if major >= 8 else torch.float16
    assert precision.autocast_dtype("auto", cuda) == expected
    t = torch.arange(12).reshape(3, 4)
    moved = precision.to_device(t, cuda)
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), t)
    model = precision.for_inference(tiny().to(cuda))
    assert next(model.parameters()).dtype == expected


@pytest.mark.gpu
def test_gpu_auto_step_trains():
    state = state_for(tiny(), device="cuda")
    batch = rows_to_batch(torch.randint(0, 64, (8, 17)), None, 16)
    first, _ = map(float, state.step([batch], grad_clip=1.0))
    for _ in range(15):
        loss, _ = state.step([batch], grad_clip=1.0)
    assert loss.device.type == "cuda" and float(loss) < first - 1.0
