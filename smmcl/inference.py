"""Run a trained SMMCL checkpoint (Dong & Yokoya, WACV 2024) on your own RGB-X images.

One way from a checkpoint to predictions, shared by ``eval.py``, ``predict.py`` and the tools:

- :func:`parse_epochs` turns what ``-e`` takes (``300``, ``400-500``, ``last``, a ``.pth`` file) into
  checkpoint paths;
- :func:`load_model` builds the config's segmentor with :func:`smmcl.models.build_segmentor` and loads one
  checkpoint into it (ours or the authors', read by :func:`smmcl.engine.checkpoint.read_checkpoint`);
  ImageNet weights (``pretrained_model``) are never read;
- :class:`Segmenter` predicts on arrays with the evaluator and protocol of ``eval.py``
  (:func:`smmcl.engine.evaluate.predict_scores`: sliding windows, scales, flip as the config sets) and its
  per-image NMF seeding, the speed switches applied (with the Triton kernels, compiled ahead of each new
  image size).

Example::

    from smmcl.inference import Segmenter
    seg = Segmenter.from_checkpoint('SMMCL_LLRGBD/config.py', '500')  # or a .pth file
    rgb = np.asarray(Image.open('night.png').convert('RGB'))          # H-W-3 uint8, RGB order
    depth = np.asarray(Image.open('night_depth.png'))                 # H-W uint8
    classes = seg(rgb, depth)                                         # H-W int64 class ids
"""
from __future__ import annotations

import glob
import logging
import os
import os.path as osp
import re
from typing import Dict, List, Optional, Tuple, Union

import cv2
import numpy as np
import torch

from smmcl.config import ConfigError, adopt_stored_config, check_choice, load_config
from smmcl.data.dataset import DatasetError, decode_image, network_order, read_file, read_flags
from smmcl.engine.ahead import compile_ahead_of_prediction
from smmcl.engine.checkpoint import epoch_of_name, model_state, read_checkpoint
from smmcl.engine.evaluate import predict_scores, seed_item
from smmcl.engine.precision import inference_model, mixed_precision, wrap_for_inference
from smmcl.engine.seeding import kept_rng
from smmcl.engine.speed import resolve_speed
from smmcl.models import EncoderDecoder, build_segmentor, check_compatible

CHANNEL_ORDERS = ('rgb', 'bgr')
logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


def _saved_epochs(checkpoint_dir: str) -> Dict[int, str]:
    """{epoch: path} of the ``epoch-N.pth`` files in ``checkpoint_dir`` (empty when it does not exist)."""
    if not osp.isdir(checkpoint_dir):
        return {}
    return {epoch_of_name(f): osp.join(checkpoint_dir, f) for f in os.listdir(checkpoint_dir)
            if epoch_of_name(f) is not None}


def _holds(checkpoint_dir: str) -> str:
    if not osp.isdir(checkpoint_dir):
        return f'{checkpoint_dir} does not exist'
    epochs = sorted(_saved_epochs(checkpoint_dir))
    others = sorted(f for f in os.listdir(checkpoint_dir) if f.endswith('.pth') and epoch_of_name(f) is None)
    return (f'{checkpoint_dir} holds epochs {epochs or "none"}'
            + (f' and {others}' if others else ''))


def parse_epochs(text: str, checkpoint_dir: str) -> List[str]:
    """Checkpoint paths for ``-e`` (CMX ``Evaluator.run``), sorted by epoch.

    ``'500'`` -> ``[<dir>/epoch-500.pth]``; ``'400-500'`` -> every existing ``epoch-N.pth`` with
    400 <= N <= 500; ``'450-'`` -> every one from 450; ``'last'`` -> ``epoch-last.pth``; a path ending in
    ``.pth`` -> that file.

    Raises:
        ConfigError: ``text`` is none of these, or a range runs backwards.
        FileNotFoundError: a named checkpoint is missing, or a range matches none; the message names
            the path and the checkpoints that exist.
    """
    text = str(text).strip()
    if text.endswith('.pth'):
        if not osp.isfile(text):
            raise FileNotFoundError(f'checkpoint {text} does not exist')
        return [text]
    if text.isdigit() or text == 'last':
        path = osp.join(checkpoint_dir, f'epoch-{text}.pth')
        if not osp.isfile(path):
            raise FileNotFoundError(f'checkpoint {path} does not exist; {_holds(checkpoint_dir)}')
        return [path]
    match = re.fullmatch(r'(\d+)-(\d*)', text)
    if match is None:
        raise ConfigError(f"-e {text!r}: expected an epoch (500), a range (400-500), an open range (450-), "
                          f"'last' or a .pth file")
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else None
    if end is not None and end < start:
        raise ConfigError(f'-e {text}: the range runs backwards ({start} > {end})')
    saved = _saved_epochs(checkpoint_dir)
    chosen = [saved[e] for e in sorted(saved) if e >= start and (end is None or e <= end)]
    if not chosen:
        raise FileNotFoundError(f'no checkpoint epoch-N.pth with {start} <= N'
                                + (f' <= {end}' if end is not None else '')
                                + f'; {_holds(checkpoint_dir)}')
    return chosen


