"""Train SMMCL on LLRGBD: ``python SMMCL_LLRGBD/train.py [-d 0-3] [-c FILE] [--set key=value ...]``."""
import os.path as osp
import sys

HERE = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, osp.dirname(HERE))
from smmcl.engine.train import main  # noqa: E402

if __name__ == '__main__':  # the guard keeps spawned GPU processes from starting a training themselves
    main(osp.join(HERE, 'config.py'))
