"""Triton's compiled kernels carried from one device call to the next.

    python bench/gpu_check.py --out $OUT ...                 # packs the cache into $OUT after each step
    python bench/gpu_check.py --triton-cache DIR ...         # a later call loads what DIR holds first

Each device call starts on a bare machine, whose Triton cache is empty: its first training step compiles
every autotuning candidate of every kernel it launches (1,506 for the fast path's bench rows, 1-2 s each,
in parallel by smmcl/kernels/triton_compile.py's workers), and a second call (the sweep, or a rerun after a timeout)
would compile them all again. Triton finds a kernel in its cache by a key of the kernel's source, the
launch's specialisation, the compiler's version and options and the target's architecture, so what one
call compiled is found by the next on the same kind of GPU (an H100 and an H200 are both sm_90), and a
kernel whose source changed in between is simply compiled again.

A pack keeps what loading a kernel reads (its metadata, its group file, the cubin) and the launchers
Triton builds per signature (shared objects), not the intermediate representations (ttir, ttgir, llir,
ptx: ~90 % of the cache's bytes). It is split into gzipped tars of at most ``PART_BYTES``, as many as
``MAX_PARTS``, the files a device call may bring back. Triton's group files name their members by absolute
path; :func:`unpack` points them at where the members now are.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import tarfile

KEEP = ('.json', '.cubin', '.so')
PREFIX = 'triton_cache.'
PART_BYTES = 15 * 2 ** 20  # a device call brings back files of at most 16 MiB
MAX_PARTS = 4  # of the 8 files it brings back: the log, the JSON, these, and room to spare
_END_BYTES = 32 * 1024  # what closing a part adds: the tar's end blocks and record padding, gzip's trailer


def folder() -> str:
    """Triton's cache folder in this process (``TRITON_CACHE_DIR``, else ``~/.triton/cache``)."""
    import triton
    knobs = getattr(triton, 'knobs', None)  # Triton >= 3.4
    return knobs.cache.dir if knobs is not None else triton.runtime.cache.default_cache_dir()


def _entries(cache_dir: str):
    """(folder name, the files of it a pack keeps), oldest first: one kernel (or launcher) per folder."""
    found = [e for e in os.scandir(cache_dir) if e.is_dir()] if os.path.isdir(cache_dir) else []
    for entry in sorted(found, key=lambda e: e.stat().st_mtime):  # a pack that is full keeps the first compiled
        names = sorted(n for n in os.listdir(entry.path) if n.endswith(KEEP) and not n.startswith('tmp.')
                       and os.path.isfile(os.path.join(entry.path, n)))
        if names:
            yield entry.name, names


def entries(cache_dir: str) -> set:
    """The cache folders a pack of ``cache_dir`` would hold now."""
    return {name for name, _ in _entries(cache_dir)}


def pack(cache_dir: str, out_dir: str, part_bytes: int = PART_BYTES, max_parts: int = MAX_PARTS) -> dict:
    """Writes ``cache_dir``'s kernels into ``out_dir/triton_cache.<i>.tar.gz`` (replacing earlier parts; each
    written under a temporary name, then renamed). Returns ``{'files', 'folders', 'left', 'bytes'}``: the
    parts written, the cache folders in them and those that did not fit."""
    for old in glob.glob(os.path.join(out_dir, PREFIX + '*')):
        os.remove(old)
    files, parts, folders, left = [], [], 0, 0
    for name, members in _entries(cache_dir):
        # at most what the members add, compressed or not (tar headers and padding, deflate's stored blocks)
        bound = sum(os.path.getsize(os.path.join(cache_dir, name, m)) + 1024 for m in members) + _END_BYTES
        if parts and parts[-1].size + bound > part_bytes and len(files) < max_parts:
            parts.pop().close()  # full: the next part (the last one stays open for smaller entries)
        if not parts and len(files) < max_parts:
            parts.append(_Part(os.path.join(out_dir, f'{PREFIX}{len(files)}.tar.gz')))
            files.append(parts[-1].path)
        if not parts or parts[-1].size + bound > part_bytes:
            left += 1
            continue
        parts[-1].add(cache_dir, name, members)
        folders += 1
    for part in parts:
        part.close()
    return dict(files=files, folders=folders, left=left, bytes=sum(os.path.getsize(f) for f in files))


class _Part:
    """One gzipped tar being written, its size on disk exact after each entry (the compressor flushed)."""

    def __init__(self, path: str):
        self.path = path
        self.raw = open(path + '.tmp', 'wb')
        self.gzip = gzip.GzipFile(fileobj=self.raw, mode='wb', compresslevel=6)  # 9 is 4x slower for 1 % less
        self.tar = tarfile.open(fileobj=self.gzip, mode='w')
        self.size = 0

    def add(self, cache_dir: str, name: str, members) -> None:
        for member in members:
            self.tar.add(os.path.join(cache_dir, name, member), arcname=f'{name}/{member}')
        self.gzip.flush()
        self.size = self.raw.tell()

    def close(self) -> None:
        self.tar.close()
        self.gzip.close()
        self.raw.close()
        os.replace(self.path + '.tmp', self.path)


def archives(sources) -> list:
    """The packs that ``sources`` name: files, or folders whose ``triton_cache.*.tar.gz`` are taken."""
    found = []
    for source in sources:
        if os.path.isdir(source):
            found += sorted(glob.glob(os.path.join(source, PREFIX + '*.tar.gz')))
        elif os.path.isfile(source):
            found.append(source)
        else:
            raise FileNotFoundError(f'--triton-cache: {source} is neither a file nor a folder: pass the folder where '
                                    "a device call's triton_cache.*.tar.gz came back")
    return found


def unpack(sources, cache_dir: str) -> int:
    """Extracts the packs ``sources`` name (:func:`archives`) into ``cache_dir``, Triton's cache folder, and
    points each group file at its members' new place. Returns how many kernels (group files) they held."""
    os.makedirs(cache_dir, exist_ok=True)
    loaded = set()
    for path in archives(sources):
        with tarfile.open(path, 'r:gz') as tar:
            members = tar.getmembers()
            for member in members:  # one level, as pack writes them: nothing lands outside the cache
                parts = member.name.split('/')
                if len(parts) != 2 or '..' in parts or not (member.isfile() or member.isdir()):
                    raise ValueError(f'{path}: {member.name!r} is not a Triton cache entry; not a pack of '
                                     'bench/triton_cache.py')
            # the 'data' filter where this Python has it (3.12, 3.11.4); the check above admits no link or device
            safe = dict(filter='data') if hasattr(tarfile, 'data_filter') else {}
            tar.extractall(cache_dir, members=members, **safe)
        loaded.update(m.name.split('/')[0] for m in members)
    kernels = 0
    for name in loaded:
        for group in glob.glob(os.path.join(cache_dir, name, '__grp__*.json')):
            with open(group) as f:
                children = json.load(f).get('child_paths', {})
            here = {c: os.path.join(os.path.dirname(group), os.path.basename(p)) for c, p in children.items()}
            with open(group, 'w') as f:
                json.dump(dict(child_paths={c: p for c, p in here.items() if os.path.exists(p)}), f)
            kernels += 1
    return kernels
