"""Incremental Server-Sent Events parsing that keeps every event's exact bytes.

A relay needs two things from an SSE stream at once: the parsed fields (to meter and inspect) and the
bytes exactly as the upstream sent them (to forward unchanged). `SSEParser` gives both:

- `feed(chunk)` accepts chunks split anywhere (inside a line, inside a `\\r\\n`, inside the BOM) and returns
  the events completed so far; `flush()` returns whatever is left at end of stream.
- Every returned `SSEEvent.raw` is a contiguous slice of the input, so the concatenation of all `raw`
  values from `feed(...)` calls followed by `flush()` is exactly the input, byte for byte.
- The result does not depend on how the input was split into chunks.

Parsing follows the WHATWG event-stream rules: lines end in `\\n`, `\\r\\n` or `\\r`; a blank line ends an
event; `field:value` drops one leading space from the value; a line without a colon is a field with an
empty value; lines starting with `:` are comments; `id`, `retry` and unknown fields are ignored (their
bytes stay in `raw`); a UTF-8 BOM at stream start is skipped (and kept in the first event's `raw`).
Deviation for relaying: blank lines that do not end an event (no line before them) are not dropped but
folded into the `raw` of the following event, so no byte is ever lost.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "SSEEvent", "SSEParser", "encode_event"]

DEFAULT_MAX_EVENT_BYTES = 8 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"
_CR = 0x0D
_CR_BYTE = b"\r"
_EOL = re.compile(rb"\r\n?|\n")
_SPLIT = re.compile(rb"\r\n|\r|\n")


class SSEEvent(NamedTuple):
    """One event as received.

    `raw` holds the exact bytes including the terminating blank line (and any preceding stray blank
    lines or the stream's BOM), `event` the last `event:` value (None when there was no `event:` line),
    `data` the `data:` values joined by "\\n" ("" when there were none), and `is_comment` is True when the
    event consists only of `:` comment lines (e.g. a keepalive). A named tuple: a stream makes many.
    """

    raw: bytes
    event: str | None
    data: str
    is_comment: bool


class SSEParser:
    """Incremental, split-invariant SSE parser with bounded memory.

    `max_event_bytes` bounds the bytes of one event (including its raw line endings); `feed` or `flush`
    raise `ValueError` when an event (complete or still pending) exceeds it. After a `ValueError` the
    parser is unusable and every further call raises again. `flush` resets the parser for a new stream.
    """

    __slots__ = (
        "_max",
        "_buf",
        "_pos",
        "_scan",
        "_bom_checked",
        "_event_type",
        "_data",
        "_has_lines",
        "_has_field",
        "_has_comment",
        "_failed",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be positive")
        self._max = max_event_bytes
        self._failed = False
        self._reset()
        self._bom_checked = False

    def _reset(self) -> None:
        self._buf = bytearray()  # bytes of the pending event, starting at its first byte
        self._pos = 0  # start of the line being parsed
        self._scan = 0  # no line ending exists in _buf[_pos:_scan]
        self._clear_event()

    def _clear_event(self) -> None:
        self._event_type: str | None = None
        self._data: list[str] = []
        self._has_lines = False
        self._has_field = False
        self._has_comment = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume `chunk`; return the events it completed, in order."""
        if self._failed:
            raise ValueError("SSE parser already failed")
        self._buf += chunk
        return self._parse(final=False)

    def flush(self) -> list[SSEEvent]:
        """End of stream: return the remaining events, the last one possibly without its blank line.

        A trailing `\\r` ends its line here. The final event's `raw` holds the remaining bytes as received.
        The parser is then reset to its initial state.
        """
        if self._failed:
            raise ValueError("SSE parser already failed")
        events = self._parse(final=True)
        if self._buf:
            if self._pos < len(self._buf):
                self._line(bytes(self._buf[self._pos :]))
            events.append(self._make_event(bytes(self._buf)))
        self._reset()
        self._bom_checked = False
        return events

    def _parse(self, final: bool) -> list[SSEEvent]:
        buf = self._buf
        if not self._bom_checked:
            if not final and len(buf) < len(_BOM) and _BOM.startswith(buf):
                return []  # could still become a BOM
            self._bom_checked = True
            if buf.startswith(_BOM):
                self._pos = self._scan = len(_BOM)
        events: list[SSEEvent] = []
        start = 0  # first byte of the current event
        if self._pos == 0 and not self._has_lines and _CR_BYTE not in buf:
            start = self._single_data_lines(buf, events)
        end = len(buf)
        pos = self._pos + start
        scan = max(self._scan, start)
        while True:
            match = _EOL.search(buf, scan)
            if match is None:
                scan = end
                break
            eol, nxt = match.span()
            if nxt == end and nxt - eol == 1 and buf[eol] == _CR and not final:
                scan = eol  # a lone trailing \r may be the first half of \r\n: wait for the next byte
                break
            if eol > pos:
                self._line(bytes(buf[pos:eol]))
                pos = scan = nxt
            else:
                pos = scan = nxt
                if self._has_lines:
                    self._check_size(pos - start)
                    events.append(self._make_event(bytes(buf[start:pos])))
                    start = pos
        if start:
            del buf[:start]
        self._pos = pos - start
        self._scan = scan - start
        self._check_size(len(buf))
        return events

    def _single_data_lines(self, buf: bytearray, events: list[SSEEvent]) -> int:
        """Fast path for the shape providers send: `data: …\n\n` events, no `\r`, nothing pending.

        Takes complete events of exactly one `data:` line from the front of `buf` and returns where it
        stopped; anything else (other fields, comments, stray blank lines, a partial event) is left to the
        general loop, which then starts at an event boundary. The result is what the general loop gives.
        The buffer is split once, in C: every piece but the last ended in a blank line (about a third of
        the instructions of finding each event's end and line breaks separately, on a chat stream).
        """
        end = buf.rfind(b"\n\n")
        if end < 0:  # no complete event (a large one still arriving is not copied again on every read)
            return 0
        start = 0
        pieces = bytes(buf[:end + 2]).split(b"\n\n")
        del pieces[-1]  # what follows the last blank line: not a complete event
        for piece in pieces:
            if not piece.startswith(b"data:") or b"\n" in piece:
                break
            size = len(piece) + 2
            self._check_size(size)
            value = piece[6:] if piece.startswith(b" ", 5) else piece[5:]
            events.append(SSEEvent(piece + b"\n\n", None, value.decode("utf-8", "replace"), False))
            start += size
        return start

    def _check_size(self, size: int) -> None:
        if size > self._max:
            self._failed = True
            self._buf = bytearray()
            raise ValueError(f"SSE event exceeds {self._max} bytes")

    def _line(self, line: bytes) -> None:
        self._has_lines = True
        text = line.decode("utf-8", "replace")
        if text.startswith(":"):
            self._has_comment = True
            return
        self._has_field = True
        name, colon, value = text.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        # "id", "retry" and unknown fields: ignored, their bytes stay in `raw`.

    def _make_event(self, raw: bytes) -> SSEEvent:
        event = SSEEvent(
            raw=raw,
            event=self._event_type,
            data="\n".join(self._data),
            is_comment=self._has_comment and not self._has_field,
        )
        self._clear_event()
        return event


def encode_event(data: str | bytes, event: str | None = None) -> bytes:
    """Serialise one event: an optional `event:` line, one `data:` line per line of `data`, a blank line.

    Line breaks inside `data` (`\\n`, `\\r\\n` or `\\r`) become separate `data:` lines, so parsing the result
    gives back `data` with its line breaks normalised to "\\n". `event` must not contain a line break.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    parts: list[bytes] = []
    if event is not None:
        if "\r" in event or "\n" in event:
            raise ValueError("SSE event name must not contain a line break")
        parts.append(b"event: " + event.encode("utf-8") + b"\n")
    for line in _SPLIT.split(payload):
        parts.append(b"data: " + line + b"\n")
    parts.append(b"\n")
    return b"".join(parts)
