"""The HTTP API and web page: FastAPI app over a dynamic batcher, with bounds, API key and Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import torch
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..inference import check_min_score, top_label
from ..transforms import ImageLoadError, ImageTooLarge, decode_image
from .batcher import DynamicBatcher, QueueFull
from .docs_page import DOCS_PAGE_HEADERS, docs_page
from .engine import InferenceEngine
from .protocol import error_payload
from .workers import DecodeBusy, DecodeQueue

API_KEY_ENV = "ECANFNET_API_KEY"
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")
DEFAULT_TOP_K = 5
log = logging.getLogger("ecanfnet")
B, T = TypeVar("B"), TypeVar("T")
# The key's two headers, declared in the OpenAPI document (the check itself is api_key_check's).
KEY_NOTE = "the server's API key; needed only when it was started with --api-key or $ECANFNET_API_KEY"
BEARER = HTTPBearer(auto_error=False, scheme_name="bearer", description=f"`Authorization: Bearer KEY`: {KEY_NOTE}")
X_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKeyHeader",
                         description=f"`X-API-Key: KEY`: {KEY_NOTE}")


@dataclass
class ServeSettings:
    """Limits and batching of the server (each one a `serve` flag)."""

    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 64                     # images waiting for a batch; beyond it -> 503
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    timeout_s: float = 30.0                 # per request once its body is in, decoding and queueing included -> 504
    body_timeout_s: float = 10.0            # to receive the whole body, before the request is admitted -> 408
    api_key: str | None = None
    decode_workers: int = 0                 # 0: one per CPU, at most 8
    decode: str = "exact"                   # "fast": JPEGs at a reduced DCT scale (load_image)
    allowed_hosts: tuple[str, ...] | None = None  # Host header names accepted besides loopback ones; None: any
    model_name: str | None = None           # the name on /v2/models/{name}; None: the architecture


class Prediction(BaseModel):
    index: int
    label: str
    score: float


class ClassifyResponse(BaseModel):
    label: str
    open_set_score: float
    predictions: list[Prediction]
    model: str
    elapsed_ms: float


class EmbedResponse(BaseModel):
    embedding: list[float]
    dim: int
    normalized: bool
    model: str
    elapsed_ms: float


class Preprocessing(BaseModel):
    image_size: list[int]
    crop_pct: float
    crop_mode: str
    interpolation: str
    mean: list[float]
    std: list[float]


class ModelInfo(BaseModel):
    architecture: str
    model_name: str
    num_classes: int
    labels_count: int
    num_features: int
    input_size: list[int]
    backend: str
    precision: str
    max_batch: int
    max_wait_ms: float
    labels: list[str]
    preprocessing: Preprocessing
    weights_fingerprint: str


class ErrorResponse(BaseModel):
    detail: str


IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                               "properties": {"file": {"type": "string", "format": "binary"}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in {
    401: "missing or wrong API key (when the server has one)",
    408: "the body did not arrive within --body-timeout-s",
    413: "body over --max-upload-bytes, or image over --max-pixels",
    415: "content type is neither multipart/form-data, image/* nor application/octet-stream",
    422: "empty body, no `file` field, not a readable image, or a parameter out of range",
    503: "too many requests in flight, decoding backed up, batch queue full or over --max-connections; retry after "
         "Retry-After seconds",
    504: "not answered within --timeout-s",
}.items()}


class Metrics:
    """Prometheus counters, histograms and gauges of one app (own registry, so apps in one process do not clash)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("ecanfnet_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("ecanfnet_request_latency_seconds", "Request latency by endpoint", ["endpoint"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.batch_size = Histogram("ecanfnet_batch_size", "Images per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.queue_depth = Gauge("ecanfnet_queue_depth", "Images waiting for a batch", registry=self.registry)
        self.inflight = Gauge("ecanfnet_inflight_requests", "Image requests admitted and not yet answered",
                              registry=self.registry)
        self.decode_backlog = Gauge("ecanfnet_decode_backlog", "Decode jobs queued or running in the decode threads",
                                    registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def create_app(engine: InferenceEngine, settings: ServeSettings | None = None, explain: Any = None) -> FastAPI:
    """The FastAPI application serving engine under settings (run it with uvicorn); explain: an
    explain_route.ExplainService for POST /v1/explain (None: that route answers 501)."""
    from .explain_route import add_explain_route
    from .v2 import add_v2_routes

    settings = settings or ServeSettings()
    metrics = Metrics()
    images = ImageRequests(engine, settings, metrics)
    # FastAPI's own /docs and /redoc load their scripts from a CDN: /docs is served here instead, offline.
    app = FastAPI(title="ecanfnet", version=_version(), lifespan=images.lifespan, docs_url=None, redoc_url=None,
                  description=f"{engine.name} image classification and embeddings, dynamically batched: the /v1 "
                              "API and the Open Inference Protocol (KServe v2) under /v2.")
    install_error_handlers(app)
    install_middleware(app, settings, metrics)
    keyed = [Depends(api_key_check(settings.api_key))]
    add_api_routes(app, engine, settings, images, keyed=keyed)
    add_v2_routes(app, engine, settings, images, keyed=keyed)
    add_explain_route(app, settings, images, explain, keyed=keyed)
    add_page_routes(app, metrics)
    return app


class ImageRequests:
    """The work of an image request: body (before admission), admission, decoding and the batched forward pass.

    /v1 and /v2 both run through it: one body bound, one admission limit, one decode pool, one batcher.
    """

    def __init__(self, engine: InferenceEngine, settings: ServeSettings, metrics: Metrics) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.decoder = DecodeQueue(settings.decode_workers or min(8, os.cpu_count() or 1))
        metrics.decode_backlog.set_function(lambda: self.decoder.backlog)
        self.batcher: DynamicBatcher | None = None
        self.inflight = 0
        self.max_inflight = settings.max_queue + settings.max_batch
        self.max_images = min(settings.max_batch, settings.max_queue)  # per request (a /v2 batch)
        self.ready = False  # the model has answered its warm-up batch
        self._warm_up_task: asyncio.Task | None = None

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Run the batcher (and the warm-up batch) while the app serves; stop it and the decode threads after."""
        settings = self.settings
        self.batcher = DynamicBatcher(self.engine, settings.max_batch, settings.max_wait_ms, settings.max_queue,
                                      on_batch=self.metrics.batch_size.observe)
        self.metrics.queue_depth.set_function(self.batcher.depth)
        self.batcher.start()
        self._warm_up_task = asyncio.get_running_loop().create_task(self._warm_up())
        yield
        self.ready = False
        self._warm_up_task.cancel()
        await self.batcher.stop()  # uvicorn has already let in-flight requests finish
        self.decoder.shutdown()

    async def _warm_up(self) -> None:
        """One batch of one blank image on the model thread; ready once it is answered (live before)."""
        try:
            await self.batcher.warm_up(torch.zeros(1, 3, *self.engine.image_size))
        except Exception as exc:  # noqa: BLE001 - the server stays up, not ready, and says why
            log.error("the warm-up batch failed, so the server never becomes ready: %s: %s", type(exc).__name__, exc)
            return
        self.ready = True

    async def serve(self, request: Request, read: Callable[[Request, int], Awaitable[B]],
                    work: Callable[[B], Awaitable[T]]) -> T:
        """read(request, max bytes) under --body-timeout-s, then admission, then work(body) under --timeout-s."""
        settings = self.settings
        body = await read_in_time(read(request, settings.max_upload_bytes), settings.body_timeout_s)
        if self.inflight >= self.max_inflight:
            raise HTTPException(503, "server busy: too many requests in flight", headers={"Retry-After": "1"})
        self.inflight += 1
        self.metrics.inflight.inc()
        try:
            # The timeout cancels the work too: a decode not yet started is dropped, and so is a queued
            # image (the batcher skips cancelled requests), so no work outlives its 504 in a queue.
            return await asyncio.wait_for(work(body), settings.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"not answered within {settings.timeout_s:g} s") from None
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()

    async def run(self, request: Request) -> tuple[Any, int]:
        """One /v1 image: (batch output, row) of the batched forward pass."""
        return await self.serve(request, read_image_body, self._one_image)

    async def _one_image(self, body: tuple[bytes, str]) -> tuple[Any, int]:
        data, name = body
        image = await self.decode(_preprocess, self.engine, data, name, self.settings.max_pixels, self.settings.decode)
        (answer,) = await self.forward([image])
        return answer

    async def decode(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in a decode thread, refused (503) unless one starts it within half of --timeout-s."""
        # The other half is for the decode itself and the batch, so started work gets answered; overload is shed.
        start_by = time.monotonic() + self.settings.timeout_s / 2
        try:
            return await self.decoder.run(start_by, fn, *args)
        except DecodeBusy:
            raise HTTPException(503, "server busy: image decoding is backed up",
                                headers={"Retry-After": "1"}) from None

    async def forward(self, images: list[torch.Tensor]) -> list[tuple[Any, int]]:
        """Preprocessed images through the batcher, all queued or none (503): (batch output, row) each."""
        try:
            return await self.batcher.submit_many(images)
        except QueueFull:
            raise HTTPException(503, "server busy: the batch queue is full", headers={"Retry-After": "1"}) from None


def install_middleware(app: FastAPI, settings: ServeSettings, metrics: Metrics) -> None:
    """The Host check (against DNS rebinding) and the request counters."""

    @app.middleware("http")
    async def check_host(request: Request, call_next):
        # A page on another site whose name resolves to 127.0.0.1 (DNS rebinding) sends its own name as Host.
        host = request.headers.get("host")
        if settings.allowed_hosts is not None and host is not None and not host_allowed(host, settings.allowed_hosts):
            return error_response(421, f"Host header {host[:100]!r} is not a name of this server: it is bound to "
                                       "loopback and answers only localhost, 127.x.x.x or [::1] (see --allow-host)",
                                  path=request.url.path)
        return await call_next(request)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "other")
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def api_key_check(api_key: str | None) -> Callable[[Request], None]:
    """A FastAPI dependency raising 401 unless the request carries api_key (none: every request passes)."""

    def require_api_key(request: Request, _bearer: Any = Security(BEARER), _header: Any = Security(X_API_KEY)) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send it as `Authorization: Bearer KEY` or "
                                     "`X-API-Key: KEY`", headers={"WWW-Authenticate": "Bearer"})

    return require_api_key


