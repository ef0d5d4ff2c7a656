"""bench/triton_cache.py: what one device call compiled, packed under $OUT, is what the next call's launch loads
instead of compiling (compiled for sm_90 on the CPU, as tests/test_compile.py does)."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import COMPILE_FOR_SM90, bench_script, run_compile_only
from smmcl.config import REPO_ROOT

needs_triton = pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='needs Triton')


@pytest.fixture(scope='module')
def triton_cache():
    return bench_script('triton_cache')


def fake_cache(root, kernels=3, size=1000):
    """A cache folder as Triton writes one: per kernel a folder with its IRs, binary, metadata and a group
    file naming them by absolute path; a launcher's folder; a write in progress."""
    os.makedirs(root)
    for i in range(kernels):
        folder = os.path.join(root, f'hash{i}')
        os.makedirs(folder)
        group = {}
        for ext in ('ttir', 'ttgir', 'llir', 'ptx', 'cubin', 'json', 'source'):
            path = os.path.join(folder, f'kernel{i}.{ext}')
            with open(path, 'wb') as f:
                f.write(os.urandom(size))  # incompressible: the parts' sizes are predictable
            group[f'kernel{i}.{ext}'] = path
        with open(os.path.join(folder, f'__grp__kernel{i}.json'), 'w') as f:
            json.dump(dict(child_paths=group), f)
    os.makedirs(os.path.join(root, 'launcher'))
    with open(os.path.join(root, 'launcher', '__triton_launcher.so'), 'wb') as f:
        f.write(b'ELF')
    os.makedirs(os.path.join(root, 'hash9', 'tmp.pid_1_x'))  # a write in progress: nothing to keep


def test_a_pack_keeps_what_loading_reads_and_unpacking_points_the_groups_at_the_new_place(triton_cache, tmp_path):
    cache, out, fresh = str(tmp_path / 'cache'), str(tmp_path / 'out'), str(tmp_path / 'fresh')
    fake_cache(cache)
    os.makedirs(out)
    open(os.path.join(out, 'triton_cache.7.tar.gz'), 'w').close()  # an earlier step's pack is replaced
    packed = triton_cache.pack(cache, out)
    assert packed['folders'] == 4 and packed['left'] == 0 and len(packed['files']) == 1
    assert sorted(os.listdir(out)) == ['triton_cache.0.tar.gz']
    with tarfile.open(packed['files'][0]) as tar:
        names = sorted(tar.getnames())
    assert names == sorted([f'hash{i}/{n}' for i in range(3) for n in (f'kernel{i}.cubin', f'kernel{i}.json',
                                                                       f'__grp__kernel{i}.json')]
                           + ['launcher/__triton_launcher.so'])
    assert triton_cache.unpack([out], fresh) == 3
    with open(os.path.join(fresh, 'hash1', '__grp__kernel1.json')) as f:
        children = json.load(f)['child_paths']
    assert children == {f'kernel1.{ext}': os.path.join(fresh, 'hash1', f'kernel1.{ext}') for ext in ('cubin', 'json')}
    with open(os.path.join(cache, 'hash1', 'kernel1.cubin'), 'rb') as a, open(children['kernel1.cubin'], 'rb') as b:
        assert a.read() == b.read()


def test_a_pack_is_split_into_parts_under_the_limit_and_says_what_did_not_fit(triton_cache, tmp_path, monkeypatch):
    cache, out = str(tmp_path / 'cache'), str(tmp_path / 'out')
    fake_cache(cache, kernels=5, size=40_000)  # each kernel keeps 80 kB
    os.makedirs(out)
    monkeypatch.setattr(triton_cache, '_END_BYTES', 10_000)
    packed = triton_cache.pack(cache, out, part_bytes=200_000, max_parts=2)
    # two kernels a part (a third would pass 200 kB), two parts: one kernel left; the tiny launcher still fits
    assert len(packed['files']) == 2 and packed['left'] == 1 and packed['folders'] == 5
    assert all(160_000 < os.path.getsize(f) <= 200_000 for f in packed['files'])
    assert triton_cache.unpack([str(p) for p in packed['files']], str(tmp_path / 'fresh')) == 4


def test_loading_refuses_what_is_not_a_pack(triton_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match='--triton-cache: .*missing is neither'):
        triton_cache.unpack([str(tmp_path / 'missing')], str(tmp_path / 'cache'))
    bad = tmp_path / 'triton_cache.0.tar.gz'
    with tarfile.open(bad, 'w:gz') as tar:
        tar.add(__file__, arcname='deep/er/file.py')
    with pytest.raises(ValueError, match='not a Triton cache entry'):
        triton_cache.unpack([str(tmp_path)], str(tmp_path / 'cache'))
    link = tarfile.TarInfo('hash0/kernel.cubin')  # a link out of the cache, at an entry's place
    link.type, link.linkname = tarfile.SYMTYPE, '/etc/passwd'
    with tarfile.open(bad, 'w:gz') as tar:
        tar.addfile(link)
    with pytest.raises(ValueError, match="'hash0/kernel.cubin' is not a Triton cache entry"):
        triton_cache.unpack([str(bad)], str(tmp_path / 'cache'))
    assert not os.path.lexists(tmp_path / 'cache' / 'hash0')


