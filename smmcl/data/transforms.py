"""Training augmentation of SMMCL (Dong & Yokoya, WACV 2024): the authors' pipeline and a fast equivalent.

The authors' ``TrainPre`` (CMX ``dataloader/dataloader.py``, helpers from CMX ``utils/transforms.py``)
turns a uint8 H-W-3 RGB image, a uint8 H-W label and a uint8 H-W-3 X image into a training sample:

    random mirror -> random scale -> normalise (float64) -> random crop, padded to the crop size -> C-H-W

with the crop size ``(config.image_height, config.image_width)``, pad value 0 for the images (after
normalisation, so pads are 0 in normalised space) and 255 (ignore) for the label. All randomness comes
from Python's ``random`` module, so seeding ``random`` reproduces a sample (PyTorch seeds ``random`` in
each DataLoader worker).

:func:`train_transform_plain` is that pipeline, verbatim. :func:`train_transform` computes the same function
faster: mirror, scale and crop run on uint8 (normalisation is per pixel, so it commutes with cropping and
padding), the dataset hands uint8 C-H-W tensors and the valid (unpadded) box to the device, and
:func:`normalize_batch` normalises the batch there and zeroes the pad area. The tests show
``normalize_batch(train_transform(...))`` equals ``train_transform_plain(...)`` to 1e-5 for the same seed.
"""
from __future__ import annotations

import functools
import random
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------
# The authors' helpers (CMX utils/transforms.py), unchanged in behaviour.
# ---------------------------------------------------------------------------------------------------


def normalize(img: np.ndarray, mean, std) -> np.ndarray:
    """CMX ``normalize``: ``(img / 255 - mean) / std`` in float64 over the last (channel) axis.

    ``mean`` / ``std`` are the ImageNet values in RGB order; the authors apply them to BGR-ordered
    images (see ``smmcl.data.dataset``), and so do we.
    """
    img = img.astype(np.float64) / 255.0
    img = img - mean
    img = img / std
    return img


def random_mirror(rgb: np.ndarray, gt: np.ndarray, x: np.ndarray):
    """CMX ``random_mirror``: flip all three horizontally when ``random.random() >= 0.5``."""
    if random.random() >= 0.5:
        rgb = cv2.flip(rgb, 1)
        gt = cv2.flip(gt, 1)
        x = cv2.flip(x, 1)
    return rgb, gt, x


def random_scale(rgb: np.ndarray, gt: np.ndarray, x: np.ndarray, scales: Sequence[float]):
    """CMX ``random_scale``: one ``random.choice(scales)``; bilinear for the images, nearest for the label."""
    scale = random.choice(scales)
    sh = int(rgb.shape[0] * scale)
    sw = int(rgb.shape[1] * scale)
    rgb = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_LINEAR)
    gt = cv2.resize(gt, (sw, sh), interpolation=cv2.INTER_NEAREST)
    x = cv2.resize(x, (sw, sh), interpolation=cv2.INTER_LINEAR)
    return rgb, gt, x, scale


def generate_random_crop_pos(ori_size: Tuple[int, int], crop_size: Tuple[int, int]) -> Tuple[int, int]:
    """CMX ``generate_random_crop_pos``: top-left corner of the crop.

    Faithful to the authors: ``random.randint`` includes its upper bound, so ``h - crop_h + 1`` can be
    drawn; that crop then holds ``crop_h - 1`` image rows and one row of padding at the bottom (same for
    the width).
    """
    h, w = ori_size
    crop_h, crop_w = crop_size
    pos_h, pos_w = 0, 0
    if h > crop_h:
        pos_h = random.randint(0, h - crop_h + 1)
    if w > crop_w:
        pos_w = random.randint(0, w - crop_w + 1)
    return pos_h, pos_w


