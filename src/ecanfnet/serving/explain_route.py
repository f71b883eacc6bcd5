"""POST /v1/explain: one uploaded image's crop with a class-activation heatmap over it, as JSON carrying a PNG.

The request goes through the same machinery as /v1/classify (body bound and timeout, admission, API key, the
decode threads, the request timeout, the error shape), but not through the batcher: the map needs autograd on
the eager torch model, so it runs in a thread of its own, one explanation at a time, with at most
MAX_WAITING more queued (beyond that 503 at once) and none started after half of --timeout-s (503 too).
"""

from __future__ import annotations

import base64
import time
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from pydantic import BaseModel

from ..choices import EXPLAIN_METHODS
from ..explain import ClassError, Explainer, Explanation, grad_cam_missing
from .app import (
    ERRORS, IMAGE_BODY, ErrorResponse, ImageRequests, ServeSettings, _ms_since, _preprocess, read_image_body)
from .workers import DecodeBusy, DecodeQueue

MAX_WAITING = 4  # explanations queued behind the running one before requests get 503
UNAVAILABLE = 501
BUSY = "server busy: explanations are backed up"


class ExplainResponse(BaseModel):
    """The explained class (index, label, its probability), the top class, and the overlay: a base64 PNG of the
    crop the model saw (width x height)."""

    index: int
    label: str
    probability: float
    top_index: int
    method: str
    width: int
    height: int
    overlay_png: str
    model: str
    elapsed_ms: float


class ExplainService:
    """The explainer of the served model and the one thread its explanations run in; or why there is none."""

    def __init__(self, explainer: Explainer | None, unavailable: str | None = None) -> None:
        self.explainer = explainer
        self.unavailable = unavailable if explainer is None else None
        self.queue = DecodeQueue(1, slack=MAX_WAITING)

    @classmethod
    def for_model(cls, model: torch.nn.Module, device: torch.device | str | None = None) -> ExplainService:
        """An explainer of model on device (kept besides the engine's copy), or a service saying why there is none."""
        missing = grad_cam_missing()
        if missing:
            return cls(None, missing)
        try:
            explainer = Explainer(model)
        except (TypeError, ValueError) as exc:  # an INT8 model, a model without a classifier
            return cls(None, str(exc))
        if device is not None:
            model.to(device)
        return cls(explainer)

    async def explain(self, images: ImageRequests, body: tuple[bytes, str], target: int | None,
                      method: str) -> tuple[Explanation, bytes]:
        """Decode body in the decode threads, then explain it in the explanation thread (503 when backed up):
        the explanation and its overlay PNG."""
        if self.queue.backlog >= self.queue.capacity:  # before decoding: no work for a request that would wait
            raise HTTPException(503, BUSY, headers={"Retry-After": "1"})
        settings = images.settings
        data, name = body
        tensor = await images.decode(_preprocess, images.engine, data, name, settings.max_pixels, settings.decode)
        try:
            return await self.queue.run(time.monotonic() + settings.timeout_s / 2, self._explain_one, tensor,
                                        target, method)
        except DecodeBusy:
            raise HTTPException(503, BUSY, headers={"Retry-After": "1"}) from None
        except ImportError as exc:
            raise HTTPException(UNAVAILABLE, str(exc)) from None

    def _explain_one(self, tensor: torch.Tensor, target: int | None, method: str) -> tuple[Explanation, bytes]:
        """In the explanation thread: the map of one preprocessed image and its overlay as PNG bytes."""
        (explanation,) = self.explainer.explain_batch(tensor[None], target, method)
        return explanation, explanation.overlay_png()


def add_explain_route(app: FastAPI, settings: ServeSettings, images: ImageRequests, service: ExplainService | None,
                      *, keyed: list[Any]) -> None:
    """POST /v1/explain (behind the API key when there is one); 501 when the server has no explainer."""
    service = service or ExplainService(None, "this server was started without a model to explain")
    errors = {**ERRORS, UNAVAILABLE: {"model": ErrorResponse, "description": "the server cannot explain: the "
                                      "grad-cam package is not installed, or the model is an INT8 one"}}

    @app.post("/v1/explain", response_model=ExplainResponse, responses=errors, openapi_extra=IMAGE_BODY,
              dependencies=keyed, summary="Class-activation heatmap over one image, as a base64 PNG")
    async def explain(request: Request,
                      target: str | None = Query(None, alias="class", max_length=200,
                                                 description="class to explain, by index or label (default: the "
                                                             "top class)"),
                      method: str = Query("gradcam", json_schema_extra={"enum": list(EXPLAIN_METHODS)},
                                          description="gradcam (class-specific) or eigencam (gradient-free, the "
                                                      "same map whatever the class)")):
        if service.explainer is None:
            raise HTTPException(UNAVAILABLE, f"explanations are not available on this server: {service.unavailable}")
        if method not in EXPLAIN_METHODS:
            raise HTTPException(422, f"method must be one of {', '.join(EXPLAIN_METHODS)}, got {method[:60]!r}")
        try:
            index = service.explainer.class_index(target)
        except ClassError as exc:
            raise HTTPException(422, f"class: {exc}") from None
        start = time.perf_counter()
        explanation, png = await images.serve(request, read_image_body,
                                              lambda body: service.explain(images, body, index, method))
        return ExplainResponse(**explanation.to_dict(), overlay_png=base64.b64encode(png).decode("ascii"),
                               model=images.engine.name, elapsed_ms=_ms_since(start))
