"""SMMCL's segmentor: dual MSCAN encoder + LightHamHead decoder, trained with CE + contrastive terms."""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..losses.contrastive import SupervisedMultiModalContrastiveLoss
from .encoder import DualMSCAN
from .ham_head import LightHamHead
from .weights import init_backbone_weights, init_decoder_weights, load_pretrained_backbone

logger = logging.getLogger(__name__)


class EncoderDecoder(nn.Module):
    """The authors' ``EncoderDecoder`` (``backbone.*``, ``decode_head.*`` state-dict names).

    Args:
        cfg: EasyDict with ``num_classes``, ``backbone``, ``decoder`` (LightHamHead),
            ``decoder_embed_dim``, ``pretrained_model`` (None: no ImageNet weights), the contrastive
            loss fields and ``weight_cm``, ``weight_vis``, ``weight_aux``.
        criterion: pixel loss on N-K-H-W logits and N-H-W labels (CE with ignore 255 in SMMCL).
        norm_layer: batch-norm factory (``nn.SyncBatchNorm`` with ``sync_bn=True`` on several GPUs).
    """

    def __init__(self, cfg, criterion: Optional[nn.Module] = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        if cfg.get('decoder', 'LightHamHead') != 'LightHamHead':
            raise ValueError(f"decoder {cfg.decoder!r} is not available; SMMCL uses 'LightHamHead'")
        self.backbone = DualMSCAN(cfg.backbone, norm_layer, drop_path_rate=cfg.get('drop_path_rate'))
        self.decode_head = LightHamHead(self.backbone.embed_dims[1:], cfg.num_classes,
                                        channels=cfg.decoder_embed_dim, ham_channels=cfg.decoder_embed_dim)
        self.criterion = criterion
        self.contrastive = SupervisedMultiModalContrastiveLoss(cfg) if criterion is not None else None
        self.loss_weights = (cfg.weight_cm, cfg.weight_vis, cfg.weight_aux)
        init_backbone_weights(self.backbone)
        init_decoder_weights(self.decode_head)
        self.pretrained_report = None
        if cfg.get('pretrained_model'):
            self.pretrained_report = load_pretrained_backbone(self.backbone, cfg.pretrained_model,
                                                              cfg.backbone)
            logger.info(self.pretrained_report.summary())

    def _decode(self, fused, size) -> torch.Tensor:
        logits = self.decode_head(fused)
        return F.interpolate(logits, size=size, mode='bilinear', align_corners=False)

    def encode_decode(self, rgb: torch.Tensor, modal_x: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rgb, modal_x: N-3-H-W -> (logits N-K-H-W, color_embedding N-256-h-w, other_embedding)."""
        fused, color_emb, other_emb = self.backbone(rgb, modal_x)
        return self._decode(fused, rgb.shape[2:]), color_emb, other_emb

    def forward(self, rgb: torch.Tensor, modal_x: torch.Tensor, label: Optional[torch.Tensor] = None,
                return_terms: bool = False) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Without ``label``: N-K-H-W logits. With a label (N-H-W, 255 = ignore): the total loss
        ``CE + w_cm L_cm + w_vis L_vis + w_aux L_aux``, or with ``return_terms`` a dict of it
        (``loss``) and its unweighted terms (``ce``, ``cm``, ``vis``, ``aux``)."""
        if label is None:
            fused, _, _ = self.backbone(rgb, modal_x, with_embeddings=False)
            return self._decode(fused, rgb.shape[2:])
        if self.criterion is None:
            raise ValueError('EncoderDecoder was built without a criterion; pass one to train')
        logits, color_emb, other_emb = self.encode_decode(rgb, modal_x)
        ce = self.criterion(logits.float(), label.long())
        cm, vis, aux = self.contrastive(label, color_emb, other_emb)
        w_cm, w_vis, w_aux = self.loss_weights
        loss = ce + w_cm * cm + w_vis * vis + w_aux * aux
        if return_terms:
            return {'loss': loss, 'ce': ce, 'cm': cm, 'vis': vis, 'aux': aux}
        return loss
