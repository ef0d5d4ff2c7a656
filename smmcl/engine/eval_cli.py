"""``python eval.py -d 0-3 -e 500``: evaluate SMMCL checkpoints as the authors' ``eval.py`` does.

The experiment folders' ``eval.py`` call :func:`main` with their ``config.py``. Options follow the
authors' (CMX ``eval.py`` and ``engine/evaluator.py run()``):

- ``-e/--epochs``: ``500`` (``<checkpoint_dir>/epoch-500.pth``), ``400-500`` (every saved epoch in the
  range), ``450-`` (every saved epoch from 450), ``last`` (``epoch-last.pth``, the authors' default) or
  a ``.pth`` file;
- ``-d/--devices``: GPUs, ``0-3`` or ``0,2``: one process per GPU, each predicting a share of the
  images, confusion matrices summed (CPU when there is no GPU);
- ``-p/--save_path DIR``: write every prediction as a palette PNG ``DIR_color/<name>.png`` (the
  authors' ``SegEvaluator.func_per_iteration``: the folder is ``DIR`` + ``'_color'`` as a string, so
  ``-p preds/`` writes ``preds/_color/``; they also create the empty ``DIR``), coloured with
  ``config.class_colors`` (LLRGBD: the authors' ``get_class_colors``; MFNet, NYU: CMX's bit palette).
  With several checkpoints each gets a sub-folder ``DIR_color/epoch-N/`` (theirs overwrite one another);
- ``-v/--verbose``: log every image; ``--set key=value ...``: config overrides;
  ``--local_rank`` / ``--local-rank``: accepted and ignored (the environment says the rank).

For each checkpoint the test set is scored, and every subset of ``config.eval_subsets`` whose list file
exists (MFNet day / night). The per-class IoU tables are printed and appended to ``config.val_log_file``
(``<log_dir>/val_<%Y_%m_%d_%H_%M_%S>.log``; ``Model: <checkpoint>`` then the table, as the authors'
``Evaluator.run``), and ``<log_dir>/val_last.log`` links to it; the last line printed is
``mIoU: <percent>`` of the last checkpoint's test set, for scripts. The model is built without ImageNet
weights (``pretrained_model`` is not read: the checkpoint sets every tensor); each checkpoint must match
the config's backbone and class count.
"""
from __future__ import annotations

import argparse
import logging
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from smmcl.config import ConfigError, load_config
from smmcl.data.dataset import DatasetError, RGBXDataset, read_list
from smmcl.engine.checkpoint import CheckpointError
from smmcl.engine.dist import DistContext, launch, parse_devices
from smmcl.engine.evaluate import eval_workers, evaluate_per_image, prediction_palette
from smmcl.engine.logging_utils import link_last
from smmcl.engine.metrics import compute_scores, format_results
from smmcl.engine.precision import for_inference, mixed_precision
from smmcl.inference import checked_weights, load_model, parse_epochs

logger = logging.getLogger('smmcl.eval')


