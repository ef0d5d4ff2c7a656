"""What a training run shows and keeps: the authors' TensorBoard layout and progress line, a warning
when the contrastive terms never act, resuming with another schedule, and SGD with momentum."""
import logging
import os

import pytest
import torch
from torch import nn

from smmcl.config import ConfigError, base_config, load_config
from smmcl.engine import train as train_module
from smmcl.engine.checkpoint import LAST, read_checkpoint
from smmcl.engine.logging_utils import TERMS, EpochLog
from smmcl.engine.lr import WarmUpPolyLR
from smmcl.engine.optim import build_optimizer

from conftest import REPO

CONFIG = os.path.join(REPO, 'SMMCL_LLRGBD', 'config.py')


class Scalars:
    """A stand-in SummaryWriter that keeps every scalar."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, name, value, step):
        self.scalars.append((name, value, step))


def test_progress_line_shows_the_rate_set_after_the_step_as_the_authors():
    """Their train.py prints lr_policy.get_lr(current_idx) after the step: 0 at the first warm-up step."""
    policy = WarmUpPolyLR(6e-5, 0.9, 1000 * 89, 89 * 10)
    tb = Scalars()
    log = EpochLog(1, 1000, 89, tb)
    log.record(torch.ones(4, len(TERMS), dtype=torch.float64), 0, 0, 6e-5, policy.get_lr(0))
    assert 'Iter 1/89: lr=0.0000e+00 loss=1.0000' in log.progress.desc
    assert ('train/lr', 6e-5, 0) in tb.scalars  # TensorBoard: the rate the step ran with
    log.progress.close()


def test_tensorboard_run_folder_and_link_as_the_authors(tiny_training, tmp_path):
    train_module.main(CONFIG, ['--set', *tiny_training(nepochs=1)])
    tb = tmp_path / 'log' / 'tb'
    runs = [p for p in tb.iterdir() if p.name != 'tb']
    assert len(runs) == 1 and runs[0].is_dir()
    assert os.readlink(tb / 'tb') == str(runs[0])  # absolute, as their Engine.link_tb
    assert any(p.name.startswith('events.out.tfevents') for p in runs[0].iterdir())


def test_an_epoch_without_contrastive_terms_warns(tiny_training, caplog):
    with caplog.at_level(logging.WARNING, logger='smmcl'):
        train_module.main(CONFIG, ['--set', *tiny_training(min_views_per_class=10 ** 6)])
    warnings = [r.getMessage() for r in caplog.records if 'contrastive terms' in r.getMessage()]
    assert [w.split(':')[0] for w in warnings] == ['epoch 1', 'epoch 2']
    assert 'min_views_per_class=1000000' in warnings[0] and 'chunk of 2 image(s)' in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='smmcl'):  # the tiny run finds anchors in epoch 1
        train_module.main(CONFIG, ['--set', *tiny_training(nepochs=1)])
    assert 'cm=0.0000' not in next(r.getMessage() for r in caplog.records if 'epoch 1/1: loss' in r.getMessage())
    assert not [r for r in caplog.records if 'contrastive terms' in r.getMessage()]


def test_resuming_with_another_schedule_says_what_changes(tiny_training, tmp_path, caplog):
    train_module.main(CONFIG, ['--set', *tiny_training(nepochs=1)])
    last = str(tmp_path / 'log' / 'checkpoint' / LAST)
    assert read_checkpoint(last)['config']['nepochs'] == 1
    with caplog.at_level(logging.WARNING, logger='smmcl'):
        train_module.main(CONFIG, ['-c', last, '--set', *tiny_training(nepochs=3, lr=2e-3)])
    message = next(r.getMessage() for r in caplog.records if 'schedule settings' in r.getMessage())
    assert 'nepochs 1 -> 3' in message and 'lr 0.001 -> 0.002' in message
    policy = WarmUpPolyLR(2e-3, 0.9, 3, 1)
    assert f'the one after with {policy.get_lr(1):.4e}' in message


def test_sgdm_is_the_authors_sgd_over_their_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    config = base_config()
    config.update(optimizer='SGDM', lr=0.1, momentum=0.9, weight_decay=0.01)
    optimizer = build_optimizer(model, config)
    assert type(optimizer) is torch.optim.SGD
    assert [(g['momentum'], g['nesterov'], g['dampening'], g['weight_decay']) for g in optimizer.param_groups] \
        == [(0.9, False, 0, 0.01), (0.9, False, 0, 0.0)]
    weight = model[0].weight.detach().clone()
    grad = torch.randn_like(weight)
    for _ in range(2):  # buf = g + wd w; then buf = 0.9 buf + (g + wd w); w -= lr buf
        model[0].weight.grad = grad.clone()
        optimizer.step()
    first = grad + 0.01 * weight
    w1 = weight - 0.1 * first
    expected = w1 - 0.1 * (0.9 * first + grad + 0.01 * w1)
    assert torch.allclose(model[0].weight, expected, atol=1e-7)


def test_sgdm_refuses_the_device_side_skip():
    with pytest.raises(ConfigError, match='optimizer=SGDM with host_sync_every=2'):
        load_config(CONFIG, ['optimizer=SGDM', 'host_sync_every=2'])


@pytest.mark.integration
def test_sgdm_trains_and_resumes_exactly(tiny_training, tmp_path, capsys):
    straight = tiny_training(optimizer='SGDM', log_dir=str(tmp_path / 'straight'))
    train_module.main(CONFIG, ['--set', *straight])
    resumed = tiny_training(optimizer='SGDM', nepochs=1, log_dir=str(tmp_path / 'resumed'))
    train_module.main(CONFIG, ['--set', *resumed])
    first = str(tmp_path / 'resumed' / 'checkpoint' / LAST)
    train_module.main(CONFIG, ['-c', first, '--set', *tiny_training(optimizer='SGDM', log_dir=str(tmp_path / 'resumed'))])
    a = read_checkpoint(str(tmp_path / 'straight' / 'checkpoint' / 'epoch-2.pth'))
    b = read_checkpoint(str(tmp_path / 'resumed' / 'checkpoint' / 'epoch-2.pth'))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    buffers = [s['momentum_buffer'] for s in a['optimizer']['state'].values()]
    assert buffers and all(torch.equal(x['momentum_buffer'], b['optimizer']['state'][i]['momentum_buffer'])
                           for i, x in a['optimizer']['state'].items())
    # an AdamW checkpoint is not resumed by SGDM: one message naming the file and the fix
    adamw = tiny_training(log_dir=str(tmp_path / 'adamw'), nepochs=1)
    train_module.main(CONFIG, ['--set', *adamw])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_module.main(CONFIG, ['-c', str(tmp_path / 'adamw' / 'checkpoint' / LAST), '--set',
                                   *tiny_training(optimizer='SGDM', log_dir=str(tmp_path / 'adamw'))])
    err = capsys.readouterr().err
    assert 'AdamW' in err and '--set optimizer=AdamW' in err and 'Traceback' not in err
