"""POST /v1/explain: a heatmap overlay PNG of the right size, the class by index or label, the /v1 bounds, API key
and error shape, 503 when explanations back up, 501 where the server cannot explain; and the real `serve` process."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ecanfnet.explain import grad_cam_missing
from ecanfnet.model import ECANFNet, NFNetConfig
from ecanfnet.serving.app import ServeSettings, create_app
from ecanfnet.serving.engine import InferenceEngine
from ecanfnet.serving.explain_route import MAX_WAITING, ExplainService
from ecanfnet.testing import photo_arrays, randomize_

from helpers import huge_png_header, jpeg_bytes

from .conftest import API_KEY

pytestmark = pytest.mark.skipif(grad_cam_missing() is not None, reason="needs the explain extra (grad-cam)")
TINY = NFNetConfig(depths=(1, 1, 1, 1), channels=(32, 32, 64, 64), stem_channels=16, group_size=8)
KEY = "expl41n"


@pytest.fixture(scope="module")
def model():
    model = randomize_(ECANFNet(TINY, num_classes=3), seed=2).eval()
    model.pretrained_cfg = model.pretrained_cfg.replace(input_size=(3, 64, 64), test_input_size=(3, 80, 96),
                                                        label_names=("cat", "dog", "fish"))
    return model


@pytest.fixture(scope="module")
def client(model):
    app = create_app(InferenceEngine(model, "torch"), ServeSettings(api_key=KEY), ExplainService.for_model(model))
    with TestClient(app, headers={"X-API-Key": KEY}) as c:
        yield c


def photo(name: str = "chelsea") -> bytes:
    return jpeg_bytes(photo_arrays()[name])


def overlay(body: dict) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"], validate=True)))
    assert image.format == "PNG"
    return image


def test_an_upload_gets_the_overlay_of_the_crop_the_model_saw_for_its_top_class(client):
    response = client.post("/v1/explain", content=photo(), headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    body = response.json()
    image = overlay(body)
    assert image.size == (96, 80) and (body["width"], body["height"]) == (96, 80) and image.mode == "RGB"
    assert np.asarray(image).std() > 1  # not blank
    top = client.post("/v1/classify", content=photo(), headers={"content-type": "image/jpeg"}).json()["predictions"][0]
    assert (body["index"], body["label"], body["top_index"]) == (top["index"], top["label"], top["index"])
    assert body["probability"] == pytest.approx(top["score"], abs=1e-4)
    assert body["method"] == "gradcam" and body["elapsed_ms"] > 0
    form = client.post("/v1/explain", files={"file": ("cat.jpg", photo(), "image/jpeg")}).json()
    assert form["overlay_png"] == body["overlay_png"]  # multipart or raw: the same image, the same answer


@pytest.mark.parametrize("query, index", [("class=fish", 2), ("class=1", 1), ("class=DOG&method=eigencam", 1)])
def test_a_class_by_label_or_index_and_the_gradient_free_method(client, query, index):
    body = client.post(f"/v1/explain?{query}", content=photo("coffee"), headers={"content-type": "image/jpeg"}).json()
    assert body["index"] == index and body["label"] == ["cat", "dog", "fish"][index]
    assert body["method"] == ("eigencam" if "eigencam" in query else "gradcam") and overlay(body).size == (96, 80)


@pytest.mark.parametrize("query, body, status, detail", [
    ("class=zebra", None, 422, "class: class 'zebra' is not a label of the checkpoint's 3 classes"),
    ("class=3", None, 422, "class: class 3 is out of range: the checkpoint has classes 0..2"),
    ("method=scorecam", None, 422, "method must be one of gradcam, eigencam, got 'scorecam'"),
    ("class=" + "x" * 201, None, 422, "class: String should have at most 200 characters"),
    ("", huge_png_header(200_000, 200_000), 413, "pixels"),
    ("", b"", 422, "empty body: send an image"),
    ("", b"GIF89a not really", 422, "not an image"),
])
def test_hostile_requests_get_a_one_line_json_error(client, query, body, status, detail):
    response = client.post(f"/v1/explain?{query}", content=photo() if body is None else body,
                           headers={"content-type": "image/png"})
    assert response.status_code == status and list(response.json()) == ["detail"]
    assert detail in response.json()["detail"] and "\n" not in response.json()["detail"]


def test_the_api_key_is_enforced(client):
    response = client.post("/v1/explain", content=photo(), headers={"content-type": "image/jpeg", "X-API-Key": "no"})
    assert response.status_code == 401 and response.json()["detail"].startswith("missing or wrong API key")
    operation = client.get("/openapi.json").json()["paths"]["/v1/explain"]["post"]
    assert {"bearer": []} in operation["security"] and "multipart/form-data" in operation["requestBody"]["content"]
    params = {p["name"]: p for p in operation["parameters"]}
    assert set(params) == {"class", "method"} and params["method"]["schema"]["enum"] == ["gradcam", "eigencam"]


def test_explanations_run_one_at_a_time_and_a_backlog_gets_503(model):
    service = ExplainService.for_model(model)
    gate, started = threading.Event(), threading.Semaphore(0)
    real = service.explainer.explain_batch

    def gated(*args):
        started.release()
        gate.wait(30)
        return real(*args)

    service.explainer.explain_batch = gated
    statuses: list[int] = []
    with TestClient(create_app(InferenceEngine(model, "torch"), ServeSettings(), service)) as c:
        def post() -> None:
            statuses.append(c.post("/v1/explain", content=photo(), headers={"content-type": "image/jpeg"}).status_code)

        threads = [threading.Thread(target=post) for _ in range(MAX_WAITING + 1)]
        for t in threads:
            t.start()
        assert started.acquire(timeout=30)  # one runs, the others wait behind it
        assert not started.acquire(timeout=0.5)
        while service.queue.backlog < MAX_WAITING + 1:
            threading.Event().wait(0.05)
        over = c.post("/v1/explain", content=photo(), headers={"content-type": "image/jpeg"})
        gate.set()
        for t in threads:
            t.join(60)
    assert over.status_code == 503 and over.headers["retry-after"] == "1"
    assert over.json() == {"detail": "server busy: explanations are backed up"}
    assert statuses == [200] * (MAX_WAITING + 1)


def test_a_server_that_cannot_explain_says_why_with_501(model):
    import torch

    for service, why in ((None, "started without a model to explain"),
                         (ExplainService.for_model(torch.nn.Linear(2, 2)), "need a float ECANFNet classifier")):
        with TestClient(create_app(InferenceEngine(model, "torch"), ServeSettings(), service)) as c:
            response = c.post("/v1/explain", content=photo(), headers={"content-type": "image/jpeg"})
        assert response.status_code == 501 and why in response.json()["detail"]
        assert response.json()["detail"].startswith("explanations are not available on this server: ")


@pytest.mark.slow
def test_the_serve_process_explains_behind_its_key_and_bounds(keyed):
    jpeg = {"content-type": "image/jpeg"}
    assert keyed.client.post("/v1/explain", content=photo(), headers=jpeg).status_code == 401
    answer = keyed.client.post("/v1/explain?class=fish", content=photo(), headers={**jpeg, "X-API-Key": API_KEY})
    assert answer.status_code == 200, answer.text
    assert overlay(answer.json()).size == (64, 64) and answer.json()["label"] == "fish"
    too_big = keyed.client.post("/v1/explain", content=b"\0" * (2 ** 20 + 1), headers={**jpeg, "X-API-Key": API_KEY})
    assert too_big.status_code == 413 and list(too_big.json()) == ["detail"]
    bad = keyed.client.post("/v1/explain?method=x", content=photo(), headers={**jpeg, "X-API-Key": API_KEY})
    assert bad.status_code == 422 and list(bad.json()) == ["detail"]
