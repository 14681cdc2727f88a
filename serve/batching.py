"""Batched decoding for the server: many requests, one `gpt2core.stream` call, text out per row.

A batch of `Job`s (one prompt each, with its own sampling parameters, seed and stop strings) is
left-padded into one (B, T) tensor and decoded by a single `stream(...)` call with per-row
parameters and per-row seeds, so a request's tokens do not depend on what shares its batch.
Each step is turned back into text per row (`TextStream`): byte-level BPE can split one UTF-8
character across tokens, and a stop string can arrive over several tokens, so text is released
only once it can no longer change or turn out to be the start of a stop string.

Pure PyTorch + tokenizer; no Ray. `serve/app.py` feeds it from `@serve.batch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from gpt2core import GPT2, Tokenizer, stream


@dataclass(frozen=True)
class Job:
    """One completion to produce: prompt ids and how to sample the continuation."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delta:
    """New text of one row since its last delta; the last delta has a finish_reason."""

    text: str
    tokens: int  # completion tokens so far
    finish_reason: str | None = None  # "stop" (eos or a stop string) or "length"


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


def decode_batch(model: GPT2, tokenizer: Tokenizer, jobs: Sequence[Job]
                 ) -> Iterator[list[Delta | None]]:
    """Decode jobs together; yield per step one entry per job: its Delta, or None once done.

    Every job gets exactly one Delta with a finish_reason, its last. A row that hit a stop
    string keeps its slot in the batch until the batch ends (gpt2core cannot drop a row), but
    its tokens are discarded; the batch stops early once every row is finished.
    """
    device = next(model.parameters()).device
    ids, mask = left_pad([j.prompt_ids for j in jobs], tokenizer.eos_id)
    texts = [TextStream(tokenizer, j.stop) for j in jobs]
    counts = [0] * len(jobs)
    done = [False] * len(jobs)
    # per-row seeds: gpt2core draws each row from its own generator, so a request's text does
    # not depend on what else is in the batch
    steps = stream(model, ids.to(device), [j.max_tokens for j in jobs],
                   temperature=[j.temperature for j in jobs], top_p=[j.top_p for j in jobs],
                   eos_id=tokenizer.eos_id,
                   seed=[j.seed for j in jobs], attention_mask=mask.to(device))
    try:
        for step in steps:
            out: list[Delta | None] = []
            for i, (job, tok) in enumerate(zip(jobs, step)):
                if done[i]:
                    out.append(None)
                elif tok is None:  # eos: gpt2core stopped this row
                    done[i] = True
                    out.append(Delta(texts[i].finish(), counts[i], "stop"))
                else:
                    counts[i] += 1
                    piece = texts[i].push(tok)
                    if texts[i].stopped or counts[i] >= job.max_tokens:
                        done[i] = True
                        reason = "stop" if texts[i].stopped else "length"
                        out.append(Delta(piece + texts[i].finish(), counts[i], reason))
                    else:
                        out.append(Delta(piece, counts[i]))
            yield out
            if all(done):
                return
        # the stream ended without a last word for some row (it cannot, but never leave one open)
        tail = [None if d else Delta(texts[i].finish(), counts[i], "length")
                for i, d in enumerate(done)]
        if any(t is not None for t in tail):
            yield tail
    finally:
        steps.close()
