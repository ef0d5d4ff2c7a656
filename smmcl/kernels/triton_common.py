"""What the Triton kernel modules share: whether kernels are interpreted, autotuning's timing and
candidate pruning, the GELU pieces of the epilogues, a depthwise conv's input bias, the once-per-shape
choice between implementations, and the launch of a kernel that is not autotuned (handed over instead
while ``triton_compile.compile_ahead`` collects).

Importing this module needs Triton. The kernels run on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` was set before Triton was first imported (Triton decides at decoration time,
its own ``tl.cdiv`` & co. included, whether a kernel is compiled or interpreted).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

try:  # whether the kernels are interpreted: fixed when they are decorated, i.e. at import
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # Triton before 3.4 has no knobs
    INTERPRETED = os.environ.get('TRITON_INTERPRET', '0').lower() in ('1', 'true', 'on')

KEY = ['C', 'H', 'W', 'sc']  # the autotuning key of every activation kernel; sc == 1 means channels_last


# While ``triton_compile.compile_ahead`` runs its passes, its collector: each launch hands it the kernel's
# compilations instead of running, no implementation is timed, and a tensor of any device will do.
AHEAD: list = []


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` for a kernel that is not autotuned; while compiling ahead, its
    compilation handed over instead (autotuned kernels do this in their autotuner)."""
    if AHEAD:
        AHEAD[-1](kernel, args, kwargs)
    else:
        kernel[grid](*args, **kwargs)


def bench(kernel_call, quantiles):
    """Autotuning's timing: short runs, as MSCAN-B needs a few dozen (kernel, shape) tunings at start-up."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# SMMCL_TRITON_SWEEP=1 (read at import; bench/gpu_check.py's sweep step): every kernel also tries the
# neighbours of its tiles, to find better defaults on a new GPU; off, only the listed tiles are tried.
SWEEP = os.environ.get('SMMCL_TRITON_SWEEP') == '1'


def neighbours(tile):
    """``tile`` = (BLOCK_C, pixel sizes..., warps) and the tiles one step away: a pixel size or the warps
    doubled or halved (BLOCK_C kept: it tells the layouts apart), at most 4096 elements."""
    out = [tile]
    for i in range(1, len(tile)):
        for scaled in (tile[i] * 2, tile[i] // 2):
            moved = tile[:i] + (scaled,) + tile[i + 1:]
            elements = 1
            for size in moved[:-1]:
                elements *= size
            if scaled >= 1 and elements <= 4096 and moved[-1] <= 16 and moved not in out:
                out.append(moved)
    return out


def configs(nchw_tiles, nhwc_tiles, interpreted_tile, names=('BLOCK_C', 'BLOCK_H', 'BLOCK_W')):
    """Autotuning candidates from tiles ``(*sizes, warps)``, the sizes named ``names``; under the
    interpreter only ``interpreted_tile`` (its cost is per program and op: one tile covers a test shape);
    with SMMCL_TRITON_SWEEP=1 also their :func:`neighbours`. Each candidate's ``listed`` says whether it
    is one of the given tiles (the sweep reports winners that are not)."""
    listed = [interpreted_tile] if INTERPRETED else nchw_tiles + nhwc_tiles
    tiles = list(dict.fromkeys(n for t in listed for n in neighbours(t))) if SWEEP and not INTERPRETED else listed
    out = []
    for tile in tiles:
        config = triton.Config(dict(zip(names, tile[:-1])), num_warps=tile[-1])
        config.listed = tile in listed
        out.append(config)
    return out


def for_layout(configs, named_args, **kwargs):
    """The candidates for the tensors' layout (channels_last: BLOCK_C >= 16, NCHW: fewer channels); only
    the first with SMMCL_TRITON_AUTOTUNE=0 (tests of many tiny shapes on a GPU, where tuning each would
    compile every candidate)."""
    channels_last = named_args['sc'] == 1 and named_args['C'] > 1
    nhwc = [c for c in configs if c.kwargs['BLOCK_C'] >= 16]
    nchw = [c for c in configs if c.kwargs['BLOCK_C'] < 16]
    chosen = (nhwc if channels_last else nchw) or configs
    return chosen[:1] if os.environ.get('SMMCL_TRITON_AUTOTUNE') == '0' else chosen


PRUNE = {'early_config_prune': for_layout}


@triton.jit
def gelu(z):
    """Exact (erf) GELU of float32 ``z``."""
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def gelu_grad(z):
    """d GELU(z) / dz."""
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327


@triton.jit
def conv_bias(b_ptr, c, cmask, y_ptr):
    """A conv's bias at channels ``c`` (BLOCK_C, float32) for its output at ``y_ptr`` (without the bias),
    rounded to that output's dtype first, as autocast rounds a conv's bias: what the bias add's pass adds
    (:func:`~smmcl.kernels.triton_channel.bias_add_kernel`), and the passes that add it for it."""
    return tl.load(b_ptr + c, mask=cmask, other=0.0).to(y_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def load_input(ptrs, mask, ib, IN_BIAS: tl.constexpr):
    """A depthwise conv's input at ``ptrs`` as float32, 0 outside ``mask`` (the zero padding); with IN_BIAS
    plus ``ib`` (BLOCK_C x 1, :func:`conv_bias`) inside, the sum rounded to the input's dtype: the previous conv's
    biased output value for value, as its bias add's own pass stores it
    (:func:`~smmcl.kernels.triton_channel.bias_add`). Outside, the load gives ``-ib``, exact in the
    input's dtype, so the sum is an exact 0 without a select."""
    if IN_BIAS:
        dtype = ptrs.dtype.element_ty
        v = tl.load(ptrs, mask=mask, other=(-ib).to(dtype)).to(tl.float32) + ib
        return v.to(dtype).to(tl.float32)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def add_to(accs, k: tl.constexpr, v):
    """The tuple ``accs`` with ``v`` added to its entry ``k`` (rebuilt when compiling; costs one add)."""
    out = ()
    for i in tl.static_range(len(accs)):
        if i == k:
            out = out + (accs[i] + v,)
        else:
            out = out + (accs[i],)
    return out


