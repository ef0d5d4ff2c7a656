"""Shared fixtures: a tiny MSCAN width, a tiny model config, a tiny synthetic LLRGBD on disk and the
settings of a tiny CPU training run."""
import contextlib
import functools
import importlib.util
import os
import subprocess
import sys

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A test-only MSCAN width, far below mscan_t (0.5M instead of 12.7M parameters with the tiny decoder: a
# checkpoint with AdamW state of ~6 MB instead of ~150 MB). Its dims and depths match no real variant,
# so describe_state_dict still tells it apart. Registered only while a test asks for it (fixture
# tiny_mscan), so the real variant list stays as it is for every other test.
TINY_MSCAN = 'mscan_test'
TINY_MSCAN_SPEC = dict(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), drop_path_rate=0.1)
# The same registration as Python source, for the scripts that tests run in child processes (put it at
# the top of the script, so processes spawned from it run it too).
REGISTER_TINY_MSCAN = ('from smmcl.models.mscan import MSCAN_VARIANTS, MSCANSpec\n'
                       f'MSCAN_VARIANTS[{TINY_MSCAN!r}] = lambda: MSCANSpec(**{TINY_MSCAN_SPEC!r})\n')


# The start of a child script that compiles Triton's sm_90 code on the CPU (no GPU): Triton's own compiler,
# through a driver that only gives the target. ``refuse_compiling()`` then makes any compilation in the
# child raise, so that a kernel not found in Triton's cache shows. Run it with :func:`run_compile_only`.
COMPILE_FOR_SM90 = r'''
import triton
from triton.backends.compiler import GPUTarget

from smmcl.kernels import triton_compile
triton.runtime.driver.set_active(triton_compile.CompileOnlyDriver(GPUTarget('cuda', 90, 32)))


def refuse_compiling(message='compiled in the launching process'):
    def compiled_here(*args, **kwargs):
        raise AssertionError(message)
    triton.compiler.compiler.ASTSource.make_ir = compiled_here
'''


def run_compile_only(script, *args, **env) -> subprocess.CompletedProcess:
    """Runs the child ``script`` (a path; ``args`` its arguments) in its folder, without Triton's interpreter
    and with ``env`` added, the repository and the tests on its module path (stdout and stderr captured)."""
    full = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    path = [REPO, os.path.join(REPO, 'tests'), os.environ.get('PYTHONPATH')]
    full.update(TRITON_DEFAULT_FP_FUSION='1', PYTHONPATH=os.pathsep.join(filter(None, path)), **env)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=full,
                          timeout=600, cwd=os.path.dirname(str(script)))


def refuse_kernel_launches(monkeypatch) -> None:
    """Any Triton kernel launched from now on, compiled or interpreted, raises AssertionError naming it."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    def refuse(self, *args, grid, warmup, **kwargs):
        raise AssertionError(f'{self.fn.__name__} ran')
    for launcher in (triton.runtime.JITFunction, InterpretedFunction):
        monkeypatch.setattr(launcher, 'run', refuse)


class StandInProcess:
    """A worker process of :class:`StandInPool`: records whether it was ended."""

    def __init__(self):
        self.terminated = False

    def terminate(self):
        self.terminated = True


class StandInPool:
    """The compile workers' executor (smmcl/kernels/triton_compile.py) without processes: records each job
    (``jobs``: (fn, args)) and reports it done at once, without running it (never, when ``stuck``; refuses
    it, when ``broken``)."""

    def __init__(self, broken=False, stuck=False):
        self.jobs, self.broken, self.stuck, self.shut = [], broken, stuck, False
        self._processes = {1: StandInProcess(), 2: StandInProcess()}  # as ProcessPoolExecutor holds its workers

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


def stand_in_compile_workers(monkeypatch, pool=None) -> 'StandInPool':
    """``pool`` (a new :class:`StandInPool` by default) as smmcl/kernels/triton_compile.py's workers, never
    released when idle; returns it."""
    from smmcl.kernels import triton_compile
    pool = pool or StandInPool()
    monkeypatch.setattr(triton_compile, '_pool', pool)
    monkeypatch.setattr(triton_compile, '_pool_failed', False)
    monkeypatch.setattr(triton_compile, '_release_when_idle', lambda: None)
    return pool


class OpCalls(TorchDispatchMode):
    """The ATen operators run while on, in order: ``calls`` holds (name, args) for each, the name without
    its overload (``_to_copy``, ``_foreach_copy_``)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func.overloadpacket.__name__, args))
        return func(*args, **(kwargs or {}))

    def names(self):
        return [name for name, _ in self.calls]


