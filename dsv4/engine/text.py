"""Token ids -> text while generating: incremental detokenisation and stop strings.

Text is released only when it is final: never half of a multi-byte character (the decoder gives U+FFFD
until the character is complete), never a tail that could still grow into a stop string (the stop string
itself is not part of the output, as in the OpenAI API).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already accounted for
        self._read = 0
        self.text = ""  # everything decoded so far (may run past a stop string)
        self.sent = 0  # characters of `text` released
        self.stopped = False  # a stop string was found; `text[:sent]` is the final output
        self.matched: str | None = None  # which one

    def add(self, token: int) -> str:
        """Feed one generated token; returns the newly released text."""
        self.ids.append(token)
        before = self.decode(self.ids[self._prefix:self._read])
        after = self.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: release what is held back (an incomplete character stays as U+FFFD)."""
        if self._read < len(self.ids):
            before = self.decode(self.ids[self._prefix:self._read])
            self.text += self.decode(self.ids[self._prefix:])[len(before):]
            self._prefix = self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.sent - longest + 1)
        hits = [(i, s) for i, s in ((self.text.find(s, start), s) for s in self.stop) if i >= 0]
        if hits:
            end, self.matched = min(hits)
            self.stopped = True
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - _held_back(self.text, self.stop, self.sent)
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    @property
    def output(self) -> str:
        return self.text[:self.sent]


def _held_back(text: str, stops: tuple[str, ...], sent: int) -> int:
    """Length of the longest tail of `text` (after `sent`) that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text) - sent), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
