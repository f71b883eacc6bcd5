"""Hostile clients against a real server process: floods of expensive images, slow bodies and headers,
DNS-rebinding Host headers, and the one error shape; the start-up refusals of `ecanfnet serve`."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from hostile import (LOOPBACK_HOSTS, REBINDING_HOSTS, SLOW_CLIENTS_EXTRA_MB, big_png, idle_connections, one_request,
                     oversized_headers, reset_vm_hwm, slow_clients, vm_hwm_mb)

from helpers import HARDENED_MAX_CONNECTIONS, HTML_LABEL
from .test_api import png_bomb_header

pytestmark = pytest.mark.slow  # processes, servers or training runs: `pytest -m "not slow"` skips them


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


SMALL_PNG = png_bytes(np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8))


# 36 megapixels, within the default --max-pixels: ~140 KB to send, ~0.4 s of CPU to decode (108 MB inflated).
EXPENSIVE_SIDE = 6000


# --- item 10: a model with fewer classes than the default top-k --------------------------------------

def test_a_three_class_model_answers_default_requests_with_its_three_classes(hardened):
    info = hardened.client.get("/v1/model").json()
    assert info["num_classes"] == 3 and info["input_size"] == [3, 64, 64]
    got = hardened.client.post("/v1/classify", content=SMALL_PNG, headers={"content-type": "image/png"})
    assert got.status_code == 200, got.text
    predictions = got.json()["predictions"]
    assert sorted(p["index"] for p in predictions) == [0, 1, 2]
    assert {p["label"] for p in predictions} == {HTML_LABEL, "dog", "fish"}  # raw text, never rewritten
    assert len(hardened.client.post("/v1/classify?top_k=2", content=SMALL_PNG).json()["predictions"]) == 2
    for more in (4, 10**9):  # every class, as `ecanfnet predict --top-k 4` gives on this model
        got = hardened.client.post(f"/v1/classify?top_k={more}", content=SMALL_PNG)
        assert got.status_code == 200, got.text
        assert [p["index"] for p in got.json()["predictions"]] == [p["index"] for p in predictions]
    none = hardened.client.post("/v1/classify?top_k=0", content=SMALL_PNG)
    assert none.status_code == 422 and none.json()["detail"] == "top_k must be at least 1, got 0"
    assert "top_k" not in hardened.client.get("/static/app.js").text  # the page takes the server's default


# --- items 3, 4, 17d through the server: image bombs and deep images -------------------------------------

DEEP_SIDE = 4000  # 16 M pixels: float32 and 16-bit TIFFs within the default --max-pixels


def test_icon_bombs_and_deep_tiffs_cost_the_server_bounded_memory_and_quote_its_limit(hardened, tmp_path):
    """An ICO/CUR holding a 12,000 x 12,000 PNG (Pillow decodes it while opening) is refused with the server's
    --max-pixels and no other limit; float32 / 16-bit TIFFs are answered. Peak memory grows by at most the
    decoder's documented ~9 bytes a pixel plus IMAGE_REFUSAL_EXTRA_MB: measured +87 MB; before, +515 MB
    (the ICO's PNG decoded, and float64 temporaries). Runs before the flood test below, which raises the
    same server's peak on purpose."""
    from hostile import IMAGE_REFUSAL_EXTRA_MB, high_depth_tiffs, icon_bombs

    bombs, tiffs = icon_bombs(tmp_path), high_depth_tiffs(tmp_path, DEEP_SIDE)
    hwm_before = vm_hwm_mb(hardened.proc.pid)
    for kind, path in bombs.items():
        got = hardened.client.post("/v1/classify", files={"file": (path.name, path.read_bytes(), "image/x-icon")})
        detail = got.json()["detail"]
        assert got.status_code == 413 and path.name in detail, (kind, got.text)
        assert "40,000,000" in detail and "89,478,485" not in detail and "178,956,970" not in detail, detail
    for mode, (path, _) in tiffs.items():
        got = hardened.client.post("/v1/classify", content=path.read_bytes(), headers={"content-type": "image/tiff"})
        assert got.status_code == 200, (mode, got.text)
    growth = vm_hwm_mb(hardened.proc.pid) - hwm_before
    bound = 9 * DEEP_SIDE ** 2 / 2 ** 20 + IMAGE_REFUSAL_EXTRA_MB
    assert growth < bound, f"peak memory grew by {growth:.0f} MB (bound {bound:.0f} MB)"


# --- item 2: work of requests already answered 504 ------------------------------------------------------

FLOOD_S, FLOOD_CLIENTS = 4.0, 32
# One decode thread: one 36 MP image (108 MB as RGB) and its resize temporaries at a time (measured +145 MB).
HWM_GROWTH_MB = 400


def test_a_flood_of_expensive_images_is_shed_without_working_for_timed_out_requests(hardened):
    """32 clients send 36 MP PNGs back to back for 4 s (--timeout-s 3, one decode thread, ~0.5 s a decode).

    Before, the decodes queued first-in first-out behind every admitted request, so each one started
    when its request was about to time out: 44 of 46 requests got 504 after 3 s (measured with two
    decode threads), their decodes wasted.
    Now at most 2 decodes are queued or running, and a decode that cannot start within half the
    timeout is refused at once (503 + Retry-After): what starts is answered, nearly nothing times out,
    and right after the flood the queues are empty and a request is answered at once.
    """
    bomb = big_png(EXPENSIVE_SIDE, EXPENSIVE_SIDE, noisy=True)
    hwm_before = vm_hwm_mb(hardened.proc.pid)
    stop_at = time.monotonic() + FLOOD_S

    def flood(_) -> list[httpx.Response]:
        replies = []
        with httpx.Client(base_url=hardened.url, timeout=60) as client:
            while time.monotonic() < stop_at:
                replies.append(client.post("/v1/classify", content=bomb, headers={"content-type": "image/png"}))
        return replies

    with ThreadPoolExecutor(FLOOD_CLIENTS) as pool:
        replies = [r for batch in pool.map(flood, range(FLOOD_CLIENTS)) for r in batch]
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 503, 504} and 200 in codes and 503 in codes, sorted(set(codes))
    assert codes.count(504) <= len(codes) // 10, f"{codes.count(504)} of {len(codes)} timed out"
    assert all(r.headers.get("retry-after") == "1" for r in replies if r.status_code == 503)

    start = time.monotonic()
    after = hardened.client.post("/v1/classify", content=SMALL_PNG, headers={"content-type": "image/png"})
    took = time.monotonic() - start
    assert after.status_code == 200 and took < 3, (after.status_code, f"{took:.1f} s")
    assert hardened.gauge("ecanfnet_decode_backlog") == 0 and hardened.gauge("ecanfnet_inflight_requests") == 0
    growth = vm_hwm_mb(hardened.proc.pid) - hwm_before
    assert growth < HWM_GROWTH_MB, f"peak memory grew by {growth:.0f} MB"


