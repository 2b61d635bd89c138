"""The access log: one line per HTTP request or TCP connection, formatted once into its
listener's buffer and written in batches (as nginx's ``access_log PATH buffer=64k flush=1s``).

Two parts, so that what can be tested without a file or a clock is:

* ``TextLines`` and ``JsonLines`` (sans-IO) turn a request's plain values into one line and
  keep it (``LineBuffer``) until it must be written: once the lines reach ``FLUSH_BYTES``, or
  ``FLUSH_AFTER`` seconds after the oldest arrived. Times are passed in (monotonic), and the
  wall clock's offset from them comes from an injected function, read at most once a second.
  They call ``on_first`` when a batch begins and ``on_full`` when it must go.

  A value (the client's target, method or request id, a name from the config) that holds a
  space, a quote, a backslash or a character outside printable ASCII is written as a JSON
  string (``\\xNN`` for bytes that are not UTF-8; in text lines a space as ``\\u0020``), so
  a line is always one line of ASCII that splits on spaces into ``key=value`` pairs (text) or
  parses as JSON.
* ``AccessLog`` is the IO: the file (appended to, ``O_APPEND``) or stdout, the one timer that
  writes a batch that is not full, reopening (``SIGUSR1``, for logrotate) and closing. Its
  ``http`` and ``tcp`` are its lines' own methods: a request costs one call.

Python's logging is not on this path: a record, its formatter and its handler's lock cost
several times what a line costs here. A write error does not stop the proxy: the lines of that
batch are dropped and the error is logged once (on the node's own log) until writing works
again. A crash loses at most the lines not yet written: one buffer, at most 1 s of them.

Several processes may write the same file (``--workers``): each write is whole lines, with
``O_APPEND``, so lines never mix. To a pipe (stdout read by a supervisor, a container engine),
writes are cut at line ends into pieces of at most ``PIPE_BUF`` bytes, which the kernel keeps
whole among several writers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import select
import stat
import time
from collections.abc import Callable

log = logging.getLogger("interknit.proxy")

# A buffer is written once it holds this much, or once its oldest line is this old.
FLUSH_BYTES = 64 * 1024
FLUSH_AFTER = 1.0
# Writes to a pipe or a socket of at most this many bytes are not interleaved with others'.
PIPE_BUF = select.PIPE_BUF
# Endpoint names kept in their escaped form; the cache starts over beyond this many.
_NAMES_MAX = 4096

# A byte that may not stand in a value as it is: not printable ASCII, or a space, '"' or '\'.
# The bytes that may stand in a value as they are: printable ASCII but ' ', '"' and '\'.
_SAFE = bytes(b for b in range(0x21, 0x7F) if b not in (0x22, 0x5C))
_UNSAFE_STR = re.compile(r"[^\x21\x23-\x5b\x5d-\x7e]")
# The methods llhttp knows, as they stand in a text line and in a JSON one.
_METHODS = (  # noqa: SIM905
    "GET HEAD POST PUT DELETE OPTIONS PATCH TRACE CONNECT PROPFIND PROPPATCH MKCOL COPY "
    "MOVE LOCK UNLOCK SEARCH REPORT PURGE"
).split()
_TEXT_METHODS = {m.encode(): m.encode() for m in _METHODS}
_JSON_METHODS = {m.encode(): f'"{m}"'.encode() for m in _METHODS}

_TEXT_HTTP = (
    b"ts=%s %s route=%s client=%s method=%s target=%s status=%d endpoint=%s bytes_in=%d "
    b"bytes_out=%d duration_ms=%.3f retries=%d reason=%s request_id=%s\n"
)
_TEXT_TCP = (
    b"ts=%s %s route=%s client=%s status=%d endpoint=%s bytes_in=%d bytes_out=%d "
    b"duration_ms=%.3f retries=%d reason=%s\n"
)
_JSON_HTTP = (
    b'{"ts":"%s",%s,"route":%s,"client":%s,"method":%s,"target":%s,"status":%d,'
    b'"endpoint":%s,"bytes_in":%d,"bytes_out":%d,"duration_ms":%.3f,"retries":%d,'
    b'"reason":%s,"request_id":%s}\n'
)
_JSON_TCP = (
    b'{"ts":"%s",%s,"route":%s,"client":%s,"status":%d,"endpoint":%s,"bytes_in":%d,'
    b'"bytes_out":%d,"duration_ms":%.3f,"retries":%d,"reason":%s}\n'
)


def _plain(value: bytes) -> bool:
    """Whether ``value`` may stand as it is (an empty one may not: it stands for none)."""
    return bool(value) and not value.translate(None, _SAFE)


def _json_string(text: str) -> bytes:
    return json.dumps(text).encode()


def _text_string(text: str) -> bytes:
    """A JSON string without a space (``\\u0020``), so that a text line splits on spaces."""
    return json.dumps(text).replace(" ", "\\u0020").encode()


def _text_bytes(value: bytes) -> bytes:
    """A client's bytes in a text line: as they are, ``-`` for none, else a JSON string
    (UTF-8 where they are, ``\\xNN`` where not)."""
    if not value:
        return b"-"
    if _plain(value):
        return value
    return _text_string(value.decode("utf-8", "backslashreplace"))


def _json_bytes(value: bytes) -> bytes:
    if not value:
        return b"null"
    if _plain(value):
        return b'"%s"' % value
    return _json_string(value.decode("utf-8", "backslashreplace"))


def _text_name(value: str) -> bytes:
    if not value:
        return b"-"
    return value.encode() if _UNSAFE_STR.search(value) is None else _text_string(value)


def _json_name(value: str) -> bytes:
    return _json_string(value) if value else b"null"


def _wall_offset() -> float:
    """The wall clock minus the monotonic one."""
    return time.time() - time.monotonic()


def _nothing(*args: object) -> None:
    pass


class LineBuffer:
    """Lines waiting to be written, and when they must be: sans-IO, times passed in."""

    __slots__ = ("lines", "max_age", "max_bytes", "on_first", "on_full", "since", "size")

    def __init__(self, max_bytes: int = FLUSH_BYTES, max_age: float = FLUSH_AFTER) -> None:
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.lines: list[bytes] = []
        self.size = 0
        self.since = 0.0  # when the oldest line waiting arrived
        # Told when a batch begins (with its time) and when it is full and must go now.
        self.on_first: Callable[[float], None] = _nothing
        self.on_full: Callable[[], None] = _nothing

    def add(self, line: bytes, now: float) -> None:
        lines = self.lines
        lines.append(line)
        self.size += len(line)
        if len(lines) == 1:
            self.since = now
            self.on_first(now)
        if self.size >= self.max_bytes:
            self.on_full()

    @property
    def deadline(self) -> float:
        """When the oldest line waiting must be written (meaningless while empty)."""
        return self.since + self.max_age

    def due(self, now: float) -> bool:
        return bool(self.lines) and now >= self.since + self.max_age

    def take(self, piece: int = 0) -> list[bytes]:
        """Everything waiting, emptied: one chunk, or (``piece`` > 0) chunks of whole lines of
        at most ``piece`` bytes each (a longer line is a chunk of its own)."""
        lines = self.lines
        if not lines:
            return []
        self.lines = []
        self.size = 0
        if piece <= 0:
            return [b"".join(lines)]
        chunks: list[bytes] = []
        start = 0
        size = 0
        for index, line in enumerate(lines):
            if size and size + len(line) > piece:
                chunks.append(b"".join(lines[start:index]))
                start = index
                size = 0
            size += len(line)
        chunks.append(b"".join(lines[start:]))
        return chunks


class _Lines(LineBuffer):
    """What both formats share: the listener's name, escaped names, the time stamp."""

    __slots__ = (
        "_clock",
        "_milli",
        "_names",
        "_offset",
        "_second",
        "_stamp",
        "_ts",
        "_until",
        "head",
    )

    def __init__(
        self,
        listener: str,
        *,
        offset: Callable[[], float] = _wall_offset,
        max_bytes: int = FLUSH_BYTES,
        max_age: float = FLUSH_AFTER,
    ) -> None:
        super().__init__(max_bytes, max_age)
        self.head = b""  # the listener's pair, the same on every line
        # Names from the config or the registry (routes, endpoints, reasons), escaped once.
        self._names: dict[str, bytes] = {}
        self._clock = offset
        self._offset = 0.0
        self._until = -1.0  # the offset is read again for a line that began after this
        self._milli = -1
        self._second = -1
        self._stamp = ""
        self._ts = b""

    def wall(self, started: float) -> float:
        """Wall-clock seconds at monotonic ``started``; the offset is read once a second."""
        if started >= self._until:
            self._offset = self._clock()
            self._until = started + 1.0
        return started + self._offset

    def stamp(self, wall: float) -> bytes:
        """``wall`` (seconds since the epoch) as ISO 8601 UTC to the millisecond; the last one
        is kept, so lines of the same millisecond pay one comparison."""
        milli = int(wall * 1000.0)
        if milli != self._milli:
            second = milli // 1000
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._milli = milli
            self._ts = f"{self._stamp}.{milli % 1000:03d}Z".encode()
        return self._ts

    def name(self, value: str) -> bytes:
        found = self._names.get(value)
        if found is None:
            if len(self._names) >= _NAMES_MAX:
                self._names.clear()
            found = self._names[value] = self.escape(value)
        return found

    @staticmethod
    def escape(value: str) -> bytes:
        raise NotImplementedError


