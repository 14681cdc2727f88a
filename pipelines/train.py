"""Train GPT-2 with Ray Train: a TorchTrainer over the Parquet shards of a dataset dir.

    python pipelines/train.py                         # demo: sample corpus, tiny model, 2 CPUs
    gpt2 train --data data/dataset --preset tiny --total_steps 2000 --num_workers 2
    ray job submit --working-dir . -- python pipelines/train.py --data /shared/data/books \
        --preset gpt2 --gpus 8 --use_amp --storage_path s3://bucket/runs
    gpt2 train --train_corpus a.txt --eval_corpus b.txt --save_model_path out/model \
        --seq_len 128 --layers 6 --heads 8 --dims 256 --batch_train 32 --total_steps 5000
    gpt2 train --from_checkpoint runs/gpt2-20261124-120000     # resume a run where it stopped

Given text (--train_corpus) it prepares the dataset dir first (pipelines/prepare.py); with no
--data it uses data/dataset, preparing the sample corpus there when it does not exist.

The job, top to bottom:
  1. Driver: flags, the dataset's manifest and the model's shape are checked together (vocab,
     seq_len, batch against the data, GPUs); a bad one ends here in one sentence, exit 2.
  2. Ray Train: `num_workers` workers each run train_loop_per_worker(config). Each streams its
     equal share of the train rows (`get_dataset_shard`): row groups in an order --seed
     shuffles across the split, then a shuffle buffer seeded per epoch;
     AdamW with warm-up + cosine, grad accumulation and clipping, AMP, DDP across workers.
     Every --save_steps all ranks report and rank 0's checkpoint is kept (checkpoint.py);
     rank 0's reports carry its records, which the Train controller logs to MLflow
     (tracking.py). A dead worker restarts the group from the last checkpoint.
  3. Driver: the final checkpoint's model dir is copied to --save_model_path; a sample of text
     from it is printed, with where the model, the loss curve and the MLflow run are.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

if __name__ == "__main__":  # as a file (python/ray job submit): import pipelines by package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2core import storage
from pipelines.common import dataset, placement, ray_session
from pipelines.common.flags import option, parse
from pipelines.common.tracking import (
    History,
    check_experiment,
    check_server,
    tracking_uri,
    train_run,
)
from pipelines.training import checkpoint
from pipelines.training import data as train_data
from pipelines.training import plan as train_plan
from pipelines.training.plan import make_plan

if TYPE_CHECKING:
    from ray.data.dataset import Dataset, MaterializedDataset


@dataclass
class TrainConfig:
    # data
    data: str = option("data/dataset", "dataset dir from `gpt2 prepare` (made first when "
                       "--train_corpus is given, or from the sample corpus when missing)")
    corpus: list[str] = option([], "text to prepare into --data first (the original "
                               "project's --train_corpus)", aliases=["--train_corpus"])
    eval_corpus: list[str] = option([], "validation text for that (else 1%% is held out)")
    vocab_path: str | None = option(None, "tokenizer for that (else a BPE is trained)")
    vocab_size: int = option(8192, "size of the BPE trained for that")
    # model
    preset: str = option("tiny", "model shape: tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    layers: int | None = option(None, "transformer blocks (overrides the preset)")
    heads: int | None = option(None, "attention heads (overrides the preset)")
    dims: int | None = option(None, "embedding width (overrides the preset)")
    rate: int = option(4, "MLP width as a multiple of --dims")
    dropout: float = option(0.0, "dropout on embeddings, attention and residuals")
    seq_len: int | None = option(None, "context length trained on; default: the dataset's, "
                                 "cut to the model's n_positions")
    from_pretrained: str | None = option(None, "start from this HF GPT-2 model dir")
    # optimisation
    batch_train: int = option(8, "sequences per worker per micro-batch")
    batch_eval: int = option(16, "sequences per worker per eval batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    base_lr: float = option(1e-3, "peak learning rate")
    min_lr: float | None = option(None, "learning rate at the end of the cosine decay "
                                  "(default base_lr / 10)")
    warmup_steps: int = option(50, "steps of linear warm-up")
    wd_rate: float = option(0.01, "AdamW weight decay (matrices only)")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    total_steps: int = option(300, "optimizer steps to train")
    eval_steps: int = option(100, "evaluate on the val split every this many steps")
    eval_batches: int = option(0, "batches per worker per evaluation (0: the whole split)")
    save_steps: int = option(100, "checkpoint every this many steps")
    log_steps: int = option(10, "log train metrics every this many steps")
    shuffle_buffer: int = option(4096, "rows in each worker's shuffle buffer")
    cache_train_mb: int = option(
        1024, "a train split up to this size (and half the object store) is read once into "
        "Ray's object store; a bigger one streams from Parquet every epoch (0: always stream)")
    seed: int = option(0, "seed for initialisation, shuffling and dropout")
    use_amp: bool = option(False, "mixed precision: bf16 where supported, else fp16 + scaling")
    use_grad_ckpt: bool = option(False, "recompute activations in backward (less memory)")
    compile: bool = option(False, "torch.compile the model")
    # run
    name: str | None = option(None, "run name (default gpt2-<time>); reusing one resumes it")
    storage_path: str = option("runs", "where runs and checkpoints go (local, s3://, gs://); "
                               "on several nodes, storage they all reach",
                               aliases=["--save_checkpoint_path"])
    save_model_path: str | None = option(None, "where the final model dir goes (local, s3://, "
                                         "gs://; default <storage_path>/<name>/model)")
    from_checkpoint: str | None = option(None, "resume from a checkpoint dir or a run dir")
    keep_checkpoints: int = option(2, "checkpoints kept per run (the latest ones)")
    max_failures: int = option(3, "restarts from the last checkpoint after a worker dies")
    experiment: str = option("gpt2", "MLflow experiment")
    tracking_uri: str | None = option(None, "MLflow tracking URI; default MLFLOW_TRACKING_URI, "
                                      "else sqlite:///<working dir>/mlflow.db")
    num_workers: int = option(1, "training workers (DDP); with --gpus, one per GPU")
    gpus: int = option(0, "GPUs to train on: that many workers with one GPU each")
    cpus_per_worker: float = option(0.0, "CPUs per worker (0: share the CPUs, keeping half a "
                                    "CPU for Ray Data)")
    address: str | None = option(None, "Ray cluster to join; default RAY_ADDRESS, else local")

    def __post_init__(self) -> None:
        for name in ("batch_train", "batch_eval", "grad_accum", "total_steps", "eval_steps",
                     "save_steps", "log_steps", "num_workers", "rate", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("layers", "heads", "dims", "seq_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}.")
        if self.min_lr is None:
            self.min_lr = self.base_lr / 10
        if self.base_lr <= 0 or self.min_lr < 0 or self.min_lr > self.base_lr:
            raise ValueError("--base_lr must be positive and --min_lr in [0, base_lr].")
        if self.gpus < 0 or self.cpus_per_worker < 0 or self.max_failures < -1:
            raise ValueError("--gpus and --cpus_per_worker cannot be negative, "
                             "--max_failures not below -1 (no limit).")

    @classmethod
    def from_dict(cls, config: dict) -> TrainConfig:
        """The config's own fields out of a train_loop_config (which also holds 'runtime')."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


