"""Sliding-window scoring: every target of a long sequence scored once, with enough context.

A sequence longer than the window is scored in windows that start every `stride` tokens; each
window scores only the targets no earlier window did, so every token is scored exactly once and,
past the first window, with at least window - stride tokens of context (the method of Hugging
Face's perplexity guide). pipelines/evaluate.py runs `score` in Ray Data actors.

    sums = score(model, [ids_a, ids_b], window=1024, stride=512, batch=8, device="cpu")
    loss = sums["nats"] / sums["count"]
"""

from __future__ import annotations

import numpy as np
import torch

from gpt2core.model import GPT2
from gpt2core.training import IGNORE, autocast


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of n tokens whose targets are tokens 1..n-1: (begin, end, first).

    Inputs are ids[begin:end], targets ids[begin+1:end+1]; only targets from index `first` of
    the window on are scored, the earlier ones having been scored by the window before.
    E.g. n=10, window 4, stride 2: (0,4,0) scores 1-4, (2,6,2) 5-6, (4,8,2) 7-8, (6,9,2) 9.
    """
    out, scored, begin = [], 0, 0  # scored: index of the last target scored so far
    while scored < n - 1:
        end = min(begin + window, n - 1)
        out.append((begin, end, scored - begin))
        scored, begin = end, begin + stride
    return out


def score(model: GPT2, sequences: list[np.ndarray], *, window: int, stride: int, batch: int,
          device, dtype=None) -> dict[str, float]:
    """Sum of target nats, correct argmax guesses, targets and windows over the sequences."""
    pieces = [(ids, b, e, first) for ids in sequences
              for b, e, first in windows(len(ids), window, stride)]
    nats = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(pieces), batch):
            part = pieces[i:i + batch]
            T = max(e - b for _, b, e, _ in part)  # pad to the longest window of this batch
            inputs = torch.zeros((len(part), T), dtype=torch.long)
            targets = torch.full((len(part), T), IGNORE, dtype=torch.long)
            for row, (ids, b, e, first) in enumerate(part):
                inputs[row, :e - b] = torch.from_numpy(ids[b:e].astype(np.int64))
                targets[row, first:e - b] = torch.from_numpy(ids[b + 1 + first:e + 1]
                                                             .astype(np.int64))
            inputs, targets = inputs.to(device), targets.to(device)
            valid = targets != IGNORE
            with autocast(torch.device(device), dtype):
                h = model.hidden_states(inputs)[valid]  # (N, C): scored positions only
                logits = model.lm_head(h).float()  # (N, V)
            goal = targets[valid]
            lse = torch.logsumexp(logits, dim=-1)
            nats += (lse - logits.gather(-1, goal.unsqueeze(-1)).squeeze(-1)).double().sum()
            correct += (logits.argmax(dim=-1) == goal).sum()
            count += int(goal.numel())
    return {"nats": nats.item(), "correct": int(correct.item()), "count": count,
            "windows": len(pieces)}
