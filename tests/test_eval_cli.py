"""The evaluation command line (smmcl.engine.eval_cli, SMMCL_*/eval.py) on tiny synthetic data."""
import json
import os
import os.path as osp
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from smmcl.config import REPO_ROOT, load_config
from smmcl.data.synthetic import generate
from smmcl.engine.dist import DistContext, launch
from smmcl.engine.eval_cli import _evaluate_checkpoints, main, parse_epochs
from smmcl.models import build_segmentor

TINY = ['backbone=mscan_t', 'decoder_embed_dim=64', 'eval_crop_size=[32,48]', 'num_workers=0']


# ---- -e parsing ----

@pytest.fixture
def ckpt_dir(tmp_path):
    for name in ('epoch-250.pth', 'epoch-275.pth', 'epoch-300.pth', 'epoch-last.pth', 'notes.txt'):
        (tmp_path / name).write_bytes(b'')
    return str(tmp_path)


def test_parse_epochs(ckpt_dir):
    path = lambda e: osp.join(ckpt_dir, f'epoch-{e}.pth')  # noqa: E731
    assert parse_epochs('275', ckpt_dir) == [path(275)]
    assert parse_epochs('250-275', ckpt_dir) == [path(250), path(275)]
    assert parse_epochs('260-', ckpt_dir) == [path(275), path(300)]
    assert parse_epochs('0-1000', ckpt_dir) == [path(250), path(275), path(300)]
    assert parse_epochs('300-300', ckpt_dir) == [path(300)]
    assert parse_epochs('last', ckpt_dir) == [path('last')]
    assert parse_epochs(path(250), ckpt_dir) == [path(250)]


def test_parse_epochs_errors(ckpt_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r'epoch-500\.pth does not exist.*epochs \[250, 275, 300\]'):
        parse_epochs('500', ckpt_dir)
    with pytest.raises(FileNotFoundError, match=r'400 <= N.*\[250, 275, 300\]'):
        parse_epochs('400-', ckpt_dir)
    with pytest.raises(FileNotFoundError, match='other.pth does not exist'):
        parse_epochs(str(tmp_path / 'other.pth'), ckpt_dir)
    with pytest.raises(FileNotFoundError, match='missing_dir does not exist'):
        parse_epochs('5', str(tmp_path / 'missing_dir'))
    with pytest.raises(ValueError, match='backwards'):
        parse_epochs('300-250', ckpt_dir)
    with pytest.raises(ValueError, match='expected an epoch'):
        parse_epochs('best', ckpt_dir)


# ---- end to end ----

def _write_checkpoint(config_path, overrides, path, **changes):
    cfg = load_config(config_path, overrides)
    cfg.update(pretrained_model=None, **changes)
    torch.manual_seed(0)
    state = build_segmentor(cfg).state_dict()
    torch.save({'model': state, 'optimizer': {}, 'epoch': 3, 'iteration': 30}, path)  # the authors' format


@pytest.fixture(scope='module')
def llrgbd(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('llrgbd'))
    return generate('LLRGBD', out, n_train=1, n_test=3, height=32, width=48)


def _run_eval(folder, args):
    return subprocess.run([sys.executable, osp.join(REPO_ROOT, folder, 'eval.py')] + args,
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


@pytest.mark.integration
def test_eval_script_scores_an_authors_checkpoint(llrgbd, tmp_path):
    config_path = osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'config.py')
    overrides = TINY + [f'dataset_path={llrgbd}', f'log_dir={tmp_path / "log"}']
    ckpt = str(tmp_path / 'epoch-3.pth')
    _write_checkpoint(config_path, overrides, ckpt)
    save = tmp_path / 'pred'
    result = _run_eval('SMMCL_LLRGBD', ['-e', ckpt, '-d', '0', '-p', str(save), '--set'] + overrides)
    assert result.returncode == 0, result.stderr
    match = re.search(r'^mIoU: (\d+\.\d{3})$', result.stdout, re.M)
    assert match and result.stdout.rstrip().endswith(match.group(0))
    # The authors' log names: val_<%Y_%m_%d_%H_%M_%S>.log and a val_last.log link to it.
    # The scores as data beside it, with the log's stem.
    logs = sorted(f for f in os.listdir(tmp_path / 'log') if f.startswith('val_'))
    assert len(logs) == 3 and logs[2] == 'val_last.log' and logs[0] == logs[1][:-4] + '.json'
    assert re.fullmatch(r'val_\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2}\.log', logs[1])
    assert os.readlink(tmp_path / 'log' / 'val_last.log') == logs[1]
    [record] = json.loads((tmp_path / 'log' / logs[0]).read_text())['evaluations']
    assert record['checkpoint'] == ckpt and record['epoch'] == 3 and record['subset'] is None
    assert f"{record['mean_iou'] * 100:.3f}" == match.group(1) and len(record['iou']) == 14
    assert record['settings']['eval_protocol'] == 'authors' and 'mean_iou_wo_first' in record
    assert f'prediction PNGs written to {save}_color/' in result.stdout
    log = (tmp_path / 'log' / 'val_last.log').read_text()
    assert log.startswith(f'Model: {ckpt}\n1 void  \t')
    summary = r'^14 window\t\d+\.\d{3}%\n-{10} {5}mean_IoU\t\d+\.\d{3}%\tmean_IU_wo_background\t'
    assert re.search(summary, log, re.M)
    mean_iou = float(re.search(r'mean_IoU\t(\d+\.\d{3})%', log).group(1))
    assert mean_iou == float(match.group(1))
    # -p DIR: the empty DIR and the palette PNGs in DIR_color, in LLRGBD's own colours.
    assert save.is_dir() and not os.listdir(save)
    pngs = sorted(os.listdir(f'{save}_color'))
    assert pngs == ['00001.png', '00002.png', '00003.png']
    img = Image.open(f'{save}_color/{pngs[0]}')
    assert img.mode == 'P' and img.size == (48, 32) and np.asarray(img).max() < 14
    assert img.getpalette()[:9] == [0, 0, 0, 0, 0, 255, 232, 88, 47]  # void, bed, books