# --- the Ray Train worker ---------------------------------------------------------------------

def train_loop_per_worker(config: dict) -> None:
    """One worker's training: model, data shard, steps, evaluation, records and checkpoints.
    No MLflow here: a worker may run on any node, the store is the driver's (tracking.py)."""
    import ray.train
    import ray.train.torch
    import torch

    from gpt2core import training

    cfg, runtime = TrainConfig.from_dict(config), config["runtime"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(runtime["threads"])  # Ray's OMP_NUM_THREADS=1 would waste CPUs
    device = ray.train.torch.get_device()
    plan = make_plan(cfg, runtime["manifest"], world, runtime.get("model_dir"))
    tokenizer = train_data.tokenizer_from_spec(runtime["tokenizer"])

    model, saved, history = checkpoint.load_model(cfg, plan)
    def wrap(m):
        m = torch.compile(m) if cfg.compile else m
        return ray.train.torch.prepare_model(m, move_to_device=False)

    state = training.TrainState.create(
        model, lr=cfg.base_lr, weight_decay=cfg.wd_rate, warmup_steps=cfg.warmup_steps,
        total_steps=cfg.total_steps, min_lr=cfg.min_lr, device=device, use_amp=cfg.use_amp,
        wrap=wrap)
    start = {"step": 0, "tokens": 0, "epoch": 0, "batch": 0}
    if saved is not None:
        state.load_state_dict(saved)
        start = {k: saved[k] for k in start}

    log = None  # rank 0's records: metrics.jsonl, and MLflow through its reports
    if rank == 0:
        log = History(history, num_params=model.num_params(), world_size=world)
        _say(f"[rank 0] {model.num_params() / 1e6:.2f}M parameters, seq_len {plan.seq_len}, "
              f"{world} worker(s), {plan.steps_per_epoch} steps per epoch, start step "
              f"{state.step_count}")
    peak = training.peak_flops(device, state.dtype)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    tokens_per_step = cfg.batch_train * plan.seq_len * cfg.grad_accum * world
    tokens, epoch, batch = start["tokens"], start["epoch"], start["batch"]
    window = _Window()
    while state.step_count < cfg.total_steps:
        micro = train_data.batches(train_shard, plan, cfg, epoch, rank, skip=batch)
        while state.step_count < cfg.total_steps:
            group = [b for _, b in zip(range(cfg.grad_accum), micro)]
            if len(group) < cfg.grad_accum:  # epoch done (every rank has the same count)
                epoch, batch = epoch + 1, 0
                break
            batch += cfg.grad_accum
            step = state.step_count + 1
            torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # dropout: resumable
            window.add(*state.step(group, cfg.grad_clip))
            tokens += tokens_per_step
            last = step == cfg.total_steps
            metrics = {}
            if step % cfg.log_steps == 0 or last:
                tps = window.steps * tokens_per_step / (time.perf_counter() - window.start)
                metrics = {"train/loss": window.loss / window.steps, "train/lr": state.lr,
                           "train/grad_norm": window.norm / window.steps,
                           "train/tokens_per_sec": tps,
                           "train/mfu": state.raw.estimate_mfu(tps / world, peak, plan.seq_len),
                           "train/tokens": tokens, "train/epoch": epoch}
                window = None  # restarted below, after any evaluation and checkpoint
            do_eval = step % cfg.eval_steps == 0 or last
            do_save = step % cfg.save_steps == 0 or last
            if do_eval:
                metrics.update(train_data.evaluate(state, val_shard, plan, cfg,
                                                   runtime["manifest"]))
            if log is not None and metrics:
                log.add(step, metrics)
                _say(f"step {step}/{cfg.total_steps} " + " ".join(
                    f"{k} {v:.4g}" for k, v in metrics.items() if k in _SHOWN))
            if do_eval or do_save:
                position = {"step": step, "tokens": tokens, "epoch": epoch, "batch": batch,
                            "run_id": runtime.get("mlflow_run_id")}  # None: a Tune trial
                _report(state, tokenizer, log, position, metrics, save=do_save, final=last)
            window = window or _Window()


@dataclass
class _Window:
    """Sums over the steps since the last log line; evaluation and checkpoints are not timed."""

    loss: float = 0.0
    norm: float = 0.0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, norm: float) -> None:
        self.loss, self.norm, self.steps = self.loss + loss, self.norm + norm, self.steps + 1


