"""The host's reads of the training step: when the loss terms are read, and what a non-finite one does.

With ``host_sync_every = 1`` (the authors' loop: their tqdm line shows every iteration's loss) the loss
terms are read every iteration; with N > 1 they wait on the device and are read N at a time
(:func:`flush_log`), while the decision to step or skip a non-finite batch stays on the device
(:func:`skips_on_device`: fused AdamW's ``found_inf``). Every iteration is still recorded, in order.
The functions take the training's :class:`smmcl.engine.train.Loop` (its optimizer's scaler, config,
chunk plan and lr policy).
"""
from __future__ import annotations

import logging
from typing import List, NamedTuple

import torch

from . import dist
from .logging_utils import EpochLog, nonfinite_message

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite with ``nonfinite_loss='stop'``."""


def skips_on_device(config, scaler: torch.amp.GradScaler, ctx: dist.DistContext) -> bool:
    """Whether :func:`smmcl.engine.train.train_step` decides on the device to step or skip: with ``host_sync_every > 1``,
    unless fp16 loss scaling is on (GPUs without bf16): the GradScaler makes its own skip decision
    (overflowed gradients) through the same ``found_inf`` of the optimizer, and merging ours into it
    is not done."""
    if config.host_sync_every == 1:
        return False
    if scaler.is_enabled():
        if ctx.is_main:
            logger.info('host_sync_every=%d with fp16 loss scaling: whether a batch with a non-finite loss '
                        'steps is still read on the host every iteration (the GradScaler owns the '
                        "optimizer's device-side skip); the loss terms are read every %d iterations",
                        config.host_sync_every, config.host_sync_every)
        return False
    return True


class PendingStep(NamedTuple):
    """An iteration whose loss terms have not been read on the host yet (see :func:`flush_log`)."""
    values: torch.Tensor  # CHUNKS-5 loss terms on the device (:func:`train_step`)
    idx: int  # iteration within the epoch
    step: int  # global step
    lr: float  # the lr it ran with


def flush_log(loop, log: EpochLog, pending: List[PendingStep]) -> None:
    """Read the terms of every ``pending`` iteration on the host in one transfer, record each in turn
    (:func:`log_step`) and empty ``pending``. With ``host_sync_every = N > 1`` this is where a
    non-finite batch of the last N is noticed: it was already skipped on the device (weights, AdamW
    state and, with 'skip', BatchNorm statistics untouched); here it is counted, or, with 'stop', the
    run stops naming that batch's iteration, the later ones having stepped (their weights finite).

    Raises:
        NonFiniteLossError: from :func:`log_step`, at the first non-finite iteration with 'stop'.
    """
    if not pending:
        return
    host = torch.stack([item.values for item in pending]).double().cpu()  # the one host read
    steps = list(pending)
    pending.clear()
    for values, item in zip(host, steps):
        log_step(loop, log, values, item)


def log_step(loop, log: EpochLog, values: torch.Tensor, item: PendingStep) -> None:
    """Record iteration ``item``'s CHUNKS-5 terms ``values``, read on the host. Every iteration is
    recorded: stopping at, or counting, a non-finite loss needs each one (:func:`flush_log` hands them
    over already on the host, ``host_sync_every`` at a time).

    Raises:
        NonFiniteLossError: a term is not finite and ``nonfinite_loss='stop'``.
    """
    values = values.double().cpu()
    if not torch.isfinite(values).all():
        message = nonfinite_message(values, log.epoch, item.idx, log.niters, loop.plan.per_process)
        if loop.config.nonfinite_loss == 'stop':
            raise NonFiniteLossError(message + '; stopping (the checkpoints written so far are intact; '
                                     "--set nonfinite_loss=skip skips such batches)")
        log.skip(message)
    log.record(values, item.idx, item.step, item.lr, loop.policy.get_lr(item.step))
