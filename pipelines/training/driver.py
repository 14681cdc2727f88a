"""The training job that `gpt2 train` runs and each `gpt2 tune` trial runs a variant of.

    job = plan_job(cfg)                     # checks, prepares if asked, sizes workers; starts Ray
    make_trainer(job, name, callbacks).fit()

`plan_job` resolves on the driver everything a worker needs beside its TrainConfig into a
`RunContext` (typed, pickled once into train_loop_config), so a worker reads no flags twice and
finds no key missing on a cluster.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gpt2core import storage
from pipelines.common import dataset, placement, ray_session
from pipelines.common.dataset import Manifest
from pipelines.common.flags import verbose
from pipelines.common.tracking import check_server, tracking_uri
from pipelines.training import checkpoint
from pipelines.training.config import DEFAULT_DATA, TrainConfig
from pipelines.training.data import TokenizerSpec
from pipelines.training.plan import make_plan, prepare_data, train_rows, validation_rows

if TYPE_CHECKING:
    from ray.data.dataset import Dataset, MaterializedDataset


@dataclass(frozen=True)
class RunContext:
    """What every worker gets beside its TrainConfig: train_loop_config["context"]."""

    manifest: Manifest  # the dataset's
    tokenizer: TokenizerSpec  # the dataset's, saved into every checkpoint's model dir
    threads: int  # torch threads per worker (Ray sets OMP_NUM_THREADS=1)
    model_dir: str | None  # the model to start from: a checkpoint's, or --from_pretrained
    mlflow_run_id: str | None = None  # None in a Tune trial: its driver logs the trial's run
    verbose: bool = False  # --verbose: a console line at every --log_steps, not every ~10 %


@dataclass
class Job:
    """What the driver resolved before any worker starts."""

    cfg: TrainConfig
    context: RunContext
    workers: int
    cpus: float  # reserved per worker
    storage: str  # --storage_path: an absolute local path or a URI
    tracking_uri: str
    train: Dataset  # the train split, streamed or cached (plan.train_rows)
    val: MaterializedDataset  # the val split, read once (plan.validation_rows)

    def run_dir(self, name: str) -> str:
        """Where run `name` keeps its checkpoints (Ray Train's RunConfig storage_path/name)."""
        return storage.join(self.storage, name)


def run_name(given: str | None, prefix: str) -> str:
    """--name, else <prefix>-<date>-<time>."""
    return given or time.strftime(f"{prefix}-%Y%m%d-%H%M%S")


def newest_run(storage_path: str, prefix: str) -> str | None:
    """The newest run named <prefix>-<date>-<time> in `storage_path`; None when it holds none.
    (The names sort by time: run_name's format.)"""
    runs = [n for n in storage.listdir(storage_path) if n.startswith(f"{prefix}-")]
    return max(runs, default=None)


def plan_job(cfg: TrainConfig) -> Job:
    """Check flags, data and model (ValueError & co. name the problem), prepare if asked, and
    size the workers. Bad input found without Ray fails before Ray starts."""
    workers = cfg.gpus or cfg.num_workers
    uri = tracking_uri(cfg.tracking_uri)
    check_server(uri)
    for flag in ("data", "storage_path", "save_model_path", "from_checkpoint", "from_pretrained"):
        if getattr(cfg, flag):  # a bucket that is missing or refuses us: one sentence, now
            storage.check_bucket(getattr(cfg, flag), f"--{flag}")
    if cfg.from_checkpoint:
        cfg = replace(cfg, from_checkpoint=checkpoint.find(cfg.from_checkpoint))
        checkpoint.check_strategy(cfg.from_checkpoint, cfg.strategy)
    model_dir = storage.join(cfg.from_checkpoint, checkpoint.MODEL_DIR) if cfg.from_checkpoint \
        else cfg.from_pretrained
    if model_dir:
        from gpt2core.modelfile import read_config

        read_config(model_dir)  # a missing or broken model dir fails here
    given = cfg.data != DEFAULT_DATA or storage.is_file(storage.join(cfg.data, dataset.MANIFEST))
    if given and not cfg.corpus:
        make_plan(cfg, dataset.load_manifest(cfg.data), workers, model_dir)
    ray_session.init_ray(cfg.address)
    manifest = prepare_data(cfg, model_dir, cfg.address)
    plan = make_plan(cfg, manifest, workers, model_dir)
    share = placement.place(workers, 1 if cfg.gpus else 0, cfg.cpus_per_worker)  # waits for GPUs
    cluster = ray_session.ray().cluster_resources()  # after any GPU nodes the autoscaler added
    data_dir, where = storage.resolve(cfg.data), storage.resolve(cfg.storage_path)
    # every node reads the data and the model, and writes checkpoints, itself
    ray_session.check_shared(data_dir, "--data", dataset.MANIFEST)
    if model_dir:
        flag = "--from_checkpoint" if cfg.from_checkpoint else "--from_pretrained"
        ray_session.check_shared(storage.resolve(model_dir), flag, "config.json")
    ray_session.check_shared(where, "--storage_path")
    context = RunContext(manifest, TokenizerSpec.read(storage.join(data_dir,
                                                                   manifest.tokenizer["file"])),
                         share.threads, model_dir, verbose=verbose())
    return Job(cfg, context, workers, share.cpus, where, uri,
               train_rows(cfg, manifest, data_dir, cluster),
               validation_rows(cfg, manifest, data_dir, plan.eval_rows_per_batch * workers))


def make_trainer(job: Job, name: str, callbacks: list | None = None,
                 storage_path: str | None = None):
    """The TorchTrainer of `job` (a Tune trial's: the job with the trial's cfg), run `name`."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.training.loop import train_loop_per_worker

    cfg = job.cfg
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "context": job.context},
        scaling_config=ScalingConfig(
            num_workers=(cfg.min_workers, job.workers) if 0 < cfg.min_workers < job.workers
            else job.workers,  # elastic: Ray Train restarts the group smaller or larger
            elastic_resize_monitor_interval_s=float(os.environ.get("GPT2_RESIZE_S", "60")),
            use_gpu=cfg.gpus > 0,
            resources_per_worker={"CPU": job.cpus, **({"GPU": 1} if cfg.gpus else {})}),
        run_config=RunConfig(
            name=name, storage_path=storage_path or job.storage, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            logging_config=ray_session.train_logging()),  # its INFO lines: --verbose
        datasets={"train": job.train, "val": job.val},
        # in order: each worker's rows, and so a resumed run's position, are reproducible
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)))
