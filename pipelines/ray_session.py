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
