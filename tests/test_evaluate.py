"""Sliding-window evaluation (smmcl.engine.evaluate): window geometry, resizing, batched == plain, saving.

The authors' protocol itself is checked against a transcription of their loop in test_authors_evaluator.py.
"""
import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from smmcl.config import REPO_ROOT, base_config, load_config
from smmcl.engine.evaluate import evaluate, evaluate_per_image, predict, predict_scores, to_input, window_scores
from smmcl.engine.resize import resize_scores
from smmcl.engine.windows import authors_windows, corrected_windows, pad_margins, window_function
from smmcl.visual import cmx_palette, prediction_palette
from smmcl.models import build_segmentor

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


def _coverage(windows, h, w):
    covered = np.zeros((h, w), dtype=int)
    for top, bottom, left, right in windows:
        assert 0 <= top < bottom <= h and 0 <= left < right <= w  # inside the image, never empty
        covered[top:bottom, left:right] += 1
    return covered


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 120), st.integers(1, 120), st.integers(1, 50), st.integers(1, 50),
       st.floats(0.1, 1.0))
def test_corrected_windows_tile_the_image(h, w, crop_h, crop_w, stride_rate):
    top, bottom, left, right = pad_margins(h, w, (crop_h, crop_w))
    assert h + top + bottom == max(h, crop_h) and w + left + right == max(w, crop_w)
    assert top <= bottom <= top + 1 and left <= right <= left + 1
    windows = corrected_windows(h, w, (crop_h, crop_w), stride_rate)
    assert (_coverage(windows, h, w) > 0).all()
    assert len(set(windows)) == len(windows)
    for t, b, l, r in windows:  # crop-sized, or the whole of a dimension that fits the crop
        assert b - t == min(h, crop_h) and r - l == min(w, crop_w)
    assert (len(windows) == 1) == (h <= crop_h and w <= crop_w)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 120), st.integers(1, 120), st.integers(1, 50), st.integers(1, 50),
       st.floats(0.1, 1.0))
def test_authors_windows_lie_inside_and_equal_corrected_for_square_crops(h, w, crop_h, crop_w, stride_rate):
    windows = authors_windows(h, w, (crop_h, crop_w), stride_rate)
    _coverage(windows, h, w)
    if h <= crop_h or w <= crop_w:  # either side fits: one forward on the whole image
        assert windows == [(0, h, 0, w)]
    elif crop_h == crop_w:  # the row / column mix-up is invisible with a square crop
        assert windows == corrected_windows(h, w, (crop_h, crop_w), stride_rate)
    else:  # their loop: crop_w rows by crop_h columns; a negative start s reads a[s:] (the last -s)
        def extent(crop, length):
            return crop if crop <= length else min(crop - length, length)
        for t, b, l, r in windows:
            assert (b - t, r - l) == (extent(crop_w, h), extent(crop_h, w))


def test_grids_on_a_large_image():
    # 600x800, crop 480x640, strides ceil(320) = 320 and ceil(426.67) = 427.
    assert corrected_windows(600, 800, (480, 640), 2 / 3) == [
        (0, 480, 0, 640), (0, 480, 160, 800), (120, 600, 0, 640), (120, 600, 160, 800)]
    # The authors' loop (LLRGBD's crop at scale 1.25): rows step 427 over 640 > 600 rows, so each row
    # start is -40 and only rows 560..599 are scored; columns step 320 over 480.
    assert authors_windows(600, 800, (480, 640), 2 / 3) == [
        (560, 600, 0, 480), (560, 600, 320, 800), (560, 600, 0, 480), (560, 600, 320, 800)]
    # At scale 1.5 (720x960) columns 800..959 are left out.
    assert max(r for _, _, _, r in authors_windows(720, 960, (480, 640), 2 / 3)) == 800
    # One side fits (480 rows): one forward on the whole 480x900 image.
    assert authors_windows(480, 900, (480, 640), 2 / 3) == [(0, 480, 0, 900)]
    assert len(corrected_windows(480, 900, (480, 640), 2 / 3)) == 2


