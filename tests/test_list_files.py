"""List files against folders: LLRGBD's optional lists (the authors' train/train.txt, test/test.txt) and
MFNet's training list (CMX's train.txt), as the datasets, the training loader, the quick check and the
data check read them."""
import logging
import os
import os.path as osp
import shutil

import pytest

from smmcl.config import REPO_ROOT, load_config
from smmcl.data import check
from smmcl.data.dataset import DatasetError, RGBXDataset, split_layout
from smmcl.data.loader import build_train_data
from smmcl.data.synthetic import generate
from smmcl.engine.dist import DistContext

LLRGBD = osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'config.py')
MFNET = osp.join(REPO_ROOT, 'SMMCL_MFNet', 'config.py')


@pytest.fixture
def data(tiny_llrgbd, tmp_path):
    """A private copy of the tiny synthetic LLRGBD (train 00000-00003, test 00004-00005, lists included)."""
    path = str(tmp_path / 'LLRGBD')
    shutil.copytree(tiny_llrgbd, path)
    return path


def config(path, *overrides):
    return load_config(LLRGBD, [f'dataset_path={path}', 'image_height=32', 'image_width=48', 'batch_size=2',
                                'num_workers=0', *overrides])


def write(path, names):
    with open(path, 'w') as f:
        f.write(''.join(f'{n}\n' for n in names))


def absent_lines(caplog, list_name):
    """The logged lines saying that a list file named ``list_name`` is absent."""
    messages = [r.getMessage() for r in caplog.records]
    return [m for m in messages if list_name in m and 'does not exist' in m]


def test_synthetic_lists_are_the_authors_format(data):
    # Their RGBXDataset: name = line.strip(), path = rgb_root + name + rgb_format: bare names, no extension.
    for split, names in (('train', ['00000', '00001', '00002', '00003']), ('test', ['00004', '00005'])):
        lines = open(osp.join(data, split, f'{split}.txt')).read().splitlines()
        assert lines == names
        assert all(osp.isfile(osp.join(data, split, 'rgb', n + '.png')) for n in lines)


def test_both_splits_follow_the_list_order(data):
    write(osp.join(data, 'train', 'train.txt'), ['00003', '00001', '00000', '00002'])
    write(osp.join(data, 'test', 'test.txt'), ['00005', '00004'])
    c = config(data)
    assert RGBXDataset(c, 'train').names == ['00003', '00001', '00000', '00002']
    assert RGBXDataset(c, 'val').names == ['00005', '00004']
    assert [RGBXDataset(c, 'val')[i]['fn'] for i in range(2)] == ['00005', '00004']
    assert build_train_data(c, DistContext()).loader.dataset.dataset.names == ['00003', '00001', '00000', '00002']
    assert split_layout(c, 'val').absent_list is None


def test_without_lists_every_image_and_one_line_per_list(data, caplog):
    os.remove(osp.join(data, 'train', 'train.txt'))
    os.remove(osp.join(data, 'test', 'test.txt'))
    c = config(data)
    with caplog.at_level(logging.INFO, logger='smmcl.data'):
        for _ in range(2):
            train, val = RGBXDataset(c, 'train'), RGBXDataset(c, 'val')
            check.quick_check(c)
        build_train_data(c, DistContext())
        check.scan(c, workers=1)
    assert train.names == ['00000', '00001', '00002', '00003'] and val.names == ['00004', '00005']
    assert train.layout.source is None and train.layout.absent_list == osp.join(data, 'train', 'train.txt')
    assert len(absent_lines(caplog, 'train.txt')) == 1 and len(absent_lines(caplog, 'test.txt')) == 1
    assert osp.join(data, 'test', 'rgb') in absent_lines(caplog, 'test.txt')[0]


