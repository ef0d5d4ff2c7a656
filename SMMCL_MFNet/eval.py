"""Evaluate SMMCL on MFNet: ``python eval.py -d 0-3 -e <epoch>`` (options: smmcl/engine/eval_cli.py)."""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from smmcl.engine.eval_cli import main  # noqa: E402

if __name__ == '__main__':
    main(osp.join(osp.dirname(osp.abspath(__file__)), 'config.py'))
