"""The decoder's NMF on the GPU: batched float32 matrix products at float32's accuracy on the tensor cores
(3xTF32), and the element-wise steps of its multiplicative updates, each in one pass.

The NMF runs in float32 by design, TF32 off (:class:`smmcl.models.ham_head.NMF2D`), so cuBLAS computes
its products on the CUDA cores: 3.2 ms of GEMMs per H200 inference forward of 8 (17 large products of
~2.5 GFLOP, tiles of 32x32), against ~0.5 ms of memory traffic. Here each operand is split into its TF32
part and the TF32 rest (``a = a_hi + a_lo``) and ``a_hi b_hi + a_hi b_lo + a_lo b_hi`` summed in float32
(Triton's ``input_precision='tf32x3'``): three tensor-core products that keep float32's accuracy, as the
term dropped, ``a_lo b_lo``, lies below float32's rounding. Measured on the CPU with the same splitting
done in PyTorch (``tests/test_kernels.py``): the NMF's output against float64 products 1.7e-7 relative,
as float32's (1.7e-7), where plain TF32 gives 6.5e-5. GPUs before Ampere have no TF32: there the
products run as float32 FMAs (``'ieee'``), the same function.

:func:`bmm` takes any strides (the NMF's transposed operands are views) and splits long reductions over
several programs when the output has few tiles (``x @ coef``: 512 x 64 outputs over 4,800 pixels),
their float32 partials summed once afterwards (no atomics: the same result every run).
``SMMCL_TRITON_BMM``: ``triton``, ``torch`` (``torch.bmm``) or ``auto``, the default: the faster per
shape and strides, timed once on the GPU (under the interpreter ``triton``).

:func:`nmf_update` and :func:`nmf_update_grad` are the element-wise steps of one multiplicative update and
of its backward, each one pass over the N-R or D-R factor where ATen takes three launches (an addition,
a product and a division; a division and three products). Their divisions are IEEE-rounded
(``div_rn``: CUDA's ``/``, as ATen's, not Triton's approximate one), so they store ATen's bits.

Importing this module needs Triton (see :mod:`smmcl.kernels.triton_common`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .target import gpu_properties
from .triton_common import INTERPRETED, bench, check_device, choose, fastest, launch
from .triton_compile import autotune

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); the NMF's outputs are N x 64 or 64-wide, its reductions 64,
# 512 or 4,800 long. Under the interpreter one small tile (its cost is per program).
_TILES = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 64, 64, 4, 3), (128, 64, 32, 8, 3), (32, 64, 64, 4, 4)]
MATMUL_CONFIGS = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
                  for m, n, k, w, s in ([(32, 32, 32, 4, 1)] if INTERPRETED else _TILES)]
SPLIT_ALIGN = 64  # each program's share of a split reduction: a multiple of every BLOCK_K


@autotune(configs=MATMUL_CONFIGS, key=['M', 'N', 'K', 'k_per_split', 'sam', 'sak', 'sbk', 'sbn'],
          do_bench=bench)
@triton.jit
def bmm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, k_per_split, sab, sam, sak, sbb, sbk, sbn, scs, scb, scm, scn,
               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (output tile, batch, split) writes ``c[split, batch]``'s BLOCK_M x BLOCK_N tile: the float32
    product of ``a[batch]`` (M x K) and ``b[batch]`` (K x N) over the reduction's share ``split``
    (``k_per_split`` long), with ``tl.dot``'s ``PRECISION``. Every operand by its strides."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    rm = (tl.program_id(0) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    batch = tl.program_id(1)
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    a_rows = a_ptr + batch * sab + rm[:, None] * sam
    b_cols = b_ptr + batch * sbb + rn[None, :] * sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + rk[None, :] * sak, mask=(rm < M)[:, None] & (rk < k_end)[None, :], other=0.0)
        b = tl.load(b_cols + rk[:, None] * sbk, mask=(rk < k_end)[:, None] & (rn < N)[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    c = c_ptr + tl.program_id(2) * scs + batch * scb + rm[:, None] * scm + rn[None, :] * scn
    tl.store(c, acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


def _precision(device: torch.device) -> str:
    """3xTF32 where the tensor cores take TF32 (Ampere on); float32 FMAs elsewhere and interpreted."""
    gpu = gpu_properties(device)
    return 'tf32x3' if gpu is not None and gpu[1][0] >= 8 else 'ieee'


def _splits(batch: int, m: int, n: int, k: int, device: torch.device) -> int:
    """How many programs share each output tile's reduction: enough for about two programs per SM when
    the output has few 64 x 64 tiles and the reduction is long (each share at least 512 long)."""
    gpu = gpu_properties(device)
    if gpu is None:
        return 1 if k <= 2 * SPLIT_ALIGN else 2  # the tests cover both
    programs = batch * triton.cdiv(m, 64) * triton.cdiv(n, 64)
    wanted = triton.cdiv(2 * gpu[0], programs)
    return max(1, min(wanted, k // 512))


def _bmm_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    batch, m, k = a.shape
    n = b.shape[2]
    if k == 0 or a.numel() == 0 or b.numel() == 0:
        return a.new_zeros(batch, m, n)
    k_per_split = triton.cdiv(triton.cdiv(k, _splits(batch, m, n, k, a.device)), SPLIT_ALIGN) * SPLIT_ALIGN
    splits = triton.cdiv(k, k_per_split)
    # one split writes the result itself; several write float32 partials, summed once below
    out = a.new_empty((batch, m, n) if splits == 1 else (splits, batch, m, n))
    strides = (0,) * (splits == 1) + out.stride()
    bmm_kernel[lambda meta: (triton.cdiv(m, meta['BLOCK_M']) * triton.cdiv(n, meta['BLOCK_N']), batch, splits)](
        a, b, out, m, n, k, k_per_split, *a.stride(), *b.stride(), *strides, PRECISION=_precision(a.device))
    return out if splits == 1 else out.sum(0)


def _bmm_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a, b)


_IMPLS = {'triton': _bmm_triton, 'torch': _bmm_torch}
_CHOICE = {}  # (device, shapes, strides) -> the faster implementation


def bmm(a: torch.Tensor, b: torch.Tensor, impl: Optional[str] = None) -> torch.Tensor:
    """``torch.bmm(a, b)`` for float32 B-M-K ``a`` and B-K-N ``b`` (any strides): B-M-N float32, contiguous.

    ``impl``: ``'triton'`` (:func:`bmm_kernel`, 3xTF32 on the tensor cores), ``'torch'`` or ``'auto'`` (else
    the environment's ``SMMCL_TRITON_BMM``, else ``'auto'``: on a GPU the faster of the two for these
    shapes and strides, timed once; under the interpreter ``'triton'``).
    """
    check_device(a)
    if a.dtype != torch.float32 or b.dtype != torch.float32 or a.ndim != 3 or b.ndim != 3 \
            or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f'smmcl.kernels: bmm takes float32 B-M-K and B-K-N tensors, got {tuple(a.shape)} '
                         f'{a.dtype} and {tuple(b.shape)} {b.dtype}')
    return _IMPLS[choice(a, b, impl)](a, b)


def choice(a: torch.Tensor, b: torch.Tensor, impl: Optional[str] = None) -> str:
    """The implementation :func:`bmm` runs for these operands: ``impl``, else ``SMMCL_TRITON_BMM``, else
    ``'auto'``'s (on a GPU the faster for these shapes and strides, timed on the first call)."""
    return choose('SMMCL_TRITON_BMM', impl, tuple(_IMPLS), a.device, 'triton',
                  lambda: fastest(_CHOICE, (a.device, a.shape, a.stride(), b.shape, b.stride()), _IMPLS, a, b))


