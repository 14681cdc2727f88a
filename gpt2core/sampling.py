"""Sampling: temperature, top-k and nucleus (top-p) over token ids, batched, with a KV cache.

The engine knows nothing about text: ids in, ids out. Every parameter may differ per row, so
one batch can serve many requests (Ray Serve batches them), and each row may carry its own
seed so its tokens do not depend on which other rows share the batch.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from gpt2core.model import GPT2

PerRow = float | Sequence[float] | torch.Tensor


def _per_row(value, batch: int, device, dtype=torch.float32) -> torch.Tensor:
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
    return draw(logits, _per_row(temperature, B, logits.device),
                _per_row(top_p, B, logits.device), _per_row(top_k, B, logits.device, torch.long),
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


def stream(model: GPT2, input_ids, max_new_tokens: int | Sequence[int], *,
           temperature: PerRow = 1.0, top_p: PerRow = 1.0, top_k: int | Sequence[int] = 0,
           eos_id: int | None = None, seed: int | Sequence[int] | None = None,
           attention_mask: torch.Tensor | None = None, compile: bool = False) -> Iterator:
    """Yield new tokens as they are produced (gpt2core/engine.py decodes them).

    input_ids is one prompt (list of ids or a 1-D tensor) or a batch (B, T) whose shorter
    prompts are left-padded and marked 0 in attention_mask. For one prompt each step yields an
    int; for a batch it yields a list with one id per row, None for rows that have stopped.
    A row stops at eos_id (not yielded) or after its max_new_tokens. seed: an int (row i uses
    seed + i) or one seed per row, each row's tokens then the same whatever else is in the
    batch; None draws random seeds from torch's global RNG. compile: the decode step through
    torch.compile (CUDA graphs on CUDA; compiled once per batch size in a process), the same
    tokens.
    """
    from gpt2core.engine import Engine, Sampling

    ids = torch.as_tensor(input_ids, dtype=torch.long)
    single = ids.dim() == 1
    if single:
        ids = ids.unsqueeze(0)
    B, T = ids.shape
    if T == 0:
        raise ValueError("the prompt is empty; give at least one token (e.g. <|endoftext|>)")
    budget = _per_row(max_new_tokens, B, "cpu", torch.long).tolist()
    if min(budget) < 0:
        raise ValueError("max_new_tokens must be >= 0")
    n_positions = model.config.n_positions
    if T + max(budget) > n_positions:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max(budget)}) exceeds the "
                         f"model's context of {n_positions} tokens; shorten one of them")
    keep = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else \
        torch.as_tensor(attention_mask).reshape(B, T).bool().cpu()
    prompts = [row[k].tolist() for row, k in zip(ids, keep)]  # left padding dropped
    if max(budget) == 0:
        return
    was_training = model.training
    device = next(model.parameters()).device
    # compiled, the cache is the whole context: one shape for every prompt, compiled once
    need = max(len(p) + b for p, b in zip(prompts, budget))
    engine = Engine(model, B, n_positions if compile else need, compile=compile)
    params = Sampling.of(B, device, temperature=temperature, top_p=top_p, top_k=top_k,
                         seed=seed)
    produced, done = [0] * B, [b == 0 for b in budget]
    try:
        nxt, _, _ = engine.admit(range(B), prompts, params)
        while True:
            out = []
            for i, t in enumerate(nxt.tolist()):  # the step's one host sync
                if not done[i] and t == eos_id:
                    done[i] = True
                out.append(None if done[i] else t)
                produced[i] += not done[i]
                done[i] = done[i] or produced[i] >= budget[i]
            if not single:
                yield out
            elif out[0] is not None:  # one prompt: the stream simply ends at eos
                yield out[0]
            if all(done):
                break
            nxt, _ = engine.step(B)
    finally:
        model.train(was_training)


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


def generate(model: GPT2, input_ids, max_new_tokens: int | Sequence[int], *,
             temperature: PerRow = 1.0, top_p: PerRow = 1.0, top_k: int | Sequence[int] = 0,
             eos_id: int | None = None, seed: int | Sequence[int] | None = None,
             attention_mask: torch.Tensor | None = None,
             compile: bool = False) -> list[int] | list[list[int]]:
    """The new token ids: a list for one prompt, a list per row for a batch (see `stream`).

    A row shorter than its max_new_tokens stopped at eos_id (finish reason "stop").
    """
    ids = torch.as_tensor(input_ids)
    single = ids.dim() == 1
    rows: list[list[int]] = [[] for _ in range(1 if single else ids.size(0))]
    for step in stream(model, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                       top_k=top_k, eos_id=eos_id, seed=seed, attention_mask=attention_mask,
                       compile=compile):
        for row, tok in zip(rows, [step] if single else step):
            if tok is not None:
                row.append(tok)
    return rows[0] if single else rows
