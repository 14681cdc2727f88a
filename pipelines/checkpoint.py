"""Training checkpoints (DESIGN.md): a model dir plus the state that resumes the run exactly.

    checkpoint_0000250/
        model/            a Hugging Face GPT-2 model dir: config.json, model.safetensors,
                          tokenizer files, metrics.jsonl (the run's history up to this step)
        train_state.pt    optimizer, LR scheduler and grad scaler state, step, tokens seen,
                          data position (epoch, micro-batch within it), MLflow run id

RNG state is not stored: every step reseeds torch from (seed, step, rank), so a resumed run
draws the same dropout masks as an uninterrupted one. train_state.pt holds tensors, numbers
and strings only and is read with torch.load(weights_only=True): never an arbitrary pickle.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pipelines import dataset

MODEL_DIR = "model"
STATE_FILE = "train_state.pt"
PREFIX = "checkpoint_"


def dir_name(step: int) -> str:
    """The checkpoint's directory name; zero-padded so names sort by step."""
    return f"{PREFIX}{step:07d}"


def find(path: str) -> str:
    """A checkpoint dir, or the latest checkpoint in a run dir; ValueError names the problem."""
    if "://" in path:
        raise ValueError(f"--from_checkpoint {path}: pass a local checkpoint dir; copy it "
                         "from remote storage first (aws s3 sync, gsutil rsync).")
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise ValueError(f"--from_checkpoint {path} does not exist; pass a checkpoint dir "
                         f"({PREFIX}*) or the run dir that holds them.")
    if not (p / STATE_FILE).is_file():
        found = sorted(c for c in p.glob(f"{PREFIX}*") if (c / STATE_FILE).is_file())
        if not found:
            raise ValueError(f"--from_checkpoint {path} is not a checkpoint (no {STATE_FILE}) "
                             f"and holds no {PREFIX}* dirs; pass one of those.")
        p = found[-1]
    if not (p / MODEL_DIR / "config.json").is_file():
        raise ValueError(f"checkpoint {p} has no {MODEL_DIR}/config.json; it is incomplete.")
    return str(p)


def save(path: Path, model, tokenizer, train_state: dict, history_writer) -> None:
    """Write a checkpoint into `path` (a fresh dir that Ray Train then persists)."""
    model.save_pretrained(path / MODEL_DIR, tokenizer)
    history_writer(path / MODEL_DIR)
    tmp = path / (STATE_FILE + ".tmp")
    torch.save(train_state, tmp)
    tmp.rename(path / STATE_FILE)


def load_state(path: str | Path) -> dict:
    """train_state.pt of a checkpoint dir, loaded without unpickling code."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def export_model(ckpt, out: Path) -> None:
    """The checkpoint's model dir -> `out`, whole or not at all (copied, then renamed)."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ckpt.to_directory(str(tmp / "ckpt"))
        dataset.commit(tmp / "ckpt" / MODEL_DIR, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(cfg, plan):
    """The model a worker trains, (model, saved train state or None, history): from the
    checkpoint Ray Train hands back after a failure (or cfg.from_checkpoint), else
    plan.from_pretrained, else a fresh init of plan.model_config; with cfg's dropout and
    gradient checkpointing. Runs inside a Ray Train worker."""
    import ray.train

    from gpt2core import GPT2
    from pipelines.tracking import read_history

    resume = ray.train.get_checkpoint()  # set after a worker failure or for a reused --name
    if resume is None and cfg.from_checkpoint:
        resume = ray.train.Checkpoint(cfg.from_checkpoint)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if resume is not None:
        with resume.as_directory() as d:
            model = GPT2.from_pretrained(Path(d) / MODEL_DIR)
            saved = load_state(d)
            history = read_history(Path(d) / MODEL_DIR, saved["step"])
    elif plan.from_pretrained:
        model, saved, history = GPT2.from_pretrained(plan.from_pretrained), None, []
    else:
        model, saved, history = GPT2(plan.model_config), None, []
    model.config.dropout = cfg.dropout  # a loaded model keeps its own rate otherwise
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = cfg.dropout
    model.grad_checkpointing = cfg.use_grad_ckpt
    return model, saved, history
