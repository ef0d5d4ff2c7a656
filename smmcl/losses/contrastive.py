"""Supervised multi-modal contrastive loss of SMMCL (Dong & Yokoya, WACV 2024, Sec. 3.2).

Anchors are stage-4 embeddings sampled per (image, class) from labels downsampled to stage 4. The
InfoNCE follows the authors' code, which follows ContrastiveSeg's ``_contrastive`` (Wang et al., 2021):
cosine-similarity logits over a temperature; the positives of row i are the same-class columns j != i
(in the cross-modal term too); ``log p_ij = l_ij - log(exp(l_ij) + sum_k exp(l_ik))`` over row i's
different-class columns k; each row averages over its positives and the loss is minus the row mean.

The authors' sampler loops over images and classes in Python with a host sync per class and crashes
when no class has enough cells (``torch.min`` of an empty tensor). This one is vectorised: one host
read per batch (the number of anchor sets and views, which fix the output shape), the same
distribution (a uniform random subset per set, drawn independently per modality by default), and a
batch without anchors gives zero losses that still backpropagate. Its padded form (:func:`sync_free`,
what a CUDA graph of the training step holds) reads nothing: the same draws in ``max_total`` fixed
slots and a masked InfoNCE, the same values.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import choices
from ..config import check_choice

IGNORE_LABEL = 255


def downsample_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour downsampling of N-H-W labels to N-h-w (F.interpolate 'nearest', as the authors)."""
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode='nearest')[:, 0].long()


def anchor_plan(labels: torch.Tensor, num_classes: int, min_views: int, max_views: int,
                max_total: int):
    """Which (image, class) sets become anchors and how many views each gets.

    Args:
        labels: N-M stage-4 labels (IGNORE_LABEL and values >= num_classes are never sampled).
    Returns:
        group: N-M group id ``image * num_classes + class`` of each cell (N*K for unusable cells);
        counts: (N*K) cells per group; kept: (N*K) bool; num_sets, num_views: python ints.
    """
    group, counts, kept, num_sets_t, views = anchor_counts(labels, num_classes, min_views, max_views, max_total)
    num_sets, num_views = torch.stack([num_sets_t, views]).tolist()  # the one host read per batch
    return group, counts, kept, num_sets, num_views


