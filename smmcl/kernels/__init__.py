"""Fused Triton kernels for MSCAN's depthwise convolutions (fast on the GPU, the same function).

Off by default: ``fast_path=True`` and ``triton_kernels=True`` together switch them on
(``smmcl.models.mscan.use_fused_kernels``). H100 run (MSCAN-B, batch 8, 480x640,
``bench/gpu_check.py``, docs/speed.md): the forward kernels beat PyTorch's (inference 157 vs 80
img/s on the fast path), the backward ones do not (training 20.0 vs 21.7 img/s), so the switch stays
off by default and is recommended for inference and evaluation. Custom ops, with their backward
where training needs one (:mod:`smmcl.kernels.ops`), computing the same function as the PyTorch layers
and operators they replace:

- ``smmcl::dwconv2d``: depthwise KxK / 1xK / Kx1 conv with bias (MSCAN's 5x5 attention conv);
- ``smmcl::mscan_strip_sum``: ``a + sum_k convKx1(conv1xK(a))`` for the attention's three strip pairs;
- ``smmcl::dwconv2d_gelu``: the MLP's 3x3 depthwise conv followed by the exact (erf) GELU, fc1's bias
  added as the conv loads fc1's output (its bias add and bias gradient need no pass of their own);
- ``smmcl::add_channel_bias``: a 1x1 conv's bias add (the blocks' ``PointwiseConv``), one vectorised
  pass where ATen's broadcast add is not, and its backward's bias gradient one column sum;
  ``smmcl::add_channel_bias_gelu`` and ``smmcl::add_channel_bias_gate``: the same with the one op that
  follows proj_1 (the exact GELU) and the attention's conv3 (the product with the gate) in its pass,
  forward and backward;
- ``smmcl::bmm_tf32x3``: the decoder's NMF's float32 batched products at float32's accuracy on the tensor
  cores (three TF32 products, :mod:`smmcl.kernels.triton_matmul`; ``SMMCL_TRITON_BMM``: ``triton``,
  ``torch`` = ``torch.bmm``, or ``auto``, the default: the faster per shape, timed once on the GPU);
  ``smmcl::nmf_update`` and ``smmcl::nmf_update_grad``: the element-wise steps of each of its
  multiplicative updates and of their backward by hand, one pass each where ATen takes three launches;
- ``smmcl::scaled_residual``: a block tail ``x + y * f`` (layer scale, drop path), one pass forward and
  one Triton pass backward where autocast's ``addcmul`` takes six, with the bias of the conv that made y
  (fc2's) in the same passes; ``smmcl::shortcut_residual`` the same with the branch's own shortcut too
  (the attention's ``proj_2(...) + x``); in training each also sums, in its forward pass, the statistics
  of the BatchNorm that reads its output next, which then does not read it back;
- ``smmcl::batch_norm_stats`` and ``smmcl::batch_norm_apply`` (training under autocast): a block's
  BatchNorm writing its output and the next conv's bf16 copy in one pass, its backward reading both
  outputs' gradients as they are (autocast: a cast, its backward and a sum, each a pass of its own);
- ``smmcl::residual_pair`` (inference): a folded block's residual add writing the float32 stream and its
  copy in the autocast dtype, which the next 1x1 conv reads;
- ``smmcl::modulation``: the cross-modal modulation's two outputs in one pass (for the encoder in the
  dtype of the convs that read them, as the maps and as their concat), its backward one pass with the
  gate's sums; ``smmcl::modulation_inputs``: the coefficient MLPs' inputs, the bf16 concat and the
  channels' means, maxima and the maxima's counts, one pass per modality; ``smmcl::pooled_input_grad``:
  each modality's gradient from the tails, its half of the concat and the pooled means and maxima, summed
  in one pass (:mod:`smmcl.kernels.triton_channel` for
  these and the eight above: ``SMMCL_TRITON_CHANNEL``: ``triton``, ``torch`` = ATen's operators, or
  ``auto``, the default: the faster per op and shape, timed once on the GPU).

Their backward computes input gradients with Triton; weight and bias gradients with one of six
implementations (``SMMCL_TRITON_WGRAD``: ``gather``, ``taps``, ``rows`` = bands of rows walked once, one
accumulator per tap, ``bands`` = in NCHW tensor-core products per kernel row, ``torch`` = PyTorch's own,
``fused`` = for ``dwconv2d`` and ``dwconv2d_gelu`` in the backward pass that writes the conv's gradient, or
``auto``, the default: the fastest for each shape, timed once on the GPU; the interpreter runs ``fused``).
The strip pairs' six weight gradients
are computed per direction in one launch (``SMMCL_TRITON_STRIP_WGRAD``: ``fused``, ``rows`` = the row-walked
kernel, ``bands`` = along W in NCHW the band kernel's tensor-core products, ``separate`` = three
``dwconv_wgrad`` calls, or ``auto``, the default: the fastest per shape, timed once on the GPU; not yet
timed). Each op runs on one of three kernel families (``SMMCL_TRITON_DEPTHWISE``: ``tiles``, ``rows`` =
:mod:`smmcl.kernels.triton_rows`, each input row read once per tap column, ``bands`` =
:mod:`smmcl.kernels.triton_bands` for the strips along W in NCHW, each row times a band matrix of the taps on
the tensor cores (the other launches then run ``rows``), or ``auto``, the default: the fastest per shape,
timed once on the GPU).

Triton is a development dependency only: this package imports it lazily, training never needs it,
and asking for the kernels without it stops with one message. The kernels run on CUDA tensors; on
the CPU only under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is first imported;
the tests do this), elsewhere the modules keep their ``nn.Conv2d`` path.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import target


def available() -> bool:
    """Whether Triton is installed."""
    return importlib.util.find_spec('triton') is not None


def interpreted() -> bool:
    """Whether Triton's CPU interpreter is requested (it must be, before the kernels are imported)."""
    return os.environ.get('TRITON_INTERPRET') == '1'


