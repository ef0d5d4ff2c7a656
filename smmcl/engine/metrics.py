"""Segmentation metrics of SMMCL (Dong & Yokoya, WACV 2024): the authors' (CMX) arithmetic, as pure functions.

The authors' ``utils/metric.py`` (``hist_info``, ``compute_score``) and ``utils/visualize.py``
(``print_iou``), both from CMX.
Evaluation accumulates one K-K confusion matrix (rows = ground truth, columns = prediction) over the
images; across processes the matrices are summed (never the mIoU), then :func:`compute_scores` turns the
total into IoUs.

One deliberate difference: CMX's ``hist_info`` keeps only labels in ``[0, K)`` and silently drops every
other value, so a label file with a wrong class count scores as if those pixels were ignored.
:func:`confusion_matrix` drops only the ignore value (255) and raises for anything else.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]


def _bad_values_message(what: str, values, num_classes: int, ignore: int) -> str:
    shown = ', '.join(str(v) for v in values[:20]) + (', ...' if len(values) > 20 else '')
    return (f'{what} holds values [{shown}] outside the classes 0..{num_classes - 1} '
            f'(ignore value {ignore}); check num_classes and the label files')


def _flat_long(a: Array) -> torch.Tensor:
    """Flat int64 tensor of an array (numpy arrays of any integer dtype and strides, on the CPU)."""
    if not isinstance(a, torch.Tensor):
        a = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    return a.reshape(-1).long()


def confusion_matrix(pred: Array, label: Array, num_classes: int, ignore: int = 255) -> Array:
    """K-K int64 confusion matrix of one prediction, rows = ground truth (CMX ``hist_info``).

    Args:
        pred: H-W (any shape) predicted class indices in ``[0, K)``.
        label: same shape, ground truth in ``[0, K)`` or ``ignore``.
        num_classes: K.
        ignore: label value left out of the count.

    Returns:
        K-K int64, numpy for numpy inputs, a tensor on ``label``'s device for tensor inputs.
        ``hist.sum()`` is the number of non-ignored pixels.

    Raises:
        ValueError: shapes differ, or a label (other than ``ignore``) or prediction lies outside
            ``[0, K)`` (the message names the values).
    """
    check_label(label, pred.shape, num_classes, ignore)
    as_numpy = not (isinstance(label, torch.Tensor) or isinstance(pred, torch.Tensor))
    label = _flat_long(label)
    pred = _flat_long(pred).to(label.device)
    _refuse_outside('prediction', pred[label != ignore], num_classes, ignore)
    hist = pixel_counts(pred, label, num_classes, ignore)
    return hist.numpy() if as_numpy else hist


def check_label(label: Array, shape: Sequence[int], num_classes: int, ignore: int = 255) -> None:
    """Refuse a label that :func:`pixel_counts` cannot count: of another shape than the prediction's
    ``shape``, or holding values outside ``[0, K)`` other than ``ignore``.

    Works on the label's own dtype and device (a numpy array stays on the host), so evaluation checks
    each label file where it was read, before it goes to the device.

    Raises:
        ValueError: naming the shapes, or the values.
    """
    if tuple(shape) != tuple(label.shape):
        raise ValueError(f'prediction shape {tuple(shape)} != label shape {tuple(label.shape)}')
    _refuse_outside('label', label[label != ignore], num_classes, ignore)


def _refuse_outside(what: str, values: Array, num_classes: int, ignore: int) -> None:
    bad = values[(values < 0) | (values >= num_classes)]
    if len(bad):
        bad = bad.cpu().numpy() if isinstance(bad, torch.Tensor) else bad
        raise ValueError(_bad_values_message(what, np.unique(bad).tolist(), num_classes, ignore))


def pixel_counts(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore: int = 255) -> torch.Tensor:
    """K-K int64 confusion matrix (rows = ground truth) on ``pred``'s device, reading no value on the host.

    The counting half of :func:`confusion_matrix`, for evaluation on a GPU: ``torch.bincount`` and boolean
    indexing read a size on the host, which makes the host wait for the forward at every image; here
    ignored pixels go to a spare cell and the counts are one accumulating ``index_put_`` (integer sums:
    the same counts in any order).

    Args:
        pred: H-W (any shape) int tensor of classes in ``[0, K)`` (an argmax: not checked).
        label: same shape, in ``[0, K)`` or ``ignore`` (checked beforehand: :func:`check_label`).
    """
    k = int(num_classes)
    label = label.reshape(-1).to(device=pred.device, dtype=torch.int64)
    cell = torch.where(label == ignore, k * k, label * k + pred.reshape(-1).long())
    counts = torch.zeros(k * k + 1, dtype=torch.int64, device=pred.device)
    counts.index_put_((cell,), torch.ones_like(cell), accumulate=True)
    return counts[:k * k].view(k, k)


def _nanmean(values: np.ndarray) -> float:
    """``np.nanmean`` without the all-NaN warning (an empty or all-absent set gives nan)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        return float(np.nanmean(values)) if values.size else float('nan')


