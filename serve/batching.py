"""Continuous batching for the server: requests join and leave a running decode batch.

`Decoder` holds the rows being decoded now, one per `Job` (a prompt with its own sampling
parameters, seed and stop strings), in one KV cache (`SlotCache`). Each `step` advances every
row by one token in a single forward pass, and admits waiting jobs with one batched prefill, so
a new request starts at the next step instead of waiting for the running batch to end; a row
leaves the batch the moment it finishes. Every row draws from its own seed's stream
(gpt2core.engine.uniform), so a request's tokens do not depend on what shares its batch, and
equal gpt2core.generate's for the same seed.

Each token is turned back into text per row (`TextStream`): byte-level BPE can split one UTF-8
character across tokens, and a stop string can arrive over several tokens, so text is released
only once it can no longer change or turn out to be the start of a stop string.

Pure PyTorch + tokenizer; no Ray, no asyncio (serve/scheduler.py drives it from the replica).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from gpt2core import GPT2, Tokenizer
from gpt2core.config import GPT2Config
from gpt2core.engine import Sampling, sample
from gpt2core.model import KVCache
from gpt2core.sampling import decode_head

TOP_LOGPROBS = 5  # most alternatives a token's logprobs list (OpenAI's limit)


@dataclass(frozen=True)
class Job:
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


class TextStream:
    """Token ids in, text out, holding back what may still change.

    E.g. with stop=("\\n\\n",), after tokens decoding to "Hi\\n" only "Hi" is released: the
    "\\n" may be the start of the stop string. A trailing U+FFFD is an incomplete UTF-8
    character whose remaining bytes come with the next token, so it is held back too.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0  # chars of the decoded text already released
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final (maybe ""). Sets .stopped."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:  # released text never holds the start of a stop string
            at = text.find(s, self.emitted)
            if at >= 0:
                self.stopped = True
                return self._release(text, at)
        end = len(text.rstrip("\ufffd")) - self.hold
        return self._release(text, end) if end > self.emitted else ""

    def finish(self) -> str:
        """The rest of the text, once no token will follow."""
        return "" if self.stopped else self._release(self.tokenizer.decode(self.ids))

    def _release(self, text: str, end: int | None = None) -> str:
        piece = text[self.emitted:end]
        self.emitted += len(piece)
        return piece


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, shorter rows padded on the left (mask 0 there)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids, mask



