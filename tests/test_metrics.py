"""Confusion matrices and IoU scores (smmcl.engine.metrics) against hand-computed values."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from smmcl.engine.metrics import check_label, compute_scores, confusion_matrix, format_results, pixel_counts

# 3 classes, 10 pixels, 2 ignored.
LABEL = np.array([0, 0, 0, 0, 1, 1, 2, 2, 255, 255], dtype=np.uint8)
PRED = np.array([0, 0, 0, 1, 1, 2, 2, 1, 0, 1], dtype=np.int64)
# rows = ground truth: gt 0 -> pred 0,0,0,1; gt 1 -> 1,2; gt 2 -> 2,1.
HIST = np.array([[3, 1, 0],
                 [0, 1, 1],
                 [0, 1, 1]])


def test_confusion_matrix_by_hand():
    hist = confusion_matrix(PRED, LABEL, 3)
    assert hist.dtype == np.int64
    np.testing.assert_array_equal(hist, HIST)
    # the tensor path gives the same matrix, as a tensor
    hist_t = confusion_matrix(torch.from_numpy(PRED), torch.from_numpy(LABEL), 3)
    assert isinstance(hist_t, torch.Tensor) and hist_t.dtype == torch.int64
    np.testing.assert_array_equal(hist_t.numpy(), HIST)


def test_scores_by_hand():
    s = compute_scores(HIST)
    # gt totals 4, 2, 2; prediction totals 3, 3, 2; diagonal 3, 1, 1.
    np.testing.assert_allclose(s['iou'], [3 / (4 + 3 - 3), 1 / (2 + 3 - 1), 1 / (2 + 2 - 1)])  # .75 .25 .333
    assert s['mean_iou'] == pytest.approx((0.75 + 0.25 + 1 / 3) / 3)
    assert s['mean_iou_wo_background'] == pytest.approx((0.25 + 1 / 3) / 2)
    assert s['freq_iou'] == pytest.approx(0.5 * 0.75 + 0.25 * 0.25 + 0.25 / 3)
    np.testing.assert_allclose(s['class_acc'], [3 / 4, 1 / 2, 1 / 2])
    assert s['mean_pixel_acc'] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert s['pixel_acc'] == pytest.approx(5 / 8)


def test_absent_classes_are_nan_and_left_out():
    # 4 classes: class 3 appears nowhere, class 2 is only predicted (IoU 0, counts in the mean).
    label = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    s = compute_scores(confusion_matrix(pred, label, 4))
    assert s['iou'][0] == pytest.approx(0.5) and s['iou'][1] == 1.0 and s['iou'][2] == 0.0
    assert math.isnan(s['iou'][3])
    assert s['mean_iou'] == pytest.approx(0.5)  # nanmean of .5, 1, 0
    assert math.isnan(s['class_acc'][2]) and math.isnan(s['class_acc'][3])
    assert s['mean_pixel_acc'] == pytest.approx(0.75)  # nanmean of .5, 1
    # nothing at all: every score nan, no warning or error
    empty = compute_scores(np.zeros((3, 3), dtype=np.int64))
    assert math.isnan(empty['mean_iou']) and math.isnan(empty['pixel_acc'])


def test_bad_labels_are_refused_not_dropped():
    label = np.array([0, 1, 14, 200, 255])
    with pytest.raises(ValueError, match=r'\[14, 200\].*0\.\.13'):
        confusion_matrix(np.zeros(5, dtype=np.int64), label, 14)
    with pytest.raises(ValueError, match=r'\[14, 200\]'):
        confusion_matrix(torch.zeros(5, dtype=torch.long), torch.from_numpy(label), 14)
    with pytest.raises(ValueError, match='prediction'):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match='shape'):
        confusion_matrix(np.zeros(3), np.zeros(4), 3)


def test_format_results_is_the_authors_text():
    s = compute_scores(HIST)
    text = format_results(s, ['void', 'bed', 'books'], show_wo_background=True)
    lines = text.split('\n')
    assert lines[0] == '1 void  \t75.000%'  # '%-8s\t%.3f%%'
    assert lines[1] == '2 bed   \t25.000%'
    assert lines[2] == '3 books \t33.333%'
    assert lines[3] == ('----------     mean_IoU\t44.444%\tmean_IU_wo_background\t29.167%\tfreq_IoU\t52.083%\t'
                        'mean_pixel_acc\t58.333%\tpixel_acc\t62.500%')
    plain = format_results(s, None, show_wo_background=False)
    assert plain.split('\n')[0] == 'Class 1:\t75.000%'
    assert 'mean_IU' not in plain


# The table of the authors' released log (palmdong/SMMCL SMMCL_LLRGBD/log_LLRGBD_mscan_b/
# val_2024_04_22_06_46_15.log), below its 'Model: ...' line.
AUTHORS_LOG_TABLE = """1 void  \t0.000%
2 bed   \t71.998%
3 books \t78.942%
4 ceiling\t92.233%
5 chair \t47.525%
6 floor \t96.711%
7 furniture\t67.205%
8 objects\t64.091%
9 painting\t88.437%
10 sofa \t29.506%
11 table\t49.002%
12 tv   \t31.232%
13 wall \t93.788%
14 window\t83.810%
----------     mean_IoU\t63.891%\tmean_IU_wo_background\t68.806%\tfreq_IoU\t88.327%\t\
mean_pixel_acc\t73.100%\tpixel_acc\t93.252%"""


def test_format_results_reproduces_the_authors_released_log():
    names = ['void', 'bed', 'books', 'ceiling', 'chair', 'floor', 'furniture', 'objects', 'painting', 'sofa',
             'table', 'tv', 'wall', 'window']
    iou = np.array([float(line.split('\t')[1][:-1]) / 100 for line in AUTHORS_LOG_TABLE.split('\n')[:14]])
    scores = dict(iou=iou, mean_iou=0.63891, mean_iou_wo_background=0.68806, freq_iou=0.88327,
                  mean_pixel_acc=0.731, pixel_acc=0.93252)
    assert format_results(scores, names, show_wo_background=True) == AUTHORS_LOG_TABLE
    assert abs(np.nanmean(iou) - 0.63891) < 1e-5 and abs(np.nanmean(iou[1:]) - 0.68806) < 1e-5


labels_and_preds = st.integers(1, 6).flatmap(lambda k: st.tuples(
    st.just(k),
    hnp.arrays(np.int64, st.integers(1, 200), elements=st.sampled_from(list(range(k)) + [255])),
    st.randoms()))


@settings(max_examples=60, deadline=None)
@given(labels_and_preds)
def test_score_properties(case):
    k, label, rnd = case
    pred = np.array([rnd.randrange(k) for _ in range(label.size)], dtype=np.int64)
    hist = confusion_matrix(pred, label, k)
    assert hist.sum() == np.count_nonzero(label != 255)
    s = compute_scores(hist)
    iou = s['iou'][~np.isnan(s['iou'])]
    assert np.all((iou >= 0) & (iou <= 1))
    if iou.size:
        assert s['mean_iou'] == pytest.approx(np.mean(iou))
    # a perfect prediction (ignored pixels predicted as anything) scores 1
    perfect = np.where(label == 255, 0, label)
    s = compute_scores(confusion_matrix(perfect, label, k))
    if (label != 255).any():
        assert s['mean_iou'] == 1.0 and s['pixel_acc'] == 1.0 and s['freq_iou'] == pytest.approx(1.0)


def test_numpy_and_tensor_inputs_agree():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 6, (7, 9)).astype(np.uint16)  # a dtype torch cannot take as it is
    label[0] = 255
    pred = rng.integers(0, 6, (7, 9)).astype(np.int32)
    hist = confusion_matrix(pred, label, 6)
    assert isinstance(hist, np.ndarray) and hist.dtype == np.int64 and hist.sum() == 6 * 9
    mixed = confusion_matrix(torch.from_numpy(pred), label, 6)
    assert isinstance(mixed, torch.Tensor)
    np.testing.assert_array_equal(mixed.numpy(), hist)
    flipped = confusion_matrix(pred[:, ::-1].astype(np.int64), label[:, ::-1].astype(np.int64), 6)
    np.testing.assert_array_equal(flipped, hist)  # negative strides


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 7), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_pixel_counts_equal_the_checked_confusion_matrix(k, n, seed):
    """The device-side count (no host read: evaluation's) is the validating function's count, ignored
    pixels left out, for labels of the dtypes datasets give (uint8, uint16) and int64 predictions."""
    rng = np.random.default_rng(seed)
    for dtype in (np.uint8, np.uint16):
        label = rng.integers(0, k, n).astype(dtype)
        label[rng.random(n) < 0.3] = 255
        pred = torch.from_numpy(rng.integers(0, k, n))
        check_label(label, pred.shape, k)
        counts = pixel_counts(pred, torch.as_tensor(label), k)
        assert counts.dtype == torch.int64 and counts.shape == (k, k)
        np.testing.assert_array_equal(counts.numpy(), confusion_matrix(pred.numpy(), label, k))
        assert counts.sum() == np.count_nonzero(label != 255)


def test_check_label_names_shapes_and_values():
    label = np.zeros((4, 5), dtype=np.uint8)
    check_label(label, (4, 5), 3)
    with pytest.raises(ValueError, match=r'prediction shape \(5, 4\) != label shape \(4, 5\)'):
        check_label(label, (5, 4), 3)
    label[1, 1], label[2, 2], label[3, 3] = 7, 3, 255
    with pytest.raises(ValueError, match=r'label holds values \[3, 7\] outside the classes 0..2'):
        check_label(label, (4, 5), 3)
    check_label(label, (4, 5), 8)  # 255 is the ignore value
    with pytest.raises(ValueError, match=r'label holds values \[-1\]'):
        check_label(torch.tensor([[0, -1]]), (1, 2), 3)
