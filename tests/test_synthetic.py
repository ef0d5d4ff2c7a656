"""The synthetic generator: layouts, determinism, and a task that needs both modalities."""
import filecmp
import os
import os.path as osp

import cv2
import numpy as np
import pytest

from smmcl.data.synthetic import SPECS, appearance_table, generate, main, render_scene


def listing(root):
    return sorted(osp.relpath(osp.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_llrgbd_layout(tmp_path):
    out = generate('LLRGBD', str(tmp_path / 'd'), 3, 2, 20, 28, seed=0)
    files = listing(out)
    assert files == sorted([f'{s}/{m}/{i:05d}.png' for s, r in (('train', range(3)), ('test', range(3, 5)))
                            for m in ('rgb', 'depth', 'label') for i in r] + ['train/train.txt', 'test/test.txt'])
    assert open(osp.join(out, 'test', 'test.txt')).read() == '00003\n00004\n'  # the authors' bare names
    depth = cv2.imread(osp.join(out, 'train', 'depth', '00000.png'), cv2.IMREAD_UNCHANGED)
    rgb = cv2.imread(osp.join(out, 'train', 'rgb', '00000.png'), cv2.IMREAD_UNCHANGED)
    assert depth.shape == (20, 28) and rgb.shape == (20, 28, 3)
    labels = np.stack([cv2.imread(osp.join(out, f), cv2.IMREAD_UNCHANGED) for f in files if '/label/' in f])
    assert labels.max() <= 13 and labels.dtype == np.uint8


def test_mfnet_layout(tmp_path):
    out = generate('MFNet', str(tmp_path / 'd'), 6, 8, 20, 28, seed=0)
    read = lambda name: open(osp.join(out, name)).read().split()  # noqa: E731
    lists = ('train.txt', 'test.txt', 'test_day.txt', 'test_night.txt')
    train, test, day, night = (read(f) for f in lists)
    assert read('train_val.txt') == train  # no val split here
    assert len(train) == 6 and len(test) == 8 and day and night and sorted(day + night) == sorted(test)
    assert all(n[-1] == 'D' for n in day) and all(n[-1] == 'N' for n in night)
    assert set(os.listdir(out)) == {'RGB', 'Thermal', 'Label', 'train_val.txt', *lists}
    for name in train + test:
        assert cv2.imread(osp.join(out, 'Thermal', name + '.png'), cv2.IMREAD_UNCHANGED).ndim == 2
        assert cv2.imread(osp.join(out, 'Label', name + '.png'), cv2.IMREAD_UNCHANGED).max() <= 8
    day_light = np.mean([cv2.imread(osp.join(out, 'RGB', n + '.png')).mean() for n in day])
    night_light = np.mean([cv2.imread(osp.join(out, 'RGB', n + '.png')).mean() for n in night])
    assert day_light > 1.5 * night_light


def test_nyu_layout(tmp_path):
    out = generate('NYU', str(tmp_path / 'd'), 3, 2, 20, 28, seed=0)
    assert open(osp.join(out, 'train.txt')).read() == 'RGB/0000.jpg\nRGB/0001.jpg\nRGB/0002.jpg\n'
    assert open(osp.join(out, 'test.txt')).read() == 'RGB/0003.jpg\nRGB/0004.jpg\n'
    assert sorted(os.listdir(osp.join(out, 'HHA'))) == [f'{i:04d}.jpg' for i in range(5)]
    hha = cv2.imread(osp.join(out, 'HHA', '0000.jpg'), cv2.IMREAD_UNCHANGED)
    assert hha.shape == (20, 28, 3)
    label = cv2.imread(osp.join(out, 'Label', '0000.png'), cv2.IMREAD_UNCHANGED)
    assert label.max() <= 40 and label.shape == (20, 28)


def test_deterministic_from_seed(tmp_path):
    a = generate('NYU', str(tmp_path / 'a'), 2, 1, 16, 20, seed=5)
    b = generate('NYU', str(tmp_path / 'b'), 2, 1, 16, 20, seed=5)
    c = generate('NYU', str(tmp_path / 'c'), 2, 1, 16, 20, seed=6)
    files = listing(a)
    assert files == listing(b) == listing(c)
    assert all(filecmp.cmp(osp.join(a, f), osp.join(b, f), shallow=False) for f in files)
    assert not filecmp.cmp(osp.join(a, 'Label', '0000.png'), osp.join(c, 'Label', '0000.png'), shallow=False)


@pytest.mark.parametrize('dataset', sorted(SPECS))
def test_factorial_appearance_code(dataset):
    """Every colour and every X level is shared by several classes; the pair is unique."""
    colours, levels = appearance_table(SPECS[dataset])
    pairs = {(tuple(c), lv) for c, lv in zip(colours.tolist(), levels.tolist())}
    assert len(pairs) == len(colours)
    assert len({tuple(c) for c in colours.tolist()}) < len(colours)
    assert len(set(levels.tolist())) < len(colours)


@pytest.mark.parametrize('dataset', sorted(SPECS))
def test_scenes_are_dark_busy_and_need_both_modalities(dataset):
    """A nearest-centroid pixel classifier on RGB chroma + X beats either modality alone by far."""
    spec = SPECS[dataset]

    def features(n, seed):
        rng, feats, labels, n_classes = np.random.default_rng(seed), [], [], []
        for _ in range(n):
            rgb, x, label = render_scene(spec, 60, 80, rng, (0.1, 0.28))
            assert rgb.mean() < 60  # dark
            n_classes.append(len(np.unique(label)))
            rgb = cv2.blur(rgb.astype(np.float32), (5, 5))
            x = cv2.blur(x.astype(np.float32), (5, 5)).reshape(60, 80, -1)[..., :1]
            chroma = rgb / (rgb.sum(-1, keepdims=True) + 1e-3)
            feats.append(np.concatenate([3 * chroma, x / 40], -1).reshape(-1, 4))
            labels.append(label.ravel())
        assert np.mean(n_classes) >= 7  # many classes per image
        return np.concatenate(feats), np.concatenate(labels)

    train_f, train_l = features(12, 0)
    test_f, test_l = features(6, 1)
    classes = np.unique(train_l)
    accuracy = {}
    for name, cols in (('rgb', [0, 1, 2]), ('x', [3]), ('both', [0, 1, 2, 3])):
        centroids = np.stack([train_f[train_l == c][:, cols].mean(0) for c in classes])
        dist = ((test_f[:, None, cols] - centroids[None]) ** 2).sum(-1)
        accuracy[name] = (classes[dist.argmin(1)] == test_l).mean()
    assert accuracy['both'] > 0.6, accuracy
    assert accuracy['both'] > max(accuracy['rgb'], accuracy['x']) + 0.2, accuracy


def test_cli_writes_the_images_and_prints_the_override(tmp_path, capsys):
    main(['--dataset', 'MFNet', '--out', str(tmp_path / 'm'), '--train', '80', '--test', '20', '--seed', '1'])
    images = sorted((tmp_path / 'm' / 'RGB').iterdir())
    assert len(images) == 100 and cv2.imread(str(images[0])).shape == (120, 160, 3)
    assert 'dataset_path=' in capsys.readouterr().out
