"""The replica's decode loop: many request coroutines feeding one continuously batched Decoder.

Each request calls `Scheduler.run(job)` and reads its Deltas as they come. One loop task per
replica calls `Decoder.step` on its own decode thread (so the event loop keeps accepting requests
meanwhile); before every step it admits waiting jobs into the free rows, so a request starts at
the next step rather than after the running batch, and it routes each row's Delta to its
request. A request whose reader goes away (a client that disconnects) is cancelled, and its row
leaves the batch before the next step. asyncio only; no Ray (serve/app.py owns the deployment).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from serve.batching import AdmitFailed, Decoder, Delta, Generation


class Scheduler:
    """Admits jobs into a Decoder between its steps and streams each job's Deltas back.

    batch_wait_timeout_s: when the decoder is idle, how long the first request waits for others
    to arrive, so a burst is prefilled in one pass; a running batch admits without waiting.
    """

    def __init__(self, decoder: Decoder, batch_wait_timeout_s: float = 0.0,
                 on_step: Callable[[int, int], None] | None = None):
        self.decoder = decoder
        self.on_step = on_step  # called with (rows decoding, jobs waiting) after every step
        self.step_started: float | None = None  # monotonic time of the step running now
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.waiting: deque[tuple[object, Generation]] = deque()
        self.queues: dict[object, asyncio.Queue] = {}
        self.cancelled: set[object] = set()
        self.batch_sizes: deque[int] = deque(maxlen=256)  # rows of recent steps, for /healthz
        # seconds in all of the steps on the decode thread, and of the gaps between one step
        # and the next while rows were decoding (the event loop's round trip: deltas routed,
        # jobs admitted), for /healthz: a GPU idles through the gaps
        self.step_seconds = self.gap_seconds = 0.0
        self.gaps = 0
        self._ended: float | None = None  # when the last step ended, rows still decoding
        self.steps = self.stepped_rows = 0  # decode steps so far, and their rows in all
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        # One thread for every step, not asyncio's pool: torch's OpenMP keeps a team of worker
        # threads per calling thread, and steps hopping between pool threads leave several
        # teams competing for the cores (measured: 200 vs 140 ms a step, 16 rows, 2 cores).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="decode")

    def warm_up(self) -> float:
        """The decoder's compiled steps, made on the decode thread before the first request
        (CUDA graphs are kept per thread); the seconds it took."""
        return self._thread.submit(self.decoder.warm_up).result()

    async def run(self, job: Generation) -> AsyncIterator[Delta]:
        """The Deltas of one job, as they are decoded; the last has a finish_reason."""
        key, queue = object(), asyncio.Queue()
        self.queues[key] = queue
        self.waiting.append((key, job))
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            del self.queues[key]
            if not finished:
                self.cancelled.add(key)

    async def _loop(self) -> None:
        while True:
            if not self.decoder.rows and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                if self.batch_wait_timeout_s > 0:
                    await asyncio.sleep(self.batch_wait_timeout_s)
            new = self._admit()
            if not self.decoder.rows and not new:
                continue
            keys = [row.key for row in self.decoder.rows] + [key for key, _ in new]
            self.step_started = time.monotonic()
            try:
                deltas = await asyncio.get_running_loop().run_in_executor(
                    self._thread, self._timed_step, new)
            except AdmitFailed as e:  # only the newcomers fail; the running rows go on
                for key in e.keys:
                    if key in self.queues:
                        self.queues[key].put_nowait(e.__cause__)
                deltas = e.deltas
            except Exception as e:  # fail this batch's requests, keep serving the next ones
                self.decoder.reset()
                for key in keys:
                    if key in self.queues:
                        self.queues[key].put_nowait(e)
                continue
            finally:
                self.step_started = None
            if self.on_step is not None:
                self.on_step(len(self.decoder.rows), len(self.waiting))
            self.steps += 1
            self.stepped_rows += len(deltas)
            self.batch_sizes.append(len(deltas))
            for key, delta in deltas:
                if key in self.queues:
                    self.queues[key].put_nowait(delta)

    def _timed_step(self, new: list[tuple[object, Generation]]) -> list[tuple[object, Delta]]:
        """Decoder.step on the decode thread, its time and the gap before it noted."""
        start = time.monotonic()
        if self._ended is not None:
            self.gap_seconds += start - self._ended
            self.gaps += 1
        self._ended = None
        deltas = self.decoder.step(new)
        end = time.monotonic()
        self.step_seconds += end - start
        self._ended = end if self.decoder.rows else None
        return deltas

    def check(self, stuck_after_s: float) -> None:
        """Raise RuntimeError when the decode loop died or one step has run `stuck_after_s`
        seconds (a hung kernel, a deadlock): Serve's health check then replaces the replica."""
        if self._task is not None and self._task.done() and not self._task.cancelled() \
                and self._task.exception() is not None:
            raise RuntimeError(f"the decode loop died: {self._task.exception()!r}")
        started = self.step_started
        if started is not None and time.monotonic() - started > stuck_after_s:
            raise RuntimeError(f"a decode step has run {time.monotonic() - started:.0f} s, "
                               f"over {stuck_after_s} s: the decode thread is stuck")

    def _admit(self) -> list[tuple[object, Generation]]:
        """Drop cancelled rows and jobs, then take waiting jobs into the free rows."""
        cancelled, self.cancelled = self.cancelled, set()
        for key in cancelled:
            self.decoder.cancel(key)
        new = []
        while self.waiting and len(new) < self.decoder.free:
            key, job = self.waiting.popleft()
            if key in self.queues:  # its reader is still there
                new.append((key, job))
        return new
