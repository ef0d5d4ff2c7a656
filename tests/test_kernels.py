"""The Triton kernels of smmcl.kernels compute what PyTorch's layers compute, forward and backward.

Without a GPU the kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1``, set when this
module is collected, before Triton is first imported, and restored after its tests); with one they run
compiled on CUDA (``bench/gpu_check.py`` runs this file there). References
are ``F.conv2d`` / ``F.gelu`` and autograd in float32 on the same (bf16-rounded, where bf16 is tested)
values. Shapes are tiny because the interpreter runs every program in turn in NumPy: they cover odd
sizes, sizes below the kernel, batch 1, channel counts that are not a multiple of the channel block
(32 under the interpreter) and maps wider and taller than one tile (16 wide, 8 tall), in NCHW and
channels_last.
"""
import contextlib
import copy
import itertools
import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
# Triton reads TRITON_INTERPRET when a kernel is decorated, its own library (tl.cdiv, ...) included,
# i.e. when triton is first imported: set it now, at collection, and restore it after this module.
_SAVED_INTERPRET = os.environ.get('TRITON_INTERPRET')
_TRITON_IMPORTED_BEFORE = 'triton' in sys.modules
if DEVICE == 'cpu' and not _TRITON_IMPORTED_BEFORE:
    os.environ['TRITON_INTERPRET'] = '1'

triton = pytest.importorskip('triton')
if not hasattr(torch.library, 'custom_op'):
    pytest.skip('the kernels need PyTorch >= 2.4 (torch.library.custom_op)', allow_module_level=True)

from conftest import OpCalls, bench_script, interpreter_patches_once_per_launch  # noqa: E402
from smmcl import kernels  # noqa: E402  (the Triton-free part; the kernels load on first use)
from smmcl.models.mscan import AttentionModule, Block, Mlp, ScaleByImage, mscan_t, use_fused_kernels  # noqa: E402

CL = torch.channels_last
NCHW = torch.contiguous_format


@pytest.fixture(scope='module', autouse=True)
def _interpreter_on_cpu():
    """The CPU runs the kernels under Triton's interpreter; other test modules see the old setting."""
    if DEVICE == 'cpu' and _TRITON_IMPORTED_BEFORE and os.environ.get('TRITON_INTERPRET') != '1':
        pytest.skip('triton was imported before TRITON_INTERPRET=1 could be set; run tests/test_kernels.py '
                    'alone, or with TRITON_INTERPRET=1 in the environment')
    if DEVICE == 'cpu':
        os.environ['TRITON_INTERPRET'] = '1'  # runs_on() asks at every call
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    # float32 references on a GPU: TF32 would round the references' convs to 10 bits
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    with interpreter_patches_once_per_launch() if DEVICE == 'cpu' else contextlib.nullcontext():
        yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    if _SAVED_INTERPRET is None:
        os.environ.pop('TRITON_INTERPRET', None)
    else:
        os.environ['TRITON_INTERPRET'] = _SAVED_INTERPRET


@triton.jit
def _twice_plus_one(x):
    return x * 2 + 1


@triton.jit
def _twice_plus_one_kernel(x_ptr, out_ptr, n):
    """``out = 2 x + 1`` in blocks of 4, through a helper called three times per program."""
    offsets = triton.language.program_id(0) * 4 + triton.language.arange(0, 4)
    mask = offsets < n
    x = triton.language.load(x_ptr + offsets, mask=mask)
    triton.language.store(out_ptr + offsets, _twice_plus_one(x) + _twice_plus_one(x) - _twice_plus_one(x), mask=mask)


@pytest.mark.skipif(DEVICE != 'cpu', reason="Triton's interpreter runs on the CPU")
def test_the_interpreter_patches_the_language_once_per_launch():
    """The tests' interpreter speed-up (``interpreter_patches_once_per_launch`` in conftest.py): a launch of
    3 programs whose helper is called 9 times reaches Triton's patching once, computes what it computes
    without the speed-up, and puts Triton's function back afterwards."""
    from triton.runtime import interpreter
    x = torch.arange(10, dtype=torch.float32)
    calls, before = [], interpreter._patch_lang
    counting = lambda fn: calls.append(fn) or before(fn)  # noqa: E731
    interpreter._patch_lang = counting
    try:
        with interpreter_patches_once_per_launch():
            out = torch.empty_like(x)
            _twice_plus_one_kernel[(3,)](x, out, 10)
        assert len(calls) == 1 and interpreter._patch_lang is counting
        assert torch.equal(out, x * 2 + 1)
        calls.clear()
        out = torch.empty_like(x)
        _twice_plus_one_kernel[(3,)](x, out, 10)
        assert len(calls) == 1 + 9 and torch.equal(out, x * 2 + 1)
    finally:
        interpreter._patch_lang = before


def ops():
    return kernels.load_ops()


def rel(actual, expected):
    return (torch.linalg.norm(actual.float() - expected.float()) / torch.linalg.norm(expected.float())).item()


def _tensor(*shape, fmt=NCHW, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g).to(dtype)
    return t.to(DEVICE).contiguous(memory_format=fmt).requires_grad_()


def _check_grads(out, ref_out, inputs, ref_inputs, tol, grad_tol=None):
    """Forward within ``tol``; grads of ``inputs`` (kernel) vs ``ref_inputs`` (reference) within ``grad_tol``."""
    assert rel(out, ref_out) <= tol, f'forward rel err {rel(out, ref_out):.2e}'
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    got = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    want = torch.autograd.grad(ref_out, ref_inputs, grad)
    for name, g, w in zip(range(len(got)), got, want):
        assert g.shape == w.shape and g.dtype == inputs[name].dtype
        err = rel(g, w)
        assert err <= (grad_tol or tol), f'grad {name}: rel err {err:.2e}'


def _fp32_copies(*tensors):
    """Float32 leaves holding the same (possibly bf16-rounded) values: the reference's inputs."""
    return [t.detach().float().requires_grad_() for t in tensors]


# ---- depthwise conv (KxK, 1xK, Kx1) and depthwise conv + GELU --------------------------------------

DW_CASES = [  # N, C, H, W, KH, KW, memory format
    (2, 37, 10, 19, 5, 5, NCHW),   # two channel blocks (37 = 32 + 5), two tiles each way, odd sizes
    (1, 3, 2, 3, 5, 5, NCHW),      # map smaller than the kernel, batch 1
    (2, 37, 9, 18, 5, 5, CL),      # channels_last
    (1, 5, 4, 5, 1, 7, NCHW),      # 1xK wider than the map
    (2, 6, 6, 3, 7, 1, CL),        # Kx1 taller than the map
    (1, 9, 3, 4, 21, 1, NCHW),     # MSCAN's longest strip
    (2, 7, 7, 17, 3, 3, CL),       # the MLP's 3x3
]


