"""The Open Inference Protocol (/v2) against a real `ecanfnet serve` process, through tritonclient's own HTTP
client: health, metadata, a batch of real photos whose top-5 equals /v1/classify's and `ecanfnet predict`'s,
preprocessed pixels giving the same answer, the API key, and hostile requests getting a 4xx {"error": ...}."""

from __future__ import annotations

import base64
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from helpers import HTML_LABEL, read_json_lines
from hostile import rgb_png

from .conftest import API_KEY

pytestmark = pytest.mark.slow  # processes, servers or training runs: `pytest -m "not slow"` skips them

PHOTOS = ("chelsea", "coffee", "astronaut")


def triton_client(url: str, headers: dict[str, str] | None = None):
    """A tritonclient HTTP client of the server at url, once the server says it is ready."""
    from tritonclient.http import InferenceServerClient

    client = InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
    deadline = time.monotonic() + 120
    while not client.is_server_ready(headers=headers):
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.2)
    return client


@pytest.fixture(scope="module")
def triton(server):
    client = triton_client(server.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def photo_files(photo_dir) -> list[Path]:
    return [next(photo_dir.glob(f"{name}.*")) for name in PHOTOS]


def bytes_input(images: list[bytes]):
    from tritonclient.http import InferInput

    tensor = InferInput("image_bytes", [len(images)], "BYTES")
    return tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)


def test_tritonclient_sees_a_live_ready_server_and_its_model(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("eca_nfnet_l0") and triton.is_model_ready("eca_nfnet_l0", "1")
    assert not triton.is_model_ready("resnet50") and not triton.is_model_ready("eca_nfnet_l0", "2")
    server = triton.get_server_metadata()
    assert server["name"] == "ecanfnet" and "binary_tensor_data" in server["extensions"] and server["version"]
    model = triton.get_model_metadata("eca_nfnet_l0")
    assert model["name"] == "eca_nfnet_l0" and model["versions"] == ["1"] and model["platform"]
    assert triton.get_model_metadata("eca_nfnet_l0", "1") == model
    tensors = {t["name"]: (t["datatype"], t["shape"]) for t in model["inputs"] + model["outputs"]}
    assert tensors == {"image_bytes": ("BYTES", [-1]), "images": ("FP32", [-1, 3, 288, 288]),
                       "top_k_indices": ("INT64", [-1, -1]), "top_k_scores": ("FP32", [-1, -1]),
                       "top_k_labels": ("BYTES", [-1, -1]), "embedding": ("FP32", [-1, 2304]),
                       "probabilities": ("FP32", [-1, 1000]), "open_set_score": ("FP32", [-1])}


def counter(server, endpoint: str, status: int) -> float:
    prefix = f'ecanfnet_requests_total{{endpoint="{endpoint}",status="{status}"}} '
    lines = [line for line in server.client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix):]) if lines else 0.0


def test_tritonclient_top5_on_real_photos_equals_v1_classify_and_predict(triton, server, photo_files, run_cli,
                                                                         timm_hub_folder):
    data = [path.read_bytes() for path in photo_files]
    before = counter(server, "/v2/models/{model_name}/infer", 200)
    result = triton.infer("eca_nfnet_l0", [bytes_input(data)])
    assert counter(server, "/v2/models/{model_name}/infer", 200) == before + 1
    indices, scores = result.as_numpy("top_k_indices"), result.as_numpy("top_k_scores")
    labels = result.as_numpy("top_k_labels")
    assert indices.shape == scores.shape == labels.shape == (3, 5)
    for row, (path, raw) in enumerate(zip(photo_files, data)):
        v1 = server.client.post("/v1/classify", files={"file": (path.name, raw)}).json()["predictions"]
        assert [p["index"] for p in v1] == indices[row].tolist(), path.name
        assert [p["label"] for p in v1] == [label.decode() for label in labels[row]]
        np.testing.assert_allclose([p["score"] for p in v1], scores[row], rtol=1e-5, atol=1e-7)
    code, out, err = run_cli("predict", "--weights", str(timm_hub_folder), "--format", "json",
                             *(str(p) for p in photo_files))
    assert code == 0, err
    rows = {Path(r["path"]).name: r["predictions"] for r in read_json_lines(out)}
    for row, path in enumerate(photo_files):
        assert [p["index"] for p in rows[path.name]] == indices[row].tolist(), path.name
        np.testing.assert_allclose([p["score"] for p in rows[path.name]], scores[row], rtol=1e-4, atol=1e-6)


