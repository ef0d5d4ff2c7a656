"""SIGKILL a real training run at bad moments: the checkpoint folder stays usable and resuming works.

The save is slowed down (a pause after the temporary file is written and after the temporary link is
made) so that kills land inside it; one kill is timed to the appearance of a temporary checkpoint, one to
the temporary ``epoch-last`` link, one at a random moment. Updating ``epoch-last.pth`` is the commit
point of a save: a run killed after ``epoch-N.pth`` is complete but before the link moved resumes from
N - 1 and repeats epoch N, which resume exactness makes harmless - the test ends with the weights of an
uninterrupted run.
"""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from smmcl.engine import train as train_module
from smmcl.engine.checkpoint import LAST, is_temp_file, read_checkpoint

from conftest import REGISTER_TINY_MSCAN, REPO

CONFIG = os.path.join(REPO, 'SMMCL_LLRGBD', 'config.py')
SCRIPT = REGISTER_TINY_MSCAN + textwrap.dedent(f'''
    import os, sys, time
    import torch
    from smmcl.engine import train as train_module

    _save, _symlink = torch.save, os.symlink

    def slow_save(*args, **kwargs):  # the temporary file is complete, the rename has not happened
        _save(*args, **kwargs)
        time.sleep(0.4)

    def slow_symlink(*args, **kwargs):  # the temporary link exists, the rename has not happened
        _symlink(*args, **kwargs)
        time.sleep(0.4)
    torch.save, os.symlink = slow_save, slow_symlink

    if __name__ == "__main__":
        train_module.main({CONFIG!r}, sys.argv[1:])
''')
NEPOCHS = 6


def check_folder(folder):
    """Every file is a complete checkpoint or a temporary file; epoch-last names the newest one or the
    one before (killed between the two renames). Returns the epoch of epoch-last (0 when none)."""
    epochs = []
    for name in os.listdir(folder):
        if is_temp_file(name) or name == LAST:
            continue
        state = read_checkpoint(os.path.join(folder, name))
        assert name == f"epoch-{state['epoch']}.pth"
        epochs.append(state['epoch'])
    if not os.path.lexists(os.path.join(folder, LAST)):
        assert epochs in ([], [1])
        return 0
    last = read_checkpoint(os.path.join(folder, LAST))['epoch']
    assert max(epochs) - last in (0, 1)
    return last


def start(tmp_path, overrides, resume):
    script = tmp_path / 'run.py'
    script.write_text(SCRIPT)
    args = [sys.executable, str(script), '--set', *overrides]
    if resume:
        args[2:2] = ['-c', str(tmp_path / 'log' / 'checkpoint' / LAST)]
    out = open(tmp_path / 'out.txt', 'a')
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=str(tmp_path))


def kill_when(proc, condition, timeout=180, must_kill=True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            assert not must_kill, f'the run ended (code {proc.returncode}) before it could be killed'
            assert proc.returncode == 0
            return
        if condition():
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
            return
        time.sleep(0.005)
    proc.kill()
    raise AssertionError('timed out waiting for the moment to kill')


@pytest.mark.integration
@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_resumable_folder(tiny_training, tmp_path):
    folder = tmp_path / 'log' / 'checkpoint'
    overrides = tiny_training(nepochs=NEPOCHS)

    def temp_appears(prefix):
        return lambda: folder.is_dir() and any(is_temp_file(n) and n.startswith(prefix)
                                               for n in os.listdir(folder))

    # 1. killed while epoch 2's temporary file is being written / waiting for its rename
    kill_when(start(tmp_path, overrides, resume=False), temp_appears('.epoch-2.pth.'))
    assert check_folder(str(folder)) == 1
    # 2. resumed, then killed while the link is being moved from epoch 2 to the complete epoch 3
    linking = temp_appears('.epoch-last.pth.')
    kill_when(start(tmp_path, overrides, resume=True),
              lambda: (folder / 'epoch-3.pth').exists() and linking())
    assert check_folder(str(folder)) == 2
    # 3. resumed, then killed at a random moment (on a fast machine the run may finish first)
    proc = start(tmp_path, overrides, resume=True)
    moment = time.monotonic() + random.Random(0).uniform(2.0, 5.0)
    kill_when(proc, lambda: time.monotonic() > moment, must_kill=False)
    done = check_folder(str(folder))
    assert done >= 2
    # 4. -c epoch-last.pth continues from the newest complete checkpoint and finishes
    proc = start(tmp_path, overrides, resume=True)
    assert proc.wait(timeout=300) == 0, (tmp_path / 'out.txt').read_text()[-3000:]
    out = (tmp_path / 'out.txt').read_text()
    assert f'(epoch {done}); continuing at epoch {done + 1}' in out
    assert check_folder(str(folder)) == NEPOCHS
    assert not any(is_temp_file(n) for n in os.listdir(folder))  # leftovers removed at the start
    assert sorted(os.listdir(folder)) == sorted([f'epoch-{e}.pth' for e in range(1, NEPOCHS + 1)] + [LAST])
    # the same weights as a run that was never interrupted
    train_module.main(CONFIG, ['--set', *tiny_training(nepochs=NEPOCHS, log_dir=str(tmp_path / 'straight'),
                                                       checkpoint_start_epoch=NEPOCHS)])
    a = read_checkpoint(str(folder / LAST))['model']
    b = read_checkpoint(str(tmp_path / 'straight' / 'checkpoint' / LAST))['model']
    assert all(torch.equal(a[k], b[k]) for k in a)