@pytest.mark.parametrize('n, c, h, w, kh, kw, fmt', DW_CASES)
def test_dwconv_matches_conv2d(n, c, h, w, kh, kw, fmt):
    x, weight, bias = _tensor(n, c, h, w, fmt=fmt), _tensor(c, 1, kh, kw, seed=1), _tensor(c, seed=2)
    rx, rw, rb = _fp32_copies(x, weight, bias)
    out = ops().dwconv2d(x, weight, bias)
    assert out.shape == x.shape and out.stride() == x.stride()  # the input's memory format is kept
    ref = F.conv2d(rx, rw, rb, padding=(kh // 2, kw // 2), groups=c)
    _check_grads(out, ref, (x, weight, bias), (rx, rw, rb), 1e-5)


@pytest.mark.parametrize('n, c, h, w, fmt', [(2, 37, 10, 19, NCHW), (1, 5, 2, 1, CL), (2, 6, 9, 17, CL)])
def test_dwconv_gelu_matches_conv2d_then_gelu(n, c, h, w, fmt):
    x, weight, bias = _tensor(n, c, h, w, fmt=fmt), _tensor(c, 1, 3, 3, seed=1), _tensor(c, seed=2)
    rx, rw, rb = _fp32_copies(x, weight, bias)
    out = ops().dwconv2d_gelu(x, weight, bias)
    ref = nn.GELU()(F.conv2d(rx, rw, rb, padding=1, groups=c))
    _check_grads(out, ref, (x, weight, bias), (rx, rw, rb), 1e-5)


def test_dwconv_without_bias():
    x, weight = _tensor(1, 4, 5, 6), _tensor(4, 1, 3, 3, seed=1)
    rx, rw = _fp32_copies(x, weight)
    out = ops().dwconv2d(x, weight, None)
    _check_grads(out, F.conv2d(rx, rw, padding=1, groups=4), (x, weight), (rx, rw), 1e-5)


# ---- the MLP's depthwise conv + GELU with fc1's bias added as its input is loaded ---------------------

IN_BIAS_CASES = [(2, 5, 7, 9, NCHW), (1, 3, 2, 1, NCHW), (1, 4, 1, 3, CL), (2, 37, 6, 17, CL)]


@pytest.mark.parametrize('family', ['tiles', 'rows'])
@pytest.mark.parametrize('n, c, h, w, fmt', IN_BIAS_CASES)
def test_dwconv_gelu_with_in_bias(monkeypatch, family, n, c, h, w, fmt):
    """``dwconv2d_gelu(y, w, b, in_bias)`` is ``dwconv2d_gelu(add_channel_bias(y, in_bias), w, b)`` to the bit
    (the bias added inside the map only: maps narrower and shorter than the kernel), and its four gradients
    are the float64 conv's, the input bias's and the border-corrected weight gradient's included."""
    monkeypatch.setenv('SMMCL_TRITON_DEPTHWISE', family)
    y, weight, bias, in_bias = (_tensor(n, c, h, w, fmt=fmt), _tensor(c, 1, 3, 3, seed=1), _tensor(c, seed=2),
                                _tensor(c, seed=3))
    out = ops().dwconv2d_gelu(y, weight, bias, in_bias)
    assert out.stride() == y.stride()
    assert torch.equal(out, ops().dwconv2d_gelu(ops().add_channel_bias(y, in_bias), weight, bias))
    ref_inputs = [t.detach().double().requires_grad_() for t in (y, weight, bias, in_bias)]
    ry, rw, rb, rib = ref_inputs
    ref = F.gelu(F.conv2d(ry + rib[:, None, None], rw, rb, padding=1, groups=c))
    _check_grads(out, ref, (y, weight, bias, in_bias), ref_inputs, 1e-6)


def test_bf16_dwconv_gelu_with_in_bias():
    """bf16 maps: the forward is the bias add's rounding to the bit; the gradients are those of the
    composition with the bias add, within bf16's rounding (the weight gradient takes y + in_bias unrounded,
    in_bias's gradient is summed from the conv's, not from a bf16 input gradient)."""
    y = _tensor(2, 37, 6, 17, fmt=CL, dtype=torch.bfloat16)
    weight, bias, in_bias = _tensor(37, 1, 3, 3, seed=1), _tensor(37, seed=2), _tensor(37, seed=3)
    out = ops().dwconv2d_gelu(y, weight, bias, in_bias)
    want = ops().dwconv2d_gelu(ops().add_channel_bias(y, in_bias), weight, bias)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, torch.bfloat16)
    inputs = (y, weight, bias, in_bias)
    for name, got, ref in zip('y weight bias in_bias'.split(), torch.autograd.grad(out, inputs, grad),
                              torch.autograd.grad(want, inputs, grad)):
        assert got.dtype == ref.dtype and rel(got, ref) <= BF16_TOL, name


@pytest.mark.parametrize('impl', ['triton', 'torch'])
@pytest.mark.parametrize('fmt', [NCHW, CL])
@pytest.mark.parametrize('kh, kw', [(3, 3), (5, 5), (1, 7), (21, 1)])
@pytest.mark.parametrize('h, w', [(9, 11), (2, 3), (1, 1), (4, 40)])
def test_inside_sums_are_the_weight_gradient_of_a_constant_input(kh, kw, h, w, fmt, impl):
    """``inside_sums`` reads only the border, and is the weight gradient of a map of ones (zero padded);
    against the taps, the gradient of that constant (x's gradient summed over the map), rounded to the
    gradient's dtype. The kernel (one launch; 37 channels: three channel blocks, the last partial) and
    ATen's gathers alike, in both layouts, on maps smaller than the kernel too."""
    from smmcl.kernels import triton_dwconv
    grad = torch.randn(2, 37, h, w, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grad = grad.contiguous(memory_format=fmt)
    weight = _tensor(37, 1, kh, kw, seed=2).detach()
    got, against_taps = triton_dwconv.inside_sums(grad, grad.sum((0, 2, 3)), weight, impl=impl)
    want = torch.nn.grad.conv2d_weight(torch.ones_like(grad), (37, 1, kh, kw), grad, padding=(kh // 2, kw // 2),
                                       groups=37)[:, 0]
    assert got.shape == (37, kh, kw) and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    x_grad = F.conv_transpose2d(grad, weight, padding=(kh // 2, kw // 2), groups=37)
    assert against_taps.dtype == grad.dtype
    assert torch.allclose(against_taps, x_grad.sum((0, 2, 3)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('impl', ['triton', 'torch'])
def test_inside_sums_against_the_taps_round_to_the_gradients_dtype_in_the_one_asked(impl):
    """With ``dtype`` (the input bias's, float32), the sums against the taps are the bf16-rounded values, as
    returned without it, only stored in float32: the rounding and the cast of the parameter's gradient in
    the same launch."""
    from smmcl.kernels import triton_dwconv
    grad = torch.randn(2, 37, 6, 7, generator=torch.Generator().manual_seed(1)).to(DEVICE).to(torch.bfloat16)
    weight = _tensor(37, 1, 3, 3, seed=2).detach()
    total = grad.sum((0, 2, 3), dtype=torch.float32)
    _, rounded = triton_dwconv.inside_sums(grad, total, weight, impl=impl)
    _, wide = triton_dwconv.inside_sums(grad, total, weight, impl=impl, dtype=torch.float32)
    assert rounded.dtype == torch.bfloat16 and wide.dtype == torch.float32
    assert torch.equal(wide, rounded.float())


def test_dwconv_in_bias_is_for_the_forward_conv():
    from smmcl.kernels import triton_dwconv
    x, weight = _tensor(1, 3, 4, 5).detach(), _tensor(3, 1, 3, 3, seed=1).detach()
    with pytest.raises(ValueError, match='in_bias is for the forward conv'):
        triton_dwconv.dwconv(x, weight, None, transpose=True, in_bias=weight[:, 0, 0, 0])


def test_mlp_adds_fc1s_bias_in_the_depthwise_conv(monkeypatch):
    """With the kernels on, the MLP's only bias passes are fc2's, forward and backward; the same function."""
    from smmcl.kernels import triton_channel
    torch.manual_seed(0)
    plain = Mlp(8, 32).to(DEVICE)
    fused = use_fused_kernels(copy.deepcopy(plain))
    calls = []
    for name in ('bias_add', 'bias_grad'):
        original = getattr(triton_channel, name)
        monkeypatch.setattr(triton_channel, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    calls_of_plain = _assert_same_function(plain, fused, _tensor(2, 8, 5, 7, fmt=CL), 1e-5, calls)
    assert calls_of_plain == [] and calls == ['bias_add', 'bias_grad']  # fc2's; fc1's is in smmcl::dwconv2d_gelu


# ---- the attention's sum of strip pairs -------------------------------------------------------------

def _strip_params(c, dtype=torch.float32):
    params = []
    for i, k in enumerate((7, 11, 21)):
        params += [_tensor(c, 1, 1, k, dtype=dtype, seed=10 + i), _tensor(c, dtype=dtype, seed=20 + i),
                   _tensor(c, 1, k, 1, dtype=dtype, seed=30 + i), _tensor(c, dtype=dtype, seed=40 + i)]
    return params


@pytest.mark.parametrize('n, c, h, w, fmt', [(2, 5, 9, 23, NCHW), (1, 3, 2, 3, NCHW), (1, 37, 5, 6, CL)])
def test_strip_sum_matches_the_three_branches(n, c, h, w, fmt):
    a, params = _tensor(n, c, h, w, fmt=fmt), _strip_params(c)
    ref_a, *ref_params = _fp32_copies(a, *params)
    out = ops().mscan_strip_sum(a, *params)
    assert out.stride() == a.stride()
    ref = kernels.strip_sum_reference(ref_a, ref_params)
    _check_grads(out, ref, [a] + params, [ref_a] + ref_params, 1e-5)


# ---- the row-blocked kernels along H (SMMCL_TRITON_DEPTHWISE=rows) ------------------------------------

def _all_rows(monkeypatch):
    """Every kernel of the row family: the convs along H and the row-walked weight gradients."""
    for name in ('SMMCL_TRITON_DEPTHWISE', 'SMMCL_TRITON_WGRAD', 'SMMCL_TRITON_STRIP_WGRAD'):
        monkeypatch.setenv(name, 'rows')


@pytest.mark.parametrize('n, c, h, w, kh, kw, fmt', [DW_CASES[0], DW_CASES[1], DW_CASES[4], DW_CASES[6]])
def test_row_kernels_match_conv2d(monkeypatch, n, c, h, w, kh, kw, fmt):
    """The depthwise conv through the row kernels, forward and backward (the adjoint conv too), and for
    the MLP's 3x3 the conv + GELU; maps taller than one block of rows (4 under the interpreter)."""
    _all_rows(monkeypatch)
    x, weight, bias = _tensor(n, c, h, w, fmt=fmt), _tensor(c, 1, kh, kw, seed=1), _tensor(c, seed=2)
    rx, rw, rb = _fp32_copies(x, weight, bias)
    ref = F.conv2d(rx, rw, rb, padding=(kh // 2, kw // 2), groups=c)
    out = ops().dwconv2d(x, weight, bias)
    assert out.stride() == x.stride()
    _check_grads(out, ref, (x, weight, bias), (rx, rw, rb), 1e-5)
    if kh == kw == 3:
        ref = nn.GELU()(F.conv2d(rx, rw, rb, padding=1, groups=c))
        _check_grads(ops().dwconv2d_gelu(x, weight, bias), ref, (x, weight, bias), (rx, rw, rb), 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('n, c, h, w, fmt', [(2, 5, 9, 23, NCHW), (1, 3, 25, 4, NCHW), (1, 37, 5, 6, CL)])
def test_row_kernels_in_the_strip_sum(monkeypatch, n, c, h, w, fmt):
    """The attention's strips on the row kernels (forward sum, backward's adjoint strips; along W in NCHW
    each output row's shifts, in channels_last the walk with H and W swapped); one map taller and one
    wider than the 21-tap strip."""
    _all_rows(monkeypatch)
    a, params = _tensor(n, c, h, w, fmt=fmt), _strip_params(c)
    ref_a, *ref_params = _fp32_copies(a, *params)
    _check_grads(ops().mscan_strip_sum(a, *params), kernels.strip_sum_reference(ref_a, ref_params),
                 [a] + params, [ref_a] + ref_params, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('rows', [1, 2, 3])
def test_row_kernels_with_fewer_output_rows(monkeypatch, rows):
    """A program of 1, 2 or 3 output rows (the interpreter's tiles have 4): each row's accumulator and
    store, the walk's length; the 5x5 conv and the strip sum, forward and backward."""
    import triton
    _all_rows(monkeypatch)
    ops()  # the kernels are imported
    from smmcl.kernels import triton_rows
    for kernel in (triton_rows.dwconv_rows_kernel, triton_rows.strip3_rows_kernel, triton_rows.strip3_sum_rows_kernel):
        monkeypatch.setattr(kernel, 'configs', [triton.Config(dict(BLOCK_C=32, ROWS=rows, BLOCK_W=16), num_warps=4)])
        monkeypatch.setattr(kernel, 'cache', {})
    x, weight, bias = _tensor(1, 5, 7, 9), _tensor(5, 1, 5, 5, seed=1), _tensor(5, seed=2)
    rx, rw, rb = _fp32_copies(x, weight, bias)
    _check_grads(ops().dwconv2d(x, weight, bias), F.conv2d(rx, rw, rb, padding=2, groups=5), (x, weight, bias),
                 (rx, rw, rb), 1e-5)
    a, params = _tensor(1, 3, 23, 4), _strip_params(3)
    ref_a, *ref_params = _fp32_copies(a, *params)
    _check_grads(ops().mscan_strip_sum(a, *params), kernels.strip_sum_reference(ref_a, ref_params),
                 [a] + params, [ref_a] + ref_params, 1e-5)


@pytest.mark.parametrize('rows', [1, 3, 8])
def test_row_walked_weight_gradients_with_bands_of_any_height(monkeypatch, rows):
    """Bands of 1, 3 or 8 output rows (the interpreter's config has 4): the walk's length and which taps
    each input row meets; a 5x5 conv and the three strips along H and along W (NCHW: the taps along the
    row)."""
    import triton
    from smmcl.kernels import triton_dwconv, triton_rows
    for kernel in (triton_rows.dwconv_wgrad_rows_kernel, triton_rows.strip3_wgrad_rows_kernel):
        monkeypatch.setattr(kernel, 'configs', [triton.Config(dict(BLOCK_C=32, ROWS=rows, BLOCK_W=16), num_warps=4)])
        monkeypatch.setattr(kernel, 'cache', {})
    x, weight, bias = _tensor(1, 5, 10, 9), _tensor(5, 1, 5, 5, seed=1), _tensor(5, seed=2)
    out = F.conv2d(x, weight, bias, padding=2, groups=5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    want_w, want_b = torch.autograd.grad(out, (weight, bias), grad)
    got_w, got_b = triton_dwconv.dwconv_wgrad(grad, x.detach(), weight.detach(), impl='rows')
    assert rel(got_w, want_w) <= 1e-5 and rel(got_b, want_b) <= 1e-5
    for along_w in (False, True):
        grads = [_tensor(1, 3, 23, 6, seed=60 + i).detach() for i in range(3)]
        xs = [_tensor(1, 3, 23, 6, seed=70 + i).detach() for i in range(3)]
        weights = _strip_weights(3, along_w)
        packed = triton_dwconv.strip3_wgrad_packed(grads, xs, weights, along_w, impl='rows')
        _check_strip_wgrad(triton_dwconv.unpack_strip3_wgrad(packed, weights),
                           _strip_wgrad_reference(grads, xs, weights, along_w), weights, 1e-5)


# ---- the band kernels: the strips along W in NCHW as tensor-core products (SMMCL_TRITON_DEPTHWISE=bands) -----

def _band_launches(monkeypatch):
    """Every launch of the three band kernels from now on: [(kernel name, PARTS)]."""
    ops()
    from smmcl.kernels import triton_bands
    launches = []
    for name in ('strip3_bands_kernel', 'strip3_sum_bands_kernel', 'strip3_wgrad_bands_kernel',
                 'dwconv_wgrad_bands_kernel'):
        kernel = getattr(triton_bands, name)
        monkeypatch.setattr(kernel, 'run', lambda *a, _run=kernel.run, _name=name, **k: (
            launches.append((_name, k['PARTS'])), _run(*a, **k))[1])
    return launches


@pytest.mark.parametrize('n, c, h, w, fmt', [
    (2, 5, 9, 45, NCHW),   # 18 rows: 2 row tiles of 16 (the interpreter's), one across both images; 2 column
                           # tiles; one program per channel walks the four (MIN_TILES)
    (1, 37, 3, 5, NCHW),   # a map narrower than the strips, one tile
    (1, 5, 6, 9, CL),      # channels_last: no band kernel (the row kernels walk the columns there)
])
def test_band_kernels_in_the_strip_sum(monkeypatch, n, c, h, w, fmt):
    """The attention's strips with the band kernels (forward strips along W, the backward's adjoint sum
    along W and its weight gradients) against the three branches in float32: one product of the rows
    with each strip's band matrix per tile, float32 operands (3xTF32 on a GPU)."""
    monkeypatch.setenv('SMMCL_TRITON_DEPTHWISE', 'bands')
    monkeypatch.setenv('SMMCL_TRITON_STRIP_WGRAD', 'bands')
    launches = _band_launches(monkeypatch)
    a, params = _tensor(n, c, h, w, fmt=fmt), _strip_params(c)
    ref_a, *ref_params = _fp32_copies(a, *params)
    _check_grads(ops().mscan_strip_sum(a, *params), kernels.strip_sum_reference(ref_a, ref_params),
                 [a] + params, [ref_a] + ref_params, 1e-5)
    expected = [] if fmt == CL else [('strip3_bands_kernel', 0), ('strip3_sum_bands_kernel', 0),
                                     ('strip3_bands_kernel', 0), ('strip3_wgrad_bands_kernel', 0)]
    assert launches == expected  # backward: the adjoint sum, the recomputed strips, the 1xK weight gradients


@pytest.mark.parametrize('weight_dtype, parts', [(torch.float32, 3), (torch.bfloat16, 1)],
                         ids=['autocast-like', 'bf16-model'])
@pytest.mark.parametrize('transpose', [False, True])
def test_band_products_keep_float32_accuracy_on_bf16_maps(monkeypatch, weight_dtype, parts, transpose):
    """bfloat16 maps take bfloat16 products, exact in float32: float32 taps split into three bfloat16
    parts whose sum is the tap, bfloat16 taps as they are. With float32 outputs (the kernels round only
    when storing) both sums equal float64's to float32 rounding, not bfloat16's: the band kernels compute
    the row kernels' function (float32 taps, float32 sums) and not that of taps rounded to bfloat16."""
    from smmcl.kernels import triton_bands
    launches = _band_launches(monkeypatch)
    n, c, h, w = 2, 3, 5, 45
    x = _tensor(n, c, h, w, dtype=torch.bfloat16).detach()
    weights = [wt.to(weight_dtype) for wt in _strip_weights(c, along_w=True)]
    biases = [_tensor(c, dtype=weight_dtype, seed=80 + i).detach() for i in range(3)]
    rows = [wt.reshape(c, -1).contiguous() for wt in weights]
    meta = dict(K0=7, K1=11, K2=21, TRANSPOSE=transpose, HAS_BIAS=not transpose, PARTS=parts)
    grid = triton_bands.programs(n, c, h, w, 2)

    def strip(t, wt, b):
        k = wt.shape[-1]
        if transpose:
            return F.conv_transpose2d(t.double(), wt.double(), None, padding=(0, k // 2), groups=c)
        return F.conv2d(t.double(), wt.double(), b.double(), padding=(0, k // 2), groups=c)

    outs = [torch.empty(n, c, h, w, device=DEVICE) for _ in range(3)]
    triton_bands.strip3_bands_kernel[grid](x, *rows, *biases, *outs, n, c, h, w, *x.stride(), **meta)
    for out, wt, b in zip(outs, weights, biases):
        assert rel(out, strip(x, wt, b)) <= 1e-6
    r, ts = _tensor(n, c, h, w, dtype=torch.bfloat16, seed=5).detach(), [
        _tensor(n, c, h, w, dtype=torch.bfloat16, seed=6 + i).detach() for i in range(3)]
    out = torch.empty(n, c, h, w, device=DEVICE)
    triton_bands.strip3_sum_bands_kernel[grid](r, *ts, *rows, *biases, out, n, c, h, w, *r.stride(), **meta)
    assert rel(out, r.double() + sum(strip(t, wt, b) for t, wt, b in zip(ts, weights, biases))) <= 1e-6
    assert [p for _, p in launches] == [parts, parts]
    if weight_dtype == torch.float32:  # the taps rounded to bfloat16 are ~1e-3 off: the split matters
        rounded = [strip(x, wt.bfloat16().float(), b) for wt, b in zip(weights, biases)]
        assert all(rel(o, ref) > 1e-4 for o, ref in zip(outs, rounded))


def test_band_kernels_on_bf16_maps_round_as_the_other_families():
    """Through the launchers (bfloat16 results): the band kernels and the tile kernels (the row kernels'
    function, faster to interpret) round the same float32 sums, forward and adjoint strips and the
    weight gradients along W."""
    from smmcl.kernels import triton_dwconv
    x = _tensor(2, 2, 9, 40, dtype=torch.bfloat16).detach()
    horizontal = _strip_weights(2, along_w=True)
    ts = [_tensor(2, 2, 9, 40, dtype=torch.bfloat16, seed=3 + i).detach() for i in range(3)]
    for transpose in (False, True):
        got, want = (triton_dwconv.strip3(x, horizontal, None, along_w=True, transpose=transpose, impl=impl)
                     for impl in ('bands', 'tiles'))
        assert all(g.dtype == torch.bfloat16 and rel(g, w_) <= 1e-3 for g, w_ in zip(got, want))
        got, want = (triton_dwconv.strip3_sum(x, ts, horizontal, None, along_w=True, transpose=transpose,
                                              impl=impl) for impl in ('bands', 'tiles'))
        assert rel(got, want) <= 1e-3
    got, want = (triton_dwconv.strip3_wgrad_packed(ts, (x, x, x), horizontal, along_w=True, impl=impl)
                 for impl in ('bands', 'fused'))
    assert rel(got, want) <= 1e-6


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_band_weight_gradients_of_the_kxk_convs(monkeypatch, dtype):
    """The 5x5 and 3x3 convs' weight gradients as band products (one per kernel row, of the gradient and
    the input rows shifted within each image: tiles of 16 rows across both images here) against float32
    autograd on the same values; up to 5 kernel rows (the 21x1 strip: the row-walked kernel)."""
    from smmcl.kernels import triton_dwconv
    launches = _band_launches(monkeypatch)
    for kh, kw, tol in ((5, 5, 1e-5), (3, 3, 1e-5), (21, 1, 1e-5)):
        x, weight, bias = _tensor(2, 3, 9, 21, dtype=dtype), _tensor(3, 1, kh, kw, seed=1), _tensor(3, seed=2)
        rx, = _fp32_copies(x)
        out = F.conv2d(rx, weight, bias, padding=(kh // 2, kw // 2), groups=3)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE).to(dtype)
        want_w, want_b = torch.autograd.grad(out, (weight, bias), grad.float())
        got_w, got_b = triton_dwconv.dwconv_wgrad(grad, x.detach(), weight.detach(), impl='bands')
        assert rel(got_w, want_w) <= tol and rel(got_b, want_b) <= tol, (kh, kw)
    assert launches == [('dwconv_wgrad_bands_kernel', int(dtype == torch.bfloat16))] * 2


def test_band_kernels_apply_only_where_they_can(monkeypatch):
    """'bands' names the strips along W in NCHW: every other launch (the 5x5 conv, the strips along H,
    channels_last, a strip longer than the widest band, inputs of two dtypes) runs the row kernels; on a
    GPU before Ampere (no bfloat16 or TF32 tensor cores) auto never times them."""
    from smmcl.kernels import triton_bands, triton_dwconv
    launches = _band_launches(monkeypatch)
    x = torch.randn(1, 3, 9, 6, device=DEVICE)
    weight = torch.randn(3, 1, 5, 5, device=DEVICE)
    assert rel(triton_dwconv.dwconv(x, weight, None, impl='bands'),
               triton_dwconv.dwconv(x, weight, None, impl='rows')) == 0
    vertical = _strip_weights(3, along_w=False)
    assert all(rel(b, r) == 0 for b, r in zip(triton_dwconv.strip3(x, vertical, None, along_w=False, impl='bands'),
                                               triton_dwconv.strip3(x, vertical, None, along_w=False, impl='rows')))
    horizontal = _strip_weights(3, along_w=True)
    cl = x.contiguous(memory_format=CL)
    triton_dwconv.strip3(cl, horizontal, None, along_w=True, impl='bands')
    triton_dwconv.strip3_sum(x, [x, x, x.bfloat16()], horizontal, None, along_w=True, impl='bands')
    assert launches == []
    longest = triton_bands.WIDEST + 1
    assert triton_bands.fits(longest) and not triton_bands.fits(longest + 2)
    import triton
    tiles = [triton.Config(dict(ROWS=64, BLOCK_W=w), num_warps=4) for w in (32, 64)]
    assert [c.kwargs['BLOCK_W'] for c in triton_bands._wide_enough(tiles, {}, K2=41)] == [64]  # the autotuner's pruning
    assert [c.kwargs['BLOCK_W'] for c in triton_bands._wide_enough(tiles, {'KW': 21}, KH=3)] == [32, 64]
    too_long = [torch.randn(3, 1, 1, k, device=DEVICE) for k in (7, 11, longest + 2)]
    got = triton_dwconv.strip3(x, too_long, None, along_w=True, impl='bands')
    want = [F.conv2d(x, wt, padding=(0, wt.shape[-1] // 2), groups=3) for wt in too_long]
    assert launches == [] and all(rel(g, w_) <= 1e-5 for g, w_ in zip(got, want))
    triton_dwconv.strip3(x, horizontal, None, along_w=True, impl='bands')
    assert launches == [('strip3_bands_kernel', 0)]
    assert triton_dwconv._bands_apply(x, [x]) and not triton_dwconv._bands_apply(cl, [cl])
    for capability, capable in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(triton_dwconv, 'gpu_properties', lambda device, c=capability: (132, c))
        assert triton_dwconv._band_products(torch.device('cuda')) == capable


def test_bf16_row_kernels(monkeypatch):
    _all_rows(monkeypatch)
    x, weight, bias = (_tensor(2, 37, 9, 7, fmt=CL, dtype=torch.bfloat16), _tensor(37, 1, 5, 5, seed=1),
                       _tensor(37, seed=2))
    rx, rw, rb = _fp32_copies(x, weight, bias)
    out = ops().dwconv2d(x, weight, bias)
    assert out.dtype == torch.bfloat16
    _check_grads(out, F.conv2d(rx, rw, rb, padding=2, groups=37), (x, weight, bias), (rx, rw, rb), BF16_TOL)


def test_depthwise_kernel_choice(monkeypatch):
    """Both families give one result; 'auto' is 'tiles' under the interpreter; a bad name stops with the
    choices; along W the strips take either kernel (the row kernel along the rows in NCHW, walking the
    columns in channels_last: H and W swapped), the adjoint too."""
    from smmcl.kernels import triton_dwconv
    x, weight = torch.randn(1, 3, 9, 6, device=DEVICE), torch.randn(3, 1, 3, 3, device=DEVICE)
    outs = {impl: triton_dwconv.dwconv(x, weight, None, impl=impl) for impl in ('tiles', 'rows', 'auto')}
    assert rel(outs['rows'], outs['tiles']) <= 1e-6 and rel(outs['auto'], outs['tiles']) <= 1e-6
    if DEVICE == 'cpu':
        assert triton_dwconv._depthwise_impl(None, 'dwconv', x, (), dict.fromkeys(('tiles', 'rows'))) == 'tiles'
    horizontal = [torch.randn(3, 1, 1, k, device=DEVICE) for k in STRIP_LENGTHS]
    for x in (x, x.contiguous(memory_format=torch.channels_last)):
        for transpose in (False, True):
            tiles = triton_dwconv.strip3(x, horizontal, None, along_w=True, transpose=transpose, impl='tiles')
            across = triton_dwconv.strip3(x, horizontal, None, along_w=True, transpose=transpose, impl='rows')
            assert all(rel(t, r) <= 1e-6 for t, r in zip(across, tiles))
            summed = [triton_dwconv.strip3_sum(x, tiles, horizontal, None, along_w=True, transpose=transpose,
                                               impl=impl) for impl in ('tiles', 'rows')]
            assert rel(summed[1], summed[0]) <= 1e-6
        across = triton_dwconv.strip3(x, horizontal, None, along_w=True, impl='rows')
        ref = [F.conv2d(x, wt, padding=(0, wt.shape[-1] // 2), groups=3) for wt in horizontal]
        assert all(rel(t, r) <= 1e-5 for t, r in zip(across, ref))  # the rows along W are the conv along W
    monkeypatch.setenv('SMMCL_TRITON_DEPTHWISE', 'fast')
    with pytest.raises(ValueError, match="SMMCL_TRITON_DEPTHWISE must be 'auto' or one of .*'tiles', 'rows', 'bands'"):
        triton_dwconv.dwconv(x, weight, None)


# ---- bfloat16: fp32 accumulation, results rounded once ------------------------------------------------

# bf16 keeps 8 significant bits (relative rounding up to 2^-9 per value): outputs and input grads,
# rounded once, are within ~0.3 % of the float32 result of the same values; weight grads are summed in
# float32 from bf16 values.
BF16_TOL = 1e-2


@pytest.mark.parametrize('weight_dtype', [torch.float32, torch.bfloat16], ids=['autocast-like', 'bf16-model'])
def test_bf16_dwconv_and_gelu(weight_dtype):
    x = _tensor(2, 37, 5, 17, fmt=CL, dtype=torch.bfloat16)
    weight, bias = _tensor(37, 1, 5, 5, dtype=weight_dtype, seed=1), _tensor(37, dtype=weight_dtype, seed=2)
    rx, rw, rb = _fp32_copies(x, weight, bias)
    out = ops().dwconv2d(x, weight, bias)
    assert out.dtype == torch.bfloat16
    _check_grads(out, F.conv2d(rx, rw, rb, padding=2, groups=37), (x, weight, bias), (rx, rw, rb), BF16_TOL)
    w3 = _tensor(37, 1, 3, 3, dtype=weight_dtype, seed=3)
    rw3, = _fp32_copies(w3)
    out = ops().dwconv2d_gelu(x, w3, bias)
    ref = F.gelu(F.conv2d(rx, rw3, rb, padding=1, groups=37))
    _check_grads(out, ref, (x, w3, bias), (rx, rw3, rb), BF16_TOL)


def test_bf16_strip_sum():
    a, params = _tensor(1, 5, 9, 23, dtype=torch.bfloat16), _strip_params(5)
    ref_a, *ref_params = _fp32_copies(a, *params)
    out = ops().mscan_strip_sum(a, *params)
    assert out.dtype == torch.bfloat16
    _check_grads(out, kernels.strip_sum_reference(ref_a, ref_params), [a] + params, [ref_a] + ref_params, BF16_TOL)


# ---- the custom ops' registrations: fake tensors, autograd, torch.compile's tracing ------------------

def test_no_custom_op_leaves_a_mutated_argument_to_its_default():
    """torch 2.11 (the GPU image's) looks a custom op's mutated argument up among the arguments given, so a
    call that left one to its default raised an IndexError there (torch 2.13 fills the defaults in)."""
    ops()
    names = [n.split('::')[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith('smmcl::')]
    mutated = {n: [a for a in getattr(torch.ops.smmcl, n).default._schema.arguments
                   if a.alias_info is not None and a.alias_info.is_write] for n in names}
    assert {n for n, args in mutated.items() if args} == {'batch_norm_stats', 'nmf_update_grad'}
    assert [(n, a.name) for n, args in mutated.items() for a in args if a.has_default_value()] == []


@pytest.mark.slow
def test_custom_op_registrations():
    """Schema, fake (meta) implementation against the real one, autograd registration, and (full
    check) tracing by AOTAutograd with dynamic shapes, as torch.compile does."""
    x, w, b = _tensor(1, 3, 4, 5), _tensor(3, 1, 3, 3, seed=1), _tensor(3, seed=2)
    quick = ('test_schema', 'test_autograd_registration', 'test_faketensor')
    torch.library.opcheck(ops().dwconv2d, (x, w, b))
    # the fast path's model is channels_last, weights included (other strides for their size-1 dim)
    w_cl = _tensor(3, 1, 3, 3, fmt=CL, seed=1)
    torch.library.opcheck(ops().dwconv2d_gelu, (x.detach().contiguous(memory_format=CL).requires_grad_(), w_cl, b),
                          test_utils=quick)
    torch.library.opcheck(ops().dwconv2d_gelu, (x, w, b, _tensor(3, seed=3)))
    a, params = _tensor(1, 3, 4, 5, fmt=CL), _strip_params(3)
    torch.library.opcheck(ops().mscan_strip_sum, (a, *params))
    torch.library.opcheck(ops().add_channel_bias, (a, b))
    torch.library.opcheck(ops().add_channel_bias_gelu, (a, b))
    torch.library.opcheck(ops().add_channel_bias_gate, (a, b, _tensor(1, 3, 4, 5, fmt=CL, seed=3)))
    for bias in (None, b.detach()):
        args = (a.detach().to(torch.bfloat16), a.detach(), _tensor(3, 1, 1).detach(), bias)
        torch.library.opcheck(ops().residual_pair, args, test_utils=('test_schema', 'test_faketensor'))
    torch.library.opcheck(ops().scaled_residual, (a, a.detach().to(torch.bfloat16).requires_grad_(), _tensor(3, 1, 1)))
    low = a.detach().to(torch.bfloat16).requires_grad_()
    torch.library.opcheck(ops().scaled_residual, (a, low, _tensor(3, 1, 1), b))
    torch.library.opcheck(ops().shortcut_residual, (a, low, _tensor(3, 1, 1), b, _tensor(1, 3, 4, 5, fmt=CL, seed=3)))
    keep = torch.ones(1, 1, 1, 1, device=DEVICE)  # drop path's mask: no gradient
    torch.library.opcheck(ops().scaled_residual, (a, low, _tensor(3, 1, 1), b, False, keep, 0.75))
    torch.library.opcheck(ops().shortcut_residual, (a, low, _tensor(3, 1, 1), b, _tensor(1, 3, 4, 5, fmt=CL, seed=3),
                                                    False, keep, 0.75))
    # with the next norm's partials: rows the device decides (a size the fake op leaves open)
    torch.library.opcheck(ops().scaled_residual, (a, low, _tensor(3, 1, 1), b, True))
    torch.library.opcheck(ops().shortcut_residual, (a, low, _tensor(3, 1, 1), b, _tensor(1, 3, 4, 5, fmt=CL, seed=3),
                                                    True))
    running = [_tensor(3, seed=4).detach(), _tensor(3, seed=5).detach().abs()]
    stats_args = (a.detach(), b.detach(), b.detach(), *running, 0.1, 1e-5)
    torch.library.opcheck(ops().batch_norm_stats, stats_args + (None, None),
                          test_utils=('test_schema', 'test_faketensor'))
    partials = ops().scaled_residual(a.detach(), low.detach(), _tensor(3, 1, 1).detach(), None, True)[1]
    torch.library.opcheck(ops().batch_norm_stats, stats_args + (partials, None),
                          test_utils=('test_schema', 'test_faketensor'))
    tracked = torch.tensor(3, device=DEVICE)  # the module's batch count: its mutation declared (opcheck's copies)
    torch.library.opcheck(ops().batch_norm_stats, stats_args + (None, tracked),
                          test_utils=('test_schema', 'test_faketensor'))
    coef = ops().batch_norm_stats(*stats_args, None, None)
    for full in (True, False):
        torch.library.opcheck(ops().batch_norm_apply, (a, b, _tensor(3, seed=6), coef, torch.bfloat16, full))


def test_torch_compile_traces_the_ops_without_graph_breaks():
    x, w, b = _tensor(1, 3, 4, 5), _tensor(3, 1, 3, 3, seed=1), _tensor(3, seed=2)
    o = ops()  # loading the ops is not traced (importlib.util.find_spec breaks graphs in torch 2.11)

    def f(x, w, b):
        return o.dwconv2d_gelu(o.dwconv2d(x, w, b), w, b)

    compiled = torch.compile(f, fullgraph=True, backend='aot_eager')  # fullgraph: a break is an error
    got, want = compiled(x, w, b), f(x, w, b)
    assert rel(got, want) <= 1e-6
    g = torch.ones_like(want)
    for a, b_ in zip(torch.autograd.grad(got, (x, w, b), g), torch.autograd.grad(want, (x, w, b), g)):
        assert rel(a, b_) <= 1e-6


def test_torch_compile_traces_a_block_with_kernels_in_one_graph():
    """One graph holding the depthwise ops; the per-channel passes (bias adds, tails) left to the compiler
    as ATen's operators, which it fuses with their neighbours."""
    from smmcl.models.mscan import use_fused_tails
    block = use_fused_kernels(use_fused_tails(_tiny_block()))
    x = _tensor(1, 32, 4, 5)
    traced = []

    def backend(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes if node.op == 'call_function')
        return gm.forward

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    got, want = compiled(x), block(x)
    assert rel(got, want) <= 1e-6
    assert any('dwconv2d_gelu' in t for t in traced) and any('mscan_strip_sum' in t for t in traced)
    assert not any('add_channel_bias' in t or 'scaled_residual' in t for t in traced)


@pytest.mark.slow
def test_torch_compile_leaves_the_nmf_updates_to_the_compiler():
    """The fast path's Hamburger with the kernels, traced whole (its backward by hand included): the products
    stay smmcl::bmm_tf32x3, the updates' element-wise steps are ATen's (the compiler fuses them itself), the
    same output and gradient as eager, where the fused ops run."""
    from smmcl.models.ham_head import Hamburger
    from smmcl.models.mscan import use_fused_tails
    from conftest import OpCalls
    torch.manual_seed(0)
    model = use_fused_kernels(use_fused_tails(Hamburger(channels=32, rank=8).to(DEVICE).train()))
    model.ham.fixed_bases = model.ham.draw_bases(2, 32, DEVICE, torch.Generator(DEVICE).manual_seed(3))
    x = _tensor(2, 32, 5, 7)
    traced = []

    def backend(gm, example_inputs):  # the NMF's forward and backward are subgraphs of its autograd.Function
        traced.extend(str(node.target) for graph in gm.modules() if isinstance(graph, torch.fx.GraphModule)
                      for node in graph.graph.nodes if node.op == 'call_function')
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    results = []
    for module in (model, compiled):
        out = module(x)
        results.append((out, torch.autograd.grad(out, x, torch.ones_like(out))[0]))
    with OpCalls() as calls:  # (dynamo does not trace under a dispatch mode: the eager run only)
        out = model(x)
        torch.autograd.grad(out, x, torch.ones_like(out))
    assert calls.names().count('nmf_update') == calls.names().count('nmf_update_grad') == 13
    assert any('bmm_tf32x3' in t for t in traced) and not any('nmf_update' in t for t in traced)
    (want, want_grad), (got, got_grad) = results
    assert rel(got, want) <= 1e-6 and rel(got_grad, want_grad) <= 1e-5


# ---- the modules: kernels on and off compute the same function --------------------------------------

def _tiny_block():
    """A stage-1 block of MSCAN-T (32 channels, MLP 256) with layer scales that let both halves show."""
    torch.manual_seed(0)
    spec = mscan_t()
    block = Block(spec.embed_dims[0], spec.mlp_ratios[0], 0.0, nn.BatchNorm2d)
    with torch.no_grad():
        block.layer_scale_1.fill_(0.5)
        block.layer_scale_2.fill_(0.5)
    return block.to(DEVICE)


@pytest.mark.parametrize('fmt', [NCHW, CL])
def test_block_with_kernels_is_the_same_function(fmt):
    plain = _tiny_block().to(memory_format=fmt)
    fused = use_fused_kernels(copy.deepcopy(plain))
    assert all(m.fused_kernels for m in fused.modules() if isinstance(m, (AttentionModule, Mlp)))
    assert list(fused.state_dict()) == list(plain.state_dict())  # same checkpoint layout
    _assert_same_function(plain, fused, _tensor(2, 32, 7, 9, fmt=fmt), 1e-4)


def _assert_same_function(plain, fused, x, tol, calls=None):
    """``fused``'s output and every gradient (input, parameters) within ``tol`` of ``plain``'s; returns what
    ``calls`` (a list the test's spies append to) held after the plain module's forward and backward, and
    empties it for the fused module's."""
    outs, calls_of_plain = [], None
    for model in (plain, fused):
        out = model(x)
        grads = torch.autograd.grad(out, [x] + list(model.parameters()),
                                    torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE))
        outs.append((out, grads))
        if calls is not None and calls_of_plain is None:
            calls_of_plain = list(calls)
            calls.clear()
    (ref, ref_grads), (out, grads) = outs
    assert rel(out, ref) <= tol
    for name, g, r in zip(['input'] + [name for name, _ in plain.named_parameters()], grads, ref_grads):
        assert rel(g, r) <= tol, name
    return calls_of_plain


def test_block_without_interpreter_on_cpu_keeps_conv2d(monkeypatch):
    """On a CPU tensor without TRITON_INTERPRET the switched module takes its nn.Conv2d path."""
    if DEVICE == 'cuda':
        pytest.skip('CPU behaviour')
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    x = torch.randn(1, 32, 5, 6)
    assert not kernels.runs_on(x)
    plain = _tiny_block().eval()
    fused = use_fused_kernels(copy.deepcopy(plain))
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))


def test_switch_errors_clearly_without_triton(monkeypatch):
    monkeypatch.setattr(kernels, 'available', lambda: False)
    with pytest.raises(RuntimeError, match='pip install triton'):
        use_fused_kernels(_tiny_block())
    use_fused_kernels(_tiny_block(), enabled=False)  # switching off needs nothing


def test_config_switch_reaches_the_modules():
    from smmcl.config import base_config
    from smmcl.engine.precision import for_training
    cfg = base_config()
    assert cfg.triton_kernels is False  # off by default
    for fast_path, triton_kernels, expected in ((True, True, True), (False, True, False), (True, False, False)):
        cfg.update(fast_path=fast_path, triton_kernels=triton_kernels)
        block = for_training(_tiny_block(), cfg)
        assert {m.fused_kernels for m in block.modules() if isinstance(m, (AttentionModule, Mlp))} == {expected}


# ---- the weight-gradient implementations ----------------------------------------------------------

@pytest.mark.parametrize('impl', ['gather', 'taps', 'rows', 'bands', 'torch'])
@pytest.mark.parametrize('n, c, h, w, kh, kw, fmt', [(2, 37, 9, 18, 5, 5, CL), (1, 9, 3, 4, 21, 1, NCHW),
                                                     (2, 7, 7, 17, 3, 3, NCHW), (1, 3, 6, 5, 1, 7, NCHW)])
def test_each_weight_gradient_implementation(impl, n, c, h, w, kh, kw, fmt):
    from smmcl.kernels import triton_dwconv
    x, weight, bias = _tensor(n, c, h, w, fmt=fmt), _tensor(c, 1, kh, kw, seed=1), _tensor(c, seed=2)
    out = F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=c)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    want_w, want_b = torch.autograd.grad(out, (weight, bias), grad)
    got_w, got_b = triton_dwconv.dwconv_wgrad(grad, x.detach(), weight.detach(), impl=impl)
    assert got_w.shape == weight.shape and got_b.shape == bias.shape
    assert rel(got_w, want_w) <= 1e-5 and rel(got_b, want_b) <= 1e-5


@pytest.mark.parametrize('impl', ['gather', 'taps', 'rows', 'bands', 'torch'])
def test_weight_gradient_of_an_empty_batch_is_zero(impl):
    from smmcl.kernels import triton_dwconv
    x = torch.randn(0, 4, 5, 6, device=DEVICE)
    got_w, got_b = triton_dwconv.dwconv_wgrad(x, x, torch.ones(4, 1, 3, 3, device=DEVICE), impl=impl)
    assert got_w.shape == (4, 1, 3, 3) and got_b.shape == (4,)
    assert not got_w.any() and not got_b.any()


def test_weight_gradient_choice_through_the_ops(monkeypatch):
    """SMMCL_TRITON_WGRAD picks the implementation inside the custom ops' backward; a bad name stops."""
    x, weight, bias = _tensor(2, 7, 7, 17, fmt=CL), _tensor(7, 1, 3, 3, seed=1), _tensor(7, seed=2)
    grads = {}
    for impl in ('torch', 'taps', 'fused', 'auto'):
        monkeypatch.setenv('SMMCL_TRITON_WGRAD', impl)
        out = ops().dwconv2d_gelu(x, weight, bias)
        grads[impl] = torch.autograd.grad(out.sum(), (x, weight, bias))
    for a, b in zip(grads['torch'], grads['taps']):
        assert rel(a, b) <= 1e-5
    for a, b in zip(grads['auto'], grads['taps']):
        assert rel(a, b) <= 1e-5
    for a, b in zip(grads['fused'], grads['auto']):  # auto runs the one-pass backward here
        assert torch.equal(a, b)
    monkeypatch.setenv('SMMCL_TRITON_WGRAD', 'fastest')
    with pytest.raises(ValueError, match='SMMCL_TRITON_WGRAD'):
        torch.autograd.grad(ops().dwconv2d_gelu(x, weight, bias).sum(), (weight,))


# ---- the weight gradients summed in the backward's own pass (SMMCL_TRITON_WGRAD=fused) ----------------

FUSED_CASES = [DW_CASES[0], DW_CASES[1], DW_CASES[2], DW_CASES[4], (2, 37, 5, 18, 3, 3, CL), (1, 6, 5, 19, 3, 3, NCHW)]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('n, c, h, w, kh, kw, fmt', FUSED_CASES)
def test_fused_backward_matches_the_separate_passes(n, c, h, w, kh, kw, fmt, dtype):
    """The one-pass backward of the plain conv and of the conv + GELU (with and without its bias and
    fc1's) against the adjoint conv (or the GELU's gradient pass) and the gather kernel's weight gradient:
    the same sums in another order, so float32 agrees to rounding and bf16 to one rounding of the stored
    gradient. Without fc1's bias both take the weight gradient against the same input. The GELU's on the
    maps up to two channel blocks of a 3x3 conv or one of the others."""
    from smmcl.kernels import triton_dwconv as K
    x, grad = (_tensor(n, c, h, w, fmt=fmt, dtype=dtype, seed=s).detach() for s in (0, 3))
    weight, bias, in_bias = _tensor(c, 1, kh, kw, seed=1).detach(), _tensor(c, seed=2).detach(), _tensor(c, seed=4)
    tol = 1e-6 if dtype == torch.float32 else 4e-3
    fused, separate = (K.dwconv_backward(grad, x, weight, impl=impl) for impl in ('fused', 'gather'))
    assert fused[0].stride() == x.stride() and fused[0].dtype == dtype
    assert max(rel(a, b) for a, b in zip(fused, separate)) <= tol
    if c > 32 and kh * kw > 9:
        return  # the MLP's GELU follows a 3x3 conv; two channel blocks of a 5x5 would only cost time here
    for b, ib in ((bias, None), (None, None), (bias, in_bias.detach())):
        fused, separate = (K.dwconv_gelu_backward(grad, x, weight, b, ib, impl=impl) for impl in ('fused', 'gather'))
        assert len(fused) == 3 + (ib is not None) and fused[1].shape == weight.shape
        same = [0, 2, 3] if ib is not None else [0, 1, 2]  # with fc1's bias, dw: the next test
        assert max(rel(fused[i], separate[i]) for i in same) <= tol, (b is None, ib is None)


@pytest.mark.parametrize('fmt', [NCHW, CL])
def test_fused_weight_gradient_takes_the_input_the_conv_saw(fmt):
    """With fc1's bias added as the 3x3 conv loads fc1's output, the one-pass weight gradient is the sum
    against that input as stored (the bias add's rounding to bf16, as the kernels round it here) and the
    GELU's input gradient as stored, to float32 rounding; the separate passes' is a bf16 rounding away."""
    from smmcl.kernels import triton_channel, triton_dwconv as K
    n, c, h, w = 2, 6, 9, 18
    x, grad = (_tensor(n, c, h, w, fmt=fmt, dtype=torch.bfloat16, seed=s).detach() for s in (0, 3))
    weight, bias = _tensor(c, 1, 3, 3, seed=1).detach(), _tensor(c, seed=2).detach()
    in_bias = 4 * _tensor(c, seed=4).detach()  # large against x: the rounding of x + in_bias shows
    grad_z, dw, db = K.grad_and_wgrad(grad, x, weight, bias, in_bias, gelu=True)
    separate = K.dwconv(x, weight, bias, epilogue=2, grad=grad, in_bias=in_bias)
    # the same sums in the same order; compiled code may contract them otherwise: one bf16 rounding
    assert torch.equal(grad_z, separate) if DEVICE == 'cpu' else rel(grad_z, separate) <= 4e-3
    seen = triton_channel.bias_add(x, in_bias, impl='triton').double()  # fc1's output with its bias, as stored
    want_w = torch.nn.grad.conv2d_weight(seen, weight.shape, grad_z.double(), padding=1, groups=c)
    assert rel(dw, want_w) <= 1e-6 and rel(db, grad_z.double().sum((0, 2, 3))) <= 1e-6
    assert rel(K.dwconv_gelu_backward(grad, x, weight, bias, in_bias, impl='gather')[1], want_w) > 1e-4
    got = K.dwconv_gelu_backward(grad, x, weight, bias, in_bias, impl='fused')
    assert torch.equal(got[1], dw) and torch.equal(got[2], db)


def test_fused_weight_gradient_is_the_default_here_and_gather_alone(monkeypatch):
    """Under the interpreter ``auto`` runs the one-pass backward; ``SMMCL_TRITON_WGRAD=fused`` names it,
    and a weight gradient computed alone (the strips' separate path) is then the gather kernel's."""
    from smmcl.kernels import triton_dwconv as K
    x, grad = (_tensor(2, 7, 7, 17, fmt=CL, seed=s).detach() for s in (0, 3))
    weight = _tensor(7, 1, 5, 5, seed=1).detach()
    calls = []
    monkeypatch.setattr(K, 'grad_and_wgrad', lambda *a, **k: calls.append(k) or ('out', 'dw', 'db'))
    assert K.dwconv_backward(grad, x, weight) == ('out', 'dw', 'db') and calls == [{'addend': None}]
    monkeypatch.undo()
    monkeypatch.setenv('SMMCL_TRITON_WGRAD', 'fused')
    for got, want in zip(K.dwconv_wgrad(grad, x, weight), K.dwconv_wgrad(grad, x, weight, impl='gather')):
        assert torch.equal(got, want)
    for got, want in zip(K.dwconv_backward(grad, x, weight), K.dwconv_backward(grad, x, weight, impl='fused')):
        assert torch.equal(got, want)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('fmt', [NCHW, CL])
def test_adjoint_pass_adds_the_other_gradient(fmt, dtype):
    """x's gradient from another use added in the one-pass backward: the adjoint conv rounded to x's
    dtype, plus the addend, rounded again (as autograd adds two gradients), here with the kernels'
    rounding; the separate path adds them with ATen; the weight gradients are unchanged. A mismatched
    addend is refused."""
    from smmcl.kernels import triton_dwconv as K
    x, grad, other = (_tensor(2, 6, 9, 18, fmt=fmt, dtype=dtype, seed=s).detach() for s in (0, 3, 5))
    weight = _tensor(6, 1, 5, 5, seed=1).detach()
    alone = K.dwconv_backward(grad, x, weight, impl='fused')
    fused = K.dwconv_backward(grad, x, weight, impl='fused', addend=other)
    assert torch.equal(fused[0], _like_compiled_triton(alone[0].float() + other.float(), dtype))
    assert fused[0].stride() == x.stride() and all(torch.equal(a, b) for a, b in zip(fused[1:], alone[1:]))
    separate = K.dwconv_backward(grad, x, weight, impl='gather', addend=other)
    assert torch.equal(separate[0], K.dwconv_backward(grad, x, weight, impl='gather')[0] + other)
    assert rel(fused[0], separate[0]) <= (1e-6 if dtype == torch.float32 else 4e-3)
    with pytest.raises(ValueError, match='addend'):
        K.dwconv_backward(grad, x, weight, addend=other[:1])


@pytest.mark.slow
@pytest.mark.parametrize('bf16', [False, True])
def test_attention_hands_its_input_on_to_the_gate(monkeypatch, bf16):
    """In training with the kernels the attention's input reaches its gate as a view handed on by the 5x5
    conv (``DepthwiseStream``), whose backward adds the gate's gradient to x's: one backward call with the
    addend, and the gradients those of the same kernels with autograd adding the two (float32: bit for bit;
    bf16: one rounding of x's gradient, the interpreter truncating where ATen rounds). Without a gradient
    the plain op runs."""
    from smmcl.kernels import ops as kernel_ops, triton_dwconv as K
    torch.manual_seed(0)
    attention = use_fused_kernels(AttentionModule(8)).to(DEVICE)
    x = _tensor(2, 8, 9, 18, fmt=CL)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    addends = []
    monkeypatch.setattr(K, 'dwconv_backward', lambda *a, f=K.dwconv_backward, **k: addends.append(
        k.get('addend') is not None) or f(*a, **k))
    got = []
    for stream in (True, False):
        if not stream:  # the same ops, x itself given to the gate
            monkeypatch.setattr(kernel_ops.DepthwiseStream, 'apply',
                                lambda x, w, b: (torch.ops.smmcl.dwconv2d(x, w, b), x))
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
            out = attention(x)
        got.append(torch.autograd.grad(out, [x] + list(attention.parameters()), grad.to(out.dtype)))
    assert addends == [True, False]
    assert rel(got[0][0], got[1][0]) <= (0 if not bf16 else 1e-2)
    assert all(torch.equal(a, b) for a, b in zip(got[0][1:], got[1][1:]))
    with torch.no_grad():
        monkeypatch.undo()
        calls = []
        monkeypatch.setattr(kernel_ops.DepthwiseStream, 'apply', lambda *a: calls.append(a))
        attention(x)
    assert calls == []


def test_traffic_counts_the_kernels_passes(monkeypatch):
    """bench/traffic.py --passes: our ops' bodies run under the counter (their allocations moving nothing),
    each Triton launch a row with its tensor arguments once; the MLP's backward in two depthwise launches
    with the weight gradient in the first, where the separate passes make three, moving more; without
    --passes the op counts once."""
    traffic = bench_script('traffic')
    torch.manual_seed(0)
    mlp = use_fused_kernels(Mlp(8, 32)).to(DEVICE)
    x = _tensor(2, 8, 16, 16)
    counts = {}
    for wgrad, passes in (('fused', True), ('gather', True), ('fused', False)):
        monkeypatch.setenv('SMMCL_TRITON_WGRAD', wgrad)
        mode = traffic.Traffic(passes)
        with mode, (traffic.kernel_launches(mode) if passes else contextlib.nullcontext()):
            mlp(x).sum().backward()
        counts[wgrad, passes] = {name: row for name, row in mode.ops.items() if name.startswith('kernel ')}
        assert any(name.startswith('dwconv2d_gelu_backward') for name in mode.ops) != passes
        # the bodies' allocations move nothing
        assert not passes or not any(name.split()[0] in ('empty', 'empty_like', 'new_empty') for name in mode.ops)
    fused, separate = counts['fused', True], counts['gather', True]
    assert fused['kernel grad_wgrad_rows_kernel'][0] == 1 and 'kernel _dwconv_wgrad_kernel' not in fused
    assert separate['kernel _dwconv_wgrad_kernel'][0] == 1 and separate['kernel _dwconv_kernel'][0] == 3
    assert fused['kernel _dwconv_kernel'][0] == 2  # the forward, and the backward's adjoint
    assert sum(moved for _, moved in fused.values()) < sum(moved for _, moved in separate.values())
    assert counts['fused', False] == {}


# ---- the per-chunk partials summed over their chunks, rounded and cast in the same launch --------------

def test_chunk_sums_add_each_groups_chunks_and_round_where_asked():
    """One launch for two sets of partials: a's 37 chunks (three row blocks, the last partial) over 130
    positions (two position blocks, the second partial) in three groups, b's over 5, rounded to bf16 and
    stored in float32. The sums are float32 sums (against float64: summation order only); b's, a bf16
    rounding of them; out dtypes as given (a bf16 output rounds once, on the store)."""
    from smmcl.kernels.triton_common import chunk_sums
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(3, 37, 130, generator=gen) * 100).to(DEVICE)
    b = torch.randn(3, 37, 5, generator=gen).to(DEVICE)
    out_a, out_b = torch.empty(3, 130, device=DEVICE), torch.empty(3, 5, device=DEVICE)
    chunk_sums(a, out_a, None, b, out_b, torch.bfloat16)
    assert torch.allclose(out_a.double(), a.double().sum(1), rtol=1e-6, atol=1e-3)
    exact_b = b.double().sum(1)
    assert ((out_b.double() - _like_compiled_triton(exact_b, torch.bfloat16).double()).abs()
            <= exact_b.abs() * 2 ** -8 + 1e-6).all()  # the float32 sum may sit across a bf16 step
    assert torch.equal(out_b, out_b.to(torch.bfloat16).float())  # on the bf16 grid, in float32
    alone = torch.empty(3, 130, device=DEVICE, dtype=torch.bfloat16)
    chunk_sums(a, alone)
    assert torch.equal(alone, _like_compiled_triton(out_a, torch.bfloat16))  # the same sums, one rounding
    with pytest.raises(ValueError, match='as many groups and chunks'):
        chunk_sums(a, out_a, None, b[:, :36], out_b)
    with pytest.raises(ValueError, match='contiguous float32 G-P-L partials'):
        chunk_sums(a, out_a[:, :129])


# ---- the 1x1 convs' bias gradient as one column sum ---------------------------------------------------

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('n, c, h, w, fmt', [(2, 37, 5, 7, NCHW), (2, 37, 5, 7, CL), (1, 3, 1, 40, CL),
                                             (3, 1, 9, 2, NCHW)])
def test_bias_gradient_column_sum(n, c, h, w, fmt, dtype):
    """Two channel blocks (32 under the interpreter), more pixels than a tile, one channel, batch 1: the
    float32 sums of ``grad.sum((0, 2, 3))`` rounded once to grad's dtype, in bias's dtype."""
    from smmcl.kernels import triton_channel
    g = _tensor(n, c, h, w, fmt=fmt, dtype=dtype).detach()
    want = g.double().sum((0, 2, 3))
    got = triton_channel.bias_grad(g, torch.zeros(c, device=DEVICE), impl='triton')
    assert got.dtype == torch.float32 and got.shape == (c,)
    if dtype == torch.float32:
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-5)
    else:  # one rounding of the float32 sum: equal to the rounded exact sum or one bf16 step beside it
        assert ((got.double() - want.to(dtype).double()).abs() <= want.abs() * 2 ** -7 + 1e-6).all()
    aten = triton_channel.bias_grad(g, torch.zeros(c, device=DEVICE), impl='torch')
    assert torch.allclose(got, aten, rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-6, atol=1e-5)


def test_bias_gradient_of_an_empty_batch_is_zero():
    from smmcl.kernels import triton_channel
    got = triton_channel.bias_grad(torch.zeros(0, 5, 3, 4, device=DEVICE), torch.ones(5, device=DEVICE), impl='triton')
    assert got.shape == (5,) and not got.any()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('n, c, h, w, fmt', [(2, 37, 5, 7, NCHW), (2, 37, 5, 7, CL), (1, 3, 1, 40, CL)])
def test_bias_add_is_atens_add(n, c, h, w, fmt, dtype):
    """The Triton bias add equals ATen's broadcast add bit for bit (the bias rounded to y's dtype, one
    float32 add, one rounding), in y's layout. Triton's interpreter (3.9) converts float32 to bf16 by
    truncation where compiled Triton rounds to nearest even: there, bf16 within a step of each rounding."""
    from smmcl.kernels import triton_channel
    y, bias = _tensor(n, c, h, w, fmt=fmt, dtype=dtype).detach(), _tensor(c, seed=1).detach()
    got = triton_channel.bias_add(y, bias, impl='triton')
    want = triton_channel.bias_add(y, bias, impl='torch')
    assert got.dtype == dtype and got.is_contiguous(memory_format=fmt)
    assert torch.equal(want, y + bias.to(dtype)[:, None, None])
    if dtype == torch.float32 or DEVICE == 'cuda':
        assert torch.equal(got, want)
    else:
        bound = (y.float().abs() + 2 * bias.abs()[:, None, None]) * 2 ** -6
        assert ((got.float() - want.float()).abs() <= bound).all()


def test_bias_implementation_choice(monkeypatch):
    """SMMCL_TRITON_CHANNEL picks the implementation of the op's forward and backward; a bad name stops."""
    from smmcl.kernels import triton_channel
    called = []
    for op, impls in triton_channel._IMPLS.items():
        for impl, f in list(impls.items()):
            monkeypatch.setitem(impls, impl, lambda *a, op=op, impl=impl, f=f, **k: called.append((op, impl)) or f(*a, **k))
    y, b = _tensor(2, 5, 3, 4), _tensor(5, seed=1)
    for impl in ('torch', 'triton') + (('auto',) if DEVICE == 'cpu' else ()):  # auto, interpreted: the kernels
        monkeypatch.setenv('SMMCL_TRITON_CHANNEL', impl)
        torch.autograd.grad(ops().add_channel_bias(y, b).sum(), (b,))
        chosen = 'triton' if impl == 'auto' else impl
        assert called[-2:] == [('add', chosen), ('grad', chosen)]
    monkeypatch.setenv('SMMCL_TRITON_CHANNEL', 'ours')
    with pytest.raises(ValueError, match="SMMCL_TRITON_CHANNEL must be 'auto' or one of"):
        ops().add_channel_bias(y, b)


@pytest.mark.parametrize('fmt', [NCHW, CL])
def test_pointwise_conv_with_kernels_is_conv2d(fmt):
    """The blocks' 1x1 convs with the kernels on: nn.Conv2d's output and gradients (fp32), its layout, the
    same state dict."""
    from smmcl.models.mscan import PointwiseConv
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 37, 1).to(DEVICE).to(memory_format=fmt)
    conv = PointwiseConv(6, 37).to(DEVICE).to(memory_format=fmt)
    conv.load_state_dict(plain.state_dict())
    use_fused_kernels(conv)
    assert conv.fused_kernels and list(conv.state_dict()) == ['weight', 'bias']
    x = _tensor(2, 6, 5, 7, fmt=fmt)
    out = conv(x)
    assert out.grad_fn is not None and 'add_channel_bias' in type(out.grad_fn).__name__
    assert out.is_contiguous(memory_format=fmt)
    _check_grads(out, plain(x), [x, conv.weight, conv.bias], [x, plain.weight, plain.bias], 1e-6, 1e-6)
    with torch.no_grad():
        assert rel(conv(x), plain(x)) <= 1e-6


def test_add_channel_bias_under_autocast_rounds_as_a_conv_bias(monkeypatch):
    """y (bf16, a conv's output under autocast) + a float32 bias: the bias rounded to bf16 first, as
    autocast rounds a conv's; the bias gradient comes back in float32. (ATen's add: the kernel's equality
    to it is tested above.)"""
    monkeypatch.setenv('SMMCL_TRITON_CHANNEL', 'torch')
    y = _tensor(2, 4, 3, 5, dtype=torch.bfloat16)
    b = _tensor(4, seed=1)
    out = ops().add_channel_bias(y, b)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, y + b.to(torch.bfloat16)[:, None, None])
    gy, gb = torch.autograd.grad(out, (y, b), torch.ones_like(out))
    assert gb.dtype == torch.float32 and torch.equal(gb, torch.full_like(gb, 30.0))
    assert torch.equal(gy, torch.ones_like(y))


# ---- the bias add with its one following op: proj_1's GELU, conv3's product with the gate ----------------

def _like_compiled_triton(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``x`` rounded to ``dtype`` as the kernels round it here: to nearest even when compiled, by
    truncation under Triton's (3.9) interpreter for bf16."""
    if DEVICE == 'cpu' and dtype == torch.bfloat16:
        return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return x.to(dtype)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('fmt', [NCHW, CL])
@pytest.mark.parametrize('epilogue', ['gelu', 'gate'])
def test_bias_epilogues_round_as_aten_does(epilogue, fmt, dtype, monkeypatch):
    """``GELU(y + b)`` and ``(y + b) * u``, forward and backward, against what ATen computes in its passes
    (y + b rounded to y's dtype; the GELU or the product, and each backward, in float32, rounded once;
    the bias gradient the float32 sum of the rounded gradient, rounded to y's dtype): in float32 against
    ATen's own passes, in bf16 bit for bit against that model with the kernels' rounding (the exact GELU
    and its derivative to one bf16 step: erf's float32 implementations may differ in the last bit). Two
    channel blocks, three pixel blocks walked by two programs."""
    from smmcl.kernels import triton_channel
    monkeypatch.setattr(triton_channel, '_chunks', lambda t: 2)
    y = _tensor(2, 37, 5, 9, fmt=fmt, dtype=dtype).detach()
    u = _tensor(2, 37, 5, 9, fmt=fmt, dtype=dtype, seed=1).detach()
    bias, grad = _tensor(37, seed=2).detach(), _tensor(2, 37, 5, 9, fmt=fmt, dtype=dtype, seed=3).detach()
    gate = u if epilogue == 'gate' else None
    out = triton_channel.bias_add(y, bias, impl='triton', epilogue=epilogue, gate=gate)
    gy, gu, gb = triton_channel.bias_epilogue_grad(grad, y, bias, epilogue, gate=gate, impl='triton')
    assert out.dtype == gy.dtype == dtype and gb.dtype == torch.float32 and gb.shape == (37,)
    assert out.is_contiguous(memory_format=fmt) and gy.is_contiguous(memory_format=fmt)
    assert (gu is None) == (epilogue == 'gelu')
    if dtype == torch.float32:
        want = triton_channel.bias_add(y, bias, impl='torch', epilogue=epilogue, gate=gate)
        want_grads = triton_channel.bias_epilogue_grad(grad, y, bias, epilogue, gate=gate, impl='torch')
        assert rel(out, want) <= 1e-6 and rel(gy, want_grads[0]) <= 1e-6 and rel(gb, want_grads[2]) <= 1e-6
        if gate is not None:
            assert torch.equal(out, want) and torch.equal(gu, want_grads[1])
        return
    v = _like_compiled_triton(y.float() + _like_compiled_triton(bias, dtype).float()[:, None, None], dtype).float()
    g = grad.float()
    if epilogue == 'gate':
        assert torch.equal(out, _like_compiled_triton(v * u.float(), dtype))
        assert torch.equal(gu, _like_compiled_triton(g * v, dtype))
        want_gy = _like_compiled_triton(g * u.float(), dtype)
        assert torch.equal(gy, want_gy)
    else:
        want, want_gy = (_like_compiled_triton(t, dtype) for t in (F.gelu(v), torch.ops.aten.gelu_backward(g, v)))
        assert ((out.float() - want.float()).abs() <= want.float().abs() * 2 ** -7).all()
        assert ((gy.float() - want_gy.float()).abs() <= want_gy.float().abs() * 2 ** -7).all()
        want_gy = gy  # the bias gradient sums the gradient as written
    sums = want_gy.float().sum((0, 2, 3))
    assert torch.allclose(gb, sums.to(dtype).float(), rtol=2 ** -7, atol=1e-5)


def test_bias_epilogues_refuse_what_cannot_act():
    from smmcl.kernels import triton_channel
    y = _tensor(2, 5, 3, 4).detach()
    with pytest.raises(ValueError, match="'gate' takes a gate shaped as the map"):
        triton_channel.bias_add(y, y[0, :, 0, 0], epilogue='gate')
    with pytest.raises(ValueError, match="'gate' takes a gate shaped as the map"):
        triton_channel.bias_add(y, y[0, :, 0, 0], epilogue='gelu', gate=y)
    with pytest.raises(ValueError, match='a bias epilogue is one of'):
        triton_channel.bias_add(y, y[0, :, 0, 0], epilogue='relu')


@pytest.mark.parametrize('fmt', [NCHW, CL])
def test_pointwise_conv_epilogues_are_conv2d_then_the_op(fmt):
    """proj_1's ``GELU(conv(x))`` and conv3's ``conv(x) * gate`` with the kernels on: nn.Conv2d followed by
    F.gelu or the product, outputs and every gradient (gate's included), in fp32, in the input's layout."""
    from smmcl.models.mscan import PointwiseConv
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 37, 1).to(DEVICE).to(memory_format=fmt)
    conv = PointwiseConv(6, 37).to(DEVICE).to(memory_format=fmt)
    conv.load_state_dict(plain.state_dict())
    use_fused_kernels(conv)
    x, gate = _tensor(2, 6, 5, 7, fmt=fmt), _tensor(2, 37, 5, 7, fmt=fmt, seed=1)
    out = conv.forward_gelu(x)
    assert 'add_channel_bias_gelu' in type(out.grad_fn).__name__ and out.is_contiguous(memory_format=fmt)
    _check_grads(out, F.gelu(plain(x)), [x, conv.weight, conv.bias], [x, plain.weight, plain.bias], 1e-6, 1e-6)
    out = conv(x, gate=gate)
    assert 'add_channel_bias_gate' in type(out.grad_fn).__name__ and out.is_contiguous(memory_format=fmt)
    _check_grads(out, plain(x) * gate, [x, conv.weight, conv.bias, gate], [x, plain.weight, plain.bias, gate],
                 1e-6, 1e-6)


@pytest.mark.parametrize('name, attribute', [('SpatialAttention', 'activation'), ('Mlp', 'act')])
def test_fused_kernels_refuse_another_activation(name, attribute):
    """The fused proj_1 and MLP compute the exact GELU: a module with another activation is refused, not
    run with the wrong one; the exact one is taken."""
    from smmcl.models import mscan
    module = getattr(mscan, name)(*((8,) if name == 'SpatialAttention' else (8, 16)))
    use_fused_kernels(module)
    setattr(module, attribute, nn.GELU(approximate='tanh'))
    with pytest.raises(ValueError, match=f'exact GELU, this {name} has GELU'):
        use_fused_kernels(module)
    use_fused_kernels(module, enabled=False)  # switching off asks nothing


# ---- the block tails: x + y * f, forward in one pass, backward in one Triton pass -----------------------

def _drop_path(*kept: int):
    """Drop path's N-1-1-1 mask as drawn (1 kept, 0 dropped), its keep probability, and the per-image factor
    ``f * (mask / p)`` a scale f takes with them, as :meth:`Block._factor` makes it."""
    keep = torch.tensor(kept, dtype=torch.float32, device=DEVICE).reshape(-1, 1, 1, 1)
    return keep, 0.75, lambda f: ScaleByImage.apply(f.reshape(-1), keep / 0.75)


def test_drop_paths_scale_in_the_tails_is_atens_division_to_the_bit():
    """The tails scale a drawn 0/1 mask by the float32 reciprocal of the keep probability, where DropPath
    divides it (ATen's ``mask / keep_prob``): the same float32 values for every rate MSCAN's schedule can
    give (0 to 0.5 by a linspace)."""
    from smmcl.kernels.triton_channel import _reciprocal
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    for rate in torch.linspace(0, 0.5, 101, dtype=torch.float64).tolist() + [0.1, 0.2, 1 / 3]:
        keep_prob = 1.0 - rate
        scale = _reciprocal(keep_prob)
        assert torch.equal(mask * torch.tensor(scale, dtype=torch.float32), mask / keep_prob), rate


@pytest.mark.parametrize('fmt', [NCHW, CL])
@pytest.mark.parametrize('per_image', [False, True], ids=['layer-scale', 'drop-path'])
@pytest.mark.parametrize('y_dtype', [torch.float32, torch.bfloat16])
def test_scaled_residual_is_addcmul(fmt, per_image, y_dtype, monkeypatch):
    """``smmcl::scaled_residual(x, y, f)`` against autocast's ``addcmul`` (y copied to float32 first): the
    same output to float32 rounding (the kernel may fuse the multiply-add, or not where ATen does), the
    same gradients (grad y rounded once to y's dtype; the interpreter truncates to bf16 where compiled
    Triton rounds to nearest even), f's gradient summed in another order; with drop path's mask (one
    image dropped), the factor per image the kernel makes is :class:`ScaleByImage`'s and y's gradient is
    0 on the dropped image; two channel blocks, and two programs along each image's pixels (under the
    interpreter one walks two of the three 16-pixel blocks)."""
    from smmcl.kernels import triton_channel
    monkeypatch.setattr(triton_channel, '_chunks', lambda t: 4)  # 2 per image of the 2
    x, y = _tensor(2, 37, 5, 9, fmt=fmt), _tensor(2, 37, 5, 9, fmt=fmt, dtype=y_dtype, seed=1)
    f = _tensor(37, 1, 1, seed=2)
    keep, keep_prob, factor = _drop_path(0, 1) if per_image else (None, 1.0, lambda f: f)
    out, partials = ops().scaled_residual(x, y, f, keep=keep, keep_prob=keep_prob)
    assert partials.shape == (0, 37)  # none asked for
    want = torch.addcmul(x, y.float(), factor(f))
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=fmt)
    assert rel(out, want) <= 1e-7 and (out - want).abs().max() <= 1e-6
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    got = torch.autograd.grad(out, (x, y, f), grad)
    ref = torch.autograd.grad(want, (x, y, f), grad)
    assert torch.equal(got[0], ref[0])
    assert got[1].dtype == y_dtype and got[1].is_contiguous(memory_format=fmt)
    assert rel(got[1], ref[1]) <= (2 ** -7 if y_dtype == torch.bfloat16 else 1e-7)
    assert got[2].shape == f.shape and rel(got[2], ref[2]) <= 1e-6
    if per_image:
        assert torch.equal(out[0], x[0]) and not got[1][0].any()


class _MapsMade(TorchDispatchMode):
    """Counts the maps of zeros (any ``zeros``/``zeros_like``/``new_zeros`` of 4 dims) made while on."""

    def __init__(self):
        super().__init__()
        self.zeros = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if 'zero' in func.overloadpacket.__name__ and isinstance(out, torch.Tensor) and out.dim() == 4:
            self.zeros += 1
        return out


@pytest.mark.parametrize('fmt', [NCHW, CL])
@pytest.mark.parametrize('per_image', [False, True], ids=['layer-scale', 'drop-path'])
@pytest.mark.parametrize('shortcut', [False, True], ids=['mlp', 'attention'])
def test_scaled_residual_adds_the_branchs_bias_and_shortcut(fmt, per_image, shortcut, monkeypatch):
    """The training tails with the branch's last bias (bf16 branch) and, for the attention, its own float32
    shortcut: ``x + (add_channel_bias(y, b) + s) * f`` as the ops compose it, in one pass each way. The
    branch is the composition's to the bit (the output equals the sum with it to float32 rounding); x's
    and the shortcut's gradients are the composition's to the bit; y's within bf16 rounding (the
    interpreter truncates); the bias gradient is the sum of y's as rounded (the bias add's backward), the
    factor's the composition's to float32 rounding."""
    from smmcl.kernels import triton_channel
    monkeypatch.setattr(triton_channel, '_chunks', lambda t: 4)
    x = _tensor(2, 37, 5, 9, fmt=fmt)
    y = _tensor(2, 37, 5, 9, fmt=fmt, dtype=torch.bfloat16, seed=1)
    f = _tensor(37, 1, 1, seed=2)
    keep, keep_prob, factor = _drop_path(1, 0) if per_image else (None, 1.0, lambda f: f)
    b = _tensor(37, seed=3)
    s = _tensor(2, 37, 5, 9, fmt=fmt, seed=4) if shortcut else None
    drop = dict(keep=keep, keep_prob=keep_prob)
    out, branch = (ops().shortcut_residual(x, y, f, b, s, **drop)[:2] if shortcut
                   else (ops().scaled_residual(x, y, f, b, **drop)[0], None))
    v = ops().add_channel_bias(y, b)
    v = v + s if shortcut else v
    want = torch.addcmul(x, v.float(), factor(f))
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=fmt)
    assert rel(out, want) <= 1e-7 and (out - want).abs().max() <= 1e-6
    if shortcut:  # what the backward keeps: the float32 branch, as the unfused ops keep it for addcmul
        assert torch.equal(branch, v) and not branch.requires_grad and branch.is_contiguous(memory_format=fmt)
        saved = [t for t in out.grad_fn.saved_tensors if t is not None]  # the keep mask None without drop path
        assert [t.data_ptr() for t in saved if t.shape == y.shape] == [branch.data_ptr()]
    inputs = [x, y, f, b] + ([s] if shortcut else [])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    with _MapsMade() as made:
        got = torch.autograd.grad(out, inputs, grad)
    assert made.zeros == 0  # none for the branch output, which takes no gradient
    ref = torch.autograd.grad(want, inputs, grad)
    assert torch.equal(got[0], ref[0])
    assert got[1].dtype == torch.bfloat16 and got[1].is_contiguous(memory_format=fmt)
    assert rel(got[1], ref[1]) <= 2 ** -7
    assert got[2].shape == f.shape and rel(got[2], ref[2]) <= 1e-6
    assert got[3].dtype == torch.float32
    assert rel(got[3], _like_compiled_triton(got[1].float().sum((0, 2, 3)), torch.bfloat16).float()) <= 1e-6
    assert rel(got[3], ref[3]) <= 2 ** -7
    if shortcut:
        assert got[4].is_contiguous(memory_format=fmt) and torch.equal(got[4], ref[4])
    if DEVICE == 'cuda':
        assert torch.equal(got[1], ref[1])


def test_scaled_residual_torch_and_triton_agree():
    """The two implementations behind ``auto`` on a bias and shortcut: the same outputs and gradients (to
    bf16 rounding under the interpreter, which truncates the biased branch where ATen rounds it)."""
    from smmcl.kernels import triton_channel as CH
    x, g = _tensor(2, 5, 3, 4).detach(), _tensor(2, 5, 3, 4, seed=5).detach()
    y = _tensor(2, 5, 3, 4, dtype=torch.bfloat16, seed=1).detach()
    f, b, s = _tensor(5, 1, 1, seed=2).detach(), _tensor(5, seed=3).detach(), _tensor(2, 5, 3, 4, seed=4).detach()
    for shortcut, drop in itertools.product((None, s), ({}, dict(keep=_drop_path(1, 0)[0], keep_prob=0.75))):
        (out, v, _), (want, want_v, _) = (CH.scaled_residual(x, y, f, b, shortcut, impl=impl, **drop)
                                          for impl in ('triton', 'torch'))
        tol = 1e-6 if DEVICE == 'cuda' else 2 ** -7
        assert out.dtype == want.dtype and rel(out, want) <= tol
        if shortcut is None:
            assert v is None and want_v is None
        else:
            assert v.dtype == want_v.dtype == torch.float32 and rel(v, want_v) <= tol
        branch, y_dtype = (y, None) if shortcut is None else (v, y.dtype)
        grads = [CH.scaled_residual_grad(g, branch, f, b, y_dtype, impl=impl, **drop) for impl in ('triton', 'torch')]
        assert [t is None for t in grads[0]] == [False, False, False, shortcut is None]
        for got, want in zip(*grads):
            assert got is None or (got.dtype == want.dtype and got.shape == want.shape and rel(got, want) <= 2 ** -7)


def test_tail_hands_on_xs_gradient_in_the_layout_it_read_it():
    """A stage's last block gets its output's gradient from the stage's LayerNorm in channels_last strides,
    on NCHW maps: the tail's backward lays it out once, and hands on x's gradient in that layout (the same
    values), so the norm's backward that reads it next finds it in place instead of copying it again."""
    x, y = _tensor(2, 5, 3, 4), _tensor(2, 5, 3, 4, seed=1)
    f, b = _tensor(5, 1, 1, seed=2), _tensor(5, seed=3)
    grad = _tensor(2, 5, 3, 4, fmt=CL, seed=4).detach()
    out, _ = ops().scaled_residual(x, y, f, b)
    gx, gy, _, gb = torch.autograd.grad(out, [x, y, f, b], grad)
    assert not grad.is_contiguous() and gx.is_contiguous() and torch.equal(gx, grad)
    assert gy.is_contiguous() and torch.allclose(gy, grad * f, rtol=1e-6, atol=1e-6)
    assert torch.allclose(gb, (grad * f).sum((0, 2, 3)), rtol=1e-5, atol=1e-5)  # x + f * (y + b)


def test_scaled_residual_refuses_a_factor_bias_shortcut_or_keep_mask_of_another_shape():
    x, f = _tensor(2, 5, 3, 4), _tensor(5, 1, 1)
    with pytest.raises(ValueError, match='must be C-1-1'):
        ops().scaled_residual(x, x, _tensor(5, 3, 1))
    with pytest.raises(ValueError, match="drop path's per image comes as its keep mask"):
        ops().scaled_residual(x, x, _tensor(2, 5, 1, 1))
    with pytest.raises(ValueError, match='N or N-1-1-1'):
        ops().scaled_residual(x, x, f, keep=torch.ones(2, 5, 1, 1, device=DEVICE), keep_prob=0.5)
    for keep, keep_prob in ((torch.ones(2, device=DEVICE), 0.0), (None, 0.5)):
        with pytest.raises(ValueError, match=r'keep probability must be in \(0, 1\]'):
            ops().scaled_residual(x, x, f, keep=keep, keep_prob=keep_prob)
    with pytest.raises(ValueError, match='bias of 5 channels'):
        ops().scaled_residual(x, x, f, _tensor(4))
    with pytest.raises(ValueError, match='shaped as the branch'):
        ops().shortcut_residual(x, x, f, None, _tensor(2, 5, 3, 3))
    with pytest.raises(ValueError, match='at least as wide'):
        ops().shortcut_residual(x, x, f, None, x.detach().to(torch.bfloat16))


@pytest.mark.parametrize('fmt', [NCHW, CL])
@pytest.mark.parametrize('shortcut', [False, True], ids=['mlp', 'attention'])
def test_tail_sums_the_next_norms_statistics(fmt, shortcut, monkeypatch):
    """A tail with ``stats`` writes the same sum and, in the same pass, the partials from which the next
    BatchNorm's statistics come without reading the sum back: the coefficients and running statistics of
    the norm's own pass over the sum (to float32 rounding: shifted by the stream's first value, not the
    sum's), float64's on a stream whose mean is 500 times its spread. Three programs walk the 3 images'
    pixel blocks (drop path's factor per image, one dropped); two channel blocks, one partial."""
    from smmcl.kernels import triton_channel as CH
    monkeypatch.setattr(CH, '_chunks', lambda t: 3)
    x = _tensor(3, 37, 5, 7, fmt=fmt).detach() * 2 + 1000.0
    y = _tensor(3, 37, 5, 7, fmt=fmt, dtype=torch.bfloat16, seed=1).detach()
    f, b = _tensor(37, 1, 1, seed=2).detach(), _tensor(37, seed=3).detach()
    drop = dict(keep=_drop_path(1, 0, 1)[0], keep_prob=0.75)
    s = _tensor(3, 37, 5, 7, fmt=fmt, seed=4).detach() if shortcut else None
    out, v, partials = CH.scaled_residual(x, y, f, b, s, impl='triton', stats=True, **drop)
    want, want_v, none = CH.scaled_residual(x, y, f, b, s, impl='triton', **drop)
    assert none is None and torch.equal(out, want) and (v is None or torch.equal(v, want_v))
    assert partials.shape == (2 * 3 + 1, 37) and torch.equal(partials[-1], x[0, :, 0, 0])
    weight, bias = _tensor(37, seed=5).detach(), _tensor(37, seed=6).detach()
    running = [[_tensor(37, seed=7).detach(), _tensor(37, seed=8).detach().abs() + 0.5] for _ in range(2)]
    got = CH.batch_norm_stats(out, weight, bias, *running[0], 0.1, 1e-5, impl='triton', partials=partials)
    ref = CH.batch_norm_stats(out, weight, bias, *running[1], 0.1, 1e-5, impl='triton')
    for g, r in zip([got, *running[0]], [ref, *running[1]]):
        assert rel(g, r) <= 1e-6
    var, mean = torch.var_mean(out.double(), dim=(0, 2, 3), correction=0)
    assert rel(got[0], mean) <= 1e-7 and rel(got[1], (var + 1e-5).rsqrt()) <= 1e-5
    assert CH.scaled_residual(x, y, f, b, s, impl='torch', stats=True, **drop)[2] is None  # the norm sums its own
    with pytest.raises(ValueError, match=r'\(2K \+ 1\) x 37'):
        CH.batch_norm_stats(out, weight, bias, *running[0], 0.1, 1e-5, partials=partials[1:])


@pytest.mark.slow
def test_a_stages_tails_hand_their_sums_to_the_next_norms(monkeypatch):
    """A stage of three training blocks on the kernels' path under bf16 autocast (:func:`run_blocks`): every
    BatchNorm but the stage's first takes its statistics from the tail that wrote its input, and the
    output, every gradient and the running statistics are those of the same blocks with each norm summing
    its own (the statistics differ in float32 rounding, which can flip a bf16 rounding downstream)."""
    from smmcl.kernels import triton_channel
    from smmcl.models.mscan import run_blocks, use_fused_tails
    spec = mscan_t()
    dim = spec.embed_dims[0]
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block(dim, spec.mlp_ratios[0], 0.0, nn.BatchNorm2d) for _ in range(3)).to(DEVICE)
    with torch.no_grad():
        for block in blocks:
            block.layer_scale_1.uniform_(0.2, 0.8)
            block.layer_scale_2.uniform_(0.2, 0.8)
    blocks = use_fused_kernels(use_fused_tails(blocks)).train()
    stats = triton_channel.batch_norm_stats
    x = _tensor(2, dim, 6, 7, fmt=CL, seed=1).detach()
    grad = _tensor(2, dim, 6, 7, fmt=CL, seed=2).detach()
    taken, results = [], []
    for keep in (True, False):
        monkeypatch.setattr(triton_channel, 'batch_norm_stats', lambda *a, partials=None, keep=keep, **k: taken.append(
            partials is not None) or stats(*a, partials=partials if keep else None, **k))
        stage = copy.deepcopy(blocks)
        x_in = x.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = run_blocks(stage, x_in)
        grads = torch.autograd.grad(out, [x_in, *stage.parameters()], grad)
        running = [t for m in stage.modules() if isinstance(m, nn.BatchNorm2d) for t in (m.running_mean, m.running_var)]
        results.append((out.detach(), grads, running))
    assert taken == [False, True, True, True, True, True] * 2  # norm1 of the stage's first block sums its own
    (out, grads, running), (ref_out, ref_grads, ref_running) = results
    # measured: output 5e-8, gradients 2e-7, running statistics 9e-7
    assert rel(out, ref_out) <= 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) <= 1e-4
    for g, r in zip(running, ref_running):
        assert rel(g, r) <= 5e-6


@pytest.mark.slow
@pytest.mark.parametrize('fmt', [NCHW, CL])
@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'bf16-autocast'])
def test_block_tails_with_kernels_are_the_same_function(fmt, amp, monkeypatch):
    """The fast path's training block (fused tails, drop path drawing per image) with the kernels against
    the same block without them: the same drop-path draws, output and every gradient (to bf16 rounding
    under autocast, where the plain conv adds its bias before rounding its output once). The only bias
    passes with the kernels are proj_1's (with its GELU) and conv3's (with the gate), forward and
    backward: proj_2's and fc2's biases and the attention's own shortcut are in the tails' passes, fc1's
    in the MLP's depthwise conv. Under autocast the BatchNorms write the convs' bf16 copies themselves
    (``normed_pair``): the same running statistics."""
    from smmcl.kernels import triton_channel
    from smmcl.models.mscan import use_fused_tails
    torch.manual_seed(0)
    spec = mscan_t()
    plain = Block(spec.embed_dims[0], spec.mlp_ratios[0], 0.3, nn.BatchNorm2d).to(DEVICE).to(memory_format=fmt)
    with torch.no_grad():
        plain.layer_scale_1.uniform_(0.2, 0.8)
        plain.layer_scale_2.uniform_(0.2, 0.8)
    plain = use_fused_tails(plain).train()
    fused = use_fused_kernels(copy.deepcopy(plain))
    assert fused.fused_kernels and not plain.fused_kernels
    passes = []
    for name in ('bias_add', 'bias_grad', 'bias_epilogue_grad'):
        def spy(*args, name=name, fn=getattr(triton_channel, name), **kwargs):
            passes.append((name, kwargs.get('epilogue', args[3] if name == 'bias_epilogue_grad' else 'none')))
            return fn(*args, **kwargs)
        monkeypatch.setattr(triton_channel, name, spy)
    x = _tensor(3, 32, 5, 6, fmt=fmt)
    results = []
    for model in (plain, fused):
        torch.manual_seed(11)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        results.append((out, torch.autograd.grad(out, [x] + list(model.parameters()), torch.ones_like(out))))
    assert sorted(passes) == [('bias_add', 'gate'), ('bias_add', 'gelu'),
                              ('bias_epilogue_grad', 'gate'), ('bias_epilogue_grad', 'gelu')]
    (ref, ref_grads), (out, grads) = results
    assert out.dtype == ref.dtype == torch.float32
    assert rel(out, ref) <= (1e-2 if amp else 1e-5)
    for name, g, r in zip(['input'] + [n for n, _ in plain.named_parameters()], grads, ref_grads):
        assert rel(g, r) <= (3e-2 if amp else 1e-4), name
    for (name, b), r in zip(fused.named_buffers(), plain.buffers()):  # the BatchNorms' running statistics
        # norm1 reads the same input in both; norm2 the stream after the attention, equal to bf16 rounding
        tol = 1e-2 if amp and name.startswith('norm2') else 1e-6
        assert b.dtype == r.dtype and (torch.equal(b, r) if b.dtype == torch.int64 else rel(b, r) <= tol), name


@pytest.mark.slow
@pytest.mark.parametrize('fmt', [NCHW, CL])
def test_block_casts_its_pointwise_weights_once_each_way(fmt, monkeypatch):
    """Under autocast the training block on the kernels' path casts its five 1x1 convs' weights in one
    multi-tensor pass (``cast_once``) and widens their gradients in one more, where autocast casts each in
    a launch of its own: the same output, gradients and running statistics bit for bit, no per-weight cast
    left, and the convs' own parameters back afterwards, an error raised inside included."""
    from smmcl.models import mscan
    from smmcl.models.mscan import PointwiseConv, use_fused_tails

    torch.manual_seed(0)
    spec = mscan_t()
    block = Block(spec.embed_dims[0], spec.mlp_ratios[0], 0.3, nn.BatchNorm2d).to(DEVICE)
    block = use_fused_kernels(use_fused_tails(block)).train()
    x = _tensor(3, 32, 5, 6, fmt=fmt)
    cast_once = mscan.cast_once
    results = []
    for once in (True, False):
        if not once:
            monkeypatch.setattr(mscan, 'cast_once', lambda x, parameters: contextlib.nullcontext())
        model, casts = copy.deepcopy(block), OpCalls()
        torch.manual_seed(11)
        with casts:
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                out = model(x)
            grads = torch.autograd.grad(out, [x] + list(model.parameters()), torch.ones_like(out))
        calls = [(name, tuple(args[0].shape) if name == '_to_copy' else len(args[0]))
                 for name, args in casts.calls if name in ('_to_copy', '_foreach_copy_')]
        weights = [shape for name, shape in calls if name == '_to_copy' and shape[2:] == (1, 1)]
        results.append((out, grads, list(model.buffers()), calls, weights))
    (out, grads, buffers, calls, weights), (ref, ref_grads, ref_buffers, _, ref_weights) = results
    assert calls.count(('_foreach_copy_', 5)) == 2 and not weights
    assert len(ref_weights) == 2 * 5  # autocast's casts, each way
    assert torch.equal(out, ref)
    for name, g, r in zip(['input'] + [n for n, _ in block.named_parameters()], grads, ref_grads):
        assert g.dtype == r.dtype and torch.equal(g, r), name
    for b, r in zip(buffers, ref_buffers):
        assert torch.equal(b, r)

    model = copy.deepcopy(block)
    convs = [m for m in model.modules() if isinstance(m, PointwiseConv)]
    own = [m.weight for m in convs]

    def fails(*args, **kwargs):
        assert all(type(m.weight) is torch.Tensor and m.weight.dtype == torch.bfloat16 for m in convs)
        raise RuntimeError('inside the block')
    monkeypatch.setattr(model.mlp, 'forward', fails)
    monkeypatch.setattr(mscan, 'cast_once', cast_once)
    with pytest.raises(RuntimeError, match='inside the block'), torch.autocast(DEVICE, dtype=torch.bfloat16):
        model(x)
    assert all(m.weight is p for m, p in zip(convs, own)) and dict(model.named_parameters()).keys() == \
        dict(block.named_parameters()).keys()


def test_folded_block_with_kernels_is_the_same_function():
    from smmcl.models.fast import FoldedBlock
    block = _tiny_block().eval()
    plain = FoldedBlock(copy.deepcopy(block))
    fused = use_fused_kernels(FoldedBlock(copy.deepcopy(block)))
    assert fused.fused_kernels
    x = _tensor(2, 32, 5, 7, fmt=CL).detach()
    with torch.no_grad():
        assert rel(fused(x), plain(x)) <= 1e-5


# ---- a block's BatchNorm in training: statistics, both outputs in one pass, the backward ---------------------

def _batch_norm_inputs(fmt, offset=0.0, seed=0):
    x = (_tensor(3, 37, 5, 7, fmt=fmt, seed=seed).detach() * 2 + offset).requires_grad_()
    weight, bias = (_tensor(37, seed=seed + k) for k in (1, 2))
    running = [_tensor(37, seed=seed + 3).detach(), _tensor(37, seed=seed + 4).detach().abs() + 0.5]
    return x, weight, bias, running


def _fused_batch_norm(x, weight, bias, running, low_dtype, full, impl=None):
    from smmcl.kernels import triton_channel
    coef = triton_channel.batch_norm_stats(x.detach(), weight.detach(), bias.detach(), *running, 0.1, 1e-5, impl)
    if impl is None:
        return ops().batch_norm_apply(x, weight, bias, coef, low_dtype, full)
    return triton_channel.batch_norm_apply(x, coef, low_dtype, full, impl)


@pytest.mark.parametrize('fmt', [NCHW, CL])
@pytest.mark.parametrize('full', [True, False], ids=['both', 'low-only'])
@pytest.mark.parametrize('low_dtype', [torch.float32, torch.bfloat16])
def test_batch_norm_is_native_batch_norm_and_its_cast(fmt, full, low_dtype):
    """``smmcl::batch_norm_stats`` + ``smmcl::batch_norm_apply`` against ``F.batch_norm`` in training mode and
    the cast of its output: the same output (float32 to rounding; the copy within one bf16 step), the
    same running statistics, and the gradients of x, weight and bias through both outputs (the copy's
    bf16 gradient read as it is) to float32 rounding; channels not a multiple of a block, both layouts."""
    x, weight, bias, running = _batch_norm_inputs(fmt, offset=3.0)
    ref_running = [r.clone() for r in running]
    low, out = _fused_batch_norm(x, weight, bias, running, low_dtype, full)
    want = F.batch_norm(x, *ref_running, weight, bias, True, 0.1, 1e-5)
    for got, ref in zip(running, ref_running):
        assert rel(got, ref) <= 1e-6
    assert low.dtype == low_dtype and low.is_contiguous(memory_format=fmt)
    assert ((low.float() - want).abs() <= want.abs() * (2 ** -7 if low_dtype == torch.bfloat16 else 1e-6)
            + 1e-6).all()
    if full:
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=fmt) and rel(out, want) <= 1e-6
    else:
        assert out.numel() == 0
    g_low = _tensor(*x.shape, fmt=fmt, seed=8).detach().to(low_dtype)
    g_out = _tensor(*x.shape, fmt=fmt, seed=9).detach()
    loss = (low.float() * g_low.float()).sum() + ((out * g_out).sum() if full else 0)
    got = torch.autograd.grad(loss, (x, weight, bias))
    ref_loss = (want * g_low.float()).sum() + ((want * g_out).sum() if full else 0)
    ref = torch.autograd.grad(ref_loss, (x, weight, bias))
    for name, g, r in zip(('x', 'weight', 'bias'), got, ref):
        assert g.dtype == r.dtype and rel(g, r) <= 2e-6, name
    assert got[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize('source', ['triton', 'torch', 'partials'])
def test_batch_norm_statistics_count_the_batch_once(source):
    """With the module's ``num_batches_tracked``, the statistics count the batch in their own launch: by one,
    once for 130 channels (two programs of the finalise kernel), on every path; without it nothing counts."""
    from smmcl.kernels import triton_channel as CH
    x = _tensor(2, 130, 3, 4).detach()
    weight, bias = _tensor(130, seed=1).detach(), _tensor(130, seed=2).detach()
    running = [torch.zeros(130, device=DEVICE), torch.ones(130, device=DEVICE)]
    partials = None
    if source == 'partials':
        partials = CH.scaled_residual(x, torch.zeros_like(x), torch.ones(130, 1, 1, device=DEVICE), impl='triton',
                                      stats=True)[2]
    impl = 'triton' if source == 'partials' else source
    tracked = torch.tensor(5, device=DEVICE)
    coef = CH.batch_norm_stats(x, weight, bias, *running, 0.1, 1e-5, impl=impl, partials=partials,
                               num_batches_tracked=tracked)
    assert tracked.item() == 6
    again = CH.batch_norm_stats(x, weight, bias, *[r.clone() for r in running], 0.1, 1e-5, impl=impl,
                                partials=partials)
    assert tracked.item() == 6 and torch.allclose(again, coef)


def test_batch_norm_statistics_do_not_cancel_on_a_large_mean():
    """A channel whose mean is 1e3 times its spread (a residual stream can drift so): the variance from the
    channel-shifted sums is float64's to 1e-5, where plain sums of squares in float32 lose it."""
    x, weight, bias, running = _batch_norm_inputs(NCHW, offset=2000.0)
    coef = ops().batch_norm_stats(x.detach(), weight.detach(), bias.detach(), *running, 0.1, 1e-5, None, None)
    var = x.detach().double().var(dim=(0, 2, 3), unbiased=False)
    assert rel(coef[0], x.detach().double().mean(dim=(0, 2, 3))) <= 1e-7
    assert rel(coef[1], (var + 1e-5).rsqrt()) <= 1e-5


def test_batch_norm_torch_and_triton_agree():
    """The two implementations behind ``auto``: statistics, running statistics, outputs and gradients."""
    from smmcl.kernels import triton_channel
    results = []
    for impl in ('triton', 'torch'):
        x, weight, bias, running = _batch_norm_inputs(CL, offset=1.0)
        low, out = _fused_batch_norm(x, weight, bias, running, torch.bfloat16, True, impl)
        coef = triton_channel.batch_norm_stats(x.detach(), weight, bias, *[r.clone() for r in running], 0.1, 1e-5, impl)
        g_low, g_out = _tensor(*x.shape, fmt=CL, seed=8).detach().to(torch.bfloat16), _tensor(*x.shape, fmt=CL, seed=9)
        grads = triton_channel.batch_norm_grad(g_low, g_out.detach(), x.detach(), weight, coef[0], coef[1],
                                               _tensor(*x.shape, fmt=CL, seed=10).detach(), impl=impl)
        results.append((coef, *running, out, *grads))
    for got, want in zip(*results):
        assert got.dtype == want.dtype and rel(got, want) <= 2e-6


def test_batch_norm_auto_choice_times_on_copies_of_the_running_statistics(monkeypatch):
    """``auto`` times both implementations once per shape (on a GPU; simulated here by running each once):
    on copies of the running statistics, so the module's are updated once a step, as nn.BatchNorm2d's are;
    a second call of the same shape neither times nor copies again."""
    from smmcl.kernels import triton_channel
    timed = []

    def fastest(chosen, key, impls, *args):
        for fn in impls.values():
            fn(*args)
        timed.append(key)
        chosen[key] = 'triton'
        return 'triton'
    monkeypatch.setattr(triton_channel, 'fastest', fastest)
    monkeypatch.setattr(triton_channel, 'choose', lambda env, impl, choices, device, fallback, timed: timed())
    monkeypatch.setattr(triton_channel, '_CHOICE', {})
    x, weight, bias, running = _batch_norm_inputs(NCHW, offset=1.0)
    ref_running = [r.clone() for r in running]
    for _ in range(2):
        triton_channel.batch_norm_stats(x.detach(), weight.detach(), bias.detach(), *running, 0.1, 1e-5)
        F.batch_norm(x.detach(), *ref_running, weight.detach(), bias.detach(), True, 0.1, 1e-5)
    assert len(timed) == 1
    for got, ref in zip(running, ref_running):
        assert rel(got, ref) <= 1e-6


def test_normed_pair_runs_the_fused_batch_norm_only_where_it_is_the_module():
    """A block's BatchNorm with the kernels: the fused ops in training under autocast (the module's running
    statistics and batch count updated, the same outputs, and x's gradient the sum of the norm's and the
    one its handed-on stream gets, added in the norm's last pass); the module itself in eval mode, without
    autocast and for another norm class, with x itself handed on."""
    from smmcl.models.mscan import normed_pair
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(37).to(DEVICE).train()
    ref = copy.deepcopy(norm)
    x = _tensor(3, 37, 5, 7, fmt=CL)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        full, low, stream = normed_pair(norm, x)
        none, low_only, _ = normed_pair(norm, x, full=False)
        want = ref(x)
        ref(x)
    assert none is None and low.dtype == low_only.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert full.grad_fn is not None and 'BatchNormStream' in type(full.grad_fn).__name__
    assert stream.grad_fn is full.grad_fn and torch.equal(stream, x) and stream.data_ptr() == x.data_ptr()
    assert rel(full, want) <= 1e-6 and int(norm.num_batches_tracked) == 2
    for got, r in zip(norm.buffers(), ref.buffers()):
        assert rel(got.float(), r.float()) <= 1e-6
    g_full, g_low, g_pass = (_tensor(3, 37, 5, 7, fmt=CL, seed=k).detach() for k in (5, 6, 7))
    got = torch.autograd.grad([full, low, stream], [x, norm.weight], [g_full, g_low.to(torch.bfloat16), g_pass])
    wanted = torch.autograd.grad([want, want, x], [x, ref.weight], [g_full, g_low.to(torch.bfloat16).float(), g_pass])
    assert all(rel(g, w) <= 2e-6 for g, w in zip(got, wanted))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        _, low, stream = normed_pair(norm, x, full=False)
    grad_x, = torch.autograd.grad([stream], [x], [g_pass])  # the norm's outputs unused: the stream's alone
    assert torch.equal(grad_x, g_pass)
    for module, autocast in ((copy.deepcopy(norm).eval(), True), (norm, False), (nn.GroupNorm(1, 37).to(DEVICE), True)):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            full, low, stream = normed_pair(module, x)
        assert full is low and full.dtype == torch.float32 and stream is x


@pytest.mark.parametrize('fmt', [NCHW, CL])
@pytest.mark.parametrize('with_factor', [True, False], ids=['shortcut', 'mlp-add'])
def test_residual_pair_is_the_sum_and_its_cast(fmt, with_factor):
    """The folded blocks' ``a + b * f`` (or ``a + b``) in float32 and its bf16 copy in one pass: ATen's sum
    (to float32 rounding: the kernel may fuse the multiply-add) and the cast of it (within a bf16 step:
    the interpreter truncates where compiled Triton rounds to nearest even)."""
    a, b = _tensor(2, 37, 5, 9, fmt=fmt, dtype=torch.bfloat16).detach(), _tensor(2, 37, 5, 9, fmt=fmt, seed=1).detach()
    f = _tensor(1, 37, 1, 1, seed=2).detach() if with_factor else None
    out, low = ops().residual_pair(a, b, f)
    want = a.float() + (b * f if with_factor else b)
    assert out.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=fmt) and low.is_contiguous(memory_format=fmt)
    assert rel(out, want) <= 1e-7 and (out - want).abs().max() <= 1e-6
    assert ((low.float() - out).abs() <= out.abs() * 2 ** -7).all()
    if DEVICE == 'cuda':
        assert torch.equal(low, out.to(torch.bfloat16))


@pytest.mark.parametrize('fmt', [NCHW, CL])
@pytest.mark.parametrize('with_factor', [True, False], ids=['shortcut', 'mlp-add'])
def test_residual_pair_adds_the_branchs_bias_as_the_bias_add_would(fmt, with_factor):
    """With the bias of the conv that made the branch: the bias add's pass and the pair's, to the bit."""
    a, b = _tensor(2, 37, 5, 9, fmt=fmt, dtype=torch.bfloat16).detach(), _tensor(2, 37, 5, 9, fmt=fmt, seed=1).detach()
    f = _tensor(1, 37, 1, 1, seed=2).detach() if with_factor else None
    bias = _tensor(37, seed=3).detach()
    got = ops().residual_pair(a, b, f, bias)
    want = ops().residual_pair(ops().add_channel_bias(a, bias), b, f)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(ValueError, match='a bias of 37 channels'):
        ops().residual_pair(a, b, f, bias[:5])


def test_folded_blocks_hand_on_the_stream_with_its_copy(monkeypatch):
    """A stage of folded blocks under bf16 autocast with the kernels (each residual add writing the copy
    the next 1x1 conv reads and adding the branch's last bias) against the same blocks without them: the
    same function, to bf16 rounding; the only bias passes left are proj_1's and conv3's, with their GELU
    and gate, and fc1's is in the MLP's depthwise conv."""
    from smmcl.kernels import triton_channel
    from smmcl.models.fast import FoldedBlock
    from smmcl.models.mscan import run_blocks
    torch.manual_seed(0)
    spec = mscan_t()
    blocks = nn.ModuleList(Block(spec.embed_dims[0], spec.mlp_ratios[0], 0.0, nn.BatchNorm2d) for _ in range(2))
    with torch.no_grad():
        for blk in blocks:
            blk.layer_scale_1.uniform_(0.2, 0.8)
            blk.layer_scale_2.uniform_(0.2, 0.8)
    with torch.no_grad():  # as fold_for_inference folds
        plain = nn.ModuleList(FoldedBlock(b) for b in copy.deepcopy(blocks).eval()).to(DEVICE)
    fused = use_fused_kernels(copy.deepcopy(plain))
    calls, epilogues = [], []
    for blk in fused:
        blk.forward_pair = lambda x, low, f=blk.forward_pair: calls.append(low is None) or f(x, low)
    bias_add = triton_channel.bias_add

    def spy(*args, epilogue='none', **kwargs):
        epilogues.append(epilogue)
        return bias_add(*args, epilogue=epilogue, **kwargs)
    monkeypatch.setattr(triton_channel, 'bias_add', spy)
    x = _tensor(2, 32, 5, 7, fmt=CL, dtype=torch.bfloat16).detach()  # a patch embedding's output
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, want = run_blocks(fused, x), run_blocks(plain, x)
    assert calls == [True, False]  # the first block starts from the embedding, the second from its copy
    assert epilogues == ['gelu', 'gate'] * 2
    assert got.dtype == want.dtype == torch.float32
    assert rel(got, want) <= 5e-3


# ---- the cross-modal modulation: outputs and their backward in one pass each, the inputs' gradient sums -------

def _modulation_operands(fmt, dtype, seed=0):
    """rgb, x: 2-37-5-9 float32 (two channel blocks, three pixel blocks under the interpreter); spatial
    2-1-5-9 and channel 2-37-1-1 coefficients in (0, 1), in ``dtype``."""
    rgb, x = (_tensor(2, 37, 5, 9, fmt=fmt, seed=seed + k).detach() for k in (0, 1))
    spatial = torch.sigmoid(_tensor(2, 1, 5, 9, seed=seed + 2).detach()).to(dtype)
    channel = torch.sigmoid(_tensor(2, 37, 1, 1, seed=seed + 3).detach()).to(dtype)
    return rgb, x, spatial, channel


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('fmt', [NCHW, CL])
def test_modulation_is_the_reference(fmt, dtype):
    """triton_channel.modulation and modulation_grad against smmcl.kernels' references (the ATen ops of the
    fast path), the gate rounded as the kernels round it: outputs and the maps' gradients to float32's
    rounding, the coefficients' gradients (float32 sums in another order, then their dtype) to that or a
    bf16 step; both implementations agree; wrong operands are refused."""
    from smmcl.kernels import triton_channel
    from smmcl.kernels.reference import modulation_grad_reference, modulation_reference
    rgb, x, spatial, channel = _modulation_operands(fmt, dtype)
    # the gate's rounding as the kernels do it: the references then take its two halves as 0 and the gate
    gate = _like_compiled_triton(0.5 * spatial.float() + 0.5 * channel.float(), dtype)
    as_kernels = (torch.zeros_like(spatial), gate / 0.5)
    got = triton_channel.modulation(rgb, x, spatial, channel, impl='triton')
    want = modulation_reference(rgb, x, *as_kernels)
    assert got[2] is None
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.is_contiguous(memory_format=fmt) and rel(g, w) <= 1e-6
    # stored for the convs that read them: in their dtype, as the maps and as their concat
    for streams in (True, False):
        low = triton_channel.modulation(rgb, x, spatial, channel, dtype, streams, fusion=True, impl='triton')
        assert low[2].dtype == dtype and low[2].is_contiguous(memory_format=fmt) and low[2].shape == (2, 74, 5, 9)
        outs = (low[0], low[1], low[2][:, :37], low[2][:, 37:]) if streams else (low[2][:, :37], low[2][:, 37:])
        assert (low[0] is None) != streams
        for g, w in zip(outs, want * 2):
            assert rel(g, _like_compiled_triton(w, dtype)) <= (1e-6 if dtype == torch.float32 else 4e-3)
    grads = [_tensor(2, 37, 5, 9, fmt=fmt, seed=5 + k).detach() for k in (0, 1)]
    got = triton_channel.modulation_grad(*grads, None, rgb, x, spatial, channel, impl='triton')
    want = modulation_grad_reference(*grads, rgb, x, spatial, channel)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        tol = 1e-6 if i < 2 and dtype == torch.float32 else 1e-5 if dtype == torch.float32 else 1e-2
        assert rel(g, w) <= tol, i
    for g, w in zip(triton_channel.modulation_grad(*grads, None, rgb, x, spatial, channel, impl='torch'), want):
        assert torch.equal(g, w)
    # the gradients of the copies: the maps' (x's absent), the concat's in the other layout, summed first
    fuse = _tensor(2, 74, 5, 9, fmt=CL if fmt == NCHW else NCHW, dtype=dtype, seed=7).detach()
    low_grad = grads[0].to(dtype)
    got = triton_channel.modulation_grad(low_grad, None, fuse, rgb, x, spatial, channel, impl='triton')
    want = modulation_grad_reference(low_grad.float() + fuse[:, :37].float(), fuse[:, 37:].float(), rgb, x,
                                     spatial, channel)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and rel(g, w) <= (1e-5 if dtype == torch.float32 else 1e-2), i
    with pytest.raises(ValueError, match='N-C-H-W and N-2C-H-W'):
        triton_channel.modulation_grad(None, None, grads[0], rgb, x, spatial, channel)
    with pytest.raises(ValueError, match='N-1-H-W spatial and N-C-1-1 channel'):
        triton_channel.modulation(rgb, x, channel, spatial)
    with pytest.raises(ValueError, match='of one dtype'):
        triton_channel.modulation(rgb, x, spatial.double(), channel)


@pytest.mark.parametrize('fmt', [NCHW, CL])
def test_pooled_input_grad_is_the_reference(fmt):
    """triton_channel.pooled_input_grad (a map's gradient from a handed-on use, its half of a concat, its
    channels' means and maxima) bit for bit against the reference, with ties at the maxima (amax's
    gradient shared) and a bf16 concat gradient in the other layout, for each combination of the parts;
    wrong shapes are refused."""
    from smmcl.kernels import triton_channel
    from smmcl.kernels.reference import pooled_input_grad_reference
    value = _tensor(2, 37, 5, 9, fmt=fmt).detach()
    value[..., 1:3, 2:4] = value.amax() + 1
    # the maxima and counts as the module passes them: slices of the pooled vectors
    maximum = torch.cat([value.amax(dim=(2, 3), keepdim=True)] * 2, 1)[:, 37:]
    count = torch.full((2, 74, 1, 1), 4.0, device=DEVICE)[:, :37]
    grad_pass = _tensor(2, 37, 5, 9, fmt=fmt, seed=1).detach()
    grad_both = _tensor(2, 74, 5, 9, fmt=CL if fmt == NCHW else NCHW, dtype=torch.bfloat16, seed=2).detach()
    grad_mean, grad_max = (_tensor(2, 37, 1, 1, seed=3 + k).detach() for k in (0, 1))
    results = []
    for parts in ((grad_pass, grad_both, 37, grad_mean, grad_max), (None, grad_both, 0, grad_mean, grad_max),
                  (grad_pass, None, 0, grad_mean, grad_max), (grad_pass, grad_both, 37, None, None)):
        handed_on, both, offset, mean, top = parts
        got = triton_channel.pooled_input_grad(handed_on, both, offset, value, mean, maximum, top, count,
                                               impl='triton')
        half = None if both is None else both[:, offset:offset + 37]
        want = pooled_input_grad_reference(handed_on, half, value, mean, maximum, top, count)
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=fmt) and torch.equal(got, want)
        results.append(got)
    pooled = results[0] - results[3]  # the means' gradient everywhere, the maxima's a quarter at each of 4 ties
    torch.testing.assert_close(pooled[..., 0, 0], grad_mean[..., 0, 0] / 45)
    torch.testing.assert_close(pooled[..., 1, 2], grad_mean[..., 0, 0] / 45 + grad_max[..., 0, 0] / 4)
    with pytest.raises(ValueError, match='are N-C-1-1, the two gradients given together'):
        triton_channel.pooled_input_grad(None, None, 0, value, grad_mean, maximum, None, count)
    with pytest.raises(ValueError, match='holds no 37 channels'):
        triton_channel.pooled_input_grad(None, grad_both, 40, value, None, maximum, None, count)


@pytest.mark.parametrize('block_p', [8, 64], ids=['6-blocks', '1-block'])
def test_modulation_grad_sums_the_partials_of_the_tile_that_ran(block_p, monkeypatch):
    """The channel coefficients' gradient sums the partial rows the launched tile wrote, as many an image as
    it has pixel blocks (the grid tells them), and nothing else (no row is filled): tiles of 8 pixels (6
    blocks of the 45) and of 64 (1 block) give the reference's gradients."""
    import triton
    from smmcl.kernels import triton_channel
    from smmcl.kernels.reference import modulation_grad_reference
    tile = triton.Config(dict(BLOCK_C=16, BLOCK_P=block_p), num_warps=4)
    monkeypatch.setattr(triton_channel.modulation_grad_kernel, 'configs', [tile])
    rgb, x, spatial, channel = _modulation_operands(CL, torch.float32)
    grads = [_tensor(2, 37, 5, 9, fmt=CL, seed=5 + k).detach() for k in (0, 1)]
    got = triton_channel.modulation_grad(*grads, None, rgb, x, spatial, channel, impl='triton')
    want = modulation_grad_reference(*grads, rgb, x, spatial, channel)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and rel(g, w) <= 1e-5


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('fmt', [NCHW, CL])
def test_modulation_inputs_are_the_reference(fmt, dtype):
    """triton_channel.modulation_inputs (per modality one pass: its half of the concat, its channels'
    sums, maxima and the count of each maximum, partials over two programs an image merged once) against
    the reference: the concat as the kernels round it, the maxima and their counts exactly (ties within a
    program's pixels and across programs' blocks), the means to float32 rounding; mismatched maps are
    refused."""
    from smmcl.kernels import triton_channel
    from smmcl.kernels.reference import modulation_inputs_reference
    rgb, x = _modulation_operands(fmt, torch.float32)[:2]
    rgb[..., 1:3, 2:4] = rgb.amax() + 1  # 4 ties in one block
    x[0, :, 0, 0] = x.amax() + 2  # 2 ties, in the first and the last pixel block (two programs)
    x[0, :, 4, 8] = x[0, 0, 0, 0]
    both, pooled, counts = triton_channel.modulation_inputs(rgb, x, dtype, impl='triton')
    want = modulation_inputs_reference(rgb, x, dtype)
    assert both.dtype == dtype and both.is_contiguous(memory_format=fmt)
    assert torch.equal(both, _like_compiled_triton(torch.cat([rgb, x], 1), dtype))
    assert torch.equal(pooled[:, 74:], want[1][:, 74:]) and rel(pooled[:, :74], want[1][:, :74]) <= 1e-6
    assert torch.equal(counts, want[2]) and counts[0, :37].eq(4).all() and counts[0, 37:].eq(2).all()
    with pytest.raises(ValueError, match='two maps of one shape and dtype'):
        triton_channel.modulation_inputs(rgb, x.double(), dtype)


def test_modulation_ops_register_fake_and_autograd():
    rgb, x, spatial, channel = _modulation_operands(CL, torch.bfloat16)
    torch.library.opcheck(ops().modulation, (rgb.requires_grad_(), x.requires_grad_(), spatial, channel))
    torch.library.opcheck(ops().modulation, (rgb, x, spatial, channel, torch.bfloat16, False, True))
    grads = [_tensor(2, 37, 5, 9, fmt=CL, seed=5 + k).detach() for k in (0, 1)]
    torch.library.opcheck(ops().modulation_backward, (*grads, None, rgb.detach(), x.detach(), spatial, channel))
    torch.library.opcheck(ops().modulation_backward, (grads[0], None, torch.cat(grads, 1), rgb.detach(), x.detach(),
                                                      spatial, channel))
    value = rgb.detach()
    grad_both = _tensor(2, 74, 5, 9, dtype=torch.bfloat16, seed=2).detach()
    torch.library.opcheck(ops().pooled_input_grad, (grads[0], grad_both, 37, value, channel.float(),
                                                    value.amax(dim=(2, 3), keepdim=True), channel.float(),
                                                    torch.ones_like(channel, dtype=torch.float32)))
    torch.library.opcheck(ops().modulation_inputs, (value, x.detach(), torch.bfloat16))


@pytest.mark.parametrize('amp', [False, True])
def test_modulation_with_kernels_is_the_same_function(amp, monkeypatch):
    """The fast path's cross-modal modulation with the kernels (smmcl::modulation_inputs, smmcl::modulation,
    its backward, and smmcl::pooled_input_grad for each input) against it without: outputs and every
    gradient, to float32 rounding, and under bf16 autocast to the rounding of the gate and the concat (the interpreter truncates
    both to bf16 where ATen rounds: up to 5.9e-3 measured, in the spatial MLP's weight gradient)."""
    from smmcl.kernels import triton_channel
    from smmcl.models.fusion import CrossModalModulation
    from smmcl.models.mscan import use_fused_tails
    calls = []
    for name in ('modulation_inputs', 'modulation', 'modulation_grad', 'pooled_input_grad'):
        def spy(*args, name=name, fn=getattr(triton_channel, name), **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        monkeypatch.setattr(triton_channel, name, spy)
    torch.manual_seed(0)
    plain = use_fused_tails(CrossModalModulation(37)).to(DEVICE)
    fused = use_fused_kernels(copy.deepcopy(plain))
    rgb, x = _modulation_operands(CL, torch.float32)[:2]
    rgb[..., 1:3, 2:4] = rgb.amax() + 1  # ties at the pooled maxima
    grads_out = [_tensor(2, 37, 5, 9, fmt=CL, seed=5 + k).detach() for k in (0, 1)]
    results = []
    for module in (plain, fused):
        inputs = [rgb.clone().requires_grad_(), x.clone().requires_grad_()]
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=amp):
            outs = module(*inputs)
        results.append(list(outs) + list(torch.autograd.grad(outs, inputs + list(module.parameters()), grads_out)))
    assert calls == ['modulation_inputs', 'modulation', 'modulation_grad', 'pooled_input_grad', 'pooled_input_grad']
    for i, (w, g) in enumerate(zip(*results)):
        assert g.dtype == w.dtype and rel(g, w) <= (1e-2 if amp else 1e-5), i
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=amp):  # inference: no counts
        for w, g in zip(plain(rgb, x), fused(rgb, x)):
            assert rel(g, w) <= (1e-2 if amp else 1e-5)
    assert calls[5:] == ['modulation_inputs', 'modulation']
    # as the encoder asks: for the convs that read them (the next stage's, the fusion conv), maps and concat
    # in the autocast dtype, their gradients summed in the kernel's backward
    grad_fuse = torch.cat(grads_out, 1)
    for streams, fusion in ((True, True), (False, True), (True, False)):
        results = []
        for module in (plain, fused):
            inputs = [rgb.clone().requires_grad_(), x.clone().requires_grad_()]
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=amp):
                outs = module.modulate(*inputs, streams, fusion, for_convs=True)
            used = [(o, g) for o, g in zip(outs, grads_out + [grad_fuse]) if o is not None]
            assert len(used) == 2 * streams + fusion
            assert all(o.dtype == (torch.bfloat16 if amp and module is fused else torch.float32) for o, _ in used)
            loss = sum((o.float() * g).sum() for o, g in used)
            results.append([o for o, _ in used] + list(torch.autograd.grad(loss, inputs + list(module.parameters()))))
        for i, (w, g) in enumerate(zip(*results)):
            assert rel(g, w) <= (1e-2 if amp else 1e-5), (streams, fusion, i)


# ---- the NMF's float32 products on the tensor cores (3xTF32) ------------------------------------------

def _tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32's 10-bit mantissa (to nearest)."""
    return ((x.contiguous().view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def test_three_tf32_products_keep_the_nmf_at_float32_accuracy(monkeypatch):
    """The method of smmcl::bmm_tf32x3, done in PyTorch (Triton's interpreter computes its tl.dot in
    float32): each operand split into its TF32 part and the TF32 rest, three products summed, the rests'
    product dropped. The NMF's output is then as close to the one with float64 products as float32's
    own (MSCAN-B's widths, 2 images at 30x40), where plain TF32 is ~400x further."""
    from smmcl.models.ham_head import NMF2D
    bmm = torch.bmm

    def tf32x3(a, b):
        a_hi, b_hi = _tf32(a), _tf32(b)
        return bmm(a_hi, b_hi) + (bmm(a_hi, _tf32(b - b_hi)) + bmm(_tf32(a - a_hi), b_hi))

    x = torch.relu(torch.randn(2, 512, 30, 40, generator=torch.Generator().manual_seed(0)))
    nmf = NMF2D().eval()
    nmf.fixed_bases = nmf.draw_bases(2, 512, generator=torch.Generator().manual_seed(1))
    outs = {}
    for name, product in (('float32', bmm), ('float64', lambda a, b: bmm(a.double(), b.double()).float()),
                          ('tf32x3', tf32x3), ('tf32', lambda a, b: bmm(_tf32(a), _tf32(b)))):
        monkeypatch.setattr(torch, 'bmm', product)
        outs[name] = nmf(x)
    err = {name: rel(out, outs['float64']) for name, out in outs.items()}
    assert err['float32'] < 1e-6 and err['tf32x3'] <= 1.5 * err['float32'] and err['tf32'] > 100 * err['float32']


BMM_CASES = [  # batch, M, K, N, a given as a transposed view
    (2, 40, 200, 64, True),   # a split reduction (two programs per tile under the interpreter), NMF's x^T
    (3, 70, 64, 33, False),   # odd sizes, several tiles each way
    (1, 5, 17, 7, True),      # smaller than a tile
]


@pytest.mark.parametrize('batch, m, k, n, transposed', BMM_CASES)
def test_bmm_tf32x3_is_bmm(batch, m, k, n, transposed):
    """Forward against float64 products, gradients against torch.bmm's autograd (themselves products of
    transposed views), to float32's accuracy (float32's own products here: ~1-2e-7; plain TF32's ~5e-4)."""
    a = _tensor(batch, k, m, seed=1).transpose(1, 2) if transposed else _tensor(batch, m, k, seed=1)
    b = _tensor(batch, k, n, seed=2)
    out = ops().bmm_tf32x3(a, b)
    assert out.shape == (batch, m, n) and out.dtype == torch.float32 and out.is_contiguous()
    assert rel(out, torch.bmm(a.double(), b.double())) <= 5e-7
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    got = torch.autograd.grad(out, (a, b), grad)
    want = torch.autograd.grad(torch.bmm(a.double(), b.double()), (a, b), grad.double())
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel(g, w) <= 5e-7


def test_bmm_tf32x3_edges_and_refusals():
    from smmcl.kernels import triton_matmul
    a, b = _tensor(2, 3, 0).detach(), _tensor(2, 0, 4).detach()
    assert torch.equal(triton_matmul.bmm(a, b, impl='triton'), torch.zeros(2, 3, 4, device=DEVICE))
    with pytest.raises(ValueError, match='float32 B-M-K and B-K-N'):
        triton_matmul.bmm(_tensor(2, 3, 4).detach().double(), _tensor(2, 4, 5).detach())
    with pytest.raises(ValueError, match='float32 B-M-K and B-K-N'):
        triton_matmul.bmm(_tensor(2, 3, 4).detach(), _tensor(2, 5, 5).detach())
    torch.library.opcheck(ops().bmm_tf32x3, (_tensor(2, 4, 3).transpose(1, 2), _tensor(2, 4, 5, seed=1)))


NMF_UPDATE_CASES = [  # batch, rows, R, inputs given as transposed views (copied by the wrapper)
    (2, 37, 16, False),  # rows not a multiple of a program's
    (3, 5, 10, True),    # R not a power of two, strided inputs
    (1, 1, 64, False),   # one row, SegNeXt's R
]


def _positive(*shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE) + 0.1


@pytest.mark.parametrize('batch, m, r, transposed', NMF_UPDATE_CASES)
def test_nmf_update_is_atens_chain_to_the_bit(batch, m, r, transposed):
    """smmcl::nmf_update against the three ATen operators it replaces (``product + eps``, then ``factor *
    numerator / denominator``): the same bits, IEEE-rounded division included; without the denominator kept,
    an empty one."""
    factor, numerator, product = (_positive(batch, r, m, seed=s).transpose(1, 2) if transposed
                                  else _positive(batch, m, r, seed=s) for s in (1, 2, 3))
    eps = 1e-6
    want_denominator = product + eps
    want = factor * numerator / want_denominator
    updated, denominator = ops().nmf_update(factor, numerator, product, eps)
    assert updated.is_contiguous() and denominator.is_contiguous()
    assert torch.equal(updated, want) and torch.equal(denominator, want_denominator)
    updated, denominator = ops().nmf_update(factor, numerator, product, eps, False)
    assert torch.equal(updated, want) and denominator.numel() == 0


@pytest.mark.parametrize('batch, m, r, transposed', NMF_UPDATE_CASES)
def test_nmf_update_grad_writes_atens_products_into_the_slot(batch, m, r, transposed):
    """smmcl::nmf_update_grad against ATen's division and three products: ``ratio * factor`` written into a
    rank-wide slot of a wider tensor (as NMFSteps' stacked factors), the rest of it untouched, and ``ratio *
    updated``, ``ratio * numerator`` returned; the same bits."""
    inputs = [_positive(batch, r, m, seed=s).transpose(1, 2) if transposed else _positive(batch, m, r, seed=s)
              for s in (4, 5, 6, 7, 8)]
    grad, denominator, factor, updated, numerator = inputs
    grad = grad - 0.6  # gradients of either sign
    stacked = torch.full((batch, m, 3 * r), 7.0, device=DEVICE)
    slot = stacked[..., r:2 * r]
    ratio = grad / denominator
    scaled_updated, scaled_numerator = ops().nmf_update_grad(grad, denominator, factor, updated, numerator, slot)
    assert torch.equal(slot, ratio * factor)
    assert torch.equal(stacked[..., :r], torch.full_like(slot, 7.0))
    assert torch.equal(stacked[..., 2 * r:], torch.full_like(slot, 7.0))
    assert torch.equal(scaled_updated, ratio * updated) and torch.equal(scaled_numerator, ratio * numerator)


def test_nmf_update_refusals_and_opcheck():
    a, b = _positive(2, 5, 4, seed=1), _positive(2, 5, 4, seed=2)
    with pytest.raises(ValueError, match='float32 B-M-R tensors of one shape'):
        ops().nmf_update(a, b, _positive(2, 5, 3, seed=3), 1e-6)
    with pytest.raises(ValueError, match='float32 B-M-R tensors of one shape'):
        ops().nmf_update(a, b.double(), b, 1e-6)
    with pytest.raises(ValueError, match='written by rows'):
        ops().nmf_update_grad(a, b, a, b, a, torch.empty(2, 4, 5, device=DEVICE).transpose(1, 2))
    torch.library.opcheck(ops().nmf_update, (a, b, _positive(2, 5, 4, seed=3), 1e-6, True))
    torch.library.opcheck(ops().nmf_update_grad, (a, b, a, b, a, torch.empty(2, 5, 4, device=DEVICE)))


def test_nmf_backward_by_hand_with_the_fused_updates_is_atens():
    """NMFSteps with the updates' element-wise steps fused (smmcl::nmf_update and _grad, the products torch.bmm)
    against it without: the same output and gradient bits, one fused op per update each way (2T+1 = 13)
    and no division left in either pass; and inference's decomposition."""
    from smmcl.models.ham_head import NMF2D, NMFSteps, decompose
    from conftest import OpCalls
    ops()  # registers the smmcl ops
    bases = NMF2D(rank=8).draw_bases(2, 32, DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    x = torch.relu(_tensor(2, 32, 35)).detach().requires_grad_()
    grad = _tensor(2, 32, 35, seed=2).detach()
    results = []
    for fused in (False, True):
        with OpCalls() as calls:
            out = NMFSteps.apply(x, bases, 6, 1e-6, 1, torch.bmm, fused)
            results.append((out, torch.autograd.grad(out, x, grad)[0]))
        names = calls.names()
        if fused:
            assert names.count('nmf_update') == names.count('nmf_update_grad') == 13 and 'div' not in names
        else:
            assert names.count('div') == 26 and 'nmf_update' not in names
    (want, want_grad), (got, got_grad) = results
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    # the fast path's inference (7 steps, untracked): the fused updates and the start's product taken again
    # as the first numerator give the bits of the tracked decomposition, which computes it twice
    with OpCalls() as calls, torch.no_grad():
        inference = decompose(x, bases, 7, 1e-6, fused=True, shared_start=True)
    with OpCalls() as tracked_calls:
        tracked = decompose(x, bases, 7, 1e-6)
    assert torch.equal(inference, tracked)
    # the start's product, three in each of the 15 updates, the reconstruction's
    assert calls.names().count('bmm') + 1 == tracked_calls.names().count('bmm') == 1 + 15 * 3 + 1


@pytest.mark.parametrize('training', [False, True])
def test_nmf_with_kernels_is_the_same_function(training):
    """The decoder's Hamburger with the kernels (every NMF product smmcl::bmm_tf32x3, also those of the fast
    path's backward by hand, on strided views) against it without: the same bases, output and (training:
    the gradient through all 6 update steps) every gradient."""
    from smmcl.models.ham_head import Hamburger
    from smmcl.models.mscan import use_fused_tails
    torch.manual_seed(0)
    plain = Hamburger(channels=64, rank=16).to(DEVICE).train(training)
    fused = use_fused_tails(use_fused_kernels(copy.deepcopy(plain)))
    assert fused.ham.fused_kernels and fused.ham.fused_tails and not plain.ham.fused_kernels
    x = _tensor(2, 64, 6, 9)
    results = []
    for model in (plain, fused):
        model.ham.fixed_bases = model.ham.draw_bases(2, 64, DEVICE, torch.Generator(DEVICE).manual_seed(3))
        out = model(x)
        results.append((out, torch.autograd.grad(out, [x] + list(model.parameters()), torch.ones_like(out))))
    (ref, ref_grads), (out, grads) = results
    assert rel(out, ref) <= 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) <= 1e-5


# ---- the three strips' weight gradients in one launch -------------------------------------------------

STRIP_LENGTHS = (7, 11, 21)
STRIP_WGRAD_CASES = [  # N, C, H, W, along W, memory format
    (2, 37, 5, 18, True, NCHW),   # two channel blocks, two tiles each way (4 x 16 under the interpreter), odd sizes
    (2, 37, 9, 17, False, CL),    # vertical, channels_last
    (1, 5, 3, 2, True, CL),       # map narrower than every kernel, batch 1
    (1, 3, 2, 3, False, NCHW),    # map shorter than every kernel, batch 1
]


def _strip_weights(c, along_w, dtype=torch.float32):
    return [_tensor(c, 1, *((1, k) if along_w else (k, 1)), dtype=dtype, seed=50 + k).detach() for k in STRIP_LENGTHS]


def _strip_wgrad_reference(grads, xs, weights, along_w):
    """[(dw_i, db_i)] of F.conv2d's autograd in float32 on the same values."""
    out = []
    for g, x, wt in zip(grads, xs, weights):
        rw, = _fp32_copies(wt)
        rb = torch.zeros(wt.shape[0], device=DEVICE, requires_grad=True)
        k = max(wt.shape[-2:])
        y = F.conv2d(x.float(), rw, rb, padding=(0, k // 2) if along_w else (k // 2, 0), groups=wt.shape[0])
        out.append(torch.autograd.grad(y, (rw, rb), g.float()))
    return out


def _check_strip_wgrad(got, want, weights, tol):
    for i, ((dw, db), (ref_w, ref_b), wt) in enumerate(zip(got, want, weights)):
        assert dw.shape == wt.shape and db.shape == (wt.shape[0],) and dw.dtype == db.dtype == wt.dtype
        assert rel(dw, ref_w) <= tol and rel(db, ref_b) <= tol, f'strip {i}: {rel(dw, ref_w):.1e}, {rel(db, ref_b):.1e}'


@pytest.mark.parametrize('impl', ['fused', 'rows', 'bands'])
@pytest.mark.parametrize('n, c, h, w, along_w, fmt', STRIP_WGRAD_CASES)
def test_strip3_wgrad_matches_autograd(n, c, h, w, along_w, fmt, impl):
    """Three convs with three gradients and three inputs of their own, in one launch of the tile, the
    row-walked (in channels_last along W: the map walked with H and W swapped) or the band kernel (along W
    in NCHW; elsewhere the row-walked one)."""
    from smmcl.kernels import triton_dwconv
    grads = [_tensor(n, c, h, w, fmt=fmt, seed=60 + i).detach() for i in range(3)]
    xs = [_tensor(n, c, h, w, fmt=fmt, seed=70 + i).detach() for i in range(3)]
    weights = _strip_weights(c, along_w)
    packed = triton_dwconv.strip3_wgrad_packed(grads, xs, weights, along_w, impl=impl)
    got = triton_dwconv.unpack_strip3_wgrad(packed, weights)
    _check_strip_wgrad(got, _strip_wgrad_reference(grads, xs, weights, along_w), weights, 1e-5)


@pytest.mark.parametrize('impl', ['fused', 'rows'])
@pytest.mark.parametrize('along_w, fmt, weight_dtype', [(True, CL, torch.float32), (False, NCHW, torch.bfloat16)],
                         ids=['autocast-like', 'bf16-model'])
def test_bf16_strip3_wgrad(along_w, fmt, weight_dtype, impl):
    """bf16 activations, fp32 sums; results in the weights' dtype (one rounding for a bf16 model)."""
    from smmcl.kernels import triton_dwconv
    grads = [_tensor(2, 6, 5, 17, fmt=fmt, dtype=torch.bfloat16, seed=60 + i).detach() for i in range(3)]
    xs = [_tensor(2, 6, 5, 17, fmt=fmt, dtype=torch.bfloat16, seed=70 + i).detach() for i in range(3)]
    weights = _strip_weights(6, along_w, weight_dtype)
    got = triton_dwconv.unpack_strip3_wgrad(
        triton_dwconv.strip3_wgrad_packed(grads, xs, weights, along_w, impl=impl), weights)
    tol = 1e-5 if weight_dtype == torch.float32 else BF16_TOL
    _check_strip_wgrad(got, _strip_wgrad_reference(grads, xs, weights, along_w), weights, tol)


@pytest.mark.parametrize('along_w', [True, False])
def test_strip3_wgrad_of_an_empty_batch_is_zero(along_w):
    from smmcl.kernels import triton_dwconv
    x = torch.randn(0, 4, 5, 6, device=DEVICE)
    weights = _strip_weights(4, along_w)
    got = triton_dwconv.unpack_strip3_wgrad(triton_dwconv.strip3_wgrad_packed([x] * 3, [x] * 3, weights, along_w),
                                            weights)
    for (dw, db), wt in zip(got, weights):
        assert dw.shape == wt.shape and db.shape == (4,)
        assert not dw.any() and not db.any()


def test_a_repeated_tensor_is_laid_out_once():
    """The op passes one tensor three times (``a`` as every input, ``grad`` as every gradient)."""
    from smmcl.kernels import triton_dwconv
    x = torch.randn(1, 3, 4, 5, device=DEVICE)
    first, second, other = triton_dwconv._same_layout(CL, x, x, x.clone())
    assert first is second and other is not first and first.is_contiguous(memory_format=CL)


def test_strip_weight_gradient_choice_through_the_op(monkeypatch):
    """SMMCL_TRITON_STRIP_WGRAD: one launch per direction ('fused') and the six dwconv_wgrad calls
    ('separate') give the reference's gradients; 'auto' is 'fused' under the interpreter; a bad name stops
    with the choices. The gradient arrives in NCHW for a channels_last ``a``: laid out once, grad a comes
    back like ``a``."""
    from smmcl.kernels import triton_dwconv
    a, params = _tensor(1, 5, 6, 9, fmt=CL), _strip_params(5)
    ref_a, *ref_params = _fp32_copies(a, *params)
    ref = kernels.strip_sum_reference(ref_a, ref_params)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    want = torch.autograd.grad(ref, [ref_a] + ref_params, grad)
    grads = {}
    for impl in ('fused', 'rows', 'separate'):
        monkeypatch.setenv('SMMCL_TRITON_STRIP_WGRAD', impl)
        grads[impl] = torch.autograd.grad(ops().mscan_strip_sum(a, *params), [a] + params, grad)
        assert grads[impl][0].is_contiguous(memory_format=CL)
        for i, (g, w, p) in enumerate(zip(grads[impl], want, [a] + params)):
            assert g.shape == p.shape and g.dtype == p.dtype
            assert rel(g, w) <= 1e-5, f'{impl}: gradient {i}'
    for other in ('rows', 'separate'):
        for g, w in zip(grads['fused'], grads[other]):
            assert rel(g, w) <= 1e-6
    x, horizontal = a.detach(), [p.detach() for p in params[0::4]]
    if DEVICE == 'cpu':  # 'auto' under the interpreter: the fused kernel (a GPU times them all)
        fused, called = triton_dwconv._STRIP_WGRAD['fused'], []
        monkeypatch.setitem(triton_dwconv._STRIP_WGRAD, 'fused', lambda *args: called.append(args) or fused(*args))
        monkeypatch.setenv('SMMCL_TRITON_STRIP_WGRAD', 'auto')
        triton_dwconv.strip3_wgrad_packed([x] * 3, [x] * 3, horizontal, along_w=True)
        assert len(called) == 1
    monkeypatch.setenv('SMMCL_TRITON_STRIP_WGRAD', 'one')
    with pytest.raises(ValueError,
                       match="SMMCL_TRITON_STRIP_WGRAD must be 'auto' or one of .*'fused', 'rows', 'bands', "
                             "'separate'"):
        triton_dwconv.strip3_wgrad_packed([x] * 3, [x] * 3, horizontal, along_w=True)


def _tiny_training_model(backbone: str):
    """The whole-model tests' config, segmentor (with its loss, training mode) and batch (rgb, x, labels of
    2x2 blocks): a 64-channel decoder, 4 classes, 64x64 images."""
    from smmcl.models import build_segmentor
    from conftest import tiny_config
    cfg = tiny_config(backbone=backbone, num_classes=4, decoder_embed_dim=64, min_views_per_class=2)
    torch.manual_seed(0)
    model = build_segmentor(cfg, with_loss=True).to(DEVICE).train()
    g = torch.Generator().manual_seed(1)
    rgb, x = (torch.randn(2, 3, 64, 64, generator=g).to(DEVICE) for _ in range(2))
    label = torch.randint(0, 4, (2, 2, 2), generator=g).repeat_interleave(32, 1).repeat_interleave(32, 2).to(DEVICE)
    return cfg, model, (rgb, x, label)


@pytest.mark.slow
@pytest.mark.parametrize('family', ['rows', 'bands'])
def test_whole_model_with_kernels_in_nchw_is_the_plain_function(tiny_mscan, monkeypatch, family):
    """The fast path in NCHW (``channels_last=False``) with the kernels against the plain path, fp32, one
    training forward + backward with the same seeds (drop path, anchors, NMF bases): the loss terms and
    every gradient agree (the GPU run's channels_last spread of
    ~3e-3 comes from cuDNN's layout, docs/speed.md). The fast path's fused block tails round differently
    too. A 64-channel decoder: with fewer channels than the NMF's rank (64), its multiplicative updates'
    backward amplifies rounding differences of 1e-7 in the forward to gradients 5 % apart. ``rows``: the
    row-walked weight gradients, the 5x5's and the 3x3's in their backward's one pass (``auto`` under the
    interpreter), the strips' on the row-walked kernel (the convs along H on the row kernels too would
    triple this test's time under the interpreter; their own tests above cover them, and
    bench/gpu_check.py's model step runs the whole row family on a GPU). ``bands``: the strips along W on
    the band kernels, forward, adjoint and weight gradients, and the 5x5 and 3x3 weight gradients in
    passes of their own (the other launches on the tiles, as ``auto`` under the interpreter)."""
    if family == 'rows':
        monkeypatch.setenv('SMMCL_TRITON_STRIP_WGRAD', 'rows')
    if family == 'bands':
        ops()
        from smmcl.kernels import triton_dwconv
        monkeypatch.setattr(triton_dwconv, '_depthwise_impl',
                            lambda impl, op, x, key, launches: 'bands' if 'bands' in launches else 'tiles')
        monkeypatch.setenv('SMMCL_TRITON_STRIP_WGRAD', 'bands')
        monkeypatch.setenv('SMMCL_TRITON_WGRAD', 'bands')
        launches = _band_launches(monkeypatch)
    from smmcl.engine.precision import for_training
    cfg, model, (rgb, x, label) = _tiny_training_model(tiny_mscan)
    results = []
    for fast in (False, True):
        cfg.update(fast_path=fast, triton_kernels=fast, channels_last=False)
        m = for_training(copy.deepcopy(model), cfg)
        assert any(getattr(mod, 'fused_kernels', False) for mod in m.modules()) == fast
        torch.manual_seed(3)
        terms = m(rgb, x, label, return_terms=True)
        terms['loss'].backward()
        results.append((terms, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (plain_terms, plain_grads), (terms, grads) = results
    for key in plain_terms:
        assert abs(terms[key] - plain_terms[key]) <= 1e-5 * abs(plain_terms[key]) + 1e-12, key
    scale = max(torch.linalg.norm(v) for v in plain_grads.values())
    assert grads.keys() == plain_grads.keys()
    for name, ref in plain_grads.items():
        if torch.linalg.norm(ref) > 1e-6 * scale:  # conv biases before a norm: rounding noise only
            assert rel(grads[name], ref) <= 1e-4, name
    if family == 'bands':  # 8 blocks: forward strips; backward adjoint, strips again, their and the KxK weights
        import collections
        assert collections.Counter(name for name, _ in launches) == {
            'strip3_bands_kernel': 16, 'strip3_sum_bands_kernel': 8, 'strip3_wgrad_bands_kernel': 8,
            'dwconv_wgrad_bands_kernel': 16}


@pytest.mark.slow
def test_whole_model_inference_with_kernels_under_autocast(tiny_mscan):
    """The fast inference model (folded, channels_last) with the kernels under bf16 autocast, as evaluation
    runs it: as close to the float32 function as the same model without the kernels under autocast (bf16
    noise, which the NMF amplifies at these tiny widths: ~2 %), and every folded block of both branches
    handing its stream on with the copy its next conv reads."""
    from smmcl.engine.precision import inference_model
    from smmcl.models import build_segmentor
    from smmcl.models.fast import FoldedBlock
    from conftest import tiny_config
    cfg = tiny_config(backbone=tiny_mscan, num_classes=4, decoder_embed_dim=64)
    torch.manual_seed(0)
    model = build_segmentor(cfg).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    rgb, x = (torch.randn(2, 3, 64, 64, generator=g).to(DEVICE) for _ in range(2))
    logits, pairs = {}, []
    for kernels_on, bf16 in ((False, False), (False, True), (True, True)):
        cfg.update(fast_path=True, triton_kernels=kernels_on, amp=False)  # amp: the autocast below
        net = inference_model(copy.deepcopy(model), cfg)
        for blk in net.modules():
            if isinstance(blk, FoldedBlock):
                blk.forward_pair = lambda x, low, f=blk.forward_pair: pairs.append(kernels_on) or f(x, low)
        torch.manual_seed(3)
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
            logits[kernels_on, bf16] = net(rgb, x).float()
    assert pairs == [True] * 8  # one block per stage and branch in the tiny backbone
    reference = logits[False, False]
    assert rel(logits[True, True], reference) <= 1.5 * rel(logits[False, True], reference) + 1e-3


@pytest.mark.slow
def test_whole_model_training_with_kernels_under_autocast(tiny_mscan, monkeypatch):
    """One training forward + backward of the fast path under bf16 autocast, as train.py runs it, with the
    kernels and without them: about as close to the float32 function (loss and the whole gradient) as the
    same path without the kernels (bf16 noise, which the NMF amplifies at these tiny widths), with every
    block's BatchNorms on the fused ops, each attention's tail with its shortcut in one pass, summing
    norm2's statistics in it."""
    from smmcl.engine.precision import for_training
    from smmcl.kernels import triton_channel
    cfg, model, (rgb, x, label) = _tiny_training_model(tiny_mscan)
    calls = []
    for name in ('batch_norm_apply', 'batch_norm_stats', 'scaled_residual'):  # with partials / a shortcut?
        monkeypatch.setattr(triton_channel, name, lambda *a, name=name, f=getattr(triton_channel, name), **k:
                            calls.append((name, k.get('partials') is not None if name == 'batch_norm_stats'
                                          else len(a) > 4 and a[4] is not None)) or f(*a, **k))
    results = {}
    for kernels_on, bf16 in ((False, False), (False, True), (True, True)):
        cfg.update(fast_path=True, triton_kernels=kernels_on, channels_last=False)
        m = for_training(copy.deepcopy(model), cfg)
        torch.manual_seed(3)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
            loss = m(rgb, x, label, return_terms=True)['loss']
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
        results[kernels_on, bf16] = (loss.detach().double(), grads)
    import collections  # 8 blocks: two norms each, one attention tail with its shortcut, one MLP tail
    assert collections.Counter(calls) == {('batch_norm_apply', False): 16, ('scaled_residual', True): 8,
                                          ('scaled_residual', False): 8, ('batch_norm_stats', True): 8,
                                          ('batch_norm_stats', False): 8}
    (ref_loss, ref_grads), (amp_loss, amp_grads), (loss, grads) = (results[k] for k in (
        (False, False), (False, True), (True, True)))
    # Triton's interpreter truncates to bf16 where ATen (and compiled Triton) round to nearest: twice the
    # error and biased, in every bf16 map the kernels write (measured here: loss 0.036 against 0.016 off,
    # the whole gradient 5.9e-2 against 6.0e-2; before the BatchNorm and tails joined the kernels, 0.026)
    factor = 1.5 if DEVICE == 'cuda' else 3.0
    assert abs(loss - ref_loss) <= factor * abs(amp_loss - ref_loss) + 1e-3 * abs(ref_loss)
    assert rel(grads, ref_grads) <= factor * rel(amp_grads, ref_grads) + 1e-3


def test_compiling_ahead_reaches_every_kernel_and_runs_none(tiny_mscan, monkeypatch):
    """``triton_compile.compile_ahead`` on what bench/gpu_check.py compiles ahead of its rows: the fast path's
    training forward + backward in both layouts and its folded inference forward, under bf16 autocast.
    Every kernel of the package reaches the workers (a stand-in pool recording the jobs): each op's
    implementations, kernel families and weight-gradient strategies are launched. No kernel runs, nothing
    is timed or remembered (no autotuning result, no implementation choice), and the hook is gone after."""
    from conftest import refuse_kernel_launches, stand_in_compile_workers
    from smmcl.engine.precision import for_training, inference_model
    from smmcl.kernels import triton_bands, triton_channel, triton_common, triton_compile, triton_dwconv
    from smmcl.kernels import triton_matmul, triton_rows
    ops()
    pool = stand_in_compile_workers(monkeypatch)
    refuse_kernel_launches(monkeypatch)
    modules = (triton_bands, triton_channel, triton_common, triton_dwconv, triton_matmul, triton_rows)
    tuners = {v for m in modules for v in vars(m).values() if isinstance(v, triton.runtime.Autotuner)}
    caches = {t: dict(t.cache) for t in tuners}
    choice_dicts = (triton_channel._CHOICE, triton_dwconv._DEPTHWISE_CHOICE, triton_dwconv._BACKWARD_CHOICE,
                    triton_dwconv._WGRAD_CHOICE, triton_dwconv._STRIP_WGRAD_CHOICE, triton_matmul._CHOICE)
    choices = [dict(d) for d in choice_dicts]
    cfg, model, (rgb, x, label) = _tiny_training_model(tiny_mscan)

    def training(channels_last):
        def run():
            cfg.update(fast_path=True, triton_kernels=True, channels_last=channels_last)
            m = for_training(copy.deepcopy(model), cfg)
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                m(rgb, x, label, return_terms=True)['loss'].backward()
        return run

    def inference():
        cfg.update(fast_path=True, triton_kernels=True, amp=False)  # amp: the autocast below
        net = inference_model(copy.deepcopy(model).eval(), cfg)
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            net(rgb, x)

    stats = triton_compile.compile_ahead(training(False), training(True), inference)
    names = {args[1] for _, args in pool.jobs}
    not_autotuned = {'chunk_sums_kernel', 'norm_finalize_kernel', 'inside_sums_kernel', 'nmf_update_kernel',
                     'nmf_update_grad_kernel'}
    assert names == {t.base_fn.__name__ for t in tuners} | not_autotuned
    assert stats == dict(compilations=len(pool.jobs), compiled=len(pool.jobs), seconds=stats['seconds'])
    assert {t: dict(t.cache) for t in tuners} == caches and [dict(d) for d in choice_dicts] == choices
    assert not triton_common.AHEAD


def _draws():
    """The next numbers of Python's, NumPy's and torch's generators (the caller's states restored after)."""
    import random

    import numpy as np
    from smmcl.engine.seeding import rng_state, set_rng_state
    state = rng_state()
    draws = random.random(), float(np.random.rand()), torch.rand(3).tolist()
    set_rng_state(state)
    return draws


def test_a_run_compiles_its_kernels_ahead_and_is_left_as_it_was(tiny_mscan, monkeypatch, caplog):
    """``train.py``'s and ``eval.py``'s compilation ahead (smmcl/engine/ahead.py), with a stand-in pool that
    records the jobs: the training step's pass hands over the backward's kernels too, the evaluation's
    (two 48x64 images, two scales, a batch of two) the forward's only, and each reports its count. No kernel
    runs; the random streams draw afterwards what they would have drawn, and the evaluated model keeps its
    weights, statistics and mode. Without the kernels nothing is compiled; a pass that fails is reported
    and the run goes on."""
    import numpy as np
    from conftest import refuse_kernel_launches, stand_in_compile_workers, tiny_config
    from smmcl.engine import ahead
    from smmcl.engine.dist import DistContext
    from smmcl.models import build_segmentor
    ops()
    pool = stand_in_compile_workers(monkeypatch)
    refuse_kernel_launches(monkeypatch)
    cfg = tiny_config(backbone=tiny_mscan, num_classes=4, min_views_per_class=1, fast_path=True, triton_kernels=True,
                      image_height=64, image_width=96, eval_crop_size=(48, 64), eval_scale_array=[0.75, 1.0],
                      eval_batch_size=2)
    ctx = DistContext(device=torch.device(DEVICE))
    caplog.set_level('INFO', logger='smmcl.engine.ahead')
    before = _draws()

    def handed(run):
        pool.jobs.clear()
        run()
        assert _draws() == before
        return {args[1] for _, args in pool.jobs}
    trained = handed(lambda: ahead.compile_ahead_of_training(cfg, ctx, 2))
    assert {'_dwconv_wgrad_kernel', 'bias_grad_kernel', 'nmf_update_grad_kernel'} <= trained
    assert f'Triton kernels of the training step compiled ahead: {len(pool.jobs)} compilations' in caplog.text

    torch.manual_seed(0)
    model = build_segmentor(cfg, with_loss=True).to(DEVICE).train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = _draws()
    g = np.random.default_rng(0)
    dataset = [dict(data=g.integers(0, 256, (48, 64, 3), np.uint8), modal_x=g.integers(0, 256, (48, 64, 3), np.uint8),
                    label=g.integers(0, 4, (48, 64), np.uint8), fn=str(i)) for i in range(3)]
    evaluated = handed(lambda: ahead.compile_ahead_of_evaluation(model, dataset, cfg, ctx))
    assert evaluated and evaluated < trained and not any('grad' in name for name in evaluated)
    assert f'Triton kernels of the evaluation compiled ahead: {len(pool.jobs)} compilations' in caplog.text
    assert model.training and all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())

    caplog.clear()
    cfg.triton_kernels = False
    assert not handed(lambda: ahead.compile_ahead_of_training(cfg, ctx, 2)) and not caplog.text
    cfg.triton_kernels = True

    def broken(*args, **kwargs):
        torch.rand(5)  # drawn before the failure: restored too
        raise RuntimeError('out of memory')
    monkeypatch.setattr(ahead, 'build_segmentor', broken)
    assert not handed(lambda: ahead.compile_ahead_of_training(cfg, ctx, 2))
    assert ('compiling the Triton kernels of the training step ahead failed (RuntimeError: out of memory); each '
            'launch compiles its own') in caplog.text


@pytest.mark.filterwarnings('ignore:non-finite evaluation scores')
def test_the_passes_meet_what_the_training_steps_and_the_evaluation_launch(tiny_training, monkeypatch):
    """``train.py``'s pass ahead of its first step (a model of its own, a synthetic chunk) launches what the
    run's own steps launch (its model, its loader's crops cut into chunks), and the evaluation's pass (the
    first ``eval_batch_size`` test images, and the first alone) what the evaluation during training launches
    (every test image, two scales, batched; the TensorBoard grid's one at a time): the same kernels with the
    same shapes, strides and constexprs, each candidate (pointers' alignment aside). All recorded in ahead
    mode, with a stand-in pool (what the steps and the evaluation compute is garbage: the steps are skipped)."""
    from conftest import REPO, refuse_kernel_launches, stand_in_compile_workers
    from smmcl.engine import ahead, watch
    from smmcl.engine import train as train_module
    pool = stand_in_compile_workers(monkeypatch)
    refuse_kernel_launches(monkeypatch)
    launched = {}

    def record(what):
        launched.setdefault(what, set()).update(_handed_over(pool))

    def pass_ahead(config, ctx, chunk_size):
        ahead.compile_ahead_of_training(config, ctx, chunk_size)
        record('pass')

    def in_ahead_mode(function, what):
        return _in_ahead_mode(function, lambda: record(what))

    def evaluation_pass(*args):
        ahead.compile_ahead_of_evaluation(*args)
        record('evaluation pass')
    monkeypatch.setattr(train_module, 'compile_ahead_of_training', pass_ahead)
    monkeypatch.setattr(train_module, 'train_step', in_ahead_mode(train_module.train_step, 'steps'))
    monkeypatch.setattr(watch, 'compile_ahead_of_evaluation', evaluation_pass)
    monkeypatch.setattr(watch, 'evaluate_per_image', in_ahead_mode(watch.evaluate_per_image, 'evaluation'))
    monkeypatch.setattr(watch, 'prediction_grid', in_ahead_mode(watch.prediction_grid, 'evaluation'))
    overrides = tiny_training(fast_path=True, triton_kernels=True, batch_size=4, replicas=2, nepochs=1,
                              nonfinite_loss='skip', eval_every_epochs=1, eval_crop_size=[48, 64],
                              eval_scale_array=[0.75, 1.0], eval_flip=False, eval_batch_size=2)
    train_module.main(os.path.join(REPO, 'SMMCL_LLRGBD', 'config.py'), ['--set', *overrides])
    assert launched['steps'] and launched['pass'] == launched['steps']
    assert launched['evaluation'] and launched['evaluation pass'] == launched['evaluation']


def _in_ahead_mode(function, then):
    """``function`` run with its Triton launches handed over (``triton_compile.compile_ahead``: none runs), then
    ``then()``; returns what ``function`` returns."""
    from smmcl.kernels import triton_compile

    def run(*args, **kwargs):
        out = []
        triton_compile.compile_ahead(lambda: out.append(function(*args, **kwargs)))
        then()
        return out[0]
    return run


def _handed_over(pool):
    """The compilations ``pool`` (a stand-in) was handed since the last call: (kernel, arguments with the
    pointers as 'pointer', constexprs), each once; the record then cleared."""
    from triton.runtime.jit import MockTensor
    handed = {(name, tuple('pointer' if isinstance(a, MockTensor) else a for a in args), tuple(sorted(kwargs.items())))
              for _, (_, name, args, kwargs) in pool.jobs}
    pool.jobs.clear()
    return handed


@pytest.mark.filterwarnings('ignore:non-finite evaluation scores')
def test_a_prediction_compiles_the_kernels_of_each_new_size_ahead(tiny_mscan, monkeypatch, caplog):
    """``Segmenter`` (predict.py, the tools): before the first image of a size it has not met, a pass
    (smmcl/engine/ahead.py) hands over exactly what its prediction then launches (two scales, windows,
    flips: the same kernels, shapes, strides and constexprs); an image of a size met before gets none, nor
    any image past ``AHEAD_SIZES`` sizes or without the kernels. The pass leaves the random streams and the
    network as they were. A stand-in pool records the jobs; the predictions run in ahead mode (no kernel
    runs: what they compute is garbage)."""
    import numpy as np
    from conftest import refuse_kernel_launches, stand_in_compile_workers, tiny_config
    from smmcl import inference
    from smmcl.engine import ahead
    from smmcl.models import build_segmentor
    ops()
    pool = stand_in_compile_workers(monkeypatch)
    refuse_kernel_launches(monkeypatch)
    caplog.set_level('INFO', logger='smmcl.engine.ahead')
    launched, counts = [], []

    def pass_ahead(*args):
        ahead.compile_ahead_of_prediction(*args)
        counts.append(len(pool.jobs))
        launched.append(('pass', _handed_over(pool)))

    prediction = _in_ahead_mode(inference.predict_scores, lambda: launched.append(('prediction', _handed_over(pool))))
    monkeypatch.setattr(inference, 'compile_ahead_of_prediction', pass_ahead)
    monkeypatch.setattr(inference, 'predict_scores', prediction)
    cfg = tiny_config(backbone=tiny_mscan, num_classes=4, fast_path=True, triton_kernels=True,
                      eval_crop_size=(48, 64), eval_scale_array=[0.75, 1.0], eval_flip=True)
    torch.manual_seed(0)
    segmenter = inference.Segmenter(build_segmentor(cfg), cfg, DEVICE)
    segmenter.AHEAD_SIZES = 2
    weights = {k: v.clone() for k, v in segmenter.network.state_dict().items()}
    g = np.random.default_rng(0)
    for index, (height, width) in enumerate([(48, 64), (48, 64), (36, 80), (40, 40)]):
        before = _draws()
        segmenter(g.integers(0, 256, (height, width, 3), np.uint8), g.integers(0, 256, (height, width), np.uint8),
                  index=index)
        assert _draws() == before
    assert [what for what, _ in launched] == ['pass', 'prediction', 'prediction', 'pass', 'prediction', 'prediction']
    first, predicted, again, other, other_predicted, past = (handed for _, handed in launched)
    assert first and first == predicted and again == predicted and other == other_predicted and past
    assert not any('grad' in name for name, _, _ in first)
    assert all(torch.equal(v, weights[k]) for k, v in segmenter.network.state_dict().items())
    assert f'Triton kernels of the prediction of 48x64 images compiled ahead: {counts[0]} compilations' in caplog.text
    assert 'prediction of 40x40 images' not in caplog.text

    launched.clear()
    cfg.triton_kernels = False
    inference.Segmenter(build_segmentor(cfg), cfg, DEVICE)(np.zeros((48, 64, 3), np.uint8), np.zeros((48, 64), np.uint8))
    assert launched == [('pass', set()), ('prediction', set())]


def test_whole_model_casts_its_convs_parameters_once_per_group(tiny_mscan, monkeypatch):
    """One training step of the fast path under bf16 autocast, with the parameters of the convs outside
    the blocks cast by ``convs_cast_once`` (each patch embedding, stage's modulation and fusion conv, the
    two projectors and the decoder, weights and biases) and with autocast casting each: the same loss,
    gradients and running statistics bit for bit, one multi-tensor copy per group each way in place of a
    cast per parameter each way, and no group's parameter left that autocast casts; nothing cast without
    autograd. The groups ask their owner's kernels switch only (the encoder's, the decoder's); the blocks'
    kernels, whose cast the block test checks, stay off here, so that the step runs in ATen, in seconds."""
    from smmcl.engine.precision import for_training
    from smmcl.models import encoder, ham_head
    cfg, model, (rgb, x, label) = _tiny_training_model(tiny_mscan)
    cfg.update(fast_path=True, triton_kernels=False, channels_last=False)
    net = for_training(copy.deepcopy(model), cfg)
    net.backbone.fused_kernels = net.decode_head.fused_kernels = True
    results = []
    for once in (True, False):
        if not once:
            for module in (encoder, ham_head):
                monkeypatch.setattr(module, 'convs_cast_once', lambda *a: contextlib.nullcontext())
        m, ops = copy.deepcopy(net), OpCalls()
        torch.manual_seed(3)
        with ops:
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = m(rgb, x, label, return_terms=True)['loss']
            loss.backward()
        names = ops.names()
        multi = [len(args[0]) for name, args in ops.calls if name == '_foreach_copy_']
        own = {p.data_ptr(): name for name, p in m.named_parameters()}
        of_parameters = {own[args[0].data_ptr()] for name, args in ops.calls
                         if name == '_to_copy' and args[0].data_ptr() in own}
        results.append((loss.detach(), [p.grad for p in m.parameters()], list(m.buffers()),
                        names.count('_to_copy'), multi, of_parameters))
    (loss, grads, buffers, copies, multi, cast), (ref_loss, ref_grads, ref_buffers, ref_copies, ref_multi,
                                                 ref_cast) = results
    # 8 patch embeddings (the stems' two convs); 4 modulations' six convs and 3 fusion convs; the
    # projectors' six convs; the decoder's five convs (two without bias); each way
    groups = [4, 4] + [2] * 6 + [12, 14, 14, 14] + [12] + [8]
    assert sorted(multi) == sorted(2 * groups) and not ref_multi
    assert ref_copies - copies == 2 * sum(groups)
    # autocast casts no parameter of a group itself any more (the blocks', off the kernels' path, it does)
    assert cast and all(re.match(r'backbone\.block(_other)?\d\.', name) for name in cast), sorted(cast)
    assert len(ref_cast - cast) == sum(groups)
    assert torch.equal(loss, ref_loss)
    for (name, _), g, r in zip(net.named_parameters(), grads, ref_grads):
        assert (g is None) == (r is None) and (g is None or (g.dtype == r.dtype and torch.equal(g, r))), name
    for b, r in zip(buffers, ref_buffers):
        assert torch.equal(b, r)

    monkeypatch.undo()
    with OpCalls() as ops, torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        net(rgb, x)
    assert '_foreach_copy_' not in ops.names()  # inference stores these in bf16 (cast_dense_layers)


def test_training_graphs_with_the_group_casts_compute_the_eager_run(tiny_mscan):
    """The recorded training step (``graph_module`` through the stand-in recorder) with the convs' group
    casts under bf16 autocast: two AdamW steps give the eager run's losses and parameters, so the
    gradients reach the parameters through the recorded backward and the casts' widening, and the
    parameters are the modules' own again after each step. (Setup as in the group cast test above.)"""
    from smmcl.engine.graphs import EagerRecorder, use_training_graphs
    from smmcl.engine.precision import for_training
    from smmcl.models import build_segmentor
    cfg, _, (rgb, x, label) = _tiny_training_model(tiny_mscan)
    # few anchor slots: the recorded losses compute InfoNCE over all max_features_total of them
    cfg.update(fast_path=True, triton_kernels=False, channels_last=False, max_features_total=240)
    torch.manual_seed(0)
    model = build_segmentor(cfg, with_loss=True).to(DEVICE).train()
    runs = []
    for graphed in (False, True):
        net = for_training(copy.deepcopy(model), cfg)
        net.backbone.fused_kernels = net.decode_head.fused_kernels = True
        if graphed:
            use_training_graphs(net, True, recorder=EagerRecorder)
        own = list(net.parameters())
        optimizer = torch.optim.AdamW(own, lr=1e-3)
        losses, ops = [], OpCalls()
        for step in range(2):
            torch.manual_seed(100 + step)
            # the second step's operators only (a record keeps every argument alive): a replay of the graphs
            with ops if step else contextlib.nullcontext(), torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = net(rgb, x, label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().clone())  # a replay's output is its static tensor, written again
            assert all(isinstance(p, nn.Parameter) for p in net.parameters())
            assert all(a is b for a, b in zip(net.parameters(), own))
        assert '_foreach_copy_' in ops.names()
        runs.append((torch.stack(losses), [p.detach().clone() for p in own]))
    (want, want_params), (got, got_params) = runs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    for a, b in zip(got_params, want_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_tile_sweep_candidates():
    """SMMCL_TRITON_SWEEP's candidates: each listed tile and its neighbours (a pixel size or the warps
    doubled or halved, BLOCK_C kept, at most 4096 elements), once each."""
    from smmcl.kernels.triton_common import neighbours
    got = neighbours((1, 8, 32, 4))
    assert got[0] == (1, 8, 32, 4) and len(got) == len(set(got)) == 7
    assert {(1, 16, 32, 4), (1, 4, 32, 4), (1, 8, 64, 4), (1, 8, 16, 4), (1, 8, 32, 8), (1, 8, 32, 2)} <= set(got)
    assert all(t[0] == 1 for t in got)
    assert (32, 8, 32, 4) not in neighbours((32, 4, 32, 4))  # 8192 elements
