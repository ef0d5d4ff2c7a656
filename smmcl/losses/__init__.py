from .contrastive import SupervisedMultiModalContrastiveLoss, info_nce, sample_anchors

__all__ = ['SupervisedMultiModalContrastiveLoss', 'info_nce', 'sample_anchors']
