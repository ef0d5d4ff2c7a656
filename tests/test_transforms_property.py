"""The authors' training augmentation and its fast equivalent: equality, invariants, properties."""
import random

import cv2
import numpy as np
import pytest
import torch
from easydict import EasyDict
from hypothesis import given, settings
from hypothesis import strategies as st

from smmcl.data.transforms import (generate_random_crop_pos, normalize, normalize_batch, pad_image_to_shape,
                                   train_transform, train_transform_plain)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def make_config(crop_h, crop_w, scales=(0.5, 0.75, 1, 1.25, 1.5, 1.75)):
    return EasyDict(image_height=crop_h, image_width=crop_w, norm_mean=MEAN, norm_std=STD,
                    train_scale_array=None if scales is None else list(scales))


def make_sample(h, w, seed, n_labels=5):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    gt = rng.choice(np.append(np.arange(n_labels), 255).astype(np.uint8), (h, w))
    return rgb, gt, x


def run_both(rgb, gt, x, config, seed):
    """(fast output normalised on 'device', fast valid box, plain output) for the same random seed."""
    random.seed(seed)
    f_rgb, f_gt, f_x, box = train_transform(rgb, gt, x, config)
    random.seed(seed)
    p_rgb, p_gt, p_x = train_transform_plain(rgb, gt, x, config)
    n_rgb, n_x = (normalize_batch(t[None], MEAN, STD, box[None])[0] for t in (f_rgb, f_x))
    return (n_rgb, f_gt, n_x, box), (p_rgb, p_gt, p_x)


