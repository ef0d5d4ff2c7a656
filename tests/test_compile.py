"""The autotuners' candidates compiled in worker processes (smmcl/kernels/triton_compile.py) are the kernels
the launch compiles: Triton's cache key of a launch with real tensors finds what the workers wrote.

Without a GPU, compiled for sm_90 on the CPU (Triton's own compiler, as bench/sass.py) through a driver
that only gives the target, in a child process without the interpreter."""
import importlib.util
import os

import pytest

from conftest import COMPILE_FOR_SM90, StandInPool, refuse_kernel_launches, run_compile_only, stand_in_compile_workers

pytestmark = pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='needs Triton')

CHILD = COMPILE_FOR_SM90 + r'''
import torch

from smmcl.kernels.triton_channel import bias_add_kernel as kernel

outcomes = []


def time_candidate(kernel_call, quantiles):
    """The autotuner's timing without a GPU: records whether the candidate's launch compiled it here or
    found it in Triton's cache (its launch then asks the compile-only driver for what it lacks)."""
    try:
        kernel_call()
    except AssertionError:
        outcomes.append('compiled')
    except AttributeError:
        outcomes.append('loaded')
    return 1.0


kernel.do_bench = time_candidate
triton_compile.compile_pool().submit(int).result()  # the workers fork now, so the patch below is this process's
refuse_compiling()

n, c, h, w = 2, 64, 8, 32
y = torch.empty(n, c, h, w, dtype=torch.bfloat16)
bias, out = torch.empty(c), torch.empty_like(y)


def launch(width):
    """As the ops launch it: a grid callable, the constexpr a keyword (the chosen candidate's launch fails)."""
    try:
        kernel[lambda meta: (1,)](y, bias, y, out, n, c, h, width, y.stride(0), y.stride(1), y.stride(3),
                                  EPILOGUE=1)
    except (AssertionError, AttributeError):
        pass
    print('OUTCOMES', width, ','.join(outcomes))
    outcomes.clear()


launch(w)
print('STATS', triton_compile.STATS['candidates'], triton_compile.STATS['compiled'])
triton_compile.release_pool()
triton_compile._pool_failed = True  # without the workers, the check sees the launch compile for itself
launch(w + 1)
'''


def test_the_workers_compile_what_the_launch_loads_from_the_cache(tmp_path):
    # a script without a ``__main__`` guard, as users write them: the workers must not run it again
    script = tmp_path / 'script.py'
    script.write_text(CHILD)
    out = run_compile_only(script, TRITON_CACHE_DIR=str(tmp_path / 'cache'), SMMCL_TRITON_COMPILE_WORKERS='2')
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'no compile workers' not in out.stderr
    lines = {line.split()[0] + line.split()[1]: line.split()[-1] for line in out.stdout.splitlines()
             if line.startswith(('OUTCOMES', 'STATS'))}
    candidates = lines['OUTCOMES32'].split(',')
    assert len(candidates) > 1 and set(candidates) == {'loaded'}  # every candidate timed was the workers'
    assert out.stdout.count('STATS') == 1 and f'STATS {len(candidates)} {len(candidates)}' in out.stdout
    assert lines['OUTCOMES33'].split(',') == ['compiled'] * len(candidates)


def test_no_workers_where_the_kernels_are_interpreted_or_one_is_asked(monkeypatch):
    pytest.importorskip('triton')
    from smmcl.kernels import triton_compile
    monkeypatch.setenv('SMMCL_TRITON_COMPILE_WORKERS', '1')
    assert triton_compile.compile_pool() is None
    assert triton_compile.compile_ahead(lambda: 1 / 0) is None  # nothing to compile ahead: no pass runs
    monkeypatch.setenv('SMMCL_TRITON_COMPILE_WORKERS', 'many')
    with pytest.raises(ValueError, match='SMMCL_TRITON_COMPILE_WORKERS'):
        triton_compile.worker_count()
    monkeypatch.setenv('SMMCL_TRITON_COMPILE_WORKERS', '4')
    monkeypatch.setattr(triton_compile, 'INTERPRETED', True)
    assert triton_compile.compile_pool() is None
    # by default the cores, shared among the training's processes on this machine, at most 16
    monkeypatch.delenv('SMMCL_TRITON_COMPILE_WORKERS')
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    monkeypatch.setattr(os, 'cpu_count', lambda: 64)
    assert triton_compile.worker_count() == 16
    monkeypatch.setenv('WORLD_SIZE', '8')
    assert triton_compile.worker_count() == 8
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '32')  # torchrun's count of this machine's processes comes first
    assert triton_compile.worker_count() == 2


