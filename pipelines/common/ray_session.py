"""Ray start-up and Ray Data settings shared by the pipelines (imported lazily: Ray is heavy)."""

from __future__ import annotations

import time
from contextlib import contextmanager


def ray():
    """The ray module with ray.data loaded (a subpackage `import ray` does not load)."""
    import ray as ray_module
    import ray.data  # noqa: F401

    return ray_module


def init_ray(address: str | None) -> float:
    """Join RAY_ADDRESS/--address or start a local cluster, unless Ray is up; returns seconds."""
    r, start = ray(), time.perf_counter()
    if not r.is_initialized():
        r.init(address=address, logging_level="warning")
    return time.perf_counter() - start


def this_node():
    """A scheduling strategy for the driver's node (soft: elsewhere when it has no room)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray().get_runtime_context().get_node_id(), soft=True)


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
