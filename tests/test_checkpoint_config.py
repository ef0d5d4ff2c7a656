"""A checkpoint knows what it is: predict.py, export.py and the API read the model and inference settings
of the run that wrote it, so that no --set of the training has to be repeated."""
import os
import os.path as osp

import numpy as np
import pytest
from PIL import Image

from smmcl.config import REPO_ROOT, load_config
from smmcl.engine import eval_cli, predict_cli
from smmcl.engine import train as train_module
from smmcl.engine.checkpoint import read_checkpoint
from smmcl.inference import Segmenter

CONFIG = osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'config.py')


@pytest.fixture
def trained(tiny_training, tmp_path):
    """(checkpoint, training --set values): one epoch of the tiny run, evaluated with 32x48 windows."""
    overrides = tiny_training(nepochs=1, eval_crop_size=[32, 48], seed=7)
    train_module.main(CONFIG, ['--set', *overrides])
    return str(tmp_path / 'log' / 'checkpoint' / 'epoch-1.pth'), overrides


def test_the_checkpoint_stores_its_run_config(trained, tiny_mscan):
    ckpt, _ = trained
    stored = read_checkpoint(ckpt, mmap=True)['config']
    assert stored['backbone'] == tiny_mscan and stored['eval_crop_size'] == [32, 48] and stored['seed'] == 7
    assert stored['norm_mean'] == [0.485, 0.456, 0.406]  # plain lists: weights_only loading


def test_predict_needs_no_set_and_gives_eval_p_class_ids(trained, tiny_llrgbd, tmp_path):
    ckpt, overrides = trained
    preds = tmp_path / 'preds'
    eval_cli.main(CONFIG, ['-e', ckpt, '-p', str(preds), '--set', *overrides])
    out = tmp_path / 'out'
    test = osp.join(tiny_llrgbd, 'test')
    predict_cli.main(CONFIG, ['-e', ckpt, '--rgb', osp.join(test, 'rgb'), '--x', osp.join(test, 'depth'),
                              '-o', str(out), '-d', 'cpu'])
    names = sorted(os.listdir(f'{preds}_color'))
    assert names
    for name in names:
        expected = np.asarray(Image.open(f'{preds}_color/{name}'))
        assert np.array_equal(np.asarray(Image.open(out / name)), expected), name


def test_an_explicit_setting_wins_and_a_contradicting_model_setting_is_refused(trained, tiny_llrgbd, tmp_path,
                                                                              capsys):
    ckpt, _ = trained
    config = load_config(CONFIG, ['eval_crop_size=[48,64]'])
    Segmenter.from_checkpoint(config, ckpt, 'cpu')
    assert config.eval_crop_size == [48, 64] and config.seed == 7  # set wins; the rest is the run's
    with pytest.raises(SystemExit):
        predict_cli.main(CONFIG, ['-e', ckpt, '--rgb', osp.join(tiny_llrgbd, 'test', 'rgb'), '--x',
                                  osp.join(tiny_llrgbd, 'test', 'depth'), '-o', str(tmp_path / 'o'), '--set',
                                  'backbone=mscan_t'])
    err = capsys.readouterr().err
    assert 'was trained with backbone=' in err and 'backbone=\'mscan_t\' is set' in err


def test_the_authors_checkpoints_keep_the_experiment_config(tmp_path, tiny_mscan):
    """No stored config (their Engine.save_checkpoint): the experiment's config.py and --set, as before."""
    import torch
    from smmcl.models import build_segmentor
    config = load_config(CONFIG, [f'backbone={tiny_mscan}', 'decoder_embed_dim=32'])
    path = str(tmp_path / 'epoch-500.pth')
    torch.save({'model': build_segmentor(config).state_dict(), 'optimizer': {}, 'epoch': 500, 'iteration': 1}, path)
    Segmenter.from_checkpoint(config, path, 'cpu')
    assert config.eval_crop_size == [480, 640] and config.seed == 12345


def test_an_epoch_of_another_backbone_run_is_found(trained, tiny_llrgbd, tmp_path, tiny_mscan):
    """The run trained with --set backbone=<tiny> log_dir=<exp>/log_LLRGBD_<tiny>: predict -e 1 finds it
    without --set (the config's own folder is log_LLRGBD_mscan_b)."""
    import shutil
    exp = tmp_path / 'exp'
    os.makedirs(exp)
    shutil.copy(CONFIG, exp / 'config.py')
    ckpt, _ = trained
    os.makedirs(exp / f'log_LLRGBD_{tiny_mscan}' / 'checkpoint')
    shutil.copy(ckpt, exp / f'log_LLRGBD_{tiny_mscan}' / 'checkpoint' / 'epoch-1.pth')
    test = osp.join(tiny_llrgbd, 'test')
    predict_cli.main(str(exp / 'config.py'), ['-e', '1', '--rgb', osp.join(test, 'rgb'), '--x',
                                               osp.join(test, 'depth'), '-o', str(tmp_path / 'out')])
    assert sorted(os.listdir(tmp_path / 'out'))[0].endswith('.png')
