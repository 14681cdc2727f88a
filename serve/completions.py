"""From an OpenAI completions request to Jobs, and from decoded tokens back to its JSON.

What the handler in serve/app.py does between validating a body and encoding the answer:
prompts of any of OpenAI's four shapes -> token ids, `logit_bias` -> (id, bias) pairs, and
TokenLogprobs -> OpenAI's `logprobs` object (tokens, token_logprobs, top_logprobs,
text_offset). No Ray, no FastAPI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gpt2core import Tokenizer
from serve.batching import Delta, TokenLogprob
from serve.openai import APIError, Prompt


@dataclass
class PromptIds:
    """One prompt: its text (what echo prepends) and its token ids."""

    text: str
    ids: list[int]


def prompts(tokenizer: Tokenizer, prompt: Prompt) -> list[PromptIds]:
    """Each prompt of a str, list[str], list[int] or list[list[int]] body; 400 when empty
    or holding a token id outside the vocabulary."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif not prompt:
        raise APIError(400, "prompt is an empty list; give a string, a list of strings or "
                       "token ids", param="prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]  # one prompt as token ids
    else:
        items = list(prompt)
    out = []
    for i, item in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt {i}"
        if isinstance(item, str):
            # an empty prompt starts from <|endoftext|>, as GPT-2 was trained to
            out.append(PromptIds(item, tokenizer.encode(item) or [tokenizer.eos_id]))
            continue
        if not item:
            raise APIError(400, f"{where} is an empty token list; give at least one token id",
                           param="prompt")
        bad = [t for t in item if t >= tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"{where} has token id {bad[0]}, outside the model's "
                           f"vocabulary of {tokenizer.vocab_size}", param="prompt")
        out.append(PromptIds(tokenizer.decode(item), list(item)))
    return out


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """{"50256": -100} -> ((50256, -100.0),); 400 for a key that is not a token id."""
    out = []
    for key, value in (bias or {}).items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise APIError(400, f"logit_bias key {key!r:.40} is not a token id of this model "
                           f"(0 to {vocab_size - 1})", param="logit_bias")
        out.append((int(key), value))
    return tuple(out)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (the inverse of its bytes_to_unicode)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # 188 printable bytes map to themselves
    return {chr(c): b for b, c in zip(bs, cs)}


BYTES = _byte_decoder()


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as OpenAI shows it: its text, or `bytes:\\xe2\\x80` for a piece of a UTF-8
    character (so two such tokens never share a key in top_logprobs)."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    raw = tokenizer.backend.id_to_token(token_id) or ""
    if not raw or any(c not in BYTES for c in raw):
        return text
    return "bytes:" + "".join(f"\\x{BYTES[c]:02x}" for c in raw)


class LogprobsText:
    """OpenAI's `logprobs` object of one choice, built piece by piece (a stream sends one per
    chunk). text_offset counts characters of the prompt + completion text: from 0 with echo,
    from the prompt's length without."""

    def __init__(self, tokenizer: Tokenizer, offset: int):
        self.tokenizer, self.offset, self.ids = tokenizer, offset, []

    def render(self, entries: Sequence[TokenLogprob]) -> dict:
        tok = self.tokenizer
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            out["text_offset"].append(self.offset + len(tok.decode(self.ids)))
            self.ids.append(e.id)
            out["tokens"].append(token_text(tok, e.id))
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append(
                None if e.logprob is None else {token_text(tok, i): lp for i, lp in e.top})
        return out


@dataclass
class Finished:
    """All of one job: its text, last delta, tokens with logprobs, seconds to its first one."""

    text: str = ""
    last: Delta | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    first_s: float | None = None

    def cumulative(self, prompt_tokens: int) -> float:
        """Sum of the completion tokens' logprobs: best_of's ranking."""
        return sum(e.logprob or 0.0 for e in self.logprobs[prompt_tokens:])
