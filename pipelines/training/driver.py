"""The train driver: resolve a run once, then make its TorchTrainer.

    job = plan_job(cfg)              # everything resolved, before Ray starts where it can be
    make_trainer(job, callbacks).fit()

`plan_job` is the one place that resolves a run: the tracking store (checked once), the run's
name and dir, the checkpoint it resumes from (found and checked once) with its MLflow run, the
`Plan` for this data and model, the workers' share of the cluster, and the datasets. It hands
each worker a `RunContext` (training/config.py), so a worker reads no flags twice and finds no
key missing on a cluster. `gpt2 train` and every `gpt2 tune` trial use it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gpt2core import storage
from pipelines.common import dataset, placement, ray_session
from pipelines.common.flags import verbose
from pipelines.common.tracking import check_experiment, tracking_uri
from pipelines.training import checkpoint
from pipelines.training.config import DEFAULT_DATA, RunContext, TrainConfig
from pipelines.training.data import TokenizerSpec
from pipelines.training.plan import Plan, make_plan, prepare_data, train_rows, validation_rows

if TYPE_CHECKING:
    from ray.data.dataset import Dataset, MaterializedDataset


@dataclass
class TrainJob:
    """A training run as the driver resolved it, before any worker starts."""

    cfg: TrainConfig  # as given, with --from_checkpoint resolved to a checkpoint dir
    name: str
    run_dir: str  # where its checkpoints go: Ray Train's RunConfig storage_path/name
    resumes: str | None  # the checkpoint it continues from: its run dir's latest (a reused
    #                      --name, --resume), else --from_checkpoint; None: a fresh start
    resumed_run_id: str | None  # the MLflow run of that checkpoint, which this run continues
    plan: Plan
    context: RunContext
    workers: int
    cpus: float  # reserved per worker
    storage: str  # --storage_path: an absolute local path or a URI
    tracking_uri: str
    train: Dataset  # the train split, streamed or cached (plan.train_rows)
    val: MaterializedDataset  # the val split, read once (plan.validation_rows)


def run_name(given: str | None, prefix: str) -> str:
    """--name, else <prefix>-<date>-<time>."""
    return given or time.strftime(f"{prefix}-%Y%m%d-%H%M%S")


def newest_run(storage_path: str, prefix: str) -> str | None:
    """The newest run named <prefix>-<date>-<time> in `storage_path`; None when it holds none.
    (The names sort by time: run_name's format.)"""
    runs = [n for n in storage.listdir(storage_path) if n.startswith(f"{prefix}-")]
    return max(runs, default=None)


def plan_job(cfg: TrainConfig, name: str | None = None) -> TrainJob:
    """Resolve the run `cfg` asks for (named `name`, else --name, else the newest gpt2-* run
    with --resume, else a new gpt2-<time>). Bad input (ValueError & co., one sentence) found
    without Ray fails before Ray starts."""
    workers = cfg.gpus or cfg.num_workers
    uri = tracking_uri(cfg.tracking_uri)
    check_experiment(uri, cfg.experiment)
    for flag in ("data", "storage_path", "save_model_path", "from_checkpoint", "from_pretrained"):
        if getattr(cfg, flag):  # a bucket that is missing or refuses us: one sentence, now
            storage.check_bucket(getattr(cfg, flag), f"--{flag}")
    where = storage.resolve(cfg.storage_path)
    name = name or run_name(cfg.name or (newest_run(where, "gpt2") if cfg.resume else None),
                            "gpt2")
    run_dir = storage.join(where, name)
    if cfg.from_checkpoint:
        cfg = replace(cfg, from_checkpoint=checkpoint.find(cfg.from_checkpoint))
    resumes = checkpoint.resumed(run_dir, cfg.from_checkpoint)
    if resumes:
        checkpoint.check_strategy(resumes, cfg.strategy)
    model_dir = storage.join(cfg.from_checkpoint, checkpoint.MODEL_DIR) if cfg.from_checkpoint \
        else cfg.from_pretrained
    if model_dir:
        from gpt2core.modelfile import read_config

        read_config(model_dir)  # a missing or broken model dir fails here
    ready = not cfg.corpus and (cfg.data != DEFAULT_DATA or storage.is_file(
        storage.join(cfg.data, dataset.MANIFEST)))  # else text is prepared first, on Ray
    if ready:  # the data and model checked against the flags before Ray starts
        manifest = dataset.load_manifest(cfg.data)
        plan = make_plan(cfg, manifest, workers, model_dir)
    ray_session.init_ray(cfg.address)
    if not ready:  # text to prepare first (a Ray job of its own; a no-op when up to date)
        manifest = prepare_data(cfg, model_dir, cfg.address)
        plan = make_plan(cfg, manifest, workers, model_dir)
    share = placement.place(workers, 1 if cfg.gpus else 0, cfg.cpus_per_worker)  # waits for GPUs
    cluster = ray_session.ray().cluster_resources()  # after any GPU nodes the autoscaler added
    data_dir = storage.resolve(cfg.data)
    # every node reads the data and the model, and writes checkpoints, itself
    ray_session.check_shared(data_dir, "--data", dataset.MANIFEST)
    if model_dir:
        flag = "--from_checkpoint" if cfg.from_checkpoint else "--from_pretrained"
        ray_session.check_shared(storage.resolve(model_dir), flag, "config.json")
    ray_session.check_shared(where, "--storage_path")
    context = RunContext(manifest, TokenizerSpec.read(storage.join(data_dir,
                                                                   manifest.tokenizer["file"])),
                         share.threads, model_dir, verbose=verbose())
    return TrainJob(cfg, name, run_dir, resumes, checkpoint.run_id(resumes) if resumes else None,
                    plan, context, workers, share.cpus, where, uri,
                    train_rows(cfg, manifest, data_dir, cluster),
                    validation_rows(cfg, manifest, data_dir, plan.eval_rows_per_batch * workers))


def make_trainer(job: TrainJob, callbacks: list | None = None, name: str | None = None,
                 storage_path: str | None = None):
    """The TorchTrainer of `job`; a Tune trial's: the job with the trial's cfg, under the
    trial's `name` in the sweep's `storage_path`."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.training.worker import train_loop_per_worker

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
            name=name or job.name, storage_path=storage_path or job.storage, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            logging_config=ray_session.train_logging()),  # its INFO lines: --verbose
        datasets={"train": job.train, "val": job.val},
        # in order: each worker's rows, and so a resumed run's position, are reproducible
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)))
