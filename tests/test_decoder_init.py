"""The decode head starts where the authors' does: mmcv ConvModule init, then CMX's ``init_weight``.

Authors: ``models/decoders/LightHamHead.py`` (ConvModule for squeeze, ham_in, ham_out, align; plain
conv_seg from ``models/ham_utils.py`` BaseDecodeHead), ``models/builder.py`` ``init_weights`` ->
``utils/init_func.py`` ``init_weight`` (kaiming_normal_, fan_in, relu). mmcv 1.7.2
``cnn/bricks/conv_module.py`` ``ConvModule.init_weights`` / ``cnn/utils/weight_init.py`` ``kaiming_init``.
"""
import math

import pytest
import torch
from torch import nn

from smmcl.config import base_config
from smmcl.models import build_segmentor
from smmcl.models.ham_head import LightHamHead


def assert_normal(weight: torch.Tensor, std: float, name: str) -> None:
    """Zero mean, the given std and a normal's kurtosis (3; a uniform's is 1.8), each within about five
    standard errors of its estimate for this many samples."""
    w = weight.detach().double().flatten()
    n = w.numel()
    assert abs(w.mean().item()) < 5 * std / math.sqrt(n), name
    assert w.std().item() == pytest.approx(std, rel=5 / math.sqrt(2 * n)), name
    kurtosis = (((w - w.mean()) / w.std()) ** 4).mean().item()
    assert kurtosis == pytest.approx(3.0, abs=5 * math.sqrt(24 / n)), name


@pytest.fixture(scope='module')
def head():
    torch.manual_seed(0)
    cfg = base_config()
    cfg.update(backbone='mscan_t', num_classes=14, pretrained_model=None, decoder_embed_dim=256)
    return build_segmentor(cfg, with_loss=True).decode_head


def test_conv_weights_are_kaiming_normal_fan_in(head):
    convs = {'squeeze.conv': head.squeeze.conv, 'hamburger.ham_in.conv': head.hamburger.ham_in.conv,
             'hamburger.ham_out.conv': head.hamburger.ham_out.conv, 'align.conv': head.align.conv,
             'conv_seg': head.conv_seg}
    assert {n for n, m in head.named_modules() if isinstance(m, nn.Conv2d)} == set(convs)
    for name, conv in convs.items():
        assert_normal(conv.weight, math.sqrt(2.0 / conv.in_channels), name)  # 1x1: fan_in = C_in


def test_biases_and_group_norms(head):
    assert head.squeeze.conv.bias is None and head.align.conv.bias is None
    assert torch.equal(head.hamburger.ham_in.conv.bias, torch.zeros(256))
    assert torch.equal(head.hamburger.ham_out.conv.bias, torch.zeros(256))
    for gn in (head.squeeze.gn, head.align.gn):
        assert gn.num_groups == 32 and gn.eps == 1e-5
        assert torch.equal(gn.weight, torch.ones(256)) and torch.equal(gn.bias, torch.zeros(256))
    # conv_seg keeps PyTorch's default bias, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the authors never
    # apply BaseDecodeHead's init_cfg (normal, std 0.01).
    bound = 1 / math.sqrt(256)
    bias = head.conv_seg.bias
    assert bias.abs().max() <= bound and bias.abs().max() > 0.2 * bound and bias.unique().numel() == 14


def test_construction_alone_leaves_mmcv_conv_module_state():
    """Before CMX's re-draw: ConvModule convs Kaiming-normal with fan_out, zero bias."""
    torch.manual_seed(0)
    head = LightHamHead((64, 160, 256), num_classes=14, channels=256, ham_channels=256)
    for name in ('squeeze.conv', 'hamburger.ham_in.conv', 'hamburger.ham_out.conv', 'align.conv'):
        conv = head.get_submodule(name)
        assert_normal(conv.weight, math.sqrt(2.0 / conv.out_channels), name)
        assert conv.bias is None or torch.equal(conv.bias, torch.zeros_like(conv.bias))
