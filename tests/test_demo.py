"""The demo's bookkeeping (smmcl.demo): a finished run of the same settings is reused by the ablation, a
run of other settings is trained again; the mIoU is read from eval.py's last line. (The demo itself trains
for minutes: `make demo`.)"""
import os

from smmcl import demo


def test_a_finished_run_of_the_same_settings_is_reused(tmp_path, monkeypatch):
    calls = []

    def fake_run(script, args):
        calls.append(script)
        if script == 'train.py':  # what a finished training leaves behind
            os.makedirs(tmp_path / 'log' / 'checkpoint', exist_ok=True)
            (tmp_path / 'log' / 'checkpoint' / 'epoch-3.pth').write_bytes(b'')
            return 'done\n'
        return 'Model: x\nmIoU: 1.000\nmIoU: 42.125\n'

    monkeypatch.setattr(demo, 'run', fake_run)
    settings = ['nepochs=3', 'lr=2e-3']
    assert demo.train_and_evaluate(settings, 3, str(tmp_path / 'log')) == 42.125
    assert calls == ['train.py', 'eval.py']
    assert demo.train_and_evaluate(settings, 3, str(tmp_path / 'log')) == 42.125
    assert calls[2:] == ['eval.py']  # reused
    demo.train_and_evaluate(settings + demo.CE_ONLY, 3, str(tmp_path / 'log'))
    assert calls[3:] == ['train.py', 'eval.py']  # other settings: trained again
    assert (tmp_path / 'log' / demo.SETTINGS_FILE).read_text().split() == settings + demo.CE_ONLY
