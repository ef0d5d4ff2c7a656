"""Data of SMMCL: RGB-X datasets, the authors' augmentation and a fast equivalent, checks, synthetic data.

``smmcl.data.check`` and ``smmcl.data.synthetic`` are command-line modules; import them directly.
"""
from smmcl.data.dataset import DatasetError, RGBXDataset, load_item, split_layout, split_names
from smmcl.data.transforms import normalize, normalize_batch, train_transform, train_transform_plain

__all__ = ['DatasetError', 'RGBXDataset', 'load_item', 'split_layout', 'split_names', 'normalize',
           'normalize_batch', 'train_transform', 'train_transform_plain']
