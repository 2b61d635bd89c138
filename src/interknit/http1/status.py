"""Status lines, built once at import: the hot path looks them up instead of formatting."""

from __future__ import annotations

import http

STATUS_LINES: dict[int, bytes] = {
    int(s): b"HTTP/1.1 %d %s\r\n" % (int(s), s.phrase.encode()) for s in http.HTTPStatus
}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Unknown\r\n" % status
    return line


def reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"
