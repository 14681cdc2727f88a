"""pipelines/common/placement.py: every reservation it makes can be placed, on cluster.yaml
shapes, on 8-GPU nodes and on CPU-only machines; GPUs the cluster lacks are waited for only
where an autoscaler can add them. No Ray starts here."""

from pathlib import Path

import pytest
import yaml

from pipelines.common import placement
from pipelines.common.placement import DATA_CPUS, check_gpus, concurrent_trials, worker_share

ROOT = Path(__file__).resolve().parents[3]
HEAD = {"CPU": 8.0}  # cluster.yaml: m5.2xlarge head, no GPU
G5 = {"CPU": 4.0, "GPU": 1.0}  # cluster.yaml: g5.xlarge worker
P5 = {"CPU": 96.0, "GPU": 8.0}  # an 8-GPU node
TRIAL_CPUS = 0.01  # pipelines/tune.py's trial actor


def launcher() -> placement.Autoscaler:
    return placement.autoscaler_from_launcher(yaml.safe_load((ROOT / "cluster.yaml").read_text()))


def fits(nodes: list[dict], bundles: list[dict], held: list[float]) -> bool:
    """First-fit of `bundles` (largest first) onto `nodes` with `held` CPUs kept back on each."""
    free = [{**n, "CPU": n.get("CPU", 0) - h} for n, h in zip(nodes, held)]
    if any(n["CPU"] < 0 for n in free):
        return False
    for b in sorted(bundles, key=lambda b: (-b.get("GPU", 0), -b["CPU"])):
        node = next((n for n in free if all(n.get(k, 0) >= v - 1e-9 for k, v in b.items())), None)
        if node is None:
            return False
        for k, v in b.items():
            node[k] -= v
    return True


def placeable(nodes: list[dict], share: placement.Share, workers: int, gpus: int = 0,
              trials: int = 1) -> bool:
    """The workers' (and trial actors') bundles fit, with DATA_CPUS free for Ray Data: on some
    node (CPU-only), or on every GPU node (GPU workers)."""
    bundles = [{"CPU": share.cpus, **({"GPU": 1} if gpus else {})}] * (workers * trials)
    bundles += [{"CPU": TRIAL_CPUS}] * (trials if trials > 1 else 0)
    if gpus:
        return fits(nodes, bundles, [DATA_CPUS if n.get("GPU") else 0 for n in nodes])
    return any(fits(nodes, bundles, [DATA_CPUS * (i == j) for j in range(len(nodes))])
               for i in range(len(nodes)))


# --- CPU-only ---------------------------------------------------------------------------------

@pytest.mark.parametrize("nodes, workers, trials, expected", [
    ([{"CPU": 2}], 1, 1, (1.0, 2)),  # one worker reserves 1 CPU, computes on 2
    ([{"CPU": 2}], 2, 1, (0.5, 1)),
    ([{"CPU": 2}], 1, 2, (0.45, 1)),  # tune's demo: 2 trials x 1 worker
    ([{"CPU": 1}] * 3, 1, 1, (1.0, 1)),
    ([{"CPU": 1}] * 3, 2, 1, (1.0, 1)),  # the third node keeps Ray Data's CPU
    ([{"CPU": 1}] * 3, 3, 1, (0.5, 1)),
    ([{"CPU": 8}] * 2, 2, 1, (7.0, 8)),
    ([{"CPU": 4}] * 2, 4, 1, (1.5, 2)),
    ([HEAD, {"CPU": 4}, {"CPU": 4}], 4, 1, (3.5, 4)),
])
def test_cpu_workers_fit_beside_ray_data(nodes, workers, trials, expected):
    share = worker_share(nodes, workers, trials=trials, trial_cpus=TRIAL_CPUS * (trials > 1))
    assert (share.cpus, share.threads, share.note) == (*expected, "")
    assert placeable(nodes, share, workers, trials=trials)


def test_the_old_whole_cluster_rule_left_no_cpu_for_ray_data():
    # old: min((total - 1) / workers, largest - 1); each worker fits, Ray Data's 1-CPU task not
    old = placement.Share(min((16 - DATA_CPUS) / 4, 8 - DATA_CPUS), 4)  # 3.75
    assert not placeable([HEAD, {"CPU": 4}, {"CPU": 4}], old, 4)
    assert not placeable([{"CPU": 4}] * 2, placement.Share(1.75, 2), 4)


def test_explicit_cpus_and_too_few_cpus():
    assert worker_share([{"CPU": 2}], 1, cpus_per_worker=0.25) == placement.Share(0.25, 2)
    with pytest.raises(ValueError, match="has 1 CPUs: too few for 1 training worker"):
        worker_share([{"CPU": 1}], 1)
    with pytest.raises(ValueError, match="3 trial.s. x 1 worker.s. do not fit in 1 CPUs"):
        worker_share([{"CPU": 1}], 1, trials=3)


