"""Train SMMCL on LLRGBD: ``python SMMCL_LLRGBD/train.py [-d 0-3] [-c FILE] [--set key=value ...]``."""
import os.path as osp
import sys

try:
    import smmcl  # noqa: F401  (an installed package: `make install`; no sys.path edits)
except ModuleNotFoundError:
    sys.exit('smmcl is not installed: run `make install` or `pip install -e .` in the repo root')
from smmcl.engine.train import main  # noqa: E402

HERE = osp.dirname(osp.abspath(__file__))

if __name__ == '__main__':  # the guard keeps spawned GPU processes from starting a training themselves
    main(osp.join(HERE, 'config.py'))
