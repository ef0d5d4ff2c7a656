"""MSCAN, the multi-scale convolutional attention encoder of SegNeXt (Guo et al., NeurIPS 2022).

Layer names follow SegNeXt's ``mscan.py`` (and hence the authors' SMMCL checkpoints): ``proj.0/1/3/4``
for the stem, ``attn.spatial_gating_unit.conv0_1`` ..., ``mlp.dwconv.dwconv``, ``layer_scale_1/2``.
Blocks here work on N-C-H-W maps directly; SegNeXt flattens to tokens between blocks, which is the same
function with extra reshapes.

:func:`use_fused_kernels` switches the attention's depthwise convs and the MLP's depthwise conv + GELU to
the Triton kernels of :mod:`smmcl.kernels` (the fast path's ``triton_kernels``; fc1's bias added in the MLP's
depthwise conv), and the blocks' other 1x1 convs' bias add and bias gradient to one Triton pass each
(:class:`PointwiseConv`; proj_1's GELU and conv3's product with the gate in the same passes), and the fast
path's residual tails to one pass forward and backward (:func:`residual_add`); under autocast each block's
1x1 weights are cast in one launch each way (:func:`cast_once`; the encoder's and the decoder's other convs
too, per stage and module). The parameters and the state dict stay the same.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..choices import MSCAN_VARIANTS, MSCANSpec, mscan_b, mscan_l, mscan_s, mscan_t  # noqa: F401  (the table)
from ..config import check_choice

NormLayer = Callable[[int], nn.Module]


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode and for ``drop_prob == 0``)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        return x * self.draw_mask(x.shape[0], x) / (1.0 - self.drop_prob)

    def draw_mask(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """N-1-1-1 keep mask (1 kept, 0 dropped) in ``like``'s dtype and device, drawn as forward draws it."""
        return like.new_empty((batch,) + (1,) * (like.ndim - 1)).bernoulli_(1.0 - self.drop_prob)

    def drawn_keep(self, scale: torch.Tensor, y: torch.Tensor) -> Tuple[Optional[torch.Tensor], float]:
        """(the N-1-1-1 keep mask, drawn as forward would draw it for ``scale[:, None, None] * y``, the
        probability its kept images are divided by): for a residual tail that scales by them itself
        (:meth:`Block._factor`, the kernels' tail ops); (None, 1) where forward is the identity."""
        if self.drop_prob == 0.0 or not self.training:
            return None, 1.0
        like = y.new_empty((0,) * y.ndim, dtype=torch.promote_types(scale.dtype, y.dtype))
        return self.draw_mask(y.shape[0], like), 1.0 - self.drop_prob

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'