# --- item 5: slow clients ----------------------------------------------------------------------------

def test_slow_bodies_and_headers_take_no_admission_slot_and_are_cut_off(hardened):
    """40 connections trickle a body (more than the 32 admission slots) and 5 trickle their headers, a byte
    a second. Before, each slow body held a slot and every other client got 503. Now bodies are read
    before admission under --body-timeout-s 2 (then 408) and headers under --header-timeout-s 2 (closed):
    each is cut off within 3.5 s, and the server's peak memory grows by less than SLOW_CLIENTS_EXTRA_MB."""
    assert hardened.client.post("/v1/classify", content=SMALL_PNG).status_code == 200  # first-request costs
    reset_vm_hwm(hardened.proc.pid)  # else the flood test's peak, above, would hide this test's
    hwm_before = vm_hwm_mb(hardened.proc.pid)
    results: dict[str, list] = {}
    threads = [threading.Thread(target=lambda stage=stage, n=n: results.update(
                   {stage: slow_clients(hardened.port, n, seconds=8, stage=stage)}))
               for stage, n in (("body", 40), ("headers", 5))]
    for t in threads:
        t.start()
    time.sleep(0.7)
    codes = [hardened.client.post("/v1/classify", content=SMALL_PNG, headers={"content-type": "image/png"})
             .status_code for _ in range(3)]
    for t in threads:
        t.join(30)
    assert codes == [200, 200, 200]
    bound = 2 + 1.5
    for when, answer in results["body"]:
        assert when is not None and when < bound, when
        assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout-s" in answer, answer[:200]
        assert b"connection: close" in answer.lower()  # and closed: the rest of the body is never read
    for when, answer in results["headers"]:
        assert when is not None and when < bound and answer == b"", (when, answer[:200])
    growth = vm_hwm_mb(hardened.proc.pid) - hwm_before
    assert growth < SLOW_CLIENTS_EXTRA_MB, f"peak memory grew by {growth:.0f} MB"


