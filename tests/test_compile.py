"""The autotuners' candidates compiled in worker processes (smmcl/kernels/triton_compile.py) are the kernels
the launch compiles: Triton's cache key of a launch with real tensors finds what the workers wrote.

Without a GPU, compiled for sm_90 on the CPU (Triton's own compiler, as bench/sass.py) through a driver
that only gives the target, in a child process without the interpreter."""
import importlib.util
import os
import subprocess
import sys

import pytest

from smmcl.config import REPO_ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='needs Triton')

CHILD = r'''
import torch
import triton
from triton.backends.compiler import GPUTarget

from smmcl.kernels import triton_compile
triton.runtime.driver.set_active(triton_compile.CompileOnlyDriver(GPUTarget('cuda', 90, 32)))
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


def compiled_here(*args, **kwargs):
    raise AssertionError('compiled in the launching process')


kernel.do_bench = time_candidate
triton_compile.compile_pool().submit(int).result()  # the workers fork now, so the patch below is this process's
triton.compiler.compiler.ASTSource.make_ir = compiled_here

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
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env.update(TRITON_CACHE_DIR=str(tmp_path / 'cache'), SMMCL_TRITON_COMPILE_WORKERS='2',
               TRITON_DEFAULT_FP_FUSION='1', PYTHONPATH=REPO_ROOT)
    # a script without a ``__main__`` guard, as users write them: the workers must not run it again
    script = tmp_path / 'script.py'
    script.write_text(CHILD)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
                         cwd=str(tmp_path))
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


class _Process:
    def __init__(self):
        self.terminated = False

    def terminate(self):
        self.terminated = True


class _Pool:
    """An executor that runs each job at once, in this process, recording it (or never, when stuck)."""

    def __init__(self, broken=False, stuck=False):
        self.jobs, self.broken, self.stuck, self.shut = [], broken, stuck, False
        self._processes = {1: _Process(), 2: _Process()}  # as ProcessPoolExecutor holds its workers

    def submit(self, fn, *args):
        import concurrent.futures
        if self.broken:
            raise concurrent.futures.BrokenExecutor('a worker died')
        self.jobs.append((fn, args))
        done = concurrent.futures.Future()
        if not self.stuck:
            done.set_result(None)
        return done

    def shutdown(self, wait=True, cancel_futures=False):
        self.shut, self.workers, self._processes = True, self._processes, None


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
    pool = _Pool()
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
    broken = _Pool(broken=True)
    monkeypatch.setattr(triton_compile, '_pool', broken)
    monkeypatch.setattr(triton_compile, '_pool_failed', False)
    with pytest.warns(UserWarning, match='no compile workers'):
        assert triton_compile.compile_candidates(tuner, configs, {}) == 0
    assert broken.shut and triton_compile._pool is None and triton_compile.compile_pool() is None
    # a worker that hangs: the launch waits _WAIT_S once, then the pool and its processes are ended
    stuck = _Pool(stuck=True)
    monkeypatch.setattr(triton_compile, '_pool', stuck)
    monkeypatch.setattr(triton_compile, '_pool_failed', False)
    monkeypatch.setattr(triton_compile, '_WAIT_S', 0.05)
    with pytest.warns(UserWarning, match=r'TimeoutError: 2 of 2 candidates not compiled after 0.05 s'):
        assert triton_compile.compile_candidates(tuner, configs, {}) == 0
    assert stuck.shut and all(p.terminated for p in stuck.workers.values())
    assert triton_compile._pool is None and triton_compile.compile_pool() is None


def kernel_stub():
    """Stands for a kernel function (its module and name) in the test above."""
