"""The framework's floor for `bench/server_overhead.py`: FastAPI on uvicorn (the same server and
defaults as `snnet serve`: uvloop and httptools from ``uvicorn[standard]``) whose
``POST /classify`` only reads the body and answers a small JSON.

With ``?pause_ms=X`` the route first idles X ms (``asyncio.sleep``), as `snnet serve`'s event loop
idles while the model computes, and reports the pause it took as ``timing.compute_ms``: the
floor of a server whose every request waits on something for that long.

    python bench/_bare.py PORT
"""

import asyncio
import sys
import time

import uvicorn
from fastapi import FastAPI, Request

app = FastAPI()


@app.post("/classify")
async def classify(request: Request) -> dict:
    body = await request.body()
    pause = request.query_params.get("pause_ms")
    if pause is None:
        return {"bytes": len(body)}
    t0 = time.perf_counter()
    await asyncio.sleep(float(pause) / 1e3)
    return {"bytes": len(body), "timing": {"compute_ms": (time.perf_counter() - t0) * 1e3}}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
