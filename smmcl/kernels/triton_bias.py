"""The bias gradient of a convolution: per-channel sums of an N-C-H-W gradient, as one Triton pass.

ATen's ``convolution_backward`` computes a cuDNN convolution's bias gradient as ``grad.sum((0, 2, 3))``,
one generic reduction per conv (bf16 in, float32 sums, bf16 out under autocast). Over MSCAN-B's training
step these are its ~210 1x1 convs' bias gradients, the likeliest source of the H200 profile's 9.2 ms of
bf16 reductions (their floor, reading each gradient once: ~0.8 ms). :func:`bias_grad` sums the same values
in one launch per conv: programs of BLOCK_C channels x BLOCK_P pixels, each walking a fixed share of the
pixels and writing one float32 partial per channel, summed once over the (few) partials, so the result
does not depend on the order in which programs run (no atomics). ``SMMCL_TRITON_BIAS_GRAD``: ``triton``,
``torch`` (ATen's reduction) or ``auto``, the default: the faster per shape, timed once on the GPU.

Importing this module needs Triton (see :mod:`smmcl.kernels.triton_common`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_common import KEY, PRUNE, bench, check_device, configs, fastest, implementation
from .triton_dwconv import _layout, _num_chunks, _same_layout

# (BLOCK_C, BLOCK_P, warps): in NCHW a channel's pixels are contiguous, so few channels of long pixel runs;
# in channels_last (BLOCK_C >= 16) the channels are, so 128-byte channel rows (bf16) of a few pixels.
_NCHW_TILES = [(1, 1024, 4), (2, 512, 4), (4, 256, 4), (1, 2048, 8)]
_NHWC_TILES = [(64, 16, 4), (128, 8, 4), (32, 32, 4), (64, 32, 8)]
CHANNEL_SUM_CONFIGS = configs(_NCHW_TILES, _NHWC_TILES, (32, 16, 4), names=('BLOCK_C', 'BLOCK_P'))


@triton.autotune(configs=CHANNEL_SUM_CONFIGS, key=KEY + ['N'], prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def channel_sum_kernel(g_ptr, out_ptr, N, C, H, W, sn, sc, sw, num_chunks,
                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (cb, chunk) writes ``out[chunk, c]`` (num_chunks x C, float32): the sum of ``g[n, c, :, :]``
    over the pixel blocks chunk, chunk + num_chunks, ... of all images. The map's rows must follow each
    other at ``W * sw`` (NCHW or channels_last), so that pixel p of an image sits at ``p * sw``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    chunk = tl.program_id(1)
    pixels = H * W
    blocks = tl.cdiv(pixels, BLOCK_P)
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for t in range(chunk, N * blocks, num_chunks):
        p = (t % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs = (t // blocks) * sn + c[:, None] * sc + p[None, :] * sw
        acc += tl.load(g_ptr + offs, mask=cmask[:, None] & (p < pixels)[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + chunk * C + c, tl.sum(acc, axis=1), mask=cmask)


def _chunks(grad: torch.Tensor) -> int:
    """Programs along the pixels: as :func:`~smmcl.kernels.triton_dwconv._num_chunks`, for the layout's
    channel blocks (NCHW tiles hold 1-4 channels, channels_last ones 32-128), each at least one tile."""
    if _layout(grad) == torch.channels_last:
        return _num_chunks(grad, channels=32, pixels=64)
    return _num_chunks(grad, channels=2, pixels=1024)


def _sums_triton(grad: torch.Tensor) -> torch.Tensor:
    n, c, h, w = grad.shape
    if grad.numel() == 0:
        return grad.new_zeros(c, dtype=torch.float32)
    chunks = _chunks(grad)
    # every (chunk, channel) partial is written by its program: no zero-fill launch
    partials = torch.empty(chunks, c, device=grad.device, dtype=torch.float32)
    channel_sum_kernel[lambda m: (triton.cdiv(c, m['BLOCK_C']), chunks)](
        grad, partials, n, c, h, w, grad.stride(0), grad.stride(1), grad.stride(3), chunks)
    return partials.sum(0)


def _sums_torch(grad: torch.Tensor) -> torch.Tensor:
    """ATen's: what ``convolution_backward`` computes for a cuDNN conv's bias (float32 sums, in grad's dtype)."""
    return grad.sum((0, 2, 3))


_SUMS = {'triton': _sums_triton, 'torch': _sums_torch}
BIAS_GRAD_IMPLS = tuple(_SUMS)
_CHOICE = {}  # (shape, strides, dtype, device) -> the faster implementation


def bias_grad(grad: torch.Tensor, bias: torch.Tensor, impl: Optional[str] = None) -> torch.Tensor:
    """The gradient of ``bias`` (C) added per channel to an N-C-H-W map whose gradient is ``grad``.

    Summed in float32, rounded to grad's dtype, then returned in bias's dtype: under autocast what
    ATen's bias gradient of a bf16 conv is, followed by the cast back to the float32 parameter.
    ``impl`` (default: the environment's ``SMMCL_TRITON_BIAS_GRAD``, else ``'auto'``): ``'triton'``
    (:func:`channel_sum_kernel`), ``'torch'`` (``grad.sum((0, 2, 3))``), or ``'auto'``: on a GPU the
    faster for this shape, layout and dtype, timed once; under the interpreter ``'triton'``.
    """
    check_device(grad)
    grad, = _same_layout(_layout(grad), grad)  # rows at W * sw: one of the two dense layouts
    impl = implementation('SMMCL_TRITON_BIAS_GRAD', impl, BIAS_GRAD_IMPLS)
    if impl == 'auto':
        impl = 'triton' if not grad.is_cuda else fastest(
            _CHOICE, (tuple(grad.shape), grad.stride(), grad.dtype, grad.device), _SUMS, grad)
    return _SUMS[impl](grad).to(grad.dtype).to(bias.dtype)
