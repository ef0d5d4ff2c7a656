"""eval_every_epochs: the test split evaluated during training, reported as eval.py reports, and the
training the same with or without it."""
import glob
import json
import os
import re

import numpy as np
import pytest
import torch

from smmcl.config import ConfigError, load_config
from smmcl.engine import train as train_module
from smmcl.engine.checkpoint import read_checkpoint

from conftest import REPO

CONFIG = os.path.join(REPO, 'SMMCL_LLRGBD', 'config.py')


class Recorder:
    """A stand-in SummaryWriter keeping what the run writes."""
    def __init__(self, *args, **kwargs):
        self.scalars, self.images = [], []

    def add_scalar(self, name, value, step):
        self.scalars.append((name, value, step))

    def add_image(self, name, image, step, dataformats='CHW'):
        self.images.append((name, np.asarray(image), step, dataformats))

    def close(self):
        pass


def run(tiny_training, tmp_path, name, **changes):
    """Train the tiny run (2 epochs) into tmp_path/name; returns (log folder, the run's writer)."""
    writers = []

    def writer(*args, **kwargs):
        writers.append(Recorder())
        return writers[-1]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, 'SummaryWriter', writer)
        train_module.main(CONFIG, ['--set', *tiny_training(log_dir=str(tmp_path / name), **changes)])
    return tmp_path / name, writers[0]


def test_two_epochs_leave_two_tables_json_and_tensorboard(tiny_training, tmp_path):
    log, tb = run(tiny_training, tmp_path, 'watched', eval_every_epochs=1)
    [val_log] = glob.glob(str(log / 'val_2*.log'))  # not val_last.log
    text = open(val_log).read()
    titles = re.findall(r'^Model: (.*)$', text, re.M)
    assert titles == ['epoch-1 (evaluated during training)', 'epoch-2 (evaluated during training)']
    tables = [float(v) for v in re.findall(r'mean_IoU\t(\d+\.\d{3})%', text)]
    records = json.load(open(val_log[:-4] + '.json'))['evaluations']
    assert [r['epoch'] for r in records] == [1, 2] and all(r['checkpoint'] is None for r in records)
    assert [round(r['mean_iou'] * 100, 3) for r in records] == tables
    scalars = {(n, s): v for n, v, s in tb.scalars}
    assert [round(scalars[('val/mIoU', e)], 3) for e in (1, 2)] == tables
    assert ('val/mIoU_wo_first', 1) in scalars  # LLRGBD reports mIoU without void
    [(name, grid, step, fmt)] = [i for i in tb.images if i[2] == 1]
    assert name == 'val/predictions' and fmt == 'HWC' and grid.dtype == np.uint8
    assert grid.shape == (2 * 48, 2 * 64, 3)  # the 2 test images of 48x64: RGB | prediction


def test_the_training_is_the_same_with_or_without_it(tiny_training, tmp_path):
    states = []
    for name, every in (('plain', 0), ('watched', 1)):
        log, _ = run(tiny_training, tmp_path, name, eval_every_epochs=every)
        states.append((read_checkpoint(str(log / 'checkpoint' / 'epoch-2.pth')), torch.get_rng_state()))
    (a, rng_a), (b, rng_b) = states
    assert list(a['model']) == list(b['model'])
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])  # weights and BN statistics
    assert all(torch.equal(a['optimizer']['state'][i][s], b['optimizer']['state'][i][s])
               for i in a['optimizer']['state'] for s in a['optimizer']['state'][i])
    # every generator as saved with the last checkpoint (after the epoch-1 evaluation), and after the run
    ra, rb = a['rng'][0], b['rng'][0]
    assert torch.equal(ra['torch'], rb['torch']) and ra['python'] == rb['python']
    assert torch.equal(ra['numpy']['keys'], rb['numpy']['keys']) and ra['numpy']['pos'] == rb['numpy']['pos']
    assert torch.equal(rng_a, rng_b)


def test_a_bad_value_is_refused_at_load():
    with pytest.raises(ConfigError, match='eval_every_epochs=-1'):
        load_config(CONFIG, ['eval_every_epochs=-1'])


@pytest.mark.integration
def test_two_ranks_evaluate_together_as_one(tiny_training, tmp_path):
    """Two gloo CPU processes share the test images; the table equals the one-process evaluation of the
    same weights (eval.py's per-image seeding), and the run ends as it does without the evaluation."""
    import subprocess
    import sys
    from conftest import REGISTER_TINY_MSCAN
    script = tmp_path / 'run.py'
    script.write_text(REGISTER_TINY_MSCAN + 'import sys\nfrom smmcl.engine import train as train_module\n'
                      f'if __name__ == "__main__":\n    train_module.main({CONFIG!r}, sys.argv[1:])\n')
    overrides = tiny_training(nepochs=1, replicas=2, eval_every_epochs=1, log_dir=str(tmp_path / 'two'))
    result = subprocess.run([sys.executable, str(script), '--cpu-procs', '2', '--set', *overrides],
                            capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    [record] = json.load(open(glob.glob(str(tmp_path / 'two' / 'val_2*.json'))[0]))['evaluations']
    from smmcl.engine import eval_cli
    ckpt = str(tmp_path / 'two' / 'checkpoint' / 'epoch-1.pth')
    eval_cli.main(CONFIG, ['-e', ckpt, '--set', *tiny_training(log_dir=str(tmp_path / 'one'))])
    [again] = json.load(open(glob.glob(str(tmp_path / 'one' / 'val_2*.json'))[0]))['evaluations']
    assert record['iou'] == again['iou'] and record['mean_iou'] == again['mean_iou']
