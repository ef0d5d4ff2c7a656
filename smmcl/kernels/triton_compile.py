"""Autotuning whose candidates are compiled in parallel processes before they are timed.

Triton's autotuner compiles each candidate configuration when it first times it, one after the other in
the launching process: 1-2 s a candidate for sm_90 on this project's CPUs, most of it Triton's code
generation in Python, which holds the GIL (threads would not help). The kernels here have 211 candidates
over 28 autotuned kernels; the fast path's training and inference, both layouts, meet ~430 (kernel,
specialisation, candidate) compilations (counted with the launches' arguments on a small model: each
shape's ``auto`` choice times every kernel family that applies), so a first step on a fresh machine
would spend minutes compiling, serially.

:func:`autotune` is ``triton.autotune`` whose autotuner, when a new key (shape) comes, first hands all of
that key's candidates to a pool of worker processes. Each compiles one through the kernel's own
``JITFunction.warmup`` (Triton's specialisation of the launch's arguments, its options, its cache key)
into Triton's on-disk cache, which the timing then reads instead of compiling. The compiled kernels are
the ones the launch would compile itself (the same cache key); a candidate a worker cannot compile is
compiled, or refused, by the launch as before. The workers are forked, as PyTorch's DataLoader workers
are: a spawned process would import the user's script again and run whatever it does without a
``__main__`` guard, a training included. They only compile, through a driver that gives the GPU's target
and nothing else: they never call CUDA (a forked process must not) and hold no GPU memory.

``SMMCL_TRITON_COMPILE_WORKERS``: the number of worker processes (default: the CPU cores, shared among the
training's processes on the machine, at most 16; they end after a minute without work, and a new shape
starts them again); ``0`` or ``1`` compiles in the launching process, as Triton does. A key whose candidates
are not back within two minutes ends the workers (a hung one too), and the launches compile for themselves.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import importlib
import multiprocessing
import os
import signal
import threading
import time
import warnings
from typing import Optional

import triton
from triton.runtime.jit import MockTensor

from .triton_common import INTERPRETED

# A key's candidates take seconds in the workers; one that is not back after this is stuck (a worker hung, say):
# the pool is ended and the launches compile themselves, rather than each new key waiting as long again
_WAIT_S = 120
_IDLE_S = 60  # the workers end after this long without work
_LAUNCH_KEYWORDS = ('grid', 'warmup')  # what Triton's launch adds to the keywords it hands the autotuner

_pool: Optional[concurrent.futures.Executor] = None
_pool_failed = False
# what the workers did in this process: candidates handed to them, compiled there, seconds waited for them
STATS = dict(candidates=0, compiled=0, wait_s=0.0)
_lock = threading.Lock()
_idle_timer: Optional[threading.Timer] = None


class PointerArg(MockTensor):
    """A tensor argument as the JIT specialises it (its dtype and whether its address is 16-byte
    aligned), without its memory: what a worker process needs to compile for it."""

    def __init__(self, dtype, address: int):
        super().__init__(dtype)
        self.address = address

    def data_ptr(self) -> int:
        return self.address


class CompileOnlyDriver:
    """Triton's driver as far as compiling asks one: the device, stream and target of the launch."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def start_worker(target) -> None:
    """A worker process's initialiser: compile for ``target`` (a ``triton.backends.compiler.GPUTarget``)."""
    # not the launching script's signal handlers: the pool ends a worker with SIGTERM, and Ctrl-C is the parent's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    triton.runtime.driver.set_active(CompileOnlyDriver(target))


def compile_candidate(module: str, name: str, args: list, kwargs: dict) -> None:
    """In a worker: compile the autotuned kernel ``module.name`` for these (positional) arguments and
    keyword arguments (the launch's constexprs and one candidate's), into Triton's cache."""
    kernel = getattr(importlib.import_module(module), name)
    kernel.fn.warmup(*args, grid=(1,), **kwargs)


