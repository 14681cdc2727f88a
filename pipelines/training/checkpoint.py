"""Training checkpoints (docs/design.md): a model dir plus the state that resumes the run exactly.

    checkpoint_0000250/
        model/            a Hugging Face GPT-2 model dir: config.json, model.safetensors,
                          tokenizer files, metrics.jsonl (the run's history up to this step)
        train_state.pt    optimizer, LR scheduler and grad scaler state, step, tokens seen,
                          data position (epoch, micro-batch within it), MLflow run id
        optimizer/        --strategy fsdp: the optimizer's tensors, each rank's part in its
                          rank-R-of-W.safetensors (train_state.pt keeps the hyperparameters);
                          a run on any number of workers reads back the parts it holds

RNG state is not stored: every step reseeds torch from (seed, step, rank), so a resumed run
draws the same dropout masks as an uninterrupted one. train_state.pt holds tensors, numbers
and strings only and is read with torch.load(weights_only=True): never an arbitrary pickle.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gpt2core import storage
from gpt2core.errors import UserError
from gpt2core.modelfile import CONFIG_FILE, WEIGHTS_FILE
from pipelines.common import dataset

if TYPE_CHECKING:
    from pipelines.training.config import TrainConfig
    from pipelines.training.plan import Plan

MODEL_DIR = "model"
SHARDS_DIR = "optimizer"
STATE_FILE = "train_state.pt"
PREFIX = "checkpoint_"


@dataclass(frozen=True)
class Position:
    """Where a run is: optimizer steps done, tokens trained on, and its place in the data (the
    epoch, and the micro-batches of it each of `world` workers has consumed)."""

    step: int = 0
    tokens: int = 0
    epoch: int = 0
    batch: int = 0
    world: int = 0  # workers then (0: not recorded; checkpoints before elastic training)

    @classmethod
    def of(cls, train_state: dict) -> Position:
        """The position saved in a checkpoint's train state."""
        return cls(**{f.name: train_state[f.name] for f in fields(cls) if f.name in train_state})

    def on(self, world: int) -> Position:
        """The same place in the epoch for `world` workers (elastic training changed their
        number): as many micro-batches (each of --batch_train sequences) as were consumed in
        all. Ray Data splits the split afresh among the new workers, so the rows after it are
        not exactly those an unchanged run would have read; with the same number they are."""
        if self.world in (0, world):
            return replace(self, world=world)
        return replace(self, batch=self.batch * self.world // world, world=world)


def dir_name(step: int) -> str:
    """The checkpoint's directory name; zero-padded so names sort by step."""
    return f"{PREFIX}{step:07d}"


def find(path: str) -> str:
    """A checkpoint dir, or the latest complete checkpoint in a run dir (local or a URI);
    ValueError names the problem. Complete: its train state, and its model's config and
    weights, the weights as long as their header says (a newer checkpoint whose weights were
    cut short is passed over, with one warning line)."""
    path = storage.resolve(path)
    if not storage.exists(path):
        raise UserError(f"--from_checkpoint {path} does not exist; pass a checkpoint dir "
                        f"({PREFIX}*) or the run dir that holds them.")
    present = storage.files(path)  # one listing: the dir itself and every checkpoint in it
    if STATE_FILE in present:
        if not _complete(present) or truncated(path):
            raise UserError(f"checkpoint {path} is incomplete: it lacks {MODEL_DIR}/"
                            f"{CONFIG_FILE} or its {WEIGHTS_FILE} is cut short.")
        return path
    by_dir: dict[str, set[str]] = {}
    for f in present:
        top, _, rest = f.partition("/")
        if top.startswith(PREFIX) and rest:
            by_dir.setdefault(top, set()).add(rest)
    for name in sorted((d for d, files in by_dir.items() if _complete(files)), reverse=True):
        if not (short := truncated(storage.join(path, name))):
            return storage.join(path, name)
        print(f"warning: {storage.join(path, name)} is incomplete ({short}); trying the one "
              "before it.", file=sys.stderr)
    raise UserError(f"--from_checkpoint {path} is not a checkpoint (no {STATE_FILE}) "
                    f"and holds no complete {PREFIX}* dirs; pass one of those.")


def check_strategy(ckpt: str, strategy: str) -> None:
    """ValueError unless a run with --strategy `strategy` can resume `ckpt`: a sharded
    optimizer state (fsdp) is read by either strategy, a whole one (ddp) by ddp only."""
    if strategy == "fsdp" and not any(f.startswith(f"{SHARDS_DIR}/")
                                      for f in storage.files(ckpt)):
        raise UserError(f"{ckpt} was saved by --strategy ddp (its optimizer state whole, "
                        "keyed by parameter order); resume it with --strategy ddp.")


def _complete(files: set[str]) -> bool:
    """A checkpoint dir's files: its train state, its model's weights and config, and each
    rank's optimizer shard where there are any (rank-R-of-W: W of them)."""
    shards = [f for f in files if f.startswith(f"{SHARDS_DIR}/rank-")]
    ranks = {int(f.rsplit("-of-", 1)[1].split(".")[0]) for f in shards}
    whole = not shards or (len(ranks) == 1 and len(shards) == ranks.pop())
    return whole and {STATE_FILE, f"{MODEL_DIR}/{CONFIG_FILE}",
                      f"{MODEL_DIR}/{WEIGHTS_FILE}"} <= files


def truncated(ckpt: str) -> str:
    """'' when the checkpoint's weights file is as long as its safetensors header says and its
    train state ends in a zip end record, else what is wrong. Reads the weights' header only
    (8 bytes of length, then the JSON that gives every tensor's byte range) and the state's
    last 22 bytes."""
    fs, inner = storage.filesystem(storage.join(ckpt, MODEL_DIR, WEIGHTS_FILE))
    with fs.open_input_file(inner) as f:
        size, head = f.size(), f.read_at(8, 0)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            header = json.loads(f.read_at(n, 8)) if 0 < n <= size - 8 else None
        except ValueError:
            header = None
    if header is None:
        return f"{WEIGHTS_FILE} has no readable header"
    need = 8 + n + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                       default=0)
    if size < need:
        return f"{WEIGHTS_FILE} holds {size} of its {need} bytes"
    # torch.save writes a zip: whole only with its end record, the file's last 22 bytes
    fs, inner = storage.filesystem(storage.join(ckpt, STATE_FILE))
    with fs.open_input_file(inner) as f:
        end = f.read_at(22, f.size() - 22) if f.size() >= 22 else b""
    return "" if end.startswith(b"PK\x05\x06") else f"{STATE_FILE} is cut short"