_SHOWN = ("train/loss", "train/lr", "train/tokens_per_sec", "eval/loss", "eval/bpb")


def _say(message: str) -> None:
    """A line on the worker's console, once: Train's patched print echoes it twice when
    another library has wrapped sys.stdout."""
    print(message, file=sys.__stdout__, flush=True)


def _report(state, tokenizer, log, position: dict, metrics: dict, save: bool,
            final: bool) -> None:
    """ray.train.report on every rank (it is a barrier); rank 0 attaches its records since its
    last report (for MLflow, tracking.RunWriter) and the checkpoint."""
    import ray.train

    from gpt2core.plots import loss_curve

    metrics = {**metrics, "step": position["step"], "mlflow_run_id": position["run_id"] or ""}
    if log is not None:
        metrics.update(log.report())
    if log is None or not save:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        checkpoint.save(path, state.raw, tokenizer, {**state.state_dict(), **position},
                        log.write)
        if final:  # in the model dir: exported with it, and MLflow's artifact too
            loss_curve(log.records, path / checkpoint.MODEL_DIR / "loss_curve.png",
                       title=f"{position['run_id'] or 'Tune trial'}: "
                             f"{state.raw.num_params() / 1e6:.1f}M params")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint.dir_name(position["step"]))


# --- driver ---------------------------------------------------------------------------------

