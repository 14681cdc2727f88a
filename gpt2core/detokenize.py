"""Token ids back into text as they are generated, one token at a time.

Byte-level BPE can split one UTF-8 character across tokens, and a stop string can arrive over
several tokens, so `TextStream` releases text only once it can no longer change or turn out to
be the start of a stop string. The server (a row per request) and `gpt2 generate` (printing
as it goes) both use it.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpt2core.tokenizer import Tokenizer


class TextStream:
    """Token ids in, text out, holding back what may still change.

    E.g. with stop=("\\n\\n",), after tokens decoding to "Hi\\n" only "Hi" is released: the
    "\\n" may be the start of a stop string. A character whose UTF-8 bytes have not all come
    waits for the next token (bytes that are not UTF-8 at all show as U+FFFD at once).

    Decoding is incremental, as vLLM and TGI do it: each push decodes the new tokens beside
    the ones decoded last (their context: a WordPiece space, say), a few tokens whatever the
    length of the text, so a step's host work does not grow with the rows' lengths.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the text of ids[:read], final
        self.context = self.read = 0  # ids[context:read]: the tokens decoded last
        self.emitted = 0  # chars of the text already released
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final (maybe ""). Sets .stopped."""
        self.ids.append(token_id)
        new = self._decoded()
        waiting = new.endswith("\ufffd") and self._decoded(partial=True) != new
        if new and not waiting:  # a character whose bytes have not all come waits
            self.text += new
            self.context, self.read = self.read, len(self.ids)
        for s in self.stop:  # released text never holds the start of a stop string
            at = self.text.find(s, self.emitted)
            if at >= 0:
                self.stopped = True
                return self._release(at)
        end = len(self.text) - self.hold
        return self._release(end) if end > self.emitted else ""

    def finish(self, partial: bool = False) -> str:
        """The rest of the text, once no token will follow. partial: the ids were cut short
        (Tokenizer.decode's partial), so a character they end inside is left out instead of
        shown as U+FFFD."""
        if self.stopped:
            return ""
        self.text += self._decoded(partial=partial)
        return self._release(len(self.text))

    def _decoded(self, partial: bool = False) -> str:
        """The text of ids[read:], decoded beside ids[context:read] (Tokenizer.decode's
        partial: without a character the ids end inside)."""
        before = self.tokenizer.decode(self.ids[self.context:self.read])
        return self.tokenizer.decode(self.ids[self.context:], partial=partial)[len(before):]

    def _release(self, end: int) -> str:
        piece = self.text[self.emitted:end]
        self.emitted += len(piece)
        return piece
