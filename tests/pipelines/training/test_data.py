"""pipelines/training/data.py: a worker's micro-batches, skipped to a resumed position, and
grouped into optimizer steps across epochs."""

import pytest
import torch

from pipelines.common import dataset
from pipelines.training import data
from pipelines.training.checkpoint import Position
from pipelines.training.config import TrainConfig
from pipelines.training.plan import make_plan, train_rows

pytestmark = pytest.mark.slow  # Ray Data


@pytest.fixture(scope="module")
def rows(train_data):
    manifest = dataset.load_manifest(train_data)
    return manifest, train_rows(TrainConfig(cache_train_mb=0), manifest, train_data, {})


def test_a_skip_lands_on_exactly_the_batches_an_unskipped_pass_reads(rows):
    manifest, ds = rows
    cfg = TrainConfig(batch_train=8, shuffle_buffer=64, seed=3)
    plan = make_plan(cfg, manifest, world=1)
    whole = list(data.batches(ds, plan, cfg, epoch=1, rank=0, skip=0))
    resumed = list(data.batches(ds, plan, cfg, epoch=1, rank=0, skip=5))
    assert len(resumed) == len(whole) - 5 > 0
    for (a, b), (c, d) in zip(whole[5:], resumed):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_steps_run_across_epochs_to_total_steps_with_their_positions(rows):
    manifest, ds = rows
    per_epoch = make_plan(TrainConfig(batch_train=16, grad_accum=2), manifest, 1).steps_per_epoch
    cfg = TrainConfig(batch_train=16, grad_accum=2, shuffle_buffer=0,
                      total_steps=per_epoch + 2)
    plan = make_plan(cfg, manifest, world=1)
    steps = list(data.step_batches(ds, plan, cfg, Position(), world=1, rank=0))
    assert [p.step for _, p in steps] == list(range(1, cfg.total_steps + 1))
    assert all(len(group) == 2 for group, _ in steps)
    assert [p.epoch for _, p in steps][-3:] == [0, 1, 1]
    assert steps[-1][1].batch == 4 and steps[-1][1].world == 1
    tokens = 16 * plan.seq_len * 2
    assert steps[-1][1].tokens == tokens * cfg.total_steps
    resumed = list(data.step_batches(ds, plan, cfg, steps[per_epoch - 1][1], world=1, rank=0))
    assert [p for _, p in resumed] == [p for _, p in steps[per_epoch:]]  # next epoch's first
