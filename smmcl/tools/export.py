"""Export SMMCL's single-crop forward to ONNX: ``python export.py -e 500 -o smmcl.onnx`` in an experiment
folder (SMMCL, Dong & Yokoya, WACV 2024).

The graph is one forward of the segmentor on one crop; sliding windows, scales and flip stay outside it.

- Inputs ``rgb`` and ``x``: float32 N-3-H-W, fixed N, H, W (``--batch``, ``--height``, ``--width``;
  default batch 1 at ``config.eval_crop_size``), prepared as the dataset prepares them
  (:func:`smmcl.data.dataset.network_order`, :func:`smmcl.engine.evaluate.to_input`): colour images in
  OpenCV's BGR order unless ``config.true_rgb_order`` (the authors' reading quirk, their checkpoints
  were trained on it), a one-channel X (depth, thermal) replicated to 3 channels, then
  ``(img / 255 - norm_mean[c]) / norm_std[c]`` for channel ``c`` of both images (the same ImageNet
  statistics for X).
- Output ``logits``: float32 N-K-H-W raw logits (the evaluator scores ``exp(logits)``; the argmax over K
  is the prediction).

The file's metadata (``onnx.load(path).metadata_props``) records this: ``channel_order``,
``x_replicated``, ``norm_mean``, ``norm_std``, ``num_classes``, ``class_names``, ``nmf_bases_seed``,
``batch``, ``checkpoint``.

NMF bases. LightHamHead's NMF draws random bases in every forward (the authors' ``_build_bases`` with
``RAND_INIT``), which ONNX cannot express (the exporter stops at ``aten.rand``). The export fixes them:
one (N*S)-D-R set drawn on the CPU from a generator seeded with ``config.seed`` and stored in the graph as
a constant, so the graph accepts only the exported batch size. On the CPU these are the bases ``eval.py``
draws for its first image (it seeds ``config.seed + i`` before image ``i``); other images get other draws
there, so the exported graph matches ``eval.py`` up to the NMF's noise, which the authors note makes
results vary slightly between test rounds.

Exporter: ``torch.onnx.export(dynamo=True)``, the torch.export-based exporter, default since torch 2.9;
the TorchScript exporter is deprecated (a DeprecationWarning in torch 2.13) and both gave the same logits
here (1e-6 relative). Opset 18 by default: the lowest this exporter emits natively (lower ones go
through ONNX's version converter), run by onnxruntime 1.14 and later. onnx / onnxscript / onnxruntime are
imported inside the functions: training never needs them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import os.path as osp
import sys
import warnings
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from smmcl import cli
from smmcl.config import ConfigError, load_config
from smmcl.engine.checkpoint import CheckpointError
from smmcl.inference import checkpoint_path, load_model
from smmcl.models.ham_head import Hamburger, given_bases

DEFAULT_OPSET = 18
INPUT_NAMES = ('rgb', 'x')
OUTPUT_NAME = 'logits'


def seeded_nmf_bases(model: nn.Module, batch: int, seed: int) -> Dict[str, torch.Tensor]:
    """{hamburger name: (batch*S)-D-R bases} drawn as the NMF draws them, on the CPU from a generator
    seeded with ``seed`` (one generator per hamburger, each starting from ``seed``)."""
    bases = {}
    for name, module in model.named_modules():
        if isinstance(module, Hamburger):
            generator = torch.Generator().manual_seed(int(seed))
            bases[name] = module.ham.draw_bases(batch, module.ham_in.conv.out_channels, generator=generator)
    return bases


@contextlib.contextmanager
def fixed_nmf_bases(model: nn.Module, batch: int, seed: int) -> Iterator[Dict[str, torch.Tensor]]:
    """Within the context, every NMF of ``model`` uses the bases of :func:`seeded_nmf_bases` (moved to
    the model's device) instead of drawing (:func:`smmcl.models.ham_head.given_bases`); they are
    removed on exit. Yields the bases."""
    bases = seeded_nmf_bases(model, batch, seed)
    device = next(model.parameters()).device
    with given_bases(model, [value.to(device) for value in bases.values()]):
        yield bases


def example_inputs(batch: int, height: int, width: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded standard-normal rgb and x, N-3-H-W float32 each (the range of normalised images)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 3, height, width)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def input_metadata(config, batch: int, checkpoint: str = '') -> Dict[str, str]:
    """The metadata recorded in the ONNX file: how to prepare the inputs and what the output means."""
    return {
        'inputs': 'rgb, x: float32 N-3-H-W, (img / 255 - norm_mean[c]) / norm_std[c] per channel c',
        'output': 'logits: float32 N-K-H-W; prediction = argmax over K',
        'channel_order': 'rgb' if config.true_rgb_order else 'bgr',
        'x_replicated': str(bool(config.x_is_single_channel)),
        'norm_mean': json.dumps([float(v) for v in config.norm_mean]),
        'norm_std': json.dumps([float(v) for v in config.norm_std]),
        'num_classes': str(int(config.num_classes)),
        'class_names': json.dumps(list(config.class_names or [])),
        'nmf_bases_seed': str(int(config.seed)),
        'batch': str(int(batch)),
        'checkpoint': checkpoint,
    }


def export_onnx(model: nn.Module, path: str, batch: int, height: int, width: int, seed: int,
                metadata: Optional[Dict[str, str]] = None, opset: int = DEFAULT_OPSET) -> str:
    """Write ``model``'s single-crop forward as an ONNX graph to ``path``.

    Args:
        model: an SMMCL segmentor ``(rgb, x) -> logits``, N-3-H-W -> N-K-H-W; exported in eval mode on
            the CPU (its mode and device are restored after).
        path: the ``.onnx`` file to write (one file, weights inside).
        batch, height, width: the fixed input size N, H, W.
        seed: seeds the NMF bases (:func:`fixed_nmf_bases`).
        metadata: strings stored as the model's ``metadata_props``.
        opset: ONNX opset of the graph.

    Returns:
        ``path``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval().cpu()
    try:
        with fixed_nmf_bases(model, batch, seed), torch.no_grad(), warnings.catch_warnings():
            # torch.export's own deprecation notice about its tree specs, nothing the user can act on
            warnings.filterwarnings('ignore', message='.*LeafSpec', category=FutureWarning)
            program = torch.onnx.export(model, example_inputs(batch, height, width), dynamo=True,
                                        input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                                        opset_version=opset, verbose=False)
    finally:
        model.train(was_training).to(device)
    program.model.metadata_props.update(metadata or {})
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    program.save(path, external_data=False)
    return path


def onnx_logits(path: str, rgb: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Run the exported graph with onnxruntime on the CPU: N-3-H-W float32 inputs -> N-K-H-W logits."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    return session.run([OUTPUT_NAME], {INPUT_NAMES[0]: np.asarray(rgb, np.float32),
                                       INPUT_NAMES[1]: np.asarray(x, np.float32)})[0]


