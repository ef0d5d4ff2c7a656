"""Surviving the cluster: iteration checkpoints, ``-c auto``, resuming in the middle of an epoch, and
torch's elastic agent restarting a run whose rank was killed."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from smmcl.engine import train as train_module
from smmcl.engine.checkpoint import (LAST, latest_checkpoint, read_checkpoint, save_checkpoint,
                                     save_iteration_checkpoint)

from conftest import REGISTER_TINY_MSCAN, REPO

CONFIG = os.path.join(REPO, 'SMMCL_LLRGBD', 'config.py')


def touch(folder, *names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        open(os.path.join(folder, name), 'w').close()


def test_auto_picks_the_newest_complete_checkpoint(tmp_path):
    folder = str(tmp_path)
    assert latest_checkpoint(folder, niters=3) is None  # nothing yet: start fresh
    assert latest_checkpoint(str(tmp_path / 'absent'), niters=3) is None
    touch(folder, 'epoch-1.pth', '.iter-9.pth.0a1b.tmp', '.epoch-3.pth.0a1b.tmp')  # temp files never count
    os.symlink('epoch-1.pth', os.path.join(folder, LAST))
    assert latest_checkpoint(folder, niters=3) == os.path.join(folder, 'epoch-1.pth')
    touch(folder, 'iter-5.pth')  # 5 iterations > epoch 1 = 3
    assert latest_checkpoint(folder, niters=3) == os.path.join(folder, 'iter-5.pth')
    touch(folder, 'epoch-2.pth')  # 6 > 5
    assert latest_checkpoint(folder, niters=3) == os.path.join(folder, 'epoch-2.pth')
    touch(folder, 'iter-6.pth')  # a tie: the epoch checkpoint
    assert latest_checkpoint(folder, niters=3) == os.path.join(folder, 'epoch-2.pth')


def test_only_the_newest_iteration_checkpoint_is_kept(tmp_path):
    folder = str(tmp_path)
    save_iteration_checkpoint({'lr_step': 2}, folder)
    save_iteration_checkpoint({'lr_step': 4}, folder)
    assert sorted(os.listdir(folder)) == ['iter-4.pth']
    save_checkpoint({'epoch': 2, 'lr_step': 6}, folder)  # an epoch checkpoint supersedes it
    assert sorted(os.listdir(folder)) == ['epoch-2.pth', LAST]


def test_torchrun_restarts_over_a_shared_store_are_warned_about(monkeypatch):
    from smmcl.engine.dist import warn_shared_elastic_store
    monkeypatch.setenv('TORCHELASTIC_MAX_RESTARTS', '2')
    monkeypatch.setenv('TORCHELASTIC_USE_AGENT_STORE', 'True')
    with pytest.warns(UserWarning, match='TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1'):
        warn_shared_elastic_store(rank=0)
    monkeypatch.setenv('TORCHELASTIC_USE_AGENT_STORE', 'False')  # what that variable makes torchrun set
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        warn_shared_elastic_store(rank=0)


class Interrupted(Exception):
    pass


def test_resuming_in_the_middle_of_an_epoch_is_exact(tiny_training, tmp_path, monkeypatch, caplog):
    """Two chunks a step, 3 iterations an epoch, an iteration checkpoint every 2: the run dies after
    writing iter-2 (inside epoch 1); -c auto continues with the third batch of epoch 1's order and ends
    where the uninterrupted run ends, bit for bit (weights, BatchNorm statistics, AdamW moments, lr)."""
    run = dict(batch_size=2, replicas=2, niters_per_epoch=3, nepochs=2, checkpoint_every_iters=2)
    straight = str(tmp_path / 'straight')
    train_module.main(CONFIG, ['--set', *tiny_training(log_dir=straight, **run)])
    assert sorted(os.listdir(os.path.join(straight, 'checkpoint'))) == ['epoch-1.pth', 'epoch-2.pth', LAST]

    save = train_module.save_iteration_checkpoint

    def save_then_stop(state, folder):
        save(state, folder)
        raise Interrupted
    monkeypatch.setattr(train_module, 'save_iteration_checkpoint', save_then_stop)
    resumed = tiny_training(log_dir=str(tmp_path / 'resumed'), **run)
    with pytest.raises(Interrupted):
        train_module.main(CONFIG, ['-c', 'auto', '--set', *resumed])
    folder = tmp_path / 'resumed' / 'checkpoint'
    assert sorted(os.listdir(folder)) == ['iter-2.pth']
    state = read_checkpoint(str(folder / 'iter-2.pth'))
    assert (state['epoch'], state['next_iteration'], state['lr_step'], state['iteration']) == (0, 2, 2, 1)
    monkeypatch.undo()
    train_module.main(CONFIG, ['-c', 'auto', '--set', *resumed])
    assert '(epoch 0 and 2 iterations of epoch 1); continuing at epoch 1 iteration 3/3' in caplog.text
    assert sorted(os.listdir(folder)) == ['epoch-1.pth', 'epoch-2.pth', LAST]

    a = read_checkpoint(os.path.join(straight, 'checkpoint', 'epoch-2.pth'))
    b = read_checkpoint(str(folder / 'epoch-2.pth'))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    opt_a, opt_b = a['optimizer']['state'], b['optimizer']['state']
    assert all(torch.equal(opt_a[i][s], opt_b[i][s]) for i in opt_a for s in opt_a[i])
    assert a['optimizer']['param_groups'][0]['lr'] == b['optimizer']['param_groups'][0]['lr']


# Rank 1 SIGKILLs itself at the start of global step KILL_AT, once (the marker file says it happened).
KILLED_RUN = REGISTER_TINY_MSCAN + textwrap.dedent('''
    import os, signal, sys
    from smmcl.engine import train as train_module

    MARKER, KILL_AT = sys.argv[1], int(sys.argv[2])
    _step = train_module.train_step

    def train_step(loop, batch, step):
        if step == KILL_AT and loop.ctx.rank == 1 and not os.path.exists(MARKER):
            open(MARKER, 'w').close()
            os.kill(os.getpid(), signal.SIGKILL)
        return _step(loop, batch, step)
    train_module.train_step = train_step

    if __name__ == "__main__":
        train_module.main(%r, sys.argv[3:])
''' % CONFIG)


@pytest.mark.integration
@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_the_run_ends_as_uninterrupted(tiny_training, tmp_path):
    """torchrun --max-restarts=1, two CPU ranks, -c auto, an iteration checkpoint every 2 of 6
    iterations: rank 1 is killed at step 4 (epoch 2, after iter-4 was written); the agent restarts both
    ranks, which continue from iter-4 in the middle of epoch 2 and finish by themselves, with the weights
    of the same two-process run uninterrupted."""
    script = tmp_path / 'run.py'
    script.write_text(KILLED_RUN)
    run = dict(batch_size=2, replicas=2, niters_per_epoch=3, nepochs=2, checkpoint_every_iters=2)
    marker = str(tmp_path / 'killed')
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node=2',
              '--max-restarts=1', str(script), marker, '5', '-c', 'auto', '--set']
    # Without it, torch's agent keeps one TCPStore across restarts and a restarted rank can read the
    # killed attempt's addresses (pytorch/pytorch#135712); the torchrun commands of docs/multi-gpu.md set it too.
    env = dict(os.environ, OMP_NUM_THREADS='1', TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1')
    result = subprocess.run(launch + tiny_training(log_dir=str(tmp_path / 'killed_run'), **run),
                            capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    assert os.path.exists(marker)  # rank 1 was killed once
    assert 'no checkpoint in' in result.stderr and 'starting fresh' in result.stderr
    assert 'iter-4.pth (epoch 1 and 1 iterations of epoch 2); continuing at epoch 2 iteration 2/3' \
        in result.stderr
    folder = tmp_path / 'killed_run' / 'checkpoint'
    assert sorted(os.listdir(folder)) == ['epoch-1.pth', 'epoch-2.pth', LAST]

    # The same two processes, not killed (the marker exists), started by mp.spawn.
    uninterrupted = str(tmp_path / 'uninterrupted')
    result = subprocess.run([sys.executable, str(script), marker, '5', '--cpu-procs', '2', '--set',
                             *tiny_training(log_dir=uninterrupted, **run)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    a = read_checkpoint(str(folder / LAST))
    b = read_checkpoint(os.path.join(uninterrupted, 'checkpoint', LAST))
    assert a['epoch'] == b['epoch'] == 2
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
