"""The replica's decode loop: many request coroutines feeding one continuously batched Decoder.

Each request calls `Scheduler.run(job)` and reads its Deltas as they come. The Decoder runs on
one decode thread of its own, which steps for as long as rows are decoding without waiting for
the event loop: between two steps it takes the new jobs and cancellations the event loop sent
it (a thread-safe inbox), admits waiting jobs into the free rows, so a request starts at the
next step rather than after the running batch, and hands each step's Deltas to the event loop
in one call, which routes them to their requests while the next step already runs. On a GPU
the step's launch is then never behind the event loop's work for the last one (routing, SSE
chunks for every client). A request whose reader goes away (a client that disconnects) is
cancelled, and its row leaves the batch before the next step. asyncio and a thread only; no
Ray (serve/app.py owns the deployment).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from serve.batching import AdmitFailed, Decoder, Delta, Generation


class Scheduler:
    """Admits jobs into a Decoder between its steps and streams each job's Deltas back.

    batch_wait_timeout_s: when the decoder is idle, how long the first request waits for others
    to arrive, so a burst is prefilled in one pass; a running batch admits without waiting.
    """

    def __init__(self, decoder: Decoder, batch_wait_timeout_s: float = 0.0,
                 on_step: Callable[[int, int], None] | None = None):
        self.decoder = decoder
        self.on_step = on_step  # called on the event loop with (rows decoding, jobs waiting)
        self.step_started: float | None = None  # monotonic time of the step running now
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.waiting: deque[tuple[object, Generation]] = deque()  # the decode thread's
        self.queues: dict[object, asyncio.Queue] = {}  # the event loop's: one per request
        self.batch_sizes: deque[int] = deque(maxlen=256)  # rows of recent steps, for /healthz
        # seconds in all of the steps, and in the gaps between one step and the next while
        # rows were decoding (the decode thread's own work between steps), for /healthz: a
        # GPU idles through the gaps
        self.step_seconds = self.gap_seconds = 0.0
        self.gaps = 0
        self._ended: float | None = None  # when the last step ended, rows still decoding
        self.steps = self.stepped_rows = 0  # decode steps so far, and their rows in all
        self.died: BaseException | None = None  # what ended the decode thread, if anything
        # ("job", key, job) | ("cancel", key) | ("call", fn, future) | ("stop",)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        # One thread for every step: torch's OpenMP keeps a team of worker threads per calling
        # thread, and steps hopping between threads leave several teams competing for the
        # cores (measured: 200 vs 140 ms a step, 16 rows, 2 cores); CUDA graphs are kept per
        # thread too. A daemon: a replica that exits does not wait for it.
        self._thread = threading.Thread(target=self._decode_thread, name="decode", daemon=True)
        self._thread.start()

    def warm_up(self) -> float:
        """The decoder's compiled steps, made on the decode thread before the first request
        (CUDA graphs are kept per thread); the seconds it took."""
        done: Future = Future()
        self._post(("call", self.decoder.warm_up, done))
        return done.result()

    def close(self) -> None:
        """Stop the decode thread once it has finished the step it is in."""
        self._inbox.put(("stop",))

    async def run(self, job: Generation) -> AsyncIterator[Delta]:
        """The Deltas of one job, as they are decoded; the last has a finish_reason."""
        self._loop = asyncio.get_running_loop()
        key, items = object(), asyncio.Queue()
        self.queues[key] = items
        finished = False
        try:
            self._post(("job", key, job))
            while not finished:
                item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            del self.queues[key]
            if not finished:
                self._inbox.put(("cancel", key))

    def check(self, stuck_after_s: float) -> None:
        """Raise RuntimeError when the decode thread died or one step has run `stuck_after_s`
        seconds (a hung kernel, a deadlock): Serve's health check then replaces the replica."""
        if self.died is not None:
            raise self._death()
        started = self.step_started
        if started is not None and time.monotonic() - started > stuck_after_s:
            raise RuntimeError(f"a decode step has run {time.monotonic() - started:.0f} s, "
                               f"over {stuck_after_s} s: the decode thread is stuck")

    def _post(self, message: tuple) -> None:
        """Send the decode thread a message; raise when it died, so nothing waits on it (a
        message sent before its last drain of the inbox is failed there)."""
        self._inbox.put(message)
        if self.died is not None:
            raise self._death()

    def _death(self) -> RuntimeError:
        return RuntimeError(f"the decode loop died: {self.died!r}")

    # --- on the decode thread ---

    def _decode_thread(self) -> None:
        try:
            while self._take(block=not self.decoder.rows and not self.waiting):
                new = self._admit()
                if self.decoder.rows or new:
                    self._step(new)
        except BaseException as e:  # a bug outside a step's handling: fail every request
            self.died = e  # first: a request sent after the drain below refuses itself
            keys = [row.key for row in self.decoder.rows] + [key for key, _ in self.waiting]
            while True:  # and what was sent already
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if message[0] == "job":
                    keys.append(message[1])
                elif message[0] == "call":
                    message[2].set_exception(self._death())
            self._send([(key, e) for key in keys])

    def _take(self, block: bool) -> bool:
        """Take what the event loop sent: all of it, waiting for the first message when
        `block` (an idle decoder; then batch_wait_timeout_s for company). False: stop."""
        cancelled = set()
        while True:
            try:
                message = self._inbox.get(block=block)
            except queue.Empty:
                break
            if message[0] == "stop":
                return False
            if message[0] == "job":
                self.waiting.append(message[1:])
            elif message[0] == "cancel":
                cancelled.add(message[1])
            else:  # ("call", fn, future): decoder work that must run on this thread
                _, fn, done = message
                try:
                    done.set_result(fn())
                except Exception as e:
                    done.set_exception(e)
            if block and message[0] == "job" and self.batch_wait_timeout_s > 0:
                time.sleep(self.batch_wait_timeout_s)  # a burst is prefilled in one pass
            block = False
        if cancelled:
            for key in cancelled:
                self.decoder.cancel(key)
            self.waiting = deque(w for w in self.waiting if w[0] not in cancelled)
        return True

    def _admit(self) -> list[tuple[object, Generation]]:
        """Waiting jobs into the free rows."""
        return [self.waiting.popleft() for _ in range(min(len(self.waiting), self.decoder.free))]

    def _step(self, new: list[tuple[object, Generation]]) -> None:
        """One Decoder.step, timed, its Deltas (or its failures) sent to the event loop."""
        keys = [row.key for row in self.decoder.rows] + [key for key, _ in new]
        start = self.step_started = time.monotonic()
        if self._ended is not None:
            self.gap_seconds += start - self._ended
            self.gaps += 1
        try:
            out: list = self.decoder.step(new)
        except AdmitFailed as e:  # only the newcomers fail; the running rows go on
            out = e.deltas + [(key, e.__cause__) for key in e.keys]
        except Exception as e:  # fail this batch's requests, keep serving the next ones
            self.decoder.reset()
            self._send([(key, e) for key in keys])
            return
        finally:
            end, self.step_started = time.monotonic(), None
            self.step_seconds += end - start
            self._ended = end if self.decoder.rows else None
        rows = sum(isinstance(item, Delta) for _, item in out)
        self.steps += 1
        self.stepped_rows += rows
        self.batch_sizes.append(rows)
        self._send(out, (len(self.decoder.rows), len(self.waiting)))

    def _send(self, items: list[tuple[object, Delta | BaseException]],
              counts: tuple[int, int] | None = None) -> None:
        """Route `items` to their requests on the event loop, in one call for the step."""
        try:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._route, items, counts)
        except RuntimeError:  # its event loop has closed: nobody reads them
            pass

    # --- on the event loop ---

    def _route(self, items: list[tuple[object, Delta | BaseException]],
               counts: tuple[int, int] | None) -> None:
        if counts is not None and self.on_step is not None:
            self.on_step(*counts)
        for key, item in items:
            if key in self.queues:  # its reader is still there
                self.queues[key].put_nowait(item)
