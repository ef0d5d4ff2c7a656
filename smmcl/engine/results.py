"""An evaluation's results: the authors' table appended to the val log, and the same scores as data.

The authors' ``Evaluator.run`` appends ``Model: <checkpoint>`` and the per-class IoU table to
``log_dir/val_<time>.log`` and links ``val_last.log`` to it. Beside that log we keep the scores as JSON
(``val_<time>.json``, the log's stem): a list ``evaluations`` of one record per evaluated set (per-class
IoU, mIoU, mIoU without the first class where reported, pixel and mean class accuracy, and the settings
that produced them), so scripts, tests and the demo read numbers instead of parsing tables. ``eval.py``
and the evaluation during training (:mod:`smmcl.engine.watch`) both write through :func:`report`.
"""
from __future__ import annotations

import json
import math
import os
import os.path as osp
from typing import Dict, List, Sequence

import numpy as np

from smmcl.data.dataset import DatasetError, read_list
from smmcl.engine.checkpoint import atomic_save
from smmcl.engine.logging_utils import link_last
from smmcl.engine.metrics import compute_scores, format_results

SETTINGS = ('eval_protocol', 'eval_scale_array', 'eval_flip', 'eval_crop_size', 'eval_stride_rate')


def open_val_log(config) -> None:
    """Create ``config.val_log_file`` (appended to) and point ``log_dir/val_last.log`` at it, as the
    authors do before evaluating."""
    os.makedirs(osp.dirname(osp.abspath(config.val_log_file)), exist_ok=True)
    open(config.val_log_file, 'a').close()
    link_last(config.val_log_file, osp.join(config.log_dir, 'val_last.log'))


def scores_path(config) -> str:
    """The JSON beside the val log, with its stem: ``val_<time>.json``."""
    return osp.splitext(config.val_log_file)[0] + '.json'


def _number(value):
    value = float(value)
    return None if math.isnan(value) else value  # JSON has no NaN: absent classes are null


def scores_record(title: str, hist: np.ndarray, config, **extra) -> Dict:
    """One evaluated set as data: ``title`` (the val log's ``Model:`` line), the K-K confusion matrix
    ``hist``'s scores in 0-1 and the evaluation settings; ``extra`` (checkpoint, epoch, subset, images)
    is stored as given."""
    scores = compute_scores(hist)
    record = dict(title=title, **extra, dataset=config.dataset_name,
                  class_names=list(config.class_names or []), iou=[_number(v) for v in scores['iou']],
                  mean_iou=_number(scores['mean_iou']))
    if config.report_miou_without_first:
        record['mean_iou_wo_first'] = _number(scores['mean_iou_wo_background'])
    record.update(pixel_acc=_number(scores['pixel_acc']), mean_class_acc=_number(scores['mean_pixel_acc']),
                  freq_iou=_number(scores['freq_iou']),
                  settings={key: _plain(config[key]) for key in SETTINGS})
    return record


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def read_scores(path: str) -> List[Dict]:
    """The records of a scores file (an empty list when there is none yet)."""
    if not osp.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)['evaluations']


def append_scores(path: str, records: Sequence[Dict]) -> None:
    """Add ``records`` to the scores file ``path``, rewritten atomically (a temporary file renamed over it)."""
    text = json.dumps(dict(evaluations=read_scores(path) + list(records)), indent=1)
    atomic_save(text, path, writer=lambda obj, f: f.write(obj.encode()))


def result_table(title: str, hist: np.ndarray, config) -> str:
    """``title`` and the authors' per-class IoU table of the K-K confusion matrix ``hist``."""
    table = format_results(compute_scores(hist), config.class_names or None,
                           show_wo_background=bool(config.report_miou_without_first))
    return f'{title}\n{table}\n'


def subset_indices(config, test_names: Sequence[str]) -> Dict[str, List[int]]:
    """{subset: indices into the test set} for each ``config.eval_subset_sources`` list file that exists
    and names at least one image (MFNet's day / night); the subsets are scored from the test set's
    per-image confusion matrices, without predicting twice.

    Raises:
        DatasetError: a subset lists images that are not in the test set.
    """
    position = {name: i for i, name in enumerate(test_names)}
    subsets = {}
    for name, source in config.eval_subset_sources.items():
        if not osp.isfile(source):
            continue
        names = read_list(source)
        missing = [n for n in names if n not in position]
        if missing:
            raise DatasetError(f'subset {name} ({source}) lists {len(missing)} images that are not in the '
                               f'test set ({config.eval_source or config.eval_root}), e.g. {missing[:3]}')
        if names:  # an empty list (a test set without night images) reports nothing
            subsets[name] = [position[n] for n in names]
    return subsets


def report(title: str, hists: np.ndarray, subsets: Dict[str, List[int]], config, **extra) -> float:
    """Print and append to the val log the tables of one evaluation (the test set, then each subset)
    from its N-K-K per-image confusion matrices, and add their records to the scores JSON; ``extra``
    goes into every record (:func:`scores_record`). Returns the test set's mIoU in percent."""
    hist = hists.sum(0)
    text = result_table(title, hist, config)
    records = [scores_record(title, hist, config, subset=None, images=len(hists), **extra)]
    for name, indices in subsets.items():
        sub_title = f'{title} [{name}: {len(indices)} images]'
        text += result_table(sub_title, hists[indices].sum(0), config)
        records.append(scores_record(sub_title, hists[indices].sum(0), config, subset=name,
                                     images=len(indices), **extra))
    with open(config.val_log_file, 'a') as f:
        f.write(text)
    print(text, flush=True)
    append_scores(scores_path(config), records)
    return compute_scores(hist)['mean_iou'] * 100
