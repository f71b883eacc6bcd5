"""`ecanfnet serve`: the HTTP API (classify, embed), a web page and metrics, with dynamic batching."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings
from typing import TYPE_CHECKING

from ._console import EXIT_FAILED, EXIT_OK, EXIT_USAGE, error
from ._options import (
    add_backend_options, add_command, add_decode_option, add_device_option, add_weights_option, non_negative_float,
    port_number, positive_float, positive_int)
from ._runtime import device_for, load_model, torch_device

if TYPE_CHECKING:
    import socket

    import torch

# What serving imports beyond the base install (the serve extra: uvicorn, FastAPI under the app).
_SERVE_MODULES = ("uvicorn", "..serving.app", "..serving.protocol", "..serving.v2")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
EXAMPLES = (
    ("the published checkpoint on http://127.0.0.1:8000/ (this machine only)", "ecanfnet serve"),
    ("your model on every interface, on a GPU, clients sending the key in X-API-Key; tritonclient (/v2) asks "
     "for it as flowers",
     "ECANFNET_API_KEY=change-me ecanfnet serve --weights runs/flowers --model-name flowers --host 0.0.0.0 "
     "--device cuda"),
    ("behind a reverse proxy that sends Host: classify.example.org, larger batches",
     "ecanfnet serve --port 8080 --allow-host classify.example.org --max-batch 32 --max-wait-ms 20"),
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the serve parser."""
    s = add_command(subparsers, "serve", help="HTTP API and web page for classification and embeddings",
                    description="Serve POST /v1/classify, POST /v1/embed, POST /v1/explain, GET /v1/model, the "
                                "Open Inference Protocol (KServe v2: /v2/health/*, /v2/models/NAME, POST "
                                "/v2/models/NAME/infer), /healthz, /metrics, /docs and a web page at /, with "
                                "requests batched dynamically. Needs the serve extra: pip install 'ecanfnet[serve]'.",
                    examples=EXAMPLES)
    add_weights_option(s)
    s.add_argument("--model-name", type=model_name, default=None, metavar="NAME",
                   help="the model's name on /v2/models/NAME (letters, digits, _ . -; default: the checkpoint's "
                        "architecture, e.g. eca_nfnet_l0)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    s.add_argument("--port", type=port_number, default=8000, help="TCP port, 1-65535 (default 8000)")
    _add_batching_options(s)
    _add_limit_options(s)
    s.add_argument("--decode-workers", type=positive_int, default=None, metavar="N",
                   help="image decoding threads (default: one per CPU, at most 8); at most 2N decodes are queued "
                        "or running, and a decode that cannot start within half of --timeout-s gets 503")
    add_decode_option(s)
    _add_access_options(s)
    add_device_option(s)
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="server log detail (default info)")
    add_backend_options(s)
    s.set_defaults(func=run)
    return s


def _add_batching_options(s: argparse.ArgumentParser) -> None:
    """How requests are gathered into batches."""
    s.add_argument("--max-batch", type=positive_int, default=16, metavar="N", help="images per batch (default 16)")
    s.add_argument("--max-wait-ms", type=non_negative_float, default=10.0, metavar="MS",
                   help="how long a batch waits to fill up (default 10)")
    s.add_argument("--max-queue", type=positive_int, default=64, metavar="N",
                   help="images waiting for a batch before requests get 503 (default 64)")


def _add_limit_options(s: argparse.ArgumentParser) -> None:
    """Sizes, time limits and connection limits, each with the status a request gets beyond it."""
    s.add_argument("--max-upload-bytes", type=positive_int, default=20 * 1024 * 1024, metavar="N",
                   help="larger bodies get 413 (default 20 MiB)")
    s.add_argument("--max-pixels", type=positive_int, default=40_000_000, metavar="N",
                   help="larger images get 413, checked before decoding (default 40,000,000)")
    s.add_argument("--timeout-s", type=positive_float, default=30.0, metavar="S",
                   help="per request once its body is in (decoding and queueing included), then 504 (default 30)")
    s.add_argument("--body-timeout-s", type=positive_float, default=10.0, metavar="S",
                   help="to receive a request's whole body, before it is admitted; then 408 (default 10)")
    s.add_argument("--header-timeout-s", type=positive_float, default=10.0, metavar="S",
                   help="to receive a request's headers; then the connection is closed (default 10)")
    s.add_argument("--keep-alive-s", type=positive_int, default=5, metavar="S",
                   help="idle keep-alive connections are closed after this (default 5)")
    s.add_argument("--max-connections", type=positive_int, default=256, metavar="N",
                   help="a request arriving while more than N connections are open, or N requests are already "
                        "being handled, gets 503 + Retry-After: 1 and its connection is closed; connections are "
                        "accepted, not refused (default 256)")
    s.add_argument("--max-header-bytes", type=positive_int, default=16 * 1024, metavar="N",
                   help="a request whose line and headers are still incomplete after N bytes gets 400 "
                        "(default 16 KiB)")


