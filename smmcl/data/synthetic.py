"""Synthetic dark RGB-X scenes in the exact on-disk layout of LLRGBD, MFNet or NYU Depth V2.

``python -m smmcl.data.synthetic --dataset LLRGBD --out /tmp/llrgbd`` then
``python train.py --set dataset_path=/tmp/llrgbd`` runs an SMMCL experiment end to end without the real
data. The task needs both modalities, like the real one: each class has a colour group *and* an X level
(a factorial code), and each colour group and each X level is shared by several classes, so neither the
dark, noisy RGB nor X alone names the class, both together do. Scenes have a background layout
(ceiling / wall / floor, or sky / buildings / road) and many objects of several shapes and sizes
(rectangles, ellipses, polygons, stripes), so most classes appear in every image. X is depth-like
(smooth per-object planes, sensor holes), thermal-like (blurred warm objects) or HHA-like (3 channels).
Everything is drawn with numpy and cv2 from one seed.
"""
from __future__ import annotations

import argparse
import math
import os
import os.path as osp
from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np


@dataclass(frozen=True)
class SyntheticSpec:
    """What one dataset looks like on disk and which label values its scenes use."""
    num_values: int  # label values written: 0..num_values - 1
    void: Optional[int]  # value of unlabelled blobs (None: none)
    background: Tuple[int, int, int]  # values of the top / middle / bottom regions
    objects: Tuple[int, ...]  # values drawn as objects
    x_kind: str  # 'depth', 'thermal' or 'hha'


SPECS = {
    # 0 void, 3 ceiling, 12 wall, 5 floor (smmcl SMMCL_LLRGBD class_names).
    'LLRGBD': SyntheticSpec(14, 0, (3, 12, 5), (1, 2, 4, 6, 7, 8, 9, 10, 11, 13), 'depth'),
    # 0 unlabeled is the background (a scored class in MFNet's protocol).
    'MFNet': SyntheticSpec(9, None, (0, 0, 0), (1, 2, 3, 4, 5, 6, 7, 8), 'thermal'),
    # File values 1..40 are the classes (1 wall, 2 floor, 22 ceiling), 0 unlabelled (-> 255 when read).
    'NYU': SyntheticSpec(41, 0, (22, 1, 2), tuple(v for v in range(3, 41) if v != 22), 'hha'),
}
SHAPES = ('rect', 'ellipse', 'polygon', 'stripes')
PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1]
JPG = [cv2.IMWRITE_JPEG_QUALITY, 95]


