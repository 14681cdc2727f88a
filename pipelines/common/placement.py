"""Where training workers go: the CPUs each reserves, its torch threads, and GPUs to wait for.

Pure functions over node resource dicts (what `ray.nodes()` lists under "Resources", e.g.
`{"CPU": 4.0, "GPU": 1.0, "memory": ...}`), so the rule is tested without Ray, plus `observe`
and `place`, which read the cluster and ask its autoscaler for GPUs.

The rule (n = workers x trials bundles; `floor20` rounds down to 0.05 CPU):
  CPU-only: the largest floor20 c such that n bundles of c CPUs fit on the nodes with one node
    still holding DATA_CPUS (+ the trials' own actors) for Ray Data: on one node that is
    (C - 1) / n, as before; across nodes no bundle is left without a node. Threads: the
    worker's full share, min(total / n, largest node), at least c.
  GPUs (one per worker): the CPU-only nodes (a cluster-launcher head) are not counted; each
    worker gets what a GPU node has per GPU less room for Ray Data there:
    c = min over GPU nodes of floor20((C - DATA_CPUS) / G), threads floor(C / G).
    A 4-CPU/1-GPU g5.xlarge: 3 CPUs, 4 threads; a 96-CPU/8-GPU node: 11.85, 12 threads.
    With too few GPUs up, the autoscaler's GPU node types count too; with no GPU node up and
    no known type, DEFAULT_GPU_WORKER_CPUS, said in `Share.note`.

Ray 2.60 exposes the node types an autoscaler can add in two places, read by `observe`:
  - the GCS cluster config (`ray._private.state.state.get_cluster_config()`, an
    autoscaler_pb2.ClusterConfig of node_group_configs with resources, min/max_count), which
    Ray Data's autoscaler and Ray Train's worker group read; in open-source Ray 2.60 nothing
    in the Python package writes it (`report_cluster_config` has no caller), platforms may;
  - the cluster launcher's `~/ray_bootstrap_config.yaml` on the head, where `ray job submit`
    runs entrypoints (Ray Tune's `_is_ray_cluster` checks the same file): its
    available_node_types with resources (filled in by `ray up`) and min/max_workers.
A plain `ray start --head` has neither: its monitor mirrors the live nodes (a read-only
config), so more GPUs are refused at once.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt2core.errors import UserError

DATA_CPUS = 1.0  # kept free of training workers: Ray Data's 1-CPU tasks (ListFiles) must fit
DEFAULT_GPU_WORKER_CPUS = 1.0  # no GPU node up or known: a CPU any GPU node can spare
MIN_AUTO_CPUS = 0.25  # fewer CPUs per worker than this: run fewer trials at once instead
GPU_WAIT_S = 900.0  # a cloud GPU node takes a few minutes to boot and install
GPU_WAIT_ENV = "GPT2_GPU_WAIT_S"
BOOTSTRAP = "~/ray_bootstrap_config.yaml"  # written by `ray up` on the head node


@dataclass(frozen=True)
class Share:
    cpus: float  # CPUs each worker reserves
    threads: int  # torch threads each worker runs
    note: str = ""  # said when not sized from live nodes (autoscaler's node type, default)


@dataclass(frozen=True)
class Autoscaler:
    source: str  # where the node types were read, for messages
    node_types: tuple[dict, ...]  # resources of the node types it can add
    max_gpus: float  # GPUs the cluster can grow to (math.inf: no limit)


@dataclass(frozen=True)
class Cluster:
    nodes: list[dict]  # the alive nodes' resources
    autoscaler: Autoscaler | None  # None: no node can be added

    @property
    def node_types(self) -> tuple[dict, ...]:
        return self.autoscaler.node_types if self.autoscaler else ()

    @property
    def max_gpus(self) -> float:
        return self.autoscaler.max_gpus if self.autoscaler else 0.0


def floor20(x: float) -> float:
    return math.floor(20 * x + 1e-9) / 20  # the epsilon: 0.15 * 20 is 2.9999999999999996


def gpus_in(nodes: Sequence[dict]) -> float:
    return sum(n.get("GPU", 0) for n in nodes)


# --- how many CPUs each worker reserves -----------------------------------------------------

def _slots(nodes: Sequence[dict], c: float, keep: float) -> int:
    """Bundles of c CPUs that fit on the nodes while one node keeps `keep` CPUs free."""
    cpus = [n.get("CPU", 0) for n in nodes]
    each = [math.floor(x / c + 1e-9) for x in cpus]
    kept = [math.floor((x - keep) / c + 1e-9) - e for x, e in zip(cpus, each) if x >= keep]
    return sum(each) + max(kept) if kept else 0


def _cpu_reservation(nodes: Sequence[dict], n: int, keep: float,
                     budget: float = math.inf) -> float:
    """The largest multiple of 0.05 CPU of which n bundles fit beside `keep` on one node and
    take at most `budget` CPUs in all (0: none)."""
    lo, hi = 0, math.floor(20 * max((x.get("CPU", 0) for x in nodes), default=0) + 1e-9)
    while lo < hi:  # _slots falls as c grows: bisect on c = m / 20
        m = (lo + hi + 1) // 2
        fits = _slots(nodes, m / 20, keep) >= n and n * m / 20 <= budget + 1e-9
        lo, hi = (m, hi) if fits else (lo, m - 1)
    return lo / 20


def worker_share(nodes: Sequence[dict], workers: int, gpus: int = 0,
                 cpus_per_worker: float = 0.0, trials: int = 1, trial_cpus: float = 0.0,
                 node_types: Sequence[dict] = ()) -> Share:
    """CPUs each of `workers` x `trials` workers reserves and the torch threads it runs.

    Reading is a small part of the work, so torch runs a thread per CPU of the worker's full
    share, not of its reservation: one worker on 2 CPUs reserves 1 and computes on 2 (Ray's
    OMP_NUM_THREADS would have said 1). `node_types`: what the autoscaler can add, counted
    for GPU workers while too few GPUs are up. ValueError: the workers do not fit.
    """
    n = workers * trials
    if gpus:
        return _gpu_share(nodes, n, cpus_per_worker, node_types)
    total = sum(x.get("CPU", 0) for x in nodes)
    largest = max((x.get("CPU", 0) for x in nodes), default=0)
    # Ray Data's CPU on one node; the trials' own small actors anywhere in what is left
    cpus = cpus_per_worker or _cpu_reservation(nodes, n, DATA_CPUS,
                                               total - DATA_CPUS - trials * trial_cpus)
    if cpus <= 0:
        if trials == 1:
            raise UserError(f"the cluster has {total:g} CPUs: too few for {workers} training "
                            "worker(s) plus Ray Data; use fewer workers or --cpus_per_worker.")
        raise UserError(f"{trials} trial(s) x {workers} worker(s) do not fit in {total:g} CPUs "
                        f"with {DATA_CPUS:g} kept for Ray Data; lower --max_concurrent or "
                        "--num_workers.")
    return Share(cpus, max(1, math.floor(max(min(total / n, largest), cpus) + 1e-9)))


def _gpu_share(nodes: Sequence[dict], n: int, cpus_per_worker: float,
               node_types: Sequence[dict]) -> Share:
    shapes = [x for x in nodes if x.get("GPU", 0) >= 1]
    coming = [t for t in node_types if t.get("GPU", 0) >= 1]
    note = ""
    if gpus_in(shapes) < n and coming:  # more GPU nodes to come: they must fit too
        shapes += coming
        note = f"sized from the autoscaler's GPU node type(s) {', '.join(map(_shape, coming))}"
    if not shapes:
        cpus = cpus_per_worker or DEFAULT_GPU_WORKER_CPUS
        return Share(cpus, max(1, math.floor(cpus)),
                     f"no GPU node is up and the autoscaler's node types are unknown: each "
                     f"GPU worker reserves {cpus:g} CPU (the conservative default)")
    per_gpu = min(x.get("CPU", 0) / x["GPU"] for x in shapes)  # the tightest GPU node
    cpus = cpus_per_worker or min(floor20((x.get("CPU", 0) - DATA_CPUS) / x["GPU"])
                                  for x in shapes)
    if cpus <= 0:
        raise UserError(f"a GPU node has {per_gpu:g} CPU(s) per GPU: too few for a GPU worker "
                        f"plus Ray Data's {DATA_CPUS:g}; pass --cpus_per_worker.")
    return Share(cpus, max(1, math.floor(max(per_gpu, cpus) + 1e-9)), note)


def _shape(resources: dict) -> str:
    return f"{resources.get('CPU', 0):g} CPU/{resources.get('GPU', 0):g} GPU"


def concurrent_trials(nodes: Sequence[dict], workers: int, gpus: int, trials: int,
                      wanted: int = 0, trial_cpus: float = 0.0, max_gpus: float = 0.0) -> int:
    """Trials at once: `wanted` (--max_concurrent), else as many as fit.

    GPUs: the GPUs up, or those the autoscaler can reach (`max_gpus`), over a trial's; the
    Train runs of trials beyond the GPUs up wait for the nodes their placement groups ask
    for. CPUs: small models gain little from threads, so about one trial per two CPUs, fewer
    while a worker would get less than MIN_AUTO_CPUS.
    """
    if wanted:
        return max(1, min(wanted, trials))
    if gpus:
        reachable = max(gpus_in(nodes), max_gpus)
        return max(1, min(trials, int(reachable // (workers * gpus))))
    total = sum(x.get("CPU", 0) for x in nodes)
    k = max(1, min(trials, max(2, int(total // (2 * workers)))))
    while k > 1 and _cpu_reservation(nodes, k * workers, DATA_CPUS + k * trial_cpus) \
            < MIN_AUTO_CPUS:
        k -= 1
    return k


# --- the autoscaler's node types ------------------------------------------------------------

def autoscaler_from_groups(groups: Sequence[dict], source: str, max_nodes: float = math.inf,
                           max_resources: dict | None = None,
                           base_gpus: float = 0.0) -> Autoscaler | None:
    """An Autoscaler from node groups {"resources", "min_count", "max_count" (-1: no limit)},
    or None when none can grow. `max_nodes` caps the groups' nodes together, `max_resources`
    the cluster's resources; `base_gpus`: GPUs of nodes outside the groups (a head)."""
    growing = [g for g in groups if g.get("resources") and g["max_count"] != 0
               and (g["max_count"] < 0 or g["max_count"] > g.get("min_count", 0))]
    if not growing:
        return None
    left, gpus = max_nodes, base_gpus
    for g in sorted(groups, key=lambda g: -g["resources"].get("GPU", 0)):  # GPU-rich first
        per_node = g["resources"].get("GPU", 0)
        if per_node and left > 0:
            count = min(math.inf if g["max_count"] < 0 else g["max_count"], left)
            gpus, left = gpus + count * per_node, left - count
    cap = (max_resources or {}).get("GPU")
    return Autoscaler(source, tuple(dict(g["resources"]) for g in growing),
                      min(gpus, cap) if cap else gpus)


