"""The decode engine: a static KV cache, a prefill and a one-token step, sampling on the device.

Read like gpt-fast's generate.py: positions are passed in explicitly and never advanced inside
the model; the cache is allocated once at its full shape (rows x max_len); the step's tensors
keep their shapes from one step to the next, so on CUDA it can be captured once and replayed
as a graph; every row's sampling parameters and seed live in device tensors; a step's only
host sync is the copy of its B sampled ids, which the caller reads (eos, lengths, text).

Random numbers are counter-based: row r's uniform at its step t is a hash of (seed_r, t)
(SplitMix64), computed for the whole batch in a few integer ops. A seeded row thus draws the
same numbers whatever else shares its batch, on any device, with no generator state.

    engine = Engine(model, rows=B, max_len=T + n)
    ids, _, _ = engine.admit(range(B), prompts, Sampling.of(B, device, top_p=0.9, seed=0))
    for t in range(1, n):
        ids, _ = engine.step(B)                      # slots [0, B): positions kept inside
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt2core.errors import UserError
from gpt2core.model import GPT2, KVCache
from gpt2core.sampling import decode_head, draw

_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685
# = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB as int64 (SplitMix64's constants)
RECOMPILE_LIMIT = 64  # compiled steps dynamo keeps for the engine, all shapes


def _shr(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: it copies the sign bit)."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer: int64 products wrap modulo 2**64 as its unsigned ones do."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def uniform(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Float32 uniforms in [0, 1), one per element: draw number `counter` of seed's stream.

    The stream of a seed is SplitMix64 started from a state hashed from the seed, so nearby
    seeds give unrelated streams; e.g. seed 7's draws at counters 0, 1, 2 are the same numbers
    whether computed one at a time or in a batch beside other seeds. The top 24 bits make the
    float, so it is exact and below 1.
    """
    z = _mix(_mix(seed.long() * _GOLDEN) + (counter.long() + 1) * _GOLDEN)
    return _shr(z, 40).float() * (1.0 / (1 << 24))


