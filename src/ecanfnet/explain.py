"""Class-activation maps: where in the image the model found the evidence for a class (Grad-CAM, EigenCAM).

Computed with the grad-cam package (``pytorch_grad_cam``) at the network's final feature map, the one the
classifier pools (final_conv after its SiLU, H/32 x W/32 cells), then upsampled to the crop the model saw:
the checkpoint's own eval transform (resize, centre crop). Heatmap and overlay are in that crop's pixels,
not the original photo's; the part of the photo the crop cut off has no map.

- gradcam: Grad-CAM, class-specific: the feature-map channels weighted by the mean gradient of the class's
  logit. Only the head is differentiated (trunk without autograd, then pooling and the linear layer).
- eigencam: EigenCAM, gradient-free and not class-specific: the feature map projected on its first principal
  component (the sign fixed so the strongest response is positive); the named class changes nothing in it.

The caller's model is not changed: it runs in eval mode for the call (its modules' modes are restored after),
no gradient reaches its parameters, and grad-cam's hooks sit on a wrapper that is released after each call.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import io
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .choices import EXPLAIN_METHODS
from .inference import as_rgb_image
from .model import ECANFNet
from .transforms import MAX_IMAGE_PIXELS, eval_transform, load_image

if TYPE_CHECKING:
    import pytorch_grad_cam

EXPLAIN_EXTRA = "pip install 'ecanfnet[explain]'"
ImageInput = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]
OVERLAY_IMAGE_WEIGHT = 0.5  # the photo's share of the overlay; the heatmap's colours get the rest


class ClassError(ValueError):
    """A class named by index or label that the checkpoint does not have (or names twice)."""


@dataclass
class Explanation:
    """One image's map for one class: the class, its probability, the model's top class and the crop it saw."""

    index: int
    label: str
    probability: float
    top_index: int
    method: str
    heatmap: np.ndarray  # float32 (H, W) in [0, 1], aligned with `image`
    image: Image.Image   # the RGB (W x H) crop the model saw

    def overlay(self, image_weight: float = OVERLAY_IMAGE_WEIGHT) -> Image.Image:
        """The crop blended with the heatmap in the jet colour map (red: strongest evidence)."""
        from pytorch_grad_cam.utils.image import show_cam_on_image

        photo = np.asarray(self.image, dtype=np.float32) / 255
        return Image.fromarray(show_cam_on_image(photo, self.heatmap, use_rgb=True, image_weight=image_weight))

    def overlay_png(self) -> bytes:
        """overlay() encoded as PNG."""
        buffer = io.BytesIO()
        self.overlay().save(buffer, format="PNG")
        return buffer.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, without the arrays: class index, label, probability, top class, method, crop size."""
        return {"index": self.index, "label": self.label, "probability": self.probability,
                "top_index": self.top_index, "method": self.method,
                "width": self.image.width, "height": self.image.height}


def grad_cam_missing() -> str | None:
    """None when grad-cam is installed, else the one line saying which extra to install (nothing imported)."""
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        return f"explanations need the grad-cam package: {EXPLAIN_EXTRA}"
    return None