def test_the_line_is_not_spent_before_logging_is_configured(data, caplog):
    # eval.py builds the test set once before it configures logging and once after.
    os.remove(osp.join(data, 'test', 'test.txt'))
    c = config(data)
    with caplog.at_level(logging.WARNING, logger='smmcl.data'):
        RGBXDataset(c, 'val')
    assert absent_lines(caplog, 'test.txt') == []
    with caplog.at_level(logging.INFO, logger='smmcl.data'):
        RGBXDataset(c, 'val')
        RGBXDataset(c, 'val')
    assert len(absent_lines(caplog, 'test.txt')) == 1


def test_no_list_configured_is_no_fallback(data, caplog):
    c = config(data, 'train_list=None')
    with caplog.at_level(logging.INFO, logger='smmcl.data'):
        names = RGBXDataset(c, 'train').names
    assert names == ['00000', '00001', '00002', '00003'] and absent_lines(caplog, '.txt') == []
    assert split_layout(c, 'train').absent_list is None


def test_missing_list_without_lists_optional_is_the_error(data, capsys):
    os.remove(osp.join(data, 'train', 'train.txt'))
    c = config(data, 'lists_optional=False')
    missing = osp.join(data, 'train', 'train.txt')
    for build in (lambda: RGBXDataset(c, 'train'), lambda: check.quick_check(c, splits=('train',)),
                  lambda: build_train_data(c, DistContext())):
        with pytest.raises(DatasetError, match='train_list') as info:
            build()
        assert f'list file {missing} does not exist' in str(info.value)
    assert check.main([LLRGBD, '--set', f'dataset_path={data}', 'lists_optional=False', '--split', 'train']) == 1
    assert f'ERROR list file {missing} does not exist' in capsys.readouterr().out


def test_check_reports_unlisted_images_and_missing_listed_files(data, capsys):
    for name in ('00006', '00007', '00008', '00009'):  # in test/rgb/, not in test/test.txt
        for folder in ('rgb', 'depth', 'label'):
            shutil.copy(osp.join(data, 'test', folder, '00004.png'), osp.join(data, 'test', folder, name + '.png'))
    argv = [LLRGBD, '--set', f'dataset_path={data}', '--split', 'val']
    assert check.main(argv) == 0  # a note, not a failure
    out = capsys.readouterr().out
    assert 'val: 2 items' in out
    assert (f'NOTE 4 image(s) of {osp.join(data, "test", "rgb")} are not listed in '
            f'{osp.join(data, "test", "test.txt")}') in out and '00006, 00007, 00008' in out

    write(osp.join(data, 'test', 'test.txt'), ['00004', '00005', 'gone'])
    assert check.main(argv) == 1  # a listed file that is missing is an error
    out = capsys.readouterr().out
    assert f"ERROR RGB file {osp.join(data, 'test', 'rgb', 'gone.png')} of item 'gone'" in out
    assert 'NOTE 4 image(s)' in out


def test_check_has_no_note_where_list_and_folder_agree(data, capsys):
    assert check.main([LLRGBD, '--set', f'dataset_path={data}']) == 0
    out = capsys.readouterr().out
    assert 'train: 4 items' in out and 'val: 2 items' in out and 'NOTE' not in out


def test_mfnet_trains_on_cmx_train_txt(tmp_path):
    c = load_config(MFNET)
    assert c.train_list == 'train.txt' and c.num_train_imgs == 784 and c.niters_per_epoch == 784 // 16 + 1
    both = load_config(MFNET, ['train_list=train_val.txt', 'num_train_imgs=1176'])
    assert both.train_source.endswith(osp.join('MFNet', 'train_val.txt'))
    assert both.niters_per_epoch == 1176 // 16 + 1
    path = generate('MFNet', str(tmp_path / 'MFNet'), 4, 2, 16, 20, seed=0)
    c = load_config(MFNET, [f'dataset_path={path}', 'image_height=16', 'image_width=20'])
    assert c.train_source == osp.join(path, 'train.txt')
    assert RGBXDataset(c, 'train').names == open(c.train_source).read().split() == ['00000D', '00001N',
                                                                                    '00002D', '00003N']
