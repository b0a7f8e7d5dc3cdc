"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), on
``SNNET_GRPC_PORT``, in the same event loop and through the same planner, queue and metrics as
/classify and the REST routes (``server.routes.v2``, whose request and answer logic it shares).

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
ModelInfer (the others answer UNIMPLEMENTED). A shed request is ``UNAVAILABLE``, bad input
``INVALID_ARGUMENT``, over the size limits ``RESOURCE_EXHAUSTED``, an unknown model or version
``NOT_FOUND``, a missing API key ``UNAUTHENTICATED``. A call's deadline caps its budget; a call
cancelled (or expired) while it waits leaves the queue and is counted with status 499. The
message classes come from Triton's client package (``tritonclient.grpc``), generated from the
protocol's own ``grpc_service.proto``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from dataclasses import replace
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from .engine import Engine, Lifecycle
from .errors import ComputeError, Refusal
from .parsing import ClassifyRequest
from .planner import Plan
from .routes.classify import admit
from .routes.v2 import (
    EXTENSIONS,
    admit_v2,
    answer_tensors,
    build_request,
    model_config_of,
    pinned_stitch,
    raw_bytes,
    result_of,
    server_version,
)

log = logging.getLogger("snnet.grpc")
ROUTE = "/inference.GRPCInferenceService/ModelInfer"  # its route label in the metrics
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}  # fmt: skip
CANCELLED = 499  # the status label of a call its client cancelled or let expire (nginx's code)