@dataclass
class Job:
    """What the driver resolved before any worker starts; pipelines/tune.py reuses it."""

    cfg: TrainConfig
    manifest: dict
    runtime: dict  # train_loop_config["runtime"]: what every worker needs beside the config
    workers: int
    cpus: float  # reserved per worker
    storage: str  # absolute local path or a URI
    train: Dataset  # the train split, streamed or cached (train_plan.train_rows)
    val: MaterializedDataset  # the val split, read once (train_plan.validation_rows)


def plan_job(cfg: TrainConfig) -> Job:
    """Check flags, data and model (ValueError & co. name the problem), prepare if asked, and
    size the workers. Bad input found without Ray fails before Ray starts."""
    workers = cfg.gpus or cfg.num_workers
    check_server(tracking_uri(cfg.tracking_uri))
    for flag in ("data", "storage_path", "save_model_path", "from_checkpoint", "from_pretrained"):
        if getattr(cfg, flag):  # a bucket that is missing or refuses us: one sentence, now
            storage.check_bucket(getattr(cfg, flag), f"--{flag}")
    if cfg.from_checkpoint:
        cfg = replace(cfg, from_checkpoint=checkpoint.find(cfg.from_checkpoint))
    model_dir = storage.join(cfg.from_checkpoint, checkpoint.MODEL_DIR) if cfg.from_checkpoint \
        else cfg.from_pretrained
    if model_dir:
        from gpt2core.modelfile import read_config

        read_config(model_dir)  # a missing or broken model dir fails here
    given = cfg.data != train_plan.DEFAULT_DATA or \
        storage.is_file(storage.join(cfg.data, dataset.MANIFEST))
    if given and not cfg.corpus:
        make_plan(cfg, asdict(dataset.load_manifest(cfg.data)), workers, model_dir)
    ray_session.init_ray(cfg.address)
    manifest = train_plan.prepare_data(cfg, model_dir, cfg.address)
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
    runtime = {"manifest": manifest, "model_dir": model_dir, "threads": share.threads,
               "tracking_uri": tracking_uri(cfg.tracking_uri), "tokenizer":
               train_data.tokenizer_spec(storage.join(data_dir, manifest["tokenizer"]["file"]))}
    return Job(cfg, manifest, runtime, workers, share.cpus, where,
               train_plan.train_rows(cfg, manifest, data_dir, cluster),
               train_plan.validation_rows(cfg, manifest, data_dir,
                                          plan.eval_rows_per_batch * workers))


