"""A training worker's view of the dataset dir: its steps' micro-batches, evaluation, tokenizer.

Rows come from Ray Data (`ray.train.get_dataset_shard`) as numpy batches; these turn them into
model inputs with gpt2core.training, and sum validation loss over every worker.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

from pipelines.common import dataset
from pipelines.common.dataset import Manifest
from pipelines.training.checkpoint import Position
from pipelines.training.config import TrainConfig
from pipelines.training.plan import Plan


@dataclass(frozen=True)
class TokenizerSpec:
    """A dataset's tokenizer as data (its tokenizer.json and end-of-text token), read once by
    the driver: a worker then needs no access to the dataset dir's files for it."""

    json: str
    eos_token: str

    @classmethod
    def read(cls, path: str) -> TokenizerSpec:
        """tokenizer.json at `path` (local or a URI)."""
        from gpt2core import Tokenizer, storage

        with storage.local_copy(path) as local:
            return cls(local.read_text(encoding="utf-8"),
                       Tokenizer.from_pretrained(local).eos_token)

    def load(self):
        """The gpt2core.Tokenizer."""
        import tokenizers

        from gpt2core import Tokenizer

        return Tokenizer(tokenizers.Tokenizer.from_str(self.json), self.eos_token)


def step_batches(shard, plan: Plan, cfg: TrainConfig, start: Position, world: int,
                 rank: int) -> Iterator[tuple[list, Position]]:
    """Each optimizer step's micro-batches (plan.grad_accum of them) with the position after
    the step, from `start` to --total_steps. Epochs follow one another; an epoch's last
    micro-batches that do not fill a step are dropped (every rank has the same number, so all
    ranks agree)."""
    tokens_per_step = cfg.batch_train * plan.seq_len * plan.grad_accum * world
    pos = start.on(world)
    while pos.step < cfg.total_steps:
        micro = batches(shard, plan, cfg, pos.epoch, rank, skip=pos.batch)
        for group in zip(*[micro] * plan.grad_accum):  # whole steps only
            pos = Position(pos.step + 1, pos.tokens + tokens_per_step, pos.epoch,
                           pos.batch + plan.grad_accum, world)
            yield list(group), pos
            if pos.step == cfg.total_steps:
                return
        pos = replace(pos, epoch=pos.epoch + 1, batch=0)


def batches(shard, plan: Plan, cfg: TrainConfig, epoch: int, rank: int, skip: int):
    """This worker's micro-batches of an epoch as (inputs, targets), the first `skip` dropped.

    The order is fixed by the seed: the split's row groups come in an order shuffled across the
    whole split by --seed (plan.train_rows), Ray Data splits them in that order among
    the workers (preserve_order), and each worker's shuffle buffer mixes them further, seeded
    by (seed, epoch, rank); so a resumed run skips exactly what the interrupted one had
    consumed. The skipped batches are counted as numpy rows, never collated into tensors.
    """
    from gpt2core.training import rows_to_batch

    it = shard.iter_batches(
        batch_size=plan.rows_per_batch, drop_last=True, batch_format="numpy",
        local_shuffle_buffer_size=cfg.shuffle_buffer or None,
        local_shuffle_seed=cfg.seed * 7919 + epoch * 1009 + rank)
    for i, batch in enumerate(it):
        if i >= skip:
            yield rows_to_batch(*collate(batch), plan.seq_len)


def collate(batch: dict):
    """A Ray Data numpy batch -> (tokens (B, L + 1) int64, length (B,)) tensors."""
    import numpy as np
    import torch

    rows = dataset.stack_rows(batch["tokens"]).astype(np.int64)
    return torch.from_numpy(rows), torch.from_numpy(np.asarray(batch["length"], np.int64))


def evaluate(state, shard, plan: Plan, cfg: TrainConfig, manifest: Manifest) -> dict:
    """Validation loss, perplexity and bits per byte, summed over every worker's share."""
    import itertools

    import torch
    import torch.distributed as dist

    from gpt2core.training import bits_per_byte, evaluate, rows_to_batch

    it = (collate(b) for b in shard.iter_batches(batch_size=plan.eval_rows_per_batch,
                                                 batch_format="numpy"))
    if cfg.eval_batches:
        it = itertools.islice(it, cfg.eval_batches)
    nats, count = evaluate(state.raw, (rows_to_batch(r, n, plan.seq_len) for r, n in it),
                           state.device, state.dtype)
    totals = torch.tensor([nats, count], dtype=torch.float64, device=state.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    mean = (totals[0] / totals[1].clamp(min=1)).item()
    val = manifest.splits["val"]
    return {"eval/loss": mean, "eval/ppl": math.exp(min(mean, 50.0)),
            "eval/bpb": bits_per_byte(mean, val.tokens, val.bytes)}