@pytest.mark.integration
def test_eval_script_refuses_a_checkpoint_with_another_class_count(llrgbd, tmp_path):
    config_path = osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'config.py')
    overrides = TINY + [f'dataset_path={llrgbd}', f'log_dir={tmp_path / "log"}']
    ckpt = str(tmp_path / 'epoch-3.pth')
    _write_checkpoint(config_path, overrides, ckpt, num_classes=9)
    result = _run_eval('SMMCL_LLRGBD', ['-e', ckpt, '--set'] + overrides)
    assert result.returncode == 1
    assert '9 classes (config: 14)' in result.stderr
    assert not (tmp_path / 'log').exists() or not os.listdir(tmp_path / 'log')


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason='launch() runs one process per GPU where CUDA is '
                    'available, so there it would compare a CUDA run with a CPU one (other NMF draws)')
def test_two_processes_give_the_single_process_result(llrgbd, tmp_path):
    # The CLI's multi-GPU path (one process per device, shards, summed matrices), here with 2 gloo
    # processes. Items are seeded one by one, so the NMF draws and the scores are the same.
    config_path = osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'config.py')
    overrides = TINY + [f'dataset_path={llrgbd}', f'log_dir={tmp_path}']
    ckpt = str(tmp_path / 'epoch-3.pth')
    _write_checkpoint(config_path, overrides, ckpt)
    logs = [tmp_path / 'two.log', tmp_path / 'one.log']
    two, one = (load_config(config_path, overrides + [f'val_log_file={log}']) for log in logs)
    launch(_evaluate_checkpoints, [], args=(two, [ckpt], {}, None, False), cpu_procs=2, timeout_s=60)
    _evaluate_checkpoints(DistContext(), one, [ckpt], {}, None, False)
    assert logs[0].read_text() == logs[1].read_text()
    assert logs[0].read_text().startswith(f'Model: {ckpt}\n')


def test_mfnet_day_and_night_subsets_and_epoch_ranges(tmp_path, capsys):
    data = generate('MFNet', str(tmp_path / 'mfnet'), n_train=1, n_test=4, height=32, width=48, seed=1)
    config_path = osp.join(REPO_ROOT, 'SMMCL_MFNet', 'config.py')
    overrides = TINY + [f'dataset_path={data}', f'log_dir={tmp_path / "log"}']
    ckpt_dir = tmp_path / 'log' / 'checkpoint'
    ckpt_dir.mkdir(parents=True)
    for epoch in (1, 2):
        _write_checkpoint(config_path, overrides, str(ckpt_dir / f'epoch-{epoch}.pth'))
    main(config_path, ['-e', '1-', '--local_rank', '0', '-p', str(tmp_path / 'pred'), '--set'] + overrides)
    out = capsys.readouterr().out
    # Several checkpoints: one sub-folder of DIR_color each, in CMX's bit palette (MFNet has no own colours).
    assert sorted(os.listdir(tmp_path / 'pred_color')) == ['epoch-1', 'epoch-2']
    pngs = sorted(os.listdir(tmp_path / 'pred_color' / 'epoch-2'))
    assert len(pngs) == 4
    img = Image.open(tmp_path / 'pred_color' / 'epoch-2' / pngs[0])
    assert img.getpalette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    test_names = open(osp.join(data, 'test.txt')).read().split()
    day = [n for n in test_names if n.endswith('D')]
    night = [n for n in test_names if n.endswith('N')]
    for epoch in (1, 2):
        assert f'Model: {ckpt_dir}/epoch-{epoch}.pth\n1 unlabeled' in out
        for name, names in (('day', day), ('night', night)):
            title = f'Model: {ckpt_dir}/epoch-{epoch}.pth [{name}: {len(names)} images]'
            assert (title in out) == bool(names)
    assert 'mean_IU' not in out  # MFNet scores all 9 classes
    assert re.search(r'^best: .*epoch-\d\.pth mIoU \d+\.\d{3}$', out, re.M)
    assert re.search(r'^mIoU: \d+\.\d{3}$', out.rstrip().split('\n')[-1])