# ---- the element-wise steps of a multiplicative update -------------------------------------------------

# rows of the factor per program, all R columns (R = 64 in SegNeXt): 16 float32 elements a thread
UPDATE_ROWS, UPDATE_WARPS = (16 if INTERPRETED else 32), 4


@triton.jit
def nmf_update_kernel(factor_ptr, numerator_ptr, product_ptr, updated_ptr, denominator_ptr, rows, cols,
                      s_factor, s_numerator, s_product, eps, STORE_DENOMINATOR: tl.constexpr,
                      BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Program ``i`` updates rows ``i * BLOCK_ROWS ...`` of the factor (each input by its row stride; the
    outputs contiguous): ``denominator = product + eps``, ``updated = factor * numerator / denominator``."""
    r = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)[:, None]
    c = tl.arange(0, BLOCK_COLS)[None, :]
    mask = (r < rows) & (c < cols)
    factor = tl.load(factor_ptr + r * s_factor + c, mask=mask)
    numerator = tl.load(numerator_ptr + r * s_numerator + c, mask=mask)
    denominator = tl.load(product_ptr + r * s_product + c, mask=mask) + eps
    tl.store(updated_ptr + r * cols + c, tl.math.div_rn(factor * numerator, denominator), mask=mask)
    if STORE_DENOMINATOR:
        tl.store(denominator_ptr + r * cols + c, denominator, mask=mask)


@triton.jit
def nmf_update_grad_kernel(grad_ptr, denominator_ptr, factor_ptr, updated_ptr, numerator_ptr, grad_numerator_ptr,
                           scaled_updated_ptr, scaled_numerator_ptr, rows, cols, s_grad, s_denominator, s_factor,
                           s_updated, s_numerator, s_grad_numerator,
                           BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Program ``i`` takes rows ``i * BLOCK_ROWS ...``: with ``ratio = grad / denominator`` it writes ``ratio *
    factor`` into the numerator's gradient (by its row stride), ``ratio * updated`` and ``ratio * numerator``
    (contiguous)."""
    r = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)[:, None]
    c = tl.arange(0, BLOCK_COLS)[None, :]
    mask = (r < rows) & (c < cols)
    ratio = tl.math.div_rn(tl.load(grad_ptr + r * s_grad + c, mask=mask),
                           tl.load(denominator_ptr + r * s_denominator + c, mask=mask, other=1.0))
    tl.store(grad_numerator_ptr + r * s_grad_numerator + c, ratio * tl.load(factor_ptr + r * s_factor + c, mask=mask),
             mask=mask)
    tl.store(scaled_updated_ptr + r * cols + c, ratio * tl.load(updated_ptr + r * s_updated + c, mask=mask), mask=mask)
    tl.store(scaled_numerator_ptr + r * cols + c, ratio * tl.load(numerator_ptr + r * s_numerator + c, mask=mask),
             mask=mask)


