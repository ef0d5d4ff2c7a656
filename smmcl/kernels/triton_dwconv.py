"""Triton kernels for MSCAN's depthwise convolutions (stride 1, odd kernels, "same" padding).

Importing this module needs Triton. The kernels run on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` was set before Triton was first imported (Triton decides at decoration time,
its own ``tl.cdiv`` & co. included, whether a kernel is compiled or interpreted).
:mod:`smmcl.kernels.ops` wraps them as PyTorch custom ops.

Every activation tensor is N-C-H-W with arbitrary strides, so one kernel serves both NCHW and
channels_last (NHWC) memory; the tensors of one launch share their strides (the launchers make them
so). Weights are read as C-KH*KW rows and every sum is accumulated in float32, whatever the activation
dtype (float32, bfloat16, float16); results are stored in the output's dtype.

A tile is BLOCK_C channels x BLOCK_H*BLOCK_W pixels of one image. Convolution taps are unrolled at
compile time; neighbouring taps re-read the same input lines from the cache, not from DRAM. Along H,
the row-blocked kernels of :mod:`smmcl.kernels.triton_rows` compute the same functions with each input
row read once per tap column; along W in NCHW, :mod:`smmcl.kernels.triton_bands` computes the strips as
tensor-core products with band matrices. ``SMMCL_TRITON_DEPTHWISE`` (``tiles``, ``rows``, ``bands``,
``auto``: the fastest per shape, timed once on the GPU) picks the family for the KxK convs and the
strips; ``bands`` applies to the strips along W in NCHW, every other launch then runs ``rows``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .triton_rows import dwconv_rows_kernel, dwconv_wgrad_rows_kernel, grid as row_grid, strip3_rows_kernel
from .triton_rows import grad_wgrad_rows_kernel, strip3_sum_rows_kernel, strip3_wgrad_rows_kernel
from .triton_common import KEY as _KEY, PRUNE as _PRUNE, bench as _bench, check_device as _check_device, configs
from .triton_common import choose, fastest as _fastest, gelu as _gelu, gelu_grad as _gelu_grad
from .triton_common import add_to as _add_to, chunk_sums as _chunk_sums, conv_bias as _conv_bias
from .triton_common import launch, load_input as _load_input
from .triton_compile import autotune
from .target import gpu_properties
from .reference import layout
from .triton_common import packed_strip_slots as _packed_strip_slots
from .triton_bands import dwconv_wgrad_bands_kernel, fits as _band_fits, fits_kxk as _band_fits_kxk
from .triton_bands import parts as _band_parts, programs as _band_programs, strip3_bands_kernel
from .triton_bands import strip3_sum_bands_kernel, strip3_wgrad_bands_kernel


# Tile shapes (BLOCK_C, BLOCK_H, BLOCK_W, warps) to try on a GPU. In NCHW a pixel row is contiguous,
# so tiles are wide rows of few channels; in channels_last (sc == 1) the channels are, so tiles are
# many channels of few pixels. Only the candidates for the tensor's layout are compiled and timed
# (autotuning compiles each kernel variant once per candidate). Sizes chosen so that no variant spills
# registers for sm_90 (ptxas, checked ahead of time: the strip kernels need up to ~180 registers).
_NCHW_TILES = [(1, 8, 32, 4), (1, 4, 32, 4), (2, 8, 32, 8)]
_NHWC_TILES = [(32, 2, 8, 8), (32, 1, 8, 4), (16, 2, 8, 4)]
# Weight gradients hold BLOCK_C x TAPS x BLOCK_H*BLOCK_W products at once: smaller tiles.
_NCHW_WGRAD_TILES = [(1, 4, 64, 8), (1, 2, 64, 4), (2, 2, 32, 4)]
_NHWC_WGRAD_TILES = [(32, 1, 8, 8), (16, 1, 8, 4), (32, 1, 4, 4)]
_CONFIGS = configs(_NCHW_TILES, _NHWC_TILES, (32, 8, 16, 4))
_WGRAD_CONFIGS = configs(_NCHW_WGRAD_TILES, _NHWC_WGRAD_TILES, (32, 4, 16, 4))
# The tap-by-tap weight gradient holds one BLOCK_C x BLOCK_H*BLOCK_W product at a time: wide tiles,
# 128-byte channel rows in channels_last.
_WGRAD_TAPS_CONFIGS = configs([(1, 4, 64, 4), (2, 2, 64, 4), (1, 8, 32, 8)],
                               [(64, 1, 8, 4), (32, 1, 16, 4), (64, 2, 8, 8)], (32, 4, 16, 4))
_STRIP_WGRAD_CONFIGS = configs(_NCHW_WGRAD_TILES, _NHWC_WGRAD_TILES, (32, 4, 16, 4))


@triton.jit
def _tile(pid_nc, pid_hw, C, H, W, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Image index, channels (BLOCK_C), rows and columns (BLOCK_H*BLOCK_W each) of a tile, and masks."""
    num_cb = tl.cdiv(C, BLOCK_C)
    num_wb = tl.cdiv(W, BLOCK_W)
    n = pid_nc // num_cb
    c = (pid_nc % num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    h = (pid_hw // num_wb) * BLOCK_H + p // BLOCK_W
    w = (pid_hw % num_wb) * BLOCK_W + p % BLOCK_W
    return n, c, h, w, c < C, (h < H) & (w < W)


# keyed by the kernel shape and epilogue too: one op's tuning must not pass to another on a map of one size
@autotune(configs=_CONFIGS, key=_KEY + ['KH', 'KW', 'EPILOGUE', 'IN_BIAS'], prune_configs_by=_PRUNE,
          do_bench=_bench)
@triton.jit
def _dwconv_kernel(x_ptr, w_ptr, b_ptr, g_ptr, out_ptr, ib_ptr, C, H, W, sn, sc, sh, sw,
                   KH: tl.constexpr, KW: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   EPILOGUE: tl.constexpr, IN_BIAS: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """out = epilogue(conv(x, w) + b), depthwise, "same" padding.

    TRANSPOSE: the adjoint convolution (grad input from grad output): taps at mirrored offsets.
    EPILOGUE: 0 none; 1 exact GELU; 2 ``g * GELU'(conv + b)`` (the GELU's backward, g = grad output).
    IN_BIAS: the input is ``x + ib`` (ib per channel, the previous conv's bias), added as it is loaded,
    inside the map only (:func:`~smmcl.kernels.triton_common.load_input`).
    """
    n, c, h, w, cmask, pmask = _tile(tl.program_id(0), tl.program_id(1), C, H, W, BLOCK_C, BLOCK_H, BLOCK_W)
    base = n * sn + c[:, None] * sc
    ib = 0.0
    if IN_BIAS:
        ib = _conv_bias(ib_ptr, c, cmask, x_ptr)[:, None]
    acc = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            if TRANSPOSE:
                hh = h - (i - (KH - 1) // 2)
                ww = w - (j - (KW - 1) // 2)
            else:
                hh = h + (i - (KH - 1) // 2)
                ww = w + (j - (KW - 1) // 2)
            inside = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            xv = _load_input(x_ptr + base + (hh * sh + ww * sw)[None, :], cmask[:, None] & inside[None, :], ib,
                             IN_BIAS)
            wv = tl.load(w_ptr + c * (KH * KW) + (i * KW + j), mask=cmask, other=0.0).to(tl.float32)
            acc += wv[:, None] * xv
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    offs = base + (h * sh + w * sw)[None, :]
    mask = cmask[:, None] & pmask[None, :]
    if EPILOGUE == 1:
        acc = _gelu(acc)
    elif EPILOGUE == 2:
        acc = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * _gelu_grad(acc)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@autotune(configs=_WGRAD_CONFIGS, key=_KEY + ['N', 'KH', 'KW'], prune_configs_by=_PRUNE,
          do_bench=_bench)
@triton.jit(do_not_specialize=['KH', 'KW'])  # one compiled kernel per TAPS, not per kernel shape
def _dwconv_wgrad_kernel(g_ptr, x_ptr, dw_ptr, db_ptr, N, C, H, W, sn, sc, sh, sw, num_chunks, KH, KW,
                         TAPS: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Partial weight and bias gradients of a depthwise conv: ``dw[chunk, c, k]``, ``db[chunk, c]``.

    dw[c, i, j] = sum over n, h, w of g[n, c, h, w] * x[n, c, h + i - PH, w + j - PW]; program
    (cb, chunk) sums tiles chunk, chunk + num_chunks, ... so that the partials have a fixed size
    (num_chunks x C x KH*KW, summed by the caller) whatever tile the autotuner picks, and the result
    does not depend on the order in which programs finish. All taps at once: TAPS is KH*KW rounded up
    to a power of two.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    k = tl.arange(0, TAPS)
    kmask = k < KH * KW
    dh = k // KW - (KH - 1) // 2
    dw = k % KW - (KW - 1) // 2
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    num_hb = tl.cdiv(H, BLOCK_H)
    num_wb = tl.cdiv(W, BLOCK_W)
    acc = tl.zeros((BLOCK_C, TAPS), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t in range(tl.program_id(1), N * num_hb * num_wb, num_chunks):
        n = t // (num_hb * num_wb)
        h = (t % (num_hb * num_wb)) // num_wb * BLOCK_H + p // BLOCK_W
        w = (t % num_wb) * BLOCK_W + p % BLOCK_W
        pmask = (h < H) & (w < W)
        base = n * sn + c * sc
        gv = tl.load(g_ptr + base[:, None] + (h * sh + w * sw)[None, :],
                     mask=cmask[:, None] & pmask[None, :], other=0.0).to(tl.float32)
        hh = h[None, :] + dh[:, None]  # TAPS x pixels
        ww = w[None, :] + dw[:, None]
        inside = kmask[:, None] & pmask[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        xv = tl.load(x_ptr + base[:, None, None] + (hh * sh + ww * sw)[None, :, :],
                     mask=cmask[:, None, None] & inside[None, :, :], other=0.0).to(tl.float32)
        acc += tl.sum(xv * gv[:, None, :], axis=2)
        acc_b += tl.sum(gv, axis=1)
    chunk = tl.program_id(1)
    tl.store(dw_ptr + (chunk * C + c[:, None]) * (KH * KW) + k[None, :], acc,
             mask=cmask[:, None] & kmask[None, :])
    tl.store(db_ptr + chunk * C + c, acc_b, mask=cmask)


@autotune(configs=_WGRAD_TAPS_CONFIGS, key=_KEY + ['N', 'KH', 'KW'], prune_configs_by=_PRUNE,
          do_bench=_bench)
@triton.jit
def _dwconv_wgrad_taps_kernel(g_ptr, x_ptr, dw_ptr, db_ptr, N, C, H, W, sn, sc, sh, sw, num_chunks, KH, KW,
                              BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """The partials of :func:`_dwconv_wgrad_kernel`, one tap at a time.

    Program (cb, chunk) owns the tiles chunk, chunk + num_chunks, ...; for each tap it runs over them
    with a BLOCK_C x pixels float32 accumulator and reduces it over the pixels once, at the end (no
    reduction per tile, no TAPS x pixels gather). A chunk's tiles are few, so the taps after the first
    re-read them from the cache. Taps are a runtime loop: one compiled kernel for every kernel shape.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    chunk = tl.program_id(1)
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    num_hb = tl.cdiv(H, BLOCK_H)
    num_wb = tl.cdiv(W, BLOCK_W)
    base = c[:, None] * sc
    acc_b = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)
    for k in range(0, KH * KW):
        dh = k // KW - (KH - 1) // 2
        dw = k % KW - (KW - 1) // 2
        acc = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)
        for t in range(chunk, N * num_hb * num_wb, num_chunks):
            n = t // (num_hb * num_wb)
            h = (t % (num_hb * num_wb)) // num_wb * BLOCK_H + p // BLOCK_W
            w = (t % num_wb) * BLOCK_W + p % BLOCK_W
            pmask = (h < H) & (w < W)
            gv = tl.load(g_ptr + n * sn + base + (h * sh + w * sw)[None, :],
                         mask=cmask[:, None] & pmask[None, :], other=0.0).to(tl.float32)
            hh = h + dh
            ww = w + dw
            inside = pmask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            xv = tl.load(x_ptr + n * sn + base + (hh * sh + ww * sw)[None, :],
                         mask=cmask[:, None] & inside[None, :], other=0.0).to(tl.float32)
            acc += gv * xv
            if k == 0:
                acc_b += gv
        tl.store(dw_ptr + (chunk * C + c) * (KH * KW) + k, tl.sum(acc, axis=1), mask=cmask)
    tl.store(db_ptr + chunk * C + c, tl.sum(acc_b, axis=1), mask=cmask)


@triton.jit
def _strip_wgrad_job(g_ptr, x_ptr, dw_ptr, db_ptr, c, cmask, chunk, N, H, W, sn, sc, sh, sw, num_chunks, K,
                     TAPS: tl.constexpr, ALONG_W: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """One strip conv's partial gradients over the tiles chunk, chunk + num_chunks, ...: ``dw_ptr``
    receives C x K taps, ``db_ptr`` C. All taps at once (TAPS >= K, a power of two); a 1-D kernel's
    taps are the tile shifted along one axis, so the gather reads neighbouring pixels from the cache."""
    k = tl.arange(0, TAPS)
    kmask = k < K
    shift = k - (K - 1) // 2
    # channel rows as pointers, pixels as offsets: one add per load for the whole tile
    g_rows = (g_ptr + c * sc)[:, None]
    x_rows = (x_ptr + c * sc)[:, None, None]
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    ph = p // BLOCK_W
    pw = p % BLOCK_W
    num_wb = tl.cdiv(W, BLOCK_W)
    tiles = tl.cdiv(H, BLOCK_H) * num_wb  # per image
    acc = tl.zeros((BLOCK_C, TAPS), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)
    for t in range(chunk, N * tiles, num_chunks):
        h = (t % tiles) // num_wb * BLOCK_H + ph
        w = (t % num_wb) * BLOCK_W + pw
        pix = (t // tiles) * sn + h * sh + w * sw
        gv = tl.load(g_rows + pix[None, :], mask=cmask[:, None] & ((h < H) & (w < W))[None, :],
                     other=0.0).to(tl.float32)
        # Where the output pixel lies outside the map g is 0: the mask only keeps the shifted reads inside.
        if ALONG_W:
            moved = w[None, :] + shift[:, None]  # TAPS x pixels
            inside = kmask[:, None] & (h < H)[None, :] & (moved >= 0) & (moved < W)
            x_pix = pix[None, :] + (shift * sw)[:, None]
        else:
            moved = h[None, :] + shift[:, None]
            inside = kmask[:, None] & (w < W)[None, :] & (moved >= 0) & (moved < H)
            x_pix = pix[None, :] + (shift * sh)[:, None]
        xv = tl.load(x_rows + x_pix[None, :, :], mask=cmask[:, None, None] & inside[None, :, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(xv * gv[:, None, :], axis=2)
        acc_b += gv
    tl.store(dw_ptr + c[:, None] * K + k[None, :], acc, mask=cmask[:, None] & kmask[None, :])
    tl.store(db_ptr + c, tl.sum(acc_b, axis=1), mask=cmask)


@autotune(configs=_STRIP_WGRAD_CONFIGS, key=_KEY + ['N', 'ALONG_W'], prune_configs_by=_PRUNE,
          do_bench=_bench)
@triton.jit(do_not_specialize=['K0', 'K1', 'K2'])  # one compiled kernel per TAPS_i, not per length
def _strip3_wgrad_kernel(g0_ptr, g1_ptr, g2_ptr, x0_ptr, x1_ptr, x2_ptr, out_ptr, N, C, H, W, sn, sc, sh, sw,
                         num_chunks, K0, K1, K2,
                         TAPS0: tl.constexpr, TAPS1: tl.constexpr, TAPS2: tl.constexpr, ALONG_W: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Partial weight and bias gradients of three 1-D depthwise convs (K_i taps along W or H); job i
    (program id 2) reads ``g_i`` and ``x_i``.

    Program (cb, chunk, job) writes its part of row ``chunk`` of ``out`` (num_chunks x C*(K0+K1+K2+3),
    packed as dw_0 C x K0 | dw_1 C x K1 | dw_2 C x K2 | db_0 C | db_1 C | db_2 C): every entry has
    exactly one writer, so the buffer needs no zero fill and one sum over the chunks finishes all six
    gradients, whatever tile the autotuner picks. Each job gathers its own power of two of taps (8, 16,
    32 for MSCAN's 7, 11, 21) rather than the widest one's.
    """
    c, cmask, chunk, job, dw_row, db_row = _packed_strip_slots(out_ptr, C, K0, K1, K2, BLOCK_C)
    if job == 0:
        _strip_wgrad_job(g0_ptr, x0_ptr, dw_row, db_row, c, cmask, chunk, N, H, W, sn, sc, sh, sw, num_chunks,
                         K0, TAPS0, ALONG_W, BLOCK_C, BLOCK_H, BLOCK_W)
    elif job == 1:
        _strip_wgrad_job(g1_ptr, x1_ptr, dw_row, db_row, c, cmask, chunk, N, H, W, sn, sc, sh, sw, num_chunks,
                         K1, TAPS1, ALONG_W, BLOCK_C, BLOCK_H, BLOCK_W)
    else:
        _strip_wgrad_job(g2_ptr, x2_ptr, dw_row, db_row, c, cmask, chunk, N, H, W, sn, sc, sh, sw, num_chunks,
                         K2, TAPS2, ALONG_W, BLOCK_C, BLOCK_H, BLOCK_W)


@triton.jit
def _strip_tap(x_ptr, offs_c, cmask, h, w, H, W, sh, sw, j: tl.constexpr, K: tl.constexpr,
               ALONG_W: tl.constexpr, TRANSPOSE: tl.constexpr):
    """The input of tap ``j`` of a K-tap 1-D depthwise conv along W or H (mirrored for the transposed
    conv of the backward pass), float32, zero outside the image."""
    shift = j - (K - 1) // 2
    if TRANSPOSE:
        shift = -shift
    if ALONG_W:
        hh = h
        ww = w + shift
    else:
        hh = h + shift
        ww = w
    inside = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    return tl.load(x_ptr + offs_c + (hh * sh + ww * sw)[None, :], mask=cmask[:, None] & inside[None, :],
                   other=0.0).to(tl.float32)


@autotune(configs=_CONFIGS, key=_KEY + ['ALONG_W'], prune_configs_by=_PRUNE, do_bench=_bench)
@triton.jit
def _strip3_kernel(x_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, o0_ptr, o1_ptr, o2_ptr,
                   C, H, W, sn, sc, sh, sw,
                   K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, ALONG_W: tl.constexpr,
                   TRANSPOSE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Three 1-D depthwise convs of one input (K0 <= K1 <= K2, along W or H): o_i = conv(x, w_i) + b_i.

    One pass over the K2 taps reads each shifted input once for all three branches (the narrower
    kernels' taps are the centre of the widest).
    """
    n, c, h, w, cmask, pmask = _tile(tl.program_id(0), tl.program_id(1), C, H, W, BLOCK_C, BLOCK_H, BLOCK_W)
    base = n * sn + c[:, None] * sc
    acc0 = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)
    for j in tl.static_range(K2):
        xv = _strip_tap(x_ptr, base, cmask, h, w, H, W, sh, sw, j, K2, ALONG_W, TRANSPOSE)
        acc2 += tl.load(w2_ptr + c * K2 + j, mask=cmask, other=0.0).to(tl.float32)[:, None] * xv
        j1 = j - (K2 - K1) // 2
        if j1 >= 0 and j1 < K1:
            acc1 += tl.load(w1_ptr + c * K1 + j1, mask=cmask, other=0.0).to(tl.float32)[:, None] * xv
        j0 = j - (K2 - K0) // 2
        if j0 >= 0 and j0 < K0:
            acc0 += tl.load(w0_ptr + c * K0 + j0, mask=cmask, other=0.0).to(tl.float32)[:, None] * xv
    if HAS_BIAS:
        acc0 += tl.load(b0_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
        acc1 += tl.load(b1_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
        acc2 += tl.load(b2_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    offs = base + (h * sh + w * sw)[None, :]
    mask = cmask[:, None] & pmask[None, :]
    tl.store(o0_ptr + offs, acc0.to(o0_ptr.dtype.element_ty), mask=mask)
    tl.store(o1_ptr + offs, acc1.to(o1_ptr.dtype.element_ty), mask=mask)
    tl.store(o2_ptr + offs, acc2.to(o2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _strip_accumulate(acc, t_ptr, w_ptr, offs_c, c, cmask, h, w, H, W, sh, sw,
                      K: tl.constexpr, ALONG_W: tl.constexpr, TRANSPOSE: tl.constexpr):
    for j in tl.static_range(K):
        tv = _strip_tap(t_ptr, offs_c, cmask, h, w, H, W, sh, sw, j, K, ALONG_W, TRANSPOSE)
        acc += tl.load(w_ptr + c * K + j, mask=cmask, other=0.0).to(tl.float32)[:, None] * tv
    return acc


@autotune(configs=_CONFIGS, key=_KEY + ['ALONG_W'], prune_configs_by=_PRUNE, do_bench=_bench)
@triton.jit
def _strip3_sum_kernel(r_ptr, t0_ptr, t1_ptr, t2_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr,
                       out_ptr, C, H, W, sn, sc, sh, sw,
                       K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, ALONG_W: tl.constexpr,
                       TRANSPOSE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """out = r + sum_i (conv(t_i, w_i) + b_i), three 1-D depthwise convs along W or H."""
    n, c, h, w, cmask, pmask = _tile(tl.program_id(0), tl.program_id(1), C, H, W, BLOCK_C, BLOCK_H, BLOCK_W)
    base = n * sn + c[:, None] * sc
    offs = base + (h * sh + w * sw)[None, :]
    mask = cmask[:, None] & pmask[None, :]
    acc = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = _strip_accumulate(acc, t0_ptr, w0_ptr, base, c, cmask, h, w, H, W, sh, sw, K0, ALONG_W, TRANSPOSE)
    acc = _strip_accumulate(acc, t1_ptr, w1_ptr, base, c, cmask, h, w, H, W, sh, sw, K1, ALONG_W, TRANSPOSE)
    acc = _strip_accumulate(acc, t2_ptr, w2_ptr, base, c, cmask, h, w, H, W, sh, sw, K2, ALONG_W, TRANSPOSE)
    if HAS_BIAS:
        bias = (tl.load(b0_ptr + c, mask=cmask, other=0.0).to(tl.float32)
                + tl.load(b1_ptr + c, mask=cmask, other=0.0).to(tl.float32)
                + tl.load(b2_ptr + c, mask=cmask, other=0.0).to(tl.float32))
        acc += bias[:, None]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers (plain functions of tensors; no autograd here)
# ------------------------------------------------------------------------------------------------

_layout = layout  # channels_last or NCHW, as x is stored


def _same_layout(fmt: torch.memory_format, *tensors: torch.Tensor):
    """The tensors in memory format ``fmt``; a tensor passed several times is converted once."""
    laid = {}
    for t in tensors:
        if id(t) not in laid:
            laid[id(t)] = t.contiguous(memory_format=fmt)
    return [laid[id(t)] for t in tensors]


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """Depthwise weight C-1-KH-KW (any memory format) as contiguous C x KH*KW rows."""
    return weight.reshape(weight.shape[0], -1).contiguous()


def _grid(n: int, c: int, h: int, w: int):
    return lambda meta: (n * triton.cdiv(c, meta['BLOCK_C']),
                         triton.cdiv(h, meta['BLOCK_H']) * triton.cdiv(w, meta['BLOCK_W']))


def kernel_size(weight: torch.Tensor) -> Tuple[int, int]:
    kh, kw = weight.shape[-2:]
    if weight.ndim != 4 or weight.shape[1] != 1 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f'smmcl.kernels: expected a depthwise weight C-1-KH-KW with odd KH, KW, got '
                         f'{tuple(weight.shape)}')
    return kh, kw


DEPTHWISE_IMPLS = ('tiles', 'rows', 'bands')
_DEPTHWISE_CHOICE = {}  # (op, shape, strides, kernel sizes, dtype, device, flags) -> the faster kernel


def _depthwise_impl(impl: Optional[str], op: str, x: torch.Tensor, key: tuple, launches: dict) -> str:
    """The kernel family for one launch: ``impl``, else the environment's ``SMMCL_TRITON_DEPTHWISE``, else
    ``'auto'``: on a GPU the fastest of ``launches`` (zero-argument calls) for this op, shape, layout,
    dtype and ``key``, timed once; under the interpreter ``'tiles'`` (the tests name the others). A family
    this launch does not have (``bands`` but for the strips along W in NCHW) runs as ``rows``."""
    chosen = choose('SMMCL_TRITON_DEPTHWISE', impl, DEPTHWISE_IMPLS, x.device, 'tiles',
                    lambda: _fastest(_DEPTHWISE_CHOICE, (op, tuple(x.shape), x.stride(), x.dtype, x.device) + key,
                                     launches))
    return chosen if chosen in launches else 'rows'


def dwconv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *, transpose: bool = False,
           epilogue: int = 0, grad: Optional[torch.Tensor] = None, in_bias: Optional[torch.Tensor] = None,
           impl: Optional[str] = None) -> torch.Tensor:
    """Depthwise conv, stride 1, "same" padding: N-C-H-W -> N-C-H-W in x's dtype and memory format.

    ``transpose``: the adjoint (grad input from grad output, bias must be None). ``epilogue`` 1: exact
    GELU; 2: ``grad * GELU'(conv + bias)``. ``in_bias`` (C): the conv of ``x + in_bias`` instead, the
    sum rounded to x's dtype, as the bias add of the conv that made x would store it, and the padding
    still zeros: that conv's bias add without its pass over the map (not with ``transpose``).
    ``impl``: ``'tiles'`` (:func:`_dwconv_kernel`), ``'rows'`` (:mod:`smmcl.kernels.triton_rows`) or
    ``'auto'`` (:func:`_depthwise_impl`).
    """
    _check_device(x)
    if in_bias is not None and transpose:
        raise ValueError('smmcl.kernels.dwconv: in_bias is for the forward conv, not its adjoint')
    kh, kw = kernel_size(weight)
    n, c, h, w = x.shape
    fmt = _layout(x)
    x, = _same_layout(fmt, x)
    if grad is not None:
        grad, = _same_layout(fmt, grad)
    out = torch.empty_like(x, memory_format=fmt)
    if out.numel() == 0:
        return out
    w_rows = _rows(weight)
    args = (x, w_rows, bias if bias is not None else w_rows, grad if grad is not None else x, out,
            in_bias if in_bias is not None else w_rows, c, h, w, *x.stride())
    meta = dict(KH=kh, KW=kw, TRANSPOSE=transpose, HAS_BIAS=bias is not None, EPILOGUE=epilogue,
                IN_BIAS=in_bias is not None)
    launches = {'tiles': lambda: _dwconv_kernel[_grid(n, c, h, w)](*args, **meta),
                'rows': lambda: dwconv_rows_kernel[row_grid(n, c, h, w)](*args, **meta)}
    flags = (kh, kw, transpose, epilogue, bias is not None, in_bias is not None)
    launches[_depthwise_impl(impl, 'dwconv', x, flags, launches)]()
    return out


@triton.jit
def _border_line(b: tl.constexpr, P: tl.constexpr, length):
    """Position and presence of border line ``b`` of an axis of ``length``: lines 0 .. P - 1 are the first
    P positions, lines P .. 2P - 1 the last P; a line past the axis, or a last one that is also a first
    one (an axis shorter than 2P), is absent."""
    if b < P:
        pos = length * 0 + b  # typed as length is, so that the presence below is a runtime value too
        return pos, pos < length
    else:
        pos = length - 2 * P + b
        return pos, pos >= P


@triton.jit
def _border_sums(outs, g_ptr, c, cmask, N, ALONG, ACROSS, s_along, s_across, sn, sc, b: tl.constexpr,
                 K: tl.constexpr, ACROSS_K: tl.constexpr, ALONG_ROWS: tl.constexpr, BLOCK_L: tl.constexpr):
    """``outs`` (K x ACROSS_K per-tap sums, a tuple) plus border line ``b`` of an axis of ACROSS positions:
    the line's sum over the images and its ALONG positions, added to the taps that read outside the axis
    from it (tap i of K along that axis; every tap of the other; :func:`_border_line`, P = (K - 1) // 2)."""
    P: tl.constexpr = (K - 1) // 2
    pos, valid = _border_line(b, P, ACROSS)
    lanes = tl.zeros((c.shape[0], BLOCK_L), dtype=tl.float32)  # summed per lane, across the lanes once
    for q0 in range(0, N * ALONG, BLOCK_L):  # the line in every image: a few long tiles, not N short loops
        q = q0 + tl.arange(0, BLOCK_L)
        mask = cmask[:, None] & (q < N * ALONG * valid)[None, :]  # a product: valid may be a Python bool
        ptrs = g_ptr + (q // ALONG * sn + q % ALONG * s_along)[None, :] + c[:, None] * sc + pos * s_across
        lanes += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    total = tl.sum(lanes, axis=1)
    for i in tl.static_range(K):
        reach = pos + i - P
        hit = tl.where((reach < 0) | (reach >= ACROSS), total, 0.0)
        for j in tl.static_range(ACROSS_K):
            outs = _add_to(outs, i * ACROSS_K + j if ALONG_ROWS else j * K + i, hit)
    return outs


@triton.jit
def inside_sums_kernel(g_ptr, t_ptr, w_ptr, out_ptr, gib_ptr, N, C, H, W, sn, sc, sh, sw, KH: tl.constexpr,
                       KW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Program (channel block) writes :func:`inside_sums` of g at ``out_ptr`` (C x KH*KW, float32) from the
    border rows and columns of the map and the totals ``t`` (C), and those sums against the taps ``w``
    (C x KH*KW) at ``gib_ptr`` (C, rounded to g's dtype, stored in gib's). Sums over the rows and columns
    where a tap reads outside are taken away, the crossings of such a row and column, taken away twice,
    added back."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    PH: tl.constexpr = (KH - 1) // 2
    PW: tl.constexpr = (KW - 1) // 2
    outs = ()
    for k in tl.static_range(KH * KW):
        outs = outs + (tl.zeros((BLOCK_C,), dtype=tl.float32),)
    for b in tl.static_range(2 * PH):  # border rows: summed along W, over the taps reading above or below
        outs = _border_sums(outs, g_ptr, c, cmask, N, W, H, sw, sh, sn, sc, b, KH, KW, True, BLOCK_L)
    for b in tl.static_range(2 * PW):  # border columns
        outs = _border_sums(outs, g_ptr, c, cmask, N, H, W, sh, sw, sn, sc, b, KW, KH, False, BLOCK_L)
    for bh in tl.static_range(2 * PH):  # crossings: counted in a row's sums and a column's
        h, h_ok = _border_line(bh, PH, H)
        for bw in tl.static_range(2 * PW):
            w, w_ok = _border_line(bw, PW, W)
            ok = h_ok & w_ok
            lanes = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_L):
                n = n0 + tl.arange(0, BLOCK_L)
                mask = (c < C * ok)[:, None] & (n < N)[None, :]
                lanes += tl.load(g_ptr + n[None, :] * sn + c[:, None] * sc + h * sh + w * sw, mask=mask,
                                 other=0.0).to(tl.float32)
            corner = tl.sum(lanes, axis=1)
            for i in tl.static_range(KH):
                for j in tl.static_range(KW):
                    outside = ((h + i - PH < 0) | (h + i - PH >= H)) & ((w + j - PW < 0) | (w + j - PW >= W))
                    outs = _add_to(outs, i * KW + j, -tl.where(outside, corner, 0.0))
    total = tl.load(t_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    against_taps = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for k in tl.static_range(KH * KW):
        inside = total - outs[k]
        tl.store(out_ptr + c * (KH * KW) + k, inside, mask=cmask)
        against_taps += tl.load(w_ptr + c * (KH * KW) + k, mask=cmask, other=0.0).to(tl.float32) * inside
    tl.store(gib_ptr + c, against_taps.to(g_ptr.dtype.element_ty).to(gib_ptr.dtype.element_ty), mask=cmask)


def inside_sums(grad: torch.Tensor, total: torch.Tensor, weight: torch.Tensor, impl: str = 'triton',
                dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per channel and tap of a KH x KW "same" depthwise conv, the sum of ``grad`` (N-C-H-W, the
    gradient of the conv's output) over the positions where that tap reads inside the map, and those sums
    against the taps of ``weight`` (C-1-KH-KW). ``total`` (C) is grad's sum over all positions (the
    conv's bias gradient).

    A per-channel constant added to the conv's input inside the map adds the sums times the constant to
    the weight gradient, and the constant's own gradient is the sums against the taps (x's gradient
    summed over the map). Each sum is the total less the sums over the rows and the columns where the tap
    reads outside, plus their crossings (taken away twice), so only the rows and columns within KH // 2
    and KW // 2 of the border are read.

    Returns:
        the sums, float32 C-KH-KW, and the sums against the taps, summed in float32 and rounded to
        grad's dtype (C), stored in ``dtype`` (grad's if None). ``impl``: ``'triton'`` (one launch of
        :func:`inside_sums_kernel`) or ``'torch'`` (ATen's gathers, sums and products: a dozen small launches).
    """
    c, kh, kw = weight.shape[0], *kernel_size(weight)
    if impl == 'torch':
        rows, outside_h = _border(grad.shape[2], kh, grad.device)
        cols, outside_w = _border(grad.shape[3], kw, grad.device)
        grad_rows = grad.index_select(2, rows)  # N-C-R-W
        row_sums = grad_rows.sum((0, 3), dtype=torch.float32)  # C-R
        col_sums = grad.index_select(3, cols).sum((0, 2), dtype=torch.float32)  # C-Q
        crossings = grad_rows.index_select(3, cols).sum(0, dtype=torch.float32)  # C-R-Q
        inside = (total.float()[:, None, None] - (row_sums @ outside_h.T)[:, :, None]
                  - (col_sums @ outside_w.T)[:, None, :]
                  + torch.einsum('crq,ir,jq->cij', crossings, outside_h, outside_w))
        against_taps = (weight.float().reshape(inside.shape) * inside).sum((1, 2)).to(grad.dtype)
        return inside, against_taps.to(dtype or grad.dtype)
    n, _, h, w = grad.shape
    inside = torch.empty(c, kh, kw, device=grad.device, dtype=torch.float32)
    against_taps = torch.empty(c, device=grad.device, dtype=dtype or grad.dtype)
    # 16 channels a program, tiles of 256 positions: a handful of loads in flight per border line
    launch(inside_sums_kernel, (triton.cdiv(c, 16),), grad, total, _rows(weight), inside, against_taps, n, c, h, w,
           *grad.stride(), kh, kw, BLOCK_C=16, BLOCK_L=256)
    return inside, against_taps


def _border(length: int, k: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The positions (R) within k // 2 of either end of an axis of ``length``, and the float32 K x R
    indicator of the taps of a "same" conv that read outside the axis from them (:func:`inside_sums`'
    ATen path). Made on the device (no host copy: the backward stays capturable in a CUDA graph)."""
    pad = k // 2
    head = min(pad, length)
    index = torch.cat([torch.arange(head, device=device), torch.arange(max(length - pad, head), length, device=device)])
    reach = index[None, :] + torch.arange(k, device=device)[:, None] - pad
    return index, ((reach < 0) | (reach >= length)).float()


def _num_chunks(x: torch.Tensor, channels: int = 32, pixels: int = 256) -> int:
    """Programs along the reduction of a weight gradient: about 8 per SM for ``channels`` channels (fewer
    for more channels, which bring programs of their own), and at most one per ``pixels`` pixels. A
    function of the tensors only, not of the tile the autotuner picks, so that the partials' size is known
    before the launch."""
    gpu = gpu_properties(x.device)
    if gpu is None:
        return 2  # the interpreter: still exercises the split and the sum of partials
    sms = gpu[0]
    n, c, h, w = x.shape
    return max(1, min(triton.cdiv(8 * sms * channels, c), n * h * w // pixels))


def _row_chunks(x: torch.Tensor) -> int:
    """:func:`_num_chunks` for the row-walked weight gradients, for the layout's channel blocks (NCHW
    tiles hold 1-4 channels, channels_last tiles 16-64). A program reduces its 7 to 25 accumulators once,
    at the end; in NCHW over 32-128 columns spread across the warps, so at least 512 pixels per program
    pay for that."""
    if _layout(x) == torch.channels_last:
        return _num_chunks(x)
    return _num_chunks(x, channels=2, pixels=512)


WGRAD_IMPLS = ('gather', 'taps', 'rows', 'bands', 'torch', 'fused')


def dwconv_wgrad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 impl: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad weight C-1-KH-KW in weight's dtype, grad bias C in weight's dtype) of a depthwise conv.

    ``impl`` (default: the environment's ``SMMCL_TRITON_WGRAD``, else ``'auto'``): ``'gather'`` (all taps
    at once), ``'taps'`` (tap by tap), ``'rows'`` (bands of rows walked once, one accumulator per tap:
    :mod:`smmcl.kernels.triton_rows`), ``'bands'`` (in NCHW, up to 5 kernel rows: per kernel row one
    tensor-core product of the shifted input rows and the gradient, :mod:`smmcl.kernels.triton_bands`;
    elsewhere ``'rows'``), ``'torch'`` (PyTorch's own convolution backward, weight and bias only), or
    ``'auto'``: on a GPU the fastest of those that apply, for this shape, layout and dtype, timed once
    (the first GPU run showed the gather kernel losing to PyTorch's); under the interpreter ``'gather'``
    (the cheapest to interpret; the tests name the others). ``'fused'`` sums them inside the backward's
    own pass (:func:`dwconv_backward`, :func:`dwconv_gelu_backward`); called alone, it is ``'gather'``.
    """
    _check_device(x)
    x, grad = _same_layout(_layout(x), x, grad)
    impl = wgrad_choice(grad, x, weight, impl)
    return _WGRAD['gather' if impl == 'fused' else impl](grad, x, weight)


def wgrad_choice(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, impl: Optional[str] = None) -> str:
    """The implementation :func:`dwconv_wgrad` takes for ``impl`` (grad and x in one layout): ``'auto'``
    timed once per shape on a GPU, ``'gather'`` under the interpreter."""
    return choose('SMMCL_TRITON_WGRAD', impl, WGRAD_IMPLS, x.device, 'gather',
                  lambda: _fastest_wgrad(grad, x, weight))


def grad_and_wgrad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   in_bias: Optional[torch.Tensor] = None, gelu: bool = False, addend: Optional[torch.Tensor] = None):
    """A depthwise conv's backward pass with its weight and bias gradients summed in the same pass
    (:func:`~smmcl.kernels.triton_rows.grad_wgrad_rows_kernel`, row-walked): (out N-C-H-W in x's dtype and
    layout, grad weight, grad bias, both in weight's dtype).

    Without ``gelu``: out is x's gradient, the adjoint conv of ``grad`` (the conv's output gradient), plus
    ``addend`` (N-C-H-W or None: x's gradient from another use, added as autograd adds the two). With it:
    the conv is ``GELU(conv(x + in_bias) + bias)`` as :func:`dwconv` computes it with ``epilogue=1`` and
    ``in_bias``, grad its output's gradient, and out the gradient of the GELU's input (:func:`dwconv`'s
    ``epilogue=2``); the weight gradient is then against ``x + in_bias`` as the conv read it, and against
    out as stored.
    """
    _check_device(x)
    if gelu and addend is not None:
        raise ValueError('smmcl.kernels: grad_and_wgrad adds an addend to the adjoint conv, not to the GELU\'s '
                         'gradient')
    x, grad, *addend = _same_layout(_layout(x), x, grad, *([] if addend is None else [addend]))
    out = torch.empty_like(x, memory_format=_layout(x))
    w_rows = _rows(weight)
    dw, db = _wgrad_partials(grad_wgrad_rows_kernel, grad, x, weight, chunks=_row_chunks(x),
                             extra=(w_rows, w_rows if bias is None else bias, w_rows if in_bias is None else in_bias,
                                    out, addend[0] if addend else out),
                             GELU=gelu, HAS_BIAS=bias is not None, IN_BIAS=in_bias is not None, ADDEND=bool(addend))
    return out, dw, db


_BACKWARD_CHOICE = {}  # (op, shape, kernel, layout, dtype, flags) -> 'fused' or 'separate'


def _backward_wgrad(impl: Optional[str], op: str, x: torch.Tensor, weight: torch.Tensor, flags: tuple,
                    run) -> Optional[str]:
    """How a depthwise backward gets its weight gradient: ``'fused'`` (in its own pass), else the
    :func:`dwconv_wgrad` implementation to call (None: its own choice). ``impl`` or ``SMMCL_TRITON_WGRAD``;
    ``'auto'`` on a GPU times ``run('fused')`` against ``run(None)`` once per shape, under the
    interpreter ``'fused'``."""
    chosen = choose('SMMCL_TRITON_WGRAD', impl, WGRAD_IMPLS, x.device, 'fused',
                    lambda: _fastest(_BACKWARD_CHOICE,
                                     (op, tuple(x.shape), x.stride(), tuple(weight.shape), x.dtype, x.device) + flags,
                                     {'fused': lambda: run('fused'), 'separate': lambda: run(None)}))
    return None if chosen == 'separate' else chosen


def dwconv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, impl: Optional[str] = None,
                    addend: Optional[torch.Tensor] = None):
    """(grad x, grad weight, grad bias) of :func:`dwconv` (no epilogue), for ``grad`` its output's gradient;
    ``addend`` (N-C-H-W or None): x's gradient from another use, added to grad x as autograd adds the two.
    ``impl``: as :func:`_backward_wgrad` chooses, ``'fused'``: one pass (:func:`grad_and_wgrad`), else the
    adjoint conv (and the sum) and :func:`dwconv_wgrad` with that implementation."""
    if addend is not None and (addend.shape != grad.shape or addend.dtype != grad.dtype):
        raise ValueError(f'smmcl.kernels: dwconv_backward\'s addend must be shaped and typed as the gradient '
                         f'{tuple(grad.shape)} {grad.dtype}, got {tuple(addend.shape)} {addend.dtype}')

    def run(wgrad):
        if wgrad == 'fused':
            return grad_and_wgrad(grad, x, weight, addend=addend)
        dw, db = dwconv_wgrad(grad, x, weight, wgrad)
        grad_x = dwconv(grad, weight, None, transpose=True)
        return grad_x if addend is None else grad_x + addend, dw, db
    return run(_backward_wgrad(impl, 'dwconv', x, weight, (addend is not None,), run))


def dwconv_gelu_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         in_bias: Optional[torch.Tensor] = None, impl: Optional[str] = None) -> List[torch.Tensor]:
    """[grad x, grad weight, grad bias] of ``GELU(dwconv(x + in_bias, weight, bias))`` (:func:`dwconv` with
    ``epilogue=1``), and grad in_bias when it is given, for ``grad`` its output's gradient; the pre-GELU
    map is recomputed. ``impl``: as for :func:`dwconv_backward`.

    The input the conv saw is ``x + in_bias`` inside the map (zeros outside). The fused pass takes the
    weight gradient against it as loaded; the separate one against x, plus ``in_bias`` times, per tap, the
    sum of the GELU's input gradient over the positions where that tap reads inside the map
    (:func:`inside_sums`: the sum over all positions, which the conv's own bias gradient is, less the
    border rows and columns): the sum unrounded, a rounding to x's dtype away from the one the conv read.
    in_bias's gradient, the sum of x's gradient, is those sums against the taps. Neither reads a
    hidden-width map again."""
    def run(wgrad):
        if wgrad == 'fused':
            return grad_and_wgrad(grad, x, weight, bias, in_bias, gelu=True)
        grad_z = dwconv(x, weight, bias, epilogue=2, grad=grad, in_bias=in_bias)
        return (grad_z, *dwconv_wgrad(grad_z, x, weight, wgrad))
    wgrad = _backward_wgrad(impl, 'dwconv_gelu', x, weight, (bias is not None, in_bias is not None), run)
    grad_z, dw, db = run(wgrad)
    grad_x = dwconv(grad_z, weight, None, transpose=True)
    if in_bias is None:
        return [grad_x, dw, db]
    # in_bias's gradient summed in float32 and rounded to the gradient's dtype, as the bias gradient of the
    # conv that made x is
    inside, grad_in_bias = inside_sums(grad_z, db, weight, dtype=in_bias.dtype)  # C-KH-KW float32, C
    if wgrad != 'fused':
        dw = (dw.float() + in_bias.to(x.dtype).float()[:, None, None, None] * inside[:, None]).to(dw.dtype)
    return [grad_x, dw, db, grad_in_bias]


_WGRAD_CHOICE = {}  # (shape, kernel, layout, dtype) -> the fastest implementation


def _fastest_wgrad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> str:
    """The fastest implementation for ``grad`` and ``x`` (already in one memory layout, on a GPU), timed once."""
    key = (tuple(x.shape), tuple(weight.shape[-2:]), _layout(x), x.dtype, x.device)
    impls = {name: fn for name, fn in _WGRAD.items() if name != 'bands' or _kxk_bands_apply(grad, x, weight)}
    return _fastest(_WGRAD_CHOICE, key, impls, grad, x, weight)


def _wgrad_partials(kernel, grad, x, weight, chunks=None, extra=(), **meta):
    """The weight and bias gradients from ``kernel``'s partials; ``extra``: its arguments after KH, KW."""
    kh, kw = kernel_size(weight)
    n, c, h, w = x.shape
    chunks = chunks or _num_chunks(x)
    if x.numel() == 0:
        return weight.new_zeros(weight.shape), weight.new_zeros(c)
    # every (chunk, channel, tap) partial is written by its program: no zero-fill launches
    dw = torch.empty(chunks, c, kh * kw, device=x.device, dtype=torch.float32)
    db = torch.empty(chunks, c, device=x.device, dtype=torch.float32)
    # a kernel without BLOCK_C (the band kernel's) owns one channel a program
    kernel[lambda m: (triton.cdiv(c, m.get('BLOCK_C', 1)), chunks)](
        grad, x, dw, db, n, c, h, w, *x.stride(), chunks, kh, kw, *extra, **meta)
    grad_weight, grad_bias = (torch.empty(1, size, device=x.device, dtype=weight.dtype) for size in (c * kh * kw, c))
    _chunk_sums(dw.view(1, chunks, -1), grad_weight, None, db[None], grad_bias)
    return grad_weight.view(weight.shape), grad_bias[0]


def _wgrad_gather(grad, x, weight):
    kh, kw = kernel_size(weight)
    return _wgrad_partials(_dwconv_wgrad_kernel, grad, x, weight, TAPS=triton.next_power_of_2(kh * kw))


def _wgrad_taps(grad, x, weight):
    return _wgrad_partials(_dwconv_wgrad_taps_kernel, grad, x, weight)


def _wgrad_rows(grad, x, weight):
    return _wgrad_partials(dwconv_wgrad_rows_kernel, grad, x, weight, chunks=_row_chunks(x))


def _kxk_bands_apply(grad, x, weight) -> bool:
    return _bands_apply(x, [grad, x]) and _band_fits_kxk(*kernel_size(weight))


def _band_chunks(x: torch.Tensor) -> int:
    """:func:`_num_chunks` for the band kernels' weight gradients: one channel a program, at least 4,096
    positions each (a program reads its taps off once, at the end)."""
    return _num_chunks(x, channels=1, pixels=4096)


def _wgrad_bands(grad, x, weight):
    """The band kernel's partials, summed; the row kernel's where it does not apply."""
    if not _kxk_bands_apply(grad, x, weight):
        return _wgrad_rows(grad, x, weight)
    return _wgrad_partials(dwconv_wgrad_bands_kernel, grad, x, weight, chunks=_band_chunks(x),
                           PARTS=_band_parts(x.dtype, x.dtype))


def _wgrad_torch(grad, x, weight):
    """PyTorch's depthwise weight and bias gradients (cuDNN or its native kernels), in x's dtype as an
    autocast conv would compute them, returned in weight's dtype."""
    kh, kw = kernel_size(weight)
    c = weight.shape[0]
    _, dw, db = torch.ops.aten.convolution_backward(
        grad, x, weight.to(x.dtype), [c], [1, 1], [kh // 2, kw // 2], [1, 1], False, [0, 0], c,
        [False, True, True])
    return dw.reshape(weight.shape).to(weight.dtype), db.to(weight.dtype)


_WGRAD = {'gather': _wgrad_gather, 'taps': _wgrad_taps, 'rows': _wgrad_rows, 'bands': _wgrad_bands,
          'torch': _wgrad_torch}


def _strip_lengths(weights: Sequence[torch.Tensor], along_w: bool) -> Tuple[int, int, int]:
    lengths = tuple(kernel_size(wt)[1 if along_w else 0] for wt in weights)
    for wt in weights:
        if wt.shape[-2 if along_w else -1] != 1:
            raise ValueError(f'smmcl.kernels: expected {"1xK" if along_w else "Kx1"} strip weights, got '
                             f'{tuple(wt.shape)}')
    if not lengths[0] <= lengths[1] <= lengths[2]:
        raise ValueError(f'smmcl.kernels: strip lengths must grow, got {lengths}')
    return lengths


def strip3(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Optional[Sequence[torch.Tensor]],
           along_w: bool, transpose: bool = False, impl: Optional[str] = None) -> Tuple[torch.Tensor, ...]:
    """Three 1-D depthwise convs (1xK if ``along_w`` else Kx1) of one N-C-H-W input, in one pass.
    ``impl``: as :func:`dwconv`'s (:func:`_strip_launch`)."""
    _check_device(x)
    k0, k1, k2 = _strip_lengths(weights, along_w)
    n, c, h, w = x.shape
    fmt = _layout(x)
    x, = _same_layout(fmt, x)
    outs = [torch.empty_like(x, memory_format=fmt) for _ in range(3)]
    if x.numel() > 0:
        w_rows = [_rows(wt) for wt in weights]
        b = list(biases) if biases is not None else w_rows
        args = (x, *w_rows, *b, *outs, c, h, w, *x.stride())
        meta = dict(K0=k0, K1=k1, K2=k2, TRANSPOSE=transpose, HAS_BIAS=biases is not None)
        _strip_launch(impl, 'strip3', along_w, x, args, meta, _strip3_kernel, strip3_rows_kernel,
                      strip3_bands_kernel, [x], weights)
    return tuple(outs)


def strip3_sum(r: torch.Tensor, ts: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
               biases: Optional[Sequence[torch.Tensor]], along_w: bool, transpose: bool = False,
               impl: Optional[str] = None) -> torch.Tensor:
    """``r + sum_i conv(ts[i], weights[i]) + biases[i]``, 1-D depthwise convs along W or H, in one pass.
    ``impl``: as :func:`strip3`'s."""
    _check_device(r)
    k0, k1, k2 = _strip_lengths(weights, along_w)
    n, c, h, w = r.shape
    fmt = _layout(r)
    r, *ts = _same_layout(fmt, r, *ts)
    out = torch.empty_like(r, memory_format=fmt)
    if r.numel() > 0:
        w_rows = [_rows(wt) for wt in weights]
        b = list(biases) if biases is not None else w_rows
        args = (r, *ts, *w_rows, *b, out, c, h, w, *r.stride())
        meta = dict(K0=k0, K1=k1, K2=k2, TRANSPOSE=transpose, HAS_BIAS=biases is not None)
        _strip_launch(impl, 'strip3_sum', along_w, r, args, meta, _strip3_sum_kernel, strip3_sum_rows_kernel,
                      strip3_sum_bands_kernel, ts, weights)
    return out


def _strip_launch(impl, op, along_w, x, args, meta, tile_kernel, row_kernel, band_kernel, inputs, weights) -> None:
    """One launch of a three-strip kernel: the tile, the row or the band kernel (:func:`_depthwise_impl`).
    Along W in channels_last the row kernel walks the columns: it sees the map with H and W (and their
    strides) swapped, which keeps its loads coalesced (the channels are contiguous); in NCHW, where the
    rows are, it runs along W as it is (each output row's shifts loaded once), and the band kernel
    (:mod:`smmcl.kernels.triton_bands`) is a third choice there. ``inputs``: the tensors the strips
    convolve (the band kernel's products take one dtype)."""
    n, c, h, w = x.shape
    launches = {'tiles': lambda: tile_kernel[_grid(n, c, h, w)](*args, ALONG_W=along_w, **meta)}
    if along_w and _layout(x) == torch.channels_last:  # ..., C, H, W, sn, sc, sh, sw -> ..., C, W, H, sn, sc, sw, sh
        swapped = args[:-7] + (c, w, h, args[-4], args[-3], args[-1], args[-2])
        launches['rows'] = lambda: row_kernel[row_grid(n, c, w, h)](*swapped, ALONG_W=False, **meta)
    else:
        launches['rows'] = lambda: row_kernel[row_grid(n, c, h, w)](*args, ALONG_W=along_w, **meta)
    if _strip_bands_apply(along_w, meta['K2'], x, inputs):
        parts = max(_band_parts(inputs[0].dtype, wt.dtype) for wt in weights)
        band_args = args[:-7] + (n,) + args[-7:]  # ..., out(s), N, C, H, W, strides
        launches['bands'] = lambda: band_kernel[_band_programs(n, c, h, w, _sms(x))](*band_args, PARTS=parts,
                                                                                       **meta)
    key = (along_w, meta['K0'], meta['K1'], meta['K2'], meta['TRANSPOSE'], meta['HAS_BIAS'])
    launches[_depthwise_impl(impl, op, x, key, launches)]()


def _bands_apply(x: torch.Tensor, inputs: Sequence[torch.Tensor]) -> bool:
    """Whether the band kernels can take ``x`` and ``inputs`` (whose kernel sizes the caller checks): NCHW
    with contiguous rows, one dtype, tensor cores with bfloat16 and TF32 (or the interpreter)."""
    return (_layout(x) == torch.contiguous_format and x.stride(-1) == 1 and len({t.dtype for t in inputs}) == 1
            and _band_products(x.device))


def _strip_bands_apply(along_w: bool, k2: int, x: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the band kernels run three strips of at most ``k2`` taps on ``x`` and ``tensors``: along W,
    within the widest band, and :func:`_bands_apply`."""
    return along_w and _band_fits(k2) and _bands_apply(x, tensors)


def _band_products(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 and TF32 on tensor cores (CUDA sm_80 on; the interpreter)."""
    gpu = gpu_properties(device)
    return gpu is None or gpu[1][0] >= 8


def _sms(x: torch.Tensor) -> int:
    gpu = gpu_properties(x.device)
    return 2 if gpu is None else gpu[0]


# ---- weight gradients of three strip convs -------------------------------------------------------------

STRIP_WGRAD_IMPLS = ('fused', 'rows', 'bands', 'separate')


def packed_strip_wgrad_length(channels: int, lengths: Sequence[int]) -> int:
    """Entries of the packed weight and bias gradients of three strip convs of ``lengths`` taps."""
    return channels * (sum(lengths) + 3)


def unpack_strip3_wgrad(packed: torch.Tensor, weights: Sequence[torch.Tensor]):
    """``((dw_i, db_i) for i = 0, 1, 2)`` from the float32 vector of :func:`strip3_wgrad_packed`: dw_i
    shaped like weights[i], db_i of size C, both in weights[i]'s dtype (views of the vector for float32
    weights)."""
    c = weights[0].shape[0]
    parts = packed.split([wt.numel() for wt in weights] + [c] * 3)
    return tuple((parts[i].view(wt.shape).to(wt.dtype), parts[3 + i].to(wt.dtype)) for i, wt in enumerate(weights))


def strip3_wgrad_packed(grads: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                        along_w: bool, impl: Optional[str] = None) -> torch.Tensor:
    """Weight and bias gradients of three 1-D depthwise convs, packed in one float32 vector of
    :func:`packed_strip_wgrad_length` entries, ``dw_0 | dw_1 | dw_2 | db_0 | db_1 | db_2`` (each dw_i
    C x K_i; :func:`unpack_strip3_wgrad` gives them the weights' shapes). One tensor, because the outputs
    of a custom op may not share storage.

    Args:
        grads: three N-C-H-W gradients of the convs' outputs (one tensor may be passed three times).
        xs: three N-C-H-W inputs of the convs, shaped as ``grads`` (one tensor may repeat).
        weights: C-1-1-K_i if ``along_w`` else C-1-K_i-1, K_0 <= K_1 <= K_2 odd.

    ``impl`` (default: the environment's ``SMMCL_TRITON_STRIP_WGRAD``, else ``'auto'``): ``'fused'`` (one
    launch of ``_strip3_wgrad_kernel``), ``'rows'`` (one launch of the row-walked kernel of
    :mod:`smmcl.kernels.triton_rows`), ``'bands'`` (along W in NCHW, one launch of
    :mod:`smmcl.kernels.triton_bands`' tensor-core products; elsewhere ``'rows'``), ``'separate'`` (three
    :func:`dwconv_wgrad` calls, which follow ``SMMCL_TRITON_WGRAD``), or ``'auto'``: on a GPU the fastest
    of those that apply, for this shape, direction, layout and dtype, timed once; under the interpreter
    ``'fused'``.
    """
    return _STRIP_WGRAD[strip_wgrad_choice(grads, xs, weights, along_w, impl)](grads, xs, weights, along_w)


def strip_wgrad_choice(grads, xs, weights, along_w: bool, impl: Optional[str] = None) -> str:
    """The implementation :func:`strip3_wgrad_packed` takes for ``impl``: ``'auto'`` timed once per shape
    on a GPU, ``'fused'`` under the interpreter."""
    return choose('SMMCL_TRITON_STRIP_WGRAD', impl, STRIP_WGRAD_IMPLS, xs[0].device, 'fused',
                  lambda: _fastest_strip_wgrad(grads, xs, weights, along_w))


_STRIP_WGRAD_CHOICE = {}  # (shape, lengths, direction, layout, dtypes, device) -> the faster implementation


def _fastest_strip_wgrad(grads, xs, weights, along_w) -> str:
    """The fastest of the implementations that apply to these tensors (on a GPU), timed once per key."""
    x = xs[0]
    lengths = _strip_lengths(weights, along_w)
    key = (tuple(x.shape), lengths, along_w, _layout(x), grads[0].dtype, x.dtype, x.device)
    impls = {name: fn for name, fn in _STRIP_WGRAD.items()
             if name != 'bands' or _strip_bands_apply(along_w, lengths[2], x, [*xs, *grads])}
    # the separate path's own choices (SMMCL_TRITON_WGRAD=auto) are timed in do_bench's first call
    return _fastest(_STRIP_WGRAD_CHOICE, key, impls, grads, xs, weights, along_w)


def _strip3_wgrad_fused(grads, xs, weights, along_w, family: str = 'tiles') -> torch.Tensor:
    """The packed partials of one launch, summed: the tile kernel, the row-walked one (``family='rows'``)
    or the band products (``'bands'``, along W in NCHW; elsewhere as ``'rows'``)."""
    _check_device(xs[0])
    lengths = _strip_lengths(weights, along_w)
    n, c, h, w = xs[0].shape
    if any(t.shape != xs[0].shape for t in (*grads, *xs)) or len({t.dtype for t in grads}) > 1 \
            or len({t.dtype for t in xs}) > 1:
        raise ValueError('smmcl.kernels: strip3_wgrad needs three gradients of one dtype and three inputs of one '
                         f'dtype, all of one shape; got {[(tuple(t.shape), t.dtype) for t in (*grads, *xs)]}')
    if xs[0].numel() == 0:
        return torch.zeros(packed_strip_wgrad_length(c, lengths), device=xs[0].device)
    *grads, x0, x1, x2 = _same_layout(_layout(xs[0]), *grads, *xs)
    if family == 'bands' and not _strip_bands_apply(along_w, lengths[2], x0, [x0, *grads]):
        family = 'rows'
    chunks = {'tiles': _num_chunks, 'rows': _row_chunks, 'bands': _band_chunks}[family](x0)
    # every entry is written by exactly one program: no zero-fill launch
    partials = torch.empty(chunks, packed_strip_wgrad_length(c, lengths), device=x0.device, dtype=torch.float32)
    grid = lambda m: (triton.cdiv(c, m['BLOCK_C']), chunks, 3)  # noqa: E731
    if family == 'bands':
        strip3_wgrad_bands_kernel[(c, chunks)](
            *grads, x0, x1, x2, partials, n, c, h, w, *x0.stride(), chunks, *lengths,
            ONE_INPUT=x0 is x1 and x1 is x2, PARTS=_band_parts(x0.dtype, x0.dtype))  # one dtype (_bands_apply)
    elif family == 'tiles':
        _strip3_wgrad_kernel[grid](
            *grads, x0, x1, x2, partials, n, c, h, w, *x0.stride(), chunks, *lengths,
            TAPS0=triton.next_power_of_2(lengths[0]), TAPS1=triton.next_power_of_2(lengths[1]),
            TAPS2=triton.next_power_of_2(lengths[2]), ALONG_W=along_w)
    elif along_w and _layout(x0) == torch.channels_last:  # walk the columns: H and W swapped, as _strip_launch
        sn, sc, sh, sw = x0.stride()
        strip3_wgrad_rows_kernel[grid](*grads, x0, x1, x2, partials, n, c, w, h, sn, sc, sw, sh, chunks, *lengths,
                                       ALONG_W=False)
    else:
        strip3_wgrad_rows_kernel[grid](*grads, x0, x1, x2, partials, n, c, h, w, *x0.stride(), chunks, *lengths,
                                       ALONG_W=along_w)
    packed = torch.empty(1, partials.shape[1], device=x0.device, dtype=torch.float32)
    _chunk_sums(partials[None], packed)
    return packed[0]


def _strip3_wgrad_rows(grads, xs, weights, along_w) -> torch.Tensor:
    return _strip3_wgrad_fused(grads, xs, weights, along_w, family='rows')


def _strip3_wgrad_bands(grads, xs, weights, along_w) -> torch.Tensor:
    return _strip3_wgrad_fused(grads, xs, weights, along_w, family='bands')


def _strip3_wgrad_separate(grads, xs, weights, along_w) -> torch.Tensor:
    pairs = [dwconv_wgrad(g, x, wt) for g, x, wt in zip(grads, xs, weights)]
    return torch.cat([dw.reshape(-1) for dw, _ in pairs] + [db for _, db in pairs]).float()


_STRIP_WGRAD = {'fused': _strip3_wgrad_fused, 'rows': _strip3_wgrad_rows, 'bands': _strip3_wgrad_bands,
                'separate': _strip3_wgrad_separate}
