"""The SSE parser is split-invariant, loses no byte, follows the event-stream rules and bounds memory."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rungate.providers.sse import SSEEvent, SSEParser, encode_event

BOM = b"\xef\xbb\xbf"


def parse_whole(data: bytes, max_event_bytes: int = 1 << 20) -> list[SSEEvent]:
    parser = SSEParser(max_event_bytes)
    return parser.feed(data) + parser.flush()


def parse_chunks(chunks: list[bytes], max_event_bytes: int = 1 << 20) -> list[SSEEvent]:
    parser = SSEParser(max_event_bytes)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.flush()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks, start = [], 0
    for point in points:
        chunks.append(data[start:point])
        start = point
    chunks.append(data[start:])
    return chunks


# --------------------------------------------------------------------------------------------------
# An oracle: generated events with their expected parse


@dataclass
class Expected:
    raw: bytes
    event: str | None
    data: str | None
    is_comment: bool


VALUE = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
EOL = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def sse_line(draw: st.DrawFn) -> tuple[bytes, str, str | None]:
    """(line bytes, kind, parsed value) for one non-empty line."""
    kind = draw(
        st.sampled_from(["data", "data_nospace", "bare_data", "event", "id", "retry", "comment", "other"])
    )
    value = draw(VALUE)
    if kind == "data":
        return b"data: " + value.encode(), "data", value
    if kind == "data_nospace":
        return b"data:" + value.encode(), "data", value[1:] if value.startswith(" ") else value
    if kind == "bare_data":
        return b"data", "data", ""
    if kind == "event":
        return b"event: " + value.encode(), "event", value
    if kind == "id":
        return b"id: " + value.encode(), "ignored", None
    if kind == "retry":
        return b"retry: " + str(draw(st.integers(0, 10_000))).encode(), "ignored", None
    if kind == "comment":
        return b":" + value.encode(), "comment", None
    name = draw(st.sampled_from(["foo", "Data", "evt", "x-y"]))
    return name.encode() + b": " + value.encode(), "ignored", None


@st.composite
def sse_event(draw: st.DrawFn) -> Expected:
    lines = draw(st.lists(sse_line(), min_size=1, max_size=5))
    raw = b""
    data: list[str] = []
    event: str | None = None
    last_eol = b""
    for line, kind, value in lines:
        last_eol = draw(EOL)
        raw += line + last_eol
        if kind == "data":
            assert value is not None
            data.append(value)
        elif kind == "event":
            event = value
    # A blank "\n" right after a "\r" would read as one "\r\n": the generator avoids that ambiguity.
    blank = draw(st.sampled_from([b"\r\n", b"\r"] if last_eol == b"\r" else [b"\n", b"\r\n", b"\r"]))
    raw += blank
    is_comment = all(kind == "comment" for _, kind, _ in lines)
    return Expected(raw, event, "\n".join(data), is_comment)


def as_tuple(e: SSEEvent | Expected) -> tuple[bytes, str | None, str | None, bool]:
    return (e.raw, e.event, e.data, e.is_comment)


@settings(max_examples=300)
@given(events=st.lists(sse_event(), max_size=8), bom=st.booleans(), data=st.data())
def test_any_split_gives_the_expected_events_and_every_byte(
    events: list[Expected], bom: bool, data: st.DataObject
) -> None:
    bom = bom and bool(events)  # a lone BOM does not end on an event boundary
    stream = (BOM if bom else b"") + b"".join(e.raw for e in events)
    expected = [as_tuple(e) for e in events]
    if bom and expected:
        expected[0] = (BOM + expected[0][0], *expected[0][1:])

    parser = SSEParser()
    whole = parser.feed(stream)
    if stream.endswith(b"\r"):  # a final "\r" may still become "\r\n": only flush settles it
        whole += parser.flush()
    else:
        assert parser.flush() == []
    assert [as_tuple(e) for e in whole] == expected
    assert b"".join(e.raw for e in whole) == stream

    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    chunked = parse_chunks(split_at(stream, cuts))
    assert chunked == whole


PIECES = st.sampled_from(
    [
        b"data: x",
        b"data:",
        b"event: e",
        b"id: 7",
        b": ping",
        b"\r",
        b"\n",
        b"\r\n",
        b" ",
        b":",
        BOM,
        b"\xff",
        b"y",
    ]
)


@settings(max_examples=300)
@given(pieces=st.lists(PIECES, max_size=30), data=st.data())
def test_arbitrary_bytes_split_invariant_and_lossless(pieces: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(pieces)
    whole = parse_whole(stream)
    assert b"".join(e.raw for e in whole) == stream
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=len(stream) + 1))
    assert parse_chunks(split_at(stream, cuts)) == whole


@given(pieces=st.lists(PIECES, max_size=30))
def test_byte_by_byte_equals_whole(pieces: list[bytes]) -> None:
    stream = b"".join(pieces)
    assert parse_chunks([stream[i : i + 1] for i in range(len(stream))]) == parse_whole(stream)


# --------------------------------------------------------------------------------------------------
# Edge cases


def test_crlf_split_across_chunks() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n\r") == []  # the blank line's "\r" may still be followed by "\n"
    [event] = parser.feed(b"\ndata: b\r\n")
    assert event == SSEEvent(raw=b"data: a\r\n\r\n", event=None, data="a", is_comment=False)
    [tail] = parser.flush()
    assert tail.raw == b"data: b\r\n" and tail.data == "b"


def test_lone_cr_line_endings() -> None:
    events = parse_whole(b"event: x\rdata: 1\rdata: 2\r\rdata: 3\r\r")
    assert [(e.event, e.data) for e in events] == [("x", "1\n2"), (None, "3")]


def test_trailing_cr_event_waits_for_next_byte_or_flush() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r\r") == []
    [event] = parser.feed(b"data: b\n\n")[:1]
    assert event.raw == b"data: a\r\r"


def test_openai_and_anthropic_shapes() -> None:
    stream = b'data: {"a":1}\n\ndata: [DONE]\n\nevent: message_start\ndata: {"type":"message_start"}\n\n'
    events = parse_whole(stream)
    assert [(e.event, e.data) for e in events] == [
        (None, '{"a":1}'),
        (None, "[DONE]"),
        ("message_start", '{"type":"message_start"}'),
    ]


def test_comment_only_event() -> None:
    [keepalive, mixed] = parse_whole(b": keepalive\n:\n\n: note\ndata: x\n\n")
    assert keepalive.is_comment and keepalive.data == "" and keepalive.event is None
    assert keepalive.raw == b": keepalive\n:\n\n"
    assert not mixed.is_comment and mixed.data == "x"


def test_data_with_and_without_space_and_multiline() -> None:
    [event] = parse_whole(b"data:x\ndata:  y\ndata\ndata: \n\n")
    assert event.data == "x\n y\n\n"


def test_id_retry_and_unknown_fields_are_ignored_but_kept() -> None:
    raw = b"id: 42\nretry: 1000\nfoo: bar\nevent: e\ndata: d\n\n"
    [event] = parse_whole(raw)
    assert (event.raw, event.event, event.data, event.is_comment) == (raw, "e", "d", False)


def test_last_event_line_wins() -> None:
    [event] = parse_whole(b"event: a\nevent: b\ndata: x\n\n")
    assert event.event == "b"


def test_event_without_blank_line_via_flush() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: done\n\ndata: tail") == [SSEEvent(b"data: done\n\n", None, "done", False)]
    assert parser.flush() == [SSEEvent(b"data: tail", None, "tail", False)]
    assert parser.flush() == []


def test_flush_after_single_newline() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: error\ndata: {}\n") == []
    assert parser.flush() == [SSEEvent(b"event: error\ndata: {}\n", "error", "{}", False)]


def test_stray_blank_lines_fold_into_next_event() -> None:
    events = parse_whole(b"\n\r\ndata: a\n\n\n\ndata: b\n\n\n")
    assert [e.raw for e in events] == [b"\n\r\ndata: a\n\n", b"\n\ndata: b\n\n", b"\n"]
    assert [e.data for e in events] == ["a", "b", ""]


def test_bom_only_at_stream_start() -> None:
    stream = BOM + b"data: a\n\n" + BOM + b"data: b\n\n"
    events = parse_chunks([b"\xef", b"\xbb", b"\xbfdata: a\n\n", stream[len(BOM) + 9 :]])
    assert [e.data for e in events] == ["a", ""]  # a BOM later is part of a field name
    assert b"".join(e.raw for e in events) == stream
    assert events[0].raw == BOM + b"data: a\n\n"


def test_short_stream_that_looks_like_a_bom_prefix() -> None:
    assert parse_whole(b"\xef") == [SSEEvent(b"\xef", None, "", False)]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    [event] = parse_whole(b"data: \xff\xfe\n\n")
    assert event.data == "\ufffd\ufffd"


def test_utf8_split_inside_a_character() -> None:
    encoded = "data: héllo €\n\n".encode()
    assert parse_chunks([encoded[:8], encoded[8:15], encoded[15:]])[0].data == "héllo €"


def test_oversize_pending_event_raises() -> None:
    parser = SSEParser(max_event_bytes=16)
    parser.feed(b"data: 0123456")
    with pytest.raises(ValueError, match="exceeds 16 bytes"):
        parser.feed(b"789abcdef")
    with pytest.raises(ValueError):
        parser.feed(b"\n\n")  # the parser stays failed


def test_oversize_complete_event_in_one_chunk_raises() -> None:
    parser = SSEParser(max_event_bytes=16)
    with pytest.raises(ValueError):
        parser.feed(b"data: 0123456789abcdef\n\ndata: ok\n\n")


def test_event_at_the_limit_passes_and_memory_is_per_event() -> None:
    event = b"data: 0123456\n\n"  # 15 bytes
    parser = SSEParser(max_event_bytes=len(event))
    assert len(parser.feed(event * 100)) == 100
    for _ in range(10):
        assert len(parser.feed(event)) == 1


def test_max_event_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SSEParser(max_event_bytes=0)


# --------------------------------------------------------------------------------------------------
# encode_event


def test_encode_event_shapes() -> None:
    assert encode_event('{"a":1}') == b'data: {"a":1}\n\n'
    assert encode_event(b"[DONE]") == b"data: [DONE]\n\n"
    assert encode_event("x", event="ping") == b"event: ping\ndata: x\n\n"
    assert encode_event("a\nb\r\nc") == b"data: a\ndata: b\ndata: c\n\n"
    assert encode_event("") == b"data: \n\n"


def test_encode_event_rejects_line_break_in_name() -> None:
    with pytest.raises(ValueError):
        encode_event("x", event="a\nb")


@given(data=st.text(), event=st.none() | VALUE)
def test_encode_event_round_trips(data: str, event: str | None) -> None:
    raw = encode_event(data, event)
    [parsed] = parse_whole(raw)
    normalised = data.replace("\r\n", "\n").replace("\r", "\n")
    assert (parsed.raw, parsed.event, parsed.data, parsed.is_comment) == (raw, event, normalised, False)
