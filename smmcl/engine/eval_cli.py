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
``Evaluator.run``), and ``<log_dir>/val_last.log`` links to it; the scores also go, as data, to the JSON
beside the log (``val_<...>.json``, :mod:`smmcl.engine.results`); the last line printed is
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

from smmcl import cli
from smmcl.config import ConfigError, load_config
from smmcl.data.dataset import DatasetError, RGBXDataset
from smmcl.engine.ahead import compile_ahead_of_evaluation
from smmcl.engine.checkpoint import CheckpointError, checkpoint_epoch
from smmcl.engine.dist import DistContext, launch, parse_devices
from smmcl.engine.evaluate import eval_workers, evaluate_per_image
from smmcl.engine.precision import ReusedInference, mixed_precision
from smmcl.engine.results import open_val_log, report, scores_path, subset_indices
from smmcl.engine.speed import resolve_speed
from smmcl.inference import check_output_folder, checked_weights, load_model, parse_epochs
from smmcl.visual import prediction_palette

logger = logging.getLogger('smmcl.eval')


def _evaluate_checkpoints(ctx: DistContext, config, checkpoints: Sequence[str], subsets: Dict[str, List[int]],
                          save_path: Optional[str], verbose: bool) -> None:
    """Every process: score each checkpoint on the test set and its subsets; rank 0 reports."""
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if verbose:  # per-image lines only from the evaluator (not PIL's or torch's debug output)
        logging.getLogger('smmcl.engine.evaluate').setLevel(logging.DEBUG)
    resolve_speed(config, ctx.device, 'eval', log=ctx.is_main)
    dataset = RGBXDataset(config, 'val')
    workers = eval_workers(config)
    final, model, inference = [], None, ReusedInference(config)
    if ctx.is_main:  # the authors open the log and link val_last.log before evaluating
        open_val_log(config)
        if save_path is not None:
            os.makedirs(save_path, exist_ok=True)  # the authors create the (empty) folder too
    for path in checkpoints:
        if model is None:
            model = load_model(config, path, ctx.device)
            compile_ahead_of_evaluation(model, dataset, config, ctx)  # with the Triton kernels: all at once
        else:  # into the same tensors: the CUDA graphs recorded for the first checkpoint replay for this one
            model.load_state_dict(checked_weights(config, path), strict=True)
        save_dir = None
        if save_path is not None:
            save_dir = save_path + '_color'
            if len(checkpoints) > 1:
                save_dir = osp.join(save_dir, osp.splitext(osp.basename(path))[0])
        if ctx.is_main:
            logger.info('Load Model: %s (%d test images, %d process(es))', path, len(dataset), ctx.world_size)
        amp, _ = mixed_precision(config, ctx.device)
        with amp:
            hists = evaluate_per_image(inference(model), dataset, config, ctx.device, ctx.rank,
                                       ctx.world_size, save_dir, num_workers=workers)
        if ctx.is_main:
            final.append((path, report(f'Model: {path}', hists, subsets, config, checkpoint=path,
                                       epoch=checkpoint_epoch(path))))
    if ctx.is_main:
        if len(final) > 1:
            best = max(final, key=lambda r: r[1])
            print(f'best: {best[0]} mIoU {best[1]:.3f}')
        print(f'results appended to {config.val_log_file} (as data: {scores_path(config)})')
        if save_path is not None:
            print(f'prediction PNGs written to {save_path}_color' + ('/<checkpoint>/' if len(checkpoints) > 1
                                                                     else '/'))
        print(f'mIoU: {final[-1][1]:.3f}', flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate SMMCL checkpoints (the authors' eval.py options).")
    cli.add_epochs(parser)
    cli.add_devices(parser)
    parser.add_argument('-v', '--verbose', action='store_true', help='log every image')
    parser.add_argument('-p', '--save_path', default=None,
                        help="write palette PNG predictions to SAVE_PATH + '_color'")
    cli.add_set(parser)
    cli.add_port(parser)
    cli.add_local_rank(parser)
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
        if args.save_path is not None:
            for folder in (args.save_path, args.save_path + '_color'):
                check_output_folder(folder, '-p')
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
