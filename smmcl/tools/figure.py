"""The qualitative figure of segmentation papers (as in SMMCL, Dong & Yokoya, WACV 2024): one row per
test image, columns RGB (gamma-lifted: the scenes are dark), X, ground truth, and the prediction of each
checkpoint given (e.g. a CE-only run beside SMMCL).

    python -m smmcl.tools.figure --config SMMCL_LLRGBD/config.py -e 500 --images 00001 00002 00003 \\
        [-e ce_only/epoch-500.pth ...] [--titles SMMCL "CE only"] [--out figs/figure.png] \\
        [--panel-width W] [--set key=value ...]

Predictions are the evaluation's, pixel for pixel (:class:`smmcl.inference.Segmenter`: the config's
protocol, scales, flip and speed switches, as ``eval.py``, and the generators seeded per test image as
:func:`smmcl.engine.evaluate.evaluate_per_image` seeds them: SMMCL's decoder draws random NMF bases).
Label maps use the dataset's palette (``config.class_colors``, what ``eval.py -p`` writes); pixels
labelled 255 (ignore) are black, as palette entry 255 is.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from smmcl import cli
from smmcl.config import ConfigError, load_config
from smmcl.data.dataset import DatasetError, RGBXDataset
from smmcl.engine.checkpoint import CheckpointError
from smmcl.inference import Segmenter, load_model
from smmcl.visual import colour_labels, gamma_lift, palette_rgb

PAD = 2  # white border around every panel
HEADER = 24  # height of the column-title strip
FONT = cv2.FONT_HERSHEY_SIMPLEX


# ---------------------------------------------------------------------------------------------------
# Panels (pure functions)
# ---------------------------------------------------------------------------------------------------


def x_panel(x: np.ndarray, single_channel: bool) -> np.ndarray:
    """H-W-3 X image (as the dataset gives it) -> BGR picture: a 1-channel modality (depth, thermal),
    replicated to 3 by the loader, is stretched to 0-255 and coloured with viridis; a 3-channel one (HHA)
    is shown as stored."""
    if not single_channel:
        return np.ascontiguousarray(x)
    channel = cv2.normalize(np.ascontiguousarray(x[..., 0]), None, 0, 255, cv2.NORM_MINMAX)
    return cv2.applyColorMap(channel, cv2.COLORMAP_VIRIDIS)


def panel_origin(row: int, col: int, panel_hw: Tuple[int, int]) -> Tuple[int, int]:
    """(top, left) pixel of panel (``row``, ``col``) in a :func:`grid` of ``panel_hw`` (H, W) panels."""
    height, width = panel_hw
    return HEADER + row * (height + 2 * PAD) + PAD, col * (width + 2 * PAD) + PAD


def put_title(canvas: np.ndarray, text: str, left: int, width: int, baseline: int) -> None:
    """Black text starting at ``left``, shrunk until it fits ``width`` pixels."""
    scale = 0.5
    while scale > 0.25 and cv2.getTextSize(text, FONT, scale, 1)[0][0] > width - 4:
        scale -= 0.05
    cv2.putText(canvas, text, (left + 2, baseline), FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)


def grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str]) -> np.ndarray:
    """Panels (H-W-3 uint8 BGR, one size) in rows, each in a ``PAD`` white border, under a ``HEADER``
    strip of column titles. Returns (HEADER + R * (H + 2 PAD))-(C * (W + 2 PAD))-3 uint8."""
    height, width = rows[0][0].shape[:2]
    cols = len(titles)
    canvas = np.full((HEADER + len(rows) * (height + 2 * PAD), cols * (width + 2 * PAD), 3), 255, np.uint8)
    for c, title in enumerate(titles):
        put_title(canvas, title, c * (width + 2 * PAD), width + 2 * PAD, HEADER - 7)
    for r, panels in enumerate(rows):
        if len(panels) != cols:
            raise ValueError(f'row {r} has {len(panels)} panels for {cols} titles')
        for c, panel in enumerate(panels):
            top, left = panel_origin(r, c, (height, width))
            canvas[top:top + height, left:left + width] = panel
    return canvas


def fit(panel: np.ndarray, hw: Tuple[int, int], nearest: bool) -> np.ndarray:
    """``panel`` at ``hw`` (H, W): nearest-neighbour for label maps (colours stay palette colours)."""
    if panel.shape[:2] == tuple(hw):
        return panel
    mode = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(panel, (hw[1], hw[0]), interpolation=mode)


# ---------------------------------------------------------------------------------------------------
# Predictions and the figure
# ---------------------------------------------------------------------------------------------------


def checkpoint_title(checkpoint: str) -> str:
    """A column title for what ``-e`` got: ``epoch 500``, ``epoch last``, or the file name."""
    text = str(checkpoint)
    return osp.splitext(osp.basename(text))[0] if text.endswith('.pth') else f'epoch {text}'


def test_indices(dataset, names: Optional[Sequence[str]]) -> List[int]:
    """Positions in the test split of ``names`` (None: the first four).

    Raises:
        DatasetError: a name is not in the test split.
    """
    names = list(names) if names else dataset.names[:4]
    position = {name: i for i, name in enumerate(dataset.names)}
    missing = [n for n in names if n not in position]
    if missing:
        raise DatasetError(f'images {missing} are not in the test split ({dataset.layout.rgb_dir}: '
                           f'{", ".join(dataset.names[:5])}{", ..." if len(dataset.names) > 5 else ""}). '
                           f'Fix: pass --images with names from it.')
    return [position[n] for n in names]


def draw_figure(config, checkpoints: Sequence[str], names: Optional[Sequence[str]] = None,
                titles: Optional[Sequence[str]] = None, out: Optional[str] = None, gamma: float = 2.2,
                panel_width: Optional[int] = None, device=None) -> np.ndarray:
    """Draw the figure (see the module docstring); write it to ``out`` when given.

    Args:
        config: a finalised experiment config; its test split ('val') supplies the images.
        checkpoints: what ``eval.py -e`` takes, one checkpoint each (epoch, ``last`` or a ``.pth`` file).
        names: test image names, one row each; None: the first four.
        titles: a column title per checkpoint; None: :func:`checkpoint_title`.
        gamma: of the RGB panel's lift (:func:`smmcl.visual.gamma_lift`).
        panel_width: scale every panel to this width (None: the first image's size).
        device: where the models run (None: the first GPU, else the CPU).

    Returns:
        the figure, H-W-3 uint8 BGR: ``len(names)`` rows of ``3 + len(checkpoints)`` panels.

    Raises:
        DatasetError: a name is not in the test split.
    """
    dataset = RGBXDataset(config, 'val')
    indices = test_indices(dataset, names)
    titles = list(titles) if titles else [checkpoint_title(c) for c in checkpoints]
    if len(titles) != len(checkpoints):
        raise ConfigError(f'{len(titles)} titles for {len(checkpoints)} checkpoints; give one --titles each')
    preds = [predictions(config, c, dataset, indices, device) for c in checkpoints]
    palette = palette_rgb(config.class_colors)
    rows, size = [], None
    for row, index in enumerate(indices):
        item = dataset[index]
        rgb, x = item['data'], item['modal_x']
        if config.true_rgb_order:  # network order -> OpenCV's
            rgb, x = rgb[..., ::-1], x[..., ::-1]
        if size is None:
            h, w = rgb.shape[:2]
            size = (h, w) if panel_width is None else (max(1, round(h * panel_width / w)), int(panel_width))
        images = [gamma_lift(rgb, gamma), x_panel(x, bool(config.x_is_single_channel))]
        labels = [item['label']] + [p[row] for p in preds]
        rows.append([fit(p, size, False) for p in images] + [fit(colour_labels(l, palette), size, True)
                                                             for l in labels])
    x_name = config.x_folder if config.x_folder else 'X'
    figure = grid(rows, [f'RGB (gamma {gamma:g})', f'X ({x_name})', 'ground truth'] + titles)
    if out:
        os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
        if not cv2.imwrite(out, figure):
            raise OSError(f'could not write {out}')
    return figure


def predictions(config, checkpoint: str, dataset, indices: Sequence[int], device=None) -> List[np.ndarray]:
    """H-W int64 predictions of one checkpoint for the test items at ``indices``, as ``eval.py`` makes
    them (:class:`smmcl.inference.Segmenter`: the evaluator, the speed switches, item ``i`` seeded with
    ``config.seed + i``)."""
    segmenter = Segmenter(load_model(config, checkpoint, device), config, device)
    order = 'rgb' if config.true_rgb_order else 'bgr'  # the items are in the network's order already
    out = []
    for index in indices:
        item = dataset[index]
        out.append(segmenter(item['data'], item['modal_x'], index=index, channel_order=order))
    return out


def main(argv: Optional[Sequence[str]] = None) -> np.ndarray:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cli.add_config(parser)
    parser.add_argument('-e', '--epochs', action='append', required=True, metavar='CHECKPOINT',
                        help="a checkpoint: epoch, 'last' or a .pth file; repeat for more columns")
    parser.add_argument('--images', nargs='+', default=None, help='test image names (default: the first 4)')
    parser.add_argument('--titles', nargs='+', default=None, help='a column title per checkpoint')
    parser.add_argument('--out', default=osp.join('figs', 'figure.png'))
    parser.add_argument('--gamma', type=float, default=2.2, help='gamma of the RGB lift (1: as stored)')
    parser.add_argument('--panel-width', type=int, default=None, help='scale panels to this width')
    cli.add_set(parser)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        figure = draw_figure(config, args.epochs, args.images, args.titles, args.out, args.gamma,
                             args.panel_width)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        raise SystemExit(1)
    print(f'figure: {args.out} ({figure.shape[1]}x{figure.shape[0]})')
    return figure


if __name__ == '__main__':
    main()
