"""Data parallelism applied to a finished GPT2, kept out of model.py (as torchtitan does).

    model = parallel.wrap(model, "fsdp", device=device, dtype=torch.bfloat16, compile=True)

- ddp: every rank holds the whole model and optimizer; DistributedDataParallel all-reduces
  gradients in buckets while backward runs.
- fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each transformer block, then on the
  whole model: parameters, gradients and AdamW state are sharded over the ranks, a block's
  weights all-gathered just before it runs and freed after. With a mixed precision dtype the
  all-gather moves bf16/fp16 (MixedPrecisionPolicy) and gradients are reduced in fp32.
  gpt2-xl (1.56B parameters) needs ~25 GB for fp32 weights, gradients and AdamW state under
  DDP; sharded over 4 GPUs, ~6 GB each.

Then torch.compile, on the wrapped module: PyTorch's guidance for DDP (its all-reduce hooks
then overlap the compiled backward) and what torchtitan does for FSDP2.

A sharded model's state is gathered to rank 0 to save it (`full_model_state`,
`full_optimizer_state`: collectives, every rank calls them), so a checkpoint stays a Hugging
Face model dir plus one train state, whatever the number of ranks that wrote it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from gpt2core.model import GPT2

STRATEGIES = ("ddp", "fsdp")


def wrap(model: GPT2, strategy: str, *, device: torch.device, dtype: torch.dtype | None,
         compile: bool = False) -> nn.Module:
    """`model` (already on `device`) made data-parallel over the default process group, then
    compiled if asked. Without a process group (or with one rank under DDP) it stays as it is.
    Under FSDP the GPT2 itself is sharded in place: `model` is then the module to save from."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy is one of {', '.join(STRATEGIES)}, got {strategy!r}.")
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and strategy == "fsdp":
        shard(model, dtype)
    elif distributed and dist.get_world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if compile else model


def shard(model: GPT2, dtype: torch.dtype | None = None) -> GPT2:
    """FSDP2 in place: each block its own unit, then the root (embeddings, final LayerNorm and
    the tied LM head). `dtype`: the dtype blocks compute in (None: fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) \
        if dtype is not None else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on rank 0, on the CPU (an empty dict on the others). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state on rank 0, keyed by parameter name, on the CPU (an empty
    dict on the others). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict) -> None:
    """Each rank keeps its shard of a state from `full_optimizer_state`. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


def unsharded_copy(model: GPT2) -> GPT2 | None:
    """On rank 0, a plain float32 GPT2 on the CPU with the sharded model's whole weights, to
    save as a model dir; None on the other ranks. Collective."""
    state = full_model_state(model)
    if not state:
        return None
    copy = GPT2(model.config)
    copy.load_state_dict(state)
    return copy
