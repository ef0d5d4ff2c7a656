from .builder import build_contrastive_loss, build_segmentor
from .encoder import DualMSCAN
from .ham_head import LightHamHead
from .mscan import MSCAN_VARIANTS
from .segmentor import EncoderDecoder
from .weights import PretrainedReport, check_compatible, describe_state_dict, load_pretrained_backbone

__all__ = ['DualMSCAN', 'EncoderDecoder', 'LightHamHead', 'MSCAN_VARIANTS', 'PretrainedReport',
           'build_contrastive_loss', 'build_segmentor', 'check_compatible', 'describe_state_dict',
           'load_pretrained_backbone']
