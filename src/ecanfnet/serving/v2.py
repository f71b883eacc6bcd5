"""The Open Inference Protocol (KServe v2) under /v2: health, server and model metadata, and inference.

Inference runs through the same machinery as /v1 (ImageRequests: body bound and timeout, admission,
decode threads, the dynamic batcher, the request timeout), behind the same API key, counted by the
same metrics; errors are {"error": "<one line>"}, as the protocol has them. The wire format is oip.py's.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel

from .app import DEFAULT_TOP_K, ImageRequests, ServeSettings, _preprocess, read_capped_body
from .engine import InferenceEngine
from .oip import (
    HEADER_LENGTH, INPUT_BYTES, INPUT_PIXELS, INPUT_TYPES, OUTPUT_EMBEDDING, OUTPUT_INDICES, OUTPUT_LABELS,
    OUTPUT_OPEN_SET, OUTPUT_PROBABILITIES, OUTPUT_SCORES, OUTPUT_TYPES, InferRequest, encode_infer_response,
    parse_infer_request)

MODEL_VERSION = "1"  # one model, one version
EXTENSIONS = ["binary_tensor_data"]
PLATFORMS = {"torch": "pytorch", "compile": "pytorch", "onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}


class V2Error(BaseModel):
    """An error under /v2: one line naming the reason."""

    error: str


class ServerMetadata(BaseModel):
    """GET /v2: the server's name, version and protocol extensions."""

    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    """A tensor of the model: name, datatype and shape (-1: any size)."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """GET /v2/models/NAME: versions, platform (the backend) and tensors."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class Liveness(BaseModel):
    """GET /v2/health/live."""

    live: bool


class Readiness(BaseModel):
    """Server or model readiness (only ever true: not ready is a 400 error)."""

    name: str | None = None
    ready: bool


class OutputTensor(BaseModel):
    """An output tensor: its values in data, or its size in parameters.binary_data_size."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    """The answer to an inference request (its JSON part)."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


V2_ERRORS = {code: {"model": V2Error, "description": text} for code, text in {
    400: "a malformed inference request (JSON, tensor names, datatypes, shapes, base64, binary sizes), "
         "or a batch over --max-batch",
    401: "missing or wrong API key (when the server has one)",
    404: "no such model or version",
    408: "the body did not arrive within --body-timeout-s",
    413: "body over --max-upload-bytes, or an image over --max-pixels",
    415: "a compressed body (Content-Encoding)",
    422: "an image that is not readable (the decoder's reason)",
    503: "too many requests in flight, decoding backed up or batch queue full; retry after Retry-After seconds",
    504: "not answered within --timeout-s",
}.items()}
NOT_READY = {400: {"model": V2Error, "description": "not ready yet: the model is warming up"}}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "description": "top_k (default 5), binary_data_output"},
        "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"]}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"]}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": "the JSON request, then binary tensor data "
                                                           "(header Inference-Header-Content-Length)"}}}}}


def add_v2_routes(app: FastAPI, engine: InferenceEngine, settings: ServeSettings, images: ImageRequests, *,
                  keyed: list[Any]) -> None:
    """The /v2 routes: health (no key), server and model metadata, model readiness and inference (keyed)."""
    from .. import __version__

    name = settings.model_name or engine.name
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])
    metadata = model_metadata(engine, name)

    def check_model(model_name: str, model_version: str | None = None) -> None:
        if model_name != name:
            raise HTTPException(404, f"unknown model {model_name[:80]!r}: this server serves {name!r}")
        if model_version not in (None, MODEL_VERSION):
            raise HTTPException(404, f"model {name} has no version {model_version[:40]!r}: its one version is "
                                     f"{MODEL_VERSION}")

    def ready_or_400(**fields: Any) -> Readiness:
        if not images.ready:
            raise HTTPException(400, "not ready: the model is warming up")
        return Readiness(ready=True, **fields)

    @router.get("/health/live", response_model=Liveness, summary="Liveness: 200 while the server runs")
    async def live():
        return Liveness(live=True)

    @router.get("/health/ready", response_model=Readiness, response_model_exclude_none=True, responses=NOT_READY,
                summary="Readiness: 200 once the model is loaded and has run its warm-up batch, else 400")
    async def server_ready():
        return ready_or_400()

    @router.get("", response_model=ServerMetadata, dependencies=keyed, summary="Server metadata",
                responses={401: V2_ERRORS[401]})
    async def server_metadata():
        return ServerMetadata(name="ecanfnet", version=__version__, extensions=EXTENSIONS)

    _add_model_routes(router, check_model, ready_or_400, metadata, keyed=keyed)
    _add_infer_routes(router, check_model, engine, settings, images, name=name, keyed=keyed)
    app.include_router(router)


def _add_model_routes(router: APIRouter, check_model, ready_or_400, metadata: ModelMetadata, *,
                      keyed: list[Any]) -> None:
    """GET /v2/models/{name}[/versions/{v}] (metadata) and .../ready."""
    errors = {code: V2_ERRORS[code] for code in (401, 404)}

    @router.get("/models/{model_name}", response_model=ModelMetadata, dependencies=keyed, responses=errors,
                summary="Model metadata: versions, platform, input and output tensors")
    async def model(model_name: str):
        check_model(model_name)
        return metadata

    @router.get("/models/{model_name}/versions/{model_version}", response_model=ModelMetadata,
                dependencies=keyed, responses=errors, summary="Model metadata of a version")
    async def model_version(model_name: str, model_version: str):
        check_model(model_name, model_version)
        return metadata

    @router.get("/models/{model_name}/ready", response_model=Readiness, dependencies=keyed,
                responses={**errors, **NOT_READY}, summary="Model readiness: 200 once warmed up, else 400")
    async def model_ready(model_name: str):
        check_model(model_name)
        return ready_or_400(name=model_name)

    @router.get("/models/{model_name}/versions/{model_version}/ready", response_model=Readiness,
                dependencies=keyed, responses={**errors, **NOT_READY}, summary="Model readiness of a version")
    async def model_version_ready(model_name: str, model_version: str):
        check_model(model_name, model_version)
        return ready_or_400(name=model_name)


