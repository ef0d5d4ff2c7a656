"""RGB-X segmentation datasets of SMMCL (Dong & Yokoya, WACV 2024): LLRGBD, MFNet, NYU Depth V2.

The authors' ``RGBXDataset`` (CMX ``dataloader/RGBXDataset.py``) with the same items and file layout
(``<split root>/<folder>/<name><format>`` for RGB, X and label), plus early, explicit errors: every
problem a dataset can have (missing folder, list or file, unreadable image, mismatched sizes, a label
PNG that an 8-bit read changes, label values outside the classes) raises :class:`DatasetError` with a
message naming the file and the fix.
The per-item checks live here, in :func:`split_names`, :func:`missing_files` and :func:`load_item`, and
are shared by the dataset, ``smmcl.data.check`` (scans everything) and ``quick_check`` (training start).
"""
from __future__ import annotations

import functools
import logging
import os
import os.path as osp
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from smmcl.data.transforms import train_transform
from smmcl.errors import DatasetError  # noqa: F401  (re-exported)

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
SPLITS = ('train', 'val')
IGNORE_LABEL = 255
logger = logging.getLogger(__name__)
_NOTED_ABSENT_LISTS = set()  # list files whose absence this process has logged (once each)


@dataclass(frozen=True)
class SplitLayout:
    """Where one split's files are: ``<rgb_dir>/<name><rgb_format>`` and so on."""
    split: str
    root: str
    rgb_dir: str
    x_dir: str
    gt_dir: str
    rgb_format: str
    x_format: str
    gt_format: str
    source: Optional[str]  # list file; None: every image of rgb_dir
    absent_list: Optional[str] = None  # the configured list file that does not exist (lists_optional)

    def paths(self, name: str) -> Tuple[str, str, str]:
        """(rgb, x, label) paths of item ``name``."""
        return (osp.join(self.rgb_dir, name + self.rgb_format), osp.join(self.x_dir, name + self.x_format),
                osp.join(self.gt_dir, name + self.gt_format))

    def listed_in(self) -> str:
        return f'listed in {self.source}' if self.source else f'an image of {self.rgb_dir}'


def split_layout(config, split: str, source: Optional[str] = None) -> SplitLayout:
    """The layout of ``split`` ('train' or 'val'); ``source`` replaces the split's list file.

    Train uses ``config.rgb_root_folder`` / ``x_root_folder`` / ``gt_root_folder`` (derived from
    ``train_root`` unless set); val uses ``config.eval_root`` and the folder names. With
    ``config.lists_optional`` a configured list file that does not exist is replaced by every image of
    the RGB folder (LLRGBD: the authors read ``train/train.txt`` and ``test/test.txt``, which not every
    copy ships), logged once per file and process.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if split == 'train':
        root = config.train_root
        dirs = (config.rgb_root_folder, config.x_root_folder, config.gt_root_folder)
        configured = config.train_source
    else:
        root = config.eval_root
        dirs = tuple(osp.join(root, config[k]) for k in ('rgb_folder', 'x_folder', 'gt_folder'))
        configured = config.eval_source
    absent = None
    if source is None and configured and config.lists_optional and not osp.isfile(configured):
        absent, configured = configured, None
        _note_absent_list(absent, split, dirs[0])
    return SplitLayout(split, root, *dirs, config.rgb_format, config.x_format, config.gt_format,
                       source or configured, absent)


def _note_absent_list(absent: str, split: str, folder: str) -> None:
    """Log once per process that list file ``absent`` is replaced by every image of ``folder``.

    The line counts as said only once a handler shows INFO: eval.py builds the test set once before it
    configures logging (to fail early on a missing folder) and again after, and the first, unseen,
    call must not use up the one line.
    """
    if absent in _NOTED_ABSENT_LISTS or not (logger.isEnabledFor(logging.INFO) and logger.hasHandlers()):
        return
    _NOTED_ABSENT_LISTS.add(absent)
    logger.info('list file %s does not exist: the %s split uses every image of %s, sorted by name '
                '(lists_optional=True)', absent, split, folder)


def _listing(folder: str) -> str:
    """A short listing of ``folder`` for error messages."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return ''
    shown = ', '.join(entries[:10]) + (', ...' if len(entries) > 10 else '')
    return f' ({folder} holds: {shown or "nothing"})'


