"""Inference-time folding: the same function with fewer element-wise passes.

In eval mode every BatchNorm is a fixed per-channel affine map and every layer scale a fixed
per-channel factor, so they can be folded into the neighbouring 1x1 / patch-embedding convs:

- stem and patch embeddings: conv -> BN becomes one conv;
- MSCAN block, attention half: ``x + s1 * (proj_2(SGU(GELU(proj_1(BN1 x)))) + BN1 x)`` becomes
  ``m * x + proj_2'(SGU(GELU(proj_1'(x))))`` with ``proj_1' = proj_1 . BN1``,
  ``proj_2' = s1 * proj_2 + s1 * b1`` and ``m = 1 + s1 * a1`` (``BN1 x = a1 * x + b1``): one
  ``addcmul`` pass over the map for the whole shortcut;
- MSCAN block, MLP half: ``fc1' = fc1 . BN2``, ``fc2' = s2 * fc2``;
- projectors: GELU -> BN -> conv becomes GELU -> conv'.

:func:`fold_for_inference` returns a folded copy; the original model is untouched. Tests compare the
two on the CPU (fp32, 1e-5 relative).
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from torch import nn

from .mscan import Block, OverlapPatchEmbed, StemConv, residual_add
from .fusion import Projector


def _bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``a * x + b`` (C each)."""
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return a, bn.bias - bn.running_mean * a


@torch.no_grad()
def _conv_then_affine(conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> None:
    """conv followed by ``a * y + b`` -> one conv (in place)."""
    conv.weight.mul_(a.reshape(-1, *([1] * (conv.weight.ndim - 1))))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(a)
    conv.bias = nn.Parameter(bias * a + b)


@torch.no_grad()
def _affine_then_conv(conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> None:
    """``a * x + b`` followed by a 1x1 conv -> one 1x1 conv (in place)."""
    weight = conv.weight  # O-I-1-1
    bias = conv.bias if conv.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    conv.bias = nn.Parameter(bias + weight[:, :, 0, 0] @ b)
    weight.mul_(a.reshape(1, -1, 1, 1))


class FoldedBlock(nn.Module):
    """An eval-mode MSCAN :class:`Block` with its norms and layer scales folded away."""

    fused_kernels = False  # set by use_fused_kernels: the residual adds as our ops (forward_pair too)

    def __init__(self, block: Block):
        super().__init__()
        a1, b1 = _bn_affine(block.norm1)
        a2, b2 = _bn_affine(block.norm2)
        s1, s2 = block.layer_scale_1.detach(), block.layer_scale_2.detach()
        self.attn, self.mlp = block.attn, block.mlp
        _affine_then_conv(self.attn.proj_1, a1, b1)
        # the shortcut's shift s1 * b1 is a per-channel constant: it joins proj_2's bias
        _conv_then_affine(self.attn.proj_2, s1, s1 * b1)
        _affine_then_conv(self.mlp.fc1, a2, b2)
        _conv_then_affine(self.mlp.fc2, s2, torch.zeros_like(s2))
        self.register_buffer('shortcut_scale', (1 + s1 * a1).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N-C-H-W -> N-C-H-W."""
        # the attention's own residual is folded into the affine shortcut
        x = residual_add(self, x)(self.attn.branch(x), x, self.shortcut_scale)
        return x + self.mlp(x)

    def forward_pair(self, x: torch.Tensor, low: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` for the kernels under autocast without autograd (:func:`~smmcl.models.mscan.run_blocks`):
        x the stream, ``low`` its copy in the autocast dtype (None: x is one already, as a patch
        embedding's output). Each residual add also writes the copy the next 1x1 conv reads, which
        autocast would otherwise cast in a pass of its own, and adds the branch's last bias (proj_2's,
        fc2's), which would otherwise take a pass of its own too; returns both."""
        pair = torch.ops.smmcl.residual_pair
        attn, mlp = self.attn, self.mlp
        x, low = pair(attn.branch(x if low is None else low, add_bias=False), x, self.shortcut_scale, attn.proj_2.bias)
        return pair(mlp(low, add_bias=False), x, None, mlp.fc2.bias)


def _fold_sequential_conv_bn(seq: nn.Sequential) -> None:
    """Fold every (Conv2d, BatchNorm2d) pair of a Sequential, replacing the BN by Identity."""
    for i in range(len(seq) - 1):
        if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.modules.batchnorm._BatchNorm):
            _conv_then_affine(seq[i], *_bn_affine(seq[i + 1]))
            seq[i + 1] = nn.Identity()


@torch.no_grad()
def fold_for_inference(model: nn.Module) -> nn.Module:
    """A folded eval-mode copy of a segmentor (or any module holding MSCAN parts)."""
    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        if isinstance(module, StemConv):
            _fold_sequential_conv_bn(module.proj)
        elif isinstance(module, OverlapPatchEmbed):
            _conv_then_affine(module.proj, *_bn_affine(module.norm))
            module.norm = nn.Identity()
        elif isinstance(module, Projector):
            seq = module.project
            for i in range(len(seq) - 1):
                if isinstance(seq[i], nn.modules.batchnorm._BatchNorm):
                    _affine_then_conv(seq[i + 1], *_bn_affine(seq[i]))
                    seq[i] = nn.Identity()
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ModuleList):
                for j, block in enumerate(child):
                    if isinstance(block, Block):
                        child[j] = FoldedBlock(block)
    return folded
