"""The authors' 4-GPU statistics on any number of processes: one global batch cut into ``replicas`` chunks.

The authors train with ``python train.py -d 0-3`` (their ``train.py``: ``model = nn.DataParallel(model,
device_ids=engine.devices)``, then ``loss = model(imgs, modal_xs, gts); loss = loss.mean()``). Their
loader (``dataloader/dataloader.py``, ``get_train_loader``: one ``DataLoader`` with ``shuffle=True``)
hands one shuffled batch of ``batch_size`` = 16; ``nn.DataParallel`` scatters it into 4 contiguous chunks
of 4 (``torch.chunk`` semantics) and each replica computes, on its chunk alone, the BatchNorm batch
statistics, the contrastive anchor sampling with its cap, and the loss (the CE's mean over the chunk's
valid pixels included; ``models/builder.py`` ``EncoderDecoder.forward`` returns the loss). ``loss.mean()``
averages the 4 replica losses, and the BatchNorm running statistics kept are those of the replica on
``device_ids[0]`` (PyTorch's ``DataParallel``: in-place buffer updates persist from device[0] only).

Here ``config.replicas`` = R chunks per global batch are spread over W processes (W divides R): process p
runs chunks ``p*R/W .. (p+1)*R/W - 1`` one after another (gradient accumulation, one chunk's
activations at a time), backpropagating ``loss / (R/W)``; DDP's average over W then gives the mean over
all R chunk losses, as ``loss.mean()``. Each chunk draws from generators seeded by (seed, global step,
chunk), so drop path, the Ham head's NMF bases and the anchor sampling of a chunk do not depend on
which process runs it, and resuming needs no generator state. The running statistics follow chunk 0
(rank 0, whose model is saved and whose buffers DDP broadcasts).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from .dist import DistContext
from .logging_utils import TERMS
from .seeding import seed_generators

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkPlan:
    """How the ``replicas`` chunks of every global batch map onto the processes."""
    replicas: int  # R: chunks per global batch (the authors' GPUs)
    world_size: int  # W: processes
    rank: int
    chunk_size: int  # images per chunk: batch_size / R

    @property
    def per_process(self) -> int:
        """Chunks each process runs one after another (R / W)."""
        return self.replicas // self.world_size

    @property
    def first(self) -> int:
        """Global index of this process' first chunk."""
        return self.rank * self.per_process

    def describe(self) -> str:
        """One line for the log: the global batch, its chunks, and which process runs which."""
        k = self.per_process
        if k == 1:
            mapping = 'process p runs chunk p' if self.world_size > 1 else 'the process runs it'
        else:
            mapping = f'process p runs chunks {k}p..{k}p+{k - 1} one after another' if self.world_size > 1 \
                else f'the process runs chunks 0..{k - 1} one after another'
        return (f'global batch {self.replicas * self.chunk_size} = {self.replicas} chunk(s) of '
                f'{self.chunk_size} (replicas={self.replicas}, each as one GPU of the authors\' '
                f'DataParallel run): {mapping}')