def compute_scores(hist: Array) -> Dict[str, Union[float, np.ndarray]]:
    """Scores of a K-K confusion matrix (rows = ground truth), CMX ``compute_score``.

    Returns:
        dict with
        ``iou`` (K float64): ``diag / (gt total + pred total - diag)``; nan for a class absent from
        both ground truth and prediction, 0 for a class only predicted;
        ``mean_iou``: nanmean of ``iou`` (absent classes left out);
        ``mean_iou_wo_background``: nanmean of ``iou[1:]`` (without the first class);
        ``freq_iou``: sum of ``iou * gt frequency`` over classes present in the ground truth;
        ``class_acc`` (K): ``diag / gt total`` (nan for classes absent from the ground truth);
        ``mean_pixel_acc``: nanmean of ``class_acc``;
        ``pixel_acc``: ``diag.sum() / hist.sum()``.
    """
    if isinstance(hist, torch.Tensor):
        hist = hist.detach().cpu().numpy()
    hist = np.asarray(hist, dtype=np.float64)
    diag = np.diag(hist)
    gt_total, pred_total = hist.sum(1), hist.sum(0)
    with np.errstate(divide='ignore', invalid='ignore'):
        iou = diag / (gt_total + pred_total - diag)
        freq = gt_total / hist.sum()
        class_acc = diag / gt_total
        pixel_acc = diag.sum() / hist.sum()
    present = freq > 0
    return dict(iou=iou, mean_iou=_nanmean(iou), mean_iou_wo_background=_nanmean(iou[1:]),
                freq_iou=float((iou[present] * freq[present]).sum()), class_acc=class_acc,
                mean_pixel_acc=_nanmean(class_acc), pixel_acc=float(pixel_acc))


def format_results(scores: Dict, class_names: Optional[Sequence[str]] = None,
                   show_wo_background: bool = False) -> str:
    """The authors' result text (their ``utils/visualize.py`` ``print_iou``): one ``'<i> <name>\\t<IoU>%'``
    line per class and a ``----------`` summary line, values in percent, with ``mean_IU_wo_background``
    after ``mean_IoU`` when ``show_wo_background`` (their LLRGBD setting; CMX's older ``print_iou`` named
    it ``mean_IU_no_back``)."""
    iou = np.asarray(scores['iou'])
    lines = []
    for i in range(iou.size):
        name = 'Class %d:' % (i + 1) if not class_names else '%d %s' % (i + 1, class_names[i])
        lines.append('%-8s\t%.3f%%' % (name, iou[i] * 100))
    fields = [('mean_IoU', scores['mean_iou'])]
    if show_wo_background:
        fields.append(('mean_IU_wo_background', scores['mean_iou_wo_background']))
    fields += [('freq_IoU', scores['freq_iou']), ('mean_pixel_acc', scores['mean_pixel_acc']),
               ('pixel_acc', scores['pixel_acc'])]
    summary = '\t'.join('%-8s\t%.3f%%' % (name, value * 100) for name, value in fields)
    lines.append('----------     ' + summary)
    return '\n'.join(lines)
