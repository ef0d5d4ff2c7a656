"""What the cross-modal modulation's kernels compute, in PyTorch (:mod:`smmcl.kernels.triton_channel`
runs these as its ``torch`` implementations; the fast path without the kernels runs them as they are),
and a tensor's memory layout. Imports nothing of the package: the kernel modules and the models import
it.
"""
from __future__ import annotations

from typing import Optional

import torch


def layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is stored that way (and not also plain contiguous), else NCHW."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def modulation_gate(spatial: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """``0.5 * spatial + 0.5 * channel`` (N-1-H-W and N-C-1-1 coefficients -> N-C-H-W, in their dtype): the
    halving on the small factors is exact, so the sum's is the one rounding."""
    return 0.5 * spatial + 0.5 * channel


def modulation_reference(rgb: torch.Tensor, x: torch.Tensor, spatial: torch.Tensor, channel: torch.Tensor,
                         gate: Optional[torch.Tensor] = None):
    """What ``smmcl::modulation`` computes: the cross-modal modulation's outputs ``(rgb + x * gate,
    x + rgb * gate)``, each one ``addcmul``, the gate ``0.5 * spatial + 0.5 * channel`` in their dtype (the
    halving on the small factors is exact, so one rounding makes it).

    Args:
        rgb, x: N-C-H-W (float32 on the fast path); spatial: N-1-H-W; channel: N-C-1-1 coefficients.
        gate: the gate, if the caller made it (to keep it for the backward), else made here.
    Returns:
        Two N-C-H-W maps in the promoted dtype.
    """
    gate = modulation_gate(spatial, channel) if gate is None else gate
    return torch.addcmul(rgb, x, gate), torch.addcmul(x, rgb, gate)


def modulation_grad_reference(grad_rgb: torch.Tensor, grad_x: torch.Tensor, rgb: torch.Tensor, x: torch.Tensor,
                              spatial: torch.Tensor, channel: torch.Tensor, gate: Optional[torch.Tensor] = None):
    """The gradients of :func:`modulation_reference`'s inputs for its outputs' ``grad_rgb`` and ``grad_x``:
    (rgb's ``grad_rgb + grad_x * gate``, x's ``grad_x + grad_rgb * gate``, spatial's and channel's: half the
    gate's, ``grad_rgb * x + grad_x * rgb`` in float32, summed over the channels and over the pixels, in
    their dtypes). ``gate``: the forward's, if kept (else made again)."""
    gate = modulation_gate(spatial, channel) if gate is None else gate
    grad_gate = torch.addcmul(grad_rgb * x, grad_x, rgb)
    return (torch.addcmul(grad_rgb, grad_x, gate), torch.addcmul(grad_x, grad_rgb, gate),
            (0.5 * grad_gate.sum(dim=1, keepdim=True)).to(spatial.dtype),
            (0.5 * grad_gate.sum(dim=(2, 3), keepdim=True)).to(channel.dtype))


def modulation_inputs_reference(rgb: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, counts: bool = True):
    """What ``smmcl::modulation_inputs`` computes: the cross-modal modulation's coefficient MLPs' inputs.

    Args:
        rgb, x: N-C-H-W, one shape, dtype and layout.
        dtype: the concat's (under autocast the dtype its first conv casts it to).
        counts: whether to count the maxima (only a backward needs them).
    Returns:
        (the N-2C-H-W concat of rgb and x in ``dtype`` and their layout; N-4C-1-1 float32: rgb's and x's
        channels' means, then their maxima; N-2C-1-1 float32: how many positions reach each maximum, or
        None without ``counts``).
    """
    channels = rgb.shape[1]
    both = torch.empty((rgb.shape[0], 2 * channels, *rgb.shape[2:]), dtype=dtype, device=rgb.device,
                       memory_format=layout(rgb))
    both[:, :channels] = rgb
    both[:, channels:] = x
    maxima = [rgb.amax(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)]
    pooled = torch.cat([rgb.mean(dim=(2, 3), keepdim=True), x.mean(dim=(2, 3), keepdim=True)] + maxima, 1)
    if not counts:
        return both, pooled, None
    counts = torch.cat([(v == m).sum(dim=(2, 3), keepdim=True) for v, m in zip((rgb, x), maxima)], 1)
    return both, pooled, counts.float()


def pooled_input_grad_reference(grad_pass, grad_half, value: torch.Tensor, grad_mean, maximum, grad_max,
                                count=None):
    """The gradient of ``value`` (N-C-H-W) that fed a handed-on use (``grad_pass``, its gradient, or None), a
    concat (``grad_half``: that concat's gradient's half for value, N-C-H-W in any float dtype, or None) and
    its channels' means and maxima (``grad_mean``, ``grad_max``: N-C-1-1 gradients, or both None;
    ``maximum``: N-C-1-1, the maxima, reached at ``count`` positions each, counted here if None), the
    maximum's gradient shared by the positions that reach it, as ``amax``'s is. In value's dtype."""
    grad = torch.zeros_like(value) if grad_pass is None else grad_pass
    if grad_half is not None:
        grad = grad + grad_half
    if grad_mean is not None:
        if grad is grad_pass:  # a gradient handed to a backward is not its to change
            grad = grad.clone()
        grad += grad_mean / value[0, 0].numel()
        reached = value == maximum
        grad.addcmul_(reached, grad_max / (reached.sum(dim=(2, 3), keepdim=True) if count is None else count))
    return grad
