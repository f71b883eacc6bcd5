"""Classifier entry points agree: PIL images, numpy arrays and files get the same preparation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ecanfnet.testing import photo_arrays
from ecanfnet.inference import Classifier
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
