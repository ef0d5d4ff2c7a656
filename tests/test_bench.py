"""bench/bench.py times train.py's own iteration (the device runs' payload: a crash there costs device time)."""
import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import bench_script, run_compile_only
from smmcl.config import REPO_ROOT
from smmcl.engine.precision import for_training
from smmcl.models import build_segmentor

needs_ptxas = pytest.mark.skipif(importlib.util.find_spec('triton') is None,
                                 reason='needs Triton (its ptxas and cuobjdump)')


def sass(*options, timeout=600):
    """bench/sass.py's table for ``options``, compiled for sm_90 as the device compiles (FP fusion on, never
    the interpreter), each line split into its fields."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['TRITON_DEFAULT_FP_FUSION'] = '1'
    out = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'bench', 'sass.py'), *options],
                         capture_output=True, text=True, env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return [line.split() for line in out.stdout.splitlines()]


@pytest.fixture(scope='module')
def bench():
    return bench_script('bench')


ARGS = argparse.Namespace(backbone='mscan_t', batch=2, height=64, width=96, classes=14, iters=1, warmup=0,
                          compile=False, cuda_graphs=False)


@pytest.mark.parametrize('fast', [False, True])
def test_the_training_row_runs_train_step_with_train_pys_optimizer(bench, fast, monkeypatch):
    """The row's step is :func:`smmcl.engine.train.train_step` on a batch in the loader's format, with
    the optimizer train.py builds (fused AdamW for the fast rows' ``host_sync_every=50``), and it
    trains: the weights move, the loss terms are finite. The fast step reads the host once (the eager
    sampler's anchor plan; the training graphs on a GPU remove it), the plain one every step (its
    step decision, the authors' loop sampler)."""
    import smmcl.engine.train as train_module
    cfg = bench.make_cfg(ARGS, fast)
    torch.manual_seed(0)
    model = for_training(build_segmentor(cfg, with_loss=True).train(), cfg)
    step = bench.training_step(cfg, torch.device('cpu'), model)
    batch = bench.loader_batch(ARGS, torch.device('cpu'))
    assert batch['data'].dtype == torch.uint8 and batch['label'].shape == (2, 64, 96)
    assert batch['valid_box'].tolist() == [[0, 64, 0, 96]] * 2
    before = [p.detach().clone() for p in model.parameters()]
    reads = []
    for name in ('item', 'tolist', '__bool__'):
        method = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, m=method, **k: reads.append(1) or m(t, *a, **k))
    seen = {}
    monkeypatch.setattr(train_module, 'step_unless_nonfinite',
                        lambda opt, finite, f=train_module.step_unless_nonfinite: seen.setdefault('opt', opt)
                        and f(opt, finite))
    terms = step(batch, 0)
    monkeypatch.undo()
    assert terms.shape == (1, 5) and torch.isfinite(terms).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if fast:
        assert seen['opt'].defaults['fused'] and len(reads) == 1
    else:
        assert 'opt' not in seen and len(reads) > 1


def test_the_kernels_rows_are_compiled_ahead_by_a_step_per_layout_they_train_in_and_a_forward(monkeypatch, capsys):
    """gpu_check's bench step first compiles what its rows with the Triton kernels launch, in one
    ``compile_ahead``: bench.py's own training step (one, no warm-up) in each layout those rows train in
    and its inference forward, each with the kernels; bench.py's config is its own again afterwards."""
    pytest.importorskip('triton')
    from easydict import EasyDict
    from smmcl.kernels import triton_compile
    gpu_check = bench_script('gpu_check')
    calls = []

    def make_cfg(args, fast):
        return EasyDict(fast_path=fast, triton_kernels=False, channels_last='config')

    def measure(job):
        def run(args, device, fast):
            cfg = fake.make_cfg(args, fast)
            calls.append((job, cfg.triton_kernels and cfg.fast_path, cfg.channels_last, args.iters, args.warmup))
        return run
    fake = SimpleNamespace(make_cfg=make_cfg, bench_train=measure('train'), bench_infer=measure('infer'))
    monkeypatch.setattr(triton_compile, 'compile_ahead',
                        lambda *passes: [run() for run in passes] and dict(compilations=3, compiled=3, seconds=1.0))
    args = gpu_check.bench_arguments(SimpleNamespace(smoke=True), batch=2, iters=5, warmup=2)
    gpu_check.compile_ahead_of_rows(fake, args, torch.device('cpu'), gpu_check.BENCH_PATHS + gpu_check.COMPILED_PATHS)
    assert calls == [('train', True, None, 0, 0), ('train', True, False, 0, 0), ('train', True, True, 0, 0),
                     ('infer', True, None, 0, 0)]
    assert fake.make_cfg is make_cfg and "{'compilations': 3, 'compiled': 3" in capsys.readouterr().out
    calls.clear()
    gpu_check.compile_ahead_of_rows(fake, args, torch.device('cpu'), [p for p in gpu_check.BENCH_PATHS if not p[2]])
    assert calls == []  # no row with the kernels: nothing to compile


def test_the_kernels_step_compiles_ahead_by_running_once_untimed_and_silent(monkeypatch, capsys):
    """gpu_check's kernels step first runs itself once inside ``compile_ahead``: each timing a single call, its
    printing dropped, not compiling ahead again within; a failure there is reported and the step goes on."""
    pytest.importorskip('triton')
    from smmcl.kernels import triton_compile
    gpu_check = bench_script('gpu_check')
    monkeypatch.setattr(triton_compile, 'compile_ahead',
                        lambda *passes: [run() for run in passes] and dict(compilations=1, compiled=1, seconds=0.1))
    calls = []

    def step(args, device):
        calls.append(list(gpu_check._UNTIMED))
        print('a table')
        return gpu_check.time_ms(lambda: calls.append('timed'), torch.device('cuda'))  # untimed: no CUDA needed

    gpu_check.compile_ahead_of_step('kernels', step, None, torch.device('cpu'))
    out = capsys.readouterr().out
    assert calls == [[True], 'timed'] and 'a table' not in out and not gpu_check._UNTIMED
    assert "compiled ahead of the kernels step (1 passes): {'compilations': 1" in out

    def failing(args, device):
        raise RuntimeError('a kernel cannot compile')
    gpu_check.compile_ahead_of_step('kernels', failing, None, torch.device('cpu'))
    out = capsys.readouterr().out
    assert 'compiling ahead of the kernels step failed; it compiles for itself' in out
    assert 'RuntimeError: a kernel cannot compile' in out and not gpu_check._UNTIMED

    class Measured(Exception):
        pass

    def bandwidth(device, smoke=False):
        raise Measured  # the step's own work begins: stop here
    ahead = []
    monkeypatch.setattr(gpu_check, 'compile_ahead_of_step', lambda name, step, args, device: ahead.append(name))
    monkeypatch.setattr(gpu_check, 'copy_bandwidth', bandwidth)
    with gpu_check.tf32_kept():  # the step turns TF32 off
        for untimed in ([], [True]):
            monkeypatch.setattr(gpu_check, '_UNTIMED', untimed)
            with pytest.raises(Measured):
                gpu_check.step_kernels(SimpleNamespace(smoke=True, batch=1), torch.device('cpu'))
    assert ahead == ['kernels']  # not again within its own untimed run


def test_idle_gpu_time_is_counted_to_the_host_operator_running_meanwhile():
    """gpu_check's account of the wall time the GPU stands idle (the graphed step's gap to its GPU
    time): every idle stretch of the window goes to the host operator it overlaps, or to none."""
    gpu_check = bench_script('gpu_check')
    device = [(0, 10), (5, 20), (30, 40), (38, 39), (60, 70)]  # overlapping kernels; one after the window
    host = [('b', 28, 35), ('a', 0, 25), ('c', 45, 48)]
    busy, idle = gpu_check.idle_attribution(device, host, (0, 50))
    assert busy == 30  # [0, 20) and [30, 40)
    assert idle == {'a': 5, 'b': 2, 'c': 3, gpu_check.NO_OPERATOR: 10}
    assert busy + sum(idle.values()) == 50
    busy, idle = gpu_check.idle_attribution([], [('a', 0, 5)], (0, 10))
    assert busy == 0 and idle == {'a': 5, gpu_check.NO_OPERATOR: 5}


def test_traffic_extrapolates_each_operator_linearly_in_the_pixels():
    """bench/traffic.py: bytes = slope * pixels * batch + fixed (weights once), from two sizes."""
    traffic = bench_script('traffic')
    small = {'conv': [3, 10 * 100 + 500], 'cast': [2, 500]}
    large = {'conv': [3, 10 * 400 + 500], 'cast': [2, 500], 'new': [1, 4000]}
    rows = traffic.extrapolate(small, large, 100, 400, 1000, 2)
    assert rows['conv'] == (3, 10 * 1000 * 2 + 500)
    assert rows['cast'] == (2, 500)  # fixed: a weight's bytes
    assert rows['new'] == (1, 4000 / 400 * 2000)  # absent at the small size: all slope
    # a real record: the fast inference forward of MSCAN-T, its convolutions in bf16, views moving nothing
    args = argparse.Namespace(backbone='mscan_t', kernels=False, train=False)
    ops = traffic.record(args, 32, 32)
    assert ops['convolution (bfloat16)'][1] > 0
    # cuDNN's dense convs get their bias added in a pass of its own on a GPU: counted apart
    bias_adds, moved = ops['bias add after a cuDNN convolution (bfloat16)']
    assert 0 < bias_adds < ops['convolution (bfloat16)'][0] and moved > 0
    assert all(moved == 0 for name, (_, moved) in ops.items() if name.split()[0] in ('view', 'permute', 'transpose'))


def test_traffic_counts_launches_where_our_code_makes_them():
    """bench/traffic.py --launches: an operator that writes memory launches (a new result, in place, the
    random draw); views, aliases, a cast to the same dtype and allocations do not; each is placed at the
    line of the smmcl package that called it, a built-in backward at (autograd)."""
    from smmcl.models.mscan import DropPath
    traffic = bench_script('traffic')
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    drop = DropPath(0.5).train()
    mode = traffic.Traffic(launches=True)
    with mode:
        y = x.reshape(2, 48).view(2, 3, 16).detach().to(torch.float32)  # no launch
        torch.empty(5)  # no launch
        z = x + 1  # one
        z.detach().add_(1)  # one, in place
        drop(z).sum().backward()  # the draw, the scaling, the product and the sum; their backward
    assert y.dtype == torch.float32
    by_operator = collections.Counter()
    for (name, _), n in mode.launches.items():
        by_operator[name.split()[0]] += n
    assert by_operator['add'] == 1 and by_operator['add_'] == 1 and by_operator['bernoulli_'] == 1
    assert not {'reshape', 'view', 'detach', 'to', 'empty'} & set(by_operator)
    sites = {site for (name, site), n in mode.launches.items()}
    assert any(site.startswith('smmcl/models/mscan.py:') and site.endswith('draw_mask') for site in sites), sites
    assert '(autograd)' in sites
    if importlib.util.find_spec('triton'):  # a kernel that is not autotuned: at the line that launches it
        from smmcl.kernels import triton_common
        launched = []

        class Kernel:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launched.append(traffic.call_site())
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(triton_common, 'chunk_sums_kernel', Kernel())
            triton_common.chunk_sums(torch.zeros(1, 2, 3), torch.zeros(1, 3))
        assert len(launched) == 1 and re.fullmatch(r'smmcl/kernels/triton_common\.py:\d+ chunk_sums', launched[0])


@pytest.mark.slow
@needs_ptxas
def test_row_kernels_execute_fewer_instructions_than_tiles():
    """bench/sass.py compiles the kernels for sm_90 without a GPU: the row kernels (each input row loaded
    once per tap column into per-row accumulators) run well under the tile kernels' lane instructions
    and loads per output, in both layouts, and spill nothing; the row-walked weight gradients under half
    the instructions of the gather and the tap-by-tap kernels."""
    rows = {}
    for f in sass('--first', '--only', 'dwconv5x5,strip3_sum_along_h,wgrad5x5,strip3_wgrad_along_h'):
        if len(f) == 10 and f[2] in ('tiles', 'rows', 'gather', 'taps'):
            rows[f[0], f[1], f[2]] = dict(spill=int(f[6]), instructions=float(f[7]), loads=float(f[8]))
    assert len(rows) == 18, rows
    for (case, layout, family), row in rows.items():
        assert row['spill'] == 0
        if family != 'rows':
            continue
        others = [other for (c, l, f), other in rows.items() if (c, l) == (case, layout) and f != 'rows']
        if 'wgrad' in case:
            # per position of the map, counted in the loop over tiles; the tile kernels' loads may be
            # vectorised where the row walk's shifted loads are not: instructions only
            assert all(row['instructions'] < 0.5 * other['instructions'] for other in others), (case, layout)
        else:
            tiles, = others
            assert row['instructions'] < 0.75 * tiles['instructions'] and row['loads'] < 0.75 * tiles['loads']


@pytest.mark.slow
@needs_ptxas
def test_backward_passes_with_their_weight_gradients_fit_and_save_instructions():
    """The depthwise backward passes that also sum the weight gradients (the attention's 5x5 adjoint, the
    MLP's 3x3 GELU gradient), compiled for sm_90 by bench/sass.py: the candidate with the most elements a
    thread spills nothing, and the first runs fewer lane instructions per element than the two row-walked
    passes it replaces (the conv's pass and the weight gradient's) together, in both layouts."""
    rows = {}
    for pick, cases in (('--first', 'grad_wgrad5x5,gelu_grad_wgrad3x3,dwconv5x5_adjoint,wgrad5x5,dwconv3x3_gelu_grad,'
                                    'wgrad3x3'), ('--largest', 'grad_wgrad5x5,gelu_grad_wgrad3x3')):
        for f in sass(pick, '--only', cases, '--family', 'fused,rows'):
            if len(f) == 10 and f[2] in ('fused', 'rows'):
                rows[pick, f[0], f[1]] = dict(spill=int(f[6]), instructions=float(f[7]))
    assert len(rows) == 16, rows
    assert all(row['spill'] == 0 for row in rows.values())
    for layout in ('NCHW', 'NHWC'):
        for fused, conv, wgrad in (('grad_wgrad5x5', 'dwconv5x5_adjoint', 'wgrad5x5'),
                                   ('gelu_grad_wgrad3x3', 'dwconv3x3_gelu_grad', 'wgrad3x3')):
            first = {case: rows['--first', case, layout]['instructions'] for case in (fused, conv, wgrad)}
            assert first[fused] < first[conv] + first[wgrad], (layout, first)


@pytest.mark.slow
@needs_ptxas
def test_row_kernels_largest_tiles_fit_in_registers_and_save_instructions():
    """Each row kernel's candidate tile with the most elements a thread (8 columns in NCHW, 4-8 channels
    in channels_last), compiled for sm_90 by bench/sass.py: no spills in any forward or backward case, and
    for the 5x5 conv about a third fewer lane instructions per output than the first candidate."""
    cases = ('dwconv5x5,dwconv5x5_adjoint,dwconv3x3_gelu,dwconv3x3_gelu_grad,strip3_along_w,strip3_along_h,'
             'strip3_sum_along_w,strip3_sum_along_h')
    rows = {}
    for pick, only in (('--largest', cases), ('--first', 'dwconv5x5')):
        for f in sass(pick, '--family', 'rows', '--only', only):
            if len(f) == 10 and f[2] == 'rows':
                rows[f[0], f[1], pick] = dict(spill=int(f[6]), instructions=float(f[7]))
    assert len(rows) == 2 * 8 + 2
    assert all(row['spill'] == 0 for row in rows.values()), rows
    for layout in ('NCHW', 'NHWC'):
        largest, first = (rows['dwconv5x5', layout, pick]['instructions'] for pick in ('--largest', '--first'))
        assert largest < 0.7 * first, (layout, largest, first)


@pytest.mark.slow
@needs_ptxas
def test_band_kernels_run_on_the_tensor_cores():
    """The strips along W in NCHW as products with band matrices (smmcl/kernels/triton_bands.py), as
    autocast runs them (bfloat16 maps, float32 taps in three bfloat16 parts), and the 5x5 and 3x3 convs'
    weight gradients in NCHW, compiled for sm_90 by bench/sass.py: every tile without spills and without a
    float32 FMA (the sums are tensor-core products), first tiles compared with the row kernels' in lane
    instructions per output: under a quarter for the forward strips, the backward's adjoint sum (the row
    kernels' weakest: each output row's 39 shifts loaded unaligned) and the weight gradients along W,
    under half for the KxK weight gradients (per position of the map)."""
    bounds = dict(strip3_along_w=0.25, strip3_sum_along_w=0.25, strip3_wgrad_along_w=0.25, wgrad5x5=0.5,
                  wgrad3x3=0.5)
    cases = tuple(bounds)
    rows = {}
    for pick, options in (('', ['--family', 'bands']), ('--first', ['--first', '--family', 'rows,bands'])):
        for f in sass('--only', ','.join(cases), *options):
            if len(f) == 10 and f[1] == 'NCHW' and f[2] in ('rows', 'bands'):
                rows.setdefault((f[0], f[2], pick), []).append(dict(spill=int(f[6]), instructions=float(f[7]),
                                                                    ffma=float(f[9])))
    every = [row for case in cases for row in rows[case, 'bands', '']]
    assert len(every) == 5 + 5 + 4 + 4 + 4 and all(row['spill'] == 0 and row['ffma'] == 0 for row in every), rows
    for case in cases:
        (band,), (row,) = rows[case, 'bands', '--first'], rows[case, 'rows', '--first']
        assert band['instructions'] < bounds[case] * row['instructions'], (case, band, row)


@pytest.mark.slow
@needs_ptxas
def test_per_channel_passes_compile_to_wide_accesses_without_spills():
    """The bias add (alone, with proj_1's GELU, with conv3's gate) and its backward (the bias gradient's
    sums, with each epilogue's backward), the training block tails (with the branch's bias; the attention's
    with its shortcut) forward and backward, the blocks' BatchNorm in training (the statistics' sums, the
    output with its bf16 copy, and their backward, whose apply pass also reads the stream's gradient and
    four per-channel vectors, up to half a load instruction an element in channels_last), the folded
    blocks' stream pair, and the cross-modal modulation's outputs (two float32 maps read, the two bf16 maps
    and their concat written, 21-22 instructions an element), their backward (the three bf16 gradients
    and two float32 maps read, two written, the gate's sums: 35-43), its
    inputs' gradient sums (three maps and three per-channel vectors: 24-26) and its inputs' pass (a map
    copied into the bf16 concat, its sums, maxima and their counts kept per lane: 10-11), compiled for sm_90 by
    bench/sass.py: no spills, 16-byte accesses (one load
    instruction per 8 bf16 or 4 float32 elements a thread: bias sums 1/8, the MLP tail's backward 3/8 with
    its float32 gradient), a
    handful of instructions per element where there is no GELU, in both layouts: memory-bound passes.
    The exact GELU's erf costs ~35 instructions an element (ATen's GELU pays the same): those passes are
    about as bound by instructions as by memory on an H200, and stay under 64."""
    # as printed (2 decimals); the stream pair reads a bf16 and a float32 map, the factor and the branch's
    # bias, and writes both maps (12 bytes an element: still ~5x more time in memory than in instructions on
    # an H200; in channels_last the two per-channel vectors take a quarter of a load instruction an element)
    # the training tails' forward reads x (float32), y (bf16) and the attention's float32 shortcut, with
    # the factor and bias vectors and its image's drop path mask (one value, one address for the program:
    # an eighth of a load an element in the one-tile forward), and writes the sum and the attention's
    # float32 branch; their backward reads the gradient and y (0.38) or the float32 branch (0.5) and the
    # bias only once
    most_loads = {'bias_add': 0.38, 'bias_gelu': 0.38, 'bias_gate': 0.5, 'bias_grad': 0.13, 'bias_gelu_grad': 0.25,
                  'bias_gate_grad': 0.38, 'residual': 1.0, 'residual_grad': 0.38, 'shortcut_residual': 1.25,
                  'shortcut_residual_stats': 1.13,
                  'shortcut_residual_grad': 0.5, 'norm_sums': 0.25, 'norm_apply': 1.0, 'norm_grad_sums': 0.63,
                  'norm_grad_apply': 1.88, 'residual_pair': 0.88, 'modulation': 0.88, 'modulation_grad': 1.38,
                  'pooled_grad': 1.38, 'pool_concat': 0.25}
    most_instructions = dict.fromkeys(most_loads, 16)
    most_instructions.update(residual=24, shortcut_residual=26, shortcut_residual_stats=24, residual_pair=24,
                             bias_gelu=64, bias_gelu_grad=64, norm_apply=24, norm_grad_apply=32, modulation=24,
                             modulation_grad=48, pooled_grad=32)
    rows = {}
    for f in sass('--first', '--only', ','.join(most_loads), timeout=900):
        if len(f) == 10 and f[2] == 'triton':
            rows[f[0], f[1]] = dict(spill=int(f[6]), instructions=float(f[7]), loads=float(f[8]))
    assert len(rows) == 2 * len(most_loads), rows
    for (case, layout), row in rows.items():
        assert row['spill'] == 0 and row['instructions'] <= most_instructions[case], (case, layout, row)
        assert row['loads'] <= most_loads[case], (case, layout, row)


@pytest.mark.slow
@needs_ptxas
def test_nmf_products_compile_to_tensor_core_instructions_without_spills():
    """smmcl::bmm_tf32x3's kernel for sm_90 at the NMF's three large products (bench/sass.py): every
    configuration on the tensor cores (HGMMA, or HMMA for the narrowest tile: three TF32 products per
    K step), no float32 FMAs left on the CUDA cores, no spills."""
    cases = ('bmm_xT_bases', 'bmm_x_coef', 'bmm_bases_coefT')
    rows = [f for f in sass('--only', ','.join(cases), timeout=900) if f[:1] and f[0] in cases]
    assert len(rows) == 3 * 5, rows
    for case, config, warps, stages, regs, spill, mma, ffma in rows:
        block_k = int(config.split('x')[2])
        assert int(spill) == 0 and int(ffma) == 0 and int(mma) >= 3 * block_k // 8, (case, config, mma)


@needs_ptxas
def test_nmf_update_passes_divide_as_ieee_and_load_wide_without_spills():
    """The NMF update's element-wise passes for sm_90 (bench/sass.py): each of a thread's 16 divisions
    IEEE-rounded (an FCHK each: ATen's bits, where Triton's ``/`` is approximate), the float32 loads
    128 bits wide (3 or 5 inputs over 2 or 3 outputs: 4 elements a load), no spills."""
    rows = {f[0]: f for f in sass('--only', 'nmf_update,nmf_update_grad') if f[:1] and f[0].startswith('nmf_')}
    assert set(rows) == {'nmf_update', 'nmf_update_grad'}, rows
    for name, inputs, outputs in (('nmf_update', 3, 2), ('nmf_update_grad', 5, 3)):
        _, config, warps, regs, spill, instructions, loads, ieee = rows[name]
        block_rows, block_cols = map(int, config.split('x'))
        per_thread = block_rows * block_cols // (32 * int(warps[1:]))
        assert per_thread == 16 and int(spill) == 0 and int(ieee) == per_thread, rows[name]
        assert float(loads) == pytest.approx(inputs / outputs / 4, abs=0.01) and float(instructions) < 20, rows[name]


def test_nmf_table_times_each_formulation_of_the_large_products(capsys):
    """gpu_check's NMF table (no Triton needed): the whole forward and each large product as written and
    transposed; the transposed formulations compute the same products. Where the kernels run (under the
    interpreter, as when the suite has collected tests/test_kernels.py), also the forward with
    smmcl::bmm_tf32x3 (the same function) and what auto keeps."""
    gpu_check = bench_script('gpu_check')
    got = gpu_check.nmf_table(SimpleNamespace(smoke=True, batch=8), torch.device('cpu'))
    assert {'whole_ms', 'x^T @ bases', '(bases^T @ x)^T', 'x @ coef', '(coef^T @ x^T)^T', 'bases @ coef^T'} <= set(got)
    assert all(v > 0 for v in got.values() if isinstance(v, float))
    if 'auto' in got:
        assert got['whole_tf32x3_ms'] > 0 and got['rel_diff'] < 1e-5 and set(got['auto'].values()) == {'triton'}
    assert 'NMF (float32' in capsys.readouterr().out
    x, bases = torch.rand(2, 8, 12), torch.rand(2, 8, 4)
    assert torch.allclose(torch.bmm(x.transpose(1, 2), bases), torch.bmm(bases.transpose(1, 2), x).transpose(1, 2))


def test_the_smoke_model_checks_the_contrastive_terms_and_bench_builds_it():
    """``--smoke`` runs every step on the CPU with a one-block-per-stage MSCAN at 64x64 (registered where the
    script names it, also in bench.py's configs, with its decoder's width); its labels leave the
    contrastive terms non-zero, so the model step compares them (random 14-class cells at 64x64 leave
    them 0). The device run keeps MSCAN-B at 480x640 with 14 random classes."""
    from smmcl.models.mscan import MSCAN_VARIANTS
    gpu_check = bench_script('gpu_check')
    smoke, real = SimpleNamespace(smoke=True), SimpleNamespace(smoke=False)
    assert gpu_check.model_shape(real) == dict(backbone='mscan_b', decoder_embed_dim=512, height=480, width=640)
    try:
        cfg, model, rgb, x, label = gpu_check._model_and_batch(smoke, torch.device('cpu'), 1)
        assert cfg.backbone == gpu_check.SMOKE_BACKBONE and gpu_check.model_spec(smoke).depths == (1, 1, 1, 1)
        assert rgb.shape == x.shape == (1, 3, 64, 64) and label.unique().tolist() == [0, 1]
        torch.manual_seed(3)
        with torch.no_grad():
            terms = model.train()(rgb, x, label, return_terms=True)
        assert all(terms[k] > 0.5 for k in ('ce', 'cm', 'vis', 'aux'))
        bench_args = gpu_check.bench_arguments(smoke, batch=2)
        assert (bench_args.backbone, bench_args.height, bench_args.decoder_embed_dim) == ('mscan_smoke', 64, 64)
        assert [name for name, *_ in gpu_check.mscan_b_sizes(smoke)][:2] == ['s1 attn', 's1 mlp']
        assert gpu_check.mscan_b_sizes(smoke)[0][2:] == (8, 16, 16)
    finally:
        MSCAN_VARIANTS.pop(gpu_check.SMOKE_BACKBONE, None)


def test_the_summary_states_each_profiled_calls_wall_gpu_time_syncs_kernels_and_idle_time(capsys):
    gpu_check = bench_script('gpu_check')
    idle = dict(window_ms=220.0, busy_ms=140.0, idle_ms={'cudaGraphLaunch': 50.0, gpu_check.NO_OPERATOR: 30.0})
    gpu_check.summary({'env': {}, 'profile': {
        'train fast+triton NCHW+graphs': [('wall ms per call', 220.0, 1.0), ('device ms per call', 140.0, 1.0),
                                          ('synchronizing calls per call', 0, 1.0), ('kernels per call', 4000, 1.0),
                                          ('_dwconv_kernel', 20.0, 0.1),
                                          ('idle attribution', idle, 1.0)],
        'eval fast+triton': 'failed'}})
    out = capsys.readouterr().out
    assert ('profile train fast+triton NCHW+graphs: wall 220.0 ms, GPU 140.0 ms, 0 syncs, 4000 kernels (35.0 us '
            'each); GPU idle during '
            'cudaGraphLaunch 50.0 ms, (no host operator') in out


def test_kernel_labels_and_launching_operators_name_the_element_wise_kernels():
    """The profile's kernel lines keep the functor (ATen's loop name fills the first 100 characters), and
    device time is also counted to the operator that launched each kernel, largest first."""
    gpu_check = bench_script('gpu_check')
    name = ('void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::'
            '(anonymous namespace)::addcmul_cuda_kernel(at::TensorIteratorBase&, c10::Scalar const&)::'
            '{lambda()#1}::operator()() const::{lambda(float, float, float)#1}>(at::TensorIteratorBase&, ...)')
    label = gpu_check.kernel_label(name)
    assert label.startswith('elementwise_kernel<128, 4, gpu_kernel_impl_nocast<addcmul_cuda_kernel')
    assert len(label) == 110
    events = [SimpleNamespace(key='aten::addcmul', count=84, self_device_time_total=2400.0),
              SimpleNamespace(key='aten::copy_', count=20, self_device_time_total=600.0),
              SimpleNamespace(key='aten::view', count=500, self_device_time_total=0.0)]
    assert gpu_check.launching_operators(events, steps=2) == [('aten::addcmul', 42, 1.2), ('aten::copy_', 10, 0.3)]


@pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='needs Triton (its interpreter)')
def test_a_call_stopped_at_its_time_limit_still_writes_its_rows_summary_and_json(tmp_path):
    """gpu_check under a device call's limit: SIGTERM to the process and to its group (the DataLoader's workers
    too, and the process a second time), in the middle of the bench step: the rows measured so far are in the
    JSON and the summary, and the exit status says it was stopped."""
    import json
    import signal
    import time
    out = tmp_path / 'out'
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONUNBUFFERED='1', PYTHONPATH=REPO_ROOT, TMPDIR=str(tmp_path))
    with open(tmp_path / 'log.txt', 'w') as log:
        proc = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, 'bench', 'gpu_check.py'), '--smoke',
                                 '--only', 'bench', '--out', str(out)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        deadline = time.time() + 240
        while 'autotuning so far' not in (tmp_path / 'log.txt').read_text() and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / 'log.txt').read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    text = (tmp_path / 'log.txt').read_text()
    assert '[bench] stopped by SIGTERM after' in text and 'SUMMARY (for docs/speed.md)' in text
    rows = json.loads((out / 'gpu_check.json').read_text())['bench']
    assert rows['plain']['train'] > 0 and 'fast+triton' not in rows  # the first row, not the interpreted ones
    assert '\nplain ' in text.split('SUMMARY')[1]