def runs_on(x: torch.Tensor) -> bool:
    """Whether the kernels can take ``x``: a CUDA tensor, or a CPU tensor under the interpreter or while
    compiling for a GPU (:data:`smmcl.kernels.target.COMPILING_FOR`)."""
    return x.is_cuda or (x.device.type == 'cpu' and (interpreted() or target.COMPILING_FOR is not None))


def require() -> None:
    """Stop with one clear message when the kernels are asked for and cannot run."""
    if not available():
        raise RuntimeError(
            'triton_kernels=True needs Triton, which is not installed: `pip install triton` (it is in '
            'requirements-dev.txt; PyTorch\'s CUDA wheels bring it), or set triton_kernels=False')
    if not hasattr(torch.library, 'custom_op'):
        raise RuntimeError(f'triton_kernels=True needs PyTorch >= 2.4 (torch.library.custom_op); this is '
                           f'{torch.__version__}: upgrade it, or set triton_kernels=False')


def load_ops():
    """The custom-op module (imports Triton on first call)."""
    require()
    from . import ops as _ops
    return _ops


def strip_sum_reference(a: torch.Tensor, params) -> torch.Tensor:
    """What ``smmcl::mscan_strip_sum`` computes, with PyTorch's convolutions (the plain path's function;
    the reference of the kernel tests and of ``bench/gpu_check.py``).

    Args:
        a: N-C-H-W, the attention's 5x5 output.
        params: ``[wh0, bh0, wv0, bv0, wh1, ...]``: per strip pair a C-1-1-K horizontal weight, its bias
            C, a C-1-K-1 vertical weight and its bias C.
    Returns:
        N-C-H-W ``a + sum_i convKx1(conv1xK(a))``.
    """
    import torch.nn.functional as F
    out, channels = a, a.shape[1]
    for i in range(len(params) // 4):
        wh, bh, wv, bv = params[4 * i:4 * i + 4]
        k = wh.shape[-1]
        out = out + F.conv2d(F.conv2d(a, wh, bh, padding=(0, k // 2), groups=channels), wv, bv,
                             padding=(k // 2, 0), groups=channels)
    return out
