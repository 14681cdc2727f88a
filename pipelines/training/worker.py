"""The Ray Train worker: one rank's training, as small steps read top to bottom.

    train_loop_per_worker(config)     config = {"cfg": TrainConfig, "context": RunContext}
        model, optimizer and position: fresh, --from_pretrained, or a checkpoint's
        for each optimizer step's micro-batches (data.step_batches, with the position after it):
            optimizer_step
            after_step: log (--log_steps), evaluate (--eval_steps), save (--save_steps)

No MLflow here: a worker may run on any node, and the store is the driver's. Rank 0's reports
carry its records, which the Train controller logs (pipelines/common/tracking.py).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.common.tracking import History
from pipelines.training import checkpoint, data
from pipelines.training.checkpoint import Position
from pipelines.training.plan import Plan, make_plan

if TYPE_CHECKING:
    import torch

    from gpt2core.training import TrainState
    from pipelines.training.config import RunContext, TrainConfig

SHOWN = ("train/loss", "train/lr", "train/tokens_per_sec", "eval/loss", "eval/bpb")


def train_loop_per_worker(config: dict) -> None:
    """One worker's training: model, data shard, steps, evaluation, records and checkpoints."""
    import ray.train
    import ray.train.torch
    import torch

    from gpt2core import parallel, precision, training

    cfg: TrainConfig = config["cfg"]
    run: RunContext = config["context"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(run.threads)  # Ray's OMP_NUM_THREADS=1 would waste CPUs
    device = ray.train.torch.get_device()
    plan = make_plan(cfg, run.manifest, world, run.model_dir)

    # --- Model, optimizer and where to start ---
    compile = cfg.compile if cfg.compile is not None else device.type == "cuda"

    def wrap(m):  # DDP (or FSDP) first, then compile: DDP's all-reduce then overlaps backward
        dtype = precision.autocast_dtype(cfg.precision, device, cfg.use_amp)
        return parallel.wrap(m, cfg.strategy, device=device, dtype=dtype, compile=compile)

    with checkpoint.opened(cfg) as resume:  # None: a fresh start
        model, saved, history = checkpoint.load_model(cfg, plan, resume)
        state = training.TrainState.create(
            model, lr=cfg.base_lr, weight_decay=cfg.wd_rate, warmup_steps=cfg.warmup_steps,
            total_steps=cfg.total_steps, min_lr=cfg.min_lr, device=device,
            precision=cfg.precision, use_amp=cfg.use_amp, wrap=wrap,
            sharded_state=cfg.strategy == "fsdp")  # so more workers can resume it sharded
        start = Position()
        if saved is not None:  # FSDP: each rank reads its part of the optimizer's shards
            state.load_state_dict(saved, shards=resume / checkpoint.SHARDS_DIR)
            start = Position.of(saved)
    log = None  # rank 0's records: metrics.jsonl, and MLflow through its reports
    if rank == 0:
        log = History(history, num_params=model.num_params(), world_size=world)
        say(f"[rank 0] {model.num_params() / 1e6:.2f}M parameters, seq_len {plan.seq_len}, "
            f"{world} worker(s), {plan.steps_per_epoch} steps per epoch, start step "
            f"{start.step}" + (", compiled" if compile else ""))
        if cfg.strategy == "fsdp" and world == 1:
            say("[rank 0] --strategy fsdp with 1 worker: nothing to shard, so the model runs "
                "whole as under ddp; the optimizer state is still saved in shards")
    worker = Worker(cfg, run, plan, state, run.tokenizer.load(), log, world,
                    ray.train.get_dataset_shard("val"),
                    Meter(peak=training.peak_flops(device, state.dtype)))

    # --- Training loop ---
    train_shard = ray.train.get_dataset_shard("train")
    for micro_batches, pos in data.step_batches(train_shard, plan, cfg, start, world, rank):
        torch.manual_seed(cfg.seed * 1_000_003 + pos.step * world + rank)  # dropout: resumable
        first = state.first_step_s is None
        worker.meter.add(*state.step(micro_batches, cfg.grad_clip))
        if first and rank == 0:  # its time is in the first throughput figure too
            say(f"[rank 0] first step {state.first_step_s:.1f} s ("
                + ("compiling" if compile and not state.compile_error else "warm-up")
                + f"); loss: {state.raw.loss_impl} cross-entropy")
        worker.after_step(pos)


@dataclass
class Meter:
    """Train loss, gradient norm and time summed since the last log line. The time of
    evaluations and checkpoints is kept apart (`paused`): throughput counts steps only.

    Loss and norm are summed as tensors on the device: reading them waits for the GPU, so
    that happens only on logging steps (`read`), never once a step."""

    peak: float  # the device's peak FLOP/s, for MFU
    loss: float | torch.Tensor = 0.0
    norm: float | torch.Tensor = 0.0
    steps: int = 0
    paused: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        self.loss, self.norm, self.steps = self.loss + loss, self.norm + norm, self.steps + 1

    def read(self) -> tuple[float, float, float]:
        """(mean loss, mean grad norm, seconds of training) since the last reset; waits for
        the device to finish the steps first, so the seconds are theirs."""
        loss, norm = float(self.loss) / self.steps, float(self.norm) / self.steps
        return loss, norm, time.perf_counter() - self.start - self.paused

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def reset(self) -> None:
        self.loss, self.norm, self.steps, self.paused = 0.0, 0.0, 0, 0.0
        self.start = time.perf_counter()


@dataclass
class Worker:
    """What a rank keeps between steps, and what it does after each."""

    cfg: TrainConfig
    run: RunContext
    plan: Plan
    state: TrainState
    tokenizer: object  # gpt2core.Tokenizer, saved into checkpoints
    log: History | None  # rank 0's
    world: int
    val: object  # this rank's val shard (ray.train.get_dataset_shard)
    meter: Meter

    def after_step(self, pos: Position) -> None:
        """Log every --log_steps, evaluate every --eval_steps, checkpoint every --save_steps,
        and all three after the last step."""
        cfg, last = self.cfg, pos.step == self.cfg.total_steps
        logged = pos.step % cfg.log_steps == 0 or last
        evaluated = pos.step % cfg.eval_steps == 0 or last
        saved = pos.step % cfg.save_steps == 0 or last
        if logged:
            metrics = self.train_metrics(pos)
            self.meter.reset()
        else:
            metrics = {}
        began = time.perf_counter()
        if evaluated:
            metrics.update(data.evaluate(self.state, self.val, self.plan, cfg, self.run.manifest))
        if self.log is not None and metrics:
            self.log.add(pos.step, metrics)
        if self.log is not None and metrics and self.shown(pos.step, evaluated):
            say(f"step {pos.step}/{cfg.total_steps} " + " ".join(
                f"{k} {v:.4g}" for k, v in metrics.items() if k in SHOWN))
        if evaluated or saved:
            self.report(pos, metrics, save=saved, final=last)
        self.meter.pause(time.perf_counter() - began)  # shown at the next log line

    def shown(self, step: int, evaluated: bool) -> bool:
        """Whether a step's metrics go to the console: the logged step nearest every 10 % of
        the run, evaluations unless they come more often than that, and the last step (all
        logged steps with --verbose); --log_steps alone sets what MLflow records."""
        cfg = self.cfg
        every = cfg.log_steps * (1 if self.run.verbose else
                                 max(1, round(cfg.total_steps / 10 / cfg.log_steps)))
        return (step % every == 0 or step == cfg.total_steps
                or (evaluated and cfg.eval_steps >= every))

    def train_metrics(self, pos: Position) -> dict:
        """The log line's numbers: means over the steps since the last one, throughput, MFU."""
        m, seq_len = self.meter, self.plan.seq_len
        tokens_per_step = self.cfg.batch_train * seq_len * self.plan.grad_accum * self.world
        loss, norm, seconds = m.read()
        tps = m.steps * tokens_per_step / seconds
        return {"train/loss": loss, "train/lr": self.state.lr,
                "train/grad_norm": norm, "train/tokens_per_sec": tps,
                "train/pause_s": m.paused,
                "train/mfu": self.state.raw.estimate_mfu(tps / self.world, m.peak, seq_len),
                "train/tokens": pos.tokens, "train/epoch": pos.epoch,
                "train/workers": self.world}  # elastic training changes it

    def report(self, pos: Position, metrics: dict, save: bool, final: bool) -> None:
        """ray.train.report on every rank (it is a barrier); rank 0 attaches its records since
        its last report (for MLflow: tracking.RunWriter) and the checkpoint."""
        import ray.train

        from gpt2core import parallel
        from pipelines.common.plots import loss_curve

        run_id = self.run.mlflow_run_id
        metrics = {**metrics, "step": pos.step, "mlflow_run_id": run_id or ""}
        if self.log is not None:
            metrics.update(self.log.report())
        # written here, uploaded by Ray (every rank's files into one checkpoint dir): in ASYNC
        # mode from a background thread while training goes on (Ray deletes the dir after),
        # in SYNC mode before report returns
        path, model = None, self.state.raw
        if save and self.state.sharded:  # FSDP: weights gathered to rank 0, optimizer sharded
            model, path = parallel.unsharded_copy(model), new_dir()
            self.state.save_shards(path / checkpoint.SHARDS_DIR)
        if save and self.log is not None:
            path = path or new_dir()
            checkpoint.save(path, model, self.tokenizer, self.state, pos, run_id, self.log.write)
            if final:  # in the model dir: exported with it, and MLflow's artifact too
                loss_curve(self.log.records, path / checkpoint.MODEL_DIR / "loss_curve.png",
                           title=f"{run_id or 'Tune trial'}: "
                                 f"{model.num_params() / 1e6:.1f}M params")
        if path is None:
            ray.train.report(metrics, checkpoint=None)
            return
        mode = ray.train.CheckpointUploadMode[self.cfg.checkpoint_upload_mode.upper()]
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path),
                         checkpoint_dir_name=checkpoint.dir_name(pos.step),
                         checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True)


def new_dir() -> Path:
    """A fresh local dir to write a checkpoint into."""
    return Path(tempfile.mkdtemp(prefix="gpt2ray-ckpt-"))


def say(message: str) -> None:
    """A line on the worker's console, once: Train's patched print echoes it twice when
    another library has wrapped sys.stdout."""
    print(message, file=sys.__stdout__, flush=True)