def _param(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _set_param(p: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    elif value is not None:
        p.string_param = str(value)


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's methods against the app's Lifecycle (an engine once start-up is done)."""

    def __init__(self, life: Lifecycle) -> None:
        self.life = life

    def _engine(self) -> Engine:
        if self.life.engine is None:
            raise Refusal(503, f"model not ready: {self.life.detail}", 5)  # (as REST's)
        return self.life.engine

    def _model(self, name: str, version: str) -> tuple[Engine, int | None]:
        engine = self._engine()
        return engine, pinned_stitch(engine, name, version)

    async def ServerLive(self, request, context):  # noqa: N802 (the protocol's names)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.life.engine is not None)

    async def ModelReady(self, request, context):  # noqa: N802
        try:
            self._model(request.name, request.version)
        except Refusal:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(
            name="snnet-serve", version=server_version(), extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request, context):  # noqa: N802
        try:
            engine, _ = self._model(request.name, request.version)
        except Refusal as e:
            await context.abort(CODES.get(e.status, grpc.StatusCode.INTERNAL), e.detail)
        c, h, w = engine.net.input_size
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=engine.model_name,
            versions=[str(r.id) for r in engine.menu.rows],
            platform="pytorch_snnet",
            inputs=[
                meta(name="image", datatype="BYTES", shape=[-1]),
                meta(name="input", datatype="FP32", shape=[-1, c, h, w]),
            ],
            outputs=[
                meta(name="probabilities", datatype="FP32", shape=[-1, engine.net.num_classes]),
                meta(name="labels", datatype="BYTES", shape=[-1, -1]),
            ],
        )

    async def ModelConfig(self, request, context):  # noqa: N802
        try:
            engine, _ = self._model(request.name, request.version)
        except Refusal as e:
            await context.abort(CODES.get(e.status, grpc.StatusCode.INTERNAL), e.detail)
        config = json_format.ParseDict(model_config_of(engine), mc.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    async def ModelInfer(self, request, context):  # noqa: N802
        arrived = time.monotonic()
        status, start = 200, time.perf_counter()
        metrics = self.life.metrics
        plan: Plan | None = None
        try:
            engine, pinned = self._model(request.model_name, request.model_version)
            engine.metrics.arrivals.inc()
            key = engine.settings.api_key
            given = dict(context.invocation_metadata() or ()).get("x-api-key", "")
            if key is not None and not hmac.compare_digest(given.encode(), key.encode()):
                raise Refusal(401, "missing or wrong x-api-key metadata")
            with engine.ingress.entered() as ticket:
                doc, data = _document(request)
                req, wanted = build_request(engine, doc, data, pinned)
                ticket.sized(req.payload_bytes)
                req, deadline_ms = _within_deadline(engine, req, context, arrived)
                if deadline_ms is None:
                    plan, pending = await admit_v2(engine, doc, req, arrived)
                else:
                    plan, pending = await _admit_by_deadline(engine, req, arrived, deadline_ms)
                ticket.queued()
            result = await result_of(engine, req, pending)
            tensors, params = answer_tensors(engine, req, wanted, plan, result, arrived)
        except asyncio.CancelledError:
            # The client went away (its deadline passed, or it cancelled; or the server's own
            # grace period ran out as it stopped): its queued batch leaves the queue
            # (``Scheduler.submit``), and it is counted apart, not as a 200; after its budget
            # ran out, as a missed budget too.
            status = CANCELLED
            if plan is not None and (time.monotonic() - arrived) * 1e3 >= plan.budget_ms:
                engine.record_unanswered(plan)
            raise
        except Refusal as e:
            status = e.status
            if e.retry_after_s is not None:
                context.set_trailing_metadata((("retry-after", str(e.retry_after_s)),))
            await context.abort(CODES.get(e.status, grpc.StatusCode.INTERNAL), e.detail)
        except ComputeError as e:
            status = 500
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        except Exception as e:  # a bug: say so as INTERNAL, count it as a 500
            status = 500
            log.exception("ModelInfer failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")
        finally:
            metrics.requests.labels(ROUTE, str(status)).inc()
            metrics.request_seconds.labels(ROUTE, str(status)).observe(time.perf_counter() - start)
        response = pb.ModelInferResponse(
            model_name=engine.model_name, model_version=str(plan.stitch), id=request.id
        )
        for k, v in params.items():
            _set_param(response.parameters[k], v)
        for meta, values in tensors:
            response.outputs.add(name=meta["name"], datatype=meta["datatype"], shape=meta["shape"])
            response.raw_output_contents.append(raw_bytes(meta, values))
        return response


IMPLEMENTED = (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
    "ModelInfer",
)  # fmt: skip


def _unimplemented(name: str):
    async def method(self, request, context):
        # The generated base raises NotImplementedError, which grpc logs as an error with a
        # traceback for every call: any client could fill the log with them.
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{name} is not implemented by snnet-serve; it implements {', '.join(IMPLEMENTED)}",
        )

    method.__name__ = name
    return method


for _name in dir(pb_grpc.GRPCInferenceServiceServicer):
    if _name[:1].isupper() and _name not in IMPLEMENTED:
        setattr(Servicer, _name, _unimplemented(_name))


def _within_deadline(
    engine: Engine, req: ClassifyRequest, context, arrived: float
) -> tuple[ClassifyRequest, float | None]:
    """The request with its budget capped at the call's gRPC deadline (an answer after it
    reaches nobody), and the ms that were left at arrival if the deadline is the budget now.

    Raises:
        Refusal: 504 if the deadline had passed before the request was read.
    """
    remaining = context.time_remaining()
    if remaining is None:
        return req, None
    if remaining <= 0:
        raise Refusal(504, "the call's deadline passed before the request was read")
    # From arrival, as budgets count. Less 1%: gRPC rounds a timeout up as it sends it (a 2 s
    # one read 2.007-2.010 s here), and a budget past the client's deadline is no use.
    left_ms = 0.99 * remaining * 1e3 + (time.monotonic() - arrived) * 1e3
    budget = req.options.latency_budget_ms or engine.settings.default_budget_ms
    if left_ms >= budget:
        return req, None
    options = req.options.model_copy(update={"latency_budget_ms": round(left_ms, 3)})
    return replace(req, options=options), left_ms


async def _admit_by_deadline(
    engine: Engine, req: ClassifyRequest, arrived: float, deadline_ms: float
) -> tuple[Plan, asyncio.Future]:
    """``admit`` for a request whose budget is its call's deadline, a refusal saying so."""
    try:
        return await admit(engine, req, arrived)
    except Refusal as e:
        if e.least_ms is not None:
            e.detail += (
                f" (this budget is the call's deadline: {deadline_ms:.1f} ms were left when it "
                f"arrived; give the call a deadline of at least {math.ceil(e.least_ms)} ms)"
            )
        raise


def _document(request: pb.ModelInferRequest) -> tuple[dict, list[Any]]:
    """A ModelInferRequest as the protocol's JSON document and each input's data (its raw bytes,
    or its typed contents)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise Refusal(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs, data = [], []
    for i, t in enumerate(request.inputs):
        inputs.append({"name": t.name, "datatype": t.datatype, "shape": list(t.shape)})
        if raw:
            data.append(memoryview(raw[i]))
        elif t.datatype == "BYTES":
            data.append(list(t.contents.bytes_contents))
        else:
            values = t.contents.fp32_contents  # (one pass; a list and back took 3x as long)
            data.append(np.fromiter(values, dtype=np.float32, count=len(values)))
    outputs = []
    for o in request.outputs:
        p = {k: _param(v) for k, v in o.parameters.items()}
        outputs.append({"name": o.name, "parameters": {"binary_data": True, **p}})
    doc: dict[str, Any] = {
        "inputs": inputs,
        "parameters": {k: _param(v) for k, v in request.parameters.items()},
    }
    if outputs:
        doc["outputs"] = outputs
    return doc, data


async def start(life: Lifecycle, host: str, port: int, max_message: int) -> grpc.aio.Server:
    """Serve the protocol on ``host:port`` from the running event loop; messages up to
    ``max_message`` bytes (the REST body limit: gRPC's default 4 MiB would refuse requests REST
    takes). The port is this process's alone: gRPC's default SO_REUSEPORT let a second server
    bind a port another held, and the kernel spread calls over both (two models behind one
    address, answering by turns)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(life), server)
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise RuntimeError(f"cannot serve gRPC on {address}: {e}") from None
    if not bound:
        raise RuntimeError(f"cannot serve gRPC on {address} (in use?); set SNNET_GRPC_PORT")
    await server.start()
    log.info("Open Inference Protocol over gRPC on %s", address)
    return server
