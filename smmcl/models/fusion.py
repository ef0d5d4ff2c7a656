"""SMMCL's cross-modal modulation, stage fusion and contrastive projectors.

Names (``Spatial.encode``, ``Channel.encode``, ``fusion_conv``, ``project``) are the authors'.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import nn


def _gelu_mlp(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """1x1 conv, GELU, 1x1 conv, GELU, 1x1 conv (indices 0, 2, 4 hold the weights)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 1), nn.GELU(),
        nn.Conv2d(hidden, hidden, 1), nn.GELU(),
        nn.Conv2d(hidden, out_channels, 1))


class SpatialCoefficients(nn.Module):
    """N-2C-H-W concat of both modalities -> N-1-H-W coefficients in (0, 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.encode = _gelu_mlp(2 * dim, 2 * dim, 1)

    def forward(self, both: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.encode(both))


class ChannelCoefficients(nn.Module):
    """N-2C-H-W concat -> global average and max pool (N-4C-1-1) -> N-C-1-1 coefficients in (0, 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.encode = _gelu_mlp(4 * dim, 4 * dim, dim)

    def forward(self, both: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([both.mean(dim=(2, 3), keepdim=True), both.amax(dim=(2, 3), keepdim=True)], 1)
        return torch.sigmoid(self.encode(pooled))


class CrossModalModulation(nn.Module):
    """Each modality is modulated by the other: ``rgb' = rgb + 0.5 x s + 0.5 x c`` and symmetrically."""

    fused_tails = False  # set by smmcl.models.mscan.use_fused_tails (the fast path): one addcmul per output

    def __init__(self, dim: int):
        super().__init__()
        self.Spatial = SpatialCoefficients(dim)
        self.Channel = ChannelCoefficients(dim)

    def forward(self, rgb: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """rgb, x: N-C-H-W -> modulated (rgb', x'), N-C-H-W each."""
        both = torch.cat([rgb, x], dim=1)
        # 0.5 * m * s + 0.5 * m * c == m * (0.5 * s + 0.5 * c): one gate, broadcast N-1-H-W + N-C-1-1; the
        # halving on the small factors (exact in binary floating point), so one full-size pass makes the gate.
        gate = 0.5 * self.Spatial(both) + 0.5 * self.Channel(both)
        if self.fused_tails:
            return torch.addcmul(rgb, x, gate), torch.addcmul(x, rgb, gate)
        return rgb + x * gate, x + rgb * gate


class FusionConv(nn.Module):
    """1x1 conv on the concat of both modulated modalities: N-2C-H-W -> N-C-H-W."""

    def __init__(self, dim: int):
        super().__init__()
        self.fusion_conv = nn.Sequential(nn.Conv2d(2 * dim, dim, 1))

    def forward(self, rgb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.fusion_conv(torch.cat([rgb, x], dim=1))


class Projector(nn.Module):
    """Contrastive projection head: 1x1, GELU, BN, 1x1, GELU, BN, 1x1 -> ``out_dim`` (N-C-H-W)."""

    def __init__(self, dim: int, norm_layer: Callable[[int], nn.Module], out_dim: int = 256):
        super().__init__()
        self.project = nn.Sequential(
            nn.Conv2d(dim, dim, 1), nn.GELU(), norm_layer(dim),
            nn.Conv2d(dim, dim, 1), nn.GELU(), norm_layer(dim),
            nn.Conv2d(dim, out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x)
