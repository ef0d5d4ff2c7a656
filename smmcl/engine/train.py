"""Training of SMMCL (Dong & Yokoya, WACV 2024), following the authors' CMX-derived ``train.py``.

``python SMMCL_LLRGBD/train.py [-d 0-3] [-c .../epoch-last.pth] [--set key=value ...]``

Read top to bottom: arguments and config -> processes (one per GPU, ``torchrun``, or one CPU process)
-> logging and seeds -> data check and loader (:mod:`smmcl.data.loader`) -> model, optimizer, lr
schedule -> resume -> the epoch loop of the authors (:func:`train_step`: forward, finite-loss check,
backward, step; the lr update after the step; :class:`EpochLog`) -> checkpoints on the authors'
schedule. What differs from their script is robustness and exact resume: atomic checkpoints that carry
RNG states, a collective non-finite-loss check, clean error messages, and augmentation seeded per sample
(see :class:`smmcl.data.loader.SeededSamples`); and one process per GPU where their ``-d 0-3`` runs
``nn.DataParallel``, computing the same (see :func:`norm_layer_for`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed
import torch.multiprocessing as mp
from tensorboardX import SummaryWriter
from torch import nn

from ..config import ConfigError, format_config, load_config
from ..data.check import quick_check
from ..data.dataset import DatasetError
from ..data.loader import TrainData, build_train_data, to_device
from ..models.builder import build_segmentor
from ..models.segmentor import EncoderDecoder
from . import dist
from .checkpoint import (CheckpointError, load_backbone_pretrained, read_checkpoint, remove_stale_temp_files,
                         restore_training_state, rng_state, save_checkpoint, should_save, training_state)
from .dist import norm_layer_for, wrap_ddp
from .logging_utils import TERMS, EpochLog, nonfinite_message, setup_logging
from .lr import WarmUpPolyLR, set_lr
from .optim import build_optimizer
from .precision import for_training, maybe_compile, mixed_precision
from .seeding import restore_rng, seed_everything

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite with ``nonfinite_loss='stop'``."""


# Problems with data, files or settings: reported as one message and exit code 1, no traceback. Any
# other exception (a bug, torch's own argument checks) keeps its traceback.
EXPECTED_ERRORS = (ConfigError, DatasetError, CheckpointError, NonFiniteLossError, FileNotFoundError)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train SMMCL (RGB-X semantic segmentation).')
    parser.add_argument('-d', '--devices', default='',
                        help="GPUs, e.g. '0-3' or '0,2': one process per GPU (default: GPU 0, else the CPU)")
    parser.add_argument('-c', '--continue', dest='resume', metavar='FILE',
                        help='resume from a checkpoint, e.g. log_.../checkpoint/epoch-last.pth')
    parser.add_argument('-p', '--port', type=int, default=None,
                        help='rendezvous port for several GPUs (default: a free one)')
    # Passed by torch.distributed.launch (the authors' launcher); the environment's LOCAL_RANK wins.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument('--set', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                        help='config overrides, e.g. --set batch_size=8 dataset_path=/data/LLRGBD')
    parser.add_argument('--cpu-procs', type=int, default=1, help=argparse.SUPPRESS)  # gloo CPU ranks (tests)
    return parser.parse_args(argv)


def fail(message) -> None:
    print(f'error: {message}', file=sys.stderr, flush=True)
    raise SystemExit(1)