class ScaleByImage(torch.autograd.Function):
    """``scale[:, None, None] * keep``: C and N-1-1-1 -> N-C-1-1 (drop path's factor per image), whose
    backward sums the scale's gradient over the images in one matrix-vector product, where autograd's
    broadcast product takes a product and then a sum (a kernel each, per block half and step)."""

    @staticmethod
    def forward(ctx, scale: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(keep)
        return scale[:, None, None] * keep

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        keep, = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        with torch.autocast(grad.device.type, enabled=False):  # in the gradient's dtype, as autograd's sum
            return torch.mv(grad.reshape(grad.shape[0], -1).t(), keep.reshape(-1).to(grad.dtype)), None


class CastOnce(torch.autograd.Function):
    """Tensors -> their copies in ``dtype``, all in one multi-tensor pass (``torch._foreach_copy_``: one
    launch on CUDA for tensors of one dtype), and their gradients back to the tensors' dtypes in one more;
    autocast casts each conv's weight in a launch of its own and its gradient in another. The same values:
    ATen's rounding to nearest even forward, an exact widening backward."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.dtypes = [t.dtype for t in tensors]
        low = [torch.empty_like(t, dtype=dtype) for t in tensors]
        torch._foreach_copy_(low, list(tensors))
        return tuple(low)

    @staticmethod
    def backward(ctx, *grads):
        present = [g for g in grads if g is not None]
        # each gradient keeps its strides, as autocast's cast backward keeps them (the fast route's condition)
        full = [torch.empty_like(g, dtype=d) for g, d in zip(grads, ctx.dtypes) if g is not None]
        if present:
            torch._foreach_copy_(full, present)
        widened = iter(full)
        return (None,) + tuple(None if g is None else next(widened) for g in grads)


@contextlib.contextmanager
def cast_once(x: torch.Tensor, parameters: Sequence[Tuple[nn.Module, str]]) -> Iterator[None]:
    """Within it, each of ``parameters`` ((module, name) pairs) that autocast would cast for x (x on a
    device where autocast is on; the parameter floating point, not float64 and not in autocast's dtype)
    reads as its copy in autocast's dtype, all made by one :class:`CastOnce`: a launch each way, where
    autocast casts each parameter in a launch of its own and its gradient in another. For parameters that
    within it only autocast's lower-precision ops read (convs), so that autocast would cast them itself:
    the same values. The copies stand in the modules' ``_parameters`` as ``torch.func.functional_call``
    swaps them in (``torch.nn.utils._named_member_accessor.swap_tensor``); the parameters are back on
    exit, also after an exception. Not while ``torch.compile`` traces: its generated code fuses the casts."""
    device = x.device.type
    low_dtype = torch.get_autocast_dtype(device)
    on = torch.is_autocast_enabled(device) and not torch.compiler.is_compiling()
    present = [(module, name, module._parameters[name]) for module, name in parameters] if on else []
    chosen = [(module, name, p) for module, name, p in present
              if p.is_floating_point() and p.dtype not in (low_dtype, torch.float64)]
    if not chosen:
        yield
        return
    for (module, name, _), low in zip(chosen, CastOnce.apply(low_dtype, *(p for _, _, p in chosen))):
        module._parameters[name] = low
    try:
        yield
    finally:
        for module, name, parameter in chosen:
            module._parameters[name] = parameter


def convs_cast_once(owner: nn.Module, x: torch.Tensor, *modules: nn.Module) -> ContextManager[None]:
    """In training on ``owner``'s kernels' path (:func:`per_channel_passes`), :func:`cast_once` of the weight
    and bias of every ``nn.Conv2d`` in ``modules`` (convs autocast runs: the patch embeddings, the
    modulations and fusion convs, the projectors, the decoder), else a context that does nothing. Not
    without autograd: inference (``precision.for_inference``) stores these in autocast's dtype already."""
    if not (torch.is_grad_enabled() and per_channel_passes(owner, x)):
        return contextlib.nullcontext()
    return cast_once(x, [(conv, name) for module in modules for conv in module.modules()
                         if isinstance(conv, nn.Conv2d)
                         for name in ('weight', 'bias') if conv._parameters.get(name) is not None])


class StemConv(nn.Module):
    """Stage-1 patch embedding: two 3x3 stride-2 convs with BN (GELU between). N-Cin-H-W -> N-C-H/4-W/4."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer: NormLayer):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, out_channels // 2, 3, stride=2, padding=1),
            norm_layer(out_channels // 2),
            nn.GELU(),
            nn.Conv2d(out_channels // 2, out_channels, 3, stride=2, padding=1),
            norm_layer(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class OverlapPatchEmbed(nn.Module):
    """Stages 2-4 patch embedding: 3x3 stride-2 conv + BN. N-Cin-H-W -> N-C-H/2-W/2."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer: NormLayer):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm = norm_layer(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class PointwiseConv(nn.Conv2d):
    """A 1x1 conv with bias, ``nn.Conv2d``'s parameters and state dict. With the kernels on
    (:func:`use_fused_kernels`) its bias is added by ``smmcl::add_channel_bias``: one Triton pass after the
    conv, as ATen adds it after a cuDNN conv but vectorised, and a backward that sums the bias gradient in
    one Triton pass too (:mod:`smmcl.kernels.triton_channel`): the same function, the gradient's sums in
    another order."""

    fused_kernels = False  # set per module by use_fused_kernels

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """N-Cin-H-W -> N-Cout-H-W, times ``gate`` (N-Cout-H-W) when given: with the kernels on, in the
        bias add's pass (``smmcl::add_channel_bias_gate``)."""
        if per_channel_passes(self, x):
            y = self.forward_without_bias(x)
            if gate is None:
                return torch.ops.smmcl.add_channel_bias(y, self.bias)
            return torch.ops.smmcl.add_channel_bias_gate(y, self.bias, gate)
        out = super().forward(x)
        return out if gate is None else out * gate

    def forward_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The conv without its bias, N-Cin-H-W -> N-Cout-H-W, for an op that adds the bias in a pass of its
        own (``smmcl::residual_pair``, ``smmcl::dwconv2d_gelu``'s ``in_bias``)."""
        return F.conv2d(x, self.weight)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """The exact GELU of :meth:`forward`: with the kernels on, in the bias add's pass
        (``smmcl::add_channel_bias_gelu``)."""
        if per_channel_passes(self, x):
            return torch.ops.smmcl.add_channel_bias_gelu(self.forward_without_bias(x), self.bias)
        return F.gelu(super().forward(x))


class AttentionModule(nn.Module):
    """Multi-scale convolutional attention: 5x5 depthwise, three depthwise strip branches, 1x1, gating."""

    fused_kernels = False  # set per module by use_fused_kernels

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv0_1 = nn.Conv2d(dim, dim, (1, 7), padding=(0, 3), groups=dim)
        self.conv0_2 = nn.Conv2d(dim, dim, (7, 1), padding=(3, 0), groups=dim)
        self.conv1_1 = nn.Conv2d(dim, dim, (1, 11), padding=(0, 5), groups=dim)
        self.conv1_2 = nn.Conv2d(dim, dim, (11, 1), padding=(5, 0), groups=dim)
        self.conv2_1 = nn.Conv2d(dim, dim, (1, 21), padding=(0, 10), groups=dim)
        self.conv2_2 = nn.Conv2d(dim, dim, (21, 1), padding=(10, 0), groups=dim)
        self.conv3 = PointwiseConv(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SegNeXt clones x first; nothing writes to it in place, so the clone is not needed.
        gate = x
        if self.fused_kernels and kernels.runs_on(x):
            ops = torch.ops.smmcl  # registered by use_fused_kernels
            if torch.is_grad_enabled() and per_channel_passes(self, x):
                # x handed on to the gate as a view: the 5x5 conv's backward adds the gate's gradient to
                # its own as it writes x's, where autograd would add them in a pass of its own
                from ..kernels.ops import DepthwiseStream  # loaded with the kernels (use_fused_kernels)
                attn, gate = DepthwiseStream.apply(x, self.conv0.weight, self.conv0.bias)
            else:
                attn = ops.dwconv2d(x, self.conv0.weight, self.conv0.bias)
            strips = [p for pair in ((self.conv0_1, self.conv0_2), (self.conv1_1, self.conv1_2),
                                     (self.conv2_1, self.conv2_2))
                      for conv in pair for p in (conv.weight, conv.bias)]
            attn = ops.mscan_strip_sum(attn, *strips)
        else:
            attn = self.conv0(x)
            attn = (attn + self.conv0_2(self.conv0_1(attn)) + self.conv1_2(self.conv1_1(attn))
                    + self.conv2_2(self.conv2_1(attn)))
        return self.conv3(attn, gate=gate)


class SpatialAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj_1 = PointwiseConv(dim, dim)
        self.activation = nn.GELU()
        self.spatial_gating_unit = AttentionModule(dim)
        self.proj_2 = PointwiseConv(dim, dim)

    def branch(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        """The attention without its residual, N-C-H-W -> N-C-H-W (without proj_2's bias if not
        ``add_bias``: for the residual add to add). With the kernels on, proj_1's bias add and GELU are one
        pass (:func:`use_fused_kernels` checks the activation is the exact GELU)."""
        if per_channel_passes(self.proj_1, x):
            u = self.proj_1.forward_gelu(x)
        else:
            u = self.activation(self.proj_1(x))
        attn = self.spatial_gating_unit(u)
        return self.proj_2(attn) if add_bias else self.proj_2.forward_without_bias(attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + x


class DWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x)


class Mlp(nn.Module):
    fused_kernels = False  # set per module by use_fused_kernels

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = PointwiseConv(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = PointwiseConv(hidden_dim, dim)

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        """N-C-H-W -> N-C-H-W (without fc2's bias if not ``add_bias``: for the residual add to add). With the
        kernels on, fc1's bias is added as the depthwise conv loads fc1's output (``smmcl::dwconv2d_gelu``'s
        ``in_bias``): the same values without a pass of its own over the hidden map, forward or backward."""
        if self.fused_kernels and kernels.runs_on(x):
            conv = self.dwconv.dwconv
            h = torch.ops.smmcl.dwconv2d_gelu(self.fc1.forward_without_bias(x), conv.weight, conv.bias,
                                              self.fc1.bias)
        else:
            h = self.act(self.dwconv(self.fc1(x)))
        return self.fc2(h) if add_bias else self.fc2.forward_without_bias(h)


def residual_add(module: nn.Module, x: torch.Tensor):
    """``add(x, y, f) = x + y * f`` (f per channel) for a folded block: with the kernels on,
    ``smmcl::scaled_residual`` (one pass forward, one Triton pass backward:
    :mod:`smmcl.kernels.triton_channel`), else ``torch.addcmul``; the same function."""
    if per_channel_passes(module, x):
        return lambda x, y, f: torch.ops.smmcl.scaled_residual(x, y, f)[0]
    return torch.addcmul


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """A stage's blocks in turn on N-C-H-W ``x``. Folded blocks (inference) with the kernels on, under
    autocast and without autograd, hand on the residual stream with its copy in the autocast dtype, which
    each residual add writes in the same pass (``forward_pair``): the next 1x1 conv reads it instead of
    autocast casting the stream again. Blocks on the kernels' path (:meth:`Block.forward_stream`) hand on
    the stream with its next BatchNorm's partial sums, which each block's last tail sums in its pass: the
    norm does not read the stream back for its statistics. The same values (the statistics rounded
    differently)."""
    low = partials = None
    for i, block in enumerate(blocks):
        if hasattr(block, 'forward_pair') and per_channel_passes(block, x) and not torch.is_grad_enabled() \
                and torch.is_autocast_enabled(x.device.type):
            x, low = block.forward_pair(x, low)
        elif isinstance(block, Block) and block.streams(x):
            following = blocks[i + 1] if i + 1 < len(blocks) else None
            next_norm = following.norm1 if isinstance(following, Block) and following.streams(x) else None
            x, partials = block.forward_stream(x, partials, next_norm)
        else:
            x, low = block(x), None
    return x


def per_channel_passes(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` runs its per-channel passes (a 1x1 conv's bias, a block tail) as our ops: with the
    kernels on, except while ``torch.compile`` traces, as its generated code fuses such element-wise
    passes with their neighbours, which an opaque op would stop (the depthwise ops stay ours)."""
    return module.fused_kernels and kernels.runs_on(x) and not torch.compiler.is_compiling()


def use_fused_kernels(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every MSCAN attention and MLP in ``model`` to the Triton kernels, the blocks' 1x1 convs
    (:class:`PointwiseConv`) to the Triton bias add and gradient, the blocks' residual tails to
    :func:`residual_add`'s op, the cross-modal modulations to ``smmcl::modulation_inputs``,
    ``smmcl::modulation`` and ``smmcl::pooled_input_grad`` and the decoder's NMF products to
    ``smmcl::bmm_tf32x3``, and in training under autocast the encoder's and the decoder's other convs to
    one cast per group (:func:`convs_cast_once`), or back (in place): every module with a
    ``fused_kernels`` attribute.

    The kernels take over on CUDA tensors (and on the CPU under ``TRITON_INTERPRET=1``); elsewhere the
    modules keep their ``nn.Conv2d`` path. Stops with one message when Triton is missing.
    """
    if enabled:
        kernels.load_ops()  # registers torch.ops.smmcl.*; a clear error when Triton is missing
    for module in model.modules():
        activation = (module.act if isinstance(module, Mlp)
                      else module.activation if isinstance(module, SpatialAttention) else None)
        if enabled and activation is not None and not (isinstance(activation, nn.GELU)
                                                       and activation.approximate == 'none'):
            raise ValueError(f'the fused kernels compute the exact GELU, this {type(module).__name__} has '
                             f'{activation}: leave triton_kernels off')
        if hasattr(module, 'fused_kernels'):  # attentions, MLPs, 1x1 convs, tails, modulations, NMFs, casts
            module.fused_kernels = enabled
    return model


class Block(nn.Module):
    """MSCAN block: x + s1 * attn(BN(x)); x + s2 * mlp(BN(x)); per-channel layer scales, drop path."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float, norm_layer: NormLayer):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SpatialAttention(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(1e-2 * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(1e-2 * torch.ones(dim))

    fused_tails = False  # set per module by use_fused_tails (the fast path)
    fused_kernels = False  # set per module by use_fused_kernels: each tail with its last bias as one Triton pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N-C-H-W -> N-C-H-W."""
        if self.streams(x):
            return self.forward_stream(x)[0]
        if self.fused_tails:  # each half's scale, drop path and residual add in one addcmul pass
            y = self.attn(self.norm1(x))
            x = torch.addcmul(x, y, self._factor(self.layer_scale_1, y))
            y = self.mlp(self.norm2(x))
            return torch.addcmul(x, y, self._factor(self.layer_scale_2, y))
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))
        return x

    def streams(self, x: torch.Tensor) -> bool:
        """Whether the block runs :meth:`forward_stream` on x: the fast path's tails with the kernels on."""
        return self.fused_tails and per_channel_passes(self, x)

    def forward_stream(self, x: torch.Tensor, partials: Optional[torch.Tensor] = None,
                       next_norm: Optional[nn.Module] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The block on the kernels' path: N-C-H-W x -> (N-C-H-W, partials). Each half's tail is one pass
        (``smmcl::shortcut_residual``, ``smmcl::scaled_residual``), with the branch's last bias (proj_2's,
        fc2's), the attention's own shortcut and drop path's factor (from the drawn mask): no pass or launch
        of their own, forward or backward. Each norm writes its conv's bf16 copy itself and hands the
        stream on, adding the stream's two gradients in its backward (:func:`normed_pair`). The attention's
        tail sums norm2's statistics in its pass; the MLP's, with ``next_norm`` (the BatchNorm that reads
        this block's output next, where :func:`fused_norm` holds), those of the output, returned as
        ``partials`` for that norm (else None); norm1 takes ``partials`` (x's, or None: it sums them
        itself). Under autocast the 1x1 convs' weights are cast in one pass (:func:`cast_once`); their biases
        stay float32, as the kernels' bias passes read them."""
        pointwise = [(conv, 'weight') for conv in self.modules() if isinstance(conv, PointwiseConv)]
        with cast_once(x, pointwise):  # the five 1x1 convs' weights in one launch each way
            ops = torch.ops.smmcl
            xn, low, x = normed_pair(self.norm1, x, partials=partials)
            y = self.attn.branch(low, add_bias=False)
            keep, keep_prob = self._keep(self.layer_scale_1, y)
            x, _, partials = ops.shortcut_residual(x, y, self.layer_scale_1[:, None, None], self.attn.proj_2.bias, xn,
                                                   stats=fused_norm(self.norm2, x), keep=keep, keep_prob=keep_prob)
            _, low, x = normed_pair(self.norm2, x, full=False, partials=partials)
            y = self.mlp(low, add_bias=False)
            stats = next_norm is not None and fused_norm(next_norm, x)
            keep, keep_prob = self._keep(self.layer_scale_2, y)
            x, partials = ops.scaled_residual(x, y, self.layer_scale_2[:, None, None], self.mlp.fc2.bias, stats=stats,
                                              keep=keep, keep_prob=keep_prob)
        return x, partials if stats else None

    def _factor(self, scale: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The factor ``f`` with ``y * f == self.drop_path(scale[:, None, None] * y)``, C-1-1 or N-C-1-1 (the
        mask drawn as the drop path would draw it), so a residual add is one ``addcmul``."""
        keep, keep_prob = self._keep(scale, y)
        return scale[:, None, None] if keep is None else ScaleByImage.apply(scale, keep / keep_prob)

    def _keep(self, scale: torch.Tensor, y: torch.Tensor) -> Tuple[Optional[torch.Tensor], float]:
        """Drop path's keep mask and probability for the tail ops, which scale by them in their own passes."""
        if isinstance(self.drop_path, DropPath):
            return self.drop_path.drawn_keep(scale, y)
        return None, 1.0


def fused_norm(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`normed_pair` runs ``norm`` on x as the kernels' batch norm: a plain
    ``nn.BatchNorm2d`` in training (running statistics, affine, a momentum) under autocast, on more than
    one value per channel (else the module's own error)."""
    return (type(norm) is nn.BatchNorm2d and norm.training and norm.track_running_stats and norm.affine
            and norm.momentum is not None and torch.is_autocast_enabled(x.device.type)
            and x.numel() > x.shape[1])


def normed_pair(norm: nn.Module, x: torch.Tensor, full: bool = True, partials: Optional[torch.Tensor] = None):
    """(``norm(x)``, the same in the autocast dtype the next conv reads it in, x for the residual shortcut)
    for a block's BatchNorm with the kernels on. Where :func:`fused_norm` holds, it runs as
    ``smmcl::batch_norm_stats`` (from ``partials``, x's from the tail that wrote it, where given with
    rows) and ``smmcl::batch_norm_apply``: its statistics (the running ones updated,
    ``num_batches_tracked`` too, as the module does), then both outputs in one pass (without ``full`` only
    the low one: None, x's dtype). Its backward reads the two outputs' gradients as they are, where
    autocast would cast the copy's gradient and add it to the other's in two passes of their own, and
    adds the stream's gradient from the shortcut, for which x is handed on as a view
    (:class:`~smmcl.kernels.ops.BatchNormStream`), where autograd would add it in a pass of its own.
    Otherwise the module, its output given twice (autocast casts it where the conv reads it), and x."""
    if fused_norm(norm, x):
        from ..kernels.ops import BatchNormStream  # loaded with the kernels (use_fused_kernels)
        coef = torch.ops.smmcl.batch_norm_stats(x.detach(), norm.weight.detach(), norm.bias.detach(),
                                                norm.running_mean, norm.running_var, norm.momentum, norm.eps,
                                                partials, norm.num_batches_tracked)
        low, out, stream = BatchNormStream.apply(x, norm.weight, norm.bias, coef,
                                                 torch.get_autocast_dtype(x.device.type), full)
        return out if full else None, low, stream
    out = norm(x)
    return out, out, x


def use_fused_tails(model: nn.Module, enabled: bool = True) -> nn.Module:
    """The fast path's element-wise tails (in place): every MSCAN block of ``model`` with its layer scale,
    drop path and residual add in one ``torch.addcmul`` per half, every cross-modal modulation with each
    output in one and its backward by hand (:class:`~smmcl.models.fusion.ModulationInputs`), the decoder's
    NMF with its backward by hand (:class:`~smmcl.models.ham_head.NMFSteps`: x's gradient in one product)
    (``fused_tails`` of those modules); or back to the separate ops. The same function, rounded
    differently; the same random draws."""
    for module in model.modules():
        if hasattr(module, 'fused_tails'):
            module.fused_tails = enabled
    return model


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an N-C-H-W map (SegNeXt applies it to N-HW-C tokens), the result in
    the input's memory format."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The authors make each stage's normed output a contiguous N-C-H-W map (MMSegNext.forward in
        # SMMCL_LLRGBD/models/encoders/dual_segnext.py: ``.permute(0, 3, 1, 2).contiguous()``). The
        # permuted view alone has channels_last strides, which the next stage's convolutions would follow
        # whatever layout was configured; on the channels_last fast path it is already in place (no copy).
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        y = super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def mscan_spec(name: str) -> MSCANSpec:
    check_choice('backbone', name, tuple(MSCAN_VARIANTS))
    return MSCAN_VARIANTS[name]()


def build_stage(spec: MSCANSpec, stage: int, in_channels: int, drop_path_rates: Sequence[float],
                norm_layer: NormLayer):
    """Patch embedding, blocks and final LayerNorm of one stage (0-based ``stage``)."""
    dim = spec.embed_dims[stage]
    embed_cls = StemConv if stage == 0 else OverlapPatchEmbed
    patch_embed = embed_cls(in_channels, dim, norm_layer)
    blocks = nn.ModuleList(Block(dim, spec.mlp_ratios[stage], rate, norm_layer)
                           for rate in drop_path_rates)
    return patch_embed, blocks, ChannelLayerNorm(dim)


def drop_path_schedule(spec: MSCANSpec, drop_path_rate: float = None):
    """Per-stage lists of linearly increasing stochastic-depth rates, as SegNeXt."""
    rate = spec.drop_path_rate if drop_path_rate is None else drop_path_rate
    rates = torch.linspace(0, rate, sum(spec.depths)).tolist()
    out, start = [], 0
    for depth in spec.depths:
        out.append(rates[start:start + depth])
        start += depth
    return out
