"""The cost report (smmcl.tools.complexity): parameters per part, FLOPs as counted, the CLI."""
import os.path as osp
import re

import pytest
import torch
from torch import nn

from smmcl.config import REPO_ROOT, load_config
from smmcl.models import build_segmentor
from smmcl.models.ham_head import NMF2D
from smmcl.tools.complexity import PARTS, count_flops, main, parameter_counts, segmentor_flops

from conftest import tiny_config

NYU = osp.join(REPO_ROOT, 'SMMCL_NYU', 'config.py')


def test_parameter_parts_sum_to_the_total(tiny_mscan):
    model = build_segmentor(tiny_config(backbone=tiny_mscan, decoder_embed_dim=32))
    counts = parameter_counts(model)
    parts = [part for part, _ in PARTS]
    assert list(counts) == parts + ['total']
    assert all(counts[part] > 0 for part in parts)
    total = sum(p.numel() for p in model.parameters())
    assert sum(counts[part] for part in parts) == counts['total'] == total
    assert counts['RGB branch (MSCAN)'] == counts['X branch (MSCAN)']  # two 3-channel branches
    assert counts['decoder head (LightHamHead)'] == sum(p.numel() for p in model.decode_head.parameters())
    # The forward runs neither the projectors nor fconv1 (built by the authors, never used).
    unused = counts['projectors (training only)'] + sum(p.numel() for p in model.backbone.fconv1.parameters())
    assert segmentor_flops(model, 64, 96)['used_parameters'] == counts['total'] - unused


def test_flops_of_convolutions_by_hand():
    """2 per multiply-add; a depthwise conv counts C_in / groups = 1 input channel per output; no bias."""
    layers = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, (1, 7), padding=(0, 3), groups=8))
    flops = count_flops(layers, torch.empty(2, 4, 10, 12))
    pixels = 2 * 10 * 12
    assert flops['by_op'] == {'convolution': 2 * pixels * 8 * 4 * 9 + 2 * pixels * 8 * 1 * 7}
    assert flops['total'] == sum(flops['by_op'].values())


def test_flops_of_the_nmf_bmm_by_hand():
    """The NMF's bmm are counted: init, 7 eval steps of two updates, a last coefficient update, the
    reconstruction; per image 2 x (17 NDR + 15 DR^2 + 15 NR^2)."""
    B, D, R, H, W = 2, 8, 4, 5, 6
    N = H * W
    flops = count_flops(NMF2D(rank=R).eval(), torch.empty(B, D, H, W))
    assert flops['by_op'] == {'bmm': B * 2 * (17 * N * D * R + 15 * D * R * R + 15 * N * R * R)}


def test_flops_grow_with_the_image_area(tiny_mscan):
    model = build_segmentor(tiny_config(backbone=tiny_mscan, decoder_embed_dim=32))
    small, large = segmentor_flops(model, 64, 96), segmentor_flops(model, 128, 192)
    conv = large['by_op']['convolution'] / small['by_op']['convolution']
    assert 3.9 < conv <= 4.0  # all but the channel gates' convs on pooled 1x1 maps
    assert 3.0 < large['total'] / small['total'] <= 4.0  # the NMF's R x R products do not grow
    assert set(small['by_op']) == {'convolution', 'bmm'}
    # every counted operation belongs to a part; the projectors do not run
    assert sum(small['by_part'].values()) == small['total']
    assert 'projectors (training only)' not in small['by_part']


def test_mscan_b_at_480x640_is_151_gflops():
    """The paper's 151 GFLOPs for SMMCL (MSCAN-B dual) at 480x640, within 5 %; counted without computing."""
    config = load_config(NYU)
    assert (config.backbone, config.num_classes) == ('mscan_b', 40)
    flops = segmentor_flops(build_segmentor(config), 480, 640)
    assert abs(flops['total'] / 1e9 - 151) <= 0.05 * 151
    assert flops['by_op']['bmm'] / 1e9 == pytest.approx(6.0, abs=0.01)  # the NMF at 60x80, D=512, R=64


def test_cli_reports_parameters_flops_and_timing(tiny_mscan, capsys):
    overrides = [f'backbone={tiny_mscan}', 'decoder_embed_dim=32']
    main(['--config', NYU, '--height', '64', '--width', '96', '--set'] + overrides
         + ['--batches', '1', '2', '--iters', '1', '--warmup', '0', '--device', 'cpu'])
    out = capsys.readouterr().out
    model = build_segmentor(load_config(NYU, overrides))
    total = re.search(r'^total\s+([\d.]+)\s+([\d.]+)$', out, re.M)
    assert float(total.group(1)) == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6, abs=1e-3)
    assert float(total.group(2)) == pytest.approx(segmentor_flops(model, 64, 96)['total'] / 1e9, abs=0.01)
    rows = re.findall(r'^(plain|fast)\s+(fp32|bf16|fp16)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$', out, re.M)
    assert [(r[0], int(r[2])) for r in rows] == [('plain', 1), ('plain', 2), ('fast', 1), ('fast', 2)]
    for _, _, batch, ms, ips in rows:
        assert float(ips) == pytest.approx(int(batch) * 1000 / float(ms), rel=0.05)  # printed rounded


def test_cli_errors(capsys, tmp_path):
    missing = str(tmp_path / 'nope.py')
    with pytest.raises(SystemExit) as exit_info:
        main(['--config', missing, '--no-timing'])
    assert exit_info.value.code == 1
    assert missing in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(['--config', NYU, '--height', '0', '--no-timing'])
    assert exit_info.value.code == 1
    assert '--height 0' in capsys.readouterr().err
