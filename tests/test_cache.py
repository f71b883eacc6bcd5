"""The conversion cache: bounded by size (least recently used evicted), safe across processes, IR pairs as one entry."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ecanfnet import backends, cache
from ecanfnet.errors import BackendError
from ecanfnet.model import ECANFNet, NFNetConfig
from ecanfnet.testing import randomize_

TINY = NFNetConfig(depths=(1, 1, 1, 1), channels=(32, 32, 64, 64), stem_channels=16, group_size=8)
# A subprocess builds the same tiny network (seeded) as tiny_model() does here.
TINY_SOURCE = textwrap.dedent("""
    import sys
    from ecanfnet.model import ECANFNet, NFNetConfig
    from ecanfnet.testing import randomize_
    cfg = NFNetConfig(depths=(1, 1, 1, 1), channels=(32, 32, 64, 64), stem_channels=16, group_size=8)
    model = randomize_(ECANFNet(cfg, 5, name="eca_nfnet_l0"), int(sys.argv[1])).eval()
""")


def tiny_model(seed: int = 0) -> ECANFNet:
    """A randomised ECA-NFNet a few hundred times smaller than L0: exports in well under a second."""
    return randomize_(ECANFNet(TINY, 5, name="eca_nfnet_l0"), seed).eval()


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ECANFNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(cache.MAX_BYTES_VARIABLE, raising=False)
    return tmp_path / "cache"


def make_entry(root: Path, kind: str, stem: str, size: int, used: float) -> list[Path]:
    """Fake entry files (an .onnx, or an IR's .xml/.bin/.sha256 with its .lock), last used at `used`."""
    folder = root / kind
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "onnx":
        files = [folder / f"{stem}.onnx"]
    else:
        files = [folder / f"{stem}.{s}" for s in ("xml", "bin", "sha256")]
    for i, path in enumerate(files):
        path.write_bytes(b"x" * (size if i == 0 else 10))
    files.append(folder / f"{stem}.lock")
    files[-1].touch()
    for path in files:
        os.utime(path, (used, used))
    return files


def names(root: Path) -> set[str]:
    return {p.name for sub in ("onnx", "openvino") if (root / sub).is_dir() for p in (root / sub).iterdir()}


def test_the_bound_evicts_least_recently_used_entries_whole(cache_root):
    now = time.time()
    old_ir = make_entry(cache_root, "openvino", "m-aaa-ov2026.4.1", 1000, now - 500)  # 1030 bytes, the oldest
    old = make_entry(cache_root, "onnx", "m-bbb-opset17", 1000, now - 400)
    kept = make_entry(cache_root, "onnx", "m-ccc-opset17", 1000, now - 300)
    new = make_entry(cache_root, "onnx", "m-ddd-opset17", 1000, now - 100)
    (cache_root / "onnx" / "notes.txt").write_text("not ours")  # unknown files are neither counted nor removed
    cache.touch(kept[0])  # used just now: evicted last
    removed = cache.evict(limit=2500)
    assert [e.stem for e in removed] == ["m-aaa-ov2026.4.1", "m-bbb-opset17"]
    assert names(cache_root) == {kept[0].name, kept[1].name, new[0].name, new[1].name, "notes.txt"}
    assert not any(p.exists() for p in old_ir + old)  # .xml, .bin, .sha256 and .lock go together
    assert cache.evict(limit=2500) == []


def test_the_entry_in_use_stays_and_a_locked_one_is_skipped(cache_root):
    now = time.time()
    first = make_entry(cache_root, "onnx", "m-aaa-opset17", 1000, now - 300)
    second = make_entry(cache_root, "onnx", "m-bbb-opset17", 1000, now - 200)
    third = make_entry(cache_root, "openvino", "m-ccc-ov2026.4.1", 1000, now - 100)
    with cache.entry_lock(second[0]) as held:  # another reader or writer holds it: skipped
        assert held
        removed = cache.evict(keep=[first[0]], limit=0)
    assert [e.stem for e in removed] == ["m-ccc-ov2026.4.1"]
    assert all(p.exists() for p in first + second) and not any(p.exists() for p in third)


def test_eviction_tolerates_files_vanishing_under_it(cache_root, monkeypatch):
    now = time.time()
    gone = make_entry(cache_root, "openvino", "m-aaa-ov2026.4.1", 1000, now - 300)
    make_entry(cache_root, "onnx", "m-bbb-opset17", 1000, now - 200)
    listing = cache.entries()
    for path in gone[:2]:  # another process evicts half of it between the listing and the removal
        path.unlink()
    monkeypatch.setattr(cache, "entries", lambda root=None: listing)
    assert [e.stem for e in cache.evict(limit=1000)] == ["m-aaa-ov2026.4.1"]
    assert not any(p.exists() for p in gone)


def test_stale_temp_files_of_crashed_writers_are_removed(cache_root):
    folder = cache_root / "onnx"
    folder.mkdir(parents=True)
    stale, fresh = folder / ".m.onnx.abc.tmp", folder / ".m.onnx.def.tmp"
    stale_dir = folder / ".m-ov.xyz"
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    stale_dir.mkdir()
    (stale_dir / "model.bin").write_bytes(b"partial")
    old = time.time() - cache.STALE_SECONDS - 60
    os.utime(stale, (old, old))
    os.utime(stale_dir, (old, old))
    cache.evict()
    assert not stale.exists() and not stale_dir.exists() and fresh.exists()  # a writer may still be at work


@pytest.mark.parametrize("text", ["lots", "-1", "1e9", "2 GiB"])
def test_a_bad_size_bound_is_one_clear_line(cache_root, monkeypatch, text):
    monkeypatch.setenv(cache.MAX_BYTES_VARIABLE, text)
    with pytest.raises(BackendError, match=r"^ECANFNET_CACHE_MAX_BYTES must be a whole number of bytes"):
        backends.cached_onnx_export(tiny_model())
    assert not (cache_root / "onnx").exists()  # refused before anything is written


def test_cached_exports_keep_the_cache_within_its_bound(cache_root, monkeypatch):
    first = backends.cached_onnx_export(tiny_model(0))
    monkeypatch.setenv(cache.MAX_BYTES_VARIABLE, str(first.stat().st_size + 1000))
    stamp = first.stat().st_mtime_ns
    time.sleep(0.01)
    assert backends.cached_onnx_export(tiny_model(0)) == first and first.stat().st_mtime_ns > stamp  # touched on use
    second = backends.cached_onnx_export(tiny_model(1))
    assert second.exists() and not first.exists()  # the older entry made room for the new one
    assert names(cache_root) == {second.name, second.with_suffix(".lock").name}
    monkeypatch.setenv(cache.MAX_BYTES_VARIABLE, "0")
    third = backends.cached_onnx_export(tiny_model(2))
    assert names(cache_root) == {third.name, third.with_suffix(".lock").name}  # the entry in use always stays


def test_the_onnx_backend_runs_where_the_cache_cannot_be_written(tmp_path, monkeypatch, caplog):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("ECANFNET_CACHE", str(tmp_path / "cache"))
    model, x = tiny_model(), torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="ecanfnet"):
        runner = backends.make_runner(model, "onnxruntime", "fp32")
    with torch.no_grad():
        want = model(x)
    assert float((runner(x) - want).abs().max() / want.abs().max()) <= 1e-5
    assert "cannot cache the ONNX export" in caplog.text


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


