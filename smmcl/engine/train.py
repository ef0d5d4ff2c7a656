"""Training of SMMCL (Dong & Yokoya, WACV 2024), following the authors' CMX-derived ``train.py``.

``python SMMCL_LLRGBD/train.py [-d 0-3] [-c .../epoch-last.pth] [--set key=value ...]``

Read top to bottom: arguments and config -> processes (one per GPU, ``torchrun``, or one CPU process)
-> logging and seeds -> data check and loader (:mod:`smmcl.data.loader`) -> model, optimizer, lr
schedule -> resume (``-c FILE`` or ``-c auto``) -> the Triton kernels, if on, compiled ahead
(:mod:`smmcl.engine.ahead`) -> the epoch loop of the authors (:func:`train_step`:
forward and backward of each chunk, finite-loss check, step; the lr update after the step;
:class:`EpochLog`, fed every ``host_sync_every`` iterations by :func:`flush_log`) -> checkpoints on the
authors' schedule (and every ``checkpoint_every_iters``).

Their ``-d 0-3`` runs ``nn.DataParallel`` on 4 GPUs; we run ``config.replicas`` chunks of every global
batch as their 4 GPUs would, on however many processes (:mod:`smmcl.engine.chunks`), so one GPU, four,
or torchrun across nodes train the same run. What differs from their script is robustness and exact
resume: atomic checkpoints, a collective non-finite-loss check, clean error messages, draws seeded per
sample (:class:`smmcl.data.loader.SeededSamples`) and per chunk, so that a checkpoint resumes exactly on
any number of processes, also in the middle of an epoch.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed
import torch.multiprocessing as mp
from tensorboardX import SummaryWriter
from torch import nn

from .. import cli
from ..config import ConfigError, format_config, load_config
from ..data.check import quick_check
from ..data.dataset import DatasetError
from ..data.loader import TrainData, build_train_data, to_device
from ..models.builder import build_segmentor
from ..models.segmentor import EncoderDecoder
from . import dist
from .ahead import compile_ahead_of_training
from .checkpoint import (CheckpointError, load_backbone_pretrained, remove_stale_temp_files, save_checkpoint,
                         save_iteration_checkpoint, should_save, training_state)
from .chunks import BufferRollback, ChunkPlan, plan_chunks, run_chunks
from .dist import norm_layer_for, wrap_ddp
from .host_sync import NonFiniteLossError, PendingStep, flush_log, skips_on_device
from .logging_utils import EpochLog, setup_logging, tensorboard_run_dir, warn_without_contrast
from .lr import WarmUpPolyLR, set_lr
from .optim import build_optimizer, step_unless_nonfinite
from .precision import for_training, maybe_compile, memory_format, mixed_precision
from .resume import resolve_resume, resume_from
from .seeding import rng_state, seed_everything
from .speed import resolve_speed
from .watch import Watcher

logger = logging.getLogger(__name__)


# Problems with data, files or settings: reported as one message and exit code 1, no traceback. Any
# other exception (a bug, torch's own argument checks) keeps its traceback.
EXPECTED_ERRORS = (ConfigError, DatasetError, CheckpointError, NonFiniteLossError, FileNotFoundError)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train SMMCL (RGB-X semantic segmentation).')
    cli.add_devices(parser, default='')
    cli.add_resume(parser)
    cli.add_port(parser, '-p', '--port')
    cli.add_local_rank(parser)
    cli.add_set(parser)
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
    module: nn.Module  # the unwrapped model we save (rank 0's weights and BatchNorm statistics)
    ddp: Optional[nn.Module]  # the DDP wrapper inside ``model`` (None in one process), for no_sync()
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: object  # autocast context (or nullcontext) of smmcl.engine.precision
    policy: WarmUpPolyLR
    data: TrainData
    plan: ChunkPlan
    config: object
    ctx: dist.DistContext
    tb: Optional[SummaryWriter]  # rank 0 only
    skip_on_device: bool = False  # host_sync_every > 1 without a GradScaler: see :func:`train_step`


def train(ctx: dist.DistContext, config, resume: Optional[str] = None) -> nn.Module:
    """Train ``config``'s model in this process (one rank of ``ctx``); returns the unwrapped model.
    ``resume``: a checkpoint, ``'auto'`` (:func:`resolve_resume`) or None."""
    prepare_process(ctx, config)
    resolve_speed(config, ctx.device, 'train', ctx.world_size, log=ctx.is_main)
    plan = plan_chunks(config, ctx)  # refuses an impossible split before anything is loaded
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
    resume = resolve_resume(resume, config, ctx, niters)
    start_epoch, first = (resume_from(resume, model, optimizer, scaler, config, ctx, niters) if resume
                          else (1, 0))
    compile_ahead_of_training(config, ctx, plan.chunk_size)  # with the Triton kernels: all at once, not per shape
    ddp = wrap_ddp(model, ctx)
    loop = Loop(maybe_compile(ddp, config), model, ddp if ddp is not model else None, optimizer, scaler, amp,
                policy, data, plan, config, ctx,
                SummaryWriter(tensorboard_run_dir(config.tb_dir)) if ctx.is_main else None,
                skips_on_device(config, scaler, ctx))
    if ctx.is_main:
        logger.info('begin training: epochs %d..%d, %d iterations each, %d process(es) on %s, batch %d per '
                    'process; %s', start_epoch, config.nepochs, niters, ctx.world_size, ctx.device.type,
                    data.loader.batch_size, plan.describe())
    watcher = Watcher(config, ctx)
    try:
        for epoch in range(start_epoch, config.nepochs + 1):
            data.sampler.set_epoch(epoch, first)
            train_one_epoch(loop, epoch, first)
            first = 0  # only a resumed epoch starts in the middle
            if should_save(epoch, config):
                save(loop, epoch * niters)
            if watcher.due(epoch):  # after the save: a failing evaluation loses no checkpoint
                watcher(loop.module, epoch, loop.tb)
    finally:
        if loop.tb is not None:
            loop.tb.close()
    return model


def train_one_epoch(loop: Loop, epoch: int, first: int = 0) -> None:
    """The authors' iteration loop for one epoch (``loop.data.niters`` global batches, from ``first``).

    The loss terms of each iteration wait on the device and are read on the host every
    ``host_sync_every`` iterations, at the epoch's end and before an iteration checkpoint
    (:func:`flush_log`); with 1, the authors' behaviour, every iteration.
    """
    loop.model.train()
    niters, every = loop.data.niters, loop.config.checkpoint_every_iters
    log = EpochLog(epoch, loop.config.nepochs, niters, loop.tb, first)
    pending: List[PendingStep] = []
    batches = iter(loop.data.loader)
    for idx in log.progress:
        lr = loop.optimizer.param_groups[0]['lr']
        step = (epoch - 1) * niters + idx
        pending.append(PendingStep(train_step(loop, next(batches), step), idx, step, lr))
        # CMX sets the lr *after* optimizer.step() from the index of the iteration just run, so global
        # step k runs with lr(k - 1) and step 0 with the optimizer's initial lr (see smmcl.engine.lr).
        set_lr(loop.optimizer, loop.policy.get_lr(step))
        # An iteration checkpoint, unless the epoch's own checkpoint is about to be written.
        last = idx == niters - 1
        checkpoint = every and (step + 1) % every == 0 and not (last and should_save(epoch, loop.config))
        if checkpoint or last or len(pending) >= loop.config.host_sync_every:
            flush_log(loop, log, pending)
        if checkpoint:
            save(loop, step + 1)
    warn_without_contrast(log.end(loop.optimizer.param_groups[0]['lr']), epoch, loop.config, loop.plan)


def train_step(loop: Loop, batch, step: int) -> torch.Tensor:
    """Global step ``step`` (0-based) on this process' share ``batch`` of the global batch: forward and
    backward of each of its chunks (:func:`smmcl.engine.chunks.run_chunks`), then the optimizer step. A
    batch whose loss terms are not all finite in some chunk is skipped by every rank (no update; with
    ``nonfinite_loss='skip'`` the BatchNorm statistics it touched are rolled back).

    With ``loop.skip_on_device`` (``host_sync_every > 1``) that decision never reaches the host: the
    finiteness flag stays a device tensor, fused AdamW skips the update on the device
    (:func:`smmcl.engine.optim.step_unless_nonfinite`) and the buffers are restored there too; the
    skip (or the stop) is reported when the terms are next read (:func:`flush_log`). Otherwise the flag
    is read on the host every step, as the authors' loop does.

    Returns:
        CHUNKS-5 float32 loss terms (:data:`~smmcl.engine.logging_utils.TERMS`) of every chunk of the
        global batch, in chunk order, left on the device.
    """
    inputs = to_device(batch, loop.config, loop.ctx.device, memory_format(loop.config))
    with BufferRollback(loop.model, loop.config.nonfinite_loss == 'skip') as rollback:
        loop.optimizer.zero_grad(set_to_none=True)
        # Every chunk's backward runs before the finiteness check (a rank cannot skip its backward alone:
        # DDP all-reduces in it); a skipped batch only wastes that backward.
        local = run_chunks(loop.model, inputs, loop.plan, step, loop.config.seed, loop.amp, loop.scaler,
                           loop.ddp)
        # One small all-gather per iteration: every rank learns every chunk's terms, so all decide alike
        # whether to step, and the logged loss is the mean over chunks (the authors' loss.mean()).
        values = dist.all_gather(local).flatten(0, 1)
        finite = torch.isfinite(values).all()  # a 0-dim flag on the device, the same on every rank
        if loop.skip_on_device:
            step_unless_nonfinite(loop.optimizer, finite)
            rollback.undo = ~finite
        else:
            finite = bool(finite)  # one flag read on the host: step or not
            if finite:
                loop.scaler.step(loop.optimizer)
                loop.scaler.update()
            rollback.undo = not finite
    return values


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
    # The authors seed torch with config.seed in their one-process DataParallel run (-d 0-3). Rank 0
    # (whose initial weights DDP broadcasts) gets config.seed; the training draws are reseeded per step
    # and chunk (smmcl.engine.chunks), so the other ranks' seeds matter for nothing.
    seed_everything(config.seed + ctx.rank, config.deterministic)


def save(loop: Loop, done: int) -> None:
    """Rank 0 writes the checkpoint after ``done`` global iterations: the epoch's (``epoch-N.pth``) at
    an epoch's end, else an iteration checkpoint (``iter-<done>.pth``)."""
    rng = dist.all_gather_object(rng_state(loop.ctx.device))
    if loop.ctx.is_main:
        epoch, next_iteration = divmod(done, loop.data.niters)
        state = training_state(loop.module, loop.optimizer, epoch, (next_iteration or loop.data.niters) - 1,
                               done, rng, loop.config, loop.scaler, next_iteration)
        at_epoch_end = next_iteration == 0 and should_save(epoch, loop.config)
        write = save_checkpoint if at_epoch_end else save_iteration_checkpoint
        logger.info('saved %s', write(state, loop.config.checkpoint_dir))


def build_model(config, ctx: dist.DistContext) -> EncoderDecoder:
    """The segmentor with its losses, the BatchNorm of :func:`norm_layer_for` and the ImageNet weights
    of ``config.pretrained_model`` (when set), on this rank's device."""
    model = build_segmentor(config, norm_layer=norm_layer_for(config, ctx), with_loss=True)
    load_backbone_pretrained(model, config)
    return model.to(ctx.device)
