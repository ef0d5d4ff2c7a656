"""Process set-up for training and evaluation: one process per GPU, or one CPU process.

Three ways in, one ``DistContext`` out:
- ``torchrun --nproc_per_node=N script.py``: read ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` /
  ``MASTER_ADDR`` / ``MASTER_PORT`` from the environment;
- ``script.py -d 0-3``: the script starts one process per listed GPU itself (``mp.spawn``) on a free
  port (or ``-p PORT``);
- no GPU: one CPU process (``cpu_procs`` > 1 starts that many gloo processes, used by tests).

NCCL on GPUs, gloo on the CPU. The authors' ``--local_rank`` flag is accepted and ignored in favour
of the environment. Their ``train.py -d 0-3`` runs one process with ``nn.DataParallel`` instead; the
processes here run its chunks (:mod:`smmcl.engine.chunks`) with per-chunk BatchNorm and rank 0's
statistics broadcast (:func:`norm_layer_for` and :func:`wrap_ddp`), computing the same.
"""
from __future__ import annotations

import datetime
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def parse_devices(text: Optional[str]) -> List[int]:
    """'0-3' -> [0, 1, 2, 3]; '0,2' -> [0, 2]; '1' -> [1]; None or '' -> []."""
    if not text:
        return []
    devices = []
    for part in str(text).split(','):
        part = part.strip()
        if '-' in part:
            start, end = part.split('-')
            devices.extend(range(int(start), int(end) + 1))
        elif part:
            devices.append(int(part))
    return devices


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _worker(local_rank: int, fn: Callable, devices: Sequence[int], world_size: int, port: int,
            timeout_s: float, args) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    _run_in_group(fn, devices, timeout_s, args)


def _run_in_group(fn: Callable, devices: Sequence[int], timeout_s: float, args) -> None:
    """``fn(ctx, *args)`` as the rank the environment names, leaving the process group afterwards."""
    ctx = init_from_env(devices, timeout_s)
    try:
        fn(ctx, *args)
        # The ranks leave the group together: a rank tearing gloo down while another still worked (rank 0
        # writing the last checkpoint) was seen to abort ("terminate called without an active exception").
        # Not after a failure, where the others may never arrive.
        barrier()
    finally:
        cleanup()