def _add_infer_routes(router: APIRouter, check_model, engine: InferenceEngine, settings: ServeSettings,
                      images: ImageRequests, *, name: str, keyed: list[Any]) -> None:
    """POST /v2/models/{name}[/versions/{v}]/infer."""

    async def infer(request: Request) -> Response:
        header_length = request.headers.get(HEADER_LENGTH)

        async def work(body: bytes) -> tuple[bytes, dict[str, str]]:
            deadline = time.monotonic() + settings.timeout_s
            parsed, batch = await images.decode(partial(prepare_batch, max_images=images.max_images,
                                                        deadline=deadline), engine, body, header_length, settings)
            answers = await images.forward(batch)
            return encode_infer_response(model_name=name, model_version=MODEL_VERSION, request_id=parsed.request_id,
                                         tensors=output_tensors(engine, parsed, answers))

        content, headers = await images.serve(request, read_v2_body, work)
        return Response(content, headers=headers)

    summary = ("Classify a batch: encoded images (input `image_bytes`, BYTES) or preprocessed pixels (input "
               "`images`, FP32) -> top-k indices, scores and labels; embedding, probabilities and open-set score on "
               "request")

    @router.post("/models/{model_name}/infer", response_model=InferResponse, response_model_exclude_none=True,
                 dependencies=keyed, responses=V2_ERRORS, openapi_extra=INFER_BODY, summary=summary)
    async def model_infer(request: Request, model_name: str):
        check_model(model_name)
        return await infer(request)

    @router.post("/models/{model_name}/versions/{model_version}/infer", response_model=InferResponse,
                 response_model_exclude_none=True, dependencies=keyed, responses=V2_ERRORS,
                 openapi_extra=INFER_BODY, summary="Classify a batch, with a model version")
    async def model_version_infer(request: Request, model_name: str, model_version: str):
        check_model(model_name, model_version)
        return await infer(request)


def model_metadata(engine: InferenceEngine, name: str) -> ModelMetadata:
    """The model's metadata: its one version, platform, the two inputs (one per request) and the outputs."""
    height, width = engine.image_size
    shapes = {INPUT_BYTES: [-1], INPUT_PIXELS: [-1, 3, height, width], OUTPUT_INDICES: [-1, -1],
              OUTPUT_SCORES: [-1, -1], OUTPUT_LABELS: [-1, -1], OUTPUT_EMBEDDING: [-1, engine.num_features],
              OUTPUT_PROBABILITIES: [-1, engine.num_classes], OUTPUT_OPEN_SET: [-1]}
    return ModelMetadata(
        name=name, versions=[MODEL_VERSION], platform=PLATFORMS.get(engine.backend, engine.backend),
        inputs=[TensorMetadata(name=n, datatype=t, shape=shapes[n]) for n, t in INPUT_TYPES.items()],
        outputs=[TensorMetadata(name=n, datatype=t, shape=shapes[n]) for n, t in OUTPUT_TYPES.items()])


async def read_v2_body(request: Request, max_bytes: int) -> bytes:
    """The raw body of an inference request (JSON, then any binary data), bounded as every body is."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise HTTPException(415, f"compressed bodies (Content-Encoding: {encoding[:20]}) are not accepted: send "
                                 "the request uncompressed")
    return await read_capped_body(request, max_bytes)


def prepare_batch(engine: InferenceEngine, body: bytes, header_length: str | None, settings: ServeSettings, *,
                  max_images: int, deadline: float) -> tuple[InferRequest, list[torch.Tensor]]:
    """In a decode thread: the parsed request and its images, decoded and preprocessed (or the pixels as given)."""
    parsed = parse_infer_request(body, header_length, image_size=engine.image_size, max_images=max_images,
                                 default_top_k=DEFAULT_TOP_K)
    if parsed.pixels is not None:
        return parsed, list(torch.from_numpy(parsed.pixels))
    batch = []
    for i, data in enumerate(parsed.images):
        if time.monotonic() > deadline:  # the request has had its 504: decode no more of it
            raise HTTPException(504, f"not answered within {settings.timeout_s:g} s")
        batch.append(_preprocess(engine, data, f"image {i}", settings.max_pixels, settings.decode))
    return parsed, batch


def output_tensors(engine: InferenceEngine, parsed: InferRequest,
                   answers: list[tuple[Any, int]]) -> list[tuple[str, np.ndarray, bool]]:
    """The requested outputs of a batch's answers, in the request's order."""
    probabilities = torch.stack([output.probabilities[row] for output, row in answers])
    scores, indices = probabilities.topk(min(parsed.top_k, engine.num_classes), dim=1)
    makers = {
        OUTPUT_INDICES: lambda: indices.numpy().astype(np.int64),
        OUTPUT_SCORES: lambda: scores.numpy(),
        OUTPUT_LABELS: lambda: np.array([[engine.labels[i] for i in row] for row in indices.tolist()], dtype=object),
        OUTPUT_EMBEDDING: lambda: torch.stack([output.embeddings[row] for output, row in answers]).numpy(),
        OUTPUT_PROBABILITIES: lambda: probabilities.numpy(),
        OUTPUT_OPEN_SET: lambda: torch.stack([output.open_set_scores[row] for output, row in answers]).numpy(),
    }
    return [(name, makers[name](), binary) for name, binary in parsed.outputs]

