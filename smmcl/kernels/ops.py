"""The Triton kernels as PyTorch custom ops with their backward.

Registered with ``torch.library.custom_op`` (fake implementations for shape propagation, autograd
through ``register_autograd``), so autograd sees one node per op and ``torch.compile`` traces through
them without a graph break. Backward passes are custom ops too.

Memory: like PyTorch, each op keeps its input for the backward; unlike the unfused layers it keeps
nothing else. ``mscan_strip_sum`` recomputes the three horizontal strip outputs in its backward
(the plain path stores them), and ``dwconv2d_gelu`` recomputes the pre-GELU map (the plain path
stores it: one hidden-width map per MLP); with fc1's bias as its ``in_bias`` it keeps fc1's output
without the bias (the plain path: with it, the same size). ``add_channel_bias`` keeps only the bias
(its backward sums the gradient per channel), ``add_channel_bias_gelu`` the conv's output without its
bias (the plain path: the GELU's input, the same size), ``add_channel_bias_gate`` that and the gate
(the plain path: the product's two factors), ``scaled_residual`` the branch and the factor, as
``addcmul`` does (with the bias of the conv that made the branch, the branch without it: the same size);
``shortcut_residual`` its branch, the sum with the shortcut, as the unfused ops keep it for ``addcmul``;
``batch_norm_apply`` its input and the statistics, as ``native_batch_norm`` does; ``modulation`` its
four inputs, where the unfused ops keep both maps and the gate.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import triton_dwconv as K
from . import triton_channel as CH
from . import triton_matmul as MM


def _like(x: Tensor) -> Tensor:
    """An empty tensor shaped, typed and laid out as the kernels' output for input ``x``."""
    return torch.empty_like(x, memory_format=K._layout(x))


def _grad_like(weight: Tensor) -> Tensor:
    """Weight and bias gradients come back contiguous whatever the parameter's strides (a C-1-K-K
    weight in channels_last has other strides for its size-1 dim)."""
    return weight.new_empty(weight.shape)


# ---- depthwise conv -------------------------------------------------------------------------------

@torch.library.custom_op('smmcl::dwconv2d', mutates_args=())
def dwconv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Depthwise conv, stride 1, "same" padding: x N-C-H-W, weight C-1-KH-KW (odd), bias C or None."""
    return K.dwconv(x, weight, bias)


@dwconv2d.register_fake
def _(x, weight, bias):
    return _like(x)


@torch.library.custom_op('smmcl::dwconv2d_backward', mutates_args=())
def dwconv2d_backward(grad: Tensor, x: Tensor, weight: Tensor,
                      addend: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad x, grad weight, grad bias) of :func:`dwconv2d` (:func:`triton_dwconv.dwconv_backward`: the
    weight gradients in the adjoint conv's pass, or in a pass of their own, ``SMMCL_TRITON_WGRAD``); grad x
    plus ``addend`` (x's gradient from another use, or None) as autograd would add them."""
    return K.dwconv_backward(grad, x, weight, addend=addend)


@dwconv2d_backward.register_fake
def _(grad, x, weight, addend=None):
    return _like(grad), _grad_like(weight), weight.new_empty(weight.shape[0])


