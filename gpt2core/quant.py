"""Inference dtypes: float32, bfloat16, or int8 weights for the matrices of a trained GPT2.

    model = GPT2.from_pretrained("model_dir", dtype="int8")      # or "float32", "bfloat16", "auto"
    model = to_inference_dtype(GPT2.from_pretrained(dir), "int8")  # the same, on a model in hand

Decoding one token reads every weight once, so on a CPU its speed is bytes of weights over
memory bandwidth: int8 reads 4x fewer bytes than float32, bfloat16 2x fewer.

int8 ("W8A8 dynamic", as CTranslate2 and torch.ao dynamic quantization do it):
- Weights, once: per output channel (row of the (out, in) matrix) symmetric int8,
  w ≈ scale[n] * q[n, :] with scale[n] = max|w[n, :]| / 127 (Jacob et al. 2018, section 2;
  per-channel as in Krishnamoorthi 2018, "Quantizing deep convolutional networks ...").
- Activations, every call: per row (token) scaled to max |x| = 1, quantized to 8 bits, multiplied
  in integers with int32 sums, and scaled back: y = s_row * (x / s_row) @ w.T + b. Per row as
  in LLM.int8()'s vector-wise quantization (Dettmers et al. 2022) and CTranslate2: a row's
  result never depends on the other rows of the batch, so per-row seeds and continuous batching
  behave as in float32.
- Kernel: FBGEMM's dynamic int8 linear (`torch.ops.quantized.linear_dynamic`, AVX2/AVX-512).
  It quantizes its input with one scale for the whole tensor; appending a constant row
  [-1, 1, 0, ...] fixes that range to [-1, 1] whatever the batch holds, which together with the
  per-row normalisation above makes the quantization per row. Measured on a 2-core AMD EPYC
  (AVX2, no VNNI) for GPT-2's 768 x 50257 head: 2.4 ms per token vs 9.7 ms in float32 (batch 1),
  3.8 vs 37 ms (batch 8). `torch._weight_int8pack_mm` (weight-only int8, what torchao's CPU
  int8 weight-only path calls) took 29 ms with float32 input and `torch._int_mm` 32 ms there.
  Without FBGEMM (e.g. ARM) the weights are dequantized per call: correct, memory-saving, slow.
- Kept in float32: embeddings, LayerNorms, attention (softmax over the KV cache), biases.
- The LM head is tied to the token embedding; int8 unties them (the lookup keeps float rows).

bfloat16: every parameter and the KV cache in bfloat16 (8-bit mantissa, float32's range).
Fast only where the CPU has native bf16 matmuls (avx512_bf16, amx_bf16) or on GPUs.

"auto" — the rule, from the CPU's flags in /proc/cpuinfo:
  CUDA: bfloat16 where the GPU has bf16 tensor cores (compute capability >= 8.0), else float32.
  CPU:  int8 where FBGEMM runs (x86 with avx2: int8 reads the fewest bytes, and FBGEMM uses
        avx512_vnni / avx_vnni where present); else bfloat16 where avx512_bf16 or amx_bf16;
        else float32.

Training is unchanged: conversion is for inference (an int8 model has no float weights to train).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2core.errors import UserError

DTYPES = ("float32", "bfloat16", "int8", "auto")
QUANTIZED = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # in every block
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


# --- Which dtype ------------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    """The CPU features that matter here (CPU_FLAGS) that /proc/cpuinfo lists; empty if unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split()) & set(CPU_FLAGS)
    return set()


def fbgemm_available(flags: set[str] | None = None) -> bool:
    """Whether torch's FBGEMM int8 kernels run here (an x86 torch build on a CPU with avx2)."""
    flags = cpu_flags() if flags is None else flags
    return ("fbgemm" in torch.backends.quantized.supported_engines and "avx2" in flags
            and hasattr(torch.ops.quantized, "linear_dynamic"))