def test_an_unknown_protocol_is_refused():
    assert window_function('authors') is authors_windows
    assert window_function('corrected') is corrected_windows
    with pytest.raises(ValueError, match=r"eval_protocol='cmx'.*--set eval_protocol="):
        window_function('cmx')
    with pytest.raises(ValueError, match='eval_protocol'):
        predict_scores(PixelModel().eval(), *images(4, 5), eval_config(eval_protocol='cmx'), 'cpu')


@pytest.mark.parametrize('src,dst', [((360, 480), (480, 640)), ((37, 53), (32, 48)), ((97, 31), (13, 200)),
                                     ((16, 24), (32, 48)), ((21, 33), (21, 33))])
def test_resize_scores_matches_cv2(src, dst):
    scores = np.random.default_rng(0).standard_normal((src[0], src[1], 6)).astype(np.float32)
    expected = cv2.resize(scores, (dst[1], dst[0]), interpolation=cv2.INTER_LINEAR)
    got = resize_scores(torch.from_numpy(scores).permute(2, 0, 1), dst).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_to_input_is_the_authors_float64_normalisation_cast_to_float32():
    rgb, _ = images(4, 5)
    cfg = eval_config()
    t = to_input(rgb, cfg.norm_mean, cfg.norm_std, 'cpu')
    assert t.dtype == torch.float32 and t.shape == (3, 4, 5)
    expected = ((rgb.astype(np.float64) / 255.0 - cfg.norm_mean) / cfg.norm_std).astype(np.float32)
    np.testing.assert_array_equal(t.numpy(), expected.transpose(2, 0, 1))


@pytest.mark.parametrize('shape', [(480, 640, 3), (7, 5, 3), (1, 1, 3), (33, 17, 3)])
def test_opencv_resizes_scale_one_to_the_image_itself(shape):
    """scaled_inputs skips cv2.resize at scale 1: the authors' call returns the same pixels there."""
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(cv2.resize(img, None, fx=1, fy=1, interpolation=cv2.INTER_LINEAR), img)


@pytest.mark.parametrize('size', [(20, 30), (16, 24), (9, 50), (41, 23)])
@pytest.mark.parametrize('flip', [False, True])
def test_corrected_windows_average_to_the_whole_image_for_a_pixelwise_model(size, flip):
    model = PixelModel().eval()
    cfg = eval_config()
    rgb, x = images(*size)
    rgb_t, x_t = (to_input(img, cfg.norm_mean, cfg.norm_std, 'cpu') for img in (rgb, x))
    with torch.no_grad():
        whole = model(rgb_t[None], x_t[None])[0]
    whole = torch.exp(2 * whole if flip else whole)  # a 1x1 conv commutes with the flip
    windows = corrected_windows(*size, (16, 24), 2 / 3)
    for batch in (1, 4):
        got = window_scores(model, rgb_t, x_t, windows, (16, 24), flip, batch, average=True)
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
    # The authors' plain sum counts every window covering a pixel.
    covered = torch.from_numpy(_coverage(windows, *size)).float()
    summed = window_scores(model, rgb_t, x_t, windows, (16, 24), flip)
    torch.testing.assert_close(summed, whole * covered, rtol=1e-5, atol=1e-6)


def test_one_window_equals_a_forward_of_the_real_model():
    # An image no larger than the crop: one forward on it (padded to the crop) -- with SMMCL's own model.
    cfg = eval_config(eval_crop_size=[32, 48])
    cfg.update(backbone='mscan_t', pretrained_model=None, decoder_embed_dim=64)
    model = build_segmentor(cfg).eval()
    rgb, x = images(32, 48)
    torch.manual_seed(3)  # the NMF decoder draws random bases every forward
    scores = predict_scores(model, rgb, x, cfg, 'cpu')
    torch.manual_seed(3)
    with torch.no_grad():
        logits = model(to_input(rgb, cfg.norm_mean, cfg.norm_std, 'cpu')[None],
                       to_input(x, cfg.norm_mean, cfg.norm_std, 'cpu')[None])[0]
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, torch.exp(logits).double(), rtol=0, atol=0)


