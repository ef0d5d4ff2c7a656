"""Training data loading: the training set (built once), its epoch length, the loader, and the batch on
the device (the one place where training images are normalised).

Follows the authors' ``dataloader/dataloader.py`` (``get_train_loader``: ``file_length = batch_size *
niters_per_epoch``, shuffled, ``drop_last``, pinned memory). Their ``-d 0-3`` run draws one shuffled
batch of ``batch_size`` in one process and ``nn.DataParallel`` cuts it into contiguous chunks; here one
seeded order per epoch, the same for any number of processes, gives each process its contiguous share
of every global batch (:class:`GlobalOrderSampler`; :mod:`smmcl.engine.chunks` cuts the share into
chunks). Augmentation is seeded per sample (:class:`SeededSamples`), so a resumed run, on any number of
processes, draws the same crops as an uninterrupted one.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .dataset import RGBXDataset, split_layout, split_names
from .transforms import normalize_batch

logger = logging.getLogger(__name__)


class SeededSamples(Dataset):
    """The dataset with Python's ``random`` and NumPy seeded per sample from (seed, epoch, index).

    The augmentation draws from Python's ``random``. The authors rely on PyTorch seeding each loader
    worker once; a worker's stream then depends on everything it loaded before, so an interrupted run
    cannot be resumed exactly and results depend on ``num_workers``. Seeding every sample gives the
    same distribution (each sample its own, independent stream, different across workers and epochs)
    and makes the crops a function of (seed, epoch, index) only: reproducible for any number of workers,
    processes, and across a resume. Keys come from :class:`GlobalOrderSampler` as ``(epoch, index)``, which
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


class GlobalOrderSampler(Sampler):
    """``(epoch, index)`` keys of this process' share of every global batch.

    One shuffled order per epoch for the whole run (``torch.randperm`` seeded with ``seed + epoch``, as
    ``DistributedSampler``'s, so a one-process run keeps the order it had before): global batch k is
    positions ``k * batch_size .. (k + 1) * batch_size - 1`` of it, and process p of W takes the p-th
    contiguous ``batch_size / W`` of them, i.e. chunks ``p*R/W .. (p+1)*R/W - 1`` of ``nn.DataParallel``'s
    contiguous scatter. ``set_epoch(epoch, start)`` skips the first ``start`` global batches (a resume
    in the middle of an epoch) without loading them.
    """

    def __init__(self, length: int, batch_size: int, world_size: int, rank: int, seed: int):
        self.length, self.batch_size, self.seed = length, batch_size, int(seed)
        self.share = batch_size // world_size
        self.offset = rank * self.share
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        return (self.length // self.batch_size - self.start) * self.share

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.epoch
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch))
        for batch in range(self.start, self.length // self.batch_size):
            first = batch * self.batch_size + self.offset
            for index in order[first:first + self.share].tolist():
                yield epoch, index


@dataclass
class TrainData:
    """The training loader, its sampler (``set_epoch`` before each epoch) and global batches per epoch."""
    loader: DataLoader
    sampler: GlobalOrderSampler
    niters: int


def iterations_per_epoch(config, num_images: int, verbose: bool = True) -> int:
    """The authors' ``niters_per_epoch``, from the real image count when it differs from the config's.

    CMX derives ``niters_per_epoch = num_train_imgs // batch_size + 1`` from the config's image count;
    when the folder holds another number of images we use the real count (unless niters_per_epoch was
    set, in config.py or with --set) and say so.
    """
    if num_images == config.num_train_imgs:
        return config.niters_per_epoch
    pinned = 'niters_per_epoch' in config.get('_pinned', ())
    niters = config.niters_per_epoch if pinned else num_images // config.batch_size + 1
    if verbose:
        logger.warning('the training set has %d images, the config says num_train_imgs=%d; using %d%s',
                       num_images, config.num_train_imgs, num_images,
                       '' if pinned else f' (niters_per_epoch {niters})')
    return niters


def build_train_data(config, ctx) -> TrainData:
    """The authors' training set and this rank's loader: its share of every global batch
    (:class:`GlobalOrderSampler`, seeded with ``config.seed``, reshuffled by ``set_epoch``), with
    persistent workers. ``ctx``: this process among the training processes (``rank``, ``world_size``,
    ``is_main``, ``device``; :class:`smmcl.engine.dist.DistContext`).

    The training checks first that ``batch_size``, ``replicas`` and the number of processes divide
    (:func:`smmcl.engine.chunks.plan_chunks`); the loader needs only each process' share.

    Raises:
        DatasetError: folder or list-file problems.
    """
    names = split_names(config, split_layout(config, 'train'))
    niters = iterations_per_epoch(config, len(names), verbose=ctx.is_main)
    dataset = RGBXDataset(config, 'train', file_length=config.batch_size * niters)
    sampler = GlobalOrderSampler(len(dataset), config.batch_size, ctx.world_size, ctx.rank, config.seed)
    loader = DataLoader(SeededSamples(dataset, config.seed), batch_size=sampler.share,
                        sampler=sampler, num_workers=config.num_workers, drop_last=True,
                        pin_memory=ctx.device.type == 'cuda', persistent_workers=config.num_workers > 0,
                        # the loader's own generator: creating iterators must not draw from the global
                        # torch generator, whose state the checkpoints carry
                        generator=torch.Generator().manual_seed(config.seed))
    return TrainData(loader, sampler, niters)


def to_device(batch, config, device: torch.device, layout: torch.memory_format = torch.contiguous_format
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rgb N-3-H-W float32, modal_x N-3-H-W float32, label N-H-W int64) on ``device``.

    The training set hands uint8 crops (:func:`~smmcl.data.transforms.train_transform`) and each crop's
    valid box; they are normalised here, on the device, to the authors' ``(img / 255 - mean) / std``
    with the padding 0, in memory format ``layout`` (the model's: :func:`smmcl.engine.precision.memory_format`).
    """
    def image(key):
        imgs = batch[key].to(device, non_blocking=True)
        imgs = normalize_batch(imgs, config.norm_mean, config.norm_std, batch['valid_box'])
        return imgs.contiguous(memory_format=layout)

    return image('data'), image('modal_x'), batch['label'].to(device, non_blocking=True)
