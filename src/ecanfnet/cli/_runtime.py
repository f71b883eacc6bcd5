"""What the inference commands do before calling the library: check the device, load the model, resolve 'auto'."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import BackendError

if TYPE_CHECKING:
    import torch

# Fewer images than this: `auto` uses eager torch, whose setup is instant; ONNX Runtime's session
# set-up (and first-time export) costs more than it saves on a handful of images.
AUTO_ORT_MIN_IMAGES = 16


def weights_or_published(weights: str | None) -> str | bool:
    """The `pretrained` argument for --weights: the source given, or True for the published checkpoint."""
    return weights if weights is not None else True


def load_model(weights: str | None) -> torch.nn.Module:
    """The model of --weights (default: the published checkpoint); an INT8 folder from `ecanfnet quantize` too."""
    from ..factory import create_model

    return create_model(pretrained=weights_or_published(weights), int8_ok=True)


def torch_device(name: str) -> torch.device:
    """The torch.device for --device NAME; BackendError (one line) when this machine has no such device."""
    import torch

    from ..distributed import default_device
    if name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BackendError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        _check_cuda_device(name, device.index or 0)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise BackendError(f"--device {name}: Apple MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise BackendError(f"--device {name}: not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def _check_cuda_device(name: str, index: int) -> None:
    """BackendError unless CUDA device number index exists here."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        raise BackendError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if index >= count:
        raise BackendError(f"--device {name}: there is no such CUDA device here "
                           f"({count} found: cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")


def device_for(name: str, model: torch.nn.Module, device: torch.device) -> torch.device:
    """device (from torch_device(name), checked before the model loads), except that 'auto' is the CPU for an
    INT8 model (it runs on OpenVINO's CPU plugin)."""
    import torch

    from ..backends import is_int8_model

    return torch.device("cpu") if name == "auto" and is_int8_model(model) else device


def backend_for(backend: str, n_images: int, weights: str | None) -> str:
    """'auto' means eager torch for a handful of images (ONNX Runtime's set-up would cost more than it saves),
    except for an INT8 folder, which runs on OpenVINO only."""
    from ..quantize import is_int8_folder

    if backend != "auto" or n_images >= AUTO_ORT_MIN_IMAGES or (weights is not None and is_int8_folder(weights)):
        return backend
    return "torch"
