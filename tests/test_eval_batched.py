"""Whole images batched in evaluation: with ``eval_batch_size > 1``, images that are one window
per scale without flip share forwards, each with the NMF bases it draws alone; the result is the
one-image path's up to float rounding, whatever the grouping (sizes, ranks)."""
import numpy as np
import pytest
import torch

import smmcl.engine.evaluate as ev
from smmcl.engine.metrics import confusion_matrix
from smmcl.engine.precision import for_inference
from smmcl.models import build_segmentor
from smmcl.models.ham_head import NMF2D, given_bases, nmf_layers

from conftest import tiny_config

K = 5
SIZE = (64, 96)


def eval_settings(backbone, **changes):
    cfg = tiny_config(backbone=backbone, num_classes=K, eval_crop_size=list(SIZE), eval_scale_array=[0.75, 1],
                      eval_flip=False, eval_batch_size=1, eval_stride_rate=2 / 3, seed=12)
    cfg.update(changes)
    return cfg


def tiny_model(cfg):
    torch.manual_seed(0)
    return build_segmentor(cfg).eval()


def dataset(sizes):
    """Items of RGBXDataset's 'val' format, one per (h, w) of ``sizes``."""
    rng = np.random.default_rng(1)
    return [dict(data=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                 modal_x=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                 label=rng.integers(0, K, (h, w)).astype(np.uint8), fn=f'img{i:02d}')
            for i, (h, w) in enumerate(sizes)]


@pytest.fixture
def recorded(monkeypatch):
    """Runs ``evaluate_per_image`` and returns (N-K-K hists, [K-H-W scores per image, by index],
    [forward batch sizes]) for a model and a config."""
    def run(model, items, cfg, **kwargs):
        scores, batches = {}, []
        sum_scales = ev.sum_scales
        monkeypatch.setattr(ev, 'sum_scales', lambda s, size, c: scores.setdefault(
            len(scores), sum_scales(s, size, c)))
        hook = model.register_forward_pre_hook(lambda m, args: batches.append(len(args[0])))
        try:
            hists = ev.evaluate_per_image(model, items, cfg, 'cpu', **kwargs)
        finally:
            hook.remove()
            monkeypatch.setattr(ev, 'sum_scales', sum_scales)
        return hists, list(scores.values()), batches
    return run


def relative(a, b):
    return float((a - b).norm() / b.norm())


def test_batched_images_equal_one_image_path(tiny_mscan, recorded):
    """(a) 7 images of one size (not a multiple of 4), two scales: per-image scores within 1e-5, the same
    confusion matrices, in 2 forwards of 4 + 3 images per scale instead of 7."""
    cfg = eval_settings(tiny_mscan)
    model, items = tiny_model(cfg), dataset([SIZE] * 7)
    one, one_scores, one_batches = recorded(model, items, cfg)
    cfg.eval_batch_size = 4
    four, four_scores, four_batches = recorded(model, items, cfg)
    assert one_batches == [1] * 14 and four_batches == [4, 4, 3, 3]
    assert len(one_scores) == len(four_scores) == 7
    for a, b in zip(four_scores, one_scores):
        assert a.shape == (K, *SIZE) and a.dtype == torch.float64
        assert relative(a, b) <= 1e-5
    np.testing.assert_array_equal(four, one)
    assert one.sum() == 7 * SIZE[0] * SIZE[1]  # no background in these labels: every pixel counted


def test_per_image_bases_are_the_one_image_draws(tiny_mscan, monkeypatch):
    """(b) every image, at every scale, is decomposed with exactly the bases its one-image forward draws."""
    cfg = eval_settings(tiny_mscan)
    model, items = tiny_model(cfg), dataset([SIZE] * 6)
    used = []  # the bases of each NMF forward
    forward = NMF2D.forward

    def recording(self, x):
        if self.fixed_bases is not None:
            used.append(self.fixed_bases.clone())
            return forward(self, x)
        # the draw the forward would make first, made here so that it can be recorded
        with given_bases(model, [self.draw_bases(len(x), x.shape[1], x.device)]):
            used.append(self.fixed_bases.clone())
            return forward(self, x)

    monkeypatch.setattr(NMF2D, 'forward', recording)
    ev.evaluate_per_image(model, items, cfg, 'cpu')
    alone = [b[0] for b in used]  # per image, per scale
    used.clear()
    cfg.eval_batch_size = 4
    ev.evaluate_per_image(model, items, cfg, 'cpu')
    assert [len(b) for b in used] == [4, 4, 2, 2]  # group 1 at scales 0.75, 1; then group 2
    batched = [used[2 * g + s][n] for g, n in ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)) for s in (0, 1)]
    assert len(alone) == len(batched) == 12
    for a, b in zip(alone, batched):
        assert torch.equal(a, b)
    assert not torch.equal(alone[0], alone[1]) and not torch.equal(alone[0], alone[2])  # fresh draws


