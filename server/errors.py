"""The one error type of the request path: a refusal with an HTTP status, a reason and, for
load shedding, a Retry-After. The planner returns it as a typed result; parsing, decoding and the
scheduler's queue limit raise it; one handler in ``server.app`` turns it into
``{"detail": ...}``."""

from __future__ import annotations


class Refusal(Exception):
    """A request the server will not serve.

    Args:
        status: HTTP status: 400 (undecodable), 401, 413 (too large), 415, 422 (bad values, or a
            budget no stitch can meet), 503 (not ready, overloaded for this budget, queue full,
            shutting down).
        detail: What was wrong and what is allowed, for the client.
        retry_after_s: Seconds a client should wait before retrying (503 only).
        least_ms: The least latency budget that would do, where the budget was what it refused
            (the detail ends with it, "latency_budget_ms >= X"; a V2 client that gave Triton's
            timeout is told it in microseconds).
        shed: For a 503 that sheds load, why (``server.metrics.SHED_REASONS``).
    """

    def __init__(
        self,
        status: int,
        detail: str,
        retry_after_s: int | None = None,
        least_ms: float | None = None,
        shed: str = "overloaded",
    ) -> None:
        super().__init__(detail)
        self.status, self.detail, self.retry_after_s = status, detail, retry_after_s
        self.least_ms, self.shed = least_ms, shed

    @property
    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}

    def __repr__(self) -> str:
        return f"Refusal({self.status}, {self.detail!r}, retry_after_s={self.retry_after_s})"


class ComputeError(RuntimeError):
    """The model failed on a batch; every request in it gets a 500 with this message."""
