"""pipelines/visualize.py: a PNG of the expected series from a model dir, a run dir and MLflow;
bad sources end in one sentence with exit status 2."""

import json
import math
from pathlib import Path

import pytest

from pipelines import visualize as vis


def run_records(steps: int = 200, every: int = 10, eval_every: int = 50) -> list[dict]:
    """Records as training writes them: train metrics every `every` steps, eval every
    `eval_every`, both in one record where they fall on the same step."""
    records = [{"step": s, "train/loss": 2 + math.exp(-s / 50), "train/lr": 1e-3,
                "train/tokens": 512 * s} for s in range(every, steps + 1, every)]
    for r in records:
        if r["step"] % eval_every == 0:
            r.update({"eval/loss": r["train/loss"] + 0.1, "eval/bpb": r["train/loss"] / 2})
    return records


PNG = b"\x89PNG\r\n\x1a\n"


def write_history(model_dir: Path, records: list[dict]) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return model_dir


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    """An MLflow run in a sqlite store of its own, logged as training logs (RunLog)."""
    from pipelines.common.tracking import RunLog

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    log = RunLog(uri, "visualize-test", "run", {"layers": 2})
    for r in run_records(100, 10, 50):
        log.log(r["step"], {k: v for k, v in r.items() if k != "step"})
    return uri, log.run_id


def test_model_dir_to_png(tmp_path, capsys):
    model = write_history(tmp_path / "model", run_records())
    out = tmp_path / "fig.png"
    assert vis.main(["--model_path", str(model), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    assert "20 records to step 200" in capsys.readouterr().out


def test_figure_alias_and_default_name(tmp_path, monkeypatch):
    model = write_history(tmp_path / "model", run_records())
    monkeypatch.chdir(tmp_path)
    assert vis.main(["--model_path", str(model)]) == 0
    assert (tmp_path / vis.DEFAULT_OUTPUT).read_bytes()[:8] == PNG
    assert vis.main(["--model_path", str(model), "--figure", "other.png", "--smooth", "0.5",
                     "--log_loss"]) == 0
    assert (tmp_path / "other.png").is_file()


def test_run_dir_reads_the_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    write_history(run / "checkpoint_0000050" / "model", run_records(50))
    write_history(run / "checkpoint_0000100" / "model", run_records(100))
    records, title = vis.load_records(vis.VisualizeConfig(run_dir=str(run)))
    assert records[-1]["step"] == 100 and title.endswith("checkpoint_0000100/model")
    only_model = tmp_path / "exported"
    write_history(only_model / "model", run_records(30))
    records, _ = vis.load_records(vis.VisualizeConfig(run_dir=str(only_model)))
    assert records[-1]["step"] == 30
    out = tmp_path / "run.png"
    assert vis.main(["--run_dir", str(run), "--output", str(out)]) == 0 and out.is_file()


def test_run_dir_and_model_dir_on_s3(bucket, tmp_path):
    from gpt2core import storage

    run = tmp_path / "run"
    write_history(run / "checkpoint_0000050" / "model", run_records(50))
    write_history(run / "checkpoint_0000100" / "model", run_records(100))
    storage.upload(run, f"{bucket}/runs/r1")
    records, title = vis.load_records(vis.VisualizeConfig(run_dir=f"{bucket}/runs/r1"))
    assert records[-1]["step"] == 100 and title == f"{bucket}/runs/r1/checkpoint_0000100/model"
    out = tmp_path / "s3.png"
    assert vis.main(["--model_path", f"{bucket}/runs/r1/checkpoint_0000050/model",
                     "--output", str(out)]) == 0 and out.read_bytes()[:8] == PNG


def test_mlflow_run_gives_the_same_records_and_a_png(mlflow_run, tmp_path):
    from pipelines.common.plots import metrics_figure

    uri, run_id = mlflow_run
    records = vis.mlflow_records(run_id, uri)
    assert records == run_records(100, 10, 50)
    fig = metrics_figure(records)
    labels = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
    assert {"train loss", "eval loss", "eval bits per byte", "learning rate"} <= labels
    out = tmp_path / "mlflow.png"
    assert vis.main(["--run_id", run_id, "--tracking_uri", uri, "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG


def test_interactive_without_a_display_writes_the_png(tmp_path, monkeypatch, capsys):
    import matplotlib

    monkeypatch.setattr(matplotlib, "get_backend", lambda: "agg")
    model = write_history(tmp_path / "model", run_records())
    out = tmp_path / "shown.png"
    assert vis.main(["--model_path", str(model), "--interactive", "--output", str(out)]) == 0
    assert "no display" in capsys.readouterr().err and out.is_file()


def test_bad_sources_end_in_one_sentence(mlflow_run, tmp_path, refused):
    uri, run_id = mlflow_run
    assert "run 0123456789abcdef does not exist" in refused(
        vis.main, "--run_id", "0123456789abcdef", "--tracking_uri", uri)
    assert "no MLflow store" in refused(vis.main, "--run_id", run_id, "--tracking_uri",
                                        f"sqlite:///{tmp_path / 'none.db'}")
    assert not (tmp_path / "none.db").exists()
    assert "tracking server at http://127.0.0.1:9 does not answer" in refused(
        vis.main, "--run_id", run_id, "--tracking_uri", "http://127.0.0.1:9")
    assert "does not exist" in refused(vis.main, "--model_path", tmp_path / "nope")
    (tmp_path / "bare").mkdir()
    assert "has no metrics.jsonl" in refused(vis.main, "--model_path", tmp_path / "bare")
    assert "holds no checkpoint_*" in refused(vis.main, "--run_dir", tmp_path / "bare")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2}\n{"st')
    assert "damaged" in refused(vis.main, "--model_path", tmp_path / "damaged")
    write_history(tmp_path / "no_loss", [{"step": 1, "train/lr": 0.1}])
    assert "nothing to plot" in refused(vis.main, "--model_path", tmp_path / "no_loss")
    assert "exactly one of" in refused(vis.main)
    assert "exactly one of" in refused(vis.main, "--model_path", tmp_path, "--run_id", run_id)
