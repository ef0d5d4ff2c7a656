"""Segmenting your own images (smmcl.inference, smmcl.engine.predict_cli, SMMCL_*/predict.py) on a tiny
synthetic LLRGBD with a checkpoint of random tiny-MSCAN weights."""
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from easydict import EasyDict
from PIL import Image

from smmcl.config import REPO_ROOT, ConfigError, load_config
from smmcl.data.dataset import DatasetError, RGBXDataset
from smmcl.engine import eval_cli, predict_cli
from smmcl.visual import gamma_lift, prediction_palette
from smmcl.inference import Segmenter, load_model, _network_inputs
from smmcl.models import build_segmentor

from conftest import REGISTER_TINY_MSCAN

CONFIG = osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'config.py')


@pytest.fixture
def setup(tiny_llrgbd, tiny_mscan, tmp_path):
    """(overrides, config, checkpoint path): the tiny model on tiny_llrgbd's 48x64 test images, windows of
    32x48 (so the sliding-window path runs), a pretrained_model that does not exist (never read), and
    ``<checkpoint_dir>/epoch-3.pth`` in the authors' format."""
    overrides = [f'backbone={tiny_mscan}', 'decoder_embed_dim=32', 'eval_crop_size=[32,48]', 'num_workers=0',
                 f'dataset_path={tiny_llrgbd}', f'log_dir={tmp_path / "log"}',
                 f'pretrained_model={tmp_path / "no_such_imagenet.pth"}']
    config = load_config(CONFIG, overrides)
    ckpt = _write_checkpoint(config, osp.join(config.checkpoint_dir, 'epoch-3.pth'))
    return overrides, config, ckpt


def _write_checkpoint(config, path, **changes):
    cfg = EasyDict(config, **changes)
    torch.manual_seed(0)
    state = build_segmentor(cfg).state_dict()
    os.makedirs(osp.dirname(path), exist_ok=True)
    torch.save({'model': state, 'optimizer': {}, 'epoch': 3, 'iteration': 30}, path)  # the authors' format
    return path


def _test_images(config):
    rgb_dir, x_dir = (osp.join(config.eval_root, config[k]) for k in ('rgb_folder', 'x_folder'))
    return rgb_dir, x_dir, sorted(os.listdir(rgb_dir))


def _fails(argv, capsys) -> str:
    """stderr of a predict run that must exit with status 1."""
    with pytest.raises(SystemExit) as exc:
        predict_cli.main(CONFIG, argv)
    assert exc.value.code == 1
    return capsys.readouterr().err


def _ids(path):
    return np.asarray(Image.open(path))


# ---- the model ----

def test_load_model_reads_one_checkpoint_without_imagenet_weights(setup):
    _, config, ckpt = setup
    assert not osp.exists(config.pretrained_model)
    model = load_model(config, '3', 'cpu')  # an epoch of checkpoint_dir, as eval.py -e
    assert isinstance(model, torch.nn.Module) and not model.training
    saved = torch.load(ckpt, weights_only=True)['model']
    state = model.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert all(p.device.type == 'cpu' for p in model.parameters())
    assert torch.equal(load_model(config, ckpt).state_dict()['decode_head.conv_seg.weight'],
                       saved['decode_head.conv_seg.weight'])  # a .pth path, the default device
    _write_checkpoint(config, osp.join(config.checkpoint_dir, 'epoch-4.pth'))
    with pytest.raises(ConfigError, match='-e 3- names 2 checkpoints'):
        load_model(config, '3-')


# ---- outputs and eval.py's predictions ----

