"""Convert downloaded RGB-X datasets into the layouts of our experiments.

``python -m smmcl.data.convert mfnet --src DIR --out DIR``: MFNet's release (Ha et al., IROS 2017:
``images/<name>.png`` holding R, G, B and thermal in one 4-channel PNG, ``labels/<name>.png``, list files
``train.txt``, ``val.txt``, ``test.txt`` and, in some copies, ``test_day.txt`` / ``test_night.txt``) becomes
``SMMCL_MFNet/config.py``'s layout: ``RGB/`` (3-channel PNG), ``Thermal/`` (1-channel PNG), ``Label/`` (the
label files as they are) and the lists ``train.txt``, ``val.txt``, ``train_val.txt`` (train then val, what
the experiment trains on), ``test.txt``, ``test_day.txt`` and ``test_night.txt`` (from the release's own
lists when it has them, else the test names ending in ``D`` / ``N``).

``python -m smmcl.data.convert rgbd --src DIR --out DIR [--intrinsics fx fy cx cy] [--depth-scale S]``: a
folder of colour images (``rgb/``, ``color/`` or ``image(s)/``; PNG or JPEG), 16-bit depth PNGs of the same
names (``depth/``) and, if present, label PNGs (``label(s)/``; 0 unlabelled, 1..40 the classes) becomes
``SMMCL_NYU/config.py``'s layout: ``RGB/<name>.jpg``, ``HHA/<name>.jpg`` (:mod:`smmcl.data.hha`),
``Label/<name>.png`` and ``train.txt`` / ``test.txt`` (lines ``RGB/<name>.jpg``, as CMX's NYU lists). Splits
come from ``train.txt`` / ``test.txt`` in the source (one given: the other is the rest); without either,
both list every item. Without labels only ``test.txt`` is written: such a folder serves prediction only.

``python -m smmcl.data.check SMMCL_MFNet/config.py --set dataset_path=OUT`` (or ``SMMCL_NYU``) then checks
the result; every converter error names the file and the fix.
"""
from __future__ import annotations

import argparse
import functools
import os
import os.path as osp
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import cv2
import numpy as np

from smmcl.data.dataset import DatasetError, read_list
from smmcl.data.hha import (DEPTH_SCALE, NYU_INTRINSICS, encode_hha, read_depth, warn_if_not_nyu_size,
                            write_hha)

JPEG_QUALITY = 95
COLOUR_DIRS = ('rgb', 'RGB', 'color', 'colour', 'image', 'images')
DEPTH_DIRS = ('depth', 'Depth')
LABEL_DIRS = ('label', 'labels', 'Label', 'Labels')
COLOUR_EXTENSIONS = ('.png', '.jpg', '.jpeg')


def _workers() -> int:
    return min(4, os.cpu_count() or 1)


def _for_each(convert_one: Callable[[str], None], names: Sequence[str], workers: int) -> None:
    """Run ``convert_one`` on every name (threads: OpenCV and NumPy release the GIL) and raise one
    :class:`DatasetError` with the problems of all of them."""
    def guarded(name):
        try:
            convert_one(name)
            return []
        except DatasetError as e:
            return e.problems
        except ValueError as e:  # read_depth and the like: their message names the file and the fix
            return [str(e)]

    with ThreadPoolExecutor(max(workers, 1)) as pool:
        problems = [p for item in pool.map(guarded, names) for p in item]
    if problems:
        raise DatasetError(problems)


def _write_list(path: str, lines: Iterable[str]) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        f.write(''.join(f'{line}\n' for line in lines))


def _imwrite(path: str, image: np.ndarray, params: Sequence[int] = ()) -> None:
    if not cv2.imwrite(path, image, list(params)):
        raise DatasetError(f'could not write {path}. Fix: check that the output folder is writable.')


def _listing(folder: str) -> str:
    entries = sorted(os.listdir(folder)) if osp.isdir(folder) else []
    return ', '.join(entries[:12]) + (', ...' if len(entries) > 12 else '') or 'nothing'


def _names_of(path: str, what: str) -> List[str]:
    if not osp.isfile(path):
        raise DatasetError(f'{what} list {path} does not exist ({osp.dirname(path)} holds: '
                           f'{_listing(osp.dirname(path))}). Fix: point --src at the folder holding it.')
    return read_list(path)


# MFNet ----------------------------------------------------------------------------------------------

