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
    ids = engine.prefill(prompts, params)            # (B,) first new token of each row
    for t in range(1, n):
        ids = engine.step(ids, params)               # (B,), positions kept by the engine
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt2core.model import GPT2, KVCache
from gpt2core.sampling import decode_head, draw

_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685
# = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB as int64 (SplitMix64's constants)


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
    """Per-row sampling parameters as device tensors (B,): built once per batch, not per step.
    temperature 0 = argmax; top_p 1 and top_k 0 = off; seed: the row's random stream."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    seed: torch.Tensor

    @classmethod
    def of(cls, rows: int, device, *, temperature=1.0, top_p=1.0, top_k=0,
           seed: int | Sequence[int] | None = None) -> Sampling:
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
                   per_row(top_k, torch.long), seeds)


def sample(logits: torch.Tensor, params: Sampling, counter: torch.Tensor,
           shortcut: bool | None = None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): gpt2core.sampling.draw with each row's uniform drawn
    at its `counter` (B,) from its seed's stream."""
    return draw(logits, params.temperature, params.top_p, params.top_k,
                uniform(params.seed, counter), shortcut=shortcut)


class Engine:
    """One static KV cache of `rows` x `max_len` and the two passes that fill it.

    `prefill` runs the prompts (of any lengths <= max_len) through the model, right-padded,
    each row from position 0, and samples each row's first token; `step` feeds one token per
    row at the row's next position and samples the next. Positions and the per-row step
    counter stay on the device; `shortcut` as gpt2core.sampling.draw takes it. `compile=True`
    runs the step through torch.compile (on CUDA with mode "reduce-overhead": CUDA graphs);
    its tokens equal the eager step's.
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
        self.shortcut = shortcut  # draw's CPU shortcuts; False: a GPU's sync-free step on CPU
        self.head = decode_head(model)  # (C, V); the weights do not change while decoding
        self._step = self._eager_step
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._step = torch.compile(self._eager_step, mode=mode, fullgraph=True,
                                       dynamic=False)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], params: Sampling) -> torch.Tensor:
        """The first new token of each prompt (B,); the prompts' keys and values cached."""
        B, lengths = len(prompts), [len(p) for p in prompts]
        T = max(lengths)
        if min(lengths) == 0:
            raise ValueError("a prompt is empty; give at least one token (e.g. <|endoftext|>)")
        if T > self.max_len:
            raise ValueError(f"a prompt of {T} tokens exceeds the cache's {self.max_len}")
        ids = torch.zeros(B, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        pos = torch.arange(T, device=self.device).expand(B, T)
        h = self.model.hidden_states(ids, kv_cache=self.cache, input_pos=pos)  # (B, T, C)
        last = torch.as_tensor(lengths, device=self.device) - 1
        self.pos[:B] = last + 1
        self.counter[:B] = 0
        logits = h[torch.arange(B, device=self.device), last] @ self.head
        return sample(logits, params, self.counter[:B], self.shortcut)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, params: Sampling) -> torch.Tensor:
        """The next token (B,) of each row after `tokens` (B,), the rows' last ones."""
        return self._step(tokens, params)

    def _eager_step(self, tokens: torch.Tensor, params: Sampling) -> torch.Tensor:
        B = tokens.size(0)
        pos = self.pos[:B].clamp(max=self.max_len - 1)  # a finished row may run past its end
        h = self.model.hidden_states(tokens.unsqueeze(1), kv_cache=self.cache,
                                     input_pos=pos.unsqueeze(1))  # (B, 1, C)
        self.pos[:B] += 1
        self.counter[:B] += 1
        return sample(h[:, -1] @ self.head, params, self.counter[:B], self.shortcut)
