"""eval_every_epochs with the real TensorBoard writer: the event file on disk holds the scores and the
prediction grid at step = epoch. (The tables, the JSON and the unchanged training: tests/test_watch.py,
which records through a stand-in writer.)"""
import glob
import json
import os
import struct

from tensorboardX.proto import event_pb2

from smmcl.engine import train as train_module

from conftest import REPO

CONFIG = os.path.join(REPO, 'SMMCL_LLRGBD', 'config.py')


def read_events(path):
    """Every Event of a TensorBoard event file. TFRecord framing: 8-byte length, 4-byte CRC of it, the
    record, 4-byte CRC of the record (tensorboardX writes, but does not read)."""
    raw, events, at = open(path, 'rb').read(), [], 0
    while at < len(raw):
        (length,) = struct.unpack('<Q', raw[at:at + 8])
        event = event_pb2.Event()
        event.ParseFromString(raw[at + 12:at + 12 + length])
        events.append(event)
        at += 16 + length
    return events


def val_summaries(events):
    """{(tag, step): float value, or 'image'} of the ``val/`` summaries."""
    found = {}
    for event in events:
        for value in event.summary.value:
            if value.tag.startswith('val/'):
                found[value.tag, event.step] = value.simple_value if value.HasField('simple_value') else 'image'
    return found


def test_the_event_file_holds_val_miou_and_the_grid(tiny_training, tmp_path):
    train_module.main(CONFIG, ['--set', *tiny_training(eval_every_epochs=1)])
    log = tmp_path / 'log'
    # the run's own folder, not the tb/tb link the authors' layout adds to it
    [events] = [p for p in glob.glob(str(log / 'tb' / '*' / 'events.out.tfevents.*'))
                if not os.path.islink(os.path.dirname(p))]
    found = val_summaries(read_events(events))
    [scores] = glob.glob(str(log / 'val_2*.json'))
    records = json.load(open(scores))['evaluations']
    for record in records:  # one per epoch; TensorBoard holds the same mIoU in percent, float32
        epoch = record['epoch']
        assert abs(found['val/mIoU', epoch] - record['mean_iou'] * 100) < 1e-4
        assert abs(found['val/mIoU_wo_first', epoch] - record['mean_iou_wo_first'] * 100) < 1e-4
        assert found['val/predictions', epoch] == 'image'
    assert sorted(r['epoch'] for r in records) == [1, 2]
