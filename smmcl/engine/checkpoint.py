"""Training checkpoints: the authors' format, written atomically, plus what an exact resume needs.

The authors' CMX ``Engine.save_checkpoint`` writes ``checkpoint_dir/epoch-N.pth`` holding
``{'model', 'optimizer', 'epoch', 'iteration'}`` (``model`` without DDP's ``module.`` prefix) and
``save_and_link_checkpoint`` points the symlink ``epoch-last.pth`` at it. We keep that layout, so the
released ``epoch-500.pth`` files and ours load the same way, and add:

- ``rng``: one entry per rank with the Python, NumPy, torch CPU (and CUDA) generator states (not
  needed to resume exactly: training draws are seeded per step and chunk, see :mod:`.chunks`),
- ``lr_step``: the position in the lr schedule (global iterations done),
- ``next_iteration``: iterations of epoch ``epoch + 1`` already done (0 but in an iteration checkpoint),
- ``sampler_epoch``: the epoch the sampler last ran,
- ``config``: ``backbone`` and ``num_classes`` the model was built with,
- ``scaler``: the fp16 loss scale (``--set amp=True`` on GPUs without bf16 only),
- ``optimizer_param_names``: the parameter name of every position in ``optimizer``'s groups.

Optimizer state in the authors' order (a format change): PyTorch keys optimizer state by position in
the groups, and our module registration order differs from the authors' (see
:mod:`smmcl.models.authors_order`). Since this change ``optimizer`` is stored with the authors'
positions, so their ``train.py -c`` resumes our checkpoints; parameters they do not optimise
(MSCAN's layer scales under ``train_layer_scale=True``) follow theirs at the end of the no-decay group,
and :func:`authors_checkpoint` refuses such a checkpoint with a message. Loading maps the state by
parameter name: ours through ``optimizer_param_names``; the authors' files (no ``rng`` entry) through
their name list; ours from before this change (``rng`` but no names) in our own module order.

Crash safety: a checkpoint is written to a temporary file in the same folder (``.epoch-N.pth.*.tmp``),
flushed and fsync'ed, then renamed over its final name with ``os.replace``, which is atomic on POSIX; a
process killed at any moment leaves either the old file or the new one, never a torn one. The link
``epoch-last.pth`` is a symlink (as the authors', so it costs no disk; theirs absolute, ours relative, so
it survives moving the log folder), replaced atomically the
same way (a temporary symlink renamed over it) and only after its target is complete, so it always
names a complete checkpoint. Moving the link is the commit point of a save: a run killed between the
two renames leaves a complete ``epoch-N.pth`` while the link still names N - 1; resuming from the link
repeats epoch N, bit-identically (resume is exact), and rewrites the same file. Temporary files left by a
killed run match :func:`is_temp_file`; they are never read and :func:`remove_stale_temp_files` deletes
them when training starts.

Iteration checkpoints (``config.checkpoint_every_iters``): ``iter-<N>.pth`` after N global iterations,
written the same atomic way, with ``epoch`` the epochs completed and ``next_iteration`` the iterations of
the next one done (the authors' ``train.py -c`` would restart that epoch). Only the newest is kept: a
new one, or an epoch checkpoint, removes the others once it is complete. :func:`latest_checkpoint` picks
what ``-c auto`` resumes.
"""
from __future__ import annotations

import logging
import os
import os.path as osp
import re
import uuid
import zipfile
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torch.amp import GradScaler
from torch.optim import Optimizer

from ..config import stored_config
from ..models.authors_order import authors_param_groups
from ..models.weights import (PRETRAINED_HELP, CheckpointError, CheckpointNotFoundError, PretrainedReport,
                              check_compatible, load_pretrained_backbone)
from .optim import optimizer_param_names

logger = logging.getLogger(__name__)

LAST = 'epoch-last.pth'
# The settings that define a run's schedule (the lr at each step, what a step is), stored in every
# checkpoint so that resuming with others can say what changes (smmcl.engine.resume).
SCHEDULE_KEYS = ('nepochs', 'lr', 'lr_power', 'warm_up_epoch', 'batch_size', 'replicas', 'optimizer',
                 'momentum', 'weight_decay')
