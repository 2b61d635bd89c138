"""A raw client for proxy tests that compare bytes: send pieces, collect what comes back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence


async def exchange(port: int, pieces: Sequence[bytes], settle: float = 0.25) -> bytes:
    """Send each piece in turn, collecting what comes back until it goes quiet for ``settle``
    seconds; ``<closed>`` marks the proxy closing the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    try:
        for piece in pieces:
            writer.write(piece)
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(65536), settle)
                except TimeoutError:
                    break
                if not data:
                    return out + b"<closed>"
                out += data
    finally:
        writer.close()
    return out
