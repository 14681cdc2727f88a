"""Search hyperparameters with Ray Tune: each trial is pipelines/train.py's TorchTrainer.

    python pipelines/tune.py                          # demo: sample corpus, tiny model, 4 trials
    gpt2 tune --data data/dataset --num_samples 8 --search_space pipelines/search_space.yaml \
        --total_steps 1000 --eval_steps 100 --max_concurrent 2
    ray job submit --working-dir . -- python pipelines/tune.py --data /shared/data/books \
        --preset gpt2 --gpus 1 --num_samples 16 --storage_path s3://bucket/runs
    gpt2 tune --name tune-20261124-120000 --resume    # finish a sweep that was interrupted

Every train flag sets the trials' base config; the search space (--search_space, a YAML or JSON
file; else DEFAULT_SPACE) maps TrainConfig field names to values to try:

    base_lr: {loguniform: [1.0e-4, 3.0e-3]}    # also: uniform, randint (ends included)
    layers: {choice: [2, 4]}                   # sampled; {grid: [...]}: every value, each sample
    dropout: 0.1                               # fixed

The sweep, top to bottom:
  1. Driver: the space is checked against TrainConfig and the dataset (an unknown name or a bad
     value ends here, exit 2); Ray starts; the cluster is split into --max_concurrent trials.
  2. Ray Tune runs a function per trial (Ray 2.60's Train-in-Tune pattern: the Tuner gets a
     function, not a trainer) that builds train.py's TorchTrainer for the trial's config with a
     TuneReportCallback, so every evaluation reaches the scheduler. ASHA (--scheduler asha)
     stops trials whose --metric trails the others' at the same step, after --grace_period.
     Each trial logs its own MLflow run, nested under the sweep's parent run.
  3. Driver: a table of the trials (printed, results.csv), every trial's validation curve
     (curves.png), and the best trial's model dir exported, ready for `gpt2 serve`.
Ctrl-C stops the sweep with its state saved; --resume finishes the trials left, each continuing
from its last checkpoint, with ASHA's record of the finished ones kept.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

if __name__ == "__main__":  # as a file (python/ray job submit): import pipelines by package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import checkpoint, ray_session
from pipelines.flags import option, parse
from pipelines.train import Job, TrainConfig, make_trainer, plan_job
from pipelines.train_plan import DATA_CPUS, make_plan

METRICS = ("eval/loss", "eval/bpb", "eval/ppl")  # what every evaluation reports
TRIAL_CPUS = 0.01  # the trial function only drives its TorchTrainer; a whole CPU would idle
RECORD = "sweep.json"  # in the sweep dir: the flags and space, for --resume
# Fields a trial may not vary: where data, runs and workers are, and how results are measured.
FIXED = ("data", "corpus", "eval_corpus", "vocab_path", "vocab_size", "from_pretrained", "name",
         "storage_path", "save_model_path", "from_checkpoint", "keep_checkpoints",
         "max_failures", "experiment", "num_workers", "gpus", "cpus_per_worker", "address",
         "eval_steps", "eval_batches", "batch_eval", "save_steps", "log_steps")
TUNABLE = tuple(f.name for f in fields(TrainConfig) if f.name not in FIXED)
DEFAULT_SPACE = {  # optimisation only: the model's shape stays the --preset's
    "base_lr": {"loguniform": [1e-4, 3e-3]},
    "wd_rate": {"choice": [0.0, 0.01, 0.1]},
    "warmup_steps": {"choice": [0, 50, 100]},
    "dropout": {"choice": [0.0, 0.1]},
    "grad_accum": {"choice": [1, 2]},
}
SAMPLERS = ("loguniform", "uniform", "randint", "choice", "grid")


@dataclass
class SweepConfig(TrainConfig):
    total_steps: int = option(300, "optimizer steps per trial")
    eval_steps: int = option(50, "evaluate every this many steps (ASHA compares trials there)")
    save_steps: int = option(100, "checkpoint every this many steps (--resume goes on from there)")
    num_samples: int = option(4, "trials sampled from the space (each grid value this many times)")
    search_space: str | None = option(None, "YAML or JSON file: TrainConfig field -> value or "
                                      "{loguniform|uniform|randint|choice|grid: [...]}; "
                                      "default: DEFAULT_SPACE in pipelines/tune.py")
    max_concurrent: int = option(0, "trials at once (0: as many as fit)")
    scheduler: str = option("asha", "asha: stop trials that trail early; fifo: run all to the end")
    metric: str = option("eval/loss", "what ranks trials: eval/loss, eval/bpb or eval/ppl")
    mode: str = option("min", "min or max of --metric is best")
    grace_period: int = option(0, "steps before ASHA may stop a trial (0: 2 x --eval_steps)")
    reduction_factor: float = option(3.0, "ASHA keeps about 1/this of the trials at each rung")
    resume: bool = option(False, "finish the interrupted sweep --name (with its saved flags)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 1 or self.max_concurrent < 0 or self.grace_period < 0:
            raise ValueError("--num_samples must be at least 1, --max_concurrent and "
                             "--grace_period not negative.")
        if self.scheduler not in ("asha", "fifo") or self.mode not in ("min", "max"):
            raise ValueError(f"--scheduler is asha or fifo (got {self.scheduler}) and --mode "
                             f"min or max (got {self.mode}).")
        if self.metric not in METRICS:
            raise ValueError(f"--metric {self.metric} is not reported; use one of "
                             f"{', '.join(METRICS)}.")
        if self.reduction_factor <= 1:
            raise ValueError(f"--reduction_factor must be above 1, got {self.reduction_factor}.")
        if self.resume and not self.name:
            raise ValueError("--resume needs --name: the sweep to finish.")

    def train_config(self) -> TrainConfig:
        """The trials' base config: this config's TrainConfig fields."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})


