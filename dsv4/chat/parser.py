"""Model output -> an OpenAI-style assistant message, one-shot or streamed.

The completion is what the model writes after the prompt's last `<｜Assistant｜><think>` (or
`</think>`):  [reasoning `</think>`] content [`\\n\\n<｜DSML｜tool_calls>` ... `</｜DSML｜tool_calls>`] EOS

`StreamingParser` is the only implementation; `parse_message_from_completion_text` feeds it
the whole text at once, so streamed and one-shot results agree by construction. Malformed
output never raises: the parser keeps what it can and lists each problem in `parse_errors`.
DSML markup never reaches `content` or `reasoning_content`, even when broken.
"""

from dataclasses import dataclass
from typing import Any, Literal

from dsv4.chat import tokens as T
from dsv4.chat.dsml import BLOCK_TAGS, parse_invoke

_DSML_TAG = "<" + T.DSML
_DSML_END_TAG = "</" + T.DSML
# In reasoning or content, any DSML markup starts the tool-call section: a tag, or even a
# bare ｜DSML｜ token, so that markup never leaks into text. The blank line the format puts
# before the block belongs to the markup, not to the text.
_MARKUP_STOPS = ("\n\n" + _DSML_TAG, _DSML_TAG, _DSML_END_TAG, T.DSML)
_TEXT_STOPS = {
    "reasoning": (T.THINK_END, T.EOS, *_MARKUP_STOPS),
    "content": (T.EOS, *_MARKUP_STOPS),
}


@dataclass(frozen=True)
class ParseEvent:
    kind: Literal["reasoning", "content", "tool_call", "error"]
    value: Any  # text for reasoning / content / error; an OpenAI tool call dict for tool_call


