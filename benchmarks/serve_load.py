"""Load test of `ecanfnet serve` on loopback, against offline model throughput at the same batch size.

1. Anchor: model-only images/s of the same backend at batch --max-batch (what `ecanfnet bench`
   reports), measured first, in this process, before the server starts.
2. A real server process (random weights: speed does not depend on the values), then --clients
   threads each posting real JPEG photos one after another until --requests have been answered.
   Reported: requests/s, p50/p99 latency, status counts, mean batch size from /metrics, and
   served images/s / anchor images/s (target >= 0.8 at 16 clients).

    python benchmarks/serve_load.py [--clients 16] [--requests 320] [--max-batch 16] [--backend auto]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from PIL import Image


from ecanfnet.testing import photo_arrays
from ecanfnet.testing import ServeProcess

from ecanfnet import build_model, save_pretrained  # noqa: E402
from ecanfnet.backends import resolve_backend  # noqa: E402
from ecanfnet.bench import benchmark  # noqa: E402


def jpegs() -> list[bytes]:
    out = []
    for arr in photo_arrays().values():
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def load(server: ServeProcess, clients: int, total: int, bodies: list[bytes]) -> tuple[float, list[float], dict[int, int]]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(total))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                code = http.post("/v1/classify", content=bodies[i % len(bodies)],
                                 headers={"content-type": "image/jpeg"}).status_code
                with lock:
                    latencies.append(time.perf_counter() - start)
                    statuses[code] = statuses.get(code, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    os.environ.setdefault("ECANFNET_CACHE", tempfile.mkdtemp(prefix="ecanfnet-bench-cache-"))
    backend = resolve_backend(args.backend, torch.device("cpu"))
    model = build_model().eval()
    anchor = benchmark(model, backend, "fp32", batch_size=args.max_batch, repeats=5, warmup=1)["images_per_s"]
    print(f"## anchor: {backend} fp32, batch {args.max_batch} @288, model only: {anchor:.2f} images/s")

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, Path(tmp) / "weights")
        server = ServeProcess(Path(tmp) / "weights", "--backend", backend, "--max-batch", str(args.max_batch),
                        "--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(4 * args.clients))
        try:
            bodies = jpegs()
            load(server, min(args.clients, 4), 2 * args.max_batch, bodies)  # warm-up: sessions, allocators
            before = server.client.get("/metrics").text
            wall, latencies, statuses = load(server, args.clients, args.requests, bodies)
            after = server.client.get("/metrics").text
        finally:
            server.stop()
    ok = statuses.get(200, 0)
    served = ok / wall
    q = statistics.quantiles(latencies, n=100)
    batches = _delta_mean_batch(before, after)
    print(f"## {args.clients} clients, {args.requests} requests of real JPEG photos, max batch {args.max_batch}, "
          f"max wait {args.max_wait_ms:g} ms")
    print(f"statuses {dict(sorted(statuses.items()))}, wall {wall:.1f} s")
    print(f"requests/s {served:.2f}   p50 {1000 * q[49]:.0f} ms   p99 {1000 * q[98]:.0f} ms   mean batch {batches:.1f}")
    print(f"served images/s / offline {backend} batch-{args.max_batch} images/s = {served / anchor:.2f}x  (target >= 0.8)")


def _delta_mean_batch(before: str, after: str) -> float:
    def totals(text: str) -> tuple[float, float]:
        vals = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith(("ecanfnet_batch_size_sum", "ecanfnet_batch_size_count"))}
        return vals.get("ecanfnet_batch_size_sum", 0.0), vals.get("ecanfnet_batch_size_count", 0.0)
    (s0, c0), (s1, c1) = totals(before), totals(after)
    return (s1 - s0) / max(c1 - c0, 1)


if __name__ == "__main__":
    main()
