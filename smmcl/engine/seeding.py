"""Each training process' random streams: seeding at the start, per chunk, and on resume."""
from __future__ import annotations

import logging
import os
import random
from typing import Any, Dict

import numpy as np
import torch

from .dist import DistContext

logger = logging.getLogger(__name__)


def rng_state(device: torch.device = torch.device('cpu')) -> Dict[str, Any]:
    """This process' generator states, in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(),
             'numpy': {'name': name, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
             'torch': torch.get_rng_state()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device = torch.device('cpu')) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_to_tuple(state['python']))
    npst = state['numpy']
    np.random.set_state((npst['name'], npst['keys'].numpy().astype(np.uint32), npst['pos'],
                         npst['has_gauss'], npst['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def kept_rng(device):
    """A context restoring the CPU's and ``device``'s random generators on exit: evaluation seeds per
    image and the CUDA-graph warm-ups draw, and the caller's random stream (training's) goes on as it was."""
    device = torch.device(device)
    devices = []
    if device.type == 'cuda':
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    return torch.random.fork_rng(devices=devices)


def seed_generators(seed: int) -> None:
    """Seed Python's ``random``, NumPy's and torch's generators (the CPU's and every device's)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # CPU and every CUDA device


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch (every device) with ``seed``; ``deterministic`` kernels or cuDNN's
    autotuned ones."""
    seed_generators(seed)
    # The authors set cudnn.benchmark = True; it picks kernels by timing, which is not reproducible.
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    # warn_only: some CUDA kernels (bilinear upsampling's backward) have no deterministic version, so
    # on GPUs this warns instead of failing; on the CPU every op used here is deterministic.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def restore_rng(state, ctx: DistContext, seed: int) -> None:
    """Continue every rank's random streams from the checkpoint when it holds one per rank.

    Training itself does not need them: every draw of a training step is seeded from (seed, step,
    chunk) (:func:`smmcl.engine.chunks.chunk_seed`) and every augmentation from (seed, epoch, index)
    (:class:`smmcl.data.loader.SeededSamples`), so a checkpoint of any number of processes, or the
    authors' (no generator states), resumes exactly. The states are restored where they fit only so
    that anything else drawing from the global streams continues as it would have.
    """
    rng = state.get('rng')
    if rng and len(rng) == ctx.world_size:
        set_rng_state(rng[ctx.rank], ctx.device)
        return
    seed_everything(seed + ctx.rank + 1000 * state['epoch'], torch.are_deterministic_algorithms_enabled())
    if ctx.is_main:
        logger.debug('the checkpoint holds no random states for %d process(es); fresh global seeds (the '
                     'training draws are seeded per step and chunk, so this changes nothing)', ctx.world_size)
