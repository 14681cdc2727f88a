"""Fixtures for the pipeline tests: a small dataset dir that training tests share."""

from pathlib import Path

import pytest

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, ray_local) -> Path:
    """150 kB of Shakespeare prepared with a 300-token BPE into rows of 32 tokens."""
    from pipelines.preparing.config import PrepareConfig
    from pipelines.preparing.driver import prepare

    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent")
    tmp = tmp_path_factory.mktemp("train_data")
    (tmp / "plays.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:150_000],
                                   encoding="utf-8")
    out = tmp / "dataset"
    prepare(PrepareConfig(corpus=[str(tmp / "plays.txt")], out=str(out), seq_len=32,
                          vocab_size=300, val_fraction=0.05, max_doc_bytes=8192))
    return out


@pytest.fixture
def refused(capsys):
    """refused(main, *args): `main(args)` exits with status 2 and one line on stderr,
    "gpt2 <stage>: error: <one sentence>" (the stage is main's module); returns that line."""
    def run(main, *args) -> str:
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # a flag error, from argparse
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, err
        stage = main.__module__.rsplit(".", 1)[-1]
        assert err.startswith(f"gpt2 {stage}: error: ") and err.count("\n") == 1, err
        return err
    return run


@pytest.fixture
def make_checkpoint():
    """write(root, step, ...): a checkpoint dir as checkpoint.save lays one out, small: real
    safetensors weights (or none, or cut short), a train state, a history with `eval/loss` at
    its step when given, optimizer shards when asked. Local paths and URIs."""
    import io
    import json

    import torch
    from safetensors.torch import save

    from gpt2core import storage
    from pipelines.training import checkpoint

    def write(root, step: int, *, weights: str = "whole", run_id: str | None = None,
              eval_loss: float | None = None, shards: tuple[int, int] = (0, 0),
              state_file: str = "whole") -> str:
        d = storage.join(str(root), checkpoint.dir_name(step))
        model = storage.join(d, checkpoint.MODEL_DIR)
        storage.write_text(storage.join(model, "config.json"), "{}")
        history = [{"step": step, "train/loss": 5.0},
                   *([{"step": step, "eval/loss": eval_loss}] if eval_loss is not None else [])]
        storage.write_text(storage.join(model, "metrics.jsonl"),
                           "".join(json.dumps(r) + "\n" for r in history))
        blob = save({"w": torch.zeros(64)})
        if weights != "none":
            storage.write_bytes(storage.join(model, "model.safetensors"),
                                blob if weights == "whole" else blob[:len(blob) - 100])
        written, world = shards  # --strategy fsdp: `written` of `world` ranks' shards
        for r in range(written):
            storage.write_bytes(storage.join(d, checkpoint.SHARDS_DIR,
                                             f"rank-{r:05d}-of-{world:05d}.safetensors"), blob)
        state = io.BytesIO()
        torch.save({"step": step, "tokens": 0, "epoch": 0, "batch": 0, "run_id": run_id}, state)
        blob = state.getvalue()  # cut short as an upload stopped midway: state="short"
        storage.write_bytes(storage.join(d, checkpoint.STATE_FILE),
                            blob if state_file == "whole" else blob[:len(blob) // 2])
        return d

    return write