def _by_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (B-M-R) if its B*M rows lie one row stride apart with unit column stride, else a contiguous copy
    (the NMF's factors and products are; the slots of its backward's stacked factors too)."""
    batch, m, _ = t.shape
    if t.stride(2) == 1 and (batch == 1 or t.stride(0) == m * t.stride(1)):
        return t
    return t.contiguous()


def _check_factors(*tensors: torch.Tensor) -> None:
    check_device(tensors[0])
    shape = tensors[0].shape
    if any(t.dtype != torch.float32 or t.shape != shape or t.ndim != 3 for t in tensors):
        raise ValueError('smmcl.kernels: the NMF update takes float32 B-M-R tensors of one shape, got '
                         + ', '.join(f'{tuple(t.shape)} {t.dtype}' for t in tensors))


def nmf_update(factor: torch.Tensor, numerator: torch.Tensor, product: torch.Tensor, eps: float,
               keep_denominator: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """One multiplicative update's element-wise steps in one pass, ATen's bits.

    Args:
        factor, numerator, product: float32 B-M-R (any strides): the factor, the numerator ``x @ other``
            (or its transpose's) and ``factor @ gram``.
    Returns:
        ``(factor * numerator / (product + eps), product + eps)``, B-M-R contiguous; the second an empty
        tensor without ``keep_denominator`` (inference keeps nothing for a backward).
    """
    _check_factors(factor, numerator, product)
    factor, numerator, product = (_by_rows(t) for t in (factor, numerator, product))
    batch, m, cols = factor.shape
    rows = batch * m
    updated = factor.new_empty(factor.shape)
    denominator = factor.new_empty(factor.shape if keep_denominator else (0,))
    if rows and cols:
        launch(nmf_update_kernel, (triton.cdiv(rows, UPDATE_ROWS),),
            factor, numerator, product, updated, denominator, rows, cols, factor.stride(1), numerator.stride(1),
            product.stride(1), eps, STORE_DENOMINATOR=keep_denominator, BLOCK_ROWS=UPDATE_ROWS,
            BLOCK_COLS=triton.next_power_of_2(cols), num_warps=UPDATE_WARPS)
    return updated, denominator


def nmf_update_grad(grad: torch.Tensor, denominator: torch.Tensor, factor: torch.Tensor, updated: torch.Tensor,
                    numerator: torch.Tensor, grad_numerator: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The element-wise steps of a multiplicative update's backward in one pass, ATen's bits.

    With ``ratio = grad / denominator`` (``grad`` that of the updated factor; all float32 B-M-R): writes
    ``ratio * factor``, the numerator's gradient, into ``grad_numerator`` (a view whose rows lie one row stride
    apart, as the slots of :class:`~smmcl.models.ham_head.NMFSteps`' stacked factors) and returns ``ratio *
    updated`` (minus the denominator's gradient) and ``ratio * numerator`` (the factor's own term), B-M-R
    contiguous.
    """
    _check_factors(grad, denominator, factor, updated, numerator, grad_numerator)
    if _by_rows(grad_numerator) is not grad_numerator:
        raise ValueError(f'smmcl.kernels: the numerator\'s gradient must be written by rows, got strides '
                         f'{grad_numerator.stride()}')
    grad, denominator, factor, updated, numerator = (_by_rows(t) for t in (grad, denominator, factor, updated,
                                                                            numerator))
    batch, m, cols = grad.shape
    rows = batch * m
    scaled_updated, scaled_numerator = grad.new_empty(grad.shape), grad.new_empty(grad.shape)
    if rows and cols:
        launch(nmf_update_grad_kernel, (triton.cdiv(rows, UPDATE_ROWS),),
            grad, denominator, factor, updated, numerator, grad_numerator, scaled_updated, scaled_numerator,
            rows, cols, grad.stride(1), denominator.stride(1), factor.stride(1), updated.stride(1),
            numerator.stride(1), grad_numerator.stride(1), BLOCK_ROWS=UPDATE_ROWS,
            BLOCK_COLS=triton.next_power_of_2(cols), num_warps=UPDATE_WARPS)
    return scaled_updated, scaled_numerator
