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
     Each trial has its own MLflow run, nested under the sweep's parent run, logged by the
     Tune driver from the trial's results (tune_report.trial_runs).
  3. Driver: a table of the trials (printed, results.csv), every trial's validation curve
     (curves.png), and the best trial's model dir exported, ready for `gpt2 serve`.
Ctrl-C stops the sweep with its state saved; --resume finishes the trials left, each continuing
from its last checkpoint, with ASHA's record of the finished ones kept.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

if __name__ == "__main__":  # as a file (python, ray job submit): import pipelines by package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from gpt2core import storage
from gpt2core.errors import UserError
from pipelines.common import placement
from pipelines.common.entry import stage_main
from pipelines.common.flags import option, parse, verbose
from pipelines.training import checkpoint
from pipelines.training.config import TrainConfig
from pipelines.training.driver import TrainJob, make_trainer, plan_job, run_name
from pipelines.training.plan import make_plan
from pipelines.tuning import report as tune_report
from pipelines.tuning import space as tune_space

METRICS = ("eval/loss", "eval/bpb", "eval/ppl")  # what every evaluation reports; lower is better
TRIAL_CPUS = 0.01  # the trial function only drives its TorchTrainer; a whole CPU would idle
RECORD = "sweep.json"  # in the sweep dir: the flags and space, for --resume