def best(run_dir: str, metric: str) -> str:
    """The complete checkpoint of a run dir whose evaluation at its own step had the lowest
    `metric` (from the history in its model dir); the latest when none was evaluated then."""
    latest = find(run_dir)
    scored = []
    for name in storage.listdir(run_dir):
        ckpt = storage.join(run_dir, name)
        if not name.startswith(PREFIX) or truncated_or_missing(ckpt):
            continue
        step = int(name[len(PREFIX):])
        history = storage.read_text(storage.join(ckpt, MODEL_DIR, "metrics.jsonl"))
        values = [r[metric] for r in map(json.loads, history.splitlines())
                  if r.get("step") == step and metric in r]
        if values and math.isfinite(values[-1]):
            scored.append((values[-1], -step, ckpt))
    return min(scored)[2] if scored else latest


def truncated_or_missing(ckpt: str) -> bool:
    try:
        return not _complete(storage.files(ckpt)) or bool(truncated(ckpt))
    except OSError:
        return True


def save(path: Path, model, tokenizer, state, position: Position, run_id: str | None,
         history_writer) -> None:
    """Write a checkpoint into `path` (a fresh dir that Ray Train then persists): the model
    dir, then the optimizer state (`state`: gpt2core.training.TrainState; under FSDP its
    hyperparameters: every rank writes its shards with `state.save_shards`) with the position
    and the MLflow run id (None: a Tune trial's)."""
    model.save_pretrained(path / MODEL_DIR, tokenizer)
    history_writer(path / MODEL_DIR)
    tmp = path / (STATE_FILE + ".tmp")
    torch.save({**state.state_dict(), **asdict(position), "run_id": run_id}, tmp)
    tmp.rename(path / STATE_FILE)


