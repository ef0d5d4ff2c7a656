"""speed='fast' resolves into the switches at start (an explicit switch wins) and every combination that
cannot act is refused before any data is read."""
import logging
import os.path as osp

import pytest
import torch

from smmcl.config import REPO_ROOT, ConfigError, load_config
from smmcl.engine import train as train_module
from smmcl.engine.precision import for_inference, native_bf16
from smmcl.engine.speed import PRESETS, resolve_speed

CONFIG = osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'config.py')
CPU = torch.device('cpu')


@pytest.mark.parametrize('switch', ['channels_last', 'triton_kernels'])
def test_a_fast_path_switch_without_the_fast_path_is_refused_before_any_data(switch, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_module.main(CONFIG, ['--set', f'{switch}=True', f'dataset_path={tmp_path / "none"}'])
    err = capsys.readouterr().err
    assert f'{switch}=True acts on the fast path only' in err and 'fast_path=True' in err
    assert 'does not exist' not in err  # refused at load, before the data check


def test_reference_changes_nothing():
    config = load_config(CONFIG)
    assert resolve_speed(config, CPU, 'train', log=False) == {} and config.fast_path is False


@pytest.mark.parametrize('job', ['train', 'eval', 'predict'])
def test_fast_on_the_cpu_is_the_measured_preset(job, caplog):
    config = load_config(CONFIG, ['speed=fast'])
    with caplog.at_level(logging.INFO, logger='smmcl'):
        applied = resolve_speed(config, CPU, job)
    expected = dict(PRESETS['cpu'][job])
    if not native_bf16(CPU):
        expected.pop('amp')
    assert applied == expected and all(config[k] == v for k, v in expected.items())
    [plan] = [r.getMessage() for r in caplog.records if r.getMessage().startswith('speed plan')]
    assert f'speed plan (fast, {job} on cpu): fast_path=True' in plan
    assert resolve_speed(config, CPU, job) == {}  # once


def test_an_explicit_switch_wins_over_the_preset(tmp_path):
    config = load_config(CONFIG, ['speed=fast', 'eval_batch_size=1'])
    resolve_speed(config, CPU, 'eval', log=False)
    assert config.eval_batch_size == 1 and config.fast_path is True
    path = tmp_path / 'config.py'
    path.write_text(open(CONFIG).read() + '\nC.fast_path = False\nC.speed = "fast"\n')
    config = load_config(str(path))
    resolve_speed(config, CPU, 'train', log=False)
    assert config.fast_path is False  # assigned in config.py


def test_fast_on_cuda_follows_the_h200_table():
    config = load_config(CONFIG, ['speed=fast'])
    config.sync_bn = True
    from smmcl.engine.speed import preset
    train = preset(config, torch.device('cuda'), 'train', world_size=2)
    assert 'cuda_graphs_training' not in train and train['host_sync_every'] == 50  # no graphs with sync_bn
    assert preset(config, torch.device('cuda'), 'predict')['cuda_graphs'] is True
    config.optimizer = 'SGDM'
    assert 'host_sync_every' not in preset(config, torch.device('cuda'), 'train')


def test_compile_applies_to_plain_inference_too():
    from conftest import tiny_config
    from smmcl.models import build_segmentor
    model = for_inference(build_segmentor(tiny_config()), tiny_config(compile=True))
    assert type(model).__name__ == 'OptimizedModule'