def split_mfnet_image(path: str):
    """(BGR image H-W-3, thermal H-W) of one MFNet release image: a 4-channel 8-bit PNG whose fourth
    channel is the thermal image (OpenCV reads it as B, G, R, A).

    Raises:
        DatasetError: the file is missing, undecodable, or not 4 channels of 8 bits.
    """
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DatasetError(f'MFNet image {path} does not exist or cannot be decoded. Fix: copy it again '
                           f'from the release, or remove its name from the lists.')
    if image.ndim != 3 or image.shape[2] != 4 or image.dtype != np.uint8:
        channels = 1 if image.ndim == 2 else image.shape[2]
        raise DatasetError(f'MFNet image {path} has {channels} channel(s) of {image.dtype}, not the 4 of 8 '
                           f'bits (R, G, B, thermal) of the release. Fix: use the original images/ PNGs; '
                           f'an already split copy goes straight to SMMCL_MFNet (--set dataset_path=...).')
    return image[..., :3], image[..., 3]


def convert_mfnet(src: str, out: str, workers: int = _workers()) -> Dict[str, List[str]]:
    """Split MFNet's release in ``src`` into our layout in ``out`` (see the module docstring).

    Returns:
        {list file name: item names} of the lists written.

    Raises:
        DatasetError: with every problem found (missing lists, folders or files, images that are not
            4-channel).
    """
    images, labels = osp.join(src, 'images'), osp.join(src, 'labels')
    missing = [f'MFNet folder {d} does not exist ({src} holds: {_listing(src)}). Fix: --src must be the '
               f"release's folder with images/, labels/ and the list files."
               for d in (images, labels) if not osp.isdir(d)]
    if missing:
        raise DatasetError(missing)
    splits = {s: _names_of(osp.join(src, f'{s}.txt'), 'MFNet') for s in ('train', 'val', 'test')}
    for half, suffix in (('test_day', 'D'), ('test_night', 'N')):
        given = osp.join(src, f'{half}.txt')
        splits[half] = (read_list(given) if osp.isfile(given)
                        else [n for n in splits['test'] if n.endswith(suffix)])
    splits['train_val'] = splits['train'] + splits['val']

    for folder in ('RGB', 'Thermal', 'Label'):
        os.makedirs(osp.join(out, folder), exist_ok=True)

    def one(name):
        rgb, thermal = split_mfnet_image(osp.join(images, name + '.png'))
        label = osp.join(labels, name + '.png')
        if not osp.isfile(label):
            raise DatasetError(f"MFNet label {label} of item '{name}' does not exist. Fix: copy it from the "
                               f'release, or remove the name from the lists.')
        _imwrite(osp.join(out, 'RGB', name + '.png'), rgb)
        _imwrite(osp.join(out, 'Thermal', name + '.png'), thermal)
        shutil.copyfile(label, osp.join(out, 'Label', name + '.png'))

    every = ('train', 'val', 'test', 'test_day', 'test_night')
    names = list(dict.fromkeys(n for s in every for n in splits[s]))
    _for_each(one, names, workers)
    lists = {f'{s}.txt': splits[s] for s in ('train', 'val', 'train_val', 'test', 'test_day', 'test_night')}
    for file, items in lists.items():
        _write_list(osp.join(out, file), items)
    return lists


# Raw RGB-D -> NYU layout --------------------------------------------------------------------------

def _find_dir(src: str, given: Optional[str], candidates: Sequence[str]) -> Optional[str]:
    if given:
        return given if osp.isabs(given) else osp.join(src, given)
    return next((osp.join(src, c) for c in candidates if osp.isdir(osp.join(src, c))), None)


def _colour_files(folder: str) -> Dict[str, str]:
    """{name: file} of the colour images in ``folder``."""
    return {osp.splitext(f)[0]: f for f in sorted(os.listdir(folder))
            if osp.splitext(f)[1].lower() in COLOUR_EXTENSIONS}


def read_label(path: str) -> np.ndarray:
    """A label PNG as 8-bit class indices (a 16-bit file is accepted when its values fit in 8 bits).

    Raises:
        DatasetError: missing, undecodable, colour, or values above 255.
    """
    label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DatasetError(f'label {path} does not exist or cannot be decoded. Fix: add it (one label PNG '
                           f'per colour image, same name), or convert without the label folder.')
    if label.ndim != 2:
        raise DatasetError(f'label {path} has {label.shape[2]} channels: colour-coded labels are not class '
                           f'indices. Fix: save a 1-channel PNG of indices (0 unlabelled, 1..40 classes).')
    if label.max() > 255:
        raise DatasetError(f'label {path} holds values up to {int(label.max())}; the NYU layout takes 0 '
                           f'(unlabelled) and 1..40. Fix: map them first (NYU\'s 894 raw classes to the 40 '
                           f'of Gupta et al., e.g. with classMapping40.mat).')
    return label.astype(np.uint8)


