"""Which float dtypes a device computes in: the one rule training, evaluation and serving share.

    autocast_dtype("auto", device)     # training's autocast: bf16 / fp16 on GPUs, None on CPUs
    for_inference(model)               # bf16 / fp16 weights (and so KV cache) on GPUs
    to_device(tensor, device)          # pinned, non-blocking host -> GPU copies

The rule (docs/design.md, "Defaults that make it run anywhere"):
- CUDA GPU with compute capability >= 8.0 (Ampere, Ada, Hopper, Blackwell): bf16. It has
  fp32's exponent range, so gradients need no loss scaling.
- Older CUDA GPUs (V100 7.0, T4 7.5): fp16 with a GradScaler. Not bf16: there
  `torch.cuda.is_bf16_supported()` answers True because bf16 is emulated, at a fraction of the
  fp16 tensor-core rate.
- fp32 work on a GPU (--precision fp32, LayerNorm and softmax under autocast) runs its
  matmuls on TF32 tensor cores (Ampere+): 10 mantissa bits, what PyTorch's own guidance and
  nanoGPT use for training.
- CPUs: fp32 unless asked (--precision bf16/fp16, or --use_amp: bf16). CPU autocast is
  slower than fp32 on most CPUs without avx512_bf16 / AMX.

--precision and the original project's --use_amp: `auto` is mixed precision on GPUs already;
on CPUs `auto` + --use_amp is bf16; `fp32`/`bf16`/`fp16` mean what they say.
"""

from __future__ import annotations

import torch
from torch import nn

from gpt2core.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` is a CUDA GPU with bf16 tensor cores (compute capability >= 8.0)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def autocast_dtype(precision: str, device: torch.device | str,
                   use_amp: bool = False) -> torch.dtype | None:
    """The autocast dtype for training or evaluation on `device`; None means plain fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got "
                        f"{precision!r}.")
    device = torch.device(device)
    if precision != "auto":
        return _DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.bfloat16 if use_amp else None


def needs_scaler(dtype: torch.dtype | None) -> bool:
    """Loss scaling for fp16 only: bf16 and fp32 have fp32's exponent range."""
    return dtype == torch.float16


def enable_tf32(device: torch.device | str) -> None:
    """TF32 matmuls for fp32 work on a CUDA device (a process-wide switch, through the API
    that torch.compile reads too; nothing changes for a CPU)."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")


def inference_dtype(device: torch.device | str) -> torch.dtype:
    """The weights' dtype for inference on `device`: bf16/fp16 on GPUs, fp32 on CPUs (where
    gpt2core.quant's --dtype chooses)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16


def for_inference(model: nn.Module) -> nn.Module:
    """Cast a float32 model on a GPU to the inference dtype (its KV caches follow the weights'
    dtype); a model on a CPU, or already cast, is returned unchanged."""
    param = next(model.parameters())
    if param.device.type != "cuda" or param.dtype != torch.float32:
        return model
    enable_tf32(param.device)
    return model.to(inference_dtype(param.device))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`. Host -> CUDA copies go from pinned memory with non_blocking, so
    the copy overlaps the GPU's work; from pageable memory non_blocking would still sync.
    On CPUs the tensor is returned as it is (pinning needs a GPU and would only cost)."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