def _add_access_options(s: argparse.ArgumentParser) -> None:
    """Who may use the server: the API key and the Host names answered."""
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require this key (printable ASCII; Authorization: Bearer KEY or X-API-Key: KEY) on /v1/* "
                        "and /v2/* but /v2/health/*; default: $ECANFNET_API_KEY, else none")
    s.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="bound to loopback, the server answers only Host: localhost, 127.x.x.x or [::1] "
                        "(against DNS rebinding); also answer this name (e.g. behind a proxy; repeatable)")


def model_name(text: str) -> str:
    """argparse type of --model-name: a name that is one URL path segment as it is."""
    if not MODEL_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be 1-64 letters, digits, '_', '.' or '-' starting with a letter or "
                                         f"digit, got {text!r}")
    return text


def run(args: argparse.Namespace) -> int:
    """Load the model once and serve it until interrupted (SIGINT/SIGTERM finish in-flight requests first)."""
    missing = _serve_extra_missing()
    if missing:
        error(f"serving needs {missing}: pip install 'ecanfnet[serve]'")
        return EXIT_FAILED
    from ..serving.app import API_KEY_ENV, host_allowed

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not all("!" <= c <= "~" for c in api_key):
        # Clients send headers as latin-1 or UTF-8 bytes at will: only printable ASCII compares reliably.
        error(f"the API key (--api-key or ${API_KEY_ENV}) must be printable ASCII without spaces, "
              "as HTTP headers carry it")
        return EXIT_USAGE
    loopback = host_allowed(args.host)
    device = torch_device(args.device)  # a bad --device fails before the port is taken
    if not loopback and api_key is None:
        warnings.warn(f"serving on {args.host} without an API key: anyone who can reach this port can use it",
                      stacklevel=1)
    try:
        sock = _listen_socket(args.host, args.port)  # before loading the model: a busy port fails at once
    except OSError as exc:
        error(f"cannot listen on {args.host} port {args.port}: {exc.strerror or exc}")
        return EXIT_FAILED
    with sock:
        return _serve(args, sock, device, api_key=api_key, loopback=loopback)


def _serve_extra_missing() -> str | None:
    """The name of the first module of the serve extra that does not import; None when all do."""
    try:
        for name in _SERVE_MODULES:
            importlib.import_module(name, __package__)
    except ImportError as exc:
        return str(exc.name)
    return None


def _serve(args: argparse.Namespace, sock: socket.socket, device: torch.device, *, api_key: str | None, loopback: bool) -> int:
    """Load the model into an engine and run uvicorn on the bound socket until it stops."""
    import uvicorn

    from ..serving.app import create_app
    from ..serving.engine import InferenceEngine
    from ..serving.explain_route import ExplainService

    model = load_model(args.weights)
    engine = InferenceEngine(model, args.backend, args.precision, device_for(args.device, model, device))
    explain = ExplainService.for_model(model, engine.runner.device)  # /v1/explain needs the eager model (autograd)
    del model  # the engine and the explainer keep what they run
    settings = _settings(args, api_key=api_key, loopback=loopback)
    print(f"ecanfnet: serving {engine.name} ({engine.backend}, {engine.precision}) on "
          f"http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    server = uvicorn.Server(_uvicorn_config(create_app(engine, settings, explain), args))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    except SystemExit:  # uvicorn's own start-up failure (exit 3), already logged
        return EXIT_FAILED
    return EXIT_OK if server.started else EXIT_FAILED


def _settings(args: argparse.Namespace, *, api_key: str | None, loopback: bool):
    """The app's ServeSettings from the options; the Host allow-list applies only when bound to loopback."""
    from ..serving.app import ServeSettings

    return ServeSettings(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_upload_bytes=args.max_upload_bytes, max_pixels=args.max_pixels, timeout_s=args.timeout_s,
        body_timeout_s=args.body_timeout_s, api_key=api_key, decode_workers=args.decode_workers or 0,
        decode=args.decode, allowed_hosts=tuple(h.lower() for h in args.allow_host) if loopback else None,
        model_name=args.model_name)


def _uvicorn_config(app, args: argparse.Namespace):
    """uvicorn's settings: log level, graceful shutdown after the request timeout, connection limits."""
    import uvicorn

    from ..serving.protocol import header_timeout_protocol

    return uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=int(args.timeout_s) + 5,
                          timeout_keep_alive=args.keep_alive_s, limit_concurrency=args.max_connections,
                          h11_max_incomplete_event_size=args.max_header_bytes,
                          http=header_timeout_protocol(args.header_timeout_s))


def _listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (IPv6 when host has a colon, as uvicorn does); OSError when it cannot be."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = socket.getaddrinfo(host.strip("[]"), port, family, socket.SOCK_STREAM)[0][4]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