def test_cpu_trials_at_once():
    assert concurrent_trials([{"CPU": 2}], 1, 0, trials=4, trial_cpus=TRIAL_CPUS) == 2
    assert concurrent_trials([{"CPU": 16}], 2, 0, trials=8, trial_cpus=TRIAL_CPUS) == 4
    assert concurrent_trials([{"CPU": 16}], 2, 0, trials=8, wanted=3) == 3
    assert concurrent_trials([{"CPU": 16}], 2, 0, trials=2, wanted=3) == 2
    # 4 trials x 1 worker on 1.5 CPUs would get 0.1 each: fewer trials instead
    assert concurrent_trials([{"CPU": 1.5}], 1, 0, trials=4, trial_cpus=TRIAL_CPUS) == 1


# --- cluster.yaml: an 8-CPU head and 0-4 g5.xlarge workers on demand -------------------------

def test_cluster_yaml_is_read_as_an_autoscaler_of_g5_nodes():
    scaler = launcher()
    assert scaler.node_types == ({"CPU": 4, "GPU": 1},)  # the head type is not one it adds
    assert scaler.max_gpus == 4 and scaler.source == placement.BOOTSTRAP


@pytest.mark.parametrize("up", [0, 1, 2, 4])
@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_gpu_workers_fit_the_g5_nodes_not_the_head(up, gpus):
    nodes = [HEAD] + [G5] * up
    scaler = launcher()
    if up >= gpus:
        assert check_gpus(gpus, up, scaler) is False
    else:
        assert check_gpus(gpus, up, scaler) is True  # wait for the autoscaler
        with pytest.raises(ValueError, match=rf"--gpus {gpus} asks for more GPUs than the "
                           rf"cluster has \({up}\); pass --gpus {up} or join a cluster"):
            check_gpus(gpus, up, None)  # a plain `ray start --head`: refused at once
    share = worker_share(nodes, gpus, gpus=1, node_types=scaler.node_types)
    assert (share.cpus, share.threads) == (3.0, 4)  # not ~7: the head's CPUs are not counted
    assert ("autoscaler's GPU node type" in share.note) == (up < gpus)
    after = [HEAD] + [G5] * max(up, gpus)  # once the autoscaler added the rest
    assert placeable(after, share, gpus, gpus=1)


def test_no_gpu_node_up_or_known_takes_the_conservative_default():
    share = worker_share([HEAD], 2, gpus=1)
    assert (share.cpus, share.threads) == (placement.DEFAULT_GPU_WORKER_CPUS, 1)
    assert "conservative default" in share.note
    assert worker_share([HEAD], 2, gpus=1, node_types=[HEAD]) == share  # no GPU type either
    assert placeable([HEAD, G5, G5], share, 2, gpus=1)


def test_more_gpus_than_the_autoscaler_can_reach_are_refused():
    with pytest.raises(ValueError, match=r"--gpus 8 asks for more GPUs than the cluster can grow "
                       r"to \(4, per ~/ray_bootstrap_config.yaml\); pass --gpus 4"):
        check_gpus(8, 0, launcher())


def test_tune_two_trials_of_one_gpu():
    scaler = launcher()
    for up, scaler_or_none, k in [(2, None, 2), (1, scaler, 2), (1, None, 1), (0, scaler, 2)]:
        nodes = [HEAD] + [G5] * up
        max_gpus = scaler_or_none.max_gpus if scaler_or_none else 0
        assert concurrent_trials(nodes, 1, 1, trials=2, max_gpus=max_gpus) == k
        share = worker_share(nodes, 1, gpus=1, trials=k, trial_cpus=TRIAL_CPUS,
                             node_types=scaler_or_none.node_types if scaler_or_none else ())
        assert (share.cpus, share.threads) == (3.0, 4)
        assert placeable([HEAD] + [G5] * max(up, k), share, 1, gpus=1, trials=k)


# --- 4 nodes x 8 GPUs -------------------------------------------------------------------------

@pytest.mark.parametrize("gpus", [8, 32])
def test_eight_gpu_nodes(gpus):
    nodes = [P5] * 4
    assert check_gpus(gpus, 32, None) is False
    share = worker_share(nodes, gpus, gpus=1)
    assert (share.cpus, share.threads) == (11.85, 12)  # (96 - 1) / 8, floored to 0.05
    assert placeable(nodes, share, gpus, gpus=1)
    with pytest.raises(ValueError, match="--gpus 33 asks for more GPUs than the cluster has"):
        check_gpus(33, 32, None)