def autoscaler_from_launcher(config: dict, source: str = BOOTSTRAP) -> Autoscaler | None:
    """From a cluster-launcher config (cluster.yaml; on the head, ~/ray_bootstrap_config.yaml):
    its worker node types; the head type is not one it adds."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    cap = config.get("max_workers", math.inf)  # all workers together
    groups = [{"resources": t.get("resources") or {}, "min_count": t.get("min_workers", 0),
               "max_count": t.get("max_workers", cap)}
              for name, t in types.items() if name != head]
    head_gpus = (types.get(head, {}).get("resources") or {}).get("GPU", 0)
    return autoscaler_from_groups(groups, source, cap, base_gpus=head_gpus)


# --- waiting for GPUs -----------------------------------------------------------------------

def check_gpus(needed: int, up: float, autoscaler: Autoscaler | None) -> bool:
    """True when the autoscaler must add GPUs first; ValueError when it never will."""
    if needed <= up:
        return False
    if autoscaler is None or autoscaler.max_gpus <= up:
        raise UserError(f"--gpus {needed} asks for more GPUs than the cluster has ({up:g}); "
                        f"pass --gpus {int(up)} or join a cluster with more (--address).")
    if needed > autoscaler.max_gpus:
        raise UserError(f"--gpus {needed} asks for more GPUs than the cluster can grow to "
                        f"({autoscaler.max_gpus:g}, per {autoscaler.source}); pass --gpus "
                        f"{int(autoscaler.max_gpus)} or raise its GPU node type's max_workers.")
    return True


def gpu_wait_s(default: float = GPU_WAIT_S) -> float:
    """Seconds to wait for the autoscaler's GPUs: GPT2_GPU_WAIT_S, else `default`."""
    raw = os.environ.get(GPU_WAIT_ENV, "")
    try:
        value = float(raw) if raw.strip() else default
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise UserError(f"{GPU_WAIT_ENV}={raw!r} is not a number of seconds; set it to, "
                        f"e.g., {GPU_WAIT_S:g}.")
    return value


