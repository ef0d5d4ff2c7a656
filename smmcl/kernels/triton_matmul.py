"""Batched float32 matrix products at float32's accuracy on the tensor cores (3xTF32), for the decoder's NMF.

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

Importing this module needs Triton (see :mod:`smmcl.kernels.triton_common`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_common import INTERPRETED, bench, check_device, choose, fastest

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); the NMF's outputs are N x 64 or 64-wide, its reductions 64,
# 512 or 4,800 long. Under the interpreter one small tile (its cost is per program).
_TILES = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 64, 64, 4, 3), (128, 64, 32, 8, 3), (32, 64, 64, 4, 4)]
MATMUL_CONFIGS = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
                  for m, n, k, w, s in ([(32, 32, 32, 4, 1)] if INTERPRETED else _TILES)]
SPLIT_ALIGN = 64  # each program's share of a split reduction: a multiple of every BLOCK_K


@triton.autotune(configs=MATMUL_CONFIGS, key=['M', 'N', 'K', 'k_per_split', 'sam', 'sak', 'sbk', 'sbn'],
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
    if device.type == 'cuda' and torch.cuda.get_device_capability(device)[0] >= 8:
        return 'tf32x3'
    return 'ieee'


def _splits(batch: int, m: int, n: int, k: int, device: torch.device) -> int:
    """How many programs share each output tile's reduction: enough for about two programs per SM when
    the output has few 64 x 64 tiles and the reduction is long (each share at least 512 long)."""
    if device.type != 'cuda':
        return 1 if k <= 2 * SPLIT_ALIGN else 2  # the tests cover both
    programs = batch * triton.cdiv(m, 64) * triton.cdiv(n, 64)
    wanted = triton.cdiv(2 * torch.cuda.get_device_properties(device).multi_processor_count, programs)
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
