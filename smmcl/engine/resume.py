"""Where a run continues: ``-c FILE`` or ``-c auto``, and loading the checkpoint into this process.

A checkpoint written by any number of processes resumes on any other exactly: the model, optimizer and
loss scale are the state, and every random draw of training is seeded from the step, the chunk or the
sample (:mod:`smmcl.engine.chunks`, :class:`smmcl.data.loader.SeededSamples`). An iteration checkpoint
continues its epoch at the next global batch of the same order, with the lr it would have had.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

from torch import nn

from . import dist
from .checkpoint import (SCHEDULE_KEYS, CheckpointError, latest_checkpoint, read_checkpoint,
                         restore_training_state)
from .lr import WarmUpPolyLR
from .seeding import restore_rng

logger = logging.getLogger(__name__)


def resolve_resume(resume: Optional[str], config, ctx: dist.DistContext, niters: int) -> Optional[str]:
    """``resume`` itself, or for ``'auto'`` the newest complete checkpoint of ``config.checkpoint_dir``
    (:func:`~smmcl.engine.checkpoint.latest_checkpoint`; rank 0's choice, for every rank) or None."""
    if resume != 'auto':
        return resume
    found = latest_checkpoint(config.checkpoint_dir, niters) if ctx.is_main else None
    path = dist.all_gather_object(found)[0]  # every rank resumes what rank 0 found
    if ctx.is_main:
        logger.info('-c auto: %s', f'resuming from {path}' if path else
                    f'no checkpoint in {config.checkpoint_dir} yet; starting fresh')
    return path


def resume_from(path: str, model: nn.Module, optimizer, scaler, config, ctx: dist.DistContext,
                niters: int) -> Tuple[int, int]:
    """Load checkpoint ``path`` into the model, optimizer and scaler; returns the epoch and iteration to
    continue at (CMX's restore_checkpoint: the checkpoint's epoch + 1; an iteration checkpoint's
    ``next_iteration`` within it)."""
    state = read_checkpoint(path)
    restore_training_state(state, model, optimizer, config, path, scaler)
    restore_rng(state, ctx, config.seed)
    epoch, first = state['epoch'] + 1, state.get('next_iteration', 0)
    if first >= niters:
        raise CheckpointError(f'{path} stopped after {first} iterations of epoch {epoch}, but an epoch has '
                              f'{niters} now; resume it with the niters_per_epoch it was trained with')
    if ctx.is_main:
        done = f' and {first} iterations of epoch {epoch}' if first else ''
        at = f' iteration {first + 1}/{niters}' if first else ''
        logger.info('resumed from %s (epoch %d%s); continuing at epoch %d%s', path, state['epoch'], done,
                    epoch, at)
        if state.get('lr_step', state['epoch'] * niters + first) != state['epoch'] * niters + first:
            logger.warning('the checkpoint was trained with another niters_per_epoch; the lr schedule '
                           'continues from epoch %d of this one', epoch)
        changed = schedule_changes(state, config)
        if changed:
            logger.warning('%s', schedule_change_message(state, config, changed, niters, path))
    return epoch, first


def schedule_changes(state, config) -> List[str]:
    """'key: old -> new' for each :data:`~smmcl.engine.checkpoint.SCHEDULE_KEYS` value of ``config``
    that differs from the run that wrote ``state`` (checkpoints that do not store it: none)."""
    saved = state.get('config') or {}
    return [f'{key} {saved[key]!r} -> {config[key]!r}' for key in SCHEDULE_KEYS
            if key in saved and saved[key] != config[key]]


def schedule_change_message(state, config, changed: List[str], niters: int, path: str) -> str:
    """What resuming ``path`` with other schedule settings does to the learning rate: the next step
    runs with the rate stored in the checkpoint, the ones after it with this run's schedule."""
    done = state.get('lr_step', state['epoch'] * niters)
    policy = WarmUpPolyLR(config.lr, config.lr_power, config.nepochs * niters, niters * config.warm_up_epoch)
    stored = state['optimizer']['param_groups'][0]['lr']
    return (f'resuming {path} with schedule settings other than its run\'s: {", ".join(changed)}. The lr '
            f'schedule is this run\'s from global step {done} on ({config.nepochs * niters} steps, '
            f'{niters * config.warm_up_epoch} of warm-up, base lr {config.lr}): the next step runs with the '
            f'checkpoint\'s lr {stored:.4e}, the one after with {policy.get_lr(done):.4e} (the checkpoint\'s run '
            f'would have continued smoothly from {stored:.4e}); batch_size and replicas also change what a '
            f'step is (images, BatchNorm chunks) and the order of images')
