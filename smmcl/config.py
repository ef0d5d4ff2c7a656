"""Configuration: SMMCL's defaults, loading an experiment's ``config.py``, command-line overrides.

Each experiment folder's ``config.py`` builds on :func:`base_config` and sets what differs, in the
authors' flat ``C.key = value`` style. The rule, for every key:

- **What you write runs.** A key assigned in the experiment's ``config.py`` (after ``base_config()``)
  or given with ``--set`` is used as written, derived keys included (``C.log_dir = '/data/runs/x'``,
  ``C.niters_per_epoch = 7``). ``--set`` is applied after ``config.py``.
- **Derived keys** (:data:`DERIVED_KEYS`: data folders, list files, log and checkpoint paths,
  ``niters_per_epoch``, ``pretrained_model``) are computed by :func:`finalize` only where neither set
  them, from the final values of their parents, so they follow a parent you set: ``C.log_dir`` moves
  ``tb_dir`` and ``checkpoint_dir`` under it; ``--set dataset_path=/x`` moves the data folders unless
  ``config.py`` assigned them; ``--set backbone=mscan_t`` reads ``pretrained/segnext/mscan_t.pth``.
- **Every key is declared** in :func:`base_config`, the one place of defaults. A key that is neither
  declared nor derived stops every entry point at load, naming the nearest known key; a key of your own
  is declared there with its default first. The authors' keys that do nothing in their code either
  (:data:`AUTHORS_INERT_KEYS`) are accepted with one log line.

:func:`validate` checks every setting that has a fixed set of choices once, when the config is loaded,
before any process starts; everything else reads its key directly. Field names follow the authors'
(CMX-style) config.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import logging
import os
import os.path as osp
import time
from typing import Iterable, List, Optional, Sequence

import numpy as np
from easydict import EasyDict

from smmcl import choices as choices_
from smmcl.errors import ConfigError, UnknownKeyError  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)
REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

# Keys computed by ``finalize`` where neither ``config.py`` nor ``--set`` assigned them.
DERIVED_KEYS = (
    'train_root', 'eval_root', 'rgb_root_folder', 'x_root_folder', 'gt_root_folder', 'train_source',
    'eval_source', 'eval_subset_sources', 'log_dir', 'tb_dir', 'checkpoint_dir', 'log_file', 'val_log_file',
    'niters_per_epoch', 'pretrained_model',
)
# Keys of the authors' SMMCL_LLRGBD/config.py that nothing in their code acts on: fix_bias and is_test
# are read nowhere; bn_eps / bn_momentum reach only decode-head BatchNorms (their LightHamHead has
# GroupNorms, utils/init_func.py init_weight); root_dir only feeds their sys.path; log_dir_link equals
# log_dir, so engine.py save_and_link_checkpoint never links it; link_log_file / link_val_log_file are
# never linked by their train.py or eval.py. Pasted into ours they are accepted and ignored, with a line.
AUTHORS_INERT_KEYS = ('fix_bias', 'is_test', 'bn_eps', 'bn_momentum', 'root_dir', 'log_dir_link',
                      'link_log_file', 'link_val_log_file')
# Set by load_config itself.
_LOADER_KEYS = ('config_file',)
KEY_OF_YOUR_OWN = ('a key of your own: declare it with its default in base_config (smmcl/config.py), '
                   'the one place of defaults, then set it in config.py or with --set')


def base_config() -> EasyDict:
    """SMMCL defaults: the authors' ``SMMCL_LLRGBD/config.py`` values for everything that is not
    dataset-specific (their training recipe included), plus our own switches, each defaulting to the
    authors' behaviour.

    Their config's derived keys (paths, ``niters_per_epoch``) are computed by :func:`finalize` unless
    set; the keys it holds that act nowhere in their code are :data:`AUTHORS_INERT_KEYS`, accepted with
    a log line. Every other key any code reads is declared here with its default.
    """
    C = EasyDict()
    # The authors' seed. Their -d 0-3 runs one process (DataParallel) seeded with it; under their DDP
    # launcher each process is seeded with its local rank instead. Ours: the initial weights come from
    # this seed (rank 0's, which DDP broadcasts) as in their -d 0-3 run, and each chunk of each step
    # draws from (seed, step, chunk) whichever process runs it (smmcl/engine/chunks.py).
    C.seed = 12345
    C.exp_dir = os.getcwd()  # the experiment folder; set by each config.py to its own folder

    # ---- dataset (layout values; the experiment config fills these in) ----
    C.dataset_name = 'LLRGBD'
    C.dataset_path = osp.join(REPO_ROOT, 'datasets', 'LLRGBD')
    # Sub-folder of dataset_path holding each split ('' when both splits share one folder and list
    # files pick the images). LLRGBD ships train/ and test/ folders.
    C.train_split_dir = ''
    C.eval_split_dir = ''
    C.rgb_folder = 'RGB'
    C.rgb_format = '.png'
    C.x_folder = 'Depth'
    C.x_format = '.png'
    C.x_is_single_channel = True  # replicate a 1-channel X image to 3 channels, as the authors
    C.gt_folder = 'Label'
    C.gt_format = '.png'
    C.gt_transform = False  # True: label - 1 with 0 -> 255 (NYU)
    # List files relative to dataset_path (None: every image in the split's RGB folder, sorted).
    C.train_list = None
    C.eval_list = None
    # True: a list file that does not exist is replaced by every image of the split's RGB folder (one
    # log line says so); False: a missing list file is an error. LLRGBD: the authors read
    # train/train.txt and test/test.txt, which not every copy of the dataset ships.
    C.lists_optional = False
    # Optional extra evaluation subsets {name: list file}, reported beside the full test set.
    C.eval_subsets = {}
    C.num_train_imgs = 0
    C.num_eval_imgs = 0
    C.num_classes = 14
    C.class_names = []
    # Score the first class in a separate "mIoU without it" line (LLRGBD's void class).
    C.report_miou_without_first = False
    # The authors' loader reads RGB with flag cv2.COLOR_BGR2RGB (=4 = IMREAD_ANYCOLOR), so images reach
    # the network in OpenCV's BGR order; their checkpoints were trained that way. True: convert to RGB.
    C.true_rgb_order = False

    # ---- image ----
    C.background = 255  # ignore label
    C.image_height = 480
    C.image_width = 640
    C.norm_mean = np.array([0.485, 0.456, 0.406])
    C.norm_std = np.array([0.229, 0.224, 0.225])

    # ---- network ----
    C.backbone = 'mscan_b'
    # pretrained_model (SegNeXt's ImageNet MSCAN weights, None: from scratch) is derived from backbone:
    # <repo>/pretrained/segnext/<backbone>.pth unless set (finalize).
    C.decoder = 'LightHamHead'
    C.decoder_embed_dim = 512
    C.drop_path_rate = None  # None: the variant's own (mscan_b: 0.2)

    # ---- supervised multi-modal contrastive loss ----
    C.min_views_per_class = 5
    C.max_views_per_class = 300
    C.max_features_total = 4800
    C.cm_temperature = 0.1
    C.temperature = 0.1
    C.weight_cm = 0.2
    C.weight_vis = 0.2
    C.weight_aux = 0.2
    # The authors call their sampler once per branch: same sets and counts, different pixels.
    C.share_anchor_draw = False
    # 'vectorized' (one host read per batch) or 'loop' (the authors' per-class loop, draw by draw; their
    # own stream cannot be reproduced: their 4 DataParallel replica threads draw from one CPU generator).
    C.anchor_sampler = 'vectorized'

    # ---- optimisation ----
    # 'AdamW' (the authors') or 'SGDM' (their train.py's other branch: torch.optim.SGD with momentum,
    # over the same parameter groups and weight decay).
    C.optimizer = 'AdamW'
    C.momentum = 0.9  # SGDM only; their SMMCL_LLRGBD/config.py value
    C.lr = 6e-5
    C.lr_power = 0.9
    C.weight_decay = 0.01
    C.batch_size = 16  # the global batch, whatever the number of processes
    # The authors' -d 0-3 (their SMMCL_LLRGBD/train.py: nn.DataParallel on 4 GPUs, loss.mean() over the
    # replicas' losses; DataParallel scatters contiguous chunks and keeps device 0's buffer updates):
    # each global batch is cut into `replicas` contiguous chunks of batch_size / replicas, each with its
    # own BatchNorm batch statistics, contrastive anchor sampling (with its max_features_total cap) and
    # loss, the gradients averaged over the chunks and the running statistics kept from chunk 0. The run
    # is the same on any number of processes that divides replicas (one GPU runs the 4 chunks one after
    # another); see smmcl/engine/chunks.py. replicas=1: one BatchNorm/sampling/loss over the whole batch.
    C.replicas = 4
    C.nepochs = 1000
    C.num_workers = 8  # loader processes per training process (the authors': 16; machine-dependent)
    C.train_scale_array = [0.5, 0.75, 1, 1.25, 1.5, 1.75]
    C.warm_up_epoch = 10
    # The authors' parameter groups hold only conv / linear / norm weights and biases, so MSCAN's
    # layer scales are never trained. True: train them too (no weight decay).
    C.train_layer_scale = False
    C.deterministic = False
    # BatchNorm over several processes. False (the authors'): each chunk (see replicas) normalises with
    # its own statistics and the running statistics are chunk 0's, which is what their nn.DataParallel
    # run does. True: SyncBatchNorm, statistics over the whole batch (multi-GPU only, it has no CPU
    # kernel; and only with one chunk per process, replicas = the number of processes).
    C.sync_bn = False
    # What to do with a non-finite loss: 'stop' (default) or 'skip' the batch (counted and logged).
    C.nonfinite_loss = 'stop'
    # Seconds a rank waits in a collective before giving up when another rank died.
    C.dist_timeout_s = 300

    # ---- speed (docs/speed.md) ----
    # 'reference': the switches below as set (all off: the plain path, the authors' function); 'fast': the
    # fastest measured combination for the job and device, resolved at start into the switches you did not
    # set yourself, and logged in one line (smmcl/engine/speed.py).
    C.speed = 'reference'
    C.fast_path = False  # channels_last; inference: BN and layer scales folded into the convs
    # Memory layout on the fast path: None follows fast_path (channels_last); False keeps NCHW, where
    # PyTorch's bf16 depthwise convs train 2x faster on an H100 (docs/speed.md).
    C.channels_last = None
    C.amp = False  # bf16 autocast (NMF and InfoNCE stay fp32)
    C.compile = False  # torch.compile (minutes for MSCAN-B the first time; inductor caches it)
    # With fast_path: MSCAN's depthwise convs in our Triton kernels (smmcl/kernels; needs triton).
    # Off by default (the plain path is the authors' function): inference 2-2.5x faster on an H100 and an
    # H200; training faster only with cuda_graphs_training (H200: 36.3 against 26.2 img/s; docs/speed.md).
    C.triton_kernels = False
    # Inference (eval.py, predict.py, Segmenter): each input shape's forward recorded once as a CUDA graph
    # and replayed (smmcl/engine/graphs.py; the NMF bases are drawn outside the graph, so the same
    # function). On a CUDA device only; elsewhere the model runs as it is.
    C.cuda_graphs = False
    # Training: the model's forward and backward, losses included (all but the optimizer; with the
    # authors' loop anchor sampler, which reads the host per class, all but the losses too) recorded as
    # CUDA graphs on the first batch and replayed (smmcl/engine/graphs.py; same function; docs/speed.md).
    # Not with sync_bn on several processes (collectives) or compile.
    C.cuda_graphs_training = False
    # Host reads of the training step (smmcl/engine/train.py): 1 (the authors') reads the loss terms every
    # iteration, for their tqdm line showing each iteration's loss (SMMCL_LLRGBD/train.py, the epoch
    # loop's pbar.set_description) and the step/skip decision. N > 1:
    # the non-finite check and the skip stay on the device (fused AdamW) and the loss terms are read
    # every N iterations (and at epoch ends and before checkpoints); 'stop' then stops at that read.
    C.host_sync_every = 1

    # ---- evaluation ----
    C.eval_stride_rate = 2 / 3
    C.eval_scale_array = [1]
    C.eval_flip = False
    C.eval_crop_size = [480, 640]
    C.eval_batch_size = 1  # sliding windows per forward (the same function; >1 is faster on GPUs)
    # Window geometry (smmcl/engine/evaluate.py): 'authors' = their CMX evaluator, quirks included;
    # 'corrected' = one forward only when the image fits the crop, each dimension tiled with its own
    # stride and crop, overlapping windows averaged.
    C.eval_protocol = 'authors'
    # Beyond the authors (0: off): evaluate the test split after every N epochs of training, on every
    # rank, with the settings above; the result table goes to the val log, mIoU and a few test images'
    # predictions to TensorBoard. Changes nothing of the training (weights, statistics, random streams).
    C.eval_every_epochs = 0
    # Colours of eval.py -p predictions: one [r, g, b] in 0-1 per class; None: CMX's bit palette.
    C.class_colors = None

    # ---- checkpoints: from checkpoint_start_epoch every checkpoint_step epochs, and the last ----
    C.checkpoint_start_epoch = 300
    C.checkpoint_step = 100
    # Also every K global iterations (None or 0: off, the authors save per epoch only): bounds the work a
    # preemption loses. Only the newest such iter-<N>.pth is kept; `-c auto` resumes from the newest of
    # these and the epoch checkpoints, continuing the epoch's order exactly.
    C.checkpoint_every_iters = None
    return C


def load_config(path: str, overrides: Optional[Iterable[str]] = None) -> EasyDict:
    """Import ``config`` from an experiment's ``config.py``, apply ``key=value`` overrides, finalize.

    The derived keys that ``config.py`` assigned and every ``--set`` key are pinned (``_pinned``):
    :func:`finalize` leaves them as written (module docstring).

    Raises:
        FileNotFoundError: the config file does not exist.
        UnknownKeyError: ``config.py`` or an override names an undeclared key (the message names the
            nearest known one and how to declare one's own).
        ConfigError: a malformed override, or a setting outside its choices (:func:`validate`).
    """
    path = osp.abspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file {path} does not exist')
    spec = importlib.util.spec_from_file_location(f'_smmcl_config_{abs(hash(path))}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = EasyDict(module.config)
    check_declared(config, path)
    config._assigned = sorted(_assignment_lines(path))  # the keys config.py assigns (C.key = ...)
    from_file = [key for key in DERIVED_KEYS if key in config]
    config._pinned = list(from_file)
    config.config_file = path
    apply_overrides(config, overrides or [])
    note_pinned_children(config, path, from_file)
    return validate(finalize(config))


# The primary keys each derived key is computed from (finalize), for the note below.
_PARENTS = dict(
    train_root=('dataset_path', 'train_split_dir'), eval_root=('dataset_path', 'eval_split_dir'),
    rgb_root_folder=('dataset_path', 'train_split_dir', 'rgb_folder'),
    x_root_folder=('dataset_path', 'train_split_dir', 'x_folder'),
    gt_root_folder=('dataset_path', 'train_split_dir', 'gt_folder'),
    train_source=('dataset_path', 'train_list'), eval_source=('dataset_path', 'eval_list'),
    eval_subset_sources=('dataset_path', 'eval_subsets'), niters_per_epoch=('num_train_imgs', 'batch_size'),
    pretrained_model=('backbone',), log_dir=('exp_dir', 'dataset_name', 'backbone'),
    tb_dir=('log_dir',), checkpoint_dir=('log_dir',), log_file=('log_dir',), val_log_file=('log_dir',))


def note_pinned_children(config: EasyDict, path: str, from_file: Sequence[str]) -> None:
    """One log line when ``--set`` changes a parent of a derived key that ``config.py`` assigned: that
    key stays as ``config.py`` wrote it (the rule), which may surprise."""
    overridden = set(config._pinned[len(from_file):])
    kept = [key for key in from_file if key not in overridden and overridden & set(_PARENTS.get(key, ()))]
    if kept:
        logger.warning('%s assigns %s: kept as written although --set changed %s', path,
                       ', '.join(f'{key}={config[key]!r}' for key in kept),
                       ', '.join(sorted(overridden & {p for key in kept for p in _PARENTS[key]})))


def check_declared(config: EasyDict, path: str) -> None:
    """Refuse the keys ``config.py`` at ``path`` assigns that :func:`base_config` does not declare and
    that are not derived (typos such as ``nepoch``); log the authors' inert keys once.

    Raises:
        UnknownKeyError: one message naming every such key, its line and the nearest known key.
    """
    known = set(base_config()) | set(DERIVED_KEYS) | set(_LOADER_KEYS)
    keys = [key for key in config if not str(key).startswith('_') and key not in known]
    inert = [key for key in keys if key in AUTHORS_INERT_KEYS]
    unknown = [key for key in keys if key not in AUTHORS_INERT_KEYS]
    if unknown:
        lines = _assignment_lines(path)
        described = []
        for key in unknown:
            near = nearest(key, known)
            notes = [f'line {lines[key]}'] if key in lines else []
            notes += [f"did you mean '{near}'?"] if near else []
            described.append(f"'{key}'" + (f" ({'; '.join(notes)})" if notes else ''))
        raise UnknownKeyError(f'{path} sets unknown config key{"s" if len(unknown) > 1 else ""} '
                              f'{"; ".join(described)}. Fix the name; {KEY_OF_YOUR_OWN}.')
    if inert:
        note_inert(inert, f'{path} sets')


def note_inert(keys: Sequence[str], where: str) -> None:
    """One log line for keys of :data:`AUTHORS_INERT_KEYS` set in ``where``."""
    logger.warning('%s %s: keys of the authors\' config that act nowhere in their code; accepted and '
                   'ignored (they have no effect here either)', where, ', '.join(keys))


def _assignment_lines(path: str) -> dict:
    """{key: first line number} of the ``X.key = ...`` assignments in a config file (for messages)."""
    lines = {}
    try:
        with open(path) as source:
            tree = ast.parse(source.read())
    except (OSError, SyntaxError):
        return lines
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for target in targets:
            for leaf in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(leaf, ast.Attribute):
                    lines.setdefault(leaf.attr, leaf.lineno)
    return lines


def parse_value(text: str):
    """A command-line value: a Python literal (number, None, True, list, ...) else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: EasyDict, overrides: Iterable[str]) -> EasyDict:
    """Apply ``key=value`` strings in place and pin their keys (``_pinned``, see :func:`finalize`);
    ``a.b=v`` reaches into nested dicts.

    Raises:
        UnknownKeyError: an undeclared key (the nearest known one and how to declare one's own).
        ConfigError: an item not of the form ``key=value``.
    """
    config.setdefault('_pinned', [])
    config.setdefault('_set_keys', [])
    inert = []
    for item in overrides:
        if '=' not in item:
            raise ConfigError(f'override {item!r} is not of the form key=value')
        key, text = item.split('=', 1)
        key = key.strip()
        if key in AUTHORS_INERT_KEYS:
            inert.append(key)
            continue
        node, parts = config, key.split('.')
        for depth, part in enumerate(parts):
            if not isinstance(node, dict):  # 'lr.x=1': lr holds no keys
                parent = '.'.join(parts[:depth])
                raise UnknownKeyError(f"unknown config key '{key}': '{parent}' is not a dict")
            if part not in node and not (depth == 0 and part in DERIVED_KEYS):
                known = [k for k in node.keys() if not k.startswith('_')]
                if depth == 0:
                    known += list(DERIVED_KEYS)
                near = nearest(part, known)
                hint = f"; did you mean '{'.'.join(parts[:depth] + [near])}'?" if near else ''
                own = f' ({KEY_OF_YOUR_OWN})' if depth == 0 else ''
                raise UnknownKeyError(f"unknown config key '{key}'{hint}{own}")
            if depth < len(parts) - 1:
                node = node[part]
        value = parse_value(text)
        if isinstance(node.get(parts[-1]), np.ndarray):
            value = np.asarray(value, dtype=node[parts[-1]].dtype)
        node[parts[-1]] = value
        config._pinned.append(key)
        config._set_keys.append(key)
    if inert:
        note_inert(inert, '--set')
    return config


