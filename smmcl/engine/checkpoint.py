"""Training checkpoints: the authors' format, written atomically, plus what an exact resume needs.

The authors' CMX ``Engine.save_checkpoint`` writes ``checkpoint_dir/epoch-N.pth`` holding
``{'model', 'optimizer', 'epoch', 'iteration'}`` (``model`` without DDP's ``module.`` prefix) and
``save_and_link_checkpoint`` points the symlink ``epoch-last.pth`` at it. We keep that layout, so the
released ``epoch-500.pth`` files and ours load the same way, and add:

- ``rng``: one entry per rank with the Python, NumPy, torch CPU (and CUDA) generator states,
- ``lr_step``: the position in the lr schedule (``epoch * niters_per_epoch`` iterations),
- ``sampler_epoch``: the epoch the ``DistributedSampler`` last ran,
- ``config``: ``backbone`` and ``num_classes`` the model was built with,
- ``scaler``: the fp16 loss scale (``--set amp=True`` on GPUs without bf16 only).

Crash safety: a checkpoint is written to a temporary file in the same folder (``.epoch-N.pth.*.tmp``),
flushed and fsync'ed, then renamed over its final name with ``os.replace``, which is atomic on POSIX; a
process killed at any moment leaves either the old file or the new one, never a torn one. The link
``epoch-last.pth`` is a relative symlink (as the authors', so it costs no disk), replaced atomically the
same way (a temporary symlink renamed over it) and only after its target is complete, so it always
names a complete checkpoint. Moving the link is the commit point of a save: a run killed between the
two renames leaves a complete ``epoch-N.pth`` while the link still names N - 1; resuming from the link
repeats epoch N, bit-identically (resume is exact), and rewrites the same file. Temporary files left by a
killed run match :func:`is_temp_file`; they are never read and :func:`remove_stale_temp_files` deletes
them when training starts.
"""
from __future__ import annotations

import logging
import os
import os.path as osp
import random
import re
import uuid
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.amp import GradScaler
from torch.optim import Optimizer

from ..models.weights import check_compatible

logger = logging.getLogger(__name__)

LAST = 'epoch-last.pth'
_TEMP = re.compile(r'^\..+\.tmp$')


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (unreadable, or built for another model)."""


def checkpoint_name(epoch: int) -> str:
    return f'epoch-{epoch}.pth'


def should_save(epoch: int, config) -> bool:
    """The authors' rule: from ``checkpoint_start_epoch`` every ``checkpoint_step`` epochs, and the last."""
    return (epoch >= config.checkpoint_start_epoch and epoch % config.checkpoint_step == 0
            or epoch == config.nepochs)


def is_temp_file(name: str) -> bool:
    """True for the temporary files (``.<name>.<random>.tmp``) this module writes before renaming."""
    return bool(_TEMP.match(osp.basename(name)))


def _fsync_dir(folder: str) -> None:
    # Makes the rename itself durable (a power loss after os.replace keeps the new name).
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not support fsync on directories
        pass
    finally:
        os.close(fd)


