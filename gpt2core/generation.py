"""generate and stream: new tokens for a prompt or a batch of prompts, on the decode engine.

Ids in, ids out: the engine (gpt2core/engine.py) knows nothing about text. Every sampling
parameter may differ per row, and a seeded row's tokens do not depend on the other rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from gpt2core.engine import Engine, Sampling
from gpt2core.errors import UserError
from gpt2core.model import GPT2
from gpt2core.sampling import PerRow, per_row


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

    ids = torch.as_tensor(input_ids, dtype=torch.long)
    single = ids.dim() == 1
    if single:
        ids = ids.unsqueeze(0)
    B, T = ids.shape
    if T == 0:
        raise UserError("the prompt is empty; give at least one token (e.g. <|endoftext|>)")
    budget = per_row(max_new_tokens, B, "cpu", torch.long).tolist()
    if min(budget) < 0:
        raise UserError("max_new_tokens must be >= 0")
    n_positions = model.config.n_positions
    if T + max(budget) > n_positions:
        raise UserError(f"prompt ({T} tokens) + max_new_tokens ({max(budget)}) exceeds the "
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
