"""Ray start-up and Ray Data settings shared by the pipelines (imported lazily: Ray is heavy).

A quiet console is the default: every stage prints its own progress and result, and Ray's,
Ray Train's and Ray Data's INFO logs, progress blocks and per-report lines stay in Ray's log
files (/tmp/ray/session_latest/logs) unless `--verbose` (or GPT2_VERBOSE=1, for `ray job
submit`). Warnings and errors still show. The settings are Ray's own: the job's
`ray.LoggingConfig` (driver, tasks and actors), RunConfig's `ray.train.LoggingConfig`, Ray
Data's RAY_DATA_LOG_LEVEL and DataContext, set in every process of the job by a
`worker_process_setup_hook`.

The code travels with the job: `init_ray` hands Ray this project's packages as runtime_env
`py_modules`, so workers import the driver's gpt2core, pipelines and serve whether the project
is pip-installed on every node, only on the driver, or only a checkout. It then starts one
worker on every node and waits for it, so a worker that cannot start (a missing module, a bad
runtime_env) ends the command in one sentence instead of Ray retrying it forever.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
import time
from contextlib import contextmanager

from gpt2core.errors import UserError
from pipelines.common.flags import verbose


def ray():
    """The ray module with ray.data loaded (a subpackage `import ray` does not load)."""
    import ray as ray_module
    import ray.data  # noqa: F401

    return ray_module


def init_ray(address: str | None, loud: bool | None = None, workers_print: bool = True) -> float:
    """Join RAY_ADDRESS/--address or start a local cluster, unless Ray is up; returns seconds.
    Quiet unless `loud` (default: --verbose / GPT2_VERBOSE); `workers_print=False`: when quiet,
    no line of any worker reaches this console (Ray's log files have them), for a driver
    whose workers print nothing of its own, like `gpt2 serve` on a cluster where Serve's
    controller and proxies log."""
    r, start = ray(), time.perf_counter()
    loud = verbose() if loud is None else loud
    if not r.is_initialized():
        if address is None and not os.environ.get("RAY_ADDRESS"):  # most likely a new cluster
            # nothing preempts one machine's nodes, and Ray's watcher logs an error line
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        if not loud:
            _hide_notes()
        hook = f"{__name__}.{'setup_worker' if loud else 'setup_quiet_worker'}"
        r.init(address=address, runtime_env={"worker_process_setup_hook": hook, **code_env()},
               log_to_driver=loud or workers_print,
               **({} if loud else {"logging_config": r.LoggingConfig(log_level="WARNING")}))
        check_workers()
    if not loud:
        _quiet_data()
    return time.perf_counter() - start


PACKAGES = ("gpt2core", "pipelines", "serve")
SHIP_CODE = "GPT2_SHIP_CODE"  # 0: workers import the project as installed on their nodes
JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by `ray job submit` for the job's driver


def code_env() -> dict:
    """runtime_env fields that carry the driver's packages to every worker: `py_modules` with
    the folders they were imported from (Ray uploads each once, by content hash). Not when the
    job already carries code (`ray job submit --working-dir`, or its own py_modules: Ray
    cannot merge two py_modules) or GPT2_SHIP_CODE=0; the user's other fields (env_vars,
    pip) merge with these, as Ray merges a job's runtime_env with ray.init's."""
    if os.environ.get(SHIP_CODE, "1") == "0":
        return {}
    job = json.loads(os.environ.get(JOB_CONFIG) or "{}").get("runtime_env") or {}
    if job.get("working_dir") or job.get("py_modules"):
        return {}
    return {"py_modules": [importlib.util.find_spec(p).submodule_search_locations[0]
                           for p in PACKAGES]}


def check_workers(timeout_s: float = 45) -> None:
    """One worker started on every live node, or the command ends here in one sentence naming
    the cause and the fix: a ValueError for the user's setup (a package that workers cannot
    import, a bad runtime_env, no worker within `timeout_s`), a Failure when a setup hook of
    ours raises anything else (a bug). Ray retries a worker that fails to start, and Ray
    Train waits for its actors without end; a task that may not retry fails at once."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipelines.common.entry import Failure

    r = ray()
    probe = r.remote(num_cpus=0, max_retries=0)(_imports)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote() for n in r.nodes() if n["Alive"]]
    try:
        r.get(refs, timeout=timeout_s)
        return
    except r.exceptions.GetTimeoutError:
        for ref in refs:
            r.cancel(ref, force=True)
        raise UserError(f"no Ray worker started within {timeout_s:.0f} s; see the raylet and "
                        "worker logs in the session's logs folder (/tmp/ray/session_latest/"
                        "logs) and check the job's runtime_env") from None
    except r.exceptions.RuntimeEnvSetupError as e:
        raise UserError(f"Ray could not set up the workers' runtime_env ({cause(e)}); fix "
                        "the runtime_env given to the job (ray job submit --runtime-env-json)"
                        ) from None
    except r.exceptions.WorkerCrashedError as e:  # in its setup hook: Ray has the traceback
        why = cause(e, crashed_worker())
    except r.exceptions.RayTaskError as e:  # it started, but a package is missing
        why = cause(e)
    if re.match(r"(ModuleNotFound|Import)Error\b", why):
        raise UserError(f"Ray workers cannot import this project ({why}); install the project "
                        "and its dependencies on every node, or let it ship its code (unset "
                        f"{SHIP_CODE}; under `ray job submit`, pass --working-dir . from the "
                        "checkout)")
    raise Failure(f"Ray workers cannot start: their setup failed ({why}); this is a bug, "
                  "please report it with the worker logs (/tmp/ray/session_latest/logs)")


