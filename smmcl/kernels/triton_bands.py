"""MSCAN's horizontal strips in NCHW as products with band matrices, on the tensor cores.

A 1 x K depthwise conv of one row is the row times a band (Toeplitz) matrix of the channel's K taps. In
NCHW the rows are contiguous, and the row kernels of :mod:`smmcl.kernels.triton_rows` load each of an
output row's K shifts unaligned: for sm_90 the backward's adjoint of the three strips (7 + 11 + 21 = 39
shifts) costs ~190 lane instructions per output, the weight gradients along W ~320 per position
(``bench/sass.py``). Here a program owns one channel and a band matrix of its taps, built once, and
walks tiles of ROWS rows (of any images) x BLOCK_W output columns: one aligned load of the tile's
2 * BLOCK_W input columns (BLOCK_W / 2 to either side, so K - 1 <= BLOCK_W), one tensor-core product
per strip. The weight gradient is the product ``x^T @ g`` summed over the rows, whose diagonals are
the taps' gradients, read once at the end.

The same function as the row kernels, to float32 rounding: float32 sums of products of the inputs and the
float32 taps. bfloat16 inputs (autocast) take bfloat16 products, which are exact in float32; float32 taps
are then split into three bfloat16 parts (``hi + mid + lo``, 24 bits, the float32 tap) and multiplied
one after another (``PARTS = 3``; bfloat16 taps take one). Other inputs take Triton's 3xTF32 products
of float32 operands (``PARTS = 0``; float16 is exact in TF32).
One difference: a non-finite input reaches every output of its tile row (0 x inf in the band's zeros),
not only the K nearest; such a step's loss is non-finite either way.

The weight gradients of the KxK convs (MSCAN's 5x5 and 3x3) take the same products, one per kernel row:
``x_i^T @ g`` with the input rows shifted by that kernel row (within each image), its diagonals that
row's taps (``SMMCL_TRITON_WGRAD=bands``).

Only NCHW, and the convs only along W: along H and in channels_last the row kernels already walk each
input row once (:mod:`smmcl.kernels.triton_dwconv` offers this family where it applies,
``SMMCL_TRITON_DEPTHWISE``). Needs tensor cores with bfloat16 and TF32 (sm_80 on) on a GPU; the
interpreter runs it anywhere.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import INTERPRETED, SWEEP, bench, neighbours
from .triton_compile import autotune

# (ROWS, BLOCK_W, warps): ROWS rows of one channel (any images) x BLOCK_W output columns, from 2 * BLOCK_W
# input columns; BLOCK_W >= K - 1 of the longest strip (MSCAN: 21 taps, 32 columns). The band matrices,
# 2 * BLOCK_W x BLOCK_W per strip and part, are a program's fixed cost (built once, walked over its tiles).
_TILES = [(64, 32, 4), (128, 32, 4), (64, 64, 4), (128, 64, 8), (32, 32, 4)]
_WGRAD_TILES = [(64, 32, 4), (128, 32, 4), (64, 32, 8), (128, 64, 8)]
# The KxK convs' weight gradients (MSCAN's 5x5 and 3x3): one 2*BLOCK_W x BLOCK_W accumulator per kernel row.
# Bands of 16 columns waste less of the products on zeros but count more instructions for sm_90 (N = 16
# products; bench/sass.py: 5x5 69 against 39 per position, 3x3 45 against 30).
_KXK_WGRAD_TILES = [(64, 32, 4), (128, 32, 8), (128, 32, 4), (64, 16, 4)]


def _configs(tiles):
    listed = [(16, 32, 4)] if INTERPRETED else tiles
    chosen = list(dict.fromkeys(n for t in listed for n in neighbours(t))) if SWEEP and not INTERPRETED else listed
    out = []
    for rows, block_w, warps in chosen:
        if rows < 16 or block_w < 16:  # tl.dot's smallest operand
            continue
        config = triton.Config(dict(ROWS=rows, BLOCK_W=block_w), num_warps=warps)
        config.listed = (rows, block_w, warps) in listed
        out.append(config)
    return out


BAND_CONFIGS = _configs(_TILES)
WGRAD_BAND_CONFIGS = _configs(_WGRAD_TILES)
KXK_WGRAD_BAND_CONFIGS = _configs(_KXK_WGRAD_TILES)
# a KxK weight gradient holds one accumulator per kernel row: at most this many rows (the launchers check)
KXK_ROWS = 5
# the widest band both kinds of kernel have (the launchers check that a strip fits before they launch)
WIDEST = min(max(c.kwargs['BLOCK_W'] for c in configs) for configs in (BAND_CONFIGS, WGRAD_BAND_CONFIGS))


def _wide_enough(configs, named_args, **keywords):
    """The tiles whose band reaches the longest strip's taps (K2 - 1 <= BLOCK_W, or KW - 1 for a KxK
    conv; the kernel sizes come by position or by keyword)."""
    sizes = dict(named_args, **keywords)
    return [c for c in configs if sizes.get('K2', sizes.get('KW')) - 1 <= c.kwargs['BLOCK_W']]


_KEY = ['N', 'C', 'H', 'W', 'sh', 'K0', 'K1', 'K2', 'PARTS']
_PRUNE = {'early_config_prune': _wide_enough}


# Triton's interpreter (3.9) multiplies bfloat16 operands of tl.dot as their raw 16 bits: there the bfloat16
# products take the operands' float32 values, the same exact products as the tensor cores'.
_BF16_AS_FLOAT32 = tl.constexpr(INTERPRETED)


@triton.jit
def _dot_bf16(a, b, acc):
    """``acc + a @ b`` of bfloat16 operands, float32 accumulation."""
    if _BF16_AS_FLOAT32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision='ieee')
    return tl.dot(a, b, acc)


def fits(k2: int) -> bool:
    """Whether a strip of ``k2`` taps fits the widest band tile."""
    return k2 - 1 <= WIDEST


def fits_kxk(kh: int, kw: int) -> bool:
    """Whether a KH x KW conv's weight gradient fits the band kernel (its rows and its band)."""
    return kh <= KXK_ROWS and kw - 1 <= max(c.kwargs['BLOCK_W'] for c in KXK_WGRAD_BAND_CONFIGS)