def _rgbd_splits(src: str, names: List[str], labelled: bool) -> Dict[str, List[str]]:
    """{'train': names, 'test': names} from the source's lists (see the module docstring)."""
    given = {s: read_list(osp.join(src, f'{s}.txt')) for s in ('train', 'test')
             if osp.isfile(osp.join(src, f'{s}.txt'))}
    known = set(names)
    unknown = [f"'{n}' in {osp.join(src, s + '.txt')} has no colour image. Fix: remove it from the list or "
               f'add the image.' for s, items in given.items() for n in items if n not in known]
    if unknown:
        raise DatasetError(unknown)
    if not labelled:
        return {'test': given.get('test', names)}
    if not given:
        print(f'no train.txt / test.txt in {src}: both list all {len(names)} items; write them there to '
              f'split the data.')
        return {'train': names, 'test': names}
    for split, other in (('train', 'test'), ('test', 'train')):
        if split not in given:
            taken = set(given[other])
            given[split] = [n for n in names if n not in taken]
            if not given[split]:
                raise DatasetError(f'{osp.join(src, other + ".txt")} lists every item, so {split}.txt would '
                                   f'be empty. Fix: write {osp.join(src, split + ".txt")} as well.')
    return {'train': given['train'], 'test': given['test']}


def convert_rgbd(src: str, out: str, intrinsics: Sequence[float] = NYU_INTRINSICS,
                 depth_scale: float = DEPTH_SCALE, rgb_dir: Optional[str] = None,
                 depth_dir: Optional[str] = None, label_dir: Optional[str] = None,
                 raw_depth_dir: Optional[str] = None, workers: int = _workers()) -> Dict[str, List[str]]:
    """Convert a raw RGB-D folder ``src`` into the NYU layout in ``out`` (see the module docstring).

    Args:
        intrinsics: (fx, fy, cx, cy) of the depth maps, principal point 1-based (MATLAB).
        depth_scale: metres per stored depth unit.
        rgb_dir, depth_dir, label_dir: folder names under ``src`` (or absolute) instead of the usual ones.
        raw_depth_dir: raw depth maps when ``depth_dir`` holds hole-filled ones (their zeros are left out of
            the normal fits, as in saveHHA.m).

    Returns:
        {'train': names, 'test': names} (only 'test' for an unlabelled folder).

    Raises:
        DatasetError: with every problem found.
    """
    colour, depth, labels, raw = _rgbd_folders(src, rgb_dir, depth_dir, label_dir, raw_depth_dir)
    files = _colour_files(colour)
    if not files:
        raise DatasetError(f'colour folder {colour} holds no PNG or JPEG images (it holds: '
                           f'{_listing(colour)}). Fix: put the colour images there.')
    names = list(files)
    splits = _rgbd_splits(src, names, labels is not None)
    for folder in ('RGB', 'HHA') + (('Label',) if labels is not None else ()):
        os.makedirs(osp.join(out, folder), exist_ok=True)
    folders = dict(colour=colour, depth=depth, labels=labels, raw=raw)
    _for_each(functools.partial(_convert_rgbd_item, files=files, folders=folders, out=out, intrinsics=intrinsics,
                                depth_scale=depth_scale), names, workers)
    for split, items in splits.items():
        _write_list(osp.join(out, f'{split}.txt'), [f'RGB/{n}.jpg' for n in items])
    return splits


def _rgbd_folders(src, rgb_dir, depth_dir, label_dir, raw_depth_dir):
    """(colour, depth, labels or None, raw depth or None) folders of a raw RGB-D folder ``src``.

    Raises:
        DatasetError: with every missing folder.
    """
    colour = _find_dir(src, rgb_dir, COLOUR_DIRS)
    depth = _find_dir(src, depth_dir, DEPTH_DIRS)
    labels = _find_dir(src, label_dir, LABEL_DIRS)
    raw = _find_dir(src, raw_depth_dir, ()) if raw_depth_dir else None
    problems = []
    for what, folder, options, flag in (('colour', colour, COLOUR_DIRS, '--rgb-dir'),
                                        ('depth', depth, DEPTH_DIRS, '--depth-dir')):
        if folder is None or not osp.isdir(folder):
            problems.append(f'no {what} folder in {src} (it holds: {_listing(src)}). Fix: name it one of '
                            f'{", ".join(options)} or pass {flag} NAME.')
    if label_dir and not osp.isdir(labels):
        problems.append(f'label folder {labels} does not exist. Fix: check --label-dir.')
    if raw_depth_dir and not osp.isdir(raw):
        problems.append(f'raw depth folder {raw} does not exist. Fix: check --raw-depth-dir.')
    if problems:
        raise DatasetError(problems)
    return colour, depth, labels, raw


