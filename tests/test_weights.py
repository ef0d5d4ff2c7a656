"""Checkpoints in the authors' format and SegNeXt ImageNet MSCAN weights."""
import json
import os
import re

import pytest
import torch

from smmcl.config import base_config
from smmcl.engine.checkpoint import load_backbone_pretrained
from smmcl.models import build_segmentor, check_compatible, describe_state_dict

LAYOUT = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'reference',
                      'state_dict_layout_mscan_b_14cls.json')


def cfg_for(backbone='mscan_b', num_classes=14, pretrained=None):
    cfg = base_config()
    cfg.update(backbone=backbone, num_classes=num_classes, pretrained_model=pretrained)
    return cfg


@pytest.mark.slow  # builds and loads the full MSCAN-B model twice (~12 s on 2 cores)
def test_authors_checkpoint_loads_strictly(tmp_path):
    source = build_segmentor(cfg_for())
    if os.path.isfile(LAYOUT):
        with open(LAYOUT) as f:
            layout = json.load(f)
        assert {k: list(v.shape) for k, v in source.state_dict().items()} == layout
    path = tmp_path / 'epoch-500.pth'
    torch.save({'model': source.state_dict(), 'optimizer': {}, 'epoch': 500, 'iteration': 44500}, path)
    target = build_segmentor(cfg_for())
    state = torch.load(path, map_location='cpu')['model']
    check_compatible(state, 'mscan_b', 14, str(path))
    target.load_state_dict(state, strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def imagenet_mscan_file(path, backbone):
    """A SegNeXt-format ImageNet MSCAN file: single-branch names plus a classifier head."""
    dual = build_segmentor(cfg_for(backbone)).backbone.state_dict()
    single = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in dual.items()
              if re.match(r'(patch_embed|block|norm)\d', k)}
    single['head.weight'] = torch.randn(1000, dual['norm4.weight'].shape[0])
    single['head.bias'] = torch.randn(1000)
    torch.save({'state_dict': single}, path)
    return single


def test_imagenet_weights_load_into_both_branches(tmp_path):
    path = tmp_path / 'mscan_t.pth'
    single = imagenet_mscan_file(path, 'mscan_t')
    cfg = cfg_for('mscan_t', pretrained=str(path))
    model = build_segmentor(cfg)
    report = load_backbone_pretrained(model, cfg)
    backbone_keys = [k for k in model.backbone.state_dict()
                     if re.match(r'(patch_embed|block|norm)(_other)?\d', k)]
    assert report.loaded == len(backbone_keys) == 2 * (len(single) - 2)
    assert sorted(report.unused) == ['head.bias', 'head.weight']
    assert not any(re.match(r'(patch_embed|block|norm)', k) for k in report.uninitialised)
    assert all(re.match(r'(module|fconv|projector)', k) for k in report.uninitialised)
    state = model.backbone.state_dict()
    for key, value in single.items():
        if key.startswith('head'):
            continue
        other = re.sub(r'^(patch_embed|block|norm)(\d)', r'\1_other\2', key)
        assert torch.equal(state[key], value) and torch.equal(state[other], value)
    assert report.summary().startswith(f'loaded {report.loaded} tensors from {path}')


def test_unrelated_file_is_refused(tmp_path):
    path = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(64, 3, 7, 7)}}, path)
    with pytest.raises(ValueError, match='matches none'):
        cfg = cfg_for('mscan_t', pretrained=str(path))
        load_backbone_pretrained(build_segmentor(cfg), cfg)


@pytest.mark.parametrize('backbone', ['mscan_s', 'mscan_b'])
def test_pretrained_weights_of_another_variant_stop_training(tmp_path, backbone):
    path = tmp_path / 'weights.pth'
    imagenet_mscan_file(path, 'mscan_t')
    cfg = cfg_for(backbone, pretrained=str(path))
    model = build_segmentor(cfg)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_backbone_pretrained(model, cfg)
    message = str(err.value)
    assert str(path) in message and f'ImageNet weights of mscan_t, not of the {backbone} backbone' in message
    assert '--set backbone=mscan_t' in message and 'pretrained_model=None' in message
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())  # nothing loaded


def test_missing_pretrained_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        cfg = cfg_for('mscan_t', pretrained=str(tmp_path / 'mscan_t.pth'))
        load_backbone_pretrained(build_segmentor(cfg), cfg)
    assert 'pretrained_model=None' in str(err.value) and 'SegNeXt' in str(err.value)
    assert f"{tmp_path / 'mscan_t.pth'} should hold" in str(err.value) and 'mscan_t backbone' in str(err.value)


def test_checkpoint_for_another_config_is_refused():
    state = build_segmentor(cfg_for('mscan_t', 9)).state_dict()
    assert describe_state_dict(state) == ('mscan_t', 9)
    with pytest.raises(ValueError) as err:
        check_compatible(state, 'mscan_b', 14, 'epoch-1.pth')
    message = str(err.value)
    assert 'epoch-1.pth' in message and 'mscan_t' in message and 'mscan_b' in message
    assert '9 classes' in message and 'config: 14' in message