@dataclass
class Sampling:
    """Per-row sampling parameters as device tensors (B,): set when a row is admitted, never
    rebuilt per step. temperature 0 = argmax; top_p 1 and top_k 0 = off; seed: the row's
    random stream; presence and frequency: OpenAI's penalties on the row's own tokens."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    seed: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor

    @classmethod
    def of(cls, rows: int, device, *, temperature=1.0, top_p=1.0, top_k=0,
           seed: int | Sequence[int] | None = None, presence=0.0, frequency=0.0) -> Sampling:
        """From scalars or one value per row; seed int s gives row i the seed s + i, None a
        random one per row (from torch's global generator)."""
        def per_row(value, dtype):
            t = torch.as_tensor(value, dtype=dtype, device=device)
            return t.expand(rows).clone() if t.dim() == 0 else t

        if seed is None:
            seeds = torch.randint(0, 2**62, (rows,), device=device)
        elif isinstance(seed, int):
            seeds = torch.arange(rows, device=device) + seed
        else:
            seeds = per_row(list(seed), torch.long)
        return cls(per_row(temperature, torch.float32), per_row(top_p, torch.float32),
                   per_row(top_k, torch.long), seeds, per_row(presence, torch.float32),
                   per_row(frequency, torch.float32))

    @property
    def penalized(self) -> torch.Tensor:
        return (self.presence != 0) | (self.frequency != 0)

    def at(self, rows: torch.Tensor | slice) -> Sampling:
        """Rows `rows` (an index, or a slice: views, no copy)."""
        return Sampling(*(t[rows] for t in vars(self).values()))

    def put(self, index: torch.Tensor, other: Sampling) -> None:
        """Rows `index` (n,) take `other`'s n rows."""
        for name, t in vars(self).items():
            t[index] = getattr(other, name)


def sample(logits: torch.Tensor, params: Sampling, counter: torch.Tensor,
           shortcut: bool | None = None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): gpt2core.sampling.draw with each row's uniform drawn
    at its `counter` (B,) from its seed's stream."""
    return draw(logits, params.temperature, params.top_p, params.top_k,
                uniform(params.seed, counter), shortcut=shortcut)


class Engine:
    """Decoding slots: one static KV cache of `rows` x `max_len`, and each slot's position,
    step counter, last token and sampling parameters, all on the device.

    `admit` prefills prompts (any lengths <= max_len, right-padded, each from position 0) into
    the slots given, and samples their first tokens; `step(n)` feeds slots [0, n) their last
    token at their next position and samples the next: one forward pass whose shapes depend
    on n (and, eager, on the longest slot) only. A free slot inside [0, n) decodes garbage
    that nobody reads. Penalties and logit_bias (dense (rows, V) tensors) are applied before
    sampling, on the device. `shortcut` as gpt2core.sampling.draw takes it. Returns of both:
    the sampled ids (n,) and the raw logits (n, V) they came from (for logprobs), valid until
    the next call.

    With `compile=True` the step goes through torch.compile (on CUDA with mode
    "reduce-overhead": a CUDA graph, replayed; it then attends to all max_len columns) and
    gives the eager step's tokens. It runs at the smallest of `sizes` (powers of two, and
    `rows`) that holds n, so the slots up to that size step too and must be free. That is
    two compilations (one row; then the batch size dynamic, as torch.compile makes a size
    that changes) and a CUDA graph per size, captured in milliseconds; nothing else makes it
    compile again (the penalty and bias tensors exist from the start). `warm_up` does it all
    before the first row, so no row waits on a compile.
    """

    def __init__(self, model: GPT2, rows: int, max_len: int, *, compile: bool = False,
                 shortcut: bool | None = None):
        p = next(model.parameters())
        self.model, self.device = model.eval(), p.device
        # int8 weights keep a float32 cache (gpt2core/quant.py)
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        self.cache = KVCache(model.config, rows, max_len, device=self.device, dtype=dtype)
        self.pos = torch.zeros(rows, dtype=torch.long, device=self.device)  # next position
        self.counter = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.last = torch.zeros(rows, dtype=torch.long, device=self.device)  # next input
        self.params = Sampling.of(rows, self.device, seed=0)
        self.ends = [0] * rows  # self.pos on the host (known without reading the device)
        self.live = [False] * rows  # slots holding a row someone reads (admit to release)
        self.counts: torch.Tensor | None = None  # (rows, V) tokens sampled, for penalties
        self.bias: torch.Tensor | None = None  # (rows, V) logit_bias
        self.shortcut = shortcut  # draw's CPU shortcuts; False: a GPU's sync-free step on CPU
        self.head = decode_head(model)  # (C, V); the weights do not change while decoding
        self.compiled = compile
        self._step = self._eager_step
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._step = torch.compile(self._eager_step, mode=mode, fullgraph=True,
                                       dynamic=None)
            vocab = self.head.size(1)
            self.counts = torch.zeros(rows, vocab, device=self.device)
            self.bias = torch.zeros(rows, vocab, device=self.device)
            self._static(self.cache.k, self.cache.v, self.cache.cols, self.cache.rows,
                         self.pos, self.counter, self.last, self.counts, self.bias,
                         *vars(self.params).values())
            # dynamo keeps 8 graphs per function by default, and under fullgraph the 9th
            # fails the call (FailOnRecompileLimitHit): every engine shape in the process
            # (rows, max_len, dtype) adds its own
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)

    def _static(self, *tensors: torch.Tensor) -> None:
        """The step's state keeps its address from one call to the next: a CUDA graph reads
        and writes it in place (cudagraphs would otherwise copy, or skip, mutated inputs)."""
        if self.compiled:
            for t in tensors:
                torch._dynamo.mark_static_address(t)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def rows(self) -> int:
        return len(self.ends)

    @property
    def sizes(self) -> list[int]:
        """The batch sizes a compiled step runs at: the powers of two below `rows`, and rows."""
        return [1 << i for i in range((self.rows - 1).bit_length())] + [self.rows]

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile (on CUDA also capture) the step at every size before the first row is
        admitted, on the thread that will step (CUDA graphs are kept per thread); returns the
        seconds it took. The free slots it steps hold garbage that `admit` overwrites."""
        if not self.compiled:
            return 0.0
        if any(self.live):
            raise ValueError("warm_up steps every slot: call it before admitting a row")
        start = time.perf_counter()
        for n in self.sizes:
            for _ in range(3):  # compile; cudagraph trees then warm up, record and replay
                self._step(n, self.max_len)[0].tolist()
        return time.perf_counter() - start

    @torch.inference_mode()
    def admit(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], params: Sampling,
              bias: Sequence[Sequence[tuple[int, float]]] = (),
              generated: Sequence[Sequence[int]] = ()
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill `prompts` into `slots` and sample their first tokens with `params` (one row
        each) and `bias` ((token, added logit) pairs per row). Returns (ids (n,), raw logits
        (n, V), the prompts' hidden states (n, T, C), right-padded).

        `generated`: per row, the tokens it had sampled already, which end its prompt (a row
        taken up again in a new engine): its random stream and penalties go on from there, so
        it samples what the old engine's next step would have."""
        n, lengths = len(prompts), [len(p) for p in prompts]
        T = max(lengths)
        if min(lengths) == 0:
            raise UserError("a prompt is empty; give at least one token (e.g. <|endoftext|>)")
        if T > self.max_len:
            raise ValueError(f"a prompt of {T} tokens exceeds the cache's {self.max_len}")
        ids = torch.zeros(n, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
        ids, index = ids.to(self.device), torch.as_tensor(list(slots), device=self.device)
        prefill = KVCache(self.model.config, n, T, device=self.device, dtype=self.cache.k.dtype)
        h = self.model.hidden_states(ids, kv_cache=prefill,
                                     input_pos=prefill.cols.expand(n, T))  # (n, T, C)
        self.cache.k[:, index, :, :T] = prefill.k
        self.cache.v[:, index, :, :T] = prefill.v
        last = torch.as_tensor(lengths, device=self.device) - 1
        done = [len(g) for g in generated] or [0] * n
        self.pos[index] = last + 1
        self.counter[index] = torch.as_tensor(done, device=self.device)
        for slot, length in zip(slots, lengths):
            self.ends[slot], self.live[slot] = length, True
        self.params.put(index, params)
        if self.counts is None and bool(params.penalized.any()):  # at admission, not a step
            self.counts = torch.zeros(self.rows, self.head.size(1), device=self.device)
            self._static(self.counts)
        if self.counts is not None:
            self.counts[index] = 0
            for row, tokens in zip(slots, generated):
                self.counts[row].index_add_(0, torch.as_tensor(tokens, device=self.device),
                                            torch.ones(len(tokens), device=self.device))
        if self.bias is None and any(bias):
            self.bias = torch.zeros(self.rows, self.head.size(1), device=self.device)
            self._static(self.bias)
        if self.bias is not None:
            self.bias[index] = 0
            for row, pairs in zip(slots, bias):
                if pairs:
                    tokens, added = zip(*pairs)
                    self.bias[row, list(tokens)] += torch.tensor(added, device=self.device)
        logits = h[torch.arange(n, device=self.device), last] @ self.head  # (n, V)
        return self._sample(logits, index), logits, h

    def release(self, slot: int) -> None:
        """Nobody reads `slot` any more: its length no longer sizes a step's attention."""
        self.live[slot] = False

    @torch.inference_mode()
    def step(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token of slots [0, n) (n,), and the raw logits (n, V) it came from."""
        run = min(s for s in self.sizes if s >= n) if self.compiled else n
        if any(self.live[n:run]):
            raise ValueError(f"slots [{n}, {run}) hold rows, but a compiled step of {n} rows "
                             f"also steps them (it runs {run}); keep rows packed from slot 0")
        longest = max((e for e, live in zip(self.ends[:n], self.live) if live), default=0)
        span = self.max_len if self.compiled else min(self.max_len, longest + 1)
        ids, logits = self._step(run, span)
        self.ends[:run] = [min(e + 1, self.max_len - 1) for e in self.ends[:run]]
        return ids[:n], logits[:n]

    def _eager_step(self, n: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.span = span
        pos = self.pos[:n].clamp(max=self.max_len - 1)  # a finished row may run past its end
        h = self.model.hidden_states(self.last[:n].unsqueeze(1), kv_cache=self.cache,
                                     input_pos=pos.unsqueeze(1))  # (n, 1, C)
        self.pos[:n] += 1
        self.counter[:n] += 1
        logits = h[:, -1] @ self.head  # (n, V)
        return self._sample(logits, slice(0, n)), logits

    def _sample(self, logits: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        """Penalties and bias, then draw, for `rows` of the slots; their last tokens updated."""
        params = self.params.at(rows)
        adjusted = logits
        if self.counts is not None:  # OpenAI's formula, on the row's own sampled tokens
            counts = self.counts[rows]
            adjusted = adjusted - params.frequency.unsqueeze(-1) * counts \
                - params.presence.unsqueeze(-1) * (counts > 0)
        if self.bias is not None:
            adjusted = adjusted + self.bias[rows]
        ids = sample(adjusted, params, self.counter[rows], self.shortcut)
        self.last[rows] = ids
        if self.counts is not None:
            self.counts[rows] = self.counts[rows].scatter_add(
                1, ids.unsqueeze(-1), torch.ones_like(ids, dtype=self.counts.dtype).unsqueeze(-1))
        return ids
