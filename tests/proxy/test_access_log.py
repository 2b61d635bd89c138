"""The access log's parts: line formats and batching without IO (times passed in), and the
writer on real files, pipes and the event loop's timer."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interknit.proxy.accesslog import (
    PIPE_BUF,
    AccessLog,
    JsonLines,
    LineBuffer,
    TextLines,
)

# 2023-11-14T22:13:20Z
EPOCH = 1_700_000_000.0

HTTP_FIELDS = [
    "ts",
    "listener",
    "route",
    "client",
    "method",
    "target",
    "status",
    "endpoint",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "retries",
    "reason",
    "request_id",
]
TCP_FIELDS = [
    "ts",
    "listener",
    "route",
    "client",
    "status",
    "endpoint",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "retries",
    "reason",
]

# Printable ASCII but space, '"' and '\': what a value may hold to stand as it is.
SAFE = bytes(b for b in range(0x21, 0x7F) if b not in b'"\\')


def http_args(**over: Any) -> dict[str, Any]:
    """A request that began at 0.1234 s on the monotonic clock and took 3.2141 ms."""
    args: dict[str, Any] = {
        "now": 0.1234 + 0.0032141,
        "started": 0.1234,
        "route": "search",
        "client": b"10.1.2.3",
        "method": b"GET",
        "target": b"/search?q=x&page=2",
        "status": 200,
        "endpoint": "search/a1",
        "bytes_in": 12,
        "bytes_out": 5120,
        "retries": 1,
        "reason": "",
        "request_id": b"6f1c-2a",
    }
    args.update(over)
    return args


def text(listener: str = "web", **args: Any) -> str:
    """The text line for one HTTP request (or TCP connection, with ``tcp=True``), with the
    monotonic clock EPOCH seconds behind the wall clock."""
    lines = TextLines(listener, offset=lambda: EPOCH)
    (lines.tcp if args.pop("tcp", False) else lines.http)(**args)
    (data,) = lines.take()
    return data.decode()


def json_line(listener: str = "web", **args: Any) -> str:
    lines = JsonLines(listener, offset=lambda: EPOCH)
    (lines.tcp if args.pop("tcp", False) else lines.http)(**args)
    (data,) = lines.take()
    return data.decode()


def text_pairs(line: str) -> list[tuple[str, str]]:
    """Split a text line as a reader would: on spaces, each pair at its first '='; a quoted
    value is a JSON string."""
    assert line.endswith("\n") and "\n" not in line[:-1]
    out = []
    for part in line[:-1].split(" "):
        key, _, value = part.partition("=")
        out.append((key, json.loads(value) if value.startswith('"') else value))
    return out


# Formats


def test_a_text_line_has_every_field_in_order() -> None:
    line = text(**http_args())
    assert line == (
        "ts=2023-11-14T22:13:20.123Z listener=web route=search client=10.1.2.3 method=GET "
        "target=/search?q=x&page=2 status=200 endpoint=search/a1 bytes_in=12 bytes_out=5120 "
        "duration_ms=3.214 retries=1 reason=- request_id=6f1c-2a\n"
    )
    assert [k for k, _ in text_pairs(line)] == HTTP_FIELDS


def test_a_json_line_has_every_field_with_its_type() -> None:
    line = json_line(**http_args())
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert list(record) == HTTP_FIELDS
    assert record == {
        "ts": "2023-11-14T22:13:20.123Z",
        "listener": "web",
        "route": "search",
        "client": "10.1.2.3",
        "method": "GET",
        "target": "/search?q=x&page=2",
        "status": 200,
        "endpoint": "search/a1",
        "bytes_in": 12,
        "bytes_out": 5120,
        "duration_ms": 3.214,
        "retries": 1,
        "reason": None,
        "request_id": "6f1c-2a",
    }


def test_duration_is_in_milliseconds_to_the_microsecond() -> None:
    short = http_args(started=7.0, now=7.000217)
    assert json.loads(json_line(**short))["duration_ms"] == 0.217
    assert "duration_ms=0.217 " in text(**short)
    long = http_args(started=7.0, now=19.5)
    assert json.loads(json_line(**long))["duration_ms"] == 12500.0


def test_a_value_there_is_none_of_is_a_dash_or_null() -> None:
    args = http_args(
        route="", client=b"", method=b"", target=b"", endpoint="", reason="", request_id=b""
    )
    pairs = dict(text_pairs(text(**args)))
    for key in ("route", "client", "method", "target", "endpoint", "reason", "request_id"):
        assert pairs[key] == "-", key
    record = json.loads(json_line(**args))
    for key in ("route", "client", "method", "target", "endpoint", "reason", "request_id"):
        assert record[key] is None, key


def test_a_clients_bytes_with_spaces_quotes_or_other_bytes_are_quoted() -> None:
    hostile = b'a b"c\\d\te\x7f\xff\xc3\xa9'
    args = http_args(target=b"/x\xff", request_id=hostile, method=b"BREW")
    line = text(**args)
    assert line.isascii() and line.count("\n") == 1
    pairs = dict(text_pairs(line))
    assert pairs["request_id"] == 'a b"c\\d\te\x7f\\xffé'
    assert pairs["target"] == "/x\\xff"
    assert pairs["method"] == "BREW"
    record = json.loads(json_line(**args))
    assert record["request_id"] == 'a b"c\\d\te\x7f\\xffé'
    assert json_line(**args).isascii()


def test_names_from_the_config_are_escaped_once_and_alike() -> None:
    line = text('front "door"', **http_args(route="my route", endpoint="ép", reason="no-route"))
    pairs = dict(text_pairs(line))
    assert pairs["listener"] == 'front "door"'
    assert pairs["route"] == "my route" and pairs["endpoint"] == "ép"
    assert line.isascii()
    record = json.loads(json_line("a\nb", **http_args(route="my route")))
    assert record["listener"] == "a\nb" and record["route"] == "my route"


def test_tcp_lines() -> None:
    args = {
        "tcp": True,
        "now": 1.5,
        "started": 0.0,
        "route": "postgres",
        "client": b"10.0.0.9",
        "status": 200,
        "endpoint": "postgres/p1",
        "bytes_in": 100,
        "bytes_out": 2000,
        "retries": 0,
        "reason": "idle-timeout",
    }
    line = text("db", **args)
    assert [k for k, _ in text_pairs(line)] == TCP_FIELDS
    assert "duration_ms=1500.000 " in line and "reason=idle-timeout" in line
    record = json.loads(json_line("db", **args))
    assert list(record) == TCP_FIELDS
    assert record["status"] == 200 and record["bytes_out"] == 2000
    assert record["ts"] == "2023-11-14T22:13:20.000Z"


@pytest.mark.parametrize(
    ("wall", "stamp"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (EPOCH + 0.999, "2023-11-14T22:13:20.999Z"),
        (EPOCH + 1.0, "2023-11-14T22:13:21.000Z"),
        (EPOCH + 86399.5, "2023-11-15T22:13:19.500Z"),
    ],
)
def test_time_stamps(wall: float, stamp: str) -> None:
    assert TextLines("w").stamp(wall) == stamp.encode()


def test_the_kept_stamp_follows_the_clock_both_ways() -> None:
    fmt = TextLines("w")
    seen = [fmt.stamp(EPOCH + t).decode() for t in (0.0005, 0.0009, 0.0015, 1.0015, 0.0015, -0.5)]
    assert seen == [
        "2023-11-14T22:13:20.000Z",
        "2023-11-14T22:13:20.000Z",
        "2023-11-14T22:13:20.001Z",
        "2023-11-14T22:13:21.001Z",
        "2023-11-14T22:13:20.001Z",
        "2023-11-14T22:13:19.500Z",
    ]


@given(
    target=st.binary(max_size=64),
    request_id=st.binary(max_size=32),
    method=st.binary(max_size=8),
    route=st.text(max_size=16),
    endpoint=st.text(max_size=16),
    listener=st.text(max_size=8),
)
def test_any_values_give_one_line_that_parses_back(
    target: bytes, request_id: bytes, method: bytes, route: str, endpoint: str, listener: str
) -> None:
    args = http_args(
        target=target, request_id=request_id, method=method, route=route, endpoint=endpoint
    )
    line = text(listener, **args)
    assert line.isascii()
    pairs = text_pairs(line)
    assert [k for k, _ in pairs] == HTTP_FIELDS
    values = dict(pairs)
    assert values["listener"] == (listener or "-")
    assert values["route"] == (route or "-") and values["endpoint"] == (endpoint or "-")
    record = json.loads(json_line(listener, **args))
    assert list(record) == HTTP_FIELDS
    assert record["listener"] == (listener or None)
    assert record["route"] == (route or None) and record["endpoint"] == (endpoint or None)
    for key, raw in (("target", target), ("request_id", request_id), ("method", method)):
        expected = raw.decode("utf-8", "backslashreplace") if raw else None
        assert record[key] == expected, key
        if raw:
            assert values[key] == expected, key


@given(
    target=st.lists(st.sampled_from(SAFE), min_size=1, max_size=64).map(bytes),
    request_id=st.lists(st.sampled_from(SAFE), min_size=1, max_size=32).map(bytes),
)
def test_values_the_caller_knows_plain_are_written_as_a_look_would_write_them(
    target: bytes, request_id: bytes
) -> None:
    args = http_args(target=target, request_id=request_id)
    assert text(**args, plain=True) == text(**args)
    assert json_line(**args, plain=True) == json_line(**args)


# Batching


class Told:
    """What a buffer told: a batch began (its time), or is full."""

    def __init__(self, buffer: LineBuffer) -> None:
        self.events: list[Any] = []
        buffer.on_first = lambda now: self.events.append(("first", now))
        buffer.on_full = lambda: self.events.append("full")


def test_the_buffer_says_when_a_batch_begins_and_when_it_is_full() -> None:
    buffer = LineBuffer(max_bytes=100, max_age=1.0)
    told = Told(buffer)
    buffer.add(b"x" * 40 + b"\n", now=5.0)
    buffer.add(b"y" * 40 + b"\n", now=5.5)
    assert told.events == [("first", 5.0)]
    buffer.add(b"z" * 40 + b"\n", now=5.6)  # 123 bytes
    assert told.events == [("first", 5.0), "full"]
    assert buffer.take() == [b"x" * 40 + b"\n" + b"y" * 40 + b"\n" + b"z" * 40 + b"\n"]
    assert buffer.take() == [] and buffer.size == 0
    buffer.add(b"a\n", now=9.0)
    assert told.events[-1] == ("first", 9.0)


def test_the_buffer_is_due_a_second_after_its_oldest_line() -> None:
    buffer = LineBuffer(max_bytes=1000, max_age=1.0)
    assert not buffer.due(100.0)  # empty: never due
    buffer.add(b"a\n", now=10.0)
    buffer.add(b"b\n", now=10.9)
    assert buffer.deadline == 11.0
    assert not buffer.due(10.999)
    assert buffer.due(11.0)
    buffer.take()
    assert not buffer.due(50.0)
    buffer.add(b"c\n", now=50.0)  # a new batch counts from its own first line
    assert buffer.deadline == 51.0 and not buffer.due(50.5)


def test_formatted_lines_are_batched_by_the_time_they_end() -> None:
    lines = TextLines("web", offset=lambda: EPOCH, max_bytes=10_000, max_age=1.0)
    told = Told(lines)
    for i in range(3):
        lines.tcp(
            now=20.0 + i / 10,
            started=1.0,
            route="r",
            client=b"c",
            status=200,
            endpoint="",
            bytes_in=i,
            bytes_out=0,
            retries=0,
            reason="",
        )
    assert told.events == [("first", 20.0)]
    assert lines.due(21.0) and not lines.due(20.9)
    while told.events[-1] != "full":
        lines.http(**http_args())
    assert lines.size >= 10_000


def test_the_wall_clock_is_read_once_a_second_of_the_monotonic_one() -> None:
    offsets = iter([EPOCH, EPOCH + 5.0, EPOCH + 9.0])
    reads = []

    def offset() -> float:
        reads.append(1)
        return next(offsets)

    lines = TextLines("w", offset=offset)
    stamps = []
    for started in (10.0, 10.5, 10.999, 11.0, 9.0, 12.5):
        lines.http(**http_args(started=started, now=started))
        stamps.append(lines.take()[0].decode().split()[0])
    # 10.0 reads EPOCH; 11.0 (a second on) reads EPOCH+5, which serves until 12.0; 12.5 reads
    # EPOCH+9. A line that began earlier (9.0) takes the offset of the moment.
    assert len(reads) == 3
    assert stamps == [
        "ts=2023-11-14T22:13:30.000Z",
        "ts=2023-11-14T22:13:30.500Z",
        "ts=2023-11-14T22:13:30.999Z",
        "ts=2023-11-14T22:13:36.000Z",
        "ts=2023-11-14T22:13:34.000Z",
        "ts=2023-11-14T22:13:41.500Z",
    ]


def test_pieces_for_a_pipe_are_whole_lines_within_the_limit() -> None:
    buffer = LineBuffer()
    lines = [b"%04d " % i + b"x" * (i % 50) + b"\n" for i in range(500)]
    long = b"L" * 300 + b"\n"
    for line in [*lines[:250], long, *lines[250:]]:
        buffer.add(line, now=0.0)
    chunks = buffer.take(piece=256)
    assert b"".join(chunks) == b"".join([*lines[:250], long, *lines[250:]])
    for chunk in chunks:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= 256 or chunk == long
    assert long in chunks  # a line longer than a piece goes alone


# The writer (real files, the real loop)


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_lines_wait_for_the_buffer_to_fill(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), "web", max_bytes=1000, max_age=30.0)
    log.open()
    now = time.monotonic()
    log.http(now, now - 0.001, "r", b"1.2.3.4", b"GET", b"/a", 200, "e", 0, 2, 0, "", b"id")
    assert path.read_text() == ""  # batched
    assert log.timer is not None
    while log.lines.lines:
        log.http(now, now, "r", b"1.2.3.4", b"GET", b"/b", 200, "e", 0, 2, 0, "", b"id")
    written = path.read_text().splitlines()
    assert len(written) >= 1000 // 200 and written[0].startswith("ts=")
    assert "target=/a " in written[0] and "duration_ms=1.000 " in written[0]
    assert log.timer is None  # the write cancelled the batch's timer
    log.close()


async def test_lines_are_written_within_the_age_limit(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), "web", json_lines=True, offset=lambda: EPOCH, max_age=0.05)
    log.open()
    started = time.monotonic()
    log.http(started, started, "r", b"::1", b"GET", b"/", 404, "", 0, 24, 0, "no-route", b"")
    assert path.read_text() == ""
    await until(lambda: path.read_text() != "")
    record = json.loads(path.read_text())
    assert record["status"] == 404 and record["bytes_out"] == 24 and record["client"] == "::1"
    # The stamp is the start, from the monotonic time through the injected wall clock.
    assert record["ts"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(started + EPOCH)))
    log.close()


async def test_reopen_after_a_rename_writes_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), "web", max_age=30.0)
    log.open()
    now = time.monotonic()
    log.tcp(now, now, "db", b"1.1.1.1", 200, "db/1", 5, 6, 0, "")
    path.rename(tmp_path / "access.log.1")
    log.tcp(now, now, "db", b"1.1.1.1", 200, "db/1", 7, 8, 0, "")
    log.reopen()  # what waits goes to the old file first, as logrotate expects
    log.tcp(now, now, "db", b"1.1.1.1", 200, "db/1", 9, 10, 0, "")
    log.close()
    old = (tmp_path / "access.log.1").read_text().splitlines()
    assert [x.split()[6] for x in old] == ["bytes_in=5", "bytes_in=7"]
    assert [x.split()[6] for x in path.read_text().splitlines()] == ["bytes_in=9"]


async def test_a_failed_reopen_keeps_the_old_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    path = folder / "access.log"
    log = AccessLog(str(path), "web", max_age=30.0)
    log.open()
    path.rename(tmp_path / "kept.log")
    folder.rmdir()
    with caplog.at_level(logging.ERROR, logger="interknit.proxy"):
        log.reopen()
    assert any("cannot reopen" in r.getMessage() for r in caplog.records)
    now = time.monotonic()
    log.tcp(now, now, "db", b"", 200, "", 1, 1, 0, "")
    log.close()
    assert "client=-" in (tmp_path / "kept.log").read_text()


async def test_a_write_error_drops_the_batch_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    read, write = os.pipe()
    os.close(read)  # EPIPE from now on
    log = AccessLog("-", "web", max_age=30.0)
    log._use(write)
    assert log.piece == PIPE_BUF  # a pipe: written in pieces that stay whole
    now = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="interknit.proxy"):
        for _ in range(3):
            log.tcp(now, now, "db", b"", 200, "", 1, 1, 0, "")
            log.flush()
    failures = [r for r in caplog.records if "cannot write the access log" in r.getMessage()]
    assert len(failures) == 1
    assert not log.lines.lines
    os.close(write)


async def test_a_pipe_gets_whole_lines(tmp_path: Path) -> None:
    read, write = os.pipe()
    log = AccessLog("-", "web", max_bytes=1 << 20, max_age=30.0)
    log._use(write)
    now = time.monotonic()
    for i in range(200):
        log.http(now, now, "r", b"c", b"GET", b"/%d" % i, 200, "", 0, 0, 0, "", b"")
    log.flush()
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    lines = data.decode().splitlines()
    assert [x.split()[5] for x in lines] == [f"target=/{i}" for i in range(200)]


async def test_lines_after_close_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), "web", max_age=0.01)
    log.open()
    log.close()
    now = time.monotonic()
    log.tcp(now, now, "db", b"", 200, "", 1, 1, 0, "")
    log.flush()
    assert path.read_text() == ""
