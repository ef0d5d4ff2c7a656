"""SMMCL on MFNet (RGB-thermal, day and night, 9 classes) in the CMX-family layout.

Folder names are values: forks that use ``Modal/`` or ``rgb/ ther/ labels/`` only change them here or
with ``--set x_folder=Modal``.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from smmcl.config import REPO_ROOT, base_config  # noqa: E402

config = C = base_config()
C.exp_dir = osp.dirname(osp.abspath(__file__))
C.dataset_name = 'MFNet'
C.dataset_path = osp.join(REPO_ROOT, 'datasets', 'MFNet')
C.rgb_folder, C.rgb_format = 'RGB', '.png'
C.x_folder, C.x_format, C.x_is_single_channel = 'Thermal', '.png', True
C.gt_folder, C.gt_format, C.gt_transform = 'Label', '.png', False
C.train_list = 'train_val.txt'  # 784 train + 392 val
C.eval_list = 'test.txt'  # 393 = 205 day + 188 night
C.eval_subsets = {'day': 'test_day.txt', 'night': 'test_night.txt'}  # reported when present
C.num_train_imgs = 1176
C.num_eval_imgs = 393
C.num_classes = 9
# 'unlabeled' is a scored class of the 9-class mean in MFNet's protocol.
C.class_names = ['unlabeled', 'car', 'person', 'bike', 'curve', 'car_stop', 'guardrail',
                 'color_cone', 'bump']
C.image_height, C.image_width = 480, 640
C.nepochs = 300  # released checkpoint: epoch-300
C.checkpoint_start_epoch = 150
C.checkpoint_step = 25
C.eval_crop_size = [480, 640]
