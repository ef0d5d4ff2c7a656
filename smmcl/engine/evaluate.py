"""Sliding-window, multi-scale evaluation of SMMCL (Dong & Yokoya, WACV 2024), the authors' protocol.

The authors evaluate with CMX's ``engine/evaluator.py`` (``sliding_eval_rgbX`` -> ``scale_process_rgbX``
-> ``process_image_rgbX`` -> ``val_func_process_rgbX``). Per image and per scale ``s`` of
``config.eval_scale_array``:

1. resize RGB and X by ``s`` (``cv2.resize``, INTER_LINEAR, on the uint8 image, as the authors);
2. normalise ``(img / 255 - mean) / std`` (here in float32 on the device) and pad with 0 to at least
   the crop size, ``pad // 2`` before and the rest after (CMX ``pad_image_to_shape``);
3. cut crop-sized windows at stride ``ceil(crop * stride_rate)`` (per dimension), the last one of a row
   / column shifted back to end at the border; one window when the image fits in the crop;
4. score each window: ``exp(logits)``, or with ``eval_flip`` ``exp(logits + flip(logits(flip(input))))``
   (CMX ``val_func_process_rgbX`` ends with ``score = torch.exp(score)`` on the raw logits -- not a
   softmax; it leaves a single window's argmax unchanged but weights the sums of steps 5-6);
5. average the overlapping window scores, remove the pad margins;
6. resize the K-h-w scores back to the image size (bilinear exactly as ``cv2.resize`` INTER_LINEAR, see
   :func:`resize_scores`) and sum over scales; the prediction is the argmax.

Where we differ from CMX, and why (none of it touches SMMCL's settings -- scale 1, crop = image size,
so one forward on the whole image -- where every variant gives the same prediction):

- CMX's single-forward test is ``new_cols <= crop_w or new_rows <= crop_h`` (as we remember their
  code), so an image larger than the crop in one dimension went through the network whole. We slide
  whenever the image does not fit in one crop, in both dimensions.
- CMX's window loop, as we remember it, steps columns by ``stride[0]`` / ``crop_size[0]`` (the row
  values); identical for square crops only. We step each dimension by its own stride and crop.
- CMX sums the overlapping windows without dividing by the count (TorchSeg computed ``count_scale``
  and commented the division out); we average (mmsegmentation's ``slide_inference``). Equal argmax at
  scale 1 (the count is a per-pixel factor); where scores are resized or several scales are summed,
  averaging keeps every window's weight the same at every pixel.
- CMX's sliding branch zero-pads the *raw* image (pad = ``-mean / std`` after normalisation); with
  their single-forward test that branch never needed padding. We pad with 0 after normalisation
  everywhere, as their single-forward branch and the training crops do.
- CMX adds the scales in float64 on the host; we add float32 scores on the device.

:func:`sliding_window_scores_plain` is the reference path (one window per forward, literally the loops
above); :func:`sliding_window_scores` stacks an image's windows and their flipped copies into batches of
``config.eval_batch_size``; the tests show they agree to 1e-5 for a deterministic model. SMMCL's NMF
decoder draws random bases in every forward, one set per batch element: :func:`evaluate_per_image`
seeds the generators per image so runs repeat whatever the number of processes, but another batch size
gives other draws (differences at the level of the NMF noise).
"""
from __future__ import annotations

import logging
import os
import os.path as osp
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Subset

from smmcl.data.transforms import normalize_batch
from smmcl.engine.dist import all_reduce_sum
from smmcl.engine.metrics import confusion_matrix

logger = logging.getLogger(__name__)

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (N-3-h-w, N-3-h-w) -> N-K-h-w logits


# ---------------------------------------------------------------------------------------------------
# Tiling (pure functions)
# ---------------------------------------------------------------------------------------------------


