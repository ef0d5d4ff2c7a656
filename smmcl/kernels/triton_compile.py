"""Autotuning whose candidates are compiled in parallel processes before they are timed.

Triton's autotuner compiles each candidate configuration when it first times it, one after the other in
the launching process: 1-2 s a candidate for sm_90 on this project's CPUs, most of it Triton's code
generation in Python, which holds the GIL (threads would not help). The fast path's training step in both
layouts and its inference forward under bf16 autocast meet 1,506 (kernel, specialisation, candidate)
compilations (for sm_90, MSCAN-T at 64x64: each shape's ``auto`` choice times every kernel family and
weight-gradient strategy that applies, each with its candidates), so a first step on a fresh machine would
spend most of an hour compiling, serially.

:func:`autotune` is ``triton.autotune`` whose autotuner, when a new key (shape) comes, first hands all of
that key's candidates to a pool of worker processes. Each compiles one through the kernel's own
``JITFunction.warmup`` (Triton's specialisation of the launch's arguments, its options, its cache key)
into Triton's on-disk cache, which the timing then reads instead of compiling. The compiled kernels are
the ones the launch would compile itself (the same cache key); a candidate a worker cannot compile is
compiled, or refused, by the launch as before. The workers are forked, as PyTorch's DataLoader workers
are: a spawned process would import the user's script again and run whatever it does without a
``__main__`` guard, a training included. They only compile, through a driver that gives the GPU's target
and nothing else: they never call CUDA (a forked process must not) and hold no GPU memory.

A shape's candidates keep only as many workers busy, one shape after another. :func:`compile_ahead` runs
passes (a training step, a forward) in which every launch hands its compilations over instead of running,
so that the workers compile everything the passes meet at once, each of Triton's specialisations once.

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
from typing import Optional, Tuple

import triton
from triton.runtime.jit import MockTensor, create_function_from_signature

from .triton_common import AHEAD, INTERPRETED

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
    """In a worker: compile the kernel ``module.name`` (autotuned or not) for these (positional) arguments
    and keyword arguments (the launch's constexprs and one candidate's), into Triton's cache."""
    kernel = getattr(importlib.import_module(module), name)
    _jit(kernel).warmup(*args, grid=(1,), **kwargs)


def _jit(kernel) -> triton.runtime.JITFunction:
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


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


def _jobs(function, args, kwargs: dict, configs) -> list:
    """The workers' jobs for a launch of the kernel of the Python ``function`` with these positional
    arguments and keywords: one ``(module, name, args, kwargs)`` per candidate in ``configs`` (None: the
    kernel is not autotuned)."""
    args = [_picklable(v) for v in args]
    # a launch ``kernel[grid](...)`` reaches the autotuner with the grid and Triton's warmup flag among its
    # keywords: the launch's, not the kernel's (a grid callable would not even pickle), so not the workers'
    constexprs = {k: _picklable(v) for k, v in kwargs.items() if k not in _LAUNCH_KEYWORDS}
    return [(function.__module__, function.__name__, args,
             constexprs if config is None else dict(constexprs, **config.all_kwargs())) for config in configs]


def _abandon_pool(err: Exception, what: str) -> None:
    """No workers again in this process (one died or hung, or no child process may start here, as in a
    daemon): the launches compile ``what`` themselves."""
    global _pool, _pool_failed
    broken, _pool, _pool_failed = _pool, None, True
    if broken is not None:
        end_pool(broken)
    warnings.warn(f'smmcl.kernels: no compile workers ({type(err).__name__}: {err}); Triton compiles {what} in '
                  'this process')


def _count(jobs: list, started: float) -> int:
    """How many of ``jobs`` (done) compiled, added to :data:`STATS` with the time since ``started``. A candidate
    that fails here (out of resources, a compile-time assertion) fails the launch's compile too, where the
    autotuner sets it aside as it always does."""
    compiled = sum(1 for job in jobs if job.exception() is None)
    STATS.update(candidates=STATS['candidates'] + len(jobs), compiled=STATS['compiled'] + compiled,
                 wait_s=STATS['wait_s'] + time.perf_counter() - started)
    return compiled


def compile_candidates(tuner, configs, kwargs: dict, executor: Optional[concurrent.futures.Executor] = None) -> int:
    """Compiles ``configs`` of the autotuner ``tuner`` for the launch it is tuning (``tuner.nargs``, the
    positional arguments by name, and ``kwargs``) in ``executor`` (else :func:`compile_pool`), and waits.
    Returns how many compiled."""
    if len(configs) < 2:
        return 0
    started = time.perf_counter()
    with _lock:
        try:
            pool = executor or compile_pool()
            if pool is None:
                return 0
            jobs = [pool.submit(compile_candidate, *job)
                    for job in _jobs(tuner.base_fn, tuner.nargs.values(), kwargs, configs)]
            done, waiting = concurrent.futures.wait(jobs, timeout=_WAIT_S)
            if waiting:
                raise TimeoutError(f'{len(waiting)} of {len(jobs)} candidates not compiled after {_WAIT_S} s')
        except Exception as err:  # noqa: BLE001 - a worker died or hung, or no child process may start here
            if executor is None:
                _abandon_pool(err, 'the autotuning candidates')
            return 0
    if executor is None:
        _release_when_idle()
    return _count(jobs, started)


_BINDERS: dict = {}  # JITFunction -> Triton's binder of its launch arguments, for the current target


