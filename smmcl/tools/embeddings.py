"""The feature spaces SMMCL's contrastive loss shapes (Dong & Yokoya, WACV 2024, Sec. 3.2): drawn, measured.

    python -m smmcl.tools.embeddings --config SMMCL_LLRGBD/config.py -e 500 [--images 16]
        [--per-class 100] [--out figs/embeddings.png] [--seed 0] [--set key=value ...]

The loss contrasts the two projectors' stage-4 embeddings (``backbone.projector_color`` on the RGB
branch, ``backbone.projector_other`` on the X branch: :class:`smmcl.models.encoder.DualMSCAN`) at cells
labelled by the ground truth downsampled to stage 4 (:func:`smmcl.losses.contrastive.downsample_labels`).
This tool runs the eval-mode encoder on the first ``--images`` test images (whole images, normalised as
the evaluator normalises them), samples up to ``--per-class`` labelled cells per class and modality
(seeded), and

- draws one t-SNE map (scikit-learn, seeded, cosine distance as the loss's similarity) of both
  modalities together: colour = class (the dataset's palette), disc = RGB, triangle = X. Where the
  cross-modal term works, the discs and triangles of a class share one cluster;
- prints per class the mean cosine similarity of its RGB embeddings with the X embeddings of the same
  class, and with those of the other classes (:func:`cross_modal_similarity`), and their means.
"""
from __future__ import annotations

import argparse
import math
import os
import os.path as osp
import sys
from typing import Dict, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from smmcl import cli
from smmcl.config import ConfigError, load_config
from smmcl.data.dataset import DatasetError, RGBXDataset
from smmcl.engine.checkpoint import CheckpointError
from smmcl.engine.evaluate import to_input
from smmcl.inference import load_model
from smmcl.losses.contrastive import downsample_labels
from smmcl.tools.figure import FONT, put_title
from smmcl.visual import palette_rgb

MAP_SIZE = 600  # side of the square scatter area, pixels
LEGEND_WIDTH = 190
TITLE_HEIGHT = 46
FIGURE_SIZE = (TITLE_HEIGHT + MAP_SIZE, MAP_SIZE + LEGEND_WIDTH)  # (H, W) of every embedding map
MARKER = 5  # marker radius, pixels