def test_predict_folders_gives_eval_predictions(setup, tmp_path, capsys):
    overrides, config, ckpt = setup
    eval_cli.main(CONFIG, ['-e', '3', '-p', str(tmp_path / 'eval'), '--set'] + overrides)
    rgb_dir, x_dir, names = _test_images(config)
    out = tmp_path / 'out'
    predict_cli.main(CONFIG, ['-e', '3', '--rgb', rgb_dir, '--x', x_dir, '-o', str(out), '-d', 'cpu',
                              '--set'] + overrides)
    assert capsys.readouterr().out.rstrip().endswith(f'2 predictions written to {out}')
    stems = [osp.splitext(n)[0] for n in names]
    assert sorted(os.listdir(out)) == sorted(f'{s}{suffix}.png' for s in stems
                                             for suffix in ('', '_color', '_overlay'))
    palette = prediction_palette(config.class_colors)
    for stem in stems:
        ids = Image.open(out / f'{stem}.png')
        assert ids.mode == 'L' and ids.size == (64, 48)
        ids = np.asarray(ids)
        assert len(np.unique(ids)) > 2 and ids.max() < 14  # not constant: the comparisons mean something
        # Pixel for pixel what eval.py -p writes for the same image at the same position.
        np.testing.assert_array_equal(ids, _ids(tmp_path / 'eval_color' / f'{stem}.png'))
        color = Image.open(out / f'{stem}_color.png')
        assert color.mode == 'P' and color.getpalette()[:9] == [0, 0, 0, 0, 0, 255, 232, 88, 47]
        np.testing.assert_array_equal(np.asarray(color), ids)
        # Half the class colour, half the gamma-lifted RGB image.
        rgb = np.asarray(Image.open(osp.join(rgb_dir, f'{stem}.png')).convert('RGB'))
        colours = np.asarray(palette, dtype=np.uint8).reshape(256, 3)[ids]
        expected = np.round((gamma_lift(rgb).astype(np.float32) + colours) / 2)
        overlay = np.asarray(Image.open(out / f'{stem}_overlay.png'))
        assert overlay.shape == (48, 64, 3)
        np.testing.assert_array_equal(overlay, expected)
    assert gamma_lift(np.array([0, 64, 255], dtype=np.uint8)).tolist() == [0, 136, 255]


def test_api_equals_cli_and_reads_as_the_dataset(setup, tmp_path):
    overrides, config, ckpt = setup
    rgb_dir, x_dir, names = _test_images(config)
    out = tmp_path / 'out'
    predict_cli.main(CONFIG, ['-e', ckpt, '--rgb', rgb_dir, '--x', x_dir, '-o', str(out),
                              '--set'] + overrides)
    seg = Segmenter.from_checkpoint(CONFIG, ckpt, 'cpu', overrides)
    assert not seg.model.training
    for index, name in enumerate(names):
        rgb = np.asarray(Image.open(osp.join(rgb_dir, name)).convert('RGB'))  # a numpy user's RGB order
        x = np.asarray(Image.open(osp.join(x_dir, name)))
        classes, scores = seg(rgb, x, index=index, with_scores=True)
        assert classes.shape == (48, 64) and scores.shape == (14, 48, 64)
        np.testing.assert_array_equal(classes, scores.argmax(0))
        np.testing.assert_array_equal(classes, _ids(out / name))
        # cv2.imread's BGR arrays, and a thermal / depth map passed as 3 equal channels
        bgr = cv2.imread(osp.join(rgb_dir, name))
        np.testing.assert_array_equal(seg(bgr, np.stack([x] * 3, -1), index=index, channel_order='bgr'),
                                      classes)
    # Another index draws other NMF bases (the seed is config.seed + index), as eval.py's images do.
    assert not np.array_equal(seg.scores(rgb, x, index=0), seg.scores(rgb, x, index=1))
    with pytest.raises(ValueError, match=r'rgb is 48x64 but x is 47x64'):
        seg(rgb, x[1:])
    with pytest.raises(ValueError, match='rgb must be an H-W-3 uint8 array'):
        seg(rgb.astype(np.float32), x)
    # The speed switches apply: the folded fast path predicts the same up to float rounding.
    fast = Segmenter.from_checkpoint(CONFIG, ckpt, 'cpu', overrides + ['fast_path=True'])
    assert fast.model is not seg.model
    assert (fast(rgb, x, index=index) == classes).mean() > 0.99


@pytest.mark.parametrize('true_rgb_order', [False, True])
@pytest.mark.parametrize('single_channel_x', [True, False])
def test_arrays_reach_the_network_as_dataset_items(setup, true_rgb_order, single_channel_x):
    # RGB-order arrays from PIL become exactly what RGBXDataset feeds (BGR unless true_rgb_order; X
    # replicated to 3 channels), for 1- and 3-channel X settings.
    overrides, _, _ = setup
    config = load_config(CONFIG, overrides + [f'true_rgb_order={true_rgb_order}',
                                              f'x_is_single_channel={single_channel_x}'])
    dataset = RGBXDataset(config, 'val')
    rgb_dir, x_dir, names = _test_images(config)
    item = dataset[0]
    rgb = np.asarray(Image.open(osp.join(rgb_dir, names[0])).convert('RGB'))
    x = np.asarray(Image.open(osp.join(x_dir, names[0])))
    net_rgb, net_x = _network_inputs(rgb, x, config, 'rgb')
    np.testing.assert_array_equal(net_rgb, item['data'])
    np.testing.assert_array_equal(net_x, item['modal_x'])
    assert not np.array_equal(net_rgb, rgb if not true_rgb_order else rgb[..., ::-1])


