"""RGBXDataset on generated data in each dataset's layout, and every DatasetError case."""
import os
import os.path as osp
import pickle
import random
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from smmcl.config import REPO_ROOT, load_config
from smmcl.data.dataset import DatasetError, RGBXDataset, name_of
from smmcl.data.synthetic import generate
from smmcl.data.transforms import normalize_batch

H, W = 24, 32
N_TRAIN, N_TEST = 4, 6
EXPERIMENT = {'LLRGBD': 'SMMCL_LLRGBD', 'MFNet': 'SMMCL_MFNet', 'NYU': 'SMMCL_NYU'}


@pytest.fixture(scope='module')
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp('generated')
    return {name: generate(name, str(root / name), N_TRAIN, N_TEST, H, W, seed=1) for name in EXPERIMENT}


def config_for(dataset, path, *overrides):
    return load_config(osp.join(REPO_ROOT, EXPERIMENT[dataset], 'config.py'),
                       [f'dataset_path={path}', 'image_height=16', 'image_width=20', *overrides])


@pytest.fixture
def copy_of(generated, tmp_path):
    """A private, breakable copy of a generated dataset."""
    def make(dataset):
        dst = str(tmp_path / dataset)
        shutil.copytree(generated[dataset], dst)
        return dst
    return make


# ---- reading each layout back ----

