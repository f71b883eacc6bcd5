"""Ray Data batch inference: a callable class for ``Dataset.map_batches`` that loads the model once per actor.

    import ray
    from ecanfnet.integrations.ray import ImageClassifier

    ds = ray.data.read_binary_files("photos/", include_paths=True)
    preds = ds.map_batches(ImageClassifier, fn_constructor_kwargs={"weights": "runs/flowers"},
                           compute=ray.data.ActorPoolStrategy(size=4), batch_size=64, num_cpus=1)
    preds.write_parquet("predictions/")

A batch is a dict of columns (Ray's default "numpy" format). The input is a column of encoded image bytes
(``read_binary_files``: decoded here as `predict` decodes files, with its bounds and EXIF orientation, so
the results equal `predict`'s) or of uint8 arrays (``read_images(..., mode="RGB")``: HxWx3 or HxW, any
size per row). Every other column (e.g. ``path``) passes through; the input column is dropped. A row whose
image cannot be used gets its reason in ``error`` and empty predictions; the rest of the batch goes on.

The class itself needs neither Ray nor pyarrow (it maps numpy columns to numpy columns); the engine is the
caller's: ``pip install 'ecanfnet[ray]'``.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import numpy as np
import torch

from ..backends import FASTEST
from ..choices import BACKENDS, DECODE_MODES, RUN_PRECISIONS
from ..errors import ImageLoadError
from ..factory import create_model
from ..inference import Classifier, as_rgb_image, check_min_score
from ..transforms import MAX_IMAGE_PIXELS, decode_image
from ..weights import WeightsSource


class ImageClassifier:
    """Classify a batch of images (bytes or uint8 arrays) for ``Dataset.map_batches``: `predict`'s answer as columns.

    Output columns (N rows, k = min(top_k, classes)): ``label`` (str: the top class, or "unknown" when the
    open-set score is below min_score), ``open_set_score`` (float32), ``top_labels`` (a list of k str per
    row), ``top_indices`` (N, k) int64 and ``top_scores`` (N, k) float32, highest first; ``embedding``
    (N, D) float32 pooled vectors when embeddings=True; ``error`` (str, "" for a classified row). An
    unreadable row holds "" labels, index -1 and NaN scores.
    """

    def __init__(self, weights: WeightsSource | None = None, *, backend: str = "auto",
                 precision: str | None = None, device: str | torch.device | None = None, top_k: int = 5,
                 embeddings: bool = False, bytes_column: str | None = "bytes", image_column: str | None = "image",
                 path_column: str | None = "path", prefix: str = "", min_score: float | None = None,
                 tta: bool = False, max_pixels: int = MAX_IMAGE_PIXELS, decode: str = "exact", workers: int = 1,
                 batch_size: int | None = None) -> None:
        """Load the model (once per Ray actor) from any weights source: a folder, a file, hf-hub:ID, an INT8 folder.

        weights None: the published checkpoint. backend/precision/device as for `predict` (device None: the
        GPU Ray assigned, else the CPU). bytes_column/image_column: where the input is read (set one to None
        to ignore that column); path_column names a row in errors. prefix goes before every output column
        name. min_score, tta, max_pixels, decode: as `predict`'s --min-score, --tta, --max-pixels, --fast.
        workers: decoding threads per batch. batch_size: the map_batches batch size, when known (OpenVINO
        compiles for it).
        """
        _check_options(backend=backend, precision=precision, top_k=top_k, flags={"embeddings": embeddings, "tta": tta},
                       columns=(bytes_column, image_column, path_column), prefix=prefix, max_pixels=max_pixels,
                       decode=decode, workers=workers, batch_size=batch_size)
        try:
            self.min_score = check_min_score(min_score)
        except ValueError as exc:
            raise ValueError(f"ImageClassifier: {exc}") from None
        device = _parse_device(device)
        model = create_model(pretrained=weights if weights is not None else True, int8_ok=True)
        self.classifier = Classifier(model, device, backend, precision, batch_size=batch_size, tta=tta)
        self.dim = model.head_hidden_size if embeddings else None
        del model  # the classifier holds what it runs
        self.k = min(top_k, len(self.classifier.labels))
        self.bytes_column, self.image_column, self.path_column = bytes_column, image_column, path_column
        self.prefix, self.max_pixels, self.decode = prefix, max_pixels, decode
        self.min_size = getattr(self.classifier.transform, "min_decode_size", None)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="ecanfnet-decode") if workers > 1 else None

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The batch's other columns, plus the output columns (see the class docstring)."""
        column, kind = self._input_column(batch)
        out = {name: _as_column(value) for name, value in batch.items() if name != column}
        taken = [name for name in self.output_columns if name in out]
        if taken:
            raise ValueError(f"ImageClassifier: the batch already has a column {taken[0]!r}; pass prefix= "
                             "(e.g. prefix='pred_') to name the outputs apart")
        values = list(batch[column])
        jobs = zip(values, self._row_names(batch, len(values)))
        prepare = lambda job: self._prepare(kind, *job)  # noqa: E731
        prepared = list(self.pool.map(prepare, jobs) if self.pool is not None else map(prepare, jobs))
        out.update((self.prefix + name, value) for name, value in self._predict(prepared).items())
        return out

    @property
    def output_columns(self) -> list[str]:
        """The names of the columns __call__ adds, prefix included."""
        return [self.prefix + name for name in _empty_columns(0, self.k, self.dim)]

    def _input_column(self, batch: Mapping[str, Any]) -> tuple[str, str]:
        """(the column holding the images, "bytes" or "image"); ValueError naming the columns otherwise."""
        present = [(c, kind) for c, kind in ((self.bytes_column, "bytes"), (self.image_column, "image"))
                   if c is not None and c in batch]
        if len(present) == 1:
            return present[0]
        if present:
            raise ValueError(f"ImageClassifier: the batch has both {self.bytes_column!r} and {self.image_column!r}; "
                             "pass bytes_column=None or image_column=None to say which holds the images")
        wanted = " or ".join(repr(c) for c in (self.bytes_column, self.image_column) if c is not None)
        raise ValueError(f"ImageClassifier: the batch has no column {wanted} (it has {', '.join(map(repr, batch))}); "
                         "name the image column with bytes_column= (encoded files) or image_column= (arrays)")

    def _row_names(self, batch: Mapping[str, Any], n: int) -> list[str]:
        """What errors call each row: its path when the batch carries one, else its place in the batch."""
        if self.path_column is not None and self.path_column in batch:
            return [p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p) for p in batch[self.path_column]]
        return [f"row {i} of the batch" for i in range(n)]

    def _prepare(self, kind: str, value: Any, name: str) -> torch.Tensor | str:
        """The preprocessed image, or the one-line reason it cannot be classified."""
        try:
            if kind == "bytes":
                if not isinstance(value, (bytes, bytearray, memoryview)):
                    return f"{name}: expected the encoded image file as bytes, got {type(value).__name__}"
                image = decode_image(bytes(value), name, self.max_pixels, self.decode, self.min_size)
            else:
                image = as_rgb_image(value if isinstance(value, np.ndarray) else np.asarray(value))
            return self.classifier.transform(image)
        except ImageLoadError as exc:
            return str(exc)
        except ValueError as exc:
            return f"{name}: {exc}"
        except Exception as exc:  # noqa: BLE001 - one odd image must not stop the batch
            return f"{name}: {type(exc).__name__}: {exc}"

    def _predict(self, prepared: list[torch.Tensor | str]) -> dict[str, np.ndarray]:
        """The output columns for the prepared rows; error rows keep their reason and empty predictions."""
        cols = _empty_columns(len(prepared), self.k, self.dim)
        good = [i for i, p in enumerate(prepared) if not isinstance(p, str)]
        for i, p in enumerate(prepared):
            if isinstance(p, str):
                cols["error"][i] = p
        if not good:
            return cols
        results, embeddings = self.classifier.results_and_embeddings(
            [str(i) for i in good], torch.stack([prepared[i] for i in good]), self.k, min_score=self.min_score)
        for i, result in zip(good, results):
            preds = result.predictions or []
            cols["label"][i] = result.label
            cols["open_set_score"][i] = result.open_set_score
            cols["top_labels"][i] = [p.label for p in preds]
            cols["top_indices"][i] = [p.index for p in preds]
            cols["top_scores"][i] = [p.score for p in preds]
        if self.dim is not None:
            cols["embedding"][np.asarray(good)] = embeddings.float().numpy()
        return cols


