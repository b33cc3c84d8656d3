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

    Each token costs a decode of a short window of recent ids, not of the whole sequence (the
    prefix/read offsets of vLLM and TGI): ids from `_prefix_offset` are decoded, and the text past
    that of the settled ids before `_read_offset` is new once it ends in a whole character.
    """

    def __init__(
        self, decoder: Decoder, stop: Sequence[str] = (), prefix: Sequence[int] = ()
    ) -> None:
        self._decoder = decoder
        self._stop = [s for s in stop if s]
        # The window starts with the last prompt tokens: SentencePiece drops the space of a
        # leading "▁" piece, which is only right at the very start of a text.
        self._ids = list(prefix)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._settled_text = decoder.decode(self._ids)
        # Decoded text not yet sent, behind enough sent text for a stop string to start in.
        self._text = ""
        self._emitted = 0
        self._lookback = max((len(s) for s in self._stop), default=1) - 1
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final. Sets `stopped` at a stop string."""
        self._ids.append(token_id)
        unread = self._unread_text()
        if unread and not unread.endswith(_REPLACEMENT_CHAR):
            self._text += unread
            unread = ""
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._settled_text = self._decoder.decode(
                self._ids[self._prefix_offset : self._read_offset]
            )
        # Unsettled text is held back, but a stop string in it (even of "\ufffd"s) still stops.
        text = self._text + unread
        for stop in self._stop:
            found = text.find(stop, max(0, self._emitted - len(stop) + 1))
            if found != -1:
                self.stopped = True
                return self._take(text[:found])
        settled = len(self._text)
        for stop in self._stop:
            settled = min(settled, _start_of_partial_match(text, stop, self._emitted))
        return self._take(text[:settled])

    def flush(self) -> str:
        """At the end of generation (not at a stop string): release everything held back."""
        if self.stopped:
            return ""
        self._text += self._unread_text()
        return self._take(self._text)

    def _unread_text(self) -> str:
        return self._decoder.decode(self._ids[self._prefix_offset :])[len(self._settled_text) :]

    def _take(self, text: str) -> str:
        delta = text[self._emitted :]
        self._emitted = max(self._emitted, len(text))
        # Sent text matters only as the start of a stop string that ends in later text.
        drop = max(0, self._emitted - self._lookback)
        self._text = self._text[drop:]
        self._emitted -= drop
        return delta


def _start_of_partial_match(text: str, stop: str, floor: int) -> int:
    """Index where a proper prefix of `stop` ends `text` (len(text) when none does)."""
    for length in range(min(len(stop) - 1, len(text) - floor), 0, -1):
        if text.endswith(stop[:length]):
            return len(text) - length
    return len(text)


def token_text(decoder: Decoder, token: int) -> str:
    """One token's own text, as logprobs show it: a SentencePiece piece with its "▁" as a space
    and a byte piece ("<0x0A>") as that byte's character when it is one on its own."""
    piece = getattr(decoder, "piece", None)
    if piece is None:
        return decoder.decode([token])
    text = piece(token)
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        value = int(text[3:5], 16)
        return chr(value) if value < 0x80 else text
    return text.replace("\u2581", " ")
