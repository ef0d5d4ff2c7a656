"""Per-channel passes over an N-C-H-W map, one Triton pass each: a convolution's bias add and bias
gradient, a block tail (a residual branch's per-channel scale and add) with its backward, a block's
BatchNorm in training with its backward, and the cross-modal modulation's element-wise work.

After a cuDNN convolution ATen adds the bias with a broadcast ``add_`` (a generic element-wise kernel that
cannot vectorise a broadcast operand; the likeliest source of the H200 profiles' ~5.1 ms of
``elementwise_kernel<128, 4, gpu_kernel_impl_nocast<...>>`` per MSCAN-B forward, which on the CPU, where
oneDNN adds the bias inside the conv, never shows), and its ``convolution_backward`` sums the bias
gradient as ``grad.sum((0, 2, 3))``, one generic reduction per conv (bf16 in, float32 sums, bf16 out
under autocast; the likeliest source of the training profile's 9.2 ms of bf16 reductions, whose floor,
reading each gradient once, is ~0.8 ms). The fast path's block tails ``x + y * f`` (f the layer scale,
per channel or, with drop path, per image and channel) run as ``addcmul``, whose backward under autocast
is four passes over the map (``grad * f``, its cast to y's bf16, ``grad * y`` and its sum) and whose
forward casts y to float32 first (autocast promotes ``addcmul``'s operands); y itself is the branch's
last 1x1 conv's output after its bias add (proj_2's, fc2's), and the attention's also after its own
shortcut's add (``proj_2(...) + x``, bf16 + float32: a non-vectorised pass). Two of MSCAN's 1x1 convs
feed one element-wise op only: proj_1 the GELU, the attention's conv3 its product with the gate
(``conv3(attn) * u``); under ATen each is a pass of its own after the bias add, and its backward
another before the bias sum.

Here every pass works on tiles of BLOCK_C channels x BLOCK_P pixels: :func:`bias_add` writes ``y + bias``
(the bias rounded to y's dtype first, the sum in float32, as ATen's add), or its GELU, or its product with
a gate, in the same pass; :func:`bias_grad` has each program walk a fixed share of the pixels and write
one float32 partial per channel (:func:`bias_epilogue_grad`: with the epilogue's backward in the same
pass, writing the gradients it sums); :func:`scaled_residual` adds the conv's bias and the shortcut to y
as it reads them (keeping, with a shortcut, the float32 branch for the backward, as ``addcmul`` keeps its
operand) and writes the tail's sum; :func:`scaled_residual_grad` writes ``grad * f`` in y's dtype (and the
shortcut's), and sums ``grad * v`` per image and channel and y's gradient per channel the same way,
reading grad and the branch once. :func:`batch_norm_stats` sums each channel's values and squares the same
way (shifted by the channel's first value), or takes those of the tail that wrote the map, summed as it
wrote it (``stats``: one read of the stream fewer per norm), and :func:`batch_norm_apply` writes the
normalised map in the stream's float32 and, in the same pass, in the bf16 the next conv reads, where
autocast casts it in a pass of its own (and in the backward casts the copy's gradient and adds it to the
other's in two more);
:func:`batch_norm_grad` reads both gradients as they are. The cross-modal modulation's element-wise work is
four passes: :func:`modulation_inputs` (per modality its half of the concat its coefficient MLPs read, and
its channels' sums, maxima and the maxima's counts), :func:`modulation` (both outputs),
:func:`modulation_grad` (both inputs' gradients and the gate's sums) and :func:`pooled_input_grad` (per
modality the gradients of its uses, summed). Partials are summed once, so no result depends
on the order in which programs run (no atomics). ``SMMCL_TRITON_CHANNEL``: ``triton``, ``torch`` (ATen's
operators) or ``auto``, the default: the faster per op and shape, timed once on the GPU.

Importing this module needs Triton (see :mod:`smmcl.kernels.triton_common`).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_common import KEY, PRUNE, bench, check_device, choose, chunk_sums, configs, conv_bias, fastest, gelu
from .triton_common import gelu_grad, launch
from .triton_compile import autotune
from .reference import modulation_grad_reference, modulation_inputs_reference, modulation_reference
from .reference import pooled_input_grad_reference
from .triton_dwconv import _layout, _num_chunks, _same_layout

# (BLOCK_C, BLOCK_P, warps): in NCHW a channel's pixels are contiguous, so few channels of long pixel runs;
# in channels_last (BLOCK_C >= 16) the channels are, so 128-byte channel rows (bf16) of a few pixels.
_NCHW_TILES = [(1, 1024, 4), (2, 512, 4), (4, 256, 4), (1, 2048, 8)]
_NHWC_TILES = [(64, 16, 4), (128, 8, 4), (32, 32, 4), (64, 32, 8)]
CHANNEL_TILE_CONFIGS = configs(_NCHW_TILES, _NHWC_TILES, (32, 16, 4), names=('BLOCK_C', 'BLOCK_P'))


@triton.jit
def _tile(C, H, W, sn, sc, sw, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (image x pixel block, cb) of an element-wise pass: its channels and their mask, and its
    BLOCK_C x BLOCK_P elements' offsets and mask (:func:`_block`)."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    _, offs, mask = _block(tl.program_id(0), c, cmask, H, W, sn, sc, sw, BLOCK_P)
    return c, cmask, offs, mask


@triton.jit
def _block(t, c, cmask, H, W, sn, sc, sw, BLOCK_P: tl.constexpr):
    """Pixel block t of all images' (image-major, BLOCK_P pixels each) on channels c: its image, and its
    elements' offsets and mask. The maps' rows follow each other at ``W * sw`` (NCHW or channels_last),
    so that pixel p of an image sits at ``p * sw``."""
    blocks = tl.cdiv(H * W, BLOCK_P)
    p = (t % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    return t // blocks, (t // blocks) * sn + c[:, None] * sc + p[None, :] * sw, cmask[:, None] & (p < H * W)[None, :]


@autotune(configs=CHANNEL_TILE_CONFIGS, key=KEY + ['N', 'EPILOGUE'], prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def bias_add_kernel(y_ptr, b_ptr, u_ptr, out_ptr, N, C, H, W, sn, sc, sw, EPILOGUE: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (image x pixel block, cb) writes ``v = y + bias`` on its tile (the bias rounded to y's dtype,
    the sum in float32), stored in out's dtype: v itself (EPILOGUE 0), ``GELU(v)`` (1, the exact GELU) or
    ``v * u`` (2, u a map shaped as y); for 1 and 2, v rounded to y's dtype first, as the conv's biased
    output is before the next op reads it. Rows at ``W * sw``, as :func:`bias_grad_kernel`."""
    c, cmask, offs, mask = _tile(C, H, W, sn, sc, sw, BLOCK_C, BLOCK_P)
    bias = conv_bias(b_ptr, c, cmask, y_ptr)
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias[:, None]
    if EPILOGUE == 1:
        v = gelu(v.to(y_ptr.dtype.element_ty).to(tl.float32))
    elif EPILOGUE == 2:
        v = v.to(y_ptr.dtype.element_ty).to(tl.float32) * tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _branch(y_ptr, bias, s_ptr, offs, mask, HAS_BIAS: tl.constexpr, HAS_SHORTCUT: tl.constexpr):
    """A residual branch's value at ``offs`` as float32, as the ops that make it store it: y (a conv's output)
    plus, with HAS_BIAS, the conv's ``bias`` (BLOCK_C, :func:`conv_bias`; the sum rounded to y's dtype, as
    :func:`bias_add_kernel` stores it), plus, with HAS_SHORTCUT, the branch's own shortcut s (the sum rounded
    to s's dtype, which the callers make the promoted one: the attention's ``proj_2(...) + x``)."""
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v = (v + bias[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32)
    if HAS_SHORTCUT:
        v = (v + tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(s_ptr.dtype.element_ty)
        v = v.to(tl.float32)
    return v


@autotune(configs=CHANNEL_TILE_CONFIGS, key=KEY + ['N', 'HAS_FACTOR', 'HAS_BIAS'], prune_configs_by=PRUNE,
          do_bench=bench)
@triton.jit
def residual_pair_kernel(a_ptr, b_ptr, f_ptr, bias_ptr, out_ptr, low_ptr, N, C, H, W, sn, sc, sw,
                         HAS_FACTOR: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (image x pixel block, cb) writes ``out = a + b * f`` (f float32 per channel; ``a + b``
    without HAS_FACTOR) in float32 arithmetic, stored in out's dtype, and the stored value again rounded
    to low's dtype: a residual stream and the copy its next conv reads, in one pass. With HAS_BIAS, a is a
    conv's output without its bias: ``a + bias`` first, as :func:`bias_add_kernel` stores it (the bias
    rounded to a's dtype, the sum too). a, b, out and low share their strides (rows at ``W * sw``, as
    :func:`bias_grad_kernel`)."""
    c, cmask, offs, mask = _tile(C, H, W, sn, sc, sw, BLOCK_C, BLOCK_P)
    bias = conv_bias(bias_ptr, c, cmask, a_ptr) if HAS_BIAS else None
    a = _branch(a_ptr, bias, a_ptr, offs, mask, HAS_BIAS, False)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_FACTOR:
        v = a + b * tl.load(f_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    else:
        v = a + b
    v = v.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, v, mask=mask)
    tl.store(low_ptr + offs, v.to(low_ptr.dtype.element_ty), mask=mask)


@autotune(configs=CHANNEL_TILE_CONFIGS, key=KEY + ['N', 'EPILOGUE'], prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def bias_grad_kernel(g_ptr, y_ptr, b_ptr, u_ptr, gy_ptr, gu_ptr, out_ptr, N, C, H, W, sn, sc, sw, num_chunks,
                     EPILOGUE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The backward of :func:`bias_add_kernel` for the gradient ``g`` of its output. Program (cb, chunk)
    walks the pixel blocks chunk, chunk + num_chunks, ... of all images and writes ``out[chunk, c]``
    (num_chunks x C, float32): the sum of the biased map's gradient over them, which is g itself
    (EPILOGUE 0: nothing else is read or written), or, recomputing ``v`` from y and the bias as the
    forward rounds it, ``g * GELU'(v)`` (1) or ``g * u`` (2, also writing u's gradient ``g * v`` to gu),
    written to gy in its dtype and summed as rounded. The maps share their strides; their rows must
    follow each other at ``W * sw`` (NCHW or channels_last), so that pixel p of an image sits at ``p * sw``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    chunk = tl.program_id(1)
    blocks = tl.cdiv(H * W, BLOCK_P)
    bias = conv_bias(b_ptr, c, cmask, y_ptr)
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for t in range(chunk, N * blocks, num_chunks):
        _, offs, mask = _block(t, c, cmask, H, W, sn, sc, sw, BLOCK_P)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if EPILOGUE != 0:
            v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias[:, None]
            v = v.to(y_ptr.dtype.element_ty).to(tl.float32)
            if EPILOGUE == 1:
                g = g * gelu_grad(v)
            else:
                tl.store(gu_ptr + offs, (g * v).to(gu_ptr.dtype.element_ty), mask=mask)
                g = g * tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = g.to(gy_ptr.dtype.element_ty)
            tl.store(gy_ptr + offs, g, mask=mask)
            g = g.to(tl.float32)
        acc += g
    tl.store(out_ptr + chunk * C + c, tl.sum(acc, axis=1), mask=cmask)


@autotune(configs=CHANNEL_TILE_CONFIGS, key=KEY + ['N', 'HAS_KEEP', 'HAS_BIAS', 'HAS_SHORTCUT', 'STATS'],
          prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def scaled_residual_kernel(x_ptr, y_ptr, f_ptr, keep_ptr, bias_ptr, s_ptr, out_ptr, v_ptr, sums_ptr, N, C, H, W, sn,
                           sc, sw, keep_scale, HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr,
                           HAS_SHORTCUT: tl.constexpr, STATS: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_P: tl.constexpr):
    """Program (k, cb) walks the pixel blocks k, k + K, ... of all images (K the programs along axis 0: one
    block each when the grid has one program a block) and writes ``out = x + v * f`` in float32
    arithmetic, stored in out's dtype: v the branch (:func:`_branch`: y, with the bias, with the shortcut
    s), f the float32 C scale, with HAS_KEEP times image n's drop path factor (:func:`_factor`). With
    HAS_SHORTCUT it also writes v (in s's dtype, as :func:`_branch` rounds it) for the backward, which
    cannot recompute it without s. With STATS it writes the forward partials of :func:`norm_sums_kernel`
    for out as stored, at rows k and K + k of sums_ptr, shifted by ``x[0, c, 0, 0]`` (known to every
    program before the pass, and near out's values, as the residual adds a small scaled branch), and that
    shift at row 2K: the statistics of the BatchNorm that reads out next, without reading it back
    (:func:`norm_finalize_kernel` on them). x, y, s, out and v share their strides (rows at ``W * sw``, as
    :func:`bias_grad_kernel`)."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    bias = conv_bias(bias_ptr, c, cmask, y_ptr) if HAS_BIAS else None
    if STATS:
        centre = tl.load(x_ptr + c * sc, mask=cmask, other=0.0).to(tl.float32)
        first = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        second = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        for t in range(tl.program_id(0), N * tl.cdiv(H * W, BLOCK_P), tl.num_programs(0)):
            out, mask = _tail_tile(t, c, cmask, bias, x_ptr, y_ptr, f_ptr, keep_ptr, s_ptr, out_ptr, v_ptr, C, H, W,
                                   sn, sc, sw, keep_scale, HAS_KEEP, HAS_BIAS, HAS_SHORTCUT, BLOCK_P)
            d = tl.where(mask, out - centre[:, None], 0.0)
            first += d
            second += d * d
        k = tl.program_id(0)
        tl.store(sums_ptr + k * C + c, tl.sum(first, axis=1), mask=cmask)
        tl.store(sums_ptr + (tl.num_programs(0) + k) * C + c, tl.sum(second, axis=1), mask=cmask)
        if k == 0:
            tl.store(sums_ptr + 2 * tl.num_programs(0) * C + c, centre, mask=cmask)
    else:
        _tail_tile(tl.program_id(0), c, cmask, bias, x_ptr, y_ptr, f_ptr, keep_ptr, s_ptr, out_ptr, v_ptr, C, H, W,
                   sn, sc, sw, keep_scale, HAS_KEEP, HAS_BIAS, HAS_SHORTCUT, BLOCK_P)


@triton.jit
def _kept(keep_ptr, n, keep_scale):
    """Image n's drop path factor ``keep[n] * keep_scale``, float32 (keep_scale: :func:`_reciprocal`)."""
    return tl.load(keep_ptr + n).to(tl.float32) * keep_scale


@triton.jit
def _factor(f_ptr, keep_ptr, n, c, cmask, keep_scale, HAS_KEEP: tl.constexpr):
    """The residual factor of image n's channels c, float32: the scale, with HAS_KEEP times :func:`_kept`, in
    the order :class:`~smmcl.models.mscan.ScaleByImage` multiplies them: the same values."""
    f = tl.load(f_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_KEEP:
        f = f * _kept(keep_ptr, n, keep_scale)
    return f


@triton.jit
def _tail_tile(t, c, cmask, bias, x_ptr, y_ptr, f_ptr, keep_ptr, s_ptr, out_ptr, v_ptr, C, H, W, sn, sc, sw,
               keep_scale, HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
               BLOCK_P: tl.constexpr):
    """:func:`scaled_residual_kernel`'s work on pixel block t of all images' (image-major): it stores out (and
    v), and returns out as stored, in float32, with the tile's mask."""
    n, offs, mask = _block(t, c, cmask, H, W, sn, sc, sw, BLOCK_P)
    f = _factor(f_ptr, keep_ptr, n, c, cmask, keep_scale, HAS_KEEP)
    v = _branch(y_ptr, bias, s_ptr, offs, mask, HAS_BIAS, HAS_SHORTCUT)
    if HAS_SHORTCUT:
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    out = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + v * f[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, out, mask=mask)
    return out.to(tl.float32), mask


@autotune(configs=CHANNEL_TILE_CONFIGS, key=KEY + ['N', 'HAS_KEEP', 'HAS_BIAS', 'HAS_SHORTCUT'],
          prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def scaled_residual_grad_kernel(g_ptr, v_ptr, f_ptr, keep_ptr, bias_ptr, gy_ptr, gs_ptr, out_ptr, bias_out_ptr,
                                N, C, H, W, sn, sc, sw, chunks, keep_scale, HAS_KEEP: tl.constexpr,
                                HAS_BIAS: tl.constexpr, HAS_SHORTCUT: tl.constexpr, BLOCK_C: tl.constexpr,
                                BLOCK_P: tl.constexpr):
    """The backward of :func:`scaled_residual_kernel` for grad ``g``. Program (cb, n * chunks + k) walks image
    n's pixel blocks k, k + chunks, ...: it writes ``gy = g * f`` (f as the forward's :func:`_factor`; in
    gy's dtype: y's gradient, and the bias add's), with HAS_SHORTCUT the same in gs's dtype (the
    shortcut's gradient), and at row ``n * chunks + k`` of out the float32 sums of ``g * v`` over its
    pixels, with HAS_KEEP times image n's drop path factor (the scale's gradient, summed over all rows
    then), with HAS_BIAS at that of bias_out the sums of gy as rounded. v: with HAS_SHORTCUT the branch the
    forward wrote, else y, the bias added again with HAS_BIAS. g, v, gy and gs share their strides, rows at
    ``W * sw`` (as :func:`bias_grad_kernel`)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n = tl.program_id(1) // chunks
    f = _factor(f_ptr, keep_ptr, n, c, cmask, keep_scale, HAS_KEEP)
    # the branch's bias is read by the backward's recomputation only without a shortcut (then the saved
    # branch has it already); the rounding to y's dtype is gy's (y's gradient has y's dtype)
    bias = conv_bias(bias_ptr, c, cmask, gy_ptr) if HAS_BIAS and not HAS_SHORTCUT else None
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    blocks = tl.cdiv(H * W, BLOCK_P)
    for b in range(tl.program_id(1) % chunks, blocks, chunks):
        _, offs, mask = _block(n * blocks + b, c, cmask, H, W, sn, sc, sw, BLOCK_P)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gv = g * f[:, None]
        gy = gv.to(gy_ptr.dtype.element_ty)
        tl.store(gy_ptr + offs, gy, mask=mask)
        if HAS_SHORTCUT:
            tl.store(gs_ptr + offs, gv.to(gs_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            bias_acc += gy.to(tl.float32)
        acc += g * _branch(v_ptr, bias, v_ptr, offs, mask, HAS_BIAS and not HAS_SHORTCUT, False)
    sums = tl.sum(acc, axis=1)
    if HAS_KEEP:
        sums = sums * _kept(keep_ptr, n, keep_scale)
    tl.store(out_ptr + tl.program_id(1) * C + c, sums, mask=cmask)
    if HAS_BIAS:
        tl.store(bias_out_ptr + tl.program_id(1) * C + c, tl.sum(bias_acc, axis=1), mask=cmask)


def _chunks(grad: torch.Tensor) -> int:
    """Programs along the pixels: as :func:`~smmcl.kernels.triton_dwconv._num_chunks`, for the layout's
    channel blocks (NCHW tiles hold 1-4 channels, channels_last ones 32-128), each at least one tile."""
    if _layout(grad) == torch.channels_last:
        return _num_chunks(grad, channels=32, pixels=64)
    return _num_chunks(grad, channels=2, pixels=1024)


EPILOGUES = ('none', 'gelu', 'gate')  # EPILOGUE of bias_add_kernel and bias_grad_kernel: v, GELU(v), v * u


def _add_triton(y: torch.Tensor, bias: torch.Tensor, gate: Optional[torch.Tensor] = None,
                epilogue: str = 'none') -> torch.Tensor:
    n, c, h, w = y.shape
    out = torch.empty_like(y, dtype=_gated_dtype(y, gate))
    if out.numel():
        bias_add_kernel[lambda m: (n * triton.cdiv(h * w, m['BLOCK_P']), triton.cdiv(c, m['BLOCK_C']))](
            y, bias, y if gate is None else gate, out, n, c, h, w, y.stride(0), y.stride(1), y.stride(3),
            EPILOGUE=EPILOGUES.index(epilogue))
    return out


def _add_torch(y: torch.Tensor, bias: torch.Tensor, gate: Optional[torch.Tensor] = None,
               epilogue: str = 'none') -> torch.Tensor:
    """ATen's: the broadcast add that follows a cuDNN convolution, on the bias in y's dtype; then the
    exact GELU or the product with the gate, each a pass of its own."""
    v = torch.add(y, bias.to(y.dtype).reshape(1, -1, 1, 1), out=torch.empty_like(y))
    if epilogue == 'gelu':
        return F.gelu(v)
    return v * gate if epilogue == 'gate' else v


def _grad_triton(grad: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, gate: Optional[torch.Tensor] = None,
                 epilogue: str = 'none'):
    n, c, h, w = grad.shape
    gy = None if epilogue == 'none' else torch.empty_like(y)
    gu = torch.empty_like(gate) if epilogue == 'gate' else None
    grad_bias = torch.empty(c, device=grad.device, dtype=bias.dtype)
    if grad.numel() == 0:
        return gy, gu, grad_bias.zero_()
    chunks = _chunks(grad)
    # every (chunk, channel) partial is written by its program: no zero-fill launch
    partials = torch.empty(chunks, c, device=grad.device, dtype=torch.float32)
    bias_grad_kernel[lambda m: (triton.cdiv(c, m['BLOCK_C']), chunks)](
        grad, y, bias, grad if gate is None else gate, grad if gy is None else gy, grad if gu is None else gu,
        partials, n, c, h, w, grad.stride(0), grad.stride(1), grad.stride(3), chunks,
        EPILOGUE=EPILOGUES.index(epilogue))
    chunk_sums(partials[None], grad_bias[None], round_a=y.dtype)
    return gy, gu, grad_bias


def _grad_torch(grad: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, gate: Optional[torch.Tensor] = None,
                epilogue: str = 'none'):
    """ATen's: the epilogue's backward (``gelu_backward`` on the biased map, recomputed; or the product's
    two), then what ``convolution_backward`` computes for a cuDNN conv's bias (float32 sums, in the
    gradient's dtype), then autocast's cast back to the bias's."""
    if epilogue == 'none':
        return None, None, grad.sum((0, 2, 3)).to(bias.dtype)
    v = _add_torch(y, bias)
    if epilogue == 'gelu':
        gy, gu = torch.ops.aten.gelu_backward(grad, v), None
    else:
        gy, gu = (grad * gate).to(y.dtype), (grad * v).to(gate.dtype)
    return gy, gu, gy.sum((0, 2, 3)).to(bias.dtype)


def _gated_dtype(y: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype of ``(y + bias) * gate`` (y's without a gate), as PyTorch promotes it."""
    return y.dtype if gate is None else torch.promote_types(y.dtype, gate.dtype)


def check_residual(y: torch.Tensor, factor: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   shortcut: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None,
                   keep_prob: float = 1.0) -> None:
    """A residual factor must be per channel (C-1-1 or 1-C-1-1); drop path's keep mask N or N-1-1-1 (or
    None) with a keep probability in (0, 1] (1 without a mask: nothing divides); a bias C; a shortcut
    shaped as the branch y, in a dtype at least as wide as y's (the sum's)."""
    n, c = y.shape[:2]
    if tuple(factor.shape) not in ((c, 1, 1), (1, c, 1, 1)):
        raise ValueError(f'smmcl.kernels: a residual factor must be C-1-1 for an N-C-H-W map of shape '
                         f'{tuple(y.shape)} (drop path\'s per image comes as its keep mask), got {tuple(factor.shape)}')
    if keep is not None and tuple(keep.shape) not in ((n,), (n, 1, 1, 1)):
        raise ValueError(f'smmcl.kernels: drop path\'s keep mask must be N or N-1-1-1 for an N-C-H-W map of shape '
                         f'{tuple(y.shape)}, got {tuple(keep.shape)}')
    if not 0.0 < keep_prob <= 1.0 or (keep is None and keep_prob != 1.0):
        raise ValueError(f'smmcl.kernels: drop path\'s keep probability must be in (0, 1], and 1 without a keep '
                         f'mask, got {keep_prob}{"" if keep is not None else " without a mask"}')
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f'smmcl.kernels: a residual branch takes a bias of {c} channels, got {tuple(bias.shape)}')
    if shortcut is not None and (shortcut.shape != y.shape
                                 or torch.promote_types(y.dtype, shortcut.dtype) != shortcut.dtype):
        raise ValueError(f'smmcl.kernels: a residual branch\'s shortcut is shaped as the branch {tuple(y.shape)} '
                         f'in a dtype at least as wide as its {y.dtype}, got {tuple(shortcut.shape)} {shortcut.dtype}')


@functools.lru_cache(maxsize=None)  # one value a block: no host work per call after the first
def _reciprocal(keep_prob: float) -> float:
    """The float32 quotient ``1 / keep_prob``: a 0/1 drop path mask times it is ATen's ``mask / keep_prob`` to
    the bit (the quotient of 1 by the float32 divisor, rounded once; on a GPU ATen multiplies by this
    reciprocal itself), where the kernels would pay a precise division's dozens of instructions."""
    return float(np.float32(1.0) / np.float32(keep_prob))  # on the host: no tensor, no launch


def _kernel_factor(factor: torch.Tensor, keep: Optional[torch.Tensor], keep_prob: float):
    """The float32 C scale, N keep mask (the scale in the mask's place without one: never read) and the
    mask's float32 scale the tail kernels read."""
    scale = factor.reshape(-1).float().contiguous()
    return scale, scale if keep is None else keep.reshape(-1).contiguous(), _reciprocal(keep_prob)


def _per_image_factor(factor: torch.Tensor, keep: Optional[torch.Tensor], keep_prob: float) -> torch.Tensor:
    """The factor each image's branch is scaled by: C-1-1 as given without a keep mask, else N-C-1-1 ``factor *
    (keep / keep_prob)``, as :class:`~smmcl.models.mscan.ScaleByImage` multiplies them."""
    if keep is None:
        return factor
    return factor.reshape(1, -1, 1, 1) * (keep.reshape(-1, 1, 1, 1) / keep_prob)


def _tail_triton(x: torch.Tensor, y: torch.Tensor, factor: torch.Tensor, keep: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, shortcut: Optional[torch.Tensor] = None, stats: bool = False,
                 keep_prob: float = 1.0):
    n, c, h, w = y.shape
    out = torch.empty_like(x, dtype=sum_dtype(x, y, factor, keep, shortcut))
    v = None if shortcut is None else torch.empty_like(shortcut)
    stats = stats and out.numel() > 0
    chunks = _chunks(out) if stats else 0
    # every partial and the shift row written by their programs: no fill
    sums = torch.empty(2 * chunks + 1, c, device=x.device, dtype=torch.float32) if stats else None
    if out.numel():
        scale, kept, keep_scale = _kernel_factor(factor, keep, keep_prob)
        scaled_residual_kernel[lambda m: (chunks or n * triton.cdiv(h * w, m['BLOCK_P']),
                                          triton.cdiv(c, m['BLOCK_C']))](
            x, y, scale, kept, scale if bias is None else bias, y if shortcut is None else shortcut, out,
            out if v is None else v, scale if sums is None else sums, n, c, h, w, y.stride(0), y.stride(1),
            y.stride(3), keep_scale, HAS_KEEP=keep is not None, HAS_BIAS=bias is not None,
            HAS_SHORTCUT=shortcut is not None, STATS=stats)
    return out, v, sums


def _tail_torch(x: torch.Tensor, y: torch.Tensor, factor: torch.Tensor, keep: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, shortcut: Optional[torch.Tensor] = None, stats: bool = False,
                keep_prob: float = 1.0):
    """ATen's: drop path's factor per image (:func:`_per_image_factor`), the bias add after the conv
    (:func:`_add_torch`), the shortcut's add (promoting), then ``addcmul`` (the ``out=`` form, which reads
    a bf16 branch as autocast's float32 copy of it would be: the same values). No statistics' partials
    (``stats`` asks, None answers): the next norm sums its own."""
    factor = _per_image_factor(factor, keep, keep_prob)
    v = y if bias is None else _add_torch(y, bias)
    v = v if shortcut is None else v + shortcut
    out = torch.addcmul(x, v, factor, out=torch.empty_like(x, dtype=sum_dtype(x, y, factor, shortcut)))
    return out, None if shortcut is None else v, None


def _residual_triton(grad: torch.Tensor, branch: torch.Tensor, factor: torch.Tensor,
                     keep: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                     y_dtype: Optional[torch.dtype] = None, keep_prob: float = 1.0):
    n, c, h, w = branch.shape
    gy = torch.empty_like(branch, dtype=y_dtype or branch.dtype)
    gs = None if y_dtype is None else torch.empty_like(branch)
    grad_factor = torch.empty(1, c, device=branch.device, dtype=factor.dtype)
    grad_bias = None if bias is None else torch.empty(1, c, device=branch.device, dtype=bias.dtype)
    if branch.numel() == 0:
        return gy, grad_factor.zero_().reshape(factor.shape), None if bias is None else grad_bias.zero_()[0], gs
    per_image = max(1, triton.cdiv(_chunks(branch), n))
    # every (chunk, channel) partial is written by its program: no zero-fill launch
    partials = torch.empty(1 + (bias is not None), 1, n * per_image, c, device=branch.device, dtype=torch.float32)
    scale, kept, keep_scale = _kernel_factor(factor, keep, keep_prob)
    scaled_residual_grad_kernel[lambda m: (triton.cdiv(c, m['BLOCK_C']), n * per_image)](
        grad, branch, scale, kept, scale if bias is None else bias, gy, gy if gs is None else gs, partials[0],
        partials[-1], n, c, h, w, branch.stride(0), branch.stride(1), branch.stride(3), per_image, keep_scale,
        HAS_KEEP=keep is not None, HAS_BIAS=bias is not None, HAS_SHORTCUT=gs is not None)
    # each image's partials already weighted by its drop path factor: the factor's and the bias's gradients
    # sum all chunks, in one launch; the bias's rounded to y's dtype, as a conv's bias gradient is
    chunk_sums(partials[0], grad_factor, None, *((partials[1], grad_bias, gy.dtype) if bias is not None else ()))
    return gy, grad_factor.reshape(factor.shape), None if bias is None else grad_bias[0], gs


def _residual_torch(grad: torch.Tensor, branch: torch.Tensor, factor: torch.Tensor,
                    keep: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    y_dtype: Optional[torch.dtype] = None, keep_prob: float = 1.0):
    """ATen's: addcmul's backward on autocast's float32 copy of the branch (the factor per image with drop
    path's keep mask, its gradient summed over the images times their factors, as autograd does through
    their product), then the copy's backward (a cast) or the shortcut add's (a cast for y, the gradient
    itself for the shortcut), and the bias sum."""
    full = _per_image_factor(factor, keep, keep_prob)
    v = branch if bias is None or y_dtype is not None else _add_torch(branch, bias)
    grad_factor = (grad * v.to(grad.dtype)).sum_to_size(full.shape)
    if keep is not None:
        grad_factor = (grad_factor * (keep.reshape(-1, 1, 1, 1) / keep_prob)).sum(0)
    grad_v = grad * full
    gy = grad_v.to(y_dtype or branch.dtype)
    grad_bias = None if bias is None else gy.sum((0, 2, 3), dtype=torch.float32).to(gy.dtype).to(bias.dtype)
    return (gy, grad_factor.reshape(factor.shape).to(factor.dtype), grad_bias,
            None if y_dtype is None else grad_v.to(branch.dtype))


def _pair_triton(a: torch.Tensor, b: torch.Tensor, factor: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None):
    n, c, h, w = b.shape
    out = torch.empty_like(b, dtype=sum_dtype(a, b, factor))
    low = torch.empty_like(b, dtype=a.dtype)
    if b.numel():
        f = factor.reshape(c).float().contiguous() if factor is not None else out
        residual_pair_kernel[lambda m: (n * triton.cdiv(h * w, m['BLOCK_P']), triton.cdiv(c, m['BLOCK_C']))](
            a, b, f, out if bias is None else bias, out, low, n, c, h, w, b.stride(0), b.stride(1), b.stride(3),
            HAS_FACTOR=factor is not None, HAS_BIAS=bias is not None)
    return out, low


def _pair_torch(a: torch.Tensor, b: torch.Tensor, factor: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None):
    """ATen's: the bias add after a cuDNN conv (one pass, :func:`_add_torch`), the promoted sum (one
    pass), then autocast's cast for the next conv (another)."""
    if bias is not None:
        a = _add_torch(a, bias)
    out = torch.addcmul(a.to(sum_dtype(a, b, factor)), b, factor) if factor is not None else a + b
    return out, out.to(a.dtype)


def sum_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype of a sum or product of ``tensors`` (None ones left out: ``a + b * factor`` without a factor,
    a tail without a shortcut), as PyTorch promotes it."""
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors if t is not None])


# ---- a block's BatchNorm in training: its statistics, the normalised map in two dtypes, the backward ---

@autotune(configs=CHANNEL_TILE_CONFIGS, key=KEY + ['N', 'BACKWARD', 'HAS_G', 'HAS_H'],
          prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def norm_sums_kernel(x_ptr, g_ptr, h_ptr, mean_ptr, out_ptr, N, C, H, W, sn, sc, sw, num_chunks,
                     BACKWARD: tl.constexpr, HAS_G: tl.constexpr, HAS_H: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (cb, chunk) walks the pixel blocks chunk, chunk + num_chunks, ... of all images (as
    :func:`bias_grad_kernel`) and writes two float32 partial sums per channel, at ``out[0, chunk, c]`` and
    ``out[1, chunk, c]``. Forward: the sums of ``d`` and ``d * d`` for ``d = x - x[0, c, 0, 0]`` (shifted
    by the channel's first value, so that the variance taken from them does not cancel where the mean
    is large against the spread). BACKWARD: of ``dy`` and ``dy * (x - mean)``, dy the sum of g and h (the
    gradients of the two outputs; either may be absent), mean float32 C. The maps share their strides."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    chunk = tl.program_id(1)
    blocks = tl.cdiv(H * W, BLOCK_P)
    if BACKWARD:
        centre = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    else:
        centre = tl.load(x_ptr + c * sc, mask=cmask, other=0.0).to(tl.float32)
    first = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    second = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for t in range(chunk, N * blocks, num_chunks):
        _, offs, mask = _block(t, c, cmask, H, W, sn, sc, sw, BLOCK_P)
        d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - centre[:, None], 0.0)
        if BACKWARD:
            dy = _norm_grad(g_ptr, h_ptr, offs, mask, HAS_G, HAS_H)
            first += dy
            second += dy * d
        else:
            first += d
            second += d * d
    tl.store(out_ptr + chunk * C + c, tl.sum(first, axis=1), mask=cmask)
    tl.store(out_ptr + (num_chunks + chunk) * C + c, tl.sum(second, axis=1), mask=cmask)


@triton.jit
def _norm_grad(g_ptr, h_ptr, offs, mask, HAS_G: tl.constexpr, HAS_H: tl.constexpr):
    """The normalised map's gradient as float32: the sum of its two outputs' (either may be absent)."""
    dy = tl.zeros(offs.shape, dtype=tl.float32)
    if HAS_G:
        dy += tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_H:
        dy += tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return dy


@triton.jit
def norm_finalize_kernel(sums_ptr, x_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, nbt_ptr, mean_ptr, invstd_ptr, coef_ptr, gw_ptr,
                         gb_ptr, C, sc, num_chunks, count, momentum, eps, BACKWARD: tl.constexpr, COUNT: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Program cb adds up :func:`norm_sums_kernel`'s partials of BLOCK channels and writes, as float32 rows
    of C, the coefficients ``coef`` (mean, p, q, r) of :func:`norm_apply_kernel`'s ``p * dy + q * (x -
    mean) + r``. Forward (x's sums): the batch mean and the biased variance, p the invstd (which the
    forward's apply does not read), ``q = weight * invstd``, ``r = bias``, and the running statistics
    updated in place as ``nn.BatchNorm2d`` does (the unbiased variance, ``momentum``), with COUNT its
    ``num_batches_tracked`` (int64 at nbt_ptr) too, by the program of channel 0. BACKWARD (the
    forward's mean and invstd at mean_ptr and invstd_ptr): grad weight and grad bias at gw_ptr and gb_ptr, ``p = weight
    * invstd``, ``q = -p * invstd * grad weight / count``, ``r = -p * grad bias / count``: the batch-norm
    gradient ``p * (dy - mean(dy) - x̂ * mean(dy * x̂))``, x̂ the normalised input."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = c < C
    first = tl.zeros((BLOCK,), dtype=tl.float32)
    second = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(num_chunks):
        first += tl.load(sums_ptr + k * C + c, mask=cmask, other=0.0)
        second += tl.load(sums_ptr + (num_chunks + k) * C + c, mask=cmask, other=0.0)
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if BACKWARD:
        mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
        invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)
        grad_w = second * invstd
        p = w * invstd
        tl.store(coef_ptr + c, mean, mask=cmask)
        tl.store(gw_ptr + c, grad_w, mask=cmask)
        tl.store(gb_ptr + c, first, mask=cmask)
        tl.store(coef_ptr + C + c, p, mask=cmask)
        tl.store(coef_ptr + 2 * C + c, -p * invstd * grad_w / count, mask=cmask)
        tl.store(coef_ptr + 3 * C + c, -p * first / count, mask=cmask)
    else:
        shifted = first / count
        var = tl.maximum(second / count - shifted * shifted, 0.0)
        mean = tl.load(x_ptr + c * sc, mask=cmask, other=0.0).to(tl.float32) + shifted
        invstd = 1.0 / tl.sqrt(var + eps)
        tl.store(coef_ptr + c, mean, mask=cmask)
        tl.store(coef_ptr + C + c, invstd, mask=cmask)
        tl.store(coef_ptr + 2 * C + c, w * invstd, mask=cmask)
        tl.store(coef_ptr + 3 * C + c, tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32), mask=cmask)
        rm = tl.load(rm_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        rv = tl.load(rv_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        tl.store(rm_ptr + c, ((1.0 - momentum) * rm + momentum * mean).to(rm_ptr.dtype.element_ty), mask=cmask)
        unbiased = var * (count / (count - 1.0))
        tl.store(rv_ptr + c, ((1.0 - momentum) * rv + momentum * unbiased).to(rv_ptr.dtype.element_ty), mask=cmask)
        if COUNT:  # one lane of one program: every lane's address is the counter's, only channel 0's acts
            batches = tl.load(nbt_ptr + c * 0, mask=c == 0, other=0)
            tl.store(nbt_ptr + c * 0, batches + 1, mask=c == 0)


@autotune(configs=CHANNEL_TILE_CONFIGS, key=KEY + ['N', 'HAS_G', 'HAS_H', 'HAS_E', 'HAS_LOW', 'HAS_FULL'],
          prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def norm_apply_kernel(x_ptr, g_ptr, h_ptr, e_ptr, coef_ptr, low_ptr, full_ptr, N, C, H, W, sn, sc, sw,
                      HAS_G: tl.constexpr, HAS_H: tl.constexpr, HAS_E: tl.constexpr, HAS_LOW: tl.constexpr,
                      HAS_FULL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (image x pixel block, cb) writes ``v = p * dy + q * (x - mean) + r (+ e)`` (coef's four
    float32 rows of C; dy the sum of g and h, as :func:`norm_sums_kernel`, or absent; e a map added as it
    is) to full in its dtype and, rounded once from the float32 value, to low: forward the normalised map
    in the stream's dtype and in the next conv's, backward x's gradient (e: the gradient x gets from
    elsewhere, which autograd would add in a pass of its own). The maps share their strides."""
    c, cmask, offs, mask = _tile(C, H, W, sn, sc, sw, BLOCK_C, BLOCK_P)
    mean = tl.load(coef_ptr + c, mask=cmask, other=0.0)
    q = tl.load(coef_ptr + 2 * C + c, mask=cmask, other=0.0)
    r = tl.load(coef_ptr + 3 * C + c, mask=cmask, other=0.0)
    v = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean[:, None]) * q[:, None] + r[:, None]
    if HAS_G or HAS_H:
        p = tl.load(coef_ptr + C + c, mask=cmask, other=0.0)
        v += _norm_grad(g_ptr, h_ptr, offs, mask, HAS_G, HAS_H) * p[:, None]
    if HAS_E:
        v += tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_FULL:
        tl.store(full_ptr + offs, v.to(full_ptr.dtype.element_ty), mask=mask)
    if HAS_LOW:
        tl.store(low_ptr + offs, v.to(low_ptr.dtype.element_ty), mask=mask)


def _norm_launch(x: torch.Tensor, g: Optional[torch.Tensor], h: Optional[torch.Tensor], coef: torch.Tensor,
                 low: Optional[torch.Tensor], full: Optional[torch.Tensor], e: Optional[torch.Tensor] = None) -> None:
    n, c, height, width = x.shape
    maps = [x if t is None else t for t in (g, h, e, low, full)]
    norm_apply_kernel[lambda m: (n * triton.cdiv(height * width, m['BLOCK_P']), triton.cdiv(c, m['BLOCK_C']))](
        x, *maps[:3], coef, *maps[3:], n, c, height, width, x.stride(0), x.stride(1), x.stride(3),
        HAS_G=g is not None, HAS_H=h is not None, HAS_E=e is not None, HAS_LOW=low is not None,
        HAS_FULL=full is not None)


def _norm_sums(x: torch.Tensor, g: Optional[torch.Tensor], h: Optional[torch.Tensor],
               mean: Optional[torch.Tensor]) -> Tuple[torch.Tensor, int]:
    n, c, height, width = x.shape
    chunks = _chunks(x)
    sums = torch.empty(2, chunks, c, device=x.device, dtype=torch.float32)  # every partial written: no fill
    norm_sums_kernel[lambda m: (triton.cdiv(c, m['BLOCK_C']), chunks)](
        x, x if g is None else g, x if h is None else h, x if mean is None else mean, sums, n, c, height, width,
        x.stride(0), x.stride(1), x.stride(3), chunks, BACKWARD=mean is not None, HAS_G=g is not None,
        HAS_H=h is not None)
    return sums, chunks


_FINALIZE_BLOCK = 128


def _stats_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                  running_var: torch.Tensor, momentum: float, eps: float,
                  num_batches_tracked: Optional[torch.Tensor] = None) -> torch.Tensor:
    sums, chunks = _norm_sums(x, None, None, None)
    return _finalize_stats(sums, x[0, :, 0, 0], chunks, x.numel() // x.shape[1], weight, bias, running_mean,
                           running_var, momentum, eps, num_batches_tracked)


def _finalize_stats(sums: torch.Tensor, shift: torch.Tensor, chunks: int, count: int, weight: torch.Tensor,
                    bias: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float,
                    eps: float, num_batches_tracked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`norm_finalize_kernel` (forward) on ``chunks`` rows of shifted sums and as many of squares, the
    channels' shifts the C values of ``shift`` (a view, any stride): the 4 x C coefficients."""
    c = weight.shape[0]
    coef = torch.empty(4, c, device=sums.device, dtype=torch.float32)
    counter = coef if num_batches_tracked is None else num_batches_tracked
    launch(norm_finalize_kernel, (triton.cdiv(c, _FINALIZE_BLOCK),),
        sums, shift, weight, bias, running_mean, running_var, counter, coef, coef, coef, coef, coef, c,
        shift.stride(0), chunks, float(count), momentum, eps, BACKWARD=False, COUNT=num_batches_tracked is not None,
        BLOCK=_FINALIZE_BLOCK)
    return coef


def _stats_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                 running_var: torch.Tensor, momentum: float, eps: float,
                 num_batches_tracked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ATen's: ``var_mean`` over the batch and pixels, the running statistics' updates as ``nn.BatchNorm2d``'s."""
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    count = x.numel() // x.shape[1]
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var * (count / (count - 1)), alpha=momentum)
    invstd = torch.rsqrt(var + eps)
    return torch.stack((mean, invstd, weight.float() * invstd, bias.float()))


def _apply_triton(x: torch.Tensor, coef: torch.Tensor, low_dtype: torch.dtype, full: bool):
    low, out = torch.empty_like(x, dtype=low_dtype), torch.empty_like(x) if full else None
    _norm_launch(x, None, None, coef, low, out)
    return low, out


def _apply_torch(x: torch.Tensor, coef: torch.Tensor, low_dtype: torch.dtype, full: bool):
    """ATen's: the normalised map in x's dtype (one pass), then autocast's cast for the next conv."""
    mean, _, scale, shift = (row[:, None, None] for row in coef)
    out = (x - mean) * scale + shift
    return out.to(low_dtype), out if full else None


def _norm_grad_triton(grad_low: Optional[torch.Tensor], grad_full: Optional[torch.Tensor], x: torch.Tensor,
                      weight: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                      grad_pass: Optional[torch.Tensor] = None):
    n, c, height, width = x.shape
    sums, chunks = _norm_sums(x, grad_full, grad_low, mean)
    coef = torch.empty(4, c, device=x.device, dtype=torch.float32)
    grad_weight, grad_bias = (torch.empty(c, device=x.device, dtype=torch.float32) for _ in range(2))
    launch(norm_finalize_kernel, (triton.cdiv(c, _FINALIZE_BLOCK),),
        sums, mean, weight, weight, mean, mean, mean, mean, invstd, coef, grad_weight, grad_bias, c, 1, chunks,
        float(n * height * width), 0.0, 0.0, BACKWARD=True, COUNT=False,
        BLOCK=_FINALIZE_BLOCK)  # x_ptr unread: mean stands in
    grad_x = torch.empty_like(x)
    _norm_launch(x, grad_full, grad_low, coef, None, grad_x, grad_pass)
    return grad_x, grad_weight, grad_bias


def _norm_grad_torch(grad_low: Optional[torch.Tensor], grad_full: Optional[torch.Tensor], x: torch.Tensor,
                     weight: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                     grad_pass: Optional[torch.Tensor] = None):
    """ATen's: the cast's backward and the sum of the two outputs' gradients, then
    ``native_batch_norm_backward`` (training mode: the batch's mean and invstd, eps unused), then
    autograd's sum with the gradient x gets from elsewhere."""
    dy = [g.to(x.dtype) for g in (grad_full, grad_low) if g is not None]
    dy = dy[0] if len(dy) == 1 else dy[0] + dy[1]
    grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        dy, x, weight, None, None, mean, invstd, True, 1e-5, [True, True, True])
    return grad_x if grad_pass is None else grad_x + grad_pass, grad_weight, grad_bias


# ---- the cross-modal modulation: its outputs, their backward, its inputs' gradient sums --------------------

@triton.jit
def _gate(s_ptr, ch_ptr, n, c, cmask, p, pmask, C, pixels):
    """The modulation's gate on a BLOCK_C x BLOCK_P tile, as float32: ``0.5 * s + 0.5 * ch`` rounded to s's
    dtype, as the two halves' sum is stored (s: the spatial coefficients, N x HW; ch: the channel ones,
    N x C)."""
    s = tl.load(s_ptr + n * pixels + p, mask=pmask, other=0.0).to(tl.float32)
    ch = tl.load(ch_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
    return (0.5 * s[None, :] + 0.5 * ch[:, None]).to(s_ptr.dtype.element_ty).to(tl.float32)


@autotune(configs=CHANNEL_TILE_CONFIGS, key=KEY + ['N', 'HAS_OUT', 'HAS_FUSE'], prune_configs_by=PRUNE,
          do_bench=bench)
@triton.jit
def modulation_kernel(r_ptr, x_ptr, s_ptr, ch_ptr, ro_ptr, xo_ptr, f_ptr, N, C, H, W, sn, sc, sw, hn, hc, hw,
                      HAS_OUT: tl.constexpr, HAS_FUSE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (image x pixel block, cb) computes ``ro = r + x * gate`` and ``xo = x + r * gate`` (float32
    arithmetic; the gate :func:`_gate`) and stores them, rounded to the outputs' dtype: with HAS_OUT as
    ro and xo (r's strides: rows at ``W * sw``, as :func:`bias_grad_kernel`), with HAS_FUSE side by side
    in f, the 2C-channel concat the fusion conv reads (strides hn, hc, hw: rows at ``W * hw``)."""
    c, cmask, offs, mask = _tile(C, H, W, sn, sc, sw, BLOCK_C, BLOCK_P)
    blocks = tl.cdiv(H * W, BLOCK_P)
    n = tl.program_id(0) // blocks
    p = (tl.program_id(0) % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    gate = _gate(s_ptr, ch_ptr, n, c, cmask, p, p < H * W, C, H * W)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ro = r + x * gate
    xo = x + r * gate
    if HAS_OUT:
        tl.store(ro_ptr + offs, ro.to(ro_ptr.dtype.element_ty), mask=mask)
        tl.store(xo_ptr + offs, xo.to(xo_ptr.dtype.element_ty), mask=mask)
    if HAS_FUSE:
        fuse = f_ptr + n * hn + c[:, None] * hc + p[None, :] * hw
        tl.store(fuse, ro.to(f_ptr.dtype.element_ty), mask=mask)
        tl.store(fuse + C * hc, xo.to(f_ptr.dtype.element_ty), mask=mask)


@autotune(configs=CHANNEL_TILE_CONFIGS, key=KEY + ['N', 'HAS_A', 'HAS_B', 'HAS_F'], prune_configs_by=PRUNE,
          do_bench=bench)
@triton.jit
def modulation_grad_kernel(ga_ptr, gb_ptr, gf_ptr, r_ptr, x_ptr, s_ptr, ch_ptr, gr_ptr, gx_ptr, gs_ptr, gc_ptr,
                           N, C, H, W, sn, sc, sw, hn, hc, hw, HAS_A: tl.constexpr, HAS_B: tl.constexpr,
                           HAS_F: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The backward of :func:`modulation_kernel` for its outputs' gradients: ga (ro's, with HAS_A), gb (xo's,
    with HAS_B), gf (the concat's, with HAS_F; strides hn, hc, hw), each read as float32 and ro's and xo's
    two summed. Program (image n x pixel block b) walks all channel blocks: it writes
    ``gr = ga + gb * gate`` and ``gx = gb + ga * gate`` (in their dtype), and the gate's gradient
    ``ga * x + gb * r`` (float32) times the gate's half, 0.5 (exact), summed over the channels at each of its
    pixels into gs (N x HW, rounded to gs's dtype: the spatial coefficients' gradient) and over its pixels
    per channel into row ``n * blocks + b`` of gc (float32, N x blocks x C for the tile's ``blocks`` pixel
    blocks an image: every row written). The other maps share r's strides (rows at ``W * sw``)."""
    pixels = H * W
    blocks = tl.cdiv(pixels, BLOCK_P)
    n = tl.program_id(0) // blocks
    b = tl.program_id(0) % blocks
    p = b * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < pixels
    acc_s = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        mask = cmask[:, None] & pmask[None, :]
        offs = n * sn + c[:, None] * sc + p[None, :] * sw
        gate = _gate(s_ptr, ch_ptr, n, c, cmask, p, pmask, C, pixels)
        ga = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        gb = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        if HAS_A:
            ga += tl.load(ga_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            gb += tl.load(gb_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_F:
            fuse = gf_ptr + n * hn + c[:, None] * hc + p[None, :] * hw
            ga += tl.load(fuse, mask=mask, other=0.0).to(tl.float32)
            gb += tl.load(fuse + C * hc, mask=mask, other=0.0).to(tl.float32)
        tl.store(gr_ptr + offs, (ga + gb * gate).to(gr_ptr.dtype.element_ty), mask=mask)
        tl.store(gx_ptr + offs, (gb + ga * gate).to(gx_ptr.dtype.element_ty), mask=mask)
        grad_gate = (ga * tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                     + gb * tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        acc_s += tl.sum(grad_gate, axis=0)
        tl.store(gc_ptr + (n * blocks + b) * C + c, 0.5 * tl.sum(grad_gate, axis=1), mask=cmask)
    tl.store(gs_ptr + n * pixels + p, (0.5 * acc_s).to(gs_ptr.dtype.element_ty), mask=pmask)


@autotune(configs=CHANNEL_TILE_CONFIGS, key=KEY + ['N', 'HAS_PASS', 'HAS_HALF', 'HAS_POOLED'],
          prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def pooled_grad_kernel(gp_ptr, gh_ptr, v_ptr, gm_ptr, mx_ptr, share_ptr, out_ptr, N, C, H, W, sn, sc, sw,
                       hn, hc, hw, HAS_PASS: tl.constexpr, HAS_HALF: tl.constexpr, HAS_POOLED: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (image x pixel block, cb) writes the sum of a map's gradients (float32 arithmetic, in
    out's dtype): gp (HAS_PASS), gh (HAS_HALF: a concat's gradient from its channel offset on, strides
    hn, hc, hw), and with HAS_POOLED its channels' means' (gm, N x C, already divided by the pixels) and
    maxima's (``share``, N x C, where v reaches the maximum ``mx``). gp, v and out share their strides
    (rows at ``W * sw``), gh's rows are at ``W * hw``."""
    c, cmask, offs, mask = _tile(C, H, W, sn, sc, sw, BLOCK_C, BLOCK_P)
    blocks = tl.cdiv(H * W, BLOCK_P)
    n = tl.program_id(0) // blocks
    p = (tl.program_id(0) % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    g = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    if HAS_PASS:
        g += tl.load(gp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_HALF:
        g += tl.load(gh_ptr + n * hn + c[:, None] * hc + p[None, :] * hw, mask=mask, other=0.0).to(tl.float32)
    if HAS_POOLED:
        g += tl.load(gm_ptr + n * C + c, mask=cmask, other=0.0)[:, None]
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        reached = v == tl.load(mx_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
        g += tl.where(reached, tl.load(share_ptr + n * C + c, mask=cmask, other=0.0)[:, None], 0.0)
    tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=mask)


@autotune(configs=CHANNEL_TILE_CONFIGS, key=KEY + ['N'], prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def pool_concat_kernel(v_ptr, both_ptr, out_ptr, N, C, H, W, sn, sc, sw, hn, hc, hw, chunks,
                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (cb, n * chunks + k) walks image n's pixel blocks k, k + chunks, ...: it copies v into its
    half of a concat (from channel 0 of ``both_ptr``, strides hn, hc, hw; in both's dtype) and writes, at
    row ``n * chunks + k`` of out (3 x N * chunks x C, float32), per channel the sum of its values, their
    maximum and how many reach it. v's rows are at ``W * sw``, both's at ``W * hw``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n = tl.program_id(1) // chunks
    pixels = H * W
    # per lane: the sum, the largest value seen and how often; reduced across the lanes once, at the end
    total = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    top = tl.full((BLOCK_C, BLOCK_P), float('-inf'), dtype=tl.float32)
    count = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for b in range(tl.program_id(1) % chunks, tl.cdiv(pixels, BLOCK_P), chunks):
        p = b * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = cmask[:, None] & (p < pixels)[None, :]
        v = tl.load(v_ptr + n * sn + c[:, None] * sc + p[None, :] * sw, mask=mask, other=0.0)
        tl.store(both_ptr + n * hn + c[:, None] * hc + p[None, :] * hw, v.to(both_ptr.dtype.element_ty), mask=mask)
        v = v.to(tl.float32)
        total += v
        v = tl.where(mask, v, float('-inf'))
        count = tl.where(v > top, 1.0, tl.where(v == top, count + 1.0, count))
        top = tl.maximum(top, v)
    channel_top = tl.max(top, axis=1)
    row = (tl.program_id(1) * C + c)
    tl.store(out_ptr + row, tl.sum(total, axis=1), mask=cmask)
    tl.store(out_ptr + N * chunks * C + row, channel_top, mask=cmask)
    tl.store(out_ptr + 2 * N * chunks * C + row, tl.sum(tl.where(top == channel_top[:, None], count, 0.0), axis=1),
             mask=cmask)


def check_modulation(rgb: torch.Tensor, x: torch.Tensor, spatial: torch.Tensor, channel: torch.Tensor) -> None:
    """The modulation's operands: rgb and x N-C-H-W of one shape and dtype, spatial N-1-H-W and channel
    N-C-1-1 coefficients of one dtype (the gate's)."""
    n, c, h, w = rgb.shape
    if (x.shape != rgb.shape or x.dtype != rgb.dtype or tuple(spatial.shape) != (n, 1, h, w)
            or tuple(channel.shape) != (n, c, 1, 1) or spatial.dtype != channel.dtype):
        raise ValueError(f'smmcl.kernels: the modulation takes rgb and x N-C-H-W of one shape and dtype, N-1-H-W '
                         f'spatial and N-C-1-1 channel coefficients of one dtype; got {tuple(rgb.shape)} '
                         f'{rgb.dtype}, {tuple(x.shape)} {x.dtype}, {tuple(spatial.shape)} {spatial.dtype}, '
                         f'{tuple(channel.shape)} {channel.dtype}')


def _modulation_triton(rgb, x, spatial, channel, dtype=None, streams=True, fusion=False):
    n, c, h, w = rgb.shape
    dtype = dtype or sum_dtype(rgb, spatial)
    outs = [torch.empty_like(rgb, dtype=dtype) for _ in range(2)] if streams else [None, None]
    fuse = torch.empty((n, 2 * c, h, w), dtype=dtype, device=rgb.device, memory_format=_layout(rgb)) if fusion else None
    f = rgb if fuse is None else fuse
    if rgb.numel() and (streams or fusion):
        modulation_kernel[lambda m: (n * triton.cdiv(h * w, m['BLOCK_P']), triton.cdiv(c, m['BLOCK_C']))](
            rgb, x, spatial.contiguous(), channel.contiguous(), *(rgb if t is None else t for t in outs), f, n, c, h,
            w, rgb.stride(0), rgb.stride(1), rgb.stride(3), f.stride(0), f.stride(1), f.stride(3), HAS_OUT=streams,
            HAS_FUSE=fusion)
    return outs[0], outs[1], fuse


def _modulation_grad_triton(grad_rgb, grad_x, grad_fuse, rgb, x, spatial, channel):
    n, c, h, w = rgb.shape
    grads = [torch.empty_like(rgb) for _ in range(2)]
    grad_spatial = torch.empty(spatial.shape, dtype=spatial.dtype, device=rgb.device)
    grad_channel = torch.empty(n, c, dtype=channel.dtype, device=rgb.device)
    if rgb.numel() == 0:
        return (*grads, grad_spatial, grad_channel.zero_().reshape(channel.shape))
    # room for the most partial rows a candidate tile writes (its smallest pixel block's); none filled
    smallest = min(config.kwargs['BLOCK_P'] for config in modulation_grad_kernel.configs)
    partials = rgb.new_empty(n * triton.cdiv(h * w, smallest) * c, dtype=torch.float32)
    blocks = []  # the pixel blocks an image of the tile that runs: the grid is asked last for its launch

    def grid(meta):
        blocks.append(triton.cdiv(h * w, meta['BLOCK_P']))
        return (n * blocks[-1],)

    f = rgb if grad_fuse is None else grad_fuse
    modulation_grad_kernel[grid](
        rgb if grad_rgb is None else grad_rgb, rgb if grad_x is None else grad_x, f, rgb, x,
        spatial.contiguous(), channel.contiguous(), *grads, grad_spatial, partials, n, c, h, w, rgb.stride(0),
        rgb.stride(1), rgb.stride(3), f.stride(0), f.stride(1), f.stride(3), HAS_A=grad_rgb is not None,
        HAS_B=grad_x is not None, HAS_F=grad_fuse is not None)
    # each image's rows, all written (no fill), summed and stored in the channel coefficients' dtype
    chunk_sums(partials[:n * blocks[-1] * c].view(n, blocks[-1], c), grad_channel)
    return (*grads, grad_spatial, grad_channel.reshape(channel.shape))


def _modulation_torch(rgb, x, spatial, channel, dtype=None, streams=True, fusion=False):
    """ATen's: the gate's two halves and their sum, one ``addcmul`` per output, then the concat and the casts
    to the dtype of the convs that read them."""
    out = modulation_reference(rgb, x, spatial, channel)
    dtype = dtype or out[0].dtype
    fuse = torch.cat(out, 1).to(dtype) if fusion else None
    return (*((t.to(dtype) for t in out) if streams else (None, None)), fuse)


def _output_grads(grad_rgb, grad_x, grad_fuse, rgb):
    """The gradients of the modulation's two float32 results from those of their copies (the streams', the
    concat's halves; any may be None), as autograd sums them: each in rgb's dtype, then added."""
    c = rgb.shape[1]
    out = []
    for grad, half in ((grad_rgb, slice(0, c)), (grad_x, slice(c, 2 * c))):
        parts = [g.to(rgb.dtype) for g in (grad, None if grad_fuse is None else grad_fuse[:, half]) if g is not None]
        out.append(torch.zeros_like(rgb) if not parts else parts[0] if len(parts) == 1 else parts[0] + parts[1])
    return out


def _modulation_grad_torch(grad_rgb, grad_x, grad_fuse, rgb, x, spatial, channel):
    """ATen's: the copies' backward and their sums, then one ``addcmul`` per input's gradient, the gate's in
    float32 and its sums."""
    return modulation_grad_reference(*_output_grads(grad_rgb, grad_x, grad_fuse, rgb), rgb, x, spatial, channel)


def _pooled_grad_triton(grad_pass, grad_both, offset, value, grad_mean, maximum, grad_max, count):
    n, c, h, w = value.shape
    out = torch.empty_like(value)
    if value.numel() == 0:
        return out
    share = mean = None
    if grad_mean is not None:
        mean = (grad_mean.reshape(n, c) / (h * w)).float()
        share = (grad_max / count).reshape(n, c).float()
    half = out if grad_both is None else grad_both[:, offset:offset + c]
    pooled_grad_kernel[lambda m: (n * triton.cdiv(h * w, m['BLOCK_P']), triton.cdiv(c, m['BLOCK_C']))](
        out if grad_pass is None else grad_pass, half, value, out if mean is None else mean,
        out if mean is None else maximum.reshape(n, c).contiguous(), out if share is None else share, out,
        n, c, h, w, value.stride(0), value.stride(1), value.stride(3), half.stride(0), half.stride(1),
        half.stride(3), HAS_PASS=grad_pass is not None, HAS_HALF=grad_both is not None,
        HAS_POOLED=grad_mean is not None)
    return out


def _pooled_grad_torch(grad_pass, grad_both, offset, value, grad_mean, maximum, grad_max, count):
    """ATen's: the sums and the maximum's share, a pass each."""
    half = None if grad_both is None else grad_both[:, offset:offset + value.shape[1]]
    return pooled_input_grad_reference(grad_pass, half, value, grad_mean, maximum, grad_max, count)


def _inputs_triton(rgb, x, dtype):
    n, c, h, w = rgb.shape
    both = torch.empty((n, 2 * c, h, w), dtype=dtype, device=rgb.device, memory_format=_layout(rgb))
    chunks = max(1, triton.cdiv(_chunks(rgb), n))
    partials = torch.empty(2, 3, n * chunks, c, device=rgb.device, dtype=torch.float32)  # every row written
    if rgb.numel():
        for i, value in enumerate((rgb, x)):
            half = both[:, i * c:(i + 1) * c]
            pool_concat_kernel[lambda m: (triton.cdiv(c, m['BLOCK_C']), n * chunks)](
                value, half, partials[i], n, c, h, w, value.stride(0), value.stride(1), value.stride(3),
                half.stride(0), half.stride(1), half.stride(3), chunks)
    sums, tops, counts = partials.reshape(2, 3, n, chunks, c).unbind(1)  # 2 x N x chunks x C each
    maxima = tops.amax(2, keepdim=True)
    counts = (counts * (tops == maxima)).sum(2)
    pooled = torch.cat([(sums.sum(2) / (h * w)).transpose(0, 1).reshape(n, 2 * c),
                        maxima.squeeze(2).transpose(0, 1).reshape(n, 2 * c)], 1)
    return both, pooled.reshape(n, 4 * c, 1, 1), counts.transpose(0, 1).reshape(n, 2 * c, 1, 1)


def _inputs_torch(rgb, x, dtype):
    """ATen's: the concat's two copies, the means, the maxima and their counts, a pass each."""
    return modulation_inputs_reference(rgb, x, dtype)


_IMPLS = {'add': {'triton': _add_triton, 'torch': _add_torch}, 'grad': {'triton': _grad_triton, 'torch': _grad_torch},
          'tail': {'triton': _tail_triton, 'torch': _tail_torch},
          'residual': {'triton': _residual_triton, 'torch': _residual_torch},
          'pair': {'triton': _pair_triton, 'torch': _pair_torch},
          'stats': {'triton': _stats_triton, 'torch': _stats_torch},
          'apply': {'triton': _apply_triton, 'torch': _apply_torch},
          'norm_grad': {'triton': _norm_grad_triton, 'torch': _norm_grad_torch},
          'modulate': {'triton': _modulation_triton, 'torch': _modulation_torch},
          'modulate_grad': {'triton': _modulation_grad_triton, 'torch': _modulation_grad_torch},
          'pooled_grad': {'triton': _pooled_grad_triton, 'torch': _pooled_grad_torch},
          'inputs': {'triton': _inputs_triton, 'torch': _inputs_torch}}
CHANNEL_IMPLS = ('triton', 'torch')
_CHOICE = {}  # (op, device, every argument's shape, strides and dtype) -> the faster implementation


def _run(op: str, impl: Optional[str], *args, timing_args=None, **options):
    """``op``'s implementation on ``args`` (keyword ``options`` passed on): ``impl``, else the environment's
    ``SMMCL_TRITON_CHANNEL``, else ``'auto'``: on a GPU the faster of the two for this op, options,
    shape, layout and dtype, timed once (on the arguments ``timing_args()`` gives, if given: an op that
    updates a state in place is timed on a copy of it); under the interpreter ``'triton'``."""
    return _IMPLS[op][_choice(op, impl, args, timing_args, options)](*args, **options)


def _choice(op: str, impl: Optional[str], args, timing_args=None, options=None) -> str:
    """The name of the implementation :func:`_run` runs."""
    options = options or {}
    impls = {name: functools.partial(fn, **options) for name, fn in _IMPLS[op].items()}
    key = (op, tuple(options.items())) + tuple(
        (tuple(t.shape), t.stride(), t.dtype, t.device) if isinstance(t, torch.Tensor) else t for t in args)
    device = next(t.device for t in args if isinstance(t, torch.Tensor))
    return choose('SMMCL_TRITON_CHANNEL', impl, CHANNEL_IMPLS, device, 'triton',
                  lambda: _CHOICE.get(key) or fastest(_CHOICE, key, impls, *(timing_args() if timing_args else args)))


def _check_epilogue(epilogue: str, gate: Optional[torch.Tensor], y: torch.Tensor) -> None:
    if epilogue not in EPILOGUES:
        raise ValueError(f'smmcl.kernels: a bias epilogue is one of {EPILOGUES}, got {epilogue!r}')
    if (gate is not None) != (epilogue == 'gate') or (gate is not None and gate.shape != y.shape):
        raise ValueError(f"smmcl.kernels: the epilogue 'gate' takes a gate shaped as the map {tuple(y.shape)}, and "
                         f"only it; got epilogue {epilogue!r} with gate {None if gate is None else tuple(gate.shape)}")


def bias_add(y: torch.Tensor, bias: torch.Tensor, impl: Optional[str] = None, epilogue: str = 'none',
             gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``v = y + bias`` per channel, then the epilogue: v (``'none'``), the exact ``GELU(v)`` (``'gelu'``)
    or ``v * gate`` (``'gate'``), in one pass.

    Args:
        y: N-C-H-W, a conv's output without its bias (its layout is kept).
        bias: C, rounded to y's dtype first, as autocast rounds a conv's bias; v is rounded to y's dtype
            before an epilogue reads it, as the conv's output is.
        gate: N-C-H-W with ``'gate'`` (else None).
        impl: ``'triton'`` (:func:`bias_add_kernel`), ``'torch'`` (ATen's ops, a pass each) or ``'auto'``
            (:func:`_run`).
    Returns:
        N-C-H-W in y's layout, in y's dtype (promoted with gate's for ``'gate'``).
    """
    check_device(y)
    _check_epilogue(epilogue, gate, y)
    y, *gate = _same_layout(_layout(y), y, *([] if gate is None else [gate]))  # rows at W * sw: a dense layout
    return _run('add', impl, y, bias, *gate, epilogue=epilogue)


def bias_grad(grad: torch.Tensor, bias: torch.Tensor, impl: Optional[str] = None) -> torch.Tensor:
    """The gradient of ``bias`` (C) added per channel to an N-C-H-W map whose gradient is ``grad``.

    Summed in float32, rounded to grad's dtype, then returned in bias's dtype: under autocast what
    ATen's bias gradient of a bf16 conv is, followed by the cast back to the float32 parameter.
    ``impl``: ``'triton'`` (:func:`bias_grad_kernel`), ``'torch'`` (``grad.sum((0, 2, 3))``) or
    ``'auto'`` (:func:`_run`).
    """
    check_device(grad)
    grad, = _same_layout(_layout(grad), grad)
    return _run('grad', impl, grad, grad, bias, epilogue='none')[2]  # no epilogue: the map is not read


def bias_epilogue_grad(grad: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, epilogue: str,
                       gate: Optional[torch.Tensor] = None, impl: Optional[str] = None):
    """The gradients of :func:`bias_add` with ``epilogue`` ``'gelu'`` or ``'gate'`` for ``grad`` (its
    output's), in one pass over the maps.

    Args:
        grad, y, gate: N-C-H-W; y and gate as given to :func:`bias_add` (v is recomputed from them).
        impl: ``'triton'`` (:func:`bias_grad_kernel`), ``'torch'`` (ATen's backward ops, then the bias sum)
            or ``'auto'`` (:func:`_run`).
    Returns:
        (grad y: y's dtype and layout; grad gate: gate's dtype, or None for ``'gelu'``; grad bias: the
        float32 sum of grad y as rounded, rounded to y's dtype as a bf16 conv's bias gradient is, in
        bias's dtype).
    """
    check_device(y)
    _check_epilogue(epilogue, gate, y)
    if epilogue == 'none':
        raise ValueError("smmcl.kernels: bias_epilogue_grad is for 'gelu' or 'gate'; bias_grad sums a plain bias's")
    grad, y, *gate = _same_layout(_layout(y), grad, y, *([] if gate is None else [gate]))
    return _run('grad', impl, grad, y, bias, *gate, epilogue=epilogue)


def scaled_residual(x: torch.Tensor, y: torch.Tensor, factor: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    shortcut: Optional[torch.Tensor] = None, impl: Optional[str] = None, stats: bool = False,
                    keep: Optional[torch.Tensor] = None, keep_prob: float = 1.0):
    """A block tail ``x + v * f`` in one pass, v the residual branch: y, plus (with ``bias``) the bias of
    the conv that made y, as :func:`bias_add` adds it, plus (with ``shortcut``) the branch's own shortcut
    (the attention's ``proj_2(...) + x``); f the factor, times drop path's ``keep / keep_prob`` per image
    (with ``keep``); with ``stats``, the sum's BatchNorm partials in the same pass.

    Args:
        x: N-C-H-W, the residual stream (float32 on the fast path).
        y: N-C-H-W, any float dtype (bf16 under autocast: a conv's output, without its bias if ``bias``).
        factor: C-1-1 / 1-C-1-1 (a layer scale), float32.
        bias: C or None; shortcut: N-C-H-W or None, in a dtype at least as wide as y's.
        impl: ``'triton'`` (:func:`scaled_residual_kernel`), ``'torch'`` (ATen's passes) or ``'auto'``
            (:func:`_run`; timed without the statistics, which spare the next norm a pass of its own).
        stats: also sum the statistics of the BatchNorm that reads the sum next (only ``'triton'`` does).
        keep, keep_prob: drop path's N (or N-1-1-1) mask as drawn (1 kept, 0 dropped) and the probability
            its kept images are divided by (:class:`~smmcl.models.mscan.ScaleByImage`'s factor,
            made in the pass: no launches of its own), or None and 1.
    Returns:
        The sum, N-C-H-W in x's layout and the promoted dtype of x, v and the factor (float32 arithmetic,
        the multiply-add possibly fused: the composition's to float32 rounding); with a shortcut v too
        (the shortcut's dtype, x's layout: the backward's branch, as ``addcmul`` keeps its float32 v),
        else None; with ``stats`` and ``'triton'`` the sum's partials for :func:`batch_norm_stats`
        (float32 (2K + 1) x C: K rows of shifted sums, K of their squares, the shift), else None.
    """
    check_device(x)
    check_residual(y, factor, bias, shortcut, keep, keep_prob)
    args = _same_layout(_layout(x), x, y, *([] if shortcut is None else [shortcut]))
    args = (*args[:2], factor, keep, bias, *args[2:])
    # timed as chosen once per shape: the keep probability (each block's own) changes no work
    return _IMPLS['tail'][_choice('tail', impl, args)](*args, stats=stats, keep_prob=keep_prob)


def scaled_residual_grad(grad: torch.Tensor, branch: torch.Tensor, factor: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, y_dtype: Optional[torch.dtype] = None,
                         impl: Optional[str] = None, keep: Optional[torch.Tensor] = None, keep_prob: float = 1.0):
    """The gradients of :func:`scaled_residual`'s inputs but x (whose is ``grad``) for ``grad`` = d loss / d out,
    in one pass.

    Args:
        grad: N-C-H-W, out's dtype (float32 for the fast path's residual stream).
        branch: without a shortcut, y as given to :func:`scaled_residual` (the bias added again); with one,
            the v it returned, and ``y_dtype`` y's dtype.
        factor, bias, keep, keep_prob: as given to :func:`scaled_residual`.
        impl: ``'triton'`` (:func:`scaled_residual_grad_kernel`), ``'torch'`` or ``'auto'`` (:func:`_run`).
    Returns:
        grad y (y's dtype, branch's shape and layout: ``grad * f`` computed in float32 and rounded once, as
        autocast's ``addcmul`` and the cast or add before it do); grad factor (factor's shape and dtype:
        float32 sums of ``grad * v``, each image's times its ``keep / keep_prob``); grad bias (None without
        a bias: the float32 sum of grad y as rounded, rounded to y's dtype as a bf16 conv's bias gradient
        is, in bias's dtype); grad shortcut (None without one: ``grad * f`` in its dtype, branch's layout).
        The keep mask takes no gradient.
    """
    check_device(branch)
    check_residual(branch, factor, bias, keep=keep, keep_prob=keep_prob)
    grad, branch = _same_layout(_layout(branch), grad, branch)
    args = (grad, branch, factor, keep, bias)
    choice = _choice('residual', impl, args, options=dict(y_dtype=y_dtype))  # timed once per shape, as the forward
    return _IMPLS['residual'][choice](*args, y_dtype=y_dtype, keep_prob=keep_prob)


def residual_pair(a: torch.Tensor, b: torch.Tensor, factor: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, impl: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(``a + b * factor``, the same rounded to a's dtype): a residual stream (in the promoted dtype, float32
    for the fast path's) and the copy its next conv reads under autocast, in one pass.

    Args:
        a: N-C-H-W, the branch (bf16 under autocast: a conv's output); b: N-C-H-W, the stream.
        factor: C-1-1 / 1-C-1-1 per-channel float32, or None (``a + b``).
        bias: C or None: the bias of the conv that made a, added to a first as :func:`bias_add` would
            (rounded to a's dtype, the sum too), in the same pass.
        impl: ``'triton'`` (:func:`residual_pair_kernel`), ``'torch'`` or ``'auto'`` (:func:`_run`).
    Returns:
        Both N-C-H-W in b's layout.
    """
    check_device(b)
    if factor is not None and tuple(factor.shape) not in ((b.shape[1], 1, 1), (1, b.shape[1], 1, 1)):
        raise ValueError(f'smmcl.kernels: residual_pair takes a per-channel factor C-1-1, got {tuple(factor.shape)}')
    if bias is not None and tuple(bias.shape) != (b.shape[1],):
        raise ValueError(f'smmcl.kernels: residual_pair takes a bias of {b.shape[1]} channels, got {tuple(bias.shape)}')
    a, b = _same_layout(_layout(b), a, b)
    return _run('pair', impl, a, b, factor, bias)


def batch_norm_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                     running_var: torch.Tensor, momentum: float, eps: float, impl: Optional[str] = None,
                     partials: Optional[torch.Tensor] = None,
                     num_batches_tracked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A training-mode batch normalisation's statistics of N-C-H-W ``x``, the running ones updated in place as
    ``nn.BatchNorm2d`` updates them (``momentum``, the unbiased variance; ``num_batches_tracked``, where
    given, counted up by one in the same launch): float32 4 x C rows (mean,
    invstd, ``weight * invstd``, bias) for :func:`batch_norm_apply`. ``impl``: ``'triton'``
    (:func:`norm_sums_kernel`, :func:`norm_finalize_kernel`: shifted sums in float32), ``'torch'``
    (``var_mean``) or ``'auto'`` (:func:`_run`, timed on copies of the running statistics). With
    ``partials`` (x's, from the :func:`scaled_residual` that wrote x) only :func:`norm_finalize_kernel`
    runs: x is not read."""
    check_device(x)
    if partials is not None:
        chunks = (partials.shape[0] - 1) // 2
        if partials.dim() != 2 or partials.shape[1] != x.shape[1] or chunks < 1 or partials.shape[0] != 2 * chunks + 1:
            raise ValueError(f'smmcl.kernels: a BatchNorm\'s partials for {x.shape[1]} channels are (2K + 1) x '
                             f'{x.shape[1]} (scaled_residual\'s with stats), got {tuple(partials.shape)}')
        return _finalize_stats(partials, partials[-1], chunks, x.numel() // x.shape[1], weight, bias,
                               running_mean, running_var, momentum, eps, num_batches_tracked)
    x, = _same_layout(_layout(x), x)
    state = (running_mean, running_var, momentum, eps, num_batches_tracked)
    return _run('stats', impl, x, weight, bias, *state, timing_args=lambda: (
        x, weight, bias, *(t.clone() if isinstance(t, torch.Tensor) else t for t in state)))


def batch_norm_apply(x: torch.Tensor, coef: torch.Tensor, low_dtype: torch.dtype, full: bool = True,
                     impl: Optional[str] = None):
    """The normalised map ``(x - mean) * weight * invstd + bias`` (coef from :func:`batch_norm_stats`) in
    ``low_dtype`` (the next conv's under autocast) and, with ``full``, in x's dtype too (a residual
    shortcut's), each rounded once from the same float32 value, in one pass: what ATen's batch norm and
    autocast's cast compute in two. Returns (low, full or None), x's layout. ``impl``: ``'triton'``
    (:func:`norm_apply_kernel`), ``'torch'`` or ``'auto'`` (:func:`_run`)."""
    check_device(x)
    x, = _same_layout(_layout(x), x)
    return _run('apply', impl, x, coef, low_dtype=low_dtype, full=full)


def batch_norm_grad(grad_low: Optional[torch.Tensor], grad_full: Optional[torch.Tensor], x: torch.Tensor,
                    weight: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                    grad_pass: Optional[torch.Tensor] = None, impl: Optional[str] = None):
    """The gradients of a training-mode batch normalisation (:func:`batch_norm_stats` then
    :func:`batch_norm_apply`, through the statistics too) for its two outputs' (either may be None), in two
    passes over the maps: (grad x in x's dtype and layout, grad weight, grad bias in float32). The two
    gradients are summed as they are read (ATen: the cast's backward, their sum, then
    ``native_batch_norm_backward``), and ``grad_pass`` (N-C-H-W or None: the gradient x gets from another
    consumer, the residual stream's shortcut) is added to x's in the same pass (autograd: a pass of its
    own)."""
    check_device(x)
    given = [g for g in (grad_low, grad_full, grad_pass) if g is not None]
    x, *given = _same_layout(_layout(x), x, *given)
    grad_low, grad_full, grad_pass = (given.pop(0) if g is not None else None for g in (grad_low, grad_full, grad_pass))
    return _run('norm_grad', impl, grad_low, grad_full, x, weight, mean, invstd, grad_pass)


def modulation(rgb: torch.Tensor, x: torch.Tensor, spatial: torch.Tensor, channel: torch.Tensor,
               dtype: Optional[torch.dtype] = None, streams: bool = True, fusion: bool = False,
               impl: Optional[str] = None):
    """The cross-modal modulation's outputs (:func:`smmcl.kernels.reference.modulation_reference`) in one pass,
    stored as the convs that read them want them.

    Args:
        rgb, x: N-C-H-W, one shape, dtype and (here made) layout; spatial: N-1-H-W; channel: N-C-1-1.
        dtype: the outputs' (default: the promoted one, float32 on the fast path; under autocast the
            autocast dtype, rounded from the float32 results as autocast's casts round them).
        streams: write ``rgb'`` and ``x'`` (the next stage's inputs); fusion: write their N-2C-H-W concat
            (the fusion conv's input).
        impl: ``'triton'`` (:func:`modulation_kernel`), ``'torch'`` (ATen's passes) or ``'auto'`` (:func:`_run`).
    Returns:
        (``rgb + x * gate``, ``x + rgb * gate``: N-C-H-W in rgb's layout, or both None without ``streams``;
        their concat, or None without ``fusion``).
    """
    check_device(rgb)
    check_modulation(rgb, x, spatial, channel)
    rgb, x = _same_layout(_layout(rgb), rgb, x)
    return _run('modulate', impl, rgb, x, spatial, channel, dtype=dtype, streams=streams, fusion=fusion)


def modulation_grad(grad_rgb: Optional[torch.Tensor], grad_x: Optional[torch.Tensor],
                    grad_fuse: Optional[torch.Tensor], rgb: torch.Tensor, x: torch.Tensor, spatial: torch.Tensor,
                    channel: torch.Tensor, impl: Optional[str] = None):
    """The gradients of :func:`modulation`'s inputs (:func:`smmcl.kernels.reference.modulation_grad_reference`) for its
    outputs' (``grad_rgb``, ``grad_x``: N-C-H-W; ``grad_fuse``: N-2C-H-W; any may be None), in one pass
    over the maps.

    Returns:
        (grad rgb, grad x: N-C-H-W in rgb's layout and dtype; grad spatial, grad channel: their shapes and
        dtypes, from float32 sums).
    """
    check_device(rgb)
    check_modulation(rgb, x, spatial, channel)
    n, c, h, w = rgb.shape
    if any(g is not None and tuple(g.shape) != shape
           for g, shape in ((grad_rgb, (n, c, h, w)), (grad_x, (n, c, h, w)), (grad_fuse, (n, 2 * c, h, w)))):
        raise ValueError(f'smmcl.kernels: the modulation\'s output gradients are N-C-H-W and N-2C-H-W for maps '
                         f'{tuple(rgb.shape)}')
    rgb, x, *grads = _same_layout(_layout(rgb), rgb, x, *(g for g in (grad_rgb, grad_x) if g is not None))
    grads = iter(grads)
    grad_rgb, grad_x = (None if g is None else next(grads) for g in (grad_rgb, grad_x))
    if grad_fuse is not None:
        grad_fuse, = _same_layout(_layout(grad_fuse), grad_fuse)
    return _run('modulate_grad', impl, grad_rgb, grad_x, grad_fuse, rgb, x, spatial, channel)


def pooled_input_grad(grad_pass: Optional[torch.Tensor], grad_both: Optional[torch.Tensor], offset: int,
                      value: torch.Tensor, grad_mean: Optional[torch.Tensor], maximum: torch.Tensor,
                      grad_max: Optional[torch.Tensor], count: torch.Tensor,
                      impl: Optional[str] = None) -> torch.Tensor:
    """The gradient of a map that fed a handed-on use, a concat and its channels' means and maxima
    (:func:`smmcl.kernels.reference.pooled_input_grad_reference`), summed in one pass.

    Args:
        grad_pass: N-C-H-W or None; grad_both: the concat's gradient (N-C'-H-W, value's channels from
            ``offset`` on) or None; value: N-C-H-W; grad_mean, grad_max: N-C-1-1 or both None; maximum,
            count: N-C-1-1, value's channels' maxima and how many positions reach each.
        impl: ``'triton'`` (:func:`pooled_grad_kernel`), ``'torch'`` or ``'auto'`` (:func:`_run`).
    Returns:
        N-C-H-W in value's dtype and layout.
    """
    check_device(value)
    n, c, h, w = value.shape
    if (grad_mean is None) != (grad_max is None) or any(
            t is not None and tuple(t.shape) != (n, c, 1, 1) for t in (grad_mean, grad_max, maximum, count)):
        raise ValueError(f'smmcl.kernels: the pooled gradients, maxima and counts of an N-C-H-W map '
                         f'{tuple(value.shape)} are N-C-1-1, the two gradients given together')
    if grad_both is not None and (grad_both.shape[0] != n or grad_both.shape[2:] != value.shape[2:]
                                  or not 0 <= offset <= grad_both.shape[1] - c):
        raise ValueError(f'smmcl.kernels: a concat\'s gradient {tuple(grad_both.shape)} holds no {c} channels of '
                         f'{tuple(value.shape)} from channel {offset}')
    value, *grad_pass = _same_layout(_layout(value), value, *([] if grad_pass is None else [grad_pass]))
    if grad_both is not None:
        grad_both, = _same_layout(_layout(grad_both), grad_both)
    return _run('pooled_grad', impl, grad_pass[0] if grad_pass else None, grad_both, offset, value, grad_mean,
                maximum, grad_max, count)


def modulation_inputs(rgb: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, impl: Optional[str] = None):
    """The cross-modal modulation's coefficient MLPs' inputs
    (:func:`smmcl.kernels.reference.modulation_inputs_reference`): the concat in ``dtype``, the channels'
    means and maxima, the maxima's counts; one pass per modality.

    Args:
        rgb, x: N-C-H-W, one shape and dtype (x made rgb's layout).
        impl: ``'triton'`` (:func:`pool_concat_kernel`), ``'torch'`` or ``'auto'`` (:func:`_run`).
    """
    check_device(rgb)
    if x.shape != rgb.shape or x.dtype != rgb.dtype:
        raise ValueError(f'smmcl.kernels: the modulation\'s inputs are two maps of one shape and dtype, got '
                         f'{tuple(rgb.shape)} {rgb.dtype} and {tuple(x.shape)} {x.dtype}')
    rgb, x = _same_layout(_layout(rgb), rgb, x)
    return _run('inputs', impl, rgb, x, dtype)