def make_trainer(job: Job, name: str, cfg: TrainConfig | None = None, callbacks=None,
                 storage: str | None = None):
    """The TorchTrainer for `job` (or for `cfg`, a variant of it: a Tune trial's)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = cfg or job.cfg
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**asdict(cfg), "runtime": {**job.runtime, "name": name}},
        scaling_config=ScalingConfig(
            num_workers=job.workers, use_gpu=cfg.gpus > 0,
            resources_per_worker={"CPU": job.cpus, **({"GPU": 1} if cfg.gpus else {})}),
        run_config=RunConfig(
            name=name, storage_path=storage or job.storage, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures)),
        datasets={"train": job.train, "val": job.val},
        # in order: each worker's rows, and so a resumed run's position, are reproducible
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)))


def train(cfg: TrainConfig) -> dict:
    """Check, prepare if asked, train, export; returns where things went and the last metrics."""
    check_experiment(tracking_uri(cfg.tracking_uri), cfg.experiment)  # before Ray starts
    job = plan_job(cfg)
    cfg = job.cfg
    name = cfg.name or time.strftime("gpt2-%Y%m%d-%H%M%S")
    print(f"training {name}: {job.workers} worker(s) x {job.cpus:g} CPU"
          f"{' + 1 GPU' if cfg.gpus else ''} ({job.runtime['threads']} torch thread(s) each), "
          f"{cfg.total_steps} steps -> {job.storage}/{name}")
    with train_run(job.runtime["tracking_uri"], cfg, name, f"{job.storage}/{name}") as run:
        job = replace(job, runtime={**job.runtime, "mlflow_run_id": run.run_id})
        result = make_trainer(job, name, callbacks=[run.callback]).fit()  # the run: tracking.py
    out = storage.resolve(cfg.save_model_path or storage.join(job.storage, name, "model"))
    checkpoint.export_model(result.checkpoint, out)
    return {"name": name, "model_dir": out, "run_dir": storage.join(job.storage, name),
            "checkpoint": result.checkpoint.path, "metrics": dict(result.metrics),
            "tracking_uri": job.runtime["tracking_uri"]}


def _sample(model_dir: str, prompt: str = "\n", tokens: int = 60) -> str:
    """A few sampled tokens from the trained model (top-p 0.9), to show it works."""
    from gpt2core import GPT2, Tokenizer, generate

    model, tok = GPT2.from_pretrained(model_dir).eval(), Tokenizer.from_pretrained(model_dir)
    ids = tok.encode(prompt) or [tok.eos_id]
    return prompt + tok.decode(generate(model, ids, tokens, top_p=0.9, seed=0))


def main(argv: list[str] | None = None) -> int:
    from gpt2core import ModelFileError, TokenizerError
    from pipelines.text.corpus import CorpusError

    cfg = parse(TrainConfig, argv, prog="gpt2 train", description=__doc__.split("\n")[0])
    try:
        out = train(cfg)
    except (ValueError, ModelFileError, TokenizerError, CorpusError,
            dataset.DatasetError) as e:  # bad input: one sentence, no traceback
        if type(e).__module__.startswith("ray"):
            raise
        print(f"gpt2 train: error: {e}", file=sys.stderr)
        return 2
    m = out["metrics"]
    print(f"\nfinished {out['name']}: step {m.get('step')}, eval loss "
          f"{m.get('eval/loss', float('nan')):.4f}, {m.get('eval/bpb', float('nan')):.4f} "
          f"bits per byte\n--- sample ---\n{_sample(out['model_dir'])}\n--------------")
    print(f"model dir:   {out['model_dir']}   (loss curve: loss_curve.png inside)\n"
          f"checkpoints: {out['run_dir']}\n"
          f"MLflow run:  {m.get('mlflow_run_id')} in {out['tracking_uri']}\n"
          f"             mlflow ui --backend-store-uri {out['tracking_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
