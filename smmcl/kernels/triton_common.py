"""What the Triton kernel modules share: whether kernels are interpreted, autotuning's timing and
candidate pruning, the GELU pieces of the epilogues, a depthwise conv's input bias, and the once-per-shape
choice between implementations.

Importing this module needs Triton. The kernels run on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` was set before Triton was first imported (Triton decides at decoration time,
its own ``tl.cdiv`` & co. included, whether a kernel is compiled or interpreted).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # whether the kernels are interpreted: fixed when they are decorated, i.e. at import
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # Triton before 3.4 has no knobs
    INTERPRETED = os.environ.get('TRITON_INTERPRET', '0').lower() in ('1', 'true', 'on')

KEY = ['C', 'H', 'W', 'sc']  # the autotuning key of every activation kernel; sc == 1 means channels_last


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


def check_device(x: torch.Tensor) -> None:
    if x.device.type != 'cuda' and not INTERPRETED:
        raise RuntimeError(
            f'smmcl.kernels: the Triton kernels got a {x.device.type} tensor but run only on CUDA, or on '
            'the CPU under Triton\'s interpreter; set TRITON_INTERPRET=1 before Triton is first imported '
            '(or leave triton_kernels off)')


def fastest(chosen: dict, key, impls: dict, *args) -> str:
    """The name of the fastest of ``impls`` on ``args`` (median GPU time), timed on the first call for
    ``key`` and remembered in ``chosen``."""
    if key not in chosen:
        times = {name: triton.testing.do_bench(lambda fn=fn: fn(*args), warmup=5, rep=20, return_mode='median')
                 for name, fn in impls.items()}
        chosen[key] = min(times, key=times.get)
    return chosen[key]


def choose(env: str, impl, choices, device: torch.device, fallback: str, timed) -> str:
    """``impl``, else the environment's ``env``, else ``'auto'`` (refused unless one of these): on a CUDA
    ``device`` auto's choice is ``timed()`` (e.g. :func:`fastest`, timed once per key), elsewhere (the
    interpreter) ``fallback``."""
    impl = implementation(env, impl, choices)
    if impl != 'auto':
        return impl
    return timed() if device.type == 'cuda' else fallback


def implementation(env: str, impl, choices) -> str:
    """``impl``, else the environment's ``env``, else ``'auto'``; refused unless ``'auto'`` or in ``choices``."""
    impl = impl or os.environ.get(env, 'auto')
    if impl != 'auto' and impl not in choices:
        raise ValueError(f"smmcl.kernels: {env} must be 'auto' or one of {tuple(choices)}, got {impl!r}")
    return impl
