"""Sliding-window, multi-scale evaluation of SMMCL (Dong & Yokoya, WACV 2024), the authors' protocol.

The authors evaluate with the evaluator they take from CMX (palmdong/SMMCL ``SMMCL_LLRGBD/engine/
evaluator.py``: ``sliding_eval_rgbX`` -> ``scale_process_rgbX`` -> ``process_image_rgbX`` ->
``val_func_process_rgbX``; driven by ``SMMCL_LLRGBD/eval.py`` ``SegEvaluator.func_per_iteration``).
Per image and per scale ``s`` of ``config.eval_scale_array``:

1. resize RGB and X by ``s`` with ``cv2.resize(fx=s, fy=s)``, INTER_LINEAR, on the uint8 images;
2. normalise ``(img / 255 - mean) / std`` in float64 and cast to float32 (their ``normalize`` and
   ``val_func_process_rgbX``);
3. split the scaled image into windows (below); each window's region is padded with zeros *after*
   normalisation to at least the crop size, ``pad // 2`` before and the rest after
   (``pad_image_to_shape`` inside ``process_image_rgbX``);
4. score each window: ``exp(logits)``, or with ``eval_flip`` ``exp(logits + flip(logits(flip(input))))``
   where ``input`` is the padded window (``val_func_process_rgbX`` takes the exp of the raw logits -- not
   a softmax); cut the padding off and add the score to the scale's K-h-w canvas;
5. bring the canvas to the host, ``cv2.resize`` it (float32, INTER_LINEAR) to the image size and add it
   to a float64 sum over scales; the prediction is the argmax (first maximum on ties).

``config.eval_protocol`` picks the window geometry of step 3.

``'authors'`` (default): :func:`authors_windows`, their ``scale_process_rgbX`` exactly:

- one forward on the whole scaled image when *either* side fits the crop (``new_cols <= crop_w or
  new_rows <= crop_h``), so an image larger than the crop in the other dimension goes through whole;
- otherwise a window grid whose counts use each dimension's own stride and crop, but whose loop steps
  columns by the row stride over ``crop_h`` columns and rows by the column stride over ``crop_w`` rows.
  Equal to the intended grid for square crops only. With a non-square crop the windows are
  ``crop_w x crop_h`` (padded to at least the crop), some pixels may be covered by no window (score 0
  there: class 0 unless another scale covers them), and where ``crop_w`` exceeds the rows (or ``crop_h``
  the columns) a window's start is negative, and Python's negative slicing picks the last
  ``crop - length`` rows (columns) of the image;
- overlapping window scores are summed, never divided by their count.

Their sliding branch also pads the *raw* uint8 image to the crop before normalising (which would make
the padding ``-mean / std``), but that branch runs only when both sides exceed the crop, so that pad is
always empty; every pad that takes effect is the zero pad after normalisation of step 3.

``'corrected'``: :func:`corrected_windows`: one forward only when the image fits the crop in both
dimensions; otherwise each dimension is tiled with its own stride and crop (every pixel covered), and
overlapping scores are averaged (mmsegmentation's ``slide_inference``). At scale 1 with a crop of the
image size (SMMCL's shipped settings) both protocols run the same single forward and agree exactly.

Speed, never geometry: ``config.eval_batch_size = B > 1`` runs consecutive windows of one input shape
(and their flipped copies) in one forward; and where each scale of an image is one window without flip
(LLRGBD, MFNet, NYU at their shipped settings), up to B consecutive images of one size (of a rank's
share) go through each scale's forward together. ``config.fast_path`` resizes and sums the scale scores
on the device (:func:`resize_scores`, OpenCV's arithmetic to float32 rounding). Both agree with the
plain path up to float rounding (tests). SMMCL's NMF decoder draws random bases in every forward, one
set per batch element: :func:`evaluate_per_image` seeds the generators per image so runs repeat whatever
the number of processes; batched images get, through the NMF's ``fixed_bases``, exactly the bases each
draws alone, but batched windows of one image draw in one go (another batch size gives other draws:
differences at the level of the NMF noise).
"""
from __future__ import annotations

