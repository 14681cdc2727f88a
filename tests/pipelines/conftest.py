"""Fixtures for the pipeline tests: a small dataset dir that training tests share."""

from pathlib import Path

import pytest

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, ray_local) -> Path:
    """150 kB of Shakespeare prepared with a 300-token BPE into rows of 32 tokens."""
    from pipelines.preparing.config import PrepareConfig
    from pipelines.preparing.run import prepare

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