def assert_same(fast, plain):
    n_rgb, f_gt, n_x, _ = fast
    p_rgb, p_gt, p_x = plain
    assert n_rgb.dtype == torch.float32 and f_gt.dtype == torch.int64
    np.testing.assert_allclose(n_rgb.numpy(), p_rgb, rtol=0, atol=1e-5)
    np.testing.assert_allclose(n_x.numpy(), p_x, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(f_gt.numpy(), p_gt)


@pytest.mark.parametrize('h,w,crop', [(40, 56, (32, 48)), (20, 30, (32, 48)), (33, 49, (32, 48)),
                                      (64, 24, (32, 32))])
def test_fast_equals_plain(h, w, crop):
    rgb, gt, x = make_sample(h, w, seed=h * w)
    config = make_config(*crop)
    for seed in range(12):
        fast, plain = run_both(rgb, gt, x, config, seed)
        assert_same(fast, plain)
        assert fast[0].shape == (3, *crop) and plain[0].shape == (3, *crop)


def test_plain_matches_authors_steps(monkeypatch):
    """Identity scale, no mirror, image smaller than the crop: centred pad, normalised values."""
    rgb, gt, x = make_sample(5, 6, seed=1)
    config = make_config(8, 9, scales=[1])
    monkeypatch.setattr(random, 'random', lambda: 0.1)  # no mirror
    p_rgb, p_gt, p_x = train_transform_plain(rgb, gt, x, config)
    # pad 3 rows: 1 top, 2 bottom; pad 3 columns: 1 left, 2 right
    np.testing.assert_array_equal(p_gt[1:6, 1:7], gt)
    assert (p_gt[0] == 255).all() and (p_gt[6:] == 255).all() and (p_gt[:, 0] == 255).all()
    np.testing.assert_allclose(p_rgb[:, 1:6, 1:7], ((rgb / 255.0 - MEAN) / STD).transpose(2, 0, 1))
    assert (p_rgb[:, 0] == 0).all() and (p_x[:, :, 7:] == 0).all()


def test_random_crop_pos_upper_bound_is_inclusive(monkeypatch):
    """randint(0, h - crop_h + 1) may return its upper bound: one row of padding at the bottom."""
    monkeypatch.setattr(random, 'randint', lambda a, b: b)
    assert generate_random_crop_pos((40, 50), (32, 48)) == (9, 3)
    rgb, gt, x = make_sample(40, 50, seed=2, n_labels=3)
    config = make_config(32, 48, scales=None)
    monkeypatch.setattr(random, 'random', lambda: 0.9)  # mirror
    f_rgb, f_gt, f_x, box = train_transform(rgb, gt, x, config)
    assert box.tolist() == [0, 31, 0, 47]
    assert (f_gt[31] == 255).all() and (f_gt[:, 47] == 255).all()
    assert (f_rgb[:, 31] == 0).all() and (f_x[:, :, 47] == 0).all()
    np.testing.assert_array_equal(f_gt[:31, :47].numpy(), gt[:, ::-1][9:40, 3:50])
    p_rgb, p_gt, _ = train_transform_plain(rgb, gt, x, config)
    np.testing.assert_array_equal(p_gt, f_gt.numpy())


def test_pad_image_to_shape_margins():
    img, margin = pad_image_to_shape(np.ones((3, 4), np.uint8), (8, 7), cv2.BORDER_CONSTANT, 255)
    assert margin.tolist() == [2, 3, 1, 2] and img.shape == (8, 7)
    assert img.sum() == 12 + 255 * (56 - 12)


def test_normalize_batch_matches_normalize_and_masks():
    rgb, _, _ = make_sample(6, 7, seed=3)
    imgs = torch.from_numpy(np.stack([rgb, rgb[::-1]]).transpose(0, 3, 1, 2).copy())
    boxes = torch.tensor([[0, 6, 0, 7], [1, 4, 2, 5]])
    out = normalize_batch(imgs, MEAN, STD, boxes)
    np.testing.assert_allclose(out[0].numpy(), normalize(rgb, MEAN, STD).transpose(2, 0, 1), atol=1e-5)
    valid = torch.zeros(6, 7, dtype=torch.bool)
    valid[1:4, 2:5] = True
    assert (out[1][:, ~valid] == 0).all()
    expected = normalize(rgb[::-1], MEAN, STD).transpose(2, 0, 1)[:, valid.numpy()]
    np.testing.assert_allclose(out[1][:, valid].numpy(), expected, atol=1e-5)
    assert torch.equal(normalize_batch(imgs, MEAN, STD), normalize_batch(imgs.float(), MEAN, STD))


# ---- hypothesis properties ----

shapes = st.tuples(st.integers(4, 48), st.integers(4, 48))
scale_lists = st.lists(st.sampled_from([0.5, 0.75, 1, 1.25, 1.5, 1.75, 2.0]), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(size=shapes, crop=shapes, scales=scale_lists, data_seed=st.integers(0, 2 ** 16),
       seed=st.integers(0, 2 ** 16), n_labels=st.integers(1, 20))
def test_properties(size, crop, scales, data_seed, seed, n_labels):
    (h, w), (crop_h, crop_w) = size, crop
    rgb, gt, x = make_sample(h, w, data_seed, n_labels)
    config = make_config(crop_h, crop_w, scales)
    fast, plain = run_both(rgb, gt, x, config, seed)
    n_rgb, f_gt, n_x, box = fast
    # shapes are always the crop size
    assert n_rgb.shape == n_x.shape == (3, crop_h, crop_w) and f_gt.shape == (crop_h, crop_w)
    # labels only hold values of the input label or 255
    assert set(np.unique(f_gt.numpy())) <= set(np.unique(gt)) | {255}
    # pads: 255 in the label, 0 in the normalised images
    top, bottom, left, right = box.tolist()
    assert 0 <= top < bottom <= crop_h and 0 <= left < right <= crop_w
    valid = np.zeros((crop_h, crop_w), bool)
    valid[top:bottom, left:right] = True
    assert (f_gt.numpy()[~valid] == 255).all()
    assert (n_rgb.numpy()[:, ~valid] == 0).all() and (n_x.numpy()[:, ~valid] == 0).all()
    assert (plain[1][~valid] == 255).all() and (plain[0][:, ~valid] == 0).all()
    # fast == plain
    assert_same(fast, plain)


@settings(max_examples=40, deadline=None)
@given(size=shapes, extra=st.tuples(st.integers(0, 8), st.integers(0, 8)), data_seed=st.integers(0, 2 ** 16),
       seed=st.integers(0, 2 ** 16))
def test_identity_scale_without_crop_preserves_label_histogram(size, extra, data_seed, seed):
    (h, w), (eh, ew) = size, extra
    rgb, gt, x = make_sample(h, w, data_seed, n_labels=7)
    config = make_config(h + eh, w + ew, scales=[1])
    random.seed(seed)
    _, f_gt, _, box = train_transform(rgb, gt, x, config)
    before = np.bincount(gt.ravel(), minlength=256)
    after = np.bincount(f_gt.numpy().ravel(), minlength=256)
    before[255] += (h + eh) * (w + ew) - h * w  # the pads
    np.testing.assert_array_equal(before, after)
    assert (box[1] - box[0]).item() == h and (box[3] - box[2]).item() == w
