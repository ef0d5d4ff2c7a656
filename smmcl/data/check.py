"""Check an SMMCL dataset on disk before any GPU time is spent.

``python -m smmcl.data.check SMMCL_NYU/config.py [--set key=value ...] [--split train|val|all]`` reads
every item of the experiment's splits and lists every problem (the file, what is wrong, the fix); it
exits with 1 if there is any, else prints a summary (items per split, image sizes, label histogram) and
exits with 0. The full scan also refuses a 3-channel X read as one channel (:func:`x_channel_problems`). :func:`quick_check` is the cheap part run at training start: folders and list files exist
and are non-empty, and every listed file exists (no decoding). Both use the per-item checks of
``smmcl.data.dataset``, so they find exactly what the dataset would raise. A folder without a label folder
(:func:`is_unlabelled`) gets what prediction needs checked (the test list, RGB and X) and is reported as
one that cannot be trained on or scored.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import os.path as osp
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Sequence

import cv2
import numpy as np

from smmcl import cli
from smmcl.config import ConfigError, load_config
from smmcl.data.dataset import (DatasetError, SplitLayout, _missing_message, decode_image, folder_names,
                                load_item, missing_files, read_file, read_list, split_layout, split_names)


def split_layouts(config, split: str) -> List[SplitLayout]:
    """The layout of ``split`` plus, for 'val', one per evaluation subset whose list file names images
    (the subsets are optional: a missing or empty list, e.g. a test set without night images, is no
    problem)."""
    layouts = [split_layout(config, split)]
    if split == 'val':
        layouts += [split_layout(config, 'val', source)
                    for source in config.eval_subset_sources.values() if _names_images(source)]
    return layouts


def _names_images(source: str) -> bool:
    return osp.isfile(source) and bool(read_list(source))


def quick_check(config, splits: Sequence[str] = ('train', 'val')) -> None:
    """Folders, list files and the existence of every listed file, for training start.

    Raises:
        DatasetError: with every problem found.
    """
    problems = []
    for split in splits:
        for layout in split_layouts(config, split):
            try:
                names = split_names(config, layout)
            except DatasetError as e:
                problems += e.problems
                continue
            for name in names:
                problems += missing_files(layout, name)
    if problems:
        raise DatasetError(list(dict.fromkeys(problems)))  # splits sharing a folder report it once


def x_channel_problems(path: str, config) -> List[str]:
    """A message when X file ``path`` has distinct colour channels but the config reads X as one channel.

    With ``x_is_single_channel=True`` X is read in greyscale (as the authors' loader does), which keeps
    only the luminance of a 3-channel modality such as HHA: no error anywhere, just a worse model. A
    colour file whose channels are equal (grey saved as RGB) is fine. Costs a second decode, so it is
    part of the full scan only, not of the training-time loading. (The opposite case, a 1-channel file
    with ``x_is_single_channel=False``, is replicated to 3 channels: the intent is clear.)
    """
    if not config.x_is_single_channel:
        return []
    x = cv2.imread(path, cv2.IMREAD_COLOR)
    if x is None or (np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])):
        return []
    return [f'X file {path} has 3 different colour channels, but x_is_single_channel=True reads X as one '
            f'(greyscale) channel and drops the rest. Fix: --set x_is_single_channel=False if X is a '
            f'3-channel modality (e.g. HHA), or save X as 1-channel images.']


def _inspect(layout: SplitLayout, name: str, config):
    """(problems, image size, label histogram) of one item."""
    try:
        _, gt, _ = load_item(layout, name, config)
    except DatasetError as e:
        return e.problems, None, None
    problems = x_channel_problems(layout.paths(name)[1], config)
    return problems, gt.shape, np.bincount(gt.ravel(), minlength=256)


def scan(config, splits: Sequence[str] = ('train', 'val'), workers: int = 4):
    """Read and check every item of ``splits``.

    Returns:
        problems (list of messages) and, per split, a summary dict with ``items``, ``sizes`` (Counter of
        (H, W)) and ``histogram`` (256 pixel counts of label values after the gt_transform shift).
    """
    problems, summaries = [], {}
    with ThreadPoolExecutor(max(workers, 1)) as pool:  # cv2 decodes without the GIL
        for split in splits:
            layout, *subsets = split_layouts(config, split)
            try:
                names = split_names(config, layout)
            except DatasetError as e:
                problems += e.problems
                continue
            summary = summaries[split] = dict(items=len(names), sizes=collections.Counter(),
                                              histogram=np.zeros(256, np.int64), source=layout.source,
                                              notes=list_notes(config, layout, names))
            for item_problems, size, hist in pool.map(lambda n: _inspect(layout, n, config), names):
                problems += item_problems
                if size is not None:
                    summary['sizes'][size] += 1
                    summary['histogram'] += hist
            for subset in subsets:  # their items are test items: check the list and that files exist
                try:
                    problems += [p for n in split_names(config, subset) for p in missing_files(subset, n)]
                except DatasetError as e:
                    problems += e.problems
    return list(dict.fromkeys(problems)), summaries  # splits sharing a folder report it once


def list_notes(config, layout: SplitLayout, names: Sequence[str]) -> List[str]:
    """Where a split's list file and its folder disagree without an error: the list is absent and the
    folder is used (``lists_optional``), or the split's own folder holds images the list leaves out.
    (Listed files that are missing are problems, :func:`missing_files`; a folder shared by several
    splits, as MFNet's, naturally holds images other lists name.)"""
    if layout.absent_list:
        return [f'list file {layout.absent_list} does not exist: every image of {layout.rgb_dir} is used, '
                f'sorted by name (lists_optional=True); with the list the order of images differs']
    if not layout.source or osp.abspath(layout.root) == osp.abspath(config.dataset_path):
        return []
    unlisted = sorted(set(folder_names(layout)) - set(names))
    if not unlisted:
        return []
    return [f'{len(unlisted)} image(s) of {layout.rgb_dir} are not listed in {layout.source} and are not '
            f'used (e.g. {", ".join(unlisted[:3])}); add them to the list if they belong to the split']


def is_unlabelled(config) -> bool:
    """True for a folder without labels (e.g. ``smmcl.data.convert rgbd`` of unlabelled RGB-D): the test
    split's RGB and X folders exist and its label folder does not."""
    layout = split_layout(config, 'val')
    return osp.isdir(layout.rgb_dir) and osp.isdir(layout.x_dir) and not osp.exists(layout.gt_dir)


def _inspect_unlabelled(layout: SplitLayout, name: str, config):
    """(problems, image size) of one item's RGB and X: what prediction needs."""
    problems, sizes = [], []
    rgb_path, x_path, _ = layout.paths(name)
    x_flag = cv2.IMREAD_GRAYSCALE if config.x_is_single_channel else cv2.IMREAD_COLOR
    for what, path, flag in (('RGB', rgb_path, cv2.IMREAD_COLOR), ('X', x_path, x_flag)):
        image = decode_image(read_file(path), flag)
        if image is None:
            problems.append(_missing_message(layout, name, what, path) if not osp.exists(path) else
                            f"{what} file {path} of item '{name}' cannot be decoded. Fix: copy it again, "
                            f"or remove '{name}' from {layout.source or 'the RGB folder'}.")
        else:
            sizes.append(image.shape[:2])
    if problems:
        return problems, None
    if sizes[0] != sizes[1]:
        return [f"item '{name}' has RGB {rgb_path} of {sizes[0][0]}x{sizes[0][1]} but X {x_path} of "
                f'{sizes[1][0]}x{sizes[1][1]} (HxW). Fix: the two must be aligned and of one size.'], None
    return x_channel_problems(x_path, config), sizes[0]


def scan_unlabelled(config, workers: int = 4):
    """Check the test split of an unlabelled folder (:func:`is_unlabelled`) for prediction: list file,
    RGB and X of every item (decoded, one size, X channels). Returns (problems, {'val': summary})."""
    layout = split_layout(config, 'val')
    layout = dataclasses.replace(layout, gt_dir=layout.rgb_dir)  # split_names then skips the label folder
    try:
        names = split_names(config, layout)
    except DatasetError as e:
        return e.problems, {}
    summary = dict(items=len(names), sizes=collections.Counter(), source=layout.source)
    problems = []
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for item_problems, size in pool.map(lambda n: _inspect_unlabelled(layout, n, config), names):
            problems += item_problems
            if size is not None:
                summary['sizes'][size] += 1
    return problems, {'val': summary}


def format_summary(config, summaries: Dict[str, dict]) -> str:
    names = list(config.class_names or [])
    lines = []
    for split, s in summaries.items():
        sizes = ', '.join(f'{h}x{w} ({n})' for (h, w), n in s['sizes'].most_common())
        source = s['source'] or 'the RGB folder'
        lines.append(f"{split}: {s['items']} items from {source}; sizes (HxW): {sizes}")
        hist = s['histogram']
        total = max(int(hist.sum()), 1)
        present = [c for c in range(config.num_classes) if hist[c]]
        absent = [c for c in range(config.num_classes) if not hist[c]]
        lines.append(f'  {len(present)}/{config.num_classes} classes present; ignore (255): '
                     f'{100 * hist[255] / total:.2f}% of pixels')
        for c in present:
            label = f' {names[c]}' if c < len(names) else ''
            lines.append(f'  {c:3d}{label}: {100 * hist[c] / total:.2f}%')
        if absent:
            lines.append(f'  absent: {absent}')
        lines += [f'  NOTE {note}' for note in s.get('notes', [])]
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description='Check an SMMCL dataset: list every problem or summarise.')
    parser.add_argument('config', help="an experiment's config.py, e.g. SMMCL_NYU/config.py")
    cli.add_set(parser)
    parser.add_argument('--split', choices=('train', 'val', 'all'), default='all')
    parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
    except (ConfigError, FileNotFoundError) as exc:  # the user's to fix: one line, no traceback
        print(f'error: {exc}', file=sys.stderr)
        raise SystemExit(1)
    splits = ('train', 'val') if args.split == 'all' else (args.split,)
    unlabelled = is_unlabelled(config)
    if unlabelled:
        problems, summaries = scan_unlabelled(config, args.workers)
    else:
        problems, summaries = scan(config, splits, args.workers)
    if problems:
        if unlabelled:
            print('No label folder: checked what prediction needs (the test list, RGB and X).')
        print(f'{len(problems)} problem(s) in {config.dataset_name} at {config.dataset_path}:')
        for p in problems:
            print(f'ERROR {p}')
        for note in (n for s in summaries.values() for n in s.get('notes', [])):
            print(f'NOTE {note}')
        return 1
    print(f'{config.dataset_name} at {config.dataset_path}: no problems.')
    if unlabelled:
        s = summaries['val']
        sizes = ', '.join(f'{h}x{w} ({n})' for (h, w), n in s['sizes'].most_common())
        print(f"test: {s['items']} items from {s['source'] or 'the RGB folder'}; sizes (HxW): {sizes}")
        print(f'No label folder ({split_layout(config, "val").gt_dir}): RGB and X are ready for prediction, '
              f'but this folder cannot be trained on or scored. If it has labels under another name, '
              f'--set gt_folder=<name>.')
        return 0
    print(format_summary(config, summaries))
    return 0


if __name__ == '__main__':
    sys.exit(main())