def add_api_routes(app: FastAPI, engine: InferenceEngine, settings: ServeSettings, images: ImageRequests, *,
                   keyed: list[Any]) -> None:
    """POST /v1/classify, POST /v1/embed and GET /v1/model (behind the API key when there is one)."""

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS, openapi_extra=IMAGE_BODY,
              dependencies=keyed, summary="Top-k classes of one image")
    async def classify(request: Request, top_k: int | None = Query(
            None, description=f"classes to return, at least 1 (default {DEFAULT_TOP_K}; more than num_classes "
                              "returns every class, as `ecanfnet predict --top-k` does)"),
            min_score: float | None = Query(None, description="open-set threshold: below it `label` is `unknown` "
                                                              "(the predictions stay), as `ecanfnet predict "
                                                              "--min-score` does")):
        if top_k is not None and top_k < 1:
            raise HTTPException(422, f"top_k must be at least 1, got {top_k}")
        try:
            min_score = check_min_score(min_score)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        top_k = min(top_k or DEFAULT_TOP_K, engine.num_classes)
        start = time.perf_counter()
        output, row = await images.run(request)
        scores, indices = output.probabilities[row].topk(top_k)
        predictions = [Prediction(index=int(i), label=engine.labels[int(i)], score=float(s))
                       for s, i in zip(scores.tolist(), indices.tolist())]
        open_set_score = float(output.open_set_scores[row])
        return ClassifyResponse(label=top_label(predictions[0].label, open_set_score, min_score),
                                open_set_score=open_set_score, predictions=predictions, model=engine.name,
                                elapsed_ms=_ms_since(start))

    @app.post("/v1/embed", response_model=EmbedResponse, responses=ERRORS, openapi_extra=IMAGE_BODY,
              dependencies=keyed, summary="Pooled pre-logit embedding of one image")
    async def embed(request: Request, normalize: bool = Query(False, description="L2-normalise the vector")):
        start = time.perf_counter()
        output, row = await images.run(request)
        vector = output.embeddings[row]
        if normalize:
            vector = torch.nn.functional.normalize(vector, dim=0)
        return EmbedResponse(embedding=vector.tolist(), dim=int(vector.numel()), normalized=normalize,
                             model=engine.name, elapsed_ms=_ms_since(start))

    @app.get("/v1/model", response_model=ModelInfo, dependencies=keyed,
             responses={401: ERRORS[401]}, summary="What is being served")
    async def model_info():
        return info

    info = ModelInfo(architecture=engine.name, model_name=settings.model_name or engine.name,
                     num_classes=engine.num_classes, labels_count=len(engine.labels),
                     num_features=engine.num_features, input_size=[3, *engine.image_size], backend=engine.backend,
                     precision=engine.precision, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                     labels=engine.labels, preprocessing=Preprocessing(**engine.eval_settings),
                     weights_fingerprint=engine.weights_fingerprint)