import logging
import os
import os.path as osp
import warnings
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from smmcl.data.transforms import channel_vector, host_to_device
from smmcl.engine.dist import all_reduce_sum
from smmcl.engine.metrics import check_label, pixel_counts
from smmcl.engine.resize import resize_scores, resize_scores_host
from smmcl.engine.seeding import kept_rng
from smmcl.engine.windows import Window, pad_margins, window_function
from smmcl.models.ham_head import given_bases, nmf_layers
from smmcl.visual import prediction_palette, save_prediction

logger = logging.getLogger(__name__)

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (N-3-h-w, N-3-h-w) -> N-K-h-w logits



# ---------------------------------------------------------------------------------------------------
# Image preparation and resizing
# ---------------------------------------------------------------------------------------------------


def to_input(img, mean, std, device) -> torch.Tensor:
    """uint8 H-W-3 image (numpy or tensor) -> normalised 3-H-W float32 on ``device``.

    ``(img / 255 - mean) / std`` in float64, in that order, then float32: the authors' ``normalize``
    (``SMMCL_LLRGBD/utils/transforms.py``) and cast, bit for bit (IEEE operations round the same on any
    device). The uint8 image travels to the device (:func:`~smmcl.data.transforms.host_to_device`) and is
    normalised there.
    """
    t = host_to_device(img, device).permute(2, 0, 1).double()  # 3-H-W
    mean, std = (channel_vector(v, t.device, torch.float64) for v in (mean, std))
    return ((t / 255.0 - mean) / std).float().contiguous()


# ---------------------------------------------------------------------------------------------------
# One scale: windows
# ---------------------------------------------------------------------------------------------------


