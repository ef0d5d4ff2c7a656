"""smmcl.engine.evaluate against an independent transcription of the authors' evaluator.

``authors_scores`` below restates, loop for loop in NumPy / OpenCV, what palmdong/SMMCL
``SMMCL_LLRGBD/engine/evaluator.py`` (CMX's) does: ``sliding_eval_rgbX`` (scales, cv2 resizes, a float64
sum), ``scale_process_rgbX`` (the single-forward test, the window loop with its row / column mix-up, the
plain sum of window scores), ``process_image_rgbX`` (float64 normalisation, zero pad after it) and
``val_func_process_rgbX`` (float32 forward, flip, exp). It is written from reading their code, not from
ours. The model is a fixed convolution stack (SMMCL's NMF decoder draws random bases), with zero-padded
3x3 / 5x5 kernels so a pixel's logits depend on where its window lies.
"""
import math

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from smmcl.config import base_config
from smmcl.engine.evaluate import predict, predict_scores
from smmcl.engine.windows import authors_windows, corrected_windows
from smmcl.engine.metrics import confusion_matrix

K = 6
SCALES = [0.5, 0.75, 1, 1.25, 1.5, 1.75]


class StubModel(nn.Module):
    """Deterministic (rgb, x) -> K logits, context-dependent (zero-padded convolutions)."""

    def __init__(self, k=K):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.conv1 = nn.Conv2d(6, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, k, 5, padding=2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)

    def forward(self, rgb, x):
        return self.conv2(torch.relu(self.conv1(torch.cat([rgb, x], 1))))


# ---------------------------------------------------------------------------------------------------
# The transcription
# ---------------------------------------------------------------------------------------------------


def _normalise(img, mean, std):
    out = img.astype(np.float64) / 255.0
    out = out - mean
    return out / std


def _pad_to_shape(img, shape):
    """cv2.copyMakeBorder with zeros up to ``shape``; margins (top, bottom, left, right)."""
    pad_h = shape[0] - img.shape[0] if shape[0] - img.shape[0] > 0 else 0
    pad_w = shape[1] - img.shape[1] if shape[1] - img.shape[1] > 0 else 0
    margin = (pad_h // 2, pad_h // 2 + pad_h % 2, pad_w // 2, pad_w // 2 + pad_w % 2)
    return cv2.copyMakeBorder(img, *margin, cv2.BORDER_CONSTANT, value=0), margin


def _forward_padded(model, img, modal_x, crop, mean, std, flip):
    """process_image_rgbX + val_func_process_rgbX, then the caller's margin cut: K-h-w float32 numpy."""
    rgb, margin = _pad_to_shape(_normalise(img, mean, std), crop)
    xx, _ = _pad_to_shape(_normalise(modal_x, mean, std), crop)
    rgb = torch.FloatTensor(np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32))
    xx = torch.FloatTensor(np.ascontiguousarray(xx.transpose(2, 0, 1)[None], dtype=np.float32))
    with torch.no_grad():
        score = model(rgb, xx)[0]
        if flip:
            score += model(rgb.flip(-1), xx.flip(-1))[0].flip(-1)
        score = torch.exp(score)
    score = score.numpy()
    return score[:, margin[0]:score.shape[1] - margin[1], margin[2]:score.shape[2] - margin[3]]


def _scale_scores(model, img, modal_x, ori_shape, crop, stride_rate, mean, std, flip):
    """scale_process_rgbX: H-W-K float32 at the original size."""
    new_rows, new_cols = img.shape[:2]
    if new_cols <= crop[1] or new_rows <= crop[0]:
        score = _forward_padded(model, img, modal_x, crop, mean, std, flip)
    else:
        stride = (int(np.ceil(crop[0] * stride_rate)), int(np.ceil(crop[1] * stride_rate)))
        img_pad, margin = _pad_to_shape(img, crop)  # raw uint8, zeros
        x_pad, margin = _pad_to_shape(modal_x, crop)
        pad_rows, pad_cols = img_pad.shape[:2]
        r_grid = int(np.ceil((pad_rows - crop[0]) / stride[0])) + 1
        c_grid = int(np.ceil((pad_cols - crop[1]) / stride[1])) + 1
        data_scale = np.zeros((K, pad_rows, pad_cols), dtype=np.float32)
        for yi in range(r_grid):
            for xi in range(c_grid):
                s_x = xi * stride[0]
                s_y = yi * stride[1]
                e_x = min(s_x + crop[0], pad_cols)
                e_y = min(s_y + crop[1], pad_rows)
                s_x = e_x - crop[0]
                s_y = e_y - crop[1]
                data_scale[:, s_y:e_y, s_x:e_x] += _forward_padded(
                    model, img_pad[s_y:e_y, s_x:e_x, :], x_pad[s_y:e_y, s_x:e_x, :], crop, mean, std, flip)
        score = data_scale[:, margin[0]:data_scale.shape[1] - margin[1],
                           margin[2]:data_scale.shape[2] - margin[3]]
    return cv2.resize(np.ascontiguousarray(score.transpose(1, 2, 0)), (ori_shape[1], ori_shape[0]),
                      interpolation=cv2.INTER_LINEAR)


