"""Sliding-window evaluation (smmcl.engine.evaluate): tiling, resizing, batched == plain, whole image."""
import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from smmcl.config import base_config
from smmcl.engine.evaluate import (evaluate, evaluate_per_image, pad_margins, predict, predict_scores,
                                   resize_scores, sliding_window_scores, sliding_window_scores_plain,
                                   sliding_windows, to_input)
from smmcl.models import EncoderDecoder

K = 5


class PixelModel(nn.Module):
    """Logits at a pixel depend on that pixel's input only (a 1x1 convolution)."""

    def __init__(self, k=K):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(6, k, 1)

    def forward(self, rgb, x):
        return self.conv(torch.cat([rgb, x], 1))


class ContextModel(nn.Module):
    """Logits depend on a neighbourhood and on the window's position (zero padding), so windows matter."""

    def __init__(self, k=K):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, k, 5, padding=2))

    def forward(self, rgb, x):
        return self.net(torch.cat([rgb, x], 1))


def eval_config(**changes):
    cfg = base_config()
    cfg.update(num_classes=K, eval_crop_size=[16, 24], eval_stride_rate=2 / 3, eval_scale_array=[1],
               eval_flip=False, eval_batch_size=1)
    cfg.update(changes)
    return cfg


def images(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


class FakeDataset:
    """The 'val' item format of smmcl.data.dataset.RGBXDataset."""

    def __init__(self, n=5, h=20, w=30, k=K):
        rng = np.random.default_rng(1)
        self.items = []
        for i in range(n):
            rgb, x = images(h, w, seed=10 + i)
            label = rng.integers(0, k, (h, w)).astype(np.uint8)
            label[:2] = 255
            self.items.append(dict(data=rgb, modal_x=x, label=label, fn=f'img{i:02d}', n=n))
        self.names = [it['fn'] for it in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 120), st.integers(1, 120), st.integers(1, 50), st.integers(1, 50),
       st.floats(0.1, 1.0))
def test_windows_tile_the_padded_image(h, w, crop_h, crop_w, stride_rate):
    top, bottom, left, right = pad_margins(h, w, (crop_h, crop_w))
    rows, cols = h + top + bottom, w + left + right
    assert rows == max(h, crop_h) and cols == max(w, crop_w)
    assert top <= bottom <= top + 1 and left <= right <= left + 1
    covered = np.zeros((rows, cols), dtype=bool)
    windows = sliding_windows(rows, cols, (crop_h, crop_w), stride_rate)
    for t, l in windows:
        assert 0 <= t and t + crop_h <= rows and 0 <= l and l + crop_w <= cols  # inside, full crop size
        covered[t:t + crop_h, l:l + crop_w] = True
    assert covered.all()
    assert len(set(windows)) == len(windows)
    if rows == crop_h and cols == crop_w:
        assert windows == [(0, 0)]  # an image that fits: one forward


def test_authors_grid_on_a_large_image():
    # 600x800 padded, crop 480x640, stride ceil(320), ceil(426.67) = 320, 427.
    assert sliding_windows(600, 800, (480, 640), 2 / 3) == [(0, 0), (0, 160), (120, 0), (120, 160)]


@pytest.mark.parametrize('src,dst', [((360, 480), (480, 640)), ((37, 53), (32, 48)), ((97, 31), (13, 200)),
                                     ((16, 24), (32, 48)), ((21, 33), (21, 33))])
def test_resize_scores_matches_cv2(src, dst):
    scores = np.random.default_rng(0).standard_normal((src[0], src[1], 6)).astype(np.float32)
    expected = cv2.resize(scores, (dst[1], dst[0]), interpolation=cv2.INTER_LINEAR)
    got = resize_scores(torch.from_numpy(scores).permute(2, 0, 1), dst).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_to_input_normalises_in_float32():
    rgb, _ = images(4, 5)
    cfg = eval_config()
    t = to_input(rgb, cfg.norm_mean, cfg.norm_std, 'cpu')
    assert t.dtype == torch.float32 and t.shape == (3, 4, 5)
    expected = ((rgb / 255.0 - cfg.norm_mean) / cfg.norm_std).transpose(2, 0, 1)
    np.testing.assert_allclose(t.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize('size', [(20, 30), (16, 24), (9, 50), (41, 23)])
@pytest.mark.parametrize('flip', [False, True])
def test_sliding_window_equals_whole_image_for_a_pixelwise_model(size, flip):
    model = PixelModel().eval()
    cfg = eval_config()
    rgb, x = images(*size)
    rgb_t, x_t = (to_input(img, cfg.norm_mean, cfg.norm_std, 'cpu') for img in (rgb, x))
    with torch.no_grad():
        whole = model(rgb_t[None], x_t[None])[0]
    whole = torch.exp(2 * whole if flip else whole)  # a 1x1 conv commutes with the flip
    for fn in (sliding_window_scores_plain, sliding_window_scores):
        got = fn(model, rgb_t, x_t, (16, 24), 2 / 3, flip)
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)