@dataclass
class SweepConfig(TrainConfig):
    total_steps: int = option(300, "optimizer steps per trial")
    eval_steps: int = option(50, "evaluate every this many steps (ASHA compares trials there)")
    save_steps: int = option(100, "checkpoint every this many steps (--resume goes on from there)")
    num_samples: int = option(4, "trials sampled from the space (each grid value this many times)")
    search_space: str | None = option(None, "YAML or JSON file: TrainConfig field -> value or "
                                      "{loguniform|uniform|randint|choice|grid: [...]}; "
                                      "without it DEFAULT_SPACE in pipelines/tuning/space.py")
    max_concurrent: int = option(0, "trials at once (0: as many as fit)")
    scheduler: str = option("asha", "asha: stop trials that trail early; fifo: run all to the end")
    metric: str = option("eval/loss", "what ranks trials: eval/loss, eval/bpb or eval/ppl")
    grace_period: int = option(0, "steps before ASHA may stop a trial (0: 2 x --eval_steps)")
    reduction_factor: float = option(3.0, "ASHA keeps about 1/this of the trials at each rung")
    resume: bool = option(False, "finish the interrupted sweep --name (with its saved flags)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 1 or self.max_concurrent < 0 or self.grace_period < 0:
            raise UserError("--num_samples must be at least 1, --max_concurrent and "
                            "--grace_period not negative.")
        if self.scheduler not in ("asha", "fifo"):
            raise UserError(f"--scheduler is asha or fifo, got {self.scheduler}.")
        if self.metric not in METRICS:
            raise UserError(f"--metric {self.metric} is not reported; use one of "
                            f"{', '.join(METRICS)}.")
        if self.reduction_factor <= 1:
            raise UserError(f"--reduction_factor must be above 1, got {self.reduction_factor}.")
        if self.resume and not self.name:
            raise UserError("--resume needs --name: the sweep to finish.")

    def train_config(self) -> TrainConfig:
        """The trials' base config: this config's TrainConfig fields."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})


# --- one trial ----------------------------------------------------------------------------------

def run_trial(config: dict, job: TrainJob, sweep: dict) -> None:
    """A Tune function trainable: train.py's TorchTrainer with the trial's fields replaced."""
    import ray.tune
    from ray.util.queue import Queue

    cfg = replace(job.cfg, **config)
    make_plan(cfg, job.context.manifest, job.workers, job.context.model_dir)  # bad mix: ends
    name = ray.tune.get_context().get_trial_name()
    controller = Queue(1, actor_options={"num_cpus": 0})  # the Train controller's handle
    stop = _abort_on_stop(controller)
    # no MLflow here: this runs on any node; the Tune driver logs the trial's run
    # (tune_report.trial_runs) from the results EvalReport sends it
    trainer = make_trainer(replace(job, cfg=cfg),
                           callbacks=[_eval_report(sweep["metric"], controller)],
                           name=name, storage_path=sweep["train_storage"])
    try:
        result = trainer.fit()
    except Exception:
        if not stop.is_set():  # else Tune stopped the trial and we aborted its run: no error
            raise
        return
    if controller.empty() and sweep["metric"] in (result.metrics or {}):
        # nothing reported: the run had ended before Ctrl-C, and Tune missed its last report
        ray.tune.report(_for_tune(result.metrics, sweep["metric"]))


def _for_tune(metrics: dict, metric: str) -> dict:
    """A diverged trial's NaN as the worst value: ASHA then stops it (NaN passes every cutoff).
    Every metric is a loss: lower is better."""
    return metrics if math.isfinite(metrics[metric]) else {**metrics, metric: math.inf}


def _eval_report(metric: str, controller):
    """TuneReportCallback for evaluations only (Tune wants --metric in every result; a
    save-only report has none, so its records for MLflow wait for the next result). It runs in
    the Train controller, and hands the trial that controller's handle, for _abort_on_stop."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.common.tracking import RECORDS, RESTORED

    class EvalReport(TuneReportCallback):
        sent = False

        def __init__(self):
            super().__init__()
            self.held = {RECORDS: [], RESTORED: []}  # rank 0's, not sent to Tune yet

        def after_report(self, run_context, metrics, checkpoint):
            if not self.sent:
                import ray

                controller.put(ray.get_runtime_context().current_actor)
                self.sent = True
            for key, held in self.held.items():
                held += metrics[0].get(key) or []
            if metric in metrics[0]:
                first = {**_for_tune(metrics[0], metric), **self.held}
                self.held = {RECORDS: [], RESTORED: []}
                super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EvalReport()


def _abort_on_stop(controller):
    """Abort the trial's Train run when Tune stops the trial (ASHA, Ctrl-C), before Tune frees it.

    Tune stops a function trainable by setting its session's stop_event, then removes the
    trial's actor, and with it the Train controller it owns; the workers' placement group is
    the job's and outlives them. Train's own cleaner finds such groups through the Ray state
    API (the dashboard), which a cluster may not run; so the stop_event here aborts the run
    (the controller stops its workers and removes their group) before it is set.
    """
    import threading

    import ray
    from ray.train._internal.session import get_session  # as TuneReportCallback uses it

    class AbortFirst(threading.Event):
        def set(self) -> None:
            if not self.is_set() and not controller.empty():
                try:
                    ray.get(controller.get_nowait().abort.remote(), timeout=60)
                except (ray.exceptions.RayError, TimeoutError):
                    pass  # already done or gone: nothing left to free
            super().set()

    session = get_session()
    session.stop_event = AbortFirst()
    return session.stop_event


def _keep_rungs(scheduler):
    """Tune saves the trials and the searcher with an experiment, not the scheduler: this
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

def size_trials(job: TrainJob, cfg: SweepConfig, trials: int) -> tuple[int, TrainJob]:
    """(trials at once, the job with each worker's CPUs and threads for that many).

    plan_job sized the workers for one trial; here the cluster is shared between the trials
    by pipelines/common/placement.py's rule (DATA_CPUS still free for Ray Data's read tasks; GPU
    workers sized by the GPU nodes, counting those the autoscaler can still add).
    """
    seen = placement.observe()
    gpus = 1 if cfg.gpus else 0
    k = placement.concurrent_trials(seen.nodes, job.workers, gpus, trials, cfg.max_concurrent,
                                    TRIAL_CPUS, seen.max_gpus)
    share = placement.worker_share(seen.nodes, job.workers, gpus, cfg.cpus_per_worker, k,
                                   TRIAL_CPUS, seen.node_types)
    if share.note:
        print(f"placement: {share.note}.")
    return k, replace(job, cpus=share.cpus,
                      context=replace(job.context, threads=share.threads))


def sweep(cfg: SweepConfig, callbacks: list | None = None) -> dict:
    """Check, run (or finish, with --resume) the sweep, report, export the best model.

    `callbacks`: more ray.tune.Callback objects for the Tuner. Returns the table's rows, where
    the outputs went, the best row and whether every trial finished.
    """
    saved = _read_record(cfg) if cfg.resume else None
    if saved:
        known = {f.name for f in fields(SweepConfig)}
        cfg = SweepConfig(**{**{k: v for k, v in saved["config"].items() if k in known},
                             "resume": True, "address": cfg.address})
    space = saved["space"] if saved else tune_space.load_space(cfg.search_space)
    space = tune_space.check_space(space, cfg.train_config())
    name = run_name(cfg.name, "tune")
    if not saved and storage.exists(storage.join(cfg.storage_path, name)):
        raise UserError(f"{storage.join(cfg.storage_path, name)} exists; finish that sweep with "
                        "--resume, or pass another --name.")
    trials = tune_space.count_trials(space, cfg.num_samples)
    job = plan_job(cfg.train_config(), name)  # as `gpt2 train` resolves a run; starts Ray
    tune_space.check_against_data(space, job)
    k, job = size_trials(job, cfg, trials)
    where = job.run_dir
    parent = saved["parent_run_id"] if saved else tune_report.start_parent_run(
        job.tracking_uri, cfg.experiment, name,
        {**asdict(cfg), "name": name, "search_space": space})
    if not saved:
        storage.write_text(f"{where}/{RECORD}", json.dumps(
            {"config": {**asdict(cfg), "name": name, "resume": False}, "space": space,
             "parent_run_id": parent}, indent=1))
    verb = f"resuming {name} with the flags in {RECORD}" if saved else f"sweeping {name}"
    print(f"{verb}: {trials} trial(s) over {space}; {k} at a time, each {job.workers} "
          f"worker(s) x {job.cpus:g} CPU ({job.context.threads} torch thread(s)); "
          f"{cfg.scheduler} on {cfg.metric} -> {where}")

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    info = {"name": name, "parent_run_id": parent, "metric": cfg.metric,
            "train_storage": f"{where}/train"}
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job, sweep=info),
                                    {"cpu": TRIAL_CPUS})
    if saved:
        if not tune.Tuner.can_restore(where):
            raise UserError(f"sweep {name} stopped before its first trial; start it again "
                            f"after deleting {where}.")
        tuner = tune.Tuner.restore(where, trainable, resume_unfinished=True, resume_errored=True)
    else:
        max_t = max(tune_space.values_of(space.get("total_steps", cfg.total_steps)))
        scheduler = ASHAScheduler(
            time_attr="step", max_t=max_t, reduction_factor=cfg.reduction_factor,
            grace_period=min(max_t, cfg.grace_period or 2 * cfg.eval_steps)) \
            if cfg.scheduler == "asha" else FIFOScheduler()
        keep = [_keep_rungs(scheduler)] if cfg.scheduler == "asha" else []
        # first: it takes MLflow's records out of each result before Tune's loggers see it
        runs = tune_report.trial_runs(job.tracking_uri, cfg.experiment, info,
                                      job.cfg, trial_name)
        tuner = tune.Tuner(
            trainable, param_space=tune_space.param_space(space),
            tune_config=tune.TuneConfig(
                metric=cfg.metric, mode="min", scheduler=scheduler,
                num_samples=cfg.num_samples, max_concurrent_trials=k,
                trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=name, storage_path=job.storage,
                                      callbacks=[runs, *keep, *(callbacks or [])],
                                      verbose=None if verbose() else 0))  # our table is the end
    grid = tuner.fit()
    return _report(grid, cfg, space, job, name, parent, trials)


def _report(grid, cfg: SweepConfig, space: dict, job: TrainJob, name: str, parent: str,
            trials: int) -> dict:
    """Table (printed, CSV), curves PNG, MLflow parent run and, once every trial is over,
    the best trial's model dir."""
    rows, curves = tune_report.summarise(grid, space, cfg.metric, cfg.total_steps)
    best = tune_report.best_row(rows, cfg.metric)
    complete = len(rows) == trials and all(r["status"] != "unfinished" for r in rows)
    where = job.run_dir
    # the table and curves are drawn here, then land in the sweep's dir (uploaded to a URI)
    tmp = tempfile.TemporaryDirectory(prefix="gpt2ray-sweep-")
    out_dir = Path(tmp.name if storage.is_uri(where) else where)
    tune_report.print_table(rows, space, cfg.metric)
    table = tune_report.write_csv(rows, out_dir / "results.csv")
    labels = {r["trial"]: " ".join([r["trial"], *(f"{k}={tune_report.cell(r[k])}"
                                                  for k in space)]) for r in rows}
    plot = tune_report.plot_curves(curves, cfg.metric, out_dir / "curves.png", labels=labels,
                                   stopped={r["trial"] for r in rows if r["stopped early"]},
                                   title=f"{name}: {cfg.metric} of {len(rows)} trials")
    if storage.is_uri(where):
        storage.upload(out_dir, where)
    model_dir = None
    if complete and best is not None:
        model_dir = storage.resolve(cfg.save_model_path or storage.join(where, "best_model"))
        run_dir = storage.join(where, "train", best["trial"])
        checkpoint.export_model(tune_report.best_checkpoint(run_dir, cfg.metric), model_dir)
    tune_report.finish_parent_run(job.tracking_uri, parent, best, cfg.metric,
                                  complete, [table, plot])
    tmp.cleanup()
    return {"name": name, "rows": rows, "best": best, "complete": complete,
            "csv": storage.join(where, table.name), "plot": storage.join(where, plot.name),
            "model_dir": model_dir, "sweep_dir": where, "parent_run_id": parent,
            "tracking_uri": job.tracking_uri}


def _read_record(cfg: SweepConfig) -> dict:
    try:
        return json.loads(storage.read_text(storage.join(cfg.storage_path, cfg.name, RECORD)))
    except FileNotFoundError:
        raise UserError(f"no sweep {cfg.name!r} in {cfg.storage_path} (no {RECORD}); pass the "
                        "--name and --storage_path it ran with.") from None


@stage_main("gpt2 tune")
def main(argv: list[str] | None = None) -> int:
    cfg = parse(SweepConfig, argv, prog="gpt2 tune", description=__doc__)
    out = sweep(cfg)
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
    from pipelines.tune import main  # this file as a module: Ray pickles run_trial by reference

    sys.exit(main())
