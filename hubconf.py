"""torch.hub entry points: ``torch.hub.load("OWNER/REPO", "eca_nfnet_l0", pretrained=True)``, or source="local".

Each entry point is ``ecanfnet.create_model`` for one architecture: ``pretrained`` is False (random init), True
(the published hub weights) or any weights source (a hub-layout folder, a .safetensors / .pth file, an
``hf-hub:`` id); every other create_model keyword (num_classes, in_chans, global_pool, checkpoint_path,
drop_rate, drop_path_rate, features_only, out_indices) passes through. Works from a plain checkout, with
nothing pip-installed but the dependencies: the repository's ``src`` folder goes first on ``sys.path``, so
this checkout's own ecanfnet is the one imported (unless ecanfnet was imported already).
"""

import os as _os
import sys as _sys

# What the entry points need installed (torch.hub checks these before importing this file's entry points).
dependencies = ["torch", "numpy", "safetensors", "huggingface_hub", "tqdm"]

_SRC = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "src")
if _os.path.isdir(_os.path.join(_SRC, "ecanfnet")) and _SRC not in _sys.path:
    _sys.path.insert(0, _SRC)


def _create(name, pretrained, kwargs):
    """ecanfnet.create_model for one architecture (imported here, so listing the entry points loads no model code)."""
    from ecanfnet.factory import create_model

    return create_model(name, pretrained, **kwargs)


def eca_nfnet_l0(pretrained=False, **kwargs):
    """ECA-NFNet-L0 (24.1M parameters; ImageNet top-1 82.6 % at 288 with the published weights)."""
    return _create("eca_nfnet_l0", pretrained, kwargs)


def eca_nfnet_l1(pretrained=False, **kwargs):
    """ECA-NFNet-L1 (depths 2, 4, 12, 6; 3072 features)."""
    return _create("eca_nfnet_l1", pretrained, kwargs)


def eca_nfnet_l2(pretrained=False, **kwargs):
    """ECA-NFNet-L2 (depths 3, 6, 18, 9; 3072 features)."""
    return _create("eca_nfnet_l2", pretrained, kwargs)


def eca_nfnet_l3(pretrained=False, **kwargs):
    """ECA-NFNet-L3 (depths 4, 8, 24, 12; 3072 features); no weights were published, so pretrained=True is refused."""
    return _create("eca_nfnet_l3", pretrained, kwargs)
