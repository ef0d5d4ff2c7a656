"""What SMMCL costs: parameters per part, GFLOPs of one forward, latency and throughput.

    python -m smmcl.tools.complexity --config SMMCL_NYU/config.py [--height 480 --width 640]
        [--set backbone=mscan_t ...] [--no-timing] [--batches 1 8] [--iters N] [--warmup N]

The model is built by :func:`smmcl.models.build_segmentor` (``pretrained_model`` is never read) at the
config's class count; the size defaults to ``config.eval_crop_size`` (what one evaluator forward sees).

Parameters, per part (they sum to the total, ``sum(p.numel())``): the RGB and the X MSCAN branch
(``patch_embed*``, ``block*``, ``norm*``), the cross-modal modulation (``module1-4``), the fusion convs
(``fconv1-4``; the authors build ``fconv1`` but never run it), the decoder head (LightHamHead) and the
contrastive projectors (training only). "Used by the forward" counts the parameters of the modules one
inference forward runs (no projectors, no ``fconv1``).

FLOPs: :class:`torch.utils.flop_counter.FlopCounterMode` over one eval-mode forward of batch 1 (logits
only, no projectors), run under ``FakeTensorMode`` so that nothing is computed (a MSCAN-B count takes
about a second on the CPU; the meta device cannot run the NMF's ``autocast`` block). What it counts:

- ``aten.convolution``: 2 x (output pixels) x C_out x (C_in / groups) x k_h x k_w, so depthwise and
  strip convolutions count their true multiply-adds; biases are not counted;
- ``aten.bmm`` (the NMF's multiplicative updates and reconstruction): 2 x b x m x k x n; ``mm`` /
  ``addmm`` too (SMMCL has none).

Not counted: element-wise operations, normalisation layers, activations, softmax, pooling and the bilinear
interpolations (decoder inputs and logits). SMMCL with MSCAN-B at 480x640 (40 classes): 149.8 GFLOPs =
143.8 convolutions + 6.0 NMF bmm, within 1 % of the paper's 151 GFLOPs.

Timing: mean milliseconds per forward and images per second at each batch size (random N-3-H-W inputs,
eval mode, no_grad) for the plain path (fp32, NCHW: the reference) and the fast path (``fast_path`` and
``amp`` switched on: BN and layer scales folded, channels_last, bf16 autocast where the device computes it
natively, else fp32 -- the dtype column says which; ``compile`` / ``triton_kernels`` as the config sets
them), configured by :mod:`smmcl.engine.precision` as ``eval.py`` does. ``--warmup`` forwards first, then
``--iters`` timed ones between device synchronisations (as ``bench/bench.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import re
import sys
import time
from collections import OrderedDict
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

from smmcl import cli
from smmcl.config import ConfigError, load_config
from smmcl.engine.precision import for_inference, memory_format, mixed_precision
from smmcl.inference import default_device
from smmcl.models import build_segmentor

# (part, pattern on the parameter / module name), in report order. The branches' patterns stop at a digit,
# so ``block1`` is the RGB branch and ``block_other1`` the X branch.
PARTS: Tuple[Tuple[str, str], ...] = (
    ('RGB branch (MSCAN)', r'backbone\.(patch_embed|block|norm)\d'),
    ('X branch (MSCAN)', r'backbone\.(patch_embed|block|norm)_other\d'),
    ('cross-modal modulation', r'backbone\.module\d'),
    ('fusion convs', r'backbone\.fconv\d'),
    ('decoder head (LightHamHead)', r'decode_head\.'),
    ('projectors (training only)', r'backbone\.projector_'),
)


def part_of(name: str) -> Optional[str]:
    """The part a parameter or module name (``backbone.block1.0.attn...``) belongs to, None for none."""
    for part, pattern in PARTS:
        if re.match(pattern, name + '.'):
            return part
    return None


def parameter_counts(model: nn.Module) -> Dict[str, int]:
    """{part: parameter count} in :data:`PARTS` order, plus ``'total'``.

    Raises:
        ValueError: a parameter belongs to no part (a new module the report must learn about).
    """
    counts = OrderedDict((part, 0) for part, _ in PARTS)
    for name, param in model.named_parameters():
        part = part_of(name)
        if part is None:
            raise ValueError(f'parameter {name} belongs to none of the parts {[p for p, _ in PARTS]}')
        counts[part] += param.numel()
    counts['total'] = sum(p.numel() for p in model.parameters())
    return counts


@contextlib.contextmanager
def _called_modules(model: nn.Module):
    """Collects the modules whose forward runs inside the context."""
    called = set()
    handles = [m.register_forward_hook(lambda module, *_: called.add(module)) for m in model.modules()]
    try:
        yield called
    finally:
        for handle in handles:
            handle.remove()


def count_flops(fn: Callable[..., object], *inputs: torch.Tensor,
                model: Optional[nn.Module] = None) -> Dict[str, object]:
    """FLOPs of ``fn(*inputs)`` (2 per multiply-add) without computing anything.

    ``fn`` runs once under ``FakeTensorMode`` (real parameters, fake activations) and ``FlopCounterMode``
    (see the module docstring for what is counted).

    Args:
        fn: a module or function of ``inputs``.
        inputs: real CPU tensors, shapes as the forward wants them (only their shapes matter).
        model: the module whose parts to report (default ``fn`` when it is a module).

    Returns:
        ``total`` (int), ``by_op`` ({aten op name: FLOPs}), ``by_part`` ({part of :data:`PARTS`: FLOPs};
        parts that ran no counted op are left out) and ``used_parameters`` (parameters of the modules
        that ran).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    model = model if model is not None else (fn if isinstance(fn, nn.Module) else None)
    counter = FlopCounterMode(display=False)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with contextlib.ExitStack() as stack:
        called = stack.enter_context(_called_modules(model)) if model is not None else set()
        stack.enter_context(torch.no_grad())
        stack.enter_context(fake_mode)
        fake_inputs = [fake_mode.from_tensor(t) for t in inputs]
        stack.enter_context(counter)
        fn(*fake_inputs)
    counts = counter.get_flop_counts()
    by_op = {str(op).replace('aten.', ''): int(n) for op, n in counts.get('Global', {}).items()}
    by_part: Dict[str, int] = OrderedDict()
    if model is not None:
        # Keys are '<RootClass>.<module path>' and count their submodules too: take the outermost module
        # of each part.
        paths = {key.split('.', 1)[1]: sum(ops.values()) for key, ops in counts.items() if '.' in key}
        for path, flops in paths.items():
            part = part_of(path)
            prefixes = ['.'.join(path.split('.')[:i]) for i in range(1, path.count('.') + 1)]
            if part is not None and not any(p in paths and part_of(p) for p in prefixes):
                by_part[part] = by_part.get(part, 0) + flops
        by_part = OrderedDict((part, by_part[part]) for part, _ in PARTS if part in by_part)
    used = sum(p.numel() for m in called for p in m.parameters(recurse=False))
    return dict(total=int(counter.get_total_flops()), by_op=by_op, by_part=by_part, used_parameters=used)