# --- the search space --------------------------------------------------------------------------

def load_space(path: str | None) -> dict:
    """The space in a YAML/JSON file (DEFAULT_SPACE without one), its names checked."""
    if path is None:
        return dict(DEFAULT_SPACE)
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--search_space {path} does not exist.")
    if p.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"--search_space {path}: give a .yaml, .yml or .json file.")
    try:
        import yaml  # a dependency of Ray

        space = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"--search_space {path} is not valid {p.suffix[1:]}: {e}") from None
    if not isinstance(space, dict) or not space:
        raise ValueError(f"--search_space {path} must map field names to values.")
    return space


def check_space(space: dict, base: TrainConfig) -> dict:
    """The space with values typed like their fields; ValueError names a bad name or value.

    Each value (a range's ends, every choice) must make a valid TrainConfig on its own.
    """
    hints, typed = typing.get_type_hints(TrainConfig), {}
    for name, spec in space.items():
        if name not in TUNABLE:
            raise ValueError(f"search space: {name!r} is not a field a trial can vary; valid: "
                             f"{', '.join(sorted(TUNABLE))}.")
        kind = next(a for a in typing.get_args(hints[name]) or (hints[name],)
                    if a is not type(None))  # int | None -> int
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
                raise ValueError(f"search space: {name}: give one of {', '.join(SAMPLERS)}, "
                                 f"as in {{choice: [...]}}; got {spec}.")
            (how, values), = spec.items()
            ranged = how in ("loguniform", "uniform", "randint")
            if not isinstance(values, list) or not values or (ranged and len(values) != 2):
                raise ValueError(f"search space: {name}: {how} takes "
                                 f"{'[low, high]' if ranged else 'a list of values'}.")
            if ranged and (kind not in (int, float) or (kind is int) != (how == "randint")):
                fits = {int: "randint, ", float: "uniform, loguniform, "}.get(kind, "")
                raise ValueError(f"search space: {name} takes {kind.__name__} values: use "
                                 f"{fits}choice or grid.")
        else:
            how, values = "const", [spec]
        values = [_coerce(name, kind, v) for v in values]
        if how in ("loguniform", "uniform", "randint") and not (
                values[0] < values[1] and (how != "loguniform" or values[0] > 0)):
            raise ValueError(f"search space: {name}: {how} needs 0 < low < high for loguniform, "
                             f"low < high otherwise; got {values}.")
        for v in values:
            try:
                replace(base, **{name: v})
            except ValueError as e:
                raise ValueError(f"search space: {name}={v}: {e}") from None
        typed[name] = {how: values} if how != "const" else values[0]
    return typed