def checkpoint_path(checkpoint: str, checkpoint_dir: str) -> str:
    """The one file ``checkpoint`` names: an epoch (``300``), ``last`` or a ``.pth`` file (see
    :func:`parse_epochs`; a range is refused unless it matches exactly one file).

    Raises:
        ConfigError: ``checkpoint`` names several files, or none of the forms above.
        FileNotFoundError: no such checkpoint.
    """
    paths = parse_epochs(checkpoint, checkpoint_dir)
    if len(paths) > 1:
        raise ConfigError(f'-e {checkpoint} names {len(paths)} checkpoints ({osp.basename(paths[0])} ... '
                          f'{osp.basename(paths[-1])}); give one epoch, last or a .pth file')
    return paths[0]


def check_output_folder(path: str, option: str) -> None:
    """Refuse an output folder ``path`` (given with ``option``, e.g. ``-o``) that cannot be one: a file
    of that name, or a file where one of its parent folders should be. Checked at start, before any
    model is loaded.

    Raises:
        ConfigError: naming the file in the way and the fix.
    """
    folder = osp.abspath(path)
    while not osp.exists(folder) and osp.dirname(folder) != folder:
        folder = osp.dirname(folder)
    if not osp.isdir(folder):
        raise ConfigError(f'{option} {path}: {folder} is a file, and the outputs need a folder there; '
                          f'name another folder or move the file away')


def find_checkpoint(config, checkpoint: str) -> str:
    """:func:`checkpoint_path`; an epoch (or ``last``) missing from ``config.checkpoint_dir`` is looked
    for in the experiment's other runs, ``<exp_dir>/log_<dataset>_*/checkpoint`` (a run trained with
    ``--set backbone=mscan_t`` sits in ``log_<dataset>_mscan_t``), when exactly one of them holds it and
    neither ``backbone`` nor a log folder was given.

    Raises:
        FileNotFoundError: no such checkpoint, or several runs hold one (naming them).
    """
    try:
        return checkpoint_path(checkpoint, config.checkpoint_dir)
    except FileNotFoundError:
        if set(config.get('_pinned', ())) & {'backbone', 'log_dir', 'checkpoint_dir'} or checkpoint.endswith('.pth'):
            raise
        runs = sorted(glob.glob(osp.join(config.exp_dir, f'log_{config.dataset_name}_*', 'checkpoint')))
        found = [path for run in runs if run != config.checkpoint_dir
                 for path in _found(checkpoint, run)]
        if len(found) != 1:
            if found:
                raise FileNotFoundError(f'-e {checkpoint}: not in {config.checkpoint_dir}, and several runs hold '
                                        f'it ({", ".join(found)}); give the file or --set backbone=...') from None
            raise
        logger.info('-e %s: not in %s; using %s', checkpoint, config.checkpoint_dir, found[0])
        return found[0]


def _found(checkpoint: str, checkpoint_dir: str) -> List[str]:
    try:
        return [checkpoint_path(checkpoint, checkpoint_dir)]
    except (FileNotFoundError, ConfigError):
        return []


def adopt_checkpoint_settings(config, path: str) -> None:
    """A checkpoint knows what it is: ours store their run's config, whose model settings (backbone,
    classes, decoder) and inference settings (crop, scales, flip, image size, normalisation, class
    names and colours, seed) are taken into ``config`` unless given with ``--set``
    (:func:`smmcl.config.adopt_stored_config`), so ``predict.py`` gives the class ids ``eval.py -p``
    gave in that run. The authors' checkpoints store none: ``config`` stays the experiment's.

    Raises:
        ConfigError: a model setting given with ``--set`` contradicts the checkpoint.
    """
    stored = read_checkpoint(path, mmap=True).get('config')
    if not isinstance(stored, dict) or 'backbone' not in stored:
        return
    changed = adopt_stored_config(config, stored, path)
    if changed:
        logger.info('%s: its run\'s %s', path, ', '.join(f'{key}={config[key]!r}' for key in changed))