def nearest(word: str, candidates: Iterable[str]) -> Optional[str]:
    """The candidate closest to a mistyped ``word`` (difflib), or None when none is close."""
    near = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1)
    return near[0] if near else None


def check_choice(key: str, value, choices: Sequence) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices`` (the message names the nearest)."""
    if value in choices:
        return
    near = nearest(value, choices)
    hint = f'; did you mean {near!r}?' if near else ''
    raise ConfigError(f"{key}={value!r}: expected one of {tuple(choices)}{hint} (set it in the experiment's "
                      f"config.py or with --set {key}={near or choices[0]})")


def validate(config: EasyDict) -> EasyDict:
    """Check every setting that has a fixed set of choices, once.

    Settings that depend on the processes (``sync_bn`` on CPU ranks, ``replicas`` against the number of
    processes) are checked when the processes exist (:func:`smmcl.engine.chunks.plan_chunks`).

    Raises:
        ConfigError: the first setting outside its choices, naming the nearest valid value.
    """
    fixed = dict(nonfinite_loss=choices_.NONFINITE_LOSS, eval_protocol=choices_.EVAL_PROTOCOLS,
                 anchor_sampler=choices_.ANCHOR_SAMPLERS, backbone=tuple(choices_.MSCAN_VARIANTS),
                 decoder=choices_.DECODERS, optimizer=choices_.OPTIMIZERS, speed=choices_.SPEEDS)
    for key, choices in fixed.items():
        check_choice(key, config[key], choices)
    if config.channels_last not in (None, True, False):
        raise ConfigError(f'channels_last={config.channels_last!r}: expected None (follow fast_path), True or False')
    for key in ('cuda_graphs', 'cuda_graphs_training'):
        if config[key] not in (True, False):
            raise ConfigError(f'{key}={config[key]!r}: expected True or False')
    if config.speed == 'reference':  # with speed='fast' the switches are final, and checked, at start
        check_switches(config)
    if config.cuda_graphs_training and config.compile:
        raise ConfigError('cuda_graphs_training=True and compile=True: choose one (torch.compile records its '
                          'own graphs with mode="reduce-overhead"); e.g. --set compile=False')
    check_training_counts(config)
    if config.optimizer == 'SGDM' and config.host_sync_every > 1:
        raise ConfigError(f'optimizer=SGDM with host_sync_every={config.host_sync_every}: the device-side skip '
                          f'of a non-finite batch needs fused AdamW; train SGDM with --set host_sync_every=1 '
                          f'(the authors\' per-iteration read) or use optimizer=AdamW')
    return config


def check_switches(config: EasyDict, world_size: int = 1) -> None:
    """Refuse speed switches that cannot act in their combination (``world_size``: the training
    processes, when known).

    Raises:
        ConfigError: naming the switch and the fix.
    """
    if not config.fast_path:
        for key, value in (('channels_last', True), ('triton_kernels', True)):
            if config[key] is value:
                raise ConfigError(f'{key}={value} acts on the fast path only, and fast_path=False: set '
                                  f'fast_path=True too, or drop {key} (e.g. --set fast_path=True)')
    if config.cuda_graphs_training and config.sync_bn and world_size > 1:
        raise ConfigError('cuda_graphs_training=True with sync_bn=True on several processes: the graphs cannot '
                          'record SyncBatchNorm\'s collectives; --set cuda_graphs_training=False or sync_bn=False')


def check_training_counts(config: EasyDict) -> None:
    """``replicas`` and ``host_sync_every`` positive integers, ``checkpoint_every_iters`` None or >= 0,
    ``eval_every_epochs`` >= 0.
    Whether ``replicas`` divides ``batch_size`` is checked when training starts
    (:func:`smmcl.engine.chunks.plan_chunks`), so that tools which read the config without training
    (the data check) take any batch size."""
    replicas = config.replicas
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ConfigError(f'replicas={replicas!r}: expected a positive number of chunks per global batch '
                          f"(the authors' GPUs), e.g. --set replicas=4")
    every = config.checkpoint_every_iters
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 0):
        raise ConfigError(f'checkpoint_every_iters={every!r}: expected None, 0 (off) or a positive number of '
                          f'iterations, e.g. --set checkpoint_every_iters=500')
    watch = config.eval_every_epochs
    if not isinstance(watch, int) or isinstance(watch, bool) or watch < 0:
        raise ConfigError(f'eval_every_epochs={watch!r}: expected 0 (off) or a number of epochs between '
                          f'evaluations of the test split during training, e.g. --set eval_every_epochs=10')
    sync = config.host_sync_every
    if not isinstance(sync, int) or isinstance(sync, bool) or sync < 1:
        raise ConfigError(f'host_sync_every={sync!r}: expected a positive number of iterations between '
                          f"host reads of the loss, e.g. --set host_sync_every=50 (1: every iteration, the "
                          f"authors')")


def finalize(config: EasyDict) -> EasyDict:
    """Compute each derived key (:data:`DERIVED_KEYS`) that is not pinned (``config._pinned``: set in
    ``config.py`` or with ``--set``), from the final values of its parents, parents first, so a
    derived key follows a parent that was set (``log_dir`` -> ``tb_dir``, ``checkpoint_dir``, ...)."""
    pinned = set(config.get('_pinned', []))

    def put(key, value):
        if key not in pinned:
            config[key] = value

    def split_root(split_dir):
        return osp.join(config.dataset_path, split_dir) if split_dir else config.dataset_path

    put('train_root', split_root(config.train_split_dir))
    put('eval_root', split_root(config.eval_split_dir))
    put('rgb_root_folder', osp.join(config.train_root, config.rgb_folder))
    put('x_root_folder', osp.join(config.train_root, config.x_folder))
    put('gt_root_folder', osp.join(config.train_root, config.gt_folder))
    put('train_source', osp.join(config.dataset_path, config.train_list) if config.train_list else None)
    put('eval_source', osp.join(config.dataset_path, config.eval_list) if config.eval_list else None)
    put('eval_subset_sources', {name: osp.join(config.dataset_path, rel)
                                for name, rel in (config.eval_subsets or {}).items()})
    # The authors: niters_per_epoch = num_train_imgs // batch_size + 1.
    put('niters_per_epoch', config.num_train_imgs // config.batch_size + 1)
    put('pretrained_model', osp.join(REPO_ROOT, 'pretrained', 'segnext', f'{config.backbone}.pth'))
    put('log_dir', osp.join(config.exp_dir, f'log_{config.dataset_name}_{config.backbone}'))
    put('tb_dir', osp.join(config.log_dir, 'tb'))
    put('checkpoint_dir', osp.join(config.log_dir, 'checkpoint'))
    stamp = time.strftime('%Y_%m_%d_%H_%M_%S', time.localtime())  # the authors' exp_time
    put('log_file', osp.join(config.log_dir, f'log_{stamp}.log'))
    put('val_log_file', osp.join(config.log_dir, f'val_{stamp}.log'))
    return config


# A checkpoint's stored config (smmcl.engine.checkpoint.training_state) is read back by the entry points
# that load one checkpoint (predict.py, export.py, the tools, the Segmenter API): the model it is and the
# settings its run evaluated with, unless given with --set (adopt_stored_config).
MODEL_KEYS = ('backbone', 'num_classes', 'decoder', 'decoder_embed_dim')
INFERENCE_KEYS = ('eval_crop_size', 'eval_scale_array', 'eval_flip', 'eval_stride_rate', 'eval_protocol',
                  'image_height', 'image_width', 'norm_mean', 'norm_std', 'true_rgb_order', 'x_is_single_channel',
                  'class_names', 'class_colors', 'background', 'seed')


def plain(value):
    """``value`` in the types ``torch.load(weights_only=True)`` reads: dicts, lists, numbers, strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def stored_config(config: EasyDict) -> dict:
    """The effective config as a checkpoint stores it (plain types, internal keys left out)."""
    return {key: plain(value) for key, value in config.items() if not str(key).startswith('_')}


