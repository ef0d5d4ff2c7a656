"""Training of SMMCL (Dong & Yokoya, WACV 2024), following the authors' CMX-derived ``train.py``.

``python SMMCL_LLRGBD/train.py [-d 0-3] [-c .../epoch-last.pth] [--set key=value ...]``

Read top to bottom: arguments and config -> processes (one per GPU, ``torchrun``, or one CPU process)
-> logging and seeds -> data check, dataset, loader -> model, optimizer, lr schedule -> resume -> the
epoch loop of the authors (forward, finite-loss check, backward, step, lr update after the step) ->
checkpoints on the authors' schedule. What differs from their script is robustness and exact resume:
atomic checkpoints that carry RNG states, a collective non-finite-loss check, clean error messages, and
augmentation seeded per sample (see :class:`SeededSamples`); and one process per GPU where their
``-d 0-3`` runs ``nn.DataParallel``, computing the same (see :func:`norm_layer_for`).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed
import torch.multiprocessing as mp
from tensorboardX import SummaryWriter
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from ..config import format_config, load_config
from ..data.check import quick_check
from ..data.dataset import DatasetError, RGBXDataset
from ..data.transforms import normalize_batch
from ..models.segmentor import EncoderDecoder
from . import dist
from .checkpoint import (CheckpointError, load_checkpoint, remove_stale_temp_files, restore_training_state,
                         rng_state, save_checkpoint, set_rng_state, should_save, training_state)
from .logging_utils import setup_logging
from .lr import WarmUpPolyLR, set_lr
from .optim import build_optimizer
from .precision import for_training, maybe_compile, memory_format, mixed_precision

logger = logging.getLogger(__name__)

TERMS = ('loss', 'ce', 'cm', 'vis', 'aux')  # the total, then the unweighted terms of EncoderDecoder
NONFINITE_CHOICES = ('stop', 'skip')  # config.nonfinite_loss


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite with ``nonfinite_loss='stop'``."""


# Problems with data, files or settings: reported as one message and exit code 1, no traceback.
EXPECTED_ERRORS = (DatasetError, FileNotFoundError, CheckpointError, NonFiniteLossError, ValueError)


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
    except KeyError as error:
        fail(error.args[0])
    except (FileNotFoundError, ValueError) as error:
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
    """The message of ``error``; for one re-raised from a DataLoader worker (whose message embeds the
    worker's traceback), only the original message."""
    message = str(error)
    if 'Original Traceback' in message:
        message = message.rsplit(f'{type(error).__name__}: ', 1)[-1].strip()
    return message


def train(ctx: dist.DistContext, config, resume: Optional[str] = None) -> nn.Module:
    """Train ``config``'s model in this process (one rank of ``ctx``); returns the unwrapped model."""
    setup_logging(config.log_file if ctx.is_main else None, ctx.rank)
    if config.nonfinite_loss not in NONFINITE_CHOICES:  # checked now, not at the first NaN hours later
        raise ValueError(f'nonfinite_loss={config.nonfinite_loss!r}: choose one of {NONFINITE_CHOICES}')
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

    quick_check(config, splits=('train',))  # cheap: folders, list file, files exist
    dataset = build_dataset(config, verbose=ctx.is_main)
    if ctx.is_main:
        logger.debug('effective config:\n%s', format_config(config))  # to the log file only
        logger.info('log file: %s (with the effective config)', config.log_file)
    loader, sampler = build_loader(dataset, config, ctx)

    model = for_training(build_model(config, ctx), config)
    optimizer = build_optimizer(model, config)
    amp, scaler = mixed_precision(config, ctx.device)
    niters = config.niters_per_epoch
    policy = WarmUpPolyLR(config.lr, config.lr_power, config.nepochs * niters, niters * config.warm_up_epoch)

    start_epoch = 1
    if resume:
        state = load_checkpoint(resume)
        restore_training_state(state, model, optimizer, config, resume, scaler)
        start_epoch = state['epoch'] + 1  # CMX's restore_checkpoint: epoch + 1
        restore_rng(state, ctx, config.seed)
        if ctx.is_main:
            logger.info('resumed from %s (epoch %d); continuing at epoch %d', resume, state['epoch'],
                        start_epoch)
            if state.get('lr_step', state['epoch'] * niters) != state['epoch'] * niters:
                logger.warning('the checkpoint was trained with another niters_per_epoch; the lr schedule '
                               'continues from epoch %d of this one', start_epoch)

    # ``model`` stays the unwrapped module we save (rank 0's weights and BatchNorm statistics).
    ddp_model = maybe_compile(wrap_ddp(model, ctx), config)
    tb = SummaryWriter(config.tb_dir) if ctx.is_main else None
    if ctx.is_main:
        logger.info('begin training: epochs %d..%d, %d iterations each, %d process(es) on %s, batch %d per '
                    'process', start_epoch, config.nepochs, niters, ctx.world_size, ctx.device.type,
                    loader.batch_size)
    try:
        for epoch in range(start_epoch, config.nepochs + 1):
            sampler.set_epoch(epoch)
            train_one_epoch(ddp_model, optimizer, scaler, amp, loader, policy, epoch, config, ctx, tb)
            if should_save(epoch, config):
                rng = dist.all_gather_object(rng_state(ctx.device))  # every rank's, for an exact resume
                if ctx.is_main:
                    state = training_state(model, optimizer, epoch, niters - 1, epoch * niters, rng, config,
                                           scaler)
                    logger.info('saved %s', save_checkpoint(state, config.checkpoint_dir))
    finally:
        if tb is not None:
            tb.close()
    return model


