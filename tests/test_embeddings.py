"""The feature-space tool (smmcl.tools.embeddings): the cross-modal numbers on planted embeddings, the
sampling, the map, the embeddings being the ones the contrastive loss sees, and the command line."""
import math
import os.path as osp

import cv2
import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip('sklearn')

from smmcl.config import REPO_ROOT, load_config  # noqa: E402
from smmcl.data.dataset import RGBXDataset  # noqa: E402
from smmcl.engine.evaluate import to_input  # noqa: E402
from smmcl.losses.contrastive import downsample_labels  # noqa: E402
from smmcl.models import build_segmentor  # noqa: E402
from smmcl.tools import embeddings  # noqa: E402
from smmcl.visual import palette_rgb  # noqa: E402

CONFIG = osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'config.py')


def test_orthogonal_class_directions_give_same_one_and_different_zero():
    # Class c lives on axis c in both modalities, at random positive lengths: cosine 1 within a class,
    # 0 across classes, exactly.
    rng = np.random.default_rng(0)
    k, dim = 4, 8
    rgb_labels = np.repeat(np.arange(k), 5)
    x_labels = np.repeat(np.arange(k), 3)
    rgb = np.eye(dim)[rgb_labels] * rng.uniform(0.5, 3.0, (len(rgb_labels), 1))
    x = np.eye(dim)[x_labels] * rng.uniform(0.5, 3.0, (len(x_labels), 1))
    result = embeddings.cross_modal_similarity(rgb, rgb_labels, x, x_labels, num_classes=6)
    assert sorted(result['per_class']) == [0, 1, 2, 3]  # classes 4, 5 absent: not reported
    for same, different in result['per_class'].values():
        assert same == pytest.approx(1.0, abs=1e-12) and different == pytest.approx(0.0, abs=1e-12)
    assert result['same'] == pytest.approx(1.0, abs=1e-12)
    assert result['different'] == pytest.approx(0.0, abs=1e-12)


def test_planted_angles_are_measured_per_class():
    # X of class c is turned by theta_c out of the class axis into an axis of its own: same = cos(theta_c).
    k = 3
    thetas = np.array([0.0, math.pi / 3, math.pi / 2])
    rgb_labels = np.array([0, 0, 1, 1, 2, 2])
    x_labels = np.array([0, 1, 2, 2])
    rgb = np.eye(2 * k)[rgb_labels]
    x = np.cos(thetas[x_labels])[:, None] * np.eye(2 * k)[x_labels] \
        + np.sin(thetas[x_labels])[:, None] * np.eye(2 * k)[x_labels + k]
    result = embeddings.cross_modal_similarity(rgb, rgb_labels, x, x_labels, k)
    same = [result['per_class'][c][0] for c in range(k)]
    np.testing.assert_allclose(same, [1.0, 0.5, 0.0], atol=1e-12)
    assert all(abs(result['per_class'][c][1]) < 1e-12 for c in range(k))
    assert result['same'] == pytest.approx(0.5)
    # Only one class in X: 'different' has no pairs for it (NaN), and the mean skips it.
    one = embeddings.cross_modal_similarity(rgb, rgb_labels, x[:1], x_labels[:1], k)
    assert list(one['per_class']) == [0] and math.isnan(one['per_class'][0][1])
    assert one['same'] == pytest.approx(1.0) and math.isnan(one['different'])


def test_sample_per_class_caps_each_class_and_skips_ignored_cells():
    labels = np.array([0] * 10 + [1] * 3 + [255] * 7 + [9] * 4)
    picked = embeddings.sample_per_class(labels, 4, num_classes=5, rng=np.random.default_rng(1))
    assert np.bincount(labels[picked], minlength=256)[[0, 1, 9, 255]].tolist() == [4, 3, 0, 0]
    assert len(set(picked.tolist())) == len(picked)  # without replacement
    again = embeddings.sample_per_class(labels, 4, num_classes=5, rng=np.random.default_rng(1))
    assert picked.tolist() == again.tolist()  # seeded