class TextLines(_Lines):
    """``key=value`` pairs separated by spaces; ``-`` for a value there is none of."""

    __slots__ = ()

    escape = staticmethod(_text_name)

    def __init__(
        self,
        listener: str,
        *,
        offset: Callable[[], float] = _wall_offset,
        max_bytes: int = FLUSH_BYTES,
        max_age: float = FLUSH_AFTER,
    ) -> None:
        super().__init__(listener, offset=offset, max_bytes=max_bytes, max_age=max_age)
        self.head = b"listener=" + _text_name(listener)

    def http(
        self,
        now: float,
        started: float,
        route: str,
        client: bytes,
        method: bytes,
        target: bytes,
        status: int,
        endpoint: str,
        bytes_in: int,
        bytes_out: int,
        retries: int,
        reason: str,
        request_id: bytes,
        plain: bool = False,
    ) -> None:
        """One HTTP request that began at ``started`` and ended at ``now`` (monotonic); ``""``
        and ``b""`` where a value is unknown (no route, no endpoint, a refusal's method).
        ``plain``: the caller knows ``target`` and ``request_id`` to be non-empty and to hold
        only bytes that stand as they are (``RequestHead.plain_target``, an id of its own), so
        they are not looked at again."""
        wall = started + self._offset if started < self._until else self.wall(started)
        ts = self._ts if int(wall * 1000.0) == self._milli else self.stamp(wall)
        names = self._names
        # The client's bytes: one look at both for the usual case, where each stands as it is.
        if plain or (target and request_id and not (target + request_id).translate(None, _SAFE)):
            target_text = target
            id_text = request_id
        else:
            target_text = _text_bytes(target)
            id_text = _text_bytes(request_id)
        self.add(
            _TEXT_HTTP
            % (
                ts,
                self.head,
                names.get(route) or self.name(route),
                client or b"-",
                _TEXT_METHODS.get(method) or _text_bytes(method),
                target_text,
                status,
                names.get(endpoint) or self.name(endpoint),
                bytes_in,
                bytes_out,
                (now - started) * 1000.0,
                retries,
                names.get(reason) or self.name(reason),
                id_text,
            ),
            now,
        )

    def tcp(
        self,
        now: float,
        started: float,
        route: str,
        client: bytes,
        status: int,
        endpoint: str,
        bytes_in: int,
        bytes_out: int,
        retries: int,
        reason: str,
    ) -> None:
        """One TCP connection that began at ``started`` and ended at ``now`` (monotonic)."""
        self.add(
            _TEXT_TCP
            % (
                self.stamp(self.wall(started)),
                self.head,
                self.name(route),
                client or b"-",
                status,
                self.name(endpoint),
                bytes_in,
                bytes_out,
                (now - started) * 1000.0,
                retries,
                self.name(reason),
            ),
            now,
        )