def test_bad_override_and_missing_checkpoint_exit_cleanly(tmp_path, capsys):
    config_path = osp.join(REPO_ROOT, 'SMMCL_NYU', 'config.py')
    with pytest.raises(SystemExit) as exc:
        main(config_path, ['-e', '600', '--set', f'log_dir={tmp_path}'])
    assert exc.value.code == 1
    assert 'epoch-600.pth does not exist' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(config_path, ['--set', 'backbon=mscan_t'])
    assert "did you mean 'backbone'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(config_path, ['--set', 'eval_protocol=cmx'])
    assert "eval_protocol='cmx': expected one of ('authors', 'corrected')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(config_path, ['--set', 'class_colors=[[0,0,255]]'])
    assert 'class_colors must be one [r, g, b] of floats in 0-1' in capsys.readouterr().err


def test_wrong_checkpoints_and_class_names_exit_cleanly(tmp_path, capsys):
    config_path = osp.join(REPO_ROOT, 'SMMCL_NYU', 'config.py')
    ckpt = str(tmp_path / 'epoch-1.pth')
    _write_checkpoint(config_path, TINY, ckpt)  # mscan_t, 40 classes; the config says mscan_b
    with pytest.raises(SystemExit) as exc:
        main(config_path, ['-e', ckpt, '--set', f'log_dir={tmp_path}'])
    assert exc.value.code == 1
    assert 'backbone mscan_t (config: mscan_b)' in capsys.readouterr().err
    torch.save(torch.zeros(3), tmp_path / 'tensor.pth')
    with pytest.raises(SystemExit):
        main(config_path, ['-e', str(tmp_path / 'tensor.pth'), '--set', f'log_dir={tmp_path}'])
    assert 'holds a Tensor, not a state dict' in capsys.readouterr().err
    # 40 class names for 9 classes: refused before evaluating, not an IndexError when printing the table
    with pytest.raises(SystemExit):
        main(config_path, ['-e', ckpt, '--set', f'log_dir={tmp_path}', 'num_classes=9'])
    assert 'class_names holds 40 names for num_classes=9' in capsys.readouterr().err


def test_val_last_link_follows_the_newest_log(tmp_path, caplog):
    from smmcl.engine.logging_utils import link_last
    first, second = tmp_path / 'val_2024_01_01_00_00_00.log', tmp_path / 'val_2024_01_02_00_00_00.log'
    for path in (first, second):
        path.write_text(path.name)
    link = tmp_path / 'val_last.log'
    link_last(str(first), str(link))
    link_last(str(second), str(link))  # replaces the earlier link, as the authors' link_file
    assert os.readlink(link) == second.name and link.read_text() == second.name
    elsewhere = tmp_path / 'other' / 'val.log'
    elsewhere.parent.mkdir()
    elsewhere.write_text('x')
    link_last(str(elsewhere), str(link))  # another folder: an absolute link
    assert os.readlink(link) == str(elsewhere)
    link.unlink()
    link.mkdir()  # a folder of that name is left alone, with a warning
    link_last(str(first), str(link))
    assert link.is_dir() and 'could not link' in caplog.text


def test_several_checkpoints_in_one_model_score_as_each_alone(llrgbd, tmp_path, monkeypatch):
    """eval.py loads each later checkpoint into the first one's model (so CUDA graphs recorded for the
    first replay for the others): every checkpoint scores as it does evaluated alone. The kernels (with
    ``triton_kernels``) are compiled ahead once, for the first checkpoint's model, on the test set."""
    from smmcl.engine import eval_cli
    ahead = []
    monkeypatch.setattr(eval_cli, 'compile_ahead_of_evaluation',
                        lambda model, dataset, config, ctx: ahead.append((model, len(dataset))))
    config_path = osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'config.py')
    ckpt_dir = tmp_path / 'log' / 'checkpoint'
    ckpt_dir.mkdir(parents=True)
    overrides = TINY + [f'dataset_path={llrgbd}']
    cfg = load_config(config_path, overrides)
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        torch.save({'model': build_segmentor(cfg).state_dict(), 'epoch': epoch}, ckpt_dir / f'epoch-{epoch}.pth')
    main(config_path, ['-e', '1-', '--set', *overrides, f'log_dir={tmp_path / "log"}'])
    together = json.load(open(next((tmp_path / 'log').glob('val_2*.json'))))['evaluations']
    assert len(ahead) == 1 and isinstance(ahead[0][0], torch.nn.Module) and ahead[0][1] == 3  # the 3 test images
    alone = []
    for epoch in (1, 2):
        log_dir = tmp_path / f'alone{epoch}'
        main(config_path, ['-e', str(ckpt_dir / f'epoch-{epoch}.pth'), '--set', *overrides, f'log_dir={log_dir}'])
        alone += json.load(open(next(log_dir.glob('val_2*.json'))))['evaluations']
    assert [r['iou'] for r in together] == [r['iou'] for r in alone]
    assert together[0]['iou'] != together[1]['iou']
