"""Editing an experiment's config.py as the authors do: every assignment runs as written, derived keys
follow what was set, and a key nobody declared stops every entry point at load."""
import ast
import logging
import os
import os.path as osp
import shutil

import pytest

from smmcl.config import (AUTHORS_INERT_KEYS, DERIVED_KEYS, REPO_ROOT, UnknownKeyError, base_config,
                          load_config)

EXPERIMENTS = ('SMMCL_LLRGBD', 'SMMCL_MFNet', 'SMMCL_NYU')


def edited_config(tmp_path, *lines: str, name: str = 'SMMCL_LLRGBD') -> str:
    """A copy of experiment ``name``'s config.py in ``tmp_path`` with ``lines`` appended."""
    path = tmp_path / 'config.py'
    shutil.copy(osp.join(REPO_ROOT, name, 'config.py'), path)
    with open(path, 'a') as f:
        f.write('\n' + '\n'.join(lines) + '\n')
    return str(path)


def assigned_keys(path: str):
    """The keys a config file assigns as ``X.key = ...`` (tuple targets included)."""
    keys = set()
    for node in ast.walk(ast.parse(open(path).read())):
        for target in getattr(node, 'targets', []):
            for leaf in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(leaf, ast.Attribute):
                    keys.add(leaf.attr)
    return keys


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_every_key_an_experiment_assigns_is_declared(name):
    keys = assigned_keys(osp.join(REPO_ROOT, name, 'config.py'))
    assert 'dataset_path' in keys  # the walk found the assignments
    undeclared = keys - set(base_config()) - set(DERIVED_KEYS)
    assert undeclared == set()


def test_derived_keys_set_in_config_py_run_as_written(tmp_path):
    run = tmp_path / 'runs' / 'my_run'
    path = edited_config(tmp_path, f'C.log_dir = {str(run)!r}', 'C.niters_per_epoch = 7')
    c = load_config(path)
    assert c.log_dir == str(run) and c.niters_per_epoch == 7
    # children follow the parent that was set
    assert c.tb_dir == str(run / 'tb') and c.checkpoint_dir == str(run / 'checkpoint')
    assert osp.dirname(c.log_file) == str(run) and osp.dirname(c.val_log_file) == str(run)
    # --set still wins over config.py
    assert load_config(path, ['niters_per_epoch=3']).niters_per_epoch == 3


def test_a_typo_stops_loading_naming_the_key_its_line_and_how_to_declare_one(tmp_path):
    path = edited_config(tmp_path, 'C.niters_per_epoch = 7', 'C.nepoch = 2')
    line = open(path).read().splitlines().index('C.nepoch = 2') + 1
    with pytest.raises(UnknownKeyError) as error:
        load_config(path)
    message = str(error.value)
    assert f"'nepoch' (line {line}; did you mean 'nepochs'?)" in message
    assert path in message and 'base_config' in message


def test_the_authors_inert_keys_are_accepted_with_one_line(tmp_path, caplog):
    lines = [f'C.{key} = 1' for key in AUTHORS_INERT_KEYS]
    with caplog.at_level(logging.INFO, logger='smmcl.config'):
        c = load_config(edited_config(tmp_path, *lines))
    notes = [r.getMessage() for r in caplog.records if 'fix_bias' in r.getMessage()]
    assert len(notes) == 1 and all(key in notes[0] for key in AUTHORS_INERT_KEYS)
    assert c.nepochs == 1000


def test_data_folders_follow_dataset_path_unless_config_py_pinned_them(tmp_path, caplog):
    moved = load_config(edited_config(tmp_path), [f'dataset_path={tmp_path / "x"}'])
    assert moved.rgb_root_folder == str(tmp_path / 'x' / 'train' / 'rgb')
    assert moved.eval_root == str(tmp_path / 'x' / 'test')
    pinned = edited_config(tmp_path, "C.rgb_root_folder = '/data/mine/rgb'")
    with caplog.at_level(logging.WARNING, logger='smmcl.config'):
        c = load_config(pinned, [f'dataset_path={tmp_path / "x"}'])
    assert c.rgb_root_folder == '/data/mine/rgb'
    assert c.x_root_folder == str(tmp_path / 'x' / 'train' / 'depth')
    assert any('rgb_root_folder' in r.getMessage() and 'dataset_path' in r.getMessage() for r in caplog.records)


def test_pretrained_model_follows_the_backbone_unless_set(tmp_path):
    c = load_config(edited_config(tmp_path), ['backbone=mscan_t'])
    assert c.pretrained_model == osp.join(REPO_ROOT, 'pretrained', 'segnext', 'mscan_t.pth')
    assert c.log_dir.endswith('log_LLRGBD_mscan_t')
    assert load_config(edited_config(tmp_path, 'C.pretrained_model = None'), ['backbone=mscan_t']
                       ).pretrained_model is None
    assert load_config(edited_config(tmp_path), ['pretrained_model=/w/b.pth']).pretrained_model == '/w/b.pth'


ENTRY_POINTS = {
    'train': ('smmcl.engine.train', True), 'eval': ('smmcl.engine.eval_cli', True),
    'predict': ('smmcl.engine.predict_cli', True), 'export': ('smmcl.tools.export', True),
    'embeddings': ('smmcl.tools.embeddings', False), 'figure': ('smmcl.tools.figure', False),
    'complexity': ('smmcl.tools.complexity', False), 'check': ('smmcl.data.check', False),
}


@pytest.mark.parametrize('tool', sorted(ENTRY_POINTS))
def test_every_entry_point_stops_at_load_on_a_typo(tool, tmp_path, capsys):
    import importlib
    module_name, takes_config = ENTRY_POINTS[tool]
    main = importlib.import_module(module_name).main
    path = edited_config(tmp_path, 'C.nepoch = 2')
    extra = {'figure': ['-e', 'last'], 'export': ['-o', str(tmp_path / 'm.onnx')],
             'predict': ['--rgb', str(tmp_path), '--x', str(tmp_path), '-o', str(tmp_path / 'out')]}.get(tool, [])
    with pytest.raises(SystemExit) as stop:
        if takes_config:
            main(path, extra)
        else:
            main(([path] if tool == 'check' else ['--config', path]) + extra)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "'nepoch'" in err and "'nepochs'" in err and 'Traceback' not in err
    assert not os.listdir(tmp_path / 'out') if (tmp_path / 'out').exists() else True


def test_the_edited_config_trains_where_and_as_long_as_written(tiny_training, tmp_path):
    """The two lines appended to the experiment's config.py: the run lands in C.log_dir, 7 iterations an
    epoch (with 4 training images: the authors' formula would give 4 // 2 + 1 = 3)."""
    from smmcl.engine import train as train_module
    from smmcl.engine.checkpoint import LAST, read_checkpoint
    run = tmp_path / 'runs' / 'my_run'
    path = edited_config(tmp_path, f'C.log_dir = {str(run)!r}', 'C.niters_per_epoch = 7')
    overrides = [o for o in tiny_training(nepochs=1) if not o.startswith(('log_dir=', 'niters_per_epoch='))]
    train_module.main(path, ['--set', *overrides])
    state = read_checkpoint(str(run / 'checkpoint' / LAST))
    assert state['lr_step'] == 7 and state['iteration'] == 6
    assert os.path.islink(run / 'tb' / 'tb') and any(f.startswith('log_') for f in os.listdir(run))