def add_page_routes(app: FastAPI, metrics: Metrics) -> None:
    """GET /healthz, /metrics, /docs, the web page at / and its static files."""

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return HTMLResponse(docs_page(app.openapi()), headers=DOCS_PAGE_HEADERS)

    @app.get("/healthz", summary="Liveness: 200 while the server runs")
    async def healthz():
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    static = resources.files("ecanfnet.serving") / "static"

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(str(static / "index.html"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")


async def read_in_time(reading: Awaitable[B], timeout_s: float) -> B:
    """A body read (read_image_body, read_capped_body) within timeout_s, else 408 (and the connection is closed:
    its body is still arriving)."""
    try:
        return await asyncio.wait_for(reading, timeout_s)
    except asyncio.TimeoutError:
        raise HTTPException(408, f"the body did not arrive within {timeout_s:g} s (--body-timeout-s)",
                            headers={"Connection": "close"}) from None


async def read_image_body(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """The image bytes of a multipart `file` field or a raw image body, and a name for error messages."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = ctype == "multipart/form-data"
    if ctype and not multipart and not ctype.startswith(RAW_IMAGE_TYPES):
        raise HTTPException(415, f"unsupported content type {ctype!r}: send multipart/form-data with the image in "
                                 "field `file`, or the raw image with Content-Type image/* or application/octet-stream")
    body = await read_capped_body(request, max_bytes)
    if not multipart:
        if not body:
            raise HTTPException(422, "empty body: send an image")
        return body, "request body"
    return await _multipart_file(request, body)


async def read_capped_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, 413 as soon as it is known to be over max_bytes, 400 if the client leaves before its end."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"body of {int(declared):,} bytes is over the limit of {max_bytes:,}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise HTTPException(413, f"body is over the limit of {max_bytes:,} bytes")
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected before sending the whole body") from None
    return bytes(body)


async def _multipart_file(request: Request, body: bytes) -> tuple[bytes, str]:
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except Exception as exc:  # noqa: BLE001 - any malformed multipart body is the client's error
        raise HTTPException(422, f"malformed multipart body: {getattr(exc, 'message', None) or exc}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise HTTPException(422, "the multipart form has no file field named `file`")
    data = await upload.read()
    name = upload.filename or "file"
    await form.close()
    return data, name


def _preprocess(engine: InferenceEngine, data: bytes, name: str, max_pixels: int,
                decode: str = "exact") -> torch.Tensor:
    """Decode + eval transform (in a worker thread); image errors become 413/422 naming the reason."""
    try:
        min_size = getattr(engine.transform, "min_decode_size", None)
        return engine.transform(decode_image(data, name, max_pixels, decode, min_size))
    except ImageTooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except ImageLoadError as exc:
        raise HTTPException(422, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a decoder bug on hostile input is still the input's fault
        raise HTTPException(422, f"{name}: cannot decode ({type(exc).__name__}: {exc})") from None


def install_error_handlers(app: FastAPI) -> None:
    """Every error response, FastAPI's and Starlette's own included, is {"detail": "<one line>"} (/v2: "error")."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), exc.headers, path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "; ".join(_validation_text(e) for e in exc.errors()) or "invalid request",
                              path=request.url.path)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error_response(500, "internal server error", path=request.url.path)


def error_response(status: int, detail: str, headers: dict[str, str] | None = None, *, path: str = "") -> JSONResponse:
    """The JSON error body of every error: {"detail": "<one line>"}, or {"error": ...} under /v2 (its protocol's)."""
    return JSONResponse(error_payload(path, detail), status_code=status, headers=headers)


def _validation_text(error: dict[str, Any]) -> str:
    field = ".".join(str(part) for part in error.get("loc", ()) if part not in ("query", "body", "path", "header"))
    given = error.get("input")
    shown = f" (got {given!r:.60})" if isinstance(given, (str, int, float)) else ""
    return f"{field or 'request'}: {error.get('msg', 'invalid')}{shown}"


def host_allowed(host: str, extra: tuple[str, ...] = ()) -> bool:
    """Whether a Host header (with or without port) names loopback (localhost, 127.x.x.x, [::1]) or one of extra."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.split(":")[0]
    name = name.rstrip(".")
    if name == "localhost" or name in extra:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def _version() -> str:
    from .. import __version__

    return __version__

