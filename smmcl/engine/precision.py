"""Speed switches shared by training and evaluation (issue: fast on the GPU, same function).

- ``config.amp``: bf16 autocast (fp16 + GradScaler on GPUs without bf16); the NMF and the InfoNCE
  always run in fp32 (see ``smmcl.models.ham_head`` and ``smmcl.losses.contrastive``).
- ``config.fast_path``: channels_last tensors and, for inference, BN and layer scales folded into the
  convolutions (``smmcl.models.fast.fold_for_inference``). The plain path (both off) is the reference
  the tests compare against.
- ``config.compile``: ``torch.compile`` the model (optional: compiling MSCAN-B takes minutes; inductor
  caches its artifacts, so later runs start faster).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..models.fast import fold_for_inference


def mixed_precision(config, device: torch.device):
    """(autocast context, grad scaler): one code path whether ``config.amp`` is on or off.

    bfloat16 where the device supports it (CPU, Ampere and newer GPUs) needs no loss scaling; float16 on
    older GPUs uses a GradScaler. With amp off both are no-ops.
    """
    if not config.get('amp', False):
        return contextlib.nullcontext(), torch.amp.GradScaler(device.type, enabled=False)
    bf16 = device.type != 'cuda' or torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float16
    return torch.autocast(device.type, dtype=dtype), torch.amp.GradScaler(device.type, enabled=not bf16)


def memory_format(config) -> torch.memory_format:
    return torch.channels_last if config.get('fast_path', False) else torch.contiguous_format


def for_training(model: nn.Module, config) -> nn.Module:
    """The model in the configured memory format (in place; parameters stay the same objects)."""
    return model.to(memory_format=memory_format(config))


def for_inference(model: nn.Module, config) -> nn.Module:
    """An eval-mode model for inference: folded and channels_last on the fast path, else ``model``."""
    if not config.get('fast_path', False):
        return model.eval()
    folded = fold_for_inference(model).to(memory_format=torch.channels_last)
    return torch.compile(folded) if config.get('compile', False) else folded


def maybe_compile(model: nn.Module, config) -> nn.Module:
    return torch.compile(model) if config.get('compile', False) else model
