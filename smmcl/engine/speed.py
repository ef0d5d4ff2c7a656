"""``speed``: the speed switches in one word, resolved once at start, when the device is known.

``speed='reference'`` (default) leaves every switch as set: the plain path, the authors' function.
``speed='fast'`` sets the fastest measured combination for the job (``'train'``, ``'eval'``,
``'predict'``) and the device type into the switches the user did not set (a switch assigned in
``config.py`` or given with ``--set`` wins over the preset), then checks the combination and logs the
effective plan in one line. Every fast path computes the same function as the plain one (tests compare
them). The presets, from the measurements in ``docs/speed.md``:

- CUDA (H200 table): training ``fast_path amp triton_kernels channels_last=False cuda_graphs_training
  host_sync_every=50``; evaluation ``fast_path amp triton_kernels eval_batch_size=8``; prediction that
  plus ``cuda_graphs``. Without Triton the kernels stay off; with ``sync_bn`` on several processes the
  training graphs stay off (collectives cannot be recorded).
- CPU (2 cores, MSCAN-T, batch 2, 240x320, ``bench/bench.py``: training x1.22, inference x1.52,
  evaluation x1.17): ``fast_path``, ``amp`` where the CPU computes bf16 natively, ``eval_batch_size=2``.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Dict

import torch

from ..config import check_switches
from .precision import native_bf16

logger = logging.getLogger(__name__)

SWITCHES = ('fast_path', 'channels_last', 'amp', 'compile', 'triton_kernels', 'cuda_graphs',
            'cuda_graphs_training', 'host_sync_every', 'eval_batch_size')
_CUDA_INFERENCE = dict(fast_path=True, amp=True, triton_kernels=True, eval_batch_size=8)
PRESETS: Dict[str, Dict[str, dict]] = {
    'cuda': dict(train=dict(fast_path=True, amp=True, triton_kernels=True, channels_last=False,
                            cuda_graphs_training=True, host_sync_every=50),
                 eval=_CUDA_INFERENCE, predict=dict(_CUDA_INFERENCE, cuda_graphs=True)),
    'cpu': dict(train=dict(fast_path=True, amp=True), eval=dict(fast_path=True, amp=True, eval_batch_size=2),
                predict=dict(fast_path=True, amp=True, eval_batch_size=2)),
}


def preset(config, device: torch.device, job: str, world_size: int = 1) -> dict:
    """The switches ``speed='fast'`` sets for ``job`` on ``device``, less what cannot act there."""
    chosen = dict(PRESETS.get(device.type, PRESETS['cpu'])[job])
    if chosen.get('amp') and not native_bf16(device) and device.type != 'cuda':
        chosen.pop('amp')  # emulated bf16 is slower than fp32
    if chosen.get('triton_kernels') and importlib.util.find_spec('triton') is None:
        chosen.pop('triton_kernels')
    if chosen.get('cuda_graphs_training') and config.sync_bn and world_size > 1:
        chosen.pop('cuda_graphs_training')
    if config.optimizer == 'SGDM':
        chosen.pop('host_sync_every', None)  # the device-side skip needs fused AdamW
    return chosen


def resolve_speed(config, device: torch.device, job: str, world_size: int = 1, log: bool = True) -> dict:
    """Apply ``config.speed`` for ``job`` on ``device`` (once: later calls change nothing), check the
    switches' combination and log the plan; returns the switches it set.

    Raises:
        ConfigError: a combination that cannot act or conflicts (:func:`smmcl.config.check_switches`).
    """
    if config.get('_speed_resolved'):
        return {}
    explicit = set(config.get('_pinned', ())) | set(config.get('_assigned', ()))
    applied = {}
    if config.speed == 'fast':
        applied = {k: v for k, v in preset(config, device, job, world_size).items() if k not in explicit}
        config.update(applied)
    check_switches(config, world_size)
    config._speed_resolved = True
    if log:
        logger.info('speed plan (%s, %s on %s): %s', config.speed, job, device.type, describe(config, job))
    return applied


def describe(config, job: str) -> str:
    """The effective switches in one line, with what they imply."""
    parts = [f'{key}={config[key]}' for key in SWITCHES
             if key not in ('host_sync_every', 'cuda_graphs_training') or job == 'train']
    if job == 'train' and config.host_sync_every > 1:
        parts.append('(host_sync_every > 1: fused AdamW, non-finite batches skipped on the device)')
    if config.cuda_graphs or config.cuda_graphs_training:
        parts.append('(CUDA graphs: on CUDA devices only, elsewhere the model runs as it is)')
    return ' '.join(parts)
