"""TrainConfig: every flag of `gpt2 train` (and the base of each `gpt2 tune` trial); RunContext:
what the driver resolved for the workers beside it.

One dataclass feeds the CLI (pipelines/common/flags.py), Tune's trial overrides
(`dataclasses.replace(cfg, **trial)`), the workers and MLflow's params; a field the user did not
give keeps its default, and what follows from other fields (min_lr, the model's shape, the
sequence length) is worked out where it is used, so MLflow shows what the user gave.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpt2core.errors import UserError
from pipelines.common.flags import option

if TYPE_CHECKING:
    from pipelines.common.dataset import Manifest
    from pipelines.training.data import TokenizerSpec

DEFAULT_DATA = "data/dataset"  # where the demo prepares the sample corpus
# gpt2core.precision.PRECISIONS, spelled here so that parsing flags imports no torch (a test
# holds the two equal)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    # data
    data: str = option(DEFAULT_DATA, "dataset dir from `gpt2 prepare` (made first when "
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
                                  "(default: --base_lr / 10, worked out at the schedule)")
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
    precision: str = option(
        "auto", "auto: bf16 autocast on GPUs with compute capability >= 8.0, fp16 + loss "
        "scaling on older ones, TF32 matmuls for fp32 work; fp32 on CPUs (bf16 with --use_amp)."
        " fp32, bf16, fp16: that, on any device (gpt2core/precision.py)")
    use_amp: bool = option(False, "the original project's mixed precision flag: with "
                           "--precision auto, bf16 on CPUs too (GPUs are mixed already)")
    use_grad_ckpt: bool = option(False, "recompute activations in backward (less memory)")
    compile: bool | None = option(None, "torch.compile the model (after the DDP/FSDP wrap); "
                                  "default: on with --gpus, off on CPUs. A compilation that "
                                  "fails falls back to eager with one warning")
    strategy: str = option("ddp", "ddp: every worker holds the whole model and optimizer; "
                           "fsdp: FSDP2 shards parameters, gradients and AdamW state over the "
                           "workers, per block (for gpt2-large/xl on 24 GB GPUs); with one "
                           "worker it runs as ddp, saving the optimizer state in shards")
    # run
    name: str | None = option(None, "run name (default gpt2-<time>); reusing one resumes it")
    resume: bool = option(False, "continue the newest gpt2-<time> run in --storage_path (or "
                          "--name) from its latest complete checkpoint, or start one: after a "
                          "crash, run the same command again")
    storage_path: str = option("runs", "where runs and checkpoints go (local, s3://, gs://); "
                               "on several nodes, storage they all reach",
                               aliases=["--save_checkpoint_path"])
    save_model_path: str | None = option(None, "where the final model dir goes (local, s3://, "
                                         "gs://; default <storage_path>/<name>/model)")
    from_checkpoint: str | None = option(None, "resume from a checkpoint dir or a run dir")
    keep_checkpoints: int = option(2, "checkpoints kept per run (the latest ones)")
    checkpoint_upload_mode: str = option(
        "async", "async: training goes on while rank 0's checkpoint uploads (Ray Train's "
        "ASYNC mode); sync: every rank waits for the upload")
    max_failures: int = option(3, "restarts from the last checkpoint after a worker dies")
    experiment: str = option("gpt2", "MLflow experiment")
    tracking_uri: str | None = option(None, "MLflow tracking URI; default MLFLOW_TRACKING_URI, "
                                      "else sqlite:///<working dir>/mlflow.db")
    num_workers: int = option(1, "training workers (DDP); with --gpus, one per GPU")
    gpus: int = option(0, "GPUs to train on: that many workers with one GPU each")
    min_workers: int = option(0, "elastic training: go on with as few as this many workers "
                              "when nodes are lost, and grow back to --num_workers (or --gpus) "
                              "when they return; the global batch stays the same (each "
                              "worker accumulates more micro-batches). 0: a fixed size")
    cpus_per_worker: float = option(0.0, "CPUs per worker (0: share the CPUs, keeping half a "
                                    "CPU for Ray Data)")
    address: str | None = option(None, "Ray cluster to join; default RAY_ADDRESS, else local")

    def __post_init__(self) -> None:
        for name in ("batch_train", "batch_eval", "grad_accum", "total_steps", "eval_steps",
                     "save_steps", "log_steps", "num_workers", "rate", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("layers", "heads", "dims", "seq_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}.")
        if self.base_lr <= 0 or not 0 <= (self.min_lr or 0) <= self.base_lr:
            raise UserError("--base_lr must be positive and --min_lr in [0, base_lr].")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision is one of {', '.join(PRECISIONS)}, got "
                            f"{self.precision}.")
        if self.use_amp and self.precision == "fp32":
            raise UserError("--use_amp asks for mixed precision and --precision fp32 for "
                            "none; pass one of them.")
        if self.strategy not in ("ddp", "fsdp"):
            raise UserError(f"--strategy is ddp or fsdp, got {self.strategy}.")
        if self.checkpoint_upload_mode not in ("async", "sync"):
            raise UserError("--checkpoint_upload_mode is async or sync, got "
                            f"{self.checkpoint_upload_mode}.")
        top = self.gpus or self.num_workers
        if self.min_workers:
            if not 1 <= self.min_workers <= top:
                raise UserError(f"--min_workers must be between 1 and {top} (the most "
                                f"workers), got {self.min_workers}.")
            lcm = math.lcm(*range(self.min_workers, top + 1))
            step = lcm // math.gcd(lcm, top)
            if self.grad_accum % step:
                raise UserError(
                    f"with {self.min_workers} to {top} workers the global batch stays the "
                    f"same only if every worker count divides --grad_accum x {top}; pass "
                    f"--grad_accum {step} (or a multiple of it).")
        if self.gpus < 0 or self.cpus_per_worker < 0 or self.max_failures < -1:
            raise UserError("--gpus and --cpus_per_worker cannot be negative, "
                            "--max_failures not below -1 (no limit).")


@dataclass(frozen=True)
class RunContext:
    """What every worker gets beside its TrainConfig, as training/driver.py resolved it:
    train_loop_config["context"]."""

    manifest: Manifest  # the dataset's
    tokenizer: TokenizerSpec  # the dataset's, saved into every checkpoint's model dir
    threads: int  # torch threads per worker (Ray sets OMP_NUM_THREADS=1)
    model_dir: str | None  # the model to start from: a checkpoint's, or --from_pretrained
    mlflow_run_id: str | None = None  # None in a Tune trial: its driver logs the trial's run
    verbose: bool = False  # --verbose: a console line at every --log_steps, not every ~10 %