def authors_scores(model, img, modal_x, cfg):
    """sliding_eval_rgbX: the H-W-K float64 sum over scales (its argmax is their prediction)."""
    crop = tuple(cfg.eval_crop_size)
    rows, cols = img.shape[:2]
    total = np.zeros((rows, cols, K))
    for s in cfg.eval_scale_array:
        img_s = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
        x_s = cv2.resize(modal_x, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
        total += _scale_scores(model, img_s, x_s, (rows, cols), crop, cfg.eval_stride_rate,
                               cfg.norm_mean, cfg.norm_std, cfg.eval_flip)
    return total


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------


def _config(crop, scales=(1,), flip=False, **changes):
    cfg = base_config()
    cfg.update(num_classes=K, eval_crop_size=list(crop), eval_stride_rate=2 / 3, eval_scale_array=list(scales),
               eval_flip=flip, eval_batch_size=1, eval_protocol='authors')
    cfg.update(changes)
    return cfg


def _images(h, w, seed=0):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    depth = rng.integers(0, 256, (h, w), dtype=np.uint8)
    return rgb, cv2.merge([depth, depth, depth])  # X replicated to 3 channels, as their loader


CASES = [  # (image h, w), (crop_h, crop_w): square and non-square crops, images larger and smaller
    ((30, 45), (16, 24)),
    ((30, 45), (24, 16)),   # crop_h > crop_w: windows of 16 rows x 24 columns, rows left uncovered
    ((20, 30), (20, 20)),   # square crop
    ((12, 20), (16, 24)),   # smaller than the crop at scale 1
    ((18, 50), (16, 24)),   # crop_w > rows at several scales: negative row starts
    ((41, 17), (16, 24)),   # one side fits: a single forward on the whole image
]


@pytest.mark.parametrize('size,crop', CASES)
@pytest.mark.parametrize('flip', [False, True])
def test_scores_and_confusion_equal_the_transcription(size, crop, flip):
    model = StubModel().eval()
    cfg = _config(crop, SCALES, flip)
    rgb, x = _images(*size, seed=sum(size))
    theirs = authors_scores(model, rgb, x, cfg)
    ours = predict_scores(model, rgb, x, cfg, 'cpu')
    assert ours.dtype == torch.float64 and ours.shape == (K,) + size
    np.testing.assert_array_equal(ours.numpy().transpose(1, 2, 0), theirs)
    label = np.random.default_rng(1).integers(0, K, size).astype(np.uint8)
    pred = predict(model, rgb, x, cfg, 'cpu')
    np.testing.assert_array_equal(confusion_matrix(pred.numpy(), label, K),
                                  confusion_matrix(theirs.argmax(2), label, K))


def test_the_cases_exercise_every_quirk():
    """Each quirk the transcription covers occurs in CASES at some scale (else the test above proves less)."""
    seen = set()
    for (h, w), crop in CASES:
        for s in SCALES:
            rows, cols = cv2.resize(np.zeros((h, w), np.uint8), None, fx=s, fy=s).shape
            windows = authors_windows(rows, cols, crop, 2 / 3)
            fits_one_side = (rows <= crop[0]) != (cols <= crop[1])
            if fits_one_side:
                seen.add('one side fits')
            if len(windows) > 1:
                covered = np.zeros((rows, cols), int)
                for top, bottom, left, right in windows:
                    covered[top:bottom, left:right] += 1
                    if bottom - top < crop[1] or right - left < crop[0]:
                        seen.add('negative start')
                seen.add('uncovered' if (covered == 0).any() else 'covered')
                if covered.max() > 1:
                    seen.add('overlap summed')
                if windows != corrected_windows(rows, cols, crop, 2 / 3):
                    seen.add('mixed-up grid')
    assert seen >= {'one side fits', 'negative start', 'uncovered', 'overlap summed', 'mixed-up grid'}


def test_negative_start_follows_python_slicing():
    # rows 20, crop_w 24 > 20: each row start is 20 - 24 = -4, i.e. rows 16..19 (Python's a[-4:20]).
    windows = authors_windows(20, 30, (16, 24), 2 / 3)
    assert {(top, bottom) for top, bottom, _, _ in windows} == {(16, 20)}
    # columns step by the row stride ceil(16 * 2/3) = 11 over crop_h = 16 columns: 27..29 stay uncovered
    assert [(left, right) for _, _, left, right in windows] == [(0, 16), (11, 27)] * 2
    assert np.arange(20)[-4:20].tolist() == list(range(16, 20))


@pytest.mark.parametrize('batch', [2, 5, 64])
@pytest.mark.parametrize('fast_path', [False, True])
def test_batched_and_device_resize_paths_differ_only_by_rounding(batch, fast_path):
    """eval_batch_size > 1 (windows of one input shape per forward) and fast_path (resize and sum on the
    device) keep the authors' geometry: scores within float rounding of the transcription."""
    model = StubModel().eval()
    for (h, w), crop in CASES:
        cfg = _config(crop, SCALES, True, eval_batch_size=batch, fast_path=fast_path)
        rgb, x = _images(h, w, seed=h + w)
        theirs = authors_scores(model, rgb, x, cfg)
        ours = predict_scores(model, rgb, x, cfg, 'cpu').numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
        mismatch = (ours.argmax(2) != theirs.argmax(2)).mean()
        assert mismatch <= 0.002  # only argmax near-ties may flip


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('fast_path', [False, True])
def test_gpu_path_keeps_the_geometry(fast_path):
    model = StubModel().eval()
    for (h, w), crop in CASES:
        cfg = _config(crop, SCALES, True, eval_batch_size=4, fast_path=fast_path)
        rgb, x = _images(h, w, seed=h + w)
        theirs = authors_scores(model, rgb, x, cfg)
        ours = predict_scores(model.cuda(), rgb, x, cfg, 'cuda').cpu().numpy().transpose(1, 2, 0)
        model.cpu()
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())
        assert (ours.argmax(2) != theirs.argmax(2)).mean() <= 0.002


