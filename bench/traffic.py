"""Memory traffic of SMMCL's forward (or training step) per ATen operator, without a GPU.

    python bench/traffic.py                        # fast inference forward, MSCAN-B, batch 8, 480x640
    python bench/traffic.py --train                # the training step: forward, losses and backward
    TRITON_INTERPRET=1 python bench/traffic.py --kernels   # with the Triton kernels (minutes)
    TRITON_INTERPRET=1 python bench/traffic.py --kernels --passes   # their own passes counted instead

Every operator the forward dispatches is recorded on the CPU at two small sizes with the bytes it reads
and writes (its tensor arguments and results; views move nothing), and each operator's bytes are
extrapolated to the requested size as ``a * pixels + b`` (activations scale with the pixels, weights
do not). The table gives calls, GB and the time those bytes take at ``--bandwidth`` (default: the copy
bandwidth measured on the H200, 4.3 TB/s): the floor below which that operator cannot run, to set
against a GPU profile (``bench/gpu_check.py``'s profile step) to see which operators are far above it.
bf16 autocast as on a GPU (also where this CPU only emulates it: only the dtypes matter here).

Each of our custom ops (``smmcl::*``) is one operator here, its inputs and outputs counted once: the
floor of a one-pass op, not what it moves. With ``--passes`` an op's body runs under the counter
instead, each Triton launch its own row (``kernel <name>``: its tensor arguments counted once each, what
a pass reads or writes; a tile's neighbours come from the cache) beside the ATen operators the body
calls: the passes the kernels make (the backward of the MLP's 3x3 conv, for instance, in three, or two
with its weight gradient in the first).

    TRITON_INTERPRET=1 python bench/traffic.py --train --kernels --passes --launches   # and the launches

With ``--launches`` it also counts the kernel launches (an operator that writes an argument or returns
memory of its own; views, aliases, casts to the same dtype and allocations launch nothing; each Triton
launch) and where our code makes them (the innermost line of the smmcl package; ``(autograd)`` for a
built-in backward the engine runs): in a CUDA graph a replay still runs each as a kernel of its own, at
a few microseconds for the smallest, so hundreds of tiny ones cost what a large pass does.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

try:
    import smmcl  # noqa: F401
except ModuleNotFoundError:
    sys.exit('smmcl is not installed: run `make install` or `pip install -e .` in the repo root')

from smmcl.config import base_config  # noqa: E402
from smmcl.engine.precision import cast_dense_layers, for_training, inference_model  # noqa: E402
from smmcl.models import build_segmentor  # noqa: E402


_ALLOCATIONS = (torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided, torch.ops.aten.new_empty,
                torch.ops.aten.new_empty_strided)


class Traffic(TorchDispatchMode):
    """Per operator (named with the dtype of its first tensor argument): calls and bytes moved; with
    ``passes`` our custom ops' bodies run under the counter (:func:`kernel_launches` counts their Triton
    launches)."""

    def __init__(self, passes: bool = False, launches: bool = False):
        super().__init__()
        self.ops = collections.defaultdict(lambda: [0, 0])
        self.passes = passes
        self.launches = collections.Counter() if launches else None  # (operator, call site) -> launches

    def count(self, name: str, moved: int, launched: bool = False) -> None:
        row = self.ops[name]
        row[0] += 1
        row[1] += moved
        if launched and self.launches is not None:
            self.launches[name, call_site()] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.passes and func.namespace == 'smmcl':
            from torch._library.custom_ops import OPDEFS  # the op's Python body, below autograd as here
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if self.passes and func.overloadpacket in _ALLOCATIONS:
            return out  # the ops' bodies allocate their outputs: nothing moves (the op-boundary count keeps its rows)
        launched = (self.launches is not None and func.overloadpacket not in _ALLOCATIONS
                    and writes_memory(func, args, kwargs, out))
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func.overloadpacket is torch.ops.aten.index_select:  # reads only the rows it selects, and the index
            tensors = tensors[1:] + [out]
        moved = 0 if func.is_view else sum(t.numel() * t.element_size() for t in tensors + [
            t for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        dtype = str(tensors[0].dtype).replace('torch.', '') if tensors else '-'
        self.count(f'{func.overloadpacket.__name__} ({dtype})', moved, launched)
        if func.overloadpacket is torch.ops.aten.convolution and args[2] is not None and args[8] == 1:
            # oneDNN adds a conv's bias inside the conv; on a GPU ATen adds it after cuDNN's dense conv,
            # one more pass over the output (reading and writing it)
            self.count(f'bias add after a cuDNN convolution ({out.dtype})'.replace('torch.', ''),
                       2 * out.numel() * out.element_size(), launched)
        return out


def writes_memory(func, args, kwargs, out) -> bool:
    """Whether an ATen operator runs a kernel: it writes one of its arguments (in place, ``out=``) or
    returns a tensor in memory of its own. Views, aliases and casts to the dtype a tensor has return an
    argument's memory. (The caller leaves out allocations, which return memory of their own unwritten.)"""
    if any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments):
        return True
    inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    return any(isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in inputs
               for t in tree_leaves(out))


_PACKAGE = os.path.dirname(os.path.abspath(smmcl.__file__))
# frames that only pass a launch on (a kernel that is not autotuned launches through triton_common.launch)
_RELAYS = {(os.path.join('kernels', 'triton_common.py'), 'launch')}


def call_site() -> str:
    """``file:line function`` of the innermost frame in the smmcl package that is not a relay, ``(autograd)``
    if none (a built-in backward, which the autograd engine runs without a Python frame of ours)."""
    for frame in reversed(traceback.extract_stack()):
        if (frame.filename.startswith(_PACKAGE + os.sep)
                and (os.path.relpath(frame.filename, _PACKAGE), frame.name) not in _RELAYS):
            return f'{os.path.relpath(frame.filename, os.path.dirname(_PACKAGE))}:{frame.lineno} {frame.name}'
    return '(autograd)'


