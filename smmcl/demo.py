"""End-to-end demo on the CPU: synthetic dark LLRGBD -> train MSCAN-T -> evaluate -> figure.

    python -m smmcl.demo [--out demo_out] [--epochs 20]

Runs the experiment's own ``train.py`` and ``eval.py`` exactly as a user would (with ``--set``
overrides instead of edits), then draws RGB | X | ground truth | prediction for a few test images
into ``figs/demo.png``. The settings differ from the paper's only where a from-scratch CPU run needs
it: the small variant, no ImageNet weights, small crops, a higher learning rate and a short schedule.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import re
import subprocess
import sys
import time

import cv2
import numpy as np
from PIL import Image

from .config import REPO_ROOT
from .data.synthetic import generate

EXPERIMENT = osp.join(REPO_ROOT, 'SMMCL_LLRGBD')


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


def figure(data_dir: str, pred_dir: str, out_path: str, count: int = 4) -> None:
    """Rows of RGB | X | ground truth | prediction; label maps use the prediction files' palette."""
    names = sorted(f[:-4] for f in os.listdir(pred_dir) if f.endswith('.png'))[:count]
    rows = []
    for name in names:
        rgb = cv2.imread(osp.join(data_dir, 'test', 'rgb', name + '.png'), cv2.IMREAD_COLOR)
        depth = cv2.imread(osp.join(data_dir, 'test', 'depth', name + '.png'), cv2.IMREAD_GRAYSCALE)
        gt = cv2.imread(osp.join(data_dir, 'test', 'label', name + '.png'), cv2.IMREAD_GRAYSCALE)
        pred = Image.open(osp.join(pred_dir, name + '.png'))
        palette = pred.getpalette()
        gt_img = Image.fromarray(gt, mode='P')
        gt_img.putpalette(palette)
        to_bgr = lambda im: cv2.cvtColor(np.asarray(im.convert('RGB')), cv2.COLOR_RGB2BGR)
        depth_vis = cv2.applyColorMap(cv2.normalize(depth, None, 0, 255, cv2.NORM_MINMAX), cv2.COLORMAP_VIRIDIS)
        panels = [rgb, depth_vis, to_bgr(gt_img), to_bgr(pred)]
        rows.append(np.concatenate([np.pad(p, ((2, 2), (2, 2), (0, 0)), constant_values=255) for p in panels], 1))
    grid = np.concatenate(rows, 0)
    header = np.full((24, grid.shape[1], 3), 255, np.uint8)
    width = grid.shape[1] // 4
    for i, title in enumerate(['RGB (dark)', 'X (depth)', 'ground truth', 'prediction']):
        cv2.putText(header, title, (i * width + 6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    os.makedirs(osp.dirname(out_path), exist_ok=True)
    cv2.imwrite(out_path, np.concatenate([header, grid], 0))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('--out', default=osp.join(REPO_ROOT, 'demo_out'))
    parser.add_argument('--epochs', type=int, default=20)
    parser.add_argument('--train', type=int, default=64)
    parser.add_argument('--test', type=int, default=16)
    parser.add_argument('--height', type=int, default=120)
    parser.add_argument('--width', type=int, default=160)
    parser.add_argument('--figure', default=osp.join(REPO_ROOT, 'figs', 'demo.png'))
    args = parser.parse_args(argv)
    start = time.time()
    data_dir = osp.join(args.out, 'LLRGBD')
    generate('LLRGBD', data_dir, n_train=args.train, n_test=args.test, height=args.height,
             width=args.width, seed=0)
    print(f'synthetic LLRGBD: {args.train} train / {args.test} test images of {args.height}x{args.width} '
          f'in {data_dir}')
    overrides = [
        'backbone=mscan_t', 'pretrained_model=None', f'dataset_path={data_dir}',
        f'log_dir={osp.join(args.out, "log")}', f'num_train_imgs={args.train}',
        f'num_eval_imgs={args.test}', 'batch_size=8', f'nepochs={args.epochs}', 'lr=2e-3',
        'warm_up_epoch=1', f'image_height={args.height}', f'image_width={args.width}',
        f'eval_crop_size=[{args.height},{args.width}]', f'checkpoint_start_epoch={args.epochs}',
        'num_workers=2',
    ]
    run('train.py', ['--set'] + overrides)
    pred_dir = osp.join(args.out, 'pred')
    output = run('eval.py', ['-e', str(args.epochs), '-p', pred_dir, '--set'] + overrides)
    match = re.findall(r'mIoU:\s*([0-9.]+)', output)
    miou = float(match[-1]) if match else float('nan')
    figure(data_dir, pred_dir + '_color', args.figure)  # eval.py -p DIR writes DIR_color/, as the authors'
    chance = 100.0 / 14
    print(f'\ndemo done in {time.time() - start:.0f} s: mIoU {miou:.2f}% on the synthetic test set '
          f'(chance is about {chance:.1f}%); figure: {args.figure}')
    return miou


if __name__ == '__main__':
    main()