class JsonLines(_Lines):
    """One JSON object per line; ``null`` for a value there is none of."""

    __slots__ = ()

    escape = staticmethod(_json_name)

    def __init__(
        self,
        listener: str,
        *,
        offset: Callable[[], float] = _wall_offset,
        max_bytes: int = FLUSH_BYTES,
        max_age: float = FLUSH_AFTER,
    ) -> None:
        super().__init__(listener, offset=offset, max_bytes=max_bytes, max_age=max_age)
        self.head = b'"listener":' + _json_name(listener)

    def http(
        self,
        now: float,
        started: float,
        route: str,
        client: bytes,
        method: bytes,
        target: bytes,
        status: int,
        endpoint: str,
        bytes_in: int,
        bytes_out: int,
        retries: int,
        reason: str,
        request_id: bytes,
        plain: bool = False,
    ) -> None:
        wall = started + self._offset if started < self._until else self.wall(started)
        ts = self._ts if int(wall * 1000.0) == self._milli else self.stamp(wall)
        names = self._names
        if plain or (target and request_id and not (target + request_id).translate(None, _SAFE)):
            target_json = b'"%s"' % target
            id_json = b'"%s"' % request_id
        else:
            target_json = _json_bytes(target)
            id_json = _json_bytes(request_id)
        self.add(
            _JSON_HTTP
            % (
                ts,
                self.head,
                names.get(route) or self.name(route),
                _json_bytes(client),
                _JSON_METHODS.get(method) or _json_bytes(method),
                target_json,
                status,
                names.get(endpoint) or self.name(endpoint),
                bytes_in,
                bytes_out,
                (now - started) * 1000.0,
                retries,
                names.get(reason) or self.name(reason),
                id_json,
            ),
            now,
        )

    def tcp(
        self,
        now: float,
        started: float,
        route: str,
        client: bytes,
        status: int,
        endpoint: str,
        bytes_in: int,
        bytes_out: int,
        retries: int,
        reason: str,
    ) -> None:
        self.add(
            _JSON_TCP
            % (
                self.stamp(self.wall(started)),
                self.head,
                self.name(route),
                _json_bytes(client),
                status,
                self.name(endpoint),
                bytes_in,
                bytes_out,
                (now - started) * 1000.0,
                retries,
                self.name(reason),
            ),
            now,
        )