_TEMP = re.compile(r'^\..+\.tmp$')
_EPOCH = re.compile(r'^epoch-(\d+)\.pth$')
_ITER = re.compile(r'^iter-(\d+)\.pth$')


def checkpoint_name(epoch: int) -> str:
    return f'epoch-{epoch}.pth'


def epoch_of_name(name: str) -> Optional[int]:
    """N of a file named ``epoch-N.pth`` (None for any other name, ``epoch-last.pth`` included)."""
    match = _EPOCH.match(osp.basename(name))
    return int(match.group(1)) if match else None


def checkpoint_epoch(path: str) -> Optional[int]:
    """The epoch of checkpoint file ``path``, following links (``epoch-last.pth`` -> its ``epoch-N.pth``)."""
    return epoch_of_name(osp.realpath(path))


def iteration_checkpoint_name(done: int) -> str:
    """The name of the checkpoint written after ``done`` global iterations."""
    return f'iter-{done}.pth'


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


def atomic_save(obj: Any, path: str, writer: Callable[[Any, Any], None] = torch.save) -> None:
    """``writer(obj, file)`` (default ``torch.save``) into ``path`` such that ``path`` is always either the
    old file or the complete new one."""
    folder = osp.dirname(osp.abspath(path))
    tmp = _temp_name(path)
    # Mode 0o666 less the umask, as torch.save's own file (tempfile.mkstemp would make it 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, 'wb') as f:
            writer(obj, f)
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

# ---- saving and loading -------------------------------------------------------------------------

def training_state(model: nn.Module, optimizer: Optimizer, epoch: int, iteration: int, lr_step: int,
                   rng: List[Dict[str, Any]], config, scaler: Optional[GradScaler] = None,
                   next_iteration: int = 0) -> Dict[str, Any]:
    """The checkpoint dict. ``model`` must be the unwrapped module (not the DDP wrapper), so its
    names carry no ``module.`` prefix; ``epoch`` the epochs completed; ``iteration`` is the authors'
    (index of the last iteration run); ``next_iteration`` the iterations of epoch ``epoch + 1`` done
    (an iteration checkpoint); ``scaler``'s loss scale is kept when it is enabled (fp16); the optimizer
    state is stored in the authors' parameter order (module docstring)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError('save the unwrapped model (ddp_model.module), not the DDP wrapper')
    names = optimizer_param_names(model, optimizer)
    stored_names = in_authors_order(names, config.backbone)
    optimizer_state = reorder_optimizer_state(optimizer.state_dict(), names, stored_names, 'the optimizer')
    state = {'model': model.state_dict(), 'optimizer': optimizer_state, 'optimizer_param_names': stored_names,
             'epoch': epoch, 'iteration': iteration, 'rng': rng, 'lr_step': lr_step,
             'next_iteration': next_iteration, 'sampler_epoch': epoch + 1 if next_iteration else epoch,
             'config': dict(stored_config(config), backbone=config.backbone, num_classes=int(config.num_classes))}
    if scaler is not None and scaler.is_enabled():
        state['scaler'] = scaler.state_dict()
    return state


def save_checkpoint(state: Dict[str, Any], checkpoint_dir: str) -> str:
    """Write ``epoch-<state['epoch']>.pth`` atomically, then point ``epoch-last.pth`` at it; the
    iteration checkpoints, older now, are removed."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    name = checkpoint_name(state['epoch'])
    path = osp.join(checkpoint_dir, name)
    atomic_save(state, path)
    atomic_symlink(name, osp.join(checkpoint_dir, LAST))
    _remove_iteration_checkpoints(checkpoint_dir, keep=None)
    return path


