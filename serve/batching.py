"""Continuous batching for the server: requests join and leave a running decode batch.

`Decoder` holds the rows being decoded now, one per `Generation` (a prompt with its own sampling
parameters, seed and stop strings), each in a slot of one gpt2core.engine.Engine: a static KV
cache with positions, sampling parameters, penalties and logit_bias per slot on the device.
Each `step` advances every running row by one token in a single forward pass (one host read:
the sampled ids), and admits waiting jobs with one batched prefill into free slots, so a new
request starts at the next step instead of waiting for the running batch to end; a row leaves
the batch the moment it finishes. Every row draws from its own seed's stream
(gpt2core.engine.uniform), so a request's tokens do not depend on what shares its batch, and
equal gpt2core.generate's for the same seed.

Each token is turned back into text per row (gpt2core.detokenize.TextStream), released only
once it can no longer change or turn out to be the start of a stop string.

Pure PyTorch + tokenizer; no Ray, no asyncio (serve/scheduler.py drives it from the replica).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from gpt2core import GPT2, Tokenizer
from gpt2core.detokenize import TextStream
from gpt2core.engine import Engine, Sampling

TOP_LOGPROBS = 5  # most alternatives a token's logprobs list (OpenAI's limit)


@dataclass(frozen=True)
class Generation:
    """One completion to produce: prompt ids and how to sample the continuation."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k: each token's logprob and the k likeliest
    prompt_logprobs: bool = False  # the prompt's tokens too (echo), in the first Delta
    presence_penalty: float = 0.0  # subtracted from a token's logit once it was generated
    frequency_penalty: float = 0.0  # ... times the number of times it was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability under the model (raw logits, before temperature,
    penalties and bias) and the `k` likeliest tokens at its position; None for a first token."""

    id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """New text of one row since its last delta; the last delta has a finish_reason."""

    text: str
    tokens: int  # completion tokens so far
    finish_reason: str | None = None  # "stop" (eos or a stop string) or "length"
    logprobs: tuple[TokenLogprob, ...] = ()  # tokens of this delta (prompt ones first, echo)


class _Row:
    """One job being decoded, in engine slot `slot`: its text and tokens so far."""

    def __init__(self, key: Hashable, job: Generation, tokenizer: Tokenizer, slot: int,
                 prompt_logprobs: tuple[TokenLogprob, ...] = ()):
        self.key, self.job, self.slot = key, job, slot
        self.text = TextStream(tokenizer, job.stop)
        self.generated: list[int] = []  # completion tokens so far
        self.pending = prompt_logprobs  # echo: the prompt's logprobs go out with the first delta

    def advance(self, token: int, eos_id: int, logprob: TokenLogprob | None) -> Delta:
        """Take one sampled token; the Delta has a finish_reason when this row is done."""
        lps, self.pending = self.pending, ()
        if self.job.max_tokens == 0:  # echo only: the prompt was all that was asked for
            return Delta("", 0, "length", lps)
        if token == eos_id:
            return Delta(self.text.finish(), len(self.generated), "stop", lps)
        self.generated.append(token)
        lps += (logprob,) if logprob else ()
        piece = self.text.push(token)
        count = len(self.generated)
        if self.text.stopped or count >= self.job.max_tokens:
            reason = "stop" if self.text.stopped else "length"
            return Delta(piece + self.text.finish(), count, reason, lps)
        return Delta(piece, count, None, lps)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, k: int
                   ) -> list[TokenLogprob]:
    """TokenLogprobs of `ids` (N,) under `logits` (N, V), each with the k likeliest tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist()
    top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], ids[:, None][:, :0])
    return [TokenLogprob(t, lp, tuple(zip(ti, tv)))
            for t, lp, ti, tv in zip(ids.tolist(), chosen, top_i.tolist(), top_v.tolist())]


class AdmitFailed(Exception):
    """Admitting new jobs failed: those jobs (`keys`) fail, the running rows go on; `deltas`
    are the running rows' tokens of the step, already decoded."""

    def __init__(self, keys: list[Hashable], deltas: list[tuple[Hashable, Delta]]):
        super().__init__(f"admitting {len(keys)} job(s) failed")
        self.keys, self.deltas = keys, deltas


