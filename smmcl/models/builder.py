"""The one place where a config becomes a segmentor: every config key the model and its losses read.

Train, eval, bench, tests and later tools build with :func:`build_segmentor`. ImageNet weights
(``pretrained_model``) are not read here: the training code loads them after building
(:func:`smmcl.engine.checkpoint.load_backbone_pretrained`), so inference never needs the file.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..choices import DECODERS
from ..config import check_choice
from ..losses.contrastive import SupervisedMultiModalContrastiveLoss
from .segmentor import EncoderDecoder



def build_contrastive_loss(config) -> SupervisedMultiModalContrastiveLoss:
    """The contrastive loss with ``config``'s anchor sampling and temperatures."""
    return SupervisedMultiModalContrastiveLoss(
        num_classes=config.num_classes, min_views=config.min_views_per_class,
        max_views=config.max_views_per_class, max_total=config.max_features_total,
        temperature=config.temperature, cm_temperature=config.cm_temperature,
        share_draw=config.share_anchor_draw, sampler=config.anchor_sampler)


def build_segmentor(config, *, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                    with_loss: bool = False) -> EncoderDecoder:
    """SMMCL's segmentor for ``config`` (on the CPU, in train mode, with the authors' initialisation).

    Args:
        config: ``backbone``, ``num_classes``, ``decoder``, ``decoder_embed_dim``, ``drop_path_rate``;
            with ``with_loss`` also ``background`` (CE's ignore label), the contrastive fields
            (:func:`build_contrastive_loss`) and ``weight_cm``, ``weight_vis``, ``weight_aux``.
        norm_layer: batch-norm factory of the backbone and projectors.
        with_loss: attach CE and the contrastive loss, so that ``model(rgb, x, label)`` returns the loss.

    Raises:
        ConfigError: ``config.decoder`` is not one of :data:`DECODERS`.
    """
    check_choice('decoder', config.decoder, DECODERS)
    criterion = contrastive = None
    if with_loss:
        criterion = nn.CrossEntropyLoss(reduction='mean', ignore_index=config.background)
        contrastive = build_contrastive_loss(config)
    return EncoderDecoder(
        num_classes=config.num_classes, backbone=config.backbone, decoder_channels=config.decoder_embed_dim,
        drop_path_rate=config.drop_path_rate, norm_layer=norm_layer, criterion=criterion,
        contrastive=contrastive, loss_weights=(config.weight_cm, config.weight_vis, config.weight_aux))