def _coerce(name: str, kind: type, value):
    """YAML reads 1e-4 as a string; a field's values are made its type, or refused."""
    try:
        if kind is bool or kind is str:
            if not isinstance(value, kind):
                raise ValueError
            return value
        number = float(value)
        if kind is int and number != int(number):
            raise ValueError
        return int(number) if kind is int else number
    except (TypeError, ValueError):
        raise ValueError(f"search space: {name} takes {kind.__name__} values, "
                         f"got {value!r}.") from None


def check_against_data(space: dict, job: Job) -> None:
    """Each value with the dataset and model (batch vs rows, heads vs dims, ...)."""
    for name, spec in space.items():
        for v in (next(iter(spec.values())) if isinstance(spec, dict) else [spec]):
            try:
                make_plan(replace(job.cfg, **{name: v}), job.manifest, job.workers,
                          job.runtime["model_dir"])
            except ValueError as e:
                raise ValueError(f"search space: {name}={v}: {e}") from None


def param_space(space: dict):
    """The checked space as Tune domains."""
    from ray import tune

    def domain(how, v):
        return {"loguniform": lambda: tune.loguniform(*v), "uniform": lambda: tune.uniform(*v),
                "randint": lambda: tune.randint(v[0], v[1] + 1), "choice": lambda: tune.choice(v),
                "grid": lambda: tune.grid_search(v)}[how]()

    return {k: domain(*next(iter(s.items()))) if isinstance(s, dict) else s
            for k, s in space.items()}


def count_trials(space: dict, num_samples: int) -> int:
    return num_samples * math.prod(len(s["grid"]) for s in space.values()
                                   if isinstance(s, dict) and "grid" in s)


def largest(space: dict, name: str, default):
    s = space.get(name, default)
    return max(next(iter(s.values()))) if isinstance(s, dict) else s


# --- one trial ----------------------------------------------------------------------------------

def run_trial(config: dict, job: Job, sweep: dict) -> None:
    """A Tune function trainable: train.py's TorchTrainer with the trial's fields replaced."""
    import ray.tune

    cfg = replace(job.cfg, **config)
    make_plan(cfg, job.manifest, job.workers, job.runtime["model_dir"])  # bad mix: ends here
    name = ray.tune.get_context().get_trial_name()
    runtime = {**job.runtime, "mlflow_tags": {"mlflow.parentRunId": sweep["parent_run_id"],
                                              "sweep": sweep["name"]}}
    make_trainer(replace(job, cfg=cfg, runtime=runtime), name, cfg=cfg,
                 callbacks=[_eval_report(sweep["metric"], sweep["mode"])],
                 storage=sweep["train_storage"]).fit()