class SlotCache:
    """The KV cache of a batch whose rows come and go (a `gpt2core.model.DecodeCache`).

    k, v are (n_layer, max_rows, nh, max_len, hs). Rows [0, rows) are the requests decoding
    now. Every row ends at column `length` (which the model advances after each forward pass),
    where its next token's keys and values go; its prompt and tokens so far sit right-aligned
    before that, and `mask` marks them. A row that joined late is thus left-padded like a short
    prompt in a static batch, and the model (which reads `length` and calls `update`) needs
    nothing new. Columns no row uses any more are dropped when room runs out, so a row never
    needs more than its own length: at most n_positions. Capacity starts at `capacity` columns
    and doubles as needed.
    """

    def __init__(self, config: GPT2Config, max_rows: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, capacity: int = 128):
        self.n_positions = config.n_positions
        shape = (config.n_layer, max_rows, config.n_head, min(capacity, config.n_positions),
                 config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.mask = torch.zeros(max_rows, shape[3], dtype=torch.bool, device=device)
        self.length = 0
        self.rows = 0

    @property
    def max_len(self) -> int:
        """Columns allocated now."""
        return self.k.size(3)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, input_pos=None):
        """Write the active rows' (rows, nh, T, hs) keys/values at `length`; return all so far.
        (Positions are the model's to keep here: input_pos is always None.)"""
        end = self.length + k.size(2)
        self.k[layer, :self.rows, :, self.length:end] = k
        self.v[layer, :self.rows, :, self.length:end] = v
        return self.k[layer, :self.rows, :, :end], self.v[layer, :self.rows, :, :end]

    def next_mask(self) -> torch.Tensor:
        """The attention mask (rows, length + 1) for one more token per row, making room for it."""
        if self.length == self.max_len:
            used = self.mask[:self.rows, :self.length].any(dim=0)
            self._shift(-int(used.int().argmax()))  # drop the leading columns no row uses
            self._grow(self.length + 1)
        self.mask[:self.rows, self.length] = True
        return self.mask[:self.rows, :self.length + 1]

    def add(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> None:
        """Append prefilled rows: k, v (n_layer, n, nh, T, hs) and their mask (n, T)."""
        n, T = mask.shape
        if self.rows + n > self.k.size(1):
            raise ValueError(f"{self.rows} + {n} rows exceed the cache's {self.k.size(1)}")
        if T > self.length:
            self._shift(T - self.length)  # the newcomer is longer: pad everyone on the left
        r, end = self.rows, self.length
        self.k[:, r:r + n, :, end - T:end] = k[:, :, :, :T]
        self.v[:, r:r + n, :, end - T:end] = v[:, :, :, :T]
        self.mask[r:r + n, :end] = False
        self.mask[r:r + n, end - T:end] = mask.bool()
        self.rows += n

    def remove(self, i: int) -> None:
        """Drop row i: the last row moves into its place (callers reorder their rows alike)."""
        last = self.rows - 1
        if i != last:
            for t in (self.k, self.v):
                t[:, i, :, :self.length] = t[:, last, :, :self.length]
            self.mask[i, :self.length] = self.mask[last, :self.length]
        self.rows = last
        if self.rows == 0:
            self.length = 0

    def _shift(self, d: int) -> None:
        """Move every row's columns by d (right if d > 0, padding on the left; left if d < 0)."""
        if d == 0:
            return
        self._grow(self.length + d)
        src, dst = slice(max(0, -d), self.length), slice(max(0, d), self.length + d)
        for t in (self.k, self.v):
            t[:, :self.rows, :, dst] = t[:, :self.rows, :, src].clone()
        self.mask[:self.rows, dst] = self.mask[:self.rows, src].clone()
        if d > 0:
            self.mask[:self.rows, :d] = False
        self.length += d

    def _grow(self, need: int) -> None:
        """At least `need` columns: double the capacity (up to n_positions), keeping the content."""
        if need <= self.max_len:
            return
        if need > self.n_positions:
            raise ValueError(f"{need} cached positions exceed n_positions={self.n_positions}")
        cap = min(self.n_positions, max(need, 2 * self.max_len))
        k, v, mask = self.k, self.v, self.mask
        self.k = k.new_zeros(k.shape[:3] + (cap, k.size(4)))
        self.v = v.new_zeros(self.k.shape)
        self.mask = mask.new_zeros(mask.size(0), cap)
        r, n = self.rows, self.length  # only the active rows hold anything
        self.k[:, :r, :, :n] = k[:, :r, :, :n]
        self.v[:, :r, :, :n] = v[:, :r, :, :n]
        self.mask[:r, :n] = mask[:r, :n]


class _Row:
    """One job being decoded: its text so far and the token to feed next (its seed's stream is
    drawn at the number of tokens it has sampled: gpt2core.engine.uniform)."""

    def __init__(self, key: Hashable, job: Job, tokenizer: Tokenizer, device,
                 prompt_logprobs: tuple[TokenLogprob, ...] = ()):
        self.key, self.job = key, job
        self.text = TextStream(tokenizer, job.stop)
        self.generated: list[int] = []  # completion tokens so far (for the penalties)
        self.token = -1  # the last sampled token: the next step's input
        self.pending = prompt_logprobs  # echo: the prompt's logprobs go out with the first delta

    def advance(self, token: int, eos_id: int, logprob: TokenLogprob | None) -> Delta:
        """Take one sampled token; the Delta has a finish_reason when this row is done."""
        lps, self.pending = self.pending, ()
        if self.job.max_tokens == 0:  # echo only: the prompt was all that was asked for
            return Delta("", 0, "length", lps)
        if token == eos_id:
            return Delta(self.text.finish(), len(self.generated), "stop", lps)
        self.generated.append(token)
        self.token = token
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


def adjust_logits(logits: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
    """OpenAI's logit_bias and presence/frequency penalties, per row: logits (n, V) for
    sampling. Penalties count the row's own completion tokens so far."""
    if not any(r.job.logit_bias or r.job.presence_penalty or r.job.frequency_penalty
               for r in rows):
        return logits
    logits = logits.clone()
    V = logits.size(-1)
    for i, row in enumerate(rows):
        job = row.job
        if job.logit_bias:
            ids, bias = zip(*job.logit_bias)
            logits[i, list(ids)] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
        if (job.presence_penalty or job.frequency_penalty) and row.generated:
            counts = torch.bincount(torch.tensor(row.generated, device=logits.device),
                                    minlength=V)[:V].to(logits.dtype)
            logits[i] -= job.frequency_penalty * counts + job.presence_penalty * (counts > 0)
    return logits


class Decoder:
    """Continuous batching, synchronous: the rows decoding now, advanced one step at a time.

    `step(new)` advances every running row by one token (one forward pass over all of them),
    then admits `new` jobs (one left-padded prefill; their first token) and returns one Delta
    per row that produced a token, keyed by the caller's key. A row's last Delta has a
    finish_reason and the row is gone from the batch after it. Not thread-safe: one caller.
    """

    def __init__(self, model: GPT2, tokenizer: Tokenizer, max_rows: int):
        self.model, self.tokenizer, self.max_rows = model.eval(), tokenizer, max_rows
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.reset()

    def reset(self) -> None:
        """Forget every row (after an error, say)."""
        self.cache = SlotCache(self.model.config, self.max_rows, self.device, self.dtype)
        self.rows: list[_Row] = []

    @property
    def free(self) -> int:
        """How many more jobs fit in the batch now."""
        return self.max_rows - len(self.rows)

    def cancel(self, key: Hashable) -> None:
        """Drop the row of `key` (its client went away); no-op when it already finished."""
        for i, row in enumerate(self.rows):
            if row.key == key:
                self._remove(i)
                return

    @torch.inference_mode()
    def step(self, new: Sequence[tuple[Hashable, Job]] = ()) -> list[tuple[Hashable, Delta]]:
        """One token for every running row, then admit `new` (at most `free` of them)."""
        if len(new) > self.free:
            raise ValueError(f"{len(new)} new jobs but room for {self.free}")
        out = []
        if self.rows:
            ids = torch.tensor([[r.token] for r in self.rows], device=self.device)
            h = self.model.hidden_states(ids, attention_mask=self.cache.next_mask(),
                                         kv_cache=self.cache)
            out += self._sample(h[:, -1], 0)
        if new:
            out += self._admit(new)
        return out

    def _admit(self, new: Sequence[tuple[Hashable, Job]]) -> list[tuple[Hashable, Delta]]:
        ids, mask = left_pad([job.prompt_ids for _, job in new], self.tokenizer.eos_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        prefill = KVCache(self.model.config, len(new), ids.size(1), self.device, self.dtype)
        h = self.model.hidden_states(ids, attention_mask=mask, kv_cache=prefill)
        self.cache.add(prefill.k, prefill.v, mask)
        first = len(self.rows)
        self.rows += [_Row(key, job, self.tokenizer, self.device,
                           self._prompt_logprobs(h[i], job) if job.prompt_logprobs else ())
                      for i, (key, job) in enumerate(new)]
        return self._sample(h[:, -1], first)

    def _prompt_logprobs(self, h: torch.Tensor, job: Job) -> tuple[TokenLogprob, ...]:
        """The prompt's tokens scored by the prefill's hidden states h (T, C), left-padded."""
        ids, T = job.prompt_ids, h.size(0)
        first = TokenLogprob(ids[0], None)  # nothing before it to condition on
        if len(ids) == 1:
            return (first,)
        logits = h[T - len(ids):T - 1] @ decode_head(self.model)  # (p - 1, V): next-token
        rest = token_logprobs(logits, torch.tensor(ids[1:], device=h.device), job.logprobs or 0)
        return (first, *rest)

    def _sample(self, h: torch.Tensor, first: int) -> list[tuple[Hashable, Delta]]:
        """Sample rows[first:] from their last hidden states (n, C); retire finished rows."""
        rows = self.rows[first:]
        logits = h @ decode_head(self.model)  # (n, V)
        params = Sampling.of(len(rows), self.device, temperature=[r.job.temperature for r in rows],
                             top_p=[r.job.top_p for r in rows], seed=[r.job.seed for r in rows])
        drawn = torch.tensor([len(r.generated) for r in rows], device=self.device)
        tokens = sample(adjust_logits(logits, rows), params, drawn)
        want = [i for i, r in enumerate(rows) if r.job.logprobs is not None]
        lps: list[TokenLogprob | None] = [None] * len(rows)
        if want:
            k = max(rows[i].job.logprobs for i in want)
            for i, lp in zip(want, token_logprobs(logits[want], tokens[want], k)):
                lps[i] = TokenLogprob(lp.id, lp.logprob, lp.top[:rows[i].job.logprobs])
        out, done = [], []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            delta = row.advance(token, self.tokenizer.eos_id, lps[i])
            out.append((row.key, delta))
            if delta.finish_reason:
                done.append(first + i)
        for i in reversed(done):  # highest first: a moved-in last row is never one still to go
            self._remove(i)
        return out

    def _remove(self, i: int) -> None:
        self.cache.remove(i)
        last = self.rows.pop()
        if i < len(self.rows):
            self.rows[i] = last
