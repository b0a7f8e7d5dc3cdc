"""Request and response schemas of the HTTP API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Policy = Literal["adaptive", "static", "most_accurate", "cheapest"]

# A real 28x28 held-out MNIST digit (a 0) as PNG: the examples below are requests the bundled
# model answers, so "Try it out" in /docs works as shown.
DIGIT_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAABD0lEQVR42s2SsU4CQRRF7w6ECgPGgsLCxkRjLKhoLCDxBywszTo/"
    "QIiNiaWNtb9gJwUkFHbr2mgnFVoQNFQUEkhMMITk5g02K84say3TzTuZd8/MG2AVVkXm5b+YblPatXQyuyeF3Fom+Ur/i+y8JsGj"
    "OwpJX/9Aq/nJDaAAeFBRRf2yazPtD42ZTmBMvKeQATRZhY5n6k+ZBHvQz9U0sk8x+E65ALBdAIDQFSquqRQAvAEAPGUL7TfWLYds"
    "xhEKSVr5rlBIni02u0P2Cu49xwvW2hgdf1gnH0QkymuK9HaisgcAOKzn8Dhvdc+9TGl21ey671MeUUhSGPjL09q8FJIc3OYSx3z6"
    "wo5/8O+/9Bvp+HgppJKuvAAAAABJRU5ErkJggg=="
)


# The largest budget a request may give: an hour. Without a bound, a budget of 1e308 ms was
# taken, and the controller's mean budget (which scales its queue load) and the budget
# histogram's sum became meaningless for every request after it.
MAX_BUDGET_MS = 3_600_000.0
# The share of answered requests (best effort apart) the server promises within their budget,
# by default (SNNET_SLO_TARGET), and the range it may be set in (server.controller). Not above
# 0.995: the margin is capped at half the prediction (MAX_MARGIN), and on the recorded idle
# DeiT answers a margin at 0.9995 sat at that cap and covered 99.65% of the next answers, short
# of a 0.999 promise (0.995: 99.51%).
SLO_TARGET = 0.99
SLO_RANGE = (0.8, 0.995)


class ClassifyOptions(BaseModel):
    """How to pick the stitch; the same fields in multipart form data and in JSON."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    latency_budget_ms: float | None = Field(
        None,
        gt=0,
        le=MAX_BUDGET_MS,
        description="Answer within this many ms, counted from arrival at the server: the most "
        "accurate stitch that fits behind the current queue; at most an hour. Default: "
        "SNNET_DEFAULT_BUDGET_MS.",
    )
    stitch_id: int | None = Field(
        None, ge=0, description="Use exactly this stitch (see GET /stitches)."
    )
    max_gflops: float | None = Field(
        None, gt=0, description="The most accurate stitch costing at most this many GFLOPs."
    )
    top_k: int = Field(
        5,
        ge=1,
        description="Predictions per image: at most the class count (left out: 5, or the class "
        "count if fewer).",
    )
    policy: Policy | None = Field(
        None,
        description="adaptive (the default). The baselines static, most_accurate and cheapest "
        "are for benchmarks and answer 422 unless the server runs with "
        "SNNET_BASELINE_POLICIES=true; every policy passes the same admission.",
    )


