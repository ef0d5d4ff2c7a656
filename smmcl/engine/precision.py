"""Speed switches shared by training and evaluation: fast on the GPU, the same function
(``speed='fast'`` picks them per job and device: :mod:`smmcl.engine.speed`).

- ``config.amp``: bf16 autocast (fp16 + GradScaler on GPUs without bf16; fp32 on CPUs without native
  bf16, where it is emulated and slow); the NMF and the InfoNCE always run in fp32 (see
  ``smmcl.models.ham_head`` and ``smmcl.losses.contrastive``).
- ``config.fast_path``: channels_last tensors (NCHW with ``config.channels_last=False``); element-wise
  tails in one ``addcmul`` each (``smmcl.models.mscan.use_fused_tails``: each MSCAN block's layer scale,
  drop path and residual add in training, each cross-modal modulation's outputs); for inference, BN and
  layer scales folded into the convolutions (``smmcl.models.fast.fold_for_inference``) and, under
  ``amp``, dense layers' weights stored in the autocast dtype (:func:`cast_dense_layers`). The plain path
  (both off) is the reference the tests compare against.
- ``config.triton_kernels`` (with ``fast_path``): MSCAN's depthwise convs in the Triton kernels of
  ``smmcl.kernels`` (``speed='fast'`` turns them on where Triton is installed: docs/speed.md).
- ``config.compile``: ``torch.compile`` the model (optional: compiling MSCAN-B takes minutes; inductor
  caches its artifacts, so later runs start faster).
- ``config.cuda_graphs``: inference forwards replayed from CUDA graphs, one per input shape
  (``smmcl.engine.graphs``; on any path, fast or plain: the same function);
  ``config.cuda_graphs_training`` the same for the training step's forward and backward.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
from torch import nn

from ..models.fast import fold_for_inference
from ..models.mscan import use_fused_kernels, use_fused_tails
from .graphs import graphed, use_training_graphs

logger = logging.getLogger(__name__)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively.

    CPUs without AVX-512 (or AMX) emulate it: on a 2-core AVX2 EPYC, bf16 autocast made the MSCAN-T
    training step 8x and inference 11x slower than fp32 (``bench/bench.py``).
    """
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    try:
        return device.type == 'cpu' and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def amp_dtype(config, device: torch.device) -> Optional[torch.dtype]:
    """The dtype :func:`mixed_precision`'s autocast computes in on ``device``; None: float32."""
    if not config.amp:
        return None
    if device.type == 'cuda':
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.bfloat16 if native_bf16(device) else None


def mixed_precision(config, device: torch.device):
    """(autocast context, grad scaler): one code path whether ``config.amp`` is on or off.

    bfloat16 where the device computes it natively (Ampere and newer GPUs, CPUs with AVX-512) needs no
    loss scaling; float16 on older GPUs uses a GradScaler; other CPUs stay in fp32. With amp off both
    are no-ops.
    """
    dtype = amp_dtype(config, device)
    if dtype is None:
        if config.amp:
            logger.warning('amp=True ignored: this %s has no native bfloat16 (emulated it is several times '
                           'slower than float32); computing in float32', device.type.upper())
        return contextlib.nullcontext(), torch.amp.GradScaler(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype), torch.amp.GradScaler(device.type,
                                                                          enabled=dtype == torch.float16)


def memory_format(config) -> torch.memory_format:
    """channels_last on the fast path unless ``config.channels_last`` says otherwise; NCHW on the plain."""
    if not config.fast_path:
        return torch.contiguous_format
    wanted = config.fast_path if config.channels_last is None else config.channels_last
    return torch.channels_last if wanted else torch.contiguous_format


def fused_kernels(config) -> bool:
    """Whether the Triton kernels run: they are part of the fast path (``triton_kernels`` without
    ``fast_path`` is refused when the config is checked, :func:`smmcl.config.check_switches`)."""
    return bool(config.triton_kernels and config.fast_path)


def for_training(model: nn.Module, config, graphs: bool = True) -> nn.Module:
    """The model in the configured memory format, with or without the Triton kernels and CUDA graphs
    (in place; parameters stay the same objects). ``graphs=False``: eager whatever ``cuda_graphs_training``
    says (a throwaway pass, :mod:`smmcl.engine.ahead`).

    Raises:
        ConfigError: ``cuda_graphs_training`` with SyncBatchNorm layers.
    """
    model = use_fused_kernels(model.to(memory_format=memory_format(config)), fused_kernels(config))
    recorded = graphs and bool(config.cuda_graphs_training)
    return use_training_graphs(use_fused_tails(model, bool(config.fast_path)), recorded)


def for_inference(model: nn.Module, config) -> nn.Module:
    """An eval-mode model for inference: folded and channels_last on the fast path, else ``model``;
    compiled with ``config.compile`` (on either path); with ``config.cuda_graphs`` wrapped in
    :class:`~smmcl.engine.graphs.GraphedInference`."""
    return wrap_for_inference(inference_model(model, config), config)


def wrap_for_inference(network: nn.Module, config) -> nn.Module:
    """:func:`inference_model`'s ``network`` compiled with ``config.compile``, then graphed with
    ``config.cuda_graphs``: what :func:`for_inference` returns, for a caller that keeps the eager network too."""
    return graphed(maybe_compile(network, config), config)


def inference_model(model: nn.Module, config) -> nn.Module:
    """The eval-mode network :func:`for_inference` runs: ``model`` itself on the plain path, a folded
    copy in the configured layout, with or without the Triton kernels, on the fast path."""
    if not config.fast_path:
        return model.eval()
    folded = fold_for_inference(model).to(memory_format=memory_format(config))
    device = next(folded.parameters()).device
    return cast_dense_layers(use_fused_kernels(use_fused_tails(folded), fused_kernels(config)),
                             amp_dtype(config, device))


def cast_dense_layers(model: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """``model`` (in place) with its dense convolutions' (``groups == 1``) and linear layers' weights and
    biases stored in ``dtype``, the autocast dtype it runs under (None: unchanged).

    Autocast casts these to ``dtype`` at every forward anyway, one kernel per tensor (about 250 per
    MSCAN-B dual forward); stored cast once, the forward computes the same bits. Depthwise convolutions
    keep float32: the Triton kernels read their weights as given and accumulate in float32.
    """
    if dtype is None:
        return model
    for module in model.modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            module.to(dtype)
    return model


class ReusedInference:
    """:func:`for_inference` built once and refreshed in place for each later model state, so that the
    CUDA graphs recorded in the first evaluation (one per input shape) replay in every later one, with
    the weights of each: the evaluation during training after each N epochs, ``eval.py`` over several
    checkpoints loaded into one model.

    Call it with the model to evaluate; the same model object each time (its tensors updated in place,
    as an optimizer or ``load_state_dict`` does). Another object starts afresh.
    """

    def __init__(self, config):
        self.config = config
        self._source = self._inner = self._runner = None

    def __call__(self, model: nn.Module) -> nn.Module:
        if model is not self._source:
            self._source, self._inner = model, inference_model(model, self.config)
            self._runner = wrap_for_inference(self._inner, self.config)
        elif self._inner is model:  # the plain path runs the model itself: its tensors are the graphs'
            model.eval()
        else:  # refold and copy into the recorded copy's tensors
            self._inner.load_state_dict(inference_model(model, self.config).state_dict())
        return self._runner


def maybe_compile(model: nn.Module, config) -> nn.Module:
    return torch.compile(model) if config.compile else model
