"""Sampling: temperature, top-k and nucleus (top-p) over a batch of logits, one token per row.

Every parameter may differ per row, so one batch can serve many requests (Ray Serve batches
them), and each row may carry its own seed so its tokens do not depend on which other rows share
the batch. The decode engine (gpt2core/engine.py) samples with `draw`; `generate` and `stream`
(gpt2core/generation.py) run the engine for a prompt or a batch of them.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch

from gpt2core.model import GPT2

PerRow = float | Sequence[float] | torch.Tensor


def per_row(value, batch: int, device, dtype=torch.float32) -> torch.Tensor:
    """A scalar or one value per row -> a (B,) tensor."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    return t.expand(batch).clone() if t.dim() == 0 else t


def nucleus_prefix(sorted_probs: torch.Tensor, top_p: torch.Tensor,
                   top_k: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, V) over probabilities sorted descending: the kept prefix of each row.

    Nucleus = the smallest set of tokens whose probability sums to >= top_p: keep a token while
    the mass *before* it is still below top_p. E.g. probs [0.5, 0.3, 0.15, 0.05] with top_p 0.8
    keeps [0.5, 0.3] (0.5 < 0.8, then 0.8 is reached); with top_p 0.81 it also keeps 0.15. The
    top token is always kept (even for a top_p that underflows to 0). top_k (0 = off) first
    cuts the row to k tokens, and the nucleus is taken of that renormalised distribution (as
    in transformers).
    """
    B, V = sorted_probs.shape
    cum = sorted_probs.cumsum(dim=-1)
    rank = torch.arange(V, device=sorted_probs.device)
    k = torch.full((B,), V, device=sorted_probs.device) if top_k is None else \
        torch.where(top_k > 0, top_k.clamp(max=V), V)
    top_k_mass = cum.gather(-1, (k - 1).unsqueeze(-1))  # (B, 1)
    # The top token is kept outright rather than by `0 < top_p * mass`: a top_p that is
    # positive in float64 (5e-324) can be 0 in float32, and an empty nucleus has no threshold.
    below = (cum - sorted_probs < top_p.unsqueeze(-1) * top_k_mass) | (rank == 0)
    return (rank < k.unsqueeze(-1)) & below


def sorted_descending(probs: torch.Tensor) -> torch.Tensor:
    """Each row's probabilities (B, V) in descending order: values only, no token ids.

    On CPU numpy's vectorised sort of float32 values is ~5x faster than torch.sort, which also
    carries the indices (6.6 vs 35 ms for 16 rows of GPT-2's 50k vocabulary here); in a batched
    decoding step the sort was otherwise as costly as the LM head.
    """
    if probs.device.type != "cpu" or torch.compiler.is_compiling():
        return probs.sort(dim=-1, descending=True).values
    return torch.from_numpy(np.sort(probs.float().numpy(), axis=-1)[..., ::-1].copy())


def keep_threshold(probs: torch.Tensor, top_p: torch.Tensor,
                   top_k: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1): the smallest probability each row keeps; the nucleus (and top-k) is p >= it.

    Ties with the last kept token are kept too (a sorted cut would keep some of them only).
    """
    sorted_probs = sorted_descending(probs)
    kept = nucleus_prefix(sorted_probs, top_p, top_k).sum(dim=-1, keepdim=True)  # >= 1
    return sorted_probs.gather(-1, kept - 1)


def nucleus_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Boolean (B, V) in vocabulary order: the tokens of each row's nucleus."""
    return probs >= keep_threshold(probs, top_p)


def sample(logits: torch.Tensor, *, temperature: PerRow = 1.0, top_k: int | Sequence[int] = 0,
           top_p: PerRow = 1.0,
           generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V). temperature 0 = argmax; top_k 0 / top_p 1 = off.

    `generator` is one torch.Generator for the batch, or one per row (then row i draws only
    from generator i, so its tokens are the same whatever else is in the batch). The decode
    engine draws its uniforms from counters instead (gpt2core/engine.py); both sample by `draw`.
    """
    B = logits.size(0)
    return draw(logits, per_row(temperature, B, logits.device),
                per_row(top_p, B, logits.device), per_row(top_k, B, logits.device, torch.long),
                _uniform(B, generator, logits.device))


def draw(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
         top_k: torch.Tensor, u: torch.Tensor, *, shortcut: bool | None = None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V), per-row parameters (B,) and one uniform u (B,) per row.

    On a GPU and under torch.compile nothing here reads a value on the host (no sync: every
    row is filtered and sampled, greedy ones replaced by their argmax at the end); on a CPU,
    where reading a value costs no sync, an all-greedy batch skips the softmax and an
    unfiltered one the sort (`shortcut`, default: on a CPU, not compiling).
    """
    logits = logits.float()
    greedy = temperature == 0
    if shortcut is None:
        shortcut = logits.device.type == "cpu" and not torch.compiler.is_compiling()
    if shortcut and bool(greedy.all()):
        return logits.argmax(dim=-1)
    # the row's max subtracted first: a tiny temperature (1e-40) then sends every other logit
    # to -inf and the max to 0, where logits / t alone overflow to inf and softmax gives NaN
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(shifted / torch.where(greedy, 1.0, temperature).unsqueeze(-1), dim=-1)
    filtered = (top_p < 1) | (top_k > 0)
    if not shortcut or bool(filtered.any()):
        keep = (probs >= keep_threshold(probs, top_p, top_k)) | ~filtered.unsqueeze(-1)
        probs = probs * keep
    # Inverse-CDF sampling: one uniform per row, found in the cumulative distribution, in
    # vocabulary order -- an order that does not depend on the other rows, so a seeded request
    # never changes with its batch. Exact, and cheaper than torch.multinomial over 50k tokens.
    cdf = probs.cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1]
    u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # u < total
    # the first token with cdf > u: never a filtered one, whose cdf equals its predecessor's
    sampled = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


def _uniform(batch: int, generator, device) -> torch.Tensor:
    """(B,) uniforms in [0, 1): from one generator, or row i from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(batch, generator=generator, device=device)
    return torch.stack([torch.rand((), generator=g, device=device) for g in generator])


_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_head(model: GPT2) -> torch.Tensor:
    """The LM head as a (C, V) matrix for decoding.

    On CPU, one row times a row-major (C, V) matrix runs ~1.7x faster than F.linear's (V, C)
    layout (measured for GPT-2's 768 x 50257 head; bench/bench_model.py), so a contiguous copy
    is kept per model and remade only when the weights change (their version counter moves).
    Elsewhere the transposed view is as fast and costs no memory.
    """
    w = model.lm_head.weight
    if w.device.type != "cpu":
        return w.t()
    key = (w.data_ptr(), w._version)
    cached = _HEADS.get(model)
    if cached is None or cached[0] != key:
        cached = (key, w.detach().t().contiguous())
        _HEADS[model] = cached
    return cached[1]
