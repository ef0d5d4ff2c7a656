"""Dataset converters (smmcl.data.convert) on tiny inputs in the downloaded formats; the checker passes."""
import os
import os.path as osp

import cv2
import numpy as np
import pytest

from smmcl.config import REPO_ROOT
from smmcl.data import check
from smmcl.data.convert import main
from smmcl.data.hha import encode_hha

MFNET_CONFIG = osp.join(REPO_ROOT, 'SMMCL_MFNet', 'config.py')
NYU_CONFIG = osp.join(REPO_ROOT, 'SMMCL_NYU', 'config.py')
H, W = 48, 64
INTRINSICS = (60.0, 60.0, 32.5, 24.5)
SPLITS = {'train': ['00001D', '00002N', '00003D'], 'val': ['00004N', '00005D'],
          'test': ['00006D', '00007N', '00008D', '00009N']}


def write_list(path, names):
    with open(path, 'w') as f:
        f.write(''.join(f'{n}\n' for n in names))


def read_lines(path):
    with open(path) as f:
        return f.read().split()


def run_check(config, path, capsys):
    code = check.main([config, '--set', f'dataset_path={path}', '--workers', '1'])
    return code, capsys.readouterr().out


@pytest.fixture
def mfnet_release(tmp_path):
    """MFNet's release format: images/ 4-channel PNGs (R, G, B, thermal), labels/, list files."""
    src = tmp_path / 'ir_seg_dataset'
    (src / 'images').mkdir(parents=True)
    (src / 'labels').mkdir()
    rng = np.random.default_rng(0)
    for names in SPLITS.values():
        for name in names:
            cv2.imwrite(str(src / 'images' / f'{name}.png'), rng.integers(0, 256, (H, W, 4), np.uint8))
            cv2.imwrite(str(src / 'labels' / f'{name}.png'), rng.integers(0, 9, (H, W), np.uint8))
    for split, names in SPLITS.items():
        write_list(src / f'{split}.txt', names)
    return src