def test_groups_break_at_a_size_change(tiny_mscan, recorded):
    """(c) images of two sizes mixed: consecutive same-size images share forwards, the rest as alone."""
    cfg = eval_settings(tiny_mscan, eval_scale_array=[1])
    model = tiny_model(cfg)
    items = dataset([SIZE, SIZE, (32, 64), (32, 64), (32, 64), SIZE, SIZE])
    one, one_scores, _ = recorded(model, items, cfg)
    cfg.eval_batch_size = 4
    four, four_scores, batches = recorded(model, items, cfg)
    assert batches == [2, 3, 2]
    assert [s.shape[1:] for s in four_scores] == [SIZE] * 2 + [(32, 64)] * 3 + [SIZE] * 2
    for a, b in zip(four_scores, one_scores):
        assert relative(a, b) <= 1e-5
    np.testing.assert_array_equal(four, one)


@pytest.mark.parametrize('changes', [dict(eval_flip=True), dict(eval_crop_size=[32, 48])])
def test_flip_or_several_windows_keep_the_per_image_path(tiny_mscan, recorded, changes):
    """(d) with flip, or several windows per image, each image is still scored alone: exactly what
    seed_item + predict_scores give it."""
    cfg = eval_settings(tiny_mscan, eval_batch_size=4, **changes)
    model, items = tiny_model(cfg), dataset([SIZE] * 5)
    hists, scores, batches = recorded(model, items, cfg)
    inputs = sum(len(ev.scale_windows(cfg, round(SIZE[0] * s), round(SIZE[1] * s))) for s in (0.75, 1))
    assert sum(batches) == 5 * inputs * (2 if cfg.eval_flip else 1) and max(batches) <= 4
    for i, item in enumerate(items):
        ev.seed_item(cfg, i)
        expected = ev.predict_scores(model, item['data'], item['modal_x'], cfg, 'cpu')
        assert torch.equal(scores[i], expected)
        np.testing.assert_array_equal(
            hists[i], confusion_matrix(expected.argmax(0), torch.as_tensor(item['label']), K, 255).numpy())


def test_fixed_bases_are_cleared_also_after_an_error(tiny_mscan):
    """(e) no fixed bases stay behind, after an evaluation and after a forward that raised."""
    cfg = eval_settings(tiny_mscan, eval_batch_size=4)
    model, items = tiny_model(cfg).train(), dataset([SIZE] * 5)
    nmf = model.decode_head.hamburger.ham
    ev.evaluate_per_image(model, items, cfg, 'cpu')
    assert nmf.fixed_bases is None and model.training
    calls = []

    def fail_on_second(module, args):
        calls.append(len(args[0][0]))  # the first of the fused feature maps
        if len(calls) == 2:
            raise RuntimeError('boom')

    model.decode_head.register_forward_pre_hook(fail_on_second)
    with pytest.raises(RuntimeError, match='boom'):
        ev.evaluate_per_image(model, items, cfg, 'cpu')
    assert calls == [4, 4] and nmf.fixed_bases is None and model.training
    with pytest.raises(ValueError, match='2 sets of NMF bases'):
        with given_bases(model, [torch.ones(1), torch.ones(1)]):
            pass


def test_rank_shares_add_up(tiny_mscan):
    """(f) two ranks' shares, batched within each share, sum to one process's result."""
    cfg = eval_settings(tiny_mscan, eval_batch_size=4)
    model, items = tiny_model(cfg), dataset([SIZE] * 7)
    whole = ev.evaluate_per_image(model, items, cfg, 'cpu')
    parts = [ev.evaluate_per_image(model, items, cfg, 'cpu', rank=r, world_size=2) for r in range(2)]
    assert parts[0][1::2].sum() == 0 and parts[1][0::2].sum() == 0
    np.testing.assert_array_equal(parts[0] + parts[1], whole)
    cfg.eval_batch_size = 1
    np.testing.assert_array_equal(ev.evaluate_per_image(model, items, cfg, 'cpu'), whole)


def test_folded_channels_last_model(tiny_mscan, recorded):
    """The NMF is found by type in a model prepared by for_inference (folded, channels_last; resize on
    the device): batched equals its one-image path."""
    cfg = eval_settings(tiny_mscan, fast_path=True)
    model = for_inference(tiny_model(cfg), cfg)
    assert len(nmf_layers(model)) == 1 and nmf_layers(model)[0][1] == 32
    items = dataset([SIZE] * 5)
    one, one_scores, _ = recorded(model, items, cfg)
    cfg.eval_batch_size = 4
    four, four_scores, batches = recorded(model, items, cfg)
    assert batches == [4, 4, 1, 1]
    for a, b in zip(four_scores, one_scores):
        assert relative(a, b) <= 1e-5
    np.testing.assert_array_equal(four, one)