Lines = TextLines | JsonLines


def open_target(target: str) -> int:
    """A file descriptor to append lines to: stdout for ``"-"``, else ``target`` opened (and
    made, mode 0644) for appending. Raises OSError."""
    if target == "-":
        return 1
    return os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


class AccessLog:
    """One listener's access log: its lines, its file, its flush timer. ``http`` and ``tcp``
    are the lines' methods (see ``TextLines``)."""

    __slots__ = ("failing", "fd", "http", "lines", "loop", "piece", "target", "tcp", "timer")

    def __init__(
        self,
        target: str,
        listener: str,
        *,
        json_lines: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
        offset: Callable[[], float] = _wall_offset,
        max_bytes: int = FLUSH_BYTES,
        max_age: float = FLUSH_AFTER,
    ) -> None:
        self.target = target  # "-" (stdout) or a path
        kind = JsonLines if json_lines else TextLines
        lines = self.lines = kind(listener, offset=offset, max_bytes=max_bytes, max_age=max_age)
        lines.on_first = self._arm
        lines.on_full = self.flush
        self.http = lines.http
        self.tcp = lines.tcp
        self.loop = loop or asyncio.get_running_loop()
        self.fd = -1
        self.piece = 0  # 0: a batch in one write (a file); else at most this much per write
        self.timer: asyncio.TimerHandle | None = None
        self.failing = False

    # Life

    def open(self) -> None:
        """Open the target (raises OSError: the caller names the listener and the key)."""
        self._use(open_target(self.target))

    def _use(self, fd: int) -> None:
        self.fd = fd
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            mode = 0
        self.piece = 0 if stat.S_ISREG(mode) else PIPE_BUF

    def reopen(self) -> None:
        """Write what waits, then open the path anew (after logrotate renamed the file). On
        failure the old file stays in use and the failure is logged."""
        self.flush()
        if self.target == "-":
            return
        try:
            fd = open_target(self.target)
        except OSError as exc:
            log.error(
                "cannot reopen the access log; still writing the old file",
                extra={
                    "event": "proxy.access_log_reopen_failed",
                    "path": self.target,
                    "error": exc.strerror,
                },
            )
            return
        old = self.fd
        self._use(fd)
        if old > 2:
            os.close(old)

    def close(self) -> None:
        """Write what waits and close the file; lines that come later are dropped."""
        self.flush()
        fd, self.fd = self.fd, -1
        if fd > 2:
            os.close(fd)

    # Writing

    def _arm(self, now: float) -> None:
        """A batch began at ``now`` (the monotonic clock, which the loop's is)."""
        if self.timer is None:
            self.timer = self.loop.call_at(now + self.lines.max_age, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.flush()

    def flush(self) -> None:
        """Write every line waiting."""
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        chunks = self.lines.take(self.piece)
        if self.fd < 0:
            return
        for data in chunks:
            if not self._write(data):
                return

    def _write(self, data: bytes) -> bool:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError as exc:
            if not self.failing:
                self.failing = True
                log.error(
                    "cannot write the access log; its lines are dropped until it works again",
                    extra={
                        "event": "proxy.access_log_failed",
                        "path": self.target,
                        "error": exc.strerror or str(exc),
                    },
                )
            return False
        if self.failing:
            self.failing = False
            log.warning(
                "the access log is written again",
                extra={"event": "proxy.access_log_recovered", "path": self.target},
            )
        return True
