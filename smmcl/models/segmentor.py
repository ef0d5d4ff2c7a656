"""SMMCL's segmentor: dual MSCAN encoder + LightHamHead decoder, trained with CE + contrastive terms."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import DualMSCAN
from .ham_head import LightHamHead
from .weights import init_backbone_weights, init_decoder_weights


class EncoderDecoder(nn.Module):
    """The authors' ``EncoderDecoder`` (``backbone.*``, ``decode_head.*`` state-dict names).

    Build it from a config with :func:`smmcl.models.builder.build_segmentor`; ImageNet weights are
    loaded afterwards by the training code (:func:`smmcl.engine.checkpoint.load_backbone_pretrained`).

    Args:
        num_classes: output channels of the decoder (K).
        backbone: MSCAN variant (``mscan_t/s/b/l``).
        decoder_channels: LightHamHead's ``channels`` and ``ham_channels``.
        drop_path_rate: stochastic depth; None keeps the variant's own.
        norm_layer: batch-norm factory (``nn.SyncBatchNorm`` with ``sync_bn=True`` on several GPUs).
        criterion: pixel loss on N-K-H-W logits and N-H-W labels (CE with ignore 255 in SMMCL);
            None for inference.
        contrastive: the contrastive loss on the two stage-4 embeddings (returns cm, vis, aux);
            None for inference. One with a ``plan(label, size)`` method (as
            :class:`~smmcl.losses.SupervisedMultiModalContrastiveLoss`) is asked for it before the
            forward, and what it returns, unless None, comes back as ``plan=``.
        loss_weights: (w_cm, w_vis, w_aux) of the contrastive terms in the total loss.
    """

    def __init__(self, num_classes: int, backbone: str = 'mscan_b', decoder_channels: int = 512,
                 drop_path_rate: Optional[float] = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 criterion: Optional[nn.Module] = None, contrastive: Optional[nn.Module] = None,
                 loss_weights: Sequence[float] = (0.2, 0.2, 0.2)):
        super().__init__()
        self.backbone = DualMSCAN(backbone, norm_layer, drop_path_rate=drop_path_rate)
        self.decode_head = LightHamHead(self.backbone.embed_dims[1:], num_classes,
                                        channels=decoder_channels, ham_channels=decoder_channels)
        self.criterion = criterion
        self.contrastive = contrastive
        self.loss_weights = tuple(loss_weights)
        init_backbone_weights(self.backbone)
        init_decoder_weights(self.decode_head)

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
        if self.criterion is None or self.contrastive is None:
            raise ValueError('EncoderDecoder was built without its losses; build it with '
                             'build_segmentor(config, with_loss=True) to train')
        # the anchor plan's host read before the forward is queued: it then waits for the labels only
        planner = getattr(self.contrastive, 'plan', None)
        plan = planner(label, self.backbone.embedding_size(rgb.shape[2:])) if planner else None
        logits, color_emb, other_emb = self.encode_decode(rgb, modal_x)
        ce = self.criterion(logits.float(), label.long())
        planned = {} if plan is None else {'plan': plan}
        cm, vis, aux = self.contrastive(label, color_emb, other_emb, **planned)
        w_cm, w_vis, w_aux = self.loss_weights
        loss = ce + w_cm * cm + w_vis * vis + w_aux * aux
        if return_terms:
            return {'loss': loss, 'ce': ce, 'cm': cm, 'vis': vis, 'aux': aux}
        return loss