def checked_weights(config, path: str, *, mmap: bool = False) -> Dict[str, torch.Tensor]:
    """The model weights of checkpoint file ``path``, checked against ``config.backbone`` and
    ``config.num_classes``; ``mmap=True`` for a check of the shapes only.

    Raises:
        CheckpointError: the file is unreadable, holds no weights, or was trained for another backbone or
            class count (the message names the file and both values).
    """
    weights = model_state(read_checkpoint(path, mmap=mmap), path)
    check_compatible(weights, config.backbone, int(config.num_classes), path)
    return weights


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def load_model(config, checkpoint: str, device=None, adopt: bool = False) -> EncoderDecoder:
    """SMMCL's segmentor for ``config`` with the weights of one checkpoint, in eval mode on ``device``.
    ``adopt``: first take the model and inference settings of the checkpoint's stored config into
    ``config`` (:func:`adopt_checkpoint_settings`), as the entry points that load one checkpoint do.

    Built by :func:`smmcl.models.build_segmentor` without ImageNet weights (``config.pretrained_model`` is
    not read: the checkpoint sets every tensor), loaded strictly. The plain model: wrap it with
    :func:`smmcl.engine.precision.for_inference` for the speed switches (:class:`Segmenter` does).

    Args:
        config: a finalised experiment config (``smmcl.config.load_config``).
        checkpoint: what ``eval.py -e`` takes for one checkpoint: an epoch (``'300'``) or ``'last'`` in
            ``config.checkpoint_dir``, or a ``.pth`` file (ours or the authors').
        device: where the model goes; None: :func:`default_device`.

    Raises:
        ConfigError: ``checkpoint`` names no single file.
        FileNotFoundError: the checkpoint does not exist.
        CheckpointError: unreadable, or trained for another backbone / class count (names the file).
    """
    path = find_checkpoint(config, checkpoint) if adopt else checkpoint_path(checkpoint, config.checkpoint_dir)
    if adopt:
        adopt_checkpoint_settings(config, path)
    weights = checked_weights(config, path)
    model = build_segmentor(config)
    model.load_state_dict(weights, strict=True)
    return model.eval().to(default_device() if device is None else torch.device(device))


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------


def read_images(rgb_path: str, x_path: str, config) -> Tuple[np.ndarray, np.ndarray]:
    """Decode an RGB and an X image file as the dataset does (:func:`smmcl.data.dataset.read_flags`).

    Returns:
        rgb H-W-3 uint8 in OpenCV's BGR order; x H-W uint8 (``config.x_is_single_channel``) or H-W-3
        uint8 BGR. Feed them to :class:`Segmenter` with ``channel_order='bgr'``.

    Raises:
        FileNotFoundError: a file does not exist.
        DatasetError: a file cannot be decoded, or the two differ in size (the message names the files).
    """
    images = []
    for what, path, flag in zip(('RGB', 'X'), (rgb_path, x_path), read_flags(config)):
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} image {path} does not exist')
        img = decode_image(read_file(path), flag)
        if img is None:
            raise DatasetError(f'{what} image {path} cannot be decoded (truncated, corrupt or not an image); '
                               f'copy it again from the source')
        images.append(img)
    rgb, x = images
    if rgb.shape[:2] != x.shape[:2]:
        raise DatasetError(f'RGB image {rgb_path} is {rgb.shape[0]}x{rgb.shape[1]} but X image {x_path} is '
                           f'{x.shape[0]}x{x.shape[1]} (HxW); the two must be aligned and of one size')
    return rgb, x


def _network_inputs(rgb, x, config, channel_order: str) -> Tuple[np.ndarray, np.ndarray]:
    """Arrays in ``channel_order`` -> what the dataset would give for the same files (BGR as OpenCV
    decodes them, then :func:`smmcl.data.dataset.network_order`)."""
    check_choice('channel_order', channel_order, CHANNEL_ORDERS)
    rgb, x = np.asarray(rgb), np.asarray(x)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f'rgb must be an H-W-3 uint8 array, got shape {rgb.shape} of {rgb.dtype}')
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    if x.dtype != np.uint8 or not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 3)):
        raise ValueError(f'x must be an H-W or H-W-3 uint8 array, got shape {x.shape} of {x.dtype}')
    if rgb.shape[:2] != x.shape[:2]:
        raise ValueError(f'rgb is {rgb.shape[0]}x{rgb.shape[1]} but x is {x.shape[0]}x{x.shape[1]} (HxW); '
                         f'the two must be aligned and of one size')
    if channel_order == 'rgb':
        rgb = rgb[..., ::-1]
        x = x[..., ::-1] if x.ndim == 3 else x
    if x.ndim == 3 and config.x_is_single_channel:  # the dataset decodes such an X file as greyscale
        x = cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_BGR2GRAY)
    return network_order(np.ascontiguousarray(rgb), np.ascontiguousarray(x), config)


# ---------------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------------


