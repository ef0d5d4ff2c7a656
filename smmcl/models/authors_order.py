"""The authors' optimizer layout: which parameters their AdamW holds, in which group, at which position.

PyTorch's ``Optimizer.state_dict`` keys the state of each parameter by its position in the groups, not
by its name, so resuming needs the authors' positions. They come from three places of their code
(palmdong/SMMCL, ``SMMCL_LLRGBD``):

- ``train.py``: ``group_weight(params_list, model, BatchNorm2d, base_lr)`` on the whole
  ``EncoderDecoder``, then ``AdamW(params_list, ...)``: two groups, [decay, no decay];
- ``utils/init_func.py`` ``group_weight``: walks ``model.modules()`` (registration order, depth
  first); a Linear or Conv weight goes to the decay group and its bias to the no-decay group, a norm
  layer's weight and bias to the no-decay group; parameters owned by other modules (MSCAN's
  ``layer_scale_1/2``) go nowhere;
- the registration order itself: ``models/builder.py`` registers ``backbone`` then ``decode_head``;
  ``models/encoders/dual_segnext.py`` ``MMSegNext.__init__`` registers per stage ``patch_embed``,
  ``patch_embed_other``, ``block``, ``block_other``, ``norm``, ``norm_other``, ``module``, ``fconv``
  (ours: each branch's three in turn), then the two projectors; ``models/ham_utils.py``
  ``BaseDecodeHead.__init__`` registers ``conv_seg`` before ``LightHamHead`` adds ``squeeze``,
  ``hamburger`` (``ham_in``, ``ham_out``) and ``align`` (ours: ``conv_seg`` last). Inside a block,
  patch embedding, modulation, fusion and projector the order is the same as ours.

The list is generated from the variant's depths, so it is written down once for every variant. The
authors' ``builder.py`` knows only ``mscan_b`` and ``mscan_l`` (other names silently build
``mscan_b``); for ``mscan_t`` / ``mscan_s`` the list is what the same code would give with their depths.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from .mscan import mscan_spec

# Kinds of layer, as CMX's group_weight sorts their parameters.
CONV, CONV_NO_BIAS, NORM = 'conv', 'conv without bias', 'norm'

Layer = Tuple[str, str]  # (module path, kind)


def _stem(path: str) -> List[Layer]:
    return [(f'{path}.proj.0', CONV), (f'{path}.proj.1', NORM), (f'{path}.proj.3', CONV),
            (f'{path}.proj.4', NORM)]


def _overlap_patch_embed(path: str) -> List[Layer]:
    return [(f'{path}.proj', CONV), (f'{path}.norm', NORM)]


def _block(path: str) -> List[Layer]:
    convs = ('conv0', 'conv0_1', 'conv0_2', 'conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3')
    gating = [f'{path}.attn.spatial_gating_unit.{conv}' for conv in convs]
    return ([(f'{path}.norm1', NORM), (f'{path}.attn.proj_1', CONV)] + [(g, CONV) for g in gating]
            + [(f'{path}.attn.proj_2', CONV), (f'{path}.norm2', NORM), (f'{path}.mlp.fc1', CONV),
               (f'{path}.mlp.dwconv.dwconv', CONV), (f'{path}.mlp.fc2', CONV)])


def _modulation(path: str) -> List[Layer]:
    return [(f'{path}.{part}.encode.{i}', CONV) for part in ('Spatial', 'Channel') for i in (0, 2, 4)]


def _projector(path: str) -> List[Layer]:
    return [(f'{path}.project.0', CONV), (f'{path}.project.2', NORM), (f'{path}.project.3', CONV),
            (f'{path}.project.5', NORM), (f'{path}.project.6', CONV)]


def authors_layers(depths: Sequence[int]) -> List[Layer]:
    """Every conv and norm layer of the authors' ``EncoderDecoder`` in their registration order."""
    layers: List[Layer] = []
    for i, depth in enumerate(depths, start=1):
        embed = _stem if i == 1 else _overlap_patch_embed
        layers += embed(f'backbone.patch_embed{i}') + embed(f'backbone.patch_embed_other{i}')
        for branch in ('block', 'block_other'):
            for j in range(depth):
                layers += _block(f'backbone.{branch}{i}.{j}')
        layers += [(f'backbone.norm{i}', NORM), (f'backbone.norm_other{i}', NORM)]
        layers += _modulation(f'backbone.module{i}') + [(f'backbone.fconv{i}.fusion_conv.0', CONV)]
    layers += _projector('backbone.projector_color') + _projector('backbone.projector_other')
    layers += [('decode_head.conv_seg', CONV),
               ('decode_head.squeeze.conv', CONV_NO_BIAS), ('decode_head.squeeze.gn', NORM),
               ('decode_head.hamburger.ham_in.conv', CONV), ('decode_head.hamburger.ham_out.conv', CONV),
               ('decode_head.align.conv', CONV_NO_BIAS), ('decode_head.align.gn', NORM)]
    return layers


def authors_param_groups(backbone: str) -> Tuple[List[str], List[str]]:
    """Parameter names of the authors' two AdamW groups, in their order: (decay, no decay).

    Position k of ``decay + no_decay`` is the key k of the ``state`` in their ``optimizer.state_dict()``.
    """
    decay, no_decay = [], []
    for path, kind in authors_layers(mscan_spec(backbone).depths):
        if kind == NORM:
            no_decay += [f'{path}.weight', f'{path}.bias']
        else:
            decay.append(f'{path}.weight')
            if kind == CONV:
                no_decay.append(f'{path}.bias')
    return decay, no_decay


def layer_scale_names(backbone: str) -> List[str]:
    """The parameters in neither of the authors' groups (never updated in their runs)."""
    return [f'backbone.{branch}{i}.{j}.layer_scale_{k}'
            for i, depth in enumerate(mscan_spec(backbone).depths, start=1)
            for branch in ('block', 'block_other') for j in range(depth) for k in (1, 2)]
