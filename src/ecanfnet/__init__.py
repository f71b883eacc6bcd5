"""ecanfnet: the ECA-NFNet-L0 image classifier in PyTorch, with its checkpoints, preprocessing and CLI."""

from __future__ import annotations

import logging
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# The library reports through this logger and prints nothing; without a handler of the application's,
# logging's last-resort handler would print its warnings on stderr. The CLI installs its own (cli.main).
logging.getLogger("ecanfnet").addHandler(logging.NullHandler())

# Public name -> module; resolved on first use so `ecanfnet --help` does not import torch.
_EXPORTS = {
    "create_model": "factory",
    "save_pretrained": "weights",
    "resolve_weights": "weights",
    "load_checkpoint": "weights",
    "PretrainedCfg": "metadata",
    "find_images": "files",
    "WeightsError": "errors",
    "ECANFNet": "model",
    "ECANFNetFeatures": "model",
    "create_fpn_backbone": "dense",
    "create_segmentation_model": "dense",
    "SegmentationModel": "dense",
    "embed_files": "embed",
    "EmbeddingIndex": "search",
    "NFNetConfig": "model",
    "CONFIGS": "model",
    "build_model": "model",
    "eval_transform": "transforms",
    "load_image": "transforms",
    "ImageLoadError": "errors",
    "Classifier": "inference",
    "Prediction": "inference",
    "ImageResult": "inference",
    "imagenet_labels": "labels",
    "prepare_for_inference": "folded",
    "FoldedECANFNet": "folded",
    "make_runner": "backends",
    "export_onnx": "exports",
    "export_torchscript": "exports",
    "export_triton": "exports",
    "BackendError": "errors",
    "quantize_folder": "quantize",
    "load_int8_folder": "quantize",
    "QuantizeError": "errors",
    "QuantizedECANFNet": "quantize",
    "TrainingError": "errors",
    "PublishError": "errors",
    "push": "publish",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ecanfnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