def _save_input_and_weight(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.has_bias = bias is not None


def _dwconv2d_grad(ctx, grad):
    x, weight, _ = ctx.saved_tensors
    dx, dw, db = dwconv2d_backward(grad, x, weight)
    return dx, dw, db if ctx.has_bias else None


dwconv2d.register_autograd(_dwconv2d_grad, setup_context=_save_input_and_weight)


class DepthwiseStream(torch.autograd.Function):
    """:func:`dwconv2d` that also hands x on, as a view: (out, stream). The attention's input feeds its 5x5
    conv and its gate; autograd would add the two gradients in a pass of its own, which here the conv's
    backward adds in the pass that writes x's gradient, the gate's arriving as that of the view (the gate
    reads the view, not x). Not for ``torch.compile`` (the attention keeps :func:`dwconv2d` there)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return dwconv2d(x, weight, bias), x

    @staticmethod
    def backward(ctx, grad, grad_pass):
        x, weight = ctx.saved_tensors
        if grad is None:
            return grad_pass, None, None
        dx, dw, db = dwconv2d_backward(grad, x, weight, grad_pass)
        return dx, dw, db if ctx.has_bias else None


# ---- depthwise conv + exact GELU (the MLP), fc1's bias added as the input is loaded ---------------------

@torch.library.custom_op('smmcl::dwconv2d_gelu', mutates_args=())
def dwconv2d_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_bias: Optional[Tensor] = None) -> Tensor:
    """``GELU(dwconv2d(x + in_bias, weight, bias))`` with the exact (erf) GELU of ``nn.GELU()``.

    ``in_bias`` (C, or None): the bias of the 1x1 conv that made x (the MLP's fc1), added inside the map as
    x is loaded and rounded to x's dtype as that conv's bias add stores it (:func:`triton_dwconv.dwconv`):
    the same values without the bias add's pass over the hidden map, and none for its gradient either."""
    return K.dwconv(x, weight, bias, epilogue=1, in_bias=in_bias)


@dwconv2d_gelu.register_fake
def _(x, weight, bias, in_bias=None):
    return _like(x)


@torch.library.custom_op('smmcl::dwconv2d_gelu_backward', mutates_args=())
def dwconv2d_gelu_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                           in_bias: Optional[Tensor] = None) -> List[Tensor]:
    """[grad x, grad weight, grad bias] of :func:`dwconv2d_gelu`, and grad in_bias when it is given; the
    pre-GELU map is recomputed (:func:`triton_dwconv.dwconv_gelu_backward`: the weight gradients in the
    pass that writes the GELU's input gradient, or in a pass of their own, ``SMMCL_TRITON_WGRAD``)."""
    return K.dwconv_gelu_backward(grad, x, weight, bias, in_bias)


@dwconv2d_gelu_backward.register_fake
def _(grad, x, weight, bias, in_bias=None):
    out = [_like(x), _grad_like(weight), weight.new_empty(weight.shape[0])]
    return out if in_bias is None else out + [in_bias.new_empty(in_bias.shape)]


def _save_gelu_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.has_bias, ctx.has_in_bias = inputs[2] is not None, inputs[3] is not None


def _dwconv2d_gelu_grad(ctx, grad):
    x, weight, bias, in_bias = ctx.saved_tensors
    dx, dw, db, *d_in_bias = dwconv2d_gelu_backward(grad, x, weight, bias, in_bias)
    return dx, dw, db if ctx.has_bias else None, d_in_bias[0] if ctx.has_in_bias else None


dwconv2d_gelu.register_autograd(_dwconv2d_gelu_grad, setup_context=_save_gelu_inputs)


# ---- MSCAN attention: a + three strip pairs -------------------------------------------------------

@torch.library.custom_op('smmcl::mscan_strip_sum', mutates_args=())
def mscan_strip_sum(a: Tensor, wh0: Tensor, bh0: Tensor, wv0: Tensor, bv0: Tensor,
                    wh1: Tensor, bh1: Tensor, wv1: Tensor, bv1: Tensor,
                    wh2: Tensor, bh2: Tensor, wv2: Tensor, bv2: Tensor) -> Tensor:
    """``a + sum_i conv(conv(a, wh_i) + bh_i, wv_i) + bv_i``: the sum in SegNeXt's attention.

    a: N-C-H-W (the 5x5 conv's output); wh_i: C-1-1-K_i (horizontal), wv_i: C-1-K_i-1 (vertical),
    K_0 <= K_1 <= K_2 odd (7, 11, 21 in MSCAN); biases C. Two kernels: the three horizontal convs in
    one pass over ``a``, then ``a`` plus the three vertical convs in one pass.
    """
    t = K.strip3(a, (wh0, wh1, wh2), (bh0, bh1, bh2), along_w=True)
    return K.strip3_sum(a, t, (wv0, wv1, wv2), (bv0, bv1, bv2), along_w=False)


@mscan_strip_sum.register_fake
def _(a, wh0, bh0, wv0, bv0, wh1, bh1, wv1, bv1, wh2, bh2, wv2, bv2):
    return _like(a)


@torch.library.custom_op('smmcl::mscan_strip_sum_backward', mutates_args=())
def mscan_strip_sum_backward(grad: Tensor, a: Tensor, wh0: Tensor, bh0: Tensor, wv0: Tensor,
                             wh1: Tensor, bh1: Tensor, wv1: Tensor,
                             wh2: Tensor, bh2: Tensor, wv2: Tensor) -> List[Tensor]:
    """[grad a, packed grads of (wh_i, bh_i), packed grads of (wv_i, bv_i)] of :func:`mscan_strip_sum`.

    grad a: N-C-H-W in a's memory format. The weight and bias gradients come as two float32 vectors
    (``K.strip3_wgrad_packed``, one per direction; custom-op outputs may not share storage, so they are
    not split here): :func:`_strip_grad` unpacks them into the parameters' shapes and dtypes.
    ``SMMCL_TRITON_STRIP_WGRAD`` picks one launch per direction or three ``dwconv_wgrad`` calls.
    """
    # One memory format for every launch below, so that no launcher converts a tensor again
    # (a grad in another format than a would otherwise be copied once per weight gradient).
    grad, = K._same_layout(K._layout(a), grad)
    horizontal, vertical = (wh0, wh1, wh2), (wv0, wv1, wv2)
    grad_t = K.strip3(grad, vertical, None, along_w=False, transpose=True)
    grad_a = K.strip3_sum(grad, grad_t, horizontal, None, along_w=True, transpose=True)
    t = K.strip3(a, horizontal, (bh0, bh1, bh2), along_w=True)  # recomputed, not stored
    return [grad_a,
            K.strip3_wgrad_packed(grad_t, (a, a, a), horizontal, along_w=True),
            K.strip3_wgrad_packed((grad, grad, grad), t, vertical, along_w=False)]


@mscan_strip_sum_backward.register_fake
def _(grad, a, wh0, bh0, wv0, wh1, bh1, wv1, wh2, bh2, wv2):
    channels = a.shape[1]
    lengths_h = (wh0.shape[-1], wh1.shape[-1], wh2.shape[-1])
    lengths_v = (wv0.shape[-2], wv1.shape[-2], wv2.shape[-2])
    return [_like(a)] + [a.new_empty(K.packed_strip_wgrad_length(channels, lengths), dtype=torch.float32)
                         for lengths in (lengths_h, lengths_v)]


def _strip_setup(ctx, inputs, output):
    a, wh0, bh0, wv0, _, wh1, bh1, wv1, _, wh2, bh2, wv2, _ = inputs
    ctx.save_for_backward(a, wh0, bh0, wv0, wh1, bh1, wv1, wh2, bh2, wv2)


def _strip_grad(ctx, grad):
    a, wh0, bh0, wv0, wh1, bh1, wv1, wh2, bh2, wv2 = ctx.saved_tensors
    grad_a, packed_h, packed_v = mscan_strip_sum_backward(grad, *ctx.saved_tensors)
    out = [grad_a]
    for (dwh, dbh), (dwv, dbv) in zip(K.unpack_strip3_wgrad(packed_h, (wh0, wh1, wh2)),
                                      K.unpack_strip3_wgrad(packed_v, (wv0, wv1, wv2))):
        out += [dwh, dbh, dwv, dbv]
    return tuple(out)


mscan_strip_sum.register_autograd(_strip_grad, setup_context=_strip_setup)


# ---- a convolution's bias add, forward and backward as one Triton pass each ---------------------------

@torch.library.custom_op('smmcl::add_channel_bias', mutates_args=())
def add_channel_bias(y: Tensor, bias: Tensor) -> Tensor:
    """``y + bias`` per channel: y N-C-H-W (a conv's output without its bias), bias C, rounded to y's dtype
    first as autocast rounds a conv's bias; in y's dtype and memory format."""
    return CH.bias_add(y, bias)


@add_channel_bias.register_fake
def _(y, bias):
    return _like(y)


@torch.library.custom_op('smmcl::channel_bias_grad', mutates_args=())
def channel_bias_grad(grad: Tensor, bias: Tensor) -> Tensor:
    """The gradient of :func:`add_channel_bias`'s ``bias``: ``grad`` summed per channel, in bias's dtype."""
    return CH.bias_grad(grad, bias)


@channel_bias_grad.register_fake
def _(grad, bias):
    return bias.new_empty(bias.shape)


def _save_bias(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _add_channel_bias_grad(ctx, grad):
    bias, = ctx.saved_tensors
    return grad, channel_bias_grad(grad, bias) if ctx.needs_input_grad[1] else None


add_channel_bias.register_autograd(_add_channel_bias_grad, setup_context=_save_bias)


# ---- a convolution's bias add with the one op that follows it: GELU (proj_1), the gate (conv3) ---------

@torch.library.custom_op('smmcl::add_channel_bias_gelu', mutates_args=())
def add_channel_bias_gelu(y: Tensor, bias: Tensor) -> Tensor:
    """The exact ``GELU(add_channel_bias(y, bias))`` in one pass (:func:`triton_channel.bias_add`), y's
    dtype and memory format; its backward is one pass too, recomputing the biased map from y."""
    return CH.bias_add(y, bias, epilogue='gelu')


@add_channel_bias_gelu.register_fake
def _(y, bias):
    return _like(y)


@torch.library.custom_op('smmcl::add_channel_bias_gelu_backward', mutates_args=())
def add_channel_bias_gelu_backward(grad: Tensor, y: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    """(grad y, grad bias) of :func:`add_channel_bias_gelu`."""
    gy, _, gb = CH.bias_epilogue_grad(grad, y, bias, 'gelu')
    return gy, gb


@add_channel_bias_gelu_backward.register_fake
def _(grad, y, bias):
    return _like(y), bias.new_empty(bias.shape)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _add_channel_bias_gelu_grad(ctx, grad):
    gy, gb = add_channel_bias_gelu_backward(grad, *ctx.saved_tensors)
    return gy, gb if ctx.needs_input_grad[1] else None


add_channel_bias_gelu.register_autograd(_add_channel_bias_gelu_grad, setup_context=_save_inputs)


def _gated_like(y: Tensor, gate: Tensor) -> Tensor:
    return torch.empty_like(y, dtype=torch.promote_types(y.dtype, gate.dtype), memory_format=K._layout(y))


@torch.library.custom_op('smmcl::add_channel_bias_gate', mutates_args=())
def add_channel_bias_gate(y: Tensor, bias: Tensor, gate: Tensor) -> Tensor:
    """``add_channel_bias(y, bias) * gate`` in one pass (:func:`triton_channel.bias_add`): gate N-C-H-W as
    y; in the promoted dtype and y's memory format; its backward is one pass too."""
    return CH.bias_add(y, bias, epilogue='gate', gate=gate)


@add_channel_bias_gate.register_fake
def _(y, bias, gate):
    return _gated_like(y, gate)


@torch.library.custom_op('smmcl::add_channel_bias_gate_backward', mutates_args=())
def add_channel_bias_gate_backward(grad: Tensor, y: Tensor, bias: Tensor,
                                  gate: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad y, grad bias, grad gate) of :func:`add_channel_bias_gate`."""
    gy, gu, gb = CH.bias_epilogue_grad(grad, y, bias, 'gate', gate=gate)
    return gy, gb, gu


@add_channel_bias_gate_backward.register_fake
def _(grad, y, bias, gate):
    return _like(y), bias.new_empty(bias.shape), torch.empty_like(y, dtype=gate.dtype, memory_format=K._layout(y))


def _add_channel_bias_gate_grad(ctx, grad):
    gy, gb, gu = add_channel_bias_gate_backward(grad, *ctx.saved_tensors)
    return gy, gb if ctx.needs_input_grad[1] else None, gu


add_channel_bias_gate.register_autograd(_add_channel_bias_gate_grad, setup_context=_save_inputs)


# ---- a residual branch with a per-channel scale: x + v * f, v = y (+ bias) (+ shortcut) ------------------

def _residual_like(x: Tensor, y: Tensor, factor: Tensor, keep: Optional[Tensor],
                   shortcut: Optional[Tensor] = None) -> Tensor:
    return torch.empty_like(x, dtype=CH.sum_dtype(x, y, factor, keep, shortcut), memory_format=K._layout(x))


def _partials(partials: Optional[Tensor], x: Tensor) -> Tensor:
    """A tail's BatchNorm partials, or none as 0 x C (an op's output cannot be None)."""
    return x.new_empty(0, x.shape[1], dtype=torch.float32) if partials is None else partials


def _partials_like(x: Tensor, stats: bool) -> Tensor:
    # their rows follow the device's programs (and 0 where the tail ran ATen's passes): a size known when it runs
    rows = torch.library.get_ctx().new_dynamic_size() if stats else 0
    return x.new_empty(rows, x.shape[1], dtype=torch.float32)


@torch.library.custom_op('smmcl::scaled_residual', mutates_args=())
def scaled_residual(x: Tensor, y: Tensor, factor: Tensor, bias: Optional[Tensor] = None, stats: bool = False,
                    keep: Optional[Tensor] = None, keep_prob: float = 1.0) -> Tuple[Tensor, Tensor]:
    """(``x + v * f``, partials): x, y N-C-H-W (x the residual stream, y the branch; any float dtypes), v = y,
    plus ``bias`` (C or None: that of the conv that made y, as ``add_channel_bias`` adds it), f the C-1-1
    factor, with ``keep`` (drop path's N-1-1-1 mask as drawn, or None) times ``keep / keep_prob`` per image;
    in the promoted dtype (float32 for the fast path's stream) and x's layout. One pass
    (:func:`triton_channel.scaled_residual`), y converted as it is read (autocast's ``addcmul`` first
    copies a bf16 y to float32: the same values); the backward is one pass too
    (:func:`triton_channel.scaled_residual_grad`), adding the bias again. With ``stats``, the partials of
    the sum's BatchNorm statistics for :func:`batch_norm_stats` (K x C float32, K = 0 where the tail ran
    ATen's passes, which sum none); else 0 x C. They take no gradient, nor does the mask."""
    out, _, partials = CH.scaled_residual(x, y, factor, bias, stats=stats, keep=keep, keep_prob=keep_prob)
    return out, _partials(partials, x)


@scaled_residual.register_fake
def _(x, y, factor, bias=None, stats=False, keep=None, keep_prob=1.0):
    return _residual_like(x, y, factor, keep), _partials_like(x, stats)


@torch.library.custom_op('smmcl::shortcut_residual', mutates_args=())
def shortcut_residual(x: Tensor, y: Tensor, factor: Tensor, bias: Optional[Tensor], shortcut: Tensor,
                      stats: bool = False, keep: Optional[Tensor] = None,
                      keep_prob: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """(``x + v * f``, v, partials) as :func:`scaled_residual`, with the branch's own shortcut in v: ``v =
    y (+ bias) + shortcut`` (N-C-H-W, a dtype at least as wide as y's: the attention's ``proj_2(...) + x``,
    x its input). v (the shortcut's dtype) is for the backward, which keeps it as the unfused ops keep the
    float32 sum for ``addcmul``; it takes no gradient."""
    out, v, partials = CH.scaled_residual(x, y, factor, bias, shortcut, stats=stats, keep=keep, keep_prob=keep_prob)
    return out, v, _partials(partials, x)


@shortcut_residual.register_fake
def _(x, y, factor, bias, shortcut, stats=False, keep=None, keep_prob=1.0):
    return _residual_like(x, y, factor, keep, shortcut), _like(shortcut), _partials_like(x, stats)


@torch.library.custom_op('smmcl::scaled_residual_backward', mutates_args=())
def scaled_residual_backward(grad: Tensor, branch: Tensor, factor: Tensor, bias: Optional[Tensor] = None,
                             y_dtype: Optional[torch.dtype] = None, keep: Optional[Tensor] = None,
                             keep_prob: float = 1.0) -> List[Tensor]:
    """[grad y, grad factor], then grad bias with a bias, then grad shortcut with ``y_dtype`` (y's dtype:
    ``branch`` is :func:`shortcut_residual`'s v; without it, y as given to :func:`scaled_residual`)."""
    return [g for g in CH.scaled_residual_grad(grad, branch, factor, bias, y_dtype, keep=keep, keep_prob=keep_prob)
            if g is not None]


@scaled_residual_backward.register_fake
def _(grad, branch, factor, bias=None, y_dtype=None, keep=None, keep_prob=1.0):
    return ([torch.empty_like(branch, dtype=y_dtype or branch.dtype, memory_format=K._layout(branch)),
             factor.new_empty(factor.shape)] + ([] if bias is None else [bias.new_empty(bias.shape)])
            + ([] if y_dtype is None else [_like(branch)]))


def _residual_grads(ctx, grad, branch, y_dtype):
    """grad x, y, factor, bias and (with ``y_dtype``) the shortcut, from the saved branch; None for the
    statistics' flag, the keep mask and its probability."""
    factor, bias, keep = ctx.saved_tensors[1:]
    # laid out as the op reads it here, once: x's gradient, handed on to the norm's backward, is then in
    # place there too (a stage's last block gets it from the stage's LayerNorm in channels_last strides)
    grad = grad.contiguous(memory_format=K._layout(branch))
    grads = iter(scaled_residual_backward(grad, branch, factor, bias, y_dtype, keep, ctx.keep_prob))
    grad_y, grad_factor = next(grads), next(grads)
    return ((grad.to(ctx.x_dtype), grad_y, grad_factor) + ((None if bias is None else next(grads)),) + tuple(grads)
            + (None, None, None))


def _save_tail(ctx, inputs, saved_branch):
    x, y, factor, bias = inputs[:4]
    keep, keep_prob = inputs[-2:]  # both tail ops' last two arguments
    ctx.save_for_backward(saved_branch, factor, bias, keep)
    ctx.x_dtype, ctx.y_dtype, ctx.keep_prob = x.dtype, y.dtype, keep_prob


def _save_branch(ctx, inputs, output):
    _save_tail(ctx, inputs, inputs[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # the partials take no gradient: no zeros made for them


def _scaled_residual_grad(ctx, grad, _):
    return _residual_grads(ctx, grad, ctx.saved_tensors[0], None)


scaled_residual.register_autograd(_scaled_residual_grad, setup_context=_save_branch)


def _save_sum(ctx, inputs, output):
    _save_tail(ctx, inputs, output[1])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # the branch takes no gradient: no map of zeros made for it


def _shortcut_residual_grad(ctx, grad, *_):
    return _residual_grads(ctx, grad, ctx.saved_tensors[0], ctx.y_dtype)


shortcut_residual.register_autograd(_shortcut_residual_grad, setup_context=_save_sum)


# ---- a block's BatchNorm in training, writing the next conv's copy in the same pass ---------------------------

# No defaults on the last two arguments: torch 2.11's custom ops (the GPU image's) look a mutated argument up
# among the positional arguments given, so a call that omits ``num_batches_tracked`` raises an IndexError there.
@torch.library.custom_op('smmcl::batch_norm_stats', mutates_args=('running_mean', 'running_var', 'num_batches_tracked'))
def batch_norm_stats(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                     momentum: float, eps: float, partials: Optional[Tensor],
                     num_batches_tracked: Optional[Tensor]) -> Tensor:
    """A training-mode batch normalisation's statistics of N-C-H-W x (running ones updated in place, and
    ``num_batches_tracked`` counted up where not None, as the module counts its batches): 4 x C
    float32 (mean, invstd, weight * invstd, bias; :func:`triton_channel.batch_norm_stats`), from
    ``partials`` where given with rows (those of x from the tail that wrote it: x is not read). No
    autograd: :func:`batch_norm_apply`'s backward is the whole batch norm's, through these statistics
    too."""
    partials = partials if partials is not None and partials.shape[0] else None
    return CH.batch_norm_stats(x, weight, bias, running_mean, running_var, momentum, eps, partials=partials,
                               num_batches_tracked=num_batches_tracked)


@batch_norm_stats.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps, partials, num_batches_tracked):
    return x.new_empty(4, x.shape[1], dtype=torch.float32)


@torch.library.custom_op('smmcl::batch_norm_apply', mutates_args=())
def batch_norm_apply(x: Tensor, weight: Tensor, bias: Tensor, coef: Tensor, low_dtype: torch.dtype,
                     full: bool) -> Tuple[Tensor, Tensor]:
    """The training-mode batch norm of x with the statistics of x in ``coef`` (from :func:`batch_norm_stats`
    on x; weight and bias as given there) in ``low_dtype`` (the next conv's under autocast) and, with
    ``full``, in x's dtype (else an empty tensor), in one pass. Its backward is the batch norm's with
    respect to x, weight and bias, the statistics' dependence on x included (so coef takes no gradient)."""
    low, out = CH.batch_norm_apply(x, coef, low_dtype, full)
    return low, x.new_empty(0) if out is None else out


@batch_norm_apply.register_fake
def _(x, weight, bias, coef, low_dtype, full):
    return torch.empty_like(x, dtype=low_dtype, memory_format=K._layout(x)), _like(x) if full else x.new_empty(0)


@torch.library.custom_op('smmcl::batch_norm_backward', mutates_args=())
def batch_norm_backward(grad_low: Optional[Tensor], grad_full: Optional[Tensor], x: Tensor, weight: Tensor,
                        coef: Tensor, grad_pass: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad x, grad weight, grad bias) of :func:`batch_norm_apply` for its two outputs' gradients (either may
    be None), summed as they are read; ``grad_pass`` (or None) added to x's in the same pass."""
    return CH.batch_norm_grad(grad_low, grad_full, x, weight, coef[0], coef[1], grad_pass)


@batch_norm_backward.register_fake
def _(grad_low, grad_full, x, weight, coef, grad_pass=None):
    return _like(x), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _save_norm(ctx, inputs, output):
    x, weight, _, coef = inputs[:4]
    ctx.save_for_backward(x, weight, coef)
    ctx.set_materialize_grads(False)  # an output the caller does not use takes no gradient: no map of zeros


def _norm_grads(ctx, grad_low, grad_full, grad_pass=None):
    """(grad x, grad weight, grad bias) from the saved x, weight and coef, for the outputs' gradients."""
    x, weight, coef = ctx.saved_tensors
    if grad_full is not None and grad_full.shape != x.shape:  # the empty stand-in output when not ``full``
        grad_full = None
    if grad_low is None and grad_full is None:
        return grad_pass, None, None
    return batch_norm_backward(grad_low, grad_full, x, weight, coef, grad_pass)


def _batch_norm_grad(ctx, grad_low, grad_full):
    return (*_norm_grads(ctx, grad_low, grad_full), None, None, None)


batch_norm_apply.register_autograd(_batch_norm_grad, setup_context=_save_norm)


class BatchNormStream(torch.autograd.Function):
    """:func:`batch_norm_apply` that also hands x on, as a view: (low, full, stream). A block's stream x
    feeds its BatchNorm and its residual shortcut; autograd would add the two gradients in a pass of its
    own, which here the batch norm's backward does in its last pass instead, the stream's gradient
    arriving as that of the view (the residual tail reads the view, not x). Not for ``torch.compile``
    (the blocks keep ATen's operators there)."""

    @staticmethod
    def forward(ctx, x, weight, bias, coef, low_dtype, full):
        low, out = batch_norm_apply(x, weight, bias, coef, low_dtype, full)
        ctx.save_for_backward(x, weight, coef)
        ctx.set_materialize_grads(False)
        return low, out, x

    @staticmethod
    def backward(ctx, grad_low, grad_full, grad_pass):
        return (*_norm_grads(ctx, grad_low, grad_full, grad_pass), None, None, None)


# ---- inference: a residual stream and the copy its next conv reads, in one pass ------------------------

@torch.library.custom_op('smmcl::residual_pair', mutates_args=())
def residual_pair(a: Tensor, b: Tensor, factor: Optional[Tensor],
                  bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(``a + b * factor`` or ``a + b``, the same rounded to a's dtype): the folded blocks' stream (float32
    under autocast) and its bf16 copy for the next 1x1 conv, which autocast would make in a pass of its
    own (:func:`triton_channel.residual_pair`); ``bias`` (C or None): that of the 1x1 conv that made a,
    added to a first as ``add_channel_bias`` would, in the same pass. Inference only: no backward."""
    return CH.residual_pair(a, b, factor, bias)


@residual_pair.register_fake
def _(a, b, factor, bias=None):
    fmt = K._layout(b)
    return (torch.empty_like(b, dtype=CH.sum_dtype(a, b, factor), memory_format=fmt),
            torch.empty_like(b, dtype=a.dtype, memory_format=fmt))


# ---- the NMF's float32 products on the tensor cores (3xTF32) --------------------------------------------

@torch.library.custom_op('smmcl::bmm_tf32x3', mutates_args=())
def bmm_tf32x3(a: Tensor, b: Tensor) -> Tensor:
    """``torch.bmm(a, b)`` for float32 B-M-K ``a`` and B-K-N ``b`` (any strides) at float32's accuracy on the
    tensor cores (:func:`triton_matmul.bmm`); B-M-N, contiguous. Its backward is two such products."""
    return MM.bmm(a, b)


@bmm_tf32x3.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], a.shape[1], b.shape[2])


def _bmm_tf32x3_grad(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a = bmm_tf32x3(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
    grad_b = bmm_tf32x3(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b


bmm_tf32x3.register_autograd(_bmm_tf32x3_grad, setup_context=_save_inputs)


@torch.library.custom_op('smmcl::nmf_update', mutates_args=())
def nmf_update(factor: Tensor, numerator: Tensor, product: Tensor, eps: float,
               keep_denominator: bool = True) -> Tuple[Tensor, Tensor]:
    """A multiplicative update's element-wise steps, ``(factor * numerator / (product + eps), product + eps)``,
    in one pass (:func:`triton_matmul.nmf_update`; the second empty without ``keep_denominator``). No
    backward: the NMF's backward by hand (``NMFSteps``) takes :func:`nmf_update_grad`'s."""
    return MM.nmf_update(factor, numerator, product, eps, keep_denominator)


@nmf_update.register_fake
def _(factor, numerator, product, eps, keep_denominator=True):
    return factor.new_empty(factor.shape), factor.new_empty(factor.shape if keep_denominator else (0,))


@torch.library.custom_op('smmcl::nmf_update_grad', mutates_args=('grad_numerator',))
def nmf_update_grad(grad: Tensor, denominator: Tensor, factor: Tensor, updated: Tensor, numerator: Tensor,
                    grad_numerator: Tensor) -> Tuple[Tensor, Tensor]:
    """With ``ratio = grad / denominator``: ``ratio * factor`` written into ``grad_numerator``, and ``(ratio *
    updated, ratio * numerator)``, in one pass (:func:`triton_matmul.nmf_update_grad`)."""
    return MM.nmf_update_grad(grad, denominator, factor, updated, numerator, grad_numerator)


@nmf_update_grad.register_fake
def _(grad, denominator, factor, updated, numerator, grad_numerator):
    return grad.new_empty(grad.shape), grad.new_empty(grad.shape)


# ---- the cross-modal modulation's outputs and its inputs' gradient sums -----------------------------------

@torch.library.custom_op('smmcl::modulation', mutates_args=())
def modulation(rgb: Tensor, x: Tensor, spatial: Tensor, channel: Tensor, dtype: Optional[torch.dtype] = None,
               streams: bool = True, fusion: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """The cross-modal modulation's outputs ``(rgb + x * gate, x + rgb * gate)``, the gate ``0.5 * spatial +
    0.5 * channel`` (N-1-H-W and N-C-1-1), in one pass (:func:`triton_channel.modulation`), stored in
    ``dtype`` (default: the promoted one) as the two maps (with ``streams``, else empty tensors) and as
    their N-2C-H-W concat (with ``fusion``, else an empty tensor); its backward one pass too, the
    coefficients' gradients summed in it."""
    out_rgb, out_x, fuse = CH.modulation(rgb, x, spatial, channel, dtype, streams, fusion)
    return tuple(rgb.new_empty(0) if t is None else t for t in (out_rgb, out_x, fuse))


@modulation.register_fake
def _(rgb, x, spatial, channel, dtype=None, streams=True, fusion=False):
    n, c, h, w = rgb.shape
    dtype = dtype or CH.sum_dtype(rgb, spatial)
    maps = [torch.empty_like(rgb, dtype=dtype, memory_format=K._layout(rgb)) if streams else rgb.new_empty(0)
            for _ in range(2)]
    return (*maps, torch.empty((n, 2 * c, h, w), dtype=dtype, device=rgb.device, memory_format=K._layout(rgb))
            if fusion else rgb.new_empty(0))


@torch.library.custom_op('smmcl::modulation_backward', mutates_args=())
def modulation_backward(grad_rgb: Optional[Tensor], grad_x: Optional[Tensor], grad_fuse: Optional[Tensor],
                        rgb: Tensor, x: Tensor, spatial: Tensor,
                        channel: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad rgb, grad x, grad spatial, grad channel) of :func:`modulation` for its outputs' gradients (any
    may be None)."""
    return CH.modulation_grad(grad_rgb, grad_x, grad_fuse, rgb, x, spatial, channel)


@modulation_backward.register_fake
def _(grad_rgb, grad_x, grad_fuse, rgb, x, spatial, channel):
    return _like(rgb), torch.empty_like(x, memory_format=K._layout(rgb)), torch.empty_like(spatial), \
        torch.empty_like(channel)


def _save_modulation(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.set_materialize_grads(False)  # an output not written or not used takes no gradient


def _modulation_grad(ctx, grad_rgb, grad_x, grad_fuse):
    # an empty stand-in output's gradient, or an empty map's, adds nothing
    grads = [None if g is None or g.numel() == 0 else g for g in (grad_rgb, grad_x, grad_fuse)]
    return (*modulation_backward(*grads, *ctx.saved_tensors), None, None, None)


modulation.register_autograd(_modulation_grad, setup_context=_save_modulation)


@torch.library.custom_op('smmcl::pooled_input_grad', mutates_args=())
def pooled_input_grad(grad_pass: Optional[Tensor], grad_both: Optional[Tensor], offset: int, value: Tensor,
                      grad_mean: Optional[Tensor], maximum: Tensor, grad_max: Optional[Tensor],
                      count: Tensor) -> Tensor:
    """The gradient of a map that fed a handed-on use, a concat (from channel ``offset`` of ``grad_both``)
    and its channels' means and maxima (reached at ``count`` positions), summed in one pass
    (:func:`triton_channel.pooled_input_grad`). A backward's piece: no autograd."""
    return CH.pooled_input_grad(grad_pass, grad_both, offset, value, grad_mean, maximum, grad_max, count)


@pooled_input_grad.register_fake
def _(grad_pass, grad_both, offset, value, grad_mean, maximum, grad_max, count):
    return _like(value)


@torch.library.custom_op('smmcl::modulation_inputs', mutates_args=())
def modulation_inputs(rgb: Tensor, x: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """(the N-2C-H-W concat of rgb and x in ``dtype``, the float32 N-4C-1-1 means and maxima of its
    channels, the N-2C-1-1 counts of each maximum), one pass per modality
    (:func:`triton_channel.modulation_inputs`). A forward's piece: its backward is
    :func:`pooled_input_grad`'s, called by the module's own."""
    return CH.modulation_inputs(rgb, x, dtype)


@modulation_inputs.register_fake
def _(rgb, x, dtype):
    n, c, h, w = rgb.shape
    return (torch.empty((n, 2 * c, h, w), dtype=dtype, device=rgb.device, memory_format=K._layout(rgb)),
            rgb.new_empty(n, 4 * c, 1, 1, dtype=torch.float32), rgb.new_empty(n, 2 * c, 1, 1, dtype=torch.float32))
