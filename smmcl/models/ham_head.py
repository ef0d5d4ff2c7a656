"""LightHamHead: the "Hamburger" matrix-decomposition decoder of SegNeXt (Geng et al., ICLR 2021),
written without mmcv. Names (``squeeze.conv/gn``, ``hamburger.ham_in/ham_out``, ``align``,
``conv_seg``) match the authors' checkpoints.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels


def init_like_conv_module(conv: nn.Conv2d, norm: Optional[nn.Module] = None) -> None:
    """The state mmcv's ``ConvModule`` leaves its layers in at construction.

    mmcv 1.x ``ConvModule.init_weights`` (``mmcv/cnn/bricks/conv_module.py``, called from its
    ``__init__``) applies ``kaiming_init`` (``mmcv/cnn/utils/weight_init.py``: normal, ``mode='fan_out'``,
    ``nonlinearity='relu'``, ``a=0``, bias constant 0) to a plain conv and ``constant_init(norm, 1,
    bias=0)`` to its norm. The authors' ``init_weight`` later re-draws the conv weight
    (:func:`smmcl.models.weights.init_decoder_weights`) but never touches the bias, so the zero bias of
    ``ham_in`` / ``ham_out`` is what their training starts from (PyTorch's default would be uniform).
    """
    nn.init.kaiming_normal_(conv.weight, a=0, mode='fan_out', nonlinearity='relu')
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    if norm is not None:
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)


class ConvGNReLU(nn.Module):
    """1x1 conv (no bias) + GroupNorm(32) + ReLU, mmcv's ConvModule with GN as SegNeXt configures it."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.gn = nn.GroupNorm(groups, out_channels)
        init_like_conv_module(self.conv, self.gn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.gn(self.conv(x)))


class Conv1x1(nn.Module):
    """1x1 conv with bias (mmcv's ConvModule without norm and activation), its parameters named
    ``<name>.conv.*``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        init_like_conv_module(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class NMF2D(nn.Module):
    """Non-negative matrix factorisation by multiplicative updates, one factorisation per image.

    Bases (R of them, dimension D = C / S) are drawn fresh every forward from ``torch.rand`` and
    L2-normalised over D, as the authors' ``_build_bases`` (RAND_INIT=True). Gradients flow through
    all update steps: mmseg's port runs them without ``torch.no_grad`` and so do the authors.
    The decomposition always runs in float32, also under autocast; with the kernels on
    (``use_fused_kernels``) its products run on the tensor cores at float32's accuracy (3xTF32).

    ``fixed_bases`` (None by default; a non-persistent buffer, so checkpoints do not change) replaces
    the draw with given (B*S)-D-R bases, for a graph export that cannot hold a random draw
    (:mod:`smmcl.tools.export`); they fit one batch size only.
    """

    fused_kernels = False  # set by use_fused_kernels: the products as smmcl::bmm_tf32x3

    def __init__(self, rank: int = 64, spatial: int = 1, train_steps: int = 6, eval_steps: int = 7,
                 eps: float = 1e-6):
        super().__init__()
        self.rank, self.spatial = rank, spatial
        self.train_steps, self.eval_steps = train_steps, eval_steps
        self.eps = eps
        self.inv_t = 1  # NMF2D overrides the base class' INV_T=100 with 1
        self.register_buffer('fixed_bases', None, persistent=False)

    def draw_bases(self, batch: int, channels: int, device=None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(batch*S)-D-R uniform random bases, L2-normalised over D (the authors' ``_build_bases``)."""
        shape = (batch * self.spatial, channels // self.spatial, self.rank)
        return F.normalize(torch.rand(shape, device=device, generator=generator), dim=1)

    def _bmm(self, x: torch.Tensor):
        """The batched product: ``torch.bmm``, or with the kernels on ``smmcl::bmm_tf32x3`` (float32's accuracy
        on the tensor cores, :mod:`smmcl.kernels.triton_matmul`); the same function."""
        if self.fused_kernels and kernels.runs_on(x):
            return torch.ops.smmcl.bmm_tf32x3
        return torch.bmm

    def _update_coef(self, x, bases, coef, bmm=torch.bmm):
        # (B*S, D, N)^T @ (B*S, D, R) -> (B*S, N, R)
        numerator = bmm(x.transpose(1, 2), bases)
        # (B*S, N, R) @ [(B*S, D, R)^T @ (B*S, D, R)] -> (B*S, N, R)
        denominator = bmm(coef, bmm(bases.transpose(1, 2), bases))
        return coef * numerator / (denominator + self.eps)

    def _update_bases(self, x, bases, coef, bmm=torch.bmm):
        # (B*S, D, N) @ (B*S, N, R) -> (B*S, D, R)
        numerator = bmm(x, coef)
        # (B*S, D, R) @ [(B*S, N, R)^T @ (B*S, N, R)] -> (B*S, D, R)
        denominator = bmm(bases, bmm(coef.transpose(1, 2), coef))
        return bases * numerator / (denominator + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N-C-H-W (non-negative) -> its rank-R reconstruction, N-C-H-W, float32."""
        B, C, H, W = x.shape
        D, N = C // self.spatial, H * W
        bmm = self._bmm(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float().reshape(B * self.spatial, D, N)
            if self.fixed_bases is None:
                bases = self.draw_bases(B, C, x.device)
            elif self.fixed_bases.shape != (B * self.spatial, D, self.rank):
                raise ValueError(f'fixed NMF bases of shape {tuple(self.fixed_bases.shape)} do not fit a '
                                 f'batch of {B}: expected {(B * self.spatial, D, self.rank)}')
            else:
                bases = self.fixed_bases.float()
            # (B*S, D, N)^T @ (B*S, D, R) -> (B*S, N, R)
            coef = F.softmax(self.inv_t * bmm(x.transpose(1, 2), bases), dim=-1)
            for _ in range(self.train_steps if self.training else self.eval_steps):
                coef = self._update_coef(x, bases, coef, bmm)
                bases = self._update_bases(x, bases, coef, bmm)
            coef = self._update_coef(x, bases, coef, bmm)
            # (B*S, D, R) @ (B*S, N, R)^T -> (B*S, D, N)
            return bmm(bases, coef.transpose(1, 2)).reshape(B, C, H, W)


class Hamburger(nn.Module):
    """ReLU(x + ham_out(NMF(ReLU(ham_in(x)))))."""

    def __init__(self, channels: int = 512, rank: int = 64, train_steps: int = 6, eval_steps: int = 7):
        super().__init__()
        self.ham_in = Conv1x1(channels)
        self.ham = NMF2D(rank=rank, train_steps=train_steps, eval_steps=eval_steps)
        self.ham_out = Conv1x1(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enjoy = self.ham(F.relu(self.ham_in(x))).to(x.dtype)
        return F.relu(x + self.ham_out(enjoy))


def nmf_layers(model: nn.Module) -> List[Tuple[NMF2D, int]]:
    """Each NMF of ``model`` with the channel count C of its input, in module order (the order a forward
    runs them), found by type: works on a plain, folded (``for_inference``) or compiled model."""
    return [(m.ham, m.ham_in.conv.out_channels) for m in model.modules() if isinstance(m, Hamburger)]


@contextlib.contextmanager
def given_bases(model: nn.Module, bases: Sequence[torch.Tensor]) -> Iterator[None]:
    """Within the context, the NMFs of :func:`nmf_layers` use ``bases`` (one (N*S)-D-R tensor each, in
    that order) instead of drawing; on exit, also after an exception, each gets back what it had
    before (None: it draws again; contexts nest, as a CUDA-graph capture inside batched evaluation)."""
    layers = [nmf for nmf, _ in nmf_layers(model)]
    if len(bases) != len(layers):
        raise ValueError(f'{len(bases)} sets of NMF bases for a model with {len(layers)} NMF layers')
    before = [nmf.fixed_bases for nmf in layers]
    try:
        for nmf, value in zip(layers, bases):
            nmf.fixed_bases = value
        yield
    finally:
        for nmf, value in zip(layers, before):
            nmf.fixed_bases = value


class LightHamHead(nn.Module):
    """Decoder on fused stages 2-4.

    Args:
        in_channels: channels of the three input maps (strides 8, 16, 32).
        num_classes: output classes.
        channels: ``decoder_embed_dim`` (``ham_channels`` = ``channels`` = 512 in SegNeXt-B).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 ham_channels: int = 512, dropout: float = 0.1):
        super().__init__()
        self.squeeze = ConvGNReLU(sum(in_channels), ham_channels)
        self.hamburger = Hamburger(ham_channels)
        self.align = ConvGNReLU(ham_channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        # A plain conv, as mmseg's BaseDecodeHead builds it: PyTorch's default init. Its init_cfg
        # (normal, std 0.01) would only apply through mmcv's BaseModule.init_weights, which the authors
        # never call (their builder.py calls CMX's init_weight instead), so the bias stays uniform.
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """inputs: N-C_i-H_i-W_i maps, the first the largest -> N-K-H_0-W_0 logits."""
        size = inputs[0].shape[2:]
        x = torch.cat([inputs[0]] + [F.interpolate(t, size=size, mode='bilinear', align_corners=False)
                                     for t in inputs[1:]], dim=1)
        x = self.align(self.hamburger(self.squeeze(x)))
        return self.conv_seg(self.dropout(x))