def test_one_window_equals_a_forward_of_the_real_model():
    # An image no larger than the crop: one forward on it (padded to the crop) -- with SMMCL's own model.
    cfg = eval_config(eval_crop_size=[32, 48])
    cfg.update(backbone='mscan_t', pretrained_model=None, decoder_embed_dim=64)
    model = EncoderDecoder(cfg).eval()
    rgb, x = images(32, 48)
    torch.manual_seed(3)  # the NMF decoder draws random bases every forward
    scores = predict_scores(model, rgb, x, cfg, 'cpu')
    torch.manual_seed(3)
    with torch.no_grad():
        logits = model(to_input(rgb, cfg.norm_mean, cfg.norm_std, 'cpu')[None],
                       to_input(x, cfg.norm_mean, cfg.norm_std, 'cpu')[None])[0]
    torch.testing.assert_close(scores, torch.exp(logits), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('size', [(20, 30), (50, 70), (12, 60)])
@pytest.mark.parametrize('flip', [False, True])
@pytest.mark.parametrize('batch', [1, 3, 64])
def test_batched_equals_plain(size, flip, batch):
    model = ContextModel().eval()
    cfg = eval_config()
    rgb, x = images(*size)
    rgb_t, x_t = (to_input(img, cfg.norm_mean, cfg.norm_std, 'cpu') for img in (rgb, x))
    plain = sliding_window_scores_plain(model, rgb_t, x_t, (16, 24), 2 / 3, flip)
    batched = sliding_window_scores(model, rgb_t, x_t, (16, 24), 2 / 3, flip, batch)
    assert plain.shape == (K,) + size
    torch.testing.assert_close(batched, plain, rtol=1e-5, atol=1e-6)
    if size == (50, 70) and not flip:  # several windows, and this model's scores depend on them
        with torch.no_grad():
            whole = torch.exp(model(rgb_t[None], x_t[None])[0])
        assert not torch.allclose(plain, whole, rtol=1e-3)


def test_multi_scale_flip_prediction_batched_equals_plain():
    model = ContextModel().eval()
    cfg = eval_config(eval_scale_array=[0.5, 0.75, 1, 1.5], eval_flip=True, eval_batch_size=4)
    rgb, x = images(30, 45)
    plain = predict_scores(model, rgb, x, cfg, 'cpu', plain=True)
    batched = predict_scores(model, rgb, x, cfg, 'cpu')
    assert plain.shape == (K, 30, 45)
    torch.testing.assert_close(batched, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(predict(model, rgb, x, cfg, 'cpu'), plain.argmax(0))


def test_evaluate_counts_shards_and_saves(tmp_path):
    model = ContextModel().train()
    cfg = eval_config()
    data = FakeDataset()
    hist = evaluate(model, data, cfg, 'cpu', save_dir=str(tmp_path))
    assert model.training  # mode restored
    assert hist.shape == (K, K) and hist.dtype == np.int64
    assert hist.sum() == sum(np.count_nonzero(it['label'] != 255) for it in data.items)
    # sharded by index: the two halves add up to the whole (the all-reduce is a no-op here)
    parts = [evaluate(model, data, cfg, 'cpu', rank=r, world_size=2) for r in range(2)]
    np.testing.assert_array_equal(parts[0] + parts[1], hist)
    per_image = evaluate_per_image(model, data, cfg, 'cpu', rank=1, world_size=2)
    assert per_image[0].sum() == 0 and per_image[1].sum() > 0
    # palette PNGs hold the class indices
    for it in data.items:
        img = Image.open(tmp_path / f"{it['fn']}.png")
        assert img.mode == 'P' and img.size == (30, 20)
        expected = predict(model.eval(), it['data'], it['modal_x'], cfg, 'cpu').numpy()
        np.testing.assert_array_equal(np.asarray(img), expected)


def test_a_bad_label_is_refused_naming_the_item():
    # Values outside the classes are an error (CMX's hist_info drops them), and the message names the file.
    model = PixelModel().eval()
    data = FakeDataset(n=3)
    data.items[2]['label'][5, 5] = K
    with pytest.raises(ValueError, match=rf'img02: label holds values \[{K}\]'):
        evaluate(model, data, eval_config(), 'cpu')
