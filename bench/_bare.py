"""The framework's floor for `bench/server_overhead.py`: FastAPI on uvicorn (the same server and
defaults as `snnet serve`: uvloop and httptools from ``uvicorn[standard]``) whose
``POST /classify`` only reads the body and answers a small JSON.

    python bench/_bare.py PORT
"""

import sys

import uvicorn
from fastapi import FastAPI, Request

app = FastAPI()


@app.post("/classify")
async def classify(request: Request) -> dict:
    body = await request.body()
    return {"bytes": len(body)}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