def test_preprocessed_pixels_give_the_same_top5_as_the_encoded_images(triton, photo_files, timm_hub_folder):
    from tritonclient.http import InferInput, InferRequestedOutput

    from ecanfnet import create_model
    from ecanfnet.transforms import decode_image, eval_transform

    transform = eval_transform(create_model(pretrained=timm_hub_folder).pretrained_cfg)
    data = [path.read_bytes() for path in photo_files]
    pixels = torch.stack([transform(decode_image(raw)) for raw in data]).numpy()
    tensor = InferInput("images", list(pixels.shape), "FP32").set_data_from_numpy(pixels)
    outputs = [InferRequestedOutput(n, binary_data=False) for n in ("top_k_indices", "top_k_scores", "embedding")]
    from_pixels = triton.infer("eca_nfnet_l0", [tensor], outputs=outputs)
    from_bytes = triton.infer("eca_nfnet_l0", [bytes_input(data)], model_version="1", outputs=outputs)
    np.testing.assert_array_equal(from_pixels.as_numpy("top_k_indices"), from_bytes.as_numpy("top_k_indices"))
    np.testing.assert_allclose(from_pixels.as_numpy("top_k_scores"), from_bytes.as_numpy("top_k_scores"),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(from_pixels.as_numpy("embedding"), from_bytes.as_numpy("embedding"),
                               rtol=1e-4, atol=1e-4)


def test_the_api_key_guards_v2_but_not_its_health(keyed):
    from tritonclient.http import InferRequestedOutput
    from tritonclient.utils import InferenceServerException

    client = triton_client(keyed.url)  # live and ready without a key
    try:
        assert client.is_server_live()
        assert not client.is_model_ready("three")  # 401
        with pytest.raises(InferenceServerException) as refused:
            client.infer("three", [bytes_input([rgb_png_small()])])
        assert refused.value.status() == "401" and "API key" in refused.value.message()
        for headers in ({"X-API-Key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}):
            assert client.is_model_ready("three", headers=headers)
            result = client.infer("three", [bytes_input([rgb_png_small()])], headers=headers,
                                  outputs=[InferRequestedOutput("top_k_labels", binary_data=False)])
            assert set(result.as_numpy("top_k_labels")[0]) == {HTML_LABEL, "dog", "fish"}  # JSON: str
        with pytest.raises(InferenceServerException) as unknown:
            client.infer("eca_nfnet_l0", [bytes_input([rgb_png_small()])], headers={"X-API-Key": API_KEY})
        assert unknown.value.status() == "404" and "'three'" in unknown.value.message()
    finally:
        client.close()


def rgb_png_small() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def image_request(*items: str, shape: list[int] | None = None, datatype: str = "BYTES") -> dict:
    return {"inputs": [{"name": "image_bytes", "datatype": datatype, "shape": shape or [len(items)], "data": list(items)}]}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


HOSTILE_V2 = {  # name: (request body or JSON object, status, words of the error)
    "oversized_body": (b"{" + b" " * (2 ** 20 + 10) + b"}", 413, "over the limit"),
    "bad_base64": (image_request("!!not base64!!"), 400, "not valid base64"),
    "wrong_datatype": (image_request("QQ==", datatype="INT8"), 400, "it takes BYTES"),
    "wrong_shape": (image_request("QQ==", "QQ==", shape=[1, 2]), 400, "takes [N] or [N, 1]"),
    "batch_over_the_limit": (image_request(*["QQ=="] * 3), 400, "over this server's limit of 2"),
    "pixel_bomb": (image_request(b64(rgb_png(100_000, 100_000, zlib.compress(b"\0" * 16)))), 413, "40,000,000"),
    "not_an_image": (image_request(b64(np.random.default_rng(0).bytes(5000))), 422, "image 0"),
    "pixels_at_the_wrong_size": ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 288, 288],
                                              "data": [0.0]}]}, 400, "takes [N, 3, 64, 64]"),
    "not_json": (b"\x89PNG\r\n", 400, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(HOSTILE_V2))
def test_hostile_v2_requests_get_a_clear_4xx_error(keyed, case):
    body, status, words = HOSTILE_V2[case]
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    got = keyed.client.post("/v2/models/three/infer", headers={"x-api-key": API_KEY}, **kwargs)
    assert got.status_code == status, got.text
    answer = got.json()
    assert list(answer) == ["error"] and words in answer["error"] and "\n" not in answer["error"], answer
    assert httpx.get(keyed.url + "/v2/health/ready", timeout=10).status_code == 200