def init_from_env(devices: Sequence[int] = (), timeout_s: float = 1800) -> DistContext:
    """Join the process group described by the environment (single process when WORLD_SIZE is unset)."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        index = devices[local_rank] if local_rank < len(devices) else local_rank
        torch.cuda.set_device(index)
        device = torch.device('cuda', index)
    else:
        device = torch.device('cpu')
    if world_size > 1 and not dist.is_initialized():
        warn_shared_elastic_store(rank)
        dist.init_process_group('nccl' if use_cuda else 'gloo', rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world_size, local_rank, device)


def warn_shared_elastic_store(rank: int) -> None:
    """Warn (rank 0) when torchrun may restart the workers while they share its agent's TCPStore.

    torch's elastic agent keeps one store for every restart, and ``init_process_group`` writes the
    ranks' addresses under the same keys each time, so a restarted rank can read a killed one's address
    and fail to connect (pytorch/pytorch#135712; seen here with gloo), using up the restarts. Launching
    torchrun with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` gives every attempt a fresh store.
    """
    restarts = int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0) or 0)
    if rank == 0 and restarts > 0 and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        warnings.warn('torchrun --max-restarts with its shared TCPStore: a restarted group can fail to '
                      'connect (pytorch/pytorch#135712); launch it with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1')


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(fn: Callable, devices: Sequence[int], args=(), port: Optional[int] = None,
           timeout_s: float = 1800, cpu_procs: int = 1) -> None:
    """Run ``fn(ctx, *args)`` in every process.

    Under torchrun (``WORLD_SIZE`` set) this process is one rank already. Otherwise one process per
    device in ``devices`` when CUDA is available, else ``cpu_procs`` CPU processes (gloo). If any
    process fails, ``mp.spawn`` terminates the others and raises here, so the script exits non-zero
    instead of hanging.
    """
    use_cuda = torch.cuda.is_available()
    if 'WORLD_SIZE' in os.environ:
        _run_in_group(fn, devices, timeout_s, args)
        return
    if not use_cuda and devices:
        warnings.warn(f'no GPU available: running on the CPU instead of devices {list(devices)}')
    nprocs = len(devices) if use_cuda else cpu_procs
    if nprocs <= 1:
        ctx = init_from_env(devices[:1] if use_cuda else (), timeout_s)
        fn(ctx, *args)
        return
    mp.spawn(_worker, args=(fn, list(devices), nprocs, port or free_port(), timeout_s, args),
             nprocs=nprocs, join=True)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``tensor`` on every rank, in place (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(tensor, src)
    return tensor


def barrier(device: Optional[torch.device] = None) -> None:
    """Wait until every rank arrives here (no-op in a single process). ``device``: this rank's GPU, which NCCL
    is told (before the first collective it would otherwise guess it, with a warning)."""
    if dist.is_available() and dist.is_initialized():
        if device is not None and device.type == 'cuda':
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Stack ``tensor`` from every rank: WORLD-... (1-... in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor[None]
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return torch.stack(out)


def all_gather_object(obj) -> list:
    """A list of ``obj`` from every rank (``[obj]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def norm_layer_for(config, ctx: DistContext) -> type:
    """The BatchNorm class of the backbone and projectors: plain unless ``sync_bn`` and several processes.

    The authors' ``train.py -d 0-3`` wraps the model in ``nn.DataParallel`` (no ``WORLD_SIZE``), and the
    encoder's and projectors' BatchNorms are built as plain ``nn.BatchNorm2d`` whatever ``norm_layer`` says
    (``models/encoders/dual_segnext.py``, ``models/projector.py``; the SyncBatchNorm their ``train.py``
    picks under DDP only reaches isinstance checks in ``init_weight`` and ``group_weight``). So each GPU
    normalises its share of the batch with that share's statistics and the running statistics kept are
    GPU 0's. Plain BatchNorm run chunk by chunk does the same: each chunk its own statistics, and chunk
    0's running statistics kept (:func:`smmcl.engine.chunks.follow_chunk_zero`) and broadcast from rank
    0 by DDP (see :func:`wrap_ddp`).

    Raises:
        ConfigError: ``sync_bn=True`` on several CPU processes (SyncBatchNorm has no CPU kernel).
    """
    if not config.sync_bn or not ctx.distributed:
        return nn.BatchNorm2d  # in one process the batch statistics are the whole batch's anyway
    if ctx.device.type == 'cpu':
        raise ConfigError(f'sync_bn=True: SyncBatchNorm has no CPU kernel, and these {ctx.world_size} '
                          'processes run on the CPU; use --set sync_bn=False (per-process BatchNorm, the '
                          "authors' behaviour) or run on GPUs")
    return nn.SyncBatchNorm


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes (else ``model`` itself).

    ``broadcast_buffers=True`` copies rank 0's BatchNorm running statistics to every rank before each
    step's first forward (the forwards under ``no_sync()`` that follow do not broadcast), so rank 0's,
    which hold chunk 0's update, are the ones that accumulate and get saved: as ``nn.DataParallel``,
    whose replica on the first GPU updates the module's own buffers. DDP also broadcasts rank 0's
    initial weights here.
    """
    if not ctx.distributed:
        return model
    # Depthwise conv weights (C-1-3-3) get gradients whose stride differs from DDP's bucket only in
    # the size-1 dimension; DDP copies them and warns once per process. Nothing to fix.
    warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
    device_ids = [ctx.device.index] if ctx.device.type == 'cuda' else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=True,
                                   find_unused_parameters=False)