def test_gcs_node_groups():
    head = {"resources": {"CPU": 8}, "min_count": 1, "max_count": 1}
    gpu = {"resources": {"CPU": 96, "GPU": 8}, "min_count": 0, "max_count": -1}
    assert placement.autoscaler_from_groups([head, gpu], "gcs").max_gpus == float("inf")
    capped = placement.autoscaler_from_groups([head, gpu], "gcs", max_resources={"GPU": 16})
    assert capped.max_gpus == 16 and {"CPU": 96, "GPU": 8} in capped.node_types
    fixed = {**gpu, "min_count": 2, "max_count": 2}
    assert placement.autoscaler_from_groups([head, fixed], "gcs") is None  # nothing to add


# --- waiting for the autoscaler ---------------------------------------------------------------
# The one mock-like part: no autoscaler can run here, so a fake clock and a fake source of
# "GPUs up" stand in for time passing and nodes joining.

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.now += s


def test_waits_with_progress_until_the_gpus_are_up():
    clock, lines = FakeClock(), []
    up = lambda: 0 if clock.now < 40 else 1 if clock.now < 70 else 4  # noqa: E731
    got = placement.wait_for_gpus(4, up, 900, clock=clock, sleep=clock.sleep, say=lines.append,
                                  activity=lambda: placement.launches_text(3, 0))
    assert got == 4 and clock.now == 70
    assert lines[0] == "waiting for GPUs: 0/4 up (3 node(s) launching; 0/900 s)…"
    assert lines[-1] == "GPUs up: 4/4 after 70 s."
    assert len(lines) == 1 + 5  # a line every 15 s or so (every 16 s at a 2 s poll)


def test_gives_up_after_the_timeout_in_one_sentence():
    clock, lines = FakeClock(), []
    with pytest.raises(ValueError) as e:
        placement.wait_for_gpus(4, lambda: 1, 61, clock=clock, sleep=clock.sleep,
                                say=lines.append)
    assert clock.now == 61  # the last sleep stops at the timeout
    assert str(e.value).startswith("--gpus 4: only 1 of 4 GPUs came up in 61 s of waiting for "
                                   "the autoscaler; see `ray status`")
    assert "GPT2_GPU_WAIT_S=SECONDS" in str(e.value) and str(e.value).count(".") == 1
    assert "autoscaler adding nodes" in lines[0]


def test_wait_seconds_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(placement.GPU_WAIT_ENV, raising=False)
    assert placement.gpu_wait_s() == 900
    monkeypatch.setenv(placement.GPU_WAIT_ENV, "120")
    assert placement.gpu_wait_s() == 120
    for bad in ("soon", "-5", "nan"):
        monkeypatch.setenv(placement.GPU_WAIT_ENV, bad)
        with pytest.raises(ValueError, match="is not a number of seconds"):
            placement.gpu_wait_s()


def test_place_requests_the_bundles_waits_then_clears_the_request(monkeypatch, capsys):
    # The fake autoscaler: request_resources "adds" the g5 nodes the bundles need.
    nodes, requests = [HEAD], []

    def request(bundles):
        requests.append(bundles)
        nodes.extend([G5] * max(0, len(bundles) - int(placement.gpus_in(nodes))))

    monkeypatch.setattr(placement, "alive_nodes", lambda: list(nodes))
    monkeypatch.setattr(placement, "_autoscaler", launcher)
    monkeypatch.setattr(placement, "_request", request)
    share = placement.place(2, gpus=1, wait_s=60)
    assert requests == [[{"CPU": 3.0, "GPU": 1}] * 2, []]  # cleared: idle nodes may go
    assert share == placement.Share(3.0, 4)
    out = capsys.readouterr().out
    assert "asking the autoscaler (~/ray_bootstrap_config.yaml) for 2 GPU(s)" in out
    assert "GPUs up: 2/2" in out
    monkeypatch.setattr(placement, "_autoscaler", lambda: None)
    with pytest.raises(ValueError, match="--gpus 4 asks for more GPUs than the cluster has"):
        placement.place(4, gpus=1)


def test_tune_on_one_cpu_nodes_fits_the_trials_actors_beside_the_workers():
    """Seen on the cluster test's 3 x 1-CPU nodes: Ray Data's CPU and the trials' 0.01-CPU
    actors were asked to fit on one node, which no 1-CPU node can hold."""
    nodes = [{"CPU": 1.0}] * 3
    one = placement.worker_share(nodes, 1, trials=1, trial_cpus=0.01)
    two = placement.worker_share(nodes, 1, trials=2, trial_cpus=0.01)
    assert (one.cpus, two.cpus) == (1.0, 0.95)
    assert 2 * two.cpus + 2 * 0.01 + placement.DATA_CPUS <= 3.0