# ---- the 'corrected' switch ----

@pytest.mark.parametrize('flip', [False, True])
@pytest.mark.parametrize('size', [(24, 32), (20, 20)])
def test_corrected_equals_authors_at_scale_one_with_crop_equal_to_image(size, flip):
    model = StubModel().eval()
    rgb, x = _images(*size)
    authors = predict_scores(model, rgb, x, _config(size, [1], flip), 'cpu')
    corrected = predict_scores(model, rgb, x, _config(size, [1], flip, eval_protocol='corrected'), 'cpu')
    assert torch.equal(authors, corrected)


def test_corrected_differs_where_the_geometry_matters():
    model = StubModel().eval()
    rgb, x = _images(40, 40)
    crop = (24, 16)
    authors = predict_scores(model, rgb, x, _config(crop), 'cpu')
    corrected = predict_scores(model, rgb, x, _config(crop, eval_protocol='corrected'), 'cpu')
    # The authors' loop covers rows 0..26 only (rows step by ceil(16 * 2/3) = 11 over 16 rows): zero scores,
    # class 0, below; the corrected grid covers everything, averaging overlaps.
    assert authors_windows(40, 40, crop, 2 / 3) == [(0, 16, 0, 24), (0, 16, 16, 40), (0, 16, 16, 40),
                                                    (0, 16, 16, 40), (11, 27, 0, 24), (11, 27, 16, 40),
                                                    (11, 27, 16, 40), (11, 27, 16, 40)]
    assert (authors[:, 27:] == 0).all() and (authors[:, :27] > 0).all()
    assert (corrected > 0).all()
    assert (authors.argmax(0) != corrected.argmax(0)).float().mean() > 0.3
    # one side fits: the authors run one forward on the whole 40x40 image, 'corrected' slides
    authors = predict_scores(model, rgb, x, _config((40, 16)), 'cpu')
    corrected = predict_scores(model, rgb, x, _config((40, 16), eval_protocol='corrected'), 'cpu')
    with torch.no_grad():
        whole = torch.exp(model(_as_input(rgb), _as_input(x))[0])
    torch.testing.assert_close(authors.float(), whole, rtol=1e-6, atol=0)
    assert not torch.allclose(corrected.float(), whole, rtol=1e-3)


def _as_input(img):
    cfg = base_config()
    return torch.from_numpy(_normalise(img, cfg.norm_mean, cfg.norm_std).transpose(2, 0, 1)[None]
                            .astype(np.float32))


def test_smmcl_model_equals_the_transcription():
    """With SMMCL's own (tiny) model: the same NMF draws when both run the same forwards from one seed."""
    from smmcl.models import build_segmentor
    cfg = _config((32, 48), [0.75, 1.25], True)
    cfg.update(backbone='mscan_t', pretrained_model=None, decoder_embed_dim=64, num_classes=K)
    torch.manual_seed(0)
    model = build_segmentor(cfg).eval()
    rgb, x = _images(36, 52)
    torch.manual_seed(5)
    theirs = authors_scores(model, rgb, x, cfg)
    torch.manual_seed(5)
    ours = predict_scores(model, rgb, x, cfg, 'cpu').numpy().transpose(1, 2, 0)
    assert math.isfinite(theirs.sum())
    np.testing.assert_array_equal(ours, theirs)