def folder_problems(config, layout: SplitLayout) -> List[str]:
    """Missing dataset / split / modality folders and a missing list file, one message each."""
    name = config.dataset_name
    if not osp.isdir(config.dataset_path):
        return [f'dataset folder {config.dataset_path} does not exist. Fix: get {name} as '
                f'datasets/README.md describes and point the experiment at it with '
                f'--set dataset_path=/path/to/{name} (or write a synthetic one with '
                f'python -m smmcl.data.synthetic --dataset {{LLRGBD,MFNet,NYU}} --out DIR).']
    if not osp.isdir(layout.root):
        key = 'train_split_dir' if layout.split == 'train' else 'eval_split_dir'
        return [f'{layout.split} split folder {layout.root} does not exist{_listing(config.dataset_path)}. '
                f'Fix: lay the data out as datasets/README.md describes, or set {key}=<sub-folder>.']
    problems = []
    for what, folder, key in (('RGB', layout.rgb_dir, 'rgb_folder'), ('X', layout.x_dir, 'x_folder'),
                              ('label', layout.gt_dir, 'gt_folder')):
        if not osp.isdir(folder):
            problems.append(f'{what} folder {folder} does not exist{_listing(osp.dirname(folder))}. '
                            f'Fix: set {key}=<folder name> (--set {key}=...).')
    if layout.source and not osp.isfile(layout.source):
        key = 'train_list' if layout.split == 'train' else 'eval_list'
        problems.append(f'list file {layout.source} does not exist{_listing(osp.dirname(layout.source))}. '
                        f'Fix: write it (one image name a line) or set {key}=<file relative to '
                        f'dataset_path> ({key}=None: every image of {layout.rgb_dir}).')
    return problems


def name_of(line: str) -> str:
    """The bare item name of a list line: ``RGB/0001.jpg``, ``0001.png`` and ``0001`` all give ``0001``."""
    base = osp.basename(line.strip().replace('\\', '/'))
    stem, ext = osp.splitext(base)
    return stem if ext.lower() in IMAGE_EXTENSIONS else base


