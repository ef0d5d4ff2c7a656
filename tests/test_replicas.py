"""``replicas``: the authors' nn.DataParallel chunks of one global batch, on any number of processes."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from smmcl.config import ConfigError, load_config
from smmcl.engine import train as train_module
from smmcl.engine.checkpoint import read_checkpoint
from smmcl.engine.chunks import ChunkPlan, chunk_seed, plan_chunks, run_chunks
from smmcl.engine.dist import DistContext
from smmcl.engine.seeding import seed_generators
from smmcl.models import build_segmentor

from conftest import REGISTER_TINY_MSCAN, REPO, tiny_config

CONFIG = os.path.join(REPO, 'SMMCL_LLRGBD', 'config.py')
STATS = ('running_mean', 'running_var', 'num_batches_tracked')


def final_model(log_dir, epoch=1):
    return read_checkpoint(os.path.join(log_dir, 'checkpoint', f'epoch-{epoch}.pth'))['model']


def relative_difference(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def log_text(log_dir):
    return ''.join(open(os.path.join(log_dir, f)).read() for f in os.listdir(log_dir) if f.startswith('log_'))


def assert_same_run(a, b):
    """Per tensor, norm of the difference / norm <= 1e-5 (only the order of floating-point sums may
    differ); the same number of BatchNorm updates."""
    assert list(a) == list(b)
    for key in a:
        if key.endswith('num_batches_tracked'):
            assert a[key].item() == b[key].item(), key
        else:
            assert relative_difference(b[key], a[key]) <= 1e-5, key


@pytest.mark.integration
@pytest.mark.slow
def test_two_processes_train_the_run_of_one_and_resume_it(tiny_training, tmp_path):
    """replicas=2, batch 4: two gloo processes (one chunk each) and one process (both chunks in turn)
    end with the same weights and BatchNorm statistics, up to the order of floating-point sums; drop
    path (the test width's 0.1) and the contrastive terms are on. A checkpoint of two processes
    continues on one, and one of one process on two, as the run would have."""
    script = tmp_path / 'run.py'
    script.write_text(REGISTER_TINY_MSCAN + textwrap.dedent(f'''
        import sys
        from smmcl.engine import train
        if __name__ == "__main__":
            train.main({CONFIG!r}, sys.argv[1:])
    '''))

    def on_two(log_dir, *args, nepochs):
        result = subprocess.run([sys.executable, str(script), '--cpu-procs', '2', *args, '--set',
                                 *tiny_training(log_dir=log_dir, nepochs=nepochs, **run)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stderr

    run = dict(batch_size=4, replicas=2, niters_per_epoch=3)
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    train_module.main(CONFIG, ['--set', *tiny_training(log_dir=one, nepochs=2, **run)])
    err = on_two(two, nepochs=1)
    assert '2 chunk(s) of 2' in err and 'process p runs chunk p' in err
    assert 'the process runs chunks 0..1 one after another' in log_text(one)
    assert float(log_text(one).split(' cm=')[1].split()[0]) > 0.01  # the contrastive terms found anchors
    assert_same_run(final_model(one), final_model(two))
    # chunk 0's statistics only: one update a step
    assert all(v.item() == 3 for k, v in final_model(two).items() if k.endswith('num_batches_tracked'))
    bias = 'decode_head.conv_seg.bias'
    assert not torch.equal(final_model(one)[bias], final_model(one, 2)[bias])  # epoch 2 trains on

    # epoch 2 on one process from the two processes' epoch 1, and on two from one's
    two_then_one = str(tmp_path / 'two_then_one')
    train_module.main(CONFIG, ['-c', os.path.join(two, 'checkpoint', 'epoch-1.pth'), '--set',
                               *tiny_training(log_dir=two_then_one, nepochs=2, **run)])
    assert_same_run(final_model(one, 2), final_model(two_then_one, 2))
    one_then_two = str(tmp_path / 'one_then_two')
    on_two(one_then_two, '-c', os.path.join(one, 'checkpoint', 'epoch-1.pth'), nepochs=2)
    assert_same_run(final_model(one, 2), final_model(one_then_two, 2))


def test_one_chunk_and_two_chunks_are_different_runs(tiny_training, tmp_path):
    """At batch 4, replicas=1 (one BatchNorm batch, one anchor draw, one loss) and replicas=2 (two of
    each) start from the same weights and the same images, and end elsewhere."""
    ends = {}
    for replicas in (1, 2):
        log_dir = str(tmp_path / f'r{replicas}')
        train_module.main(CONFIG, ['--set', *tiny_training(log_dir=log_dir, batch_size=4, replicas=replicas,
                                                           niters_per_epoch=2, nepochs=1)])
        ends[replicas] = final_model(log_dir)
    weights = [k for k in ends[1] if not k.endswith(STATS)]
    stats = [k for k in ends[1] if k.endswith(('running_mean', 'running_var'))]
    assert max(relative_difference(ends[2][k], ends[1][k]) for k in weights) > 1e-3
    assert max(relative_difference(ends[2][k], ends[1][k]) for k in stats) > 1e-3


@pytest.fixture
def tiny_model(tiny_mscan):
    torch.manual_seed(0)
    model = build_segmentor(tiny_config(backbone=tiny_mscan, min_views_per_class=1), with_loss=True)
    return model.train()


def batch_of(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 64, 96, generator=generator), torch.randn(n, 3, 64, 96, generator=generator),
            torch.randint(0, 5, (n, 64, 96), generator=generator))


def chunk_forward(model, inputs, step, chunk):
    seed_generators(chunk_seed(1, step, chunk))
    return model(*inputs, return_terms=True)


def test_running_statistics_follow_chunk_zero_and_gradients_average_the_chunks(tiny_model):
    """run_chunks on 4 images in 2 chunks = the authors' 2 GPUs: BatchNorm buffers as after chunk 0
    alone (bit for bit), gradients the mean of the two chunks' gradients, each chunk drawn from its
    own (seed, step, chunk) streams, and the terms per chunk."""
    rgb, x, label = batch_of(4)
    reference = copy.deepcopy(tiny_model)
    whole = copy.deepcopy(tiny_model)
    terms = run_chunks(tiny_model, (rgb, x, label), ChunkPlan(2, 1, 0, 2), step=7, seed=1)
    assert terms.shape == (2, 5)

    out0 = chunk_forward(reference, (rgb[:2], x[:2], label[:2]), 7, 0)
    after_chunk0 = {k: v.clone() for k, v in reference.named_buffers()}
    out1 = chunk_forward(reference, (rgb[2:], x[2:], label[2:]), 7, 1)
    ((out0['loss'] + out1['loss']) / 2).backward()
    assert torch.equal(terms[:, 0], torch.stack([out0['loss'], out1['loss']]).detach())
    for name, buffer in tiny_model.named_buffers():
        assert torch.equal(buffer, after_chunk0[name]), name
    grads = dict(reference.named_parameters())
    for name, param in tiny_model.named_parameters():
        if param.grad is not None:
            assert torch.allclose(param.grad, grads[name].grad, rtol=1e-5, atol=1e-7), name
    # One BatchNorm over the whole batch would have kept other statistics (all but a few whose inputs
    # are still near zero at initialisation). A first block's norm1 reads its patch embedding's
    # BatchNorm output, whose batch mean is that norm's shift, 0 at initialisation, in exact arithmetic:
    # its running mean is rounding noise either way, and is left out.
    chunk_forward(whole, (rgb, x, label), 7, 0)
    whole_buffers = dict(whole.named_buffers())
    means = [k for k in after_chunk0 if k.endswith('running_mean')
             and max(after_chunk0[k].abs().max(), whole_buffers[k].abs().max()) > 1e-6]
    same = [k for k in means if torch.allclose(whole_buffers[k], after_chunk0[k])]
    assert len(means) >= 20 and len(same) < len(means) // 4, same


def test_chunk_streams_depend_on_step_and_chunk_only():
    seeds = {chunk_seed(12345, step, chunk) for step in range(3) for chunk in range(4)}
    assert len(seeds) == 12 and chunk_seed(12345, 2, 1) == chunk_seed(12345, 2, 1)


def config_with(**changes):
    config = tiny_config(batch_size=16, replicas=4)
    config.update(changes)
    return config


@pytest.mark.parametrize('changes,world,message', [
    (dict(batch_size=6), 1, r"batch_size=6 cannot be cut into replicas=4 equal chunks: set replicas in the "
                            r"experiment's config.py or with --set replicas=N, N in \[1, 2, 3, 6\]"),
    (dict(), 3, r'replicas=4 chunks cannot be shared by 3 processes: run a number of processes in '
                r'\[1, 2, 4\]'),
    (dict(sync_bn=True), 2, r'sync_bn=True needs one chunk per process, but replicas=4 on 2 processes runs 2 '
                            r'per process: use --set sync_bn=False'),
])
def test_impossible_splits_are_refused_with_the_fix(changes, world, message):
    with pytest.raises(ConfigError, match=message):
        plan_chunks(config_with(**changes), DistContext(rank=0, world_size=world))


def test_possible_splits_map_chunks_to_processes():
    plan = plan_chunks(config_with(), DistContext(rank=1, world_size=2))
    assert (plan.per_process, plan.first, plan.chunk_size) == (2, 2, 4)
    assert 'process p runs chunks 2p..2p+1 one after another' in plan.describe()
    assert plan_chunks(config_with(sync_bn=True), DistContext(rank=3, world_size=4)).first == 3
    assert plan_chunks(config_with(sync_bn=True), DistContext()).per_process == 4  # one process: plain BN


@pytest.mark.parametrize('override,message', [
    ('replicas=0', 'replicas=0: expected a positive number'), ("replicas='4'", "replicas='4': expected"),
    ('checkpoint_every_iters=-1', 'checkpoint_every_iters=-1: expected None, 0 \\(off\\)')])
def test_bad_values_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


def test_training_refuses_an_impossible_split_in_one_message(tiny_training, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(CONFIG, ['--set', *tiny_training(replicas=4)])  # batch 2
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert 'batch_size=2 cannot be cut into replicas=4 equal chunks' in err and 'Traceback' not in err


def test_a_nonfinite_loss_names_its_chunk_and_rank():
    from smmcl.engine.logging_utils import nonfinite_message
    values = torch.zeros(4, 5, dtype=torch.float64)  # 4 chunks, 2 per rank
    values[3, 2] = float('nan')
    assert nonfinite_message(values, 2, 0, 9, per_process=2).endswith(
        'epoch 2 iteration 1/9: cm=nan in chunk 3 on rank 1')
    assert nonfinite_message(values, 2, 0, 9, per_process=4).endswith('cm=nan in chunk 3')  # one process
    assert nonfinite_message(values, 2, 0, 9, per_process=1).endswith('cm=nan on rank 3')  # one chunk each
