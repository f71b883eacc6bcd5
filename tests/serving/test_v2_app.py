"""The Open Inference Protocol (/v2), /docs and /v1/model in-process (FastAPI's TestClient, no server process):
readiness before and after the warm-up batch, tritonclient's own request and response encodings, the error
shape, the API key in the OpenAPI document, and a /docs page that loads nothing from elsewhere."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from ecanfnet.serving.app import ServeSettings, create_app

INFER = "/v2/models/eca_nfnet_l0/infer"


def png(seed: int = 0, size: tuple[int, int] = (50, 70)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Gated:
    """An engine whose batches wait for gate (the warm-up batch first of all)."""

    def __init__(self, engine) -> None:
        self.engine, self.gate = engine, threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def __call__(self, batch: torch.Tensor):
        self.gate.wait(30)
        return self.engine(batch)


def wait_ready(client: TestClient, path: str = "/v2/health/ready") -> None:
    deadline = time.monotonic() + 30
    while client.get(path).status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def client(small_engine):
    with TestClient(create_app(small_engine, ServeSettings(max_batch=4, max_queue=8))) as c:
        wait_ready(c)
        yield c


def tritonclient_infer(client: TestClient, inputs, outputs=None, **kwargs):
    """Send tritonclient's own request body; tritonclient's parse of the answer (or the raw response on error)."""
    from tritonclient.http import InferenceServerClient

    body, json_size = InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kwargs)
    headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
    got = client.post(INFER, content=body, headers=headers)
    assert got.status_code == 200, got.text
    return InferenceServerClient.parse_response_body(got.content,
                                                     header_length=got.headers.get("inference-header-content-length"))


def bytes_input(images: list[bytes], binary: bool = True):
    from tritonclient.http import InferInput

    tensor = InferInput("image_bytes", [len(images)], "BYTES")
    return tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=binary)


def test_not_ready_until_the_warm_up_batch_is_answered_live_meanwhile(small_engine):
    gated = Gated(small_engine)
    with TestClient(create_app(gated, ServeSettings())) as c:
        for path in ("/v2/health/ready", "/v2/models/eca_nfnet_l0/ready", "/v2/models/eca_nfnet_l0/versions/1/ready"):
            got = c.get(path)
            assert got.status_code == 400 and got.json() == {"error": "not ready: the model is warming up"}, got.text
        assert c.get("/v2/health/live").json() == {"live": True} and c.get("/healthz").status_code == 200
        gated.gate.set()
        wait_ready(c)
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.get("/v2/models/eca_nfnet_l0/ready").json() == {"name": "eca_nfnet_l0", "ready": True}


def test_a_failing_warm_up_leaves_the_server_live_and_never_ready(small_engine, caplog):
    class Broken(Gated):
        def __call__(self, batch):
            raise RuntimeError("no kernel for this device")

    with TestClient(create_app(Broken(small_engine), ServeSettings())) as c:
        time.sleep(0.2)
        assert c.get("/v2/health/ready").status_code == 400 and c.get("/v2/health/live").status_code == 200
    assert "warm-up batch failed" in caplog.text and "no kernel for this device" in caplog.text


def test_tritonclient_encodings_binary_and_json_give_the_same_answers(client, small_engine):
    from tritonclient.http import InferRequestedOutput

    images = [png(0), png(1), png(2)]
    binary = tritonclient_infer(client, [bytes_input(images)])  # no outputs named: all binary, the top-k three
    indices, scores, labels = (binary.as_numpy(n) for n in ("top_k_indices", "top_k_scores", "top_k_labels"))
    assert indices.shape == scores.shape == labels.shape == (3, 3)  # top_k 5 on a 3-class model: every class
    assert indices.dtype == np.int64 and scores.dtype == np.float32
    assert [[small_engine.labels[i] for i in row] for row in indices] == labels.astype(str).tolist()
    outputs = [InferRequestedOutput(n, binary_data=False) for n in ("top_k_scores", "embedding", "probabilities")]
    as_json = tritonclient_infer(client, [bytes_input(images)], outputs, parameters={"top_k": 2})
    np.testing.assert_allclose(as_json.as_numpy("top_k_scores"), scores[:, :2], rtol=1e-6)
    assert as_json.as_numpy("top_k_indices") is None  # only what was asked for
    assert as_json.as_numpy("embedding").shape == (3, 2304)
    probabilities = as_json.as_numpy("probabilities")
    np.testing.assert_allclose(np.sort(probabilities, axis=1)[:, ::-1], scores, rtol=1e-5)
    mixed = tritonclient_infer(client, [bytes_input(images)],
                               [InferRequestedOutput("embedding"), InferRequestedOutput("top_k_labels", False)])
    np.testing.assert_allclose(mixed.as_numpy("embedding"), as_json.as_numpy("embedding"), rtol=1e-5, atol=1e-6)
    assert mixed.as_numpy("top_k_labels").astype(str).tolist() == labels.astype(str).tolist()


def test_base64_json_images_and_preprocessed_pixels_match_the_binary_bytes(client, small_engine):
    from tritonclient.http import InferInput
    from ecanfnet.transforms import decode_image

    images = [png(3), png(4, (90, 40))]
    want = tritonclient_infer(client, [bytes_input(images)]).as_numpy("top_k_scores")
    request = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2, 1],
                           "data": [[base64.b64encode(i).decode()] for i in images]}], "id": "req-7"}
    got = client.post(INFER, json=request).json()
    assert got["id"] == "req-7" and got["model_version"] == "1"
    assert np.allclose(got["outputs"][1]["data"], want.ravel(), rtol=1e-6)
    pixels = torch.stack([small_engine.transform(decode_image(i)) for i in images]).numpy()
    for binary in (True, False):
        tensor = InferInput("images", list(pixels.shape), "FP32").set_data_from_numpy(pixels, binary_data=binary)
        np.testing.assert_allclose(tritonclient_infer(client, [tensor]).as_numpy("top_k_scores"), want, rtol=1e-5)


@pytest.mark.parametrize("request_json, status, reason", [
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}, 400,
     "not valid base64"),
    ({"inputs": [{"name": "image_bytes", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 400, "it takes BYTES"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1, 2], "data": ["", ""]}]}, 400,
     "takes [N] or [N, 1]"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [5], "data": ["QQ=="] * 5}]}, 400, "limit of 4"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [0], "data": []}]}, 400, "batch is empty"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2], "data": ["QQ=="]}]}, 400, "holds 1 elements"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["QQ=="]}]}, 422, "image 0"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0]}]}, 400,
     "takes [N, 3, 64, 64]"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 64, 64],
                  "data": ["0"] * (3 * 64 * 64)}]}, 400, "must be 12,288 numbers"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 64, 64],
                  "data": [float("nan")] * (3 * 64 * 64)}]}, 400, "not finite"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 64, 64],
                  "data": [3e38] * (3 * 64 * 64)}]}, 400, "beyond +-10000"),  # would overflow the network to NaN
    ({"inputs": [{"name": [], "datatype": "BYTES", "shape": [1], "data": ["QQ=="]}]}, 400, "unknown input"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["QQ=="]}],
      "outputs": [{"name": {}}]}, 400, "unknown output"),
    ({"inputs": [{"name": "tensor", "datatype": "BYTES", "shape": [1], "data": ["QQ=="]}]}, 400, "unknown input"),
    ({"inputs": []}, 400, "exactly one tensor"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1]}]}, 400, "neither data nor"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["QQ=="]}],
      "outputs": [{"name": "logits"}]}, 400, "unknown output 'logits'"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["QQ=="]}],
      "outputs": [{"name": "top_k_scores", "parameters": {"classification": 3}}]}, 400, "classification extension"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["QQ=="]}],
      "parameters": {"top_k": 0}}, 400, "top_k must be a whole number of at least 1"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["QQ=="]}], "id": 7}, 400, "id must be"),
    ([1, 2], 400, "must be a JSON object"),
], ids=lambda v: None if isinstance(v, (dict, list)) else str(v))
def test_malformed_requests_get_a_clear_4xx_error(client, request_json, status, reason):
    got = client.post(INFER, content=json.dumps(request_json).encode())  # NaN written as JSON's NaN
    assert got.status_code == status, got.text
    body = got.json()
    assert list(body) == ["error"] and reason in body["error"] and "\n" not in body["error"], body


@pytest.mark.parametrize("body, headers, reason", [
    (b"{not json", {}, "not valid JSON"),
    (b'{"inputs": []}xx', {"Inference-Header-Content-Length": "999"}, "Inference-Header-Content-Length"),
    (b'{"inputs": []}xx', {"Inference-Header-Content-Length": "-1"}, "Inference-Header-Content-Length"),
    (b"[" * 100_000, {}, "not valid JSON"),
])
def test_malformed_bodies_get_400(client, body, headers, reason):
    got = client.post(INFER, content=body, headers=headers)
    assert got.status_code == 400 and reason in got.json()["error"], got.text


def binary_request(raw: bytes, shape: list[int]) -> tuple[bytes, dict[str, str]]:
    """A request whose one input `image_bytes` is raw binary data (its declared size: len(raw))."""
    head = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": shape,
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def length_prefixed(*items: bytes) -> bytes:
    return b"".join(len(i).to_bytes(4, "little") + i for i in items)


def test_binary_sizes_must_add_up(client):
    from tritonclient.http import InferenceServerClient

    body, size = InferenceServerClient.generate_request_body([bytes_input([png(0)])])
    for wrong in (body[:-5], body + b"extra"):
        got = client.post(INFER, content=wrong, headers={"Inference-Header-Content-Length": str(size)})
        assert got.status_code == 400 and "binary_data_size" in got.json()["error"], got.text
    got = client.post(INFER, content=body)  # the binary data without its header length: not JSON
    assert got.status_code == 400 and "not valid JSON" in got.json()["error"]
    for raw, shape, reason in ((length_prefixed(png(0)), [2], "holds 1 elements"),
                               (length_prefixed(b"abc")[:-1], [1], "declares 3 bytes, but only 2 follow"),
                               (b"\1\0", [1], "cut short before its 4-byte length"),
                               (length_prefixed(b"a", b"b"), [1], "left over after its 1 elements")):
        content, headers = binary_request(raw, shape)
        got = client.post(INFER, content=content, headers=headers)
        assert got.status_code == 400 and reason in got.json()["error"], got.text
    content, headers = binary_request(length_prefixed(png(0), png(1)), [2, 1])
    assert client.post(INFER, content=content, headers=headers).status_code == 200


def test_model_names_versions_and_the_error_shape_of_v2(client):
    assert client.get("/v2/models/eca_nfnet_l0/versions/1").json()["versions"] == ["1"]
    for path, status in (("/v2/models/resnet50", 404), ("/v2/models/eca_nfnet_l0/versions/2", 404),
                         ("/v2/nothing/here", 404), ("/v2/models/resnet50/infer", 404)):
        got = client.post(path, json={}) if path.endswith("infer") else client.get(path)
        assert got.status_code == status and list(got.json()) == ["error"], (path, got.text)
    got = client.get(INFER)
    assert got.status_code == 405 and list(got.json()) == ["error"]
    got = client.post(INFER, content=b"{}", headers={"Content-Encoding": "gzip"})
    assert got.status_code == 415 and "uncompressed" in got.json()["error"]
    assert list(client.get("/v1/nothing").json()) == ["detail"]  # /v1 keeps its shape


def test_api_key_guards_v2_but_not_its_health_routes(small_engine):
    with TestClient(create_app(small_engine, ServeSettings(api_key="k3y", model_name="pets"))) as c:
        wait_ready(c)
        for path in ("/v2", "/v2/models/pets", "/v2/models/pets/ready"):
            got = c.get(path)
            assert got.status_code == 401 and "API key" in got.json()["error"], (path, got.text)
            assert c.get(path, headers={"x-api-key": "k3y"}).status_code == 200
            assert c.get(path, headers={"authorization": "Bearer k3y"}).status_code == 200
        assert c.post("/v2/models/pets/infer", json={}).status_code == 401
        assert c.get("/v2/health/live").status_code == 200 and c.get("/v2/health/ready").status_code == 200
        schema = c.get("/openapi.json").json()
    assert {"bearer", "apiKeyHeader"} <= set(schema["components"]["securitySchemes"])
    paths = schema["paths"]
    for path, method in (("/v2/models/{model_name}/infer", "post"), ("/v1/classify", "post"), ("/v2", "get")):
        assert {"bearer": []} in paths[path][method]["security"], path
    for path in ("/v2/health/live", "/v2/health/ready", "/healthz", "/metrics"):
        assert "security" not in paths[path]["get"], path


def test_docs_page_is_self_contained(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert not re.search(r"https?://", page.text), re.findall(r".{40}https?://.{40}", page.text)
    assert "<script" not in page.text.lower()
    for route in ("/v1/classify", "/v2/models/{model_name}/infer", "/v2/health/ready", "/openapi.json"):
        assert route in page.text, route
    assert client.get("/redoc").status_code == 404  # FastAPI's would load its script from a CDN


def test_v1_model_gives_labels_preprocessing_and_the_weights_fingerprint(client, small_engine):
    info = client.get("/v1/model").json()
    assert info["labels"] == ["cat", "dog", "fish"] and info["model_name"] == "eca_nfnet_l0"
    assert info["preprocessing"] == {"image_size": [64, 64], "crop_pct": 1.0, "crop_mode": "center",
                                     "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
                                     "std": [0.229, 0.224, 0.225]}
    assert re.fullmatch(r"[0-9a-f]{24}", info["weights_fingerprint"])
    assert info["weights_fingerprint"] == small_engine.weights_fingerprint


def test_the_fingerprint_is_the_models(small_engine):
    from ecanfnet import create_model
    from ecanfnet.serving.engine import InferenceEngine
    from ecanfnet.weights import weights_fingerprint

    model = create_model(pretrained=False, num_classes=2)
    assert InferenceEngine(model, "torch").weights_fingerprint == weights_fingerprint(model)


def test_v2_requests_are_counted_in_the_metrics(client):
    client.post(INFER, json={"inputs": []})
    text = client.get("/metrics").text
    assert 'ecanfnet_requests_total{endpoint="/v2/models/{model_name}/infer",status="400"}' in text


def test_error_payload_shape_by_path():
    from ecanfnet.serving.protocol import error_payload

    assert error_payload("/v2/models/x/infer", "a\nb") == {"error": "a b"}
    assert error_payload("/v2", "x") == {"error": "x"}
    assert error_payload("/v20", "x") == {"detail": "x"} and error_payload("/v1/classify", "x") == {"detail": "x"}


def test_v1_classify_gives_the_label_and_the_open_set_score_and_v2_on_request(client, small_engine):
    from ecanfnet.testing import photo_arrays
    from helpers import jpeg_bytes

    photo = jpeg_bytes(photo_arrays()["chelsea"])
    body = client.post("/v1/classify", content=photo, headers={"content-type": "image/jpeg"}).json()
    embedding = torch.tensor(client.post("/v1/embed", content=photo, headers={"content-type": "image/jpeg"}
                                         ).json()["embedding"])
    want = torch.cosine_similarity(embedding[None], small_engine.head.fc.weight.detach(), dim=-1).max()
    assert body["open_set_score"] == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    assert body["label"] == body["predictions"][0]["label"] and len(body["predictions"]) == 3
    unknown = client.post("/v1/classify?min_score=1.5", content=photo, headers={"content-type": "image/jpeg"}).json()
    assert unknown["label"] == "unknown" and unknown["predictions"] == body["predictions"]
    known = client.post("/v1/classify?min_score=-1", content=photo, headers={"content-type": "image/jpeg"}).json()
    assert known["label"] == body["label"]
    v2 = client.post(INFER, json={"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                              "data": [base64.b64encode(photo).decode()]}],
                                  "outputs": [{"name": "open_set_score"}]}).json()
    (output,) = v2["outputs"]
    assert output["name"] == "open_set_score" and output["shape"] == [1] and output["datatype"] == "FP32"
    assert output["data"][0] == pytest.approx(body["open_set_score"], rel=1e-5)
    default = client.post(INFER, json={"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                                   "data": [base64.b64encode(photo).decode()]}]}).json()
    assert "open_set_score" not in [o["name"] for o in default["outputs"]]  # only when asked for


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "high"])
def test_v1_classify_refuses_a_min_score_that_is_not_a_finite_number(client, value):
    got = client.post(f"/v1/classify?min_score={value}", content=png(), headers={"content-type": "image/png"})
    assert got.status_code == 422 and "min_score" in got.json()["detail"], got.text
    assert "\n" not in got.json()["detail"]
