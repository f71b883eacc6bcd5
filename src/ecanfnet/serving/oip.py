"""The Open Inference Protocol's (KServe v2) inference request and response on the wire, for this model.

A request is a JSON object, optionally followed by raw tensor bytes: the binary tensor data extension,
where the `Inference-Header-Content-Length` header gives the JSON's length and each binary input
states its byte count in `parameters.binary_data_size`. It carries exactly one input:

- `image_bytes`, BYTES, shape [N] or [N, 1]: N encoded images (JPEG, PNG, ...). Binary: each element a
  4-byte little-endian length then its bytes. JSON: each element a base64 string (JSON strings
  cannot hold raw image bytes).
- `images`, FP32, shape [N, 3, H, W] at the model's eval size: images already preprocessed.
  Binary: little-endian float32, row-major. JSON: numbers, flat or nested.

Outputs are named tensors (OUTPUT_TYPES); each one is sent as JSON `data` or, when asked for with
`parameters.binary_data` (or the request's `parameters.binary_data_output`), as raw bytes after the
JSON. Every malformed request gets an HTTPException with status 400 naming what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import HTTPException

# `images` is also the input of `ecanfnet export triton`: the same pixel tensor works against both servers.
INPUT_BYTES, INPUT_PIXELS = "image_bytes", "images"
INPUT_TYPES = {INPUT_BYTES: "BYTES", INPUT_PIXELS: "FP32"}
OUTPUT_INDICES, OUTPUT_SCORES, OUTPUT_LABELS = "top_k_indices", "top_k_scores", "top_k_labels"
OUTPUT_EMBEDDING, OUTPUT_PROBABILITIES, OUTPUT_OPEN_SET = "embedding", "probabilities", "open_set_score"
OUTPUT_TYPES = {OUTPUT_INDICES: "INT64", OUTPUT_SCORES: "FP32", OUTPUT_LABELS: "BYTES",
                OUTPUT_EMBEDDING: "FP32", OUTPUT_PROBABILITIES: "FP32", OUTPUT_OPEN_SET: "FP32"}
DEFAULT_OUTPUTS = (OUTPUT_INDICES, OUTPUT_SCORES, OUTPUT_LABELS)  # when the request names none
WIRE_DTYPES = {"INT64": "<i8", "FP32": "<f4"}
HEADER_LENGTH = "inference-header-content-length"
MAX_RANK = 8
# Normalised pixels are within about +-3; far larger ones could only overflow the network into NaN scores.
MAX_PIXEL_VALUE = 1e4


@dataclass(frozen=True)
class InferRequest:
    """A validated inference request: the images (encoded, or preprocessed pixels) and what to answer."""

    request_id: str | None
    outputs: tuple[tuple[str, bool], ...]  # (output name, as binary data), in the order to answer them
    top_k: int
    images: list[bytes] | None = None       # input `image_bytes`: N encoded images
    pixels: np.ndarray | None = None        # input `images`: (N, 3, H, W) float32


def bad(message: str) -> HTTPException:
    """The 400 of a malformed inference request."""
    return HTTPException(400, message)


def parse_infer_request(body: bytes, header_length: str | None, *, image_size: tuple[int, int], max_images: int,
                        default_top_k: int) -> InferRequest:
    """The request in body (JSON, then binary tensor data when header_length is given), checked; 400 otherwise."""
    request, binary = split_body(body, header_length)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad("id must be a string")
    params = _object(request.get("parameters"), "parameters")
    top_k = params.get("top_k", default_top_k)
    if type(top_k) is not int or top_k < 1:
        raise bad(f"parameters.top_k must be a whole number of at least 1, got {top_k!r:.40}")
    outputs = _requested_outputs(request.get("outputs"), _flag(params, "binary_data_output", "parameters"))
    name, shape, data, raw = _single_input(request.get("inputs"), binary)
    if name == INPUT_BYTES:
        images = _encoded_images(shape, data, raw, max_images=max_images)
        return InferRequest(request_id, outputs, top_k, images=images)
    pixels = _pixel_array(shape, data, raw, image_size=image_size, max_images=max_images)
    return InferRequest(request_id, outputs, top_k, pixels=pixels)


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON object at the head of body and the binary data after it."""
    if header_length is None:
        head, rest = body, b""
    else:
        value = header_length.strip()
        if not (value.isascii() and value.isdigit() and len(value) <= 12 and int(value) <= len(body)):
            raise bad(f"the Inference-Header-Content-Length header ({header_length[:20]!r}) must be the byte length "
                      f"of the JSON at the head of the body, at most the body's {len(body):,} bytes")
        head, rest = body[:int(value)], body[int(value):]
    try:
        request = json.loads(head)
    except (ValueError, RecursionError) as exc:
        raise bad(f"the inference request is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(request, dict):
        raise bad("the inference request must be a JSON object with `inputs`")
    return request, rest


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{where} must be a JSON object")
    return value


def _flag(params: dict[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise bad(f"{where}.{key} must be true or false, got {value!r:.40}")
    return value


def _requested_outputs(outputs: Any, binary_default: bool) -> tuple[tuple[str, bool], ...]:
    """(name, binary) per requested output; the top-k three when none is named."""
    if outputs is None:
        return tuple((name, binary_default) for name in DEFAULT_OUTPUTS)
    if not isinstance(outputs, list) or not outputs:
        raise bad("outputs must be a non-empty list of {\"name\": ...} objects (or left out: the top-k outputs)")
    chosen: dict[str, bool] = {}
    for item in outputs:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or name not in OUTPUT_TYPES:
            raise bad(f"unknown output {name!r:.60}: this model gives {', '.join(OUTPUT_TYPES)}")
        if name in chosen:
            raise bad(f"output {name} is requested twice")
        params = _object(item.get("parameters"), f"output {name} parameters")
        if "classification" in params:
            raise bad("the classification extension is not supported: request the top_k_indices, top_k_scores "
                      "and top_k_labels outputs, with parameters.top_k")
        if any(key.startswith("shared_memory") for key in params):
            raise bad("shared-memory outputs are not supported: send binary_data instead")
        chosen[name] = _flag(params, "binary_data", f"output {name} parameters", binary_default)
    return tuple(chosen.items())


def _single_input(inputs: Any, binary: bytes) -> tuple[str, list[int], Any, bytes | None]:
    """(name, shape, JSON data or None, binary data or None) of the one input tensor, datatype checked."""
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad(f"inputs must be a list of exactly one tensor: {INPUT_BYTES!r} (BYTES, encoded images) or "
                  f"{INPUT_PIXELS!r} (FP32, preprocessed pixels)")
    tensor = inputs[0]
    name = tensor.get("name")
    if not isinstance(name, str) or name not in INPUT_TYPES:
        raise bad(f"unknown input {name!r:.60}: send {INPUT_BYTES!r} (BYTES, encoded images) or "
                  f"{INPUT_PIXELS!r} (FP32, preprocessed pixels)")
    if tensor.get("datatype") != INPUT_TYPES[name]:
        raise bad(f"input {name} has datatype {tensor.get('datatype')!r:.40}; it takes {INPUT_TYPES[name]}")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(type(d) is int and d >= 0 for d in shape)):
        raise bad(f"input {name}: shape must be a list of at most {MAX_RANK} whole numbers, got {shape!r:.60}")
    params = _object(tensor.get("parameters"), f"input {name} parameters")
    if any(key.startswith("shared_memory") for key in params):
        raise bad("shared-memory inputs are not supported: send the data in the body")
    size = params.get("binary_data_size")
    if size is None:
        if binary:
            raise bad(f"{len(binary):,} bytes follow the JSON header, but input {name} has no "
                      "parameters.binary_data_size")
        if "data" not in tensor:
            raise bad(f"input {name} has neither data nor parameters.binary_data_size")
        return name, shape, tensor["data"], None
    if type(size) is not int or size != len(binary):
        raise bad(f"input {name}: parameters.binary_data_size is {size!r:.40}, but {len(binary):,} bytes follow the "
                  "JSON header (whose length the Inference-Header-Content-Length header gives)")
    if "data" in tensor:
        raise bad(f"input {name} has both data and binary data")
    return name, shape, None, binary


def _batch_size(n: int, max_images: int) -> int:
    if n < 1:
        raise bad("the batch is empty: send at least one image")
    if n > max_images:
        raise bad(f"a batch of {n:,} images is over this server's limit of {max_images} a request (--max-batch)")
    return n


def _encoded_images(shape: list[int], data: Any, raw: bytes | None, *, max_images: int) -> list[bytes]:
    """The N encoded images of input `image_bytes`."""
    if len(shape) not in (1, 2) or shape[1:] not in ([], [1]):
        raise bad(f"input image_bytes has shape {shape}; it takes [N] or [N, 1]: N encoded images")
    count = _batch_size(shape[0], max_images)
    items = _bytes_elements(raw, count) if raw is not None else _base64_elements(data, depth=len(shape))
    if len(items) != count:
        raise bad(f"input image_bytes holds {len(items)} elements, but its shape {shape} says {count}")
    return items


def _bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """The elements of a binary BYTES tensor: each a 4-byte little-endian length, then that many bytes."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(items) == count:
            raise bad(f"input image_bytes: {len(raw) - offset:,} bytes left over after its {count} elements")
        if offset + 4 > len(raw):
            raise bad(f"input image_bytes: element {len(items)} is cut short before its 4-byte length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise bad(f"input image_bytes: element {len(items)} declares {size:,} bytes, but only "
                      f"{len(raw) - offset:,} follow")
        items.append(raw[offset:offset + size])
        offset += size
    return items


def _base64_elements(data: Any, *, depth: int) -> list[bytes]:
    """The elements of a JSON BYTES tensor: base64 strings, flat or nested as [[s], [s], ...]."""
    if not isinstance(data, list):
        raise bad("input image_bytes: data must be a list of base64 strings")
    if depth == 2 and all(isinstance(row, list) and len(row) == 1 for row in data):
        data = [row[0] for row in data]
    items = []
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise bad(f"input image_bytes: element {i} is not a string (JSON data holds each image as base64)")
        try:
            items.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise bad(f"input image_bytes: element {i} is not valid base64 ({exc})") from None
    return items


def _pixel_array(shape: list[int], data: Any, raw: bytes | None, *, image_size: tuple[int, int],
                 max_images: int) -> np.ndarray:
    """The (N, 3, H, W) float32 array of input `images`, every value finite."""
    height, width = image_size
    if len(shape) != 4 or shape[1:] != [3, height, width]:
        raise bad(f"input images has shape {shape}; it takes [N, 3, {height}, {width}]: images preprocessed "
                  "with the model's eval settings (GET /v1/model: preprocessing)")
    count = _batch_size(shape[0], max_images)
    expected = count * 3 * height * width
    if raw is not None:
        if len(raw) != expected * 4:
            raise bad(f"input images: {len(raw):,} bytes of binary data, but shape {shape} in FP32 takes "
                      f"{expected * 4:,}")
        array = np.frombuffer(raw, dtype="<f4")
    else:
        try:
            array = np.asarray(data)
        except (ValueError, TypeError, RecursionError):
            raise bad("input images: data must be a list of numbers (flat, or nested as the shape)") from None
        if array.dtype.kind not in "iuf" or array.size != expected:
            raise bad(f"input images: data must be {expected:,} numbers for shape {shape}")
    with np.errstate(over="ignore"):  # values past float32's range become inf: refused just below
        array = array.astype(np.float32).reshape(count, 3, height, width)
    if not np.isfinite(array).all() or np.abs(array).max(initial=0.0) > MAX_PIXEL_VALUE:
        raise bad(f"input images holds values that are not finite or beyond +-{MAX_PIXEL_VALUE:g} "
                  "(normalised pixels lie within about +-3)")
    return array


def encode_infer_response(*, model_name: str, model_version: str, request_id: str | None,
                          tensors: list[tuple[str, np.ndarray, bool]]) -> tuple[bytes, dict[str, str]]:
    """The response body and headers for (output name, array, as binary) tensors, in order."""
    outputs, chunks = [], []
    for name, array, binary in tensors:
        datatype = OUTPUT_TYPES[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = _raw_bytes(datatype, array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = list(array.ravel()) if datatype == "BYTES" else array.ravel().tolist()
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        head["id"] = request_id
    head["outputs"] = outputs
    header = json.dumps(head, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def _raw_bytes(datatype: str, array: np.ndarray) -> bytes:
    """An output's binary data: little-endian numbers, or length-prefixed UTF-8 strings, row-major."""
    if datatype == "BYTES":
        encoded = [str(item).encode() for item in array.ravel()]
        return b"".join(struct.pack("<I", len(item)) + item for item in encoded)
    return np.ascontiguousarray(array, dtype=WIRE_DTYPES[datatype]).tobytes()
