"""Data parallelism applied to a finished GPT2, kept out of model.py (as torchtitan does).

    model = parallel.wrap(model, "fsdp", device=device, dtype=torch.bfloat16, compile=True)

- ddp: every rank holds the whole model and optimizer; DistributedDataParallel all-reduces
  gradients in buckets while backward runs.
- fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each transformer block, then on the
  whole model: parameters, gradients and AdamW state are sharded over the ranks, a block's
  weights all-gathered just before it runs and freed after (but the last block's, which
  backward needs at once: torchtitan's choice). With a mixed precision dtype the all-gather
  moves bf16/fp16 (MixedPrecisionPolicy) and gradients are reduced in fp32. With one rank
  there is nothing to shard and the model stays whole, as under ddp: FSDP2 on one GPU only
  adds its per-block casts and gathers (issue 27).
  gpt2-xl (1.56B parameters) needs ~25 GB for fp32 weights, gradients and AdamW state under
  DDP; sharded over 4 GPUs, ~6 GB each.

Then torch.compile, on the wrapped module: PyTorch's guidance for DDP (its all-reduce hooks
then overlap the compiled backward) and what torchtitan does for FSDP2.

To save, a sharded model's weights are gathered to rank 0 (`unsharded_copy`), so the model
stays a Hugging Face model dir whatever the number of ranks; the optimizer state, twice the
weights under AdamW, is not: each rank writes its own part (`save_optimizer_shards`) and a
resumed run reads back the pieces it now holds, from shards written by any number of ranks
(torch.distributed.checkpoint reshards). The shards are safetensors files whose JSON header
gives each piece's offset in the whole tensor (DCP's Hugging Face storage): nothing is pickled.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from gpt2core.errors import UserError
from gpt2core.model import GPT2

STRATEGIES = ("ddp", "fsdp")


def wrap(model: GPT2, strategy: str, *, device: torch.device, dtype: torch.dtype | None,
         compile: bool = False) -> nn.Module:
    """`model` (already on `device`) made data-parallel over the default process group, then
    compiled if asked. Without a process group, or with one rank, it stays as it is. Under
    FSDP the GPT2 itself is sharded in place: `model` is then the module to save from."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy is one of {', '.join(STRATEGIES)}, got {strategy!r}.")
    ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if ranks > 1 and strategy == "fsdp":
        shard(model, dtype)
    elif ranks > 1:
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
    last = len(model.transformer.h) - 1
    for i, block in enumerate(model.transformer.h):  # the last block's weights stay gathered
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < last)
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


def save_optimizer_shards(model: nn.Module, optimizer: torch.optim.Optimizer,
                          path: str | Path) -> None:
    """Each rank writes its part of the optimizer's tensors to `path`/rank-R-of-W.safetensors
    (a tensor every rank holds whole, such as AdamW's step, is written by one of them). The
    hyperparameters are not tensors: keep them with `optimizer_groups`. Collective."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    path, own = Path(path), Path(path) / f".rank-{rank}"  # ranks may share `path`
    dcp.save(_tensors(_flat_state(model, optimizer)),
             storage_writer=HuggingFaceStorageWriter(str(own), save_distributed=True))
    written = list(own.glob("*.safetensors"))  # one file; none when this rank held nothing
    target = path / f"rank-{rank:05d}-of-{world:05d}.safetensors"
    if written:
        written[0].rename(target)
    else:  # an empty file still: a reader counts W files
        save_file({}, str(target))
    shutil.rmtree(own)


def load_optimizer_shards(model: nn.Module, optimizer: torch.optim.Optimizer,
                          path: str | Path, groups: list[dict]) -> None:
    """The optimizer state from shards written by `save_optimizer_shards` on any number of
    ranks: each rank reads only the pieces it now holds (a model that is not sharded reads them
    all), then `groups` (from `optimizer_groups`). Collective when a process group is up."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    flat = _flat_state(model, optimizer)  # shaped (and sharded) as this run holds it
    tensors = _tensors(flat)
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)))
    set_optimizer_state_dict(model, optimizer, {**flat, **tensors}, options=_flat())
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        group.update(saved)


def optimizer_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's hyperparameters (lr, betas, weight decay, ...), without its
    parameters: numbers, tuples and flags, the same on every rank."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _flat_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state flattened to `state.<parameter name>.<name>` (exp_avg,
    exp_avg_sq, step: tensors, a DTensor shard under FSDP) and `param_groups.<parameter
    name>.<name>`. An optimizer that has not stepped gets its state made first (one step with
    zero gradients and lr 0)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_flat())


def _tensors(flat: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}


def _flat():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def unsharded_copy(model: GPT2) -> GPT2 | None:
    """On rank 0, a plain float32 GPT2 on the CPU with the sharded model's whole weights, to
    save as a model dir; None on the other ranks. Collective."""
    state = full_model_state(model)
    if not state:
        return None
    copy = GPT2(model.config)
    copy.load_state_dict(state)
    return copy
