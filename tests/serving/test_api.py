"""The HTTP API against a real server process: answers equal the library's, bounds give the documented
4xx and never a 500, metrics move, API key, overload, graceful shutdown, and a fuzz run."""

from __future__ import annotations

import random
import signal
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from ecanfnet.testing import photo_arrays
from hostile import rgb_png
from ecanfnet import Classifier, create_model
from ecanfnet.backends import resolve_backend
from ecanfnet.transforms import decode_image, eval_transform

from ecanfnet.testing import ServeProcess
from helpers import jpeg_bytes

pytestmark = pytest.mark.slow  # processes, servers or training runs: `pytest -m "not slow"` skips them


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {name: jpeg_bytes(arr) for name, arr in sorted(photo_arrays().items())}


def counter(server: ServeProcess, endpoint: str, status: int) -> float:
    prefix = f'ecanfnet_requests_total{{endpoint="{endpoint}",status="{status}"}} '
    for line in server.client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def test_classify_gives_the_same_top5_as_predict(server, photos, timm_hub_folder):
    reference = Classifier.from_pretrained(timm_hub_folder, device="cpu", backend="torch")
    for name, data in photos.items():
        got = server.client.post("/v1/classify", files={"file": (f"{name}.jpg", data, "image/jpeg")})
        assert got.status_code == 200, got.text
        body = got.json()
        (want,) = reference.classify([decode_image(data)], top_k=5)
        assert [p["index"] for p in body["predictions"]] == [p.index for p in want], name
        assert [p["label"] for p in body["predictions"]] == [p.label for p in want]
        np.testing.assert_allclose([p["score"] for p in body["predictions"]], [p.score for p in want],
                                   rtol=1e-4, atol=1e-6)
        assert body["model"] == "eca_nfnet_l0" and body["elapsed_ms"] > 0


def test_raw_body_and_top_k(server, photos):
    got = server.client.post("/v1/classify?top_k=3", content=photos["chelsea"], headers={"content-type": "image/jpeg"})
    assert got.status_code == 200 and len(got.json()["predictions"]) == 3


def test_embed_equals_the_pre_logits(server, photos, timm_hub_folder):
    model = create_model(pretrained=timm_hub_folder).eval()
    x = eval_transform(model.pretrained_cfg)(decode_image(photos["coffee"])).unsqueeze(0)
    with torch.no_grad():
        want = model.forward_head(model.forward_features(x), pre_logits=True)[0]
    body = server.client.post("/v1/embed", content=photos["coffee"], headers={"content-type": "image/jpeg"}).json()
    assert body["dim"] == 2304 and body["normalized"] is False
    torch.testing.assert_close(torch.tensor(body["embedding"]), want, rtol=1e-4, atol=1e-4)
    unit = server.client.post("/v1/embed?normalize=true", content=photos["coffee"]).json()["embedding"]
    assert np.linalg.norm(unit) == pytest.approx(1.0, abs=1e-5)


def test_model_info_health_and_openapi(server):
    info = server.client.get("/v1/model").json()
    assert info == {**info, "architecture": "eca_nfnet_l0", "num_classes": 1000, "labels_count": 1000,
                    "num_features": 2304, "input_size": [3, 288, 288], "precision": "fp32",
                    "backend": resolve_backend("auto", torch.device("cpu"))}  # openvino where installed
    assert server.client.get("/healthz").json() == {"status": "ok"}
    schema = server.client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/embed", "/v1/model", "/healthz", "/metrics"} <= set(schema["paths"])
    body = schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*"} <= set(body)
    page = server.client.get("/")
    assert page.status_code == 200 and "<script src=\"/static/app.js\">" in page.text


def test_metrics_counters_and_batching_move(server, photos):
    before = counter(server, "/v1/classify", 200)
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda d: server.client.post("/v1/classify", content=d).status_code,
                              list(photos.values()) * 2))
    assert codes == [200] * 12
    assert counter(server, "/v1/classify", 200) == before + 12
    text = server.client.get("/metrics").text
    assert "ecanfnet_queue_depth" in text and "ecanfnet_request_latency_seconds_bucket" in text
    single = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith('ecanfnet_batch_size_bucket{le="1.0"}'))
    total = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("ecanfnet_batch_size_count"))
    assert total > single, "concurrent requests were never batched together"


