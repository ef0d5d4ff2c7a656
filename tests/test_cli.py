"""The entry points share one definition of their common options: every --set group is kept."""
import os
import os.path as osp

import pytest

from smmcl.config import REPO_ROOT
from smmcl.engine import eval_cli, predict_cli
from smmcl.engine.train import parse_args
from smmcl.tools import complexity, export

PARSERS = {
    'train': lambda argv: parse_args(argv),
    'eval': lambda argv: eval_cli.build_parser().parse_args(['-e', '500'] + argv),
    'predict': lambda argv: predict_cli.build_parser().parse_args(['--rgb', 'a', '--x', 'b', '-o', 'c'] + argv),
    'export': lambda argv: export.build_parser().parse_args(['-o', 'm.onnx'] + argv),
    'complexity': lambda argv: complexity.build_parser().parse_args(['--config', 'c.py'] + argv),
}


@pytest.mark.parametrize('tool', sorted(PARSERS))
def test_every_set_group_is_kept(tool):
    args = PARSERS[tool](['--set', 'dataset_path=/x', '--set', 'backbone=mscan_b', 'lr=1'])
    assert args.set == ['dataset_path=/x', 'backbone=mscan_b', 'lr=1']


def test_eval_with_two_set_groups_keeps_both(tmp_path, capsys):
    """End to end: the first group's dataset_path reaches the config (it names the missing folder)."""
    with pytest.raises(SystemExit):
        eval_cli.main(osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'config.py'),
                      ['-e', str(tmp_path / 'x.pth'), '--set', f'dataset_path={tmp_path / "data"}', '--set',
                       'backbone=mscan_b'])
    assert str(tmp_path / 'x.pth') in capsys.readouterr().err  # the checkpoint, looked for first
    from smmcl.config import load_config
    args = eval_cli.build_parser().parse_args(['--set', f'dataset_path={tmp_path}', '--set', 'backbone=mscan_t'])
    config = load_config(osp.join(REPO_ROOT, 'SMMCL_LLRGBD', 'config.py'), args.set)
    assert config.dataset_path == str(tmp_path) and config.backbone == 'mscan_t'


def test_no_entry_point_defines_the_shared_options_itself():
    package = osp.join(REPO_ROOT, 'smmcl')
    for folder, _, files in os.walk(package):
        for name in files:
            path = osp.join(folder, name)
            if name.endswith('.py') and path != osp.join(package, 'cli.py'):
                text = open(path).read()
                assert "add_argument('--set'" not in text and "add_argument('--config'" not in text, path
