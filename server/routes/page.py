"""The page at GET /: try the model in a browser (draw a digit, pick a budget), see the stitch
menu as an accuracy-vs-latency chart and the controller live. One HTML, one ES module and one
stylesheet from the package (server/web/): no build step, nothing from another origin."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

WEB = files("server") / "web"
router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    # Read per request: a few KB, and an edited page shows on reload during development.
    return HTMLResponse(
        WEB.joinpath("index.html").read_text(), headers={"Cache-Control": "no-cache"}
    )