def _eval_report(metric: str, mode: str):
    """TuneReportCallback for evaluations only: Tune wants --metric in every result, and a
    save-only report has none. A diverged trial's NaN becomes the worst value, so ASHA stops it
    (a NaN compares false with every cutoff)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric not in metrics[0]:
                return
            if not math.isfinite(metrics[0][metric]):
                worst = math.inf if mode == "min" else -math.inf
                metrics = [{**metrics[0], metric: worst}, *metrics[1:]]
            super().after_report(run_context, metrics, checkpoint)

    return EvalReport()


def _keep_rungs(scheduler):
    """Tune saves the trials and the searcher with an experiment, not the scheduler; this
    callback saves ASHA's rungs (Ray 2.60's _brackets), so after --resume the remaining trials
    are still measured against the finished ones."""
    from ray import tune

    class KeepRungs(tune.Callback):
        def get_state(self):
            return {"rungs": [[dict(r) for _, r in b._rungs] for b in scheduler._brackets]}

        def set_state(self, state):
            for bracket, saved in zip(scheduler._brackets, state["rungs"]):
                for (_, recorded), rung in zip(bracket._rungs, saved):
                    recorded.update(rung)

    return KeepRungs()


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id.rsplit('_', 1)[-1]}"


# --- driver -------------------------------------------------------------------------------------

def size_trials(job: Job, cfg: SweepConfig, trials: int) -> tuple[int, Job]:
    """(trials at once, the job with each worker's CPUs and threads for that many).

    plan_job sized the workers for the whole cluster; here it is split between the trials,
    still keeping DATA_CPUS free for Ray Data's read tasks.
    """
    ray = ray_session.ray()
    cluster = ray.cluster_resources()
    total = cluster.get("CPU", 0)
    node = max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
    if cfg.gpus:
        auto = int(cluster.get("GPU", 0) // cfg.gpus)
    else:  # small models gain little from threads: more trials, fewer threads each
        auto = max(2, int(total // (2 * job.workers)))
    k = max(1, min(cfg.max_concurrent or auto, trials))

    def reserve(k: int) -> float:
        free = (total - DATA_CPUS - k * TRIAL_CPUS) / (k * job.workers)
        return math.floor(20 * min(free, node - DATA_CPUS)) / 20

    while not cfg.max_concurrent and k > 1 and reserve(k) < 0.25:
        k -= 1
    cpus = cfg.cpus_per_worker or reserve(k)
    if cpus <= 0:
        raise ValueError(f"{k} trial(s) x {job.workers} worker(s) do not fit in {total:g} CPUs "
                         f"with {DATA_CPUS:g} kept for Ray Data; lower --max_concurrent or "
                         "--num_workers.")
    threads = max(1, math.floor(min(total / (k * job.workers), node)))
    return k, replace(job, cpus=cpus, runtime={**job.runtime, "threads": threads})


def sweep(cfg: SweepConfig, callbacks: list | None = None) -> dict:
    """Check, run (or finish, with --resume) the sweep, report, export the best model.

    `callbacks`: more ray.tune.Callback objects for the Tuner. Returns the table's rows, where
    the outputs went, the best row and whether every trial finished.
    """
    saved = _read_record(cfg) if cfg.resume else None
    if saved:
        cfg = SweepConfig(**{**saved["config"], "resume": True, "address": cfg.address})
    space = check_space(saved["space"] if saved else load_space(cfg.search_space),
                        cfg.train_config())
    name = cfg.name or time.strftime("tune-%Y%m%d-%H%M%S")
    if not saved and "://" not in cfg.storage_path and Path(cfg.storage_path, name).exists():
        raise ValueError(f"{Path(cfg.storage_path, name)} exists; finish that sweep with "
                         "--resume, or pass another --name.")
    trials = count_trials(space, cfg.num_samples)
    job = plan_job(cfg.train_config())  # starts Ray
    check_against_data(space, job)
    k, job = size_trials(job, cfg, trials)
    where = f"{job.storage}/{name}"
    parent = saved["parent_run_id"] if saved else _parent_run(cfg, job, name, space)
    if not saved:
        _write_text(f"{where}/{RECORD}", json.dumps(
            {"config": {**asdict(cfg), "name": name, "resume": False}, "space": space,
             "parent_run_id": parent}, indent=1))
    print(f"{'resuming' if saved else 'sweeping'} {name}: {trials} trial(s) of {space}, "
          f"{k} at a time x {job.workers} worker(s) x {job.cpus:g} CPU "
          f"({job.runtime['threads']} thread(s)); {cfg.scheduler} on {cfg.metric} -> {where}")

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    info = {"name": name, "parent_run_id": parent, "metric": cfg.metric, "mode": cfg.mode,
            "train_storage": f"{where}/train"}
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job, sweep=info),
                                    {"cpu": TRIAL_CPUS})
    if saved:
        tuner = tune.Tuner.restore(where, trainable, resume_unfinished=True, resume_errored=True)
    else:
        max_t = largest(space, "total_steps", cfg.total_steps)
        scheduler = ASHAScheduler(
            time_attr="step", max_t=max_t, reduction_factor=cfg.reduction_factor,
            grace_period=min(max_t, cfg.grace_period or 2 * cfg.eval_steps)) \
            if cfg.scheduler == "asha" else FIFOScheduler()
        keep = [_keep_rungs(scheduler)] if cfg.scheduler == "asha" else []
        tuner = tune.Tuner(
            trainable, param_space=param_space(space),
            tune_config=tune.TuneConfig(
                metric=cfg.metric, mode=cfg.mode, scheduler=scheduler,
                num_samples=cfg.num_samples, max_concurrent_trials=k,
                trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=name, storage_path=job.storage,
                                      callbacks=[*keep, *(callbacks or [])]))
    grid = tuner.fit()
    return _report(grid, cfg, space, job, name, parent, trials)


def _parent_run(cfg: SweepConfig, job: Job, name: str, space: dict) -> str:
    """The sweep's MLflow run; each trial's run names it as mlflow.parentRunId."""
    import mlflow

    from pipelines.tracking import mlflow_params

    client = mlflow.MlflowClient(job.runtime["tracking_uri"])
    exp = client.get_experiment_by_name(cfg.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
    run_id = client.create_run(exp_id, run_name=name, tags={"sweep": name}).info.run_id
    params = mlflow_params({**asdict(cfg), "name": name, "search_space": space})
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000])
                                     for k, v in params.items()])
    return run_id


def _report(grid, cfg: SweepConfig, space: dict, job: Job, name: str, parent: str,
            trials: int) -> dict:
    """Table (printed, CSV), curves PNG and, once every trial is done, the best model."""
    sign = 1 if cfg.mode == "min" else -1
    rows, curves = [], {}
    for r in sorted(grid, key=lambda r: Path(r.path).name):
        df, config = r.metrics_dataframe, (r.config or {})
        curve = {}
        if df is not None and cfg.metric in df and "step" in df:
            curve = {int(s): float(v) for s, v in zip(df["step"], df[cfg.metric])
                     if s == s and v == v}  # a resumed trial's repeated steps: the last
        curves[Path(r.path).name] = sorted(curve.items())
        total = config.get("total_steps", cfg.total_steps)
        steps = int(max(curve, default=0))
        done = bool(r.metrics and r.metrics.get("done"))
        status = ("error" if r.error else "stopped early" if done and steps < total
                  else "finished" if done else "unfinished")
        best = min((sign * v for v in curve.values()), default=math.nan) * sign
        rows.append({"trial": Path(r.path).name, **{k: config.get(k) for k in space},
                     f"best {cfg.metric}": best, "steps": steps,
                     "stopped early": status == "stopped early", "status": status,
                     "mlflow_run_id": (r.metrics or {}).get("mlflow_run_id", ""),
                     "error": str(r.error).strip().splitlines()[-1] if r.error else ""})
    key = f"best {cfg.metric}"
    ranked = [row for row in rows if not math.isnan(row[key])]
    best = min(ranked, key=lambda row: sign * row[key], default=None)
    complete = len(rows) == trials and all(r["status"] != "unfinished" for r in rows)
    local = "://" not in job.storage
    out_dir = Path(job.storage if local else "runs", name)
    print_table(rows, space, key)
    table = write_csv(rows, out_dir / "results.csv")
    plot = plot_curves(curves, {r["trial"] for r in rows if r["stopped early"]}, cfg.metric,
                       out_dir / "curves.png", title=f"{name}: {len(rows)} trials")
    model_dir = None
    if complete and best is not None:
        model_dir = Path(cfg.save_model_path or out_dir / "best_model").resolve()
        checkpoint.export_model(_latest_checkpoint(f"{job.storage}/{name}/train/"
                                                   f"{best['trial']}"), model_dir)
    _finish_parent(job, parent, best, key, complete, [table, plot])
    return {"name": name, "rows": rows, "best": best, "complete": complete, "csv": str(table),
            "plot": str(plot), "model_dir": str(model_dir) if model_dir else None,
            "sweep_dir": f"{job.storage}/{name}", "parent_run_id": parent,
            "tracking_uri": job.runtime["tracking_uri"]}


def _latest_checkpoint(run_dir: str):
    """The newest complete checkpoint of a trial's Train run (local or remote storage)."""
    import pyarrow.fs
    import ray.train

    fs, root = pyarrow.fs.FileSystem.from_uri(run_dir)
    found = sorted(i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(root))
                   if i.base_name.startswith(checkpoint.PREFIX))
    for base in reversed(found):
        config = fs.get_file_info(f"{root}/{base}/{checkpoint.MODEL_DIR}/config.json")
        if config.type == pyarrow.fs.FileType.File:
            return ray.train.Checkpoint(f"{root}/{base}", filesystem=fs)
    raise ValueError(f"{run_dir} holds no complete checkpoint to export.")