def resolve_dtype(dtype: str, device: torch.device | str = "cpu",
                  flags: set[str] | None = None) -> str:
    """The concrete dtype for `dtype` on `device`: "auto" follows the rule in the module doc."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}; pass --dtype "
                        "float32 (exact), bfloat16, int8 (fastest on x86 CPUs) or auto")
    device = torch.device(device)
    if device.type != "cpu" and dtype == "int8":
        raise UserError(f"dtype int8 runs on CPUs only, not on {device.type}; use --dtype "
                        "bfloat16 (or auto) there")
    if dtype != "auto":
        return dtype
    if device.type == "cuda":  # the rule of gpt2core/precision.py: bf16 tensor cores only
        from gpt2core.precision import native_bf16

        return "bfloat16" if native_bf16(device) else "float32"
    if device.type != "cpu":
        return "float32"
    flags = cpu_flags() if flags is None else flags
    if fbgemm_available(flags):
        return "int8"
    if flags & {"avx512_bf16", "amx_bf16"}:
        return "bfloat16"
    return "float32"


def inference_dtype(model: nn.Module) -> str:
    """The dtype a model was converted to: "int8", "bfloat16" or "float32"."""
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return "int8"
    return "bfloat16" if next(model.parameters()).dtype == torch.bfloat16 else "float32"


def to_inference_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """Convert a float32 GPT2 in place for inference in `dtype` (see DTYPES) and return it.

    A converted model is in eval mode and has no gradients; "float32" (on a float32 model)
    changes nothing. Converting is one way: load the model dir again for float32.
    """
    device = next(model.parameters()).device
    dtype = resolve_dtype(dtype, device)
    current = inference_dtype(model)
    if dtype == current:  # float32 stays as it is, trainable and in its mode
        return model
    if current != "float32":
        raise UserError(f"the model is already {current}; load it again to get {dtype}")
    if dtype == "bfloat16":
        return model.to(torch.bfloat16).eval()
    if dtype == "int8":
        for block in model.transformer.h:
            for name in QUANTIZED:
                parent, attr = name.split(".")
                owner = getattr(block, parent)
                setattr(owner, attr, Int8Linear.from_linear(getattr(owner, attr)))
        # untie: the embedding keeps its float32 table, the head gets an int8 copy
        model.transformer.wte.weight = nn.Parameter(model.lm_head.weight.detach().clone(),
                                                    requires_grad=False)
        model.lm_head = Int8Linear.from_linear(model.lm_head)
        for p in model.parameters():
            p.requires_grad_(False)
    return model.eval()


# --- int8 weights -----------------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 q (out, in) and float32 scale (out,): weight ≈ scale[:, None] * q.

    Symmetric per output channel: scale = max|w| / 127, so q spans [-127, 127] and 0 is exact.
    """
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # an all-zero row keeps scale > 0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights (per-channel scales), float in and out; see the module doc."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) float32
        self.register_buffer("bias", bias)  # (out,) float32 or None
        self._packed = None  # FBGEMM's prepacked weight, made on first use (not a tensor)
        self._packed_key = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_weight(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return cls(q, scale, bias)

    @property
    def weight(self) -> Int8Weight:
        """The weight as a tensor that `x @ weight.t()` multiplies in int8 (see Int8Weight)."""
        return Int8Weight(self)

    def dequantize(self) -> torch.Tensor:
        """The float32 (out, in) matrix the int8 weights stand for."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, with_bias=True)

    def matmul(self, x: torch.Tensor, with_bias: bool) -> torch.Tensor:
        """x (..., in) @ weight.T (+ bias) -> (..., out), in x's float dtype."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()  # (M, in)
        bias = self.bias if with_bias else None
        if x2.device.type == "cpu" and fbgemm_available():
            y = self._fbgemm(x2, bias)
        else:
            y = F.linear(x2, self.dequantize(), bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _fbgemm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        s = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True)  # (M, 1) max|x|
        s = s.clamp(min=1e-30)  # an all-zero row stays zero
        # (M + 1, in): every row within [-1, 1], the last one spans it exactly, so the kernel's
        # per-tensor activation scale is 2/255 for any batch: per-row quantization in effect
        x = torch.cat([x / s, _range_row(self.in_features)])
        # reduce_range: 7-bit activations, as torch.ao does on x86: AVX2's u8 x s8 pair sums
        # saturate int16 with 8 bits (measured: 15 % error instead of 1.4 % for random data)
        y = torch.ops.quantized.linear_dynamic(x, self._packed_weight(), True)[:-1]  # (M, out)
        return y.mul_(s) if bias is None else torch.addcmul(bias, y, s)

    def _packed_weight(self):
        key = (self.qweight.data_ptr(), self.qweight._version, self.scale._version)
        if self._packed_key != key:
            zeros = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # torch marks the quantized dtypes as deprecated
                warnings.simplefilter("ignore")
                q = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(),
                                                             zeros, 0)
                self._packed = torch.ops.quantized.linear_prepack(q, None)
            self._packed_key = key
        return self._packed

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