def test_each_candidate_goes_to_a_worker_with_the_launchs_arguments_and_the_workers_end_when_idle(monkeypatch):
    """One job per candidate: the kernel by module and name, tensors as their dtype and address (what the
    JIT specialises on), the launch's constexprs with the candidate's options; the pool ends after
    ``_IDLE_S`` without work; a broken pool is reported once and not used again."""
    import time
    from types import SimpleNamespace
    import torch
    import triton
    pytest.importorskip('triton')
    from smmcl.kernels import triton_compile
    pool = StandInPool()
    monkeypatch.setattr(triton_compile, '_pool', pool)
    monkeypatch.setattr(triton_compile, '_IDLE_S', 0.05)
    y = torch.zeros(3, 4, dtype=torch.bfloat16)
    tuner = SimpleNamespace(nargs=dict(y_ptr=y, n=3), base_fn=kernel_stub)
    configs = [triton.Config(dict(BLOCK=16), num_warps=4), triton.Config(dict(BLOCK=32), num_warps=8)]
    before = dict(triton_compile.STATS)
    assert triton_compile.compile_candidates(tuner, configs, dict(EPILOGUE=2)) == 2
    assert [triton_compile.STATS[k] - before[k] for k in ('candidates', 'compiled')] == [2, 2]
    (fn, (module, name, args, kwargs)), second = pool.jobs
    assert fn is triton_compile.compile_candidate and (module, name) == (__name__, 'kernel_stub')
    assert isinstance(args[0], triton_compile.PointerArg) and args[0].dtype == torch.bfloat16
    assert args[0].data_ptr() == y.data_ptr() and args[1] == 3
    assert kwargs['EPILOGUE'] == 2 and kwargs['BLOCK'] == 16 and kwargs['num_warps'] == 4
    assert second[1][3]['BLOCK'] == 32 and second[1][3]['num_warps'] == 8
    assert triton_compile.compile_candidates(tuner, configs[:1], {}) == 0 and len(pool.jobs) == 2  # one: Triton's
    time.sleep(0.5)
    assert pool.shut and all(p.terminated for p in pool.workers.values()) and triton_compile._pool is None
    broken = StandInPool(broken=True)
    monkeypatch.setattr(triton_compile, '_pool', broken)
    monkeypatch.setattr(triton_compile, '_pool_failed', False)
    with pytest.warns(UserWarning, match='no compile workers'):
        assert triton_compile.compile_candidates(tuner, configs, {}) == 0
    assert broken.shut and triton_compile._pool is None and triton_compile.compile_pool() is None
    # a worker that hangs: the launch waits _WAIT_S once, then the pool and its processes are ended
    stuck = StandInPool(stuck=True)
    monkeypatch.setattr(triton_compile, '_pool', stuck)
    monkeypatch.setattr(triton_compile, '_pool_failed', False)
    monkeypatch.setattr(triton_compile, '_WAIT_S', 0.05)
    with pytest.warns(UserWarning, match=r'TimeoutError: 2 of 2 candidates not compiled after 0.05 s'):
        assert triton_compile.compile_candidates(tuner, configs, {}) == 0
    assert stuck.shut and all(p.terminated for p in stuck.workers.values())
    assert triton_compile._pool is None and triton_compile.compile_pool() is None


def kernel_stub():
    """Stands for a kernel function (its module and name) in the test above."""


def _bias_ops():
    """``bias_add`` and ``bias_grad`` of smmcl/kernels/triton_channel.py (an autotuned kernel each, the
    second's partials summed by a kernel that is not autotuned), and a pass of both on an N-64-8-W map."""
    import torch
    from smmcl.kernels import triton_channel

    def run(width):
        y, bias = torch.randn(2, 64, 8, width), torch.randn(64)
        triton_channel.bias_add(y, bias)
        triton_channel.bias_grad(y, bias)
    return triton_channel, run


def test_compiling_ahead_hands_every_launch_over_and_runs_none(monkeypatch):
    """``compile_ahead``: each pass's launches hand the workers their compilations (each implementation
    ``auto`` would time launched once, a kernel that is not autotuned too), without the grid or Triton's
    flags; no kernel runs, nothing is timed or remembered; the hook is gone after the passes, also when
    one raises; a broken pool is reported and left, as for the candidates of one launch."""
    pytest.importorskip('triton')
    from smmcl.kernels import triton_common, triton_compile
    triton_channel, run = _bias_ops()
    pool, released = StandInPool(), []
    monkeypatch.setattr(triton_compile, '_pool', pool)
    monkeypatch.setattr(triton_compile, '_pool_failed', False)
    monkeypatch.setattr(triton_compile, '_release_when_idle', lambda: released.append(1))
    refuse_kernel_launches(monkeypatch)
    caches = {k: dict(k.cache) for k in (triton_channel.bias_add_kernel, triton_channel.bias_grad_kernel)}
    choices = dict(triton_channel._CHOICE)
    stats = triton_compile.compile_ahead(lambda: run(24))
    names = [args[1] for fn, args in pool.jobs]
    assert set(names) == {'bias_add_kernel', 'bias_grad_kernel', 'chunk_sums_kernel'}
    assert all(fn is triton_compile.compile_candidate for fn, _ in pool.jobs)
    assert not any({'grid', 'warmup'} & args[3].keys() for _, args in pool.jobs)
    assert stats == dict(compilations=len(pool.jobs), compiled=len(pool.jobs), seconds=stats['seconds'])
    assert {k: dict(k.cache) for k in caches} == caches and triton_channel._CHOICE == choices
    assert not triton_common.AHEAD and released == [1]
    with pytest.raises(ZeroDivisionError):
        triton_compile.compile_ahead(lambda: 1 / 0)
    assert not triton_common.AHEAD
    broken = StandInPool(broken=True)
    monkeypatch.setattr(triton_compile, '_pool', broken)
    with pytest.warns(UserWarning, match='no compile workers .*BrokenExecutor'):
        assert triton_compile.compile_ahead(lambda: run(24)) is None
    assert broken.shut and triton_compile._pool is None and triton_compile.compile_pool() is None