def read_list(source: str) -> List[str]:
    """The item names of list file ``source``: one a line, blank lines skipped, each reduced by
    :func:`name_of`; UTF-8, a leading byte-order mark skipped.

    Raises:
        DatasetError: the file is not UTF-8 text.
    """
    try:
        with open(source, encoding='utf-8-sig') as f:
            return [name_of(line) for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise DatasetError(f'list file {source} is not UTF-8 text (byte {e.start}: {e.reason}). Fix: save it '
                           f'as UTF-8 (or ASCII), one image name a line.') from None


def split_names(config, layout: SplitLayout) -> List[str]:
    """Check the split's folders and list file and return its item names.

    Names come from the list file (:func:`read_list`) or, without one, are the sorted stems of the RGB
    folder's ``rgb_format`` files.

    Raises:
        DatasetError: with every folder / list problem found.
    """
    problems = folder_problems(config, layout)
    if problems:
        raise DatasetError(problems)
    if layout.source:
        names = read_list(layout.source)
        if not names:
            raise DatasetError(f'list file {layout.source} is empty. Fix: write one image name a line '
                               f'(e.g. 0001 or {osp.basename(layout.rgb_dir)}/0001{layout.rgb_format}).')
        return names
    names = folder_names(layout)
    if not names:
        found = sorted({osp.splitext(f)[1] for f in os.listdir(layout.rgb_dir)} - {''})
        raise DatasetError(f"RGB folder {layout.rgb_dir} holds no '{layout.rgb_format}' images "
                           f'(extensions found: {found or "none"}). Fix: put the images there or set '
                           f'rgb_format=<extension>.')
    return names


def folder_names(layout: SplitLayout) -> List[str]:
    """The sorted stems of the ``rgb_format`` files of the split's RGB folder."""
    suffix = layout.rgb_format
    return sorted(f[:-len(suffix)] for f in os.listdir(layout.rgb_dir) if f.endswith(suffix))


def missing_files(layout: SplitLayout, name: str) -> List[str]:
    """One message per missing RGB / X / label file of item ``name`` (``os.path.exists`` only)."""
    return [_missing_message(layout, name, what, path)
            for what, path in zip(('RGB', 'X', 'label'), layout.paths(name)) if not osp.exists(path)]


def _missing_message(layout: SplitLayout, name: str, what: str, path: str) -> str:
    fix = (f"add it or remove '{name}' from {layout.source}" if layout.source
           else f'add it or remove the RGB image {layout.paths(name)[0]}')
    return f"{what} file {path} of item '{name}' ({layout.listed_in()}) does not exist. Fix: {fix}."


def _jpeg_truncated(buf: np.ndarray) -> bool:
    """True when a JPEG's last scan has no end-of-image marker after it (OpenCV decodes such files,
    filling the missing part with grey). 0xFFDA / 0xFFD9 cannot occur inside entropy-coded data."""
    data = buf.tobytes()
    if not data.startswith(b'\xff\xd8'):
        return False
    return data.find(b'\xff\xd9', max(data.rfind(b'\xff\xda'), 0)) < 0


def read_file(path: str) -> Optional[np.ndarray]:
    """The bytes of ``path`` as a uint8 array; None when it cannot be read."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None


def decode_image(buf: Optional[np.ndarray], flag: int) -> Optional[np.ndarray]:
    """``cv2.imdecode(buf, flag)`` that also returns None for no or empty bytes and a truncated JPEG."""
    if buf is None or buf.size == 0 or _jpeg_truncated(buf):
        return None
    return cv2.imdecode(buf, flag)


def png_header(buf: np.ndarray) -> Optional[Tuple[int, int]]:
    """(bit depth, colour type) from the IHDR chunk of a PNG file's bytes; None for other formats.

    Colour types: 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA.
    """
    head = buf[:26].tobytes()
    if len(head) < 26 or not head.startswith(b'\x89PNG\r\n\x1a\n') or head[12:16] != b'IHDR':
        return None
    return head[24], head[25]


def label_format_problems(path: str, header: Optional[Tuple[int, int]]) -> List[str]:
    """A message when the label file's sample depth makes OpenCV's 8-bit grayscale read change the values.

    ``header`` is the file's :func:`png_header` (None: not a PNG, nothing to check).

    OpenCV (and so the authors' ``cv2.imread(path, cv2.IMREAD_GRAYSCALE)``) keeps the high byte of 16-bit
    samples (indices below 256 all become 0) and stretches 1/2/4-bit grey samples to 0..255 (a 1-bit
    mask becomes 0/255, its class 1 ignored). Neither raises another error, so they are checked here.
    """
    if header is None:
        return []
    depth, colour_type = header
    if depth == 16:
        return [f'label file {path} is a 16-bit PNG; labels are read as 8-bit and OpenCV keeps the high '
                f'byte, so class indices below 256 all become 0. Fix: save the labels as 8-bit PNGs '
                f'(e.g. cv2.imwrite(path, label.astype(np.uint8))).']
    if depth < 8 and colour_type in (0, 4):
        return [f'label file {path} is a {depth}-bit greyscale PNG; OpenCV stretches it to 0..255 (index 1 '
                f'becomes {255 // (2 ** depth - 1)}). Fix: save the labels as 8-bit PNGs '
                f'(e.g. cv2.imwrite(path, label.astype(np.uint8))).']
    return []


def label_problems(gt: np.ndarray, path: str, config, header: Optional[Tuple[int, int]] = None) -> List[str]:
    """A message when ``gt`` (H-W uint8, after the gt_transform shift) holds values that are neither a
    class nor 255; ``header`` (the file's :func:`png_header`) adds a hint for colour and palette PNGs."""
    counts = np.bincount(gt.ravel(), minlength=256)
    top = int(np.flatnonzero(counts[:IGNORE_LABEL]).max(initial=0))  # the largest value other than 255
    counts[IGNORE_LABEL] = 0
    counts[:config.num_classes] = 0
    bad = np.flatnonzero(counts)
    if bad.size == 0:
        return []
    shift = 1 if config.gt_transform else 0
    file_values = ((bad + shift) % 256).tolist()
    shifted = ' after the gt_transform shift (file value - 1, 0 -> 255)' if config.gt_transform else ''
    hint = ''
    if header is not None and header[1] in (2, 3, 6):
        kind = 'a palette' if header[1] == 3 else 'a colour'
        hint = (f' The file is {kind} PNG: OpenCV reads the luminance of its colours, not class indices; '
                f'save the indices as a 1-channel 8-bit PNG.')
    elif not config.gt_transform and top == config.num_classes:
        hint = ' The file uses 1..num_classes: set gt_transform=True if 0 means unlabelled.'
    return [f'label file {path} holds values {file_values} ({int(counts[bad].sum())} pixels) that are '
            f'neither a class index 0..{config.num_classes - 1} nor 255 (ignore){shifted}.{hint} Fix: check '
            f'num_classes (={config.num_classes}) and gt_transform (={config.gt_transform}), or remap '
            f'the labels.']


def read_flags(config) -> Tuple[int, int]:
    """The ``cv2.imdecode`` flags of the RGB and the X image (see :func:`load_item`): colour, and greyscale
    for a single-channel X (``config.x_is_single_channel``)."""
    return cv2.IMREAD_COLOR, cv2.IMREAD_GRAYSCALE if config.x_is_single_channel else cv2.IMREAD_COLOR


def network_order(rgb: np.ndarray, x: np.ndarray, config) -> Tuple[np.ndarray, np.ndarray]:
    """Images as decoded with :func:`read_flags` -> the network's inputs, as the authors feed them.

    A 2-D X (greyscale) is replicated to 3 channels. Colour images stay in OpenCV's BGR order (the
    authors' quirk, see :func:`load_item`) unless ``config.true_rgb_order``, which converts RGB and X.

    Args:
        rgb: H-W-3 uint8, BGR order.
        x: H-W uint8, or H-W-3 uint8 in BGR order.

    Returns:
        rgb, x: H-W-3 uint8 each.
    """
    if x.ndim == 2:
        x = cv2.merge([x, x, x])
    if config.true_rgb_order:
        rgb = cv2.cvtColor(rgb, cv2.COLOR_BGR2RGB)
        x = cv2.cvtColor(x, cv2.COLOR_BGR2RGB)
    return rgb, x


def load_item(layout: SplitLayout, name: str, config):
    """Read item ``name``: RGB, label, X as the authors do, checked.

    Reading is faithful: the authors pass ``cv2.COLOR_BGR2RGB`` as the imread flag, which is
    ``4 = cv2.IMREAD_ANYCOLOR``, so images reach the network in OpenCV's BGR order. We read with
    ``cv2.IMREAD_COLOR`` (the same pixels for 8-bit 3-channel files, and a grayscale file still gives
    3 channels) and keep BGR unless ``config.true_rgb_order`` is True. The label is read as uint8
    grayscale, shifted by ``gt - 1`` in uint8 (0 -> 255) when ``config.gt_transform``. A single-channel
    X (``config.x_is_single_channel``) is read as grayscale and replicated to 3 channels; otherwise X is
    read like RGB (a 1-channel file is then replicated too).

    Returns:
        rgb H-W-3 uint8, gt H-W uint8, x H-W-3 uint8.

    Raises:
        DatasetError: with every problem of the item (missing or unreadable file, sizes, a label PNG of
            another bit depth than 8, label values).
    """
    paths = layout.paths(name)
    flags = read_flags(config) + (cv2.IMREAD_GRAYSCALE,)
    files, images, problems = [], [], []
    for what, path, flag in zip(('RGB', 'X', 'label'), paths, flags):
        files.append(read_file(path))
        img = decode_image(files[-1], flag)
        if img is None:
            problems.append(_missing_message(layout, name, what, path) if not osp.exists(path) else
                            f"{what} file {path} of item '{name}' cannot be decoded (truncated, corrupt or "
                            f"not an image). Fix: copy it again from the source, or remove '{name}' "
                            f'from {layout.source or "the RGB folder"}.')
        images.append(img)
    if problems:
        raise DatasetError(problems)
    rgb, x, gt = images
    rgb, x = network_order(rgb, x, config)
    if config.gt_transform:
        gt = gt - np.uint8(1)  # uint8 wrap-around: 0 (unlabelled) -> 255
    header = png_header(files[2])
    problems = label_format_problems(paths[2], header) or label_problems(gt, paths[2], config, header)
    sizes = [img.shape[:2] for img in (rgb, x, gt)]
    if len(set(sizes)) > 1:
        (rh, rw), (xh, xw), (gh, gw) = sizes
        problems.insert(0, f"item '{name}' has images of different sizes: RGB {paths[0]} is {rh}x{rw}, "
                           f'X {paths[1]} is {xh}x{xw}, label {paths[2]} is {gh}x{gw} (HxW). Fix: the '
                           f'three must be aligned and of one size; re-export them or remove '
                           f"'{name}' from {layout.source or 'the split'}.")
    if problems:
        raise DatasetError(problems)
    return rgb, gt, x


def _to_tensor(a, is_label: bool) -> torch.Tensor:
    """A preprocess output (numpy or tensor) as the authors hand it on: labels int64 (their ``.long()``),
    float images float32 (their ``.float()``), uint8 images unchanged (normalised later on the device)."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    if is_label:
        return t.long()
    return t.float() if t.is_floating_point() else t


class RGBXDataset(Dataset):
    """RGB + X + label items of one split, read as the authors do (see :func:`load_item`).

    Args:
        config: a finalised experiment config (``smmcl.config.load_config``).
        split: 'train' (``config.train_root``, ``train_source``) or 'val' (``eval_root``, ``eval_source``).
        preprocess: ``(rgb, gt, x) -> (rgb, gt, x[, valid_box])``. None: for 'train'
            :func:`~smmcl.data.transforms.train_transform` with ``config``; for 'val' nothing.
        file_length: the epoch length (the authors use ``batch_size * niters_per_epoch``); None: one
            pass over the names.
        source: a list file replacing the split's (e.g. ``config.eval_subset_sources['night']``).

    Items, 'train': ``data`` 3-H-W, ``modal_x`` 3-H-W (uint8 from the default preprocess; float32 from a
    preprocess returning floats such as ``train_transform_plain``), ``label`` int64 H-W (255 = ignore),
    ``valid_box`` int64 [top, bottom, left, right] (the whole image when the preprocess gives none),
    ``fn`` the item name, ``n`` the number of names. 'val': ``data``, ``modal_x`` uint8 H-W-3 numpy,
    ``label`` uint8 H-W numpy, ``fn``, ``n``, unprocessed (the evaluator normalises and slides windows).

    Raises:
        DatasetError: at construction for folder / list problems, when loading for item problems.
    """

    def __init__(self, config, split: str, preprocess: Optional[Callable] = None,
                 file_length: Optional[int] = None, source: Optional[str] = None):
        self.config = config
        self.split = split
        self.layout = split_layout(config, split, source)
        self.names = split_names(config, self.layout)
        if preprocess is None and split == 'train':
            preprocess = functools.partial(train_transform, config=config)
        self.preprocess = preprocess
        self.file_length = file_length
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's names when ``file_length`` is set.

        The authors' ``_construct_new_file_names``: every name ``file_length // n`` times, then the first
        ``file_length % n`` of ``torch.randperm(n)``. They recompute it (a fresh permutation) on every
        ``__getitem__`` call; we draw it once per epoch from ``config.seed + epoch``, so all ranks and
        workers agree. Each index gets the same distribution of names; the extras of one epoch are
        distinct here, while the authors' independent per-call draws could repeat one. Call it before
        each epoch (like ``DistributedSampler.set_epoch``); with ``persistent_workers`` the workers keep
        the copy they were started with.
        """
        n = len(self.names)
        if self.file_length is None:
            self.epoch_names = self.names
            return
        generator = torch.Generator().manual_seed(int(self.config.seed) + int(epoch))
        extra = torch.randperm(n, generator=generator)[:self.file_length % n].tolist()
        self.epoch_names = self.names * (self.file_length // n) + [self.names[i] for i in extra]

    def __len__(self) -> int:
        return len(self.epoch_names)

    def read(self, name: str):
        """The raw, checked (rgb H-W-3, gt H-W, x H-W-3) uint8 arrays of item ``name``."""
        return load_item(self.layout, name, self.config)

    def __getitem__(self, index: int) -> dict:
        name = self.epoch_names[index]
        rgb, gt, x = self.read(name)
        out = (rgb, gt, x) if self.preprocess is None else self.preprocess(rgb, gt, x)
        item = dict(fn=str(name), n=len(self.names))
        if self.split == 'train':
            item.update(data=_to_tensor(out[0], False), label=_to_tensor(out[1], True),
                        modal_x=_to_tensor(out[2], False))
            h, w = item['label'].shape
            item['valid_box'] = (out[3] if len(out) > 3 else
                                 torch.tensor([0, h, 0, w], dtype=torch.int64))
        else:
            item.update(data=out[0], label=out[1], modal_x=out[2])
            if len(out) > 3:
                item['valid_box'] = out[3]
        return item