CHILD = COMPILE_FOR_SM90 + r'''
import sys
import torch

from smmcl.kernels.triton_channel import bias_add_kernel as kernel

if sys.argv[1] == 'load':
    refuse_compiling('compiled, not loaded')
y = torch.empty(2, 64, 8, 32, dtype=torch.bfloat16)
bias, out = torch.empty(64), torch.empty_like(y)
config = kernel.configs[0]
kernel.fn.warmup(y, bias, y, out, 2, 64, 8, 32, y.stride(0), y.stride(1), y.stride(3), grid=(1,), EPILOGUE=1,
                 **config.all_kwargs())
print('DONE', sys.argv[1])
'''


@needs_triton
def test_the_next_call_loads_what_the_last_one_compiled(triton_cache, tmp_path):
    """A kernel compiled into one cache folder, packed, and unpacked into another folder (a fresh machine's),
    is loaded there by the launch's own warmup: Triton's compiler is never reached."""
    script = tmp_path / 'child.py'
    script.write_text(CHILD)

    def child(mode, cache):
        return run_compile_only(script, mode, TRITON_CACHE_DIR=cache, SMMCL_TRITON_COMPILE_WORKERS='0')

    first, second, out = str(tmp_path / 'first'), str(tmp_path / 'second'), str(tmp_path / 'out')
    assert 'compiled, not loaded' in child('load', first).stderr  # an empty cache: the check sees a compile
    done = child('compile', first)
    assert done.returncode == 0 and 'DONE compile' in done.stdout, done.stderr[-3000:]
    os.makedirs(out)
    packed = triton_cache.pack(first, out)
    cached = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(first) for f in files)
    assert packed['folders'] >= 1 and packed['bytes'] < cached / 3  # the IRs stay behind
    assert triton_cache.unpack([out], second) == 1
    loaded = child('load', second)
    assert loaded.returncode == 0 and 'DONE load' in loaded.stdout, loaded.stderr[-3000:]


def test_gpu_check_loads_the_packs_into_a_cache_of_its_own_and_goes_on_without_them(triton_cache, tmp_path):
    """``--triton-cache``: loaded before any step, into a fresh cache folder (what a pack of this run then holds is
    this run's); a wrong path is said, and the run goes on compiling."""
    pytest.importorskip('triton')
    cache, packs = str(tmp_path / 'cache'), str(tmp_path / 'packs')
    fake_cache(cache)
    os.makedirs(packs)
    triton_cache.pack(cache, packs)
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_CACHE_DIR'}
    env.update(TRITON_INTERPRET='1', PYTHONPATH=REPO_ROOT, TMPDIR=str(tmp_path))

    def gpu_check(source):
        # --only with no step: the set-up alone, then the (empty) summary
        return subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'bench', 'gpu_check.py'), '--smoke',
                               '--only', 'none', '--out', str(tmp_path / 'out'), '--triton-cache', source],
                              capture_output=True, text=True, env=env, timeout=300)

    run = gpu_check(packs)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f'triton cache: 3 compiled kernels loaded from {packs} into {tmp_path}/smmcl_triton_cache_' in run.stdout
    (own,) = [p for p in os.listdir(tmp_path) if p.startswith('smmcl_triton_cache_')]
    assert sorted(os.listdir(tmp_path / own)) == ['hash0', 'hash1', 'hash2', 'launcher']
    run = gpu_check(str(tmp_path / 'nowhere'))
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'triton cache: nothing loaded, the kernels are compiled here (FileNotFoundError' in run.stdout


@needs_triton
def test_gpu_check_packs_after_a_step_only_what_is_new(triton_cache, tmp_path, monkeypatch, capsys):
    gpu_check = bench_script('gpu_check')
    monkeypatch.setitem(sys.modules, 'triton_cache', triton_cache)  # as gpu_check imports it, from its folder
    cache, out = tmp_path / 'cache', str(tmp_path / 'out')
    fake_cache(str(cache))
    os.makedirs(out)
    monkeypatch.setenv('TRITON_CACHE_DIR', str(cache))
    gpu_check.save_triton_cache(out)
    assert 'triton cache: 4 entries in 1 file(s)' in capsys.readouterr().out
    gpu_check.save_triton_cache(out)  # nothing compiled since: not packed again
    assert capsys.readouterr().out == ''
    os.makedirs(cache / 'launcher2')
    (cache / 'launcher2' / 'cuda_utils.so').write_bytes(b'ELF')
    gpu_check.save_triton_cache(out)
    assert 'triton cache: 5 entries in 1 file(s)' in capsys.readouterr().out
    with tarfile.open(os.path.join(out, 'triton_cache.0.tar.gz')) as tar:
        assert 'launcher2/cuda_utils.so' in tar.getnames()