def anchor_counts(labels: torch.Tensor, num_classes: int, min_views: int, max_views: int, max_total: int):
    """:func:`anchor_plan` without its host read: ``num_sets`` and ``num_views`` stay 0-dim tensors
    on the labels' device (``num_sets`` 0 when no set reaches ``min_views`` or no view fits)."""
    n, m = labels.shape
    valid = (labels >= 0) & (labels < num_classes)
    image = torch.arange(n, device=labels.device)[:, None]
    group = torch.where(valid, image * num_classes + labels, torch.full_like(labels, n * num_classes))
    # cells per group as a sum of one-hot rows, not torch.bincount: CUDA's bincount reads the largest
    # value on the host to size its output (a sync, which a CUDA graph cannot hold); stage-4 maps are small
    ids = torch.arange(n * num_classes, device=labels.device)
    counts = (group.reshape(-1, 1) == ids).sum(0)
    kept = counts >= min_views
    num_sets = kept.sum()
    fewest = torch.where(kept, counts, torch.full_like(counts, max_views)).min()
    views = torch.minimum(fewest.clamp(max=max_views), max_total // num_sets.clamp(min=1))
    return group, counts, kept, torch.where(views > 0, num_sets, torch.zeros_like(num_sets)), views


class AnchorPlan(NamedTuple):
    """:func:`anchor_plan`'s result for one batch, computed from the labels alone (no features)."""
    group: torch.Tensor
    counts: torch.Tensor
    kept: torch.Tensor
    num_sets: int
    num_views: int


def kept_group_ids(kept: torch.Tensor, num_sets: int) -> torch.Tensor:
    """Ids of the kept groups in increasing order (T), without a host sync."""
    return torch.argsort((~kept).to(torch.int8), stable=True)[:num_sets]


def sample_anchor_indices(group: torch.Tensor, counts: torch.Tensor, kept_groups: torch.Tensor,
                          num_views: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flat cell indices (into N*M) of ``num_views`` distinct random cells of every kept group: T-V."""
    flat = group.flatten()
    # Random order, then a stable sort by group: cells of each group end up contiguous, uniformly shuffled.
    perm = torch.randperm(flat.numel(), device=flat.device, generator=generator)
    order = perm[torch.argsort(flat[perm], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    slots = starts[kept_groups][:, None] + torch.arange(num_views, device=flat.device)[None]
    return order[slots]


def sample_anchors(labels: torch.Tensor, color_fea: torch.Tensor, other_fea: torch.Tensor,
                   num_classes: int, min_views: int = 5, max_views: int = 300, max_total: int = 4800,
                   share_draw: bool = False, generator: Optional[torch.Generator] = None,
                   plan: Optional[AnchorPlan] = None):
    """Sample anchor sets from both modalities.

    Args:
        labels: N-h-w labels at the features' resolution.
        color_fea, other_fea: N-C-h-w embeddings.
        plan: :func:`anchor_plan` of these labels and settings when already computed (it draws
            nothing at random, so computing it earlier changes no result).
    Returns:
        (color T-C-V, other T-C-V, labels T) or None when no set reaches ``min_views`` cells.
    """
    n, c = color_fea.shape[:2]
    if plan is None:
        plan = AnchorPlan(*anchor_plan(labels.reshape(n, -1), num_classes, min_views, max_views, max_total))
    group, counts, kept, num_sets, num_views = plan
    if num_sets == 0:
        return None
    kept_groups = kept_group_ids(kept, num_sets)
    idx_c = sample_anchor_indices(group, counts, kept_groups, num_views, generator)
    idx_o = idx_c if share_draw else sample_anchor_indices(group, counts, kept_groups, num_views,
                                                           generator)

    def gather(fea, idx):  # N-C-h-w -> (N*h*w)-C -> T-V-C -> T-C-V
        return fea.permute(0, 2, 3, 1).reshape(-1, c)[idx].permute(0, 2, 1)

    return gather(color_fea, idx_c), gather(other_fea, idx_o), kept_groups % num_classes


class PaddedAnchors(NamedTuple):
    """Anchors in ``max_total`` fixed slots (:func:`sample_anchors_padded`): slot ``t * V + v`` holds view
    v of set t while it is below T * V, padding (``valid`` False) after."""
    color: torch.Tensor  # S-C
    other: torch.Tensor  # S-C
    labels: torch.Tensor  # S
    valid: torch.Tensor  # S, bool


def sample_anchors_padded(labels: torch.Tensor, color_fea: torch.Tensor, other_fea: torch.Tensor,
                          num_classes: int, min_views: int = 5, max_views: int = 300, max_total: int = 4800,
                          share_draw: bool = False, generator: Optional[torch.Generator] = None) -> PaddedAnchors:
    """:func:`sample_anchors` without a host read, for a CUDA graph: every shape fixed by the arguments.

    The same random draws (one ``randperm`` of the N*h*w cells per modality) and, in the valid slots, the
    same anchors in the same order as :func:`sample_anchors`' T-C-V sets flattened set-major; so
    :func:`info_nce_padded` on them equals :func:`info_nce` on those (to float rounding).

    Args:
        labels: N-h-w labels at the features' resolution.
        color_fea, other_fea: N-C-h-w embeddings.
    Returns:
        :class:`PaddedAnchors` of ``max_total`` slots.
    """
    n, c = color_fea.shape[:2]
    group, counts, kept, num_sets, views = anchor_counts(labels.reshape(n, -1), num_classes, min_views,
                                                         max_views, max_total)
    slots = torch.arange(max_total, device=labels.device)
    per_set = views.clamp(min=1)
    kept_groups = kept_group_ids(kept, kept.numel())  # kept ones first, in increasing order
    set_of_slot = (slots // per_set).clamp(max=kept.numel() - 1)
    groups = kept_groups[set_of_slot]
    offsets = slots % per_set

    def draw():
        flat = group.flatten()
        perm = torch.randperm(flat.numel(), device=flat.device, generator=generator)
        order = perm[torch.argsort(flat[perm], stable=True)]
        starts = torch.cumsum(counts, 0) - counts
        return order[(starts[groups] + offsets).clamp(max=flat.numel() - 1)]

    idx_c = draw()
    idx_o = idx_c if share_draw else draw()
    color = color_fea.permute(0, 2, 3, 1).reshape(-1, c)[idx_c]
    other = other_fea.permute(0, 2, 3, 1).reshape(-1, c)[idx_o]
    return PaddedAnchors(color, other, groups % num_classes, slots // per_set < num_sets)


def sample_anchors_loop(labels: torch.Tensor, color_fea: torch.Tensor, other_fea: torch.Tensor,
                        num_classes: int, min_views: int = 5, max_views: int = 300,
                        max_total: int = 4800, share_draw: bool = False):
    """The authors' sampler, kept as the plain reference path: same arguments and result as
    :func:`sample_anchors`, and it consumes the CPU random stream exactly as their code (one
    ``torch.randperm(count)`` per set in image, class order, the whole pass once for RGB and then
    once for X), so a seeded call reproduces their call on the same generator state. (Their training
    stream itself cannot be reproduced: their four DataParallel replica threads draw from one CPU
    generator in whatever order they reach it.) Unlike theirs it returns None instead of
    crashing when no set is large enough, and skips label values >= ``num_classes``."""
    n, c = color_fea.shape[:2]
    flat_labels = labels.reshape(n, -1)
    sets = []  # (image, class, cell indices)
    for image in range(n):
        for cls in torch.unique(flat_labels[image]).tolist():
            if cls == IGNORE_LABEL or cls < 0 or cls >= num_classes:
                continue
            cells = (flat_labels[image] == cls).nonzero()[:, 0]
            if cells.numel() >= min_views:
                sets.append((image, cls, cells))
    if not sets:
        return None
    num_views = min(min(len(cells) for _, _, cells in sets), max_views, max_total // len(sets))
    if num_views <= 0:
        return None

    def draw(fea):  # T-C-V
        chosen = [cells[torch.randperm(len(cells))[:num_views].to(cells.device)] for _, _, cells in sets]
        return torch.stack([fea[image].reshape(c, -1)[:, idx] for (image, _, _), idx in zip(sets, chosen)])

    if share_draw:
        state = torch.random.get_rng_state()
        feats_c = draw(color_fea)
        torch.random.set_rng_state(state)
        feats_o = draw(other_fea)
    else:
        feats_c, feats_o = draw(color_fea), draw(other_fea)
    set_labels = torch.tensor([cls for _, cls, _ in sets], device=labels.device)
    return feats_c, feats_o, set_labels


ANCHOR_SAMPLERS = dict(zip(choices.ANCHOR_SAMPLERS, (sample_anchors, sample_anchors_loop)))


def info_nce(anchors: torch.Tensor, contrast: torch.Tensor, labels: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """Supervised InfoNCE between two T-C-V anchor sets with T labels (rows: ``anchors``).

    Pass the same tensor twice for the intra-modal term.
    """
    t, c, v = anchors.shape
    rows = F.normalize(anchors.float().permute(0, 2, 1).reshape(t * v, c), dim=1)
    cols = F.normalize(contrast.float().permute(0, 2, 1).reshape(t * v, c), dim=1)
    row_labels = labels.reshape(t, 1).expand(t, v).reshape(-1)
    logits = rows @ cols.T / temperature  # (TV)-(TV)
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    same = row_labels[:, None] == row_labels[None, :]
    positive = same & ~torch.eye(t * v, dtype=torch.bool, device=same.device)
    exp_logits = logits.exp()
    negative_sum = (exp_logits * (~same)).sum(1, keepdim=True)
    log_prob = logits - torch.log(exp_logits + negative_sum)
    # Rows without positives contribute 0 (the authors' code would divide by zero there).
    mean_log_prob_pos = (log_prob * positive).sum(1) / positive.sum(1).clamp(min=1)
    return -mean_log_prob_pos.mean()


def info_nce_padded(anchors: torch.Tensor, contrast: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """:func:`info_nce` on the valid slots of S-C anchors and contrasts (:class:`PaddedAnchors`): padding
    rows and columns take no part (masks, fixed shapes, no host read); 0 when no slot is valid."""
    rows = F.normalize(anchors.float(), dim=1)
    cols = F.normalize(contrast.float(), dim=1)
    logits = rows @ cols.T / temperature  # S-S
    # the row maximum over the valid columns (info_nce's); a finite stand-in where a row has none
    top = logits.detach().masked_fill(~valid[None, :], float('-inf')).max(dim=1, keepdim=True).values
    logits = logits - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=same.device) & valid[None, :] & valid[:, None]
    exp_logits = logits.exp()  # padding columns stay finite (cosines over a temperature) and are masked out
    negative_sum = (exp_logits * (~same & valid[None, :])).sum(1, keepdim=True)
    log_prob = logits - torch.log(exp_logits + negative_sum)
    mean_log_prob_pos = (log_prob * positive).sum(1) / positive.sum(1).clamp(min=1)
    return -(mean_log_prob_pos * valid).sum() / valid.sum().clamp(min=1)


class SupervisedMultiModalContrastiveLoss(nn.Module):
    """Cross-modal and two intra-modal InfoNCE terms on sampled stage-4 anchors.

    Args:
        num_classes: label values ``0..num_classes-1`` are sampled (255 and larger values never).
        min_views: a (image, class) set becomes anchors only with at least this many stage-4 cells.
        max_views: at most this many cells per set.
        max_total: at most this many anchors per batch (views per set shrink to fit).
        temperature: of the two intra-modal terms.
        cm_temperature: of the cross-modal term.
        share_draw: draw the same cells for both modalities (the authors draw each independently).
        sampler: 'vectorized', or 'loop' (the authors' per-class loop, the reference path).

    :func:`smmcl.models.builder.build_contrastive_loss` maps a config onto these.
    """

    padded = False  # within sync_free(): the padded sampler and InfoNCE

    def __init__(self, num_classes: int, min_views: int = 5, max_views: int = 300, max_total: int = 4800,
                 temperature: float = 0.1, cm_temperature: float = 0.1, share_draw: bool = False,
                 sampler: str = 'vectorized'):
        super().__init__()
        check_choice('anchor_sampler', sampler, choices.ANCHOR_SAMPLERS)
        self.num_classes = num_classes
        self.min_views = min_views
        self.max_views = max_views
        self.max_total = max_total
        self.cm_temperature = cm_temperature
        self.temperature = temperature
        self.share_draw = bool(share_draw)
        self.sampler = ANCHOR_SAMPLERS[sampler]

    def intra_modal_loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """feats: T-C-V anchors, labels: T."""
        return info_nce(feats, feats, labels, self.temperature)

    def cross_modal_loss(self, feats_c: torch.Tensor, feats_o: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
        """Rows: RGB anchors, columns: X anchors (both T-C-V), labels: T."""
        return info_nce(feats_c, feats_o, labels, self.cm_temperature)

    def plan(self, label: torch.Tensor, size) -> Optional[Tuple[torch.Tensor, AnchorPlan]]:
        """(stage-4 labels N-h-w, :class:`AnchorPlan`) of N-H-W labels for embeddings of ``size``
        (h, w), before the features exist: the segmentor calls it ahead of its forward, so that the
        plan's one host read waits for nothing but the labels instead of the whole forward, and the
        host can queue the losses while the GPU computes (the host otherwise idles the GPU there,
        most visibly with CUDA graphs). None for the authors' loop, which reads per class, and for the
        padded path, which reads nothing."""
        if self.sampler is not sample_anchors or self.padded:
            return None
        with torch.autocast(device_type=label.device.type, enabled=False):
            labels = downsample_labels(label, size)
            return labels, AnchorPlan(*anchor_plan(labels.reshape(labels.shape[0], -1), self.num_classes,
                                                   self.min_views, self.max_views, self.max_total))

    def forward(self, label: torch.Tensor, color_fea: torch.Tensor, other_fea: torch.Tensor,
                plan: Optional[Tuple[torch.Tensor, AnchorPlan]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """label: N-H-W full-resolution labels; color_fea, other_fea: N-C-h-w embeddings; plan: what
        :meth:`plan` returned for this label and the embeddings' size, or None (computed here).

        Returns (loss_cm, loss_vis, loss_aux), unweighted.
        """
        with torch.autocast(device_type=color_fea.device.type, enabled=False):
            if self.padded:
                return self._padded_terms(label, color_fea, other_fea)
            if plan is None:
                labels = downsample_labels(label, color_fea.shape[2:])
                sampled = self.sampler(labels, color_fea, other_fea, self.num_classes, self.min_views,
                                       self.max_views, self.max_total, self.share_draw)
            else:
                labels, anchors = plan
                if tuple(labels.shape[1:]) != tuple(color_fea.shape[2:]):
                    raise ValueError(f'contrastive loss: the anchor plan is for {tuple(labels.shape[1:])} '
                                     f'embeddings, the features are {tuple(color_fea.shape[2:])}')
                sampled = sample_anchors(labels, color_fea, other_fea, self.num_classes, self.min_views,
                                         self.max_views, self.max_total, self.share_draw, plan=anchors)
            if sampled is None:
                # Zero, but connected to the graph so that backward (and DDP's reducer) still works.
                zero = 0.0 * (color_fea.float().sum() + other_fea.float().sum())
                return zero, zero, zero
            feats_c, feats_o, set_labels = sampled
            return (self.cross_modal_loss(feats_c, feats_o, set_labels),
                    self.intra_modal_loss(feats_c, set_labels),
                    self.intra_modal_loss(feats_o, set_labels))

    def _padded_terms(self, label, color_fea, other_fea):
        labels = downsample_labels(label, color_fea.shape[2:])
        a = sample_anchors_padded(labels, color_fea, other_fea, self.num_classes, self.min_views, self.max_views,
                                  self.max_total, self.share_draw)
        return (info_nce_padded(a.color, a.other, a.labels, a.valid, self.cm_temperature),
                info_nce_padded(a.color, a.color, a.labels, a.valid, self.temperature),
                info_nce_padded(a.other, a.other, a.labels, a.valid, self.temperature))


def has_sync_free_form(loss: SupervisedMultiModalContrastiveLoss) -> bool:
    """Whether ``loss`` can run padded (:func:`sync_free`): with the vectorised sampler, not the loop."""
    return loss.sampler is sample_anchors


@contextlib.contextmanager
def sync_free(loss: SupervisedMultiModalContrastiveLoss) -> Iterator[None]:
    """Within the context, ``loss`` runs its padded form: the vectorised sampler's draws in fixed slots
    and the masked InfoNCE (no host read, every shape fixed, so a CUDA graph can hold them; the same
    draws and, to float rounding, the same values). Refused for the loop sampler."""
    if not has_sync_free_form(loss):
        raise ValueError("the contrastive loss has no padded form with anchor_sampler='loop'")
    before, loss.padded = loss.padded, True
    try:
        yield
    finally:
        loss.padded = before