def test_llrgbd_layout(generated):
    path = generated['LLRGBD']
    config = config_for('LLRGBD', path)
    train, val = RGBXDataset(config, 'train'), RGBXDataset(config, 'val')
    assert len(train) == N_TRAIN and len(val) == N_TEST
    assert train.names == sorted(train.names) and val.names[0] == f'{N_TRAIN:05d}'
    item = train[0]
    assert set(item) == {'data', 'modal_x', 'label', 'valid_box', 'fn', 'n'}
    assert item['data'].dtype == item['modal_x'].dtype == torch.uint8
    assert item['data'].shape == item['modal_x'].shape == (3, 16, 20)
    assert item['label'].dtype == torch.int64 and item['label'].shape == (16, 20)
    assert item['valid_box'].dtype == torch.int64 and item['n'] == N_TRAIN
    x = item['modal_x']
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # single-channel depth replicated
    v = val[1]
    name = v['fn']
    assert v['data'].shape == v['modal_x'].shape == (H, W, 3) and v['data'].dtype == np.uint8
    np.testing.assert_array_equal(v['data'], cv2.imread(osp.join(path, 'test', 'rgb', name + '.png')))
    depth = cv2.imread(osp.join(path, 'test', 'depth', name + '.png'), cv2.IMREAD_UNCHANGED)
    assert depth.ndim == 2
    np.testing.assert_array_equal(v['modal_x'], np.repeat(depth[..., None], 3, -1))
    label = cv2.imread(osp.join(path, 'test', 'label', name + '.png'), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(v['label'], label)  # no shift
    assert v['label'].max() < 14


def test_bgr_by_default_rgb_on_request(generated):
    path = generated['NYU']
    bgr = RGBXDataset(config_for('NYU', path), 'val')[0]
    rgb = RGBXDataset(config_for('NYU', path, 'true_rgb_order=True'), 'val')[0]
    file = cv2.imread(osp.join(path, 'RGB', bgr['fn'] + '.jpg'))
    np.testing.assert_array_equal(bgr['data'], file)
    np.testing.assert_array_equal(rgb['data'], file[..., ::-1])
    np.testing.assert_array_equal(rgb['modal_x'], bgr['modal_x'][..., ::-1])
    assert not np.array_equal(bgr['data'], rgb['data'])


def test_nyu_label_shift_and_hha(generated):
    path = generated['NYU']
    config = config_for('NYU', path)
    train = RGBXDataset(config, 'train')
    assert train.names == [f'{i:04d}' for i in range(N_TRAIN)]  # from lines 'RGB/0000.jpg'
    files, shifted = [], []
    for ds in (train, RGBXDataset(config, 'val')):
        for name in ds.names:
            files.append(cv2.imread(osp.join(path, 'Label', name + '.png'), cv2.IMREAD_UNCHANGED))
            shifted.append(ds.read(name)[1])
    files, shifted = np.stack(files), np.stack(shifted)
    assert (files == 0).any() and (files == 1).any()
    np.testing.assert_array_equal(shifted[files == 0], 255)  # unlabelled -> ignore
    np.testing.assert_array_equal(shifted[files == 1], 0)  # wall -> class 0
    np.testing.assert_array_equal(shifted.astype(int), (files.astype(int) - 1) % 256)
    hha = RGBXDataset(config, 'val')[0]['modal_x']
    assert not np.array_equal(hha[..., 0], hha[..., 1])  # a real 3-channel X, not replicated


def test_mfnet_lists_and_day_night_subsets(generated):
    path = generated['MFNet']
    config = config_for('MFNet', path)
    assert len(RGBXDataset(config, 'train')) == N_TRAIN
    val = RGBXDataset(config, 'val')
    assert len(val) == N_TEST
    subsets = {k: RGBXDataset(config, 'val', source=s) for k, s in config.eval_subset_sources.items()}
    assert set(subsets) == {'day', 'night'}
    day, night = subsets['day'].names, subsets['night'].names
    assert day and night and sorted(day + night) == sorted(val.names)
    assert all(n.endswith('D') for n in day) and all(n.endswith('N') for n in night)
    item = subsets['night'][0]
    assert item['fn'] == night[0] and item['n'] == len(night)
    x = item['modal_x']
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()


def test_list_lines_of_every_style(generated, tmp_path):
    path = generated['NYU']
    source = tmp_path / 'mixed.txt'
    source.write_text('\ufeff0000\n\n  RGB/0001.jpg  \n0002.jpg\r\nRGB\\0003.JPG\n', encoding='utf-8')  # BOM
    ds = RGBXDataset(config_for('NYU', path), 'train', source=str(source))
    assert ds.names == ['0000', '0001', '0002', '0003']
    assert [ds[i]['fn'] for i in range(4)] == ds.names
    assert name_of('a.b.c') == 'a.b.c' and name_of('RGB/00001D.png') == '00001D'


def test_file_length_per_epoch(generated):
    config = config_for('LLRGBD', generated['LLRGBD'])
    ds = RGBXDataset(config, 'train', file_length=11)  # 4 names: each twice, 3 extra distinct ones
    assert len(ds) == 11
    first = list(ds.epoch_names)
    counts = {n: first.count(n) for n in ds.names}
    assert sorted(counts.values()) == [2, 3, 3, 3] and first[:8] == ds.names * 2
    ds.set_epoch(0)
    assert ds.epoch_names == first  # deterministic from (seed, epoch)
    draws = set()
    for epoch in range(1, 8):
        ds.set_epoch(epoch)
        draws.add(tuple(ds.epoch_names[8:]))
    assert len(draws) > 1
    assert len(RGBXDataset(config, 'train')) == N_TRAIN


def test_train_batch_normalises_on_device(generated):
    config = config_for('LLRGBD', generated['LLRGBD'], 'image_height=40', 'image_width=48')
    ds = RGBXDataset(config, 'train')
    batch = default_collate([ds[i] for i in range(len(ds))])
    assert batch['data'].shape == (N_TRAIN, 3, 40, 48) and batch['valid_box'].shape == (N_TRAIN, 4)
    data = normalize_batch(batch['data'], config.norm_mean, config.norm_std, batch['valid_box'])
    assert data.dtype == torch.float32 and torch.isfinite(data).all()
    for i, (top, bottom, left, right) in enumerate(batch['valid_box'].tolist()):
        outside = torch.ones(40, 48, dtype=torch.bool)
        outside[top:bottom, left:right] = False
        assert (data[i][:, outside] == 0).all() and (batch['label'][i][outside] == 255).all()
        assert (data[i][:, ~outside] != 0).any()


def test_train_items_from_a_tensor_preprocess(generated):
    """Whatever types a preprocess returns, labels are int64 and float images float32, as the authors'."""
    def preprocess(rgb, gt, x):
        return (torch.from_numpy(rgb.transpose(2, 0, 1) / 255.0), torch.from_numpy(gt),
                x.transpose(2, 0, 1).astype(np.float64))
    item = RGBXDataset(config_for('LLRGBD', generated['LLRGBD']), 'train', preprocess=preprocess)[0]
    assert item['data'].dtype == item['modal_x'].dtype == torch.float32
    assert item['label'].dtype == torch.int64 and item['label'].shape == (H, W)
    assert item['valid_box'].tolist() == [0, H, 0, W]


def test_dataset_pickles_for_loader_workers(generated):
    ds = RGBXDataset(config_for('LLRGBD', generated['LLRGBD']), 'train', file_length=6)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.epoch_names == ds.epoch_names
    random.seed(3)
    a = ds[2]
    random.seed(3)
    b = copy[2]
    assert torch.equal(a['data'], b['data']) and torch.equal(a['label'], b['label'])


def test_unknown_split(generated):
    with pytest.raises(ValueError, match='split'):
        RGBXDataset(config_for('LLRGBD', generated['LLRGBD']), 'test')


# ---- every DatasetError ----

def error_of(fn):
    with pytest.raises(DatasetError) as info:
        fn()
    return str(info.value)


def test_error_dataset_folder_missing(tmp_path):
    missing = str(tmp_path / 'nowhere')
    message = error_of(lambda: RGBXDataset(config_for('LLRGBD', missing), 'train'))
    assert missing in message and 'dataset_path' in message


def test_error_split_folder_missing(copy_of):
    path = copy_of('LLRGBD')
    shutil.rmtree(osp.join(path, 'test'))
    config = config_for('LLRGBD', path)
    RGBXDataset(config, 'train')
    message = error_of(lambda: RGBXDataset(config, 'val'))
    assert osp.join(path, 'test') in message and 'eval_split_dir' in message


def test_error_modality_folder_missing(copy_of):
    path = copy_of('LLRGBD')
    os.rename(osp.join(path, 'train', 'depth'), osp.join(path, 'train', 'Depth'))
    message = error_of(lambda: RGBXDataset(config_for('LLRGBD', path), 'train'))
    assert osp.join(path, 'train', 'depth') in message and 'x_folder' in message and 'Depth' in message


def test_error_list_file_missing_or_empty(copy_of):
    path = copy_of('MFNet')
    config = config_for('MFNet', path)
    os.remove(osp.join(path, 'test.txt'))
    message = error_of(lambda: RGBXDataset(config, 'val'))
    assert osp.join(path, 'test.txt') in message and 'eval_list' in message
    with open(osp.join(path, 'train.txt'), 'w') as f:
        f.write('\n  \n')
    message = error_of(lambda: RGBXDataset(config, 'train'))
    assert osp.join(path, 'train.txt') in message and 'empty' in message


def test_error_list_file_not_utf8(generated, tmp_path):
    source = tmp_path / 'utf16.txt'
    source.write_bytes('RGB/0000.jpg\nRGB/0001.jpg\n'.encode('utf-16'))  # Notepad's "Unicode"
    message = error_of(lambda: RGBXDataset(config_for('NYU', generated['NYU']), 'train', source=str(source)))
    assert str(source) in message and 'UTF-8' in message


def test_error_no_images_in_rgb_folder(copy_of):
    path = copy_of('LLRGBD')
    config = config_for('LLRGBD', path, "rgb_format='.jpg'", 'train_list=None')  # the folder, not the list
    message = error_of(lambda: RGBXDataset(config, 'train'))
    assert osp.join(path, 'train', 'rgb') in message and "'.png'" in message and 'rgb_format' in message


@pytest.mark.parametrize('folder', ['RGB', 'Thermal', 'Label'])
def test_error_listed_file_missing(copy_of, folder):
    path = copy_of('MFNet')
    config = config_for('MFNet', path)
    ds = RGBXDataset(config, 'val')
    victim = osp.join(path, folder, ds.names[1] + '.png')
    os.remove(victim)
    ds[0]
    message = error_of(lambda: ds[1])
    assert victim in message and 'does not exist' in message and osp.join(path, 'test.txt') in message


def test_error_listed_name_unknown(copy_of):
    path = copy_of('MFNet')
    with open(osp.join(path, 'train.txt'), 'a') as f:
        f.write('ghost\n')
    ds = RGBXDataset(config_for('MFNet', path), 'train')
    message = error_of(lambda: ds[len(ds) - 1])
    for folder in ('RGB', 'Thermal', 'Label'):
        assert osp.join(path, folder, 'ghost.png') in message


@pytest.mark.parametrize('dataset,rel,damage', [
    ('LLRGBD', 'train/rgb/00001.png', 'garbage'),
    ('LLRGBD', 'train/label/00001.png', 'truncate'),
    ('LLRGBD', 'train/depth/00001.png', 'empty'),
    ('NYU', 'RGB/0001.jpg', 'truncate'),
    ('NYU', 'HHA/0001.jpg', 'truncate'),
])
def test_error_unreadable_image(copy_of, dataset, rel, damage):
    path = copy_of(dataset)
    victim = osp.join(path, rel)
    data = open(victim, 'rb').read()
    data = {'garbage': b'not an image at all', 'truncate': data[:len(data) * 2 // 3], 'empty': b''}[damage]
    with open(victim, 'wb') as f:
        f.write(data)
    ds = RGBXDataset(config_for(dataset, path), 'train')
    message = error_of(lambda: ds[1])
    assert victim in message and 'cannot be decoded' in message
    ds[0]


def test_error_sizes_differ(copy_of):
    path = copy_of('LLRGBD')
    label_path = osp.join(path, 'train', 'label', '00002.png')
    cv2.imwrite(label_path, cv2.imread(label_path, cv2.IMREAD_UNCHANGED)[:20])
    message = error_of(lambda: RGBXDataset(config_for('LLRGBD', path), 'train')[2])
    assert label_path in message and f'{H}x{W}' in message and f'20x{W}' in message
    assert osp.join(path, 'train', 'rgb', '00002.png') in message


def test_error_label_values(copy_of):
    path = copy_of('LLRGBD')
    label_path = osp.join(path, 'train', 'label', '00003.png')
    label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    label[:2, :3] = 200
    label[5, 5] = 14
    cv2.imwrite(label_path, label)
    message = error_of(lambda: RGBXDataset(config_for('LLRGBD', path), 'train')[3])
    assert label_path in message and '[14, 200]' in message and '7 pixels' in message
    assert 'num_classes' in message and 'gt_transform' in message


def test_error_label_values_after_shift(copy_of):
    path = copy_of('NYU')
    label_path = osp.join(path, 'Label', '0000.png')
    label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    label[0, 0] = 45
    cv2.imwrite(label_path, label)
    message = error_of(lambda: RGBXDataset(config_for('NYU', path), 'train')[0])
    assert label_path in message and '[45]' in message and 'after the gt_transform shift' in message


def test_error_label_hint_one_based(copy_of):
    path = copy_of('LLRGBD')
    label_path = osp.join(path, 'train', 'label', '00000.png')
    label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED) + 1  # 1..14
    label[0, :3] = 255  # ignored pixels do not hide the hint
    cv2.imwrite(label_path, label)
    message = error_of(lambda: RGBXDataset(config_for('LLRGBD', path), 'train')[0])
    assert 'set gt_transform=True' in message


@pytest.mark.parametrize('bits', [16, 1])
def test_error_label_bit_depth(copy_of, bits):
    """OpenCV's 8-bit read turns 16-bit indices into 0 and a 1-bit mask into 0/255: no value error, so
    the file format itself is checked."""
    path = copy_of('LLRGBD')
    label_path = osp.join(path, 'train', 'label', '00001.png')
    label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    if bits == 16:
        cv2.imwrite(label_path, label.astype(np.uint16))
    else:
        Image.fromarray(label > 0).save(label_path)  # a 1-bit mask of 0/1
    ds = RGBXDataset(config_for('LLRGBD', path), 'train')
    message = error_of(lambda: ds[1])
    assert label_path in message and f'{bits}-bit' in message and 'Fix: save the labels as 8-bit' in message
    ds[0]


def test_error_label_palette_png(copy_of):
    path = copy_of('LLRGBD')
    label_path = osp.join(path, 'train', 'label', '00002.png')
    palette = Image.fromarray(cv2.imread(label_path, cv2.IMREAD_UNCHANGED), mode='P')
    palette.putpalette(np.random.default_rng(0).integers(64, 256, 3 * 256).astype(np.uint8).tobytes())
    palette.save(label_path)
    message = error_of(lambda: RGBXDataset(config_for('LLRGBD', path), 'train')[2])
    assert label_path in message and 'palette PNG' in message and 'not class indices' in message


# ---- the training loader (smmcl.data.loader) ----

def test_training_loader_uses_the_real_image_count_once(generated, caplog):
    """The config says 1418 images, the folder holds 4: 4 // 2 + 1 = 3 iterations of 2, the config
    itself untouched; a pinned niters_per_epoch wins."""
    from smmcl.data.loader import build_train_data
    from smmcl.engine.dist import DistContext
    config = config_for('LLRGBD', generated['LLRGBD'], 'batch_size=2', 'num_workers=0')
    data = build_train_data(config, DistContext())
    assert data.niters == 3 and len(data.loader.dataset) == 6 and data.loader.batch_size == 2
    assert (config.num_train_imgs, config.niters_per_epoch) == (1418, 1418 // 2 + 1)
    assert 'the training set has 4 images' in caplog.text
    pinned = config_for('LLRGBD', generated['LLRGBD'], 'batch_size=2', 'num_workers=0', 'niters_per_epoch=5')
    assert build_train_data(pinned, DistContext()).niters == 5
    data.sampler.set_epoch(1)
    assert next(iter(data.sampler))[0] == 1  # (epoch, index) keys for the per-sample seeding


def test_to_device_normalises_every_training_batch(generated):
    """The batch that reaches the model: normalize_batch's values, float32, labels int64."""
    from smmcl.data.loader import to_device
    config = config_for('LLRGBD', generated['LLRGBD'])
    batch = default_collate([RGBXDataset(config, 'train')[i] for i in range(2)])
    rgb, x, label = to_device(batch, config, torch.device('cpu'))
    expected = normalize_batch(batch['data'], config.norm_mean, config.norm_std, batch['valid_box'])
    assert rgb.dtype == x.dtype == torch.float32 and label.dtype == torch.int64
    assert torch.equal(rgb, expected) and rgb.shape == (2, 3, 16, 20)
