"""Export an SMMCL LLRGBD checkpoint to ONNX: ``python export.py -e <epoch> -o smmcl.onnx`` (options:
smmcl/tools/export.py)."""
import os.path as osp
import sys

try:
    import smmcl  # noqa: F401  (an installed package: `make install`; no sys.path edits)
except ModuleNotFoundError:
    sys.exit('smmcl is not installed: run `make install` or `pip install -e .` in the repo root')
from smmcl.tools.export import main  # noqa: E402

if __name__ == '__main__':
    main(osp.join(osp.dirname(osp.abspath(__file__)), 'config.py'))
