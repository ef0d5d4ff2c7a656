"""Weight initialisation, ImageNet MSCAN weights, and checking checkpoints against a config."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import CheckpointError, CheckpointNotFoundError  # noqa: F401  (re-exported)
from .mscan import MSCAN_VARIANTS

PRETRAINED_HELP = (
    "{path} should hold SegNeXt's ImageNet-1K MSCAN weights of the {name} backbone (SegNeXt's released "
    "{name}.pth: github Visual-Attention-Network/SegNeXt, 'ImageNet pretrained models'); put that file "
    "there, point --set pretrained_model=<file> at it, or train from scratch with --set pretrained_model=None.")


def init_backbone_weights(module: nn.Module) -> None:
    """The authors' backbone init: trunc-normal Linear, unit LayerNorm, fan-out normal Conv2d."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_decoder_weights(module: nn.Module) -> None:
    """CMX's ``init_weight`` on the decode head: Kaiming-normal (fan_in, relu) conv weights.

    The authors' ``EncoderDecoder.init_weights`` (``models/builder.py``) calls ``utils/init_func.py``
    ``init_weight(decode_head, kaiming_normal_, norm_layer, ..., mode='fan_in', nonlinearity='relu')``:
    it re-draws the weight of every conv and leaves biases alone; its norm branch matches only
    ``norm_layer`` (BatchNorm), so the head's GroupNorms keep mmcv's 1 / 0. The resulting initial
    state, which a test checks layer by layer:

    - ``squeeze.conv``, ``align.conv``: N(0, 2 / fan_in), no bias; ``squeeze.gn``, ``align.gn``: 1 / 0;
    - ``hamburger.ham_in.conv``, ``hamburger.ham_out.conv``: N(0, 2 / fan_in), bias 0 (mmcv's
      ``ConvModule`` zeroed it at construction, see :func:`smmcl.models.ham_head.init_like_conv_module`);
    - ``conv_seg``: N(0, 2 / fan_in), bias PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')


@dataclass
class PretrainedReport:
    """What loading an ImageNet MSCAN file into the dual backbone did."""
    path: str
    loaded: int = 0
    uninitialised: List[str] = field(default_factory=list)  # backbone tensors the file did not fill
    unused: List[str] = field(default_factory=list)  # file keys that matched nothing
    shape_mismatch: List[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f'loaded {self.loaded} tensors from {self.path}; {len(self.uninitialised)} backbone '
                f'tensors keep their initialisation (cross-modal modules, fusion, projectors); '
                f'unused file keys: {self.unused or "none"}'
                + (f'; shape mismatches: {self.shape_mismatch}' if self.shape_mismatch else ''))


_SINGLE_BRANCH = re.compile(r'^(patch_embed|block|norm)(\d+)\.(.+)$')


def mscan_to_dual(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map SegNeXt single-branch names to both branches of :class:`DualMSCAN`.

    ``patch_embed{i}.*`` -> ``patch_embed{i}.*`` and ``patch_embed_other{i}.*`` (same for ``block``,
    ``norm``); everything else (e.g. a classifier ``head.*``) is returned as unused.
    """
    mapped, unused = {}, []
    for key, value in state_dict.items():
        name = key[len('backbone.'):] if key.startswith('backbone.') else key
        match = _SINGLE_BRANCH.match(name)
        if match is None:
            unused.append(key)
            continue
        part, stage, rest = match.groups()
        mapped[f'{part}{stage}.{rest}'] = value
        mapped[f'{part}_other{stage}.{rest}'] = value
    return mapped, unused


def load_pretrained_backbone(backbone: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str,
                             backbone_name: str = 'mscan_b') -> PretrainedReport:
    """Load SegNeXt ImageNet MSCAN weights (single-branch names) into both branches of ``backbone``.

    The file at ``path`` is read by :func:`smmcl.engine.checkpoint.load_backbone_pretrained`.

    Raises:
        CheckpointError: ``state_dict`` matches none of the backbone's tensors.
    """
    mapped, unused = mscan_to_dual(state_dict)
    own = backbone.state_dict()
    report = PretrainedReport(path=path, unused=unused)
    usable = {}
    for key, value in mapped.items():
        if key not in own:
            report.unused.append(key)
        elif own[key].shape != value.shape:
            report.shape_mismatch.append(f'{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}')
        else:
            usable[key] = value
    if report.shape_mismatch or not usable:
        fits, _ = describe_state_dict({f'backbone.{k}': v for k, v in mapped.items()})
        what = (f'holds ImageNet weights of {fits}, not of the {backbone_name} backbone' if fits else
                f'matches none of the {backbone_name} backbone tensors' if not usable else
                f'does not fit the {backbone_name} backbone ({len(report.shape_mismatch)} tensors of '
                f'another shape, e.g. {report.shape_mismatch[0]})')
        hint = f' (or train {fits}: --set backbone={fits})' if fits else ''
        raise CheckpointError(f'{path} {what}. ' + PRETRAINED_HELP.format(name=backbone_name, path=path) + hint)
    backbone.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    report.uninitialised = sorted(k for k in own if k not in usable)
    return report


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Optional[str], Optional[int]]:
    """(backbone variant, number of classes) that a segmentor state dict was built with."""
    num_classes = None
    if 'decode_head.conv_seg.weight' in state_dict:
        num_classes = int(state_dict['decode_head.conv_seg.weight'].shape[0])
    dims, depths = [], []
    for stage in range(1, 5):
        norm = state_dict.get(f'backbone.norm{stage}.weight')
        dims.append(None if norm is None else int(norm.shape[0]))
        blocks = {int(m.group(1)) for k in state_dict
                  for m in [re.match(rf'backbone\.block{stage}\.(\d+)\.', k)] if m}
        depths.append(len(blocks))
    for name, factory in MSCAN_VARIANTS.items():
        spec = factory()
        if tuple(spec.embed_dims) == tuple(dims) and tuple(spec.depths) == tuple(depths):
            return name, num_classes
    return None, num_classes


def check_compatible(state_dict: Mapping[str, torch.Tensor], backbone: str, num_classes: int,
                     source: str) -> None:
    """Refuse a checkpoint built for another backbone or class count, naming both values.

    Raises:
        CheckpointError: it was built for another backbone or number of classes.
    """
    ckpt_backbone, ckpt_classes = describe_state_dict(state_dict)
    problems = []
    if ckpt_backbone != backbone:
        problems.append(f'backbone {ckpt_backbone or "unknown"} (config: {backbone})')
    if ckpt_classes != num_classes:
        problems.append(f'{ckpt_classes} classes (config: {num_classes})')
    if problems:
        fix = ' '.join(([f'backbone={ckpt_backbone}'] if ckpt_backbone and ckpt_backbone != backbone else [])
                       + ([f'num_classes={ckpt_classes}'] if ckpt_classes != num_classes else []))
        raise CheckpointError(f'checkpoint {source} was trained with ' + ' and '.join(problems)
                              + f'; use it with the matching settings ({fix or "its backbone"}: in the experiment\'s '
                              f'config.py, with --set, or in the config given to the API)')
