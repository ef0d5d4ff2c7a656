"""The vectorised anchor sampler and the contrastive loss."""
import contextlib

import pytest
import torch

from smmcl.config import base_config
from smmcl.losses.contrastive import (anchor_plan, downsample_labels, sample_anchors,
                                      sample_anchors_loop)
from smmcl.models import build_contrastive_loss


def loss_cfg(**changes):
    cfg = base_config()
    cfg.num_classes = 6
    cfg.update(changes)
    return cfg


def random_labels(generator, n=3, h=12, w=16, num_classes=6, ignore_fraction=0.2):
    labels = torch.randint(0, num_classes, (n, h, w), generator=generator)
    ignore = torch.rand(n, h, w, generator=generator) < ignore_fraction
    return labels.masked_fill(ignore, 255)


@pytest.mark.parametrize('seed', range(5))
def test_sampler_invariants(seed):
    g = torch.Generator().manual_seed(seed)
    labels = random_labels(g)
    n, h, w = labels.shape
    # Each feature vector encodes its own flat cell index, so sampled cells can be identified.
    cell_id = torch.arange(n * h * w, dtype=torch.float32).reshape(n, h, w)
    feats = torch.stack([cell_id, -cell_id], dim=1)  # N-2-h-w
    min_views, max_views, max_total = 5, 7, 40
    out = sample_anchors(labels, feats, feats, 6, min_views, max_views, max_total, generator=g)
    counts = {(b, c): int((labels[b] == c).sum()) for b in range(n) for c in range(6)}
    kept = sorted(k for k, v in counts.items() if v >= min_views)
    views = min(min(counts[k] for k in kept), max_views, max_total // len(kept))
    feats_c, feats_o, set_labels = out
    assert feats_c.shape == feats_o.shape == (len(kept), 2, views)
    assert len(kept) * views <= max_total
    assert set_labels.tolist() == [c for _, c in kept]
    flat_labels = labels.flatten()
    for t, (b, c) in enumerate(kept):
        for sampled in (feats_c, feats_o):
            cells = sampled[t, 0].long()
            assert len(set(cells.tolist())) == views  # no duplicates
            assert (cells // (h * w) == b).all()  # from the right image
            assert (flat_labels[cells] == c).all()  # of the right class, never 255
            assert torch.equal(sampled[t, 1], -sampled[t, 0])  # channels gathered together


def test_views_follow_the_fewest_cells_and_caps():
    labels = torch.full((2, 10, 10), 255)
    labels[0, :2] = 0  # 20 cells
    labels[0, 2:3] = 1  # 10 cells
    labels[1, :4] = 2  # 40 cells
    labels[1, 4, :4] = 3  # 4 cells: below min_views, dropped
    _, _, _, sets, views = anchor_plan(labels.reshape(2, -1), 6, 5, 300, 4800)
    assert (sets, views) == (3, 10)
    assert anchor_plan(labels.reshape(2, -1), 6, 5, 8, 4800)[3:] == (3, 8)
    assert anchor_plan(labels.reshape(2, -1), 6, 5, 300, 12)[3:] == (3, 4)


def test_independent_draws_differ_but_shared_draw_is_identical():
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 4:] = 1
    feats = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    c, o, _ = sample_anchors(labels, feats, feats, 2, 5, 10, 4800, generator=g)
    assert not torch.equal(c, o)
    c, o, _ = sample_anchors(labels, feats, feats, 2, 5, 10, 4800, share_draw=True, generator=g)
    assert torch.equal(c, o)


@pytest.mark.parametrize('seed', range(3))
def test_vectorised_equals_loop_when_every_cell_is_kept(seed):
    """With equal class sizes every cell is sampled; then the loss is the same function."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(2, 8, 12, dtype=torch.long)  # 4 classes x 24 cells per image
    labels[:, :, 6:] = 1
    labels[:, 4:, :] += 2
    labels[1] += 2
    feats_c = torch.randn(2, 16, 8, 12, generator=g)
    feats_o = torch.randn(2, 16, 8, 12, generator=g)
    full = torch.nn.functional.interpolate(labels[:, None].float(), scale_factor=32.0)[:, 0].long()
    results = {}
    for sampler in ('vectorized', 'loop'):
        loss = build_contrastive_loss(loss_cfg(anchor_sampler=sampler, share_anchor_draw=True))
        torch.manual_seed(seed)
        results[sampler] = torch.stack(loss(full, feats_c, feats_o))
    assert torch.allclose(results['vectorized'], results['loop'], rtol=1e-5)


def test_loop_sampler_matches_vectorised_shapes_on_random_labels():
    g = torch.Generator().manual_seed(1)
    labels = random_labels(g)
    feats = torch.randn(3, 4, 12, 16, generator=g)
    a = sample_anchors(labels, feats, feats, 6, 5, 7, 40, generator=g)
    b = sample_anchors_loop(labels, feats, feats, 6, 5, 7, 40)
    assert a[0].shape == b[0].shape and torch.equal(a[2], b[2])


def test_no_anchor_set_gives_zero_losses_that_backpropagate():
    loss = build_contrastive_loss(loss_cfg())
    label = torch.full((2, 64, 64), 255)
    label[:, :8, :8] = 1  # far fewer than 5 stage-4 cells
    feats_c = torch.randn(2, 8, 2, 2, requires_grad=True)
    feats_o = torch.randn(2, 8, 2, 2, requires_grad=True)
    terms = loss(label, feats_c, feats_o)
    assert all(t.item() == 0.0 for t in terms)
    sum(terms).backward()
    assert feats_c.grad is not None and (feats_c.grad == 0).all()


def test_labels_are_downsampled_by_nearest_top_left_sampling():
    label = torch.arange(64 * 96).reshape(1, 64, 96) % 7
    small = downsample_labels(label, (2, 3))
    assert torch.equal(small, label[:, ::32, ::32])


def test_loss_stays_float32_under_autocast():
    loss = build_contrastive_loss(loss_cfg())
    label = torch.zeros(1, 256, 256, dtype=torch.long)
    label[:, 128:] = 1
    feats = torch.randn(1, 8, 8, 8).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        terms = loss(label, feats, feats)
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms)


@pytest.mark.parametrize('size', [(64, 64), (65, 97), (33, 40), (20, 18)])
def test_embedding_size_is_the_stage4_size_without_a_forward(tiny_mscan, size):
    from smmcl.models import build_segmentor
    from conftest import tiny_config
    model = build_segmentor(tiny_config(backbone=tiny_mscan), with_loss=True).eval()
    rgb = torch.randn(1, 3, *size)
    with torch.no_grad():
        _, color_emb, _ = model.encode_decode(rgb, rgb)
    assert model.backbone.embedding_size(size) == tuple(color_emb.shape[2:])


def test_planned_ahead_the_loss_and_its_gradients_are_the_same(tiny_mscan, monkeypatch):
    """The segmentor computes the anchor plan (its one host read) before its forward; the plan draws
    nothing at random, so the loss terms and every gradient equal those of planning after the forward,
    to the bit, with the same seed."""
    import smmcl.losses.contrastive as contrastive
    from smmcl.models import build_segmentor
    from conftest import tiny_config
    torch.manual_seed(0)
    model = build_segmentor(tiny_config(backbone=tiny_mscan, num_classes=3, min_views_per_class=2),
                            with_loss=True).train()
    g = torch.Generator().manual_seed(1)
    rgb, x = torch.randn(2, 3, 128, 160, generator=g), torch.randn(2, 3, 128, 160, generator=g)
    label = torch.randint(0, 3, (2, 4, 5), generator=g).repeat_interleave(32, 1).repeat_interleave(32, 2)

    events = []
    real_plan, real_encode = contrastive.anchor_plan, model.encode_decode
    monkeypatch.setattr(contrastive, 'anchor_plan', lambda *a, **k: events.append('plan') or real_plan(*a, **k))
    monkeypatch.setattr(model, 'encode_decode', lambda *a: events.append('forward') or real_encode(*a))

    def run(plan_ahead):
        if not plan_ahead:
            monkeypatch.setattr(model.contrastive, 'plan', lambda label, size: None)
        events.clear()
        torch.manual_seed(5)
        terms = model(rgb, x, label, return_terms=True)
        model.zero_grad()
        terms['loss'].backward()
        return events[:], {k: v.detach() for k, v in terms.items()}, \
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    order_ahead, terms_ahead, grads_ahead = run(plan_ahead=True)
    order_after, terms_after, grads_after = run(plan_ahead=False)
    assert order_ahead == ['plan', 'forward'] and order_after == ['forward', 'plan']
    assert terms_ahead['cm'] > 0
    for key in terms_after:
        torch.testing.assert_close(terms_ahead[key], terms_after[key], rtol=0, atol=0)
    assert grads_ahead.keys() == grads_after.keys()
    for name in grads_after:
        torch.testing.assert_close(grads_ahead[name], grads_after[name], rtol=0, atol=0)


def test_a_plan_for_other_features_is_refused():
    loss = build_contrastive_loss(loss_cfg())
    label = torch.zeros(1, 64, 64, dtype=torch.long)
    plan = loss.plan(label, (2, 2))
    feats = torch.randn(1, 8, 3, 3)
    with pytest.raises(ValueError, match=r'plan is for \(2, 2\)'):
        loss(label, feats, feats, plan=plan)
    assert build_contrastive_loss(loss_cfg(anchor_sampler='loop')).plan(label, (2, 2)) is None


PADDED_CASES = [  # (labels kind, min_views, max_views, max_total, share_draw)
    ('random', 3, 7, 60, False),     # the views capped by max_views, slots left over
    ('random', 3, 300, 40, True),    # the views shrunk to fit max_total, one draw for both modalities
    ('two classes', 2, 300, 4800, False),
    ('ignored', 3, 7, 60, False),    # no anchor set: zero losses
]


@pytest.mark.parametrize('kind, min_views, max_views, max_total, share_draw', PADDED_CASES)
def test_padded_form_is_the_vectorised_loss(kind, min_views, max_views, max_total, share_draw):
    """sync_free(): the same draws in fixed slots and the masked InfoNCE give the vectorised sampler's
    three terms and gradients (float rounding apart)."""
    from smmcl.losses.contrastive import sync_free
    g = torch.Generator().manual_seed(len(kind) + max_total)
    label = torch.randint(0, 2 if kind == 'two classes' else 5, (3, 48, 56), generator=g)
    label[:, :10] = 255
    if kind == 'ignored':
        label[:] = 255
    color, other = (torch.randn(3, 16, 12, 14, generator=g).requires_grad_() for _ in range(2))
    loss = build_contrastive_loss(loss_cfg(num_classes=5, min_views_per_class=min_views,
                                           max_views_per_class=max_views, max_features_total=max_total,
                                           share_anchor_draw=share_draw))
    results = []
    for padded in (False, True):
        torch.manual_seed(7)
        with sync_free(loss) if padded else contextlib.nullcontext():
            terms = loss(label, color, other)
            assert loss.plan(label, (12, 14)) is None if padded else loss.plan(label, (12, 14)) is not None
        results.append((torch.stack(terms), torch.autograd.grad(sum(terms), [color, other])))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert (kind == 'ignored') == (want.abs().max() == 0)
    assert not loss.padded  # restored on exit


def test_padded_form_reads_nothing_on_the_host(monkeypatch):
    """Forward and backward of the padded form copy no value to the host (what a CUDA graph cannot
    hold: ``tolist``, ``item``, a tensor's truth value); the plain form reads its plan once. The loop
    sampler has no padded form."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from smmcl.losses.contrastive import sync_free

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    tolist, item, counted = torch.Tensor.tolist, torch.Tensor.item, []
    monkeypatch.setattr(torch.Tensor, 'tolist', lambda t: counted.append(1) or tolist(t))
    monkeypatch.setattr(torch.Tensor, 'item', lambda t: counted.append(1) or item(t))
    label = torch.randint(0, 5, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    color, other = (torch.randn(2, 8, 8, 8).requires_grad_() for _ in range(2))
    loss = build_contrastive_loss(loss_cfg(num_classes=5, min_views_per_class=2, max_features_total=64))
    reads = []
    for padded in (True, False):
        with HostReads() as mode, (sync_free(loss) if padded else contextlib.nullcontext()):
            sum(loss(label, color, other)).backward()
        reads.append(mode.count + len(counted))
        counted.clear()
    assert reads[0] == 0 and reads[1] >= 1
    with pytest.raises(ValueError, match="anchor_sampler='loop'"):
        with sync_free(build_contrastive_loss(loss_cfg(anchor_sampler='loop'))):
            pass