def test_requests_over_max_connections_get_a_json_503_with_retry_after(hardened):
    """With more than --max-connections connections open, a request gets the API's 503 (JSON detail naming the
    flag, Retry-After: 1) and its connection is closed; below the limit, and once connections close, it is
    answered. Before, uvicorn's own 503 was plain text `Service Unavailable` with no Retry-After."""
    limit = HARDENED_MAX_CONNECTIONS
    idle = idle_connections(hardened.port, limit - 2)  # + this request (+ hardened.client's, if kept)
    try:
        assert one_request(hardened.port).startswith(b"HTTP/1.1 200"), "refused below --max-connections"
        idle += idle_connections(hardened.port, 2)
        head, _, body = one_request(hardened.port).partition(b"\r\n\r\n")
    finally:
        for sock in idle:
            sock.close()
    lines = head.lower().split(b"\r\n")
    assert lines[0].startswith(b"http/1.1 503"), head
    assert {b"retry-after: 1", b"content-type: application/json", b"connection: close"} <= set(lines), head
    detail = json.loads(body)["detail"]
    assert detail.startswith("server busy:") and f"more than {limit} connections" in detail, detail
    assert "--max-connections" in detail and "\n" not in detail
    deadline = time.monotonic() + 5
    while not one_request(hardened.port).startswith(b"HTTP/1.1 200"):  # the server notices the closes
        assert time.monotonic() < deadline, "still refused after the connections closed"
        time.sleep(0.1)


def test_headers_over_max_header_bytes_get_a_json_400(server):
    answer = oversized_headers(server.port, 20_000)  # over the default 16 KiB, and still coming
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, answer[:300]
    assert "--max-header-bytes" in json.loads(body)["detail"]


# --- item 17: Host header, API key, one error shape, one pixel limit ------------------------------------

@pytest.mark.parametrize("host", REBINDING_HOSTS)
def test_a_loopback_server_refuses_foreign_host_headers(server, host):
    got = server.client.get("/v1/model", headers={"host": host})
    assert got.status_code == 421, got.text
    assert isinstance(got.json()["detail"], str) and "Host header" in got.json()["detail"]


def test_a_loopback_server_answers_loopback_host_headers(server):
    for host in LOOPBACK_HOSTS:
        assert server.client.get("/v1/model", headers={"host": host}).status_code == 200, host


def test_host_check_names():
    from ecanfnet.serving.app import host_allowed

    assert all(host_allowed(h) for h in LOOPBACK_HOSTS)
    assert not any(host_allowed(h) for h in REBINDING_HOSTS)
    assert host_allowed("api.example:443", ("api.example",)) and not host_allowed("api.example.evil", ("api.example",))