def test_an_image_of_another_size_and_list_files(setup, tmp_path):
    overrides, config, ckpt = setup
    rgb_dir, x_dir, names = _test_images(config)
    rgb = cv2.resize(cv2.imread(osp.join(rgb_dir, names[0])), (53, 37))
    x = cv2.resize(cv2.imread(osp.join(x_dir, names[0]), cv2.IMREAD_GRAYSCALE), (53, 37))
    (tmp_path / 'in').mkdir()
    cv2.imwrite(str(tmp_path / 'in' / 'odd.jpg'), rgb)
    cv2.imwrite(str(tmp_path / 'in' / 'odd_depth.png'), x)
    # List files: one path a line, relative to the list's folder; paired line by line.
    (tmp_path / 'rgb.txt').write_text(f'in/odd.jpg\n\n{osp.join(rgb_dir, names[1])}\n')
    (tmp_path / 'x.txt').write_text(f'in/odd_depth.png\n{osp.join(x_dir, names[1])}\n')
    out = tmp_path / 'out'
    predict_cli.main(CONFIG, ['-e', ckpt, '--rgb', str(tmp_path / 'rgb.txt'), '--x', str(tmp_path / 'x.txt'),
                              '-o', str(out), '--set'] + overrides)
    assert Image.open(out / 'odd.png').size == (53, 37)
    assert np.asarray(Image.open(out / 'odd_overlay.png')).shape == (37, 53, 3)
    seg = Segmenter.from_checkpoint(config, ckpt, 'cpu')
    jpeg = cv2.imread(str(tmp_path / 'in' / 'odd.jpg'))  # the JPEG as decoded, not the array written
    np.testing.assert_array_equal(_ids(out / 'odd.png'), seg(jpeg, x, index=0, channel_order='bgr'))
    assert Image.open(out / names[1]).size == (64, 48)


# ---- pairing and bad input ----

def test_folder_pairing_and_unpaired_files(tmp_path, capsys):
    for folder, files in (('rgb', ['b.png', 'a.jpg', 'c.png', 'notes.md']),
                          ('x', ['a.png', 'b.png', 'd.png'])):
        (tmp_path / folder).mkdir()
        for name in files:
            (tmp_path / folder / name).write_bytes(b'')
    (tmp_path / 'rgb' / 'c.png').unlink()
    rgb, x = str(tmp_path / 'rgb'), str(tmp_path / 'x')
    with pytest.raises(DatasetError) as exc:
        predict_cli.image_pairs(rgb, x)
    assert str(exc.value).startswith('unpaired images (1): X images without an RGB image of the same stem')
    assert osp.join(x, 'd.png') in str(exc.value)
    os.remove(osp.join(x, 'd.png'))
    assert predict_cli.image_pairs(rgb, x) == [(osp.join(rgb, 'a.jpg'), osp.join(x, 'a.png')),
                                              (osp.join(rgb, 'b.png'), osp.join(x, 'b.png'))]
    (tmp_path / 'rgb' / 'c.png').write_bytes(b'')
    err = _fails(['--rgb', rgb, '--x', x, '-o', str(tmp_path / 'out')], capsys)
    assert err.startswith('error: unpaired images (1): RGB images without an X image')
    assert osp.join(rgb, 'c.png') in err
    err = _fails(['--rgb', rgb, '--x', osp.join(x, 'a.png'), '-o', str(tmp_path / 'out')], capsys)
    assert f'--rgb {rgb} is a folder but --x {osp.join(x, "a.png")} is an image' in err


