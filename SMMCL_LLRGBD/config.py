"""SMMCL on LLRGBD (low-light RGB-D, 14 classes): the authors' SMMCL_LLRGBD settings.

Everything not set here is SMMCL's default from ``smmcl.config.base_config``, whose training recipe is
the authors' ``SMMCL_LLRGBD/config.py``: 1000 epochs of batch 16, checkpoints from epoch 300 every 100
(their released ``epoch-500.pth`` is a mid-schedule checkpoint of such a run), each batch as their
``-d 0-3`` run on 4 GPUs splits it (``replicas=4``: 4 chunks of 4, on any number of GPUs that divides
4). Override any value on the command line: ``python train.py --set backbone=mscan_t
dataset_path=/data/LLRGBD``.
"""
import os.path as osp

from smmcl.config import REPO_ROOT, base_config

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
# The authors' lists (their config.py: train_source / eval_source = <dataset_path>/train.txt, test.txt with
# dataset_path LLRGBD/train, then LLRGBD/test; read by dataloader/RGBXDataset.py _get_file_names); a copy
# without them uses every image of the split's rgb/ folder, sorted, with a log line (lists_optional).
C.train_list, C.eval_list = 'train/train.txt', 'test/test.txt'
C.lists_optional = True
C.num_train_imgs = 1418
C.num_eval_imgs = 479
C.num_classes = 14
C.class_names = ['void', 'bed', 'books', 'ceiling', 'chair', 'floor', 'furniture', 'objects',
                 'painting', 'sofa', 'table', 'tv', 'wall', 'window']
C.report_miou_without_first = True
C.image_height, C.image_width = 480, 640
C.eval_crop_size = [480, 640]
# Colours of eval.py -p predictions, the authors' RGBXDataset.get_class_colors (floats in 0-1, turned into
# bytes as uint8(c * 255)), one per class in class_names' order.
C.class_colors = [[0, 0, 0], [0, 0, 1], [0.9137, 0.3490, 0.1882], [0, 0.8549, 0], [0.5843, 0, 0.9412],
                  [0.8706, 0.9451, 0.0941], [1.0000, 0.8078, 0.8078], [0, 0.8784, 0.8980],
                  [0.4157, 0.5333, 0.8000], [0.4588, 0.1137, 0.1608], [0.9412, 0.1373, 0.9216],
                  [0, 0.6549, 0.6118], [0.9765, 0.5451, 0], [0.8824, 0.8980, 0.7608]]
