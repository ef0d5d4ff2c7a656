"""Logging for training: messages to stderr and (rank 0) a log file, like CMX's ``get_logger``; one
epoch's progress bar, TensorBoard scalars and summary line."""
from __future__ import annotations

import logging
import math
import os
import os.path as osp
import sys
import time
from typing import List, Optional

import torch
from tqdm import tqdm

_FORMAT = '[%(asctime)s %(levelname)s] %(message)s'
_MARK = '_smmcl_handler'
TERMS = ('loss', 'ce', 'cm', 'vis', 'aux')  # the total, then the unweighted terms of EncoderDecoder
logger = logging.getLogger(__name__)


def setup_logging(log_file: Optional[str] = None, rank: int = 0, name: str = 'smmcl') -> logging.Logger:
    """Configure the package logger: INFO on rank 0 (WARNING on the others, prefixed with the rank)
    to stderr and, when ``log_file`` is given, from DEBUG on to that file (long records such as the
    effective config are logged at DEBUG, so they go to the file only).

    Calling it again (a second run in the same process, as tests do) replaces the handlers it added
    before instead of duplicating every line.
    """
    logger = logging.getLogger(name)
    for handler in [h for h in logger.handlers if getattr(h, _MARK, False)]:
        logger.removeHandler(handler)
        handler.close()
    console_level = logging.INFO if rank == 0 else logging.WARNING
    logger.setLevel(logging.DEBUG if log_file else console_level)
    fmt = logging.Formatter(_FORMAT if rank == 0 else f'[rank {rank}] {_FORMAT}', '%Y-%m-%d %H:%M:%S')
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    handlers = [console]
    if log_file:
        os.makedirs(osp.dirname(osp.abspath(log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(fmt)
        setattr(handler, _MARK, True)
        logger.addHandler(handler)
    return logger


def link_last(path: str, link: str, relative: bool = True) -> None:
    """Point the symlink ``link`` at ``path`` (the authors' ``link_file``: ``val_last.log`` -> the newest
    ``val_<time>.log``), replacing an earlier link or file of that name.

    ``relative``: the link is relative when both live in one folder, so it survives moving the folder
    (theirs are absolute). Where the file system refuses symlinks, or ``link`` is a folder, a warning
    says so and nothing changes.
    """
    target = osp.abspath(path)
    link = osp.abspath(link)
    if relative and osp.dirname(target) == osp.dirname(link):
        target = osp.basename(target)
    try:
        if osp.islink(link) or osp.isfile(link):
            os.remove(link)
        os.symlink(target, link)
    except OSError as exc:
        logging.getLogger(__name__).warning('could not link %s to %s: %s', link, path, exc)


def tensorboard_run_dir(tb_dir: str) -> str:
    """The authors' TensorBoard folder of a run (their ``train.py``): ``tb_dir/<%b%d_%d-%H-%M>``, with the
    absolute link ``tb_dir/tb`` to it (``Engine.link_tb``), so ``tensorboard --logdir tb_dir/tb`` shows
    the newest run. Created here; returns the run folder."""
    run = osp.join(osp.abspath(tb_dir), time.strftime('%b%d_%d-%H-%M', time.localtime()))
    os.makedirs(run, exist_ok=True)
    link_last(run, osp.join(tb_dir, 'tb'), relative=False)
    return run


def nonfinite_message(values: torch.Tensor, epoch: int, idx: int, niters: int, per_process: int = 1) -> str:
    """'non-finite loss at epoch 3 iteration 17/50: cm=nan' from the CHUNKS-5 gathered terms (chunks in
    global order, ``per_process`` of them on each rank): '... in chunk 2' when a rank runs several,
    '... on rank 1' when there are several ranks."""
    parts = []
    ranks = len(values) // per_process
    for chunk, row in enumerate(values.tolist()):
        bad = [f'{k}={v}' for k, v in zip(TERMS[1:], row[1:]) if not math.isfinite(v)]
        if not bad and not math.isfinite(row[0]):
            bad = [f'loss={row[0]}']
        if bad:
            where = (f' in chunk {chunk}' if per_process > 1 else '') + \
                (f' on rank {chunk // per_process}' if ranks > 1 else '')
            parts.append(' '.join(bad) + where)
    return f'non-finite loss at epoch {epoch} iteration {idx + 1}/{niters}: ' + '; '.join(parts)


class EpochLog:
    """One epoch of training as the authors show it: a tqdm line per iteration, TensorBoard scalars
    (``train/<term>`` per iteration, ``train_loss`` per epoch) and our epoch line. ``tb`` None: a rank
    other than 0, which only counts. ``first``: the iteration a resumed epoch starts at (its means
    cover the iterations run since). With ``host_sync_every = N > 1`` the records arrive N at a time
    (``smmcl.engine.train.flush_log``), each with its own iteration, step and lr: the same lines and
    scalars, the bar's text updated every N iterations."""

    def __init__(self, epoch: int, nepochs: int, niters: int, tb=None, first: int = 0):
        self.epoch, self.nepochs, self.niters, self.tb = epoch, nepochs, niters, tb
        self.sums, self.steps, self.skipped = torch.zeros(len(TERMS), dtype=torch.float64), 0, 0
        self.progress = tqdm(range(first, niters), file=sys.stdout, disable=tb is None,
                             bar_format='{desc}[{elapsed}<{remaining},{rate_fmt}]')

    def skip(self, message: str) -> None:
        """Count a batch skipped for a non-finite loss (``message`` names it)."""
        self.skipped += 1
        if self.tb is not None:
            logger.warning('%s; batch skipped (%d this epoch)', message, self.skipped)

    def record(self, values: torch.Tensor, idx: int, step: int, lr: float, next_lr: float) -> None:
        """Iteration ``idx`` (global ``step``, run with ``lr``): CHUNKS-5 float64 host ``values`` (their
        mean is the authors' ``loss.mean()`` over the replicas); only finite ones count towards the
        epoch's mean. The progress line shows ``next_lr``, the rate set after the step, as the authors'
        (their train.py prints ``lr_policy.get_lr(current_idx)``: 0 at the first iteration of the
        warm-up); TensorBoard's ``train/lr`` the rate the step ran with."""
        if torch.isfinite(values).all():
            self.sums += values.mean(0)
            self.steps += 1
        if self.tb is None:
            return
        mean = values.mean(0).tolist()
        self.progress.set_description(
            f'Epoch {self.epoch}/{self.nepochs} Iter {idx + 1}/{self.niters}: lr={next_lr:.4e} '
            f'loss={mean[0]:.4f} total_loss={self.sums[0] / max(self.steps, 1):.4f} ', refresh=False)
        for name, value in zip(TERMS, mean):
            self.tb.add_scalar(f'train/{name}', value, step)
        self.tb.add_scalar('train/lr', lr, step)

    def end(self, lr: float) -> Optional[List[float]]:
        """The authors' per-epoch scalar and our epoch line (``lr``: the one the next step runs with);
        returns the epoch's mean terms (:data:`TERMS`) on rank 0, None elsewhere."""
        if self.tb is None:
            return None
        means, skipped = (self.sums / max(self.steps, 1)).tolist(), self.skipped
        self.tb.add_scalar('train_loss', means[0], self.epoch)
        self.tb.add_scalar('train/skipped_batches', skipped, self.epoch)
        logger.info('epoch %d/%d: loss %.4f (%s), lr %.4e%s', self.epoch, self.nepochs, means[0],
                    ' '.join(f'{k}={v:.4f}' for k, v in zip(TERMS[1:], means[1:])), lr,
                    f', {skipped} batches skipped (non-finite loss)' if skipped else '')
        return means


def warn_without_contrast(means: Optional[List[float]], epoch: int, config, plan) -> None:
    """One warning when the epoch's three contrastive terms were 0 in every iteration although they are
    weighted: no class reached ``min_views_per_class`` stage-4 cells in any chunk, so the epoch trained
    with the cross-entropy alone. ``means``: :meth:`EpochLog.end`'s (None: not rank 0); ``plan``: the
    run's :class:`~smmcl.engine.chunks.ChunkPlan`."""
    if means is None or any(means[2:]) or not (config.weight_cm or config.weight_vis or config.weight_aux):
        return
    logger.warning('epoch %d: the contrastive terms (cm, vis, aux) were 0 in every iteration: no class '
                   'reached min_views_per_class=%d stage-4 cells (1/32 of the %dx%d crops) in any chunk of %d '
                   'image(s), so this epoch trained with the cross-entropy alone. Larger crops (image_height, '
                   'image_width), larger chunks (fewer replicas, or a larger batch_size) or a lower '
                   'min_views_per_class change it', epoch, config.min_views_per_class, config.image_height,
                   config.image_width, plan.chunk_size)
