"""Checkpoints: atomic writes, the authors' format, refusing other models, optimizer groups, RNG states."""
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from smmcl.config import base_config, stored_config
from smmcl.engine.checkpoint import (LAST, SCHEDULE_KEYS, CheckpointError, atomic_save, is_temp_file, model_state,
                                     read_checkpoint, remove_stale_temp_files, restore_training_state,
                                     save_checkpoint, should_save, training_state)
from smmcl.engine.optim import build_optimizer, group_weight
from smmcl.engine.seeding import rng_state, set_rng_state
from smmcl.models import build_segmentor

from conftest import tiny_config


@pytest.fixture(scope='module')
def model_and_optimizer():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_segmentor(cfg, with_loss=True)
    return cfg, model, build_optimizer(model, cfg)


def state_of(cfg, model, optimizer, epoch):
    return training_state(model, optimizer, epoch, 0, epoch, [rng_state()], cfg)


def test_authors_keys_and_our_extras(model_and_optimizer, tmp_path):
    cfg, model, optimizer = model_and_optimizer
    path = save_checkpoint(state_of(cfg, model, optimizer, 3), str(tmp_path))
    assert os.path.basename(path) == 'epoch-3.pth'
    state = read_checkpoint(path)
    assert {'model', 'optimizer', 'epoch', 'iteration'} <= set(state)  # CMX's Engine.save_checkpoint
    assert {'rng', 'lr_step', 'sampler_epoch', 'config'} <= set(state)
    assert state['epoch'] == 3
    assert state['config'] == dict(stored_config(cfg), backbone='mscan_t', num_classes=5)  # the run's config
    assert {key: state['config'][key] for key in SCHEDULE_KEYS} == {key: cfg[key] for key in SCHEDULE_KEYS}
    assert list(state['model']) == list(model.state_dict())
    assert not any(k.startswith('module.') for k in state['model'])
    assert os.readlink(tmp_path / LAST) == 'epoch-3.pth'  # relative: the folder can be moved


@pytest.mark.integration
def test_ddp_wrapper_is_refused_and_its_module_saves_without_prefix(model_and_optimizer, tmp_path):
    cfg, model, optimizer = model_and_optimizer
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(TypeError, match='unwrapped'):
            training_state(ddp, optimizer, 1, 0, 1, [], cfg)
        state = training_state(ddp.module, optimizer, 1, 0, 1, [], cfg)
        assert not any(k.startswith('module.') for k in state['model'])
    finally:
        dist.destroy_process_group()


def test_epoch_last_always_names_the_newest_complete_file(model_and_optimizer, tmp_path):
    cfg, model, optimizer = model_and_optimizer
    for epoch in (1, 2, 3):
        save_checkpoint(state_of(cfg, model, optimizer, epoch), str(tmp_path))
        assert read_checkpoint(str(tmp_path / LAST))['epoch'] == epoch
    assert sorted(os.listdir(tmp_path)) == ['epoch-1.pth', 'epoch-2.pth', 'epoch-3.pth', LAST]


def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'epoch-1.pth')
    atomic_save({'model': {'w': torch.zeros(3)}, 'epoch': 1}, path)

    def crash(src, dst):
        raise OSError('disk gone')
    monkeypatch.setattr(os, 'replace', crash)
    with pytest.raises(OSError, match='disk gone'):
        atomic_save({'model': {'w': torch.ones(3)}, 'epoch': 2}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)['epoch'] == 1
    assert os.listdir(tmp_path) == ['epoch-1.pth']  # the temporary file was cleaned up


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    """0o666 less the umask, as a plain torch.save; not tempfile's private 0o600."""
    umask = os.umask(0o022)
    try:
        path = save_checkpoint({'model': {'w': torch.zeros(3)}, 'epoch': 1}, str(tmp_path))
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_fp16_loss_scale_is_saved_and_restored(model_and_optimizer, tmp_path):
    cfg, model, optimizer = model_and_optimizer
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    state = training_state(model, optimizer, 1, 0, 1, [], cfg, scaler)
    fresh = torch.amp.GradScaler('cpu')
    restore_training_state(read_checkpoint(save_checkpoint(state, str(tmp_path))), model, optimizer, cfg,
                           'ckpt', fresh)
    assert fresh.get_scale() == 1024.0
    assert 'scaler' not in training_state(model, optimizer, 1, 0, 1, [], cfg,
                                          torch.amp.GradScaler('cpu', enabled=False))


@pytest.mark.integration
def test_process_killed_between_write_and_rename(tmp_path):
    """SIGKILL after the temporary file is complete but before os.replace: the old file and link stay;
    the leftover temporary file is recognisable and removed at the next start."""
    folder = str(tmp_path)
    save_checkpoint({'model': {'w': torch.zeros(3)}, 'epoch': 1}, folder)
    script = textwrap.dedent(f'''
        import os, signal, sys, torch
        from smmcl.engine import checkpoint
        os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save_checkpoint({{'model': {{'w': torch.ones(1000)}}, 'epoch': 2}}, {folder!r})
    ''')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, timeout=120)
    assert result.returncode == -9
    names = sorted(os.listdir(folder))
    temps = [n for n in names if is_temp_file(n)]
    assert [n for n in names if not is_temp_file(n)] == ['epoch-1.pth', LAST]
    assert len(temps) == 1 and os.path.getsize(os.path.join(folder, temps[0])) > 4000
    assert read_checkpoint(os.path.join(folder, LAST))['epoch'] == 1
    assert remove_stale_temp_files(folder) == temps
    assert sorted(os.listdir(folder)) == ['epoch-1.pth', LAST]


