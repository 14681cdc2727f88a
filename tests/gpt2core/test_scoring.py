"""gpt2core/scoring.py: windows cover every target once; score equals a direct mean NLL."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2core import GPT2, GPT2Config
from gpt2core.scoring import score, windows


def test_windows_score_every_target_once_with_enough_context():
    for n in range(2, 40):
        for window in (1, 4, 7, 16):
            for stride in range(1, window + 1):
                scored = []
                for begin, end, first in windows(n, window, stride):
                    assert end - begin <= window and first >= 0
                    targets = list(range(begin + 1 + first, end + 1))
                    # context of a scored target: the window's inputs before it
                    assert all(t - begin >= min(t, window - stride + 1) for t in targets)
                    scored += targets
                assert scored == list(range(1, n)), (n, window, stride)
    assert windows(10, 4, 2) == [(0, 4, 0), (2, 6, 2), (4, 8, 2), (6, 9, 2)]


def test_score_equals_a_direct_forward_and_windows_count_every_target_once():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    seqs = [np.random.default_rng(i).integers(0, 50, n).astype(np.int32)
            for i, n in enumerate([5, 9, 2])]
    nats, right = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            ids = torch.from_numpy(s.astype(np.int64))
            logits = model(ids[None, :-1])[0]
            nats += F.cross_entropy(logits, ids[1:], reduction="sum").item()
            right += int((logits.argmax(-1) == ids[1:]).sum())
    targets = sum(len(s) - 1 for s in seqs)
    for window, stride in [(64, 64), (8, 3)]:  # every sequence fits one window
        sums = score(model, seqs, window=window, stride=stride, batch=2, device="cpu")
        assert (sums["count"], sums["windows"], sums["correct"]) == (targets, 3, right)
        assert sums["nats"] == pytest.approx(nats, rel=1e-5)
    # windows of 4 every 2: more windows, each target still scored once (with less context)
    sums = score(model, seqs, window=4, stride=2, batch=3, device="cpu")
    assert sums["count"] == targets
    assert sums["windows"] == sum(len(windows(len(s), 4, 2)) for s in seqs) > 3
