"""Where the evaluator's windows go: the geometry of ``config.eval_protocol`` (pure functions).

``'authors'``: :func:`authors_windows`, their CMX ``scale_process_rgbX`` exactly, quirks included;
``'corrected'``: :func:`corrected_windows`, mmsegmentation's ``slide_inference`` tiling (see
:mod:`smmcl.engine.evaluate` for the whole protocol). A window is (top, bottom, left, right) of the
scaled image.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import numpy as np

from smmcl.choices import EVAL_PROTOCOLS
from smmcl.config import check_choice

Window = Tuple[int, int, int, int]  # (top, bottom, left, right) region of the scaled image


def pad_margins(height: int, width: int, crop: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding that brings an image to at least ``crop`` (CMX
    ``pad_image_to_shape``: ``pad // 2`` before, ``pad // 2 + pad % 2`` after)."""
    pad_h, pad_w = max(crop[0] - height, 0), max(crop[1] - width, 0)
    return pad_h // 2, pad_h // 2 + pad_h % 2, pad_w // 2, pad_w // 2 + pad_w % 2


def _stride(crop: int, stride_rate: float) -> int:
    return int(np.ceil(crop * stride_rate))


def _grid(length: int, crop: int, stride: int) -> int:
    """Number of windows along a dimension of ``length > crop`` (CMX ``r_grid`` / ``c_grid``)."""
    return int(np.ceil((length - crop) / stride)) + 1


def _slice_start(start: int, length: int) -> int:
    """The first index ``array[start:...]`` reads along a dimension of ``length`` (a negative start
    counts from the end, clamped at 0)."""
    return slice(start, None).indices(length)[0]


def authors_windows(height: int, width: int, crop: Sequence[int], stride_rate: float) -> List[Window]:
    """Windows of the authors' ``scale_process_rgbX`` over a ``height`` x ``width`` scaled image.

    Args:
        height, width: the scaled image.
        crop: (crop_h, crop_w).
        stride_rate: stride as a fraction of the crop, ``ceil``-ed per dimension.

    Returns:
        (top, bottom, left, right) regions, rows outer, in their loop order: the whole image when either
        side fits the crop; otherwise their grid with rows and columns' stride / crop swapped inside the
        loop (module docstring). Regions may be smaller than the crop (they are padded for the
        forward) or larger in one dimension, and need not cover the image.
    """
    crop_h, crop_w = int(crop[0]), int(crop[1])
    if width <= crop_w or height <= crop_h:
        return [(0, height, 0, width)]
    stride_h, stride_w = _stride(crop_h, stride_rate), _stride(crop_w, stride_rate)
    windows = []
    for i in range(_grid(height, crop_h, stride_h)):
        # Rows advance by the *column* stride and span crop_w rows (CMX's s_y / e_y).
        bottom = min(i * stride_w + crop_w, height)
        top = _slice_start(bottom - crop_w, height)
        for j in range(_grid(width, crop_w, stride_w)):
            # Columns advance by the *row* stride and span crop_h columns (CMX's s_x / e_x).
            right = min(j * stride_h + crop_h, width)
            left = _slice_start(right - crop_h, width)
            windows.append((top, bottom, left, right))
    return windows


def window_starts(length: int, crop: int, stride: int) -> List[int]:
    """Start offsets of crop-long windows along a dimension of ``length >= crop``: window ``i`` ends at
    ``min(i * stride + crop, length)`` and starts ``crop`` before its end."""
    return [min(i * stride + crop, length) - crop for i in range(_grid(length, crop, stride))]


def corrected_windows(height: int, width: int, crop: Sequence[int], stride_rate: float) -> List[Window]:
    """Windows of ``eval_protocol='corrected'``: arguments and result as :func:`authors_windows`.

    Each dimension on its own: a dimension that fits the crop is one span (padded for the forward);
    a longer one is tiled by crop-long spans at ``ceil(crop * stride_rate)``, the last ending at the
    border. Every pixel is covered; one window only when the image fits the crop in both dimensions.
    """
    def spans(length, size):
        if length <= size:
            return [(0, length)]
        return [(s, s + size) for s in window_starts(length, size, _stride(size, stride_rate))]

    return [(top, bottom, left, right) for top, bottom in spans(height, int(crop[0]))
            for left, right in spans(width, int(crop[1]))]


def window_function(protocol: str) -> Callable[..., List[Window]]:
    """The window geometry of ``config.eval_protocol``.

    Raises:
        ConfigError: ``protocol`` is not one of :data:`EVAL_PROTOCOLS`.
    """
    check_choice('eval_protocol', protocol, EVAL_PROTOCOLS)
    return authors_windows if protocol == 'authors' else corrected_windows
