"""The model and loss against golden outputs of the authors' model (../shared/reference)."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from smmcl.config import base_config
from smmcl.models import build_contrastive_loss, build_segmentor

REFERENCE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'reference')
pytestmark = pytest.mark.skipif(not os.path.isdir(REFERENCE), reason='../shared/reference not present')


def _reference_state_dict(layout, seed):
    # The reference folder is not a package: load its weights.py by path.
    spec = importlib.util.spec_from_file_location('smmcl_reference_weights', os.path.join(REFERENCE, 'weights.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_state_dict(layout, seed)


def _rel(actual, expected):
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    actual = torch.as_tensor(actual, dtype=torch.float64)
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


@pytest.fixture(scope='module')
def golden():
    return np.load(os.path.join(REFERENCE, 'golden_seed0_14cls_64x96.npz'))


@pytest.fixture(scope='module')
def layout():
    with open(os.path.join(REFERENCE, 'state_dict_layout_mscan_b_14cls.json')) as f:
        return json.load(f)


def _cfg(**changes):
    cfg = base_config()
    cfg.update(num_classes=14, backbone='mscan_b', pretrained_model=None, **changes)
    return cfg


def test_state_dict_layout_matches_authors(layout):
    model = build_segmentor(_cfg())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == layout


def test_model_and_loss_match_golden(golden, layout):
    cfg = _cfg(anchor_sampler='loop')  # the authors' sampler reproduces their random stream
    model = build_segmentor(cfg, with_loss=True)
    model.load_state_dict(_reference_state_dict(layout, int(golden['seed'])), strict=True)
    model.eval()
    torch.manual_seed(int(golden['nmf_seed']))
    with torch.no_grad():
        logits, color, other = model.encode_decode(torch.from_numpy(golden['rgb']),
                                                   torch.from_numpy(golden['modal_x']))
        # The reference ran its loss right after this forward, on the random stream the NMF left.
        loss_cm, loss_vis, loss_aux = model.contrastive(
            torch.from_numpy(golden['loss_label']), torch.from_numpy(golden['loss_color_fea']),
            torch.from_numpy(golden['loss_other_fea']))
    assert _rel(logits, golden['logits']) < 1e-4
    assert _rel(color, golden['color_fea']) < 1e-4
    assert _rel(other, golden['other_fea']) < 1e-4
    assert _rel(loss_cm, golden['loss_cm']) < 1e-4
    assert _rel(loss_vis, golden['loss_vis']) < 1e-4
    assert _rel(loss_aux, golden['loss_aux']) < 1e-4


def test_infonce_matches_golden(golden):
    loss = build_contrastive_loss(_cfg())
    feats_c, feats_o = torch.from_numpy(golden['feats_c']), torch.from_numpy(golden['feats_o'])
    labels = torch.from_numpy(golden['anchor_labels']).long()
    assert _rel(loss.intra_modal_loss(feats_c, labels), golden['infonce_intra_c']) < 1e-4
    assert _rel(loss.intra_modal_loss(feats_o, labels), golden['infonce_intra_o']) < 1e-4
    assert _rel(loss.cross_modal_loss(feats_c, feats_o, labels), golden['infonce_cross']) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_model_matches_golden_on_gpu(golden, layout):
    model = build_segmentor(_cfg())
    model.load_state_dict(_reference_state_dict(layout, int(golden['seed'])), strict=True)
    model.eval().cuda()
    torch.manual_seed(int(golden['nmf_seed']))
    # The bases come from the GPU generator there, so only the backbone outputs are compared exactly.
    with torch.no_grad():
        _, color, other = model.encode_decode(torch.from_numpy(golden['rgb']).cuda(),
                                              torch.from_numpy(golden['modal_x']).cuda())
    assert _rel(color.cpu(), golden['color_fea']) < 1e-3
    assert _rel(other.cpu(), golden['other_fea']) < 1e-3
