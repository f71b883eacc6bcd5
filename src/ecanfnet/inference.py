"""Classifying images: a model with its checkpoint's preprocessing and labels, batched inference, top-k results."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from .backends import is_int8_model, make_runner
from .distributed import default_device
from .factory import create_model
from .files import DecodedItem, decoded_batches
from .model import ECANFNet
from .transforms import MAX_IMAGE_PIXELS, eval_transform, oriented_rgb
from .weights import WeightsSource


@dataclass
class Prediction:
    """One class of a top-k list: output index, readable label and softmax probability."""

    index: int
    label: str
    score: float


@dataclass
class ImageResult:
    """The outcome for one path: its predictions, or the reason it could not be classified."""

    path: str
    predictions: list[Prediction] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the image was classified."""
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-lines form: {"path", "predictions": [...]} or {"path", "error"}."""
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "predictions": [asdict(p) for p in self.predictions or []]}


def _as_rgb_image(image: Image.Image | np.ndarray) -> Image.Image:
    """An in-memory image prepared as a file would be (oriented_rgb); arrays must be HxWx3 or HxW uint8."""
    if isinstance(image, Image.Image):
        return oriented_rgb(image)
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"expected a uint8 array of shape (H, W, 3) or (H, W), got {image.dtype} {image.shape}")
    if 0 in image.shape:
        raise ValueError(f"expected a non-empty image, got shape {image.shape}")
    return oriented_rgb(Image.fromarray(np.ascontiguousarray(image)))


class Classifier:
    """A model plus the preprocessing and labels its checkpoint carries, run on a chosen backend.

    .model is the torch model on the torch and compile backends, None on the others (their runtime holds
    the weights).
    """

    def __init__(self, model: ECANFNet, device: str | torch.device | None = None,
                 backend: str = "auto", precision: str | None = None, *, batch_size: int | None = None) -> None:
        """precision None: the model's own (fp32, or int8 for an INT8 model, which runs on the CPU).

        batch_size: the batch size predict_files will be called with, when known: OpenVINO then compiles
        for exactly that shape (faster; see make_runner's compile_batch)."""
        cpu_only = is_int8_model(model)
        self.device = torch.device(device) if device is not None else torch.device("cpu") if cpu_only else default_device()
        self.runner = make_runner(model.eval(), backend, precision, self.device, compile_batch=batch_size)
        # The torch model is kept only where it is what runs: the other runtimes hold their own copy of the
        # weights, and a second one (~95 MB for L0) would be dead weight once the caller lets go of it.
        self.model: ECANFNet | None = model if self.runner.backend in ("torch", "compile") else None
        self.transform = eval_transform(model.pretrained_cfg)
        self.labels = model.pretrained_cfg.readable_labels()

    @classmethod
    def from_pretrained(cls, weights: WeightsSource | None = None, device: str | torch.device | None = None,
                        backend: str = "auto", precision: str | None = None) -> "Classifier":
        """Load a classifier from any weights source (default: the published hub checkpoint; INT8 folders too)."""
        return cls(create_model(pretrained=weights if weights is not None else True, int8_ok=True), device, backend,
                   precision)

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities (float32, CPU) for a preprocessed (B, 3, H, W) batch."""
        return self.runner(batch).softmax(dim=-1)

    def top_k(self, probs: torch.Tensor, k: int = 5) -> list[list[Prediction]]:
        """The k most probable classes of each row, highest first."""
        scores, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
        return [[Prediction(int(i), self.labels[int(i)], float(s)) for s, i in zip(srow, irow)]
                for srow, irow in zip(scores.tolist(), indices.tolist())]

    def classify(self, images: list[Image.Image | np.ndarray], top_k: int = 5) -> list[list[Prediction]]:
        """Top-k predictions for PIL images (any mode, EXIF orientation applied as for files) or uint8 arrays.

        Arrays are (H, W, 3) RGB or (H, W) grayscale, dtype uint8; anything else raises ValueError.
        """
        batch = torch.stack([self.transform(_as_rgb_image(img)) for img in images])
        return self.top_k(self.probabilities(batch), top_k)

    def predict_files(self, paths: list[str], top_k: int = 5, batch_size: int = 16,
                      workers: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                      decode: str = "exact") -> Iterator[ImageResult]:
        """Classify image files in batches, decoding ahead in worker threads; yields one result per path, in order.

        decode="fast": JPEGs decoded at a reduced DCT scale (see load_image; not bit-equal to timm).
        A file that cannot be read yields an error result and the batch goes on without it.
        """
        for items in decoded_batches(paths, self.transform, batch_size, workers, max_pixels, decode):
            yield from self._run_batch(items, top_k)

    def _run_batch(self, items: list[DecodedItem], top_k: int) -> Iterator[ImageResult]:
        tensors = [t for _, t, _ in items if t is not None]
        preds = iter(self.top_k(self.probabilities(torch.stack(tensors)), top_k) if tensors else [])
        for path, tensor, error in items:
            yield ImageResult(path, error=error) if tensor is None else ImageResult(path, next(preds))