def wait_for_gpus(needed: int, gpus_up: Callable[[], float], timeout_s: float, *,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep,
                  say: Callable[[str], None] = print,
                  activity: Callable[[], str] = lambda: "",
                  poll_s: float = 2.0, every_s: float = 15.0) -> float:
    """Poll until `needed` GPUs are up, a progress line every `every_s`; returns the GPUs up.
    ValueError after `timeout_s`, naming what to do."""
    start, said = clock(), -math.inf
    while True:
        up = gpus_up()
        elapsed = clock() - start
        if up >= needed:
            say(f"GPUs up: {up:g}/{needed} after {elapsed:.0f} s.")
            return up
        if elapsed >= timeout_s:
            raise UserError(
                f"--gpus {needed}: only {up:g} of {needed} GPUs came up in {timeout_s:g} s of "
                f"waiting for the autoscaler; see `ray status` for failed launches (quota, "
                f"capacity), wait longer with {GPU_WAIT_ENV}=SECONDS, or pass --gpus {int(up)}.")
        if elapsed - said >= every_s:
            said = elapsed
            say(f"waiting for GPUs: {up:g}/{needed} up ({activity() or 'autoscaler adding nodes'}"
                f"; {elapsed:.0f}/{timeout_s:g} s)…")
        sleep(max(0.0, min(poll_s, timeout_s - elapsed)))


