"""Two replicas under load, one killed: Serve replaces it, requests on the other succeed, and
requests on the killed one end promptly with a 5xx instead of hanging."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.slow


def pids(url: str, want: int, timeout: float = 120) -> set[int]:
    """Replica pids seen through /healthz (requests spread over replicas) until `want`."""
    seen: set[int] = set()
    deadline = time.time() + timeout
    while len(seen) < want and time.time() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=10)
            if r.status_code == 200:
                seen.add(r.json()["pid"])
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return seen


def kill_under_load(url: str, victim: int) -> tuple[float, list]:
    """Six clients keep the replicas busy; after 4 s `victim` is SIGKILLed, 15 s later they
    stop. (kill time, [(started, ended, status or exception name)])."""
    stop, results = threading.Event(), []

    def client(c: int) -> None:
        i = 0
        while not stop.is_set():
            t0 = time.time()
            try:
                r = httpx.post(f"{url}/v1/completions", timeout=60, json={
                    "prompt": "ROMEO:", "max_tokens": 60, "seed": 100 * c + i})
                outcome = r.status_code
            except httpx.HTTPError as e:
                outcome = type(e).__name__
            results.append((t0, time.time(), outcome))
            i += 1

    with ThreadPoolExecutor(6) as pool:
        for c in range(6):
            pool.submit(client, c)
        time.sleep(4)  # both replicas busy
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        time.sleep(15)
        stop.set()
    return killed_at, results


def replaced(url: str, victim: int) -> set[int]:
    """The replicas once Serve is back to two without `victim` (or what it has after 120 s)."""
    deadline = time.time() + 120
    now: set[int] = set()
    while time.time() < deadline:
        now = pids(url, 2, timeout=20)
        if len(now) == 2 and victim not in now:
            break
    return now


def test_a_killed_replica_fails_its_requests_fast_and_is_replaced(server, model_dir):
    from ray import serve

    from serve.app import AppArgs, app

    serve.run(app(AppArgs(model_dir=str(model_dir), num_replicas=2, num_cpus=0.25,
                          max_batch_size=4)), name="pair", route_prefix="/pair", blocking=False)
    url = f"{server}/pair"
    live = pids(url, 2)
    assert len(live) == 2, f"saw replicas {live}"
    for _ in range(3):  # a killed replica that held no request (on a busy machine Serve's
        victim = min(live)  # router can send them all to the other) proves nothing: again
        killed_at, results = kill_under_load(url, victim)
        during = [r for r in results if r[0] < killed_at < r[1]]  # in flight at the kill
        failed = [r for r in during if r[2] != 200]
        survived = [r for r in during if r[2] == 200]
        print(f"in flight at the kill: {len(during)}; 200: {len(survived)}; failed: "
              f"{[(round(r[1] - killed_at, 1), r[2]) for r in failed]}")
        now = replaced(url, victim)  # Serve brings the deployment back to two replicas
        assert len(now) == 2 and victim not in now, now
        if failed:
            break
        live = now
    assert failed, "no request was on the killed replica, three times"
    assert survived, "no request on the other replica finished"
    for _, ended, outcome in failed:  # promptly, as a 5xx or a closed connection
        assert ended - killed_at < 30, f"a request on the killed replica took {ended - killed_at}"
        assert outcome != "ReadTimeout" and (not isinstance(outcome, int) or outcome >= 500)
    after = [r for r in results if r[0] > killed_at + 10]
    assert after and all(r[2] == 200 for r in after[-3:]), after[-3:]
    serve.delete("pair")
