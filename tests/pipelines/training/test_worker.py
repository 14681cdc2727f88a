"""pipelines/training/worker.py: the Meter (no host sync per step), and two gloo workers on a
local Ray cluster training with --compile after DDP, and with --strategy fsdp (save in
shards, resume on another number of workers)."""

import json
import math
from pathlib import Path

import pytest
import torch

from pipelines.training import checkpoint
from pipelines.training.worker import Meter


def test_meter_sums_device_tensors_and_reads_them_once():
    m = Meter(peak=1.0)
    for loss, norm in ((2.0, 1.0), (4.0, 3.0)):
        m.add(torch.tensor(loss), torch.tensor(norm))
    assert isinstance(m.loss, torch.Tensor)  # nothing read back yet: no sync per step
    loss, norm, seconds = m.read()
    assert (loss, norm) == (3.0, 2.0) and seconds > 0
    m.reset()
    assert m.steps == 0 and m.loss == 0.0


def run_config(tmp: Path, data: Path, **overrides):
    from pipelines.training.config import TrainConfig

    base = dict(data=str(data), storage_path=str(tmp / "runs"), name="run",
                tracking_uri=f"sqlite:///{tmp}/mlflow.db", layers=2, heads=2, dims=64,
                batch_train=8, batch_eval=16, warmup_steps=2, base_lr=3e-3, log_steps=5,
                total_steps=10, eval_steps=10, save_steps=5, eval_batches=2, seed=1,
                num_workers=2)
    return TrainConfig(**{**base, **overrides})


def evals(model_dir) -> list[float]:
    lines = Path(model_dir, "metrics.jsonl").read_text().splitlines()
    return [r["eval/loss"] for r in map(json.loads, lines) if "eval/loss" in r]


@pytest.mark.slow
def test_two_workers_compile_after_ddp(tmp_path, train_data):
    from pipelines.train import train

    out = train(run_config(tmp_path, train_data, compile=True))
    (loss,) = evals(out["model_dir"])
    assert out["metrics"]["step"] == 10 and loss < math.log(300)  # below uniform guessing


@pytest.mark.slow
def test_two_workers_fsdp_save_a_model_dir_and_resume(tmp_path, train_data):
    from gpt2core import GPT2
    from pipelines.train import train

    out = train(run_config(tmp_path, train_data, strategy="fsdp", total_steps=5))
    model = GPT2.from_pretrained(out["model_dir"])  # gathered: a whole HF model dir
    assert model.config.n_layer == 2
    shards = Path(out["checkpoint"], checkpoint.SHARDS_DIR)  # the optimizer: one part a rank
    assert sorted(p.name for p in shards.iterdir()) == [
        "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]
    assert "optimizer" not in checkpoint.load_state(out["checkpoint"])
    resumed = train(run_config(tmp_path, train_data, strategy="fsdp", name="again",
                               num_workers=1, from_checkpoint=out["run_dir"]))  # 2 parts -> 1
    assert resumed["metrics"]["step"] == 10 and evals(resumed["model_dir"])[-1] < math.log(300)
    # one worker trained the model whole (as ddp), yet saved its optimizer state in shards,
    # so more workers can resume it sharded
    shards = Path(resumed["checkpoint"], checkpoint.SHARDS_DIR)
    assert [p.name for p in shards.iterdir()] == ["rank-00000-of-00001.safetensors"]
    assert "optimizer" not in checkpoint.load_state(resumed["checkpoint"])
