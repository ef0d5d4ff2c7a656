"""What predictions look like: the datasets' palettes, palette PNGs, overlays and the gamma lift that
makes dark scenes visible. Used by ``eval.py -p``, ``predict.py``, the evaluation during training and
the figures.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import List, Optional

import numpy as np
from PIL import Image

from smmcl.errors import ConfigError


def cmx_palette() -> np.ndarray:
    """41-3 uint8 colours of CMX's ``RGBXDataset.get_class_colors`` (the PASCAL VOC map: bits of the
    class index spread over the high bits of R, G and B), kept for MFNet and NYU, whose palettes the
    authors did not release."""
    palette = np.zeros((41, 3), dtype=np.uint8)
    for i in range(41):
        c, r, g, b = i, 0, 0, 0
        for j in range(7):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def prediction_palette(class_colors=None) -> List[int]:
    """The 768 values (256 RGB triples) the prediction PNGs' palette holds, as the authors'
    ``SegEvaluator.func_per_iteration``: the dataset's colours, then zeros.

    Args:
        class_colors: ``config.class_colors``, K-3 floats in 0-1 (LLRGBD: the authors'
            ``get_class_colors``), turned into bytes as theirs, ``uint8(c * 255)`` (truncated); None:
            :func:`cmx_palette`.

    Raises:
        ConfigError: ``class_colors`` is not a list of RGB triples in 0-1 (at most 256).
    """
    if class_colors is None:
        colours = cmx_palette()
    else:
        values = np.asarray(class_colors, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != 3 or len(values) > 256 or not (
                (values >= 0) & (values <= 1)).all():
            raise ConfigError(f'class_colors must be one [r, g, b] of floats in 0-1 per class (the authors\' '
                             f'get_class_colors), got an array of shape {values.shape} with values in '
                             f'[{values.min() if values.size else 0}, {values.max() if values.size else 0}]; '
                             f'fix the experiment\'s config.py or set class_colors=None')
        colours = (values * 255).astype(np.uint8)
    flat = colours.reshape(-1).tolist()
    return flat + [0] * (768 - len(flat))


def save_prediction(pred: np.ndarray, path: str, palette: Optional[List[int]] = None) -> None:
    """Write an H-W class-index map as a palette ('P' mode) PNG: the pixel values are the class indices,
    ``palette`` (:func:`prediction_palette`, default CMX's) colours them."""
    pred = np.ascontiguousarray(pred, dtype=np.uint8)
    img = Image.frombytes('P', (pred.shape[1], pred.shape[0]), pred.tobytes())
    img.putpalette(palette if palette is not None else prediction_palette())
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    img.save(path)


def palette_rgb(class_colors=None) -> np.ndarray:
    """256-3 uint8 RGB colour of each label value (``eval.py -p``'s palette: the dataset's colours, then
    black)."""
    return np.asarray(prediction_palette(class_colors), dtype=np.uint8).reshape(256, 3)


def colour_labels(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """H-W label values (0-255) -> H-W-3 uint8 BGR image in ``palette`` (256-3 RGB) colours."""
    return np.ascontiguousarray(palette[np.asarray(label, dtype=np.uint8)][..., ::-1])


def gamma_lift(rgb: np.ndarray, gamma: float = 2.2) -> np.ndarray:
    """``255 * (rgb / 255) ** (1 / gamma)`` in uint8: dark (low-light, night) images made visible."""
    table = np.round(255 * (np.arange(256) / 255) ** (1 / gamma)).astype(np.uint8)
    return table[rgb]


def overlay(rgb: np.ndarray, classes: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    """The class colours blended over the gamma-lifted image.

    Args:
        rgb: H-W-3 uint8 image, RGB order.
        classes: H-W class ids.
        palette: 768 values, 256 RGB triples (:func:`prediction_palette`).
        alpha: weight of the colours.

    Returns:
        H-W-3 uint8, RGB order.
    """
    colours = np.asarray(palette, dtype=np.uint8).reshape(256, 3)[np.asarray(classes, dtype=np.uint8)]
    blend = (1 - alpha) * gamma_lift(rgb).astype(np.float32) + alpha * colours.astype(np.float32)
    return np.round(blend).astype(np.uint8)