def test_map_size_marker_and_legend_colours():
    palette = palette_rgb([[0, 0, 0], [0, 0, 1], [0.9137, 0.3490, 0.1882]])
    coords = np.array([[0.0, 0.0], [10.0, 10.0], [10.0, 0.0]])
    img = embeddings.draw_map(coords, np.array([1, 2, 2]), np.array([0, 1, 0]), palette,
                              ['void', 'bed', 'books'], ['a title'])
    assert img.shape == embeddings.FIGURE_SIZE + (3,) and img.dtype == np.uint8
    # Both axes span 10, so (0, 0) lands at the map's margin corner (image y grows downwards); the
    # disc there has class 1's colour: bed = (0, 0, 255) RGB, BGR (255, 0, 0).
    margin = 3 * embeddings.MARKER
    assert img[embeddings.TITLE_HEIGHT + margin, margin].tolist() == [255, 0, 0]
    # Legend swatches: the classes present (bed, books in BGR).
    legend = {tuple(c) for c in img[:, embeddings.MAP_SIZE:].reshape(-1, 3).tolist()}
    assert {(255, 0, 0), (47, 88, 232)} <= legend


class _Recorder(nn.Module):
    """Stands in for the contrastive loss and keeps what the training forward hands it."""

    def forward(self, label, color, other):
        self.seen = (label, color, other)
        zero = color.sum() * 0
        return zero, zero, zero


def test_embeddings_are_the_ones_the_contrastive_loss_gets(tiny_mscan, tiny_llrgbd, tmp_path):
    cfg = load_config(CONFIG, [f'backbone={tiny_mscan}', 'decoder_embed_dim=32',
                               f'dataset_path={tiny_llrgbd}', f'log_dir={tmp_path}'])
    torch.manual_seed(0)
    model = build_segmentor(cfg, with_loss=True).eval()
    model.contrastive = _Recorder()
    item = RGBXDataset(cfg, 'val')[0]
    color, other, labels = embeddings.image_embeddings(model, item['data'], item['modal_x'], item['label'],
                                                       cfg)
    rgb_t = to_input(item['data'], cfg.norm_mean, cfg.norm_std, 'cpu')[None]
    x_t = to_input(item['modal_x'], cfg.norm_mean, cfg.norm_std, 'cpu')[None]
    label_t = torch.as_tensor(item['label']).long()[None]
    with torch.no_grad():
        model(rgb_t, x_t, label_t)
    _, seen_color, seen_other = model.contrastive.seen
    h, w = seen_color.shape[2:]
    assert (h, w) == (2, 2) and color.shape == (h * w, 256)  # 48x64 input, stride 32
    torch.testing.assert_close(color, seen_color[0].flatten(1).T)
    torch.testing.assert_close(other, seen_other[0].flatten(1).T)
    assert labels.tolist() == downsample_labels(label_t, (h, w)).flatten().tolist()


def test_command_line_on_a_tiny_checkpoint(tiny_mscan, tiny_llrgbd, tmp_path, capsys):
    overrides = [f'backbone={tiny_mscan}', 'decoder_embed_dim=32', f'dataset_path={tiny_llrgbd}',
                 f'log_dir={tmp_path / "log"}']
    cfg = load_config(CONFIG, overrides)
    torch.manual_seed(0)
    ckpt = str(tmp_path / 'tiny.pth')
    torch.save({'model': build_segmentor(cfg).state_dict(), 'epoch': 1}, ckpt)
    out = tmp_path / 'figs' / 'emb.png'
    result = embeddings.main(['--config', CONFIG, '-e', ckpt, '--images', '2', '--per-class', '3',
                              '--out', str(out), '--set'] + overrides)
    img = cv2.imread(str(out))
    assert img.shape == embeddings.FIGURE_SIZE + (3,)
    assert np.array_equal(img, result['image'])
    # 2 test images of 2x2 stage-4 cells: 8 cells per modality, at most 3 per class drawn.
    counts = result['counts']
    assert sum(r for r, _ in counts.values()) <= 8 and all(r <= 3 and x <= 3 for r, x in counts.values())
    assert all(-1 <= s <= 1 for s, _ in result['per_class'].values())
    printed = capsys.readouterr().out
    assert f"mean        {result['same']:10.3f}" in printed and str(out) in printed
