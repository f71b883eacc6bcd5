"""Ray Data: ImageClassifier on batches as map_batches hands them over, and examples/ray_predict.py on a local
Ray instance (2 CPUs), whose Parquet rows must equal `ecanfnet predict --format json` on the same files."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ecanfnet.integrations.ray import ImageClassifier
from helpers import huge_png_header

ROOT = Path(__file__).resolve().parents[2]


def photo_files(photo_dir: Path) -> list[Path]:
    return sorted(photo_dir.iterdir())


def truncated_jpeg(photo_dir: Path) -> bytes:
    """The first 3,000 bytes of a real JPEG: a header that opens, pixel data that ends too soon."""
    return next(p for p in photo_files(photo_dir) if p.suffix == ".jpg").read_bytes()[:3000]


@pytest.fixture(scope="module")
def classifier(timm_hub_folder) -> ImageClassifier:
    return ImageClassifier(str(timm_hub_folder), backend="torch", top_k=3, embeddings=True)


@pytest.mark.parametrize("kwargs, names", [
    (dict(top_k=0), "top_k"), (dict(top_k=True), "top_k"), (dict(backend="tensorflow"), "backend"),
    (dict(precision="fp8"), "precision"), (dict(decode="quick"), "decode"), (dict(workers=0), "workers"),
    (dict(bytes_column=None, image_column=None), "both None"), (dict(bytes_column="path"), "must differ"),
    (dict(image_column=""), "image_column"), (dict(min_score=math.nan), "min_score"),
    (dict(embeddings="yes"), "embeddings"), (dict(device="gpu0"), "device"), (dict(max_pixels=-1), "max_pixels"),
])
def test_refuses_bad_arguments_before_loading_anything(tmp_path, kwargs, names):
    # The weights do not exist: a check that let the value through would fail with WeightsError instead.
    with pytest.raises(ValueError, match=names) as info:
        ImageClassifier(str(tmp_path / "no-such-weights"), **kwargs)
    assert str(info.value).startswith("ImageClassifier: ") and "\n" not in str(info.value)


def test_bytes_batch_goes_on_past_bad_rows_and_embeddings_give_the_scores(classifier, photo_dir):
    files = photo_files(photo_dir)
    blobs = [f.read_bytes() for f in files] + [truncated_jpeg(photo_dir), "not bytes", huge_png_header(10**5, 10**5)]
    paths = [f.name for f in files] + ["broken.jpg", "odd.jpg", "bomb.png"]
    out = classifier({"bytes": np.array(blobs, dtype=object), "path": np.array(paths, dtype=object)})

    assert "bytes" not in out and list(out["path"]) == paths
    n = len(files)
    assert list(out["error"][:n]) == [""] * n
    assert out["error"][n].startswith("broken.jpg: ") and "truncated" in out["error"][n]
    assert out["error"][n + 1] == "odd.jpg: expected the encoded image file as bytes, got str"
    assert out["error"][n + 2].startswith("bomb.png: ") and "pixels" in out["error"][n + 2]
    for col, empty in (("top_indices", [-1] * 3), ("top_labels", [""] * 3), ("label", "")):
        assert all(np.array_equal(v, empty) for v in out[col][n:]), col
    assert np.isnan(out["top_scores"][n:]).all() and np.isnan(out["embedding"][n:]).all()
    assert np.isnan(out["open_set_score"][n:]).all()

    scores, emb = out["top_scores"][:n], torch.from_numpy(out["embedding"][:n])
    fc = classifier.classifier.model.head.fc  # the torch model, unfolded: its own classifier on the vectors
    with torch.no_grad():
        probs = fc(emb).softmax(-1)
        cosine = torch.nn.functional.cosine_similarity(emb[:, None, :], fc.weight[None], dim=-1).amax(-1)
    top = probs.topk(3)
    assert np.array_equal(out["top_indices"][:n], top.indices.numpy())
    np.testing.assert_allclose(scores, top.values.numpy(), rtol=1e-4, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()
    labels = classifier.classifier.labels
    assert [list(v) for v in out["top_labels"][:n]] == [[labels[i] for i in row] for row in out["top_indices"][:n]]
    assert list(out["label"][:n]) == [row[0] for row in out["top_labels"][:n]]
    np.testing.assert_allclose(out["open_set_score"][:n], cosine.numpy(), atol=1e-5)


def test_arrays_of_any_size_equal_their_png_bytes(classifier, photo_dir):
    pngs = [f for f in photo_files(photo_dir) if f.suffix == ".png"]
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in pngs]
    assert len({a.shape for a in arrays}) > 1  # read_images without size=: one shape per row
    ragged = np.empty(len(arrays) + 1, dtype=object)
    ragged[:-1] = arrays
    ragged[-1] = np.zeros((8, 8, 4), np.uint8)  # RGBA: read_images without mode="RGB"
    from_arrays = classifier({"image": ragged})
    from_bytes = classifier({"bytes": np.array([f.read_bytes() for f in pngs], dtype=object)})
    for col in ("top_indices", "top_scores", "open_set_score", "embedding"):
        np.testing.assert_allclose(from_arrays[col][:-1], from_bytes[col], rtol=1e-5, atol=1e-6, err_msg=col)
    assert from_arrays["error"][-1].startswith(f"row {len(arrays)} of the batch: expected a uint8 array of shape")


def test_min_score_turns_low_scores_into_unknown(classifier, timm_hub_folder, photo_dir):
    batch = {"bytes": np.array([f.read_bytes() for f in photo_files(photo_dir)[:4]], dtype=object)}
    plain = classifier(batch)
    cut = float(np.median(plain["open_set_score"]))
    strict = ImageClassifier(str(timm_hub_folder), backend="torch", top_k=3, min_score=cut)(batch)
    below = plain["open_set_score"] < cut
    assert below.any() and (~below).any()
    assert list(strict["label"]) == ["unknown" if b else lab for b, lab in zip(below, plain["label"])]
    assert np.array_equal(strict["top_indices"], plain["top_indices"])  # the predictions stay


def test_column_mistakes_are_named(classifier, photo_dir):
    blob = np.array([photo_files(photo_dir)[0].read_bytes()], dtype=object)
    with pytest.raises(ValueError, match="has no column 'bytes' or 'image' \\(it has 'data'\\)"):
        classifier({"data": blob})
    with pytest.raises(ValueError, match="already has a column 'label'; pass prefix="):
        classifier({"bytes": blob, "label": np.array(["cat"])})
    with pytest.raises(ValueError, match="has both 'bytes' and 'image'"):
        classifier({"bytes": blob, "image": np.zeros((1, 8, 8, 3), np.uint8)})


def test_empty_batch_keeps_the_column_types(classifier):
    out = classifier({"bytes": np.array([], dtype=object), "path": np.array([], dtype=object)})
    assert out["top_indices"].shape == (0, 3) and out["embedding"].shape == (0, classifier.dim)
    assert set(out) == {"path", *classifier.output_columns}


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray instance with 2 CPUs, kept light (no dashboard, small object store), shut down at the end."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ecanfnet-ray-")  # short: Ray puts Unix sockets below it
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
                 _temp_dir=temp_dir)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_no_progress_timeout_s = 300  # a scheduling deadlock fails the test instead of hanging
        try:
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, on copying its DataContext
def test_example_on_local_ray_equals_predict(local_ray, timm_hub_folder, photo_dir, tmp_path, run_cli, capsys):
    import pyarrow.parquet as pq

    folder = tmp_path / "photos"
    shutil.copytree(photo_dir, folder)
    (folder / "broken.jpg").write_bytes(truncated_jpeg(photo_dir))
    example = load_example("ray_predict")
    assert example.main([str(folder), "--output", str(tmp_path / "preds"), "--weights", str(timm_hub_folder),
                         "--backend", "torch", "--concurrency", "2", "--cpus-per-actor", "0.5",
                         "--batch-size", "4"]) == 0
    capsys.readouterr()
    rows = {Path(r["path"]).name: r for r in pq.read_table(tmp_path / "preds").to_pylist()}

    code, out, _ = run_cli("predict", "--format", "json", "--backend", "torch", "--no-progress",
                           "--weights", str(timm_hub_folder), str(folder))
    assert code == 1  # the broken file
    expected = {Path(r["path"]).name: r for r in map(json.loads, out.splitlines())}
    assert set(rows) == set(expected) and len(rows) == 7
    assert "truncated" in rows["broken.jpg"]["error"] and "truncated" in expected["broken.jpg"]["error"]
    for name, want in expected.items():
        if name == "broken.jpg":
            continue
        got, preds = rows[name], want["predictions"]
        assert got["error"] == "" and got["label"] == want["label"], name
        assert list(got["top_labels"]) == [p["label"] for p in preds], name
        assert list(got["top_indices"]) == [p["index"] for p in preds], name
        np.testing.assert_allclose(got["top_scores"], [p["score"] for p in preds], rtol=0, atol=1e-5)
        assert got["open_set_score"] == pytest.approx(want["open_set_score"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, on copying its DataContext
def test_example_refuses_actors_that_leave_no_cpu(local_ray, tmp_path, capsys):
    example = load_example("ray_predict")
    assert example.main([str(tmp_path), "--output", str(tmp_path / "out"), "--concurrency", "2"]) == 2
    assert "leaves none of this Ray instance's 2 CPUs for reading and writing files" in capsys.readouterr().err


def test_works_without_ray_and_the_example_names_the_extra(monkeypatch, tmp_path, capsys):
    check = "import sys, ecanfnet.integrations.ray; assert 'ray' not in sys.modules, 'ray was imported'"
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    assert load_example("ray_predict").main([str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "this example needs Ray Data: pip install 'ecanfnet[ray]'\n"