class ClassifyJSON(ClassifyOptions):
    """A JSON request: exactly one of ``images`` and ``image``."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["images"]}, {"required": ["image"]}]}
    )

    images: list[str] | None = Field(
        None,
        min_length=1,
        description="Base64-encoded images (JPEG, PNG, WebP, BMP, GIF; a data: URL prefix is "
        "allowed).",
    )
    image: str | None = Field(None, description="One base64-encoded image (instead of `images`).")


def multipart_schema() -> dict:
    """The multipart form's schema, from the same fields as JSON: `image` file parts instead of
    base64, option values as form fields."""
    fields = ClassifyOptions.model_json_schema()["properties"]
    # Swagger UI's "Try it out" filled each optional field with a sample of its type (1 ms,
    # stitch 0 and a 1 GFLOPs cap at once: a 422; top_k=5 on a model of 3 classes: a 422). An
    # empty example leaves the field empty, and an empty field is not sent: the defaults apply.
    # (Not of the field's type: OpenAPI 3.1's `example` is free-form, and this is what it is
    # for here; the form parser takes an empty field as absent.)
    for name in fields:
        fields[name]["example"] = ""
    return {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string", "format": "binary"},
                "description": "One file part per image (JPEG, PNG, WebP, BMP, GIF).",
            },
            **fields,
        },
        "additionalProperties": False,
    }


class Prediction(BaseModel):
    label: str
    class_index: int
    score: float


class StitchRef(BaseModel):
    id: int
    description: str
    gflops: float
    accuracy: float | None


class Timing(BaseModel):
    queue_ms: float = Field(description="Wait before the batch ran.")
    compute_ms: float = Field(description="Model time of the batch.")
    total_ms: float = Field(description="From request arrival to response.")
    predicted_ms: float = Field(
        description="What the planner predicted for this request's server time (HTTP backlog + "
        "queue wait + compute; without the controller's safety margin)."
    )


class ClassifyResponse(BaseModel):
    predictions: list[list[Prediction]] = Field(
        description="top_k predictions per image, best first."
    )
    stitch: StitchRef
    timing: Timing
    latency_budget_ms: float = Field(
        description="The budget that applied: the request's own, or SNNET_DEFAULT_BUDGET_MS."
    )
    budget_met: bool = Field(description="total_ms + SNNET_NETWORK_MS <= latency_budget_ms.")
    best_effort: bool = Field(
        False,
        description="The budget was below what the server promises to meet (SNNET_SLO_TARGET "
        "of the time, 99% by default): it found the server idle and no stitch met the budget "
        "with the full safety margin, so the fastest stitch served it, as it met the budget "
        "with the margin fitted to 95% of an idle server's answers (refuse_quantile in GET "
        "/controller; lower for a promise under 0.95). Counted in "
        "snnet_best_effort_total, not in the attainment.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "predictions": [
                    [
                        {"label": "7", "class_index": 7, "score": 0.98},
                        {"label": "1", "class_index": 1, "score": 0.01},
                    ]
                ],
                "stitch": {
                    "id": 2,
                    "description": "vit_base[0:6]",
                    "gflops": 0.0194,
                    "accuracy": 97.6,
                },
                "timing": {
                    "queue_ms": 0.4,
                    "compute_ms": 3.1,
                    "total_ms": 4.2,
                    "predicted_ms": 3.9,
                },
                "latency_budget_ms": 50.0,
                "budget_met": True,
                "best_effort": False,
            }
        }
    )


class StitchInfo(BaseModel):
    id: int
    description: str
    anchors: list[str]
    gflops: float = Field(
        description="Compute per image in GFLOPs, full precision (small models are fractions: "
        "0.000105 GFLOPs is 0.105 MFLOPs; `snnet stitches` and the page at / print MFLOPs then)."
    )
    params_m: float
    accuracy: float | None
    latency_ms: dict[str, float] = Field(
        description="Profiled median ms on this device, by batch size: measured, or estimated "
        "from GFLOPs where `measured` is false."
    )
    measured: bool = Field(
        description="Whether latency_ms was measured on this device (false: estimated from "
        "GFLOPs at start-up within SNNET_PROFILE_SECONDS; predicted_ms learns it online)."
    )
    predicted_ms: dict[str, float] = Field(
        description="What the scheduler predicts now (profile x online correction)."
    )
    pareto: bool = Field(description="On the accuracy/GFLOPs Pareto front.")


STITCH_EXAMPLE = {
    "id": 34,
    "description": "vit_small[0:6] -> vit_base[5:6]",
    "anchors": ["vit_small_patch16_224", "vit_base_patch16_224"],
    "gflops": 0.00615,
    "params_m": 0.41,
    "accuracy": 97.1,
    "latency_ms": {"1": 1.9, "2": 2.1, "4": 2.4, "8": 3.0},
    "measured": True,
    "predicted_ms": {"1": 2.0, "2": 2.2, "4": 2.5, "8": 3.1},
    "pareto": True,
}
StitchInfo.model_config["json_schema_extra"] = {"example": STITCH_EXAMPLE}


class AnchorInfo(BaseModel):
    name: str = Field(description="The timm model name it was built from.")
    short_name: str = Field(description="Its name in stitch descriptions.")
    display_name: str = Field(
        description="What it is: the manifest's display name, else the timm name and the "
        "overrides that change its architecture."
    )


ANCHOR_EXAMPLE = {
    "name": "vit_small_patch16_224",
    "short_name": "vit_small",
    "display_name": "ViT, width 16, 2 heads, depth 6, 7x7 patches of 28x28 grey",
}


class StitchesResponse(BaseModel):
    model: str = Field(description="The served model's name (SNNET_MODEL_NAME).")
    device: str
    dtype: str
    profile: str = Field(
        description="How this device's latency figures were had at start-up: from the "
        "checkpoint's manifest, the profile cache, or measured (how many stitches, where they "
        "are kept, how many were estimated), and the calibration to serving."
    )
    anchors: list[AnchorInfo]
    stitches: list[StitchInfo]

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "model": "snnet",
                "device": "cpu",
                "dtype": "float32",
                "profile": "measured 35 stitches in 9 s, kept in /srv/snnet/weights/profiles.json; "
                "calibrated as measured (x1.00 + 0.49 ms at batch 1, x1.00 + 0.52 ms at batch 8)",
                "anchors": [ANCHOR_EXAMPLE],
                "stitches": [STITCH_EXAMPLE],
            }  # fmt: skip
        }
    )


class HealthResponse(BaseModel):
    status: str = Field(examples=["ok"])


class ReadyResponse(BaseModel):
    ready: bool = Field(examples=[True])
    detail: str = Field(examples=["ready"])


class ErrorResponse(BaseModel):
    detail: str = Field(examples=["unknown stitch_id 99; valid ids are 0..34 (GET /stitches)"])


class V2ErrorResponse(BaseModel):
    """An error of the Open Inference Protocol routes (/v2/...)."""

    error: str = Field(
        examples=["unknown version '99' of 'weights': a version is a stitch id, 0..34"]
    )


class FleetState(BaseModel):
    arrival_rate: float | None = Field(description="Requests/s across all replicas.")
    replicas: int | None = Field(description="Ready replicas Prometheus sees.")
    attainment: float | None = Field(description="Budget met / (met + missed + shed), fleet.")
    corrections: dict[str, float] = Field(description="Fleet observed/profiled time by stitch.")
    error: str | None = Field(description="Last query error, if the last query failed.")
    age_s: float | None = Field(description="Seconds since the last successful query.")


class ControllerMix(BaseModel):
    cheaper_stitch: int = Field(description="Hull stitch just under the load level's cost cap.")
    dearer_stitch: int = Field(description="Hull stitch just over it.")
    dearer_share: float = Field(
        description="Share of budget-driven requests allowed up to the dearer stitch, so that "
        "the mean per-image cost meets the cap."
    )


class ControllerState(BaseModel):
    load_level: float = Field(
        description="0: budget-driven requests may use every stitch; 1: only the cheapest."
    )
    load_level_from_rate: float = Field(
        description="Feed-forward term: arrival rate x per-image cost."
    )
    load_level_from_queue: float = Field(
        description="Feedback term: queued work from a quarter (0) to three quarters (1) of the "
        "mean budget."
    )
    arrival_rate: float = Field(description="Classify requests/s (smoothed).")
    image_rate: float = Field(description="Images/s (smoothed).")
    images_per_request: float
    mean_budget_ms: float | None = Field(description="Mean budget of recent requests that had one.")
    queued_work_ms: float = Field(
        description="Predicted compute of the work waiting (not the batch in flight)."
    )
    margin: float = Field(
        description="Safety margin, its share: the planner pads a prediction p of the time "
        "outside the model queue to p * (1 + margin) + margin_ms. The pair covers "
        "margin_quantile of the answers of the last 30 s (at most 256): the overruns are "
        "normalised by the prediction plus a fixed part c, the c whose answers below and above "
        "the median prediction have the closest tails is taken, and the share is the "
        "margin_quantile quantile of an exponential tail fitted to the top 10% of them (at "
        "least 5); margin_ms = share * c. Share at most 0.5. A prior (0.2 at the default "
        "99.5%) and no fixed part for the first 5 answers; until 20, c is the geometric mean of "
        "the smallest and the median prediction and the share a log-normal's bound at "
        "margin_quantile if wider than the prior."
    )
    margin_ms: float = Field(
        0.0,
        description="Safety margin, its fixed part in ms (at most half the median prediction): "
        "stalls that cost about the same whatever the prediction.",
    )
    estimate_pad: float = Field(
        1.0,
        description="Factor on the predictions of stitches whose latency is estimated and that "
        "have not run yet: the largest observed / predicted of the last 8 estimated stitches' "
        "first runs (1 to 1.5).",
    )
    rest_margin: float = Field(
        0.2,
        description="The same over the requests served alone (planned with nothing else in the "
        "HTTP layer or the model and no 503 in the last second, and no request arriving before "
        "their answer): the margin of an idle server, which a request that finds the server "
        "idle is planned with and a 422's least budget counts. Their last 256 whatever their "
        "age: it moves only when the server is seen idle again.",
    )
    rest_margin_ms: float = Field(0.0, description="The fixed part of rest_margin, ms.")
    rest_answers: int = Field(
        0,
        description="How many requests served alone rest_margin is fitted to (at most 256; the "
        "prior below 5).",
    )
    rest_answers_contended: int = Field(
        0,
        description="Of them, how many waited for a CPU for over a tenth of their time (other "
        "work on the machine, though none in the server): they count until 30 s old, the others "
        "until newer ones replace them.",
    )
    refuse_margin: float = Field(
        0.2,
        description="The idle server's margin fitted to cover refuse_quantile of the requests "
        "served alone (rest_margin: margin_quantile; with the same fixed scale, so never "
        "wider): a budget that no "
        "stitch meets with rest_margin but the fastest meets with this one is served by the "
        "fastest stitch (best_effort), not refused; a 422 says the budget is below what the "
        "fastest stitch needs with it.",
    )
    refuse_margin_ms: float = Field(0.0, description="The fixed part of refuse_margin, ms.")
    target_utilisation: float
    slo_target: float = Field(
        ge=SLO_RANGE[0],
        le=SLO_RANGE[1],
        description="The share of answered requests the server promises within their budget "
        "(SNNET_SLO_TARGET, 0.99 by default; best-effort answers apart).",
    )
    margin_quantile: float = Field(
        gt=0,
        lt=1,
        description="The share of answers the safety margins cover: 1 - (1 - slo_target) / 2 "
        "(half the misses the promise allows; the other half is left to estimation error).",
    )
    refuse_quantile: float = Field(
        gt=0,
        lt=1,
        description="The share of an idle server's answers refuse_margin covers: 0.95, or "
        "2 x margin_quantile - 1 if lower (a promise under 0.95), at least 0.9.",
    )
    allowed_stitches: list[int] = Field(
        description="Stitches requests may use while the server is busy, most accurate first "
        "(a request that finds the server idle may use every stitch)."
    )
    cold_start_ms: float = Field(
        0.0,
        description="How much longer than predicted, in ms, batches ran that started after the "
        "model had been idle over 50 ms (learned; seeded at start-up by the median of three "
        "batches after a pause; below 0 where predictions run high).",
    )
    cold_start_planned_ms: float = Field(
        0.0,
        ge=0.0,
        description="What a request that finds the model idle that long is planned with on top "
        "of its compute: cold_start_ms, at least 0.",
    )
    cold_start_at_rest_ms: float = Field(
        0.0,
        ge=0.0,
        description="The start-up measurement of the same, on a quiet machine: what a 422 (a "
        "budget no idle server meets) may count; more than that after a pause is load (503).",
    )
    device_factor: float = Field(
        description="How much slower (>1) or faster than its profile this device runs now, for "
        "every stitch: start-up calibration, then observed / predicted compute."
    )
    idle_device_factor: float = Field(
        1.0,
        description="The device factor of an idle server: start-up's calibration, then what "
        "periods whose answers were all served alone showed. A device_factor above it is "
        "load (CPU contention), which a 422 never counts.",
    )
    corrections: dict[str, float] = Field(
        description="Observed / profiled compute time by stitch: the device factor times the "
        "stitch's own factor."
    )
    updates: int = Field(description="Controller iterations so far.")
    fleet: FleetState | None = Field(description="Figures from SNNET_PROMETHEUS_URL, if set.")
    mix: ControllerMix | None = Field(
        None, description="How requests alternate between two hull stitches at this level."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "load_level": 0.35,
                    "load_level_from_rate": 0.35,
                    "load_level_from_queue": 0.1,
                    "arrival_rate": 42.0,
                    "image_rate": 168.0,
                    "images_per_request": 4.0,
                    "mean_budget_ms": 100.0,
                    "queued_work_ms": 12.5,
                    "margin": 0.08,
                    "margin_ms": 1.5,
                    "target_utilisation": 0.8,
                    "slo_target": 0.99,
                    "margin_quantile": 0.995,
                    "refuse_quantile": 0.95,
                    "allowed_stitches": [1, 20, 3, 0],
                    "device_factor": 1.3,
                    "corrections": {"0": 1.32, "1": 1.27},
                    "updates": 1200,
                    "fleet": None,
                }
            ]
        }
    )


# -- the Open Inference Protocol (V2) ------------------------------------------------------------


class V2Live(BaseModel):
    live: bool = Field(examples=[True])


class V2Ready(BaseModel):
    ready: bool = Field(examples=[True])


class V2ServerMetadata(BaseModel):
    name: str = Field(examples=["snnet-serve"])
    version: str = Field(examples=["0.1.0"])
    extensions: list[str] = Field(examples=[["classification", "binary_tensor_data", "parameters"]])


class V2TensorMetadata(BaseModel):
    name: str = Field(examples=["image"])
    datatype: str = Field(examples=["BYTES"])
    shape: list[int] = Field(description="-1 for a variable dimension.", examples=[[-1]])


class V2ModelMetadata(BaseModel):
    name: str = Field(examples=["weights"])
    versions: list[str] = Field(description="One per stitch: its id.", examples=[["0", "1", "2"]])
    platform: str = Field(examples=["pytorch_snnet"])
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ConfigTensor(BaseModel):
    name: str = Field(examples=["image"])
    data_type: str = Field(description="Triton's type name: TYPE_STRING (BYTES), TYPE_FP32.")
    dims: list[int] = Field(description="The full shape (max_batch_size 0: no implicit batch).")


class V2ModelConfig(BaseModel):
    """Triton's model configuration (its ``model_configuration`` extension), for tools that read
    it before inferring (perf_analyzer, model_analyzer)."""

    name: str = Field(examples=["weights"])
    platform: str = Field(examples=["pytorch_snnet"])
    max_batch_size: int = Field(
        description="0: the shapes are full; a request carries 1..max_images_per_request images "
        "along its first dimension (parameters)."
    )
    input: list[V2ConfigTensor]
    output: list[V2ConfigTensor]
    version_policy: dict[str, dict[str, list[int]]] = Field(
        description="The versions: one per stitch, its id."
    )
    parameters: dict[str, dict[str, str]] = Field(
        description="max_images_per_request, stitches, and how a version is chosen."
    )


class V2ModelReady(BaseModel):
    name: str = Field(examples=["weights"])
    ready: bool = Field(examples=[True])


class V2OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float | str] | None = Field(None, description="Absent when sent as binary data.")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size if binary.")


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="The stitch that answered.")
    id: str | None = Field(None, description="The request's id, echoed.")
    parameters: dict[str, Any] = Field(
        description="stitch_id, stitch, gflops, accuracy, queue_ms, compute_ms, total_ms, "
        "predicted_ms, latency_budget_ms, budget_met, best_effort."
    )
    outputs: list[V2OutputTensor]

    model_config = ConfigDict(
        protected_namespaces=(),  # the protocol's own field names start with "model_"
        json_schema_extra={
            "example": {
                "model_name": "weights",
                "model_version": "2",
                "id": "req-1",
                "parameters": {"stitch_id": 2, "gflops": 0.0004, "budget_met": True},
                "outputs": [
                    {"name": "labels", "datatype": "BYTES", "shape": [1, 1], "data": ["0.98:7:7"]}
                ],
            }
        },
    )


V2_INFER_EXAMPLE = {
    "id": "req-1",
    "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [DIGIT_PNG_B64]}],
    "outputs": [{"name": "labels"}],
    "parameters": {"latency_budget_ms": 50, "top_k": 3},
}
