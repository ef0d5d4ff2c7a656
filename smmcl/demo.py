"""End-to-end demo on the CPU: synthetic dark LLRGBD -> train MSCAN-T -> evaluate -> pictures.

    python -m smmcl.demo [--out demo_out] [--epochs 20]              # make demo
    python -m smmcl.demo --ablation                                  # make ablation

Runs the experiment's own ``train.py`` and ``eval.py`` exactly as a user would (with ``--set``
overrides instead of edits), then draws RGB | X | ground truth | prediction for a few test images
(:mod:`smmcl.tools.figure`) into ``figs/demo.png`` and the t-SNE map of the contrastive embeddings
(:mod:`smmcl.tools.embeddings`) into ``figs/embeddings.png``, and prints the mIoU and the cross-modal
similarity numbers. The settings differ from the paper's only where a from-scratch CPU run needs it: the
small variant, no ImageNet weights, small crops, a higher learning rate and a short schedule.

``--ablation`` also trains the same model on the same data, from the same seed, without the contrastive
terms (``weight_cm = weight_vis = weight_aux = 0``: cross-entropy only), and prints both runs' numbers
side by side, with ``figs/ablation.png`` (both predictions) and ``figs/embeddings_ce_only.png``. A
finished ``make demo`` run of the same settings is reused, not trained again.
"""
from __future__ import annotations

import argparse
import os.path as osp
import glob
import subprocess
import sys
import time
from typing import List

from .config import REPO_ROOT, load_config
from .data.synthetic import generate
from .engine.results import read_scores

EXPERIMENT = osp.join(REPO_ROOT, 'SMMCL_LLRGBD')
CONFIG = osp.join(EXPERIMENT, 'config.py')
CE_ONLY = ['weight_cm=0', 'weight_vis=0', 'weight_aux=0']  # smmcl.config.base_config's loss weights
SETTINGS_FILE = 'demo_settings.txt'  # in a run's log folder once it has trained: what it was trained with