class Explainer:
    """Class-activation maps of an ECANFNet classifier, on its checkpoint's eval crop (see the module doc).

    Calls from several threads run one at a time.
    """

    def __init__(self, model: ECANFNet) -> None:
        if not isinstance(model, ECANFNet):
            raise TypeError(f"explanations need a float ECANFNet classifier, got {type(model).__name__} (an INT8 "
                            "model: explain the checkpoint it was quantized from)")
        if model.num_classes < 1:
            raise ValueError("the model has no classifier (num_classes 0): there is no class to explain")
        self.model = model
        self.transform = eval_transform(model.pretrained_cfg)
        self.labels = model.pretrained_cfg.readable_labels()
        self._lock = threading.Lock()

    def class_index(self, target: int | str | None) -> int | None:
        """The class index `target` names: an index, a string of digits, or a label (exact, else ignoring case, else
        one of a label's comma-separated names), naming a single class.

        None stays None (each image's top class). ClassError says why a target names no single class.
        """
        if target is None:
            return None
        if isinstance(target, str) and target.strip().isdigit() and target.strip().isascii():
            target = int(target.strip())
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            if not 0 <= target < len(self.labels):
                last = len(self.labels) - 1
                raise ClassError(f"class {target} is out of range: the checkpoint has classes 0..{last}")
            return int(target)
        if not isinstance(target, str):
            raise ClassError(f"a class is an index or a label, got {type(target).__name__}")
        return self._label_index(target)

    def _label_index(self, name: str) -> int:
        wanted = name.strip().casefold()
        hits = [i for i, label in enumerate(self.labels) if label == name]
        if not hits:
            hits = [i for i, label in enumerate(self.labels) if label.casefold() == wanted]
        if not hits:  # one of a label's comma-separated names ("tabby" of "tabby, tabby cat")
            hits = [i for i, label in enumerate(self.labels)
                    if wanted in (part.strip().casefold() for part in label.split(","))]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise ClassError(f"class {name!r} names {len(hits)} classes ({', '.join(map(str, hits))}): give the index")
        folded = {label.casefold(): label for label in self.labels}
        close = [folded[c] for c in difflib.get_close_matches(name.casefold(), list(folded), n=3)]
        hint = f"; close: {', '.join(repr(c) for c in close)}" if close else ""
        raise ClassError(f"class {name!r} is not a label of the checkpoint's {len(self.labels)} classes{hint}")

    def explain(self, images: Sequence[ImageInput], target: int | str | None = None, method: str = "gradcam", *,
                max_pixels: int = MAX_IMAGE_PIXELS) -> list[Explanation]:
        """Maps of image files (read under max_pixels), PIL images or uint8 arrays, for target or each top class.

        Files raise ImageLoadError naming the file; arrays must be (H, W, 3) or (H, W) uint8 (ValueError).
        """
        index = self.class_index(target)
        if not images:
            return []
        batch = torch.stack([self.transform(self._rgb(image, max_pixels)) for image in images])
        return self.explain_batch(batch, index, method)

    @staticmethod
    def _rgb(image: ImageInput, max_pixels: int) -> Image.Image:
        if isinstance(image, (str, os.PathLike)):
            return load_image(image, max_pixels)
        return as_rgb_image(image)

    def explain_batch(self, batch: torch.Tensor, target: int | str | None = None,
                      method: str = "gradcam") -> list[Explanation]:
        """Maps of images already preprocessed by self.transform, (B, 3, H, W), for target or each top class."""
        if method not in EXPLAIN_METHODS:
            raise ValueError(f"method must be one of {', '.join(EXPLAIN_METHODS)}, got {method!r}")
        index = self.class_index(target)
        with self._lock:
            heatmaps, logits = self._cams(batch, index, method)
        probabilities = logits.softmax(dim=-1)
        explanations = []
        for row, (heatmap, image) in enumerate(zip(heatmaps, self.crops(batch))):
            top = int(probabilities[row].argmax())
            chosen = top if index is None else index
            explanations.append(Explanation(chosen, self.labels[chosen], float(probabilities[row, chosen]), top,
                                            method, heatmap, image))
        return explanations

    def crops(self, batch: torch.Tensor) -> list[Image.Image]:
        """The RGB crops a preprocessed batch was made from (the normalisation undone; exact to the pixel value)."""
        pixels = (batch.detach().float().cpu() * self.transform.std + self.transform.mean) * 255
        arrays = pixels.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]

    def _cams(self, batch: torch.Tensor, index: int | None, method: str) -> tuple[np.ndarray, torch.Tensor]:
        """(heatmaps (B, H, W) float32 in [0, 1], logits (B, C) float32 on the CPU) from one forward pass."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam_class = _cam_classes()[method]
        net = _TrunkThenHead(self.model, with_grad=method == "gradcam")
        param = next(self.model.parameters())
        x = batch.detach().to(device=param.device, dtype=param.dtype)
        targets = None if index is None else [ClassifierOutputTarget(index)] * len(x)
        cam = cam_class(model=net, target_layers=[net.feature_map])
        try:
            with eval_mode(self.model), torch.inference_mode(False), torch.enable_grad():
                heatmaps = cam(input_tensor=x.clone(), targets=targets)
            logits = cam.outputs.detach().float().cpu()
        finally:
            cam.activations_and_grads.release()  # grad-cam's hooks on the wrapper, and the tensors they kept
        return np.nan_to_num(heatmaps.astype(np.float32, copy=False)).clip(0, 1), logits


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model in eval mode inside the block; each module's own mode restored after."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


class _TrunkThenHead(nn.Module):
    """The classifier as grad-cam sees it: the trunk without autograd, an identity module on the final feature
    map (the CAM's target layer), then pooling and the linear layer with its weights detached.

    Grad-CAM needs d(logit)/d(feature map) and nothing before it, so only the head is differentiated, and no
    gradient reaches the model's parameters (their .grad and requires_grad stay as they were). The model is
    not a submodule, so grad-cam's eval() and zero_grad() on this wrapper do not reach it either.
    """

    def __init__(self, model: ECANFNet, *, with_grad: bool) -> None:
        super().__init__()
        self.feature_map = nn.Identity()
        # grad-cam reads the device from the model's first parameter.
        self.anchor = nn.Parameter(torch.empty(0, device=next(model.parameters()).device), requires_grad=False)
        self.with_grad = with_grad
        self._model = (model,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (model,) = self._model
        with torch.no_grad():
            features = model.forward_features(x).float()
        features = self.feature_map(features.requires_grad_(self.with_grad))
        pooled = model.forward_head(features, pre_logits=True)
        fc = model.head.fc
        bias = None if fc.bias is None else fc.bias.detach().float()
        return F.linear(pooled, fc.weight.detach().float(), bias)


def _cam_classes() -> dict[str, type[pytorch_grad_cam.base_cam.BaseCAM]]:
    """grad-cam's class for each method (ImportError naming the extra when grad-cam is missing)."""
    missing = grad_cam_missing()
    if missing:
        raise ModuleNotFoundError(missing, name="pytorch_grad_cam")
    from pytorch_grad_cam import EigenCAM, GradCAM

    class SignedEigenCAM(EigenCAM):
        """EigenCAM with its component's sign fixed and a thin SVD (see first_component)."""

        def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
            return np.stack([first_component(a) for a in activations])

    return {"gradcam": GradCAM, "eigencam": SignedEigenCAM}


def first_component(activation: np.ndarray) -> np.ndarray:
    """A (C, h, w) map projected on its first principal component, oriented so its largest magnitude is positive.

    What grad-cam's get_2d_projection_with_sign_correction computes (the centred map times its first right
    singular vector), from the small (h*w x h*w) Gram matrix instead: X v1 = s1 u1, and u1 is the Gram
    matrix's top eigenvector. grad-cam's SVD of the (h*w x C) map, with all C x C right singular vectors
    (2304 x 2304 for L0), cost 3-6 times the forward pass on this CPU. A component comes up to its sign;
    plain EigenCAM keeps whichever LAPACK returns, which lit up the background instead of the object on
    about 9 of 10 images of the acceptance test.
    """
    flat = np.nan_to_num(activation.reshape(activation.shape[0], -1).T.astype(np.float64))  # (h * w, C)
    flat -= flat.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(flat @ flat.T)  # ascending
    projection = eigenvectors[:, -1] * np.sqrt(max(eigenvalues[-1], 0.0))
    if abs(projection.min()) > abs(projection.max()):
        projection = -projection
    return projection.reshape(activation.shape[1:]).astype(np.float32)
