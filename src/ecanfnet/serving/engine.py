"""One forward pass serving both endpoints: pooled embeddings from the fast runner, logits from the classifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import make_runner
from ..inference import ClassHead
from ..model import ECANFNet, embedding_view
from ..transforms import eval_transform
from ..weights import weights_fingerprint


@dataclass
class BatchOutput:
    """Per-image results of one batch: pooled embeddings (B, D), class probabilities (B, C) and open-set scores (B,)."""

    embeddings: torch.Tensor
    probabilities: torch.Tensor
    open_set_scores: torch.Tensor


class InferenceEngine:
    """The network split at the pooled embedding: the trunk runs on the chosen backend, the linear head in torch.

    The split costs one (B x 2304) @ (2304 x C) matmul and lets a single batch answer classify and
    embed requests together.
    """

    def __init__(self, model: ECANFNet, backend: str = "auto", precision: str | None = None,
                 device: str | torch.device | None = None) -> None:
        model = model.eval()
        self.name = model.name
        self.pretrained_cfg = model.pretrained_cfg
        self.num_classes = model.num_classes
        self.num_features = model.head_hidden_size  # the pooled embedding's width (2 x for catavgmax)
        self.labels = model.pretrained_cfg.readable_labels()
        self.transform = eval_transform(model.pretrained_cfg)
        self.eval_settings = model.pretrained_cfg.eval_settings()
        self.image_size = self.eval_settings["image_size"]  # (height, width)
        self.weights_fingerprint = weights_fingerprint(model)  # once, at start-up (/v1/model shows it)
        self.head = ClassHead(model)
        self.runner = make_runner(embedding_view(model), backend, precision, device)

    @property
    def backend(self) -> str:
        return self.runner.backend

    @property
    def precision(self) -> str:
        return self.runner.precision

    def __call__(self, batch: torch.Tensor) -> BatchOutput:
        """Preprocessed images (B, 3, H, W) -> embeddings, softmax probabilities and open-set scores."""
        embeddings = self.runner(batch).float()
        return BatchOutput(embeddings, self.head.logits(embeddings).softmax(dim=-1),
                           self.head.open_set_scores(embeddings))