@triton.jit
def _band(w_ptr, c, K: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_W: tl.constexpr):
    """2*BLOCK_W x BLOCK_W float32: entry (u, q) is the tap through which input column w0 - BLOCK_W/2 + u
    reaches output column w0 + q of the 1 x K conv (mirrored for its adjoint), 0 where none does."""
    shift = tl.arange(0, 2 * BLOCK_W)[:, None] - tl.arange(0, BLOCK_W)[None, :] - BLOCK_W // 2  # input - output
    if TRANSPOSE:
        tap = (K - 1) // 2 - shift
    else:
        tap = shift + (K - 1) // 2
    return tl.load(w_ptr + c * K + tap, mask=(tap >= 0) & (tap < K), other=0.0).to(tl.float32)


@triton.jit
def _parts(band, PARTS: tl.constexpr):
    """The band as the product's right operands: float32 (PARTS 0, 3xTF32), bfloat16 (1), or the three
    bfloat16 parts whose sum is the float32 band (3)."""
    if PARTS == 0:  # one return statement: Triton wants one type for all of a function's returns
        hi, mid, lo = band, band, band
    else:
        hi = band.to(tl.bfloat16)
        mid, lo = hi, hi
        if PARTS == 3:
            rest = band - hi.to(tl.float32)
            mid = rest.to(tl.bfloat16)
            lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _times(x, hi, mid, lo, acc, PARTS: tl.constexpr):
    """``acc + x @ band`` (ROWS x BLOCK_W float32) for the band's parts (:func:`_parts`)."""
    if PARTS == 0:
        return tl.dot(x.to(tl.float32), hi, acc, input_precision='tf32x3')
    acc = _dot_bf16(x, hi, acc)
    if PARTS == 3:
        acc = _dot_bf16(x, mid, acc)
        acc = _dot_bf16(x, lo, acc)
    return acc