def test_gpu_check_imports_smmcl_from_its_checkout_where_it_is_not_installed(tmp_path):
    """On the device nothing is installed: the checkout goes on the module path (of the steps' own processes too),
    nothing is built."""
    code = ("import importlib.util, os, sys; sys.path.insert(0, sys.argv[1]); import gpu_check; "
            "print(gpu_check.use_checkout()); print(importlib.util.find_spec('smmcl').origin); "
            "print(repr(os.environ['PYTHONPATH']))")
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    # -S: no site-packages, where the editable install of the test environment lives
    out = subprocess.run([sys.executable, '-S', '-c', code, os.path.join(REPO_ROOT, 'bench')], capture_output=True,
                         text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    said, origin, path = out.stdout.splitlines()
    assert said == f'this checkout ({REPO_ROOT})' and origin == os.path.join(REPO_ROOT, 'smmcl', '__init__.py')
    assert path == repr(REPO_ROOT)


PRECOMPILE_CHILD = r'''
import os
import sys
from unittest import mock

import triton

from conftest import StandInPool
from smmcl.kernels import target, triton_compile


def compiled_here(*args, **kwargs):
    raise AssertionError('compiled in the launching process')


pool = StandInPool()  # records the jobs, compiles none
with mock.patch.object(triton_compile, 'compile_pool', lambda: pool), \
        mock.patch.object(triton.compiler.compiler.ASTSource, 'make_ir', compiled_here):
    sys.path.insert(0, sys.argv[1])
    import gpu_check
    gpu_check.main(['--precompile', '90', '--smoke', '--out', sys.argv[2], '--triton-key', sys.argv[3]])
names = {args[1] for _, args in pool.jobs}
precision = {args[3].get('PRECISION') for _, args in pool.jobs if args[1] == 'bmm_kernel'}
import torch
from smmcl.kernels import triton_dwconv
sms = triton_dwconv._sms(torch.empty(1))
assert 'SMMCL_TRITON_AUTOTUNE' not in os.environ  # the model step's one candidate a kernel, not after it
print('JOBS', len(pool.jobs), len(names), sms, sorted(precision), target.COMPILING_FOR)
'''


@pytest.mark.slow
def test_precompiling_hands_the_first_steps_launches_over_for_the_gpu_without_one(tmp_path):
    """``gpu_check.py --precompile 90`` on the CPU, without the interpreter: the bench rows' passes, the kernels
    step and the model step's kernel paths (one candidate a kernel) run with CPU tensors standing for an sm_90
    GPU's, every launch handed over to the workers (a stand-in here) and none compiled or run in the process;
    the launches' arguments follow the GPU (the NMF's products on TF32 tensor cores, as on an H100, where the
    interpreter multiplies in float32), and Triton's key is the one given."""
    import hashlib
    key = tmp_path / 'key.txt'
    key.write_text('3.6.0-a-device-pythons-triton\n')
    script = tmp_path / 'child.py'
    script.write_text(PRECOMPILE_CHILD)
    out = run_compile_only(script, os.path.join(REPO_ROOT, 'bench'), str(tmp_path / 'out'), str(key))
    assert out.returncode == 0, out.stderr[-3000:]
    digest = hashlib.sha256(b'3.6.0-a-device-pythons-triton').hexdigest()[:16]
    assert f'precompiling for sm_90 (132 multiprocessors), triton cache key {digest}' in out.stdout
    assert 'compiled ahead of the bench rows (4 passes): {' in out.stdout
    assert 'compiled ahead of the kernels step (1 passes): {' in out.stdout and 'failed' not in out.stdout
    assert 'compiled ahead of the model step (4 passes): {' in out.stdout
    jobs, kernels, sms, precision, target = out.stdout.split('JOBS')[1].split(maxsplit=4)
    assert int(jobs) > 500 and int(kernels) >= 30 and sms == '132'
    assert precision == "['tf32x3']" and target.strip() == '(132, (9, 0))'


def test_the_kernels_read_the_gpus_properties_once_and_the_precompiled_ones_for_cpu_tensors(monkeypatch):
    """What the launches' arguments follow: a CUDA device's multiprocessors and capability (read once per
    device), ``COMPILING_FOR`` for CPU tensors while precompiling, nothing for the interpreter's."""
    from smmcl import kernels
    from smmcl.kernels import target
    reads = []

    def properties(index):
        reads.append(index)
        return SimpleNamespace(multi_processor_count=114 + index, major=9, minor=index)
    monkeypatch.setattr(torch.cuda, 'get_device_properties', properties)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 1)
    target._cuda_properties.cache_clear()
    try:
        assert target.gpu_properties(torch.device('cuda', 0)) == (114, (9, 0))
        assert target.gpu_properties(torch.device('cuda')) == (115, (9, 1))
        assert target.gpu_properties(torch.device('cuda', 0)) == (114, (9, 0)) and reads == [0, 1]
    finally:
        target._cuda_properties.cache_clear()
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    assert target.gpu_properties(torch.device('cpu')) is None and not kernels.runs_on(torch.empty(1))
    monkeypatch.setattr(target, 'COMPILING_FOR', (132, (9, 0)))
    assert target.gpu_properties(torch.device('cpu')) == (132, (9, 0)) and kernels.runs_on(torch.empty(1))


TF32_CHILD = r'''
import sys

import torch

sys.path.insert(0, sys.argv[1])
import gpu_check


def turns_tf32_off(args, device):  # as the kernels and model steps do for their float32 comparisons
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return {}


def reads_tf32(args, device):
    print('TF32', torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    return {}


gpu_check.step_model, gpu_check.step_graphs = turns_tf32_off, reads_tf32
torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
gpu_check.main(['--smoke', '--only', 'model,graphs', '--out', ''])
print('AFTER', torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
'''


def test_the_steps_after_a_float32_comparison_run_with_the_runs_tf32_switches(tmp_path):
    """The kernels and model steps turn TF32 off; the steps after them (graphs, profile, brief: what train.py
    runs) find the switches as the run set them, and so does the run after its last step."""
    script = tmp_path / 'child.py'
    script.write_text(TF32_CHILD)
    out = subprocess.run([sys.executable, str(script), os.path.join(REPO_ROOT, 'bench')], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'TF32 True True' in out.stdout and 'AFTER True True' in out.stdout