def appearance_table(spec: SyntheticSpec):
    """Colour (BGR at full light) and X level of each appearance: 3 background regions, then objects.

    Appearance i has colour group ``i % G`` and X level ``i // G`` with ``G = ceil(sqrt(n))``: classes
    sharing a colour differ in X and the other way round. Fixed per dataset (not per seed), so train and
    test agree.
    """
    n = 3 + len(spec.objects)
    groups = math.ceil(math.sqrt(n))
    levels = math.ceil(n / groups)
    hues = (np.arange(groups) * 180 // groups).astype(np.uint8)  # OpenCV hue range 0..179
    hsv = np.stack([hues, np.full(groups, 170, np.uint8), np.full(groups, 230, np.uint8)], -1)
    palette = cv2.cvtColor(hsv[None], cv2.COLOR_HSV2BGR)[0].astype(np.float32)
    index = np.arange(n)
    colours = palette[index % groups]
    x_levels = np.linspace(40, 215, levels, dtype=np.float32)[index // groups]
    return colours, x_levels


def _draw_shape(canvas: np.ndarray, shape: str, value: int, rng: np.random.Generator) -> None:
    """Draw one filled shape of a random size and place into ``canvas`` (an instance-id map)."""
    h, w = canvas.shape
    oh, ow = rng.uniform(0.15, 0.45) * h, rng.uniform(0.12, 0.4) * w
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.08, 0.92) * w
    if shape == 'rect':
        cv2.rectangle(canvas, (int(cx - ow / 2), int(cy - oh / 2)), (int(cx + ow / 2), int(cy + oh / 2)),
                      value, -1)
    elif shape == 'ellipse':
        cv2.ellipse(canvas, (int(cx), int(cy)), (max(int(ow / 2), 1), max(int(oh / 2), 1)),
                    rng.uniform(0, 180), 0, 360, value, -1)
    elif shape == 'polygon':
        k = rng.integers(3, 7)
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radius = rng.uniform(0.6, 1.0, k)
        pts = np.stack([cx + radius * np.cos(angles) * ow / 2, cy + radius * np.sin(angles) * oh / 2], -1)
        cv2.fillPoly(canvas, [pts.round().astype(np.int32)], value)
    else:  # stripes: parallel bands, horizontal or vertical
        k = int(rng.integers(3, 6))
        y0, x0 = cy - oh / 2, cx - ow / 2
        for j in range(k):
            if oh > ow:  # taller than wide: horizontal bands
                top, bottom = y0 + j * oh / k, y0 + (j + 0.5) * oh / k
                cv2.rectangle(canvas, (int(x0), int(top)), (int(x0 + ow), int(bottom)), value, -1)
            else:
                left, right = x0 + j * ow / k, x0 + (j + 0.5) * ow / k
                cv2.rectangle(canvas, (int(left), int(y0)), (int(right), int(y0 + oh)), value, -1)


def render_scene(spec: SyntheticSpec, height: int, width: int, rng: np.random.Generator,
                 light: Tuple[float, float]):
    """One scene.

    Returns:
        rgb H-W-3 uint8 (BGR, dark, noisy), x H-W (or H-W-3 for HHA) uint8, label H-W uint8.
    """
    colours, x_levels = appearance_table(spec)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xx / width - 0.5, yy / height - 0.5

    # Background: three regions split by two slanted lines; instance ids 0, 1, 2 = appearances 0, 1, 2.
    y1 = rng.uniform(0.12, 0.32, 2) * height
    y2 = rng.uniform(0.55, 0.72, 2) * height
    inst = ((yy >= y1[0] + (y1[1] - y1[0]) * xx / width).astype(np.uint8)
            + (yy >= y2[0] + (y2[1] - y2[0]) * xx / width).astype(np.uint8))
    appearance = [0, 1, 2]
    labels = list(spec.background)

    n_obj = int(min(len(spec.objects), rng.integers(5, 10)))
    for value in rng.choice(spec.objects, n_obj, replace=False):
        appearance.append(3 + spec.objects.index(int(value)))
        labels.append(int(value))
        _draw_shape(inst, SHAPES[rng.integers(len(SHAPES))], len(labels) - 1, rng)
    if spec.void is not None and rng.random() < 0.5:  # an unlabelled blob of random appearance
        appearance.append(int(rng.integers(len(colours))))
        labels.append(spec.void)
        _draw_shape(inst, 'ellipse', len(labels) - 1, rng)

    k = len(labels)
    label = np.asarray(labels, np.uint8)[inst]
    colour = colours[appearance] * rng.uniform(0.85, 1.15, (k, 1)).astype(np.float32)  # k-3
    level = x_levels[appearance] + rng.uniform(-6, 6, k).astype(np.float32)
    tilt = rng.uniform(-12, 12, (k, 2)).astype(np.float32)
    tilt[:3, 1] = (-30, 0, 30) if spec.x_kind != 'thermal' else (0, 0, 0)  # floor/ceiling recede

    # Dark RGB: low light, vignetting, sensor noise.
    shade = (1.0 - 0.8 * (u ** 2 + v ** 2)) * rng.uniform(*light)
    rgb = colour[inst] * shade[..., None] + rng.normal(0, 3.5, (height, width, 3)).astype(np.float32)
    rgb = np.clip(rgb, 0, 255).round().astype(np.uint8)

    plane = level[inst] + tilt[inst, 0] * u + tilt[inst, 1] * v
    return rgb, _x_image(spec.x_kind, plane, inst, yy / height, rng), label


def _x_image(kind: str, plane: np.ndarray, inst: np.ndarray, rows: np.ndarray, rng: np.random.Generator):
    """The X modality of a scene from its H-W ``plane`` of levels: depth (with holes), blurred thermal, or
    HHA (H-W-3: disparity, height above ground, angle with gravity); ``rows`` the H-W row positions in 0-1."""
    if kind == 'depth':
        x = plane + rng.normal(0, 2.0, plane.shape)
        x[rng.random(plane.shape) < 0.01] = 0  # sensor holes
    elif kind == 'thermal':
        x = cv2.GaussianBlur(plane, (5, 5), 0) + rng.normal(0, 2.5, plane.shape)
    else:
        disparity = 255 - plane
        ground = 190 - 150 * rows + 10 * (inst == 2)
        angle = np.where(inst == 2, 40.0, np.where(inst == 0, 215.0, 128.0))
        x = np.stack([disparity, ground, angle], -1) + rng.normal(0, 2.0, plane.shape + (3,))
    return np.clip(x, 0, 255).round().astype(np.uint8)


def generate(dataset: str, out: str, n_train: int = 64, n_test: int = 16, height: int = 120, width: int = 160,
             seed: int = 0) -> str:
    """Write a synthetic ``dataset`` ('LLRGBD', 'MFNet' or 'NYU') into ``out`` in its real layout.

    LLRGBD: ``out/{train,test}/{rgb,depth,label}/<name>.png`` (depth 1 channel, labels 0..13) and the
    authors' lists ``train/train.txt``, ``test/test.txt`` (bare names). MFNet:
    ``out/{RGB,Thermal,Label}/<name>.png`` (thermal 1 channel, labels 0..8) with names ``00000D`` (day) /
    ``00001N`` (night) alternating, lists ``train.txt``, ``train_val.txt`` (here the same: no val split),
    ``test.txt``, ``test_day.txt``, ``test_night.txt``. NYU: ``out/RGB/<name>.jpg``, ``out/HHA/<name>.jpg`` (3 channels),
    ``out/Label/<name>.png`` (0 unlabelled, 1..40 classes), lists ``train.txt`` / ``test.txt`` with
    lines ``RGB/<name>.jpg``.

    Returns:
        ``out``.
    """
    if dataset not in SPECS:
        raise ValueError(f'dataset must be one of {sorted(SPECS)}, not {dataset!r}')
    spec = SPECS[dataset]
    rng = np.random.default_rng(seed)
    splits = {'train': range(n_train), 'test': range(n_train, n_train + n_test)}
    lists = {}
    for split, indices in splits.items():
        for i in indices:
            night = dataset != 'MFNet' or i % 2 == 1  # MFNet: day and night alternate
            light = (0.1, 0.28) if night else (0.45, 0.7)
            rgb, x, label = render_scene(spec, height, width, rng, light)
            if dataset == 'LLRGBD':
                name, folder = f'{i:05d}', osp.join(out, split)
                files = (('rgb', '.png', rgb), ('depth', '.png', x), ('label', '.png', label))
            elif dataset == 'MFNet':
                name, folder = f'{i:05d}' + ('N' if night else 'D'), out
                files = (('RGB', '.png', rgb), ('Thermal', '.png', x), ('Label', '.png', label))
            else:
                name, folder = f'{i:04d}', out
                files = (('RGB', '.jpg', rgb), ('HHA', '.jpg', x), ('Label', '.png', label))
            for sub, ext, img in files:
                os.makedirs(osp.join(folder, sub), exist_ok=True)
                cv2.imwrite(osp.join(folder, sub, name + ext), img, PNG if ext == '.png' else JPG)
            lists.setdefault(split, []).append(name)
    _write_lists(dataset, out, lists)
    return out


def _write_lists(dataset: str, out: str, lists) -> None:
    """The list files of ``dataset``'s layout, from {split: names}."""
    if dataset == 'MFNet':
        test = lists.get('test', [])
        _write_list(osp.join(out, 'train.txt'), lists.get('train', []))
        _write_list(osp.join(out, 'train_val.txt'), lists.get('train', []))
        _write_list(osp.join(out, 'test.txt'), test)
        _write_list(osp.join(out, 'test_day.txt'), [n for n in test if n.endswith('D')])
        _write_list(osp.join(out, 'test_night.txt'), [n for n in test if n.endswith('N')])
    elif dataset == 'LLRGBD':  # their RGBXDataset._get_file_names: one bare name a line
        for split in ('train', 'test'):
            os.makedirs(osp.join(out, split), exist_ok=True)
            _write_list(osp.join(out, split, f'{split}.txt'), lists.get(split, []))
    elif dataset == 'NYU':
        for split in ('train', 'test'):
            _write_list(osp.join(out, f'{split}.txt'), [f'RGB/{n}.jpg' for n in lists.get(split, [])])


def _write_list(path: str, lines) -> None:
    with open(path, 'w') as f:
        f.write(''.join(f'{line}\n' for line in lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dataset', required=True, choices=sorted(SPECS))
    parser.add_argument('--out', required=True, help='folder to write (point dataset_path at it)')
    parser.add_argument('--train', type=int, default=64, help='number of training images')
    parser.add_argument('--test', type=int, default=16, help='number of test images')
    parser.add_argument('--height', type=int, default=120)
    parser.add_argument('--width', type=int, default=160)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    generate(args.dataset, args.out, args.train, args.test, args.height, args.width, args.seed)
    print(f'wrote a synthetic {args.dataset} ({args.train} train, {args.test} test, '
          f'{args.height}x{args.width}) to {args.out}; use it with --set dataset_path={osp.abspath(args.out)}')


if __name__ == '__main__':
    main()
