"""pipelines/tune.py: the search space is checked before Ray starts; a sweep of a tiny model
stops a diverging trial early, nests its MLflow runs, exports the best model and resumes after
Ctrl-C. Ray integration tests are marked slow."""

import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import tune
from pipelines.training.config import TrainConfig
from pipelines.tuning import report as tune_report
from pipelines.tuning import space as tune_space

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--layers", "1", "--heads", "2", "--dims", "32", "--batch_train", "8",
        "--log_steps", "10", "--eval_steps", "10", "--save_steps", "10", "--warmup_steps", "2",
        "--shuffle_buffer", "64"]


# --- the search space, without Ray -------------------------------------------------------------

def test_unknown_field_names_the_valid_ones():
    with pytest.raises(ValueError) as e:
        tune_space.check_space({"lr": {"loguniform": [1e-4, 1e-3]}}, TrainConfig())
    message = str(e.value)
    assert "'lr' is not a field" in message
    for name in ("base_lr", "wd_rate", "warmup_steps", "dropout", "layers", "dims", "grad_accum"):
        assert name in message
    assert "storage_path" not in message  # where runs go is not a hyperparameter


def test_space_values_take_their_fields_types(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("base_lr: {loguniform: [1e-4, 3e-3]}\n"  # YAML 1.1 reads 1e-4 as a string
                    "warmup_steps: {randint: [0, 20]}\nlayers: {grid: [1, 2.0]}\ndropout: 0.1\n")
    space = tune_space.check_space(tune_space.load_space(str(path)), TrainConfig())
    assert space == {"base_lr": {"loguniform": [1e-4, 3e-3]}, "warmup_steps": {"randint": [0, 20]},
                     "layers": {"grid": [1, 2]}, "dropout": 0.1}
    assert tune_space.count_trials(space, 3) == 6
    domains = tune_space.param_space(space)
    assert domains["dropout"] == 0.1 and domains["layers"] == {"grid_search": [1, 2]}
    assert domains["warmup_steps"].upper == 21  # both ends included


def test_min_lr_follows_each_trials_base_lr_unless_given():
    space = {"base_lr": {"loguniform": [1e-5, 1e-3]}}  # 1e-5 is below 1e-3's min_lr 1e-4
    cfg = tune.parse(tune.SweepConfig, [], prog="gpt2 tune")
    assert cfg.train_config().min_lr is None  # base_lr / 10, worked out at the schedule
    tune_space.check_space(space, cfg.train_config())
    given = tune.parse(tune.SweepConfig, ["--min_lr", "1e-4"], prog="gpt2 tune")
    with pytest.raises(ValueError, match="base_lr=1e-05: --base_lr must be positive"):
        tune_space.check_space(space, given.train_config())


@pytest.mark.parametrize("space, words", [
    ({"layers": {"uniform": [1, 4]}}, "layers takes int values: use randint, choice or grid"),
    ({"base_lr": {"randint": [1, 4]}}, "use uniform, loguniform, choice or grid"),
    ({"base_lr": {"loguniform": [0, 1e-3]}}, "low > 0"),
    ({"dropout": {"choice": [0.0, 1.5]}}, "dropout=1.5: --dropout must be in [0, 1)"),
    ({"layers": {"choice": [2, 2.5]}}, "layers takes int values, got 2.5"),
    ({"base_lr": {"sample": [1, 2]}}, "give a value or one of loguniform"),
])
def test_bad_values_end_in_one_sentence(space, words):
    with pytest.raises(ValueError) as e:
        tune_space.check_space(space, TrainConfig())
    assert words in str(e.value)


def test_bad_flags_exit_2_before_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: {choice: [0.1]}\n")
    out = subprocess.run([sys.executable, str(ROOT / "pipelines" / "tune.py"), "--data",
                          str(tmp_path), "--search_space", str(bad)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("gpt2 tune: error: search space: 'learning_rate' is not a field")
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit) as e:
        tune.main(["--resume"])
    assert e.value.code == 2


def test_curves_and_table_files(tmp_path):
    rows = [{"trial": "trial_00000", "base_lr": 0.001, "best eval/loss": 4.2, "steps": 30},
            {"trial": "trial_00001", "base_lr": 50.0, "best eval/loss": math.inf, "steps": 10}]
    table = tune_report.write_csv(rows, tmp_path / "results.csv")
    assert [r["trial"] for r in csv.DictReader(table.open())] == ["trial_00000", "trial_00001"]
    plot = tune_report.plot_curves({"trial_00000": [(10, 5.0), (20, 4.5), (30, 4.2)],
                             "trial_00001": [(10, 4.9), (20, 4.6)],
                             "trial_00002": [(10, math.inf)]}, "eval/loss",
                            tmp_path / "curves.png", stopped={"trial_00001", "trial_00002"})
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trial_runs_are_nested_logged_and_ended_on_the_tune_driver(tmp_path, make_checkpoint):
    """tune_report.trial_runs, fed as Tune feeds it: a trial's run is made when it starts,
    logs the records in its results, ends FINISHED with its model or KILLED when stopped early,
    and is found again when a resumed sweep restarts the trial."""
    from types import SimpleNamespace

    import mlflow

    from pipelines.common.tracking import RECORDS

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tune_report.start_parent_run(uri, "sweeps", "sweep", {"num_samples": 2})
    info = {"name": "sweep", "parent_run_id": parent, "train_storage": str(tmp_path / "train")}
    runs = tune_report.trial_runs(uri, "sweeps", info, TrainConfig(total_steps=20),
                                  lambda t: f"trial_{t.trial_id}")
    done, stopped = (SimpleNamespace(trial_id=i, config={"base_lr": 2e-3}) for i in ("0", "1"))
    ckpt = Path(make_checkpoint(tmp_path / "train" / "trial_0", 20)) / "model"  # complete
    (ckpt / "loss_curve.png").write_bytes(b"png")
    for trial in (done, stopped):
        runs.on_trial_start(0, [], trial)
    result = {"step": 10, "eval/loss": 5.0, "mlflow_run_id": "", "num_params": 99,
              RECORDS: [{"step": 5, "train/loss": 6.0}, {"step": 10, "eval/loss": 5.0}]}
    runs.on_trial_result(0, [], stopped, dict(result))
    runs.on_trial_complete(0, [], stopped)  # ASHA stopped it at step 10
    last = {**result, "step": 20, RECORDS: [{"step": 20, "eval/loss": 4.0}]}
    runs.on_trial_result(0, [], done, last)
    runs.on_trial_complete(0, [], done)
    assert RECORDS not in last and last["mlflow_run_id"]  # Tune keeps the run id, not records

    client = mlflow.MlflowClient(uri)
    children = {r.info.run_name: r for r in client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")}
    assert children["trial_0"].info.run_id == last["mlflow_run_id"]
    assert children["trial_0"].info.status == "FINISHED"
    assert children["trial_1"].info.status == "KILLED"
    trial = children["trial_0"].data
    assert trial.params["base_lr"] == "0.002" and trial.params["min_lr"] == "None"
    assert trial.params["num_params"] == "99" and trial.tags["sweep"] == "sweep"
    history = client.get_metric_history(last["mlflow_run_id"], "eval/loss")
    assert [(m.step, m.value) for m in history] == [(20, 4.0)]
    assert [m.step for m in client.get_metric_history(
        children["trial_1"].info.run_id, "eval/loss")] == [10]
    artifacts = {a.path for a in client.list_artifacts(last["mlflow_run_id"], "model")}
    assert {"model/config.json", "model/loss_curve.png"} <= artifacts

    # --resume: a new callback (Tune's copy from the sweep's start) finds the trial's run
    again = tune_report.trial_runs(uri, "sweeps", info, TrainConfig(total_steps=20),
                                   lambda t: f"trial_{t.trial_id}")
    again.on_trial_start(0, [], stopped)
    assert again.writers["1"].run_id == children["trial_1"].info.run_id
    assert client.get_run(children["trial_1"].info.run_id).info.status == "RUNNING"


def test_asha_rungs_survive_a_resume():
    """Tune does not save the scheduler; the rungs ride in a callback's state instead, so a
    resumed sweep still stops a trial that trails the ones finished before the interruption."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler

    def asha():
        return ASHAScheduler(time_attr="step", metric="eval/loss", mode="min", max_t=20,
                             grace_period=10, reduction_factor=2)

    before = asha()
    for trial, loss in (("a", 4.9), ("b", 5.4)):
        before._brackets[0].on_result(SimpleNamespace(trial_id=trial), 10, -loss)
    state = json.loads(json.dumps(tune._keep_rungs(before).get_state()))  # a copy, as on disk

    after = asha()
    absurd = SimpleNamespace(trial_id="c")
    assert after._brackets[0].on_result(absurd, 10, -2e5) == "CONTINUE"  # nothing to beat
    after = asha()
    tune._keep_rungs(after).set_state(state)
    assert after._brackets[0].on_result(absurd, 10, -2e5) == "STOP"


# --- a sweep on Ray ----------------------------------------------------------------------------

def ctrl_c_after_the_first_trial():
    """A Tune callback that presses Ctrl-C once the first trial is over, as a user would. Its
    state is saved with the experiment, so the resumed sweep does not press it again."""
    from ray import tune as ray_tune

    class CtrlC(ray_tune.Callback):
        pressed = False

        def on_trial_complete(self, iteration, trials, trial, **info):
            if not self.pressed:
                self.pressed = True
                signal.raise_signal(signal.SIGINT)

        def get_state(self):
            return {"pressed": self.pressed}

        def set_state(self, state):
            self.pressed = state["pressed"]

    return CtrlC()


@pytest.mark.slow
def test_sweep_stops_the_diverging_trial_nests_runs_exports_and_resumes(train_data, tmp_path,
                                                                         monkeypatch, capsys):
    import mlflow

    from gpt2core import GPT2

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.json").write_text(json.dumps({"base_lr": {"grid": [3e-3, 1e-3, 50.0]}}))
    storage = tmp_path / "sweeps"
    cfg = tune.parse(tune.SweepConfig, [
        "--data", str(train_data), *TINY, "--total_steps", "20",
        "--search_space", str(tmp_path / "space.json"), "--num_samples", "1",
        "--max_concurrent", "2", "--grace_period", "10", "--reduction_factor", "2",
        "--storage_path", str(storage), "--name", "sweep", "--experiment", "tune-test"],
        prog="gpt2 tune")

    first = tune.sweep(cfg, callbacks=[ctrl_c_after_the_first_trial()])  # stops half-way
    assert not first["complete"] and first["model_dir"] is None
    assert sum(r["status"] in ("finished", "stopped early") for r in first["rows"]) >= 1

    assert tune.main(["--name", "sweep", "--storage_path", str(storage), "--resume"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((storage / "sweep" / "results.csv").open()))
    key = "best eval/loss"
    assert [r["trial"] for r in rows] == ["trial_00000", "trial_00001", "trial_00002"]
    assert all(r["status"] in ("finished", "stopped early") for r in rows), rows

    # ASHA stopped the absurd learning rate at its first rung; the others beat it
    absurd = next(r for r in rows if float(r["base_lr"]) == 50.0)
    assert absurd["stopped early"] == "True" and int(absurd["steps"]) == 10
    assert any(r["status"] == "finished" for r in rows)

    # the best is the minimum of the trials' metrics, and its model is the one exported
    best = min(rows, key=lambda r: float(r[key]))
    assert best["trial"] in printed and f"{float(best[key]):.4f}" in printed
    model_dir = storage / "sweep" / "best_model"
    model = GPT2.from_pretrained(model_dir)
    assert model.config.n_layer == 1 and model.config.n_embd == 32
    assert (storage / "sweep" / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # MLflow: one parent run for the sweep, one child run per trial under it
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("tune-test")
    parents = client.search_runs([exp.experiment_id], "tags.sweep = 'sweep'")
    parent = next(r for r in parents if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == best["trial"]
    assert parent.data.metrics["best/eval/loss"] == pytest.approx(float(best[key]))
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_name for c in children} == {r["trial"] for r in rows}
    assert all(c.info.status != "RUNNING" for c in children)
    # ...logged by the Tune driver from each trial's results, artifacts beside the store
    runs = {c.info.run_name: c for c in children}
    assert parent.data.tags["best_run_id"] == runs[best["trial"]].info.run_id
    assert all(r["mlflow_run_id"] == runs[r["trial"]].info.run_id for r in rows)
    assert exp.artifact_location == str(tmp_path / "mlartifacts" / "tune-test")
    for r in rows:
        run = runs[r["trial"]]
        evals = {m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")}
        assert evals == set(range(10, int(r["steps"]) + 1, 10)), r["trial"]
        assert run.data.params["base_lr"] == str(float(r["base_lr"]))
        model = Path(exp.artifact_location, run.info.run_id, "artifacts", "model")
        if r["status"] == "finished":
            assert run.info.status == "FINISHED" and (model / "model.safetensors").is_file()
        else:
            assert run.info.status == "KILLED" and not model.exists()

    # nothing of the sweep's Train runs (their placement groups) is left holding the cluster
    import ray

    for _ in range(20):
        if ray.available_resources().get("CPU", 0) == pytest.approx(2.0):
            break
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == pytest.approx(2.0)