def adopt_stored_config(config: EasyDict, stored: dict, source: str) -> List[str]:
    """Take :data:`MODEL_KEYS` and :data:`INFERENCE_KEYS` from checkpoint ``source``'s stored config,
    except the keys given with ``--set`` (``config._set_keys``): an explicit inference setting wins; an
    explicit model setting must agree with the checkpoint. Returns the keys whose value changed.

    Raises:
        ConfigError: a model key set with ``--set`` contradicts the checkpoint (naming its value).
    """
    explicit = set(config.get('_set_keys', ()))
    changed = []
    for key in MODEL_KEYS + INFERENCE_KEYS:
        if key not in stored:
            continue
        value = np.asarray(stored[key], dtype=config[key].dtype) if isinstance(config[key], np.ndarray) \
            else stored[key]
        if plain(value) == plain(config[key]):
            continue
        if key in explicit:
            if key in MODEL_KEYS:
                raise ConfigError(f'{source} was trained with {key}={stored[key]!r}, but {key}={config[key]!r} is '
                                  f'set; drop the setting (the checkpoint\'s is used) or pick another checkpoint')
            continue
        config[key] = value
        changed.append(key)
    validate(config)
    return changed


def format_config(config: EasyDict) -> str:
    """The effective config, one ``key: value`` per line, for the logs."""
    return '\n'.join(f'{k}: {v!r}' for k, v in sorted(config.items()) if not k.startswith('_'))
