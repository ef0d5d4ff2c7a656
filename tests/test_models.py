"""Model pieces on the CPU: shapes, gradients, variants, NMF behaviour."""
import pytest
import torch

from smmcl.config import base_config
from smmcl.models import build_segmentor
from smmcl.models.ham_head import NMF2D
from smmcl.models.mscan import MSCAN_VARIANTS, mscan_spec


def tiny_cfg(**changes):
    cfg = base_config()
    cfg.update(backbone='mscan_t', num_classes=5, pretrained_model=None, decoder_embed_dim=64)
    cfg.update(changes)
    return cfg


def test_variants_have_the_papers_sizes():
    assert mscan_spec('mscan_b').embed_dims == (64, 128, 320, 512)
    assert mscan_spec('mscan_b').depths == (3, 3, 12, 3)
    assert mscan_spec('mscan_b').drop_path_rate == 0.2
    assert mscan_spec('mscan_t').depths == (3, 3, 5, 2)
    assert mscan_spec('mscan_l').depths == (3, 5, 27, 3)
    assert set(MSCAN_VARIANTS) == {'mscan_t', 'mscan_s', 'mscan_b', 'mscan_l'}
    with pytest.raises(ValueError, match='mscan_x'):
        mscan_spec('mscan_x')


@pytest.mark.parametrize('size', [(64, 96), (50, 70)])  # an odd size too
def test_forward_shapes_and_finite(size):
    torch.manual_seed(0)
    model = build_segmentor(tiny_cfg()).eval()
    rgb, x = torch.randn(2, 3, *size), torch.randn(2, 3, *size)
    with torch.no_grad():
        logits, color, other = model.encode_decode(rgb, x)
        plain = model(rgb, x)
    assert logits.shape == (2, 5, *size)
    h4, w4 = [-(-s // 32) for s in size]
    assert color.shape == other.shape == (2, 256, h4, w4)
    assert torch.isfinite(logits).all() and torch.isfinite(color).all()
    # forward() without a label skips the projectors but gives the same logits (same NMF draw).
    torch.manual_seed(1)
    with torch.no_grad():
        a = model(rgb, x)
    torch.manual_seed(1)
    with torch.no_grad():
        b = model.encode_decode(rgb, x)[0]
    assert torch.equal(a, b)
    assert plain.shape == logits.shape


def test_training_loss_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    model = build_segmentor(tiny_cfg(), with_loss=True).train()
    rgb, x = torch.randn(2, 3, 128, 192), torch.randn(2, 3, 128, 192)
    label = torch.zeros(2, 128, 192, dtype=torch.long)  # stage 4: 4x6 cells, 3 classes of >= 6 cells
    label[:, :, 96:] = 1
    label[:, 64:, :] = 2
    label[1, :8, :8] = 255
    terms = model(rgb, x, label, return_terms=True)
    assert set(terms) == {'loss', 'ce', 'cm', 'vis', 'aux'}
    expected = terms['ce'] + 0.2 * (terms['cm'] + terms['vis'] + terms['aux'])
    assert torch.allclose(terms['loss'], expected)
    assert all(terms[k] > 0 for k in ('cm', 'vis', 'aux'))
    terms['loss'].backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert missing == []
    # Only the stage-1 fusion conv is frozen: the decoder reads fused stages 2-4 (as the authors').
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ['backbone.fconv1.fusion_conv.0.weight', 'backbone.fconv1.fusion_conv.0.bias']


def test_stem_honours_input_channels():
    from smmcl.models.encoder import DualMSCAN
    enc = DualMSCAN('mscan_t', in_channels=1).eval()
    assert enc.patch_embed_other1.proj[0].weight.shape[1] == 1
    fused, _, _ = enc(torch.randn(1, 1, 32, 32), torch.randn(1, 1, 32, 32))
    assert [f.shape[1] for f in fused] == [64, 160, 256]


def test_nmf_steps_and_fresh_bases():
    nmf = NMF2D(rank=4)
    x = torch.rand(2, 8, 5, 6)
    nmf.train()
    torch.manual_seed(0)
    a = nmf(x)
    torch.manual_seed(0)
    b = nmf(x)
    assert torch.equal(a, b)  # bases come from the global generator
    c = nmf(x)
    assert not torch.equal(a, c)  # drawn fresh every forward
    nmf.eval()
    torch.manual_seed(0)
    d = nmf(x)
    assert not torch.equal(a, d)  # 7 steps in eval, 6 in training
    # gradients flow through the multiplicative updates
    x.requires_grad_(True)
    nmf(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_nmf_reconstructs_a_low_rank_nonnegative_map():
    torch.manual_seed(0)
    bases, coef = torch.rand(1, 16, 3), torch.rand(1, 3, 40)
    x = (bases @ coef).reshape(1, 16, 5, 8)
    out = NMF2D(rank=3, eval_steps=200).eval()(x)
    assert (out - x).abs().max() / x.abs().max() < 0.05


def test_other_class_counts_change_only_the_classifier():
    a = build_segmentor(tiny_cfg(num_classes=5)).state_dict()
    b = build_segmentor(tiny_cfg(num_classes=9)).state_dict()
    diff = [k for k in a if a[k].shape != b[k].shape]
    assert sorted(diff) == ['decode_head.conv_seg.bias', 'decode_head.conv_seg.weight']
