"""Two gloo CPU processes (``--cpu-procs 2``): DDP keeps the ranks identical; a failing rank stops all."""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from smmcl.engine.checkpoint import LAST, load_checkpoint

from conftest import REPO

CONFIG = os.path.join(REPO, 'SMMCL_LLRGBD', 'config.py')

# The patches sit at the top level of the script, so spawned ranks (which re-run the main script as
# __mp_main__ before starting) get them too.
PRELUDE = textwrap.dedent(f'''
    import os, signal, sys
    sys.path.insert(0, {REPO!r})
    import torch
    from smmcl.engine import train as train_module
    from smmcl.models.segmentor import EncoderDecoder
''')
MAIN = f'\nif __name__ == "__main__":\n    train_module.main({CONFIG!r}, sys.argv[1:])\n'


def run_script(tmp_path, body, args, timeout=300):
    script = tmp_path / 'run.py'
    script.write_text(PRELUDE + textwrap.dedent(body) + MAIN)
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                            timeout=timeout, cwd=str(tmp_path))
    return result, time.monotonic() - start


def test_two_ranks_end_with_identical_weights(tiny_training, tmp_path):
    """Three iterations; in the second only rank 1's loss is NaN and with nonfinite_loss=skip both
    ranks skip it together."""
    body = f'''
        _train, _forward = train_module.train, EncoderDecoder.forward
        calls = []

        def train_and_dump(ctx, config, resume=None):  # each rank writes its final weights
            model = _train(ctx, config, resume)
            torch.save(model.state_dict(), os.path.join({str(tmp_path)!r}, f'rank{{ctx.rank}}.pth'))
            return model

        def forward(self, *args, **kwargs):
            out = _forward(self, *args, **kwargs)
            calls.append(1)
            if os.environ.get('RANK') == '1' and len(calls) == 2:
                out['cm'] = out['cm'] * float('nan')
                out['loss'] = out['loss'] + out['cm']
            return out
        train_module.train, EncoderDecoder.forward = train_and_dump, forward
    '''
    overrides = tiny_training(niters_per_epoch=3, nepochs=1, nonfinite_loss='skip')
    result, _ = run_script(tmp_path, body, ['--cpu-procs', '2', '--set', *overrides])
    assert result.returncode == 0, result.stderr
    assert '2 process(es) on cpu, batch 1 per process' in result.stderr
    assert 'non-finite loss at epoch 1 iteration 2/3: cm=nan on rank 1; batch skipped' in result.stderr
    rank0, rank1 = (torch.load(tmp_path / f'rank{r}.pth', weights_only=True) for r in (0, 1))
    state = load_checkpoint(str(tmp_path / 'log' / 'checkpoint' / LAST))
    assert state['epoch'] == 1 and len(state['rng']) == 2  # every rank's generators, for resuming
    assert all(s['step'].item() == 2 for s in state['optimizer']['state'].values())
    params = [k for k in rank0 if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert all(torch.equal(rank0[k], rank1[k]) for k in params)
    # BatchNorm statistics: DDP broadcasts rank 0's before every forward (SyncBatchNorm has no CPU
    # kernel), so only after the very last forward do they differ; the checkpoint holds rank 0's.
    assert all(torch.equal(rank0[k], state['model'][k]) for k in rank0)


@pytest.mark.parametrize('fault', ['kill', 'raise'])
def test_a_failing_rank_stops_the_other_promptly(tiny_training, tmp_path, fault):
    action = ('os.kill(os.getpid(), signal.SIGKILL)' if fault == 'kill'
              else 'raise RuntimeError("injected failure on rank 1")')
    body = f'''
        _forward = EncoderDecoder.forward
        calls = []

        def forward(self, *args, **kwargs):  # rank 1 fails in its second training iteration
            calls.append(1)
            if os.environ.get('RANK') == '1' and len(calls) == 2:
                {action}
            return _forward(self, *args, **kwargs)
        EncoderDecoder.forward = forward
    '''
    # A long collective timeout: ending within the bound below is the launcher's doing, not a timeout.
    overrides = tiny_training(niters_per_epoch=2, nepochs=3, dist_timeout_s=600)
    result, seconds = run_script(tmp_path, body, ['--cpu-procs', '2', '--set', *overrides])
    assert result.returncode == 1
    assert seconds < 120
    expected = 'terminated with signal SIGKILL' if fault == 'kill' else 'injected failure on rank 1'
    assert expected in result.stderr and 'the other processes were stopped too' in result.stderr
    assert not os.path.exists(tmp_path / 'log' / 'checkpoint' / 'epoch-1.pth')