_RANGE_ROWS: dict[int, torch.Tensor] = {}


def _range_row(n: int) -> torch.Tensor:
    """(1, n) float32 [-1, 1, 0, 0, ...]: pins a per-tensor quantization range to [-1, 1]."""
    if n not in _RANGE_ROWS:
        row = torch.zeros(1, n)
        row[0, 0], row[0, 1] = -1.0, 1.0
        _RANGE_ROWS[n] = row
    return _RANGE_ROWS[n]


# --- The int8 weight as a tensor --------------------------------------------------------------


class Int8Weight(torch.Tensor):
    """An Int8Linear's int8 matrix that multiplies as its float weight: `x @ w.t()`, `x @ w.T`,
    `F.linear(x, w)` run the layer's int8 kernel (without its bias).

    Why: decoding code keeps the LM head as a matrix (`h @ decode_head(model)`, a (C, V) view of
    `model.lm_head.weight`, in gpt2core/sampling.py and serve/), so the int8 head has to be a
    tensor that `@` understands. Its storage is the int8 data itself, so `data_ptr()`,
    `_version`, `device` and `shape` are the int8 buffer's; `t()`, `detach()` and
    `contiguous()` are views that remember the layer; any other operation sees the dequantized
    float32 matrix (correct, not fast). A `__torch_function__` subclass: pytorch.org/docs/stable/
    notes/extending.html, "Extending torch with a Tensor wrapper type".
    """

    layer: Int8Linear
    transposed: bool

    @staticmethod
    def __new__(cls, layer: Int8Linear, transposed: bool = False) -> Int8Weight:
        data = layer.qweight.t() if transposed else layer.qweight
        t = torch.Tensor._make_subclass(cls, data)
        t.layer, t.transposed = layer, transposed
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        w = args[0] if args and isinstance(args[0], Int8Weight) else None
        if w is not None and func in _VIEWS:
            return w if func in _SAME else Int8Weight(w.layer, not w.transposed)
        if w is not None and getattr(func, "__name__", "") in _PASS_THROUGH:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func in _MATMULS and len(args) == 2:
            x, w = (args[1], args[0]) if func is torch.Tensor.__rmatmul__ else args
            if isinstance(w, Int8Weight) and w.transposed and not isinstance(x, Int8Weight):
                return w.layer.matmul(x, with_bias=False)  # x @ W.T
        if func is F.linear and isinstance(args[1], Int8Weight) and not args[1].transposed:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            return w.layer.matmul(x, with_bias=False) + (0 if b is None else b)
        args = tuple(_dequantized(a) for a in args)
        kwargs = {k: _dequantized(v) for k, v in kwargs.items()}
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _dequantized(a):
    if not isinstance(a, Int8Weight):
        return a
    w = a.layer.dequantize()
    return w.t() if a.transposed else w


_SAME = (torch.Tensor.detach, torch.Tensor.contiguous)
_VIEWS = (*_SAME, torch.Tensor.t, torch.Tensor.T.__get__, torch.t)
# `x @ w` reaches __torch_function__ as Tensor.matmul
_MATMULS = (torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.matmul,
            torch.mm)
# what describes the storage rather than the values: the int8 buffer's own answers
_PASS_THROUGH = {"__get__", "data_ptr", "size", "dim", "numel", "stride", "is_contiguous",
                 "untyped_storage", "__repr__", "__format__"}
