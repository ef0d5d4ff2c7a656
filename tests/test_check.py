"""``python -m smmcl.data.check`` and ``quick_check`` list every problem of a dataset."""
import os
import os.path as osp
import shutil
import subprocess
import sys

import cv2
import pytest

from smmcl.config import REPO_ROOT, load_config
from smmcl.data.check import quick_check, scan
from smmcl.data.dataset import DatasetError
from smmcl.data.synthetic import generate

LLRGBD_CONFIG = osp.join('SMMCL_LLRGBD', 'config.py')


@pytest.fixture(scope='module')
def clean(tmp_path_factory):
    return generate('LLRGBD', str(tmp_path_factory.mktemp('clean') / 'LLRGBD'), 5, 3, 24, 32, seed=2)


@pytest.fixture
def broken(clean, tmp_path):
    """A copy of ``clean`` with five planted problems; returns (path, the files to be named)."""
    path = str(tmp_path / 'LLRGBD')
    shutil.copytree(clean, path)
    train, test = osp.join(path, 'train'), osp.join(path, 'test')
    missing_x = osp.join(train, 'depth', '00001.png')
    os.remove(missing_x)
    truncated = osp.join(train, 'rgb', '00002.png')
    with open(truncated, 'r+b') as f:
        f.truncate(100)
    bad_values = osp.join(train, 'label', '00003.png')
    label = cv2.imread(bad_values, cv2.IMREAD_UNCHANGED)
    label[0, :4] = 200
    cv2.imwrite(bad_values, label)
    small = osp.join(test, 'label', '00006.png')
    cv2.imwrite(small, cv2.imread(small, cv2.IMREAD_UNCHANGED)[:10, :12])
    missing_label = osp.join(test, 'label', '00007.png')
    os.remove(missing_label)
    return path, [missing_x, truncated, bad_values, small, missing_label]


def run_check(*args):
    return subprocess.run([sys.executable, '-m', 'smmcl.data.check', *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_cli_lists_every_problem(broken):
    path, files = broken
    result = run_check(LLRGBD_CONFIG, '--set', f'dataset_path={path}')
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith('ERROR ')]
    assert len(errors) == len(files)
    for file in files:
        assert sum(file in line for line in errors) == 1, (file, result.stdout)
    assert 'does not exist' in result.stdout and 'cannot be decoded' in result.stdout
    assert '[200]' in result.stdout and '10x12' in result.stdout


@pytest.mark.integration
def test_cli_clean_dataset_summary(clean):
    result = run_check(LLRGBD_CONFIG, '--set', f'dataset_path={clean}', 'batch_size=2', '--split', 'all')
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert 'no problems' in out and 'train: 5 items' in out and 'val: 3 items' in out
    assert '24x32 (5)' in out and 'classes present' in out and 'wall' in out


def test_scan_one_split(broken):
    path, files = broken
    config = load_config(osp.join(REPO_ROOT, LLRGBD_CONFIG), [f'dataset_path={path}'])
    problems, summaries = scan(config, ['val'], workers=2)
    assert len(problems) == 2 and set(summaries) == {'val'}
    assert summaries['val']['items'] == 3 and sum(summaries['val']['sizes'].values()) == 1


def test_quick_check(clean, broken, tmp_path):
    quick_check(load_config(osp.join(REPO_ROOT, LLRGBD_CONFIG), [f'dataset_path={clean}']))
    path, files = broken
    config = load_config(osp.join(REPO_ROOT, LLRGBD_CONFIG), [f'dataset_path={path}'])
    with pytest.raises(DatasetError) as info:
        quick_check(config)
    problems = info.value.problems
    assert len(problems) == 2  # only the missing files: quick_check decodes nothing
    assert files[0] in problems[0] and files[4] in problems[1]
    missing = load_config(osp.join(REPO_ROOT, LLRGBD_CONFIG), [f'dataset_path={tmp_path / "none"}'])
    with pytest.raises(DatasetError) as info:
        quick_check(missing)
    assert len(info.value.problems) == 1 and str(tmp_path / 'none') in str(info.value)


def test_quick_check_mfnet_subsets(tmp_path):
    path = generate('MFNet', str(tmp_path / 'MFNet'), 3, 4, 16, 20, seed=3)
    config = load_config(osp.join(REPO_ROOT, 'SMMCL_MFNet', 'config.py'), [f'dataset_path={path}'])
    quick_check(config)
    with open(osp.join(path, 'test_night.txt'), 'a') as f:
        f.write('99999N\n')
    with pytest.raises(DatasetError, match='99999N'):
        quick_check(config)
    os.remove(osp.join(path, 'test_night.txt'))
    with open(osp.join(path, 'test_day.txt'), 'w', encoding='utf-8') as f:
        f.write('\ufeff\n')  # only a byte-order mark: empty
    quick_check(config)  # the day/night lists are optional and may be empty


def test_scan_refuses_colour_x_read_as_one_channel(clean, tmp_path):
    path = str(tmp_path / 'LLRGBD')
    shutil.copytree(clean, path)
    config = load_config(osp.join(REPO_ROOT, LLRGBD_CONFIG), [f'dataset_path={path}'])
    grey_as_rgb = osp.join(path, 'train', 'depth', '00000.png')
    depth = cv2.imread(grey_as_rgb, cv2.IMREAD_UNCHANGED)
    cv2.imwrite(grey_as_rgb, cv2.merge([depth, depth, depth]))  # equal channels: fine
    assert scan(config, ('train',), workers=1)[0] == []
    hha_like = osp.join(path, 'train', 'depth', '00001.png')
    depth = cv2.imread(hha_like, cv2.IMREAD_UNCHANGED)
    cv2.imwrite(hha_like, cv2.merge([depth, 255 - depth, depth // 2]))
    problems, _ = scan(config, ('train',), workers=1)
    assert len(problems) == 1
    assert hha_like in problems[0] and 'x_is_single_channel=False' in problems[0]
    config.x_is_single_channel = False  # read as 3 channels: nothing to report
    assert scan(config, ('train',), workers=1)[0] == []