@triton.jit
def packed_strip_slots(out_ptr, C, K0, K1, K2, BLOCK_C: tl.constexpr):
    """Program (cb, chunk, job) of a three-strip weight gradient packed as num_chunks x C*(K0+K1+K2+3)
    (dw_0 C x K0 | dw_1 C x K1 | dw_2 C x K2 | db_0 C | db_1 C | db_2 C): its channels, their mask, its
    chunk and job, and where job's dw and db go in row ``chunk``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1)
    job = tl.program_id(2)
    row = out_ptr + chunk * (C * (K0 + K1 + K2 + 3))
    dw_row = row + tl.where(job == 0, 0, tl.where(job == 1, C * K0, C * (K0 + K1)))
    db_row = row + C * (K0 + K1 + K2) + job * C
    return c, c < C, chunk, job, dw_row, db_row


@triton.jit
def chunk_sums_kernel(a_ptr, b_ptr, out_a_ptr, out_b_ptr, like_a_ptr, like_b_ptr, P, LA, LB,
                      ROUND_A: tl.constexpr, ROUND_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr):
    """Program (lb, g) sums the P rows of group g of the float32 partials a (G x P x LA) or b (G x P x LB) over
    BLOCK_L positions: the first ``cdiv(LA, BLOCK_L)`` programs a's, the others b's. The rows are added in a
    fixed order (per-lane sums over row blocks, then one tree): the same result at every run. With ROUND_A
    (ROUND_B) the sum is rounded to like_a's (like_b's) dtype, then stored in out_a's (out_b's), G x LA (LB)."""
    g = tl.program_id(1)
    blocks_a = tl.cdiv(LA, BLOCK_L)
    in_b = tl.program_id(0) >= blocks_a
    l = (tl.program_id(0) - blocks_a * in_b) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_a = l < LA * (1 - in_b)  # products, not ``and``: under the interpreter the operands may be bools
    mask_b = l < LB * in_b
    lanes = tl.zeros((BLOCK_P, BLOCK_L), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)[:, None]
        rows = p < P
        lanes += tl.load(a_ptr + (g * P + p) * LA + l[None, :], mask=rows & mask_a[None, :], other=0.0)
        lanes += tl.load(b_ptr + (g * P + p) * LB + l[None, :], mask=rows & mask_b[None, :], other=0.0)
    total = tl.sum(lanes, axis=0)
    total_a = total.to(like_a_ptr.dtype.element_ty).to(tl.float32) if ROUND_A else total
    total_b = total.to(like_b_ptr.dtype.element_ty).to(tl.float32) if ROUND_B else total
    tl.store(out_a_ptr + g * LA + l, total_a.to(out_a_ptr.dtype.element_ty), mask=mask_a)
    tl.store(out_b_ptr + g * LB + l, total_b.to(out_b_ptr.dtype.element_ty), mask=mask_b)


_CHUNK_ROWS, _CHUNK_WIDTH = 16, 128  # 2048 partials a program and row block; these launches are latency-bound


def chunk_sums(a: torch.Tensor, out_a: torch.Tensor, round_a: Optional[torch.dtype] = None,
               b: Optional[torch.Tensor] = None, out_b: Optional[torch.Tensor] = None,
               round_b: Optional[torch.dtype] = None) -> None:
    """Sums the kernels' per-chunk partials over their chunks in one launch (:func:`chunk_sums_kernel`), for
    one or two sets of partials with as many groups and chunks: where ``a.sum(1)`` and ``b.sum(1)``, each
    followed by a rounding to ``round_a`` (``round_b``) and a cast to out's dtype, take a launch each.

    Args:
        a, b: G-P-L float32, contiguous (b: None, or as many groups G and chunks P as a).
        out_a, out_b: G-L, contiguous, in the dtype the sums are stored in (written in place).
        round_a, round_b: the dtype each sum is rounded to first (as a bf16 conv's bias gradient is), or None.
    """
    groups, rows, width_a = a.shape
    width_b = 0 if b is None else b.shape[2]
    if b is not None and tuple(b.shape[:2]) != (groups, rows):
        raise ValueError(f'smmcl.kernels: chunk_sums takes partials with as many groups and chunks, got '
                         f'{tuple(a.shape)} and {tuple(b.shape)}')
    for partials, out, width in ((a, out_a, width_a), (b, out_b, width_b)):
        if partials is not None and (partials.dtype != torch.float32 or not partials.is_contiguous()
                                     or not out.is_contiguous() or tuple(out.shape) != (groups, width)):
            raise ValueError(f'smmcl.kernels: chunk_sums takes contiguous float32 G-P-L partials and G-L '
                             f'outputs, got {tuple(partials.shape)} {partials.dtype} into {tuple(out.shape)}')
    b, out_b = (a, out_a) if b is None else (b, out_b)
    blocks = triton.cdiv(width_a, _CHUNK_WIDTH) + triton.cdiv(width_b, _CHUNK_WIDTH)
    if groups and blocks:
        launch(chunk_sums_kernel, (blocks, groups),
               a, b, out_a, out_b, _typed(out_a, round_a), _typed(out_b, round_b), rows, width_a, width_b,
               ROUND_A=round_a is not None, ROUND_B=round_b is not None, BLOCK_P=_CHUNK_ROWS, BLOCK_L=_CHUNK_WIDTH)


def _typed(out: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A tensor of ``dtype`` (out where that is out's, or None) for a kernel that reads only its pointer's dtype."""
    return out if dtype is None or dtype == out.dtype else out.new_empty(1, dtype=dtype)


def check_device(x: torch.Tensor) -> None:
    if x.device.type != 'cuda' and not INTERPRETED and not AHEAD:
        raise RuntimeError(
            f'smmcl.kernels: the Triton kernels got a {x.device.type} tensor but run only on CUDA, or on '
            'the CPU under Triton\'s interpreter; set TRITON_INTERPRET=1 before Triton is first imported '
            '(or leave triton_kernels off)')


def fastest(chosen: dict, key, impls: dict, *args) -> str:
    """The name of the fastest of ``impls`` on ``args`` (median GPU time), timed on the first call for
    ``key`` and remembered in ``chosen``. While compiling ahead: each launched once, untimed, nothing
    remembered, the first named."""
    if AHEAD and key not in chosen:
        for fn in impls.values():
            fn(*args)
        return next(iter(impls))
    if key not in chosen:
        times = {name: triton.testing.do_bench(lambda fn=fn: fn(*args), warmup=5, rep=20, return_mode='median')
                 for name, fn in impls.items()}
        chosen[key] = min(times, key=times.get)
    return chosen[key]


def choose(env: str, impl, choices, device: torch.device, fallback: str, timed) -> str:
    """``impl``, else the environment's ``env``, else ``'auto'`` (refused unless one of these): on a CUDA
    ``device`` (or while compiling ahead, which launches each) auto's choice is ``timed()`` (e.g.
    :func:`fastest`, timed once per key), elsewhere (the interpreter) ``fallback``."""
    impl = implementation(env, impl, choices)
    if impl != 'auto':
        return impl
    return timed() if device.type == 'cuda' or AHEAD else fallback


def implementation(env: str, impl, choices) -> str:
    """``impl``, else the environment's ``env``, else ``'auto'``; refused unless ``'auto'`` or in ``choices``."""
    impl = impl or os.environ.get(env, 'auto')
    if impl != 'auto' and impl not in choices:
        raise ValueError(f"smmcl.kernels: {env} must be 'auto' or one of {tuple(choices)}, got {impl!r}")
    return impl
