"""Incremental detokenization with stop strings, for streaming text out of generated token ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# What a byte-level or SentencePiece decoder yields for an incomplete UTF-8 sequence.
_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class TextStream:
    """Turns a growing list of token ids into text deltas, stopping at the first stop string.

    Text that might be the start of a stop string, or an incomplete multi-byte character, is held
    back until the next token settles it, so a client never sees text that is later retracted.
    """

    def __init__(
        self, decoder: Decoder, stop: Sequence[str] = (), prefix: Sequence[int] = ()
    ) -> None:
        self._decoder = decoder
        self._stop = [s for s in stop if s]
        # The last prompt tokens, decoded in front of the new ones: SentencePiece drops the space
        # of a leading "▁" piece, which is only right at the very start of a text.
        self._prefix = list(prefix)
        self._prefix_text = decoder.decode(self._prefix)
        self._ids: list[int] = []
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        text = self._decoder.decode(self._prefix + self._ids)
        if text.startswith(self._prefix_text):
            return text[len(self._prefix_text) :]
        return self._decoder.decode(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final. Sets `stopped` at a stop string."""
        self._ids.append(token_id)
        text = self.text
        for stop in self._stop:
            found = text.find(stop, max(0, self._emitted - len(stop) + 1))
            if found != -1:
                self.stopped = True
                return self._take(text[:found])
        settled = len(text)
        while settled > self._emitted and text[settled - 1] == _REPLACEMENT_CHAR:
            settled -= 1
        for stop in self._stop:
            settled = min(settled, _start_of_partial_match(text, stop, self._emitted))
        return self._take(text[:settled])

    def flush(self) -> str:
        """At the end of generation (not at a stop string): release everything held back."""
        return "" if self.stopped else self._take(self.text)

    def _take(self, text: str) -> str:
        delta = text[self._emitted :]
        self._emitted = max(self._emitted, len(text))
        return delta


def _start_of_partial_match(text: str, stop: str, floor: int) -> int:
    """Index where a proper prefix of `stop` ends `text` (len(text) when none does)."""
    for length in range(min(len(stop) - 1, len(text) - floor), 0, -1):
        if text.endswith(stop[:length]):
            return len(text) - length
    return len(text)