def test_bad_inputs_stop_with_one_message_naming_the_file(setup, tmp_path, capsys):
    overrides, config, ckpt = setup
    rgb_dir, x_dir, names = _test_images(config)
    rgb, x = osp.join(rgb_dir, names[0]), osp.join(x_dir, names[0])
    out = str(tmp_path / 'out')

    def run(rgb_path, x_path, *extra):
        err = _fails(['-e', ckpt, '--rgb', rgb_path, '--x', x_path, '-o', out, *extra, '--set'] + overrides,
                     capsys)
        assert err.count('\n') == 1 and err.startswith('error: ')
        return err

    missing = str(tmp_path / 'night.png')
    assert f'RGB image {missing} does not exist' in run(missing, x)
    (tmp_path / 'rgb.txt').write_text(f'{rgb}\n{missing}\n')
    (tmp_path / 'x.txt').write_text(f'{x}\n{x}\n')
    err = run(str(tmp_path / 'rgb.txt'), str(tmp_path / 'x.txt'))
    assert f'RGB image {missing} does not exist (listed in {tmp_path / "rgb.txt"}' in err
    broken = tmp_path / 'broken.png'
    broken.write_bytes(open(x, 'rb').read()[:60])  # a truncated PNG
    assert f'X image {broken} cannot be decoded' in run(rgb, str(broken))
    small = tmp_path / 'small.png'
    cv2.imwrite(str(small), cv2.imread(x)[:40])
    assert f'RGB image {rgb} is 48x64 but X image {small} is 40x64' in run(rgb, str(small))
    other = _write_checkpoint(config, str(tmp_path / 'nine.pth'), num_classes=9)
    assert f'checkpoint {other} was trained with 9 classes (config: 14)' in run(rgb, x, '-e', other)
    assert 'epoch-7.pth does not exist' in run(rgb, x, '-e', '7')
    assert "-d 'gpu0': expected 'cpu' or one GPU index" in run(rgb, x, '-d', 'gpu0')
    (tmp_path / 'a.txt').write_text('one.png\ntwo.png\n')
    (tmp_path / 'b.txt').write_text('one.png\n')
    assert 'names 2 images but X list file' in run(str(tmp_path / 'a.txt'), str(tmp_path / 'b.txt'))
    assert not osp.exists(out) or not os.listdir(out)  # nothing written for an input refused up front


def test_an_output_path_that_is_a_file_stops_at_start(setup, tmp_path, capsys, monkeypatch):
    overrides, config, ckpt = setup
    rgb_dir, x_dir, names = _test_images(config)
    taken = tmp_path / 'taken'
    taken.write_text('a file')
    monkeypatch.setattr('smmcl.inference.Segmenter.from_checkpoint', None)  # must not be reached
    err = _fails(['-e', ckpt, '--rgb', rgb_dir, '--x', x_dir, '-o', str(taken), '--set'] + overrides, capsys)
    assert err == f'error: -o {taken}: {taken} is a file, and the outputs need a folder there; name another ' \
                  f'folder or move the file away\n'
    monkeypatch.setattr(eval_cli, 'launch', None)  # nor any evaluation
    (tmp_path / 'preds_color').write_text('a file')
    for save, blocker in ((taken, taken), (tmp_path / 'preds', tmp_path / 'preds_color')):
        with pytest.raises(SystemExit):
            eval_cli.main(CONFIG, ['-e', ckpt, '-p', str(save), '--set'] + overrides)
        assert f'{blocker} is a file' in capsys.readouterr().err
    assert not (tmp_path / 'preds').exists()


@pytest.mark.integration
def test_predict_script(setup, tmp_path):
    # The experiment folder's thin script, in a child process (the tiny backbone registered first).
    overrides, config, ckpt = setup
    rgb_dir, x_dir, names = _test_images(config)
    argv = ['predict.py', '-e', '3', '--rgb', osp.join(rgb_dir, names[1]), '--x', osp.join(x_dir, names[1]),
            '-o', str(tmp_path / 'out'), '--set'] + overrides
    script = (REGISTER_TINY_MSCAN + f'import runpy, sys\nsys.argv = {argv!r}\n'
              f"runpy.run_path({osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'predict.py')!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f'1 predictions written to {tmp_path / "out"}' in result.stdout
    stem = osp.splitext(names[1])[0]
    seg = Segmenter.from_checkpoint(config, '3', 'cpu')
    expected = seg(cv2.imread(osp.join(rgb_dir, names[1])), cv2.imread(osp.join(x_dir, names[1]), 0),
                   channel_order='bgr')  # a single pair is image 0
    np.testing.assert_array_equal(_ids(tmp_path / 'out' / f'{stem}.png'), expected)
