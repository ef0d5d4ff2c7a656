"""OpenCV's bilinear resize of class scores, exactly: the authors' evaluator brings each scale's K-h-w
scores to the image size with ``cv2.resize`` (float32, INTER_LINEAR) on the host;
:func:`resize_scores` computes the same arithmetic on any device (the fast path keeps the scores
there), :func:`resize_scores_host` is their call.
"""
from __future__ import annotations

import functools
from typing import Tuple

import cv2
import numpy as np
import torch


@functools.lru_cache(maxsize=64)
def _cv2_linear_taps(n_in: int, n_out: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices i0, i1 and weight of i1 for each of ``n_out`` outputs, as ``cv2.resize``
    INTER_LINEAR computes them: scale = 1 / (n_out / n_in) in double, source position rounded to float,
    clamped at both borders. Made once per sizes and device: each copy to a GPU from pageable memory
    would wait for the work queued before it."""
    scale = 1.0 / (n_out / n_in)
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).to(torch.float32)
    i0 = torch.floor(src)
    frac = src - i0
    i0 = i0.long()
    frac = torch.where((i0 < 0) | (i0 >= n_in - 1), torch.zeros_like(frac), frac)
    i0 = i0.clamp(0, n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0.to(device), i1.to(device), frac.to(device)


def resize_scores(scores: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize K-h-w scores to K-H-W like the authors' ``cv2.resize(..., INTER_LINEAR)``, on
    the scores' device (the ``fast_path`` resize).

    Rows and columns are interpolated separably (columns first, as OpenCV) with OpenCV's own source
    coordinates; on the CPU this matches ``cv2.resize`` to float32 rounding (``F.interpolate`` differs by
    up to ~2e-5 for some size ratios because it computes the coordinates in float32).
    """
    k, h, w = scores.shape
    if (h, w) == tuple(size):
        return scores
    y0, y1, fy = _cv2_linear_taps(h, int(size[0]), scores.device)
    x0, x1, fx = _cv2_linear_taps(w, int(size[1]), scores.device)
    cols = scores[:, :, x0] * (1 - fx) + scores[:, :, x1] * fx  # K-h-W
    return cols[:, y0] * (1 - fy)[:, None] + cols[:, y1] * fy[:, None]  # K-H-W


def resize_scores_host(scores: torch.Tensor, size: Tuple[int, int]) -> np.ndarray:
    """K-h-w scores (any device) -> H-W-K float32 numpy, ``cv2.resize`` INTER_LINEAR as the authors'
    ``scale_process_rgbX`` (OpenCV copies an image of the target size unchanged)."""
    hwk = np.ascontiguousarray(scores.permute(1, 2, 0).float().cpu().numpy())
    if hwk.shape[:2] == tuple(size):
        return hwk
    out = cv2.resize(hwk, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)
    return out.reshape(int(size[0]), int(size[1]), -1)  # OpenCV drops a single channel's axis