def pad_margins(height: int, width: int, crop: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding that brings an image to at least ``crop`` (CMX
    ``pad_image_to_shape``: ``pad // 2`` before, ``pad // 2 + pad % 2`` after)."""
    pad_h, pad_w = max(crop[0] - height, 0), max(crop[1] - width, 0)
    return pad_h // 2, pad_h // 2 + pad_h % 2, pad_w // 2, pad_w // 2 + pad_w % 2


def window_starts(length: int, crop: int, stride: int) -> List[int]:
    """Start offsets of crop-long windows along one padded dimension of ``length >= crop`` (CMX:
    ``grid = ceil((length - crop) / stride) + 1``, window ``i`` ends at ``min(i * stride + crop, length)``
    and starts ``crop`` before its end)."""
    grid = int(np.ceil((length - crop) / stride)) + 1
    return [min(i * stride + crop, length) - crop for i in range(grid)]


def sliding_windows(pad_rows: int, pad_cols: int, crop: Tuple[int, int], stride_rate: float
                    ) -> List[Tuple[int, int]]:
    """(top, left) of every crop-sized window of a padded ``pad_rows`` x ``pad_cols`` image, row-major.

    Strides are ``int(ceil(crop * stride_rate))`` per dimension; windows cover every pixel and lie
    inside the image (``pad_rows >= crop[0]``, ``pad_cols >= crop[1]``).
    """
    stride_h = int(np.ceil(crop[0] * stride_rate))
    stride_w = int(np.ceil(crop[1] * stride_rate))
    rows = window_starts(pad_rows, crop[0], stride_h)
    cols = window_starts(pad_cols, crop[1], stride_w)
    return [(top, left) for top in rows for left in cols]


# ---------------------------------------------------------------------------------------------------
# Image preparation and resizing
# ---------------------------------------------------------------------------------------------------


def to_input(img, mean, std, device) -> torch.Tensor:
    """uint8 H-W-3 image (numpy or tensor) -> normalised 3-H-W float32 on ``device``.

    The uint8 image travels to the device and is normalised there in float32 (no float64 host copy).
    """
    t = torch.as_tensor(np.ascontiguousarray(img) if isinstance(img, np.ndarray) else img)
    t = t.to(device, non_blocking=True).permute(2, 0, 1)[None]  # 1-3-H-W
    return normalize_batch(t, mean, std)[0]


def _cv2_linear_taps(n_in: int, n_out: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices i0, i1 and weight of i1 for each of ``n_out`` outputs, as ``cv2.resize``
    INTER_LINEAR computes them: scale = 1 / (n_out / n_in) in double, source position rounded to float,
    clamped at both borders."""
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
    """Bilinearly resize K-h-w scores to K-H-W like the authors' ``cv2.resize(..., INTER_LINEAR)``.

    Rows and columns are interpolated separably (columns first, as OpenCV) with OpenCV's own source
    coordinates; on the CPU this matches ``cv2.resize`` to float32 rounding (``F.interpolate`` differs by
    up to ~2e-5 for some size ratios because it computes the coordinates in float32).
    """
    k, h, w = scores.shape
    if (h, w) == tuple(size):
        return scores
    y0, y1, fy = _cv2_linear_taps(h, size[0], scores.device)
    x0, x1, fx = _cv2_linear_taps(w, size[1], scores.device)
    cols = scores[:, :, x0] * (1 - fx) + scores[:, :, x1] * fx  # K-h-W
    return cols[:, y0] * (1 - fy)[:, None] + cols[:, y1] * fy[:, None]  # K-H-W


# ---------------------------------------------------------------------------------------------------
# One scale: sliding windows
# ---------------------------------------------------------------------------------------------------


def _logits(model: Model, rgb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    out = model(rgb, x)
    if out.shape[-2:] != rgb.shape[-2:]:
        raise ValueError(f'model returned {tuple(out.shape)} logits for a {tuple(rgb.shape)} input; '
                         f'expected the input size')
    return out.float()


def _prepare(rgb: torch.Tensor, x: torch.Tensor, crop: Tuple[int, int], stride_rate: float):
    _, h, w = rgb.shape
    margin = pad_margins(h, w, crop)
    top, bottom, left, right = margin
    rgb = F.pad(rgb, (left, right, top, bottom), value=0.0)
    x = F.pad(x, (left, right, top, bottom), value=0.0)
    windows = sliding_windows(rgb.shape[1], rgb.shape[2], crop, stride_rate)
    return rgb, x, margin, windows


class _Canvas:
    """Window scores accumulated over the padded image and averaged where windows overlap."""

    def __init__(self, size: Tuple[int, int], crop: Tuple[int, int]):
        self.size, self.crop = tuple(size), crop
        self.acc = self.count = None

    def add(self, score: torch.Tensor, top: int, left: int) -> None:
        """score: K-crop_h-crop_w at (top, left) of the padded image."""
        if self.acc is None:
            self.acc = score.new_zeros((score.shape[0],) + self.size)
            self.count = score.new_zeros((1,) + self.size)
        rows, cols = slice(top, top + self.crop[0]), slice(left, left + self.crop[1])
        self.acc[:, rows, cols] += score
        self.count[:, rows, cols] += 1

    def scores(self, margin) -> torch.Tensor:
        """K-H-W averaged scores with the padding margins (top, bottom, left, right) removed."""
        top, bottom, left, right = margin
        score = self.acc / self.count
        return score[:, top:score.shape[1] - bottom, left:score.shape[2] - right]


@torch.no_grad()
def sliding_window_scores_plain(model: Model, rgb: torch.Tensor, x: torch.Tensor, crop: Sequence[int],
                                stride_rate: float, flip: bool) -> torch.Tensor:
    """Class scores of one scale, one window per forward (the reference path; CMX's loops).

    Args:
        model: eval-mode ``(rgb, x) -> logits``, N-3-h-w inputs to N-K-h-w outputs.
        rgb, x: 3-H-W normalised float32 images on the model's device.
        crop: (crop_h, crop_w) window size.
        stride_rate: window stride as a fraction of the crop.
        flip: add the horizontally flipped input's flipped logits before the exp.

    Returns:
        K-H-W float32 scores: per window ``exp(logits [+ flipped logits])``, averaged where windows overlap.
    """
    crop = (int(crop[0]), int(crop[1]))
    rgb, x, margin, windows = _prepare(rgb, x, crop, stride_rate)
    canvas = _Canvas(rgb.shape[1:], crop)
    for top, left in windows:
        rgb_w = rgb[None, :, top:top + crop[0], left:left + crop[1]]
        x_w = x[None, :, top:top + crop[0], left:left + crop[1]]
        score = _logits(model, rgb_w, x_w)[0]
        if flip:
            score = score + _logits(model, rgb_w.flip(-1), x_w.flip(-1))[0].flip(-1)
        canvas.add(torch.exp(score), top, left)
    return canvas.scores(margin)


@torch.no_grad()
def sliding_window_scores(model: Model, rgb: torch.Tensor, x: torch.Tensor, crop: Sequence[int],
                          stride_rate: float, flip: bool, batch: int = 1) -> torch.Tensor:
    """:func:`sliding_window_scores_plain` with up to ``batch`` windows (flipped copies included) per forward.

    Inputs are queued window by window (the window, then its flipped copy), so a window's two halves are
    summed in the same order as the plain path before the exp. Same arguments and K-H-W result.
    """
    crop = (int(crop[0]), int(crop[1]))
    batch = max(int(batch), 1)
    rgb, x, margin, windows = _prepare(rgb, x, crop, stride_rate)
    jobs = [(i, flipped) for i in range(len(windows)) for flipped in ((False, True) if flip else (False,))]
    canvas = _Canvas(rgb.shape[1:], crop)
    pending = {}  # window index -> logits summed so far (waiting for its flipped half)
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        rgb_b, x_b = [], []
        for i, flipped in chunk:
            top, left = windows[i]
            r = rgb[:, top:top + crop[0], left:left + crop[1]]
            m = x[:, top:top + crop[0], left:left + crop[1]]
            rgb_b.append(r.flip(-1) if flipped else r)
            x_b.append(m.flip(-1) if flipped else m)
        logits = _logits(model, torch.stack(rgb_b), torch.stack(x_b))  # B-K-crop_h-crop_w
        for (i, flipped), out in zip(chunk, logits):
            out = out.flip(-1) if flipped else out
            pending[i] = pending[i] + out if i in pending else out
            if flipped or not flip:  # this window is complete
                canvas.add(torch.exp(pending.pop(i)), *windows[i])
    return canvas.scores(margin)


# ---------------------------------------------------------------------------------------------------
# One image: all scales
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_scores(model: Model, rgb: np.ndarray, x: np.ndarray, config, device,
                   plain: bool = False) -> torch.Tensor:
    """Scores of one image summed over ``config.eval_scale_array`` (CMX ``sliding_eval_rgbX``).

    Args:
        model: eval-mode model on ``device``.
        rgb, x: H-W-3 uint8 images (numpy or tensors), in the dataset's channel order.
        config: ``eval_scale_array``, ``eval_crop_size``, ``eval_stride_rate``, ``eval_flip``,
            ``eval_batch_size``, ``norm_mean``, ``norm_std``.
        plain: use :func:`sliding_window_scores_plain` (one window per forward).

    Returns:
        K-H-W float32 scores on ``device``.
    """
    rgb = rgb.numpy() if isinstance(rgb, torch.Tensor) else np.asarray(rgb)
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    height, width = rgb.shape[:2]
    crop = tuple(int(c) for c in config.eval_crop_size)
    total = None
    for s in config.eval_scale_array:
        rgb_s, x_s = rgb, x
        if s != 1:  # the authors resize the uint8 images with OpenCV
            rgb_s = cv2.resize(rgb, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
            x_s = cv2.resize(x, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
        rgb_t = to_input(rgb_s, config.norm_mean, config.norm_std, device)
        x_t = to_input(x_s, config.norm_mean, config.norm_std, device)
        if plain:
            score = sliding_window_scores_plain(model, rgb_t, x_t, crop, config.eval_stride_rate,
                                                config.eval_flip)
        else:
            score = sliding_window_scores(model, rgb_t, x_t, crop, config.eval_stride_rate, config.eval_flip,
                                          config.get('eval_batch_size', 1))
        score = resize_scores(score, (height, width))
        total = score if total is None else total + score
    if not bool(torch.isfinite(total).all()):
        # exp of a (flip-summed) logit above ~88 overflows float32, in the authors' evaluator too.
        warnings.warn('non-finite evaluation scores: logits too large for the exp of the authors\' '
                      'protocol; predictions at those pixels are unreliable')
    return total


def predict(model: Model, rgb: np.ndarray, x: np.ndarray, config, device) -> torch.Tensor:
    """H-W int64 prediction (argmax of :func:`predict_scores`) on ``device``."""
    return predict_scores(model, rgb, x, config, device).argmax(0)


# ---------------------------------------------------------------------------------------------------
# Prediction images
# ---------------------------------------------------------------------------------------------------


def class_palette(n: int = 256) -> np.ndarray:
    """n-3 uint8 colours, the PASCAL VOC colour map (CMX ``get_class_colors``): bits of the class index
    spread over the high bits of R, G and B."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def save_prediction(pred: np.ndarray, path: str) -> None:
    """Write an H-W class-index map as a palette ('P' mode) PNG: the pixel values are the class indices,
    the palette colours them."""
    pred = np.ascontiguousarray(pred, dtype=np.uint8)
    img = Image.frombytes('P', (pred.shape[1], pred.shape[0]), pred.tobytes())
    img.putpalette(class_palette().reshape(-1).tolist())
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    img.save(path)


# ---------------------------------------------------------------------------------------------------
# A dataset
# ---------------------------------------------------------------------------------------------------


def _as_item(item):
    return item


def evaluate_per_image(model: torch.nn.Module, dataset, config, device, rank: int = 0, world_size: int = 1,
                       save_dir: Optional[str] = None, num_workers: int = 0) -> np.ndarray:
    """One confusion matrix per item of ``dataset``, computed by the ranks together.

    Rank ``r`` predicts the items ``i`` with ``i % world_size == r``; the N-K-K stack (zeros for the
    other ranks' items) is summed over ranks, so every rank returns all of it. A collective: with a
    process group initialised, every rank must call it.

    SMMCL's decoder draws random NMF bases in every forward (unseeded in the authors' evaluation). Here
    the random generators are seeded with ``config.seed + i`` before item ``i``, so the result does not
    depend on the number of processes or on earlier calls; the caller's generator states are restored
    afterwards (training continues with its own random stream).

    Args:
        model: the segmentor on ``device`` (put in eval mode here, its mode restored after).
        dataset: items ``dict(data=rgb H-W-3 uint8, modal_x=H-W-3 uint8, label=H-W uint8, fn=name)``.
        config: the evaluation settings (see :func:`predict_scores`), ``num_classes``, ``background``.
        device: where the model runs.
        rank, world_size: this process among the evaluating processes.
        save_dir: write each prediction as ``<save_dir>/<fn>.png`` (palette PNG).
        num_workers: DataLoader processes reading the images.

    Returns:
        N-K-K int64 numpy array, rows = ground truth.

    Raises:
        ValueError: an item's label holds values outside ``[0, K)`` other than ``background``, or differs
            in size from its image (the message names the item).
    """
    k = int(config.num_classes)
    ignore = int(config.get('background', 255))
    hists = torch.zeros((len(dataset), k, k), dtype=torch.int64, device=device)
    indices = list(range(rank, len(dataset), world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=None, num_workers=num_workers,
                        collate_fn=_as_item)
    seed = int(config.get('seed', 0))
    device = torch.device(device)
    rng_devices = []
    if device.type == 'cuda':
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
            for index, item in zip(indices, loader):
                torch.manual_seed(seed + index)
                pred = predict(model, item['data'], item['modal_x'], config, device)
                label = torch.as_tensor(np.asarray(item['label'])).to(device)
                try:
                    hists[index] = confusion_matrix(pred, label, k, ignore)
                except ValueError as exc:  # a label value outside the classes, or a label of another size
                    raise ValueError(f"item {item['fn']}: {exc}") from exc
                if save_dir is not None:
                    save_prediction(pred.cpu().numpy(), osp.join(save_dir, f"{item['fn']}.png"))
                logger.debug('rank %d: %s done (%d/%d)', rank, item['fn'], index + 1, len(dataset))
    finally:
        model.train(was_training)
    all_reduce_sum(hists)
    return hists.cpu().numpy()


def evaluate(model: torch.nn.Module, dataset, config, device, rank: int = 0, world_size: int = 1,
             save_dir: Optional[str] = None, num_workers: int = 0) -> np.ndarray:
    """The K-K int64 confusion matrix (rows = ground truth) of ``dataset``, summed over ranks.

    Arguments as :func:`evaluate_per_image`; every rank returns the total.
    """
    return evaluate_per_image(model, dataset, config, device, rank, world_size, save_dir,
                              num_workers).sum(0)
