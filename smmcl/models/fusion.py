"""SMMCL's cross-modal modulation, stage fusion and contrastive projectors.

Names (``Spatial.encode``, ``Channel.encode``, ``fusion_conv``, ``project``) are the authors'.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ..kernels.reference import modulation_gate, modulation_grad_reference, modulation_inputs_reference
from ..kernels.reference import modulation_reference, pooled_input_grad_reference
from .mscan import per_channel_passes


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
        return self.from_pooled(pooled)

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """N-4C-1-1 (means, then maxima, of the concat's channels) -> N-C-1-1 coefficients."""
        return torch.sigmoid(self.encode(pooled))


class ModulationInputs(torch.autograd.Function):
    """The fast path's inputs of the two coefficient MLPs: (rgb, x), N-C-H-W each -> (both, pooled, rgb, x).

    ``both`` is the N-2C-H-W concat stored in ``dtype`` (under autocast the dtype the spatial MLP's first
    conv casts it to: one pass where the concat and the cast took two), ``pooled`` the float32 N-4C-1-1
    means and maxima of its channels (:func:`~smmcl.kernels.reference.modulation_inputs_reference`), and rgb and x
    are handed on as they are, for the modulation's tails. Each modality feeds the concat, the pooling and
    the tails; autograd would add those gradients in passes over 2C-wide and C-wide float32 maps (two
    each). Here the backward sums all of a modality's in one expression, the tails' arriving as that of
    the handed-on input. With ``kernels``, one pass each way per modality: ``smmcl::modulation_inputs``
    writes its half of the concat and its channels' sums, maxima and the count of each maximum;
    ``smmcl::pooled_input_grad`` sums its gradients.
    """

    @staticmethod
    def forward(ctx, rgb, x, dtype: torch.dtype, kernels: bool):
        if kernels:  # the maxima's counts come with the pass
            both, pooled, counts = torch.ops.smmcl.modulation_inputs(rgb, x, dtype)
        else:  # counted in the backward, with the positions that reach them
            both, pooled, counts = modulation_inputs_reference(rgb, x, dtype, counts=False)
        ctx.save_for_backward(rgb, x, pooled, counts)
        ctx.set_materialize_grads(False)
        ctx.kernels = kernels
        return both, pooled, rgb, x

    @staticmethod
    def backward(ctx, grad_both, grad_pooled, grad_rgb, grad_x):
        rgb, x, pooled, counts = ctx.saved_tensors
        c = rgb.shape[1]
        grads = []
        for i, (value, handed_on) in enumerate(zip((rgb, x), (grad_rgb, grad_x))):
            grad_mean, grad_max = (None, None) if grad_pooled is None else (
                grad_pooled[:, i * c:(i + 1) * c], grad_pooled[:, (i + 2) * c:(i + 3) * c])
            maximum = pooled[:, (i + 2) * c:(i + 3) * c]
            count = None if counts is None else counts[:, i * c:(i + 1) * c]
            if ctx.kernels:
                grads.append(torch.ops.smmcl.pooled_input_grad(handed_on, grad_both, i * c, value, grad_mean,
                                                               maximum, grad_max, count))
            else:
                half = None if grad_both is None else grad_both[:, i * c:(i + 1) * c]
                grads.append(pooled_input_grad_reference(handed_on, half, value, grad_mean, maximum, grad_max,
                                                         count))
        return grads[0], grads[1], None, None


class ModulationTails(torch.autograd.Function):
    """The fast path's modulation outputs (:func:`~smmcl.kernels.reference.modulation_reference`): (rgb, x, s, c) ->
    (rgb + x * gate, x + rgb * gate), the gate ``0.5 * s + 0.5 * c`` from N-1-H-W spatial and N-C-1-1
    channel coefficients, rounded as the separate ops round it. The backward writes each modality's
    gradient in one pass (autograd: a product, then a sum with the pass-through gradient) and the gate's
    in float32, reduced to those of s and c. With the kernels on, ``smmcl::modulation`` takes its place:
    one pass forward, one backward."""

    @staticmethod
    def forward(ctx, rgb, x, spatial, channel):
        gate = modulation_gate(spatial, channel)
        ctx.save_for_backward(rgb, x, spatial, channel, gate)  # as addcmul keeps it: not made again
        return modulation_reference(rgb, x, spatial, channel, gate=gate)

    @staticmethod
    def backward(ctx, grad_rgb, grad_x):
        *inputs, gate = ctx.saved_tensors
        return modulation_grad_reference(grad_rgb, grad_x, *inputs, gate=gate)


class CrossModalModulation(nn.Module):
    """Each modality is modulated by the other: ``rgb' = rgb + 0.5 x s + 0.5 x c`` and symmetrically."""

    fused_tails = False  # set by smmcl.models.mscan.use_fused_tails (the fast path): one addcmul per output
    fused_kernels = False  # set by smmcl.models.mscan.use_fused_kernels: the fast path's passes as our ops

    def __init__(self, dim: int):
        super().__init__()
        self.Spatial = SpatialCoefficients(dim)
        self.Channel = ChannelCoefficients(dim)

    def forward(self, rgb: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """rgb, x: N-C-H-W -> modulated (rgb', x'), N-C-H-W each."""
        return self.modulate(rgb, x)[:2]

    def modulate(self, rgb: torch.Tensor, x: torch.Tensor, streams: bool = True, fusion: bool = False,
                 for_convs: bool = False
                 ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """rgb, x: N-C-H-W -> (rgb', x': N-C-H-W each, or None without ``streams``; their N-2C-H-W concat,
        the fusion conv's input, or None without ``fusion``).

        ``for_convs``: only convolutions read the results (the next stage's patch embedding, the fusion
        conv: the encoder's case). On the fast path with the kernels (``smmcl::modulation``) one pass then
        writes them in the dtype those convs compute in (under autocast its dtype: the values autocast's
        casts would make), so that neither float32 maps, the concat nor the casts take passes of their
        own, nor their gradients' sums in the backward. Otherwise the maps are float32, as ``forward``'s.
        """
        both = None
        if not self.fused_tails:
            rgb, x = self._plain(rgb, x)
        else:
            autocast = torch.is_autocast_enabled(rgb.device.type)
            dtype = torch.get_autocast_dtype(rgb.device.type) if autocast else rgb.dtype
            ours = per_channel_passes(self, rgb)
            # the coefficient MLPs' inputs: the concat of rgb and x, their channels' means and maxima
            if torch.is_grad_enabled() and (rgb.requires_grad or x.requires_grad):
                inputs, pooled, rgb, x = ModulationInputs.apply(rgb, x, dtype, ours)
            elif ours:  # no backward to prepare for (the maxima's counts come with the kernel's pass)
                inputs, pooled, _ = torch.ops.smmcl.modulation_inputs(rgb, x, dtype)
            else:  # no backward: the maxima's counts are not needed
                inputs, pooled, _ = modulation_inputs_reference(rgb, x, dtype, counts=False)
            spatial, channel = self.Spatial(inputs), self.Channel.from_pooled(pooled)
            if ours:
                rgb, x, both = torch.ops.smmcl.modulation(rgb, x, spatial, channel,
                                                          dtype if autocast and for_convs else None, streams,
                                                          fusion)
            else:
                rgb, x = ModulationTails.apply(rgb, x, spatial, channel)
        if fusion and both is None:
            both = torch.cat([rgb, x], dim=1)
        return (rgb if streams else None), (x if streams else None), (both if fusion else None)

    def _plain(self, rgb: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([rgb, x], dim=1)
        # 0.5 * m * s + 0.5 * m * c == m * (0.5 * s + 0.5 * c): one gate, broadcast N-1-H-W + N-C-1-1; the
        # halving on the small factors (exact in binary floating point), so one full-size pass makes the gate.
        gate = 0.5 * self.Spatial(both) + 0.5 * self.Channel(both)
        return rgb + x * gate, x + rgb * gate


class FusionConv(nn.Module):
    """1x1 conv on the concat of both modulated modalities: N-2C-H-W -> N-C-H-W."""

    def __init__(self, dim: int):
        super().__init__()
        self.fusion_conv = nn.Sequential(nn.Conv2d(2 * dim, dim, 1))

    def forward(self, rgb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.from_concat(torch.cat([rgb, x], dim=1))

    def from_concat(self, both: torch.Tensor) -> torch.Tensor:
        """The concat already made (:meth:`CrossModalModulation.modulate`): N-2C-H-W -> N-C-H-W."""
        return self.fusion_conv(both)


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
