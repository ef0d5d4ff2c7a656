"""Training end to end on a tiny synthetic LLRGBD (CPU): schedule, outputs, resume, non-finite losses."""
import glob
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from smmcl.engine import train as train_module
from smmcl.engine.checkpoint import LAST, read_checkpoint
from smmcl.engine.lr import WarmUpPolyLR
from smmcl.models.segmentor import EncoderDecoder

from conftest import REPO

CONFIG = os.path.join(REPO, 'SMMCL_LLRGBD', 'config.py')


def checkpoints(log_dir):
    return sorted(os.listdir(os.path.join(log_dir, 'checkpoint')))


def log_text(log_dir):
    return ''.join(open(f).read() for f in sorted(glob.glob(os.path.join(log_dir, 'log_*.log'))))


@pytest.mark.integration
def test_script_trains_on_the_authors_schedule(tiny_training, tmp_path):
    log_dir = str(tmp_path / 'log')
    # The real script in a child process, so the real smallest backbone (mscan_test is registered here only).
    overrides = tiny_training(backbone='mscan_t', nepochs=3, checkpoint_start_epoch=2, checkpoint_step=2,
                              num_workers=1)
    script = os.path.join(REPO, 'SMMCL_LLRGBD', 'train.py')
    result = subprocess.run([sys.executable, script, '--set', *overrides], capture_output=True, text=True,
                            timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    # epoch 2 (start 2, step 2) and the last epoch, 3; epoch-last points at the newest
    assert checkpoints(log_dir) == ['epoch-2.pth', 'epoch-3.pth', LAST]
    assert os.readlink(os.path.join(log_dir, 'checkpoint', LAST)) == 'epoch-3.pth'
    # the authors' TensorBoard layout: tb/<%b%d_%d-%H-%M>/ and the absolute link tb/tb to it
    link = os.path.join(log_dir, 'tb', 'tb')
    assert os.path.isabs(os.readlink(link)) and os.path.dirname(os.readlink(link)) == os.path.join(log_dir, 'tb')
    assert glob.glob(os.path.join(link, 'events.out.tfevents.*'))
    text = log_text(log_dir)
    assert 'effective config:' in text and 'backbone: ' + repr('mscan_t') in text
    losses = [float(line.split(' loss ')[1].split()[0]) for line in text.splitlines() if '/3: loss' in line]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    state = read_checkpoint(os.path.join(log_dir, 'checkpoint', LAST))
    assert (state['epoch'], state['iteration'], state['lr_step'], state['sampler_epoch']) == (3, 0, 3, 3)
    assert all(torch.isfinite(t).all() for t in state['model'].values() if t.is_floating_point())
    # the lr stored is the one set after the last step: lr(lr_step - 1), warm-up 1 epoch of 1 iteration
    policy = WarmUpPolyLR(1e-3, 0.9, 3, 1)
    assert state['optimizer']['param_groups'][0]['lr'] == pytest.approx(policy.get_lr(2), rel=1e-12)


class Interrupted(Exception):
    pass


@pytest.mark.integration
def test_resume_is_bit_identical(tiny_training, tmp_path, monkeypatch):
    """2 epochs straight == 1 epoch, stop, resume from epoch-last.pth, 1 more epoch."""
    # Two persistent loader workers: the crops must not depend on what a worker loaded before.
    straight = tiny_training(log_dir=str(tmp_path / 'straight'), num_workers=2)
    train_module.main(CONFIG, ['--set', *straight])

    save = train_module.save_checkpoint

    def save_then_stop(state, folder):  # the run dies right after writing epoch 1
        save(state, folder)
        raise Interrupted
    monkeypatch.setattr(train_module, 'save_checkpoint', save_then_stop)
    resumed = tiny_training(log_dir=str(tmp_path / 'resumed'), num_workers=2)
    with pytest.raises(Interrupted):
        train_module.main(CONFIG, ['--set', *resumed])
    assert checkpoints(tmp_path / 'resumed') == ['epoch-1.pth', LAST]
    monkeypatch.undo()
    train_module.main(CONFIG, ['-c', str(tmp_path / 'resumed' / 'checkpoint' / LAST), '--set', *resumed])
    assert 'continuing at epoch 2' in log_text(str(tmp_path / 'resumed'))

    a = read_checkpoint(str(tmp_path / 'straight' / 'checkpoint' / 'epoch-2.pth'))
    b = read_checkpoint(str(tmp_path / 'resumed' / 'checkpoint' / 'epoch-2.pth'))
    assert list(a['model']) == list(b['model'])
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    first = read_checkpoint(str(tmp_path / 'straight' / 'checkpoint' / 'epoch-1.pth'))
    assert not all(torch.equal(a['model'][k], first['model'][k]) for k in a['model'])  # it did train
    opt_a, opt_b = a['optimizer']['state'], b['optimizer']['state']
    assert all(torch.equal(opt_a[i][s], opt_b[i][s]) for i in opt_a for s in opt_a[i])
    assert a['optimizer']['param_groups'][0]['lr'] == b['optimizer']['param_groups'][0]['lr']


def test_the_kernels_are_compiled_ahead_of_the_first_step_and_the_first_evaluation(tiny_training, monkeypatch):
    """With ``triton_kernels`` the run compiles them ahead (smmcl/engine/ahead.py): the training step's once,
    for chunks of ``batch_size / replicas``, before the first step; the evaluation's once, before the first
    evaluation during training, on the test set with the model in training mode as it was."""
    from smmcl.engine import watch
    calls = []
    monkeypatch.setattr(train_module, 'compile_ahead_of_training',
                        lambda config, ctx, chunk_size: calls.append(('training', chunk_size)))
    monkeypatch.setattr(watch, 'compile_ahead_of_evaluation',
                        lambda model, dataset, config, ctx: calls.append(('evaluation', len(dataset), model.training)))
    step = train_module.train_step
    monkeypatch.setattr(train_module, 'train_step', lambda *args: (calls.append('step'), step(*args))[1])
    train_module.main(CONFIG, ['--set', *tiny_training(batch_size=4, replicas=2, eval_every_epochs=1)])
    assert calls == [('training', 2), 'step', ('evaluation', 2, True), 'step']


def nan_in(term, at_calls):
    """A forward that makes ``term`` NaN on the given (1-based) training calls; ``term='input'`` feeds
    a NaN image instead, so that everything, BatchNorm statistics included, becomes NaN."""
    forward = EncoderDecoder.forward
    calls = []

    def patched(self, rgb, modal_x, label=None, return_terms=False):
        calls.append(1)
        if term == 'input' and len(calls) in at_calls:
            rgb = rgb * float('nan')
        out = forward(self, rgb, modal_x, label, return_terms)
        if term != 'input' and len(calls) in at_calls:
            out[term] = out[term] * float('nan')
            out['loss'] = out['loss'] + out[term]
        return out
    return patched


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_training, tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setattr(EncoderDecoder, 'forward', nan_in('cm', {2}))
    overrides = tiny_training(nepochs=3)
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(CONFIG, ['--set', *overrides])
    assert exit_info.value.code == 1
    message = 'non-finite loss at epoch 2 iteration 1/1: cm=nan'
    assert message in capsys.readouterr().err
    assert message in log_text(str(tmp_path / 'log'))
    assert checkpoints(tmp_path / 'log') == ['epoch-1.pth', LAST]
    assert read_checkpoint(str(tmp_path / 'log' / 'checkpoint' / LAST))['epoch'] == 1


@pytest.mark.parametrize('term', ['vis', 'input'])
def test_nonfinite_loss_skip_mode_skips_and_counts(tiny_training, tmp_path, monkeypatch, term):
    monkeypatch.setattr(EncoderDecoder, 'forward', nan_in(term, {2, 3}))
    overrides = tiny_training(nonfinite_loss='skip', niters_per_epoch=2, checkpoint_start_epoch=2)
    train_module.main(CONFIG, ['--set', *overrides])
    text = log_text(str(tmp_path / 'log'))
    bad = 'vis=nan' if term == 'vis' else 'ce=nan'
    assert f'non-finite loss at epoch 1 iteration 2/2: {bad}' in text
    assert f'non-finite loss at epoch 2 iteration 1/2: {bad}' in text
    assert text.count('batch skipped (1 this epoch)') == 2
    assert text.count('1 batches skipped (non-finite loss)') == 2
    state = read_checkpoint(str(tmp_path / 'log' / 'checkpoint' / 'epoch-2.pth'))
    assert all(s['step'].item() == 2 for s in state['optimizer']['state'].values())  # 4 batches, 2 skipped
    # weights and BatchNorm statistics stay finite
    assert all(torch.isfinite(t).all() for t in state['model'].values() if t.is_floating_point())


def test_data_and_pretrained_problems_are_one_message(tiny_training, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(CONFIG, ['--set', *tiny_training(dataset_path=str(tmp_path / 'nothing'))])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert 'nothing' in err and 'does not exist' in err and 'Traceback' not in err
    with pytest.raises(SystemExit):
        train_module.main(CONFIG, ['--set', *tiny_training(pretrained_model=str(tmp_path / 'mscan_t.pth'))])
    err = capsys.readouterr().err
    assert 'mscan_t.pth not found' in err and 'Traceback' not in err
    with pytest.raises(SystemExit):
        train_module.main(CONFIG, ['--set', *tiny_training(), 'nepoch=3'])
    assert "did you mean 'nepochs'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused at the start, not at the first non-finite loss
        train_module.main(CONFIG, ['--set', *tiny_training(nonfinite_loss='skp')])
    err = capsys.readouterr().err
    assert "nonfinite_loss='skp': expected one of ('stop', 'skip'); did you mean 'skip'?" in err


@pytest.mark.integration
def test_unreadable_image_in_a_loader_worker_is_one_message(tiny_llrgbd, tiny_training, tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(tiny_llrgbd, data)
    (data / 'train' / 'rgb' / '00001.png').write_bytes(b'not a png')
    with pytest.raises(SystemExit):
        train_module.main(CONFIG, ['--set', *tiny_training(dataset_path=str(data), num_workers=1,
                                                           niters_per_epoch=2)])
    err = capsys.readouterr().err
    assert '00001.png' in err and 'cannot be decoded' in err and 'Traceback' not in err


def test_resume_refuses_another_model(tiny_training, tmp_path, capsys):
    train_module.main(CONFIG, ['--set', *tiny_training(nepochs=1)])
    last = str(tmp_path / 'log' / 'checkpoint' / LAST)
    with pytest.raises(SystemExit):
        train_module.main(CONFIG, ['-c', last, '--set', *tiny_training(num_classes=9, nepochs=3)])
    assert '14 classes (config: 9)' in capsys.readouterr().err


def test_buffer_rollback_restores_batchnorm_statistics_only_when_undone():
    bn = torch.nn.BatchNorm2d(2)
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0)) + 5
    with train_module.BufferRollback(bn, enabled=True) as rollback:
        bn(x)
        rollback.undo = True
    assert torch.equal(bn.running_mean, torch.zeros(2)) and bn.num_batches_tracked.item() == 0
    with train_module.BufferRollback(bn, enabled=True):
        bn(x)
    assert bn.num_batches_tracked.item() == 1 and (bn.running_mean > 0.4).all()
