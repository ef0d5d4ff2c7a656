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
from .mscan import convs_cast_once, per_channel_passes


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


def _multiplicative_update(factor, numerator, other, eps: float, bmm=torch.bmm, fused: bool = False,
                           keep: bool = True):
    """One NMF update of ``factor`` (the coefficients N-R or the bases D-R of each image) with the other
    factor held: ``factor * numerator / (factor @ (other^T @ other) + eps)``.

    Returns the updated factor, its denominator and the other factor's Gram matrix (the backward by hand,
    :class:`NMFSteps`, keeps both). ``fused``: the element-wise steps in one pass, ATen's bits
    (``smmcl::nmf_update``, no autograd), the denominator only with ``keep``.
    """
    # (B*S, R, .) @ (B*S, ., R) -> (B*S, R, R)
    gram = bmm(other.transpose(1, 2), other)
    # (B*S, ., R) @ (B*S, R, R) -> (B*S, ., R)
    product = bmm(factor, gram)
    if fused:
        updated, denominator = torch.ops.smmcl.nmf_update(factor, numerator, product, eps, keep)
        return updated, denominator, gram
    denominator = product + eps
    return factor * numerator / denominator, denominator, gram


def _mul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out[...] = a * b`` for a view ``out``: in one pass in eager mode; under ``torch.compile``, whose
    tracing refuses a strided ``out=``, as a product and a copy (which inductor fuses)."""
    if torch.compiler.is_compiling():
        out.copy_(a * b)
    else:
        torch.mul(a, b, out=out)


def _update_backward(grad, factor, other, numerator, denominator, gram, updated, grad_numerator, bmm=torch.bmm,
                     fused: bool = False, other_grad: bool = True):
    """The gradients of :func:`_multiplicative_update`'s inputs from ``grad``, that of ``updated``.

    Writes the numerator's into ``grad_numerator`` (a view, shaped as the numerator); returns the
    factor's and *minus* the other's (through the Gram matrix; None without ``other_grad``), float32, shaped
    as those. ``fused``: the element-wise steps in one pass (``smmcl::nmf_update_grad``), ATen's bits.
    """
    # d(updated)/d(denominator) = -updated / denominator: the denominator's gradient is -minus_grad. The
    # sign is carried by a subtraction here and by the caller's (exact), so no pass negates a tensor
    if fused:
        minus_grad, grad_factor = torch.ops.smmcl.nmf_update_grad(grad, denominator, factor, updated, numerator,
                                                                  grad_numerator)
    else:
        ratio = grad / denominator
        _mul_into(grad_numerator, ratio, factor)
        minus_grad, grad_factor = ratio * updated, ratio * numerator
    # (B*S, ., R) @ (B*S, R, R) -> (B*S, ., R)
    grad_factor.sub_(bmm(minus_grad, gram.transpose(1, 2)))
    if not other_grad:
        return grad_factor, None
    # (B*S, R, .) @ (B*S, ., R) -> (B*S, R, R), then (B*S, ., R) @ (B*S, R, R) -> (B*S, ., R)
    minus_grad_gram = bmm(factor.transpose(1, 2), minus_grad)
    return grad_factor, bmm(other, minus_grad_gram + minus_grad_gram.transpose(1, 2))


def decompose(x: torch.Tensor, bases: torch.Tensor, steps: int, eps: float, inv_t: float = 1,
              bmm=torch.bmm, keep: Optional[list] = None, fused: bool = False,
              shared_start: bool = False) -> torch.Tensor:
    """NMF of each image's x by multiplicative updates from the given bases: a softmax start, ``steps``
    pairs of updates (coefficients, then bases), a last coefficient update, the reconstruction.

    Args:
        x: (B*S)-D-N, non-negative, float32.
        bases: (B*S)-D-R starting bases.
        keep: if a list, it receives what the backward by hand needs (:class:`NMFSteps`): the start's
            coefficients, then the numerator, denominator, Gram matrix and result of each update in order.
        fused: each update's element-wise steps in one pass (``smmcl::nmf_update``, the same bits) where
            autograd does not follow the decomposition (else ATen's operators, which it can).
        shared_start: where autograd does not follow, the start's product ``x^T @ bases`` serves again as
            the first update's numerator, which the authors compute a second time (``local_inference`` and
            ``NMF2D.local_step`` in their ``models/decoders/LightHamHead.py``): the same values, one D-N-R
            product fewer (the fast path's; the plain path computes, and FLOP counts count, both).
    Returns:
        (B*S)-D-N, the rank-R reconstruction.
    """
    # under autograd (the plain path's backward) both products stay, its terms summed as the authors' are
    untracked = not (torch.is_grad_enabled() and (x.requires_grad or bases.requires_grad))
    fused, shared_start, kept = fused and untracked, shared_start and untracked, keep is not None
    # (B*S, D, N)^T @ (B*S, D, R) -> (B*S, N, R)
    scores = bmm(x.transpose(1, 2), bases)
    coef = F.softmax(scores if inv_t == 1 else inv_t * scores, dim=-1)  # times 1 is exact: no pass for it
    if kept:
        keep.append(coef)
    for step in range(steps + 1):
        # (B*S, D, N)^T @ (B*S, D, R) -> (B*S, N, R)
        numerator = scores if step == 0 and shared_start else bmm(x.transpose(1, 2), bases)
        coef, denominator, gram = _multiplicative_update(coef, numerator, bases, eps, bmm, fused, kept)
        if kept:
            keep += [numerator, denominator, gram, coef]
        if step == steps:
            break
        # (B*S, D, N) @ (B*S, N, R) -> (B*S, D, R)
        numerator = bmm(x, coef)
        bases, denominator, gram = _multiplicative_update(bases, numerator, coef, eps, bmm, fused, kept)
        if kept:
            keep += [numerator, denominator, gram, bases]
    # (B*S, D, R) @ (B*S, N, R)^T -> (B*S, D, N)
    return bmm(bases, coef.transpose(1, 2))


class NMFSteps(torch.autograd.Function):
    """:func:`decompose` with its backward written out: the same function, float32 rounded in another
    order.

    Each of the 2T+2 products with x (the start, T+1 coefficient and T bases updates) gives x a gradient
    that is a product of two rank-R factors, D-R times (N-R)^T. Autograd writes each as a float32 D-N
    map and adds them one by one: 2T+2 writes and 2T+1 additions of the largest maps of the decoder
    (~4 GB a training step at MSCAN-B's batch 8, 480x640). Here the factors are kept side by side, and
    one product of the stacked factors, D-(2T+2)R times ((2T+2)R)-N, writes the sum once.
    """

    @staticmethod
    def forward(ctx, x, bases, steps: int, eps: float, inv_t: float, bmm, fused: bool = False):
        """x: (B*S)-D-N float32, bases: (B*S)-D-R (no gradient) -> (B*S)-D-N reconstruction. ``fused``: each
        update's element-wise steps and those of its backward in one pass (the kernels' ops)."""
        keep = []
        out = decompose(x, bases, steps, eps, inv_t, bmm, keep, fused, shared_start=True)
        ctx.steps, ctx.inv_t, ctx.bmm, ctx.fused = steps, inv_t, bmm, fused
        ctx.save_for_backward(x, bases, *keep)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        steps, bmm, fused = ctx.steps, ctx.bmm, ctx.fused
        x, start_bases, start, *updates = ctx.saved_tensors
        # the updates alternate, coefficients first: (numerator, denominator, Gram matrix, result) each
        coef_updates = [updates[i:i + 3] for i in range(0, len(updates), 8)]
        bases_updates = [updates[i:i + 3] for i in range(4, len(updates), 8)]
        coefs = [start] + updates[3::8]
        bases = [start_bases] + updates[7::8]
        rank, uses = bases[0].shape[-1], 2 * steps + 2
        # x's gradient is sum_k lefts_k @ rights_k^T over its 2T+2 uses: each use's factors are written
        # side by side, into a rank-wide slot of these
        lefts = x.new_empty(*bases[0].shape[:2], uses * rank)  # (B*S, D, (2T+2)R)
        rights = x.new_empty(*coefs[0].shape[:2], uses * rank)  # (B*S, N, (2T+2)R)
        slots = ((lefts[..., k:k + rank], rights[..., k:k + rank]) for k in range(0, uses * rank, rank))

        with torch.autocast(device_type=grad.device.type, enabled=False):
            # out = B_T @ C^T: (B*S, D, N) @ (B*S, N, R) and (B*S, D, N)^T @ (B*S, D, R)
            grad_bases = bmm(grad, coefs[-1])
            grad_coef = bmm(grad.transpose(1, 2), bases[-1])
            for step in range(steps, -1, -1):
                # the coefficient update coefs[step] -> coefs[step + 1] with bases[step]; numerator = x^T @ B
                left, grad_numerator = next(slots)
                left.copy_(bases[step])
                # the drawn bases (step 0) take no gradient
                grad_coef, minus_other = _update_backward(grad_coef, coefs[step], bases[step], *coef_updates[step],
                                                          coefs[step + 1], grad_numerator, bmm, fused, step > 0)
                if step == 0:
                    break
                # (B*S, D, N) @ (B*S, N, R) -> (B*S, D, R)
                grad_bases = grad_bases - minus_other + bmm(x, grad_numerator)
                # the bases update bases[step - 1] -> bases[step] with coefs[step]; numerator = x @ C
                grad_numerator, right = next(slots)
                right.copy_(coefs[step])
                grad_bases, minus_other = _update_backward(grad_bases, bases[step - 1], coefs[step],
                                                           *bases_updates[step - 1], bases[step], grad_numerator,
                                                           bmm, fused)
                # (B*S, D, N)^T @ (B*S, D, R) -> (B*S, N, R)
                grad_coef = grad_coef - minus_other + bmm(x.transpose(1, 2), grad_numerator)
            # the start: coefs[0] = softmax(inv_t * x^T @ bases[0])
            left, grad_scores = next(slots)
            left.copy_(bases[0])
            _mul_into(grad_scores, start, grad_coef - (grad_coef * start).sum(-1, keepdim=True))
            if ctx.inv_t != 1:
                grad_scores.mul_(ctx.inv_t)
            # (B*S, D, (2T+2)R) @ (B*S, N, (2T+2)R)^T -> (B*S, D, N)
            grad_x = bmm(lefts, rights.transpose(1, 2))
        return (grad_x,) + (None,) * (len(ctx.needs_input_grad) - 1)  # the bases and the settings take none


class NMF2D(nn.Module):
    """Non-negative matrix factorisation by multiplicative updates, one factorisation per image.

    Bases (R of them, dimension D = C / S) are drawn fresh every forward from ``torch.rand`` and
    L2-normalised over D, as the authors' ``_build_bases`` (RAND_INIT=True). Gradients flow through
    all update steps: mmseg's port runs them without ``torch.no_grad`` and so do the authors.
    The decomposition always runs in float32, also under autocast; with the kernels on
    (``use_fused_kernels``) its products run on the tensor cores at float32's accuracy (3xTF32), and each
    update's element-wise steps in one pass where autograd does not follow them. On the fast path
    (``use_fused_tails``) its backward is :class:`NMFSteps`: x's gradient in one product.

    ``fixed_bases`` (None by default; a non-persistent buffer, so checkpoints do not change) replaces
    the draw with given (B*S)-D-R bases, for a graph export that cannot hold a random draw
    (:mod:`smmcl.tools.export`); they fit one batch size only.
    """

    fused_kernels = False  # set by use_fused_kernels: smmcl::bmm_tf32x3 and smmcl::nmf_update(_grad)
    fused_tails = False  # set by use_fused_tails (the fast path): the backward by hand, NMFSteps

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N-C-H-W (non-negative) -> its rank-R reconstruction, N-C-H-W, float32."""
        B, C, H, W = x.shape
        D, N = C // self.spatial, H * W
        # with the kernels on, the products as smmcl::bmm_tf32x3 (float32's accuracy on the tensor cores),
        # and the updates' element-wise steps as smmcl::nmf_update(_grad) except while torch.compile traces
        # (it fuses them itself); else torch.bmm and ATen's operators: the same function
        bmm = torch.ops.smmcl.bmm_tf32x3 if self.fused_kernels and kernels.runs_on(x) else torch.bmm
        fused = per_channel_passes(self, x)
        steps = self.train_steps if self.training else self.eval_steps
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float().reshape(B * self.spatial, D, N)
            if self.fixed_bases is None:
                bases = self.draw_bases(B, C, x.device)
            elif self.fixed_bases.shape != (B * self.spatial, D, self.rank):
                raise ValueError(f'fixed NMF bases of shape {tuple(self.fixed_bases.shape)} do not fit a '
                                 f'batch of {B}: expected {(B * self.spatial, D, self.rank)}')
            else:
                bases = self.fixed_bases.float()
            if self.fused_tails and torch.is_grad_enabled() and x.requires_grad and not bases.requires_grad:
                return NMFSteps.apply(x, bases, steps, self.eps, self.inv_t, bmm, fused).reshape(B, C, H, W)
            return decompose(x, bases, steps, self.eps, self.inv_t, bmm, fused=fused,
                             shared_start=self.fused_tails).reshape(B, C, H, W)


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

    fused_kernels = False  # set by use_fused_kernels: under autocast its convs' parameters cast once

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
        with convs_cast_once(self, inputs[0], self):
            return self._logits(inputs)

    def _logits(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        size = inputs[0].shape[2:]
        x = torch.cat([inputs[0]] + [F.interpolate(t, size=size, mode='bilinear', align_corners=False)
                                     for t in inputs[1:]], dim=1)
        x = self.align(self.hamburger(self.squeeze(x)))
        return self.conv_seg(self.dropout(x))