def segmentor_flops(model: nn.Module, height: int, width: int, batch: int = 1) -> Dict[str, object]:
    """:func:`count_flops` of one eval-mode forward ``model(rgb, x)`` on N-3-H-W inputs (logits only)."""
    was_training = model.training
    model.eval()
    try:
        shape = (batch, 3, height, width)
        return count_flops(model, torch.empty(shape), torch.empty(shape))
    finally:
        model.train(was_training)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def path_config(config, fast: bool):
    """The config of the plain path (``fast_path`` and ``amp`` off) or the fast path (both on)."""
    config = copy.deepcopy(config)
    config.update(fast_path=fast, amp=fast)
    if not fast:
        config.update(compile=False, triton_kernels=False)
    return config


def _dtype_name(amp) -> str:
    return {torch.bfloat16: 'bf16', torch.float16: 'fp16'}.get(getattr(amp, 'fast_dtype', None), 'fp32')


@torch.no_grad()
def time_forward(model: nn.Module, config, device: torch.device, batch: int, height: int, width: int,
                 iters: int, warmup: int) -> Dict[str, object]:
    """Mean latency of ``model``'s forward on random N-3-H-W inputs, prepared as ``config`` says.

    Args:
        model: the plain eval-mode segmentor on ``device`` (the fast path folds a copy of it).
        config: its ``fast_path``, ``amp``, ``compile``, ``triton_kernels`` choose the path.

    Returns:
        ``ms`` (per forward of ``batch`` images), ``images_per_s`` and ``dtype``.
    """
    runner = for_inference(model, config)
    amp, _ = mixed_precision(config, device)
    generator = torch.Generator().manual_seed(0)
    fmt = memory_format(config)
    rgb, x = (torch.randn((batch, 3, height, width), generator=generator).to(device)
              .contiguous(memory_format=fmt) for _ in range(2))
    with amp:
        for _ in range(warmup):
            runner(rgb, x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            runner(rgb, x)
        _sync(device)
    seconds = (time.perf_counter() - start) / iters
    return dict(ms=seconds * 1e3, images_per_s=batch / seconds, dtype=_dtype_name(amp))


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU ({torch.get_num_threads()} threads)'


def report(config, height: int, width: int, timing: bool = True, batches: Sequence[int] = (1, 8),
           iters: Optional[int] = None, warmup: Optional[int] = None, device=None) -> str:
    """The cost report of ``config``'s model at ``height`` x ``width`` as text (see the module docstring).

    ``iters`` / ``warmup`` default to 20 / 5 on a GPU and 3 / 1 on the CPU."""
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(int(config.seed))
    model = build_segmentor(config).eval()
    params = parameter_counts(model)
    flops = segmentor_flops(model, height, width)
    lines = [f'SMMCL {config.backbone}, {int(config.num_classes)} classes; '
             f'inputs rgb, x: 1x3x{height}x{width} each', '',
             f"{'part':<30} {'params (M)':>10} {'GFLOPs':>8}"]
    for part, count in params.items():
        if part == 'total':
            continue
        lines.append(f'{part:<30} {count / 1e6:>10.3f} {flops["by_part"].get(part, 0) / 1e9:>8.2f}')
    lines.append(f"{'total':<30} {params['total'] / 1e6:>10.3f} {flops['total'] / 1e9:>8.2f}")
    lines.append(f"{'used by the forward':<30} {flops['used_parameters'] / 1e6:>10.3f}")
    ops = ', '.join(f'{op} {n / 1e9:.2f}' for op, n in flops['by_op'].items())
    lines.append(f'GFLOPs of one forward (batch 1, 2 per multiply-add): {flops["total"] / 1e9:.2f} ({ops})')
    if timing:
        gpu = device.type == 'cuda'
        iters = iters if iters is not None else (20 if gpu else 3)
        warmup = warmup if warmup is not None else (5 if gpu else 1)
        model = model.to(device)
        lines += ['', f'timing on {device_name(device)}, torch {torch.__version__} ({warmup} warm-up + '
                      f'{iters} timed forwards)',
                  f"{'path':<6} {'dtype':<5} {'batch':>5} {'ms / forward':>13} {'img/s':>9}"]
        for label, fast in (('plain', False), ('fast', True)):
            cfg = path_config(config, fast)
            for batch in batches:
                t = time_forward(model, cfg, device, batch, height, width, iters, warmup)
                lines.append(f"{label:<6} {t['dtype']:<5} {batch:>5} {t['ms']:>13.1f} "
                             f"{t['images_per_s']:>9.2f}")
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m smmcl.tools.complexity',
                                     description="SMMCL's parameters per part, GFLOPs, latency and "
                                                 "throughput.")
    cli.add_config(parser)
    parser.add_argument('--height', type=int, default=None, help='input height (default: eval_crop_size)')
    parser.add_argument('--width', type=int, default=None, help='input width (default: eval_crop_size)')
    cli.add_set(parser)
    parser.add_argument('--no-timing', action='store_true', help='parameters and FLOPs only')
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 8], help='batch sizes to time')
    parser.add_argument('--iters', type=int, default=None, help='timed forwards (default: GPU 20, CPU 3)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed forwards first (GPU 5, CPU 1)')
    parser.add_argument('--device', default=None, help="'cpu' or 'cuda[:i]' (default: the GPU if any)")
    return parser


def main(argv: Optional[Iterable[str]] = None) -> None:
    """Print :func:`report`; exits with status 1 and a one-line reason for a bad config or size."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        crop = list(config.eval_crop_size)
        height = args.height if args.height is not None else int(crop[0])
        width = args.width if args.width is not None else int(crop[1])
        if min([height, width] + list(args.batches)) < 1:
            raise ConfigError(f'--height {height} --width {width} --batches {args.batches}: '
                              f'each must be >= 1')
    except (ConfigError, FileNotFoundError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        raise SystemExit(1)
    print(report(config, height, width, timing=not args.no_timing, batches=args.batches, iters=args.iters,
                 warmup=args.warmup, device=args.device), flush=True)


if __name__ == '__main__':
    main()