def test_the_processes_of_a_machine_compile_ahead_a_share_each(monkeypatch):
    """``compile_ahead(..., share=(part, parts))``: of the compilations the passes meet, each taken once, the
    process hands the workers every ``parts``-th from its ``part``-th, in the order they come; the shares of
    all parts are the whole, none twice. A part outside ``0..parts-1`` is refused before any pass runs."""
    pytest.importorskip('triton')
    from smmcl.kernels import triton_compile
    _, run = _bias_ops()

    def key(name, args, kwargs):  # as Triton's binder keys a launch (it has none under the interpreter)
        return name, tuple(a % 16 == 0 if isinstance(a, int) else 'tensor' for a in args), tuple(sorted(kwargs.items()))
    monkeypatch.setattr(triton_compile, '_specialisation',
                        lambda kernel, args, kwargs: key(triton_compile._jit(kernel).fn.__name__, args, kwargs))
    refuse_kernel_launches(monkeypatch)

    def jobs(share):
        pool = stand_in_compile_workers(monkeypatch)
        # widths 24 and 40 specialise alike (not multiples of 16), 32 does not
        stats = triton_compile.compile_ahead(lambda: run(24), lambda: run(40), lambda: run(32), share=share)
        assert stats['compilations'] == len(pool.jobs)
        return [key(*args[1:]) for _, args in pool.jobs]
    whole = jobs((0, 1))
    assert len(set(whole)) == len(whole) > 3  # each specialisation once
    shares = [jobs((part, 3)) for part in range(3)]
    assert [shares[i % 3][i // 3] for i in range(len(whole))] == whole
    assert [len(share) for share in shares] == [len(range(part, len(whole), 3)) for part in range(3)]
    monkeypatch.setattr(triton_compile, '_specialisation', lambda kernel, args, kwargs: object())
    assert len(jobs((0, 1))) > len(whole)  # without the keys, every launch's compilations
    with pytest.raises(ValueError, match=r'share=\(3, 3\)'):
        triton_compile.compile_ahead(lambda: 1 / 0, share=(3, 3))


AHEAD_CHILD = COMPILE_FOR_SM90 + r'''
import importlib
import sys

from test_compile import _bias_ops

launches = []  # every launch's candidates, before the collector takes each specialisation once
collect = triton_compile._Collector.__call__


def recording(self, kernel, args, kwargs, configs=(None,)):
    launches.extend(triton_compile._jobs(triton_compile._jit(kernel).fn, args, kwargs, configs))
    collect(self, kernel, args, kwargs, configs)


triton_compile._Collector.__call__ = recording
_, run = _bias_ops()
# widths 24 and 40 specialise alike (not multiples of 16), 32 does not; each share as a process of its own would
parts = int(sys.argv[1])
shares = [triton_compile.compile_ahead(lambda: run(24), lambda: run(40), lambda: run(32), share=(part, parts))
          for part in range(parts)]
stats = {key: sum(share[key] for share in shares) for key in ('compilations', 'compiled')}
refuse_compiling()
missed = 0
for module, name, args, kwargs in launches:
    try:
        triton_compile._jit(getattr(importlib.import_module(module), name)).warmup(*args, grid=(1,), **kwargs)
    except AssertionError:
        missed += 1
print('AHEAD', len(launches), stats['compilations'], stats['compiled'], missed)
'''


@pytest.mark.parametrize('parts', [1, 2])
def test_compiling_ahead_compiles_each_specialisation_once_and_every_launch_finds_it(tmp_path, parts):
    """For sm_90 on the CPU in two workers, without the interpreter: three passes whose launches specialise
    two ways are compiled once per specialisation (Triton's own key), and every launch's candidates are
    then found in Triton's cache; also when two processes each compile a share (``share=``) into the
    same cache. (On the fast path's training step in both layouts and its inference forward, MSCAN-T at
    64x64: 28,981 launch candidates, 1,506 compilations, every one found.)"""
    script = tmp_path / 'script.py'
    script.write_text(AHEAD_CHILD)
    out = run_compile_only(script, str(parts), TRITON_CACHE_DIR=str(tmp_path / 'cache'),
                           SMMCL_TRITON_COMPILE_WORKERS='2', SMMCL_TRITON_AUTOTUNE='0')
    assert out.returncode == 0, out.stderr[-3000:]
    launches, compilations, compiled, missed = map(int, out.stdout.split('AHEAD')[1].split())
    assert compilations < launches and compiled == compilations and missed == 0
    assert len(os.listdir(tmp_path / 'cache')) == compilations  # no two jobs compiled the same kernel

