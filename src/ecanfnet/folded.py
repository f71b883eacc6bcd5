"""The inference form of the network: weight standardization and NF scalars folded into plain convs.

At inference every standardized weight is a constant, so it is computed once. The block's
scalars fold too, all exactly (up to float rounding):
  - ``beta`` multiplies the block input before conv1 and the (linear) avg-pool + 1x1 shortcut,
    so it moves into those convs' weights;
  - ``alpha * attn_gain`` multiplies ``conv3(...) * eca_gate(conv3(...))``; scaling conv3 by it
    scales the ECA input means by the same factor, which dividing the (bias-free, linear) ECA
    kernel by it undoes, so the gate is unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .choices import FLOAT_PRECISIONS
from .model import ECANFNet, NFBlock, ScaledStdConv2d, global_pool_2d

PRECISIONS = dict(zip(FLOAT_PRECISIONS, (torch.float32, torch.bfloat16, torch.float16)))


def plain_conv(conv: ScaledStdConv2d, weight_scale: float = 1.0, bias_scale: float = 1.0) -> nn.Conv2d:
    """An nn.Conv2d holding conv's standardized weight (times weight_scale) and bias (times bias_scale)."""
    with torch.device("meta"):  # skip the random init of weights that are replaced right away
        out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, bias=True)
    with torch.no_grad():
        out.weight = nn.Parameter(conv.standardized_weight() * weight_scale, requires_grad=False)
        out.bias = nn.Parameter(conv.bias * bias_scale, requires_grad=False)
    return out


class FoldedBlock(nn.Module):
    """NFBlock with beta, alpha and the attention gain folded into its convolutions."""

    def __init__(self, block: NFBlock) -> None:
        super().__init__()
        gain = block.alpha * block.attn_gain
        self.downsample: nn.Module | None = None
        if block.downsample is not None:
            self.downsample = nn.Sequential(copy.deepcopy(block.downsample.pool),
                                            plain_conv(block.downsample.conv, weight_scale=block.beta))
        self.conv1 = plain_conv(block.conv1, weight_scale=block.beta)
        self.conv2 = plain_conv(block.conv2)
        self.conv2b = plain_conv(block.conv2b)
        self.conv3 = plain_conv(block.conv3, weight_scale=gain, bias_scale=gain)
        self.eca = copy.deepcopy(block.attn_last.conv)
        with torch.no_grad():
            self.eca.weight.div_(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.silu(x)
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = F.silu(self.conv1(out), inplace=True)
        out = F.silu(self.conv2(out), inplace=True)
        out = F.silu(self.conv2b(out), inplace=True)
        out = self.conv3(out)
        gate = torch.sigmoid(self.eca(out.mean(dim=(2, 3)).unsqueeze(1)))   # (B, 1, C)
        return torch.addcmul(shortcut, out, gate.transpose(1, 2).unsqueeze(-1))


class FoldedECANFNet(nn.Module):
    """Eval-only ECA-NFNet with precomputed weights; same outputs as the ECANFNet it was made from."""

    def __init__(self, model: ECANFNet) -> None:
        super().__init__()
        self.name = model.name
        self.num_classes = model.num_classes
        self.num_features = model.num_features
        self.global_pool = model.global_pool
        self.head_hidden_size = model.head_hidden_size
        self.pretrained_cfg = model.pretrained_cfg
        stem = model.stem
        self.stem = nn.ModuleList([plain_conv(c) for c in (stem.conv1, stem.conv2, stem.conv3, stem.conv4)])
        self.blocks = nn.Sequential(*[FoldedBlock(b) for stage in model.stages for b in stage])
        self.final_conv = plain_conv(model.final_conv)
        self.fc = copy.deepcopy(model.head.fc)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FoldedECANFNet":
        """Only eval mode exists: training needs the unfolded ECANFNet."""
        if mode:
            raise RuntimeError("the folded inference model cannot be trained; train the ECANFNet it was "
                               "made from and fold it again with prepare_for_inference()")
        return super().train(False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> final feature map (after the last SiLU)."""
        for i, conv in enumerate(self.stem):
            x = conv(x)
            if i < len(self.stem) - 1:
                x = F.silu(x, inplace=True)
        x = self.blocks(x)
        return F.silu(self.final_conv(x), inplace=True)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits, or the pooled embedding when pre_logits is True."""
        x = global_pool_2d(x, self.global_pool)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def prepare_for_inference(model: ECANFNet, precision: str = "fp32", channels_last: bool = True,
                          device: str | torch.device | None = None) -> FoldedECANFNet:
    """Fold a trained ECANFNet into its fast eval-only form, in the given precision and memory format."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = device if device is not None else next(model.parameters()).device
    folded = FoldedECANFNet(model).to(device=device, dtype=PRECISIONS[precision])
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    return folded