@contextlib.contextmanager
def interpreter_patches_once_per_launch():
    """Triton's interpreter patches ``triton.language`` for a launch, then again at every call of a
    ``@triton.jit`` helper from inside it (``_patch_lang``: ``inspect.getmembers`` of four modules, ~1 ms
    a call, ~70,000 calls in a whole-model test: a quarter of its time). What a launch patches stays in
    force for all its programs, and what a helper's call patches is never undone (Triton drops its
    scope), so inside a launch a helper call whose modules are already patched skips the patching: the
    same interpreted function. Where Triton's interpreter lacks the names this relies on, nothing
    changes."""
    from triton.runtime import interpreter
    original, launch = getattr(interpreter, '_patch_lang', None), getattr(interpreter, 'GridExecutor', None)
    if original is None or launch is None or not hasattr(interpreter, '_LangPatchScope'):
        yield
        return
    import triton.language as tl
    patched = set()  # the modules patched in the running launch
    running = []  # the launch under way, if any

    @functools.lru_cache(maxsize=None)
    def languages(fn):
        return frozenset(name for name, module in (('tl', tl), ('core', tl.core))
                         if any(value is module for value in fn.__globals__.values()))

    def patch_lang(fn):
        wanted = languages(fn)
        if running and patched and wanted <= patched:
            return interpreter._LangPatchScope()
        scope = original(fn)
        if running:
            patched.update(wanted)
        return scope

    run_grid = launch.__call__

    def run_grid_patching_once(self, *args, **kwargs):
        running.append(self)
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            running.pop()
            patched.clear()

    interpreter._patch_lang, launch.__call__ = patch_lang, run_grid_patching_once
    try:
        yield
    finally:
        interpreter._patch_lang, launch.__call__ = original, run_grid


@functools.lru_cache(maxsize=None)
def bench_script(name: str):
    """The script ``bench/<name>.py`` as a module (``bench/`` is a folder of scripts, not a package),
    loaded once per test process."""
    spec = importlib.util.spec_from_file_location(f'bench_{name}', os.path.join(REPO, 'bench', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):
    """The tests marked ``slow`` run first, each group in its collected order: pytest-xdist hands the
    tests out in order, and a minute-long test drawn last kept one core busy while the other had nothing
    left (the suite's wall time was ~1.3x its CPU time over two). In one process only the order changes."""
    items.sort(key=lambda item: item.get_closest_marker('slow') is None)


@pytest.fixture
def tiny_mscan() -> str:
    """Registers the backbone ``mscan_test`` for this test; returns its name. (A patch of its own, so a
    test's ``monkeypatch.undo()`` keeps it.)"""
    from smmcl.models.mscan import MSCAN_VARIANTS, MSCANSpec
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(MSCAN_VARIANTS, TINY_MSCAN, lambda: MSCANSpec(**TINY_MSCAN_SPEC))
        yield TINY_MSCAN


def tiny_config(**changes):
    """``base_config()`` for a small CPU model: mscan_t, 5 classes, a 32-channel decoder, no ImageNet
    weights; ``changes`` override any key."""
    from smmcl.config import base_config
    cfg = base_config()
    cfg.update(backbone='mscan_t', num_classes=5, pretrained_model=None, decoder_embed_dim=32)
    cfg.update(changes)
    return cfg


# A training run of well under a second per epoch on the CPU: the tiny MSCAN width, a 32-channel
# decoder, 64x96 crops, batch 2 in one chunk (replicas=1; several processes need replicas=2), one
# iteration per epoch, no ImageNet weights. min_views_per_class=1 lets the contrastive terms find anchors
# in the 2x3 cells of stage 4. Child processes need REGISTER_TINY_MSCAN (or backbone=mscan_t).
TINY_TRAINING = dict(
    backbone=TINY_MSCAN, pretrained_model=None, decoder_embed_dim=32, image_height=64, image_width=96,
    batch_size=2, replicas=1, num_train_imgs=4, niters_per_epoch=1, nepochs=2, warm_up_epoch=1, lr=1e-3,
    checkpoint_start_epoch=1, checkpoint_step=1, num_workers=0, deterministic=True,
    min_views_per_class=1, dist_timeout_s=60)


@pytest.fixture(scope='session')
def tiny_llrgbd(tmp_path_factory) -> str:
    """A synthetic LLRGBD folder (4 train, 2 test images of 48x64), written once per session."""
    from smmcl.data.synthetic import generate
    return generate('LLRGBD', str(tmp_path_factory.mktemp('llrgbd')), n_train=4, n_test=2, height=48,
                    width=64, seed=0)


@pytest.fixture
def tiny_training(tiny_llrgbd, tmp_path, tiny_mscan):
    """``tiny_training(**changes)`` -> ``--set`` values for a tiny run on ``tiny_llrgbd`` logging to
    ``tmp_path/log`` (checkpoints in ``tmp_path/log/checkpoint``)."""
    def overrides(**changes):
        values = dict(TINY_TRAINING, dataset_path=tiny_llrgbd, log_dir=str(tmp_path / 'log'))
        values.update(changes)
        return [f'{key}={value}' for key, value in values.items()]
    return overrides


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Training in-process sets process-wide torch switches (deterministic algorithms, cudnn benchmark,
    thread count); put them back so that later tests run as they would alone."""
    import torch
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.get_num_threads())
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]
    torch.set_num_threads(saved[3])