def train_one_epoch(model, optimizer, scaler, amp, loader, policy, epoch, config, ctx, tb) -> None:
    """The authors' iteration loop for one epoch (``niters_per_epoch`` batches)."""
    model.train()
    niters = config.niters_per_epoch
    batches = iter(loader)
    pbar = tqdm(range(niters), file=sys.stdout, bar_format='{desc}[{elapsed}<{remaining},{rate_fmt}]',
                disable=not ctx.is_main)
    sums, steps, skipped = torch.zeros(len(TERMS), dtype=torch.float64), 0, 0
    for idx in pbar:
        batch = next(batches)
        rgb, modal_x, label = to_device(batch, config, ctx.device)
        lr = optimizer.param_groups[0]['lr']
        # A forward that produced NaNs may already have written them into the BatchNorm running
        # statistics; skipping a batch must undo that too (a few small buffers to copy).
        saved_buffers = ([b.detach().clone() for b in model.buffers()]
                         if config.nonfinite_loss == 'skip' else None)
        with amp:
            terms = model(rgb, modal_x, label, return_terms=True)
        # One small all-gather per iteration: every rank learns every rank's terms, so all decide alike
        # whether to stop or skip and the logged loss is the mean over ranks (CMX's all_reduce_tensor).
        values = dist.all_gather(torch.stack([terms[k].detach().float() for k in TERMS])).double().cpu()
        optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(values).all():
            scaler.scale(terms['loss']).backward()
            scaler.step(optimizer)
            scaler.update()
            sums += values.mean(0)
            steps += 1
        else:
            message = nonfinite_message(values, epoch, idx, niters)
            if config.nonfinite_loss == 'stop':
                raise NonFiniteLossError(message + '; stopping (the checkpoints written so far are intact; '
                                         "--set nonfinite_loss=skip skips such batches)")
            skipped += 1
            with torch.no_grad():
                for buffer, saved in zip(model.buffers(), saved_buffers):
                    buffer.copy_(saved)
            if ctx.is_main:
                logger.warning('%s; batch skipped (%d this epoch)', message, skipped)
        del terms
        # CMX sets the lr *after* optimizer.step() from the index of the iteration just run, so global
        # step k runs with lr(k - 1) and step 0 with the optimizer's initial lr (see smmcl.engine.lr).
        step = (epoch - 1) * niters + idx
        set_lr(optimizer, policy.get_lr(step))
        if ctx.is_main:
            mean = values.mean(0).tolist()
            pbar.set_description(f'Epoch {epoch}/{config.nepochs} Iter {idx + 1}/{niters}: lr={lr:.4e} '
                                 f'loss={mean[0]:.4f} total_loss={sums[0] / max(steps, 1):.4f} ',
                                 refresh=False)
            for name, value in zip(TERMS, mean):
                tb.add_scalar(f'train/{name}', value, step)
            tb.add_scalar('train/lr', lr, step)
    if ctx.is_main:
        means = (sums / max(steps, 1)).tolist()
        tb.add_scalar('train_loss', means[0], epoch)  # the authors' per-epoch scalar
        tb.add_scalar('train/skipped_batches', skipped, epoch)
        logger.info('epoch %d/%d: loss %.4f (%s), lr %.4e%s', epoch, config.nepochs, means[0],
                    ' '.join(f'{k}={v:.4f}' for k, v in zip(TERMS[1:], means[1:])),
                    optimizer.param_groups[0]['lr'],
                    f', {skipped} batches skipped (non-finite loss)' if skipped else '')