def test_unreadable_and_missing_checkpoints_are_clear_errors(tmp_path):
    bad = tmp_path / 'epoch-1.pth'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='cannot be read'):
        read_checkpoint(str(bad))
    with pytest.raises(FileNotFoundError, match='epoch-9.pth'):  # a CheckpointError too
        read_checkpoint(str(tmp_path / 'epoch-9.pth'))


def test_model_state_reads_ours_the_authors_imagenet_and_bare_files(tmp_path):
    weights = {'a.weight': torch.arange(6.).reshape(2, 3), 'a.bias': torch.ones(2)}
    for name, content in (('ours', {'model': weights, 'rng': []}), ('authors', {'model': weights, 'epoch': 1}),
                          ('imagenet', {'state_dict': weights, 'meta': {}}), ('bare', weights)):
        torch.save(content, tmp_path / f'{name}.pth')
        for mmap in (False, True):  # mapped tensors hold the same values
            got = model_state(read_checkpoint(str(tmp_path / f'{name}.pth'), mmap=mmap))
            assert list(got) == list(weights) and all(torch.equal(got[k], weights[k]) for k in weights)
    torch.save({'epoch': 3, 'note': 'x'}, tmp_path / 'no_weights.pth')
    with pytest.raises(CheckpointError, match="no_weights.pth holds no model weights"):
        model_state(read_checkpoint(str(tmp_path / 'no_weights.pth')), str(tmp_path / 'no_weights.pth'))
    torch.save(torch.zeros(3), tmp_path / 'tensor.pth')
    with pytest.raises(CheckpointError, match='holds a Tensor, not a state dict'):
        read_checkpoint(str(tmp_path / 'tensor.pth'))
    with pytest.raises(CheckpointError, match="not a training checkpoint \\(no 'model' entry\\)"):
        restore_training_state({'state_dict': weights}, None, None, tiny_config(), 'imagenet.pth')


def test_other_class_count_or_backbone_is_refused_naming_both(model_and_optimizer):
    cfg, model, optimizer = model_and_optimizer
    state = state_of(cfg, model, optimizer, 1)
    with pytest.raises(CheckpointError, match=r'5 classes \(config: 7\)'):
        restore_training_state(state, model, optimizer, tiny_config(num_classes=7), 'ckpt')
    with pytest.raises(CheckpointError, match=r'backbone mscan_t \(config: mscan_b\)'):
        restore_training_state(state, model, optimizer, tiny_config(backbone='mscan_b'), 'ckpt')
    restore_training_state(state, model, optimizer, cfg, 'ckpt')  # the matching config loads


def test_restore_is_strict_and_restores_the_optimizer(model_and_optimizer, tmp_path):
    cfg, model, optimizer = model_and_optimizer
    torch.manual_seed(1)
    fresh = build_segmentor(cfg, with_loss=True)
    fresh_opt = build_optimizer(fresh, cfg)
    for group in optimizer.param_groups:
        group['lr'] = 1.25e-5
    path = save_checkpoint(state_of(cfg, model, optimizer, 1), str(tmp_path))
    restore_training_state(read_checkpoint(path), fresh, fresh_opt, cfg, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert [g['lr'] for g in fresh_opt.param_groups] == [1.25e-5, 1.25e-5]
    with pytest.raises(CheckpointError, match='train_layer_scale'):
        restore_training_state(read_checkpoint(path), fresh, build_optimizer(fresh, tiny_config(
            train_layer_scale=True)), cfg, path)
    state = read_checkpoint(path)
    del state['model']['decode_head.conv_seg.bias']
    with pytest.raises(CheckpointError, match='conv_seg.bias'):
        restore_training_state(state, fresh, fresh_opt, cfg, path)


def test_optimizer_groups_leave_out_layer_scales_unless_asked(model_and_optimizer):
    cfg, model, optimizer = model_and_optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay, left_out = group_weight(model)
    assert left_out and all('layer_scale' in n for n in left_out)
    assert not any('layer_scale' in names[id(p)] for p in decay + no_decay)
    assert all(p.ndim > 1 for p in decay)  # conv / linear weights
    assert all(p.ndim == 1 for p in no_decay)  # biases and norm weights
    assert len(decay) + len(no_decay) + len(left_out) == len(names)
    assert [g['weight_decay'] for g in optimizer.param_groups] == [cfg.weight_decay, 0.0]
    assert optimizer.param_groups[0]['betas'] == (0.9, 0.999)
    assert sum(len(g['params']) for g in optimizer.param_groups) == len(names) - len(left_out)

    with_scales = build_optimizer(model, tiny_config(train_layer_scale=True))
    in_groups = [{names[id(p)] for p in g['params']} for g in with_scales.param_groups]
    assert set(left_out) <= in_groups[1] and not set(left_out) & in_groups[0]
    assert sum(len(g) for g in in_groups) == len(names)


def test_rng_states_round_trip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    atomic_save({'rng': [state]}, str(tmp_path / 'r.pth'))
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / 'r.pth', weights_only=True)['rng'][0])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


@pytest.mark.parametrize('epoch,expected', [(1, False), (299, False), (300, True), (350, False),
                                            (500, True), (999, False), (1000, True)])
def test_authors_checkpoint_schedule(epoch, expected):
    cfg = base_config()  # the authors' SMMCL_LLRGBD/config.py: start 300, step 100, 1000 epochs
    assert should_save(epoch, cfg) is expected
    cfg.nepochs = 1001  # the last epoch is saved off the grid too (their train.py's `or epoch == nepochs`)
    assert should_save(1001, cfg)
