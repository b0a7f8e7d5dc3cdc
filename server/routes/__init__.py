"""HTTP routes, one module per resource. Nothing here decides: routes parse, call the Engine's
planner and scheduler, and encode."""

from fastapi import APIRouter

from . import classify, controller, health, page, stitches, v2

router = APIRouter()
for module in (classify, stitches, controller, health, v2, page):
    router.include_router(module.router)

__all__ = ["router"]