def png_bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG that declares 10^10 pixels (with one tiny compressed row): refused before decoding."""
    return rgb_png(width, height, zlib.compress(b"\0" * 16))


@pytest.mark.parametrize("case, status, reason", [
    ("empty", 422, "empty body"),
    ("random10mb", 422, "not an image"),
    ("truncated", 422, "truncated"),
    ("png_bomb", 413, "over the limit"),
    ("json", 415, "unsupported content type"),
    ("missing_field", 422, "no file field named `file`"),
    ("zero_top_k", 422, "top_k must be at least 1, got 0"),
    ("negative_top_k", 422, "top_k must be at least 1, got -3"),
    ("too_big_body", 413, "over the limit"),
])
def test_bad_input_gets_the_documented_4xx(server, photos, case, status, reason):
    jpg = photos["astronaut"]
    requests = {
        "empty": dict(content=b"", headers={"content-type": "image/jpeg"}),
        "random10mb": dict(content=np.random.default_rng(0).bytes(10 * 1024 * 1024),
                           headers={"content-type": "application/octet-stream"}),
        "truncated": dict(content=jpg[: len(jpg) // 3], headers={"content-type": "image/jpeg"}),
        "png_bomb": dict(files={"file": ("bomb.png", png_bomb_header(), "image/png")}),
        "json": dict(content=b'{"image": "cat.jpg"}', headers={"content-type": "application/json"}),
        "missing_field": dict(files={"image": ("a.jpg", jpg, "image/jpeg")}),
        "too_big_body": dict(content=b"\0" * (21 * 1024 * 1024), headers={"content-type": "image/jpeg"}),
    }
    params = {"zero_top_k": {"top_k": 0}, "negative_top_k": {"top_k": -3}}.get(case, {})
    kwargs = requests.get(case, dict(content=jpg, headers={"content-type": "image/jpeg"}))
    got = server.client.post("/v1/classify", params=params, **kwargs)
    assert got.status_code == status, got.text
    assert reason in got.json()["detail"]
    assert server.client.get("/healthz").status_code == 200


def mutated_bodies(photos: dict[str, bytes], n: int, seed: int = 0):
    """Random bytes, truncations, bit flips and splices of real JPEG/PNG files, with random content types."""
    import io

    from PIL import Image

    rng = random.Random(seed)
    small = []
    for data in photos.values():
        img = Image.open(io.BytesIO(data)).resize((48, 48))
        for fmt in ("JPEG", "PNG", "GIF", "BMP"):
            buf = io.BytesIO()
            img.save(buf, fmt)
            small.append(buf.getvalue())
    types = ["image/jpeg", "image/png", "application/octet-stream", None, "text/plain", "multipart/form-data"]
    for _ in range(n):
        base = bytearray(rng.choice(small))
        kind = rng.randrange(4)
        if kind == 0:
            body = rng.randbytes(rng.randrange(0, 4096))
        elif kind == 1:
            body = bytes(base[: rng.randrange(0, len(base))])
        elif kind == 2:
            for _ in range(rng.randrange(1, 20)):
                base[rng.randrange(len(base))] = rng.randrange(256)
            body = bytes(base)
        else:
            cut = rng.randrange(len(base))
            body = bytes(base[:cut]) + rng.randbytes(rng.randrange(1, 64)) + bytes(base[cut:])
        yield body, rng.choice(types), rng.choice([None, "5", "0", "-3", "abc", "1000", "1001"])


def test_fuzz_never_5xx_and_memory_stays_bounded(server, photos):
    rss_before = server.rss_mb()

    def send(item) -> int:
        body, ctype, top_k = item
        headers = {"content-type": ctype} if ctype else {}
        params = {"top_k": top_k} if top_k is not None else {}
        return server.client.post("/v1/classify", content=body, headers=headers, params=params).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(send, mutated_bodies(photos, 1000)))
    assert len(codes) == 1000
    assert all(c < 500 for c in codes), sorted({c for c in codes if c >= 500})
    assert {200, 415, 422} <= set(codes)
    assert server.client.get("/healthz").status_code == 200
    growth = server.rss_mb() - rss_before
    assert growth < 300, f"server RSS grew by {growth:.0f} MB over 1,000 requests"


def test_api_key_and_overload(timm_hub_folder, photos):
    srv = ServeProcess(timm_hub_folder, "--backend", "torch", "--max-batch", "1", "--max-queue", "1",
                 "--max-wait-ms", "0", env={"ECANFNET_API_KEY": "s3cret"})
    try:
        jpg = photos["rocket"]
        assert srv.client.post("/v1/classify", content=jpg).status_code == 401
        assert srv.client.post("/v1/classify", content=jpg, headers={"x-api-key": "wrong"}).status_code == 401
        assert srv.client.get("/v1/model", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert srv.client.get("/healthz").status_code == 200  # health needs no key

        auth = {"x-api-key": "s3cret", "content-type": "image/jpeg"}
        with ThreadPoolExecutor(10) as pool:
            replies = list(pool.map(lambda _: srv.client.post("/v1/classify", content=jpg, headers=auth), range(10)))
        codes = [r.status_code for r in replies]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        assert all(r.headers.get("retry-after") == "1" for r in replies if r.status_code == 503)
    finally:
        srv.stop()


def test_graceful_shutdown_answers_in_flight_requests(timm_hub_folder, photos):
    # The default queue bound: with --max-queue 1 two simultaneous arrivals may rightly get a 503,
    # which is not what this test is about.
    srv = ServeProcess(timm_hub_folder, "--backend", "torch", "--max-batch", "1", "--max-wait-ms", "0")
    try:
        jpg = photos["rocket"]
        headers = {"content-type": "image/jpeg"}
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(srv.client.post, "/v1/classify", content=jpg, headers=headers) for _ in range(2)]
            time.sleep(0.3)
            srv.proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        # uvicorn re-raises the SIGTERM once it has shut down, so "killed by SIGTERM" is the clean exit
        assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM), srv.output()
        assert "Traceback" not in srv.output()
        with pytest.raises(httpx.TransportError):
            httpx.get(srv.url + "/healthz", timeout=2)
    finally:
        srv.stop()
