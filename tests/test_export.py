"""ONNX export (smmcl.tools.export, SMMCL_*/export.py): fixed NMF bases, onnxruntime vs PyTorch, the CLI."""
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch

from smmcl.config import REPO_ROOT, load_config
from smmcl.inference import load_model
from smmcl.models import build_segmentor
from smmcl.models.ham_head import NMF2D
from smmcl.tools.export import (example_inputs, export_onnx, fixed_nmf_bases, main, onnx_logits,
                                seeded_nmf_bases)

from conftest import tiny_config

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

LLRGBD = osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'config.py')
SEED = 12345


def _relative(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _tiny_model(backbone, num_classes=5):
    torch.manual_seed(0)
    config = tiny_config(backbone=backbone, decoder_embed_dim=32, num_classes=num_classes)
    return build_segmentor(config).eval()


def test_fixed_bases_are_the_first_images_draw(tiny_mscan):
    """On the CPU the seeded bases are those eval.py draws for its first image (it seeds config.seed);
    they fit one batch size, leave the state dict alone, and are removed on exit."""
    model = _tiny_model(tiny_mscan)
    rgb, x = example_inputs(1, 64, 96)
    with torch.no_grad():
        torch.manual_seed(SEED)
        drawn = model(rgb, x)
        with fixed_nmf_bases(model, 1, SEED) as bases:
            assert list(bases) == ['decode_head.hamburger']
            assert bases['decode_head.hamburger'].shape == (1, 32, 64)
            assert torch.equal(model(rgb, x), drawn)
            assert torch.equal(model(rgb, x), drawn)  # no longer random
            assert 'decode_head.hamburger.ham.fixed_bases' not in model.state_dict()
            with pytest.raises(ValueError, match='do not fit a batch of 2'):
                model(*example_inputs(2, 64, 96))
        assert model.decode_head.hamburger.ham.fixed_bases is None
        assert not torch.equal(model(rgb, x), drawn)  # drawing again
    # a batch gets one set per image, drawn in one go
    two = seeded_nmf_bases(model, 2, SEED)['decode_head.hamburger']
    assert torch.equal(two[:1], seeded_nmf_bases(model, 1, SEED)['decode_head.hamburger'])
    assert not torch.equal(two[0], two[1])


def test_nmf_fixed_bases_are_used_as_given():
    nmf = NMF2D(rank=3).eval()
    x = torch.rand(2, 6, 4, 5)
    bases = nmf.draw_bases(2, 6, generator=torch.Generator().manual_seed(3))
    assert bases.shape == (2, 6, 3) and torch.allclose(bases.norm(dim=1), torch.ones(2, 3))
    nmf.fixed_bases = bases
    torch.manual_seed(0)
    a = nmf(x)
    torch.manual_seed(1)
    assert torch.equal(nmf(x), a)  # the global generator no longer matters


def _export_and_compare(model, tmp_path, batch, height, width):
    path = export_onnx(model, str(tmp_path / 'model.onnx'), batch, height, width, SEED,
                       metadata={'num_classes': '5'})
    rgb, x = example_inputs(batch, height, width, seed=7)  # not the inputs the graph was traced with
    got = onnx_logits(path, rgb.numpy(), x.numpy())
    with fixed_nmf_bases(model, batch, SEED), torch.no_grad():
        ref = model(rgb, x).numpy()
    assert got.shape == ref.shape == (batch, 5, height, width)
    assert _relative(got, ref) <= 1e-4
    return path


@pytest.mark.slow  # the ONNX export itself takes ~7 s
def test_onnx_matches_pytorch_tiny_backbone(tiny_mscan, tmp_path):
    import onnx
    model = _tiny_model(tiny_mscan)
    path = _export_and_compare(model, tmp_path, batch=2, height=64, width=96)
    assert {p.key: p.value for p in onnx.load(path).metadata_props}['num_classes'] == '5'
    assert not model.training and model.decode_head.hamburger.ham.fixed_bases is None  # left as it was


@pytest.mark.slow
def test_onnx_matches_pytorch_mscan_t(tmp_path):
    """The issue's check: MSCAN-T at a small size (about 10 s of tracing on a shared 2-core CPU)."""
    _export_and_compare(_tiny_model('mscan_t'), tmp_path, batch=1, height=64, width=96)


# ---- the command line ----

def _write_checkpoint(path, overrides, **changes):
    """A checkpoint in the authors' format ({'model': ..., 'optimizer': ..., 'epoch': ...})."""
    config = load_config(LLRGBD, overrides)
    config.update(changes)
    torch.manual_seed(0)
    torch.save({'model': build_segmentor(config).state_dict(), 'optimizer': {}, 'epoch': 3}, path)


@pytest.mark.slow  # the ONNX export itself takes ~7 s
def test_export_cli_on_a_written_checkpoint(tiny_mscan, tmp_path, capsys):
    overrides = [f'backbone={tiny_mscan}', 'decoder_embed_dim=32', f'log_dir={tmp_path / "log"}']
    config = load_config(LLRGBD, overrides)
    checkpoint = osp.join(config.checkpoint_dir, 'epoch-3.pth')
    os.makedirs(config.checkpoint_dir)
    _write_checkpoint(checkpoint, overrides)
    out = str(tmp_path / 'onnx' / 'smmcl.onnx')
    main(LLRGBD, ['-e', '3', '-o', out, '--height', '48', '--width', '64', '--set'] + overrides)
    printed = capsys.readouterr().out
    assert f'wrote {out}: rgb, x 1x3x48x64 -> logits 1x14x48x64' in printed
    assert float(printed.split('relative error ')[1].split()[0]) <= 1e-4

    import onnx
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta['channel_order'] == 'bgr'  # the authors' reading quirk
    assert meta['x_replicated'] == 'True'  # LLRGBD's one-channel depth
    assert json.loads(meta['norm_mean']) == [0.485, 0.456, 0.406] and meta['num_classes'] == '14'
    assert meta['checkpoint'] == checkpoint and meta['nmf_bases_seed'] == str(config.seed)
    # the graph holds the checkpoint's weights: the same logits as the loaded checkpoint
    model = load_model(config, checkpoint, device='cpu')
    rgb, x = example_inputs(1, 48, 64, seed=3)
    with fixed_nmf_bases(model, 1, config.seed), torch.no_grad():
        ref = model(rgb, x).numpy()
    assert _relative(onnx_logits(out, rgb.numpy(), x.numpy()), ref) <= 1e-4


def test_export_cli_errors(tiny_mscan, tmp_path, capsys):
    overrides = [f'backbone={tiny_mscan}', 'decoder_embed_dim=32', f'log_dir={tmp_path / "log"}']
    out = str(tmp_path / 'm.onnx')

    def fails(argv):
        with pytest.raises(SystemExit) as exit_info:
            main(LLRGBD, argv + ['-o', out, '--set'] + overrides)
        assert exit_info.value.code == 1
        return capsys.readouterr().err

    missing = str(tmp_path / 'missing.pth')
    assert f'checkpoint {missing} does not exist' in fails(['-e', missing])
    assert 'epoch-9.pth does not exist' in fails(['-e', '9'])
    other = str(tmp_path / 'nine_classes.pth')
    _write_checkpoint(other, overrides, num_classes=9)
    err = fails(['-e', other])
    assert other in err and '9' in err and '14' in err  # another class count, named with the file
    assert '--batch 0' in fails(['-e', other, '--batch', '0'])
    assert not osp.exists(out)


@pytest.mark.integration
def test_export_script_missing_checkpoint(tmp_path):
    """The experiment folder's entry point: exit 1 with one line naming the file, no traceback."""
    missing = str(tmp_path / 'epoch-500.pth')
    result = subprocess.run([sys.executable, osp.join(REPO_ROOT, 'SMMCL_NYU', 'export.py'), '-e', missing,
                             '-o', str(tmp_path / 'm.onnx')], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f'error: checkpoint {missing} does not exist'