def nonfinite_message(values: torch.Tensor, epoch: int, idx: int, niters: int) -> str:
    """'non-finite loss at epoch 3 iteration 17/50: cm=nan' from the WORLD-5 gathered terms."""
    parts = []
    for rank, row in enumerate(values.tolist()):
        bad = [f'{k}={v}' for k, v in zip(TERMS[1:], row[1:]) if not math.isfinite(v)]
        if not bad and not math.isfinite(row[0]):
            bad = [f'loss={row[0]}']
        if bad:
            parts.append(' '.join(bad) + (f' on rank {rank}' if len(values) > 1 else ''))
    return f'non-finite loss at epoch {epoch} iteration {idx + 1}/{niters}: ' + '; '.join(parts)


# ---- set-up helpers ----------------------------------------------------------------------------

def seed_everything(seed: int, deterministic: bool) -> None:
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


def build_dataset(config, verbose: bool = True) -> RGBXDataset:
    """The authors' training set (``file_length = batch_size * niters_per_epoch``).

    CMX derives ``niters_per_epoch = num_train_imgs // batch_size + 1`` from the config's image count;
    when the folder holds another number of images we use the real count (unless niters_per_epoch was
    set on the command line) and say so.
    """
    dataset = RGBXDataset(config, 'train', file_length=config.batch_size * config.niters_per_epoch)
    actual = len(dataset.names)
    if actual != config.num_train_imgs:
        pinned = 'niters_per_epoch' in config.get('_overridden', [])
        if verbose:
            logger.warning('the training set has %d images, the config says num_train_imgs=%d; using %d%s',
                           actual, config.num_train_imgs, actual,
                           '' if pinned else f' (niters_per_epoch {actual // config.batch_size + 1})')
        config.num_train_imgs = actual
        if not pinned:
            config.niters_per_epoch = actual // config.batch_size + 1
            dataset = RGBXDataset(config, 'train', file_length=config.batch_size * config.niters_per_epoch)
    return dataset