def _temp_name(path: str) -> str:
    """A fresh ``.<name>.<random>.tmp`` beside ``path`` (see :func:`is_temp_file`)."""
    return osp.join(osp.dirname(osp.abspath(path)), f'.{osp.basename(path)}.{uuid.uuid4().hex}.tmp')


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` such that ``path`` is always either the old file or the complete new one."""
    folder = osp.dirname(osp.abspath(path))
    tmp = _temp_name(path)
    # Mode 0o666 less the umask, as torch.save's own file (tempfile.mkstemp would make it 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_symlink(target: str, link: str) -> None:
    """Point ``link`` at ``target`` (a name relative to the link's folder), replacing it atomically."""
    folder = osp.dirname(osp.abspath(link))
    tmp = _temp_name(link)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        os.remove(tmp)
        raise
    _fsync_dir(folder)


def remove_stale_temp_files(folder: str) -> List[str]:
    """Delete temporary files that a killed run left in ``folder``; returns their names."""
    if not osp.isdir(folder):
        return []
    stale = sorted(f for f in os.listdir(folder) if is_temp_file(f))
    for name in stale:
        try:
            os.remove(osp.join(folder, name))
        except FileNotFoundError:
            pass
    return stale


# ---- random generator states --------------------------------------------------------------------

def rng_state(device: torch.device = torch.device('cpu')) -> Dict[str, Any]:
    """This process' generator states, in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(),
             'numpy': {'name': name, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
             'torch': torch.get_rng_state()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device = torch.device('cpu')) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_to_tuple(state['python']))
    npst = state['numpy']
    np.random.set_state((npst['name'], npst['keys'].numpy().astype(np.uint32), npst['pos'],
                         npst['has_gauss'], npst['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---- saving and loading -------------------------------------------------------------------------

def training_state(model: nn.Module, optimizer: Optimizer, epoch: int, iteration: int, lr_step: int,
                   rng: List[Dict[str, Any]], config, scaler: Optional[GradScaler] = None) -> Dict[str, Any]:
    """The checkpoint dict. ``model`` must be the unwrapped module (not the DDP wrapper), so its
    names carry no ``module.`` prefix; ``iteration`` is the authors' (index of the epoch's last
    iteration); ``scaler``'s loss scale is kept when it is enabled (fp16)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError('save the unwrapped model (ddp_model.module), not the DDP wrapper')
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
             'iteration': iteration, 'rng': rng, 'lr_step': lr_step, 'sampler_epoch': epoch,
             'config': {'backbone': config.backbone, 'num_classes': int(config.num_classes)}}
    if scaler is not None and scaler.is_enabled():
        state['scaler'] = scaler.state_dict()
    return state


def save_checkpoint(state: Dict[str, Any], checkpoint_dir: str) -> str:
    """Write ``epoch-<state['epoch']>.pth`` atomically, then point ``epoch-last.pth`` at it."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    name = checkpoint_name(state['epoch'])
    path = osp.join(checkpoint_dir, name)
    atomic_save(state, path)
    atomic_symlink(name, osp.join(checkpoint_dir, LAST))
    return path


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint onto the CPU (ours or the authors'; ``epoch-last.pth`` follows its link).

    Raises:
        FileNotFoundError: no such file (or a link to a missing file).
        CheckpointError: the file is not a readable checkpoint.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint {path} does not exist'
                                + (' (it is a link to a missing file)' if osp.islink(path) else ''))
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f'checkpoint {path} cannot be read ({type(error).__name__}: {error}); '
                              f'resume from another epoch-N.pth') from None
    if not isinstance(state, dict) or 'model' not in state:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'model' entry)")
    return state


def restore_training_state(state: Dict[str, Any], model: nn.Module, optimizer: Optional[Optimizer],
                           config, source: str, scaler: Optional[GradScaler] = None) -> None:
    """Load model (strict), optimizer and an enabled ``scaler``'s loss scale (when the checkpoint has
    one) from a checkpoint dict, refusing another backbone / class count.

    Raises:
        CheckpointError: built for another backbone or number of classes (naming both values), or
            the state dicts do not match.
    """
    try:
        check_compatible(state['model'], config.backbone, int(config.num_classes), source)
        model.load_state_dict(state['model'], strict=True)
        if optimizer is not None:
            if 'optimizer' not in state:
                raise ValueError(f'{source} holds no optimizer state')
            try:
                optimizer.load_state_dict(state['optimizer'])
            except ValueError as error:  # the parameter groups differ
                raise ValueError(f'the optimizer state of {source} does not fit this model ({error}); was '
                                 f'it trained with another train_layer_scale?') from None
        if scaler is not None and scaler.is_enabled() and 'scaler' in state:
            scaler.load_state_dict(state['scaler'])
    except (ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(str(error)) from None
