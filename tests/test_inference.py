"""Classifier entry points agree: PIL images, numpy arrays and files get the same preparation."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from ecanfnet.testing import photo_arrays
from ecanfnet.inference import Classifier
from ecanfnet.transforms import eval_transform
from hostile import small_model_folder

PHOTO = photo_arrays()["chelsea"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Classifier:
    return Classifier.from_pretrained(small_model_folder(tmp_path_factory.mktemp("model"), num_classes=5),
                                      device="cpu", backend="torch")


def test_classify_applies_exif_orientation_like_predict_files(classifier, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(PHOTO).save(path, exif=exif, quality=95)
    (from_file,) = classifier.predict_files([str(path)], top_k=5)
    with Image.open(path) as img:
        assert classifier.classify([img], top_k=5) == [from_file.predictions]
        raw_pixels = classifier.classify([Image.fromarray(np.asarray(img))], top_k=5)  # the same pixels, no EXIF
    assert raw_pixels != [from_file.predictions]  # the orientation changes the answer, so the check above bites


def test_classify_accepts_uint8_arrays_like_pil_images(classifier):
    gray = np.asarray(Image.fromarray(PHOTO).convert("L"))
    got = classifier.classify([PHOTO, gray, PHOTO[::2, ::3]], top_k=3)  # the last one is not contiguous
    want = classifier.classify([Image.fromarray(PHOTO), Image.fromarray(gray), Image.fromarray(PHOTO[::2, ::3].copy())],
                               top_k=3)
    assert got == want


@pytest.mark.parametrize("bad, reason", [
    (PHOTO.astype(np.float32), "uint8 array of shape"),
    (np.zeros((8, 8, 4), np.uint8), r"got uint8 \(8, 8, 4\)"),
    (np.zeros((8,), np.uint8), r"got uint8 \(8,\)"),
    (np.zeros((0, 8, 3), np.uint8), "non-empty"),
    ("cat.jpg", "got str"),
])
def test_classify_refuses_other_arrays_by_shape_and_dtype(classifier, bad, reason):
    with pytest.raises(ValueError, match=reason):
        classifier.classify([bad])


def direct_embeddings(model, images: list[Image.Image]) -> torch.Tensor:
    """Pooled embeddings straight from the torch model (no runner, no ClassHead)."""
    x = torch.stack([eval_transform(model.pretrained_cfg)(img) for img in images])
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def test_open_set_score_is_the_largest_cosine_similarity_to_a_class(classifier):
    images = [Image.fromarray(arr) for arr in photo_arrays().values()]
    embeddings = direct_embeddings(classifier.model, images)
    weights = classifier.model.head.fc.weight.detach()
    want = torch.cosine_similarity(embeddings[:, None, :], weights[None, :, :], dim=-1).amax(dim=1)
    results = classifier.classify_images(images, top_k=2)
    np.testing.assert_allclose([r.open_set_score for r in results], want.numpy(), rtol=1e-4, atol=1e-5)
    assert len(set(round(r.open_set_score, 4) for r in results)) > 1  # the score tells images apart
    assert [r.path for r in results] == [f"image {i}" for i in range(len(images))]
    assert [r.predictions for r in results] == classifier.classify(images, top_k=2)
    assert all(r.label == r.predictions[0].label for r in results)  # no min_score: always the top class


def test_min_score_turns_low_scores_into_unknown_and_keeps_the_predictions(classifier, tmp_path):
    images = [Image.fromarray(arr) for arr in photo_arrays().values()]
    scores = sorted(r.open_set_score for r in classifier.classify_images(images))
    cut = (scores[2] + scores[3]) / 2  # three images below, three above
    results = classifier.classify_images(images, min_score=cut)
    assert sorted(r.label == "unknown" for r in results) == [False] * 3 + [True] * 3
    for r in results:
        assert (r.label == "unknown") == (r.open_set_score < cut)
        assert r.label in ("unknown", r.predictions[0].label) and len(r.predictions) == 5
    Image.fromarray(PHOTO).save(tmp_path / "cat.png")
    (file_result,) = classifier.predict_files([str(tmp_path / "cat.png")], min_score=2.0)  # cosines are <= 1
    row = file_result.to_dict()
    assert row["label"] == "unknown" and row["predictions"] == [asdict(p) for p in file_result.predictions]
    assert list(row) == ["path", "label", "open_set_score", "predictions"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.5", True, None])
def test_min_score_must_be_a_finite_number(classifier, bad):
    if bad is None:  # None is "no threshold"
        assert classifier.classify_images([PHOTO], min_score=None)[0].label != "unknown"
        return
    with pytest.raises(ValueError, match="min_score must be a finite number"):
        classifier.classify_images([PHOTO], min_score=bad)
    with pytest.raises(ValueError, match="min_score must be a finite number"):
        next(classifier.predict_files(["never-read.png"], min_score=bad))


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror(classifier):
    square = Image.fromarray(PHOTO).resize((64, 64))  # the model's size: no crop that could be off-centre
    mirror = square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    model = classifier.model
    tta = Classifier(model, "cpu", "torch", tta=True)
    (got,) = tta.classify_images([square], top_k=5)
    embeddings = direct_embeddings(model, [square, mirror])
    with torch.no_grad():
        mean_logits = model.head.fc(embeddings).mean(dim=0)
    probs = mean_logits.softmax(-1)
    np.testing.assert_allclose([p.score for p in got.predictions], probs.sort(descending=True).values.numpy(),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tta.logits(torch.stack([tta.transform(square)]))[0].numpy(), mean_logits.numpy(),
                               rtol=1e-4, atol=1e-4)
    mean_embedding = embeddings.mean(dim=0)
    want_score = torch.cosine_similarity(mean_embedding[None], model.head.fc.weight.detach(), dim=-1).max()
    assert got.open_set_score == pytest.approx(float(want_score), rel=1e-4, abs=1e-5)
    (plain,) = classifier.classify_images([square])
    assert plain.predictions != got.predictions  # the mirror changes the answer, so the check above bites
