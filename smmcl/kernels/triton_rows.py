"""Row-blocked Triton kernels for MSCAN's depthwise convolutions along H (KxK, and the Kx1 strips).

The tile kernels of :mod:`smmcl.kernels.triton_dwconv` compute BLOCK_H x BLOCK_W output pixels and load
every tap's input for each, so a K-row kernel reads each input row K times per tap column and computes
its address and bounds K times: on an H200 they reach ~15 % of the copy bandwidth (docs/speed.md), far
more address arithmetic than memory traffic. Here a program owns ROWS consecutive output rows of a
BLOCK_C x BLOCK_W strip and walks the ROWS + K - 1 input rows they need once: each input row is loaded
once per tap column, its bounds are one scalar test, and it is added to every output row it reaches with
that row's tap weight (a ROWS x BLOCK_C x BLOCK_W float32 accumulator; the rows a tap does not reach
get a zero weight, the price of a static, branch-free loop).

Same function as the tile kernels (float32 accumulation, results in the output's dtype), same strides
convention (N-C-H-W tensors of any strides, all of one launch alike, weights as contiguous C x KH*KW
rows). :mod:`smmcl.kernels.triton_dwconv`'s launchers pick between the two (``SMMCL_TRITON_DEPTHWISE``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import KEY, PRUNE, bench, configs, gelu, gelu_grad

# (BLOCK_C, ROWS, BLOCK_W, warps): NCHW tiles are wide rows of one or two channels, channels_last tiles
# many channels of a few pixels (the pruning keeps the layout's own). More rows share more loads but
# waste more multiply-adds on taps that do not reach (ROWS + K - 1 rows for ROWS outputs).
_NCHW_ROWS = [(1, 4, 64, 4), (1, 8, 64, 4), (1, 8, 128, 8), (2, 4, 64, 4)]
_NHWC_ROWS = [(32, 4, 8, 4), (32, 8, 8, 8), (64, 4, 4, 4), (16, 8, 8, 4)]
_NAMES = ('BLOCK_C', 'ROWS', 'BLOCK_W')
ROW_CONFIGS = configs(_NCHW_ROWS, _NHWC_ROWS, (32, 4, 16, 4), _NAMES)
# Three accumulators (one per strip) for the strips' kernel: fewer rows, so that no variant spills.
STRIP_ROW_CONFIGS = configs(_NCHW_ROWS[:2] + [(1, 4, 128, 8)], _NHWC_ROWS[:1] + [(32, 4, 4, 4), (16, 4, 8, 4)],
                            (32, 4, 16, 4), _NAMES)


@triton.jit
def _row_tile(pid_nc, pid_hw, C, H, W, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """Image index, channels (BLOCK_C), first output row, columns (BLOCK_W), the output rows (ROWS),
    the channel mask and the ROWS x BLOCK_C x BLOCK_W output mask of a program's tile."""
    num_cb = tl.cdiv(C, BLOCK_C)
    num_wb = tl.cdiv(W, BLOCK_W)
    n = pid_nc // num_cb
    c = (pid_nc % num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    h0 = (pid_hw // num_wb) * ROWS
    w = (pid_hw % num_wb) * BLOCK_W + tl.arange(0, BLOCK_W)
    o = tl.arange(0, ROWS)
    cmask = c < C
    mask = ((h0 + o) < H)[:, None, None] & cmask[None, :, None] & (w < W)[None, None, :]
    return n, c, h0, w, o, cmask, mask


@triton.jit
def _tap_row(r, o, SPAN: tl.constexpr, K: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Per output row ``h0 + o``, the tap row of a K-row kernel that reads input row ``h0 + r - SPAN``
    (SPAN: the half height of the widest kernel of the walk); outside [0, K) where it reads none."""
    if TRANSPOSE:  # the adjoint: out[h] = sum_i w[i] x[h - i + (K - 1) // 2]
        return o - r + SPAN + (K - 1) // 2
    return r - SPAN - o + (K - 1) // 2


@triton.jit
def _tap_weights(w_ptr, c, cmask, tap, j, K: tl.constexpr, KW: tl.constexpr):
    """ROWS x BLOCK_C float32 weights of tap (``tap``, ``j``) of C x K*KW rows, 0 where ``tap`` is outside."""
    use = (tap >= 0) & (tap < K)
    return tl.load(w_ptr + c[None, :] * (K * KW) + (tap * KW + j)[:, None], mask=use[:, None] & cmask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _input_row(x_c, cmask, hh, w, H, W, sh, sw, j, KW: tl.constexpr, TRANSPOSE: tl.constexpr):
    """BLOCK_C x BLOCK_W float32 input row ``hh`` at the columns tap column ``j`` reads, 0 outside."""
    if TRANSPOSE:
        ww = w - (j - (KW - 1) // 2)
    else:
        ww = w + (j - (KW - 1) // 2)
    # Row ``hh`` outside the map empties the column range: one scalar test per row (Triton's interpreter
    # cannot combine a scalar mask with a vector one, so it goes through the bound).
    width = tl.where((hh >= 0) & (hh < H), W, 0)
    inside = (ww >= 0) & (ww < width)
    return tl.load(x_c + hh * sh + (ww * sw)[None, :], mask=cmask[:, None] & inside[None, :], other=0.0).to(tl.float32)


@triton.jit
def _accumulate_rows(acc, x_c, w_ptr, c, cmask, h0, w, o, H, W, sh, sw,
                     KH: tl.constexpr, KW: tl.constexpr, TRANSPOSE: tl.constexpr, ROWS: tl.constexpr):
    """``acc`` (ROWS x BLOCK_C x BLOCK_W) plus the KH x KW depthwise conv (or its adjoint) of the input at
    ``x_c`` (BLOCK_C x 1 channel pointers of one image) for output rows h0 .. h0 + ROWS - 1."""
    for r in tl.static_range(ROWS + KH - 1):
        hh = h0 + r - (KH - 1) // 2
        tap = _tap_row(r, o, (KH - 1) // 2, KH, TRANSPOSE)
        for j in tl.static_range(KW):
            xv = _input_row(x_c, cmask, hh, w, H, W, sh, sw, j, KW, TRANSPOSE)
            acc += _tap_weights(w_ptr, c, cmask, tap, j, KH, KW)[:, :, None] * xv[None, :, :]
    return acc


@triton.jit
def _out_offsets(n, c, h0, w, o, sn, sc, sh, sw):
    """ROWS x BLOCK_C x BLOCK_W element offsets of a program's output tile."""
    return n * sn + ((h0 + o) * sh)[:, None, None] + (c * sc)[None, :, None] + (w * sw)[None, None, :]


@triton.autotune(configs=ROW_CONFIGS, key=KEY, prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def dwconv_rows_kernel(x_ptr, w_ptr, b_ptr, g_ptr, out_ptr, C, H, W, sn, sc, sh, sw,
                       KH: tl.constexpr, KW: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       EPILOGUE: tl.constexpr,
                       BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """``_dwconv_kernel``'s function, row-blocked: out = epilogue(conv(x, w) + b), depthwise, "same"
    padding; TRANSPOSE the adjoint; EPILOGUE 0 none, 1 exact GELU, 2 ``g * GELU'(conv + b)``."""
    n, c, h0, w, o, cmask, mask = _row_tile(tl.program_id(0), tl.program_id(1), C, H, W, BLOCK_C, ROWS, BLOCK_W)
    acc = tl.zeros((ROWS, BLOCK_C, BLOCK_W), dtype=tl.float32)
    acc = _accumulate_rows(acc, x_ptr + n * sn + (c * sc)[:, None], w_ptr, c, cmask, h0, w, o, H, W, sh, sw,
                           KH, KW, TRANSPOSE, ROWS)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :, None]
    offs = _out_offsets(n, c, h0, w, o, sn, sc, sh, sw)
    if EPILOGUE == 1:
        acc = gelu(acc)
    elif EPILOGUE == 2:
        acc = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * gelu_grad(acc)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=ROW_CONFIGS, key=KEY, prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def strip3_sum_rows_kernel(r_ptr, t0_ptr, t1_ptr, t2_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr,
                           out_ptr, C, H, W, sn, sc, sh, sw,
                           K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, TRANSPOSE: tl.constexpr,
                           HAS_BIAS: tl.constexpr,
                           BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """``_strip3_sum_kernel``'s function along H, row-blocked: out = r + sum_i (conv(t_i, w_i) + b_i),
    three K_i x 1 depthwise convs."""
    n, c, h0, w, o, cmask, mask = _row_tile(tl.program_id(0), tl.program_id(1), C, H, W, BLOCK_C, ROWS, BLOCK_W)
    offs = _out_offsets(n, c, h0, w, o, sn, sc, sh, sw)
    acc = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    channels = n * sn + (c * sc)[:, None]
    acc = _accumulate_rows(acc, t0_ptr + channels, w0_ptr, c, cmask, h0, w, o, H, W, sh, sw, K0, 1, TRANSPOSE, ROWS)
    acc = _accumulate_rows(acc, t1_ptr + channels, w1_ptr, c, cmask, h0, w, o, H, W, sh, sw, K1, 1, TRANSPOSE, ROWS)
    acc = _accumulate_rows(acc, t2_ptr + channels, w2_ptr, c, cmask, h0, w, o, H, W, sh, sw, K2, 1, TRANSPOSE, ROWS)
    if HAS_BIAS:
        bias = (tl.load(b0_ptr + c, mask=cmask, other=0.0).to(tl.float32)
                + tl.load(b1_ptr + c, mask=cmask, other=0.0).to(tl.float32)
                + tl.load(b2_ptr + c, mask=cmask, other=0.0).to(tl.float32))
        acc += bias[None, :, None]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=STRIP_ROW_CONFIGS, key=KEY, prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def strip3_rows_kernel(x_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, o0_ptr, o1_ptr, o2_ptr,
                       C, H, W, sn, sc, sh, sw,
                       K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, TRANSPOSE: tl.constexpr,
                       HAS_BIAS: tl.constexpr,
                       BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """``_strip3_kernel``'s function along H, row-blocked: o_i = conv(x, w_i) + b_i, three K_i x 1
    depthwise convs of one input (K0 <= K1 <= K2); each input row is loaded once for all three."""
    n, c, h0, w, o, cmask, mask = _row_tile(tl.program_id(0), tl.program_id(1), C, H, W, BLOCK_C, ROWS, BLOCK_W)
    acc0 = tl.zeros((ROWS, BLOCK_C, BLOCK_W), dtype=tl.float32)
    acc1 = tl.zeros((ROWS, BLOCK_C, BLOCK_W), dtype=tl.float32)
    acc2 = tl.zeros((ROWS, BLOCK_C, BLOCK_W), dtype=tl.float32)
    x_c = x_ptr + n * sn + (c * sc)[:, None]
    span = (K2 - 1) // 2
    for r in tl.static_range(ROWS + K2 - 1):
        xv = _input_row(x_c, cmask, h0 + r - span, w, H, W, sh, sw, 0, 1, TRANSPOSE)[None, :, :]
        acc2 += _tap_weights(w2_ptr, c, cmask, _tap_row(r, o, span, K2, TRANSPOSE), 0, K2, 1)[:, :, None] * xv
        acc1 += _tap_weights(w1_ptr, c, cmask, _tap_row(r, o, span, K1, TRANSPOSE), 0, K1, 1)[:, :, None] * xv
        acc0 += _tap_weights(w0_ptr, c, cmask, _tap_row(r, o, span, K0, TRANSPOSE), 0, K0, 1)[:, :, None] * xv
    if HAS_BIAS:
        acc0 += tl.load(b0_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :, None]
        acc1 += tl.load(b1_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :, None]
        acc2 += tl.load(b2_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :, None]
    offs = _out_offsets(n, c, h0, w, o, sn, sc, sh, sw)
    tl.store(o0_ptr + offs, acc0.to(o0_ptr.dtype.element_ty), mask=mask)
    tl.store(o1_ptr + offs, acc1.to(o1_ptr.dtype.element_ty), mask=mask)
    tl.store(o2_ptr + offs, acc2.to(o2_ptr.dtype.element_ty), mask=mask)


def grid(n: int, c: int, h: int, w: int):
    """The launch grid of the row kernels: (image x channel block, row block x column block)."""
    return lambda meta: (n * triton.cdiv(c, meta['BLOCK_C']),
                         triton.cdiv(h, meta['ROWS']) * triton.cdiv(w, meta['BLOCK_W']))