@pytest.mark.parametrize("method, path, kwargs, status", [
    ("post", "/v1/classify?top_k=abc", {"content": SMALL_PNG}, 422),
    ("post", "/v1/embed?normalize=maybe", {"content": SMALL_PNG}, 422),
    ("get", "/no/such/page", {}, 404),
    ("get", "/v1/classify", {}, 405),
    ("post", "/v1/classify", {"content": b"", "headers": {"content-type": "image/png"}}, 422),
    ("post", "/v1/classify", {"content": b"{}", "headers": {"content-type": "application/json"}}, 415),
])
def test_every_error_is_one_detail_string(server, method, path, kwargs, status):
    got = getattr(server.client, method)(path, **kwargs)
    assert got.status_code == status, got.text
    body = got.json()
    assert list(body) == ["detail"] and isinstance(body["detail"], str) and "\n" not in body["detail"], body


def test_an_internal_error_is_a_500_with_one_detail_string():
    """In-process: a model that raises gives every waiting request a 500 {"detail": "..."} ({"error": "..."} on
    /v2), no traceback text."""
    import torch
    from fastapi.testclient import TestClient

    from ecanfnet.serving.app import create_app

    class BrokenEngine:
        name, num_classes, num_features, image_size, backend, precision = "broken", 3, 4, (8, 8), "torch", "fp32"
        labels = ["a", "b", "c"]
        eval_settings = {"image_size": (8, 8), "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bicubic",
                         "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        weights_fingerprint = "0" * 24

        def transform(self, img):
            return torch.zeros(3, 8, 8)

        def __call__(self, batch):
            raise RuntimeError("secret internal state")

    with TestClient(create_app(BrokenEngine()), raise_server_exceptions=False) as client:
        got = client.post("/v1/classify", content=SMALL_PNG, headers={"content-type": "image/png"})
        assert got.status_code == 500 and got.json() == {"detail": "internal server error"}, got.text
        pixels = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0] * 192}]}
        got = client.post("/v2/models/broken/infer", json=pixels)
        assert got.status_code == 500 and got.json() == {"error": "internal server error"}, got.text
        assert client.get("/healthz").status_code == 200


def test_the_413_for_too_many_pixels_quotes_the_servers_limit_only(hardened):
    got = hardened.client.post("/v1/classify", content=png_bomb_header(), headers={"content-type": "image/png"})
    assert got.status_code == 413
    detail = got.json()["detail"]
    assert "40,000,000" in detail and "89,478,485" not in detail and "178,956,970" not in detail, detail


def serve_cli(capsys, *args: str) -> tuple[int, str]:
    """`ecanfnet serve ARGS` in-process (each refusal here comes before any model is loaded): exit code, stderr."""
    from ecanfnet.cli import main

    try:
        code = main(["serve", *args])
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("how", ["flag", "env", "space"])
def test_an_api_key_that_could_never_match_is_refused_at_start(capsys, monkeypatch, how):
    """A non-ASCII key: clients send header bytes that starlette reads as latin-1, so it could never compare equal."""
    key = {"flag": "clé", "env": "ключ", "space": "two words"}[how]
    monkeypatch.setenv("ECANFNET_API_KEY", key)
    code, err = serve_cli(capsys, "--weights", "/nonexistent", *(("--api-key", key) if how != "env" else ()))
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("ecanfnet: error: the API key"), err


@pytest.mark.parametrize("flag, value", [("--port", "99999"), ("--port", "0"), ("--port", "-1"), ("--port", "http"),
                                         ("--timeout-s", "-1"), ("--body-timeout-s", "nan"),
                                         ("--header-timeout-s", "0"), ("--max-wait-ms", "inf"),
                                         ("--keep-alive-s", "0"), ("--max-connections", "0")])
def test_bounds_out_of_range_are_usage_errors(capsys, flag, value):
    code, err = serve_cli(capsys, flag, value)
    assert code == 2 and flag in err and "Traceback" not in err, err


def test_a_busy_port_is_one_line_and_exit_1_before_loading_the_model(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = serve_cli(capsys, "--weights", "/nonexistent", "--port", str(port))
    assert code == 1, err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1 port {port}" in err and "in use" in err, err