def _earliest(text: str, stops: tuple[str, ...], start: int = 0) -> tuple[int, str | None]:
    """First occurrence of any stop at or after `start`; on a tie the longer stop wins."""
    best, found = len(text), None
    for stop in stops:
        pos = text.find(stop, start)
        if pos != -1 and (pos < best or (pos == best and len(stop) > len(found))):
            best, found = pos, stop
    return best, found


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class StreamingParser:
    """Incremental parser: `feed(delta)` and `finish()` return the new events.

    Text is released as soon as it cannot be the start of a marker; tool calls are released
    whole, when their `</｜DSML｜invoke>` arrives (never half a call). If generation stopped
    on the EOS token and the detokenizer dropped it, feed `tokens.EOS` before `finish()`,
    otherwise the output is reported as truncated."""

    def __init__(self, thinking_mode: str):
        if thinking_mode not in ("chat", "thinking"):
            raise ValueError(f"thinking_mode={thinking_mode!r}; use 'chat' or 'thinking'")
        self.state = "reasoning" if thinking_mode == "thinking" else "content"
        self._buf = ""
        self._in_block = False  # inside <｜DSML｜tool_calls> ... </｜DSML｜tool_calls>
        self._events: list[ParseEvent] = []
        self._finished = False
        self._after_eos = ""
        self.reasoning_content = ""
        self.content = ""
        self.tool_calls: list[dict] = []
        self.parse_errors: list[str] = []

    # -- public API ---------------------------------------------------------------------

    def feed(self, delta: str) -> list[ParseEvent]:
        if self._finished:
            raise RuntimeError("StreamingParser.feed after finish(); make a new parser")
        self._buf += delta
        self._advance(final=False)
        return self._take()

    def finish(self) -> list[ParseEvent]:
        if not self._finished:
            self._finished = True
            self._advance(final=True)
            if self.state != "done":
                missing = "</think> and " if self.state == "reasoning" else ""
                self._error(f"output ended without {missing}the end-of-sentence token "
                            "(truncated?)")
            if self._after_eos:
                self._error(f"text after the end-of-sentence token ignored: "
                            f"{self._after_eos[:80]!r}")
            self._check_leftover_tokens()
        return self._take()

    def message(self) -> dict:
        """The parsed assistant message, shaped like the reference decoder's result
        (`parse_errors` only present when something was wrong)."""
        msg = {"role": "assistant", "content": self.content,
               "reasoning_content": self.reasoning_content, "tool_calls": list(self.tool_calls)}
        if self.parse_errors:
            msg["parse_errors"] = list(self.parse_errors)
        return msg

    # -- machinery ----------------------------------------------------------------------

    def _take(self) -> list[ParseEvent]:
        events, self._events = self._events, []
        return events

    def _emit_text(self, text: str) -> None:
        if not text:
            return
        if self.state == "reasoning":
            self.reasoning_content += text
        else:
            self.content += text
        self._events.append(ParseEvent(self.state, text))

    def _error(self, message: str) -> None:
        self.parse_errors.append(message)
        self._events.append(ParseEvent("error", message))

    def _advance(self, final: bool) -> None:
        while True:
            if self.state in ("reasoning", "content"):
                progressed = self._advance_text(final)
            elif self.state == "dsml":
                progressed = self._advance_dsml(final)
            else:  # done: anything more is reported once, at finish()
                self._after_eos += self._buf
                self._buf = ""
                progressed = False
            if not progressed:
                return

    def _advance_text(self, final: bool) -> bool:
        stops = _TEXT_STOPS[self.state]
        pos, stop = _earliest(self._buf, stops)
        if stop is None:
            keep = 0 if final else _held_back(self._buf, stops)
            self._emit_text(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._emit_text(self._buf[:pos])
        if stop == T.THINK_END:
            self._buf = self._buf[pos + len(stop):]
            self.state = "content"
            return True
        if self.state == "reasoning":
            self._error("reasoning not closed by </think>")
        if stop == T.EOS:
            self._buf = self._buf[pos + len(stop):]
            self.state = "done"
        else:  # DSML markup: hand it, minus the blank line, to the tool-call parser
            self._buf = self._buf[pos + (2 if stop.startswith("\n\n") else 0):]
            self.state = "dsml"
        return True

    def _advance_dsml(self, final: bool) -> bool:
        buf = self._buf.lstrip()
        self._buf = buf
        if not buf:
            return False
        if buf.startswith(T.EOS):
            if self._in_block:
                self._error("tool_calls block not closed before the end-of-sentence token")
            self._buf = buf[len(T.EOS):]
            self.state = "done"
            return True
        if buf.startswith(T.TOOL_CALLS_OPEN):
            if self._in_block:
                self._error("nested <｜DSML｜tool_calls> ignored")
            self._in_block = True
            self._buf = buf[len(T.TOOL_CALLS_OPEN):]
            return True
        if buf.startswith(T.TOOL_CALLS_CLOSE):
            if not self._in_block:
                self._error("</｜DSML｜tool_calls> without an opening tag ignored")
            self._in_block = False
            self._buf = buf[len(T.TOOL_CALLS_CLOSE):]
            return True
        if buf.startswith(T.INVOKE_OPEN):
            return self._advance_invoke(final)
        if not final and any(tag.startswith(buf) for tag in (*BLOCK_TAGS, T.EOS)):
            return False  # may still become a known tag
        # Stray text (or an unknown tag) up to the next tag: dropped, never shown as content.
        pos, stop = _earliest(buf, (_DSML_TAG, _DSML_END_TAG, T.EOS), start=1)
        if stop is None and not final:
            return False
        where = "in tool_calls block" if self._in_block else "after tool_calls block"
        self._error(f"unexpected text {where} ignored: {buf[:pos][:80]!r}")
        self._buf = buf[pos:]
        return True

    def _advance_invoke(self, final: bool) -> bool:
        buf = self._buf
        if not self._in_block:
            self._error("<｜DSML｜invoke> outside a tool_calls block; parsed anyway")
            self._in_block = True
        pos, stop = _earliest(buf, (T.INVOKE_CLOSE, T.INVOKE_OPEN, T.TOOL_CALLS_CLOSE, T.EOS),
                              start=1)
        if stop is None and not final:
            return False
        if stop == T.INVOKE_CLOSE:
            end = pos + len(stop)
            call, errors = parse_invoke(buf[:end])
            for e in errors:
                self._error(e)
            if call is not None:
                self.tool_calls.append(call)
                self._events.append(ParseEvent("tool_call", call))
            self._buf = buf[end:]
            return True
        self._error(f"unterminated invoke dropped: {buf[:pos][:80]!r}")
        self._buf = buf[pos:]
        return True

    def _check_leftover_tokens(self) -> None:
        for name, text in (("reasoning_content", self.reasoning_content), ("content", self.content)):
            for tok in (T.BOS, T.EOS, T.THINK_START, T.THINK_END, T.DSML):
                if tok in text:
                    self._error(f"{name} contains the special token {tok!r}")


def parse_message_from_completion_text(text: str, thinking_mode: str) -> dict:
    """Completion text -> {"role", "content", "reasoning_content", "tool_calls"[, "parse_errors"]}.

    `tool_calls` are OpenAI-shaped ({"type": "function", "function": {"name", "arguments"}},
    arguments a JSON string, no ids). Never raises on malformed text."""
    parser = StreamingParser(thinking_mode)
    parser.feed(text)
    parser.finish()
    return parser.message()
