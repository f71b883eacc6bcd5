"""Classifying images: a model with its checkpoint's preprocessing and labels, batched inference, top-k results,
and an open-set score saying how much an image looks like the training data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .backends import Runner, is_int8_model, make_runner, with_flip_tta
from .distributed import default_device
from .factory import create_model
from .files import DecodedItem, decoded_batches
from .model import ECANFNet, embedding_view
from .transforms import MAX_IMAGE_PIXELS, eval_transform, oriented_rgb
from .weights import WeightsSource


@dataclass
class Prediction:
    """One class of a top-k list: output index, readable label and softmax probability."""

    index: int
    label: str
    score: float


UNKNOWN = "unknown"  # the top-level label of an image whose open-set score is below the caller's min_score


class ClassHead:
    """A model's linear classifier, run in torch (fp32, CPU) on pooled embeddings: logits and open-set scores.

    The open-set score of an image is the cosine similarity between its embedding and the closest class's
    weight vector, in [-1, 1]; higher = more like the training data. Unlike the logits (and energy or
    max-logit scores made from them) it ignores the embedding's length, which grows on images unlike any
    the network was trained on (docs/inference.md, "Open-set score").
    """

    def __init__(self, model: nn.Module) -> None:
        """model: an ECANFNet (or INT8 model) whose head.fc is its linear classifier."""
        self.fc = copy.deepcopy(model.head.fc).float().cpu().eval()
        self.directions = F.normalize(self.fc.weight.detach(), dim=-1)  # (C, D): each class's unit weight vector

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C) class logits of (B, D) pooled embeddings."""
        with torch.inference_mode():
            return self.fc(embeddings.float())

    def open_set_scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B,) open-set scores of (B, D) pooled embeddings: the largest cosine similarity to a class's weights."""
        return (F.normalize(embeddings.float(), dim=-1) @ self.directions.T).amax(dim=-1)


def check_min_score(min_score: float | None) -> float | None:
    """min_score as a float, or None; ValueError unless it is a finite number."""
    if min_score is None:
        return None
    if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not math.isfinite(min_score):
        raise ValueError(f"min_score must be a finite number, got {min_score!r:.40}")
    return float(min_score)


def top_label(top1: str, score: float, min_score: float | None) -> str:
    """The one answer for an image: its top class top1, or UNKNOWN when its open-set score is below min_score."""
    return UNKNOWN if min_score is not None and score < min_score else top1


