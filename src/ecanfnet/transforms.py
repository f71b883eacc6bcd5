"""Reading images safely and the evaluation preprocessing the checkpoint's metadata asks for."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse images over this many pixels before decoding them (PIL's own default bomb threshold,
# about 9,459 x 9,459). A 16-bit RGBA image that size already decodes to ~700 MB.
MAX_IMAGE_PIXELS = 89_478_485

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm", ".jfif", ".ico"})
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageLoadError(ValueError):
    """An image file could not be read; the message names the file and the reason."""


class ImageTooLarge(ImageLoadError):
    """An image over the pixel limit, refused before decoding."""


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open, fully decode and return an RGB image with its EXIF orientation applied.

    Raises ImageLoadError naming the file for empty, truncated, unrecognised or oversized files.
    """
    name = os.fspath(path)
    try:
        empty = Path(name).stat().st_size == 0
    except OSError as exc:
        raise ImageLoadError(f"{name}: cannot read the file ({exc.strerror or exc})") from exc
    return _decode(name, name, empty, max_pixels)


def decode_image(data: bytes, name: str = "upload", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """load_image for bytes in memory (an upload); errors name the image as `name`."""
    return _decode(io.BytesIO(data), name, len(data) == 0, max_pixels)


def _decode(source: str | io.BytesIO, name: str, empty: bool, max_pixels: int) -> Image.Image:
    if empty:
        raise ImageLoadError(f"{name}: empty file (0 bytes)")
    try:
        with Image.open(source) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(_too_many_pixels(name, width, height, max_pixels))
            img.load()
            img = _apply_exif_orientation(img)
            return to_rgb(img)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name}: refused as a decompression bomb, over the limit of {max_pixels:,} pixels "
                            f"({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{name}: not an image format PIL can read") from exc
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise ImageLoadError(f"{name}: cannot read the file ({exc.strerror or exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL signals corrupt data with these
        raise ImageLoadError(f"{name}: truncated or corrupt image data ({exc})") from exc


def _too_many_pixels(name: str, width: int, height: int, limit: int) -> str:
    return (f"{name}: {width} x {height} = {width * height:,} pixels is over the limit of {limit:,} "
            f"(decompression-bomb guard; raise it with --max-pixels if the file is trusted)")


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says; a damaged EXIF block leaves the image as is."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - malformed EXIF must not lose an otherwise good image
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: high bit depths are rescaled, transparency is composited on white."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        img = Image.fromarray(_to_uint8(np.asarray(img), img.mode), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float single-channel image into 0..255."""
    values = values.astype(np.float64)
    if mode == "F":
        top = 1.0 if values.size and values.max() <= 1.0 else 255.0
    elif mode in _SIXTEEN_BIT_MODES or (values.size and 0 <= values.min() and values.max() <= 65535):
        top = 65535.0
    else:
        top = float(values.max()) or 1.0
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def eval_settings(pretrained_cfg: dict[str, Any]) -> dict[str, Any]:
    """The test-time preprocessing settings of a checkpoint (test_input_size/test_crop_pct when given)."""
    size = (pretrained_cfg.get("test_input_size") or pretrained_cfg["input_size"])[-1]
    crop_pct = pretrained_cfg.get("test_crop_pct") or pretrained_cfg.get("crop_pct") or 1.0
    return {
        "image_size": int(size),
        "crop_pct": float(crop_pct),
        "interpolation": pretrained_cfg.get("interpolation", "bicubic"),
        "mean": tuple(pretrained_cfg["mean"]),
        "std": tuple(pretrained_cfg["std"]),
    }


_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}


class EvalTransform:
    """PIL RGB image -> normalised (3, S, S) float tensor: resize the short side to S/crop_pct, center-crop S.

    Written on PIL directly instead of torchvision.transforms, whose import costs seconds of
    start-up; the tests hold it equal to timm's transforms_imagenet_eval.
    """

    def __init__(self, image_size: int, crop_pct: float, interpolation: str,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        if interpolation not in _PIL_FILTERS:
            raise ValueError(f"interpolation must be one of {', '.join(_PIL_FILTERS)}, got {interpolation!r}")
        self.image_size = image_size
        self.resize_to = math.floor(image_size / crop_pct)
        self.filter = _PIL_FILTERS[interpolation]
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def resize_and_crop(self, img: Image.Image) -> Image.Image:
        """The geometric part: short side to resize_to (aspect kept), then the centered square crop."""
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize_to * long / short)
        size = (self.resize_to, new_long) if w <= h else (new_long, self.resize_to)
        if size != img.size:
            img = img.resize(size, self.filter)
        return img.crop(_center_box(img.size, self.image_size))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(self.resize_and_crop(img), dtype=np.uint8).copy())
        x = pixels.permute(2, 0, 1).to(torch.float32).div(255)
        return x.sub_(self.mean).div_(self.std)


def _center_box(size: tuple[int, int], crop: int) -> tuple[int, int, int, int]:
    """Crop box centered like torchvision's CenterCrop (zero padding where the image is smaller)."""
    offsets = [int(round((side - crop) / 2.0)) if side >= crop else -((crop - side) // 2) for side in size]
    return offsets[0], offsets[1], offsets[0] + crop, offsets[1] + crop


def eval_transform(pretrained_cfg: dict[str, Any]) -> EvalTransform:
    """The checkpoint's evaluation preprocessing (see eval_settings)."""
    return EvalTransform(**eval_settings(pretrained_cfg))


def is_image_file(path: Path) -> bool:
    """Whether a file name has one of the image extensions searched in folders."""
    return path.suffix.lower() in IMAGE_EXTENSIONS