def save_iteration_checkpoint(state: Dict[str, Any], checkpoint_dir: str) -> str:
    """Write ``iter-<state['lr_step']>.pth`` atomically, then remove the older iteration checkpoints."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    name = iteration_checkpoint_name(state['lr_step'])
    atomic_save(state, osp.join(checkpoint_dir, name))
    _remove_iteration_checkpoints(checkpoint_dir, keep=name)
    return osp.join(checkpoint_dir, name)


def _remove_iteration_checkpoints(folder: str, keep: Optional[str]) -> None:
    # Any other iter-N.pth is older than the checkpoint just written, or left by a run that was resumed
    # from an earlier checkpoint (another timeline): either way -c auto must not pick it.
    for name in os.listdir(folder):
        if _ITER.match(name) and name != keep:
            try:
                os.remove(osp.join(folder, name))
            except FileNotFoundError:
                pass


def latest_checkpoint(checkpoint_dir: str, niters: int) -> Optional[str]:
    """The newest complete checkpoint of ``checkpoint_dir`` (what ``-c auto`` resumes), or None.

    Positions come from the names: ``epoch-N.pth`` is ``N * niters`` global iterations, ``iter-N.pth``
    N; the epoch checkpoint wins a tie. Temporary files of an interrupted save and the ``epoch-last.pth``
    link are not candidates (every ``epoch-N.pth`` is complete: it is renamed into place only then).
    """
    if not osp.isdir(checkpoint_dir):
        return None
    best = None
    for name in os.listdir(checkpoint_dir):
        epoch, done = _EPOCH.match(name), _ITER.match(name)
        if epoch or done:
            key = (int(epoch.group(1)) * niters, 1) if epoch else (int(done.group(1)), 0)
            if best is None or key > best[0]:
                best = (key, name)
    return osp.join(checkpoint_dir, best[1]) if best else None


def read_checkpoint(path: str, *, mmap: bool = False) -> Dict[str, Any]:
    """Read a checkpoint or weights file onto the CPU: ours, the authors' (``{'model': ...}``), an
    ImageNet MSCAN file (``{'state_dict': ...}``) or a bare state dict; ``epoch-last.pth`` follows its link.

    Loaded with ``weights_only=True``: these files hold only tensors, numbers and containers, and a file
    that needs arbitrary unpickling is refused rather than executed. ``mmap=True`` maps the tensors
    instead of reading them, for checks that look only at shapes (files in torch's pre-1.6 format,
    which cannot be mapped, are read in full).

    Raises:
        CheckpointNotFoundError: no such file (or a link to a missing file).
        CheckpointError: the file cannot be read, or holds no dict.
    """
    if not osp.isfile(path):
        raise CheckpointNotFoundError(f'checkpoint {path} does not exist'
                                      + (' (it is a link to a missing file)' if osp.islink(path) else ''))
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True,
                          mmap=mmap and zipfile.is_zipfile(path))
    except Exception as error:  # torch raises several types for truncated or foreign files
        reason = str(error).splitlines()[0] if str(error) else ''
        raise CheckpointError(f'checkpoint {path} cannot be read with weights_only=True '
                              f'({type(error).__name__}: {reason}); is it complete? use another '
                              f'epoch-N.pth') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'checkpoint {path} holds a {type(ckpt).__name__}, not a state dict')
    return ckpt


def model_state(ckpt: Dict[str, Any], source: str = 'the checkpoint') -> Dict[str, torch.Tensor]:
    """The model weights of what :func:`read_checkpoint` returned: its ``'model'`` entry (ours, the
    authors'), its ``'state_dict'`` entry (SegNeXt's ImageNet files), or the dict itself when it is a
    state dict.

    Raises:
        CheckpointError: none of these (``source`` names the file in the message).
    """
    for key in ('model', 'state_dict'):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if ckpt and all(torch.is_tensor(value) for value in ckpt.values()):
        return ckpt
    raise CheckpointError(f"{source} holds no model weights (no 'model' or 'state_dict' entry, and it is "
                          f"not a state dict: keys {sorted(map(str, ckpt))[:5]})")


def load_backbone_pretrained(model: nn.Module, config) -> Optional[PretrainedReport]:
    """Load ``config.pretrained_model`` (SegNeXt's ImageNet MSCAN weights) into both branches of
    ``model.backbone``, after :func:`smmcl.models.builder.build_segmentor`; None when it is None.

    Raises:
        CheckpointNotFoundError: no such file (the message says where to get it).
        CheckpointError: the file is unreadable or matches none of the backbone's tensors.
    """
    path = config.pretrained_model
    if not path:
        return None
    if not osp.isfile(path):
        raise CheckpointNotFoundError(f'pretrained backbone {path} not found. '
                                      + PRETRAINED_HELP.format(name=config.backbone, path=path))
    report = load_pretrained_backbone(model.backbone, model_state(read_checkpoint(path), path), path,
                                      config.backbone)
    logger.info(report.summary())
    return report


def restore_training_state(state: Dict[str, Any], model: nn.Module, optimizer: Optional[Optimizer],
                           config, source: str, scaler: Optional[GradScaler] = None) -> None:
    """Load model (strict), optimizer and an enabled ``scaler``'s loss scale (when the checkpoint has
    one) from a checkpoint dict (ours or the authors'), refusing another backbone / class count. The
    optimizer state is matched to ``optimizer``'s parameters by name (module docstring).

    Raises:
        CheckpointError: not a training checkpoint, built for another backbone or number of classes
            (naming both values), or the state dicts do not match.
    """
    if 'model' not in state:
        raise CheckpointError(f"{source} is not a training checkpoint (no 'model' entry)")
    try:
        check_compatible(state['model'], config.backbone, int(config.num_classes), source)
        model.load_state_dict(state['model'], strict=True)
        if optimizer is not None:
            if 'optimizer' not in state:
                raise ValueError(f'{source} holds no optimizer state')
            names = optimizer_param_names(model, optimizer)
            stored_names = _stored_param_names(state, names, config.backbone)
            saved = reorder_optimizer_state(state['optimizer'], stored_names, names, source)
            _check_state_shapes(saved, optimizer, names, source)
            optimizer.load_state_dict(saved)
        if scaler is not None and scaler.is_enabled() and 'scaler' in state:
            scaler.load_state_dict(state['scaler'])
    except (ValueError, RuntimeError, KeyError) as error:
        message = str(error)
        raise CheckpointError(message if source in message else f'{source}: {message}') from None


# ---- optimizer state by parameter name ----------------------------------------------------------

def in_authors_order(names: List[List[str]], backbone: str) -> List[List[str]]:
    """Each group of ``names`` sorted into the authors' positions
    (:func:`smmcl.models.authors_order.authors_param_groups`); names the authors' optimizer does not
    hold (layer scales with ``train_layer_scale=True``) keep their order after theirs."""
    decay, no_decay = authors_param_groups(backbone)
    rank = {name: i for i, name in enumerate(decay + no_decay)}
    unranked = len(rank)
    return [sorted(group, key=lambda name: rank.get(name, unranked)) for group in names]


def _stored_param_names(state: Dict[str, Any], names: List[List[str]], backbone: str) -> List[List[str]]:
    """The parameter name of every position of ``state['optimizer']``."""
    if 'optimizer_param_names' in state:
        return state['optimizer_param_names']
    if 'rng' in state:  # ours from before the authors' order: our module order, as ``names``
        return names
    logger.info("no 'rng' entry: reading the optimizer state as the authors' checkpoint, matched to our "
                "parameters through their order (smmcl.models.authors_order)")
    return list(authors_param_groups(backbone))  # the authors' Engine.save_checkpoint


def reorder_optimizer_state(saved: Dict[str, Any], saved_names: List[List[str]],
                            names: List[List[str]], source: str) -> Dict[str, Any]:
    """An ``optimizer.state_dict()`` whose positions hold ``saved_names`` rearranged so that they hold
    ``names`` (group by group, the same names in each group). Group settings (lr, betas, ...) and the
    per-parameter state (AdamW's step, exp_avg, exp_avg_sq) are kept; tensors are not copied.

    Raises:
        ValueError: the groups differ in number or in the parameters they hold (naming some).
    """
    groups = saved['param_groups']
    if len(groups) != len(names) or len(saved_names) != len(groups):
        raise ValueError(f'the optimizer state of {source} has {len(groups)} parameter groups, this '
                         f'optimizer {len(names)}')
    position = {}
    for g, (group, group_names) in enumerate(zip(groups, saved_names)):
        if len(group['params']) != len(group_names):
            raise ValueError(f'group {g} of the optimizer state of {source} holds {len(group["params"])} '
                             f'parameters, this optimizer {len(names[g])}; was it trained with another '
                             f'train_layer_scale?')
        position.update(zip(group_names, group['params']))
    state, new_groups, index = {}, [], 0
    for g, (group, group_names, wanted) in enumerate(zip(groups, saved_names, names)):
        have, want = set(group_names), set(wanted)
        if have != want:
            extra, missing = sorted(have - want), sorted(want - have)
            raise ValueError(
                f'group {g} of the optimizer state of {source} does not hold the parameters of this '
                f'optimizer (only there: {len(extra)}, e.g. {extra[:2]}; only here: {len(missing)}, e.g. '
                f'{missing[:2]}); was it trained with another train_layer_scale?')
        params = []
        for name in wanted:
            if position[name] in saved['state']:
                state[index] = saved['state'][position[name]]
            params.append(index)
            index += 1
        new_group = dict(group, params=params)
        if 'param_names' in group:  # optimizers built from named parameters (torch >= 2.6)
            new_group['param_names'] = list(wanted)
        new_groups.append(new_group)
    return {'state': state, 'param_groups': new_groups}


def _check_state_shapes(saved: Dict[str, Any], optimizer: Optimizer, names: List[List[str]],
                        source: str) -> None:
    """Refuse per-parameter state (AdamW's moments) shaped unlike its parameter: PyTorch would load it
    and fail only at the first ``step()``."""
    params = [p for group in optimizer.param_groups for p in group['params']]
    flat_names = [name for group in names for name in group]
    for index, param_state in saved['state'].items():
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.ndim and value.shape != params[index].shape:
                raise ValueError(f'the optimizer state of {source} for {flat_names[index]} ({key}) has shape '
                                 f'{tuple(value.shape)}, the parameter {tuple(params[index].shape)}')


def authors_checkpoint(state: Dict[str, Any], source: str = 'the checkpoint') -> Dict[str, Any]:
    """What the authors' ``train.py -c`` reads (``model``, ``optimizer``, ``epoch``, ``iteration``),
    after checking that their optimizer can take the optimizer state as stored.

    Raises:
        CheckpointError: the optimizer state holds parameters the authors' optimizer does not
            (trained with ``train_layer_scale=True``) or lacks some, or the file predates the authors'
            order; the message says which and what to do.
    """
    keys = ('model', 'optimizer', 'epoch', 'iteration')
    if 'rng' not in state:  # the authors' own file
        return {key: state[key] for key in keys}
    names = state.get('optimizer_param_names')
    if names is None:
        raise CheckpointError(f'{source} stores its optimizer state in our own parameter order (written '
                              f'before checkpoints used the authors\' order); resume it with our train.py '
                              f'for an epoch and use the checkpoint that writes')
    backbone = state['config']['backbone']
    theirs = list(authors_param_groups(backbone))
    if names != theirs:
        held = {name for group in names for name in group}
        extra = sorted(held - {name for group in theirs for name in group})
        if extra:
            raise CheckpointError(
                f'{source} cannot be resumed by the authors\' train.py: its optimizer state holds '
                f'{len(extra)} parameters their optimizer never updates (e.g. {extra[0]}); it was '
                f'trained with train_layer_scale=True, and their group_weight leaves MSCAN\'s layer '
                f'scales out. Only its model weights are theirs (load state[\'model\'])')
        raise CheckpointError(f'the optimizer state of {source} is not in the authors\' {backbone} '
                              f'layout; it cannot be resumed by their train.py')
    return {key: state[key] for key in keys}