def pad_image_to_shape(img: np.ndarray, shape: Tuple[int, int], border_mode: int, value):
    """CMX ``pad_image_to_shape``: constant-pad to ``shape``; ``pad // 2`` top/left, the rest bottom/right.

    Returns:
        the padded image and ``margin`` = [top, bottom, left, right].
    """
    pad_height = max(shape[0] - img.shape[0], 0)
    pad_width = max(shape[1] - img.shape[1], 0)
    margin = np.array([pad_height // 2, pad_height // 2 + pad_height % 2,
                       pad_width // 2, pad_width // 2 + pad_width % 2], dtype=np.int64)
    img = cv2.copyMakeBorder(img, int(margin[0]), int(margin[1]), int(margin[2]), int(margin[3]),
                             border_mode, value=value)
    return img, margin


def random_crop_pad_to_shape(img: np.ndarray, crop_pos: Tuple[int, int], crop_size: Tuple[int, int],
                             pad_label_value):
    """CMX ``random_crop_pad_to_shape``: slice the crop at ``crop_pos``, then pad it to ``crop_size``."""
    h, w = img.shape[:2]
    start_h, start_w = crop_pos
    assert 0 <= start_h < h and 0 <= start_w < w
    crop_h, crop_w = crop_size
    img_crop = img[start_h:start_h + crop_h, start_w:start_w + crop_w, ...]
    return pad_image_to_shape(img_crop, crop_size, cv2.BORDER_CONSTANT, pad_label_value)


def crop_size_of(config) -> Tuple[int, int]:
    """The training crop ``(image_height, image_width)``."""
    return int(config.image_height), int(config.image_width)


# ---------------------------------------------------------------------------------------------------
# The two pipelines.
# ---------------------------------------------------------------------------------------------------


def train_transform_plain(rgb: np.ndarray, gt: np.ndarray, x: np.ndarray, config):
    """The authors' ``TrainPre.__call__`` (CMX ``dataloader/dataloader.py``), float64 throughout.

    Args:
        rgb, x: uint8 H-W-3 images; gt: uint8 H-W label.
        config: uses ``train_scale_array`` (None: no scaling), ``norm_mean``, ``norm_std``,
            ``image_height``, ``image_width``.

    Returns:
        rgb 3-h-w float64 (normalised, pads 0), gt h-w uint8 (pads 255), x 3-h-w float64, where
        (h, w) is the crop size.
    """
    rgb, gt, x = random_mirror(rgb, gt, x)
    if config.train_scale_array is not None:
        rgb, gt, x, _ = random_scale(rgb, gt, x, config.train_scale_array)
    rgb = normalize(rgb, config.norm_mean, config.norm_std)
    x = normalize(x, config.norm_mean, config.norm_std)
    crop_size = crop_size_of(config)
    crop_pos = generate_random_crop_pos(gt.shape[:2], crop_size)
    p_rgb, _ = random_crop_pad_to_shape(rgb, crop_pos, crop_size, 0)
    p_gt, _ = random_crop_pad_to_shape(gt, crop_pos, crop_size, 255)
    p_x, _ = random_crop_pad_to_shape(x, crop_pos, crop_size, 0)
    return p_rgb.transpose(2, 0, 1), p_gt, p_x.transpose(2, 0, 1)


def train_transform(rgb: np.ndarray, gt: np.ndarray, x: np.ndarray, config):
    """:func:`train_transform_plain` without the normalisation, which :func:`normalize_batch` does later.

    Draws the same random numbers in the same order, so for the same ``random`` state
    ``normalize_batch(rgb[None], mean, std, valid_box[None])`` equals the plain output.

    Args:
        rgb, x: uint8 H-W-3 images; gt: uint8 H-W label; config: as for :func:`train_transform_plain`.

    Returns:
        rgb uint8 3-h-w tensor (pads 0), gt int64 h-w tensor (pads 255), x uint8 3-h-w tensor (pads 0),
        valid_box int64 tensor [top, bottom, left, right]: rows ``top:bottom`` and columns
        ``left:right`` of the crop hold image pixels, the rest is padding.
    """
    rgb, gt, x = random_mirror(rgb, gt, x)
    if config.train_scale_array is not None:
        rgb, gt, x, _ = random_scale(rgb, gt, x, config.train_scale_array)
    crop_h, crop_w = crop_size_of(config)
    pos_h, pos_w = generate_random_crop_pos(gt.shape[:2], (crop_h, crop_w))
    # The crop slice, then the authors' centred padding (pad // 2 before, the rest after).
    h = min(crop_h, gt.shape[0] - pos_h)
    w = min(crop_w, gt.shape[1] - pos_w)
    top, left = (crop_h - h) // 2, (crop_w - w) // 2
    src = (slice(pos_h, pos_h + h), slice(pos_w, pos_w + w))
    dst = (slice(top, top + h), slice(left, left + w))

    def crop_image(img):  # H-W-3 uint8 -> 3-crop_h-crop_w uint8, zero pads
        out = np.zeros((3, crop_h, crop_w), dtype=np.uint8)
        out[(slice(None),) + dst] = img[src].transpose(2, 0, 1)
        return torch.from_numpy(out)

    p_gt = np.full((crop_h, crop_w), 255, dtype=np.uint8)
    p_gt[dst] = gt[src]
    valid_box = torch.tensor([top, top + h, left, left + w], dtype=torch.int64)
    return crop_image(rgb), torch.from_numpy(p_gt).long(), crop_image(x), valid_box


def host_to_device(array, device) -> torch.Tensor:
    """A host array (numpy, or a CPU tensor) as a tensor on ``device``, without making the host wait.

    On CUDA the copy goes through pinned memory, non-blocking: a copy from pageable memory first waits
    for all the work queued on the stream (the forward before it), so the host could not prepare the
    next inputs while the GPU computes. Elsewhere a plain copy.
    """
    t = torch.as_tensor(np.ascontiguousarray(array) if isinstance(array, np.ndarray) else array)
    device = torch.device(device)
    if device.type == 'cuda' and t.device.type == 'cpu':
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def channel_vector(values, device, dtype: torch.dtype) -> torch.Tensor:
    """C-1-1 tensor of per-channel ``values`` (a sequence of floats, e.g. ``config.norm_mean``) in
    ``dtype`` on ``device``, made once per values, device and dtype: a new small tensor at every image
    or batch would be one more copy to the GPU, which waits for all the work queued before it."""
    return _channel_vector(tuple(float(v) for v in np.ravel(values)), torch.device(device), dtype)


@functools.lru_cache(maxsize=32)
def _channel_vector(values: Tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return host_to_device(torch.tensor(values, dtype=torch.float64).to(dtype).view(-1, 1, 1), device)


def normalize_batch(imgs: torch.Tensor, mean, std, valid_box: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(imgs / 255 - mean) / std`` per channel, and 0 outside each image's valid box.

    Args:
        imgs: N-3-H-W uint8 (or float 0..255) tensor on any device.
        mean, std: 3 per-channel values (``config.norm_mean`` / ``config.norm_std``).
        valid_box: N-4 int64 [top, bottom, left, right] from :func:`train_transform`; None: no padding.

    Returns:
        N-3-H-W float32 on the device of ``imgs``.
    """
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    std = np.asarray(std, dtype=np.float64).reshape(-1)
    # One multiply-subtract; scale and shift are computed in float64 so float32 error stays ~1e-7.
    scale = channel_vector(1.0 / (255.0 * std), imgs.device, torch.float32)[None]
    shift = channel_vector(mean / std, imgs.device, torch.float32)[None]
    out = imgs.float() * scale - shift
    if valid_box is not None:
        n, _, h, w = imgs.shape
        box = valid_box.to(imgs.device, non_blocking=True).view(n, 4, 1)  # pinned by the training loader
        rows = torch.arange(h, device=imgs.device).view(1, h)
        cols = torch.arange(w, device=imgs.device).view(1, w)
        row_ok = (rows >= box[:, 0]) & (rows < box[:, 1])  # N-H
        col_ok = (cols >= box[:, 2]) & (cols < box[:, 3])  # N-W
        valid = row_ok[:, :, None] & col_ok[:, None, :]  # N-H-W
        out = out.masked_fill_(~valid[:, None], 0.0)
    return out
