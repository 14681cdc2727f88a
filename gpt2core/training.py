"""The pieces of a training loop, in plain PyTorch: rows to batches, LR schedule, AMP, one step.

pipelines/train.py runs them inside Ray Train workers; bench/bench_train.py runs them in one
process as the reference. Nothing here knows about Ray or MLflow.

    model = GPT2(config)
    state = TrainState.create(model, lr=1e-3, weight_decay=0.01, warmup_steps=100,
                              total_steps=1000, min_lr=1e-4, device="cpu", precision="auto")
    for rows, lengths in batches:                       # dataset rows: (B, L + 1) token ids
        inputs, targets = rows_to_batch(rows, lengths, seq_len=256)
        loss, grad_norm = state.step([(inputs, targets)], grad_clip=1.0)  # 0-d tensors

Which dtype autocast uses (bf16, fp16 + GradScaler, fp32 with TF32) is gpt2core/precision.py's
rule. `step` never waits for the GPU after the first (timed) one: its loss and gradient norm
stay tensors on the device until the caller reads them (the training loop, on its logging
steps).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gpt2core import precision as prec
from gpt2core.errors import UserError
from gpt2core.model import GPT2, choose_loss

IGNORE = -100  # targets with this id add nothing to the loss (padding of a split's last row)


def rows_to_batch(rows: torch.Tensor, lengths: torch.Tensor | None,
                  seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset rows (B, L + 1) -> (inputs, targets), each (B * L / seq_len, seq_len), int64.

    A row is L + 1 tokens of one stream: inputs are tokens[:-1], targets tokens[1:]. A row's
    tokens past its `length` are padding and their targets become IGNORE. When the model's
    seq_len divides L, each row is cut into L / seq_len rows of seq_len: the same targets,
    shorter contexts (how one dataset serves models with different n_positions).
    """
    rows = rows.long()
    L = rows.size(1) - 1
    if L % seq_len:
        raise UserError(f"seq_len {seq_len} does not divide the dataset's rows of {L} tokens")
    inputs, targets = rows[:, :-1], rows[:, 1:].clone()
    if lengths is not None:
        valid = torch.arange(L, device=rows.device) < (lengths.to(rows.device).long() - 1)[:, None]
        targets[~valid] = IGNORE
    return inputs.reshape(-1, seq_len), targets.reshape(-1, seq_len)