# ---------------------------------------------------------------------------------------------------
# Embeddings of the test images
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def image_embeddings(model, rgb: np.ndarray, x: np.ndarray, label: np.ndarray, config
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage-4 contrastive embeddings of one image and the labels of their cells.

    Args:
        model: an eval-mode :class:`smmcl.models.EncoderDecoder` (:func:`smmcl.inference.load_model`).
        rgb, x: H-W-3 uint8 images in the network's order (as the dataset gives them).
        label: H-W uint8 labels (255 = ignore).

    Returns:
        color M-C, other M-C float32 embeddings (the projectors' outputs, M = h*w cells of stage 4, C = 256),
        labels M int64 (the ground truth downsampled to stage 4 as the loss downsamples it), on the CPU.
    """
    device = next(model.parameters()).device
    rgb_t = to_input(rgb, config.norm_mean, config.norm_std, device)[None]
    x_t = to_input(x, config.norm_mean, config.norm_std, device)[None]
    _, color, other = model.backbone(rgb_t, x_t)  # N-C-h-w each; the decoder is not needed
    labels = downsample_labels(torch.as_tensor(np.asarray(label)).to(device)[None], color.shape[2:])

    def cells(emb):  # 1-C-h-w -> (h*w)-C
        return emb[0].flatten(1).T.float().cpu()

    return cells(color), cells(other), labels.flatten().cpu()


def sample_per_class(labels: np.ndarray, per_class: int, num_classes: int, rng: np.random.Generator
                     ) -> np.ndarray:
    """Indices of up to ``per_class`` cells of each class ``0..num_classes-1`` (a uniform draw without
    replacement; ignored and out-of-range labels never), grouped by class in increasing order."""
    chosen = []
    for cls in range(num_classes):
        cells = np.flatnonzero(labels == cls)
        if cells.size > per_class:
            cells = np.sort(rng.choice(cells, per_class, replace=False))
        chosen.append(cells)
    return np.concatenate(chosen).astype(np.int64)


def collect(model, dataset, config, images: int, per_class: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """Embeddings of the first ``images`` items of ``dataset``, up to ``per_class`` cells per class drawn
    for each modality independently (as the loss draws its anchors: ``share_anchor_draw=False``).

    Returns:
        dict ``rgb`` P-C, ``rgb_labels`` P, ``x`` Q-C, ``x_labels`` Q (numpy).
    """
    colors, others, labels = [], [], []
    for index in range(min(int(images), len(dataset))):
        item = dataset[index]
        c, o, l = image_embeddings(model, item['data'], item['modal_x'], item['label'], config)
        colors.append(c)
        others.append(o)
        labels.append(l)
    color, other = torch.cat(colors).numpy(), torch.cat(others).numpy()
    labels = torch.cat(labels).numpy()
    rng = np.random.default_rng(seed)
    pick_rgb = sample_per_class(labels, per_class, int(config.num_classes), rng)
    pick_x = sample_per_class(labels, per_class, int(config.num_classes), rng)
    return dict(rgb=color[pick_rgb], rgb_labels=labels[pick_rgb], x=other[pick_x], x_labels=labels[pick_x])


# ---------------------------------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------------------------------


def cross_modal_similarity(rgb: np.ndarray, rgb_labels: np.ndarray, x: np.ndarray, x_labels: np.ndarray,
                           num_classes: int) -> Dict[str, object]:
    """Mean cross-modal cosine similarities, per class.

    For class c: ``same`` = the mean cosine similarity over all pairs (RGB embedding of class c, X
    embedding of class c); ``different`` = over all pairs (RGB embedding of class c, X embedding of
    another class). The contrastive loss pulls the first towards 1 and pushes the second down.

    Args:
        rgb: P-C, x: Q-C embeddings; rgb_labels: P, x_labels: Q class indices.
        num_classes: classes 0..num_classes-1 are reported.

    Returns:
        dict ``per_class``: {c: (same, different)} for the classes present in both modalities
        (``different`` is NaN when no other class is); ``same``, ``different``: their means over those
        classes (NaN-skipping for ``different``; NaN when no class is present).
    """
    def unit(a):
        a = np.asarray(a, dtype=np.float64)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    sim = unit(rgb) @ unit(x).T  # P-Q cosine similarities
    rgb_labels, x_labels = np.asarray(rgb_labels), np.asarray(x_labels)
    per_class = {}
    for cls in range(num_classes):
        rows, same = rgb_labels == cls, x_labels == cls
        if not rows.any() or not same.any():
            continue
        other = ~same
        different = float(sim[rows][:, other].mean()) if other.any() else math.nan
        per_class[cls] = (float(sim[rows][:, same].mean()), different)
    values = np.array(list(per_class.values()), dtype=np.float64).reshape(-1, 2)
    mean = [float(np.nanmean(values[:, i])) if np.isfinite(values[:, i]).any() else math.nan
            for i in range(2)]
    return dict(per_class=per_class, same=mean[0], different=mean[1])


def format_similarity(result: Dict[str, object], class_names: Sequence[str] = (), counts=None) -> str:
    """A table of :func:`cross_modal_similarity`'s result: class, same, different (and cells sampled)."""
    def name(c):
        return class_names[c] if c < len(class_names) else f'class {c}'

    width = max([len(name(c)) for c in result['per_class']] + [10])
    lines = [f'{"class":<{width}}  same-class  different-class' + ('  cells (RGB, X)' if counts else '')]
    for c, (same, different) in result['per_class'].items():
        extra = f'  {counts[c][0]:>5} {counts[c][1]:>5}' if counts else ''
        lines.append(f'{name(c):<{width}}  {same:10.3f}  {different:15.3f}{extra}')
    lines.append(f'{"mean":<{width}}  {result["same"]:10.3f}  {result["different"]:15.3f}')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------
# The map
# ---------------------------------------------------------------------------------------------------


def tsne(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """N-C embeddings -> N-2 t-SNE coordinates (scikit-learn, cosine distances, PCA start, seeded).

    Raises:
        ValueError: fewer than 4 points.
    """
    from sklearn.manifold import TSNE  # an extra (pip install scikit-learn); training never imports it
    n = len(points)
    if n < 4:
        raise ValueError(f't-SNE needs at least 4 embeddings, got {n}: use more --images or --per-class')
    perplexity = min(30.0, (n - 1) / 3.0)  # scikit-learn requires perplexity < n
    model = TSNE(n_components=2, perplexity=perplexity, metric='cosine', init='pca', random_state=seed)
    return model.fit_transform(np.asarray(points, dtype=np.float32)).astype(np.float64)


def _marker(canvas: np.ndarray, center: Tuple[int, int], modality: int, colour, radius: int = MARKER) -> None:
    """A filled disc (RGB) or triangle (X) in ``colour`` (BGR) with a dark outline, so that light and
    black class colours both show."""
    outline = (60, 60, 60)
    cx, cy = center
    if modality == 0:
        cv2.circle(canvas, (cx, cy), radius, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, (cx, cy), radius, outline, 1, cv2.LINE_AA)
    else:
        r = radius + 1
        tri = np.array([[cx, cy - r], [cx - r, cy + r - 1], [cx + r, cy + r - 1]], np.int32)
        cv2.fillPoly(canvas, [tri], colour, cv2.LINE_AA)
        cv2.polylines(canvas, [tri], True, outline, 1, cv2.LINE_AA)


def draw_map(coords: np.ndarray, labels: np.ndarray, modality: np.ndarray, palette: np.ndarray,
             class_names: Sequence[str] = (), title: Sequence[str] = (), x_name: str = 'X') -> np.ndarray:
    """Scatter 2-D points: colour = class (``palette`` 256-3 RGB), disc = RGB, triangle = X.

    Args:
        coords: N-2 positions (any scale: fitted into the square map, aspect kept).
        labels: N classes; modality: N (0 = RGB, 1 = X).
        class_names: legend names (``class i`` beyond them).
        title: up to two lines above the map.
        x_name: the X modality's legend name.

    Returns:
        :data:`FIGURE_SIZE` H-W-3 uint8 BGR image, the legend (the classes present, the two markers) right.
    """
    canvas = np.full(FIGURE_SIZE + (3,), 255, np.uint8)
    coords = np.asarray(coords, dtype=np.float64)
    lo, hi = coords.min(0), coords.max(0)
    margin = 3 * MARKER
    scale = (MAP_SIZE - 2 * margin) / max(float((hi - lo).max()), 1e-12)
    offset = margin + ((MAP_SIZE - 2 * margin) - (hi - lo) * scale) / 2  # centre the shorter axis
    pixels = np.round((coords - lo) * scale + offset).astype(int)
    pixels[:, 1] += TITLE_HEIGHT
    order = np.random.default_rng(0).permutation(len(coords))  # no class or modality always on top
    for i in order:
        colour = tuple(int(v) for v in palette[int(labels[i])][::-1])
        _marker(canvas, tuple(pixels[i]), int(modality[i]), colour)
    cv2.rectangle(canvas, (0, TITLE_HEIGHT), (MAP_SIZE - 1, FIGURE_SIZE[0] - 1), (200, 200, 200), 1)
    for row, line in enumerate(list(title)[:2]):
        put_title(canvas, line, 0, FIGURE_SIZE[1], 18 + 20 * row)
    left, y = MAP_SIZE + 14, TITLE_HEIGHT + 18
    for m, name in enumerate(('RGB', x_name)):
        _marker(canvas, (left + MARKER, y - 4), m, (170, 170, 170))
        cv2.putText(canvas, name, (left + 3 * MARKER + 6, y), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        y += 20
    y += 6
    for cls in sorted({int(c) for c in labels}):
        name = class_names[cls] if cls < len(class_names) else f'class {cls}'
        colour = tuple(int(v) for v in palette[cls][::-1])
        cv2.rectangle(canvas, (left, y - 11), (left + 12, y + 1), colour, -1)
        cv2.rectangle(canvas, (left, y - 11), (left + 12, y + 1), (60, 60, 60), 1)
        cv2.putText(canvas, name, (left + 3 * MARKER + 6, y), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        y += 19
        if y > FIGURE_SIZE[0] - 4:
            break
    return canvas


# ---------------------------------------------------------------------------------------------------
# The tool
# ---------------------------------------------------------------------------------------------------


def run(config, checkpoint: str, images: int = 16, per_class: int = 100, out: Optional[str] = None,
        seed: int = 0, device=None, title: str = '') -> Dict[str, object]:
    """Load ``checkpoint``, collect and sample embeddings (:func:`collect`), measure them
    (:func:`cross_modal_similarity`) and draw the t-SNE map (:func:`draw_map`) to ``out`` when given.

    Returns:
        :func:`cross_modal_similarity`'s dict, plus ``counts`` {c: (RGB cells, X cells)} and ``image``
        (the map, H-W-3 uint8 BGR).
    """
    model = load_model(config, checkpoint, device, adopt=True)
    dataset = RGBXDataset(config, 'val')
    data = collect(model, dataset, config, images, per_class, seed)
    k = int(config.num_classes)
    result = cross_modal_similarity(data['rgb'], data['rgb_labels'], data['x'], data['x_labels'], k)
    result['counts'] = {c: (int((data['rgb_labels'] == c).sum()), int((data['x_labels'] == c).sum()))
                        for c in result['per_class']}
    coords = tsne(np.concatenate([data['rgb'], data['x']]), seed)
    labels = np.concatenate([data['rgb_labels'], data['x_labels']])
    modality = np.repeat([0, 1], [len(data['rgb']), len(data['x'])])
    lines = [f't-SNE of the stage-4 embeddings{": " + title if title else ""} '
             f'({min(images, len(dataset))} test images, up to {per_class} cells per class and modality)',
             f'cross-modal cosine similarity: same class {result["same"]:.3f}, '
             f'different classes {result["different"]:.3f}']
    result['image'] = draw_map(coords, labels, modality, palette_rgb(config.class_colors),
                               config.class_names or (), lines, config.x_folder or 'X')
    if out:
        os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
        if not cv2.imwrite(out, result['image']):
            raise OSError(f'could not write {out}')
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cli.add_config(parser)
    cli.add_checkpoint(parser)
    parser.add_argument('--images', type=int, default=16, help='the first K test images')
    parser.add_argument('--per-class', type=int, default=100, help='cells sampled per class and modality')
    parser.add_argument('--out', default=osp.join('figs', 'embeddings.png'))
    parser.add_argument('--seed', type=int, default=0, help='of the sampling and the t-SNE')
    parser.add_argument('--title', default='', help='named in the picture, e.g. the run')
    cli.add_set(parser)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        result = run(config, args.epoch, args.images, args.per_class, args.out, args.seed,
                     title=args.title)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        raise SystemExit(1)
    print('cross-modal cosine similarity of the stage-4 embeddings (RGB of class c vs X of class c, '
          'and vs X of the other classes):')
    print(format_similarity(result, config.class_names or (), result['counts']))
    print(f'map: {args.out}')
    return result


if __name__ == '__main__':
    main()