def crashed_worker() -> str:
    """Why the latest worker that died of a system error died (Ray's exit detail: a setup
    hook's traceback), or "" when the state API cannot say."""
    try:
        from ray.util.state import list_workers

        dead = list_workers(address=ray().get_runtime_context().gcs_address, detail=True,
                            filters=[("exit_type", "=", "SYSTEM_ERROR")],
                            raise_on_missing_output=False)
    except Exception:  # no state API (an old or locked-down cluster): the generic text
        return ""
    if not dead:
        return ""
    return max(dead, key=lambda w: w.end_time_ms or 0).exit_detail or ""


def _imports() -> None:
    """On a worker: the project's packages import (the setup hook already imported pipelines)."""
    for p in PACKAGES:
        if importlib.util.find_spec(p) is None:
            raise ModuleNotFoundError(f"No module named {p!r}")


def cause(e: Exception, detail: str = "") -> str:
    """The innermost error line of Ray's long failure text (or of `detail`, when it has one),
    e.g. "ModuleNotFoundError: No module named 'pipelines'"."""
    lines = [ln.strip() for ln in (detail or str(e)).splitlines()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b:?", ln)]
    return (errors or [ln for ln in lines if ln] or [type(e).__name__])[-1]


def train_logging():
    """Ray Train's logging for RunConfig: its INFO lines (worker group, checkpoints, every
    report's metrics) only with --verbose."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def setup_worker() -> None:
    """Every process of the job, first (Ray's worker_process_setup_hook): Ray's state API,
    which Ray Train's placement-group cleaner calls, finds this job's cluster, not "multiple
    active Ray instances" when another runs on the machine."""
    import ray as ray_module

    os.environ.setdefault("RAY_ADDRESS", ray_module.get_runtime_context().gcs_address)


def setup_quiet_worker() -> None:
    """setup_worker, and Ray Data's and Ray Train's INFO lines off in this process."""
    import ray as ray_module

    setup_worker()
    _quiet_data()
    # Ray Train's worker logs every report ("Reporting training result ...: TrainingReport")
    # to a logger named by its file, so RunConfig's ray.train log level misses it
    logging.getLogger(os.path.join(os.path.dirname(ray_module.__file__), "train", "v2",
                                   "_internal", "execution", "context.py")).setLevel("WARNING")


class _Notes(logging.Filter):
    """Ray's warnings about what was chosen on purpose: a new local cluster's token auth (Ray's
    own default), Ray Data's progress bars (off, as asked)."""

    NOTES = ("Token authentication is enabled for this Ray cluster", "Progress bars disabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTES)


def _hide_notes() -> None:
    for name in ("ray._private.authentication.authentication_token_setup",
                 "ray.data._internal.progress"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Notes) for f in logger.filters):
            logger.addFilter(_Notes())


def _quiet_data() -> None:
    """Ray Data at WARNING, without its execution-plan lines and progress bars, in this process
    (RAY_DATA_LOG_LEVEL holds when Ray Data re-reads its logging config for a dataset)."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"])
    _hide_notes()
    if "ray.data" in sys.modules:
        ctx = ray().data.DataContext.get_current()
        ctx.enable_progress_bars = ctx.print_on_execution_start = False


def this_node() -> dict:
    """Remote options that put a task on the driver's node, soft (elsewhere when it has no
    room): `ds.map_batches(f, **this_node())`. Ray's node-id label with an unconstrained
    fallback, as Ray Data's named parameters take it (scheduling_strategy is deprecated)."""
    node = ray().get_runtime_context().get_node_id()
    return {"label_selector": {"ray.io/node-id": node},
            "fallback_strategy": [{"label_selector": {}}]}


@contextmanager
def ordered():
    """Ray Data execution that hands blocks back in input order, restored afterwards."""
    options = ray().data.DataContext.get_current().execution_options
    saved, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = saved


@contextmanager
def all_cpus():
    """Ray Data execution without per-operator resource reservation, restored afterwards: it
    holds half the CPUs back for operators a one-map (or fused) pipeline does not have, and
    on 2 CPUs it ran one task at a time."""
    ctx = ray().data.DataContext.get_current()
    saved, ctx.op_resource_reservation_enabled = ctx.op_resource_reservation_enabled, False
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = saved


@contextmanager
def data_context(max_block_size: int):
    """Ordered, small-block Ray Data execution on all CPUs, restored afterwards.

    preserve_order: blocks come back in input order, as packing needs. Small blocks: the
    driver's memory then does not grow with the work items, which grow with the corpus.
    """
    ctx = ray().data.DataContext.get_current()
    saved, ctx.target_max_block_size = ctx.target_max_block_size, max_block_size
    try:
        with ordered(), all_cpus():
            yield
    finally:
        ctx.target_max_block_size = saved


def check_shared(path: str, flag: str, marker: str | None = None) -> None:
    """A local `path` that a node of the cluster cannot see fails here, in one sentence, before
    training starts (not at the first checkpoint, or in a read task). Every live node looks for
    `path/marker` (an input's own file: manifest.json, config.json), or else for a probe file
    the driver writes there (an output dir); a URI (s3://, gs://) is shared by nature. Also
    refused: an output in Ray's temp dir (a relative path under `ray job submit` lands in the
    job's working-dir copy, which Ray deletes)."""
    import os
    import uuid
    from pathlib import Path

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from gpt2core import storage

    if storage.is_uri(path):
        return
    fix = (f"pass {flag} s3://bucket/… (or gs://), or a directory on a mount that every "
           "node shares")
    if marker is None and "/ray/session_" in path:
        raise UserError(f"{flag} {path} is inside Ray's temporary dir, which Ray deletes; {fix}.")
    r = ray()
    nodes = [n for n in r.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    probe = Path(path, marker or f".gpt2ray-probe-{uuid.uuid4().hex}")
    if marker is None:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
    sees = r.remote(num_cpus=0)(os.path.exists)
    try:
        found = r.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(probe)) for n in nodes], timeout=120)
    finally:
        if marker is None:
            probe.unlink()
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, found) if not ok]
    if blind:
        raise UserError(f"{flag} {path} is a local path that {len(blind)} of the cluster's "
                        f"{len(nodes)} nodes cannot see (e.g. {blind[0]}); {fix}.")


def free_cpus() -> float:
    return ray().available_resources().get("CPU", 0.0)


def wait_for_tasks(free_before: float, timeout_s: float = 30.0) -> None:
    """Until the CPUs free before some tasks started are free again (a task still running
    holds its CPU; Ray Data cancels a failed dataset's tasks without waiting for them), at most
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and free_cpus() < free_before:
        time.sleep(0.1)