@contextlib.contextmanager
def kernel_launches(mode: Traffic):
    """Each interpreted Triton launch counted in ``mode`` as ``kernel <name>``: its tensor arguments once
    each (a tensor passed twice, as a stand-in for an absent one, once)."""
    from triton.runtime.interpreter import InterpretedFunction
    run = InterpretedFunction.run

    def counted(self, *args, grid, warmup, **kwargs):
        if not warmup:
            tensors = {t.data_ptr(): t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
            mode.count(f'kernel {self.fn.__name__}', sum(t.numel() * t.element_size() for t in tensors.values()),
                       launched=True)
        with _disable_current_modes():  # the interpreter's own copies to and from NumPy are not the kernel's
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = counted
    try:
        yield
    finally:
        InterpretedFunction.run = run


def record(args, height, width, mode=None, batch=1):
    """{operator: [calls, bytes]} of one forward (or training step) of ``batch`` images at height x width,
    counted in ``mode`` (a :class:`Traffic`; by default a new one)."""
    cfg = base_config()
    cfg.update(backbone=args.backbone, num_classes=14, fast_path=True, amp=True, channels_last=False,
               triton_kernels=args.kernels, anchor_sampler='vectorized')
    torch.manual_seed(0)
    rgb, x = torch.randn(2, batch, 3, height, width)
    label = torch.randint(0, 14, (batch, height, width))
    passes = getattr(args, 'passes', False)
    mode = mode or Traffic(passes)
    launches = kernel_launches(mode) if passes else contextlib.nullcontext()
    if args.train:
        model = for_training(build_segmentor(cfg, with_loss=True).train(), cfg)
        with mode, launches:
            with torch.autocast('cpu', dtype=torch.bfloat16):
                loss = model(rgb, x, label)
            loss.backward()
    else:
        model = cast_dense_layers(inference_model(build_segmentor(cfg), cfg), torch.bfloat16)
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16), mode, launches:
            model(rgb, x)
    return dict(mode.ops)


def extrapolate(small, large, pixels_small, pixels_large, pixels, batch):
    """{operator: (calls per forward, bytes)} at ``batch`` images of ``pixels``, from two records:
    bytes = slope * pixels * batch + fixed, calls as at the larger size."""
    out = {}
    for name, (calls, moved) in large.items():
        if name in small:
            before = small[name][1]
            slope = (moved - before) / (pixels_large - pixels_small)
            fixed = before - slope * pixels_small
        else:  # an operator only the larger size runs: all of it scales
            slope, fixed = moved / pixels_large, 0.0
        out[name] = (calls, max(0.0, slope * pixels * batch + fixed))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('--backbone', default='mscan_b')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--height', type=int, default=480)
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--train', action='store_true', help='the training step (forward, losses, backward)')
    parser.add_argument('--kernels', action='store_true', help='the Triton kernels (on the CPU: TRITON_INTERPRET=1)')
    parser.add_argument('--passes', action='store_true',
                        help="with --kernels: count our ops' own passes (each Triton launch), not their inputs and "
                             'outputs once')
    parser.add_argument('--launches', action='store_true',
                        help='also count the kernel launches, by operator and call site (the --top largest)')
    parser.add_argument('--bandwidth', type=float, default=4.3, help='TB/s for the time column')
    parser.add_argument('--top', type=int, default=30)
    args = parser.parse_args(argv)
    if args.passes and not args.kernels:
        parser.error('--passes counts the Triton kernels\' passes: give --kernels too')
    sizes = ((64, 96), (128, 192))
    small, large = record(args, *sizes[0]), record(args, *sizes[1])
    if args.launches:  # launches do not depend on the size, but on the batch where an image has a path of its
        # own (drop path's factor per image): counted on a batch of 2, as on any larger one
        counted = Traffic(args.passes, launches=True)
        record(args, *sizes[0], mode=counted, batch=2)
    rows = extrapolate(small, large, sizes[0][0] * sizes[0][1], sizes[1][0] * sizes[1][1],
                       args.height * args.width, args.batch)
    total = sum(moved for _, moved in rows.values())
    what = 'training step' if args.train else 'inference forward'
    print(f'{what}, {args.backbone}, batch {args.batch}, {args.height}x{args.width}, fast path bf16'
          f'{" + Triton kernels" if args.kernels else ""}{" (their passes)" if args.passes else ""}: '
          f'{total / 1e9:.2f} GB, '
          f'{total / args.bandwidth / 1e9:.2f} ms at {args.bandwidth} TB/s; per operator (calls per image):')
    print(f"{'operator (dtype of its first tensor)':<44} {'calls':>6} {'GB':>8} {'ms':>7} {'share':>6}")
    for name, (calls, moved) in sorted(rows.items(), key=lambda kv: kv[1][1], reverse=True)[:args.top]:
        print(f'{name:<44} {calls:>6} {moved / 1e9:8.3f} {moved / args.bandwidth / 1e9:7.3f} '
              f'{100 * moved / max(total, 1):5.1f}%')
    if args.launches:
        by_operator = collections.Counter()
        for (name, _), n in counted.launches.items():
            by_operator[name] += n
        print(f'\nkernel launches: {sum(by_operator.values())} a {what} of a batch of 2 or more, any size; '
              'by operator:')
        for name, n in by_operator.most_common(args.top):
            print(f'{n:>6}  {name}')
        print('by call site:')
        for (name, site), n in counted.launches.most_common(args.top):
            print(f'{n:>6}  {name:<44} {site}')
    return rows


if __name__ == '__main__':
    main()
