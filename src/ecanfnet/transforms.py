"""Reading images safely and the evaluation preprocessing the checkpoint's metadata asks for."""

from __future__ import annotations

import functools
import io
import math
import os
import re
import stat
import struct
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

import numpy as np
import torch
from PIL import Image, ImageMode, UnidentifiedImageError

from .choices import CROP_MODES, DECODE_MODES, INTERPOLATIONS  # noqa: F401 (CROP_MODES, INTERPOLATIONS re-exported)
from .errors import ImageLoadError, ImageTooLarge  # noqa: F401 (both re-exported: callers catch them from here)
from .metadata import PretrainedCfg

# Refuse images over this many pixels before decoding them (PIL's own default bomb threshold,
# about 9,459 x 9,459).
MAX_IMAGE_PIXELS = 89_478_485
# Decoded bytes are counted too: an image may decode to at most as many bytes as an 8-bit RGB image
# at the pixel limit (this many bytes x max_pixels), so 4-byte modes (RGBA, CMYK, I, F) get 3/4 of the
# pixel allowance and 1- or 2-byte modes (L, P, LA, I;16) the pixel limit. High bit depths are rescaled
# in row chunks, so such a decode peaks at about 7 bytes x max_pixels (I;16: source 2, 8-bit copy 1,
# RGB 4): ~600 MB at the default limit.
BYTES_PER_PIXEL_BUDGET = 3

# What Image.open may identify a file as. Formats outside this list are never opened: several
# (ICNS, BLP, EPS via Ghostscript, FPX, MIC...) decode nested images or run programs while opening,
# before any size check. JPEG includes MPO (multi-picture camera JPEGs; only the first is decoded).
# ICO and CUR are checked entry by entry before opening (see _check_icon_entries).
OPEN_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "CUR")
_FORMAT_NAMES = "JPEG, PNG, GIF, BMP, TIFF, WebP, PNM, ICO, CUR"

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm", ".jfif", ".ico"})
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


# The fast decode never reduces a JPEG below this many times the size the resize step produces, so the
# bicubic downscale that follows still averages real pixels.
FAST_DECODE_MARGIN = 2
_DRAFT_SCALES = (8, 4, 2)  # the DCT-domain reductions libjpeg offers (Pillow's JpegImageFile.draft)

# The smallest upright (width, height) an image may be decoded at: a fixed size, or a function of the
# image's full upright size (EvalTransform.min_decode_size).
MinSize = Union[tuple[int, int], Callable[[int, int], tuple[int, int]]]


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS, decode: str = "exact",
               min_size: MinSize | None = None) -> Image.Image:
    """Open, fully decode and return an RGB image with its EXIF orientation applied.

    decode="fast" lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale in the DCT domain, never
    below min_size (upright width, height; or a function of the full upright size giving it). Other
    formats, and JPEGs too small to reduce, are decoded exactly. All limits apply to both paths, to
    the full size the header declares.
    Raises ImageLoadError naming the file for empty, truncated, unrecognised, oversized or
    non-regular files (a FIFO, socket or device is refused without reading from it).
    """
    name = os.fspath(path)
    draft = _draft_rule(decode, min_size)
    fh, size = _open_regular_file(name)
    with fh:
        return _decode(fh, name, size == 0, max_pixels, draft)


