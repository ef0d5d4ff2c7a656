"""Row-blocked Triton kernels for MSCAN's depthwise convolutions (KxK, the strips, their weight gradients).

The tile kernels of :mod:`smmcl.kernels.triton_dwconv` compute BLOCK_H x BLOCK_W output pixels and load
every tap's input for each, so a K-row kernel reads each input row K times per tap column and computes
its address and bounds K times: on an H200 they reach ~15 % of the copy bandwidth (docs/speed.md), far
more address arithmetic than memory traffic. Here a program owns ROWS (<= 4) consecutive output rows of
a BLOCK_C x BLOCK_W strip, each its own float32 accumulator, and walks the ROWS + K - 1 input rows they
need once: each input row is loaded once per tap column, its bounds are one scalar test, and it is added
to each output row it reaches with that row's tap weight; which rows it reaches is decided when the
kernel is compiled, so nothing is spent on the others. (One ROWS x BLOCK_C x BLOCK_W accumulator would
not do: Triton spreads its rows over the warps, and every warp then loads the input row again.) For
sm_90, ``bench/sass.py`` counts about half the tile kernels' instructions and a third of their loads
per output.

Along W the strips' launcher runs the same kernels with H and W swapped (the rows walked are then the
columns) where the channels are contiguous (channels_last), which keeps the loads coalesced; in NCHW the
strip kernels run along W as they are (``ALONG_W``: each output row's shifts loaded once for all three
strips).

The weight gradients walk bands of rows the same way (:func:`_wgrad_rows_job`): one accumulator per tap
instead of per output row, each input row of a band loaded once per tap column and multiplied with every
gradient row it meets; ``bench/sass.py`` counts a third to an eighth of the gather and tap-by-tap
kernels' instructions per position.

Same function as the tile kernels (float32 accumulation, results in the output's dtype), same strides
convention (N-C-H-W tensors of any strides, all of one launch alike, weights as contiguous C x KH*KW
rows). :mod:`smmcl.kernels.triton_dwconv`'s launchers pick among these, the tile kernels and, along W in
NCHW, the band kernels of :mod:`smmcl.kernels.triton_bands` (``SMMCL_TRITON_DEPTHWISE``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import KEY, PRUNE, add_to, bench, configs, conv_bias, gelu, gelu_grad, load_input
from .triton_compile import autotune
from .triton_common import packed_strip_slots

# (BLOCK_C, ROWS, BLOCK_W, warps). Each of the ROWS output rows is its own BLOCK_C x BLOCK_W accumulator,
# so a row holds at least one element per thread (BLOCK_C * BLOCK_W >= 32 * warps: no thread repeats
# another's work). NCHW tiles are wide rows of one to four channels, channels_last tiles many channels of a
# few pixels (the pruning keeps the layout's own). ROWS <= 4 (four accumulators per input). The last two of
# each layout give each thread more of a row (8 columns in NCHW, 4-8 channels in channels_last: wider
# loads, each tap's weight loaded for more outputs): for sm_90 about a third fewer lane instructions per
# output (bench/sass.py: the 5x5 conv 66 against 100 in NCHW, 62 against 101 in channels_last), up to
# 255 registers without spilling (fewer warps per SM): the autotuner weighs the two.
_NCHW_ROWS = [(1, 4, 256, 4), (1, 2, 256, 4), (2, 4, 128, 4), (4, 4, 32, 4), (1, 4, 512, 4), (1, 4, 1024, 4)]
_NHWC_ROWS = [(32, 4, 8, 4), (64, 4, 4, 4), (32, 2, 8, 4), (16, 4, 16, 4), (64, 4, 8, 4), (128, 4, 8, 4)]
_NAMES = ('BLOCK_C', 'ROWS', 'BLOCK_W')


def _at_most_four_rows(candidates):
    return [c for c in candidates if c.kwargs['ROWS'] <= 4]  # the sweep's neighbours may double ROWS


ROW_CONFIGS = _at_most_four_rows(configs(_NCHW_ROWS, _NHWC_ROWS, (32, 4, 16, 4), _NAMES))
# Three sets of accumulators (one per strip) for the strips' kernel: smaller rows, so that no variant spills
# (the last of each layout: twice the row a thread holds, up to 253 registers).
STRIP_ROW_CONFIGS = _at_most_four_rows(configs([(1, 4, 128, 4), (1, 2, 256, 4), (2, 2, 64, 4), (1, 4, 256, 4),
                                                (1, 4, 512, 4)],
                                               [(32, 4, 4, 4), (16, 4, 8, 4), (32, 2, 4, 4), (64, 4, 4, 4),
                                                (64, 4, 8, 4)], (32, 4, 16, 4), _NAMES))


@triton.jit
def _row_tile(pid_nc, pid_hw, C, H, W, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """Image index, channels (BLOCK_C), first output row, columns (BLOCK_W) and channel mask of a
    program's tile of ROWS output rows."""
    num_cb = tl.cdiv(C, BLOCK_C)
    num_wb = tl.cdiv(W, BLOCK_W)
    n = pid_nc // num_cb
    c = (pid_nc % num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    h0 = (pid_hw // num_wb) * ROWS
    w = (pid_hw % num_wb) * BLOCK_W + tl.arange(0, BLOCK_W)
    return n, c, h0, w, c < C


@triton.jit
def _input_row(x_c, cmask, hh, w, H, W, sh, sw, j, KW: tl.constexpr, TRANSPOSE: tl.constexpr, ib=0.0,
               IN_BIAS: tl.constexpr = False):
    """BLOCK_C x BLOCK_W float32 input row ``hh`` at the columns tap column ``j`` reads, 0 outside; with
    IN_BIAS plus ``ib`` inside (:func:`~smmcl.kernels.triton_common.load_input`)."""
    if TRANSPOSE:
        ww = w - (j - (KW - 1) // 2)
    else:
        ww = w + (j - (KW - 1) // 2)
    # Row ``hh`` outside the map empties the column range: one scalar test per row (Triton's interpreter
    # cannot combine a scalar mask with a vector one, so it goes through the bound).
    width = tl.where((hh >= 0) & (hh < H), W, 0)
    mask = cmask[:, None] & ((ww >= 0) & (ww < width))[None, :]
    return load_input(x_c + hh * sh + (ww * sw)[None, :], mask, ib, IN_BIAS)


@triton.jit
def _add_tap(acc, xv, w_ptr, c, cmask, r: tl.constexpr, o: tl.constexpr, j: tl.constexpr, SPAN: tl.constexpr,
             K: tl.constexpr, KW: tl.constexpr, TRANSPOSE: tl.constexpr):
    """``acc`` (output row ``h0 + o``) plus input row ``h0 + r - SPAN`` (``xv``) times its tap (i, j) of a
    K x KW kernel (C x K*KW weight rows): i = r - SPAN - o + (K - 1) // 2, mirrored for the adjoint.
    Decided when compiling: a row the kernel does not reach adds nothing and costs nothing."""
    SIGN: tl.constexpr = 1 - 2 * TRANSPOSE
    TAP: tl.constexpr = SIGN * (r - SPAN - o) + (K - 1) // 2
    if TAP >= 0:
        if TAP < K:
            acc += tl.load(w_ptr + c * (K * KW) + (TAP * KW + j), mask=cmask, other=0.0).to(tl.float32)[:, None] * xv
    return acc


@triton.jit
def _walk(a0, a1, a2, a3, x_c, w_ptr, c, cmask, h0, w, H, W, sh, sw, SPAN: tl.constexpr, K: tl.constexpr,
          KW: tl.constexpr, TRANSPOSE: tl.constexpr, ROWS: tl.constexpr, ib=0.0, IN_BIAS: tl.constexpr = False):
    """The accumulators of output rows h0 .. h0 + ROWS - 1 (a0 .. a3, ROWS <= 4) plus the K x KW depthwise
    conv (or its adjoint) of the input at ``x_c`` (BLOCK_C x 1 channel pointers of one image; with
    IN_BIAS plus ``ib`` inside the map): the ROWS + 2 * SPAN input rows are walked once, each loaded once
    per tap column and added to every output row it reaches (SPAN: the half height of the widest kernel
    sharing the walk)."""
    for r in tl.static_range(ROWS + 2 * SPAN):
        for j in tl.static_range(KW):
            xv = _input_row(x_c, cmask, h0 + r - SPAN, w, H, W, sh, sw, j, KW, TRANSPOSE, ib, IN_BIAS)
            a0 = _add_tap(a0, xv, w_ptr, c, cmask, r, 0, j, SPAN, K, KW, TRANSPOSE)
            if ROWS > 1:
                a1 = _add_tap(a1, xv, w_ptr, c, cmask, r, 1, j, SPAN, K, KW, TRANSPOSE)
            if ROWS > 2:
                a2 = _add_tap(a2, xv, w_ptr, c, cmask, r, 2, j, SPAN, K, KW, TRANSPOSE)
            if ROWS > 3:
                a3 = _add_tap(a3, xv, w_ptr, c, cmask, r, 3, j, SPAN, K, KW, TRANSPOSE)
    return a0, a1, a2, a3


@triton.jit
def _row_mask(cmask, h, w, H, W):
    """BLOCK_C x BLOCK_W mask of output row ``h`` (a row below the map empties the column range)."""
    return cmask[:, None] & (w < tl.where(h < H, W, 0))[None, :]


@triton.jit
def _row_offsets(n, c, h, w, sn, sc, sh, sw):
    """BLOCK_C x BLOCK_W element offsets of output row ``h``."""
    return n * sn + h * sh + (c * sc)[:, None] + (w * sw)[None, :]


@triton.jit
def _finish_row(acc, out_ptr, b_ptr, g_ptr, n, c, cmask, h, w, H, W, sn, sc, sh, sw, HAS_BIAS: tl.constexpr,
                EPILOGUE: tl.constexpr):
    """Store output row ``h``: ``epilogue(acc + b)`` (0 none, 1 exact GELU, 2 ``g * GELU'(acc + b)``)."""
    offs = _row_offsets(n, c, h, w, sn, sc, sh, sw)
    mask = _row_mask(cmask, h, w, H, W)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    if EPILOGUE == 1:
        acc = gelu(acc)
    elif EPILOGUE == 2:
        acc = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * gelu_grad(acc)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# keyed by the kernel shape and epilogue too: one op's tuning must not pass to another on a map of one size
@autotune(configs=ROW_CONFIGS, key=KEY + ['KH', 'KW', 'EPILOGUE', 'IN_BIAS'], prune_configs_by=PRUNE,
          do_bench=bench)
@triton.jit
def dwconv_rows_kernel(x_ptr, w_ptr, b_ptr, g_ptr, out_ptr, ib_ptr, C, H, W, sn, sc, sh, sw,
                       KH: tl.constexpr, KW: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       EPILOGUE: tl.constexpr, IN_BIAS: tl.constexpr,
                       BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """``_dwconv_kernel``'s function, row-blocked: out = epilogue(conv(x, w) + b), depthwise, "same"
    padding; TRANSPOSE the adjoint; EPILOGUE 0 none, 1 exact GELU, 2 ``g * GELU'(conv + b)``; IN_BIAS
    the input plus ``ib`` per channel inside the map."""
    tl.static_assert(ROWS <= 4)
    n, c, h0, w, cmask = _row_tile(tl.program_id(0), tl.program_id(1), C, H, W, BLOCK_C, ROWS, BLOCK_W)
    a0 = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)
    a1, a2, a3 = a0, a0, a0
    ib = 0.0
    if IN_BIAS:
        ib = conv_bias(ib_ptr, c, cmask, x_ptr)[:, None]
    a0, a1, a2, a3 = _walk(a0, a1, a2, a3, x_ptr + n * sn + (c * sc)[:, None], w_ptr, c, cmask, h0, w, H, W,
                           sh, sw, (KH - 1) // 2, KH, KW, TRANSPOSE, ROWS, ib, IN_BIAS)
    _finish_row(a0, out_ptr, b_ptr, g_ptr, n, c, cmask, h0, w, H, W, sn, sc, sh, sw, HAS_BIAS, EPILOGUE)
    if ROWS > 1:
        _finish_row(a1, out_ptr, b_ptr, g_ptr, n, c, cmask, h0 + 1, w, H, W, sn, sc, sh, sw, HAS_BIAS, EPILOGUE)
    if ROWS > 2:
        _finish_row(a2, out_ptr, b_ptr, g_ptr, n, c, cmask, h0 + 2, w, H, W, sn, sc, sh, sw, HAS_BIAS, EPILOGUE)
    if ROWS > 3:
        _finish_row(a3, out_ptr, b_ptr, g_ptr, n, c, cmask, h0 + 3, w, H, W, sn, sc, sh, sw, HAS_BIAS, EPILOGUE)


@triton.jit
def _sum_row(acc, r_ptr, b0_ptr, b1_ptr, b2_ptr, out_ptr, n, c, cmask, h, w, H, W, sn, sc, sh, sw,
             HAS_BIAS: tl.constexpr):
    """Store output row ``h`` of the strip sum: ``r + acc (+ the three biases)``."""
    offs = _row_offsets(n, c, h, w, sn, sc, sh, sw)
    mask = _row_mask(cmask, h, w, H, W)
    acc += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += (tl.load(b0_ptr + c, mask=cmask, other=0.0).to(tl.float32)
                + tl.load(b1_ptr + c, mask=cmask, other=0.0).to(tl.float32)
                + tl.load(b2_ptr + c, mask=cmask, other=0.0).to(tl.float32))[:, None]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _walk_strip(a0, a1, a2, a3, t_c, w_ptr, c, cmask, h0, w, H, W, sh, sw, K: tl.constexpr,
                ALONG_W: tl.constexpr, TRANSPOSE: tl.constexpr, ROWS: tl.constexpr):
    """:func:`_walk` of one strip conv: K x 1 (the K + ROWS - 1 input rows walked once), or 1 x K
    (ALONG_W: each output row's own input row, loaded once per tap)."""
    if ALONG_W:
        return _walk(a0, a1, a2, a3, t_c, w_ptr, c, cmask, h0, w, H, W, sh, sw, 0, 1, K, TRANSPOSE, ROWS)
    return _walk(a0, a1, a2, a3, t_c, w_ptr, c, cmask, h0, w, H, W, sh, sw, (K - 1) // 2, K, 1, TRANSPOSE, ROWS)


@autotune(configs=ROW_CONFIGS, key=KEY + ['ALONG_W'], prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def strip3_sum_rows_kernel(r_ptr, t0_ptr, t1_ptr, t2_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr,
                           out_ptr, C, H, W, sn, sc, sh, sw,
                           K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, ALONG_W: tl.constexpr,
                           TRANSPOSE: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """``_strip3_sum_kernel``'s function, row-blocked: out = r + sum_i (conv(t_i, w_i) + b_i), three K_i x 1
    (1 x K_i if ALONG_W) depthwise convs, each input walked once."""
    tl.static_assert(ROWS <= 4)
    n, c, h0, w, cmask = _row_tile(tl.program_id(0), tl.program_id(1), C, H, W, BLOCK_C, ROWS, BLOCK_W)
    channels = n * sn + (c * sc)[:, None]
    a0 = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)
    a1, a2, a3 = a0, a0, a0
    a0, a1, a2, a3 = _walk_strip(a0, a1, a2, a3, t0_ptr + channels, w0_ptr, c, cmask, h0, w, H, W, sh, sw, K0,
                                 ALONG_W, TRANSPOSE, ROWS)
    a0, a1, a2, a3 = _walk_strip(a0, a1, a2, a3, t1_ptr + channels, w1_ptr, c, cmask, h0, w, H, W, sh, sw, K1,
                                 ALONG_W, TRANSPOSE, ROWS)
    a0, a1, a2, a3 = _walk_strip(a0, a1, a2, a3, t2_ptr + channels, w2_ptr, c, cmask, h0, w, H, W, sh, sw, K2,
                                 ALONG_W, TRANSPOSE, ROWS)
    _sum_row(a0, r_ptr, b0_ptr, b1_ptr, b2_ptr, out_ptr, n, c, cmask, h0, w, H, W, sn, sc, sh, sw, HAS_BIAS)
    if ROWS > 1:
        _sum_row(a1, r_ptr, b0_ptr, b1_ptr, b2_ptr, out_ptr, n, c, cmask, h0 + 1, w, H, W, sn, sc, sh, sw, HAS_BIAS)
    if ROWS > 2:
        _sum_row(a2, r_ptr, b0_ptr, b1_ptr, b2_ptr, out_ptr, n, c, cmask, h0 + 2, w, H, W, sn, sc, sh, sw, HAS_BIAS)
    if ROWS > 3:
        _sum_row(a3, r_ptr, b0_ptr, b1_ptr, b2_ptr, out_ptr, n, c, cmask, h0 + 3, w, H, W, sn, sc, sh, sw, HAS_BIAS)


@triton.jit
def _add_taps3(p, q, s, xv, w0_ptr, w1_ptr, w2_ptr, c, cmask, r: tl.constexpr, o: tl.constexpr, SPAN: tl.constexpr,
               K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Output row ``h0 + o`` of the three strips (p, q, s) plus input row ``r`` of the walk (:func:`_add_tap`)."""
    p = _add_tap(p, xv, w0_ptr, c, cmask, r, o, 0, SPAN, K0, 1, TRANSPOSE)
    q = _add_tap(q, xv, w1_ptr, c, cmask, r, o, 0, SPAN, K1, 1, TRANSPOSE)
    s = _add_tap(s, xv, w2_ptr, c, cmask, r, o, 0, SPAN, K2, 1, TRANSPOSE)
    return p, q, s


@triton.jit
def _store_rows3(p, q, s, o0_ptr, o1_ptr, o2_ptr, b0_ptr, b1_ptr, b2_ptr, n, c, cmask, h, w, H, W, sn, sc, sh, sw,
                 HAS_BIAS: tl.constexpr):
    """Store output row ``h`` of the three strips: ``acc + b_i`` each."""
    _finish_row(p, o0_ptr, b0_ptr, b0_ptr, n, c, cmask, h, w, H, W, sn, sc, sh, sw, HAS_BIAS, 0)
    _finish_row(q, o1_ptr, b1_ptr, b1_ptr, n, c, cmask, h, w, H, W, sn, sc, sh, sw, HAS_BIAS, 0)
    _finish_row(s, o2_ptr, b2_ptr, b2_ptr, n, c, cmask, h, w, H, W, sn, sc, sh, sw, HAS_BIAS, 0)


@triton.jit
def _row_along_w3(p, q, s, x_c, w0_ptr, w1_ptr, w2_ptr, c, cmask, h, w, H, W, sh, sw, K0: tl.constexpr,
                  K1: tl.constexpr, K2: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Output row ``h`` of the three 1 x K_i strips (p, q, s) from input row ``h``: each of its K2 shifts
    loaded once and added to every strip it reaches (tap (j - SPAN) + (K_i - 1) // 2 of strip i; the
    adjoint's mirror is in the shift, :func:`_input_row`)."""
    SPAN: tl.constexpr = (K2 - 1) // 2
    for j in tl.static_range(K2):
        xv = _input_row(x_c, cmask, h, w, H, W, sh, sw, j, K2, TRANSPOSE)
        p, q, s = _add_taps3(p, q, s, xv, w0_ptr, w1_ptr, w2_ptr, c, cmask, j, 0, SPAN, K0, K1, K2, False)
    return p, q, s


@autotune(configs=STRIP_ROW_CONFIGS, key=KEY + ['ALONG_W'], prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def strip3_rows_kernel(x_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, o0_ptr, o1_ptr, o2_ptr,
                       C, H, W, sn, sc, sh, sw,
                       K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, ALONG_W: tl.constexpr,
                       TRANSPOSE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """``_strip3_kernel``'s function, row-blocked: o_i = conv(x, w_i) + b_i, three K_i x 1 (1 x K_i if
    ALONG_W) depthwise convs of one input (K0 <= K1 <= K2); each input row (along W: each shift of it) is
    loaded once for all three."""
    tl.static_assert(ROWS <= 4)
    n, c, h0, w, cmask = _row_tile(tl.program_id(0), tl.program_id(1), C, H, W, BLOCK_C, ROWS, BLOCK_W)
    zero = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)
    p0, p1, p2, p3 = zero, zero, zero, zero  # strip 0's output rows h0 .. h0 + 3
    q0, q1, q2, q3 = zero, zero, zero, zero  # strip 1's
    s0, s1, s2, s3 = zero, zero, zero, zero  # strip 2's
    x_c = x_ptr + n * sn + (c * sc)[:, None]
    SPAN: tl.constexpr = 0 if ALONG_W else (K2 - 1) // 2
    if ALONG_W:
        p0, q0, s0 = _row_along_w3(p0, q0, s0, x_c, w0_ptr, w1_ptr, w2_ptr, c, cmask, h0, w, H, W, sh, sw, K0, K1,
                                   K2, TRANSPOSE)
        if ROWS > 1:
            p1, q1, s1 = _row_along_w3(p1, q1, s1, x_c, w0_ptr, w1_ptr, w2_ptr, c, cmask, h0 + 1, w, H, W, sh, sw,
                                       K0, K1, K2, TRANSPOSE)
        if ROWS > 2:
            p2, q2, s2 = _row_along_w3(p2, q2, s2, x_c, w0_ptr, w1_ptr, w2_ptr, c, cmask, h0 + 2, w, H, W, sh, sw,
                                       K0, K1, K2, TRANSPOSE)
        if ROWS > 3:
            p3, q3, s3 = _row_along_w3(p3, q3, s3, x_c, w0_ptr, w1_ptr, w2_ptr, c, cmask, h0 + 3, w, H, W, sh, sw,
                                       K0, K1, K2, TRANSPOSE)
    for r in tl.static_range(0 if ALONG_W else ROWS + 2 * SPAN):
        xv = _input_row(x_c, cmask, h0 + r - SPAN, w, H, W, sh, sw, 0, 1, TRANSPOSE)
        p0, q0, s0 = _add_taps3(p0, q0, s0, xv, w0_ptr, w1_ptr, w2_ptr, c, cmask, r, 0, SPAN, K0, K1, K2, TRANSPOSE)
        if ROWS > 1:
            p1, q1, s1 = _add_taps3(p1, q1, s1, xv, w0_ptr, w1_ptr, w2_ptr, c, cmask, r, 1, SPAN, K0, K1, K2,
                                    TRANSPOSE)
        if ROWS > 2:
            p2, q2, s2 = _add_taps3(p2, q2, s2, xv, w0_ptr, w1_ptr, w2_ptr, c, cmask, r, 2, SPAN, K0, K1, K2,
                                    TRANSPOSE)
        if ROWS > 3:
            p3, q3, s3 = _add_taps3(p3, q3, s3, xv, w0_ptr, w1_ptr, w2_ptr, c, cmask, r, 3, SPAN, K0, K1, K2,
                                    TRANSPOSE)
    outs = (o0_ptr, o1_ptr, o2_ptr, b0_ptr, b1_ptr, b2_ptr, n, c, cmask)
    _store_rows3(p0, q0, s0, *outs, h0, w, H, W, sn, sc, sh, sw, HAS_BIAS)
    if ROWS > 1:
        _store_rows3(p1, q1, s1, *outs, h0 + 1, w, H, W, sn, sc, sh, sw, HAS_BIAS)
    if ROWS > 2:
        _store_rows3(p2, q2, s2, *outs, h0 + 2, w, H, W, sn, sc, sh, sw, HAS_BIAS)
    if ROWS > 3:
        _store_rows3(p3, q3, s3, *outs, h0 + 3, w, H, W, sn, sc, sh, sw, HAS_BIAS)


# ---- weight gradients ---------------------------------------------------------------------------------

# (BLOCK_C, ROWS, BLOCK_W, warps) of the weight gradients: one float32 accumulator per tap (25 for a 5x5
# conv, 21 for the longest strip), so one element per thread (BLOCK_C * BLOCK_W = 32 * warps); a band's
# ROWS gradient rows are held at once, so ROWS may exceed the forward's four.
_NCHW_WGRAD_ROWS = [(1, 4, 128, 4), (1, 8, 128, 4), (2, 4, 64, 4), (4, 4, 32, 4)]
_NHWC_WGRAD_ROWS = [(32, 4, 4, 4), (64, 4, 2, 4), (32, 8, 4, 4), (16, 4, 8, 4)]
WGRAD_ROW_CONFIGS = configs(_NCHW_WGRAD_ROWS, _NHWC_WGRAD_ROWS, (32, 4, 16, 4), _NAMES)
# The backward pass with its weight gradient (grad_wgrad_rows_kernel) keeps a band's walked rows as well: the
# same tiles, and three a layout with two elements a thread (the weights loaded for more outputs: for sm_90
# ~100 lane instructions per element against ~130-160, up to 254 registers without spilling).
GRAD_WGRAD_ROW_CONFIGS = configs(_NCHW_WGRAD_ROWS + [(1, 4, 256, 4), (1, 8, 256, 4), (2, 8, 128, 4)],
                                 _NHWC_WGRAD_ROWS + [(64, 4, 4, 4), (64, 8, 4, 4), (32, 8, 8, 4)], (32, 4, 16, 4),
                                 _NAMES)


@triton.constexpr_function
def _meets(r, o, KH):
    """Whether a band's walked row r (counted from the first row output row 0 reads) reaches its output
    row o through a kernel of KH rows."""
    return 0 <= r - o < KH


@triton.constexpr_function
def _tap_row(r, o, KH, mirrored):
    """The kernel row that joins walked row r to output row o (:func:`_meets`): r - o for the conv,
    KH - 1 - (r - o) for its adjoint, whose kernel is the conv's turned over (as :func:`_add_tap`)."""
    return KH - 1 - (r - o) if mirrored else r - o


@triton.jit
def _wgrad_rows_job(g_ptr, x_ptr, dw_ptr, db_ptr, c, cmask, chunk, N, H, W, sn, sc, sh, sw, num_chunks,
                    KH: tl.constexpr, KW: tl.constexpr,
                    BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """One program's partial weight and bias gradients of a KH x KW depthwise conv: ``dw_ptr`` receives
    C x KH*KW sums, ``db_ptr`` C, over the bands chunk, chunk + num_chunks, ... (a band: ROWS output rows
    of BLOCK_W columns of one image).

    dw[c, i, j] = sum over n, h, w of g[n, c, h, w] * x[n, c, h + i - PH, w + j - PW]. A band's gradient
    rows are loaded once; its ROWS + KH - 1 input rows are walked once, each loaded once per tap column
    and multiplied into the accumulator of every tap it meets (tap row i = input row - output row): one
    BLOCK_C x BLOCK_W accumulator per tap, reduced over the columns once, at the end. Gradient rows
    outside the map load as 0, so the bands' edges need no other test.
    """
    num_wb = tl.cdiv(W, BLOCK_W)
    bands = tl.cdiv(H, ROWS) * num_wb  # per image
    zero = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)
    accs = ()
    for k in tl.static_range(KH * KW):
        accs = accs + (zero,)
    acc_b = zero
    for t in range(chunk, N * bands, num_chunks):
        h0 = (t % bands) // num_wb * ROWS
        w = (t % num_wb) * BLOCK_W + tl.arange(0, BLOCK_W)
        channels = (t // bands) * sn + (c * sc)[:, None]
        grads = ()
        for o in tl.static_range(ROWS):  # tap column (KW - 1) // 2: no shift
            gv = _input_row(g_ptr + channels, cmask, h0 + o, w, H, W, sh, sw, (KW - 1) // 2, KW, False)
            grads = grads + (gv,)
            acc_b += gv
        for r in tl.static_range(ROWS + KH - 1):
            for j in tl.static_range(KW):
                xv = _input_row(x_ptr + channels, cmask, h0 + r - (KH - 1) // 2, w, H, W, sh, sw, j, KW, False)
                for o in tl.static_range(ROWS):
                    if _meets(r, o, KH):
                        accs = add_to(accs, _tap_row(r, o, KH, False) * KW + j, grads[o] * xv)
    for k in tl.static_range(KH * KW):
        tl.store(dw_ptr + c * (KH * KW) + k, tl.sum(accs[k], axis=1), mask=cmask)
    tl.store(db_ptr + c, tl.sum(acc_b, axis=1), mask=cmask)


@autotune(configs=WGRAD_ROW_CONFIGS, key=KEY + ['N', 'KH', 'KW'], prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def dwconv_wgrad_rows_kernel(g_ptr, x_ptr, dw_ptr, db_ptr, N, C, H, W, sn, sc, sh, sw, num_chunks,
                             KH: tl.constexpr, KW: tl.constexpr,
                             BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """``_dwconv_wgrad_kernel``'s partials, row-walked (:func:`_wgrad_rows_job`): program (cb, chunk)
    writes ``dw[chunk, c, :]`` (num_chunks x C x KH*KW) and ``db[chunk, c]``, summed over the chunks by
    the caller."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1)
    _wgrad_rows_job(g_ptr, x_ptr, dw_ptr + chunk * C * (KH * KW), db_ptr + chunk * C, c, c < C, chunk, N, H, W,
                    sn, sc, sh, sw, num_chunks, KH, KW, BLOCK_C, ROWS, BLOCK_W)


# keyed by what the pass computes too: the GELU's gradient and the adjoint conv tune apart
@autotune(configs=GRAD_WGRAD_ROW_CONFIGS,
          key=KEY + ['N', 'KH', 'KW', 'GELU', 'HAS_BIAS', 'IN_BIAS', 'ADDEND'], prune_configs_by=PRUNE,
          do_bench=bench)
@triton.jit
def grad_wgrad_rows_kernel(g_ptr, x_ptr, dw_ptr, db_ptr, N, C, H, W, sn, sc, sh, sw, num_chunks,
                           KH: tl.constexpr, KW: tl.constexpr, w_ptr, b_ptr, ib_ptr, out_ptr, a_ptr,
                           GELU: tl.constexpr, HAS_BIAS: tl.constexpr, IN_BIAS: tl.constexpr, ADDEND: tl.constexpr,
                           BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """A depthwise conv's backward pass that also sums its weight and bias gradients into the partials of
    :func:`dwconv_wgrad_rows_kernel` (the same walk over the bands), so that no second pass reads the maps.

    GELU: ``out = g * GELU'(conv(x (+ ib)) + b)``, the gradient of the input of ``GELU(conv + b)`` (g that
    of its output), and ``dw[i, j] = sum out[h, w] x[h + i - PH, w + j - PW]`` against out as stored and x
    as the conv loaded it (with IN_BIAS plus ``ib``, rounded as :func:`dwconv_rows_kernel` does),
    ``db = sum out``. Otherwise ``out`` = the adjoint conv of g (x's gradient; with ADDEND rounded to out's
    dtype and added to ``a``, x's gradient from its other use, as autograd adds the two),
    ``dw[i, j] = sum g[h - i + PH, w - j + PW] x[h, w]`` and ``db = sum g``. A band's ROWS + KH - 1 rows of
    the walked map (x, or g at the adjoint's mirrored columns) are loaded once per tap column and kept:
    they make the band's ROWS output rows, which are stored, and then meet those rows (the GELU's
    gradient) or x's (the adjoint's) in the per-tap accumulators, without a second load.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    chunk = tl.program_id(1)
    PH: tl.constexpr = (KH - 1) // 2
    ib = 0.0
    if IN_BIAS:
        ib = conv_bias(ib_ptr, c, cmask, x_ptr)[:, None]
    bias = 0.0
    if GELU and HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    zero = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)
    taps = ()
    accs = ()
    for k in tl.static_range(KH * KW):
        taps = taps + (tl.load(w_ptr + c * (KH * KW) + k, mask=cmask, other=0.0).to(tl.float32)[:, None],)
        accs = accs + (zero,)
    acc_b = zero
    num_wb = tl.cdiv(W, BLOCK_W)
    bands = tl.cdiv(H, ROWS) * num_wb  # per image
    for t in range(chunk, N * bands, num_chunks):
        n = t // bands
        h0 = (t % bands) // num_wb * ROWS
        w = (t % num_wb) * BLOCK_W + tl.arange(0, BLOCK_W)
        channels = n * sn + (c * sc)[:, None]
        walked = ()  # row r - PH of the band, tap column j: entry r * KW + j
        for r in tl.static_range(ROWS + KH - 1):
            for j in tl.static_range(KW):
                if GELU:
                    walked = walked + (_input_row(x_ptr + channels, cmask, h0 + r - PH, w, H, W, sh, sw, j, KW,
                                                  False, ib, IN_BIAS),)
                else:
                    walked = walked + (_input_row(g_ptr + channels, cmask, h0 + r - PH, w, H, W, sh, sw, j, KW,
                                                  True),)
        for o in tl.static_range(ROWS):
            acc = zero
            for r in tl.static_range(ROWS + KH - 1):
                if _meets(r, o, KH):
                    for j in tl.static_range(KW):
                        acc += taps[_tap_row(r, o, KH, not GELU) * KW + j] * walked[r * KW + j]
            offs = _row_offsets(n, c, h0 + o, w, sn, sc, sh, sw)
            mask = _row_mask(cmask, h0 + o, w, H, W)
            if GELU:
                out = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * gelu_grad(acc + bias)
                out = out.to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + offs, out, mask=mask)
                other = out.to(tl.float32)  # the weight gradient takes the stored gradient, as a second pass would
                acc_b += other
            else:
                if ADDEND:
                    acc = (acc.to(out_ptr.dtype.element_ty).to(tl.float32)
                           + tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32))
                tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
                other = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                acc_b += walked[(o + PH) * KW + (KW - 1) // 2]  # g at the output row, unshifted
            for r in tl.static_range(ROWS + KH - 1):
                if _meets(r, o, KH):
                    for j in tl.static_range(KW):
                        accs = add_to(accs, _tap_row(r, o, KH, not GELU) * KW + j, other * walked[r * KW + j])
    for k in tl.static_range(KH * KW):
        tl.store(dw_ptr + (chunk * C + c) * (KH * KW) + k, tl.sum(accs[k], axis=1), mask=cmask)
    tl.store(db_ptr + chunk * C + c, tl.sum(acc_b, axis=1), mask=cmask)


@autotune(configs=WGRAD_ROW_CONFIGS, key=KEY + ['N', 'ALONG_W'], prune_configs_by=PRUNE, do_bench=bench)
@triton.jit
def strip3_wgrad_rows_kernel(g0_ptr, g1_ptr, g2_ptr, x0_ptr, x1_ptr, x2_ptr, out_ptr, N, C, H, W, sn, sc, sh, sw,
                             num_chunks, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                             ALONG_W: tl.constexpr,
                             BLOCK_C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """``_strip3_wgrad_kernel``'s packed partials, row-walked: job i (program id 2) the K_i x 1 conv (1 x K_i
    if ALONG_W) of ``g_i`` and ``x_i``; each (chunk, entry) has one writer, so one sum over the chunks
    finishes all six gradients. In channels_last the launcher runs the strips along W as strips along H
    of the map with H and W swapped (coalesced there); ALONG_W serves NCHW."""
    c, cmask, chunk, job, dw_row, db_row = packed_strip_slots(out_ptr, C, K0, K1, K2, BLOCK_C)
    # (KH, KW) of job i: (K_i, 1) along H, (1, K_i) along W
    if job == 0:
        _wgrad_rows_job(g0_ptr, x0_ptr, dw_row, db_row, c, cmask, chunk, N, H, W, sn, sc, sh, sw, num_chunks,
                        1 if ALONG_W else K0, K0 if ALONG_W else 1, BLOCK_C, ROWS, BLOCK_W)
    elif job == 1:
        _wgrad_rows_job(g1_ptr, x1_ptr, dw_row, db_row, c, cmask, chunk, N, H, W, sn, sc, sh, sw, num_chunks,
                        1 if ALONG_W else K1, K1 if ALONG_W else 1, BLOCK_C, ROWS, BLOCK_W)
    else:
        _wgrad_rows_job(g2_ptr, x2_ptr, dw_row, db_row, c, cmask, chunk, N, H, W, sn, sc, sh, sw, num_chunks,
                        1 if ALONG_W else K2, K2 if ALONG_W else 1, BLOCK_C, ROWS, BLOCK_W)


def grid(n: int, c: int, h: int, w: int):
    """The launch grid of the row kernels: (image x channel block, row block x column block)."""
    return lambda meta: (n * triton.cdiv(c, meta['BLOCK_C']),
                         triton.cdiv(h, meta['ROWS']) * triton.cdiv(w, meta['BLOCK_W']))