def _logits(model: Model, rgb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    out = model(rgb, x)
    if out.shape[-2:] != rgb.shape[-2:]:
        raise ValueError(f'model returned {tuple(out.shape)} logits for a {tuple(rgb.shape)} input; '
                         f'expected the input size')
    return out.float()


def _input_shape(window: Window, crop: Tuple[int, int]) -> Tuple[int, int]:
    top, bottom, left, right = window
    return max(bottom - top, crop[0]), max(right - left, crop[1])


@torch.no_grad()
def window_scores(model: Model, rgb: torch.Tensor, x: torch.Tensor, windows: Sequence[Window],
                  crop: Sequence[int], flip: bool, batch: int = 1, average: bool = False) -> torch.Tensor:
    """Class scores of one scale from its windows, for one image or a stack of same-size images.

    Each window's region of ``rgb`` / ``x`` is zero-padded to at least the crop (:func:`pad_margins`),
    scored ``exp(logits [+ flip(logits(flip(input)))])``, cut back to the region and added to a K-h-w
    canvas in window order. Inputs are taken image by image, window by window (then its flipped copy);
    with ``batch > 1`` consecutive inputs of one shape share a forward; ``batch=1`` is one input per
    forward, the authors' loop.

    Args:
        model: eval-mode ``(rgb, x) -> logits``, N-3-h-w inputs to N-K-h-w outputs.
        rgb, x: 3-h-w normalised float32 images on the model's device, or N-3-h-w stacks of them.
        windows: (top, bottom, left, right) regions (:func:`authors_windows`, :func:`corrected_windows`).
        crop: (crop_h, crop_w).
        flip: add the horizontally flipped input's flipped logits before the exp.
        batch: inputs per forward.
        average: divide by the number of windows covering each pixel (else the authors' plain sum;
            pixels no window covers keep 0).

    Returns:
        K-h-w (N-K-h-w for stacked inputs) float32 scores on the device of ``rgb``.
    """
    stacked = rgb.dim() == 4
    rgb, x = (rgb, x) if stacked else (rgb[None], x[None])
    crop = (int(crop[0]), int(crop[1]))
    height, width = rgb.shape[-2:]
    jobs = [(n, i, flipped) for n in range(len(rgb)) for i in range(len(windows))
            for flipped in ((False, True) if flip else (False,))]
    canvas = None
    count = rgb.new_zeros((1, height, width))
    pending = {}  # (image, window) -> logits summed so far (waiting for its flipped half)
    for chunk in _runs_of_one_shape(jobs, [_input_shape(windows[i], crop) for _, i, _ in jobs], batch):
        logits = _logits(model, torch.stack([_window_input(rgb[n], windows[i], crop, f) for n, i, f in chunk]),
                         torch.stack([_window_input(x[n], windows[i], crop, f) for n, i, f in chunk]))
        for (n, i, flipped), out in zip(chunk, logits):  # out: K-h'-w'
            out = out.flip(-1) if flipped else out
            pending[n, i] = pending[n, i] + out if (n, i) in pending else out
            if flipped or not flip:  # this window is complete
                score = _unpadded(torch.exp(pending.pop((n, i))), windows[i], crop)
                if canvas is None:
                    canvas = score.new_zeros((len(rgb), score.shape[0], height, width))
                top, bottom, left, right = windows[i]
                canvas[n, :, top:bottom, left:right] += score
                if n == 0:  # every image has the same windows
                    count[:, top:bottom, left:right] += 1
    out = canvas / count if average else canvas
    return out if stacked else out[0]


def _window_input(img: torch.Tensor, window: Window, crop: Tuple[int, int], flipped: bool) -> torch.Tensor:
    """3-h'-w': ``window`` of the 3-h-w image zero-padded to at least ``crop`` (:func:`pad_margins`),
    flipped horizontally when ``flipped``."""
    top, bottom, left, right = window
    pad_t, pad_b, pad_l, pad_r = pad_margins(bottom - top, right - left, crop)
    out = F.pad(img[:, top:bottom, left:right], (pad_l, pad_r, pad_t, pad_b), value=0.0)
    return out.flip(-1) if flipped else out


def _unpadded(score: torch.Tensor, window: Window, crop: Tuple[int, int]) -> torch.Tensor:
    """The K-h-w part of a padded window's K-h'-w' score that covers the window itself."""
    top, bottom, left, right = window
    pad_t, _, pad_l, _ = pad_margins(bottom - top, right - left, crop)
    return score[:, pad_t:pad_t + bottom - top, pad_l:pad_l + right - left]


def _runs_of_one_shape(jobs: Sequence, shapes: Sequence, batch: int):
    """``jobs`` cut into consecutive runs of at most ``batch`` (at least 1) with one input shape each."""
    batch, start = max(int(batch), 1), 0
    while start < len(jobs):
        stop = start + 1
        while stop < len(jobs) and stop - start < batch and shapes[stop] == shapes[start]:
            stop += 1
        yield jobs[start:stop]
        start = stop


# ---------------------------------------------------------------------------------------------------
# One image: all scales
# ---------------------------------------------------------------------------------------------------


def scaled_inputs(rgb, x, config, device) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Steps 1-2 of the protocol: per scale of ``config.eval_scale_array``, the (rgb, x) pair resized
    from the H-W-3 uint8 images (numpy or tensors) and normalised to 3-h_s-w_s float32 on ``device``."""
    rgb = rgb.numpy() if isinstance(rgb, torch.Tensor) else np.asarray(rgb)
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    inputs = []
    for s in config.eval_scale_array:
        # their sliding_eval_rgbX (SMMCL_LLRGBD/engine/evaluator.py) resizes both images at every scale,
        # INTER_LINEAR for a 3-channel modal_x (their RGBXDataset merges the one-channel X into three, so
        # its INTER_NEAREST branch for a 2-D one never runs); at scale 1 OpenCV returns the same pixels
        # (test), so that copy is skipped: host time, not a number
        pair = (img if s == 1 else cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
                for img in (rgb, x))
        inputs.append(tuple(to_input(img, config.norm_mean, config.norm_std, device) for img in pair))
    return inputs


def scale_windows(config, height: int, width: int) -> List[Window]:
    """The windows ``config.eval_protocol`` cuts a scaled ``height`` x ``width`` image into.

    Raises:
        ConfigError: an unknown ``config.eval_protocol``.
    """
    crop = tuple(int(c) for c in config.eval_crop_size)
    return window_function(config.eval_protocol)(height, width, crop, config.eval_stride_rate)


def scale_scores(model: Model, rgb: torch.Tensor, x: torch.Tensor, config) -> torch.Tensor:
    """:func:`window_scores` of one scale as ``config`` sets it (protocol, crop, flip, batch): 3-h-w
    (N-3-h-w) inputs -> K-h-w (N-K-h-w) float32 scores."""
    return window_scores(model, rgb, x, scale_windows(config, *rgb.shape[-2:]), config.eval_crop_size,
                         config.eval_flip, config.eval_batch_size, config.eval_protocol == 'corrected')


def sum_scales(scores: Sequence[torch.Tensor], size: Tuple[int, int], config) -> torch.Tensor:
    """Step 5: one image's K-h_s-w_s scale scores resized to ``size`` (H, W) and summed in float64.

    Returns:
        K-H-W float64: on the CPU, resized and summed on the host with OpenCV as the authors; with
        ``config.fast_path`` on the scores' device, resized there (equal to float32 rounding).
    """
    if config.fast_path:
        return sum(resize_scores(score, size).double() for score in scores)
    # H-W-K float32 from OpenCV, added into float64 as theirs
    total = sum(resize_scores_host(score, size).astype(np.float64) for score in scores)
    return torch.from_numpy(np.ascontiguousarray(total.transpose(2, 0, 1)))


def warn_unless_finite(finite: torch.Tensor) -> None:
    """Warn when scores were not all finite; ``finite``: a 0-dim bool (``torch.isfinite(scores).all()``).
    The one host read of the check: evaluation makes it once, after the last image."""
    if not bool(finite):
        # exp of a (flip-summed) logit above ~88 overflows float32, in the authors' evaluator too.
        warnings.warn('non-finite evaluation scores: logits too large for the exp of the authors\' '
                      'protocol; predictions at those pixels are unreliable')


def image_scores(model: Model, inputs: Sequence[Tuple[torch.Tensor, torch.Tensor]], size: Tuple[int, int],
                 config) -> torch.Tensor:
    """K-H-W float64 scores of one image from its :func:`scaled_inputs` (steps 3-5), H-W = ``size``."""
    return sum_scales([scale_scores(model, rgb, x, config) for rgb, x in inputs], size, config)


@torch.no_grad()
def predict_scores(model: Model, rgb: np.ndarray, x: np.ndarray, config, device) -> torch.Tensor:
    """Scores of one image summed over ``config.eval_scale_array`` (the authors' ``sliding_eval_rgbX``).

    Args:
        model: eval-mode model on ``device``.
        rgb, x: H-W-3 uint8 images (numpy or tensors), in the dataset's channel order.
        config: ``eval_scale_array``, ``eval_crop_size``, ``eval_stride_rate``, ``eval_flip``,
            ``eval_protocol``, ``eval_batch_size``, ``fast_path``, ``norm_mean``, ``norm_std``.

    Returns:
        K-H-W float64 scores (:func:`sum_scales`: on the CPU, or with ``config.fast_path`` on ``device``).

    Raises:
        ConfigError: an unknown ``config.eval_protocol``.
    """
    inputs = scaled_inputs(rgb, x, config, device)
    scores = image_scores(model, inputs, tuple(rgb.shape[:2]), config)
    warn_unless_finite(torch.isfinite(scores).all())
    return scores


def predict(model: Model, rgb: np.ndarray, x: np.ndarray, config, device) -> torch.Tensor:
    """H-W int64 prediction, the argmax of :func:`predict_scores` (the first maximum on ties, as
    ``numpy.argmax``), on the scores' device."""
    return predict_scores(model, rgb, x, config, device).argmax(0)


# ---------------------------------------------------------------------------------------------------
# A dataset
# ---------------------------------------------------------------------------------------------------


def _as_item(item):
    return item


def seed_item(config, index: int) -> None:
    """Seed the random generators for item ``index`` of a sequence: ``config.seed + index``.

    SMMCL's decoder draws random NMF bases in every forward (unseeded in the authors' evaluation); seeding
    per item makes a prediction independent of the number of processes and of earlier calls, and
    ``predict.py`` gives the image at position ``index`` what ``eval.py`` gives it.
    """
    torch.manual_seed(int(config.seed) + int(index))


def eval_workers(config) -> int:
    """DataLoader processes for evaluation: ``config.num_workers``, at most 4 (image reading only; 4
    keep a GPU busy) and at most the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return min(int(config.num_workers), 4, cpus)


def _whole_images_batch(inputs: Sequence[Tuple[torch.Tensor, torch.Tensor]], config) -> bool:
    """Whether an image with these :func:`scaled_inputs` may share forwards with other images: each
    scale is one window without flip, so each forward scores one image and draws one image's bases."""
    return (int(config.eval_batch_size) > 1 and not config.eval_flip
            and all(len(scale_windows(config, *rgb.shape[-2:])) == 1 for rgb, _ in inputs))


def _drawn_bases(layers, config, index: int, device) -> List[List[torch.Tensor]]:
    """[scale][NMF] the S-D-R bases the one-image path draws for item ``index`` (``layers``:
    :func:`~smmcl.models.ham_head.nmf_layers`): seeded by :func:`seed_item`, then per scale in order one
    forward, which draws once per NMF (random numbers are the same whether drawn in or outside it)."""
    seed_item(config, index)
    return [[nmf.draw_bases(1, channels, device) for nmf, channels in layers]
            for _ in config.eval_scale_array]


def _group_scores(model: Model, group, config, device) -> List[Tuple[int, dict, torch.Tensor]]:
    """``(index, item, K-H-W float64 scores)`` of each ``(index, item, size, inputs)`` of ``group``
    (same-size images, each one window per scale, at most ``eval_batch_size``): one forward per scale on
    the stacked inputs, every image with the NMF bases of its own one-image forward (:func:`_drawn_bases`).
    """
    layers = nmf_layers(model)
    drawn = [_drawn_bases(layers, config, index, device) for index, *_ in group]  # [image][scale][NMF]
    per_scale = []  # [scale] N-K-h_s-w_s
    for s in range(len(config.eval_scale_array)):
        rgb = torch.stack([inputs[s][0] for *_, inputs in group])
        x = torch.stack([inputs[s][1] for *_, inputs in group])
        bases = [torch.cat([image[s][j] for image in drawn]) for j in range(len(layers))]
        with given_bases(model, bases):
            per_scale.append(scale_scores(model, rgb, x, config))
    return [(index, item, sum_scales([scores[n] for scores in per_scale], size, config))
            for n, (index, item, size, _) in enumerate(group)]


def item_scores(model: Model, items, config, device) -> Iterator[Tuple[int, dict, torch.Tensor]]:
    """``(index, item, K-H-W float64 scores)`` for each ``(index, item)`` of ``items``.

    Item ``index`` is scored as :func:`seed_item` then :func:`predict_scores`; where that is the same
    function (:func:`_whole_images_batch`), up to ``eval_batch_size`` consecutive items of one size share
    each forward (:func:`_group_scores`), yielded when their group is complete.
    """
    group, key = [], None
    for index, item in items:
        size = tuple(item['data'].shape[:2])
        inputs = scaled_inputs(item['data'], item['modal_x'], config, device)
        batched = _whole_images_batch(inputs, config)
        item_key = (size, [(rgb.shape, x.shape) for rgb, x in inputs])
        if group and (not batched or item_key != key or len(group) == int(config.eval_batch_size)):
            yield from _group_scores(model, group, config, device)
            group = []
        if batched:
            group.append((index, item, size, inputs))
            key = item_key
        else:
            seed_item(config, index)
            yield index, item, image_scores(model, inputs, size, config)
    if group:
        yield from _group_scores(model, group, config, device)


def evaluate_per_image(model: torch.nn.Module, dataset, config, device, rank: int = 0, world_size: int = 1,
                       save_dir: Optional[str] = None, num_workers: int = 0) -> np.ndarray:
    """One confusion matrix per item of ``dataset``, computed by the ranks together.

    Rank ``r`` predicts the items ``i`` with ``i % world_size == r``; the N-K-K stack (zeros for the
    other ranks' items) is summed over ranks, so every rank returns all of it. A collective: with a
    process group initialised, every rank must call it.

    Item ``i`` is predicted after :func:`seed_item` (``config.seed + i``: the NMF's random bases), so the
    result does not depend on the number of processes or on earlier calls; the caller's generator states
    are restored afterwards (:func:`kept_rng`: training continues with its own random stream). With
    ``config.eval_batch_size > 1`` whole images share forwards where each is one window per scale without
    flip, each with the bases it draws alone (module docstring).

    Args:
        model: the segmentor on ``device`` (put in eval mode here, its mode restored after).
        dataset: items ``dict(data=rgb H-W-3 uint8, modal_x=H-W-3 uint8, label=H-W uint8, fn=name)``.
        config: the evaluation settings (see :func:`predict_scores`), ``num_classes``, ``background``,
            ``class_colors``.
        device: where the model runs.
        rank, world_size: this process among the evaluating processes.
        save_dir: write each prediction as ``<save_dir>/<fn>.png`` (palette PNG, ``config.class_colors``).
        num_workers: DataLoader processes reading the images (:func:`eval_workers`).

    Returns:
        N-K-K int64 numpy array, rows = ground truth.

    Raises:
        ValueError: an item's label holds values outside ``[0, K)`` other than ``background``, or differs
            in size from its image (the message names the item).
    """
    k = int(config.num_classes)
    hists = torch.zeros((len(dataset), k, k), dtype=torch.int64, device=device)
    save = (save_dir, prediction_palette(config.class_colors)) if save_dir is not None else None
    indices = list(range(rank, len(dataset), world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=None, num_workers=num_workers,
                        collate_fn=_as_item)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), kept_rng(device):
            _count_items(model, zip(indices, loader), config, device, hists, save)
    finally:
        model.train(was_training)
    all_reduce_sum(hists)
    return hists.cpu().numpy()


def _count_items(model: Model, items, config, device, hists: torch.Tensor,
                 save: Optional[Tuple[str, List[int]]]) -> None:
    """Fill ``hists[index]`` (N-K-K, on ``device``) with the confusion matrix of each ``(index, item)``
    of ``items``; warn once if any scores were not finite (read after the last image)."""
    finite = []  # per image a 0-dim bool on the scores' device
    for index, item, scores in item_scores(model, items, config, device):
        hists[index] = _score_item(item, scores.argmax(0), config, save)
        finite.append(torch.isfinite(scores).all())
        logger.debug('%s queued (%d/%d)', item['fn'], index + 1, len(hists))
    if finite:
        warn_unless_finite(torch.stack(finite).all())


def _score_item(item, pred: torch.Tensor, config, save: Optional[Tuple[str, List[int]]]) -> torch.Tensor:
    """The K-K confusion matrix of one item's H-W prediction ``pred``, on its device; with ``save`` =
    (folder, palette) its palette PNG.

    The label is checked on the host, where it was read, and counted on the device (:func:`pixel_counts`):
    without saving, nothing waits for the GPU here, so the host prepares the next images while the
    forwards run.
    """
    k, ignore = int(config.num_classes), int(config.background)
    try:
        check_label(item['label'], pred.shape, k, ignore)
    except ValueError as exc:  # a label value outside the classes, or a label of another size
        raise ValueError(f"item {item['fn']}: {exc}") from exc
    if save is not None:
        save_prediction(pred.cpu().numpy(), osp.join(save[0], f"{item['fn']}.png"), save[1])
    return pixel_counts(pred, host_to_device(item['label'], pred.device), k, ignore)


def evaluate(model: torch.nn.Module, dataset, config, device, rank: int = 0, world_size: int = 1,
             save_dir: Optional[str] = None, num_workers: int = 0) -> np.ndarray:
    """The K-K int64 confusion matrix (rows = ground truth) of ``dataset``, summed over ranks.

    Arguments as :func:`evaluate_per_image`; every rank returns the total.
    """
    return evaluate_per_image(model, dataset, config, device, rank, world_size, save_dir,
                              num_workers).sum(0)