def _empty_columns(n: int, k: int, dim: int | None) -> dict[str, np.ndarray]:
    """The output columns for n unreadable rows: "" labels, index -1, NaN scores, "" errors (filled in later)."""
    top_labels = np.empty(n, dtype=object)
    for i in range(n):
        top_labels[i] = [""] * k  # a list per row: Arrow stores it as list<string> (a 2-D str array would not be)
    cols = {
        "label": np.full(n, "", dtype=object), "open_set_score": np.full(n, math.nan, np.float32),
        "top_labels": top_labels,
        "top_indices": np.full((n, k), -1, np.int64), "top_scores": np.full((n, k), math.nan, np.float32),
        "error": np.full(n, "", dtype=object),
    }
    if dim is not None:
        cols["embedding"] = np.full((n, dim), math.nan, np.float32)
    return cols


def _as_column(value: Any) -> Any:
    """A passthrough column as Ray gave it; a pandas Series (batch_format="pandas") as its numpy array."""
    return value.to_numpy() if hasattr(value, "to_numpy") else value


def _parse_device(device: str | torch.device | None) -> torch.device | None:
    """device as a torch.device; ValueError (one line) for a name torch does not know or a CUDA device absent here."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"ImageClassifier: device {device!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"ImageClassifier: device {device!r}: this worker sees {torch.cuda.device_count()} CUDA "
                         "device(s); give the actors GPUs with map_batches(..., num_gpus=1)")
    return parsed


def _check_options(*, backend: str, precision: str | None, top_k: int, flags: dict[str, bool],
                   columns: tuple[str | None, ...], prefix: str, max_pixels: int, decode: str, workers: int,
                   batch_size: int | None) -> None:
    """ValueError (one line naming the argument) for a value ImageClassifier cannot use."""
    def fail(what: str) -> None:
        raise ValueError(f"ImageClassifier: {what}")

    if backend not in ("auto", *BACKENDS):
        fail(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    if precision is not None and precision not in (FASTEST, *RUN_PRECISIONS):
        fail(f"precision must be None, {FASTEST} or one of {', '.join(RUN_PRECISIONS)}; got {precision!r}")
    if decode not in DECODE_MODES:
        fail(f"decode must be one of {', '.join(DECODE_MODES)}; got {decode!r}")
    for name, value in (("top_k", top_k), ("max_pixels", max_pixels), ("workers", workers),
                        ("batch_size", 1 if batch_size is None else batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(f"{name} must be a positive integer, got {value!r}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            fail(f"{name} must be True or False, got {value!r}")
    if not isinstance(prefix, str):
        fail(f"prefix must be a string, got {prefix!r}")
    for name, value in zip(("bytes_column", "image_column", "path_column"), columns):
        if value is not None and (not isinstance(value, str) or not value):
            fail(f"{name} must be a column name or None, got {value!r}")
    if columns[0] is None and columns[1] is None:
        fail("bytes_column and image_column are both None: name the column that holds the images")
    named = [c for c in columns if c is not None]
    if len(set(named)) < len(named):
        fail(f"bytes_column, image_column and path_column must differ, got {columns!r}")