def worker_count() -> int:
    """``SMMCL_TRITON_COMPILE_WORKERS``, else this process's share of the CPU cores (the training's processes
    on this machine share them), at most 16."""
    value = os.environ.get('SMMCL_TRITON_COMPILE_WORKERS', '')
    if value.strip():
        try:
            return int(value)
        except ValueError:
            raise ValueError(f'SMMCL_TRITON_COMPILE_WORKERS must be a number of processes, got {value!r}') from None
    processes = int(os.environ.get('LOCAL_WORLD_SIZE', os.environ.get('WORLD_SIZE', 1)))
    return min(16, (os.cpu_count() or 1) // max(1, processes))


def compile_pool() -> Optional[concurrent.futures.Executor]:
    """The worker processes (forked on first use, for the current device's target), or None: fewer than
    two workers asked for, the kernels interpreted, or the pool broken earlier."""
    global _pool
    workers = worker_count() if _pool is None and not _pool_failed and not INTERPRETED else 0
    if workers > 1:
        target = triton.runtime.driver.active.get_current_target()
        _pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context('fork'), initializer=start_worker, initargs=(target,))
    return _pool


def end_pool(pool: concurrent.futures.Executor) -> None:
    """Shuts ``pool`` down without waiting, its worker processes ended (a stuck one too)."""
    processes = list((getattr(pool, '_processes', None) or {}).values())  # shutdown forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()


def release_pool() -> None:
    """Ends the worker processes (a later compilation starts them again)."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        end_pool(pool)


atexit.register(release_pool)  # before the interpreter's teardown, which the pool's own finaliser outlives


def _release_when_idle() -> None:
    global _idle_timer
    if _idle_timer is not None:
        _idle_timer.cancel()
    _idle_timer = threading.Timer(_IDLE_S, release_pool)
    _idle_timer.daemon = True
    _idle_timer.start()


def _picklable(value):
    return PointerArg(value.dtype, value.data_ptr()) if hasattr(value, 'data_ptr') else value


def compile_candidates(tuner, configs, kwargs: dict, executor: Optional[concurrent.futures.Executor] = None) -> int:
    """Compiles ``configs`` of the autotuner ``tuner`` for the launch it is tuning (``tuner.nargs``, the
    positional arguments by name, and ``kwargs``) in ``executor`` (else :func:`compile_pool`), and waits.
    Returns how many compiled."""
    global _pool, _pool_failed
    if len(configs) < 2:
        return 0
    args = [_picklable(v) for v in tuner.nargs.values()]
    # a launch ``kernel[grid](...)`` reaches the autotuner with the grid and Triton's warmup flag among its
    # keywords: the launch's, not the kernel's (a grid callable would not even pickle), so not the workers'
    constexprs = {k: _picklable(v) for k, v in kwargs.items() if k not in _LAUNCH_KEYWORDS}
    module, name = tuner.base_fn.__module__, tuner.base_fn.__name__
    started = time.perf_counter()
    with _lock:
        try:
            pool = executor or compile_pool()
            if pool is None:
                return 0
            jobs = [pool.submit(compile_candidate, module, name, args, dict(constexprs, **c.all_kwargs()))
                    for c in configs]
            done, waiting = concurrent.futures.wait(jobs, timeout=_WAIT_S)
            if waiting:
                raise TimeoutError(f'{len(waiting)} of {len(jobs)} candidates not compiled after {_WAIT_S} s')
        except Exception as err:  # noqa: BLE001 - a worker died or hung, or no child process may start here (a daemon)
            if executor is None:  # no pool again in this process: the launches compile themselves
                broken, _pool, _pool_failed = _pool, None, True
                if broken is not None:
                    end_pool(broken)
            warnings.warn(f'smmcl.kernels: no compile workers ({type(err).__name__}: {err}); Triton compiles the '
                          'autotuning candidates in this process')
            return 0
    if executor is None:
        _release_when_idle()
    # a candidate that fails here (out of resources, a compile-time assertion) fails the launch's compile too,
    # where the autotuner sets it aside as it always does
    compiled = sum(1 for job in done if job.exception() is None)
    STATS.update(candidates=STATS['candidates'] + len(configs), compiled=STATS['compiled'] + compiled,
                 wait_s=STATS['wait_s'] + time.perf_counter() - started)
    return compiled


class ParallelCompileAutotuner(triton.runtime.Autotuner):
    """Triton's autotuner, whose candidates for a new key are compiled in parallel (:func:`compile_candidates`)
    before it times them one by one."""

    def prune_configs(self, kwargs):
        configs = super().prune_configs(kwargs)
        compile_candidates(self, configs, kwargs)
        return configs


def autotune(**options):
    """``triton.autotune(**options)``, its autotuner a :class:`ParallelCompileAutotuner`."""
    def decorate(fn):
        tuner = triton.autotune(**options)(fn)
        tuner.__class__ = ParallelCompileAutotuner
        return tuner
    return decorate
