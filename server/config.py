"""Service settings: one pydantic-settings class, environment prefix ``SNNET_``."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .schemas import MAX_BUDGET_MS, SLO_RANGE, SLO_TARGET

BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


# PromQL label matchers: a label name, an operator, a string ("..." or '...' with Go's escapes,
# or `...` raw; no newline), comma-separated. (__name__ would clash with the metric's name.)
_ESCAPE = r"\\(?:[abfnrtv\\'\"]|x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|[0-7]{3})"
_STRING = rf'"(?:[^"\\\n]|{_ESCAPE})*"|\'(?:[^\'\\\n]|{_ESCAPE})*\'|`[^`]*`'
_MATCHER = rf"\s*(?!__name__\b)[A-Za-z_][A-Za-z0-9_]*\s*(?:=~|!~|!=|=)\s*(?:{_STRING})\s*"
SELECTOR = re.compile(rf"{_MATCHER}(?:,{_MATCHER})*,?\s*")


class Settings(BaseSettings):
    """Every setting of the service; each is read from ``SNNET_<NAME>`` (case-insensitive).

    Validated at start-up; an invalid value stops the server with a message naming the setting
    and what is allowed.
    """

    # (allow_inf_nan: SNNET_SLO_TARGET=nan was refused as "less than or equal to 0.999")
    model_config = SettingsConfigDict(env_prefix="SNNET_", extra="forbid", allow_inf_nan=False)

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    grpc_port: int = Field(
        8081,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol over gRPC (0: off).",
    )
    weights: Path = Field(BUNDLED_WEIGHTS, description="Checkpoint directory to serve.")
    device: str = Field(
        "auto", description="auto (cuda if present, else cpu), cpu, cuda or cuda:N."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype. auto: the fastest on this device, measured at start-up, "
        "among float32 and the dtypes whose held-out accuracy the manifest records within 0.5 "
        "point of float32 for every stitch (`snnet eval --dtype ... --write`). float16 needs CUDA.",
    )
    threads: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="torch CPU threads for the model, at most the cores (a start-up error "
        "above: they would take turns). auto: the cores minus one (leaving a core "
        "to the event loop), or every core if the largest and the smallest anchor at batch 1 "
        "both run t(cores - 1) >= 1.1 x t(cores) + the front end's work for one request, "
        "measured at start-up; the choice is logged with its figures.",
    )

    api_workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto",
        description="HTTP processes serving the port (SO_REUSEPORT). One of them owns the model, "
        "the queue, the planner and the controller; the others parse, decode and answer "
        "/classify requests and pass every other route to it (server/fronts.py). auto: 1 on "
        "CPU (the model's threads take the cores; measured in bench/RESULTS.md), on CUDA half "
        "the cores, at most 8 (not yet measured on a GPU).",
    )

    worker: Literal["auto", "process", "thread"] = Field(
        "auto",
        description="Where the model runs: process (a child process; the event loop never holds "
        "up its GIL), thread (a worker thread of the server process), auto (process on CPU, "
        "thread on CUDA).",
    )

    default_budget_ms: float = Field(
        1000.0,
        gt=0,
        le=MAX_BUDGET_MS,  # (as a request's own)
        description="Latency budget of requests that give none (also with stitch_id or "
        "max_gflops): every request is planned and admitted against a budget.",
    )
    network_ms: float = Field(
        0.0,
        ge=0,
        description="Part of every latency budget reserved for time the server cannot see (the "
        "network, the client's own send and receive): choices, deadlines and budget_met use the "
        "budget minus this.",
    )
    slo_target: float = Field(
        SLO_TARGET,
        ge=SLO_RANGE[0],
        le=SLO_RANGE[1],
        description="The share of answered requests the server promises within their budget "
        "(the service level objective; best-effort answers apart). The safety margin covers "
        "1 - (1 - this) / 2 of recent answers: a lower promise pads predictions less, so more "
        "accurate stitches fit a budget and more answers run over it. Exported as "
        "snnet_slo_target, which the shipped alert compares attainment with.",
    )
    max_batch_size: int = Field(8, ge=1, le=256, description="Largest batch the batcher forms.")
    max_batch_wait_ms: float = Field(
        0.0,
        ge=0,
        description="Longest a batch is held open for more requests (a deadline also bounds it). "
        "0: no holding; batches still form from requests that queue while the model is busy.",
    )
    max_queue: int = Field(
        256, ge=1, description="Images waiting in all queues before new ones are refused (503)."
    )
    max_images_per_request: int = Field(16, ge=1, description="Images one request may carry.")
    max_body_bytes: int = Field(
        20_000_000, ge=1024, description="Largest request body (413 above)."
    )
    max_image_bytes: int = Field(
        5_000_000, ge=1024, description="Largest encoded image (413 above)."
    )
    max_image_pixels: int = Field(
        20_000_000,
        ge=1,
        description="Largest decoded image, width x height, and largest image its preprocessing "
        "may make of it (a long thin image, its shorter side resized up to the input's) (413 "
        "above; decompression bombs).",
    )

    baseline_policies: bool = Field(
        False,
        description="Accept a request's `policy` field set to a baseline (static, most_accurate, "
        "cheapest) for benchmarks; otherwise such a request is 422. Every policy passes the same "
        "admission either way.",
    )
    controller_period_s: float = Field(
        0.25, gt=0, le=60, description="Period of the controller loop, seconds."
    )
    target_utilisation: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Share of time the model may be busy at the current arrival rate before the "
        "controller moves budget-driven requests to cheaper stitches.",
    )
    prometheus_url: str | None = Field(
        None,
        description="Prometheus server whose query API gives fleet-wide figures to the controller "
        "(e.g. http://prometheus:9090); unset: local metrics only.",
    )
    prometheus_selector: str = Field(
        "",
        description="Label matchers put on every metric of the controller's Prometheus queries, "
        'so that they count this deployment only (e.g. job="snnet",namespace="prod"); empty: '
        "every series of those names that Prometheus holds.",
    )
    prometheus_period_s: float = Field(
        5.0, gt=0, description="How often the controller queries SNNET_PROMETHEUS_URL, seconds."
    )

    profile_cache: Path | None = Field(
        None,
        description="The file where the latency profile measured on this device is kept (a "
        "directory: profiles.json in it; default: profiles.json next to the weights if writable, "
        "else in ~/.cache/snnet). When "
        "set, the thread count SNNET_THREADS=auto chose last is kept in the same directory "
        "(threads.json).",
    )
    profile_batch_sizes: list[Annotated[int, Field(ge=1, le=256)]] | None = Field(
        None, description="Batch sizes to profile (default: 1, 2, 4, ... up to max_batch_size)."
    )
    profile_seconds: float = Field(
        30.0,
        ge=0,
        description="Time start-up may spend measuring stitch latencies on this device when no "
        "stored profile covers them (the anchors are always measured); the rest are estimated "
        "from GFLOPs, corrected online, and measured on later starts (the cache keeps what was "
        "measured).",
    )
    profile_repeats: int = Field(
        5,
        ge=1,
        description="Timed runs per stitch and batch size (median kept; 3 once they took a "
        "second).",
    )
    shutdown_grace_s: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM or Ctrl-C after start-up: how long open connections may take to "
        "finish before the server closes them (uvicorn's graceful-shutdown timeout); everything "
        "already queued for the model is still answered. During start-up the server exits at once.",
    )
    keep_alive_s: float = Field(
        5.0,
        gt=0,
        description="How long an idle HTTP keep-alive connection stays open (uvicorn's "
        "timeout_keep_alive). Behind a load balancer, set it above the balancer's idle timeout "
        "(AWS ALB: 60 s), or it may reuse a connection the server has just closed.",
    )
    api_key: str | None = Field(
        None, description="If set, /classify and V2 inference require header X-API-Key."
    )
    model_name: str | None = Field(
        None,
        description="The model's name in the Open Inference Protocol (/v2/models/{name}); "
        "default: the checkpoint directory's name.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    access_log: bool = Field(
        False,
        description="uvicorn's access log, a line per request (off by default: formatting and "
        "writing it was 3% of the server's time per small request; Prometheus counts requests).",
    )

    def uvicorn_options(self) -> dict:
        """What every uvicorn server of ours (the owner's, each front's) is started with."""
        return {
            "log_level": self.log_level,
            "access_log": self.access_log,
            "timeout_keep_alive": self.keep_alive_s,
            "timeout_graceful_shutdown": self.shutdown_grace_s,
        }

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, v: str | None) -> str | None:
        # An empty key (a secret or variable that resolved to nothing) let every request in:
        # one without the header compared equal to it.
        if v is not None and not v.strip():
            raise ValueError(
                "api_key is set but empty, which would let every request in; set a key, or "
                "unset SNNET_API_KEY to serve without one"
            )
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v  # DEBUG, as in Python's logging

    @model_validator(mode="after")
    def _budgets(self) -> Settings:
        if self.network_ms >= self.default_budget_ms:
            raise ValueError(
                f"SNNET_NETWORK_MS={self.network_ms:g} leaves nothing of "
                f"SNNET_DEFAULT_BUDGET_MS={self.default_budget_ms:g} to the server: every request "
                f"without a budget would be refused; make the network's share smaller than the "
                f"default budget"
            )
        return self

    @model_validator(mode="after")
    def _ports(self) -> Settings:
        if self.grpc_port == self.port:
            raise ValueError(
                f"SNNET_GRPC_PORT and SNNET_PORT (--port) are both {self.port}: the gRPC endpoint "
                f"needs a port of its own; set SNNET_GRPC_PORT (--grpc-port) to another (0: no "
                f"gRPC)"
            )
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @field_validator("prometheus_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v and not re.match(r"https?://[^/\s]+", v):
            raise ValueError(f"prometheus_url must be an http(s) URL, got {v!r}")
        return v or None

    @field_validator("prometheus_selector")
    @classmethod
    def _selector(cls, v: str) -> str:
        v = v.strip()
        if v.startswith("{") and v.endswith("}"):  # one pair of braces, as in a selector
            v = v[1:-1].strip()
        if v and not SELECTOR.fullmatch(v):
            raise ValueError(
                f"prometheus_selector must be PromQL label matchers such as "
                f'job="snnet",namespace="prod" (name, one of = != =~ !~, a quoted value; '
                f"comma-separated), got {v!r}"
            )
        return v

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        # (a/b was taken, and /v2/models/a/b, /v2/models/a%2Fb were both 404)
        if v is not None and (not v.strip() or "/" in v):
            raise ValueError(
                f"model_name must be a non-empty name without '/' (it is a path segment of "
                f"/v2/models/{{name}}), got {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _queue(self) -> Settings:
        if self.max_images_per_request > self.max_queue:
            raise ValueError(
                f"SNNET_MAX_IMAGES_PER_REQUEST={self.max_images_per_request} is more than "
                f"SNNET_MAX_QUEUE={self.max_queue}: a request that large would never fit the "
                f"queue, and be told to retry for ever; make the queue at least as large"
            )
        return self

    @field_validator("profile_cache", mode="before")
    @classmethod
    def _cache_file(cls, v: object) -> object:
        if isinstance(v, str) and not v.strip():
            return None  # (an unset compose or Helm variable: the default, not the directory ".")
        # A directory (existing, or written with a trailing slash) means the file profiles.json
        # in it: used as the file, it was never written ("Is a directory"), and every start
        # measured again.
        if isinstance(v, str | Path) and str(v) and (str(v).endswith("/") or Path(v).is_dir()):
            return Path(v) / "profiles.json"
        return v

    def batch_sizes(self) -> list[int]:
        """Batch sizes the latency profile covers."""
        if self.profile_batch_sizes:
            return sorted(set(self.profile_batch_sizes) | {1})
        sizes, b = [], 1
        while b < self.max_batch_size:
            sizes.append(b)
            b *= 2
        return [*sizes, self.max_batch_size]


@lru_cache
def get_settings() -> Settings:
    return Settings()