def _finish_parent(job: Job, parent: str, best: dict | None, key: str, complete: bool,
                   artifacts: list[Path]) -> None:
    import mlflow

    client = mlflow.MlflowClient(job.runtime["tracking_uri"])
    for path in artifacts:
        client.log_artifact(parent, str(path))
    if best is not None:
        client.log_metric(parent, f"best/{key.split(' ', 1)[1]}", best[key])
        client.set_tag(parent, "best_trial", best["trial"])
        client.set_tag(parent, "best_run_id", best["mlflow_run_id"])
    client.set_terminated(parent, status="FINISHED" if complete else "KILLED")


def print_table(rows: list[dict], space: dict, key: str) -> None:
    cols = ["trial", *space, key, "steps", "status"]

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(cell(r[c])) for r in rows)) if rows else len(c) for c in cols]
    print("\n" + "  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(cell(r[c]).ljust(w) for c, w in zip(cols, widths)))


def write_csv(rows: list[dict], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def plot_curves(curves: dict[str, list], stopped: set, metric: str, out: Path,
                title: str = "") -> Path:
    """Every trial's --metric by step, one line each; x marks where ASHA stopped a trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for trial, points in curves.items():
        if points:
            (line,) = ax.plot(*zip(*points), "o-", markersize=3, label=trial)
            if trial in stopped:
                ax.plot(*points[-1], "x", color=line.get_color(), markersize=10)
    ax.set(xlabel="step", ylabel=metric, title=title or metric)
    finite = [v for points in curves.values() for _, v in points if math.isfinite(v)]
    if finite:  # a diverged trial's huge values would flatten every other curve
        low, high = min(finite), sorted(finite)[int(0.9 * (len(finite) - 1))]
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.3 * (high - low + 1e-9))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _write_text(uri: str, text: str) -> None:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    fs.create_dir(path.rsplit("/", 1)[0])
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _read_record(cfg: SweepConfig) -> dict:
    import pyarrow.fs

    storage = cfg.storage_path if "://" in cfg.storage_path \
        else str(Path(cfg.storage_path).expanduser().resolve())
    fs, path = pyarrow.fs.FileSystem.from_uri(f"{storage}/{cfg.name}/{RECORD}")
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        raise ValueError(f"no sweep {cfg.name!r} in {cfg.storage_path} (no {RECORD}); pass the "
                         "--name and --storage_path it ran with.")
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def main(argv: list[str] | None = None) -> int:
    from gpt2core import ModelFileError, TokenizerError
    from pipelines import dataset
    from pipelines.corpus import CorpusError

    cfg = parse(SweepConfig, argv, prog="gpt2 tune", description=__doc__.split("\n")[0])
    try:
        out = sweep(cfg)
    except (ValueError, ModelFileError, TokenizerError, CorpusError,
            dataset.DatasetError) as e:  # bad input: one sentence, no traceback
        if type(e).__module__.startswith("ray"):
            raise
        print(f"gpt2 tune: error: {e}", file=sys.stderr)
        return 2
    print(f"\nresults: {out['csv']}\ncurves:  {out['plot']}\n"
          f"MLflow:  parent run {out['parent_run_id']} in {out['tracking_uri']}")
    if not out["complete"]:
        print(f"the sweep stopped before every trial finished; finish it with:\n"
              f"  gpt2 tune --name {out['name']} --storage_path {cfg.storage_path} --resume")
        return 1
    best = out["best"]
    if best is None:
        print("no trial reported a metric; see the errors above.")
        return 1
    print(f"best:    {best['trial']} ({cfg.metric} {best[f'best {cfg.metric}']:.4f}) -> "
          f"{out['model_dir']}\n         gpt2 serve --model_path {out['model_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
