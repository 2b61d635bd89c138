"""examples/fastapi_app.py runs as documented and sheds what it cannot do."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.nodeproc import free_port

ROOT = Path(__file__).resolve().parent.parent.parent


async def test_fastapi_example_sheds_with_retry_after() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port),
        "--log-level", "warning", cwd=ROOT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            deadline = time.monotonic() + 15
            while True:
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the example did not start"
                await asyncio.sleep(0.1)
            ok = await client.get("/work", headers={"X-Request-Timeout": "1s"})
            assert ok.status_code == 200 and 0 < ok.json()["remaining"] <= 1.0
            answers = await asyncio.gather(*(client.get("/work") for _ in range(40)))
            codes = Counter(r.status_code for r in answers)
            assert codes[200] >= 4 and codes[503] >= 10, codes
            shed = next(r for r in answers if r.status_code == 503)
            assert "retry-after" in shed.headers
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
