"""Follow one run's TrainConfig through the train driver's calls: files entered, stays, returns.

What it counts (issue 30's measure of how far a reader jumps to follow one run): calls, on the
driver's thread, of functions of this project (gpt2core/, pipelines/, serve/): `config`, those
that receive the run's TrainConfig among their arguments; `depth 3`, every one at most 3 project
calls below `train()`. Those frames form a stack; a *stay* begins each time the innermost such
frame moves to another file (a call into it, or a return out of it), and a *return* is a return
that lands in another file than the one it left. The trace runs
`pipelines.train.train` with --from_checkpoint (the resolving path: tracking server, checkpoint,
plan, data) up to the TorchTrainer's fit(), which it stops; training itself is not traced.

    .venv/bin/python bench/trace_config.py     # ~2 min on 2 cores: it first trains 2 steps
                                               # to have a checkpoint to resume from
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
OURS = tuple(str(ROOT / d) + os.sep for d in ("gpt2core", "pipelines", "serve"))


class Stop(Exception):
    pass


def follow(fn, cfg, depth: int | None = None):
    """{files in order of first entry, stays, returns} of `fn(cfg)` as the module docstring
    defines them: frames that receive a TrainConfig, or with `depth` every project frame at
    most that many project calls below fn."""
    from pipelines.training.config import TrainConfig

    stack: list[tuple[object, str]] = []  # (frame, file) of the frames counted
    files: list[str] = []
    counts = {"stays": 1, "returns": 0}
    below: dict[object, int] = {}  # project frame -> project calls below fn

    def counted(frame) -> bool:
        if depth is not None:
            parent = frame.f_back
            while parent is not None and parent not in below:
                parent = parent.f_back
            below[frame] = 0 if parent is None else below[parent] + 1
            return below[frame] <= depth
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        return any(isinstance(frame.f_locals.get(n), TrainConfig) for n in names)

    def profile(frame, event, arg):
        if event not in ("call", "return"):
            return
        path = frame.f_code.co_filename
        if not path.startswith(OURS):
            return
        if event == "call" and counted(frame):
            where = str(Path(path).relative_to(ROOT))
            if stack and stack[-1][1] != where:
                counts["stays"] += 1
            if where not in files:
                files.append(where)
            stack.append((frame, where))
        elif event == "return":
            below.pop(frame, None)
            if stack and stack[-1][0] is frame:
                left = stack.pop()[1]
                if stack and stack[-1][1] != left:
                    counts["stays"] += 1
                    counts["returns"] += 1

    sys.setprofile(profile)
    try:
        fn(cfg)
    except Stop:
        pass
    finally:
        sys.setprofile(None)
    return {"files": files, "file_count": len(files), **counts}


def main() -> int:
    from ray.train.torch import TorchTrainer

    from pipelines.common.flags import parse
    from pipelines.train import train
    from pipelines.training.config import TrainConfig

    tmp = Path(tempfile.mkdtemp(prefix="trace-config-"))
    flags = ["--data", str(tmp / "data"), "--vocab_size", "512", "--seq_len", "64",
             "--layers", "2", "--heads", "2", "--dims", "64", "--batch_train", "8",
             "--total_steps", "2", "--eval_steps", "2", "--save_steps", "2",
             "--storage_path", str(tmp / "runs"), "--tracking_uri", f"sqlite:///{tmp}/mlflow.db"]
    first = train(parse(TrainConfig, flags + ["--train_corpus", str(CORPUS), "--name", "first"],
                        prog="trace"))
    cfg = parse(TrainConfig, flags + ["--name", "second", "--from_checkpoint", first["run_dir"]],
                prog="trace")

    def stop(self):
        raise Stop

    TorchTrainer.fit = stop
    print(json.dumps({"config": follow(train, cfg), "depth 3": follow(train, cfg, depth=3)},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
