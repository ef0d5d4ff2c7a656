"""Dual-branch RGB-X MSCAN encoder with per-stage cross-modal modulation and fusion (SMMCL, Sec. 3)."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .fusion import CrossModalModulation, FusionConv, Projector
from .mscan import build_stage, convs_cast_once, drop_path_schedule, mscan_spec, run_blocks


class DualMSCAN(nn.Module):
    """Two MSCAN branches (RGB: ``block{i}``..., X: ``block_other{i}``...) exchanging features per stage.

    Args:
        backbone: variant name (``mscan_t/s/b/l``).
        norm_layer: batch-norm factory for the branches and projectors.
        in_channels: input channels of each branch (both 3 in SMMCL: 1-channel X is replicated).
        drop_path_rate: overrides the variant's stochastic depth when given.
        embed_dim: output channels of the two projectors.
        fused_stages: 1-based stages whose fused map is returned (the decoder reads 2-4).
    """

    fused_kernels = False  # set by use_fused_kernels: under autocast the convs outside the blocks cast once

    def __init__(self, backbone: str = 'mscan_b', norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 in_channels: int = 3, drop_path_rate: Optional[float] = None, embed_dim: int = 256,
                 fused_stages: Sequence[int] = (2, 3, 4)):
        super().__init__()
        self.fused_stages = tuple(fused_stages)
        spec = mscan_spec(backbone)
        self.embed_dims = tuple(spec.embed_dims)
        rates = drop_path_schedule(spec, drop_path_rate)
        for i in range(4):
            stage_in = in_channels if i == 0 else spec.embed_dims[i - 1]
            for suffix in ('', '_other'):
                patch_embed, blocks, norm = build_stage(spec, i, stage_in, rates[i], norm_layer)
                setattr(self, f'patch_embed{suffix}{i + 1}', patch_embed)
                setattr(self, f'block{suffix}{i + 1}', blocks)
                setattr(self, f'norm{suffix}{i + 1}', norm)
            setattr(self, f'module{i + 1}', CrossModalModulation(spec.embed_dims[i]))
            setattr(self, f'fconv{i + 1}', FusionConv(spec.embed_dims[i]))
        # The authors build a fusion conv for every stage but decode stages 2-4 only; the unused ones
        # stay for checkpoint compatibility, frozen (no gradient ever reaches them, and DDP must not
        # wait for one).
        for stage in range(1, 5):
            if stage not in self.fused_stages:
                getattr(self, f'fconv{stage}').requires_grad_(False)
        self.projector_color = Projector(spec.embed_dims[3], norm_layer, embed_dim)
        self.projector_other = Projector(spec.embed_dims[3], norm_layer, embed_dim)

    def embedding_size(self, size: Sequence[int]) -> Tuple[int, int]:
        """(h, w) of the stage-4 embeddings for an H-W input, from the strided convolutions' own
        arithmetic (each 3x3, stride 2, padding 1 halves a size, rounding up), without a forward."""
        h, w = size
        for stage in range(1, 5):
            for conv in getattr(self, f'patch_embed{stage}').modules():
                if isinstance(conv, nn.Conv2d):
                    h, w = (_conv_output_length(n, conv, axis) for axis, n in enumerate((h, w)))
        return h, w

    def _branch_stage(self, x: torch.Tensor, stage: int, suffix: str) -> torch.Tensor:
        embed = getattr(self, f'patch_embed{suffix}{stage}')
        with convs_cast_once(self, x, embed):
            x = embed(x)
        x = run_blocks(getattr(self, f'block{suffix}{stage}'), x)
        return getattr(self, f'norm{suffix}{stage}')(x)

    def forward(self, rgb: torch.Tensor, modal_x: torch.Tensor, with_embeddings: bool = True
                ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """rgb, modal_x: N-3-H-W.

        Returns:
            fused: N-C_i-H/s_i-W/s_i maps of ``fused_stages`` (strides 4, 8, 16, 32 for stages 1-4);
            color_embedding, other_embedding: N-256-H/32-W/32 projections of each branch's stage-4
            features before that stage's modulation (None when ``with_embeddings`` is False).
        """
        fused, color_emb, other_emb = [], None, None
        for stage in range(1, 5):
            rgb = self._branch_stage(rgb, stage, '')
            modal_x = self._branch_stage(modal_x, stage, '_other')
            if stage == 4 and with_embeddings:
                with convs_cast_once(self, rgb, self.projector_color, self.projector_other):
                    color_emb = self.projector_color(rgb)
                    other_emb = self.projector_other(modal_x)
            modulation, fusion = getattr(self, f'module{stage}'), stage in self.fused_stages
            fconv = getattr(self, f'fconv{stage}')
            # per stage, so that distributed training reduces a stage's gradients while those below it run
            with convs_cast_once(self, rgb, modulation, *([fconv] if fusion else [])):
                # the modulated maps feed convs only: the next stage's patch embedding (none after stage 4)
                # and the stage's fusion conv
                rgb, modal_x, both = modulation.modulate(rgb, modal_x, streams=stage < 4, fusion=fusion,
                                                         for_convs=True)
                if both is not None:
                    fused.append(fconv.from_concat(both))
        return fused, color_emb, other_emb


def _conv_output_length(length: int, conv: nn.Conv2d, axis: int) -> int:
    reach = conv.dilation[axis] * (conv.kernel_size[axis] - 1) + 1
    return (length + 2 * conv.padding[axis] - reach) // conv.stride[axis] + 1
