"""Image reading (modes, EXIF, bad files) and eval preprocessing parity with timm."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ecanfnet import ImageLoadError, build_model, eval_transform, load_image
from ecanfnet.testing import photo_arrays
from ecanfnet.transforms import to_rgb
from helpers import card_timm_transform, huge_png_header

PHOTOS = photo_arrays()


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_eval_transform_equals_timm_on_real_photos(name):
    img = Image.fromarray(PHOTOS[name])
    ours = eval_transform(build_model().pretrained_cfg)(img)
    ref = card_timm_transform()(img)
    assert ours.shape == ref.shape == (3, 288, 288)
    assert (ours - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("size", [(1, 1), (50, 100), (333, 200), (289, 288), (640, 427)])
@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_eval_transform_equals_timm_on_other_shapes_and_crops(size, crop_pct):
    from timm.data.transforms_factory import transforms_imagenet_eval

    img = Image.fromarray(PHOTOS["rocket"]).resize(size, Image.Resampling.BILINEAR)
    cfg = dict(build_model().pretrained_cfg, test_crop_pct=crop_pct)
    ref = transforms_imagenet_eval(img_size=288, interpolation="bicubic", crop_pct=crop_pct,
                                   mean=cfg["mean"], std=cfg["std"])(img)
    assert (eval_transform(cfg)(img) - ref).abs().max().item() <= 1e-6


def test_eval_transform_follows_the_checkpoint_metadata():
    cfg = dict(build_model().pretrained_cfg, test_input_size=[3, 256, 256], test_crop_pct=0.875)
    out = eval_transform(cfg)(Image.fromarray(PHOTOS["coffee"]))
    assert out.shape == (3, 256, 256)


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    arr = PHOTOS["chelsea"]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.png"
    Image.fromarray(arr).save(path, exif=exif)
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (arr.shape[1], arr.shape[0], 3)
    assert np.array_equal(loaded, np.rot90(arr, k=-1))


def test_sixteen_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256 * 16).astype(np.uint16).reshape(16, 256)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(path))
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)


def test_transparency_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red-ish where opaque
    rgba[:2, :, 3] = 255  # top half opaque, bottom half fully transparent
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out[:2].tolist() == [[[200, 0, 0]] * 4] * 2
    assert out[2:].tolist() == [[[255, 255, 255]] * 4] * 2
    pal = Image.fromarray(PHOTOS["rocket"]).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    assert to_rgb(pal).mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "1", "P", "I", "F", "YCbCr"])
def test_every_mode_becomes_rgb(mode):
    img = Image.fromarray(PHOTOS["astronaut"]).convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size


def test_cmyk_jpeg_loads(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(PHOTOS["coffee"]).convert("CMYK").save(path)
    assert Image.open(path).mode == "CMYK"
    out = np.asarray(load_image(path)).astype(int)
    assert out.shape == PHOTOS["coffee"].shape
    assert np.abs(out - PHOTOS["coffee"]).mean() < 10  # same picture after a lossy round trip


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("size", [(10_000, 10_000), (100_000, 100_000)])
def test_decompression_bomb_is_refused_by_name(tmp_path, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(huge_png_header(*size))
    with pytest.raises(ImageLoadError, match=r"bomb\.png: .*(over the limit|refused)"):
        load_image(path)


def test_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(PHOTOS["coffee"]).save(path)
    with pytest.raises(ImageLoadError, match="over the limit of 1,000"):
        load_image(path, max_pixels=1000)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"hello, this is plain text\n", "not an image"),
])
def test_non_images_are_named(tmp_path, content, reason):
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=f"photo.jpg: {reason}"):
        load_image(path)


def test_truncated_jpeg_is_named(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(PHOTOS["chelsea"]).save(buf, format="JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg: truncated or corrupt"):
        load_image(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ImageLoadError, match="nothere.png: cannot read"):
        load_image(tmp_path / "nothere.png")


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("input_size, crop_pct", [((3, 64, 64), 0.875), ((3, 48, 80), 0.9), ((3, 80, 48), 1.0)])
def test_crop_mode_and_non_square_size_equal_timm_on_real_photos(crop_mode, input_size, crop_pct):
    from timm.data import create_transform, resolve_data_config

    cfg = dict(build_model().pretrained_cfg, test_input_size=list(input_size), test_crop_pct=crop_pct,
               crop_mode=crop_mode)
    ref = create_transform(**resolve_data_config(pretrained_cfg=cfg, use_test_size=True))
    ours = eval_transform(cfg)
    for name, arr in sorted(PHOTOS.items()):
        img = Image.fromarray(arr)
        for sample in (img, img.transpose(Image.Transpose.TRANSPOSE), img.resize((30, 70))):  # wide, tall, small
            want, got = ref(sample), ours(sample)
            assert got.shape == want.shape == input_size, name
            assert (got - want).abs().max().item() <= 1e-6, (name, sample.size)


def test_border_mode_pads_with_the_mean_colour():
    cfg = dict(build_model().pretrained_cfg, test_input_size=[3, 32, 32], test_crop_pct=1.0, crop_mode="border")
    out = eval_transform(cfg)(Image.new("RGB", (64, 16), (255, 0, 0)))  # 4:1 -> 32 x 8 inside 32 x 32
    assert out[:, 14:18].amin(dim=(1, 2)).tolist() == out[:, 14:18].amax(dim=(1, 2)).tolist()  # the red band
    assert out[:, :12].abs().max().item() < 0.02  # the padding is the mean, ~0 once normalised


def test_unknown_crop_mode_is_refused_by_name():
    cfg = dict(build_model().pretrained_cfg, crop_mode="zoom")
    with pytest.raises(ValueError, match="crop_mode must be one of center, squash, border, got 'zoom'"):
        eval_transform(cfg)


def test_border_mode_keeps_a_pixel_of_an_extreme_strip():
    """Fitting a 4 x 100000 strip inside 64 x 64 rounds its width to 0; it is kept one pixel wide and padded."""
    from ecanfnet.transforms import EvalTransform

    t = EvalTransform(64, 1.0, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_mode="border")
    out = t.resize_and_crop(Image.new("RGB", (4, 100000), (200, 10, 10)))
    pixels = np.asarray(out)
    strip = [x for x in range(64) if (pixels[:, x] == (200, 10, 10)).all()]
    assert out.size == (64, 64) and strip == [31]                     # the strip itself, one pixel, centred
    assert (np.delete(pixels, 31, axis=1) == (128, 128, 128)).all()  # the mean-colour padding around it


def test_exact_decode_of_a_large_jpeg_still_equals_timm(tmp_path):
    """The default decode is untouched by the fast path: a JPEG big enough to be reduced is read in full."""
    from ecanfnet.transforms import REDUCED_FROM

    path = tmp_path / "big.jpg"
    Image.fromarray(PHOTOS["coffee"]).resize((1800, 1200), Image.Resampling.BICUBIC).save(path, quality=90)
    img = load_image(path)
    assert img.size == (1800, 1200) and not hasattr(img, REDUCED_FROM)
    with Image.open(path) as ref_img:
        ref = card_timm_transform()(ref_img.convert("RGB"))
    assert (eval_transform(build_model().pretrained_cfg)(img) - ref).abs().max().item() <= 1e-6


def test_min_decode_size_is_twice_the_resized_size_and_never_reduces_the_crop_only_path():
    t = eval_transform(build_model().pretrained_cfg)  # center crop, 288, crop_pct 1.0
    assert t.min_decode_size(4032, 3024) == (768, 576)   # resized 384 x 288
    assert t.min_decode_size(3024, 4032) == (576, 768)
    assert t.min_decode_size(20000, 4000) == (20000, 4000)  # 5:1 resizes only the crop: decoded in full


def test_to_tensor_is_bit_equal_to_torchvision_for_every_pixel_value():
    """to_tensor runs in numpy (off torch's thread pool); every uint8 value in every channel gives torchvision's float."""
    from torchvision.transforms import Normalize, ToTensor

    cfg = build_model().pretrained_cfg
    values = np.stack([np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8)[::-1],
                       (np.arange(256, dtype=np.uint8) * 7)], axis=-1).reshape(16, 16, 3)
    img = Image.fromarray(values)
    ours = eval_transform(cfg).to_tensor(img)
    ref = Normalize(cfg["mean"], cfg["std"])(ToTensor()(img))
    assert ours.dtype == ref.dtype and ours.is_contiguous() and ours.shape == (3, 16, 16)
    assert torch.equal(ours, ref)


def test_a_files_own_text_chunks_cannot_forge_the_fast_decode_marker(tmp_path):
    """PNG text chunks land in img.info; one named like the old marker made the exact path raise TypeError."""
    from PIL import PngImagePlugin

    from ecanfnet.transforms import decode_image

    meta = PngImagePlugin.PngInfo()
    for key in ("ecanfnet.reduced_from", "_ecanfnet_reduced_from"):
        meta.add_text(key, "xy")
    buf = io.BytesIO()
    Image.fromarray(PHOTOS["coffee"]).save(buf, "PNG", pnginfo=meta)
    transform = eval_transform(build_model().pretrained_cfg)
    for decode in ("exact", "fast"):
        img = decode_image(buf.getvalue(), "forged.png", decode=decode, min_size=transform.min_decode_size)
        assert transform(img).shape == (3, 288, 288)