def main(config_path: str, argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the experiment folders' ``train.py``: parse ``argv``, load ``config_path``, train."""
    args = parse_args(argv)
    try:
        config = load_config(config_path, args.set)
    except (ConfigError, FileNotFoundError) as error:
        fail(error)
    try:
        dist.launch(run, dist.parse_devices(args.devices), args=(config, args.resume), port=args.port,
                    timeout_s=config.dist_timeout_s, cpu_procs=args.cpu_procs)
    except mp.ProcessExitedException as error:
        # mp.spawn has already terminated the other processes.
        fail(f'training stopped: {error}; the other processes were stopped too')
    except mp.ProcessRaisedException as error:
        fail(f'training failed in a worker process; the other processes were stopped too.{error}')


def run(ctx: dist.DistContext, config, resume: Optional[str] = None) -> None:
    """One process' training, turning expected failures into a message and exit code 1."""
    try:
        train(ctx, config, resume)
    except EXPECTED_ERRORS as error:
        # A non-finite loss is detected collectively: every rank raises it, rank 0 reports it.
        if ctx.is_main or not isinstance(error, NonFiniteLossError):
            logger.error('%s', error_message(error))
        raise SystemExit(1)
    except torch.distributed.DistError as error:
        logger.error('lost contact with another training process (it failed or was killed): %s', error)
        raise SystemExit(1)


def error_message(error: Exception) -> str:
    """The message of ``error``; for one re-raised from a DataLoader worker (PyTorch re-raises it with
    the worker's traceback as its message), only the original message."""
    message = str(error)
    if 'Original Traceback' in message:
        message = message.rsplit(f'{type(error).__name__}: ', 1)[-1].strip()
    return message


@dataclass
class Loop:
    """What every iteration of the training loop uses (built once by :func:`train`)."""
    model: nn.Module  # the model that steps: DDP-wrapped with several processes, maybe compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: object  # autocast context (or nullcontext) of smmcl.engine.precision
    policy: WarmUpPolyLR
    data: TrainData
    config: object
    ctx: dist.DistContext
    tb: Optional[SummaryWriter]  # rank 0 only


def train(ctx: dist.DistContext, config, resume: Optional[str] = None) -> nn.Module:
    """Train ``config``'s model in this process (one rank of ``ctx``); returns the unwrapped model."""
    prepare_process(ctx, config)
    quick_check(config, splits=('train',))  # cheap: folders, list file, files exist
    data = build_train_data(config, ctx)
    if ctx.is_main:
        logger.debug('effective config:\n%s', format_config(config))  # to the log file only
        logger.info('log file: %s (with the effective config)', config.log_file)
    model = for_training(build_model(config, ctx), config)
    optimizer = build_optimizer(model, config)
    amp, scaler = mixed_precision(config, ctx.device)
    niters = data.niters
    policy = WarmUpPolyLR(config.lr, config.lr_power, config.nepochs * niters, niters * config.warm_up_epoch)
    start_epoch = resume_from(resume, model, optimizer, scaler, config, ctx, niters) if resume else 1
    # ``model`` stays the unwrapped module we save (rank 0's weights and BatchNorm statistics).
    tb = SummaryWriter(config.tb_dir) if ctx.is_main else None
    stepping = maybe_compile(wrap_ddp(model, ctx), config)
    loop = Loop(stepping, optimizer, scaler, amp, policy, data, config, ctx, tb)
    if ctx.is_main:
        logger.info('begin training: epochs %d..%d, %d iterations each, %d process(es) on %s, batch %d per '
                    'process', start_epoch, config.nepochs, niters, ctx.world_size, ctx.device.type,
                    data.loader.batch_size)
    try:
        for epoch in range(start_epoch, config.nepochs + 1):
            data.sampler.set_epoch(epoch)
            train_one_epoch(loop, epoch)
            if should_save(epoch, config):
                save(model, loop, epoch)
    finally:
        if tb is not None:
            tb.close()
    return model


def train_one_epoch(loop: Loop, epoch: int) -> None:
    """The authors' iteration loop for one epoch (``loop.data.niters`` batches)."""
    loop.model.train()
    log = EpochLog(epoch, loop.config.nepochs, loop.data.niters, loop.tb)
    batches = iter(loop.data.loader)
    for idx in log.progress:
        lr = loop.optimizer.param_groups[0]['lr']
        values = train_step(loop, next(batches))
        # CMX sets the lr *after* optimizer.step() from the index of the iteration just run, so global
        # step k runs with lr(k - 1) and step 0 with the optimizer's initial lr (see smmcl.engine.lr).
        step = (epoch - 1) * loop.data.niters + idx
        set_lr(loop.optimizer, loop.policy.get_lr(step))
        log_step(loop, log, values, idx, step, lr)
    log.end(loop.optimizer.param_groups[0]['lr'])


def train_step(loop: Loop, batch) -> torch.Tensor:
    """Forward, backward and optimizer step on one batch; a batch whose loss terms are not all finite on
    some rank is skipped by every rank (no update; with ``nonfinite_loss='skip'`` the BatchNorm
    statistics it touched are rolled back).

    Returns:
        WORLD-5 float32 loss terms (:data:`TERMS`) of every rank, left on the device.
    """
    rgb, modal_x, label = to_device(batch, loop.config, loop.ctx.device)
    with BufferRollback(loop.model, loop.config.nonfinite_loss == 'skip') as rollback:
        with loop.amp:
            terms = loop.model(rgb, modal_x, label, return_terms=True)
        # One small all-gather per iteration: every rank learns every rank's terms, so all decide alike
        # whether to step, and the logged loss is the mean over ranks (CMX's all_reduce_tensor).
        values = dist.all_gather(torch.stack([terms[k].detach().float() for k in TERMS]))
        loop.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(values).all())  # one flag read on the host: step or not
        if finite:
            loop.scaler.scale(terms['loss']).backward()
            loop.scaler.step(loop.optimizer)
            loop.scaler.update()
        rollback.undo = not finite
    return values


