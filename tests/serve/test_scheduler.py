"""serve/scheduler.py without Ray: joining a running batch, disconnects, errors."""

import asyncio

import pytest
import torch

from gpt2core import GPT2, GPT2Config, Tokenizer
from serve.batching import Decoder, Generation
from serve.scheduler import Scheduler


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["ROMEO: What light through yonder window breaks?"], vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=tok.vocab_size, n_positions=128, n_embd=32, n_layer=2,
                           n_head=2)).eval()


async def collect(scheduler: Scheduler, job: Generation) -> tuple[str, str, int]:
    text, last = "", None
    async for last in scheduler.run(job):
        text += last.text
    return text, last.finish_reason, last.tokens


def test_a_late_request_joins_the_running_batch(tok, model):
    async def main():
        s = Scheduler(Decoder(model, tok, 4))
        long = asyncio.create_task(collect(s, Generation(tok.encode("ROMEO:"), 100, seed=1)))
        while s.steps < 10:  # the first request is well under way
            await asyncio.sleep(0.001)
        late = await collect(s, Generation(tok.encode("What"), 5, seed=2))
        assert not long.done(), "the late request waited for the running one to end"
        first = await long
        alone = await collect(Scheduler(Decoder(model, tok, 4)), Generation(tok.encode("What"), 5,
                                                                        seed=2))
        return s, first, late, alone

    s, first, late, alone = asyncio.run(main())
    assert first[1:] == ("length", 100) and late[1:] == ("length", 5)
    assert late == alone  # same seed, same text, batched or not
    assert 2 in s.batch_sizes and s.steps < 105  # shared steps, not 100 + 5
    assert s.decoder.rows == []
    # every step timed; a gap before each step that found rows still decoding, none after
    # the last one: the two requests ran ~100 steps back to back
    assert s.step_seconds > 0 and s.steps - 3 <= s.gaps < s.steps and s.gap_seconds > 0
    assert s._ended is None


def test_the_decode_thread_steps_on_while_the_event_loop_is_busy(tok, model):
    """The next step does not wait for the event loop to route the last one's Deltas (on a
    GPU it would idle meanwhile): with the loop blocked, the rows still advance."""
    import time

    async def main():
        s = Scheduler(Decoder(model, tok, 2))
        task = asyncio.create_task(collect(s, Generation(tok.encode("ROMEO:"), 120, seed=1)))
        while s.steps < 3:
            await asyncio.sleep(0.001)
        before = s.steps
        time.sleep(0.5)  # the event loop busy (blocked): nothing routed meanwhile
        during = s.steps - before
        text = await task
        return during, text

    during, text = asyncio.run(main())
    assert during >= 10, during  # a step of this model takes ~1 ms
    assert text[1:] == ("length", 120)


def test_a_reader_that_goes_away_frees_its_row(tok, model):
    async def main():
        s = Scheduler(Decoder(model, tok, 2))
        stream = s.run(Generation(tok.encode("ROMEO:"), 100, seed=1))
        await anext(stream)
        await stream.aclose()  # the client disconnected
        text = await collect(s, Generation(tok.encode("What"), 3, seed=2))
        return s, text

    s, text = asyncio.run(main())
    assert text[1:] == ("length", 3)
    # the row left the batch long before its 100 tokens (the decode thread runs on meanwhile)
    assert s.steps < 50 and s.decoder.rows == [] and not s.queues


def test_a_failing_step_fails_its_requests_and_the_next_ones_work(tok, model):
    async def main():
        s = Scheduler(Decoder(model, tok, 2))
        real = s.decoder.step

        def broken(new):
            s.decoder.step = real  # fail once
            raise RuntimeError("out of memory")

        s.decoder.step = broken
        with pytest.raises(RuntimeError, match="out of memory"):
            await collect(s, Generation(tok.encode("ROMEO:"), 5, seed=1))
        return await collect(s, Generation(tok.encode("ROMEO:"), 5, seed=1))

    assert asyncio.run(main())[1:] == ("length", 5)


def test_a_newcomer_that_fails_to_admit_fails_alone_and_the_running_row_goes_on(tok, model):
    async def main():
        s = Scheduler(Decoder(model, tok, 4))
        running = asyncio.create_task(collect(s, Generation(tok.encode("ROMEO:"), 40, seed=1)))
        while s.steps < 5:
            await asyncio.sleep(0.001)
        real = s.decoder.engine.admit

        def broken(*args, **kwargs):  # the newcomer's prefill fails, once (an OOM, say)
            s.decoder.engine.admit = real
            raise RuntimeError("CUDA out of memory")

        s.decoder.engine.admit = broken
        with pytest.raises(RuntimeError, match="out of memory"):
            await collect(s, Generation(tok.encode("What"), 5, seed=2))
        after = await collect(s, Generation(tok.encode("What"), 5, seed=2))
        alone = await collect(Scheduler(Decoder(model, tok, 4)),
                              Generation(tok.encode("ROMEO:"), 40, seed=1))
        return await running, after, alone

    running, after, alone = asyncio.run(main())
    assert running == alone  # not failed, not reset: every token as if alone
    assert after[1:] == ("length", 5)


class _Blocking(Decoder):
    """A real Decoder whose step waits for `release` first: a stuck decode thread."""

    def __init__(self, *args):
        super().__init__(*args)
        import threading

        self.release = threading.Event()

    def step(self, new=()):
        self.release.wait(30)
        return super().step(new)


def test_check_fails_while_a_step_is_stuck_and_recovers(tok, model):
    async def main():
        decoder = _Blocking(model, tok, 2)
        s = Scheduler(decoder)
        s.check(stuck_after_s=0.05)  # idle: healthy
        task = asyncio.create_task(collect(s, Generation(tok.encode("ROMEO:"), 3, seed=1)))
        await asyncio.sleep(0.3)
        with pytest.raises(RuntimeError, match="stuck"):
            s.check(stuck_after_s=0.05)
        decoder.release.set()
        await task
        s.check(stuck_after_s=0.05)

    asyncio.run(main())


def test_check_fails_when_the_decode_loop_died_and_its_requests_fail(tok, model):
    async def main():
        s = Scheduler(Decoder(model, tok, 2))

        def broken():  # the thread's admission fails outside a step's error handling
            raise KeyError("a bug")

        s._admit = broken
        with pytest.raises(KeyError, match="a bug"):  # the request fails, it does not hang
            await asyncio.wait_for(collect(s, Generation(tok.encode("ROMEO:"), 3, seed=1)), 30)
        with pytest.raises(RuntimeError, match="decode loop died"):
            s.check(stuck_after_s=60)
        with pytest.raises(RuntimeError, match="decode loop died"):  # at once, not a hang
            await asyncio.wait_for(collect(s, Generation(tok.encode("What"), 3, seed=2)), 30)
        with pytest.raises(RuntimeError, match="decode loop died"):
            s.warm_up()  # nobody would answer it

    asyncio.run(main())


def test_close_stops_the_decode_thread(tok, model):
    s = Scheduler(Decoder(model, tok, 2))
    assert s._thread.is_alive()
    s.close()
    s._thread.join(timeout=10)
    assert not s._thread.is_alive() and s.died is None
