"""Two gloo CPU processes (``--cpu-procs 2``): DDP keeps the ranks identical, each rank's BatchNorm sees
its own images and rank 0's statistics are kept; a failing rank stops all."""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from smmcl.engine.checkpoint import LAST, read_checkpoint

from conftest import REGISTER_TINY_MSCAN, REPO

CONFIG = os.path.join(REPO, 'SMMCL_LLRGBD', 'config.py')

# The patches sit at the top level of the script, so spawned ranks (which re-run the main script as
# __mp_main__ before starting) get them too.
PRELUDE = REGISTER_TINY_MSCAN + textwrap.dedent('''
    import os, signal, sys
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


@pytest.mark.integration
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
    overrides = tiny_training(niters_per_epoch=3, nepochs=1, nonfinite_loss='skip', replicas=2)
    result, _ = run_script(tmp_path, body, ['--cpu-procs', '2', '--set', *overrides])
    assert result.returncode == 0, result.stderr
    assert '2 process(es) on cpu, batch 1 per process' in result.stderr
    assert 'non-finite loss at epoch 1 iteration 2/3: cm=nan on rank 1; batch skipped' in result.stderr
    rank0, rank1 = (torch.load(tmp_path / f'rank{r}.pth', weights_only=True) for r in (0, 1))
    state = read_checkpoint(str(tmp_path / 'log' / 'checkpoint' / LAST))
    assert state['epoch'] == 1 and len(state['rng']) == 2  # every rank's generators, for resuming
    assert all(s['step'].item() == 2 for s in state['optimizer']['state'].values())
    params = [k for k in rank0 if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert all(torch.equal(rank0[k], rank1[k]) for k in params)
    # BatchNorm statistics: DDP broadcasts rank 0's before every forward (per-rank BatchNorm, the
    # authors' DataParallel), so only after the very last forward do they differ; the checkpoint holds
    # rank 0's.
    assert all(torch.equal(rank0[k], state['model'][k]) for k in rank0)


@pytest.mark.integration
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
    # A long collective timeout: ending before the 120-s hang guard is the launcher's doing, not a timeout.
    overrides = tiny_training(niters_per_epoch=2, nepochs=3, dist_timeout_s=600, replicas=2)
    result, _ = run_script(tmp_path, body, ['--cpu-procs', '2', '--set', *overrides], timeout=120)
    assert result.returncode == 1
    expected = 'terminated with signal SIGKILL' if fault == 'kill' else 'injected failure on rank 1'
    assert expected in result.stderr and 'the other processes were stopped too' in result.stderr
    assert not os.path.exists(tmp_path / 'log' / 'checkpoint' / 'epoch-1.pth')


@pytest.mark.integration
def test_each_rank_normalises_its_own_images_and_rank_0_keeps_the_statistics(tiny_training, tmp_path):
    """The authors' -d 0-3 (DataParallel over plain BatchNorm) on two gloo ranks: every BatchNorm update
    uses the rank's own images only, both ranks start each forward from rank 0's running statistics,
    and the checkpoint holds rank 0's."""
    body = f'''
        from torch import nn
        _build = train_module.build_model
        records = []

        def build_and_watch(config, ctx):  # hooks on the first BatchNorm (stem of the RGB branch)
            model = _build(config, ctx)
            name, bn = next((n, m) for n, m in model.named_modules()
                            if isinstance(m, nn.modules.batchnorm._BatchNorm))
            kinds = {{type(m).__name__ for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm)}}

            def before(module, inputs):
                x = inputs[0].detach().double()
                records.append(dict(name=name, kinds=kinds, momentum=module.momentum,
                                    own_mean=x.mean((0, 2, 3)), own_var=x.var((0, 2, 3), correction=1),
                                    mean_before=module.running_mean.clone(),
                                    var_before=module.running_var.clone()))

            def after(module, inputs, output):
                records[-1].update(mean_after=module.running_mean.clone(),
                                   var_after=module.running_var.clone())
            bn.register_forward_pre_hook(before)
            bn.register_forward_hook(after)
            return model

        def save_records(ctx, config, resume=None):
            model = _train(ctx, config, resume)
            torch.save(records, os.path.join({str(tmp_path)!r}, f'bn{{ctx.rank}}.pth'))
            return model
        _train = train_module.train
        train_module.build_model, train_module.train = build_and_watch, save_records
    '''
    overrides = tiny_training(niters_per_epoch=2, nepochs=1, replicas=2)
    result, _ = run_script(tmp_path, body, ['--cpu-procs', '2', '--set', *overrides])
    assert result.returncode == 0, result.stderr
    ranks = [torch.load(tmp_path / f'bn{r}.pth', weights_only=False) for r in (0, 1)]
    assert [len(r) for r in ranks] == [2, 2]
    assert ranks[0][0]['kinds'] == {'BatchNorm2d'}  # no SyncBatchNorm anywhere by default
    m = ranks[0][0]['momentum']
    for step in range(2):
        own = [ranks[r][step] for r in (0, 1)]
        for rec in own:  # this rank's update = its running statistics moved towards its own batch's
            assert torch.allclose(rec['mean_after'].double(), (1 - m) * rec['mean_before'].double()
                                  + m * rec['own_mean'], atol=1e-5, rtol=0)
            assert torch.allclose(rec['var_after'].double(), (1 - m) * rec['var_before'].double()
                                  + m * rec['own_var'], atol=1e-5, rtol=1e-4)
        # The ranks saw different images, so statistics over both would have moved them elsewhere.
        pooled = (own[0]['own_mean'] + own[1]['own_mean']) / 2
        assert (m * (own[0]['own_mean'] - pooled)).abs().max() > 1e-3
        # Both ranks start from rank 0's statistics (DDP's broadcast = DataParallel's GPU-0 buffers).
        expected_start = ranks[0][step - 1]['mean_after'] if step else ranks[0][0]['mean_before']
        assert all(torch.equal(rec['mean_before'], expected_start) for rec in own)
    assert not torch.allclose(ranks[0][-1]['mean_after'], ranks[1][-1]['mean_after'])
    saved = read_checkpoint(str(tmp_path / 'log' / 'checkpoint' / LAST))['model']
    name = ranks[0][0]['name']
    assert torch.equal(saved[f'{name}.running_mean'], ranks[0][-1]['mean_after'])
    assert torch.equal(saved[f'{name}.running_var'], ranks[0][-1]['var_after'])


@pytest.mark.parametrize('sync_bn,device,world_size,expected', [
    (False, 'cuda', 4, torch.nn.BatchNorm2d),  # the default on several GPUs too: the authors' DataParallel
    (False, 'cpu', 2, torch.nn.BatchNorm2d),
    (True, 'cuda', 4, torch.nn.SyncBatchNorm),
    (True, 'cuda', 1, torch.nn.BatchNorm2d),  # one process: its batch is the whole batch
    (True, 'cpu', 1, torch.nn.BatchNorm2d),
])
def test_batchnorm_class_follows_sync_bn(sync_bn, device, world_size, expected):
    from smmcl.config import base_config
    from smmcl.engine.dist import DistContext
    from smmcl.engine.train import norm_layer_for
    config = base_config()
    config.sync_bn = sync_bn
    ctx = DistContext(rank=0, world_size=world_size, device=torch.device(device, 0))
    assert norm_layer_for(config, ctx) is expected


def test_sync_bn_on_cpu_ranks_is_refused():
    from smmcl.config import base_config
    from smmcl.engine.dist import DistContext
    from smmcl.engine.train import norm_layer_for
    config = base_config()
    config.sync_bn = True
    with pytest.raises(ValueError, match='SyncBatchNorm has no CPU kernel.*--set sync_bn=False'):
        norm_layer_for(config, DistContext(rank=0, world_size=2, device=torch.device('cpu')))


def test_ranks_leave_the_group_together_but_not_after_a_failure(monkeypatch):
    """After the work every rank waits for the others before tearing the group down (a rank leaving while
    rank 0 still wrote its checkpoint was seen to abort in gloo's teardown); after an exception it leaves
    at once, as the other ranks may never arrive."""
    from smmcl.engine import dist as dist_module
    calls = []
    monkeypatch.setattr(dist_module, 'init_from_env', lambda devices, timeout_s: 'ctx')
    monkeypatch.setattr(dist_module.dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist_module.dist, 'barrier', lambda: calls.append('barrier'))
    monkeypatch.setattr(dist_module.dist, 'destroy_process_group', lambda: calls.append('destroy'))
    dist_module._run_in_group(lambda ctx: calls.append(ctx), [], 60, ())
    assert calls == ['ctx', 'barrier', 'destroy']

    def fails(ctx):
        raise RuntimeError('rank failed')
    calls.clear()
    with pytest.raises(RuntimeError, match='rank failed'):
        dist_module._run_in_group(fails, [], 60, ())
    assert calls == ['destroy']
