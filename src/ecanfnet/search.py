"""Nearest neighbours by cosine similarity over an embedding file written by ``ecanfnet embed``.

Exact search streams the (memory-mapped) matrix through numpy in chunks. For large collections
an approximate HNSW index from faiss (``pip install 'ecanfnet[search]'``) is built once, saved
beside the embeddings, and reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .embed import EmbedOutput, embed_paths, load_vectors, manifest_problem_of, read_json_or_error
from .choices import SEARCH_ENGINES
from .errors import EmbedError
from .fileio import write_atomically
from .weights import WeightsSource

ANN_MIN_ROWS = 100_000   # 'auto' uses faiss from this many vectors (when installed)
CHUNK_ROWS = 65_536      # rows scored per numpy matmul in exact search


@dataclass
class Hit:
    """One neighbour: its row in the index, its image path and the cosine similarity to the query."""

    row: int
    path: str
    score: float


class EmbeddingIndex:
    """An embedding file (OUT.npy + OUT.paths.txt + OUT.json) opened for search."""

    def __init__(self, files: EmbedOutput, vectors: np.ndarray, paths: list[str], manifest: dict[str, Any]) -> None:
        self.files, self.vectors, self.paths, self.manifest = files, vectors, paths, manifest

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingIndex":
        """Open OUT.npy (or OUT.json) and its siblings; vectors are memory-mapped, not read into RAM."""
        path = Path(path)
        files = EmbedOutput(path.with_suffix(".npy") if path.suffix == ".json" else path)
        for required in (files.vectors, files.paths, files.manifest):
            if not required.is_file():
                raise EmbedError(f"{required}: missing; an index is the output of `ecanfnet embed` "
                                 f"({files.vectors.name}, {files.paths.name}, {files.manifest.name})")
        manifest = read_json_or_error(files.manifest)
        problem = manifest_problem_of(manifest)
        if problem is not None:
            raise EmbedError(f"{files.manifest}: not an `ecanfnet embed` manifest ({problem}); re-run `ecanfnet embed`")
        try:
            vectors = load_vectors(files.vectors, manifest["dim"], unreadable="not a readable .npy matrix")
        except EmbedError as exc:
            raise EmbedError(f"{exc}; re-run `ecanfnet embed`") from None
        paths = files.paths.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        if len(vectors) != len(paths):
            raise EmbedError(f"{files.vectors}: {vectors.shape} vectors do not match the {len(paths)} paths "
                             f"in {files.paths}; re-run `ecanfnet embed`")
        return cls(files, vectors, paths, manifest)

    @property
    def normalized(self) -> bool:
        """Whether the stored rows are unit length (embedded with --normalize)."""
        return bool(self.manifest.get("plan", {}).get("normalize"))

    def __len__(self) -> int:
        return len(self.paths)

    def search(self, queries: np.ndarray, k: int = 10, engine: str = "auto") -> list[list[Hit]]:
        """The k most cosine-similar rows for each query vector (Q, D), best first."""
        if engine not in SEARCH_ENGINES:
            raise ValueError(f"engine must be one of {', '.join(SEARCH_ENGINES)}, got {engine!r}")
        queries = _unit_rows(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if queries.shape[1] != self.vectors.shape[1]:
            raise EmbedError(f"query vectors have {queries.shape[1]} dimensions, the index {self.vectors.shape[1]}")
        k = max(0, min(k, len(self)))
        if k == 0:
            return [[] for _ in queries]
        if engine == "faiss" or (engine == "auto" and len(self) >= ANN_MIN_ROWS and faiss_available()):
            scores, rows = self._search_faiss(queries, k)
        else:
            scores, rows = self._search_exact(queries, k)
        return [[Hit(int(r), self.paths[int(r)], float(s)) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]

    def _search_exact(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        best_scores = np.full((len(queries), 0), -np.inf, np.float32)
        best_rows = np.zeros((len(queries), 0), np.int64)
        for start in range(0, len(self), CHUNK_ROWS):
            chunk = np.asarray(self.vectors[start:start + CHUNK_ROWS], dtype=np.float32)
            if not self.normalized:
                chunk = _unit_rows(chunk)
            scores = queries @ chunk.T
            rows = np.broadcast_to(np.arange(start, start + len(chunk)), scores.shape)
            best_scores = np.concatenate([best_scores, scores], axis=1)
            best_rows = np.concatenate([best_rows, rows], axis=1)
            if best_scores.shape[1] > k:
                keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
                best_scores = np.take_along_axis(best_scores, keep, axis=1)
                best_rows = np.take_along_axis(best_rows, keep, axis=1)
        order = np.argsort(-best_scores, axis=1, kind="stable")
        return np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_rows, order, axis=1)

    def _search_faiss(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._faiss_index()
        index.hnsw.efSearch = max(64, 2 * k)
        return index.search(queries, k)

    def faiss_index_path(self) -> Path:
        """Where the HNSW index for this embedding file is cached (named after its contents)."""
        tag = str(self.manifest.get("plan", {}).get("files_sha256", "x"))[:12]
        return self.files.sibling(f".hnsw-{tag}-{len(self)}.faiss")

    def _faiss_index(self):
        faiss = _import_faiss()
        path = self.faiss_index_path()
        if path.is_file():
            return faiss.read_index(str(path))
        index = faiss.IndexHNSWFlat(self.vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        for start in range(0, len(self), CHUNK_ROWS):
            index.add(_unit_rows(np.asarray(self.vectors[start:start + CHUNK_ROWS], dtype=np.float32)))
        write_atomically(path, lambda tmp: faiss.write_index(index, tmp))
        return index


def embed_queries(index: EmbeddingIndex, images: list[str], weights: WeightsSource | bool | None = None,
                  backend: str = "torch", device: str | None = None) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """Embed query images with the same weights as the index (checked by fingerprint): (vectors, paths, errors).

    device: where the model runs (default: the CPU).
    """
    from .backends import is_int8_model, make_runner
    from .factory import create_model
    from .model import embedding_view
    from .transforms import eval_transform
    from .weights import weights_fingerprint

    plan = index.manifest.get("plan", {})
    if weights is None:
        recorded = plan.get("weights")
        if recorded is None:
            raise EmbedError(f"{index.files.manifest} does not say which weights made it; pass --weights")
        weights = True if recorded == "published" else recorded
    model = embedding_view(create_model(pretrained=weights, int8_ok=True))
    if weights_fingerprint(model) != plan.get("weights_fingerprint"):
        raise EmbedError(f"{weights if weights is not True else 'the published weights'} are not the weights "
                         f"{index.files.vectors} was embedded with (fingerprint {plan.get('weights_fingerprint')}); "
                         f"pass the same --weights")
    runner = make_runner(model, "auto" if is_int8_model(model) else backend, None, device)
    vectors, good, errors = embed_paths(images, runner, eval_transform(model.pretrained_cfg), model.head_hidden_size,
                                        normalize=True)
    return vectors, good, errors


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def faiss_available() -> bool:
    """Whether the optional faiss-cpu package is installed."""
    from .backends import installed

    return installed("faiss")


def _import_faiss():
    if not faiss_available():
        raise EmbedError("the faiss engine needs faiss-cpu: pip install 'ecanfnet[search]'")
    import faiss

    return faiss
