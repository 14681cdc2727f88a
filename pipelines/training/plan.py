"""What a training run will do, worked out from its config and dataset before any worker starts.

The driver calls these to refuse bad input early (one sentence, naming the fix); each worker
calls `make_plan` again with its own config, which under Ray Tune differs per trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpt2core import storage
from gpt2core.errors import UserError
from pipelines.common import dataset, ray_session
from pipelines.common.dataset import Manifest
from pipelines.training.config import DEFAULT_DATA, TrainConfig

if TYPE_CHECKING:
    from gpt2core import GPT2Config

READ_TASK_CPUS = 0.25  # a Parquet read task's share: several fit in placement.DATA_CPUS
READ_TASK_BYTES = 8 << 20  # row groups a read task takes: blocks of about this much


@dataclass
class Plan:
    model_config: GPT2Config
    from_pretrained: str | None  # weights to start from (None: random init or a checkpoint)
    seq_len: int  # tokens per training sequence
    rows_per_batch: int  # dataset rows per micro-batch (a row holds L / seq_len sequences)
    grad_accum: int  # micro-batches per optimizer step on each worker, at this world size
    eval_rows_per_batch: int
    steps_per_epoch: int  # optimizer steps per pass over one worker's share


def model_config(cfg: TrainConfig, vocab_size: int, model_dir: str | None) -> GPT2Config:
    """The model's shape: `model_dir`'s (pretrained or checkpoint), else preset + overrides.
    (Its dropout is set on the model itself: checkpoint.load_model.)"""
    from gpt2core import GPT2Config
    from gpt2core.modelfile import read_config

    if model_dir:
        config = read_config(model_dir)
        if config.vocab_size != vocab_size:
            raise UserError(
                f"the model in {model_dir} has a vocabulary of {config.vocab_size} tokens but the "
                f"dataset's has {vocab_size}; prepare the dataset with the model's tokenizer "
                f"(gpt2 prepare --vocab_path {model_dir}).")
        return config
    overrides = {k: v for k, v in (("n_layer", cfg.layers), ("n_head", cfg.heads),
                                   ("n_embd", cfg.dims)) if v is not None}
    try:
        base = GPT2Config.from_preset(cfg.preset)
        width = overrides.get("n_embd", base.n_embd)
        positions = max(base.n_positions, cfg.seq_len or 0)  # from scratch: any context
        return GPT2Config.from_preset(cfg.preset, **overrides, vocab_size=vocab_size,
                                      n_inner=cfg.rate * width, n_positions=positions)
    except ValueError as e:  # unknown preset, heads not dividing dims, ...
        raise UserError(f"{e}.") from None


def make_plan(cfg: TrainConfig, manifest: Manifest, world: int,
              model_dir: str | None = None) -> Plan:
    """Check the config against the dataset and the model; ValueError names what to change."""
    config = model_config(cfg, manifest.vocab_size, model_dir)
    L = manifest.seq_len
    seq_len = cfg.seq_len or max(d for d in range(1, min(L, config.n_positions) + 1)
                                 if L % d == 0)
    if seq_len > config.n_positions:
        raise UserError(f"--seq_len {seq_len} is longer than the model's context "
                        f"(n_positions {config.n_positions}); pass --seq_len "
                        f"{config.n_positions} or less.")
    if seq_len > L or L % seq_len:
        raise UserError(f"--seq_len {seq_len} does not fit the dataset's rows of {L} tokens; "
                        f"pass a divisor of {L}, or prepare the dataset with --seq_len "
                        f"{seq_len}.")
    k = L // seq_len  # sequences per dataset row
    if cfg.batch_train % k:
        raise UserError(f"--batch_train {cfg.batch_train} must be a multiple of {k}: each "
                        f"dataset row of {L} tokens makes {k} sequences of {seq_len}.")
    rows_per_batch = cfg.batch_train // k
    splits = manifest.splits
    train_rows, val_rows = splits["train"].rows // world, splits["val"].rows // world
    top = cfg.gpus or cfg.num_workers  # elastic: fewer workers than that each take more
    grad_accum = cfg.grad_accum * top // world if cfg.min_workers and world < top \
        else cfg.grad_accum  # micro-batches, for the same global batch
    steps = train_rows // rows_per_batch // grad_accum
    if steps == 0:
        raise UserError(
            f"the batch is larger than the data: each of {world} worker(s) gets {train_rows} "
            f"train row(s) of {L} tokens, a step needs {rows_per_batch * grad_accum}; lower "
            "--batch_train, --grad_accum or --num_workers, or prepare more text.")
    if val_rows == 0:
        raise UserError(f"the val split has {splits['val'].rows} row(s), fewer than the "
                        f"{world} workers; use fewer workers or a larger --eval_corpus.")
    return Plan(config, model_dir if model_dir and not cfg.from_checkpoint else None, seq_len,
                rows_per_batch, grad_accum, max(1, math.ceil(cfg.batch_eval / k)), steps)


def prepare_data(cfg: TrainConfig, model_dir: str | None, address: str | None) -> Manifest:
    """The dataset's manifest, preparing --data from text first where asked.

    --train_corpus given: prepare it into --data (a no-op when already done). No corpus and
    the default --data missing: prepare the sample corpus there (the demo).
    """
    from pipelines.common.modeldir import has_tokenizer
    from pipelines.preparing.config import PrepareConfig
    from pipelines.preparing.driver import prepare

    corpus = list(cfg.corpus)
    if not corpus and cfg.data == DEFAULT_DATA and \
            not storage.is_file(storage.join(cfg.data, dataset.MANIFEST)):
        corpus = ["sample"]
    if corpus:
        vocab_path = cfg.vocab_path
        if vocab_path is None and model_dir and has_tokenizer(model_dir):
            vocab_path = model_dir  # fine-tuning: the model's own tokenizer
        from gpt2core.modelfile import read_config

        positions = (read_config(model_dir) if model_dir
                     else model_config(cfg, cfg.vocab_size, None)).n_positions
        prepare(PrepareConfig(corpus=corpus, eval_corpus=list(cfg.eval_corpus), out=cfg.data,
                              seq_len=cfg.seq_len or positions, vocab_path=vocab_path,
                              vocab_size=cfg.vocab_size, address=address))
    return dataset.load_manifest(cfg.data)


def ray_split(manifest: Manifest, data_dir: str | Path, split: str, seed: int | None = None):
    """A split's rows as a (lazy) Ray Dataset, read by Parquet row group: in shard order, or
    with a seed in an order shuffled across the whole split, so rows from every part of the
    corpus (every source of a --corpus a/ b/) come from the first steps on. A read task takes
    about READ_TASK_BYTES of groups, in that order."""
    data = ray_session.ray().data
    data.DataContext.get_current().enable_progress_bars = False  # the workers print steps
    units = dataset.row_groups(manifest, split, data_dir, seed)
    group_bytes = manifest.group_rows * (manifest.seq_len + 1) \
        * np.dtype(manifest.dtype).itemsize
    per_task = max(1, READ_TASK_BYTES // group_bytes) if group_bytes else 1
    return data.from_items(units, override_num_blocks=math.ceil(len(units) / per_task)) \
        .map_batches(dataset.read_groups, batch_size=None, num_cpus=READ_TASK_CPUS)


def train_rows(cfg: TrainConfig, manifest: Manifest, data_dir: str | Path, cluster: dict):
    """The train split for TorchTrainer: read once into Ray's object store when it is at most
    --cache_train_mb and half the store (Ray's advice for data that fits: each epoch then
    splits blocks in memory, where a fresh Parquet read took ~4 s on 2 CPUs), else streamed
    from Parquet every epoch, so the corpus never has to fit in memory."""
    size = manifest.splits["train"].rows * (manifest.seq_len + 1) \
        * np.dtype(manifest.dtype).itemsize
    if size > min(cfg.cache_train_mb << 20, cluster.get("object_store_memory", 0) / 2):
        return ray_split(manifest, data_dir, "train", seed=cfg.seed)
    return read_once(manifest, data_dir, "train", seed=cfg.seed)


def validation_rows(cfg: TrainConfig, manifest: Manifest, data_dir: str | Path,
                    rows_per_eval_batch: int):
    """The val split in Ray's object store, only the rows --eval_batches reads (rows per eval
    batch over all workers): every evaluation streams it from memory, where a fresh Parquet
    read took ~5 s each time on 2 CPUs."""
    return read_once(manifest, data_dir, "val", cfg.eval_batches * rows_per_eval_batch)


def read_once(manifest: Manifest, data_dir: str | Path, split: str, rows: int = 0,
              seed: int | None = None):
    """A split (its first `rows` rows, if given) materialized in Ray's object store, in the
    order ray_split reads it: the same rows in the same blocks as the stream, on every run."""
    with ray_session.ordered():  # inside: a Dataset keeps the DataContext it was made with
        ds = ray_split(manifest, data_dir, split, seed)
        ds = ds.limit(rows) if rows else ds
        # the blocks are kept on the driver's node: a worker node that dies must not take the
        # cache with it (Ray could only rebuild the lost blocks by re-running their reads)
        return ds.map_batches(_same, batch_size=None, num_cpus=READ_TASK_CPUS,
                              **ray_session.this_node()).materialize()


def _same(batch):
    return batch