def lr_factor(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier by step: linear warm-up from 0, then cosine decay to `min_ratio`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The forward pass's autocast context (a no-op without AMP)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class TrainState:
    """Model, optimizer, LR schedule and grad scaler, and the step count they share.

    `model` may be wrapped (DDP or FSDP, then torch.compile); `raw` is the GPT2 underneath,
    the one saved (under FSDP its parameters are shards: gather them to save).
    """

    model: nn.Module
    raw: GPT2
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None
    step_count: int = 0
    sharded: bool = False  # FSDP: saving and loading the optimizer state are collectives
    first_step_s: float | None = None  # the first step's seconds (compilation, warm-up)
    compile_error: str | None = None  # why torch.compile fell back to eager, if it did

    @classmethod
    def create(cls, model: GPT2, *, lr: float, weight_decay: float, warmup_steps: int,
               total_steps: int, min_lr: float | None, device: torch.device | str,
               precision: str = "auto", use_amp: bool = False,
               wrap: Callable[[nn.Module], nn.Module] | None = None,
               sharded_state: bool = False) -> TrainState:
        """Move the model to `device`, wrap it (DDP/FSDP, compile) and build the optimizer
        around it. The LR warms up to `lr`, then decays along a cosine to `min_lr` (None:
        lr / 10). `precision` and `use_amp` pick the autocast dtype (gpt2core/precision.py).

        The optimizer is built after `wrap`: FSDP replaces the parameters with shards.
        `sharded_state`: save and load the optimizer state in shards even when `wrap` left the
        model whole (--strategy fsdp on one worker), so more workers can resume it sharded."""
        device = torch.device(device)
        min_lr = lr / 10 if min_lr is None else min_lr
        raw = model.to(device)
        dtype = prec.autocast_dtype(precision, device, use_amp)
        prec.enable_tf32(device)
        wrapped = wrap(raw) if wrap else raw
        optimizer = raw.configure_optimizer(lr, weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_factor(warmup_steps, total_steps, min_lr / lr if lr else 0.0))
        # Loss scaling only for fp16: bf16 has fp32's exponent range and does not underflow.
        scaler = torch.amp.GradScaler(device.type, enabled=prec.needs_scaler(dtype))
        return cls(wrapped, raw, optimizer, scheduler, scaler, device, dtype,
                   sharded=sharded_state or is_sharded(raw))

    def step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
             grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over gradient-accumulation micro-batches; (mean loss, grad norm)
        as 0-d tensors on the device, so the host does not wait for the GPU here.

        Each micro-batch's loss is divided by their number, so the gradient is that of the
        mean. Under DDP only the last backward all-reduces (no_sync on the others).

        The first step picks the loss (`raw.loss_impl`: gpt2core.model.choose_loss, for this
        batch and the free memory) and is timed (`first_step_s`: compilation or warm-up). A
        compiled model whose compilation fails there trains eagerly instead, after one warning
        line on stderr.
        """
        if self.first_step_s is not None:
            return self._step(micro_batches, grad_clip)
        inputs = micro_batches[0][0]
        self.raw.loss_impl = choose_loss(
            inputs.numel(), self.raw.config.vocab_size, self.dtype, free_memory(self.device))
        start = time.perf_counter()
        try:
            out = self._step(micro_batches, grad_clip)
        except Exception as e:
            if not hasattr(self.model, "_orig_mod"):  # not torch.compile's: not ours to catch
                raise
            self.compile_error = _first_line(e)
            print(f"warning: torch.compile failed at the first step ({self.compile_error}); "
                  "training eagerly instead.", file=sys.stderr, flush=True)
            self.model = self.model._orig_mod
            self.optimizer.zero_grad(set_to_none=True)
            out = self._step(micro_batches, grad_clip)
        float(out[0])  # once: the first step's time is the device's too
        self.first_step_s = time.perf_counter() - start
        return out

    def _step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
              grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.train()
        total = torch.zeros((), device=self.device)
        for i, (inputs, targets) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") \
                else self.model.no_sync()
            with sync:
                with autocast(self.device, self.dtype):
                    _, loss = self.model(prec.to_device(inputs, self.device),
                                         prec.to_device(targets, self.device))
                loss = loss / len(micro_batches)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(),
                                              grad_clip if grad_clip > 0 else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step_count += 1
        if hasattr(norm, "full_tensor"):  # FSDP: a replicated DTensor
            norm = norm.full_tensor()
        return total, norm.detach()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        """Scheduler and scaler state, the step, and the optimizer's state: whole, or under
        FSDP only its hyperparameters, each rank writing its part with `save_shards`. Tensors,
        numbers and strings only (weights_only loads)."""
        from gpt2core import parallel

        optimizer = {"optimizer_groups": parallel.optimizer_groups(self.optimizer)} \
            if self.sharded else {"optimizer": self.optimizer.state_dict()}
        return {**optimizer, "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step_count}

    def save_shards(self, path: str | Path) -> None:
        """FSDP: this rank's part of the optimizer state, into `path` (every rank calls)."""
        from gpt2core import parallel

        parallel.save_optimizer_shards(self.raw, self.optimizer, path)

    def load_state_dict(self, state: dict, shards: str | Path | None = None) -> None:
        """A `state_dict()`, and for a sharded one the dir its ranks' `save_shards` wrote
        (read by any number of ranks, sharded or not). ValueError: a whole optimizer state
        cannot be sharded here (it is keyed by parameter order, not name)."""
        from gpt2core import parallel

        if "optimizer" in state:
            if self.sharded:
                raise UserError("this checkpoint's optimizer state was saved whole by "
                                "--strategy ddp; resume it with --strategy ddp.")
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            if shards is None:
                raise UserError("a sharded optimizer state needs the dir of its shards.")
            parallel.load_optimizer_shards(self.raw, self.optimizer, shards,
                                           state["optimizer_groups"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step_count = state["step"]


def _first_line(e: BaseException) -> str:
    """An error and what it wraps (BackendCompilerFailed: RuntimeError: ...), in one line."""
    root = e
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
        root = inner
    said = (str(root).strip() or "?").splitlines()[0]
    return f"{type(e).__name__}: " + (f"{type(root).__name__}: " if root is not e else "") + said


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device now: the GPU's, else the host's available RAM (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP sharded the model (its parameters are DTensors)."""
    from gpt2core.parallel import is_sharded

    return is_sharded(model)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, dtype: torch.dtype | None = None) -> tuple[float, int]:
    """(summed loss in nats, number of targets) over the batches' non-IGNORE targets."""
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for inputs, targets in batches:
        targets = targets.to(device)
        n = int((targets != IGNORE).sum())  # 0: still a forward pass, FSDP's ranks keep step
        with autocast(device, dtype):
            _, loss = model(inputs.to(device), targets)
        nats += loss.double() * n
        count += n
    model.train(was_training)
    return nats.item(), count


def bits_per_byte(mean_loss: float, tokens: int, nbytes: int) -> float:
    """Mean loss in nats per token -> bits per UTF-8 byte of the text those tokens encode."""
    return mean_loss * tokens / max(1, nbytes) / math.log(2)


# Dense bf16/fp16 tensor-core peaks (FLOP/s) by GPU name, for MFU; others are measured.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                  "L4": 121e12, "A10G": 70e12, "A10": 125e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device, dtype: torch.dtype | None = None) -> float:
    """The device's peak FLOP/s: a GPU's datasheet number, else a measured matmul rate.

    CPUs have no datasheet number that torch can see, so there the peak is what a large
    matmul reaches on the threads this process has: MFU then says how close the model comes
    to the machine's own best, which is what tuning can change.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, reps = time.perf_counter(), 8
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)
