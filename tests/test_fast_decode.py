"""decode="fast": JPEGs decoded at a reduced DCT scale (Image.draft), within a published bound of the exact path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from ecanfnet.testing import input_psnr, photo_arrays
from ecanfnet import ImageLoadError, build_model, eval_transform, load_image
from ecanfnet.files import decoded_batches
from ecanfnet.transforms import FAST_DECODE_MARGIN, EvalTransform, ImageTooLarge, decode_image

PHOTOS = photo_arrays()
# The published bound (README, docs/benchmarks.md): PSNR of the network input, fast vs exact, measured
# 52-57 dB on these photos at ~2000 px and at 4032 x 3024 (benchmarks/fast_decode.py).
MIN_PSNR_DB = 45.0
TRANSFORM = eval_transform(build_model().pretrained_cfg)  # 288 x 288, crop_pct 1.0, bicubic


def psnr(fast: torch.Tensor, exact: torch.Tensor) -> float:
    """PSNR (dB) of two network inputs made by TRANSFORM."""
    return input_psnr(fast, exact, TRANSFORM.std)


def large(arr: np.ndarray, long_side: int = 2000) -> Image.Image:
    """A real photo upscaled so its long side is long_side, large enough for the DCT reduction to apply."""
    h, w = arr.shape[:2]
    scale = long_side / max(h, w)
    return Image.fromarray(arr).resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def big_jpegs(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("big_jpegs")
    paths = {}
    for name, arr in sorted(PHOTOS.items()):
        paths[name] = str(folder / f"{name}.jpg")
        large(arr).save(paths[name], quality=90)
    return paths


def both(path, transform: EvalTransform = TRANSFORM, **kw) -> tuple[Image.Image, Image.Image]:
    return load_image(path, **kw), load_image(path, decode="fast", min_size=transform.min_decode_size, **kw)


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_fast_decode_reduces_keeps_the_margin_and_stays_within_the_bound(big_jpegs, name):
    exact, fast = both(big_jpegs[name])
    assert fast.mode == "RGB"
    assert fast.width < exact.width and fast.height < exact.height  # the reduction did happen
    resized = TRANSFORM._resized_size(*exact.size)  # what the resize step makes of the full image
    assert fast.width >= FAST_DECODE_MARGIN * resized[0] and fast.height >= FAST_DECODE_MARGIN * resized[1]
    x_exact, x_fast = TRANSFORM(exact), TRANSFORM(fast)
    assert x_fast.shape == x_exact.shape == (3, 288, 288)
    assert psnr(x_fast, x_exact) >= MIN_PSNR_DB


def test_the_largest_reduction_that_keeps_the_margin_is_chosen(big_jpegs):
    """2000 x 1330 for 288: resized 433 x 288, so at least 866 x 576; 1/2 gives 1000 x 665, 1/4 would be 500 x 333.

    A phone-size 4032 x 3024 (resized 384 x 288, at least 768 x 576) goes to 1/4: 1008 x 756.
    """
    assert Image.open(big_jpegs["chelsea"]).size == (2000, 1330)  # 451 x 300 upscaled
    _, fast = both(big_jpegs["chelsea"])
    assert fast.size == (1000, 665)
    big = io.BytesIO()
    Image.fromarray(PHOTOS["coffee"]).resize((4032, 3024)).save(big, format="JPEG", quality=90)
    phone = decode_image(big.getvalue(), "phone.jpg", decode="fast", min_size=TRANSFORM.min_decode_size)
    assert phone.size == (1008, 756)


@pytest.fixture(scope="module")
def odd_sized_photo() -> Image.Image:
    """3075 x 2307: at 1/4 the last stored column and row hold 3/4 of a pixel, an edge that flips and turns move."""
    return Image.fromarray(PHOTOS["china"]).resize((3075, 2307), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied_after_the_reduction(tmp_path, odd_sized_photo, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    odd_sized_photo.save(path, quality=90, exif=exif)
    exact, fast = both(path)
    turned = orientation >= 5
    assert exact.size == ((2307, 3075) if turned else (3075, 2307))
    assert fast.size == ((577, 769) if turned else (769, 577))  # 1/4, rounded up, then turned
    x_exact, x_fast = TRANSFORM(exact), TRANSFORM(fast)
    # a partial edge resized as if on the wrong side measured 31-40 dB here, the right one 51.8 dB
    assert psnr(x_fast, x_exact) >= MIN_PSNR_DB
    # the bound tells orientations apart: the fast image rotated half a turn is far from the exact one
    assert psnr(torch.flip(x_fast, dims=(1, 2)), x_exact) < MIN_PSNR_DB - 20


@pytest.mark.parametrize("orientation, expected", [(1, (1200, 600)), (6, (300, 600)), (8, (300, 600))])
def test_the_needed_size_is_worked_out_in_stored_orientation(tmp_path, orientation, expected):
    """Squash to 288 high x 144 wide: the upright image must stay >= 288 x 576 (FAST_DECODE_MARGIN x 144 x 288).

    Stored 2400 x 1200: upright, a quarter turn makes it 1200 x 2400, so 1/4 (300 x 600) is enough; unturned,
    1/4 would be 600 x 300 (too low), so 1/2. Reading the sizes without the swap would pick the wrong scale both ways.
    """
    cfg = dict(build_model().pretrained_cfg, test_input_size=(3, 288, 144), crop_mode="squash")
    transform = eval_transform(cfg)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "wide.jpg"
    Image.fromarray(PHOTOS["rocket"]).resize((2400, 1200), Image.Resampling.BICUBIC).save(path, quality=90, exif=exif)
    exact, fast = both(path, transform)
    assert fast.size == expected
    assert psnr(transform(fast), transform(exact)) >= MIN_PSNR_DB


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tif")])
def test_other_formats_take_the_exact_path(tmp_path, fmt, ext):
    path = tmp_path / f"photo.{ext}"
    large(PHOTOS["coffee"], 1200).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    exact, fast = both(path)
    assert fast.size == exact.size and np.array_equal(np.asarray(fast), np.asarray(exact))


def test_a_jpeg_too_small_to_reduce_is_decoded_exactly(tmp_path):
    path = tmp_path / "vga.jpg"
    Image.fromarray(PHOTOS["chelsea"]).resize((640, 480)).save(path, quality=90)
    exact, fast = both(path)
    assert np.array_equal(np.asarray(fast), np.asarray(exact))


def test_a_truncated_jpeg_is_the_same_one_line_error(tmp_path):
    buf = io.BytesIO()
    large(PHOTOS["chelsea"]).save(buf, format="JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg: truncated or corrupt") as info:
        load_image(path, decode="fast", min_size=TRANSFORM.min_decode_size)
    assert "\n" not in str(info.value)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to declare width x height."""
    buf = io.BytesIO()
    Image.fromarray(PHOTOS["rocket"][:16, :16]).save(buf, format="JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_pixel_limit_is_checked_on_the_full_size_before_any_reduction(tmp_path, monkeypatch):
    def no_draft(*args, **kwargs):
        raise AssertionError("draft was reached")

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", no_draft)
    path = tmp_path / "claims.jpg"
    path.write_bytes(jpeg_claiming(12_000, 9_000))  # 108e6 pixels; at 1/8 it would be 1500 x 1125, under the limit
    with pytest.raises(ImageTooLarge, match="claims.jpg: 12000 x 9000 = 108,000,000 pixels is over the limit of 89,"):
        load_image(path, decode="fast", min_size=TRANSFORM.min_decode_size)
    with pytest.raises(ImageTooLarge, match="upload: 12000 x 9000"):
        decode_image(path.read_bytes(), decode="fast", min_size=(576, 576))
    path.write_bytes(jpeg_claiming(40_000, 30_000))  # past Pillow's own guard too: refused while opening
    with pytest.raises(ImageTooLarge, match="claims.jpg: 1,200,000,000 pixels is over the limit"):
        load_image(path, decode="fast", min_size=TRANSFORM.min_decode_size)
    with pytest.raises(ImageTooLarge, match="over the limit of 1,000,000"):  # a real photo and a lowered limit
        load_image(_save(tmp_path / "real.jpg", large(PHOTOS["rocket"])), 1_000_000, "fast", TRANSFORM.min_decode_size)


def _save(path, img: Image.Image) -> str:
    img.save(path, quality=90)
    return str(path)


def test_decode_options_are_checked():
    with pytest.raises(ValueError, match="decode must be one of exact, fast"):
        load_image("nothing.jpg", decode="quick")
    with pytest.raises(ValueError, match="needs min_size"):
        decode_image(b"x", decode="fast")
    with pytest.raises(ValueError, match="min_decode_size"):
        list(decoded_batches(["a.jpg"], lambda img: img, 1, decode="fast"))


def test_decoded_batches_thread_the_switch(big_jpegs, tmp_path):
    png = tmp_path / "flower.png"
    Image.fromarray(PHOTOS["flower"]).save(png)
    paths = [big_jpegs["china"], str(png)]
    exact = [t for batch in decoded_batches(paths, TRANSFORM, 2, 1) for _, t, _ in batch]
    fast = [t for batch in decoded_batches(paths, TRANSFORM, 2, 1, decode="fast") for _, t, _ in batch]
    assert not torch.equal(fast[0], exact[0]) and psnr(fast[0], exact[0]) >= MIN_PSNR_DB
    assert torch.equal(fast[1], exact[1])  # the PNG


def test_predict_embed_and_evaluate_take_decode_fast(capsys, tmp_path, big_jpegs):
    from hostile import small_model_folder

    from ecanfnet.cli import main

    weights = small_model_folder(tmp_path / "model", num_classes=3, size=64)
    data = tmp_path / "data" / "0"
    data.mkdir(parents=True)
    for name in ("rocket", "coffee"):
        Image.open(big_jpegs[name]).save(data / f"{name}.jpg", quality=90)
    for args in (["predict", str(data), "--format", "json"],
                 ["embed", str(data), "--output", str(tmp_path / "out.npy")],
                 ["evaluate", "--data", str(tmp_path / "data"), "--workers", "0"]):
        assert main([*args, "--weights", str(weights), "--decode", "fast", "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    for command in (["predict", str(data)], ["embed", str(data), "--output", "x.npy"], ["evaluate", "--data", "d"],
                    ["serve"]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--decode", "quick"])
        assert info.value.code == 2


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_server_decode_takes_the_switch(big_jpegs):
    """serve --decode fast: the upload decode (serving/app.py _preprocess) reduces within the bound; limits hold."""
    from types import SimpleNamespace

    from fastapi import HTTPException

    from ecanfnet.serving.app import ServeSettings, _preprocess

    assert ServeSettings().decode == "exact"
    engine = SimpleNamespace(transform=TRANSFORM)
    data = open(big_jpegs["coffee"], "rb").read()
    exact = _preprocess(engine, data, "up.jpg", 40_000_000)
    fast = _preprocess(engine, data, "up.jpg", 40_000_000, "fast")
    assert torch.equal(exact, TRANSFORM(decode_image(data))) and not torch.equal(fast, exact)
    assert psnr(fast, exact) >= MIN_PSNR_DB
    with pytest.raises(HTTPException) as info:
        _preprocess(engine, jpeg_claiming(12_000, 9_000), "up.jpg", 40_000_000, "fast")
    assert info.value.status_code == 413 and "12000 x 9000" in info.value.detail