WRITER = TINY_SOURCE + textwrap.dedent("""
    import os, time
    from pathlib import Path
    from ecanfnet import backends, exports
    log, go = Path(sys.argv[2]), Path(sys.argv[3])
    real = exports.export_onnx

    def slow_export(model, out, *args, **kw):  # widens the window in which the two writers overlap
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        return real(model, out, *args, **kw)

    backends.export_onnx = slow_export
    while not go.exists():
        time.sleep(0.01)
    if sys.argv[4] == "cached":
        print(backends.cached_onnx_export(model))
    else:  # straight to the same file, no lock: the atomic rename alone keeps it whole
        path = Path(sys.argv[5])
        slow_export(model, path, check=False)
        print(path)
""")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["cached", "unlocked"])
def test_two_processes_writing_the_same_entry_leave_one_valid_file(cache_root, tmp_path, how):
    import onnxruntime as ort

    log, go, target = tmp_path / "exports.log", tmp_path / "go", cache_root / "onnx" / "direct.onnx"
    env = {**os.environ, "ECANFNET_CACHE": str(cache_root)}
    procs = [_python(WRITER, "0", str(log), str(go), how, str(target), env=env) for _ in range(2)]
    time.sleep(0.5)
    go.touch()  # both start at once
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    path = Path(paths.pop())
    writers = log.read_text().split()
    assert len(writers) == (1 if how == "cached" else 2)  # the lock: the second process reads the first's file
    assert names(cache_root) == {path.name, *([path.with_suffix(".lock").name] if how == "cached" else [])}
    model, x = tiny_model(0), np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


REWRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ecanfnet.fileio import write_atomically
    target, sources = Path(sys.argv[1]), [Path(p).read_bytes() for p in sys.argv[2:4]]

    def slowly(data):
        def write(tmp):
            with open(tmp, "wb") as f:
                for i in range(0, len(data), 16384):
                    f.write(data[i:i + 16384])
                    f.flush()
                    time.sleep(0.001)
        return write

    for i in range(int(sys.argv[4])):
        write_atomically(target, slowly(sources[i % 2]))
""")


@pytest.mark.slow
def test_an_entry_being_read_is_never_seen_half_written(cache_root, tmp_path):
    a, b = (backends.cached_onnx_export(tiny_model(seed)) for seed in (0, 1))
    (tmp_path / "a").write_bytes(a.read_bytes())
    (tmp_path / "b").write_bytes(b.read_bytes())
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)}
    with open(a, "rb") as held:  # a reader that opened the entry before the rewrites
        writer = _python(REWRITER, str(a), str(tmp_path / "b"), str(tmp_path / "a"), "40")
        seen = set()
        while writer.poll() is None:
            seen.add(hashlib.sha256(a.read_bytes()).hexdigest())
        _, err = writer.communicate()
        assert writer.returncode == 0, err[-2000:]
        assert held.read() == (tmp_path / "a").read_bytes()  # its file is untouched by the rewrites
    assert seen <= digests and len(seen) == 2  # every read whole: one version or the other, never a mix
    assert hashlib.sha256(a.read_bytes()).hexdigest() in digests
    assert not [p for p in a.parent.iterdir() if p.name.startswith(".")]  # no temp files left
