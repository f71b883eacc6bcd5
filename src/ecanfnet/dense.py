"""Dense prediction on the ECA-NFNet trunk: an FPN backbone for torchvision detectors and a segmentation model.

Both take the stride 4..32 maps of ECANFNetFeatures (256, 512, 1536 and 2304 channels for L0)
through torchvision's FeaturePyramidNetwork, so pretrained classifier weights load into the trunk.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .model import ECANFNetFeatures
from .factory import create_model
from .weights import WeightsSource

PYRAMID_INDICES = (1, 2, 3, 4)  # strides 4, 8, 16, 32


class FPNBackbone(nn.Module):
    """Trunk + feature pyramid: image batch -> OrderedDict of maps with ``out_channels`` channels each.

    The keys ("0".."3", plus "pool" with extra_pool) are what torchvision's FasterRCNN, MaskRCNN and
    RetinaNet default anchor generators and RoI poolers expect.
    """

    def __init__(self, trunk: ECANFNetFeatures, out_channels: int = 256, extra_pool: bool = True) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = trunk
        self.fpn = FeaturePyramidNetwork(trunk.out_channels, out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_pool else None)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        maps = OrderedDict((str(i), m) for i, m in enumerate(self.body(x)))
        return self.fpn(maps)


def create_fpn_backbone(pretrained: bool | WeightsSource = False, name: str | None = None,
                        out_channels: int = 256, frozen_stem: bool = False,
                        drop_path_rate: float = 0.0) -> FPNBackbone:
    """An FPN backbone for torchvision detection models, e.g. ``FasterRCNN(create_fpn_backbone(True), num_classes=3)``.

    frozen_stem: stop gradients into the stem (fewer parameters to train on small datasets).
    """
    trunk = create_model(name, pretrained, drop_path_rate=drop_path_rate, features_only=True,
                         out_indices=PYRAMID_INDICES)
    if frozen_stem:
        trunk.stem.requires_grad_(False)
    return FPNBackbone(trunk, out_channels, extra_pool=True)


class SegmentationHead(nn.Module):
    """Semantic FPN head: each pyramid level -> conv-GN-ReLU (upsampled to stride 4), summed, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, levels: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                          nn.GroupNorm(min(32, channels), channels), nn.ReLU(inplace=True))
            for _ in range(levels))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        fused = sum(F.interpolate(branch(m), size=size, mode="bilinear", align_corners=False) if i else branch(m)
                    for i, (branch, m) in enumerate(zip(self.branches, maps)))
        return self.classifier(fused)


class SegmentationModel(nn.Module):
    """ECA-NFNet trunk + FPN + semantic head: (B, 3, H, W) -> per-pixel class logits (B, num_classes, H, W)."""

    def __init__(self, trunk: ECANFNetFeatures, num_classes: int, fpn_channels: int = 128) -> None:
        super().__init__()
        self.backbone = FPNBackbone(trunk, fpn_channels, extra_pool=False)
        self.head = SegmentationHead(fpn_channels, fpn_channels, num_classes, len(trunk.out_indices))
        self.num_classes = num_classes
        self.pretrained_cfg = trunk.pretrained_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(list(self.backbone(x).values()))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def create_segmentation_model(num_classes: int, pretrained: bool | WeightsSource = False, name: str | None = None,
                              fpn_channels: int = 128, drop_path_rate: float = 0.0) -> SegmentationModel:
    """A semantic segmentation model with num_classes outputs per pixel; pretrained loads the trunk."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    trunk = create_model(name, pretrained, drop_path_rate=drop_path_rate, features_only=True,
                         out_indices=PYRAMID_INDICES)
    return SegmentationModel(trunk, num_classes, fpn_channels)
