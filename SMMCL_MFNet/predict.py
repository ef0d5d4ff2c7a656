"""Segment your own images with SMMCL on MFNet: ``python predict.py -e <epoch> --rgb RGB --x X -o DIR``
(options: smmcl/engine/predict_cli.py)."""
import os.path as osp
import sys

try:
    import smmcl  # noqa: F401  (an installed package: `make install`; no sys.path edits)
except ModuleNotFoundError:
    sys.exit('smmcl is not installed: run `make install` or `pip install -e .` in the repo root')
from smmcl.engine.predict_cli import main  # noqa: E402

if __name__ == '__main__':
    main(osp.join(osp.dirname(osp.abspath(__file__)), 'config.py'))
