"""SMMCL on LLRGBD (low-light RGB-D, 14 classes): the authors' SMMCL_LLRGBD settings.

Everything not set here is SMMCL's default from ``smmcl.config.base_config``. Override any value on the
command line: ``python train.py --set backbone=mscan_t dataset_path=/data/LLRGBD``.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from smmcl.config import REPO_ROOT, base_config  # noqa: E402

config = C = base_config()
C.exp_dir = osp.dirname(osp.abspath(__file__))
C.dataset_name = 'LLRGBD'
C.dataset_path = osp.join(REPO_ROOT, 'datasets', 'LLRGBD')
# The dataset ships train/ and test/ folders; the authors edited dataset_path between training and
# evaluation, we name both splits instead.
C.train_split_dir = 'train'
C.eval_split_dir = 'test'
C.rgb_folder, C.rgb_format = 'rgb', '.png'
C.x_folder, C.x_format, C.x_is_single_channel = 'depth', '.png', True
C.gt_folder, C.gt_format, C.gt_transform = 'label', '.png', False
C.train_list = C.eval_list = None  # every image of the split's rgb/ folder
C.num_train_imgs = 1418
C.num_eval_imgs = 479
C.num_classes = 14
C.class_names = ['void', 'bed', 'books', 'ceiling', 'chair', 'floor', 'furniture', 'objects',
                 'painting', 'sofa', 'table', 'tv', 'wall', 'window']
C.report_miou_without_first = True
C.image_height, C.image_width = 480, 640
C.batch_size = 16
C.nepochs = 500  # released checkpoint: epoch-500
C.checkpoint_start_epoch = 250
C.checkpoint_step = 25
C.eval_crop_size = [480, 640]
