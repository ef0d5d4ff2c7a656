"""``python predict.py -e 300 --rgb night.png --x night_depth.png -o out/``: segment your own images.

The experiment folders' ``predict.py`` call :func:`main` with their ``config.py``. Images are read as the
dataset reads them and predicted as ``eval.py`` predicts (:class:`smmcl.inference.Segmenter`).

- ``-e/--epoch``: one checkpoint, as ``eval.py -e`` names it: ``300`` (``<checkpoint_dir>/epoch-300.pth``),
  ``last`` (default) or a ``.pth`` file (ours or the authors');
- ``--rgb`` / ``--x``: two image files; or two folders, paired by file stem (``rgb/0001.png`` with
  ``depth/0001.png``, any of the dataset image extensions), in sorted stem order; or two list files
  (``.txt``, ``.lst``, ``.list``), one image path a line (relative to the list file's folder, blank lines
  skipped), paired line by line. Image ``i`` of that order has the NMF seed ``config.seed + i``, as
  ``eval.py`` gives the test set's ``i``-th image: list the images in the test set's order to get
  ``eval.py -p``'s predictions;
- ``-o/--out DIR``: per image (named by the RGB file's stem) ``<stem>.png`` the class ids (8-bit grey
  PNG), ``<stem>_color.png`` the dataset's colours (palette PNG, as ``eval.py -p``), ``<stem>_overlay.png``
  the colours blended half-and-half over the gamma-lifted RGB image;
- ``-d/--device``: ``cpu`` or one GPU index (``0``); default the first GPU when there is one (a GPU
  asked for without CUDA falls back to the CPU with a warning, as ``eval.py``);
- ``--set key=value ...``: config overrides (``eval_scale_array``, ``eval_flip``, ``fast_path`` ...).

Images of any size. A bad input (missing or unreadable image, RGB and X of different sizes, unpaired
files, a checkpoint of another backbone or class count) stops with exit status 1 and one message naming
the file.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from smmcl import cli
from smmcl.config import ConfigError, load_config
from smmcl.data.dataset import IMAGE_EXTENSIONS, DatasetError
from smmcl.engine.checkpoint import CheckpointError
from smmcl.inference import Segmenter, check_output_folder, default_device, read_images
from smmcl.visual import overlay, prediction_palette, save_prediction

LIST_EXTENSIONS = ('.txt', '.lst', '.list')

Pair = Tuple[str, str]  # (rgb path, x path)


def _kind(path: str) -> str:
    if osp.isdir(path) or path.endswith(('/', os.sep)):
        return 'a folder'
    if osp.splitext(path)[1].lower() in LIST_EXTENSIONS:
        return 'a list file'
    return 'an image'


def _images_by_stem(folder: str, what: str) -> Dict[str, str]:
    if not osp.isdir(folder):
        raise FileNotFoundError(f'{what} folder {folder} does not exist')
    found: Dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = osp.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem in found:
            raise DatasetError(f'{what} folder {folder} holds two images of stem {stem!r} '
                               f'({osp.basename(found[stem])} and {name}); keep one, the outputs are named '
                               f'by stem')
        found[stem] = osp.join(folder, name)
    if not found:
        raise DatasetError(f'{what} folder {folder} holds no images ({", ".join(IMAGE_EXTENSIONS)})')
    return found


def _shown(paths: Sequence[str], limit: int = 10) -> str:
    return ', '.join(paths[:limit]) + (f' and {len(paths) - limit} more' if len(paths) > limit else '')


def folder_pairs(rgb_dir: str, x_dir: str) -> List[Pair]:
    """(rgb, x) paths of the images of two folders with the same stem, in sorted stem order.

    Raises:
        FileNotFoundError: a folder does not exist.
        DatasetError: a folder holds no images or two of one stem, or some images have no partner (all
            listed).
    """
    rgb, x = _images_by_stem(rgb_dir, 'RGB'), _images_by_stem(x_dir, 'X')
    lonely_rgb = [rgb[s] for s in sorted(rgb.keys() - x.keys())]
    lonely_x = [x[s] for s in sorted(x.keys() - rgb.keys())]
    if lonely_rgb or lonely_x:
        parts = ([f'RGB images without an X image of the same stem in {x_dir}: {_shown(lonely_rgb)}']
                 if lonely_rgb else [])
        parts += ([f'X images without an RGB image of the same stem in {rgb_dir}: {_shown(lonely_x)}']
                  if lonely_x else [])
        raise DatasetError(f'unpaired images ({len(lonely_rgb) + len(lonely_x)}): ' + '; '.join(parts)
                           + '. Fix: pairs share a file stem (rgb/0001.png with x/0001.png); add or remove '
                             'those files')
    return [(rgb[s], x[s]) for s in sorted(rgb)]


def _read_list_file(path: str, what: str) -> List[str]:
    if not osp.isfile(path):
        raise FileNotFoundError(f'{what} list file {path} does not exist')
    try:
        with open(path, encoding='utf-8-sig') as f:
            lines = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise DatasetError(f'{what} list file {path} is not UTF-8 text; write one image path a '
                           f'line') from None
    if not lines:
        raise DatasetError(f'{what} list file {path} is empty; write one image path a line')
    return [osp.join(osp.dirname(path), line) for line in lines]  # an absolute line stays as it is


def list_pairs(rgb_list: str, x_list: str) -> List[Pair]:
    """(rgb, x) paths of two list files, paired line by line.

    Raises:
        FileNotFoundError: a list file does not exist.
        DatasetError: a list is empty or not UTF-8, or the two hold different numbers of lines.
    """
    rgb, x = _read_list_file(rgb_list, 'RGB'), _read_list_file(x_list, 'X')
    if len(rgb) != len(x):
        raise DatasetError(f'RGB list file {rgb_list} names {len(rgb)} images but X list file {x_list} names '
                           f'{len(x)}; the lists pair line by line')
    return list(zip(rgb, x))


def image_pairs(rgb: str, x: str) -> List[Pair]:
    """The (rgb, x) image paths ``--rgb`` and ``--x`` name: two images, two folders or two list files
    (see the module docstring), each file checked to exist.

    Raises:
        ConfigError: the two are of different kinds.
        FileNotFoundError: a named folder, list or image does not exist (names it).
        DatasetError: unpaired images, or two RGB images of one stem (their outputs would collide).
    """
    kinds = _kind(rgb), _kind(x)
    if kinds[0] != kinds[1]:
        raise ConfigError(f'--rgb {rgb} is {kinds[0]} but --x {x} is {kinds[1]}; give two images, two '
                          f'folders or two list files ({", ".join(LIST_EXTENSIONS)})')
    if kinds[0] == 'a folder':
        return folder_pairs(rgb, x)
    pairs = list_pairs(rgb, x) if kinds[0] == 'a list file' else [(rgb, x)]
    missing = [f'{what} image {path}' for pair in pairs for what, path in zip(('RGB', 'X'), pair)
               if not osp.isfile(path)]
    if missing:
        listed = f' (listed in {rgb} / {x})' if kinds[0] == 'a list file' else ''
        raise FileNotFoundError(f'{missing[0]} does not exist{listed}' if len(missing) == 1 else
                                f'{len(missing)} images do not exist{listed}: {_shown(missing, 5)}')
    stems: Dict[str, str] = {}
    for path, _ in pairs:
        stem = output_stem(path)
        if stem in stems:
            raise DatasetError(f'RGB images {stems[stem]} and {path} share the stem {stem!r}: their outputs '
                               f'would overwrite each other; rename one')
        stems[stem] = path
    return pairs


def output_stem(rgb_path: str) -> str:
    return osp.splitext(osp.basename(rgb_path))[0]


def parse_device(text: Optional[str]) -> torch.device:
    """``-d``: None -> :func:`smmcl.inference.default_device`; ``'cpu'``; a GPU index ``'1'`` (or
    ``'cuda:1'``). Without CUDA a GPU falls back to the CPU with a warning (as ``eval.py``).

    Raises:
        ConfigError: none of these, or a GPU index this machine does not have.
    """
    if text is None:
        return default_device()
    text = str(text).strip().lower()
    try:
        device = torch.device(f'cuda:{text}' if text.isdigit() else text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise ConfigError(f"-d {text!r}: expected 'cpu' or one GPU index such as 0 (predict.py runs on one "
                          f'device)')
    if device.type == 'cuda' and not torch.cuda.is_available():
        warnings.warn(f'no GPU available: running on the CPU instead of -d {text}')
        return torch.device('cpu')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f'-d {text}: this machine has {torch.cuda.device_count()} GPU(s), 0 to '
                          f'{torch.cuda.device_count() - 1}')
    return device


def write_outputs(out_dir: str, stem: str, rgb: np.ndarray, classes: np.ndarray, palette: List[int]) -> None:
    """``<stem>.png`` (class ids), ``<stem>_color.png`` (palette PNG) and ``<stem>_overlay.png`` in
    ``out_dir``; ``rgb`` H-W-3 uint8 in RGB order, ``classes`` H-W."""
    ids = np.ascontiguousarray(classes, dtype=np.uint8)
    Image.fromarray(ids).save(osp.join(out_dir, f'{stem}.png'))
    save_prediction(ids, osp.join(out_dir, f'{stem}_color.png'), palette)
    Image.fromarray(overlay(rgb, ids, palette)).save(osp.join(out_dir, f'{stem}_overlay.png'))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Segment your own RGB-X images with an SMMCL checkpoint.')
    cli.add_checkpoint(parser)
    parser.add_argument('--rgb', required=True, help='an RGB image, a folder of them or a list file')
    parser.add_argument('--x', required=True, help='the X image(s) (depth, HHA, thermal), as --rgb')
    parser.add_argument('-o', '--out', required=True, help='output folder')
    cli.add_device(parser)
    cli.add_set(parser)
    return parser


def main(config_path: str, argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv``, predict every image pair, write the outputs (see the module docstring).

    Exits with status 1 and a one-line reason naming the file for a bad option, image or checkpoint.
    """
    args = build_parser().parse_args(argv)
    count = 0
    try:
        config = load_config(config_path, args.set)
        check_output_folder(args.out, '-o')
        pairs = image_pairs(args.rgb, args.x)
        device = parse_device(args.device)
        segmenter = Segmenter.from_checkpoint(config, args.epoch, device)  # its run's settings (adopted)
        if int(config.num_classes) > 256:
            raise ConfigError(f'num_classes={config.num_classes}: the outputs are 8-bit PNGs (256 classes)')
        palette = prediction_palette(config.class_colors)
        os.makedirs(args.out, exist_ok=True)
        for index, (rgb_path, x_path) in enumerate(tqdm(pairs, desc='predict', unit='image', disable=None)):
            rgb, x = read_images(rgb_path, x_path, config)
            classes = segmenter(rgb, x, index=index, channel_order='bgr')
            write_outputs(args.out, output_stem(rgb_path), np.ascontiguousarray(rgb[..., ::-1]), classes,
                          palette)
            count += 1
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError) as exc:  # the user's to fix
        print(f'error: {exc}', file=sys.stderr)
        raise SystemExit(1)
    print(f'{count} predictions written to {args.out}', flush=True)