def launches_text(launching: int, failed: int) -> str:
    """The autoscaler's launches, for the progress line."""
    parts = [f"{launching} node(s) launching"] if launching else []
    if failed:
        parts.append(f"{failed} launch(es) failed: see `ray status`")
    return ", ".join(parts)


# --- Ray ------------------------------------------------------------------------------------

def observe() -> Cluster:
    """(Ray) The alive nodes and the autoscaler that can add more, if any."""
    return Cluster(alive_nodes(), _autoscaler())


def place(workers: int, gpus: int = 0, cpus_per_worker: float = 0.0,
          wait_s: float | None = None) -> Share:
    """(Ray) The training job's Share; with GPUs, first the GPUs it needs: refused at once
    when no autoscaler can add them, else requested and waited for (`wait_s`, default
    GPT2_GPU_WAIT_S or 900 s)."""
    seen = observe()
    needed = workers * gpus
    if check_gpus(needed, gpus_in(seen.nodes), seen.autoscaler):
        wait_s = gpu_wait_s() if wait_s is None else wait_s
        bundle = {"CPU": worker_share(seen.nodes, workers, gpus, cpus_per_worker,
                                      node_types=seen.node_types).cpus, "GPU": gpus}
        print(f"asking the autoscaler ({seen.autoscaler.source}) for {needed} GPU(s) as "
              f"{workers} x {bundle}; waiting up to {wait_s:g} s ({GPU_WAIT_ENV})", flush=True)
        _request([bundle] * workers)
        try:
            wait_for_gpus(needed, lambda: gpus_in(alive_nodes()), wait_s, activity=_activity,
                          say=lambda line: print(line, flush=True))
        finally:
            _request([])  # the request is a floor that would keep idle GPU nodes forever
        seen = observe()
    share = worker_share(seen.nodes, workers, gpus, cpus_per_worker, node_types=seen.node_types)
    if share.note:
        print(f"placement: {share.note}.", flush=True)
    return share


def alive_nodes() -> list[dict]:
    """The resources of each live node of the Ray cluster this process is connected to."""
    from pipelines.common import ray_session

    return [n["Resources"] for n in ray_session.ray().nodes() if n["Alive"]]


def _autoscaler() -> Autoscaler | None:
    """The GCS cluster config's node groups, else the cluster launcher's bootstrap config."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API: its absence means only that we cannot tell
        config = None
    if config is not None and config.node_group_configs:
        groups = [{"resources": dict(g.resources), "min_count": g.min_count,
                   "max_count": g.max_count} for g in config.node_group_configs]
        return autoscaler_from_groups(groups, "the GCS cluster config",
                                      max_resources=dict(config.max_resources))
    path = Path(BOOTSTRAP).expanduser()
    if path.is_file():
        import yaml  # a dependency of Ray; `ray up` writes this file as JSON, which YAML reads

        return autoscaler_from_launcher(yaml.safe_load(path.read_text()) or {})
    return None


def _request(bundles: list[dict]) -> None:
    """Ask the autoscaler to fit `bundles` (replacing earlier requests; [] clears)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def _activity() -> str:
    """What the autoscaler is doing, from its status (best effort: "" when unreadable)."""
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2():
            import ray
            from ray.autoscaler.v2.sdk import get_cluster_status

            status = get_cluster_status(ray.get_runtime_context().gcs_address)
            return launches_text(
                sum(r.count for r in status.pending_launches) + len(status.pending_nodes),
                sum(r.count for r in status.failed_launches) + len(status.failed_nodes))
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
        return launches_text(sum((report.get("pending_launches") or {}).values())
                             + len(report.get("pending_nodes") or []),
                             len(report.get("failed_nodes") or []))
    except Exception:  # the progress line does without it
        return ""