@dataclass
class ImageResult:
    """The outcome for one path: its answer (label, open-set score, top-k predictions), or why it has none.

    label is the top-1 class, or "unknown" when the open-set score was below the caller's min_score.
    """

    path: str
    predictions: list[Prediction] | None = None
    error: str | None = None
    label: str | None = None
    open_set_score: float | None = None

    @property
    def ok(self) -> bool:
        """True when the image was classified."""
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-lines form: {"path", "label", "open_set_score", "predictions": [...]} or {"path", "error"}."""
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "label": self.label, "open_set_score": self.open_set_score,
                "predictions": [asdict(p) for p in self.predictions or []]}


def as_rgb_image(image: Image.Image | np.ndarray) -> Image.Image:
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

    The trunk (images -> pooled embedding) runs on the backend and the linear classifier in torch (ClassHead):
    the open-set score needs the embedding as well as the logits. .runner maps a batch to logits, as
    make_runner's runners do. .model is the torch model on the torch and compile backends, None on the others
    (their runtime holds the weights).
    """

    def __init__(self, model: ECANFNet, device: str | torch.device | None = None,
                 backend: str = "auto", precision: str | None = None, *, batch_size: int | None = None,
                 tta: bool = False) -> None:
        """precision None: the model's own (fp32, or int8 for an INT8 model, which runs on the CPU).

        batch_size: the batch size predict_files will be called with, when known: OpenVINO then compiles
        for exactly that shape (faster; see make_runner's compile_batch).
        tta: flip test-time augmentation: every output (probabilities, open-set score) comes from the mean of the
        image's and its mirror image's embeddings, whose logits are the mean of their logits (the head is linear).
        """
        cpu_only = is_int8_model(model)
        self.device = torch.device(device) if device is not None else torch.device("cpu") if cpu_only else default_device()
        trunk = make_runner(embedding_view(model.eval()), backend, precision, self.device, compile_batch=batch_size)
        self.trunk = with_flip_tta(trunk) if tta else trunk
        self.head = ClassHead(model)
        self.tta = tta
        self.runner = Runner(lambda batch: self.head.logits(self.trunk(batch)), trunk.backend, trunk.precision,
                             trunk.device)
        # The torch model is kept only where it is what runs: the other runtimes hold their own copy of the
        # weights, and a second one (~95 MB for L0) would be dead weight once the caller lets go of it.
        self.model: ECANFNet | None = model if self.runner.backend in ("torch", "compile") else None
        self.transform = eval_transform(model.pretrained_cfg)
        self.labels = model.pretrained_cfg.readable_labels()

    @classmethod
    def from_pretrained(cls, weights: WeightsSource | None = None, device: str | torch.device | None = None,
                        backend: str = "auto", precision: str | None = None, *, tta: bool = False) -> "Classifier":
        """Load a classifier from any weights source (default: the published hub checkpoint; INT8 folders too)."""
        return cls(create_model(pretrained=weights if weights is not None else True, int8_ok=True), device, backend,
                   precision, tta=tta)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Class logits (float32, CPU) for a preprocessed (B, 3, H, W) batch (flip-averaged when tta is on)."""
        return self.runner(batch)

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities (float32, CPU) for a preprocessed (B, 3, H, W) batch."""
        return self.logits(batch).softmax(dim=-1)

    def top_k(self, probs: torch.Tensor, k: int = 5) -> list[list[Prediction]]:
        """The k most probable classes of each row, highest first."""
        scores, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
        return [[Prediction(int(i), self.labels[int(i)], float(s)) for s, i in zip(srow, irow)]
                for srow, irow in zip(scores.tolist(), indices.tolist())]

    def results(self, names: list[str], batch: torch.Tensor, top_k: int = 5, *,
                min_score: float | None = None) -> list[ImageResult]:
        """One ImageResult per image of a preprocessed batch: label, open-set score and top-k predictions."""
        return self.results_and_embeddings(names, batch, top_k, min_score=min_score)[0]

    def results_and_embeddings(self, names: list[str], batch: torch.Tensor, top_k: int = 5, *,
                               min_score: float | None = None) -> tuple[list[ImageResult], torch.Tensor]:
        """results() plus the pooled embeddings (B, D) they were computed from (one trunk pass for both)."""
        min_score = check_min_score(min_score)
        embeddings = self.trunk(batch)
        scores = self.head.open_set_scores(embeddings).tolist()
        ranked = self.top_k(self.head.logits(embeddings).softmax(dim=-1), top_k)
        results = [ImageResult(name, preds, label=top_label(preds[0].label, score, min_score), open_set_score=score)
                   for name, preds, score in zip(names, ranked, scores)]
        return results, embeddings

    def classify_images(self, images: list[Image.Image | np.ndarray], top_k: int = 5, *,
                        min_score: float | None = None) -> list[ImageResult]:
        """classify's answer with each image's label and open-set score, as ImageResults named `image N`."""
        batch = torch.stack([self.transform(as_rgb_image(img)) for img in images])
        return self.results([f"image {i}" for i in range(len(images))], batch, top_k, min_score=min_score)

    def classify(self, images: list[Image.Image | np.ndarray], top_k: int = 5) -> list[list[Prediction]]:
        """Top-k predictions for PIL images (any mode, EXIF orientation applied as for files) or uint8 arrays.

        Arrays are (H, W, 3) RGB or (H, W) grayscale, dtype uint8; anything else raises ValueError.
        classify_images gives the same with each image's label and open-set score.
        """
        return [result.predictions for result in self.classify_images(images, top_k)]

    def predict_files(self, paths: list[str], top_k: int = 5, batch_size: int = 16,
                      workers: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                      decode: str = "exact", *, min_score: float | None = None) -> Iterator[ImageResult]:
        """Classify image files in batches, decoding ahead in worker threads; yields one result per path, in order.

        decode="fast": JPEGs decoded at a reduced DCT scale (see load_image; not bit-equal to timm).
        min_score: an image whose open-set score is below it gets the label "unknown" (its predictions stay).
        A file that cannot be read yields an error result and the batch goes on without it.
        """
        min_score = check_min_score(min_score)  # refused before any file is read
        for items in decoded_batches(paths, self.transform, batch_size, workers, max_pixels, decode):
            yield from self._run_batch(items, top_k, min_score)

    def _run_batch(self, items: list[DecodedItem], top_k: int, min_score: float | None) -> Iterator[ImageResult]:
        read = [(path, t) for path, t, _ in items if t is not None]
        answers = iter(self.results([path for path, _ in read], torch.stack([t for _, t in read]), top_k,
                                    min_score=min_score) if read else [])
        for path, tensor, error in items:
            yield ImageResult(path, error=error) if tensor is None else next(answers)