def load_state(path: str | Path) -> dict:
    """train_state.pt of a checkpoint dir, loaded without unpickling code."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def resumed(run_dir: str, from_checkpoint: str | None) -> str | None:
    """The checkpoint a run starts from, as Ray Train picks it: the run dir's latest complete
    one (a reused --name, --resume), else `from_checkpoint`; None: a fresh start."""
    try:
        return find(run_dir)
    except ValueError:  # no run dir, or no complete checkpoint in it
        return from_checkpoint


def run_id(path: str) -> str | None:
    """The MLflow run id saved in checkpoint `path` (None: a Tune trial's)."""
    state = storage.join(path, STATE_FILE)
    if not storage.is_uri(state):  # memory-mapped: only the run id's bytes are read
        saved = torch.load(state, map_location="cpu", weights_only=True, mmap=True)
    else:
        data = io.BytesIO(storage.read_bytes(state))
        saved = torch.load(data, map_location="cpu", weights_only=True)
    return saved.get("run_id")


def export_model(ckpt, out: str) -> None:
    """The checkpoint's model dir -> `out` (local or a URI), whole or not at all: locally
    copied, then renamed; on object storage uploaded with config.json last (its marker), after
    any older config.json there was deleted."""
    import shutil

    local = not storage.is_uri(out)
    if local:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.tmp-",
                                dir=Path(out).parent if local else None))
    try:
        ckpt.to_directory(str(tmp / "ckpt"))
        if local:
            dataset.commit(tmp / "ckpt" / MODEL_DIR, Path(out))
        else:
            storage.delete(storage.join(out, CONFIG_FILE))
            storage.upload(tmp / "ckpt" / MODEL_DIR, out, last=[WEIGHTS_FILE, CONFIG_FILE])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def opened(cfg: TrainConfig) -> Iterator[Path | None]:
    """The checkpoint a worker resumes from, as a dir that stays open while the model and its
    state are loaded: the one Ray Train hands back after a failure or for a reused --name, else
    cfg.from_checkpoint (a URI is downloaded); None for a run that starts afresh."""
    import ray.train

    resume = ray.train.get_checkpoint()
    if resume is None and cfg.from_checkpoint:
        resume = ray.train.Checkpoint(cfg.from_checkpoint)  # a local path or a URI
    if resume is None:
        yield None
        return
    with resume.as_directory() as d:
        yield Path(d)


def load_model(cfg: TrainConfig, plan: Plan, resume: Path | None):
    """The model a worker trains, (model, saved train state or None, history): from the
    checkpoint dir `resume` (`opened`), else plan.from_pretrained, else a fresh init of
    plan.model_config; with cfg's dropout and gradient checkpointing."""
    from gpt2core import GPT2
    from pipelines.common.tracking import read_history

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if resume is not None:
        model = GPT2.from_pretrained(resume / MODEL_DIR)
        saved = load_state(resume)
        history = read_history(resume / MODEL_DIR, saved["step"])
    elif plan.from_pretrained:  # a local dir or a URI: read by this worker itself
        model, saved, history = GPT2.from_pretrained(plan.from_pretrained), None, []
    else:
        model, saved, history = GPT2(plan.model_config), None, []
    model.set_dropout(cfg.dropout)
    model.grad_checkpointing = cfg.use_grad_ckpt
    return model, saved, history
