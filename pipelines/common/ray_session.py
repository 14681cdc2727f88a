"""Ray start-up and Ray Data settings shared by the pipelines (imported lazily: Ray is heavy).

A quiet console is the default: every stage prints its own progress and result, and Ray's,
Ray Train's and Ray Data's INFO logs, progress blocks and per-report lines stay in Ray's log
files (/tmp/ray/session_latest/logs) unless `--verbose` (or GPT2_VERBOSE=1, for `ray job
submit`). Warnings and errors still show. The settings are Ray's own: the job's
`ray.LoggingConfig` (driver, tasks and actors), RunConfig's `ray.train.LoggingConfig`, Ray
Data's RAY_DATA_LOG_LEVEL and DataContext, set in every process of the job by a
`worker_process_setup_hook`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager

from pipelines.common.flags import verbose


def ray():
    """The ray module with ray.data loaded (a subpackage `import ray` does not load)."""
    import ray as ray_module
    import ray.data  # noqa: F401

    return ray_module


def init_ray(address: str | None, loud: bool | None = None) -> float:
    """Join RAY_ADDRESS/--address or start a local cluster, unless Ray is up; returns seconds.
    Quiet unless `loud` (default: --verbose / GPT2_VERBOSE)."""
    r, start = ray(), time.perf_counter()
    loud = verbose() if loud is None else loud
    if not r.is_initialized():
        if address is None and not os.environ.get("RAY_ADDRESS"):  # most likely a new cluster
            # nothing preempts one machine's nodes, and Ray's watcher logs an error line
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        if not loud:
            _hide_notes()
        hook = f"{__name__}.{'setup_worker' if loud else 'setup_quiet_worker'}"
        r.init(address=address, runtime_env={"worker_process_setup_hook": hook},
               **({} if loud else {"logging_config": r.LoggingConfig(log_level="WARNING")}))
    if not loud:
        _quiet_data()
    return time.perf_counter() - start


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
def data_context(max_block_size: int):
    """Ordered, small-block Ray Data execution, restored afterwards.

    preserve_order: blocks come back in input order, as packing needs. No per-operator
    resource reservation: it holds half the CPUs back for operators a one-map pipeline does
    not have, and on 2 CPUs it ran one task at a time. Small blocks: the driver's memory then
    does not grow with the work items, which grow with the corpus.
    """
    ctx = ray().data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled, ctx.target_max_block_size
    ctx.op_resource_reservation_enabled, ctx.target_max_block_size = False, max_block_size
    try:
        with ordered():
            yield
    finally:
        ctx.op_resource_reservation_enabled, ctx.target_max_block_size = saved


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
        raise ValueError(f"{flag} {path} is inside Ray's temporary dir, which Ray deletes; {fix}.")
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
        raise ValueError(f"{flag} {path} is a local path that {len(blind)} of the cluster's "
                         f"{len(nodes)} nodes cannot see (e.g. {blind[0]}); {fix}.")
