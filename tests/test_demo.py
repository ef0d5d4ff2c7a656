"""The demo's bookkeeping (smmcl.demo): a finished run of the same settings is reused by the ablation, a
run of other settings is trained again; the mIoU is read from the scores eval.py writes as data. (The demo itself trains
for minutes: `make demo`.)"""
import json
import os

import pytest

from smmcl import demo


def test_a_finished_run_of_the_same_settings_is_reused(tmp_path, monkeypatch):
    calls = []

    def fake_run(script, args):
        calls.append(script)
        if script == 'train.py':  # what a finished training leaves behind
            os.makedirs(tmp_path / 'log' / 'checkpoint', exist_ok=True)
            (tmp_path / 'log' / 'checkpoint' / 'epoch-3.pth').write_bytes(b'')
            return 'done\n'
        records = [dict(mean_iou=0.01), dict(mean_iou=0.42125)]  # eval.py's scores, newest last
        (tmp_path / 'log' / 'val_2026_01_01_00_00_00.json').write_text(json.dumps(dict(evaluations=records)))
        return 'mIoU: 1.000\n'  # printed text is not read

    monkeypatch.setattr(demo, 'run', fake_run)
    settings = ['nepochs=3', 'lr=2e-3']
    assert demo.train_and_evaluate(settings, 3, str(tmp_path / 'log')) == pytest.approx(42.125)
    assert calls == ['train.py', 'eval.py']
    assert demo.train_and_evaluate(settings, 3, str(tmp_path / 'log')) == pytest.approx(42.125)
    assert calls[2:] == ['eval.py']  # reused
    demo.train_and_evaluate(settings + demo.CE_ONLY, 3, str(tmp_path / 'log'))
    assert calls[3:] == ['train.py', 'eval.py']  # other settings: trained again
    assert (tmp_path / 'log' / demo.SETTINGS_FILE).read_text().split() == settings + demo.CE_ONLY