@pytest.mark.parametrize('size', [(20, 30), (50, 70), (12, 60), (20, 70)])
@pytest.mark.parametrize('flip', [False, True])
@pytest.mark.parametrize('batch', [3, 64])
@pytest.mark.parametrize('protocol', ['authors', 'corrected'])
def test_batched_equals_plain(size, flip, batch, protocol):
    model = ContextModel().eval()
    cfg = eval_config()
    rgb, x = images(*size)
    rgb_t, x_t = (to_input(img, cfg.norm_mean, cfg.norm_std, 'cpu') for img in (rgb, x))
    windows = window_function(protocol)(*size, (16, 24), 2 / 3)
    average = protocol == 'corrected'
    plain = window_scores(model, rgb_t, x_t, windows, (16, 24), flip, 1, average)
    batched = window_scores(model, rgb_t, x_t, windows, (16, 24), flip, batch, average)
    assert plain.shape == (K,) + size
    torch.testing.assert_close(batched, plain, rtol=1e-5, atol=1e-6)
    if size == (50, 70) and not flip:  # several windows, and this model's scores depend on them
        with torch.no_grad():
            whole = torch.exp(model(rgb_t[None], x_t[None])[0])
        assert not torch.allclose(plain, whole, rtol=1e-3)


def test_batches_hold_one_input_shape():
    """The authors' windows can differ in size (negative starts); a batch only stacks equal shapes."""
    shapes = []

    class Recording(ContextModel):
        def forward(self, rgb, x):
            shapes.append(tuple(rgb.shape))
            return super().forward(rgb, x)

    cfg = eval_config()
    rgb, x = images(20, 70)  # rows 20 < crop_w 24: each row start is -4, windows of 4 rows
    rgb_t, x_t = (to_input(img, cfg.norm_mean, cfg.norm_std, 'cpu') for img in (rgb, x))
    windows = authors_windows(20, 70, (16, 24), 2 / 3)
    assert {b - t for t, b, _, _ in windows} == {4}
    window_scores(Recording().eval(), rgb_t, x_t, windows, (16, 24), True, 5)
    assert sum(s[0] for s in shapes) == 2 * len(windows) and max(s[0] for s in shapes) <= 5
    assert all(s[2:] == (16, 24) for s in shapes)  # 4 x 16 regions padded to the crop


def test_multi_scale_flip_prediction_fast_equals_plain():
    model = ContextModel().eval()
    cfg = eval_config(eval_scale_array=[0.5, 0.75, 1, 1.5], eval_flip=True)
    rgb, x = images(30, 45)
    plain = predict_scores(model, rgb, x, cfg, 'cpu')
    cfg.update(eval_batch_size=4, fast_path=True)
    fast = predict_scores(model, rgb, x, cfg, 'cpu')
    assert plain.shape == (K, 30, 45)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(predict(model, rgb, x, cfg, 'cpu'), plain.argmax(0))


