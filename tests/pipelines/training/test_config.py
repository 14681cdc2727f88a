"""pipelines/training/config.py: what TrainConfig refuses, in one sentence naming the flag."""

import pytest

from pipelines.training.config import TrainConfig
from pipelines.training.plan import make_plan


@pytest.mark.parametrize("flags, message", [
    (dict(min_workers=3, num_workers=2), "--min_workers must be between 1 and 2"),
    (dict(min_workers=2, num_workers=3), "pass --grad_accum 2"),
    (dict(min_workers=1, num_workers=4, grad_accum=2), "pass --grad_accum 3"),
    (dict(checkpoint_upload_mode="later"), "--checkpoint_upload_mode is async or sync"),
    (dict(base_lr=1e-4, min_lr=1e-3), "--min_lr in \\[0, base_lr\\]"),
    (dict(precision="fp8"), "--precision is one of auto, fp32, bf16, fp16"),
    (dict(precision="fp32", use_amp=True), "pass one of them"),
    (dict(strategy="zero3"), "--strategy is ddp or fsdp"),
])
def test_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**flags)


def test_elastic_ranges_that_keep_the_global_batch():
    for flags in (dict(min_workers=1, num_workers=2), dict(min_workers=2, num_workers=3,
                                                           grad_accum=2),
                  dict(min_workers=1, num_workers=4, grad_accum=3), dict(min_workers=4, gpus=4)):
        TrainConfig(**flags)


def test_fewer_workers_accumulate_more_so_a_step_is_the_same_batch():
    from pipelines.common.dataset import Manifest, Split

    split = Split(rows=1000, tokens=64_000, bytes=200_000)
    manifest = Manifest(tokenizer={}, vocab_size=300, eos_id=0, seq_len=64, dtype="uint16",
                        splits={"train": split, "val": split})
    cfg = TrainConfig(batch_train=8, grad_accum=3, num_workers=4, min_workers=1)
    plans = {w: make_plan(cfg, manifest, w) for w in (1, 2, 3, 4)}
    assert {w: p.grad_accum for w, p in plans.items()} == {1: 12, 2: 6, 3: 4, 4: 3}
    assert len({8 * w * p.grad_accum for w, p in plans.items()}) == 1  # sequences per step
    assert len({p.steps_per_epoch for p in plans.values()}) == 1


def test_precision_names_are_gpt2core_s():
    from gpt2core import precision
    from pipelines.training import config

    assert config.PRECISIONS == precision.PRECISIONS
    for name in config.PRECISIONS:
        TrainConfig(precision=name)
