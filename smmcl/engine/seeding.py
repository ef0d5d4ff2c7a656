"""Each training process' random streams: seeding at the start, continuing them on resume."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from .checkpoint import set_rng_state
from .dist import DistContext

logger = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch (every device) with ``seed``; ``deterministic`` kernels or cuDNN's
    autotuned ones."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # CPU and every CUDA device
    # The authors set cudnn.benchmark = True; it picks kernels by timing, which is not reproducible.
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    # warn_only: some CUDA kernels (bilinear upsampling's backward) have no deterministic version, so
    # on GPUs this warns instead of failing; on the CPU every op used here is deterministic.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def restore_rng(state, ctx: DistContext, seed: int) -> None:
    """Continue every rank's random streams from the checkpoint (exact resume)."""
    rng = state.get('rng')
    if rng and len(rng) == ctx.world_size:
        set_rng_state(rng[ctx.rank], ctx.device)
        return
    # The authors' checkpoints carry no generator states, and a run on another number of processes
    # has no state for every rank: fresh seeds that differ from the first epochs'.
    seed_everything(seed + ctx.rank + 1000 * state['epoch'], torch.are_deterministic_algorithms_enabled())
    if ctx.is_main:
        logger.warning('the checkpoint holds no random states for %d process(es); resuming with fresh seeds '
                       '(not bit-identical to an uninterrupted run)', ctx.world_size)
