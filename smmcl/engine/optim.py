"""The optimizers of SMMCL over the authors' parameter groups (CMX ``utils/init_func.py``): AdamW (their
config's) or SGD with momentum (their ``train.py``'s ``SGDM`` branch)."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.optim import SGD, AdamW, Optimizer

logger = logging.getLogger(__name__)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)


def group_weight(model: nn.Module, train_layer_scale: bool = False
                 ) -> Tuple[List[nn.Parameter], List[nn.Parameter], List[str]]:
    """Split the parameters as CMX's ``group_weight``.

    Linear / conv weights decay; their biases and every norm-layer weight and bias do not. CMX walks
    ``module.modules()`` and looks only at those layer types, so parameters owned directly by another
    module - MSCAN's ``layer_scale_1/2`` - are in no group and are never updated in the authors' runs
    (they keep their 1e-2 initialisation or the pretrained values). ``train_layer_scale=True`` puts
    them into the no-decay group instead.

    Returns:
        (decay, no_decay, left_out): two parameter lists and the names of parameters in neither.
    """
    decay, no_decay = [], []
    for m in model.modules():
        if isinstance(m, (nn.Linear,) + _CONVS):
            decay.append(m.weight)
            if m.bias is not None:
                no_decay.append(m.bias)
        elif isinstance(m, _NORMS):
            if m.weight is not None:
                no_decay.append(m.weight)
            if m.bias is not None:
                no_decay.append(m.bias)
    grouped = {id(p) for p in decay + no_decay}
    left_out = [name for name, p in model.named_parameters() if id(p) not in grouped]
    if train_layer_scale:
        no_decay.extend(p for p in model.parameters() if id(p) not in grouped)
        left_out = []
    return decay, no_decay, left_out


def optimizer_param_names(model: nn.Module, optimizer: Optimizer) -> List[List[str]]:
    """The names (in ``model``) of each optimizer group's parameters, in the optimizer's order.

    Raises:
        ValueError: the optimizer holds a parameter that ``model`` does not have.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in group['params']] for group in optimizer.param_groups]
    except KeyError:
        raise ValueError('the optimizer holds a parameter that is not in the model; build the optimizer '
                         'from the unwrapped model it trains') from None


def build_optimizer(model: nn.Module, config) -> Optimizer:
    """The authors' optimizer over ``[decay group, no-decay group (weight_decay 0)]``, as their
    ``train.py`` builds it from ``config.optimizer``: ``'AdamW'``, betas (0.9, 0.999); ``'SGDM'``,
    ``torch.optim.SGD`` with ``momentum=config.momentum``, no dampening, no Nesterov. Both take
    ``lr`` and ``weight_decay``.

    The groups hold the parameters in our module order, which differs from the authors'; the order
    only matters for the optimizer state in a checkpoint, which :mod:`smmcl.engine.checkpoint` stores
    in the authors' order and loads by parameter name.

    Config fields: ``optimizer``, ``lr``, ``weight_decay``, ``momentum``, ``train_layer_scale``,
    ``host_sync_every``: above 1 AdamW is PyTorch's fused implementation, which can skip a step on
    the device (:func:`step_unless_nonfinite`); 1 keeps the authors' default implementation. The two
    round differently (about 1e-7 per step), so a run is reproduced bit for bit with the same
    setting. A checkpoint written with either resumes with either: its saved ``fused`` flag is
    replaced by this optimizer's on loading. (SGDM with ``host_sync_every > 1`` is refused at load by
    :func:`smmcl.config.validate`: fused SGD would keep uninitialised momentum after a skipped first
    step.)
    """
    decay, no_decay, left_out = group_weight(model, config.train_layer_scale)
    if left_out:
        logger.info('%d parameter tensors are in no optimizer group and stay fixed, as in the authors\' '
                    'runs (e.g. %s); --set train_layer_scale=True trains them', len(left_out), left_out[0])
    groups: List[Dict] = [dict(params=decay, lr=config.lr),
                          dict(params=no_decay, weight_decay=0.0, lr=config.lr)]
    if config.optimizer == 'SGDM':  # their SMMCL_LLRGBD/train.py, the optimizer branch after group_weight
        optimizer = SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        optimizer = AdamW(groups, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay,
                          fused=config.host_sync_every > 1 or None)
    optimizer.register_load_state_dict_pre_hook(_keep_own_implementation)
    return optimizer


def optimizer_kind(state_dict: Dict[str, Any]) -> Optional[str]:
    """'AdamW' or 'SGDM' from an ``optimizer.state_dict()``'s per-parameter state (None: no state yet)."""
    for param_state in state_dict.get('state', {}).values():
        if 'exp_avg' in param_state:
            return 'AdamW'
        if 'momentum_buffer' in param_state:
            return 'SGDM'
    return None


def _keep_own_implementation(optimizer: Optimizer, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """``load_state_dict`` takes the saved groups' settings, ``fused`` included: keep this optimizer's
    (chosen by ``host_sync_every``), so that the device-side skip works after any resume. The step
    counts then land where this implementation keeps them (the parameter's device when fused).

    Raises:
        ValueError: the state was written by the other optimizer (AdamW moments into SGD, or back).
    """
    saved, own_kind = optimizer_kind(state_dict), 'SGDM' if isinstance(optimizer, SGD) else 'AdamW'
    if saved is not None and saved != own_kind:
        raise ValueError(f'the checkpoint\'s optimizer state is {saved}\'s, this run trains with {own_kind}: '
                         f'resume it with --set optimizer={saved}')
    own = {key: optimizer.param_groups[0][key] for key in ('fused', 'foreach')}
    groups = [dict(group, **own) for group in state_dict['param_groups']]
    return dict(state_dict, param_groups=groups)


def step_unless_nonfinite(optimizer: Optimizer, finite: torch.Tensor) -> None:
    """``optimizer.step()``, skipped on the device when ``finite`` (a 0-dim bool tensor on the
    parameters' device) is False: no host read.

    Fused AdamW (``fused=True``, :func:`build_optimizer` with ``host_sync_every > 1``) reads
    ``optimizer.found_inf`` (1.0 = skip) inside its kernel, the one GradScaler uses: a skipped step
    leaves the weights and moments as they were and takes back its step count increment on the device.
    """
    optimizer.found_inf = (~finite).float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