def _read_rgbd_item(name: str, files, folders, depth_scale: float):
    """(colour image, depth in metres, raw depth's holes or None, label or None, depth path) of one item.

    Raises:
        DatasetError: an unreadable image, or images of different sizes.
    """
    rgb_path = osp.join(folders['colour'], files[name])
    image = cv2.imread(rgb_path, cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f'colour image {rgb_path} cannot be decoded. Fix: copy it again or remove it.')
    depth_path = osp.join(folders['depth'], name + '.png')
    depth_m = read_depth(depth_path, depth_scale)
    sizes = {'colour': (rgb_path, image.shape[:2]), 'depth': (depth_path, depth_m.shape)}
    missing = label = None
    if folders['raw'] is not None:
        raw_path = osp.join(folders['raw'], name + '.png')
        raw_m = read_depth(raw_path, depth_scale)
        sizes['raw depth'] = (raw_path, raw_m.shape)
        missing = raw_m == 0
    if folders['labels'] is not None:
        label_path = osp.join(folders['labels'], name + '.png')
        label = read_label(label_path)
        sizes['label'] = (label_path, label.shape)
    if len({shape for _, shape in sizes.values()}) > 1:
        listed = ', '.join(f'{what} {path} is {s[0]}x{s[1]}' for what, (path, s) in sizes.items())
        raise DatasetError(f"item '{name}' has images of different sizes: {listed} (HxW). Fix: register "
                           f'the depth to the colour camera and save them at one size.')
    return image, depth_m, missing, label, depth_path


def _convert_rgbd_item(name: str, files, folders, out: str, intrinsics, depth_scale: float) -> None:
    """Write one item of a raw RGB-D folder in the NYU layout: RGB JPEG, HHA JPEG, label PNG."""
    image, depth_m, missing, label, depth_path = _read_rgbd_item(name, files, folders, depth_scale)
    warn_if_not_nyu_size(depth_m.shape, intrinsics, depth_path)
    out_rgb = osp.join(out, 'RGB', name + '.jpg')
    if files[name].lower().endswith(('.jpg', '.jpeg')):
        shutil.copyfile(osp.join(folders['colour'], files[name]), out_rgb)  # no second JPEG compression
    else:
        _imwrite(out_rgb, image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    write_hha(osp.join(out, 'HHA', name + '.jpg'), encode_hha(depth_m, intrinsics, missing), JPEG_QUALITY)
    if label is not None:
        _imwrite(osp.join(out, 'Label', name + '.png'), label)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description='Convert downloaded datasets into the SMMCL layouts.')
    commands = parser.add_subparsers(dest='dataset', required=True)
    mfnet = commands.add_parser('mfnet', help="MFNet's release (4-channel PNGs) -> SMMCL_MFNet's layout")
    rgbd = commands.add_parser('rgbd', help="colour + 16-bit depth (+ labels) -> SMMCL_NYU's layout, HHA")
    for command in (mfnet, rgbd):
        command.add_argument('--src', required=True, help='the downloaded folder')
        command.add_argument('--out', required=True, help='the folder to write (dataset_path)')
        command.add_argument('--workers', type=int, default=_workers())
    rgbd.add_argument('--intrinsics', nargs=4, type=float, default=list(NYU_INTRINSICS),
                      metavar=('FX', 'FY', 'CX', 'CY'),
                      help='depth camera in pixels, principal point 1-based (default: NYU Depth V2)')
    rgbd.add_argument('--depth-scale', type=float, default=DEPTH_SCALE, metavar='S',
                      help='metres per stored depth unit (default 0.001: millimetres)')
    rgbd.add_argument('--rgb-dir', help=f'colour folder under --src (default: the first of {COLOUR_DIRS})')
    rgbd.add_argument('--depth-dir', help=f'depth folder under --src (default: the first of {DEPTH_DIRS})')
    rgbd.add_argument('--label-dir', help=f'label folder under --src (default: the first of {LABEL_DIRS}; '
                                          f'none: unlabelled)')
    rgbd.add_argument('--raw-depth-dir', help='raw depth when --depth-dir holds hole-filled maps')
    args = parser.parse_args(argv)
    try:
        if args.dataset == 'mfnet':
            lists = convert_mfnet(args.src, args.out, args.workers)
            config = 'SMMCL_MFNet/config.py'
            summary = ', '.join(f'{f} {len(n)}' for f, n in lists.items())
        else:
            lists = convert_rgbd(args.src, args.out, args.intrinsics, args.depth_scale, args.rgb_dir,
                                 args.depth_dir, args.label_dir, args.raw_depth_dir, args.workers)
            config = 'SMMCL_NYU/config.py'
            summary = ', '.join(f'{s}.txt {len(n)}' for s, n in lists.items())
            if 'train' not in lists:
                summary += ' (no labels: for prediction only)'
    except DatasetError as e:
        for problem in e.problems:
            print(f'ERROR {problem}', file=sys.stderr)
        return 1
    print(f'wrote {args.out}: {summary}')
    print(f'check it with: python -m smmcl.data.check {config} --set dataset_path={osp.abspath(args.out)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
