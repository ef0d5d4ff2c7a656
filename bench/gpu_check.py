"""One prepared GPU run: are the Triton kernels right at real sizes, and are they faster?

    python bench/gpu_check.py                   # on a CUDA machine, a few minutes
    python bench/gpu_check.py --wheels DIR      # first installs our small deps from local wheels
    python bench/gpu_check.py --compile         # also torch.compile the fast paths (minutes cold)
    python bench/gpu_check.py --triton-cache DIR  # first loads what an earlier call compiled (packed in its --out)
    python bench/gpu_check.py --precompile 90 --out DIR  # no GPU: the first 3 steps' kernels, for sm_90, into DIR
    TRITON_INTERPRET=1 python bench/gpu_check.py --smoke   # every step, a tiny model, on the CPU (~35 min)

Needs only PyTorch and Triton (plus numpy, easydict; opencv and pillow for the evaluation row; with
``--wheels DIR`` the missing ones come from that folder); it reads nothing from the network. Steps, most
wanted first, each reported even if another fails; once ``--budget-s`` is spent no new step starts:

1. ``bench``: ``bench/bench.py``'s measurements for plain, fast and fast + Triton kernels (training step,
   inference, whole sliding-window evaluation, peak memory), inference and evaluation of the fast
   paths with CUDA graphs (``cuda_graphs=True``) and their training step with them
   (``cuda_graphs_training=True``, NCHW); first, the rows' Triton kernels compiled all at once in the
   compile workers (``compile_ahead``: 1,506 compilations, instead of a shape's candidates at a time);
2. ``kernels``: at the sizes of MSCAN-B at 480x640 (batch 8; the four stages' widths, the MLPs' hidden
   widths): each custom op against PyTorch (relative error of the output and every gradient against
   float32 ``F.conv2d`` + autograd on the same values), and its time against PyTorch's for the same
   work in fp32 NCHW (the plain path), bf16 NHWC (the fast path) and bf16 NCHW, each kernel family
   (``SMMCL_TRITON_DEPTHWISE``: tiles, rows; for the strips in NCHW also bands, the strips along W as
   tensor-core products), with the time the bytes it must move would take at the measured copy
   bandwidth (the floor) and each one's share of that bandwidth; then each weight-gradient
   implementation (gather, taps, rows, bands in NCHW, PyTorch's) per stage, kernel shape and layout, and
   the one ``auto`` picks; then the 5x5's and the MLP's 3x3 + GELU's whole backward with the weight
   gradients summed in its own pass against a pass of their own (``SMMCL_TRITON_WGRAD=fused``); then
   the attention's six strip weight gradients per direction, one fused
   launch (tiles, rows, or bands along W in NCHW) against three ``dwconv_wgrad`` calls
   (``SMMCL_TRITON_STRIP_WGRAD``); then the 1x1 convs' bias gradients as ATen computes them, against
   their floor (the training profile's bf16 reductions); first, all of it compiled at once (the step run
   once untimed inside ``compile_ahead``: 1,587 compilations at these sizes);
3. ``model``: the whole model, fp32, TF32 off, same seeds (anchor sampler, NMF, drop path): the kernels
   against the plain path on logits, each loss term and each gradient (target: 1e-4), also with every
   kernel of the row family forced (``ALL_ROWS``), and with the band kernels for the strips along W and
   the KxK weight gradients (``ALL_BANDS``, NCHW); the kernel paths' passes first compiled at once
   (``compile_ahead``: one candidate a kernel here, which the workers would leave to each launch);
4. ``graphs``: the CUDA-graph replay against the eager forward of the same folded bf16 model, same
   random state (the NMF bases): relative error and argmax agreement of the logits, ms per forward;
   and a few training steps with the recorded forward and backward against eager ones (same seeds):
   the loss terms' difference and ms per step;
5. ``profile``: the top GPU kernels of a training step (the bench's: train.py's iteration) on each path
   (``--profile-paths``; the graphed NCHW fast + kernels step first), of an inference forward and of a
   whole evaluation of 64 images, their GPU time against the wall time of the same calls without the
   profiler (far apart: the host bounds the step), the operators that take the host's time, the device
   time of the kernels each operator launched (which operator an anonymous element-wise kernel serves),
   and the calls that make the host wait for the GPU (PyTorch's sync debug mode);
6. ``brief``: 200 training steps (MSCAN-B, 240x320, batch 4, synthetic data) plain fp32 against fast
   bf16 + kernels, the loss curves compared; the argmax of the plain-trained model, fp32 against bf16;
7. ``tests``: ``tests/test_kernels.py`` and ``tests/test_graphs.py`` on CUDA (tiny edge-case shapes, one
   tile config each);
8. ``sweep`` (last, or alone: ``--only sweep``): every kernel autotuned over its tiles and their
   neighbours in a process of its own (``SMMCL_TRITON_SWEEP=1``); the winner per kernel and shape, marked
   NEW where it is not one of the listed defaults.

Everything is printed as it comes, then one summary for docs/speed.md; with ``--out``
(default ``$OUT`` when set) the log and a JSON of the numbers are written there too, and after each step
Triton's compiled kernels (``bench/triton_cache.py``), which the next call on a fresh machine loads with
``--triton-cache`` instead of compiling them again. A SIGTERM (a device call's time limit, as ``timeout``
sends it) stops the running step; the summary, the JSON (with the bench rows measured so far) and the pack
are still written, and the exit status is 143.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.util
import io
import itertools
import json
import os
import signal
import site
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# wheel project name -> the module it provides: a project the machine already has is left alone
_WHEEL_MODULES = {'easydict': 'easydict', 'opencv_python_headless': 'cv2', 'opencv_python': 'cv2',
                  'pillow': 'PIL', 'numpy': 'numpy', 'tqdm': 'tqdm', 'tensorboardx': 'tensorboardX',
                  'protobuf': 'google.protobuf'}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        return False


def install_wheels(folder: str) -> None:
    """Our small dependencies that are missing, from a local wheel folder (pip picks the wheel that fits
    this Python among several), into a private site dir (no network: ``--no-index``, ``--no-deps``)."""
    target = os.path.join(tempfile.gettempdir(), 'smmcl_site')
    projects = sorted({f.split('-')[0].lower() for f in os.listdir(folder) if f.endswith('.whl')})
    missing = [p for p in projects if not _importable(_WHEEL_MODULES.get(p, p))]
    if missing:
        subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
                        '--upgrade', '--target', target, '--find-links', folder] + missing, check=True)
        site.addsitedir(target)
        _prepend_module_path(target)
    print(f'installed from {folder}: {missing or "nothing missing"}')


def _prepend_module_path(folder: str) -> None:
    """``folder`` first on the module path of the processes this one starts (no empty entry: that would be
    their working directory)."""
    os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [folder, os.environ.get('PYTHONPATH')]))


def use_checkout() -> str:
    """Where ``smmcl`` is imported from: where it is installed, else this checkout as it is, put on the module
    path of this process and of the ones it starts (nothing to build: on the device, pip building the
    package took seconds and needs setuptools' wheel support)."""
    if importlib.util.find_spec('smmcl') is None:
        sys.path.insert(0, REPO)
        _prepend_module_path(REPO)
        return f'this checkout ({REPO})'
    return 'installed'


# --smoke runs every step on the CPU under Triton's interpreter, where each launch is interpreted: a
# training step of MSCAN-T at 64x96 with the kernels takes ~5 minutes there, so the steps' six paths would
# take hours. The smoke model is one block per stage at a quarter of MSCAN-T's widths, with a 64-channel
# decoder, at 64x64: the same code paths (every kernel, both layouts, the graphs' bookkeeping), which is
# what the smoke run checks; the device run uses MSCAN-B at 480x640.
SMOKE_BACKBONE = 'mscan_smoke'
SMOKE_SPEC = dict(embed_dims=(8, 16, 40, 64), depths=(1, 1, 1, 1), drop_path_rate=0.1)


def model_shape(args) -> dict:
    """The whole-model steps' backbone, decoder width and input size (``--smoke``: the smoke model's,
    registered as a backbone here, in the process that names it)."""
    if args.smoke:
        from smmcl.models.mscan import MSCAN_VARIANTS, MSCANSpec
        MSCAN_VARIANTS[SMOKE_BACKBONE] = lambda: MSCANSpec(**SMOKE_SPEC)
        return dict(backbone=SMOKE_BACKBONE, decoder_embed_dim=64, height=64, width=64)
    return dict(backbone='mscan_b', decoder_embed_dim=512, height=480, width=640)


def model_spec(args):
    from smmcl.models.mscan import mscan_spec
    return mscan_spec(model_shape(args)['backbone'])


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('--wheels', help='folder of wheels to install first (easydict, ...)')
    parser.add_argument('--compile', action='store_true', help='also time torch.compile on the fast paths')
    parser.add_argument('--paths', default='', help='comma-separated bench rows to run (default: all), e.g. '
                        'fast+compile,fast+triton+compile with --compile')
    parser.add_argument('--smoke', action='store_true', help='tiny sizes: check this script on the CPU')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--eval-images', type=int, default=400,
                        help='images of the fast evaluation rows (enough to amortise the graphs\' recording); '
                             'the plain row evaluates at most 64')
    parser.add_argument('--iters', type=int, default=20, help='timed training steps / forwards per bench path')
    parser.add_argument('--warmup', type=int, default=5, help='untimed steps before them')
    parser.add_argument('--brief-steps', type=int, default=200, help='training steps of the brief-training check')
    parser.add_argument('--skip', default='',
                        help='comma-separated steps to skip: bench,kernels,model,graphs,profile,brief,tests,sweep')
    parser.add_argument('--profile-paths', default='fast+triton NCHW+graphs,fast+triton,fast,plain',
                        help='comma-separated paths the profile step profiles')
    parser.add_argument('--budget-s', type=float, default=300, help='start no new step after this many seconds')
    parser.add_argument('--deadline-s', type=float, default=520, help='the unit tests stop by then')
    parser.add_argument('--out', default=os.environ.get('OUT'))
    parser.add_argument('--only', default='', help='comma-separated steps to run, the others skipped (e.g. sweep)')
    parser.add_argument('--triton-cache', default='',
                        help="comma-separated folders or files of Triton's compiled kernels that an earlier call wrote "
                             'under --out (triton_cache.*.tar.gz): loaded first, so this call does not compile them '
                             'again (bench/triton_cache.py)')
    parser.add_argument('--precompile', type=int, metavar='SM',
                        help='no GPU needed: compile for this compute capability (90: H100, H200) what the bench, '
                             'kernels and model steps compile ahead, and pack it under --out for the device call\'s '
                             '--triton-cache (run without TRITON_INTERPRET, with the device\'s Triton version)')
    parser.add_argument('--multiprocessors', type=int, default=132,
                        help="with --precompile: the GPU's multiprocessors (132 on the lent H100 and H200)")
    parser.add_argument('--triton-key', metavar='FILE',
                        help="with --precompile: the device Triton's cache key (its output of python -c 'from "
                             "triton.runtime.cache import triton_key; print(triton_key())'), where this Python's "
                             'differs (it hashes the libtriton built for each Python)')
    parser.add_argument('--sweep-worker', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    smmcl_from = use_checkout()
    if args.sweep_worker:
        import torch
        return sweep_worker(args, torch.device('cuda' if torch.cuda.is_available() else 'cpu'))
    if args.wheels:
        install_wheels(args.wheels)
    log_file = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        log_file = open(os.path.join(args.out, 'gpu_check.log'), 'w')
        sys.stdout = Tee(sys.__stdout__, log_file)
    started = time.time()
    results = {}
    skip = set(filter(None, args.skip.split(',')))
    import triton_cache  # bench/triton_cache.py: this script's own folder is first on the module path
    if (args.out or args.triton_cache) and 'TRITON_CACHE_DIR' not in os.environ:
        # a cache of this run's own, so that a pack holds what this run compiled and loaded, nothing older
        os.environ['TRITON_CACHE_DIR'] = tempfile.mkdtemp(prefix='smmcl_triton_cache_')
    import torch
    import triton
    on_gpu = torch.cuda.is_available()
    device = torch.device('cuda' if on_gpu else 'cpu')
    name = torch.cuda.get_device_name(device) if on_gpu else 'CPU'
    from smmcl.kernels.triton_compile import worker_count
    print(f'device {name}; torch {torch.__version__}; triton {triton.__version__}; python {sys.version.split()[0]}; '
          f'smmcl {smmcl_from}; autotuning candidates compiled by {worker_count()} processes '
          '(SMMCL_TRITON_COMPILE_WORKERS)')
    print(f'triton cache key {triton_key_hash()} (a pack compiled elsewhere is found where it matches)')
    results['env'] = dict(device=name, torch=torch.__version__, triton=triton.__version__)
    if args.triton_cache:
        try:
            folder = triton_cache.folder()
            loaded = triton_cache.unpack(args.triton_cache.split(','), folder)
            print(f'triton cache: {loaded} compiled kernels loaded from {args.triton_cache} into {folder}')
        except (OSError, ValueError, tarfile.TarError) as err:  # the run is worth more than the time it saves
            print(f'triton cache: nothing loaded, the kernels are compiled here ({type(err).__name__}: {err})')
    args.started = started
    if args.precompile:
        return precompile(args)
    if not on_gpu and not args.smoke:
        sys.exit('no CUDA device: run with --smoke under TRITON_INTERPRET=1 to check the script on the CPU')
    # Most wanted first, a later step skipped once --budget-s is spent: the fastest paths' rows and the
    # kernels' bandwidth table, then the same-function checks, then the profile; the rest as time allows.
    steps = [('bench', step_bench), ('kernels', step_kernels), ('model', step_model), ('graphs', step_graphs),
             ('profile', step_profile), ('brief', step_brief), ('tests', step_tests), ('sweep', step_sweep)]
    only = set(filter(None, args.only.split(',')))
    # a call stopped at its time limit (SIGTERM, as `timeout` sends it) still ends with the summary, the JSON and
    # the pack of what it compiled
    signal.signal(signal.SIGTERM, _stop)
    args.partial, running = {}, 'set-up'  # running: the step started last
    try:
        for step, fn in steps:
            if step in skip or (only and step not in only):
                continue
            if time.time() - started > args.budget_s:
                print(f'\n[{step}] skipped: {time.time() - started:.0f} s spent (--budget-s {args.budget_s:.0f})')
                continue
            print(f'\n===== {step} ({time.time() - started:.0f} s) =====')
            running = step
            try:
                with tf32_kept():
                    results[step] = fn(args, device)
            except Exception:  # noqa: BLE001 - report and go on to the next step
                traceback.print_exc(file=sys.stdout)
                if _STOPPING:  # a DataLoader's worker stopped by the same SIGTERM, reported before it
                    raise Stopped from None
                results[step] = 'failed'
            finish(args, results, on_gpu)
    except Stopped:
        if not isinstance(results.get(running), dict):  # what it had measured (the bench rows so far), or a mark
            results[running] = args.partial.get(running) or 'stopped'
        print(f'\n[{running}] stopped by SIGTERM after {time.time() - started:.0f} s')
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the wrap-up takes a second: a SIGKILL may follow, not cut it
    summary(results)
    print(f'autotuning: {compile_stats()}')
    print(f'\ntotal {time.time() - started:.0f} s')
    finish(args, results, on_gpu)
    if log_file is not None:
        log_file.close()
    if _STOPPING:
        sys.exit(128 + signal.SIGTERM)


def triton_key_hash() -> str:
    """The start of a hash of Triton's own cache key (its version and the hash of its files), or '?'."""
    try:
        from triton.runtime.cache import triton_key
        return hashlib.sha256(triton_key().encode()).hexdigest()[:16]
    except Exception:  # noqa: BLE001 - another Triton's internals
        return '?'


# the steps --precompile compiles ahead by default, the first three: graphs and profile launch mostly at the
# bench rows' shapes, brief and tests are small, and the sweep tunes on the device
PRECOMPILED = ('bench', 'kernels', 'model')


def precompile(args) -> None:
    """``--precompile SM``: on a machine without a GPU, what the steps of :data:`PRECOMPILED` compile ahead
    (the MSCAN-B passes at the run's sizes; ``--only`` and ``--skip`` select among them), compiled for compute
    capability SM and packed under ``--out``, so that the device call that loads it (``--triton-cache``)
    spends none of its time compiling them.

    The passes run on the CPU with the launches handed over (``compile_ahead``), their arguments and
    constexprs following a GPU of ``--multiprocessors`` (``smmcl.kernels.target.COMPILING_FOR``); the workers
    compile through a driver that only gives the target. Triton files a kernel under a key of its own version
    and files (the libtriton of each Python differs), the kernel's source and specialisation, the options and
    the target: run this with the device's Triton, and where this Python is not the device's, give that
    Triton's key (``--triton-key``). Whether the device found them shows in its log: the same key hash
    in the header, and compile-ahead lines of seconds."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    import bench  # bench/bench.py: this script's own folder is first on the module path
    from smmcl.kernels import target
    from smmcl.kernels.triton_common import INTERPRETED
    from smmcl.kernels.triton_compile import CompileOnlyDriver
    if INTERPRETED or not args.out:
        sys.exit('--precompile compiles for a GPU: run it without TRITON_INTERPRET, with --out')
    if args.triton_key:
        with open(args.triton_key) as f:
            key = f.read().strip()
        triton.runtime.cache.triton_key = lambda: key  # read by get_cache_key at each compilation (and the workers)
    triton.runtime.driver.set_active(CompileOnlyDriver(GPUTarget('cuda', args.precompile, 32)))
    target.COMPILING_FOR = (args.multiprocessors, divmod(args.precompile, 10))
    print(f'precompiling for sm_{args.precompile} ({args.multiprocessors} multiprocessors), triton cache key '
          f'{triton_key_hash()}')
    device = torch.device('cpu')
    selected = (set(filter(None, args.only.split(','))) or set(PRECOMPILED)) - set(args.skip.split(','))
    if 'bench' in selected:
        bench_args, paths = bench_rows(args)
        compile_ahead_of_rows(bench, bench_args, device, paths)
    if 'kernels' in selected:
        compile_ahead_of_step('kernels', step_kernels, args, device)
    if 'model' in selected:
        compile_ahead_of('the model step', model_kernel_passes(model_runner(args, device)))
    save_triton_cache(args.out)
    print(f'\ntotal {time.time() - args.started:.0f} s')


class Stopped(BaseException):
    """SIGTERM: unwinds the running step (a BaseException, so the steps' own ``except Exception`` lets it by)."""


_STOPPING = []  # not empty once a SIGTERM came


def _stop(signum, frame):
    if _STOPPING:  # a second one (to the process and to its group, both signalled) must not cut the wrap-up
        return
    _STOPPING.append(time.time())
    raise Stopped


def finish(args, results, on_gpu) -> None:
    """What a step leaves under ``--out``: the JSON of the numbers so far and Triton's compiled kernels."""
    if not args.out:
        return
    path = os.path.join(args.out, 'gpu_check.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(path + '.tmp', path)
    if on_gpu:
        save_triton_cache(args.out)


_PACKED = {}  # what the last pack held: a step that compiled nothing new is not packed again


def save_triton_cache(out: str) -> None:
    """Packs Triton's compiled kernels into ``out`` for the next call's ``--triton-cache`` (never fails the run)."""
    import triton_cache
    try:
        folder = triton_cache.folder()
        held = triton_cache.entries(folder)
        if _PACKED.get(out) == held:
            return
        packed = triton_cache.pack(folder, out)
        _PACKED[out] = held
    except Exception as err:  # noqa: BLE001 - a full disk, an unreadable entry: the run's results come first
        print(f'triton cache: not packed ({type(err).__name__}: {err})')
        return
    print(f"triton cache: {packed['folders']} entries in {len(packed['files'])} file(s), "
          f"{packed['bytes'] / 2 ** 20:.1f} MiB under {out}" + (f", {packed['left']} left out (no room)"
                                                                if packed['left'] else '')
          + '; the next call loads them with --triton-cache')


# ---- timing helpers ---------------------------------------------------------------------------------

def sync(device):
    if device.type == 'cuda':
        import torch
        torch.cuda.synchronize(device)


_UNTIMED = []  # not empty while a step runs once only to compile ahead: time_ms calls each function once


def time_ms(fn, device, smoke=False):
    """Median milliseconds of ``fn`` (CUDA events through triton.testing.do_bench)."""
    if smoke or device.type != 'cuda' or _UNTIMED:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode='median')


def copy_bandwidth(device, smoke=False) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    import torch
    n = 2 ** 20 if smoke else 2 ** 28
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, smoke)
    return 2 * n * 4 / (ms * 1e-3)


def rel(a, b) -> float:
    import torch
    return (torch.linalg.norm(a.float() - b.float()) / torch.linalg.norm(b.float()).clamp_min(1e-30)).item()


# ---- step 1: kernels at real sizes --------------------------------------------------------------------

def mscan_b_sizes(args):
    """(name, channels, H, W) of MSCAN-B's depthwise work at 480x640, attention and MLP per stage."""
    spec, shape = model_spec(args), model_shape(args)
    h, w = shape['height'], shape['width']
    out = []
    for stage, (dim, ratio) in enumerate(zip(spec.embed_dims, spec.mlp_ratios)):
        sh, sw = h // 2 ** (stage + 2), w // 2 ** (stage + 2)
        out.append((f's{stage + 1} attn', 'attn', dim, sh, sw))
        out.append((f's{stage + 1} mlp', 'mlp', int(dim * ratio), sh, sw))
    return out


def _pieces(kind, c, device, dtype):
    """(name, kernel fn, torch fn, weights) for one work item; weights in float32 (the model's)."""
    import torch
    import torch.nn.functional as F
    from smmcl import kernels
    ops = kernels.load_ops()
    g = torch.Generator(device='cpu').manual_seed(0)

    def param(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()

    def torch_w(t):  # autocast gives PyTorch's convs bf16 weights
        return t.to(dtype)

    if kind == 'attn':
        w5, b5 = param(c, 1, 5, 5), param(c)
        strips = []
        for k in (7, 11, 21):
            strips += [param(c, 1, 1, k), param(c), param(c, 1, k, 1), param(c)]
        return [
            ('dw5x5', lambda x: ops.dwconv2d(x, w5, b5),
             lambda x: F.conv2d(x, torch_w(w5), torch_w(b5), padding=2, groups=c), [w5, b5]),
            ('strips+sum', lambda x: ops.mscan_strip_sum(x, *strips),
             lambda x: kernels.strip_sum_reference(x, [torch_w(p) for p in strips]), strips),
        ]
    # the MLP's as the model runs it: fc1's bias added as the 3x3 loads fc1's output (PyTorch: its own pass);
    # in bf16 that sum is rounded, as the bias add stores it, which the float32 reference does not do
    w3, b3, b1 = param(c, 1, 3, 3), param(c), param(c)
    return [('dw3x3+gelu', lambda x: ops.dwconv2d_gelu(x, w3, b3, b1),
             lambda x: F.gelu(F.conv2d(x + torch_w(b1)[:, None, None], torch_w(w3), torch_w(b3), padding=1, groups=c)),
             [w3, b3, b1])]


def step_kernels(args, device):
    import torch
    if not _UNTIMED:  # its many shapes, dtypes, layouts and kernel families first compiled at once
        compile_ahead_of_step('kernels', step_kernels, args, device)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    bandwidth = copy_bandwidth(device, args.smoke)
    print(f'device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + write); floors below use it')
    n = 1 if args.smoke else args.batch
    cl, nchw = torch.channels_last, torch.contiguous_format
    rows, errors = [], []
    for label, kind, c, h, w in mscan_b_sizes(args):
        for dtype, fmt, fmt_name in ((torch.float32, nchw, 'fp32 NCHW'), (torch.bfloat16, cl, 'bf16 NHWC'),
                                     (torch.bfloat16, nchw, 'bf16 NCHW')):
            for piece, ours, ref, weights in _pieces(kind, c, device, dtype):
                x = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(memory_format=fmt).requires_grad_()
                grad = torch.randn(n, c, h, w, device=device).to(dtype).contiguous(memory_format=fmt)
                # correctness: against float32 PyTorch on the same values (the seed gives the same weights)
                if fmt_name != 'bf16 NCHW':
                    # fp32 NCHW is checked, not timed: one tile config spares its compiles
                    tune = os.environ.pop('SMMCL_TRITON_AUTOTUNE', None)
                    if fmt_name == 'fp32 NCHW':
                        os.environ['SMMCL_TRITON_AUTOTUNE'] = '0'
                    ours_out = ours(x)
                    got = torch.autograd.grad(ours_out, [x] + weights, grad)
                    _, _, ref32, weights32 = [p for p in _pieces(kind, c, device, torch.float32) if p[0] == piece][0]
                    x32 = x.detach().float().requires_grad_()
                    ref_out = ref32(x32)
                    want = torch.autograd.grad(ref_out, [x32] + weights32, grad.float())
                    err = max([rel(ours_out, ref_out)] + [rel(a, b) for a, b in zip(got, want)])
                    errors.append((label, piece, fmt_name, err))
                    del ours_out, got, ref_out, want, x32
                    os.environ.pop('SMMCL_TRITON_AUTOTUNE', None)
                    if tune is not None:
                        os.environ['SMMCL_TRITON_AUTOTUNE'] = tune
                bytes_fwd = 2 * x.numel() * x.element_size()  # read the input, write the output
                bytes_step = 5 * x.numel() * x.element_size()  # + read grad and input, write grad input
                for impl, fn in (('tiles', ours), ('rows', ours), ('bands', ours), ('torch', ref)):
                    if impl != 'torch' and fmt_name == 'fp32 NCHW' and not args.smoke:
                        continue  # the kernels are for the fast path; fp32 NCHW is the plain reference
                    if impl == 'bands' and (piece != 'strips+sum' or 'NCHW' not in fmt_name):
                        continue  # the band kernels: the strips along W in NCHW (elsewhere the rows')
                    with kernel_family(impl):
                        fwd = time_ms(lambda: fn(x), device, args.smoke)
                        step = time_ms(lambda: torch.autograd.grad(fn(x), [x] + weights, grad), device, args.smoke)
                    rows.append(dict(item=label, piece=piece, layout=fmt_name, impl=impl, fwd_ms=fwd,
                                     fwd_bwd_ms=step, floor_fwd_ms=bytes_fwd / bandwidth * 1e3,
                                     floor_fwd_bwd_ms=bytes_step / bandwidth * 1e3))
                del x, grad
    print('\nrelative error vs float32 PyTorch (output and every gradient, worst):')
    for label, piece, fmt_name, err in errors:
        print(f'  {label:<8} {piece:<11} {fmt_name:<9} {err:.1e}')
    print_kernel_table(rows)
    return dict(copy_TBps=bandwidth / 1e12, rows=rows, errors=errors, wgrad=wgrad_table(args, device, bandwidth),
                backward=backward_table(args, device, bandwidth),
                strip_wgrad=strip_wgrad_table(args, device, bandwidth),
                bias_grad=bias_grad_table(args, device, bandwidth),
                residual_tail=residual_tail_table(args, device, bandwidth),
                batch_norm=batch_norm_table(args, device, bandwidth),
                bias_epilogue=bias_epilogue_table(args, device, bandwidth),
                modulation=modulation_table(args, device, bandwidth), nmf=nmf_table(args, device))


@contextlib.contextmanager
def tf32_kept():
    """PyTorch's TF32 switches as they were, restored after: the kernels and model steps turn them off for
    their float32 comparisons, and the steps after them time what train.py runs, with the run's switches."""
    import torch
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def environment(**variables):
    """The environment variables ``variables`` set within (None: left as they are), restored after."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update({name: value for name, value in variables.items() if value is not None})
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def kernel_family(impl):
    """SMMCL_TRITON_DEPTHWISE=impl within (for 'tiles', 'rows' and 'bands'; anything else leaves it as it is),
    and for 'bands' SMMCL_TRITON_STRIP_WGRAD=bands too (the strips' weight gradients along W)."""
    family = impl if impl in ('tiles', 'rows', 'bands') else None
    return environment(SMMCL_TRITON_DEPTHWISE=family, SMMCL_TRITON_STRIP_WGRAD='bands' if impl == 'bands' else None)


# every kernel of the row family: the convs along H, and the row-walked weight gradients
ALL_ROWS = dict(SMMCL_TRITON_DEPTHWISE='rows', SMMCL_TRITON_WGRAD='rows', SMMCL_TRITON_STRIP_WGRAD='rows')
# the band kernels for the strips along W in NCHW (forward, adjoint, weight gradients) and the KxK weight
# gradients in NCHW, the rows elsewhere
ALL_BANDS = dict(SMMCL_TRITON_DEPTHWISE='bands', SMMCL_TRITON_WGRAD='bands', SMMCL_TRITON_STRIP_WGRAD='bands')


def wgrad_table(args, device, bandwidth):
    """ms of each weight-gradient implementation per stage and kernel shape, bf16 in channels_last (the
    eager fast path's) and NCHW (the graphed training step's), the one ``'auto'`` picks, the floor (read
    the gradient and the input once), and the row-walked kernel's relative difference from the gather's
    (the same sums in another order)."""
    import torch
    from smmcl.kernels import triton_dwconv as K
    n = 1 if args.smoke else args.batch
    rows = []
    impls = [i for i in K.WGRAD_IMPLS if i != 'fused']  # 'fused' is the backward's pass: backward_table
    print(f"\nweight gradients, ms: {'':<15} {' '.join(f'{i:>7}' for i in impls)}   floor  auto    "
          f"rows vs gather")
    for label, kind, c, h, w in mscan_b_sizes(args):
        for fmt, fmt_name in ((torch.channels_last, 'bf16 NHWC'), (torch.contiguous_format, 'bf16 NCHW')):
            for kh, kw in (((5, 5), (1, 21), (21, 1)) if kind == 'attn' else ((3, 3),)):
                g = torch.Generator(device='cpu').manual_seed(0)
                x, grad = (torch.randn(n, c, h, w, generator=g).to(device, torch.bfloat16).contiguous(memory_format=fmt)
                           for _ in range(2))
                weight = torch.randn(c, 1, kh, kw, generator=g).to(device)
                times = {impl: time_ms(lambda impl=impl: K.dwconv_wgrad(grad, x, weight, impl=impl), device,
                                       args.smoke) for impl in impls}
                chosen = K.wgrad_choice(grad, x, weight, 'auto')
                diff = rel(K.dwconv_wgrad(grad, x, weight, impl='rows')[0],
                           K.dwconv_wgrad(grad, x, weight, impl='gather')[0])
                floor = 2 * x.numel() * x.element_size() / bandwidth * 1e3
                rows.append(dict(item=label, layout=fmt_name, kernel=f'{kh}x{kw}', floor_ms=floor, auto=chosen,
                                 rel_diff=diff, **times))
                print(f"  {label:<8} {fmt_name:<9} {kh:>2}x{kw:<2} "
                      f"{' '.join(f'{times[i]:7.3f}' for i in impls)} {floor:7.3f}  {chosen:<7} {diff:.1e}")
                del x, grad
    return rows


def backward_table(args, device, bandwidth):
    """ms of the depthwise convs' backward as the blocks run it, per stage, bf16 in channels_last and NCHW:
    the attention's 5x5 (x's gradient and the weight gradients) and the MLP's 3x3 + GELU (fc1's bias added
    as its input is loaded; the GELU's input gradient, x's and the weight gradients). ``fused``: the weight
    gradients summed in the pass that writes the conv's gradient (``SMMCL_TRITON_WGRAD=fused``);
    ``separate``: in a pass of their own, the implementation ``dwconv_wgrad``'s auto picks; the one the
    backward's auto picks; the floor of the fused path (the 5x5 reads the gradient and x and writes x's
    gradient; the 3x3 also writes the GELU's input gradient and reads it back for the adjoint); and the two
    paths' largest relative difference (x's gradient and the weight gradient: the same sums in another
    order; with fc1's bias the fused one takes x + bias as stored)."""
    import torch
    from smmcl.kernels import triton_dwconv as K
    n = 1 if args.smoke else args.batch
    rows = []
    print(f"\ndepthwise backward with its weight gradients, ms: {'':<4} fused separate   floor  auto      rel diff")
    for label, kind, c, h, w in mscan_b_sizes(args):
        for fmt, fmt_name in ((torch.channels_last, 'bf16 NHWC'), (torch.contiguous_format, 'bf16 NCHW')):
            g = torch.Generator(device='cpu').manual_seed(0)
            x, grad = (torch.randn(n, c, h, w, generator=g).to(device, torch.bfloat16).contiguous(memory_format=fmt)
                       for _ in range(2))
            k = 5 if kind == 'attn' else 3
            weight = (torch.randn(c, 1, k, k, generator=g) * 0.2).to(device)
            bias, in_bias = (torch.randn(c, generator=g).to(device) for _ in range(2))
            if kind == 'attn':
                op, flags, maps = 'dwconv', (), 3

                def run(impl):
                    return K.dwconv_backward(grad, x, weight, impl=impl)
            else:
                op, flags, maps = 'dwconv_gelu', (True, True), 5

                def run(impl):
                    return K.dwconv_gelu_backward(grad, x, weight, bias, in_bias, impl=impl)
            separate = K.wgrad_choice(grad, x, weight, 'auto')
            times = {'fused': time_ms(lambda: run('fused'), device, args.smoke),
                     'separate': time_ms(lambda: run(separate), device, args.smoke)}
            chosen = K._backward_wgrad('auto', op, x, weight, flags, run) or 'separate'
            diff = max(rel(a, b) for a, b in list(zip(run('fused'), run(separate)))[:2])
            floor = maps * x.numel() * x.element_size() / bandwidth * 1e3
            rows.append(dict(item=label, layout=fmt_name, kernel=f'{k}x{k}', floor_ms=floor, auto=chosen,
                             separate_wgrad=separate, rel_diff=diff, **times))
            print(f"  {label:<8} {fmt_name:<9} {k}x{k}{'+gelu' if kind == 'mlp' else '     '} "
                  f"{times['fused']:7.3f} {times['separate']:8.3f} {floor:7.3f}  {chosen:<8}  {diff:.1e} "
                  f"(separate: {separate})")
            del x, grad
    return rows


def strip_wgrad_table(args, device, bandwidth=None):
    """ms of an attention module's six strip weight and bias gradients, per direction (the three 1xK
    convs, then the three Kx1), MSCAN-B's stages at their real sizes, bf16 in channels_last and NCHW:
    ``fused`` (one launch per direction), ``rows`` (one launch of the row-walked kernel), ``bands`` (along
    W in NCHW the band kernel's products; elsewhere the row-walked kernel again) and ``separate``
    (three ``dwconv_wgrad`` calls, each with its own ``SMMCL_TRITON_WGRAD=auto`` choice), the one
    ``SMMCL_TRITON_STRIP_WGRAD=auto`` picks, and the largest relative difference of the others from
    ``fused`` (the same sums, perhaps in another order); with ``bandwidth`` (bytes/s) also the floor:
    reading the direction's four distinct maps once."""
    import torch
    from smmcl.kernels import triton_dwconv as K
    n = 1 if args.smoke else args.batch
    lengths = (7, 11, 21)
    rows = []
    print(f"\nstrip weight gradients, ms: {'':<19} {' '.join(f'{i:>8}' for i in K.STRIP_WGRAD_IMPLS)}   floor  "
          f"auto      rel diff")
    for label, kind, c, h, w in mscan_b_sizes(args):
        if kind != 'attn':
            continue
        for fmt, fmt_name in ((torch.channels_last, 'bf16 NHWC'), (torch.contiguous_format, 'bf16 NCHW')):
            g = torch.Generator(device='cpu').manual_seed(0)

            def act():
                return torch.randn(n, c, h, w, generator=g).to(device, torch.bfloat16).contiguous(memory_format=fmt)

            a, grad = act(), act()
            grad_t, t = [act() for _ in lengths], [act() for _ in lengths]  # the backward's other maps
            for direction, grads, xs, shapes in (('1xK', grad_t, [a] * 3, [(1, k) for k in lengths]),
                                                 ('Kx1', [grad] * 3, t, [(k, 1) for k in lengths])):
                along_w = direction == '1xK'
                weights = [torch.randn(c, 1, *s, generator=g).to(device) for s in shapes]

                def packed(impl, grads=grads, xs=xs, weights=weights, along_w=along_w):
                    return K.strip3_wgrad_packed(grads, xs, weights, along_w, impl=impl)

                times = {impl: time_ms(lambda impl=impl: packed(impl), device, args.smoke)
                         for impl in K.STRIP_WGRAD_IMPLS}
                chosen = K.strip_wgrad_choice(grads, xs, weights, along_w, 'auto')
                diff = max(rel(packed(impl), packed('fused')) for impl in K.STRIP_WGRAD_IMPLS if impl != 'fused')
                # 1xK reads grad_t (three maps) and a; Kx1 reads grad and t (three maps)
                floor = 4 * a.numel() * a.element_size() / bandwidth * 1e3 if bandwidth else float('nan')
                rows.append(dict(item=label, layout=fmt_name, direction=direction, auto=chosen, rel_diff=diff,
                                 floor_ms=floor, **times))
                columns = ' '.join(f'{times[i]:8.3f}' for i in K.STRIP_WGRAD_IMPLS)
                print(f"  {label:<8} {fmt_name:<9} {direction}  {columns} {floor:7.3f}  {chosen:<8}  {diff:.1e}")
            del a, grad, grad_t, t
    return rows


def bias_grad_table(args, device, bandwidth):
    """ms of a 1x1 conv's bias add and bias gradient, per stage at the attention's and the MLP's widths,
    channels_last and NCHW, against their floors (the add reads and writes the map, the gradient reads
    it): ``aten`` as ATen runs them for a cuDNN conv (the broadcast ``add_`` after the conv,
    ``grad.sum((0, 2, 3))`` in ``convolution_backward``; bf16), ``triton`` our passes
    (``smmcl.kernels.triton_channel``, what the blocks' ``PointwiseConv`` runs with the kernels on, by
    ``auto``'s choice); and the whole MSCAN-B step's totals: per block four C-wide 1x1 convs (proj_1, conv3,
    proj_2, fc2) and one MLP-wide (fc1), in both branches (the H200 profiles: ~5.1 ms of non-vectorised
    bf16 element-wise kernels per forward, 9.2 ms of bf16 reductions per training step)."""
    import torch
    from smmcl.kernels.triton_channel import bias_add, bias_grad
    n = 1 if args.smoke else args.batch
    depths = model_spec(args).depths
    columns = [f'{layout} {op} {impl}' for layout in ('NHWC', 'NCHW') for op in ('add', 'grad')
               for impl in ('aten', 'triton')]
    rows, totals = [], {}
    print('\nconv bias add and gradient (bf16), ms:' + ' ' * 20 + ''.join(f'{c:>17}' for c in columns)
          + f"{'floor add':>10}{'floor grad':>11}")
    for label, kind, c, h, w in mscan_b_sizes(args):
        times = {}
        for fmt, layout in ((torch.channels_last, 'NHWC'), (torch.contiguous_format, 'NCHW')):
            g = torch.randn(n, c, h, w, device=device).to(torch.bfloat16).contiguous(memory_format=fmt)
            bias = torch.zeros(c, device=device)
            bias16 = bias.to(torch.bfloat16).reshape(1, -1, 1, 1)
            times[f'{layout} add aten'] = time_ms(lambda g=g: g.add_(bias16), device, args.smoke)
            times[f'{layout} add triton'] = time_ms(lambda g=g: bias_add(g, bias, impl='triton'), device, args.smoke)
            times[f'{layout} grad aten'] = time_ms(lambda g=g: g.sum((0, 2, 3)), device, args.smoke)
            times[f'{layout} grad triton'] = time_ms(lambda g=g: bias_grad(g, bias, impl='triton'), device,
                                                     args.smoke)
            floor = g.numel() * g.element_size() / bandwidth * 1e3
            del g
        times.update({'floor add': 2 * floor, 'floor grad': floor})
        rows.append(dict(item=label, **times))
        print(f"  {label:<8} {c:>5} channels {h:>3}x{w:<3}             "
              + ''.join(f'{times[c]:17.3f}' for c in columns) + f"{2 * floor:10.3f}{floor:11.3f}")
        stage = int(label[1]) - 1
        for name, per_call in times.items():
            totals[name] = totals.get(name, 0.0) + 2 * depths[stage] * per_call * (4 if kind == 'attn' else 1)
    print('  whole step (both branches, every block): ' + ', '.join(f'{k} {v:.2f} ms' for k, v in totals.items()))
    return dict(rows=rows, step_ms=totals)


def _stream_width_table(args, title, columns, floors, measure, calls_per_block):
    """A table per stage at the residual stream's width (the attention's), channels_last and NCHW:
    ``measure(c, h, w, fmt, layout)`` gives one layout's ``{column: ms}`` and the ``floors`` (ms, the same
    in both layouts); printed with the whole MSCAN-B step's totals (``calls_per_block`` calls a block, both
    branches)."""
    import torch
    depths = model_spec(args).depths
    width = max(len(c) for c in columns + floors) + 2
    rows, totals = [], {}
    print(f'\n{title}, ms:'.ljust(50) + ''.join(f'{c:>{width}}' for c in columns + floors))
    for label, kind, c, h, w in mscan_b_sizes(args):
        if kind != 'attn':
            continue
        times = {}
        for fmt, layout in ((torch.channels_last, 'NHWC'), (torch.contiguous_format, 'NCHW')):
            times.update(measure(c, h, w, fmt, layout))
        rows.append(dict(item=label, **times))
        print(f"  {label[:2]:<4} {c:>5} channels {h:>3}x{w:<3}".ljust(50)
              + ''.join(f'{times[c]:{width}.3f}' for c in columns + floors))
        for name, per_call in times.items():
            totals[name] = totals.get(name, 0.0) + 2 * depths[int(label[1]) - 1] * calls_per_block * per_call
    print('  whole step (both branches, every block): ' + ', '.join(f'{k} {v:.2f} ms' for k, v in totals.items()))
    return dict(rows=rows, step_ms=totals)


def residual_tail_table(args, device, bandwidth):
    """ms of a training block's two tails forward + backward (x the float32 stream, y the bf16 output of the
    branch's last 1x1 conv without its bias b, f per channel), per stage and layout, against their floors:
    the attention's ``x + ((y + b) + s) * f`` (s its float32 input: forward reads x, y and s and writes
    the sum and the float32 branch the backward keeps, backward reads the gradient and that branch and
    writes y's and s's gradients: 32 bytes an element) and the MLP's ``x + (y + b) * f`` (18). ``aten``:
    the plain fast path's passes (the bias add after the conv, the shortcut's add, autocast's ``addcmul``
    and their backward with the bias sum), ``triton``: ``smmcl::shortcut_residual`` and
    ``smmcl::scaled_residual`` with the bias (the fast path's tails with the kernels on, each summing the
    next BatchNorm's statistics in its pass, which the ATen rows leave to the norm's own pass over the
    sum); and the whole MSCAN-B step's totals (one of each a block, both branches)."""
    import torch
    from smmcl.kernels import load_ops
    ops = load_ops()
    n = 1 if args.smoke else args.batch

    def aten(x, y, f, b, s=None):
        v = y + b.to(y.dtype)[:, None, None]
        return torch.addcmul(x, (v if s is None else v + s).float(), f)

    # the kernels' tails as training runs them: each sums the statistics of the BatchNorm that reads it next
    tails = {'attn aten': aten,
             'attn triton': lambda x, y, f, b, s: ops.shortcut_residual(x, y, f, b, s, stats=True)[0],
             'mlp aten': lambda x, y, f, b, s: aten(x, y, f, b),
             'mlp triton': lambda x, y, f, b, s: ops.scaled_residual(x, y, f, b, stats=True)[0]}

    def measure(c, h, w, fmt, layout):
        x, s = (torch.randn(n, c, h, w, device=device).contiguous(memory_format=fmt).requires_grad_()
                for _ in range(2))
        y = torch.randn(n, c, h, w, device=device).to(torch.bfloat16).contiguous(memory_format=fmt)
        y.requires_grad_()
        f = torch.rand(c, 1, 1, device=device, requires_grad=True)
        b = torch.rand(c, device=device, requires_grad=True)
        grad = torch.randn(n, c, h, w, device=device).contiguous(memory_format=fmt)
        times = {}
        for name, tail in tails.items():
            inputs = (x, y, f, b) + ((s,) if name.startswith('attn') else ())
            times[f'{layout} {name}'] = time_ms(lambda tail=tail, inputs=inputs: torch.autograd.grad(
                tail(x, y, f, b, s), inputs, grad), device, args.smoke)
        floors = {'attn floor': 32, 'mlp floor': 18}  # bytes an element
        return dict(times, **{name: x.numel() * size / bandwidth * 1e3 for name, size in floors.items()})

    columns = [f'{layout} {name}' for layout in ('NHWC', 'NCHW') for name in tails]
    return _stream_width_table(args, 'block tails x + v * f, forward + backward (y bf16)', columns,
                               ['attn floor', 'mlp floor'], measure, 1)


def batch_norm_table(args, device, bandwidth):
    """ms of a training block's two BatchNorms forward + backward under autocast (x the float32 stream), per
    stage and layout, against their floors: the attention's norm1, whose float32 output feeds the
    attention's shortcut and whose bf16 copy proj_1 (forward: x read twice, both written; backward: x and
    both gradients read twice, the stream's gradient from the residual shortcut read, x's written: 34
    bytes an element), and the MLP's norm2, whose copy alone feeds fc1 (26). ``aten``: ``nn.BatchNorm2d``
    and autocast's cast (and the cast's backward, the two gradients' sum, autograd's sum with the
    stream's), ``triton``: ``smmcl::batch_norm_stats`` and ``smmcl::batch_norm_apply`` with the stream
    handed on (``normed_pair``); and the whole MSCAN-B step's totals (one of each a block, both
    branches). (Both sides also time a multiply standing in for the shortcut's use of the stream.)"""
    import torch
    from torch import nn
    from smmcl.kernels import load_ops
    from smmcl.models.mscan import normed_pair
    load_ops()  # normed_pair's ops
    n = 1 if args.smoke else args.batch

    def run(norm, x, g_full, g_low, full, fused):  # one training step of the norm and its copy
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if fused:
                out, low, stream = normed_pair(norm, x, full)
            else:
                out, stream = norm(x), x
                low = out.to(torch.bfloat16)
        outputs, grads = ([out, low], [g_full, g_low]) if full else ([low], [g_low])
        stream = stream * 1.0  # the residual shortcut's use of the stream: its gradient joins x's
        return torch.autograd.grad(outputs + [stream], [x, norm.weight, norm.bias], grads + [g_full])

    def measure(c, h, w, fmt, layout):
        norm = nn.BatchNorm2d(c).to(device).train()
        x = torch.randn(n, c, h, w, device=device).contiguous(memory_format=fmt).requires_grad_()
        g_full = torch.randn(n, c, h, w, device=device).contiguous(memory_format=fmt)
        g_low = g_full.to(torch.bfloat16)
        times = {f'{layout} {name} {impl}': time_ms(lambda full=full, fused=impl == 'triton': run(
            norm, x, g_full, g_low, full, fused), device, args.smoke)
            for name, full in (('norm1', True), ('norm2', False)) for impl in ('aten', 'triton')}
        floors = {'norm1 floor': 34, 'norm2 floor': 26}  # bytes an element
        return dict(times, **{name: x.numel() * size / bandwidth * 1e3 for name, size in floors.items()})

    columns = [f'{layout} {name} {impl}' for layout in ('NHWC', 'NCHW') for name in ('norm1', 'norm2')
               for impl in ('aten', 'triton')]
    return _stream_width_table(args, 'block BatchNorms + the bf16 copy, forward + backward', columns,
                               ['norm1 floor', 'norm2 floor'], measure, 1)


def modulation_table(args, device, bandwidth):
    """ms of one stage's cross-modal modulation forward + backward under autocast, as the encoder runs stages
    2-3 (rgb, x the float32 stage outputs; the results for the next stage's patch embedding and, as their
    concat, for the fusion conv, both read in bf16; the two coefficient MLPs included, the same in both),
    per stage and layout: ``aten`` the fast path's pure-PyTorch passes (``ModulationInputs``,
    ``ModulationTails``, the concat and the casts), ``triton`` with the kernels
    (``smmcl::modulation_inputs``, ``smmcl::modulation`` forward and backward, ``smmcl::pooled_input_grad``);
    against the floor of the element-wise part (per element of one modality: forward, rgb and x read
    twice, the bf16 coefficient concat, both bf16 maps and their concat written; backward, the three bf16
    gradients, rgb and x read, both float32 gradients written, then per modality its gradient, half the
    coefficient concat's and itself read and its gradient written: 64 bytes) and the step's total (both
    modalities, every stage)."""
    import copy
    import torch
    from smmcl.kernels import load_ops
    from smmcl.models.fusion import CrossModalModulation
    from smmcl.models.mscan import use_fused_kernels, use_fused_tails
    load_ops()
    n = 1 if args.smoke else args.batch
    rows, totals = [], {}
    columns = [f'{layout} {impl}' for layout in ('NHWC', 'NCHW') for impl in ('aten', 'triton')] + ['floor']
    print('\ncross-modal modulation, forward + backward (autocast), ms:'.ljust(50)
          + ''.join(f'{c:>14}' for c in columns))
    for label, kind, c, h, w in mscan_b_sizes(args):
        if kind != 'attn':
            continue
        plain = use_fused_tails(CrossModalModulation(c)).to(device)
        modules = {'aten': plain, 'triton': use_fused_kernels(copy.deepcopy(plain))}
        times = {}
        for fmt, layout in ((torch.channels_last, 'NHWC'), (torch.contiguous_format, 'NCHW')):
            rgb, x, g_rgb, g_x = (torch.randn(n, c, h, w, device=device).contiguous(memory_format=fmt)
                                  for _ in range(4))
            rgb.requires_grad_()
            x.requires_grad_()
            g_fuse = torch.cat([g_rgb, g_x], 1)
            for impl, module in modules.items():
                def step(module=module):  # as the encoder's stages 2-3: the next stage's maps and the concat
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        outs = module.modulate(rgb, x, streams=True, fusion=True, for_convs=True)
                        outs = [o.to(torch.bfloat16) for o in outs]  # as the convs that read them cast them
                    return torch.autograd.grad(outs, [rgb, x] + list(module.parameters()),
                                               [g.to(torch.bfloat16) for g in (g_rgb, g_x, g_fuse)])
                times[f'{layout} {impl}'] = time_ms(step, device, args.smoke)
        times['floor'] = n * c * h * w * 64 / bandwidth * 1e3
        rows.append(dict(item=label[:2], **times))
        print(f"  {label[:2]:<4} {c:>5} channels {h:>3}x{w:<3}".ljust(50)
              + ''.join(f'{times[k]:14.3f}' for k in columns))
        for name, ms in times.items():
            totals[name] = totals.get(name, 0.0) + ms
    print('  whole step (every stage): ' + ', '.join(f'{k} {v:.2f} ms' for k, v in totals.items()))
    return dict(rows=rows, step_ms=totals)


def bias_epilogue_table(args, device, bandwidth):
    """ms of proj_1's bias add + GELU and conv3's bias add + product with the gate, forward + backward
    (bf16, after the conv), per stage and layout, against their floors (GELU: the forward reads y and
    writes, the backward reads the gradient and y and writes: 10 bytes an element; the gate: 16, with u
    read twice and its gradient written): ``aten`` the plain path's passes (the broadcast add, then
    ``F.gelu`` or the product; their backward, then the bias sum), ``triton`` ``smmcl::add_channel_bias_gelu``
    and ``smmcl::add_channel_bias_gate``; and the whole MSCAN-B step's totals (one of each a block, both
    branches)."""
    import torch
    import torch.nn.functional as F
    from smmcl.kernels import load_ops
    ops = load_ops()
    n = 1 if args.smoke else args.batch

    def aten_add(y, b):
        return y + b.to(y.dtype)[:, None, None]

    cases = {'gelu aten': lambda y, b, u: F.gelu(aten_add(y, b)), 'gelu triton': lambda y, b, u: ops.add_channel_bias_gelu(y, b),
             'gate aten': lambda y, b, u: aten_add(y, b) * u, 'gate triton': ops.add_channel_bias_gate}

    def measure(c, h, w, fmt, layout):
        y, u = (torch.randn(n, c, h, w, device=device).to(torch.bfloat16).contiguous(memory_format=fmt).requires_grad_()
                for _ in range(2))
        b = torch.rand(c, device=device, requires_grad=True)
        grad = torch.randn(n, c, h, w, device=device).to(torch.bfloat16).contiguous(memory_format=fmt)
        times = {f'{layout} {case}': time_ms(lambda f=f: torch.autograd.grad(f(y, b, u), (y, b, u), grad,
                                                                             allow_unused=True), device, args.smoke)
                 for case, f in cases.items()}
        return dict(times, **{'floor gelu': y.numel() * 10 / bandwidth * 1e3,
                              'floor gate': y.numel() * 16 / bandwidth * 1e3})

    columns = [f'{layout} {case}' for layout in ('NHWC', 'NCHW') for case in cases]
    return _stream_width_table(args, 'bias add + GELU, + gate, forward + backward (bf16)', columns,
                               ['floor gelu', 'floor gate'], measure, 1)


def nmf_table(args, device):
    """ms of the decoder's NMF (float32 by design, TF32 off; 3.2 ms of fp32 GEMMs with 32x32 tiles per H200
    inference forward): its whole eval-mode forward (7 steps, given bases) with ``torch.bmm``, and each of
    its large products as written (``x^T @ bases``: N x R outputs, ``x @ coef``: D x R outputs over a
    reduction of N, the reconstruction ``bases @ coef^T``) and transposed (the same dot products as R x N
    and R x D outputs: cuBLAS picks its tiles by the output's shape). Where the kernels run (a GPU, or the
    interpreter), the same with the kernels' ``smmcl::bmm_tf32x3`` (float32's accuracy on the tensor
    cores): the whole forward, its relative difference to ``torch.bmm``'s, each product (``triton``) and
    what ``auto`` keeps for it."""
    import torch
    from smmcl import kernels
    from smmcl.models.ham_head import NMF2D
    n = 1 if args.smoke else args.batch
    d, (h, w), rank = (64, (8, 12), 64) if args.smoke else (512, (60, 80), 64)  # MSCAN-B: 512 channels at 1/8
    pixels = h * w
    with tf32_kept():
        torch.backends.cuda.matmul.allow_tf32 = False
        x = torch.rand(n, d, pixels, device=device)
        bases = torch.rand(n, d, rank, device=device)
        coef = torch.rand(n, pixels, rank, device=device)
        large = {'x^T @ bases': (x.transpose(1, 2), bases), 'x @ coef': (x, coef),
                 'bases @ coef^T': (bases, coef.transpose(1, 2))}
        products = {
            'x^T @ bases': lambda: torch.bmm(x.transpose(1, 2), bases),
            '(bases^T @ x)^T': lambda: torch.bmm(bases.transpose(1, 2), x).transpose(1, 2),
            'x @ coef': lambda: torch.bmm(x, coef),
            '(coef^T @ x^T)^T': lambda: torch.bmm(coef.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2),
            'bases @ coef^T': lambda: torch.bmm(bases, coef.transpose(1, 2)),
        }
        ours = kernels.available() and kernels.runs_on(x)
        if ours:
            bmm = kernels.load_ops().bmm_tf32x3
            products.update({f'{name} triton': lambda ab=ab: bmm(*ab) for name, ab in large.items()})
        times = {name: time_ms(fn, device, args.smoke) for name, fn in products.items()}
        nmf = NMF2D().eval().to(device)
        nmf.fixed_bases = nmf.draw_bases(n, d, device)
        maps = x.reshape(n, d, h, w)
        times['whole_ms'] = time_ms(lambda: nmf(maps), device, args.smoke)
        if ours:
            from smmcl.kernels import triton_matmul
            plain = nmf(maps)
            nmf.fused_kernels = True
            times['rel_diff'] = rel(nmf(maps), plain)  # the first call also makes auto's choices
            times['whole_tf32x3_ms'] = time_ms(lambda: nmf(maps), device, args.smoke)
            auto = {name: triton_matmul.choice(a, b) for name, (a, b) in large.items()}
    flops = 2 * n * d * pixels * rank  # one large product
    print(f'\nNMF (float32, batch {n}, D {d}, N {pixels}, R {rank}), ms: whole eval forward {times["whole_ms"]:.3f}'
          + (f', with smmcl::bmm_tf32x3 {times["whole_tf32x3_ms"]:.3f} (relative difference {times["rel_diff"]:.1e};'
             f' auto keeps ' + ', '.join(f'{k}: {v}' for k, v in auto.items()) + ')' if ours else '')
          + f' (17 large products: the first coefficients, 7 steps of two, the last, the reconstruction; '
          f'{flops * 17 / 1e9:.1f} GFLOP); each large product ({flops / 1e9:.2f} GFLOP): '
          + ', '.join(f'{k} {v:.3f}' for k, v in times.items() if k in products))
    return dict(times, gflop_per_product=flops / 1e9, **({'auto': auto} if ours else {}))


def print_kernel_table(rows, compact=False):
    """All rows, or (compact) one line per work item: fwd+bwd ms of each (layout, impl) and the floor."""
    if not compact:
        print(f"\n{'item':<8} {'piece':<11} {'layout':<9} {'impl':<6} | {'fwd ms':>7} {'floor':>6} | "
              f"{'fwd+bwd ms':>10} {'floor':>6}")
        for r in rows:
            print(f"{r['item']:<8} {r['piece']:<11} {r['layout']:<9} {r['impl']:<6} | {r['fwd_ms']:>7.3f} "
                  f"{r['floor_fwd_ms']:>6.3f} | {r['fwd_bwd_ms']:>10.3f} {r['floor_fwd_bwd_ms']:>6.3f}")
    columns = [('fp32 NCHW', 'torch'), ('bf16 NHWC', 'torch'), ('bf16 NHWC', 'tiles'), ('bf16 NHWC', 'rows'),
               ('bf16 NCHW', 'torch'), ('bf16 NCHW', 'tiles'), ('bf16 NCHW', 'rows'), ('bf16 NCHW', 'bands')]
    cells, floors = {}, {}
    for r in rows:
        cells[(r['item'], r['piece'], r['layout'], r['impl'])] = (r['fwd_ms'], r['fwd_bwd_ms'])
        if r['layout'].startswith('bf16'):
            floors[(r['item'], r['piece'])] = (r['floor_fwd_ms'], r['floor_fwd_bwd_ms'])
    print('\nms forward / forward+backward (batch 8, 480x640); floor = bf16 bytes at the copy bandwidth')
    print(f"{'item':<8} {'piece':<11} | " + ' | '.join(f"{l.replace(' ', '') + ' ' + i:>15}" for l, i in columns)
          + f" | {'bf16 floor':>15}")
    # totals over the whole MSCAN-B: each stage's block repeats depth times in each of the two branches
    from smmcl.models.mscan import mscan_b
    depths = mscan_b().depths
    totals = {}
    for item, piece in dict.fromkeys((r['item'], r['piece']) for r in rows):
        line = []
        reps = 2 * depths[int(item[1]) - 1]
        for col in columns + [('floor', '')]:
            v = floors.get((item, piece)) if col[0] == 'floor' else cells.get((item, piece) + col)
            line.append(f'{v[0]:5.2f}/{v[1]:6.2f}' if v else f"{'-':>12}")
            if v:
                t = totals.setdefault(col, [0.0, 0.0])
                t[0] += reps * v[0]
                t[1] += reps * v[1]
        print(f'{item:<8} {piece:<11} | ' + ' | '.join(f'{x:>15}' for x in line))
    print('whole MSCAN-B (both branches, all blocks), ms per step fwd/fwd+bwd: ' + '; '.join(
        f'{c[0]} {c[1]} {v[0]:.1f}/{v[1]:.1f}' for c, v in totals.items()))
    print_bandwidth_table(rows)


def print_bandwidth_table(rows):
    """Per work item and bf16 layout, each Triton family's share of the copy bandwidth: the bytes the
    op must move (the floor's) over its time, forward and forward + backward (target: >= 50 %)."""
    print('\n% of the copy bandwidth (bf16 bytes moved / time), forward / forward+backward:')
    print(f"{'item':<8} {'piece':<11} {'layout':<9} | {'tiles':>9} | {'rows':>9} | {'bands':>9} | {'torch':>9}")
    cells = {(r['item'], r['piece'], r['layout'], r['impl']): r for r in rows if r['layout'].startswith('bf16')}
    for item, piece, layout in dict.fromkeys(k[:3] for k in cells):
        line = []
        for impl in ('tiles', 'rows', 'bands', 'torch'):
            r = cells.get((item, piece, layout, impl))
            if r is None:
                line.append('-')
                continue
            line.append(f"{100 * r['floor_fwd_ms'] / r['fwd_ms']:3.0f}/"
                        f"{100 * r['floor_fwd_bwd_ms'] / r['fwd_bwd_ms']:3.0f}")
        print(f'{item:<8} {piece:<11} {layout:<9} | ' + ' | '.join(f'{x:>9}' for x in line))


# ---- step 2: the whole model, kernels vs plain ------------------------------------------------------

def _model_and_batch(args, device, batch):
    import torch
    from smmcl.config import base_config
    from smmcl.models import build_segmentor
    cfg = base_config()
    shape = model_shape(args)
    h, w = shape.pop('height'), shape.pop('width')
    cfg.update(num_classes=14, anchor_sampler='vectorized', **shape)
    # Labels in 32-pixel cells, one stage-4 pixel each. At 480x640 each of the 14 classes covers ~20 of
    # them. The smoke model's stage 4 is 2x2, where random classes rarely leave a class the views an anchor
    # set needs and the contrastive terms would be 0, unchecked: there a checkerboard of two classes, two
    # views each, and two views make a set (the default asks for 5).
    if args.smoke:
        cfg.update(min_views_per_class=2)
    torch.manual_seed(0)
    model = build_segmentor(cfg, with_loss=True).to(device)
    g = torch.Generator().manual_seed(1)
    rgb, x = torch.randn(batch, 3, h, w, generator=g), torch.randn(batch, 3, h, w, generator=g)
    cells = torch.randint(0, 14, (batch, h // 32 + 1, w // 32 + 1), generator=g)
    if args.smoke:
        rows, cols = torch.meshgrid(torch.arange(cells.shape[1]), torch.arange(cells.shape[2]), indexing='ij')
        cells = ((rows + cols) % 2).expand_as(cells)
    label = cells.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :h, :w]
    return cfg, model, rgb.to(device), x.to(device), label.to(device)


# the model step's paths: (name, fast path, kernels, channels_last, environment: the row family forced for
# every kernel)
MODEL_PATHS = (('plain', False, False, None, {}), ('fast', True, False, None, {}),
               ('fast+triton', True, True, None, {}), ('fast+triton NCHW', True, True, False, {}),
               ('fast+triton NCHW rows', True, True, False, ALL_ROWS),
               ('fast+triton NCHW bands', True, True, False, ALL_BANDS))


def step_model(args, device):
    import torch
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    run = model_runner(args, device)
    compile_ahead_of('the model step', model_kernel_passes(run))
    paths = {name: run(*path) for name, *path in MODEL_PATHS}
    out = {}
    # fast alone: the error of channels_last and folding; NCHW + kernels: the kernels' alone
    for other in [name for name in paths if name != 'plain']:
        out.update({f'{other}: {k}': v for k, v in _path_errors(paths['plain'], paths[other]).items()})
    print('fp32, TF32 off: fast path (with and without the Triton kernels) vs plain, relative error '
          '(target <= 1e-4)')
    for k, v in out.items():
        print(f'  {k:<70} {v:.2e}' if isinstance(v, float) else f'  {k:<70} {v}')
    return out


def model_runner(args, device):
    """``run(fast, kernels, layout, env)`` of the model step: a training step (loss terms, gradients) and an
    inference forward (logits) of the same fp32 model on the same batch (2 images, 1 in the smoke run), with
    one tile config a kernel (SMMCL_TRITON_AUTOTUNE=0: correctness only, fewer compiles)."""
    import torch
    from smmcl.engine.precision import for_inference, for_training, memory_format
    cfg, model, rgb, x, label = _model_and_batch(args, device, 1 if args.smoke else 2)

    def run(fast, kernels, layout, env):
        c = copy.deepcopy(cfg)
        c.update(fast_path=fast, triton_kernels=kernels, channels_last=layout)
        m = for_training(copy.deepcopy(model).train(), c)
        fmt = memory_format(c)
        r, xx = rgb.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt)
        with environment(SMMCL_TRITON_AUTOTUNE='0', **env):
            torch.manual_seed(3)
            terms = m(r, xx, label, return_terms=True)
            terms['loss'].backward()
            grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
            inf = for_inference(m, c)
            torch.manual_seed(4)
            with torch.no_grad():
                logits = inf.encode_decode(r, xx)[0]
        return dict(terms={k: v.detach() for k, v in terms.items()}, grads=grads, logits=logits)
    return run


def model_kernel_passes(run):
    """The model step's paths with the kernels, as passes for :func:`compile_ahead_of`: their one candidate a
    kernel, which the compile workers would otherwise leave to each launch."""
    return [lambda p=p: run(*p[1:]) for p in MODEL_PATHS if p[2]]


def _path_errors(p, f):
    """Relative errors of path ``f`` against the plain path ``p``: logits, loss terms, gradients."""
    import torch
    out = {'logits (eval, folded on fast)': rel(f['logits'], p['logits'])}
    for k in p['terms']:
        out[f'loss term {k}'] = rel(f['terms'][k], p['terms'][k])
    # A conv bias followed by BatchNorm has a zero gradient in exact arithmetic: its computed
    # gradient is rounding noise, whose relative error means nothing. Those are counted apart.
    norms = {n: torch.linalg.norm(g.float()).item() for n, g in p['grads'].items()}
    scale = max(norms.values())
    checked = [n for n in p['grads'] if norms[n] > 1e-6 * scale]
    worst = max(checked, key=lambda n: rel(f['grads'][n], p['grads'][n]))
    out[f'worst gradient ({worst})'] = rel(f['grads'][worst], p['grads'][worst])
    flat_p = torch.cat([p['grads'][n].flatten().float() for n in p['grads']])
    flat_f = torch.cat([f['grads'][n].flatten().float() for n in p['grads']])
    out['all gradients as one vector'] = rel(flat_f, flat_p)
    out['gradients checked one by one'] = len(checked)
    out['gradients ~0 in exact arithmetic (norm < 1e-6 x largest), skipped'] = len(p['grads']) - len(checked)
    return out


# ---- step 3: bench.py's numbers on three paths ---------------------------------------------------------

def compile_stats() -> str:
    """What the autotuners' compile workers did in this process (smmcl/kernels/triton_compile.py)."""
    try:
        from smmcl.kernels.triton_compile import STATS
    except ImportError:  # no Triton
        return 'no Triton'
    return (f"{STATS['compiled']} of {STATS['candidates']} candidates compiled by the workers, "
            f"{STATS['wait_s']:.1f} s waited for them")


def bench_arguments(args, **values):
    """``bench/bench.py``'s arguments for the model this run measures (backbone, decoder width, input size)."""
    return argparse.Namespace(**dict(model_shape(args), classes=14, compile=False, cuda_graphs=False, **values))


# The bench step's rows: (label, fast path, Triton kernels, torch.compile, channels_last, CUDA graphs: None,
# 'infer' (the inference and evaluation columns only) or 'train' (the training columns only))
BENCH_PATHS = [('plain', False, False, False, None, None), ('fast', True, False, False, None, None),
               ('fast NCHW', True, False, False, False, None), ('fast+triton', True, True, False, None, None),
               ('fast+graphs', True, False, False, None, 'infer'),
               ('fast+triton+graphs', True, True, False, None, 'infer'),
               ('fast NCHW+graphs', True, False, False, False, 'train'),
               ('fast+triton NCHW+graphs', True, True, False, False, 'train'),
               # the kernels replace PyTorch's depthwise convs, whose NCHW advantage made NCHW the graphed
               # row's layout: with them, channels_last may serve the 1x1 convs better
               ('fast+triton+graphs train', True, True, False, True, 'train')]
COMPILED_PATHS = [('fast+compile', True, False, True, None, None),
                  ('fast+triton+compile', True, True, True, None, None)]


def step_bench(args, device):
    import torch
    import bench  # bench/bench.py: this script's own folder is first on the module path
    bench_args, paths = bench_rows(args)
    original = bench.make_cfg
    rows = args.partial['bench'] = {}  # the rows so far, should the call be stopped in this step
    try:
        with tempfile.TemporaryDirectory() as data_dir, tempfile.TemporaryDirectory() as plain_dir:
            have_eval = True
            try:
                from smmcl.data.synthetic import generate
                # the plain path's evaluation (7 img/s on an H200) on fewer images: nothing to amortise there
                for folder, images in ((data_dir, args.eval_images), (plain_dir, min(64, args.eval_images))):
                    generate('LLRGBD', folder, n_train=1, n_test=2 if args.smoke else images,
                             height=bench_args.height, width=bench_args.width, seed=0)
            except ImportError as err:
                print(f'evaluation row skipped: {err}')
                have_eval = False
            compile_ahead_of_rows(bench, bench_args, device, paths)  # nothing under the interpreter
            for label, fast, kernels, compiled, layout, graphs in paths:
                bench.make_cfg = row_make_cfg(original, kernels, compiled, layout, graphs)
                t0 = time.time()
                nan = float('nan')
                train_ips, train_peak, compile_s, precision = nan, nan, 0.0, 'bf16'
                infer_ips, infer_peak, ev = nan, nan, nan
                if graphs != 'infer':
                    train_ips, train_peak, compile_s, precision = bench.bench_train(bench_args, device, fast)
                if graphs != 'train':
                    infer_ips, infer_peak = bench.bench_infer(bench_args, device, fast)
                    ev = (bench.bench_eval(bench_args, device, fast, data_dir if fast else plain_dir)
                          if have_eval else nan)
                rows[label] = dict(dtype=precision, train=train_ips, infer=infer_ips, eval=ev,
                                   train_peak=train_peak, infer_peak=infer_peak, compile_s=compile_s)
                print(f'{label}: {rows[label]} ({time.time() - t0:.0f} s)')
                print(f'  autotuning so far: {compile_stats()}')
                if args.out and device.type == 'cuda':  # this step may outlast the call: keep what it compiled
                    save_triton_cache(args.out)
                torch.cuda.empty_cache() if device.type == 'cuda' else None
    finally:
        bench.make_cfg = original
    return rows


def bench_rows(args):
    """(``bench/bench.py``'s arguments, the rows of BENCH_PATHS and COMPILED_PATHS) that the bench step runs."""
    bench_args = bench_arguments(args, batch=2 if args.smoke else args.batch, iters=1 if args.smoke else args.iters,
                                 warmup=0 if args.smoke else args.warmup)
    paths = BENCH_PATHS + (COMPILED_PATHS if args.compile else [])
    if args.paths:  # e.g. only the compiled rows, in a call of their own
        paths = [p for p in paths if p[0] in args.paths.split(',')]
    return bench_args, paths


def row_make_cfg(original, kernels, compiled, layout, graphs):
    """``bench.make_cfg`` for a bench row: ``original``'s config with the row's switches (the kernels and
    ``torch.compile`` on the fast path only; ``graphs``: None, 'infer' or 'train', as in BENCH_PATHS)."""
    def make_cfg(a, f):
        cfg = original(a, f)
        cfg.update(triton_kernels=kernels and f, compile=compiled and f, channels_last=layout,
                   cuda_graphs=graphs == 'infer', cuda_graphs_training=graphs == 'train')
        return cfg
    return make_cfg


def compile_ahead_of_rows(bench, bench_args, device, paths) -> None:
    """Compiles every Triton kernel the bench rows with the kernels launch, all at once in the compile
    workers (``smmcl.kernels.triton_compile.compile_ahead``): a training step in each layout those rows
    train in and an inference forward, eager, on throwaway models. The rows' autotuning then finds them
    in Triton's cache, where it would compile a shape's candidates at a time (most of the workers idle)."""
    original = bench.make_cfg
    once = argparse.Namespace(**dict(vars(bench_args), warmup=0, iters=0))  # one step, one forward

    def dry(measure, layout):
        def run():
            bench.make_cfg = row_make_cfg(original, True, False, layout, None)  # eager: no graphs recorded
            try:
                measure(once, device, True)
            finally:
                bench.make_cfg = original
        return run

    rows = [p for p in paths if p[2] and not p[3]]  # the kernels, not compiled (torch.compile has its own)
    passes = [dry(bench.bench_train, layout) for layout in dict.fromkeys(p[4] for p in rows if p[5] != 'infer')]
    passes += [dry(bench.bench_infer, layout) for layout in dict.fromkeys(p[4] for p in rows if p[5] != 'train')]
    compile_ahead_of('the bench rows', passes)


def compile_ahead_of_step(name: str, step, args, device) -> None:
    """Compiles what ``step`` launches all at once (:func:`compile_ahead_of`): the step run once before, each
    timing a single call, its printing dropped."""
    def untimed():
        _UNTIMED.append(True)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                step(args, device)
        finally:
            _UNTIMED.pop()
    compile_ahead_of(f'the {name} step', [untimed])


def compile_ahead_of(what: str, passes) -> None:
    """``smmcl.kernels.triton_compile.compile_ahead(*passes)``, reported (nothing without Triton, nothing run
    under its interpreter). A failure there is reported, and what follows compiles for itself."""
    if not passes or not importlib.util.find_spec('triton'):
        return
    from smmcl.kernels.triton_compile import compile_ahead
    t0 = time.time()
    try:
        stats = compile_ahead(*passes)
    except Exception:  # noqa: BLE001 - only the head start is lost
        print(f'compiling ahead of {what} failed; it compiles for itself:')
        traceback.print_exc(file=sys.stdout)
        return
    print(f'compiled ahead of {what} ({len(passes)} passes): {stats or "no compile workers"} '
          f'({time.time() - t0:.0f} s)')


# ---- step: CUDA graphs against the eager forward ---------------------------------------------------

def step_graphs(args, device):
    """The graph replay of the folded bf16 model (fast, and fast + kernels) against its eager forward:
    same inputs, same random state, so the same NMF bases; and ms per forward of each."""
    import torch
    from smmcl.engine.graphs import EagerRecorder, GraphedInference
    from smmcl.engine.precision import for_inference, mixed_precision
    cfg, model, rgb, x, label = _model_and_batch(args, device, 2 if args.smoke else args.batch)
    out = {}
    for name, kernels in (('fast', False), ('fast+triton', True)):
        c = copy.deepcopy(cfg)
        c.update(fast_path=True, amp=True, triton_kernels=kernels)
        eager = for_inference(model, c)
        graphed = GraphedInference(eager, recorder=None if device.type == 'cuda' else EagerRecorder())
        amp, _ = mixed_precision(c, device)
        r, xx = (t.contiguous(memory_format=torch.channels_last) for t in (rgb, x))

        def run(m, seed):
            torch.manual_seed(seed)
            with torch.no_grad(), amp:
                return m(r, xx)

        t0 = time.time()
        run(graphed, 0)  # warm-up and capture
        capture_s = time.time() - t0
        errors, agree = [], []
        for seed in (1, 2, 3):  # new random bases at every replay
            want, got = run(eager, seed), run(graphed, seed)
            errors.append(rel(got, want))
            agree.append((got.argmax(1) == want.argmax(1)).float().mean().item())
        times = {label: time_ms(lambda m=m: run(m, 0), device, args.smoke) for label, m in
                 (('eager', eager), ('graphed', graphed))}
        out[name] = dict(rel_error=max(errors), argmax_agreement=min(agree), capture_s=capture_s,
                         eager_ms=times['eager'], graphed_ms=times['graphed'],
                         eager_ips=rgb.shape[0] * 1e3 / times['eager'],
                         graphed_ips=rgb.shape[0] * 1e3 / times['graphed'])
        print(f'{name}: graphed vs eager, logits rel error {max(errors):.1e}, argmax equal {100 * min(agree):.3f} %; '
              f"ms per forward of {rgb.shape[0]}: eager {times['eager']:.2f}, graphed {times['graphed']:.2f} "
              f'(capture {capture_s:.1f} s)')
        del eager, graphed
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    out['training'] = _graphed_training(args, device, cfg, model, rgb, x, label)
    return out


def _graphed_training(args, device, cfg, model, rgb, x, label):
    """Training steps of the fast NCHW bf16 path, eager and with cuda_graphs_training, from the same
    weights with the same seeds: the largest relative difference of the loss terms, ms per step."""
    import torch
    from smmcl.engine.precision import for_training, mixed_precision
    steps = 2 if args.smoke else 6
    runs = {}
    for graphs in (False, True):
        c = copy.deepcopy(cfg)
        c.update(fast_path=True, amp=True, channels_last=False, cuda_graphs_training=graphs)
        m = for_training(copy.deepcopy(model).train(), c)
        amp, _ = mixed_precision(c, device)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
        terms, times = [], []
        for step in range(steps):
            torch.manual_seed(step)
            sync(device)
            t0 = time.perf_counter()
            with amp:
                out = m(rgb, x, label, return_terms=True)
            opt.zero_grad(set_to_none=True)
            out['loss'].backward()
            opt.step()
            sync(device)
            times.append(time.perf_counter() - t0)
            terms.append(torch.stack([out[k].detach().float() for k in ('loss', 'ce', 'cm', 'vis', 'aux')]))
        runs[graphs] = (torch.stack(terms), 1e3 * sorted(times[1:])[len(times[1:]) // 2])  # median, first left out
        if graphs:  # what the recording holds: the losses too, or (their capture failed) the model alone
            whole = m.__dict__.get('forward')
            extent = ('forward and losses' if whole is not None and any(whole.recorded.values()) else
                      'encoders and decoder' if 'encode_decode' in m.__dict__ else 'nothing')
            print(f'training graphs recorded: {extent}')
        del m, opt
    diff = ((runs[True][0] - runs[False][0]).abs() / runs[False][0].abs().clamp_min(1e-12)).max().item()
    print(f'training, fast NCHW bf16, {steps} steps: loss terms graphed vs eager, largest relative difference '
          f'{diff:.1e}; ms per step eager {runs[False][1]:.1f}, graphed {runs[True][1]:.1f} (first step, with '
          f'the capture, left out)')
    return dict(rel_diff=diff, eager_ms=runs[False][1], graphed_ms=runs[True][1], steps=steps, extent=extent)


# ---- step: a briefly trained model, bf16 + kernels against plain fp32 -------------------------------

def _synthetic_tensors(args, split_dir, data_dir, device):
    """All items of one split of a synthetic LLRGBD folder as normalised N-3-H-W tensors and N-H-W labels
    (no augmentation: the same batches on both paths)."""
    import torch
    from smmcl.config import base_config, finalize
    from smmcl.data.dataset import RGBXDataset
    from smmcl.engine.evaluate import to_input
    cfg = base_config()
    cfg.update(dataset_name='LLRGBD', dataset_path=data_dir, train_split_dir='train', eval_split_dir=split_dir,
               rgb_folder='rgb', x_folder='depth', gt_folder='label', exp_dir=data_dir)
    cfg = finalize(cfg)
    dataset = RGBXDataset(cfg, 'val')
    items = [dataset[i] for i in range(len(dataset))]
    rgb = torch.stack([to_input(it['data'], cfg.norm_mean, cfg.norm_std, device) for it in items])
    x = torch.stack([to_input(it['modal_x'], cfg.norm_mean, cfg.norm_std, device) for it in items])
    label = torch.stack([torch.as_tensor(it['label']).long() for it in items]).to(device)
    return rgb, x, label


def step_brief(args, device):
    """200 training steps of MSCAN-B (240x320, batch 4) on synthetic data on the plain fp32 path and on
    the fast bf16 path with the kernels, same initial weights, batches and seeds; then the argmax of
    the plain-trained model's logits, plain fp32 against fast bf16 + kernels (target: >= 99 % of pixels)."""
    import torch
    from smmcl.data.synthetic import generate
    from smmcl.engine.optim import build_optimizer
    from smmcl.engine.precision import for_inference, for_training, mixed_precision
    steps, batch = (3, 1) if args.smoke else (args.brief_steps, 4)
    h, w = (32, 48) if args.smoke else (240, 320)
    with tempfile.TemporaryDirectory() as data_dir:
        generate('LLRGBD', data_dir, n_train=8 if args.smoke else 64, n_test=2 if args.smoke else 8,
                 height=h, width=w, seed=0)
        train = _synthetic_tensors(args, 'train', data_dir, device)
        test = _synthetic_tensors(args, 'test', data_dir, device)
    cfg, model, *_ = _model_and_batch(args, device, 1)
    cfg.update(lr=1e-4)
    curves, trained = {}, {}
    for name, fast in (('plain fp32', False), ('fast bf16+triton', True)):
        c = copy.deepcopy(cfg)
        c.update(fast_path=fast, triton_kernels=fast, amp=fast)
        m = for_training(copy.deepcopy(model).train(), c)
        opt = build_optimizer(m, c)
        amp, scaler = mixed_precision(c, device)
        fmt = torch.channels_last if fast else torch.contiguous_format
        losses = []
        t0 = time.time()
        for step in range(steps):
            idx = torch.arange(step * batch, (step + 1) * batch) % train[0].shape[0]
            torch.manual_seed(100 + step)  # same anchors, NMF bases and drop path on both paths
            with amp:
                loss = m(train[0][idx].contiguous(memory_format=fmt), train[1][idx].contiguous(memory_format=fmt),
                         train[2][idx])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.detach())
        curves[name] = torch.stack(losses).float().cpu()
        trained[name] = m
        print(f'  {name}: {steps} steps in {time.time() - t0:.1f} s; loss first {curves[name][0]:.3f}, '
              f'mean of the last 20 {curves[name][-20:].mean():.3f}')
    plain, fast = curves['plain fp32'], curves['fast bf16+triton']
    tail = slice(-20, None)
    noise = plain[tail].std().item() if len(plain) > 1 else float('nan')
    gap = abs(fast[tail].mean() - plain[tail].mean()).item()
    # the argmax of one trained model (plain), inferred both ways with the same NMF seed
    reference = trained['plain fp32']
    c = copy.deepcopy(cfg)
    c.update(fast_path=True, triton_kernels=True, amp=True)
    fast_model = for_inference(copy.deepcopy(reference), c)
    amp, _ = mixed_precision(c, device)
    plain_model = reference.eval()
    with torch.no_grad():
        torch.manual_seed(5)
        want = plain_model.encode_decode(test[0], test[1])[0].argmax(1)
        torch.manual_seed(5)
        with amp:
            got = fast_model.encode_decode(test[0].contiguous(memory_format=torch.channels_last),
                                           test[1].contiguous(memory_format=torch.channels_last))[0].argmax(1)
    agree = (got == want).float().mean().item()
    out = dict(steps=steps, plain_last20=plain[tail].mean().item(), fast_last20=fast[tail].mean().item(),
               plain_last20_std=noise, gap=gap, argmax_agreement=agree,
               plain_curve=plain.tolist()[::10], fast_curve=fast.tolist()[::10])
    print(f'  loss, mean of the last 20 steps: plain {out["plain_last20"]:.4f} +- {noise:.4f} (std), fast '
          f'{out["fast_last20"]:.4f}: gap {gap:.4f} = {gap / noise if noise else float("nan"):.2f} std')
    print(f'  argmax agreement, plain-trained model, fp32 plain vs bf16 fast+triton: {100 * agree:.2f} % '
          f'(target >= 99 %)')
    return out


# ---- step 4: top kernels per path ------------------------------------------------------------------

def count_syncs(fn, device) -> int:
    """The calls of ``fn()`` that make the host wait for the GPU, as PyTorch's sync debug mode reports them
    (a value read on the host, a blocking copy; where each one is: the warnings' stacks, with ``-W error``).
    0 on the CPU."""
    import warnings
    import torch
    if device.type != 'cuda':
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    return sum('synchroniz' in str(w.message) for w in caught)


NO_OPERATOR = '(no host operator: Python between calls, waiting for data)'


def idle_attribution(device_spans, host_spans, window):
    """Where the time the GPU stands idle goes: to the host operator running meanwhile.

    Args:
        device_spans: ``(start, end)`` of every GPU kernel and copy (any unit; they may overlap).
        host_spans: ``(name, start, end)`` of the host's top-level operators on one thread (not
            overlapping each other), in the same unit and clock.
        window: ``(start, end)`` of the calls profiled.
    Returns:
        ``(busy, idle)``: the time at least one GPU span runs, and ``{name: time}`` of the rest of the
        window, each stretch of idle GPU counted to the host operator it overlaps, or to
        :data:`NO_OPERATOR` when none runs (the host in Python, or waiting).
    """
    import bisect
    busy, gaps, cursor = 0.0, [], window[0]
    for start, end in sorted((max(a, window[0]), min(b, window[1])) for a, b in device_spans):
        if end <= max(cursor, start):  # inside what is counted, or outside the window
            continue
        if start > cursor:
            gaps.append((cursor, start))
        busy += end - max(start, cursor)
        cursor = end
    if cursor < window[1]:
        gaps.append((cursor, window[1]))
    host = sorted(host_spans, key=lambda span: span[1])
    ends = [end for _, _, end in host]  # non-overlapping spans sorted by start are sorted by end too
    idle = {}
    for a, b in gaps:
        covered = 0.0
        i = bisect.bisect_right(ends, a)
        while i < len(host) and host[i][1] < b:
            name, start, end = host[i]
            overlap = min(end, b) - max(start, a)
            if overlap > 0:
                idle[name] = idle.get(name, 0.0) + overlap
                covered += overlap
            i += 1
        if b - a - covered > 0:
            idle[NO_OPERATOR] = idle.get(NO_OPERATOR, 0.0) + (b - a - covered)
    return busy, idle


def _print_idle_attribution(prof, steps):
    """:func:`idle_attribution` of a CUDA profile: the GPU's busy and idle ms per call, and the host
    operators (of the thread that made most of them) during which it stood idle."""
    from torch.autograd import DeviceType
    events = prof.events()
    device_spans = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    top = [e for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    if not device_spans or not top:
        return {}
    threads = {}
    for e in top:
        threads[e.thread] = threads.get(e.thread, 0) + 1
    main = max(threads, key=threads.get)
    host_spans = [(e.name, e.time_range.start, e.time_range.end) for e in top if e.thread == main]
    starts = [s for s, _ in device_spans] + [s for _, s, _ in host_spans]
    ends = [e for _, e in device_spans] + [e for _, _, e in host_spans]
    window = (min(starts), max(ends))
    busy, idle = idle_attribution(device_spans, host_spans, window)
    wall = (window[1] - window[0]) / 1e3 / steps
    print(f'  the profiled window, ms per call: {wall:.1f}, GPU busy {busy / 1e3 / steps:.1f}, idle '
          f'{sum(idle.values()) / 1e3 / steps:.1f}; the idle GPU while the host ran:')
    for name, us in sorted(idle.items(), key=lambda kv: kv[1], reverse=True)[:10]:
        print(f'  {us / 1e3 / steps:8.2f} ms  {name[:90]}')
    return dict(window_ms=wall, busy_ms=busy / 1e3 / steps,
                idle_ms={name: us / 1e3 / steps for name, us in idle.items()})


def kernel_label(name: str, width: int = 110) -> str:
    """A CUDA kernel's name without the namespaces and qualifiers that fill its first 100 characters, so
    that a truncated line still shows the functor (an ATen element-wise kernel is named after the loop,
    ``elementwise_kernel<128, 4, gpu_kernel_impl_nocast<...>>``, its operator only further in)."""
    for noise in ('void ', 'at::native::', '(anonymous namespace)::', 'c10::', 'std::', 'at::cuda::', '__nv_'):
        name = name.replace(noise, '')
    return name[:width]


def launching_operators(host_events, steps: int, top: int = 12):
    """[(operator, calls per step, device ms per step)] of the host operators whose own kernels (not their
    children's) take most device time: which ATen operator an anonymous element-wise kernel belongs to."""
    def own(e):
        return getattr(e, 'self_device_time_total', getattr(e, 'self_cuda_time_total', 0.0))
    ranked = sorted((e for e in host_events if own(e) > 0), key=own, reverse=True)[:top]
    return [(e.key, e.count // steps, own(e) / 1e3 / steps) for e in ranked]


def _top_kernels(title, fn, device, steps):
    """Time ``steps`` calls of ``fn``, then profile as many; print and return the wall and device ms per
    call and the 12 kernels with most device time per call (on a GPU, also the host's top operators)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    # wall time without the profiler first: device time well below it means the host is the bottleneck
    sync(device)
    began = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    wall_ms = (time.perf_counter() - began) * 1e3 / steps
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    events = prof.key_averages()
    if device.type == 'cuda':
        host_events = [e for e in events if e.device_type == DeviceType.CPU]
        # the kernels themselves: an operator's row carries its kernels' device time too (counted twice),
        # and a record_function range (the optimizer's step) spans kernels counted on their own
        events = [e for e in events
                  if e.device_type != DeviceType.CPU and not getattr(e, 'is_user_annotation', False)]

    def device_us(e):
        if device.type != 'cuda':
            return e.self_cpu_time_total
        for attr in ('self_device_time_total', 'self_cuda_time_total'):
            if hasattr(e, attr):
                return getattr(e, attr)
        return 0.0

    total = sum(device_us(e) for e in events) or 1.0
    syncs = count_syncs(fn, device)
    # kernels run per call (a replayed graph's each), against bench/traffic.py --launches' count on the CPU
    kernels = sum(e.count for e in events) // steps
    print(f'\n{title}: {total / 1e3 / steps:.1f} ms of device time per call, {wall_ms:.1f} ms wall (no profiler), '
          f'{syncs} synchronizing CUDA calls per call, {kernels} kernels per call; top kernels, ms per call and share')
    out = [('wall ms per call', wall_ms, 1.0), ('device ms per call', total / 1e3 / steps, 1.0),
           ('synchronizing calls per call', syncs, 1.0), ('kernels per call', kernels, 1.0)]
    for e in sorted(events, key=device_us, reverse=True)[:12]:
        ms = device_us(e) / 1e3 / steps
        print(f'  {ms:8.2f} ms {100 * device_us(e) / total:5.1f}%  {kernel_label(e.key)}')
        out.append((e.key, ms, device_us(e) / total))
    if device.type == 'cuda':
        # where the host's time goes (inflated by the profiler itself, so read it as shares)
        host_total = sum(e.self_cpu_time_total for e in host_events) or 1.0
        print(f'  host: {host_total / 1e3 / steps:.1f} ms of self CPU time per call under the profiler; top operators:')
        for e in sorted(host_events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]:
            print(f'  {e.self_cpu_time_total / 1e3 / steps:8.2f} ms {100 * e.self_cpu_time_total / host_total:5.1f}%  '
                  f'x{e.count // steps:<5d} {e.key[:80]}')
        launchers = launching_operators(host_events, steps)
        print('  device time by the operator that launched the kernels (a graph replay counts as one):')
        for key, calls, ms in launchers:
            print(f'  {ms:8.2f} ms  x{calls:<5d} {key[:80]}')
        out.append(('device ms by launching operator', launchers, 1.0))
        try:  # the wall time between the GPU's work, by what the host did meanwhile
            out.append(('idle attribution', _print_idle_attribution(prof, steps), 1.0))
        except Exception as err:  # noqa: BLE001 - an older profiler's events: the table above stands
            print(f'  (no idle attribution: {type(err).__name__}: {err})')
    return out


def step_profile(args, device):
    """Top kernels of a training step (the graphed NCHW fast + kernels step first, then plain, fast, fast
    + kernels eager) and of an inference forward (fast, fast + kernels), batch 8 at 480x640."""
    import torch
    import bench
    from smmcl.engine.precision import for_inference, for_training, mixed_precision
    out = {}
    steps = 1 if args.smoke else 3
    # (name, fast path, Triton kernels, channels_last, training graphs): the graphed row is the bench's
    # fastest training path, NCHW, whose wall time is far above the eager channels_last step's GPU time
    paths = (('plain', False, False, False, False), ('fast', True, False, True, False),
             ('fast+triton', True, True, True, False), ('fast+triton NCHW+graphs', True, True, False, True))
    chosen = [{p[0]: p for p in paths}[name] for name in args.profile_paths.split(',') if name]  # in that order
    for name, fast, kernels, channels_last, graphs in chosen:
        cfg, model, rgb, x, label = _model_and_batch(args, device, 1 if args.smoke else args.batch)
        cfg.update(fast_path=fast, triton_kernels=kernels, amp=fast, channels_last=channels_last if fast else None,
                   cuda_graphs_training=graphs)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        rgb, x = rgb.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt)
        amp, _ = mixed_precision(cfg, device)
        # the bench's step: train.py's iteration, its optimizer and host reads (speed='fast': every 50)
        cfg.update(batch_size=rgb.shape[0], replicas=1, host_sync_every=50 if fast else 1)
        train_model = for_training(copy.deepcopy(model).train(), cfg)
        run_step = bench.training_step(cfg, device, train_model)
        batch = bench.loader_batch(argparse.Namespace(batch=rgb.shape[0], height=rgb.shape[2], width=rgb.shape[3],
                                                      classes=14), device)
        count = itertools.count()

        def step():
            run_step(batch, next(count))

        for _ in range(steps):
            step()
        out[f'train {name}'] = _top_kernels(f'training step, {name}', step, device, steps)
        del train_model, run_step
        if fast and not graphs:
            infer_model = for_inference(model, cfg)

            def infer():
                with torch.no_grad(), amp:
                    infer_model(rgb, x)

            for _ in range(steps):
                infer()
            out[f'infer {name}'] = _top_kernels(f'inference forward, {name}', infer, device, steps)
            del infer_model
            if kernels:  # where a whole evaluation's time goes (the host's operators: its syncs, copies)
                out[f'eval {name}'] = _profile_evaluation(args, device, name)
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return out


def _profile_evaluation(args, device, name):
    """The top kernels and host operators of a whole evaluation (the fast path with the kernels, batch
    8) of 64 synthetic test images at 480x640, its device time against its wall time."""
    import bench
    bench_args = bench_arguments(args, batch=2 if args.smoke else 8)
    original = bench.make_cfg

    def make_cfg(a, f):
        cfg = original(a, f)
        cfg.update(triton_kernels=True)
        return cfg
    bench.make_cfg = make_cfg
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            from smmcl.data.synthetic import generate
            generate('LLRGBD', data_dir, n_train=1, n_test=2 if args.smoke else 64, height=bench_args.height,
                     width=bench_args.width, seed=0)
            run, images = bench.evaluation(bench_args, device, True, data_dir)
            run()  # warm-up: tuning, cuDNN's choices
            return _top_kernels(f'evaluation of {images} images, {name}', run, device, 1)
    finally:
        bench.make_cfg = original


# ---- step 5: the unit tests on CUDA -------------------------------------------------------------------

def step_tests(args, device):
    if args.smoke:
        return 'skipped (--smoke)'
    env = dict(os.environ, SMMCL_TRITON_AUTOTUNE='0', PYTHONUNBUFFERED='1')
    env.pop('TRITON_INTERPRET', None)
    left = max(30.0, args.deadline_s - (time.time() - args.started))
    try:
        proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                               'tests/test_kernels.py', 'tests/test_graphs.py'], cwd=REPO, env=env,
                              capture_output=True, text=True,
                              timeout=left)
    except subprocess.TimeoutExpired as err:
        print((err.stdout or b'').decode(errors='replace')[-3000:] if isinstance(err.stdout, bytes) else err.stdout)
        return f'stopped after {left:.0f} s (--deadline-s)'

    tail = (proc.stdout + proc.stderr).strip().splitlines()
    print('\n'.join(tail[-25:]))
    return tail[-1] if tail else f'exit {proc.returncode}'


# ---- step: tile sweep (a fresh process: the candidates are fixed when the kernels are imported) -------

def step_sweep(args, device):
    """Every kernel autotuned over its tiles and their neighbours (``SMMCL_TRITON_SWEEP=1``) at MSCAN-B's
    stage shapes, bf16, both layouts, forward and backward of each op with both kernel families: the
    winner per kernel and shape, and whether it is one of the listed defaults (those that are not are
    candidates for the lists in ``smmcl/kernels/triton_*.py``)."""
    env = dict(os.environ, SMMCL_TRITON_SWEEP='1', PYTHONUNBUFFERED='1')
    left = max(30.0, args.deadline_s - (time.time() - args.started))
    cmd = [sys.executable, os.path.abspath(__file__), '--sweep-worker', '--batch', str(args.batch)]
    try:
        proc = subprocess.run(cmd + (['--smoke'] if args.smoke else []), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=left)
    except subprocess.TimeoutExpired:
        return f'stopped after {left:.0f} s (--deadline-s)'
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    print('\n'.join(lines[-80:]))
    found = [line[len('SWEEP '):] for line in lines if line.startswith('SWEEP ')]
    return json.loads(found[-1]) if found else f'exit {proc.returncode}'


def sweep_worker(args, device):
    """Run in the sweep's own process: autotune everything once, then print the winners."""
    import torch
    import triton
    from smmcl.kernels import triton_bands, triton_channel, triton_dwconv, triton_matmul, triton_rows
    n = 1 if args.smoke else args.batch
    for label, kind, c, h, w in mscan_b_sizes(args):
        for fmt in (torch.channels_last, torch.contiguous_format):
            g = torch.randn(n, c, h, w, device=device).to(torch.bfloat16).contiguous(memory_format=fmt)
            triton_channel.bias_grad(g, torch.zeros(c, device=device), impl='triton')
            triton_channel.bias_add(g, torch.zeros(c, device=device), impl='triton')
            if kind == 'attn':  # proj_1's GELU and conv3's gate
                for epilogue, gate in (('gelu', None), ('gate', g)):
                    triton_channel.bias_add(g, torch.zeros(c, device=device), 'triton', epilogue, gate)
                    triton_channel.bias_epilogue_grad(g, g, torch.zeros(c, device=device), epilogue, gate, 'triton')
            if kind == 'attn':  # the residual stream's width: the block tails' passes
                stream, factor, bias = g.float(), torch.ones(c, 1, 1, device=device), torch.zeros(c, device=device)
                bn = torch.nn.BatchNorm2d(c).to(device)
                coef = triton_channel.batch_norm_stats(stream, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                       0.1, 1e-5, impl='triton')
                for full in (True, False):  # norm1 (the shortcut's float32 too), norm2
                    triton_channel.batch_norm_apply(stream, coef, torch.bfloat16, full, impl='triton')
                    triton_channel.batch_norm_grad(g, stream if full else None, stream, bn.weight, coef[0], coef[1],
                                                   impl='triton')
                for shortcut in (None, stream):  # the MLP's tail, the attention's with its own shortcut
                    for stats in (True, False):  # with the next norm's sums (training), without (a stage's last)
                        _, branch, _ = triton_channel.scaled_residual(stream, g, factor, bias, shortcut, impl='triton',
                                                                      stats=stats)
                    triton_channel.scaled_residual_grad(stream, g if branch is None else branch, factor, bias,
                                                        None if branch is None else g.dtype, impl='triton')
                for shortcut in (factor, None):  # the attention's affine shortcut, the MLP's add; with the bias
                    triton_channel.residual_pair(g, stream, shortcut, torch.zeros(c, device=device), impl='triton')
                # the stage's cross-modal modulation: its outputs, their backward, its inputs' gradient sums
                spatial, channel = g[:, :1].contiguous(), g[:, :, :1, :1].contiguous()
                triton_channel.modulation(stream, stream, spatial, channel, g.dtype, True, True, impl='triton')
                triton_channel.modulation_grad(g, g, torch.cat([g, g], 1), stream, stream, spatial, channel,
                                               impl='triton')
                stat = stream[:, :, :1, :1].contiguous()
                triton_channel.pooled_input_grad(stream, torch.cat([g, g], 1), c, stream, stat, stat, stat, stat,
                                                 impl='triton')
                triton_channel.modulation_inputs(stream, stream, torch.bfloat16, impl='triton')
            for piece, ours, _, weights in _pieces(kind, c, device, torch.bfloat16):
                x = torch.randn(n, c, h, w, device=device).to(torch.bfloat16).contiguous(memory_format=fmt)
                x.requires_grad_()
                for impl in ('tiles', 'rows') + (('bands',) if fmt == torch.contiguous_format else ()):
                    with kernel_family(impl):
                        torch.autograd.grad(ours(x), [x] + weights, torch.ones_like(x))
        print(f'{label}: tuned', flush=True)
    d, pixels = (64, 96) if args.smoke else (512, 60 * 80)  # the NMF's products (triton_matmul's tiles)
    x, bases, coef = (torch.rand(n, *shape, device=device) for shape in ((d, pixels), (d, 64), (pixels, 64)))
    for a, b in ((x.transpose(1, 2), bases), (x, coef), (bases, coef.transpose(1, 2)), (coef.transpose(1, 2), coef)):
        triton_matmul.bmm(a, b, impl='triton')
    winners, seen = [], set()
    for module in (triton_dwconv, triton_rows, triton_bands, triton_channel, triton_matmul):
        for name, kernel in vars(module).items():
            # triton_dwconv imports the row kernels by name: each kernel once
            if not isinstance(kernel, triton.runtime.Autotuner) or id(kernel) in seen:
                continue
            seen.add(id(kernel))
            # one candidate (the interpreter's) is never timed nor cached: reported as the winner of any shape
            tuned = kernel.cache.items() if kernel.cache else [(('any',), c) for c in kernel.configs[:1]
                                                                if len(kernel.configs) == 1]
            for key, config in tuned:
                tile = dict(config.kwargs, num_warps=config.num_warps)
                winners.append(dict(kernel=name, key=[str(k) for k in key], tile=tile,
                                    listed=getattr(config, 'listed', True)))
                shown = tuple(key)[:len(getattr(kernel, 'keys', key))]  # the key's values, without the dtypes
                print(f"  {name:<28} {str(shown):<34} {tile} {'' if winners[-1]['listed'] else 'NEW'}")
    print('SWEEP ' + json.dumps(dict(winners=winners, new=sum(not w['listed'] for w in winners))))


# ---- summary -----------------------------------------------------------------------------------------

def summary(results):
    print('\n' + '=' * 100 + '\nSUMMARY (for docs/speed.md)')
    env = results.get('env', {})
    print(f"device {env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}")
    kern = results.get('kernels')
    if isinstance(kern, dict):
        print(f"copy bandwidth {kern['copy_TBps']:.2f} TB/s")
        print_kernel_table(kern['rows'], compact=True)
        for r in kern.get('wgrad', []):
            impls = [i for i in ('gather', 'taps', 'rows', 'bands', 'torch') if i in r]
            print(f"wgrad {r['item']:<8} {r.get('layout', '')} {r['kernel']:>5}: "
                  + ' '.join(f"{i} {r[i]:.3f}" for i in impls) + f" ms; floor {r['floor_ms']:.3f}; auto -> {r['auto']}")
        for r in kern.get('backward', []):
            print(f"depthwise backward {r['item']:<8} {r['layout']} {r['kernel']}: fused {r['fused']:.3f}, separate "
                  f"{r['separate']:.3f} ({r['separate_wgrad']}) ms; floor {r['floor_ms']:.3f}; auto -> {r['auto']}")
        for r in kern.get('strip_wgrad', []):
            impls = [i for i in ('fused', 'rows', 'bands', 'separate') if i in r]
            print(f"strip wgrad {r['item']:<8} {r['layout']} {r['direction']}: "
                  + ' '.join(f"{i} {r[i]:.3f}" for i in impls) + f" ms; floor {r['floor_ms']:.3f}; auto -> {r['auto']}")
        if kern.get('nmf'):
            print('NMF, ms: ' + ', '.join(f'{k} {v:.3g}' if isinstance(v, float) else f'{k} {v}'
                                          for k, v in kern['nmf'].items()))
        for key, what in (('bias_grad', 'conv bias add and gradient'), ('residual_tail', 'block tails'),
                          ('batch_norm', 'block BatchNorms'),
                          ('bias_epilogue', 'bias add + GELU, + gate')):
            if kern.get(key):
                print(f'{what}, whole step: ' + ', '.join(f'{k} {v:.2f} ms' for k, v in kern[key]['step_ms'].items()))
        worst = max(kern['errors'], key=lambda e: e[3]) if kern['errors'] else None
        if worst:
            print(f'worst kernel error vs fp32 PyTorch: {worst[3]:.1e} ({worst[0]} {worst[1]} {worst[2]})')
    model = results.get('model')
    if isinstance(model, dict):
        print("whole model, fp32, vs plain: " + ", ".join(
            f'{k.split(" (")[0]} {v:.1e}' for k, v in model.items() if isinstance(v, float)))
    rows = results.get('bench')
    if isinstance(rows, dict) and rows:
        header = (f"{'path':<26} | {'dtype':<5} | {'train img/s':>11} | {'infer img/s':>11} | {'eval img/s':>10} | "
                  f"{'train rsvd GiB':>14} | compile s")
        print(header + '\n' + '-' * len(header))
        for label, r in rows.items():
            print(f"{label:<26} | {r['dtype']:<5} | {r['train']:>11.2f} | {r['infer']:>11.2f} | {r['eval']:>10.2f} | "
                  f"{r['train_peak']:>14.2f} | {r['compile_s']:.1f}")
        trained = {label: r for label, r in rows.items() if r['train'] == r['train']}  # not NaN
        if 'plain' in trained and len(trained) > 1:
            label = max(trained, key=lambda k: trained[k]['train'])
            ratio = trained[label]['train_peak'] / trained['plain']['train_peak']
            print(f"training memory (peak reserved): fastest path {label} {trained[label]['train_peak']:.2f} GiB, "
                  f"plain {trained['plain']['train_peak']:.2f} GiB: {ratio:.2f} of it (target <= 0.5)")
    graphs = results.get('graphs')
    if isinstance(graphs, dict):
        for name, g in graphs.items():
            if name == 'training':
                print(f"CUDA graphs, training fast NCHW bf16: {g['eager_ms']:.1f} -> {g['graphed_ms']:.1f} ms "
                      f"per step; "
                      f"loss terms differ by {g['rel_diff']:.1e} (relative)")
                continue
            print(f"CUDA graphs, {name} bf16 inference: eager {g['eager_ips']:.1f} -> graphed {g['graphed_ips']:.1f} "
                  f"img/s; logits rel error {g['rel_error']:.1e}, argmax equal {100 * g['argmax_agreement']:.3f} %")
    brief = results.get('brief')
    if isinstance(brief, dict):
        print(f"brief training ({brief['steps']} steps, MSCAN-B 240x320, batch 4): loss of the last 20 steps plain "
              f"fp32 {brief['plain_last20']:.4f} +- {brief['plain_last20_std']:.4f}, fast bf16+triton "
              f"{brief['fast_last20']:.4f}; argmax agreement {100 * brief['argmax_agreement']:.2f} %")
    profile = results.get('profile')
    if isinstance(profile, dict):  # per profiled call: wall, GPU time, host waits, where the GPU idles
        for name, rows in profile.items():
            got = {row[0]: row[1] for row in rows} if isinstance(rows, list) else {}
            if 'wall ms per call' not in got:
                continue
            line = (f"profile {name}: wall {got['wall ms per call']:.1f} ms, GPU {got['device ms per call']:.1f} ms, "
                    f"{got.get('synchronizing calls per call', '?')} syncs")
            if got.get('kernels per call'):
                kernels = got['kernels per call']
                line += f", {kernels} kernels ({1e3 * got['device ms per call'] / kernels:.1f} us each)"
            idle = got.get('idle attribution') or {}
            if idle.get('idle_ms'):
                top = sorted(idle['idle_ms'].items(), key=lambda kv: kv[1], reverse=True)[:3]
                line += '; GPU idle during ' + ', '.join(f'{what[:50]} {ms:.1f} ms' for what, ms in top)
            launchers = got.get('device ms by launching operator') or []
            if launchers:
                line += '; GPU time of ' + ', '.join(f'{key[:40]} {ms:.1f} ms' for key, _, ms in launchers[:4])
            print(line)
    sweep = results.get('sweep')
    if isinstance(sweep, dict):
        print(f"tile sweep: {len(sweep['winners'])} (kernel, shape) winners, {sweep['new']} not among the listed tiles")
    for step in ('bench', 'graphs', 'model', 'kernels', 'brief', 'profile', 'tests', 'sweep'):
        if results.get(step) in ('failed', 'stopped'):
            print(f"step {step}: {'FAILED (traceback above)' if results[step] == 'failed' else 'stopped (SIGTERM)'}")
    if 'tests' in results and results['tests'] not in ('failed', 'stopped'):
        print(f"kernel tests on CUDA: {results['tests']}")


if __name__ == '__main__':
    with contextlib.suppress(KeyboardInterrupt):
        main()