def _result_block(title: str, hist: np.ndarray, config) -> str:
    scores = compute_scores(hist)
    table = format_results(scores, config.class_names or None,
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


def _report(path: str, hists: np.ndarray, subsets: Dict[str, List[int]], config) -> float:
    """Print and append to ``config.val_log_file`` the tables of checkpoint ``path`` (test set, then each
    subset) from its per-image confusion matrices; returns the test set's mIoU in percent."""
    hist = hists.sum(0)
    text = _result_block(f'Model: {path}', hist, config)
    for name, indices in subsets.items():
        text += _result_block(f'Model: {path} [{name}: {len(indices)} images]', hists[indices].sum(0), config)
    with open(config.val_log_file, 'a') as f:
        f.write(text)
    print(text, flush=True)
    return compute_scores(hist)['mean_iou'] * 100


def _evaluate_checkpoints(ctx: DistContext, config, checkpoints: Sequence[str], subsets: Dict[str, List[int]],
                          save_path: Optional[str], verbose: bool) -> None:
    """Every process: score each checkpoint on the test set and its subsets; rank 0 reports."""
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if verbose:  # per-image lines only from the evaluator (not PIL's or torch's debug output)
        logging.getLogger('smmcl.engine.evaluate').setLevel(logging.DEBUG)
    dataset = RGBXDataset(config, 'val')
    workers = eval_workers(config)
    final = []
    if ctx.is_main:  # the authors open the log and link val_last.log before evaluating
        os.makedirs(osp.dirname(osp.abspath(config.val_log_file)), exist_ok=True)
        open(config.val_log_file, 'a').close()
        link_last(config.val_log_file, osp.join(config.log_dir, 'val_last.log'))
        if save_path is not None:
            os.makedirs(save_path, exist_ok=True)
    for path in checkpoints:
        model = load_model(config, path, ctx.device)
        save_dir = None
        if save_path is not None:
            save_dir = save_path + '_color'
            if len(checkpoints) > 1:
                save_dir = osp.join(save_dir, osp.splitext(osp.basename(path))[0])
        if ctx.is_main:
            logger.info('Load Model: %s (%d test images, %d process(es))', path, len(dataset), ctx.world_size)
        amp, _ = mixed_precision(config, ctx.device)
        with amp:
            hists = evaluate_per_image(for_inference(model, config), dataset, config, ctx.device, ctx.rank,
                                       ctx.world_size, save_dir, num_workers=workers)
        if ctx.is_main:
            final.append((path, _report(path, hists, subsets, config)))
    if ctx.is_main:
        if len(final) > 1:
            best = max(final, key=lambda r: r[1])
            print(f'best: {best[0]} mIoU {best[1]:.3f}')
        print(f'results appended to {config.val_log_file}')
        print(f'mIoU: {final[-1][1]:.3f}', flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate SMMCL checkpoints (the authors' eval.py options).")
    parser.add_argument('-e', '--epochs', default='last',
                        help="epoch (500), range (400-500), open range (450-), 'last' or a .pth file")
    parser.add_argument('-d', '--devices', default=None, help="GPUs, e.g. '0-3' or '0,2' (CPU without GPU)")
    parser.add_argument('-v', '--verbose', action='store_true', help='log every image')
    parser.add_argument('-p', '--save_path', default=None,
                        help="write palette PNG predictions to SAVE_PATH + '_color'")
    parser.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE', help='config overrides')
    parser.add_argument('--port', type=int, default=None, help='port for the multi-GPU process group')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(config_path: str, argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv``, check the checkpoints against the config, evaluate (see the module docstring).

    Exits with status 1 and a one-line reason for a bad option, a missing checkpoint or dataset, a
    checkpoint built for another backbone / class count, ``class_names`` of another length than
    ``num_classes`` (which would fail only when the results are printed), an unknown ``eval_protocol``
    or malformed ``class_colors``.
    """
    args = build_parser().parse_args(argv)
    try:
        config = load_config(config_path, args.set)
        names = config.class_names or []
        if names and len(names) != int(config.num_classes):  # the tables name class i by names[i]
            raise ConfigError(f'class_names holds {len(names)} names for num_classes={config.num_classes}; '
                              f'give one name per class (or --set class_names=[] for "Class i:")')
        prediction_palette(config.class_colors)
        checkpoints = parse_epochs(args.epochs, config.checkpoint_dir)
        for path in checkpoints:  # refuse a wrong checkpoint before starting any process (shapes only)
            checked_weights(config, path, mmap=True)
        # Missing folders / list files, before starting any process.
        subsets = subset_indices(config, RGBXDataset(config, 'val').names)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError) as exc:  # the user's to fix
        print(f'error: {exc}', file=sys.stderr)
        raise SystemExit(1)
    launch(_evaluate_checkpoints, parse_devices(args.devices),
           args=(config, checkpoints, subsets, args.save_path, args.verbose), port=args.port,
           timeout_s=config.dist_timeout_s)