@triton.jit
def _tile(t, N, H, W, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """Tile ``t`` of a channel: its rows (ROWS of the N*H rows) as images and rows within them, their mask,
    its first output column."""
    num_wb = tl.cdiv(W, BLOCK_W)
    r = (t // num_wb) * ROWS + tl.arange(0, ROWS)
    return r // H, r % H, r < N * H, (t % num_wb) * BLOCK_W


@triton.jit
def _strip_bands(w0_ptr, w1_ptr, w2_ptr, c, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                 TRANSPOSE: tl.constexpr, PARTS: tl.constexpr, BLOCK_W: tl.constexpr):
    """The three strips' bands of channel c, each as its parts (:func:`_parts`): nine operands."""
    p0, p1, p2 = _parts(_band(w0_ptr, c, K0, TRANSPOSE, BLOCK_W), PARTS)
    q0, q1, q2 = _parts(_band(w1_ptr, c, K1, TRANSPOSE, BLOCK_W), PARTS)
    s0, s1, s2 = _parts(_band(w2_ptr, c, K2, TRANSPOSE, BLOCK_W), PARTS)
    return p0, p1, p2, q0, q1, q2, s0, s1, s2


@triton.jit
def _span(ptr, rows, rmask, w0, W, sw, BLOCK_W: tl.constexpr):
    """ROWS x 2*BLOCK_W: input columns w0 - BLOCK_W/2 .. w0 + 3*BLOCK_W/2 - 1 of the tile's rows, 0 outside
    the map (as the conv's zero padding)."""
    cols = w0 - BLOCK_W // 2 + tl.arange(0, 2 * BLOCK_W)
    inside = (cols >= 0) & (cols < W)
    return tl.load(ptr + rows[:, None] + (cols * sw)[None, :], mask=rmask[:, None] & inside[None, :], other=0.0)


@triton.jit
def _window(rows, rmask, w0, W, sw, BLOCK_W: tl.constexpr):
    """Offsets and mask of the tile's ROWS x BLOCK_W outputs."""
    cols = w0 + tl.arange(0, BLOCK_W)
    return rows[:, None] + (cols * sw)[None, :], rmask[:, None] & (cols < W)[None, :]


@autotune(configs=BAND_CONFIGS, key=_KEY + ['TRANSPOSE'], prune_configs_by=_PRUNE, do_bench=bench)
@triton.jit
def strip3_bands_kernel(x_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, o0_ptr, o1_ptr, o2_ptr,
                        N, C, H, W, sn, sc, sh, sw,
                        K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, TRANSPOSE: tl.constexpr,
                        HAS_BIAS: tl.constexpr, PARTS: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """``_strip3_kernel``'s function along W: o_i = conv(x, w_i) + b_i, three 1 x K_i depthwise convs of
    one input. Program (c, p) walks channel c's tiles p, p + P, ... (P programs per channel)."""
    c = tl.program_id(0)
    p0, p1, p2, q0, q1, q2, s0, s1, s2 = _strip_bands(w0_ptr, w1_ptr, w2_ptr, c, K0, K1, K2, TRANSPOSE, PARTS,
                                                      BLOCK_W)
    zero = tl.zeros((ROWS, BLOCK_W), dtype=tl.float32)
    bias0, bias1, bias2 = 0.0, 0.0, 0.0
    if HAS_BIAS:
        bias0 = tl.load(b0_ptr + c).to(tl.float32)
        bias1 = tl.load(b1_ptr + c).to(tl.float32)
        bias2 = tl.load(b2_ptr + c).to(tl.float32)
    x_c = x_ptr + c * sc
    for t in range(tl.program_id(1), tl.cdiv(N * H, ROWS) * tl.cdiv(W, BLOCK_W), tl.num_programs(1)):
        n, h, rmask, w0 = _tile(t, N, H, W, ROWS, BLOCK_W)
        rows = n * sn + h * sh
        x = _span(x_c, rows, rmask, w0, W, sw, BLOCK_W)
        offs, mask = _window(rows, rmask, w0, W, sw, BLOCK_W)
        offs = offs + c * sc
        tl.store(o0_ptr + offs, (_times(x, p0, p1, p2, zero, PARTS) + bias0).to(o0_ptr.dtype.element_ty), mask=mask)
        tl.store(o1_ptr + offs, (_times(x, q0, q1, q2, zero, PARTS) + bias1).to(o1_ptr.dtype.element_ty), mask=mask)
        tl.store(o2_ptr + offs, (_times(x, s0, s1, s2, zero, PARTS) + bias2).to(o2_ptr.dtype.element_ty), mask=mask)


@autotune(configs=BAND_CONFIGS, key=_KEY + ['TRANSPOSE'], prune_configs_by=_PRUNE, do_bench=bench)
@triton.jit
def strip3_sum_bands_kernel(r_ptr, t0_ptr, t1_ptr, t2_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr,
                            out_ptr, N, C, H, W, sn, sc, sh, sw,
                            K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, TRANSPOSE: tl.constexpr,
                            HAS_BIAS: tl.constexpr, PARTS: tl.constexpr, ROWS: tl.constexpr,
                            BLOCK_W: tl.constexpr):
    """``_strip3_sum_kernel``'s function along W: out = r + sum_i (conv(t_i, w_i) + b_i), three 1 x K_i
    depthwise convs (the backward's adjoint of :func:`strip3_bands_kernel`). Programs as there."""
    c = tl.program_id(0)
    p0, p1, p2, q0, q1, q2, s0, s1, s2 = _strip_bands(w0_ptr, w1_ptr, w2_ptr, c, K0, K1, K2, TRANSPOSE, PARTS,
                                                      BLOCK_W)
    bias = 0.0
    if HAS_BIAS:
        bias = (tl.load(b0_ptr + c).to(tl.float32) + tl.load(b1_ptr + c).to(tl.float32)
                + tl.load(b2_ptr + c).to(tl.float32))
    channel = c * sc
    for t in range(tl.program_id(1), tl.cdiv(N * H, ROWS) * tl.cdiv(W, BLOCK_W), tl.num_programs(1)):
        n, h, rmask, w0 = _tile(t, N, H, W, ROWS, BLOCK_W)
        rows = n * sn + h * sh
        acc = tl.zeros((ROWS, BLOCK_W), dtype=tl.float32)
        acc = _times(_span(t0_ptr + channel, rows, rmask, w0, W, sw, BLOCK_W), p0, p1, p2, acc, PARTS)
        acc = _times(_span(t1_ptr + channel, rows, rmask, w0, W, sw, BLOCK_W), q0, q1, q2, acc, PARTS)
        acc = _times(_span(t2_ptr + channel, rows, rmask, w0, W, sw, BLOCK_W), s0, s1, s2, acc, PARTS)
        offs, mask = _window(rows, rmask, w0, W, sw, BLOCK_W)
        acc += tl.load(r_ptr + channel + offs, mask=mask, other=0.0).to(tl.float32) + bias
        tl.store(out_ptr + channel + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _taps(p, dw_ptr, K: tl.constexpr, BLOCK_W: tl.constexpr):
    """Store K tap gradients at ``dw_ptr`` from ``p`` (2*BLOCK_W x BLOCK_W: the sums over rows of
    x[input column w0 - BLOCK_W/2 + u] * g[output column w0 + q]): tap j is the sum of the diagonal
    u - q - BLOCK_W/2 = j - (K - 1)/2. The diagonals become rows (entry (k, q) of ``p``'s column q moved to
    row k = u - q), then one sum along the rows gives them all."""
    k = tl.arange(0, BLOCK_W)[:, None]
    q = tl.arange(0, BLOCK_W)[None, :]
    diagonals = tl.sum(tl.gather(p, k + q, axis=0), axis=1)  # BLOCK_W: diagonal u - q = k
    tap = tl.arange(0, BLOCK_W) - BLOCK_W // 2 + (K - 1) // 2
    tl.store(dw_ptr + tap, diagonals, mask=(tap >= 0) & (tap < K))


@triton.jit
def _outer(x, g, acc, PARTS: tl.constexpr):
    """``acc + x^T @ g`` (2*BLOCK_W x BLOCK_W float32): bfloat16 products (PARTS 1) or 3xTF32 (0)."""
    if PARTS == 0:
        return tl.dot(tl.trans(x.to(tl.float32)), g.to(tl.float32), acc, input_precision='tf32x3')
    return _dot_bf16(tl.trans(x), g, acc)


@autotune(configs=WGRAD_BAND_CONFIGS, key=_KEY + ['ONE_INPUT'], prune_configs_by=_PRUNE, do_bench=bench)
@triton.jit
def strip3_wgrad_bands_kernel(g0_ptr, g1_ptr, g2_ptr, x0_ptr, x1_ptr, x2_ptr, out_ptr, N, C, H, W, sn, sc, sh, sw,
                              num_chunks, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                              ONE_INPUT: tl.constexpr, PARTS: tl.constexpr,
                              ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """``strip3_wgrad_rows_kernel``'s packed partials along W: program (c, chunk) writes channel c's
    entries of row ``chunk`` (num_chunks x C*(K0+K1+K2+3), ``dw_0 | dw_1 | dw_2 | db_0 | db_1 | db_2``)
    from tiles chunk, chunk + num_chunks, ... ``ONE_INPUT``: x0 is x1 is x2, loaded once."""
    c = tl.program_id(0)
    chunk = tl.program_id(1)
    zero = tl.zeros((2 * BLOCK_W, BLOCK_W), dtype=tl.float32)
    p0, p1, p2 = zero, zero, zero
    b0 = tl.zeros((ROWS, BLOCK_W), dtype=tl.float32)
    b1, b2 = b0, b0
    channel = c * sc
    for t in range(chunk, tl.cdiv(N * H, ROWS) * tl.cdiv(W, BLOCK_W), num_chunks):
        n, h, rmask, w0 = _tile(t, N, H, W, ROWS, BLOCK_W)
        rows = n * sn + h * sh
        offs, mask = _window(rows, rmask, w0, W, sw, BLOCK_W)
        g0 = tl.load(g0_ptr + channel + offs, mask=mask, other=0.0)
        g1 = tl.load(g1_ptr + channel + offs, mask=mask, other=0.0)
        g2 = tl.load(g2_ptr + channel + offs, mask=mask, other=0.0)
        x0 = _span(x0_ptr + channel, rows, rmask, w0, W, sw, BLOCK_W)
        p0 = _outer(x0, g0, p0, PARTS)
        if ONE_INPUT:
            p1 = _outer(x0, g1, p1, PARTS)
            p2 = _outer(x0, g2, p2, PARTS)
        else:
            p1 = _outer(_span(x1_ptr + channel, rows, rmask, w0, W, sw, BLOCK_W), g1, p1, PARTS)
            p2 = _outer(_span(x2_ptr + channel, rows, rmask, w0, W, sw, BLOCK_W), g2, p2, PARTS)
        b0 += g0.to(tl.float32)
        b1 += g1.to(tl.float32)
        b2 += g2.to(tl.float32)
    row = out_ptr + chunk * (C * (K0 + K1 + K2 + 3))
    _taps(p0, row + c * K0, K0, BLOCK_W)
    _taps(p1, row + C * K0 + c * K1, K1, BLOCK_W)
    _taps(p2, row + C * (K0 + K1) + c * K2, K2, BLOCK_W)
    biases = row + C * (K0 + K1 + K2) + c
    tl.store(biases, tl.sum(tl.sum(b0, axis=1), axis=0))
    tl.store(biases + C, tl.sum(tl.sum(b1, axis=1), axis=0))
    tl.store(biases + 2 * C, tl.sum(tl.sum(b2, axis=1), axis=0))


@autotune(configs=KXK_WGRAD_BAND_CONFIGS, key=_KEY[:5] + ['KH', 'KW', 'PARTS'], prune_configs_by=_PRUNE,
          do_bench=bench)
@triton.jit
def dwconv_wgrad_bands_kernel(g_ptr, x_ptr, dw_ptr, db_ptr, N, C, H, W, sn, sc, sh, sw, num_chunks,
                              KH: tl.constexpr, KW: tl.constexpr, PARTS: tl.constexpr,
                              ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """``dwconv_wgrad_rows_kernel``'s partials of a KH x KW depthwise conv (KH <= KXK_ROWS): program
    (c, chunk) writes ``dw[chunk, c, :]`` (num_chunks x C x KH*KW) and ``db[chunk, c]`` from tiles chunk,
    chunk + num_chunks, ...: per kernel row i the product ``x_i^T @ g`` of the tile's gradient and its
    input rows shifted by i - (KH - 1)/2 (within each image), whose diagonals are that row's taps."""
    c = tl.program_id(0)
    chunk = tl.program_id(1)
    zero = tl.zeros((2 * BLOCK_W, BLOCK_W), dtype=tl.float32)
    accs = ()
    for i in tl.static_range(KH):
        accs = accs + (zero,)
    acc_b = tl.zeros((ROWS, BLOCK_W), dtype=tl.float32)
    channel = c * sc
    for t in range(chunk, tl.cdiv(N * H, ROWS) * tl.cdiv(W, BLOCK_W), num_chunks):
        n, h, rmask, w0 = _tile(t, N, H, W, ROWS, BLOCK_W)
        offs, mask = _window(n * sn + h * sh, rmask, w0, W, sw, BLOCK_W)
        g = tl.load(g_ptr + channel + offs, mask=mask, other=0.0)
        acc_b += g.to(tl.float32)
        shifted = ()
        for i in tl.static_range(KH):
            hh = h + (i - (KH - 1) // 2)
            x = _span(x_ptr + channel, n * sn + hh * sh, rmask & (hh >= 0) & (hh < H), w0, W, sw, BLOCK_W)
            shifted = shifted + (_outer(x, g, accs[i], PARTS),)
        accs = shifted
    for i in tl.static_range(KH):
        _taps(accs[i], dw_ptr + (chunk * C + c) * (KH * KW) + i * KW, KW, BLOCK_W)
    tl.store(db_ptr + chunk * C + c, tl.sum(tl.sum(acc_b, axis=1), axis=0))


def parts(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> int:
    """PARTS of the products of ``x_dtype`` inputs by ``weight_dtype`` operands (the module's docstring): the
    strips' taps, or, for the weight gradients, the gradient (of x's dtype: ``parts(x, x)``)."""
    if x_dtype != torch.bfloat16:
        return 0
    return 1 if weight_dtype == torch.bfloat16 else 3


# Tiles a program walks at least, where the GPU stays filled: building the band matrices (a gather of the
# taps, their split into bfloat16 parts, the copy to shared memory) costs about two tiles' work for sm_90
# (bench/sass.py: the whole kernel's instructions against its loop's).
MIN_TILES = 4


def programs(n: int, c: int, h: int, w: int, sms: int):
    """The launch grid of the strips: (channel, programs per channel), about 8 programs per SM in all,
    each walking at least MIN_TILES tiles where the map has that many."""
    def grid(meta):
        tiles = triton.cdiv(n * h, meta['ROWS']) * triton.cdiv(w, meta['BLOCK_W'])
        return c, max(1, min(triton.cdiv(tiles, MIN_TILES), triton.cdiv(8 * sms, c)))
    return grid