def plan_chunks(config, ctx: DistContext) -> ChunkPlan:
    """The chunk plan of ``config`` on the processes of ``ctx``.

    Raises:
        ConfigError: ``batch_size`` not divisible by ``replicas``, ``replicas`` not divisible by the
            number of processes, or ``sync_bn=True`` with more chunks than processes.
    """
    replicas, world = int(config.replicas), ctx.world_size
    batch = config.batch_size
    if replicas < 1 or batch % replicas:
        divisors = [n for n in range(1, batch + 1) if batch % n == 0]
        raise ConfigError(f"batch_size={batch} cannot be cut into replicas={replicas} equal chunks: set "
                          f"replicas in the experiment's config.py or with --set replicas=N, N in {divisors} "
                          f"(the authors' recipe: batch_size=16 replicas=4)")
    if replicas % world:
        divisors = [n for n in range(1, replicas + 1) if replicas % n == 0]
        raise ConfigError(f'replicas={replicas} chunks cannot be shared by {world} processes: run a number '
                          f'of processes in {divisors}, or --set replicas=N with N a multiple of {world} '
                          f'that divides batch_size={batch} (another run: its statistics change)')
    if config.sync_bn and world > 1 and replicas > world:
        # SyncBatchNorm pools statistics over the processes' concurrent forwards; chunks run one after
        # another on one process would be normalised alone, so the run would mean neither setting.
        raise ConfigError(f'sync_bn=True needs one chunk per process, but replicas={replicas} on {world} '
                          f'processes runs {replicas // world} per process: use --set sync_bn=False '
                          f"(per-chunk BatchNorm, the authors') or --set replicas={world}")
    return ChunkPlan(replicas, world, ctx.rank, batch // replicas)


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """The seed of chunk ``chunk`` of global step ``step`` (0-based): one independent stream each."""
    sequence = np.random.SeedSequence([int(seed), int(step), int(chunk)])
    return int(sequence.generate_state(1, np.uint64)[0])


def run_chunks(model: nn.Module, inputs: Sequence[torch.Tensor], plan: ChunkPlan, step: int, seed: int,
               amp=nullcontext(), scaler: Optional[torch.amp.GradScaler] = None,
               ddp: Optional[nn.parallel.DistributedDataParallel] = None) -> torch.Tensor:
    """Forward and backward of this process' chunks of global step ``step``, one after another, the
    gradients accumulated in ``.grad`` (averaged over all chunks once DDP has averaged the processes).

    Args:
        model: the stepping model (maybe DDP-wrapped or compiled); ``model(rgb, x, label,
            return_terms=True)`` returns the loss terms.
        inputs: (rgb N-3-H-W, modal_x N-3-H-W, label N-H-W), this process' share: N = per_process *
            chunk_size images, chunk j being images ``j*chunk_size .. (j+1)*chunk_size - 1``.
        plan: which chunks this process runs; ``step`` and ``seed`` (``config.seed``) seed each one.
        amp, scaler: the autocast context and loss scaler of :mod:`smmcl.engine.precision`.
        ddp: the DDP wrapper inside ``model`` (None in one process); all chunks but the last run under
            its ``no_sync()`` so that gradients are all-reduced once per step.
    Returns:
        per_process-5 float32 loss terms (:data:`TERMS`) of this process' chunks, on the device.
    """
    count = plan.per_process
    pieces = list(zip(*(tensor.chunk(count) for tensor in inputs)))
    kept, rows = None, []
    for j, chunk in enumerate(pieces):
        index = plan.first + j
        seed_generators(chunk_seed(seed, step, index))
        sync = nullcontext() if ddp is None or j == count - 1 else ddp.no_sync()
        with sync:
            with amp:
                terms = model(*chunk, return_terms=True)
            loss = terms['loss'] / count if count > 1 else terms['loss']
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if count > 1:  # after the backward: BatchNorm's backward checks its buffers were not modified
            kept = follow_chunk_zero(model, index, kept)
        rows.append(torch.stack([terms[k].detach().float() for k in TERMS]))
        del terms, loss  # one chunk's activations at a time
    return torch.stack(rows)


def follow_chunk_zero(model: nn.Module, chunk: int, kept: Optional[List[torch.Tensor]]
                      ) -> Optional[List[torch.Tensor]]:
    """Called after chunk ``chunk``'s forward and backward: the running statistics keep chunk 0's update.

    After chunk 0 the buffers are copied (and returned); after any later chunk they are put back.
    Only the process that runs chunk 0 (rank 0) holds a copy: the other ranks' buffers are neither
    saved nor used (training-mode BatchNorm normalises with batch statistics), and DDP broadcasts rank
    0's before each step's first forward.
    """
    if chunk == 0:
        return copy_buffers(model)
    if kept is not None:
        put_back_buffers(model, kept)
    return kept


def copy_buffers(model: nn.Module) -> List[torch.Tensor]:
    return [buffer.detach().clone() for buffer in model.buffers()]


def put_back_buffers(model: nn.Module, saved: List[torch.Tensor], only_if: Optional[torch.Tensor] = None
                     ) -> None:
    """Copy ``saved`` into ``model``'s buffers; with ``only_if`` (a 0-dim bool tensor on their device)
    only where it is True, chosen on the device (no host read)."""
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved):
            buffer.copy_(value if only_if is None else torch.where(only_if, value, buffer))


class BufferRollback:
    """Puts ``model``'s buffers back on exit when ``undo`` was set (only if ``enabled``: a few small copies).

    A forward that produced NaNs may already have written them into the BatchNorm running statistics;
    skipping the batch must undo that too. ``undo`` is a bool, or a 0-dim bool tensor on the buffers'
    device when the skip is decided there (``host_sync_every > 1``): each buffer then becomes
    ``where(undo, saved, current)`` without a host read.
    """

    def __init__(self, model: nn.Module, enabled: bool):
        self.model, self.enabled, self.undo, self.saved = model, enabled, False, None

    def __enter__(self) -> 'BufferRollback':
        if self.enabled:
            self.saved = copy_buffers(self.model)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.saved is None:
            return
        if torch.is_tensor(self.undo):
            put_back_buffers(self.model, self.saved, only_if=self.undo)
        elif self.undo:
            put_back_buffers(self.model, self.saved)