def run(script: str, args) -> str:
    """Run an experiment script, streaming its output; return the output. Exit on failure."""
    cmd = [sys.executable, osp.join(EXPERIMENT, script)] + [str(a) for a in args]
    print('$', ' '.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=EXPERIMENT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        sys.stdout.write(line)
    if proc.wait() != 0:
        sys.exit(f'demo: {script} failed with exit code {proc.returncode}')
    return ''.join(lines)


def train_and_evaluate(overrides: List[str], epochs: int, log_dir: str) -> float:
    """Train (unless ``log_dir`` already holds a finished run of these settings), evaluate; the mIoU (%)."""
    settings = '\n'.join(overrides) + '\n'
    stamp = osp.join(log_dir, SETTINGS_FILE)
    checkpoint = osp.join(log_dir, 'checkpoint', f'epoch-{epochs}.pth')
    if osp.isfile(checkpoint) and osp.isfile(stamp) and open(stamp).read() == settings:
        print(f'reusing the finished run in {log_dir} (same settings)', flush=True)
    else:
        run('train.py', ['--set'] + overrides)
        with open(stamp, 'w') as f:
            f.write(settings)
    run('eval.py', ['-e', str(epochs), '-p', osp.join(log_dir, 'pred'), '--set'] + overrides)
    # the scores as eval.py writes them as data (smmcl.engine.results): the newest evaluation's
    newest = max(glob.glob(osp.join(log_dir, 'val_2*.json')), key=osp.getmtime)
    return read_scores(newest)[-1]['mean_iou'] * 100


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('--out', default=osp.join(REPO_ROOT, 'demo_out'))
    parser.add_argument('--epochs', type=int, default=20)
    parser.add_argument('--train', type=int, default=64)
    parser.add_argument('--test', type=int, default=16)
    parser.add_argument('--height', type=int, default=120)
    parser.add_argument('--width', type=int, default=160)
    parser.add_argument('--ablation', action='store_true',
                        help='also train without the contrastive terms and compare (make ablation)')
    parser.add_argument('--figs', default=osp.join(REPO_ROOT, 'figs'), help='where the pictures go')
    args = parser.parse_args(argv)
    args.out, args.figs = osp.abspath(args.out), osp.abspath(args.figs)  # the scripts run in the experiment
    return args


def demo_settings(args, data_dir: str) -> List[str]:
    """The ``--set`` values of the demo's CPU run (the README's small run that learns)."""
    return ['backbone=mscan_t', 'pretrained_model=None', f'dataset_path={data_dir}',
            f'num_train_imgs={args.train}', f'num_eval_imgs={args.test}', 'batch_size=8',
            f'nepochs={args.epochs}', 'lr=2e-3', 'warm_up_epoch=1', f'image_height={args.height}',
            f'image_width={args.width}', f'eval_crop_size=[{args.height},{args.width}]',
            f'checkpoint_start_epoch={args.epochs}', 'num_workers=2']


def run_and_measure(name: str, overrides: List[str], args, embeddings) -> dict:
    """Train and evaluate one run, map its embeddings; its mIoU, similarities, config and checkpoint."""
    config = load_config(CONFIG, overrides)
    miou = train_and_evaluate(overrides, args.epochs, config.log_dir)
    suffix = '' if name == 'SMMCL' else '_ce_only'
    numbers = embeddings.run(config, str(args.epochs), images=args.test, per_class=100,
                             out=osp.join(args.figs, f'embeddings{suffix}.png'), title=name)
    print(f'\n{name}: cross-modal cosine similarity of the stage-4 embeddings')
    print(embeddings.format_similarity(numbers, config.class_names, numbers['counts']))
    checkpoint = osp.join(config.checkpoint_dir, f'epoch-{args.epochs}.pth')
    return dict(miou=miou, same=numbers['same'], different=numbers['different'], config=config,
                checkpoint=checkpoint)


def print_summary(results: dict, args, pictures: List[str], seconds: float) -> None:
    chance = 100.0 / 14
    print(f'\ndemo done in {seconds:.0f} s ({args.epochs} epochs of {args.train} images, '
          f'{args.test} test images; chance mIoU is about {chance:.1f}%)')
    width = 28
    print(f'{"":<{width}}' + ''.join(f'{name:>12}' for name in results))
    for key, label, fmt in (('miou', 'mIoU (%)', '{:12.2f}'),
                            ('same', 'cross-modal cos, same class', '{:12.3f}'),
                            ('different', 'cross-modal cos, other class', '{:12.3f}')):
        print(f'{label:<{width}}' + ''.join(fmt.format(r[key]) for r in results.values()))
    print('pictures: ' + ', '.join(pictures))
    if not args.ablation:
        print('the same model without the contrastive terms, side by side: make ablation '
              '(python -m smmcl.demo --ablation; reuses this run)')


def main(argv=None) -> dict:
    args = parse_args(argv)
    # The tools import scikit-learn etc. and the model; only here, so `--help` stays instant.
    from .tools import embeddings, figure

    start = time.time()
    data_dir = osp.join(args.out, 'LLRGBD')
    generate('LLRGBD', data_dir, n_train=args.train, n_test=args.test, height=args.height,
             width=args.width, seed=0)
    print(f'synthetic LLRGBD: {args.train} train / {args.test} test images of {args.height}x{args.width} '
          f'in {data_dir}')
    common = demo_settings(args, data_dir)
    runs = {'SMMCL': common + [f'log_dir={osp.join(args.out, "log")}']}
    if args.ablation:
        runs['CE only'] = common + CE_ONLY + [f'log_dir={osp.join(args.out, "log_ce_only")}']
    results = {name: run_and_measure(name, overrides, args, embeddings) for name, overrides in runs.items()}
    smmcl_config = results['SMMCL']['config']
    pictures = [osp.join(args.figs, 'demo.png'), osp.join(args.figs, 'embeddings.png')]
    figure.draw_figure(smmcl_config, [results['SMMCL']['checkpoint']], titles=['prediction'], out=pictures[0])
    if args.ablation:
        pictures[1:] = [pictures[1], osp.join(args.figs, 'embeddings_ce_only.png'),
                        osp.join(args.figs, 'ablation.png')]
        figure.draw_figure(smmcl_config, [r['checkpoint'] for r in results.values()],
                           titles=[f'{name} prediction' for name in results], out=pictures[-1])
    print_summary(results, args, pictures, time.time() - start)
    return {name: {k: v for k, v in r.items() if k in ('miou', 'same', 'different')}
            for name, r in results.items()}


if __name__ == '__main__':
    main()