def _specialisation(kernel, args, kwargs: dict):
    """What Triton keys a compiled ``kernel`` on, for these launch arguments and keywords (constexprs and
    options): its launch's own binder (argument types, 16-byte alignment, divisibility by 16, ints equal
    to 1, constexprs, options), for the current target; where this Triton's binder cannot be reached, an
    object equal only to itself (then nothing is taken for the same compilation)."""
    jit = _jit(kernel)
    try:
        binder = _BINDERS.get(jit)
        if binder is None:
            backend = triton.compiler.make_backend(triton.runtime.driver.active.get_current_target())
            binder = _BINDERS[jit] = create_function_from_signature(jit.signature, jit.params, backend)
        _, specialization, options = binder(*args, **kwargs)
        return f'{jit.fn.__module__}.{jit.fn.__name__}{specialization}{options}'
    except Exception:  # noqa: BLE001 - another Triton's internals: each launch's compilation counts as new
        return object()


class _Collector:
    """:func:`compile_ahead`'s: hands each launch's compilations to the workers at once, each of Triton's
    specialisations once (the ``seen`` ones: what a kernel compiles for a 120 x 160 map it also runs on a
    60 x 80 one); of these only every ``parts``-th from the ``part``-th (0-based), in the order they come."""

    def __init__(self, pool: concurrent.futures.Executor, part: int = 0, parts: int = 1):
        self.pool, self.jobs, self.seen, self.error = pool, [], set(), None
        self.part, self.parts = part, parts

    def __call__(self, kernel, args, kwargs: dict, configs=(None,)) -> None:
        for job in _jobs(_jit(kernel).fn, args, kwargs, configs):
            key = _specialisation(kernel, job[2], job[3])
            if key in self.seen or self.error is not None:
                continue
            self.seen.add(key)
            if (len(self.seen) - 1) % self.parts != self.part:
                continue  # another process's share
            try:
                self.jobs.append(self.pool.submit(compile_candidate, *job))
            except Exception as err:  # noqa: BLE001 - a worker died: the passes go on, nothing handed over
                self.error = err


def compile_ahead(*passes, share: Tuple[int, int] = (0, 1)) -> Optional[dict]:
    """Compiles, in the worker processes and all at once, every Triton kernel that ``passes`` would launch.

    Each of ``passes`` (a callable: a training step, a forward, on the GPU) runs with every Triton launch
    handing its compilations to the workers instead of running: all candidates of an autotuned kernel,
    each of Triton's specialisations once; no kernel runs, no implementation is timed or chosen
    (``smmcl.kernels.triton_common.fastest`` launches each). The launches that follow, their autotuning
    included, find these kernels in Triton's cache; without this each new shape compiles its 4-14
    candidates when it first comes, a shape at a time, with most of the workers idle. What the kernels
    would have written stays as allocated: a pass is for this and nothing else (its model thrown away).

    ``share=(part, parts)``: the ``part``-th (0-based) of ``parts`` shares, the processes of one machine each
    running the same passes (the same compilations, in the same order) and compiling one into their cache.

    Returns ``dict(compilations=, compiled=, seconds=)``, or None without workers (the kernels interpreted,
    ``SMMCL_TRITON_COMPILE_WORKERS`` below 2, the pool broken earlier): then no pass runs.
    """
    if not 0 <= share[0] < share[1]:
        raise ValueError(f'share={share}: the part must be in 0..{share[1] - 1}')
    pool = compile_pool()
    if pool is None:
        return None
    if _idle_timer is not None:  # the idle release must not end the workers under the passes
        _idle_timer.cancel()
    started = time.perf_counter()
    collector = _Collector(pool, *share)
    AHEAD.append(collector)
    try:
        for run in passes:
            run()
    finally:
        AHEAD.remove(collector)
    waited = time.perf_counter()  # the workers compiled while the passes ran; from here this process waits
    with _lock:
        try:
            if collector.error is not None:
                raise collector.error
            waiting = set(collector.jobs)
            while waiting:  # a pool that makes no progress for _WAIT_S has a stuck worker
                done, waiting = concurrent.futures.wait(waiting, timeout=_WAIT_S,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
                if not done:
                    raise TimeoutError(f'{len(waiting)} of {len(collector.jobs)} compilations not done, none '
                                       f'finished in {_WAIT_S} s')
        except Exception as err:  # noqa: BLE001 - a worker died or hung
            _abandon_pool(err, 'its kernels')
            return None
    _release_when_idle()
    return dict(compilations=len(collector.jobs), compiled=_count(collector.jobs, waited),
                seconds=time.perf_counter() - started)


class ParallelCompileAutotuner(triton.runtime.Autotuner):
    """Triton's autotuner, whose candidates for a new key are compiled in parallel (:func:`compile_candidates`)
    before it times them one by one."""

    def prune_configs(self, kwargs):
        configs = super().prune_configs(kwargs)
        compile_candidates(self, configs, kwargs)
        return configs

    def run(self, *args, **kwargs):
        if not AHEAD:
            return super().run(*args, **kwargs)
        # compiling ahead: every candidate the pruning keeps goes to the collector, none is timed or run
        self.nargs = dict(zip(self.arg_names, args))  # what the pruning reads, as Triton's run sets it
        try:
            configs = triton.runtime.Autotuner.prune_configs(self, kwargs)
            if callable(kwargs.get('grid')):  # asked as a launch asks it: a caller may read the tile from it
                kwargs['grid']({**self.nargs, **kwargs, **configs[0].all_kwargs()})
            AHEAD[-1](self, args, kwargs, configs)
        finally:
            self.nargs = None


def autotune(**options):
    """``triton.autotune(**options)``, its autotuner a :class:`ParallelCompileAutotuner`."""
    def decorate(fn):
        tuner = triton.autotune(**options)(fn)
        tuner.__class__ = ParallelCompileAutotuner
        return tuner
    return decorate