class SeededSamples(Dataset):
    """The dataset with Python's ``random`` and NumPy seeded per sample from (seed, epoch, index).

    The augmentation draws from Python's ``random``. The authors rely on PyTorch seeding each loader
    worker once; a worker's stream then depends on everything it loaded before, so an interrupted run
    cannot be resumed exactly and results depend on ``num_workers``. Seeding every sample gives the
    same distribution (each sample its own, independent stream, different across workers and epochs)
    and makes the crops a function of (seed, epoch, index) only: reproducible for any number of workers,
    processes, and across a resume. Keys come from :class:`EpochSampler` as ``(epoch, index)``, which
    also tells persistent workers the epoch for the dataset's own per-epoch draw.
    """

    def __init__(self, dataset: RGBXDataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if epoch != self.epoch:
            self.dataset.set_epoch(epoch)
            self.epoch = epoch
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        return self.dataset[index]


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(epoch, index)`` keys for :class:`SeededSamples`."""

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


def build_loader(dataset: RGBXDataset, config, ctx: dist.DistContext):
    """The authors' loader (batch ``batch_size // world_size`` per process, shuffled, drop_last, pinned
    memory), always through a DistributedSampler (seeded with ``config.seed``, reshuffled by
    ``set_epoch``), with persistent workers and per-sample seeding."""
    batch = config.batch_size // ctx.world_size
    if batch < 1:
        raise ValueError(f'batch_size={config.batch_size} is smaller than the number of processes '
                         f'({ctx.world_size}); the authors split the batch over the GPUs')
    if config.batch_size % ctx.world_size and ctx.is_main:
        logger.warning('batch_size %d does not divide over %d processes: %d per process',
                       config.batch_size, ctx.world_size, batch)
    sampler = EpochSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                           seed=config.seed, drop_last=True)
    loader = DataLoader(SeededSamples(dataset, config.seed), batch_size=batch, sampler=sampler,
                        num_workers=config.num_workers, drop_last=True,
                        pin_memory=ctx.device.type == 'cuda', persistent_workers=config.num_workers > 0,
                        # the loader's own generator: creating iterators must not draw from the global
                        # torch generator, whose state the checkpoints carry
                        generator=torch.Generator().manual_seed(config.seed))
    return loader, sampler


def to_device(batch, config, device: torch.device):
    """(rgb N-3-H-W float32, modal_x N-3-H-W float32, label N-H-W int64) on ``device``.

    The dataset hands uint8 crops and each crop's valid box; they are normalised here, on the device,
    to the authors' ``(img / 255 - mean) / std`` with the padding 0. Float images (a preprocess that
    normalises itself, such as ``train_transform_plain``) are used as they are.
    """
    def image(key):
        imgs = batch[key].to(device, non_blocking=True)
        if imgs.dtype == torch.uint8:
            imgs = normalize_batch(imgs, config.norm_mean, config.norm_std, batch['valid_box'])
        return imgs.float().contiguous(memory_format=memory_format(config))

    return image('data'), image('modal_x'), batch['label'].to(device, non_blocking=True)


def build_model(config, ctx: dist.DistContext) -> EncoderDecoder:
    """EncoderDecoder with CE (ignore 255) and the BatchNorm of :func:`norm_layer_for`."""
    criterion = nn.CrossEntropyLoss(reduction='mean', ignore_index=config.background)
    return EncoderDecoder(config, criterion=criterion, norm_layer=norm_layer_for(config, ctx)).to(ctx.device)


def norm_layer_for(config, ctx: dist.DistContext) -> type:
    """The BatchNorm class of the backbone and projectors: plain unless ``sync_bn`` and several processes.

    The authors' ``train.py -d 0-3`` wraps the model in ``nn.DataParallel`` (no ``WORLD_SIZE``), and the
    encoder's and projectors' BatchNorms are built as plain ``nn.BatchNorm2d`` whatever ``norm_layer`` says
    (``models/encoders/dual_segnext.py``, ``models/projector.py``; the SyncBatchNorm their ``train.py``
    picks under DDP only reaches isinstance checks in ``init_weight`` and ``group_weight``). So each GPU
    normalises its share of the batch with that share's statistics and the running statistics kept are
    GPU 0's. Plain BatchNorm under DDP does the same: each rank its own share, and rank 0's running
    statistics broadcast before every forward (see :func:`wrap_ddp`).

    Raises:
        ValueError: ``sync_bn=True`` on several CPU processes (SyncBatchNorm has no CPU kernel).
    """
    if not config.sync_bn or not ctx.distributed:
        return nn.BatchNorm2d  # in one process the batch statistics are the whole batch's anyway
    if ctx.device.type == 'cpu':
        raise ValueError(f'sync_bn=True: SyncBatchNorm has no CPU kernel, and these {ctx.world_size} '
                         'processes run on the CPU; use --set sync_bn=False (per-process BatchNorm, the '
                         "authors' behaviour) or run on GPUs")
    return nn.SyncBatchNorm


def wrap_ddp(model: nn.Module, ctx: dist.DistContext) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes (else ``model`` itself).

    ``broadcast_buffers=True`` copies rank 0's BatchNorm running statistics to every rank before each
    forward, so rank 0's are the ones that accumulate and get saved: as ``nn.DataParallel``, whose
    replica on the first GPU updates the module's own buffers. DDP also broadcasts rank 0's initial
    weights here.
    """
    if not ctx.distributed:
        return model
    # Depthwise conv weights (C-1-3-3) get gradients whose stride differs from DDP's bucket only in
    # the size-1 dimension; DDP copies them and warns once per process. Nothing to fix.
    warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
    device_ids = [ctx.device.index] if ctx.device.type == 'cuda' else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=True,
                                   find_unused_parameters=False)


def restore_rng(state, ctx: dist.DistContext, seed: int) -> None:
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