def relative_error(path: str, model: nn.Module, batch: int, height: int, width: int, seed: int) -> float:
    """``|onnx - torch| / |torch|`` (Frobenius norms) of the logits of the exported graph and of ``model``
    with the same fixed NMF bases, on seeded random inputs (other than the export's examples)."""
    rgb, x = example_inputs(batch, height, width, seed=1)
    device = next(model.parameters()).device
    with fixed_nmf_bases(model, batch, seed), torch.no_grad():
        reference = model.eval()(rgb.to(device), x.to(device)).float().cpu().numpy()
    got = onnx_logits(path, rgb.numpy(), x.numpy())
    return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))


def _missing_packages(check: bool) -> Sequence[str]:
    import importlib.util
    names = ['onnx', 'onnxscript'] + (['onnxruntime'] if check else [])
    return [name for name in names if importlib.util.find_spec(name) is None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Export the single-crop forward of an SMMCL checkpoint to '
                                                 'ONNX (inputs rgb, x: N-3-H-W normalised; output logits).')
    cli.add_checkpoint(parser)
    parser.add_argument('-o', '--output', required=True, help='the .onnx file to write')
    parser.add_argument('--height', type=int, default=None, help='input height (default: eval_crop_size)')
    parser.add_argument('--width', type=int, default=None, help='input width (default: eval_crop_size)')
    parser.add_argument('--batch', type=int, default=1,
                        help='batch size N (fixed: the NMF bases are per image)')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET, help='ONNX opset')
    parser.add_argument('--no-check', action='store_true',
                        help='skip running the file with onnxruntime against PyTorch')
    cli.add_set(parser)
    return parser


def main(config_path: str, argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv``, load the checkpoint, export, and (unless ``--no-check``) compare onnxruntime's
    logits with PyTorch's. Exits with status 1 and a one-line reason for a bad option, a missing or
    incompatible checkpoint, or missing ONNX packages."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(config_path, args.set)
        crop = list(config.eval_crop_size)
        height = args.height if args.height is not None else int(crop[0])
        width = args.width if args.width is not None else int(crop[1])
        if min(height, width, args.batch) < 1:
            raise ConfigError(f'--height {height} --width {width} --batch {args.batch}: each must be >= 1')
        missing = _missing_packages(not args.no_check)
        if missing:
            raise ConfigError(f'export needs {", ".join(missing)}: pip install -r requirements-dev.txt')
        checkpoint = checkpoint_path(args.epoch, config.checkpoint_dir)
        model = load_model(config, checkpoint, device='cpu', adopt=True)
    except (ConfigError, CheckpointError, FileNotFoundError) as exc:  # the user's to fix
        print(f'error: {exc}', file=sys.stderr)
        raise SystemExit(1)
    logging.getLogger('torch.onnx').setLevel(logging.ERROR)
    export_onnx(model, args.output, args.batch, height, width, int(config.seed),
                metadata=input_metadata(config, args.batch, checkpoint), opset=args.opset)
    print(f'wrote {args.output}: rgb, x {args.batch}x3x{height}x{width} -> logits '
          f'{args.batch}x{int(config.num_classes)}x{height}x{width} (opset {args.opset}, NMF bases seeded '
          f'with {int(config.seed)})')
    if not args.no_check:
        error = relative_error(args.output, model, args.batch, height, width, int(config.seed))
        print(f'onnxruntime vs PyTorch logits: relative error {error:.2e}')