def log_step(loop: Loop, log: EpochLog, values: torch.Tensor, idx: int, step: int, lr: float) -> None:
    """Read iteration ``idx``'s WORLD-5 terms on the host and record them (global ``step``, run with
    ``lr``). The host reads them every step: stopping at, or counting, a non-finite loss needs each one.

    Raises:
        NonFiniteLossError: a term is not finite and ``nonfinite_loss='stop'``.
    """
    values = values.double().cpu()
    if not torch.isfinite(values).all():
        message = nonfinite_message(values, log.epoch, idx, log.niters)
        if loop.config.nonfinite_loss == 'stop':
            raise NonFiniteLossError(message + '; stopping (the checkpoints written so far are intact; '
                                     "--set nonfinite_loss=skip skips such batches)")
        log.skip(message)
    log.record(values, idx, step, lr)


class BufferRollback:
    """Puts ``model``'s buffers back on exit when ``undo`` was set (only if ``enabled``: a few small copies).

    A forward that produced NaNs may already have written them into the BatchNorm running statistics;
    skipping the batch must undo that too.
    """

    def __init__(self, model: nn.Module, enabled: bool):
        self.model, self.enabled, self.undo, self.saved = model, enabled, False, None

    def __enter__(self) -> 'BufferRollback':
        if self.enabled:
            self.saved = [b.detach().clone() for b in self.model.buffers()]
        return self

    def __exit__(self, *exc_info) -> None:
        if self.undo and self.saved is not None:
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), self.saved):
                    buffer.copy_(saved)


# ---- set-up, resume, checkpoints ----------------------------------------------------------------

def prepare_process(ctx: dist.DistContext, config) -> None:
    """Logging, the log and checkpoint folders (rank 0), CPU threads and this rank's seeds."""
    setup_logging(config.log_file if ctx.is_main else None, ctx.rank)
    if ctx.is_main:
        for folder in (config.log_dir, config.tb_dir, config.checkpoint_dir):
            os.makedirs(folder, exist_ok=True)
        stale = remove_stale_temp_files(config.checkpoint_dir)
        if stale:
            logger.info('removed %d temporary files of an interrupted save: %s', len(stale), stale)
    if ctx.device.type == 'cpu' and ctx.distributed:  # several CPU ranks share the cores
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // ctx.world_size)))
    # The authors seed torch with config.seed in their one-process DataParallel run (-d 0-3) and with
    # the local rank under DDP (ignoring config.seed); we use config.seed + rank: rank 0 (whose initial
    # weights DDP broadcasts) gets config.seed, and the ranks still draw different numbers.
    seed_everything(config.seed + ctx.rank, config.deterministic)


def resume_from(path: str, model: nn.Module, optimizer, scaler, config, ctx: dist.DistContext,
                niters: int) -> int:
    """Load checkpoint ``path`` into the model, optimizer, scaler and this rank's random streams;
    returns the first epoch to run (CMX's restore_checkpoint: the checkpoint's epoch + 1)."""
    state = read_checkpoint(path)
    restore_training_state(state, model, optimizer, config, path, scaler)
    start_epoch = state['epoch'] + 1
    restore_rng(state, ctx, config.seed)
    if ctx.is_main:
        logger.info('resumed from %s (epoch %d); continuing at epoch %d', path, state['epoch'], start_epoch)
        if state.get('lr_step', state['epoch'] * niters) != state['epoch'] * niters:
            logger.warning('the checkpoint was trained with another niters_per_epoch; the lr schedule '
                           'continues from epoch %d of this one', start_epoch)
    return start_epoch


def save(model: nn.Module, loop: Loop, epoch: int) -> None:
    """Write the checkpoint of ``epoch`` (rank 0) with every rank's random streams, for an exact resume."""
    rng = dist.all_gather_object(rng_state(loop.ctx.device))
    if loop.ctx.is_main:
        niters = loop.data.niters
        state = training_state(model, loop.optimizer, epoch, niters - 1, epoch * niters, rng, loop.config,
                               loop.scaler)
        logger.info('saved %s', save_checkpoint(state, loop.config.checkpoint_dir))


def build_model(config, ctx: dist.DistContext) -> EncoderDecoder:
    """The segmentor with its losses, the BatchNorm of :func:`norm_layer_for` and the ImageNet weights
    of ``config.pretrained_model`` (when set), on this rank's device."""
    model = build_segmentor(config, norm_layer=norm_layer_for(config, ctx), with_loss=True)
    load_backbone_pretrained(model, config)
    return model.to(ctx.device)