class Decoder:
    """Continuous batching, synchronous: the rows decoding now, advanced one step at a time.

    `step(new)` advances every running row by one token (one forward pass over all of them),
    then admits `new` jobs (one prefill into free slots; their first token) and returns one
    Delta per row that produced a token, keyed by the caller's key. A row's last Delta has a
    finish_reason and the row is gone from the batch after it. A step that fails is not the
    rows' end: they go on in a new engine, each prefilled again with what it had generated
    (`_rebuild`); only when that fails too does `step` raise. Not thread-safe: one caller.
    `compile`: the engine's step through torch.compile, CUDA graphs on CUDA (one per batch
    size, powers of two: the step then runs over a few free slots too); `warm_up` makes them
    before the first request.
    """

    def __init__(self, model: GPT2, tokenizer: Tokenizer, max_rows: int, *,
                 compile: bool = False):
        self.model, self.tokenizer, self.max_rows = model.eval(), tokenizer, max_rows
        self.device = next(model.parameters()).device
        self.compile = compile
        self.reset()

    def reset(self) -> None:
        """Forget every row (after an error, say): a new engine, the same compiled steps."""
        self.engine = Engine(self.model, self.max_rows, self.model.config.n_positions,
                             compile=self.compile)
        self.rows: list[_Row] = []  # in slot order

    def warm_up(self) -> float:
        """Compile every batch size's step now (Engine.warm_up); the seconds it took."""
        return self.engine.warm_up()

    @property
    def free(self) -> int:
        """How many more jobs fit in the batch now."""
        return self.max_rows - len(self.rows)

    def cancel(self, key: Hashable) -> None:
        """Drop the row of `key` (its client went away); no-op when it already finished."""
        self._drop({key})

    def _drop(self, keys: set) -> None:
        """Rows of `keys` leave the batch; their slots are free for the next admission."""
        for row in self.rows:
            if row.key in keys:
                self.engine.release(row.slot)
        self.rows = [r for r in self.rows if r.key not in keys]

    @torch.inference_mode()
    def step(self, new: Sequence[tuple[Hashable, Generation]] = ()) -> list[tuple[Hashable, Delta]]:
        """One token for every running row, then admit `new` (at most `free` of them)."""
        if len(new) > self.free:
            raise ValueError(f"{len(new)} new jobs but room for {self.free}")
        out = []
        if self.rows:
            try:
                ids, logits = self.engine.step(self.rows[-1].slot + 1)
                at = [r.slot for r in self.rows]
            except Exception:  # rebuilt once; a failure of that is the caller's
                ids, logits = self._rebuild()
                at = list(range(len(self.rows)))
            out += self._deliver(self.rows, ids, logits, at)
        if new:
            try:
                out += self._admit(new)
            except Exception as e:  # a bad newcomer (OOM in its prefill, say) fails alone
                keys = {key for key, _ in new}
                self._drop(keys)
                raise AdmitFailed(list(keys), out) from e
        return out

    def _rebuild(self) -> tuple[torch.Tensor, torch.Tensor]:
        """After a failed step (a fault in a CUDA graph, say): a new engine, each row prefilled
        again with its prompt and the tokens it generated, into its slot; their next tokens
        and logits, in row order, as the failed step would have sampled them."""
        rows = self.rows
        self.reset()
        self.rows = rows
        jobs = [r.job for r in rows]
        ids, logits, _ = self.engine.admit(
            [r.slot for r in rows], [r.job.prompt_ids + r.generated for r in rows],
            self._sampling(jobs), [j.logit_bias for j in jobs], [r.generated for r in rows])
        return ids, logits

    def _sampling(self, jobs: Sequence[Generation]) -> Sampling:
        return Sampling.of(len(jobs), self.device, temperature=[j.temperature for j in jobs],
                           top_p=[j.top_p for j in jobs], seed=[j.seed for j in jobs],
                           presence=[j.presence_penalty for j in jobs],
                           frequency=[j.frequency_penalty for j in jobs])

    def _admit(self, new: Sequence[tuple[Hashable, Generation]]) -> list[tuple[Hashable, Delta]]:
        used = {r.slot for r in self.rows}
        slots = [s for s in range(self.max_rows) if s not in used][:len(new)]
        jobs = [job for _, job in new]
        ids, logits, h = self.engine.admit(slots, [j.prompt_ids for j in jobs],
                                           self._sampling(jobs), [j.logit_bias for j in jobs])
        rows = [_Row(key, job, self.tokenizer, slot,
                     self._prompt_logprobs(h[i], job) if job.prompt_logprobs else ())
                for i, ((key, job), slot) in enumerate(zip(new, slots))]
        self.rows = sorted(self.rows + rows, key=lambda r: r.slot)
        return self._deliver(rows, ids, logits, list(range(len(rows))))

    def _prompt_logprobs(self, h: torch.Tensor, job: Generation) -> tuple[TokenLogprob, ...]:
        """The prompt's tokens scored by the prefill's hidden states h (T, C), right-padded."""
        ids = job.prompt_ids
        first = TokenLogprob(ids[0], None)  # nothing before it to condition on
        if len(ids) == 1:
            return (first,)
        logits = h[:len(ids) - 1] @ self.engine.head  # (p - 1, V): next-token
        rest = token_logprobs(logits, torch.tensor(ids[1:], device=h.device), job.logprobs or 0)
        return (first, *rest)

    def _deliver(self, rows: Sequence[_Row], ids: torch.Tensor, logits: torch.Tensor,
                 at: list[int]) -> list[tuple[Hashable, Delta]]:
        """Each row's token (ids[at[i]]), its logprobs when asked, its Delta; rows that
        finished leave the batch (their slots are free for the next admission)."""
        tokens = ids.tolist()  # the step's one host read
        want = [i for i, r in enumerate(rows) if r.job.logprobs is not None]
        lps: list[TokenLogprob | None] = [None] * len(rows)
        if want:
            k = max(rows[i].job.logprobs for i in want)
            index = [at[i] for i in want]
            for i, lp in zip(want, token_logprobs(logits[index], ids[index], k)):
                lps[i] = TokenLogprob(lp.id, lp.logprob, lp.top[:rows[i].job.logprobs])
        out, done = [], set()
        for i, row in enumerate(rows):
            delta = row.advance(tokens[at[i]], self.tokenizer.eos_id, lps[i])
            out.append((row.key, delta))
            if delta.finish_reason:
                done.add(row.key)
        self._drop(done)
        return out
