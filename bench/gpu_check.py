"""One prepared GPU run for issue 10: are the Triton kernels right at real sizes, and are they faster?

    python bench/gpu_check.py                   # on a CUDA machine, a few minutes
    python bench/gpu_check.py --wheels DIR      # first installs our small deps from local wheels
    python bench/gpu_check.py --compile         # also torch.compile the fast paths (minutes cold)
    TRITON_INTERPRET=1 python bench/gpu_check.py --smoke   # the script itself, tiny, on the CPU

Needs only PyTorch and Triton (plus numpy, easydict; opencv and pillow for the evaluation row); it
reads nothing from the network. Steps, each reported even if a later one fails:

1. kernels at the sizes of MSCAN-B at 480x640 (batch 8; the four stages' widths, the MLPs' hidden
   widths): each custom op against PyTorch (relative error of the output and every gradient against
   float32 ``F.conv2d`` + autograd on the same values), and its time against PyTorch's for the same
   work in fp32 NCHW (the plain path), bf16 NHWC (the fast path) and bf16 NCHW, with the time the
   bytes it must move would take at the measured copy bandwidth (the floor);
2. ``bench/bench.py``'s measurements for plain, fast and fast + Triton kernels (training step,
   inference, whole sliding-window evaluation, peak memory);
3. the whole model, fp32, TF32 off, same seeds (anchor sampler, NMF, drop path): the kernels against
   the plain path on logits, each loss term and each gradient (issue target: 1e-4);
4. the top GPU kernels of a training step on each path (torch.profiler);
5. ``tests/test_kernels.py`` on CUDA (tiny edge-case shapes, one tile config each).

Everything is printed as it comes, then one summary for the README's speed section; with ``--out``
(default ``$OUT`` when set) the log and a JSON of the numbers are written there too.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import os
import site
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install_wheels(folder: str) -> None:
    """Our small dependencies from a local wheel folder, and this repository's package when it is not
    installed, into a private site dir (no network: ``--no-deps``, no build isolation)."""
    target = os.path.join(tempfile.gettempdir(), 'smmcl_site')
    wheels = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith('.whl')]
    if importlib.util.find_spec('smmcl') is None:
        wheels.append(REPO)
    if wheels:
        subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
                        '--no-build-isolation', '--upgrade', '--target', target] + wheels, check=True)
        site.addsitedir(target)
        os.environ['PYTHONPATH'] = target + os.pathsep + os.environ.get('PYTHONPATH', '')
    print(f'installed {len(wheels)} package(s) from {folder}')


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
    parser.add_argument('--smoke', action='store_true', help='tiny sizes: check this script on the CPU')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--eval-images', type=int, default=120)
    parser.add_argument('--skip', default='', help='comma-separated steps to skip: kernels,model,bench,profile,tests')
    parser.add_argument('--budget-s', type=float, default=300, help='start no new step after this many seconds')
    parser.add_argument('--deadline-s', type=float, default=520, help='the unit tests stop by then')
    parser.add_argument('--out', default=os.environ.get('OUT'))
    args = parser.parse_args(argv)
    if args.wheels:
        install_wheels(args.wheels)
    if importlib.util.find_spec('smmcl') is None:
        sys.exit('gpu_check: the smmcl package is not importable: `pip install -e .` in the repository, '
                 'or pass --wheels DIR (it installs the package from this checkout too)')
    log_file = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        log_file = open(os.path.join(args.out, 'gpu_check.log'), 'w')
        sys.stdout = Tee(sys.__stdout__, log_file)
    started = time.time()
    results = {}
    skip = set(filter(None, args.skip.split(',')))
    import torch
    import triton
    on_gpu = torch.cuda.is_available()
    device = torch.device('cuda' if on_gpu else 'cpu')
    name = torch.cuda.get_device_name(device) if on_gpu else 'CPU'
    print(f'device {name}; torch {torch.__version__}; triton {triton.__version__}; python {sys.version.split()[0]}')
    results['env'] = dict(device=name, torch=torch.__version__, triton=triton.__version__)
    if not on_gpu and not args.smoke:
        sys.exit('no CUDA device: run with --smoke under TRITON_INTERPRET=1 to check the script on the CPU')
    args.started = started
    steps = [('kernels', step_kernels), ('bench', step_bench), ('model', step_model),
             ('profile', step_profile), ('tests', step_tests)]
    for step, fn in steps:
        if step in skip:
            continue
        if time.time() - started > args.budget_s:
            print(f'\n[{step}] skipped: {time.time() - started:.0f} s spent (--budget-s {args.budget_s:.0f})')
            continue
        print(f'\n===== {step} ({time.time() - started:.0f} s) =====')
        try:
            results[step] = fn(args, device)
        except Exception:  # noqa: BLE001 - report and go on to the next step
            traceback.print_exc(file=sys.stdout)
            results[step] = 'failed'
    summary(results)
    print(f'\ntotal {time.time() - started:.0f} s')
    if args.out:
        with open(os.path.join(args.out, 'gpu_check.json'), 'w') as f:
            json.dump(results, f, indent=1, default=str)
        log_file.close()


# ---- timing helpers ---------------------------------------------------------------------------------

def sync(device):
    if device.type == 'cuda':
        import torch
        torch.cuda.synchronize(device)


def time_ms(fn, device, smoke=False):
    """Median milliseconds of ``fn`` (CUDA events through triton.testing.do_bench)."""
    if smoke or device.type != 'cuda':
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
    from smmcl.models.mscan import mscan_b, mscan_t
    spec = mscan_t() if args.smoke else mscan_b()
    h, w = (64, 96) if args.smoke else (480, 640)
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
    w3, b3 = param(c, 1, 3, 3), param(c)
    return [('dw3x3+gelu', lambda x: ops.dwconv2d_gelu(x, w3, b3),
             lambda x: F.gelu(F.conv2d(x, torch_w(w3), torch_w(b3), padding=1, groups=c)), [w3, b3])]


def step_kernels(args, device):
    import torch
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
                for impl, fn in (('triton', ours), ('torch', ref)):
                    if impl == 'triton' and fmt_name == 'fp32 NCHW' and not args.smoke:
                        continue  # the kernels are for the fast path; fp32 NCHW is the plain reference
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
    return dict(copy_TBps=bandwidth / 1e12, rows=rows, errors=errors)


def print_kernel_table(rows, compact=False):
    """All rows, or (compact) one line per work item: fwd+bwd ms of each (layout, impl) and the floor."""
    if not compact:
        print(f"\n{'item':<8} {'piece':<11} {'layout':<9} {'impl':<6} | {'fwd ms':>7} {'floor':>6} | "
              f"{'fwd+bwd ms':>10} {'floor':>6}")
        for r in rows:
            print(f"{r['item']:<8} {r['piece']:<11} {r['layout']:<9} {r['impl']:<6} | {r['fwd_ms']:>7.3f} "
                  f"{r['floor_fwd_ms']:>6.3f} | {r['fwd_bwd_ms']:>10.3f} {r['floor_fwd_bwd_ms']:>6.3f}")
    columns = [('fp32 NCHW', 'torch'), ('bf16 NHWC', 'torch'), ('bf16 NHWC', 'triton'), ('bf16 NCHW', 'torch'),
               ('bf16 NCHW', 'triton')]
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


# ---- step 2: the whole model, kernels vs plain ------------------------------------------------------

def _model_and_batch(args, device, batch):
    import torch
    from smmcl.config import base_config
    from smmcl.models import build_segmentor
    cfg = base_config()
    cfg.update(backbone='mscan_t' if args.smoke else 'mscan_b', num_classes=14, anchor_sampler='vectorized')
    torch.manual_seed(0)
    model = build_segmentor(cfg, with_loss=True).to(device)
    h, w = (64, 96) if args.smoke else (480, 640)
    g = torch.Generator().manual_seed(1)
    rgb, x = torch.randn(batch, 3, h, w, generator=g), torch.randn(batch, 3, h, w, generator=g)
    cells = torch.randint(0, 14, (batch, h // 32 + 1, w // 32 + 1), generator=g)
    label = cells.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :h, :w]
    return cfg, model, rgb.to(device), x.to(device), label.to(device)


def step_model(args, device):
    import torch
    from smmcl.engine.precision import for_inference, for_training
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    os.environ['SMMCL_TRITON_AUTOTUNE'] = '0'  # correctness only: one tile config, fewer compiles
    try:
        cfg, model, rgb, x, label = _model_and_batch(args, device, 1 if args.smoke else 2)
        paths = {}
        for name, fast, kernels in (('plain', False, False), ('fast+triton', True, True)):
            c = copy.deepcopy(cfg)
            c.update(fast_path=fast, triton_kernels=kernels)
            m = for_training(copy.deepcopy(model).train(), c)
            fmt = torch.channels_last if fast else torch.contiguous_format
            r, xx = rgb.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt)
            torch.manual_seed(3)
            terms = m(r, xx, label, return_terms=True)
            terms['loss'].backward()
            grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
            inf = for_inference(m, c)
            torch.manual_seed(4)
            with torch.no_grad():
                logits = inf.encode_decode(r, xx)[0]
            paths[name] = dict(terms={k: v.detach() for k, v in terms.items()}, grads=grads, logits=logits)
            del m, inf
        p, f = paths['plain'], paths['fast+triton']
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
        print('fp32, TF32 off: fast path + Triton kernels vs plain, relative error (target <= 1e-4)')
        for k, v in out.items():
            print(f'  {k:<60} {v:.2e}' if isinstance(v, float) else f'  {k:<60} {v}')
        return out
    finally:
        os.environ.pop('SMMCL_TRITON_AUTOTUNE', None)


# ---- step 3: bench.py's numbers on three paths ---------------------------------------------------------

def step_bench(args, device):
    import torch
    import bench  # bench/bench.py: this script's own folder is first on the module path
    bench_args = argparse.Namespace(
        backbone='mscan_t' if args.smoke else 'mscan_b', batch=1 if args.smoke else args.batch,
        height=32 if args.smoke else 480, width=32 if args.smoke else 640, classes=14,
        iters=1 if args.smoke else 20, warmup=0 if args.smoke else 5, compile=False)
    original = bench.make_cfg
    rows = {}
    paths = [('plain', False, False, False), ('fast', True, False, False), ('fast+triton', True, True, False)]
    if args.compile:
        paths += [('fast+compile', True, False, True), ('fast+triton+compile', True, True, True)]
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            have_eval = True
            try:
                from smmcl.data.synthetic import generate
                generate('LLRGBD', data_dir, n_train=1, n_test=2 if args.smoke else args.eval_images,
                         height=bench_args.height, width=bench_args.width, seed=0)
            except ImportError as err:
                print(f'evaluation row skipped: {err}')
                have_eval = False
            for label, fast, kernels, compiled in paths:
                def make_cfg(a, f, kernels=kernels, compiled=compiled):
                    cfg = original(a, f)
                    cfg.update(triton_kernels=kernels and f, compile=compiled and f)
                    return cfg
                bench.make_cfg = make_cfg
                t0 = time.time()
                train_ips, train_peak, compile_s, precision = bench.bench_train(bench_args, device, fast)
                infer_ips, infer_peak = bench.bench_infer(bench_args, device, fast)
                ev = bench.bench_eval(bench_args, device, fast, data_dir) if have_eval else float('nan')
                rows[label] = dict(dtype=precision, train=train_ips, infer=infer_ips, eval=ev,
                                   train_peak=train_peak, infer_peak=infer_peak, compile_s=compile_s)
                print(f'{label}: {rows[label]} ({time.time() - t0:.0f} s)')
                torch.cuda.empty_cache() if device.type == 'cuda' else None
    finally:
        bench.make_cfg = original
    return rows


# ---- step 4: top kernels per path ------------------------------------------------------------------

def step_profile(args, device):
    import torch
    from torch.profiler import ProfilerActivity, profile
    from smmcl.engine.precision import for_training, mixed_precision
    out = {}
    for name, fast, kernels in (('plain', False, False), ('fast', True, False), ('fast+triton', True, True)):
        cfg, model, rgb, x, label = _model_and_batch(args, device, 1 if args.smoke else args.batch)
        cfg.update(fast_path=fast, triton_kernels=kernels, amp=fast)
        model = for_training(model.train(), cfg)
        fmt = torch.channels_last if fast else torch.contiguous_format
        rgb, x = rgb.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt)
        amp, scaler = mixed_precision(cfg, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            with amp:
                loss = model(rgb, x, label)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        for _ in range(1 if args.smoke else 3):
            step()
        sync(device)
        steps = 1 if args.smoke else 3
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync(device)
        events = prof.key_averages()

        def device_us(e):
            for attr in ('self_device_time_total', 'self_cuda_time_total', 'self_cpu_time_total'):
                if hasattr(e, attr):
                    return getattr(e, attr)
            return 0.0

        total = sum(device_us(e) for e in events) or 1.0
        top = sorted(events, key=device_us, reverse=True)[:10]
        print(f'\n{name}: top kernels, ms per step and share of device time')
        out[name] = []
        for e in top:
            ms = device_us(e) / 1e3 / steps
            print(f'  {ms:8.2f} ms {100 * device_us(e) / total:5.1f}%  {e.key[:90]}')
            out[name].append((e.key, ms, device_us(e) / total))
        del model, opt
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return out


# ---- step 5: the unit tests on CUDA -------------------------------------------------------------------

def step_tests(args, device):
    if args.smoke:
        return 'skipped (--smoke)'
    env = dict(os.environ, SMMCL_TRITON_AUTOTUNE='0', PYTHONUNBUFFERED='1')
    env.pop('TRITON_INTERPRET', None)
    left = max(30.0, args.deadline_s - (time.time() - args.started))
    try:
        proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                               'tests/test_kernels.py'], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=left)
    except subprocess.TimeoutExpired as err:
        print((err.stdout or b'').decode(errors='replace')[-3000:] if isinstance(err.stdout, bytes) else err.stdout)
        return f'stopped after {left:.0f} s (--deadline-s)'

    tail = (proc.stdout + proc.stderr).strip().splitlines()
    print('\n'.join(tail[-25:]))
    return tail[-1] if tail else f'exit {proc.returncode}'


# ---- summary -----------------------------------------------------------------------------------------

def summary(results):
    print('\n' + '=' * 100 + '\nSUMMARY (for the README speed section)')
    env = results.get('env', {})
    print(f"device {env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}")
    kern = results.get('kernels')
    if isinstance(kern, dict):
        print(f"copy bandwidth {kern['copy_TBps']:.2f} TB/s")
        print_kernel_table(kern['rows'], compact=True)
        worst = max(kern['errors'], key=lambda e: e[3]) if kern['errors'] else None
        if worst:
            print(f'worst kernel error vs fp32 PyTorch: {worst[3]:.1e} ({worst[0]} {worst[1]} {worst[2]})')
    model = results.get('model')
    if isinstance(model, dict):
        print('whole model, fp32 fast+triton vs plain: ' + ', '.join(
            f'{k.split(" (")[0]} {v:.1e}' for k, v in model.items() if isinstance(v, float)))
    rows = results.get('bench')
    if isinstance(rows, dict) and rows:
        header = (f"{'path':<20} | {'dtype':<5} | {'train img/s':>11} | {'infer img/s':>11} | {'eval img/s':>10} | "
                  f"{'train peak GiB':>14} | compile s")
        print(header + '\n' + '-' * len(header))
        for label, r in rows.items():
            print(f"{label:<20} | {r['dtype']:<5} | {r['train']:>11.2f} | {r['infer']:>11.2f} | {r['eval']:>10.2f} | "
                  f"{r['train_peak']:>14.2f} | {r['compile_s']:.1f}")
    for step in ('kernels', 'model', 'bench', 'profile', 'tests'):
        if results.get(step) == 'failed':
            print(f'step {step}: FAILED (traceback above)')
    if 'tests' in results and results['tests'] != 'failed':
        print(f"kernel tests on CUDA: {results['tests']}")


if __name__ == '__main__':
    with contextlib.suppress(KeyboardInterrupt):
        main()
