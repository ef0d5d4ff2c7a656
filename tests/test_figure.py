"""The qualitative figure (smmcl.tools.figure): panel geometry, palette colours, the lift, and predictions
equal to what eval.py writes."""
import os.path as osp

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from smmcl.config import REPO_ROOT, load_config
from smmcl.data.dataset import DatasetError, RGBXDataset
from smmcl.engine.evaluate import evaluate_per_image
from smmcl.models import build_segmentor
from smmcl.tools import figure
from smmcl.visual import gamma_lift

CONFIG = osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'config.py')


def test_lift_brightens_dark_values_and_keeps_the_ends():
    ramp = np.arange(256, dtype=np.uint8)[None, :, None].repeat(3, 2)
    lifted = gamma_lift(ramp, 2.2)[0, :, 0].astype(int)
    assert lifted[0] == 0 and lifted[255] == 255 and (np.diff(lifted) >= 0).all()
    assert lifted[32] == round(255 * (32 / 255) ** (1 / 2.2))  # 99: a dark value lifted threefold
    assert np.array_equal(gamma_lift(ramp, 1.0), ramp)


def test_grid_places_panels_in_rows_and_columns():
    h, w = 5, 7
    rows = [[np.full((h, w, 3), 10 * (3 * r + c), np.uint8) for c in range(3)] for r in range(2)]
    img = figure.grid(rows, ['a', 'b', 'c'])
    assert img.shape == (figure.HEADER + 2 * (h + 2 * figure.PAD), 3 * (w + 2 * figure.PAD), 3)
    for r in range(2):
        for c in range(3):
            top, left = figure.panel_origin(r, c, (h, w))
            assert (img[top:top + h, left:left + w] == 10 * (3 * r + c)).all()
            assert (img[top - 1, left:left + w] == 255).all()  # the white border above


def _setup(tiny_mscan, tiny_llrgbd, tmp_path, seeds=(0, 1)):
    overrides = [f'backbone={tiny_mscan}', 'decoder_embed_dim=32', f'dataset_path={tiny_llrgbd}',
                 f'log_dir={tmp_path / "log"}', 'eval_crop_size=[48,64]', 'num_workers=0']
    cfg = load_config(CONFIG, overrides)
    paths = []
    for seed in seeds:  # two differently initialised models: two prediction columns
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f'model{seed}.pth'))
        torch.save({'model': build_segmentor(cfg).state_dict(), 'epoch': 1}, paths[-1])
    return cfg, overrides, paths


def test_figure_rows_columns_palette_and_eval_predictions(tiny_mscan, tiny_llrgbd, tmp_path, capsys):
    cfg, overrides, ckpts = _setup(tiny_mscan, tiny_llrgbd, tmp_path)
    dataset = RGBXDataset(cfg, 'val')
    names = dataset.names[::-1]  # both test images, second first: rows follow --images
    out = tmp_path / 'figs' / 'fig.png'
    img = figure.main(['--config', CONFIG, '-e', ckpts[0], '-e', ckpts[1], '--images', *names,
                       '--titles', 'A', 'B', '--out', str(out), '--set'] + overrides)
    assert np.array_equal(cv2.imread(str(out)), img)
    h, w = 48, 64
    # rows = images, columns = RGB, X, ground truth + one per checkpoint
    assert img.shape == (figure.HEADER + 2 * (h + 2 * figure.PAD), 5 * (w + 2 * figure.PAD), 3)
    palette = figure.palette_rgb(cfg.class_colors)
    for row, name in enumerate(names):
        index = dataset.names.index(name)
        item = dataset[index]
        top, left = figure.panel_origin(row, 2, (h, w))
        gt_panel = img[top:top + h, left:left + w]
        assert np.array_equal(gt_panel[..., ::-1], palette[item['label']])  # BGR on disk, palette is RGB
        assert len(np.unique(item['label'])) > 2  # a real test: several classes in the panel
        top, left = figure.panel_origin(row, 0, (h, w))
        assert np.array_equal(img[top:top + h, left:left + w], gamma_lift(item['data'], 2.2))
    # The prediction columns are eval.py's predictions (same protocol, same per-image NMF seeds), one
    # per checkpoint in -e order (the two models predict differently).
    top, left = figure.panel_origin(0, 3, (h, w))
    assert not np.array_equal(img[top:top + h, left:left + w], img[top:top + h, left + w + 2 * figure.PAD:
                                                                  left + 2 * w + 2 * figure.PAD])
    for col, ckpt in enumerate(ckpts):
        model = build_segmentor(cfg)
        model.load_state_dict(torch.load(ckpt)['model'])
        evaluate_per_image(model, dataset, cfg, 'cpu', save_dir=str(tmp_path / f'eval{col}'))
        for row, name in enumerate(names):
            pred = np.asarray(Image.open(tmp_path / f'eval{col}' / f'{name}.png'))
            top, left = figure.panel_origin(row, 3 + col, (h, w))
            assert np.array_equal(img[top:top + h, left:left + w][..., ::-1], palette[pred])
    assert str(out) in capsys.readouterr().out


def test_figure_refuses_unknown_image_names(tiny_mscan, tiny_llrgbd, tmp_path):
    cfg, _, ckpts = _setup(tiny_mscan, tiny_llrgbd, tmp_path, seeds=(0,))
    with pytest.raises(DatasetError, match=r"\['nope'\] are not in the test split"):
        figure.draw_figure(cfg, ckpts, ['nope'])


def test_panel_width_scales_every_panel(tiny_mscan, tiny_llrgbd, tmp_path):
    cfg, _, ckpts = _setup(tiny_mscan, tiny_llrgbd, tmp_path, seeds=(0,))
    img = figure.draw_figure(cfg, ckpts, panel_width=32)
    # the first four test images (here both), panels 24x32, label maps still in palette colours
    assert img.shape == (figure.HEADER + 2 * (24 + 2 * figure.PAD), 4 * (32 + 2 * figure.PAD), 3)
    top, left = figure.panel_origin(0, 2, (24, 32))
    colours = {tuple(c) for c in img[top:top + 24, left:left + 32][..., ::-1].reshape(-1, 3).tolist()}
    assert colours <= {tuple(c) for c in figure.palette_rgb(cfg.class_colors).tolist()}