def test_mfnet_release_to_our_layout(mfnet_release, tmp_path, capsys):
    out = tmp_path / 'MFNet'
    assert main(['mfnet', '--src', str(mfnet_release), '--out', str(out), '--workers', '2']) == 0
    assert sorted(os.listdir(out)) == sorted(['RGB', 'Thermal', 'Label', 'train.txt', 'val.txt',
                                              'train_val.txt', 'test.txt', 'test_day.txt', 'test_night.txt'])
    assert read_lines(out / 'train_val.txt') == SPLITS['train'] + SPLITS['val']
    assert read_lines(out / 'test.txt') == SPLITS['test']
    assert read_lines(out / 'test_day.txt') == ['00006D', '00008D']
    assert read_lines(out / 'test_night.txt') == ['00007N', '00009N']
    for name in SPLITS['train'] + SPLITS['test']:
        release = cv2.imread(str(mfnet_release / 'images' / f'{name}.png'), cv2.IMREAD_UNCHANGED)
        rgb = cv2.imread(str(out / 'RGB' / f'{name}.png'), cv2.IMREAD_UNCHANGED)
        thermal = cv2.imread(str(out / 'Thermal' / f'{name}.png'), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(rgb, release[..., :3]) and np.array_equal(thermal, release[..., 3])
        with open(mfnet_release / 'labels' / f'{name}.png', 'rb') as a, open(out / 'Label' / f'{name}.png',
                                                                              'rb') as b:
            assert a.read() == b.read()
    capsys.readouterr()
    code, report = run_check(MFNET_CONFIG, out, capsys)
    assert code == 0, report
    assert 'no problems' in report and 'train: 3 items' in report and 'val: 4 items' in report  # CMX's train.txt


def test_mfnet_release_day_night_lists_are_kept(mfnet_release, tmp_path):
    write_list(mfnet_release / 'test_day.txt', ['00008D'])  # a copy with its own (here: shorter) lists
    write_list(mfnet_release / 'test_night.txt', ['00007N', '00009N'])
    out = tmp_path / 'MFNet'
    assert main(['mfnet', '--src', str(mfnet_release), '--out', str(out)]) == 0
    assert read_lines(out / 'test_day.txt') == ['00008D']
    assert read_lines(out / 'test_night.txt') == ['00007N', '00009N']


def test_mfnet_errors_name_the_file(mfnet_release, tmp_path, capsys):
    three = mfnet_release / 'images' / '00002N.png'
    cv2.imwrite(str(three), np.zeros((H, W, 3), np.uint8))
    os.remove(mfnet_release / 'labels' / '00007N.png')
    assert main(['mfnet', '--src', str(mfnet_release), '--out', str(tmp_path / 'out')]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('ERROR ')]
    assert len(errors) == 2
    assert str(three) in errors[0] and '3 channel(s)' in errors[0] and 'Fix' in errors[0]
    assert '00007N.png' in errors[1] and 'does not exist' in errors[1]
    os.remove(mfnet_release / 'val.txt')
    assert main(['mfnet', '--src', str(mfnet_release), '--out', str(tmp_path / 'out')]) == 1
    assert 'val.txt does not exist' in capsys.readouterr().err


def plane_depth(normal, offset_cm):
    """Depth in metres of the plane ``normal . p = offset`` seen by the tiny camera (0 where missed)."""
    fx, fy, cx, cy = INTRINSICS
    u, v = np.meshgrid((np.arange(1, W + 1) - cx) / fx, (np.arange(1, H + 1) - cy) / fy)
    with np.errstate(divide='ignore'):
        z = offset_cm / (normal[0] * u + normal[1] * v + normal[2])
    return np.where((z > 0) & np.isfinite(z), z, 0.0) / 100


@pytest.fixture
def rgbd_folder(tmp_path):
    """A raw RGB-D folder: rgb/ PNGs, depth/ 16-bit PNGs in mm, label/ PNGs (0..40), test.txt."""
    src = tmp_path / 'raw'
    for sub in ('rgb', 'depth', 'label'):
        (src / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = ['kitchen_1', 'kitchen_2', 'office_1']
    for i, name in enumerate(names):
        tilt = np.deg2rad(20 + 10 * i)  # a floor seen by a camera pitched down
        depth = plane_depth((0.0, np.cos(tilt), np.sin(tilt)), 130.0)
        depth[rng.random(depth.shape) < 0.03] = 0  # sensor holes
        cv2.imwrite(str(src / 'depth' / f'{name}.png'), np.round(depth * 1000).astype(np.uint16))
        cv2.imwrite(str(src / 'rgb' / f'{name}.png'), rng.integers(0, 256, (H, W, 3), np.uint8))
        cv2.imwrite(str(src / 'label' / f'{name}.png'), rng.integers(0, 41, (H, W), np.uint8))
    write_list(src / 'test.txt', ['office_1'])
    return src


def rgbd_args(src, out):
    return ['rgbd', '--src', str(src), '--out', str(out), '--intrinsics', *map(str, INTRINSICS)]


def test_rgbd_folder_to_nyu_layout(rgbd_folder, tmp_path, capsys):
    out = tmp_path / 'NYU'
    assert main(rgbd_args(rgbd_folder, out)) == 0
    assert read_lines(out / 'train.txt') == ['RGB/kitchen_1.jpg', 'RGB/kitchen_2.jpg']  # the rest
    assert read_lines(out / 'test.txt') == ['RGB/office_1.jpg']
    for name in ('kitchen_1', 'kitchen_2', 'office_1'):
        stored = cv2.imread(str(rgbd_folder / 'depth' / f'{name}.png'), cv2.IMREAD_UNCHANGED)
        expected = encode_hha(stored * 0.001, INTRINSICS)
        hha = cv2.imread(str(out / 'HHA' / f'{name}.jpg'), cv2.IMREAD_COLOR)[..., ::-1]  # R, G, B
        assert np.median(np.abs(hha.astype(int) - expected)) <= 2  # JPEG
        assert np.allclose(hha.mean((0, 1)), expected.mean((0, 1)), atol=3)  # channels in order
        assert np.median(expected[..., 2][stored > 0]) == 38  # a floor
        label = cv2.imread(str(out / 'Label' / f'{name}.png'), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(label, cv2.imread(str(rgbd_folder / 'label' / f'{name}.png'),
                                                cv2.IMREAD_UNCHANGED))
        rgb = cv2.imread(str(out / 'RGB' / f'{name}.jpg'), cv2.IMREAD_COLOR)
        assert rgb.shape == (H, W, 3)
    capsys.readouterr()
    code, report = run_check(NYU_CONFIG, out, capsys)
    assert code == 0, report
    assert 'train: 2 items' in report and 'val: 1 items' in report


def test_unlabelled_rgbd_folder_serves_prediction_only(rgbd_folder, tmp_path, capsys):
    for name in os.listdir(rgbd_folder / 'label'):
        os.remove(rgbd_folder / 'label' / name)
    os.rmdir(rgbd_folder / 'label')
    os.remove(rgbd_folder / 'test.txt')
    jpeg = rgbd_folder / 'rgb' / 'office_1.jpg'  # JPEG colour is copied, not compressed again
    cv2.imwrite(str(jpeg), cv2.imread(str(rgbd_folder / 'rgb' / 'office_1.png')))
    os.remove(rgbd_folder / 'rgb' / 'office_1.png')
    out = tmp_path / 'NYU'
    assert main(rgbd_args(rgbd_folder, out)) == 0
    assert 'for prediction only' in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ['HHA', 'RGB', 'test.txt']
    assert len(read_lines(out / 'test.txt')) == 3
    with open(jpeg, 'rb') as a, open(out / 'RGB' / 'office_1.jpg', 'rb') as b:
        assert a.read() == b.read()
    code, report = run_check(NYU_CONFIG, out, capsys)
    assert code == 0, report
    assert 'test: 3 items' in report and 'cannot be trained on or scored' in report
    os.remove(out / 'HHA' / 'kitchen_2.jpg')  # the prediction check still finds what is missing
    code, report = run_check(NYU_CONFIG, out, capsys)
    assert code == 1 and str(out / 'HHA' / 'kitchen_2.jpg') in report


def test_rgbd_errors_name_the_file(rgbd_folder, tmp_path, capsys):
    eight_bit = rgbd_folder / 'depth' / 'kitchen_1.png'
    cv2.imwrite(str(eight_bit), np.full((H, W), 100, np.uint8))
    raw_classes = rgbd_folder / 'label' / 'kitchen_2.png'
    cv2.imwrite(str(raw_classes), np.full((H, W), 894, np.uint16))
    small = rgbd_folder / 'rgb' / 'office_1.png'
    cv2.imwrite(str(small), np.zeros((H // 2, W // 2, 3), np.uint8))
    assert main(rgbd_args(rgbd_folder, tmp_path / 'out')) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith('ERROR ')]
    assert len(errors) == 3
    assert str(eight_bit) in errors[0] and '16-bit' in errors[0]
    assert str(raw_classes) in errors[1] and '894' in errors[1] and 'Fix' in errors[1]
    assert str(small) in errors[2] and '24x32' in errors[2]


def test_rgbd_filled_depth_with_raw_holes(rgbd_folder, tmp_path):
    """NYU's toolbox gives hole-filled depth and the raw depth: saveHHA.m's D and RD."""
    (rgbd_folder / 'rawdepth').mkdir()
    for name in os.listdir(rgbd_folder / 'depth'):
        filled = cv2.imread(str(rgbd_folder / 'depth' / name), cv2.IMREAD_UNCHANGED)
        filled[filled == 0] = 4000  # filled in
        cv2.imwrite(str(rgbd_folder / 'depth' / name), filled)
        raw = filled.copy()
        raw[10:20, 10:20] = 0
        cv2.imwrite(str(rgbd_folder / 'rawdepth' / name), raw)
    out = tmp_path / 'NYU'
    assert main(rgbd_args(rgbd_folder, out) + ['--raw-depth-dir', 'rawdepth']) == 0
    filled = cv2.imread(str(rgbd_folder / 'depth' / 'office_1.png'), cv2.IMREAD_UNCHANGED)
    raw = cv2.imread(str(rgbd_folder / 'rawdepth' / 'office_1.png'), cv2.IMREAD_UNCHANGED)
    expected = encode_hha(filled * 0.001, INTRINSICS, missing=raw == 0)
    assert not np.array_equal(expected, encode_hha(filled * 0.001, INTRINSICS))  # the holes matter
    hha = cv2.imread(str(out / 'HHA' / 'office_1.jpg'), cv2.IMREAD_COLOR)[..., ::-1]
    assert np.median(np.abs(hha.astype(int) - expected)) <= 2
    assert expected[10:20, 10:20, 0].min() >= 77 and hha[10:20, 10:20, 0].min() > 40  # not left at 0