def test_palettes():
    # CMX's get_class_colors: bit j of each 3-bit group of the index goes to bit 7 - j of R, G, B.
    def cmx_colour(i):
        bits = format(i, '021b')[::-1]  # least significant first
        return [sum(int(bits[3 * j + c]) << (7 - j) for j in range(7)) for c in range(3)]
    assert cmx_palette().tolist() == [cmx_colour(i) for i in range(41)]
    assert cmx_palette()[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    palette = prediction_palette()
    assert len(palette) == 768 and palette[:123] == cmx_palette().reshape(-1).tolist()
    assert set(palette[123:]) == {0}
    # LLRGBD's own colours, the authors' uint8(c * 255) (truncated): books 0.9137, 0.3490, 0.1882.
    llrgbd = load_config(f'{REPO_ROOT}/SMMCL_LLRGBD/config.py')
    palette = prediction_palette(llrgbd.class_colors)
    assert len(palette) == 768 and set(palette[42:]) == {0}
    assert palette[:9] == [0, 0, 0, 0, 0, 255, 232, 88, 47]
    assert palette[3 * 13:42] == [225, 228, 194]  # window
    for bad in ([[0, 0, 255]], [[0.5, 0.5]], [0.1, 0.2, 0.3]):
        with pytest.raises(ValueError, match='class_colors'):
            prediction_palette(bad)


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
    # palette PNGs hold the class indices, coloured with the config's colours (default CMX's)
    for it in data.items:
        img = Image.open(tmp_path / f"{it['fn']}.png")
        assert img.mode == 'P' and img.size == (30, 20)
        assert img.getpalette()[:15] == cmx_palette()[:5].reshape(-1).tolist()
        expected = predict(model.eval(), it['data'], it['modal_x'], cfg, 'cpu').numpy()
        np.testing.assert_array_equal(np.asarray(img), expected)
    colours = [[0, 0, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0], [0.5, 0.5, 0.5]]
    evaluate(model, data, eval_config(class_colors=colours), 'cpu', save_dir=str(tmp_path / 'own'))
    img = Image.open(tmp_path / 'own' / 'img00.png')
    assert img.getpalette()[:15] == [0, 0, 0, 0, 0, 255, 255, 0, 0, 0, 255, 0, 127, 127, 127]


def test_a_bad_label_is_refused_naming_the_item():
    # Values outside the classes are an error (CMX's hist_info drops them), and the message names the file.
    model = PixelModel().eval()
    data = FakeDataset(n=3)
    data.items[2]['label'][5, 5] = K
    with pytest.raises(ValueError, match=rf'img02: label holds values \[{K}\]'):
        evaluate(model, data, eval_config(), 'cpu')


# Operators that copy a value to the host on CUDA, so the host waits there for all queued work (the
# forwards): a read of a scalar, and the ones whose output size depends on the values.
_HOST_READS = ('_local_scalar_dense', 'nonzero', 'bincount', 'masked_select', '_unique2', 'unique_dim',
               'unique_consecutive', 'repeat_interleave', 'equal', 'is_nonzero')


def _count_host_reads(run, monkeypatch):
    """Runs ``run()`` and counts its host reads: the tensor operators :data:`_HOST_READS`, indexing with
    a boolean mask (``nonzero`` inside) and calls of ``Tensor.cpu``, ``numpy`` and ``tolist`` (which
    dispatch nothing for a CPU tensor)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            masked = name in ('index', 'index_put', 'index_put_') and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
            HostReads.count += name in _HOST_READS or masked
            return func(*args, **(kwargs or {}))

    def counted(method):
        def read(self, *args, **kwargs):
            HostReads.count += 1
            return method(self, *args, **kwargs)
        return read

    with monkeypatch.context() as patch:
        for name in ('cpu', 'numpy', 'tolist'):
            patch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
        with HostReads():
            run()
    return HostReads.count


def test_fast_evaluation_reads_the_host_once_per_run_not_per_image(monkeypatch):
    """With ``fast_path`` the scores stay on the device up to the confusion matrices (labels checked on
    the host, counted without a read): the host reads values at the end of the run only (the finite check,
    the matrices) whatever the number of images, so on a GPU it queues the next images while forwards run.
    The plain path brings each image's scores to the host (the authors' OpenCV resize)."""
    model = ContextModel().eval()
    reads = {}
    for fast in (True, False):
        for n in (2, 5):
            cfg = eval_config(fast_path=fast, eval_batch_size=2)
            reads[fast, n] = _count_host_reads(lambda: evaluate(model, FakeDataset(n=n), cfg, 'cpu'),
                                               monkeypatch)
    assert reads[True, 2] == reads[True, 5] <= 4  # bool(finite): 2 operators; hists.cpu().numpy(): 2
    assert reads[False, 5] > reads[False, 2]  # the count sees the plain path's per-image reads
    np.testing.assert_array_equal(evaluate(model, FakeDataset(), eval_config(fast_path=True), 'cpu'),
                                  evaluate(model, FakeDataset(), eval_config(), 'cpu'))


class HugeLogits(PixelModel):
    def forward(self, rgb, x):
        return super().forward(rgb, x) * 0 + 1000.0  # exp overflows float32


@pytest.mark.parametrize('fast', [False, True])
def test_non_finite_scores_warn_once_per_evaluation(fast):
    with pytest.warns(UserWarning, match='non-finite evaluation scores') as caught:
        evaluate(HugeLogits().eval(), FakeDataset(n=3), eval_config(fast_path=fast), 'cpu')
    assert len([w for w in caught if 'non-finite' in str(w.message)]) == 1
    with pytest.warns(UserWarning, match='non-finite evaluation scores'):
        predict_scores(HugeLogits().eval(), *images(4, 5), eval_config(fast_path=fast), 'cpu')