class Segmenter:
    """A checkpoint loaded once, applied to one image at a time as ``eval.py`` predicts.

    :func:`smmcl.engine.evaluate.predict_scores` with the config's protocol (``eval_scale_array``,
    ``eval_crop_size``, ``eval_flip``, ``eval_protocol``), the speed switches applied (``fast_path``,
    ``amp``, ``compile``: :func:`smmcl.engine.precision.for_inference`, ``mixed_precision``), and the NMF
    seeded per image as ``eval.py`` does (``config.seed + index``). With the Triton kernels, those of an
    image size it has not met are compiled all at once before its first prediction
    (:func:`smmcl.engine.ahead.compile_ahead_of_prediction`), for its first :attr:`AHEAD_SIZES` sizes.

    Args:
        model: the plain segmentor (:func:`load_model`).
        config: its experiment config.
        device: where it runs; None: :func:`default_device`.

    Attributes:
        model: the model as it runs (:func:`smmcl.engine.precision.for_inference`'s: folded on the fast path,
            compiled and graphed as the config says).
        network: the eager network ``model`` runs (:func:`smmcl.engine.precision.inference_model`'s).
    """

    # As GraphedInference's max_graphs: a pass costs about one forward even where its kernels are compiled
    # already (the sliding windows of two sizes are of one shape), so a folder of photos of many sizes pays
    # it for its first few sizes only; the kernels of later ones compile as they launch.
    AHEAD_SIZES = 8

    def __init__(self, model: torch.nn.Module, config, device=None):
        self.config = config
        self.device = default_device() if device is None else torch.device(device)
        self.network = inference_model(model.to(self.device), config)
        self.model = wrap_for_inference(self.network, config)
        self._amp, _ = mixed_precision(config, self.device)  # once: it warns where amp cannot apply
        self._sizes_ahead = set()  # the image sizes whose kernels were compiled ahead

    @classmethod
    def from_checkpoint(cls, config: Union[str, dict], checkpoint: str, device=None,
                        overrides: Optional[List[str]] = None) -> 'Segmenter':
        """Load one checkpoint (:func:`load_model`).

        Args:
            config: a finalised config, or the path of an experiment's ``config.py``.
            checkpoint: an epoch (``'300'``) or ``'last'`` in ``config.checkpoint_dir``, or a ``.pth`` file.
            device: None: :func:`default_device`.
            overrides: ``key=value`` strings applied to a config read from a path (as ``--set``).
        """
        if isinstance(config, str):
            config = load_config(config, overrides or [])
        device = default_device() if device is None else torch.device(device)
        model = load_model(config, checkpoint, device, adopt=True)
        resolve_speed(config, device, 'predict')  # after the checkpoint's settings: the plan is final
        return cls(model, config, device)

    def scores(self, rgb: np.ndarray, x: np.ndarray, *, index: int = 0,
               channel_order: str = 'rgb') -> torch.Tensor:
        """K-H-W float64 class scores of one image (``exp`` of the logits summed over windows, flips and
        scales: the authors' evaluator), on the CPU or, with ``fast_path``, on the device.

        Args:
            rgb: H-W-3 uint8 colour image, any size.
            x: the aligned H-W or H-W-3 uint8 X image (depth, HHA, thermal) of the same size. A 3-channel
                X for a single-channel config is turned grey as the dataset decodes it (OpenCV weights).
            index: the image's position in a sequence: its NMF seed is ``config.seed + index``, so
                ``index=i`` gives the ``i``-th image what ``eval.py`` / ``predict.py`` give it.
            channel_order: ``'rgb'`` (numpy / PIL arrays) or ``'bgr'`` (``cv2.imread``) for both images.
                They are converted to the order the network was trained on (BGR, the authors' quirk,
                unless ``config.true_rgb_order``).

        Raises:
            ValueError: an array of another shape or dtype, or images of two sizes.
        """
        rgb, x = _network_inputs(rgb, x, self.config, channel_order)
        size = rgb.shape[:2]
        if size not in self._sizes_ahead and len(self._sizes_ahead) < self.AHEAD_SIZES:
            self._sizes_ahead.add(size)
            compile_ahead_of_prediction(self.network, rgb, x, self.config, self.device)  # with the kernels only
        with torch.no_grad(), kept_rng(self.device), self._amp:
            seed_item(self.config, index)
            return predict_scores(self.model, rgb, x, self.config, self.device)

    def __call__(self, rgb: np.ndarray, x: np.ndarray, *, index: int = 0, channel_order: str = 'rgb',
                 with_scores: bool = False):
        """H-W int64 class ids of one image (the first maximum of :meth:`scores`, as ``eval.py``);
        with ``with_scores`` also the K-H-W float64 scores as numpy. Arguments as :meth:`scores`."""
        scores = self.scores(rgb, x, index=index, channel_order=channel_order)
        classes = scores.argmax(0).cpu().numpy()
        return (classes, scores.cpu().numpy()) if with_scores else classes
