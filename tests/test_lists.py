"""The authors' LLRGBD list files (train/train.txt, test/test.txt): read when present, in their order;
without them every image of the split folder, with one log line; disagreements reported by the check."""
import logging
import os
import os.path as osp
import shutil

import pytest

from smmcl.config import REPO_ROOT, load_config
from smmcl.data import check
from smmcl.data.dataset import DatasetError, RGBXDataset
from smmcl.data.loader import build_train_data
from smmcl.engine.dist import DistContext

LLRGBD = osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'config.py')
MFNET = osp.join(REPO_ROOT, 'SMMCL_MFNet', 'config.py')


@pytest.fixture
def data(tiny_llrgbd, tmp_path):
    """A private copy of the tiny synthetic LLRGBD (4 train, 2 test images, lists included)."""
    path = str(tmp_path / 'LLRGBD')
    shutil.copytree(tiny_llrgbd, path)
    return path


def config(path, *overrides):
    return load_config(LLRGBD, [f'dataset_path={path}', 'image_height=32', 'image_width=48', 'batch_size=2',
                                'num_workers=0', *overrides])


def test_llrgbd_reads_the_authors_lists_in_their_order(data):
    with open(osp.join(data, 'train', 'train.txt'), 'w') as f:
        f.write('00002\n00000\n00003\n')  # their format: one bare name a line; 00001 left out
    c = config(data)
    assert c.train_source == osp.join(data, 'train', 'train.txt')
    assert c.eval_source == osp.join(data, 'test', 'test.txt')
    assert RGBXDataset(c, 'train').names == ['00002', '00000', '00003']
    assert RGBXDataset(c, 'val').names == ['00004', '00005']
    assert build_train_data(c, DistContext()).loader.dataset.dataset.names == ['00002', '00000', '00003']


def test_without_lists_every_image_with_one_log_line(data, caplog):
    os.remove(osp.join(data, 'train', 'train.txt'))
    c = config(data)
    with caplog.at_level(logging.INFO, logger='smmcl.data'):
        names = RGBXDataset(c, 'train').names
        check.quick_check(c, splits=('train',))
        build_train_data(c, DistContext())
    assert names == ['00000', '00001', '00002', '00003']
    lines = [r.getMessage() for r in caplog.records if 'train.txt' in r.getMessage()]
    assert len(lines) == 1 and 'every image of' in lines[0] and osp.join(data, 'train', 'rgb') in lines[0]
    assert RGBXDataset(c, 'val').names == ['00004', '00005']  # test/test.txt is still read


def test_a_missing_list_is_an_error_unless_optional(data):
    os.remove(osp.join(data, 'test', 'test.txt'))
    with pytest.raises(DatasetError, match='eval_list'):
        RGBXDataset(config(data, 'lists_optional=False'), 'val')


def test_the_check_reports_a_list_and_folder_that_disagree(data, capsys):
    with open(osp.join(data, 'train', 'train.txt'), 'w') as f:
        f.write('00000\n00001\n')
    code = check.main([LLRGBD, '--set', f'dataset_path={data}', '--split', 'train'])
    out = capsys.readouterr().out
    assert code == 0 and "2 image(s) of" in out and 'not listed' in out and '00002, 00003' in out
    with open(osp.join(data, 'train', 'train.txt'), 'a') as f:
        f.write('ghost\n')
    assert check.main([LLRGBD, '--set', f'dataset_path={data}', '--split', 'train']) == 1
    out = capsys.readouterr().out
    assert "ERROR RGB file" in out and 'ghost' in out and 'NOTE 2 image(s)' in out
    os.remove(osp.join(data, 'train', 'train.txt'))
    assert check.main([LLRGBD, '--set', f'dataset_path={data}', '--split', 'train']) == 0
    assert 'train.txt does not exist' in capsys.readouterr().out


def test_mfnet_trains_on_cmx_train_list():
    c = load_config(MFNET)
    assert c.train_source.endswith(osp.join('MFNet', 'train.txt')) and c.num_train_imgs == 784
    assert not c.lists_optional
