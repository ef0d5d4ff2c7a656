"""SMMCL on MFNet (RGB-thermal, day and night, 9 classes) in the CMX-family layout.

Folder names are values: forks that use ``Modal/`` or ``rgb/ ther/ labels/`` only change them here or
with ``--set x_folder=Modal``.
"""
import os.path as osp

from smmcl.config import REPO_ROOT, base_config

config = C = base_config()
C.exp_dir = osp.dirname(osp.abspath(__file__))
C.dataset_name = 'MFNet'
C.dataset_path = osp.join(REPO_ROOT, 'datasets', 'MFNet')
C.rgb_folder, C.rgb_format = 'RGB', '.png'
C.x_folder, C.x_format, C.x_is_single_channel = 'Thermal', '.png', True
C.gt_folder, C.gt_format, C.gt_transform = 'Label', '.png', False
# CMX's MFNet list (run/rgbt/config.py before CMX commit 122bf9f: train.txt, 784 images); the authors
# released no MFNet recipe. Train + val: --set train_list=train_val.txt num_train_imgs=1176.
C.train_list = 'train.txt'
C.eval_list = 'test.txt'  # 393 = 205 day + 188 night
C.eval_subsets = {'day': 'test_day.txt', 'night': 'test_night.txt'}  # reported when present
C.num_train_imgs = 784
C.num_eval_imgs = 393
C.num_classes = 9
# 'unlabeled' is a scored class of the 9-class mean in MFNet's protocol.
C.class_names = ['unlabeled', 'car', 'person', 'bike', 'curve', 'car_stop', 'guardrail',
                 'color_cone', 'bump']
C.image_height, C.image_width = 480, 640
# Training recipe: the authors released none for MFNet; we keep base_config's, which is their LLRGBD one
# (1000 epochs of batch 16 in 4 chunks, replicas=4, checkpoints from 300 every 100). Their released
# epoch-300 sits on that checkpoint grid, and their one code base and one README command train all
# three datasets. CMX's MFNet config (batch 8, 500 epochs, checkpoints from 150 every 25) is --set
# batch_size=8 nepochs=500 checkpoint_start_epoch=150 checkpoint_step=25.
C.eval_crop_size = [480, 640]
