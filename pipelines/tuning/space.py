"""The search space of a Tune sweep (pipelines/tune.py): TrainConfig field names -> values.

A space is a dict, written in YAML or JSON (pipelines/search_space.yaml is an example):

    base_lr: {loguniform: [1.0e-4, 3.0e-3]}    # float fields: uniform, loguniform
    warmup_steps: {randint: [0, 200]}          # int fields; both ends included
    layers: {choice: [2, 4]}                   # one value per sample
    batch_train: {grid: [8, 16]}               # every value, each sample: trials x 2
    dropout: 0.1                               # the same in every trial

Checked before Ray starts: a name that is not a field a trial can vary, a value of the wrong
type, or one the TrainConfig (or, once the dataset is known, the dataset and model) refuses,
ends in one sentence naming it.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import fields, replace
from pathlib import Path

from gpt2core.errors import UserError
from pipelines.training.config import TrainConfig
from pipelines.training.plan import make_plan

if typing.TYPE_CHECKING:
    from pipelines.training.driver import TrainJob

# Fields a trial may not vary: where data, runs and workers are, and how results are measured.
FIXED = ("data", "corpus", "eval_corpus", "vocab_path", "vocab_size", "from_pretrained", "name",
         "resume",
         "storage_path", "save_model_path", "from_checkpoint", "keep_checkpoints",
         "max_failures", "experiment", "tracking_uri", "num_workers", "gpus", "cpus_per_worker",
         "address", "eval_steps", "eval_batches", "batch_eval", "save_steps", "log_steps",
         "cache_train_mb")
TUNABLE = tuple(f.name for f in fields(TrainConfig) if f.name not in FIXED)
DEFAULT_SPACE = {  # optimisation only: the model's shape stays the --preset's
    "base_lr": {"loguniform": [1e-4, 3e-3]},
    "wd_rate": {"choice": [0.0, 0.01, 0.1]},
    "warmup_steps": {"choice": [0, 50, 100]},
    "dropout": {"choice": [0.0, 0.1]},
    "grad_accum": {"choice": [1, 2]},
}
RANGES = ("loguniform", "uniform", "randint")
SAMPLERS = (*RANGES, "choice", "grid")


def load_space(path: str | None) -> dict:
    """The space in a YAML/JSON file; DEFAULT_SPACE without one."""
    if path is None:
        return dict(DEFAULT_SPACE)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--search_space {path} does not exist.")
    if p.suffix not in (".yaml", ".yml", ".json"):
        raise UserError(f"--search_space {path}: give a .yaml, .yml or .json file.")
    import yaml  # a dependency of Ray

    try:
        text = p.read_text(encoding="utf-8")
        space = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"--search_space {path} is not valid {p.suffix[1:]}: "
                        f"{str(e).splitlines()[0]}") from None
    if not isinstance(space, dict) or not space:
        raise UserError(f"--search_space {path} must map TrainConfig field names to values.")
    return space


def check_space(space: dict, base: TrainConfig) -> dict:
    """The space with each value typed like its field; ValueError names a bad name or value.

    Each value (a range's ends, every choice) must make a valid TrainConfig on its own.
    """
    hints, typed = typing.get_type_hints(TrainConfig), {}
    for name, spec in space.items():
        if name not in TUNABLE:
            raise UserError(f"search space: {name!r} is not a field a trial can vary; valid: "
                            f"{', '.join(sorted(TUNABLE))}.")
        kind = next(a for a in typing.get_args(hints[name]) or (hints[name],)
                    if a is not type(None))  # int | None -> int
        how, values = _sampler(name, kind, spec)
        values = [_coerce(name, kind, v) for v in values]
        if how in RANGES and not (values[0] < values[1] and (how != "loguniform" or values[0] > 0)):
            raise UserError(f"search space: {name}: {how} needs low < high (and low > 0 for "
                            f"loguniform), got {values}.")
        for v in values:
            try:
                replace(base, **{name: v})
            except ValueError as e:
                raise UserError(f"search space: {name}={v}: {e}") from None
        typed[name] = values[0] if how == "fixed" else {how: values}
    return typed


def _sampler(name: str, kind: type, spec) -> tuple[str, list]:
    if not isinstance(spec, dict):
        return "fixed", [spec]
    if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
        raise UserError(f"search space: {name}: give a value or one of {', '.join(SAMPLERS)} "
                        f"(as in {{choice: [1, 2]}}), got {spec}.")
    ((how, values),) = spec.items()
    if not isinstance(values, list) or not values or (how in RANGES and len(values) != 2):
        raise UserError(f"search space: {name}: {how} takes "
                        f"{'[low, high]' if how in RANGES else 'a list of values'}.")
    if how in RANGES and (kind not in (int, float) or (kind is int) != (how == "randint")):
        fits = {int: "randint, ", float: "uniform, loguniform, "}.get(kind, "")
        raise UserError(f"search space: {name} takes {kind.__name__} values: use {fits}"
                        "choice or grid.")
    return how, values


def _coerce(name: str, kind: type, value):
    """YAML reads 1e-4 as a string and JSON 2.0 as a float: make each value its field's type."""
    try:
        if kind in (bool, str):
            if not isinstance(value, kind):
                raise ValueError
            return value
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if kind is int and number != int(number):
            raise ValueError
        return int(number) if kind is int else number
    except (TypeError, ValueError):
        raise UserError(f"search space: {name} takes {kind.__name__} values, "
                        f"got {value!r}.") from None


def values_of(spec) -> list:
    return next(iter(spec.values())) if isinstance(spec, dict) else [spec]


def check_against_data(space: dict, job: TrainJob) -> None:
    """Each value with the dataset and the model: batch vs rows, heads vs dims, seq_len, ..."""
    for name, spec in space.items():
        for v in values_of(spec):
            try:
                make_plan(replace(job.cfg, **{name: v}), job.context.manifest, job.workers,
                          job.context.model_dir)
            except ValueError as e:
                raise UserError(f"search space: {name}={v}: {e}") from None


def param_space(space: dict) -> dict:
    """A checked space as Tune's param_space."""
    from ray import tune

    def domain(how: str, v: list):
        if how == "randint":
            return tune.randint(v[0], v[1] + 1)  # Tune's high is exclusive
        if how == "grid":
            return tune.grid_search(v)
        return tune.choice(v) if how == "choice" else getattr(tune, how)(*v)

    return {k: domain(*next(iter(s.items()))) if isinstance(s, dict) else s
            for k, s in space.items()}


def count_trials(space: dict, num_samples: int) -> int:
    return num_samples * math.prod(len(s["grid"]) for s in space.values()
                                   if isinstance(s, dict) and "grid" in s)