def _open_regular_file(name: str) -> tuple[BinaryIO, int]:
    """Open name for reading if it is a regular file; (file, size). Devices are refused before being opened."""
    try:
        _refuse_special(name, os.stat(name).st_mode)
        # O_NONBLOCK: should name become a FIFO after the stat, opening it must still not wait for a writer.
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise ImageLoadError(f"{name}: cannot read the file ({exc.strerror or exc})") from exc
    try:
        info = os.fstat(fd)
        _refuse_special(name, info.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb"), info.st_size


def _refuse_special(name: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise ImageLoadError(f"{name}: not a regular file ({_file_kind(mode)})")


def decode_image(data: bytes, name: str = "upload", max_pixels: int = MAX_IMAGE_PIXELS, decode: str = "exact",
                 min_size: MinSize | None = None) -> Image.Image:
    """load_image for bytes in memory (an upload); errors name the image as `name`."""
    return _decode(io.BytesIO(data), name, len(data) == 0, max_pixels, _draft_rule(decode, min_size))


def image_loader(transform: Callable, max_pixels: int = MAX_IMAGE_PIXELS,
                 decode: str = "exact") -> Callable[[str], Image.Image]:
    """path -> upright RGB image, decoded as `decode` asks for what `transform` needs (its min_decode_size)."""
    min_size = getattr(transform, "min_decode_size", None)
    if decode == "fast" and min_size is None:
        raise ValueError('decode="fast" needs a transform with min_decode_size (an EvalTransform)')
    _draft_rule(decode, min_size)  # a bad mode fails here, not once per file
    return functools.partial(load_image, max_pixels=max_pixels, decode=decode, min_size=min_size)  # picklable


def _draft_rule(decode: str, min_size: MinSize | None) -> Callable[[int, int], tuple[int, int]] | None:
    """For decode="fast", the minimum upright size as a function of the full upright size; None: exact."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode == "exact":
        return None
    if min_size is None:
        raise ValueError('decode="fast" needs min_size: the smallest size the image may be decoded at')
    if callable(min_size):
        return min_size
    fixed = (int(min_size[0]), int(min_size[1]))
    return lambda width, height: fixed


# A fast-decoded image carries, as this attribute, (box, (width, height)): the region of the reduced,
# upright image that the full image covers (a Pillow resize box) and the full upright size. EvalTransform
# resizes that box to the size the full image would get, so the geometry is exactly the exact path's.
# An attribute of the Image object, never `img.info`: a file's own text chunks land in info, so a crafted
# PNG could forge the marker there.
REDUCED_FROM = "_ecanfnet_reduced_from"


def _apply_draft(img: Image.Image, min_size: Callable[[int, int], tuple[int, int]]
                 ) -> tuple[tuple[float, float, float, float], tuple[int, int]] | None:
    """Ask libjpeg for the largest DCT reduction still covering min_size(full upright size); (box, full size) or None.

    The reduction applies to the image as stored, before the EXIF transpose: for orientations 5-8
    (a quarter turn) the stored width is the upright height. Non-JPEG images are left as they are.
    """
    if img.format not in ("JPEG", "MPO"):
        return None
    method = _exif_transpose_method(img)
    turned = method in _QUARTER_TURNS
    width, height = img.size  # stored
    need_w, need_h = min_size(*((height, width) if turned else (width, height)))
    if turned:
        need_w, need_h = need_h, need_w  # in stored orientation, where the reduction applies
    for scale in _DRAFT_SCALES:
        if -(-width // scale) >= need_w and -(-height // scale) >= need_h:  # libjpeg rounds the reduced size up
            # (width // scale, height // scale) makes Pillow pick exactly this scale (see JpegImageFile.draft)
            if img.draft("RGB", (max(1, width // scale), max(1, height // scale))) is not None:
                region = _upright_region(img.size, (width / scale, height / scale), method)
                return region, ((height, width) if turned else (width, height))
            return None
    return None


_QUARTER_TURNS = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                  Image.Transpose.ROTATE_90)


def _upright_region(size: tuple[int, int], covered: tuple[float, float],
                    method: Image.Transpose | None) -> tuple[float, float, float, float]:
    """Where the full image lies in the reduced one after the EXIF transpose, as a Pillow resize box.

    libjpeg rounds a reduced side up, so the last stored row and column may hold less than a whole
    source pixel: the full image covers (0, 0, W/scale, H/scale) of the stored reduced image, and a
    flip or turn moves that partial edge to another side.
    """
    (w, h), (cw, ch) = size, covered
    flip_x = method in (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_90,
                        Image.Transpose.TRANSVERSE)  # stored x runs right to left once upright
    flip_y = method in (Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
                        Image.Transpose.TRANSVERSE)  # stored y runs bottom to top once upright
    x0, x1 = (w - cw, w) if flip_x else (0.0, cw)
    y0, y1 = (h - ch, h) if flip_y else (0.0, ch)
    return (y0, x0, y1, x1) if method in _QUARTER_TURNS else (x0, y0, x1, y1)


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    return next((kind for test, kind in kinds if test(mode)), "a special file")


def _decode(source: BinaryIO, name: str, empty: bool, max_pixels: int,
            draft: Callable[[int, int], tuple[int, int]] | None = None) -> Image.Image:
    if empty:
        raise ImageLoadError(f"{name}: empty file (0 bytes)")
    _let_pillow_open_up_to(max_pixels)
    try:
        _check_icon_entries(source, name, max_pixels)
        with Image.open(source, formats=OPEN_FORMATS) as img:
            _check_size(name, img.width, img.height, img.mode, max_pixels)  # the full size, draft or not
            reduced = _apply_draft(img, draft) if draft is not None else None
            img.load()
            out = _oriented_rgb(img, release=True)
            if reduced is not None:  # where the full image lies in the reduced one, for EvalTransform's resize
                setattr(out, REDUCED_FROM, reduced)
            return out
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1)):,} pixels is " if pixels else ""
        raise ImageTooLarge(f"{name}: {size}over the limit of {max_pixels:,} pixels{_RAISE_HINT}") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{name}: not an image in a supported format ({_FORMAT_NAMES})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:  # PIL signals corrupt data with these
        raise ImageLoadError(f"{name}: truncated or corrupt image data ({exc})") from exc


_RAISE_HINT = " (decompression-bomb guard; raise it with --max-pixels if the file is trusted)"


def _too_many_pixels(name: str, width: int, height: int, limit: int) -> str:
    return f"{name}: {width} x {height} = {width * height:,} pixels is over the limit of {limit:,}{_RAISE_HINT}"


def _check_size(name: str, width: int, height: int, mode: str, max_pixels: int) -> None:
    """Refuse before decoding: over max_pixels pixels, or over BYTES_PER_PIXEL_BUDGET * max_pixels bytes decoded."""
    if width * height > max_pixels:
        raise ImageTooLarge(_too_many_pixels(name, width, height, max_pixels))
    decoded = width * height * _bytes_per_pixel(mode)
    if decoded > BYTES_PER_PIXEL_BUDGET * max_pixels:
        raise ImageTooLarge(f"{name}: {width} x {height} {mode} = {decoded:,} bytes decoded is over the budget of "
                            f"{BYTES_PER_PIXEL_BUDGET} bytes x the limit of {max_pixels:,} pixels{_RAISE_HINT}")


def _bytes_per_pixel(mode: str) -> int:
    """Bytes one pixel of a PIL mode takes decoded (bands x sample size; unknown modes count as 8)."""
    try:
        info = ImageMode.getmode(mode)
        return len(info.bands) * int(info.typestr[2:])
    except (KeyError, ValueError):
        return 8


_pillow_limit_lock = threading.Lock()


def _let_pillow_open_up_to(max_pixels: int) -> None:
    """Keep Pillow's own bomb guard from refusing what max_pixels allows.

    Pillow raises DecompressionBombError above 2 * Image.MAX_IMAGE_PIXELS. Our limit is enforced by
    _check_size for every format we open and by _check_icon_entries for the containers that decode at
    open, so Pillow's global is only ever raised, under a lock, and never restored or lowered: other
    threads may be decoding under a larger limit. Side effect: Image.MAX_IMAGE_PIXELS is process-wide, so
    after a call with a large max_pixels, other code in the process that opens images with Pillow directly
    gets Pillow's guard at that raised value (about max_pixels / 2).
    """
    with _pillow_limit_lock:
        if Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < max_pixels:
            Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2


_ICON_MAGICS = (b"\0\0\1\0", b"\0\0\2\0")  # ICO, CUR
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_icon_entries(source: BinaryIO, name: str, max_pixels: int) -> None:
    """Check every image inside an ICO/CUR against the limit before Pillow opens it.

    Pillow decodes the largest icon while *opening* the file, and an entry may be a PNG of any size
    whatever the directory says, so the real size is read from each entry's own PNG or BMP header.
    """
    head = source.read(6)
    try:
        if len(head) < 6 or head[:4] not in _ICON_MAGICS:
            return
        count = struct.unpack("<H", head[4:6])[0]
        directory = source.read(16 * count)
        for i in range(len(directory) // 16):
            source.seek(struct.unpack("<I", directory[16 * i + 12:16 * i + 16])[0])
            width, height = _icon_entry_size(source.read(24))
            if width * height > max_pixels:
                raise ImageTooLarge(_too_many_pixels(name, width, height, max_pixels))
    finally:
        source.seek(0)


def _icon_entry_size(header: bytes) -> tuple[int, int]:
    """(width, height) of one ICO/CUR entry from its PNG IHDR or BMP info header; (0, 0) if unreadable."""
    if header.startswith(_PNG_MAGIC) and len(header) >= 24:
        return struct.unpack(">II", header[16:24])
    if len(header) >= 12 and struct.unpack("<I", header[:4])[0] == 12:  # BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack("<HH", header[4:8])
        return width, height // 2  # the height covers the image and its AND mask
    if len(header) >= 12:
        width, height = struct.unpack("<ii", header[4:12])
        return abs(width), abs(height) // 2
    return 0, 0


def oriented_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB with its EXIF orientation applied (what every entry point feeds the model)."""
    return _oriented_rgb(img, release=False)


def _oriented_rgb(img: Image.Image, release: bool) -> Image.Image:
    """oriented_rgb; with release, the source image's memory is freed as soon as an 8-bit copy exists."""
    method = _exif_transpose_method(img)
    reduced = _reduce_depth(img)
    if release and reduced is not img:
        img.close()
    if method is not None:
        reduced = reduced.transpose(method)
    return to_rgb(reduced)


# EXIF Orientation tag (0x0112) value -> the transpose that displays the image upright (as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _exif_transpose_method(img: Image.Image) -> Image.Transpose | None:
    """The transpose the EXIF Orientation tag asks for; a damaged EXIF block leaves the image as is."""
    try:
        orientation = img.getexif().get(0x0112, 1)
        return _ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    except Exception:  # noqa: BLE001 - malformed EXIF must not lose an otherwise good image
        return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: high bit depths are rescaled, transparency is composited on white."""
    img = _reduce_depth(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba)  # an RGBA mask pastes through its alpha band
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


# Rows of a high bit depth image are rescaled this many pixels at a time, so the float64 working
# set stays a few MB whatever the image size (a whole-image float64 copy is 8 bytes per pixel).
_CHUNK_PIXELS = 1 << 18


def _reduce_depth(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float single-channel image -> 8-bit 'L' scaled into 0..255; others as they are."""
    if img.mode not in _SIXTEEN_BIT_MODES and img.mode not in ("I", "F"):
        return img
    top = _scale_top(img)
    width, height = img.size
    out = np.empty((height, width), np.uint8)
    rows = max(1, _CHUNK_PIXELS // max(width, 1))
    for y in range(0, height, rows):
        band = np.asarray(img.crop((0, y, width, min(height, y + rows))), dtype=np.float64)
        np.multiply(band, 255.0 / top, out=band)
        np.rint(band, out=band)
        np.clip(band, 0, 255, out=band)
        out[y:y + rows] = np.nan_to_num(band, copy=False, nan=0.0)
    return Image.fromarray(out)


def _scale_top(img: Image.Image) -> float:
    """The value that maps to 255: 1.0 or 255 for floats, 65535 for 16-bit data, else the image's maximum."""
    if img.mode in _SIXTEEN_BIT_MODES:
        return 65535.0
    low, high = img.getextrema() if img.width and img.height else (0, 0)  # computed by PIL, no copy
    if img.mode == "F":
        return 1.0 if high <= 1.0 else 255.0
    return 65535.0 if 0 <= low and high <= 65535 else float(high) or 1.0


# The resized image before the crop may be at most this many times the square of the longer side of
# (H, W)/crop_pct; beyond it (aspect ratios over ~4:1) only the kept region is resampled, so memory
# stays bounded. The square, not the area, so a portrait photo for a landscape (H, W) stays on the
# timm-exact path; 4, not 2, so 21:9 and 32:9 frames do too (the crop-only path can be one level off).
# Worst case, with the largest side and smallest crop_pct a checkpoint may give (metadata.py:
# 1024 / 0.5 = 2048): 4 x 2048 x 2048 = 16,777,216 pixels, 64 MiB as Pillow holds RGB (4 bytes a
# pixel), per image being preprocessed, on top of the decoded image itself.
MAX_RESIZE_AREA_FACTOR = 4


_PIL_FILTERS = {name: Image.Resampling[name.upper()] for name in INTERPOLATIONS}


def height_width(image_size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of an image size given as one side or as (height, width)."""
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


class EvalTransform:
    """PIL RGB image -> normalised (3, H, W) float tensor, resized and cropped as timm's eval transform does.

    crop_mode "center": resize keeping the aspect ratio so the image covers (H, W)/crop_pct, center-crop
    (H, W); "squash": resize to exactly (H, W)/crop_pct, center-crop; "border": resize keeping the aspect
    ratio so the image fits inside (H, W)/crop_pct, then center-crop or pad with the mean colour.
    Written on PIL directly instead of torchvision.transforms, whose import costs seconds of
    start-up; the tests hold it equal to timm's transforms_imagenet_eval.
    """

    def __init__(self, image_size: int | tuple[int, int], crop_pct: float, interpolation: str,
                 mean: tuple[float, ...], std: tuple[float, ...], crop_mode: str = "center") -> None:
        if interpolation not in _PIL_FILTERS:
            raise ValueError(f"interpolation must be one of {', '.join(_PIL_FILTERS)}, got {interpolation!r}")
        if crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {crop_mode!r}")
        height, width = height_width(image_size)
        self.image_size = (int(height), int(width))
        self.scale_size = (math.floor(height / crop_pct), math.floor(width / crop_pct))
        self.crop_mode = crop_mode
        self.filter = _PIL_FILTERS[interpolation]
        self.fill = tuple(round(255 * v) for v in mean) if crop_mode == "border" else (0, 0, 0)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self._mean_np, self._std_np = self.mean.numpy(), self.std.numpy()  # float32, as torch rounds them

    def resize_and_crop(self, img: Image.Image) -> Image.Image:
        """The geometric part: the crop mode's resize, then the centered (H, W) crop (padded where smaller).

        A fast-decoded image (with the REDUCED_FROM attribute) is resized as its full size would be, from the
        region the full image covers, so only the pixel values differ from the exact path.
        """
        reduced = getattr(img, REDUCED_FROM, None)
        size = self._resized_size(*(reduced[1] if reduced else img.size))
        if reduced:  # min_decode_size kept such images off the crop-only path
            return _center_crop_or_pad(img.resize(size, self.filter, box=reduced[0]), self.image_size, self.fill)
        if size[0] * size[1] > MAX_RESIZE_AREA_FACTOR * max(self.scale_size) ** 2:
            return self._resize_only_the_crop(img, size)
        if size != img.size:
            img = img.resize(size, self.filter)
        return _center_crop_or_pad(img, self.image_size, self.fill)

    def _resize_only_the_crop(self, img: Image.Image, size: tuple[int, int]) -> Image.Image:
        """Resample just the part of the image that the center crop keeps, without the full intermediate.

        A 10000 x 2 strip would otherwise be resized to 288 x 1,440,000 pixels before the crop. The two
        passes of Pillow's resize are run one at a time in the order Pillow's own resize runs them: the
        short axis in full (then cropped, so exactly as the full resize), the long axis only over the
        kept span (a `box`, whose float32 bounds can move a few pixels by one level). Only "center" mode
        gets here (the other modes never resize past scale_size), so the crop lies inside the resized image.
        """
        (out_h, out_w), (new_w, new_h) = self.image_size, size
        spans = [(img.width, new_w, _crop_offset(new_w, out_w), out_w),
                 (img.height, new_h, _crop_offset(new_h, out_h), out_h)]  # (source, resized, start, kept) per axis
        long = 0 if new_w * out_h >= new_h * out_w else 1
        order = (1, 0) if _pillow_runs_vertical_first(img.size, size) else (0, 1)
        img, box = self._source_window(img, long, *spans[long])
        for axis in order:
            img = (self._resample_span(img, axis, box, spans[axis][3]) if axis == long
                   else _resample_all_then_crop(img, axis, *spans[axis][1:], self.filter))
        return img

    def _source_window(self, img: Image.Image, axis: int, source: int, resized: int, start: int,
                       kept: int) -> tuple[Image.Image, tuple[float, float]]:
        """The source lines the kept span of the resize along axis reads, and the span's bounds within them."""
        scale = source / resized
        low, high = start * scale, (start + kept) * scale
        reach = _FILTER_SUPPORT[self.filter] * max(scale, 1.0) + 1  # Pillow's taps lie within support + 0.5
        first, last = max(0, math.floor(low - reach)), min(source, math.ceil(high + reach))
        window = (first, 0, last, img.height) if axis == 0 else (0, first, img.width, last)
        return img.crop(window), (low - first, high - first)

    def _resample_span(self, img: Image.Image, axis: int, box: tuple[float, float], kept: int) -> Image.Image:
        """One Pillow pass along axis producing only the kept samples (box bounds in img's coordinates)."""
        if axis == 0:
            return img.resize((kept, img.height), self.filter, box=(box[0], 0, box[1], img.height))
        return img.resize((img.width, kept), self.filter, box=(0, box[0], img.width, box[1]))

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the crop mode's resize."""
        scale_h, scale_w = self.scale_size
        if self.crop_mode == "squash":
            return scale_w, scale_h
        if self.crop_mode == "center" and scale_h == scale_w:  # torchvision's Resize(int): short side to S
            short, long = sorted((width, height))
            new_long = int(scale_h * long / short)
            return (scale_h, new_long) if width <= height else (new_long, scale_h)
        ratio_h, ratio_w = height / scale_h, width / scale_w  # timm's ResizeKeepRatio
        ratio = max(ratio_h, ratio_w) if self.crop_mode == "border" else min(ratio_h, ratio_w)
        # at least one pixel: in border mode a 4 x 100000 strip would round to width 0 (timm fails there)
        return max(1, round(width / ratio)), max(1, round(height / ratio))

    def min_decode_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest (width, height) a fast decode may give an upright image of this full size.

        FAST_DECODE_MARGIN x the size the resize step makes of it; the full size itself (no reduction)
        where the resize would take the crop-only path of extreme aspect ratios.
        """
        resized_w, resized_h = self._resized_size(width, height)
        if resized_w * resized_h > MAX_RESIZE_AREA_FACTOR * max(self.scale_size) ** 2:
            return width, height
        return FAST_DECODE_MARGIN * resized_w, FAST_DECODE_MARGIN * resized_h

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.resize_and_crop(img))

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """The (H, W) RGB crop -> normalised (3, H, W) float32, as torchvision's ToTensor + Normalize compute it.

        In numpy, the same float32 operations in the same order (x / 255, - mean, / std; bit-equal to
        torch's), because it runs in the decoding threads: small torch ops there go through torch's
        intra-op thread pool, which the model is using, and measured 10-30 ms an image instead of < 1 ms
        (docs/benchmarks.md, per-stage times).
        """
        x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")  # one contiguous copy
        np.divide(x, np.float32(255), out=x)
        np.subtract(x, self._mean_np, out=x)
        np.divide(x, self._std_np, out=x)
        return torch.from_numpy(x)


def _resample_all_then_crop(img: Image.Image, axis: int, resized: int, start: int, kept: int,
                            resample: Image.Resampling) -> Image.Image:
    """One full Pillow pass along axis (as the full resize runs it), then the kept span of it."""
    if axis == 0:
        return img.resize((resized, img.height), resample).crop((start, 0, start + kept, img.height))
    return img.resize((img.width, resized), resample).crop((0, start, img.width, start + kept))


# Half-widths of Pillow's filters (Resample.c) in source pixels at scale 1.
_FILTER_SUPPORT = {Image.Resampling.NEAREST: 0.5, Image.Resampling.BOX: 0.5, Image.Resampling.BILINEAR: 1.0,
                   Image.Resampling.HAMMING: 1.0, Image.Resampling.BICUBIC: 2.0, Image.Resampling.LANCZOS: 3.0}


@functools.cache
def _pillow_orders_passes() -> bool:
    """Whether this Pillow runs the vertical pass first when the height shrinks more than twice the width does.

    Newer Pillow does (Resample.c: ImagingResampleInner), older always runs the horizontal pass first; the
    two orders round differently, so the pass-by-pass resize must follow the one in use. Found by a probe.
    """
    probe = Image.frombytes("L", (3, 12), bytes((i * 97) % 256 for i in range(36)))
    both = probe.resize((2, 4), Image.Resampling.BICUBIC)
    vertical_first = probe.resize((3, 4), Image.Resampling.BICUBIC).resize((2, 4), Image.Resampling.BICUBIC)
    return both.tobytes() == vertical_first.tobytes()


def _pillow_runs_vertical_first(source: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether Pillow's resize from source to size (width, height) runs its vertical pass first."""
    shrink_w, shrink_h = source[0] - size[0], source[1] - size[1]
    return _pillow_orders_passes() and shrink_h > 0 and shrink_h > 2 * shrink_w


def _center_crop_or_pad(img: Image.Image, out_hw: tuple[int, int], fill: tuple[int, ...]) -> Image.Image:
    """Crop (H, W) centered like torchvision's CenterCrop; where the image is smaller, pad it with fill."""
    (out_h, out_w), (width, height) = out_hw, img.size
    left, top = _crop_offset(width, out_w), _crop_offset(height, out_h)
    if out_w <= width and out_h <= height:
        return img.crop((left, top, left + out_w, top + out_h))
    canvas = Image.new(img.mode, (out_w, out_h), fill)
    canvas.paste(img.crop((max(left, 0), max(top, 0), max(left, 0) + min(out_w, width),
                           max(top, 0) + min(out_h, height))), (max(-left, 0), max(-top, 0)))
    return canvas


def _crop_offset(side: int, crop: int) -> int:
    """Where the crop starts along one side; negative = that much padding before the image."""
    return int(round((side - crop) / 2.0)) if side >= crop else -((crop - side) // 2)


def eval_transform(pretrained_cfg: Mapping[str, Any]) -> EvalTransform:
    """The checkpoint's evaluation preprocessing (a PretrainedCfg, or a pretrained_cfg dict such as timm's)."""
    return EvalTransform(**PretrainedCfg.from_dict(pretrained_cfg).eval_settings())


def is_image_file(path: Path) -> bool:
    """Whether a file name has one of the image extensions searched in folders."""
    return path.suffix.lower() in IMAGE_EXTENSIONS

