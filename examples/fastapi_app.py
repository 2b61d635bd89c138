"""A FastAPI service protected by interknit's demand control.

    pip install fastapi uvicorn
    uvicorn examples.fastapi_app:app --port 8000
    curl -s localhost:8000/work                      # 200 while there is room
    curl -s localhost:8000/health                    # 503 while the app sheds too much

At most 4 requests run at once and 8 wait, for at most 100 ms; the rest get 503 with
Retry-After at once. A caller's X-Request-Timeout (or grpc-timeout) is its deadline: work that
cannot finish before it is refused up front, and the handler sees the remaining time.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request

from interknit.demand.asgi import AdmissionMiddleware
from interknit.demand.settings import DemandSettings

app = FastAPI()
app.add_middleware(
    AdmissionMiddleware,
    settings=DemandSettings.from_dict({"concurrency": 4, "queue": 8, "queue_timeout": "100ms"}),
    timeout=2.0,
)


@app.get("/work")
async def work(request: Request) -> dict[str, float | None]:
    deadline = request.state.deadline
    await asyncio.sleep(0.05)  # the work itself
    remaining = None if deadline is None else round(deadline - time.monotonic(), 3)
    return {"remaining": remaining}
