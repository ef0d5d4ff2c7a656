"""CUDA graphs (``config.cuda_graphs`` and ``cuda_graphs_training``): the bookkeeping -- one
recording per input signature, static inputs refreshed at every call, NMF bases drawn outside the graph
exactly as the eager forward draws them, outputs copied out, the recorded backward's gradients, the
warm-up's side effects put back -- checked on the CPU with a stand-in recorder that has a graph's
semantics (``EagerRecorder``); the CUDA captures themselves at the end, where a GPU is present."""
import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

import smmcl.engine.evaluate as ev
from smmcl.engine import graphs, precision
from smmcl.engine import train as train_module
from smmcl.engine.checkpoint import LAST, read_checkpoint
from smmcl.config import ConfigError, validate
from smmcl.engine.chunks import copy_buffers
from smmcl.engine.graphs import EagerRecorder, GraphedInference, GraphedTrainingForward, use_training_graphs
from smmcl.engine.precision import for_inference, for_training
from smmcl.losses.contrastive import SupervisedMultiModalContrastiveLoss
from smmcl.models import build_segmentor
from smmcl.models.ham_head import given_bases, nmf_layers

from conftest import REPO, tiny_config

K = 4
SIZE = (32, 48)


@pytest.fixture
def model(tiny_mscan):
    torch.manual_seed(0)
    return build_segmentor(tiny_config(backbone=tiny_mscan, num_classes=K)).eval()


def inputs(batch, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g), torch.randn(batch, 3, *size, generator=g)


def random_items(count):
    """``count`` evaluation items (uint8 RGB and X of SIZE, labels in 0..K-1), seeded."""
    rng = np.random.default_rng(0)
    return [dict(data=rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8),
                 modal_x=rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8),
                 label=rng.integers(0, K, SIZE).astype(np.uint8), fn=f'i{i}') for i in range(count)]


def seeded(fn, seed, *args):
    torch.manual_seed(seed)
    with torch.no_grad():
        return fn(*args)


def test_replays_compute_the_eager_forward_with_its_random_bases(model):
    """Each call equals the eager forward under the same random state (the bases are drawn outside the
    graph, as the forward draws them), for new inputs at every call: one recording serves them all."""
    runner = GraphedInference(model, recorder=EagerRecorder())
    for seed in range(3):
        rgb, x = inputs(2, seed=seed)
        want = seeded(model, 10 + seed, rgb, x)
        got = seeded(runner, 10 + seed, rgb, x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert runner.captures == 1
    # another random state gives other bases, so other logits: the draw is not frozen in the graph
    rgb, x = inputs(2)
    assert not torch.equal(seeded(runner, 1, rgb, x), seeded(runner, 2, rgb, x))


def test_outputs_are_copies_and_the_model_draws_again_afterwards(model):
    runner = GraphedInference(model, recorder=EagerRecorder())
    rgb, x = inputs(1)
    first = seeded(runner, 5, rgb, x)
    kept = first.clone()
    first.zero_()  # the caller's copy: the graph's static output is not handed out
    torch.testing.assert_close(seeded(runner, 5, rgb, x), kept, rtol=0, atol=0)
    assert all(nmf.fixed_bases is None for nmf, _ in nmf_layers(model))


def test_one_recording_per_signature(model):
    """New batch sizes and image sizes are recorded once each; a known one is replayed."""
    runner = GraphedInference(model, recorder=EagerRecorder())
    shapes = [(1, SIZE), (2, SIZE), (1, SIZE), (1, (40, 40)), (2, SIZE), (1, (40, 40))]
    for batch, size in shapes:
        rgb, x = inputs(batch, size)
        want = seeded(model, 3, rgb, x)
        torch.testing.assert_close(seeded(runner, 3, rgb, x), want, rtol=0, atol=0)
    assert runner.captures == 3


def test_given_bases_are_used_and_kept(model):
    """Bases the caller gives (batched evaluation) go into the graph; the caller's stay set afterwards."""
    runner = GraphedInference(model, recorder=EagerRecorder())
    rgb, x = inputs(2)
    layers = nmf_layers(model)
    for seed in (0, 1):  # the second call replays the first call's graph with other bases
        g = torch.Generator().manual_seed(seed)
        bases = [nmf.draw_bases(2, c, generator=g) for nmf, c in layers]
        with given_bases(model, bases):
            want = seeded(model, 99, rgb, x)
            got = seeded(runner, 7, rgb, x)  # another random state: the given bases decide
            assert all(nmf.fixed_bases is b for (nmf, _), b in zip(layers, bases))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert runner.captures == 1


def test_inputs_elsewhere_than_cuda_run_the_model_directly(model):
    runner = GraphedInference(model)  # the default recorder is CUDA's
    rgb, x = inputs(1)
    torch.testing.assert_close(seeded(runner, 4, rgb, x), seeded(model, 4, rgb, x), rtol=0, atol=0)
    assert runner.captures == 0


def test_training_mode_is_refused(model):
    runner = GraphedInference(model, recorder=EagerRecorder())
    with pytest.raises(ValueError, match='inference'):
        runner.train()
    model.train()
    with pytest.raises(ValueError, match='eval-mode'):
        runner(*inputs(1))


def test_config_switch_and_evaluation_agree(tiny_mscan, monkeypatch):
    """``cuda_graphs=True`` wraps what for_inference returns (plain and fast path); a whole evaluation
    through the recorded forwards (batched images with given bases, and one image per forward) gives
    the eager confusion matrices."""
    cfg = tiny_config(backbone=tiny_mscan, num_classes=K, eval_crop_size=list(SIZE), eval_scale_array=[0.75, 1],
                      eval_flip=False, seed=3)
    torch.manual_seed(0)
    plain = build_segmentor(cfg)
    items = random_items(3)
    monkeypatch.setattr(GraphedInference, '__init__', _with_eager_recorder(GraphedInference.__init__))
    for fast in (False, True):
        for batch in (1, 2):
            cfg.update(fast_path=fast, eval_batch_size=batch, cuda_graphs=False)
            want = ev.evaluate_per_image(for_inference(plain, cfg), items, cfg, 'cpu')
            cfg.cuda_graphs = True
            runner = for_inference(plain, cfg)
            assert isinstance(runner, GraphedInference)
            np.testing.assert_array_equal(ev.evaluate_per_image(runner, items, cfg, 'cpu'), want)
            # both scales' windows are padded to the crop: one input size; batched: groups of 2 and 1
            assert runner.captures == (1 if batch == 1 else 2)


def _with_eager_recorder(init):
    def wrapped(self, model, warmup=3, recorder=None):
        init(self, model, warmup, recorder or EagerRecorder())
    return wrapped


def test_config_value_is_checked(tiny_mscan):
    cfg = tiny_config(backbone=tiny_mscan)
    cfg.cuda_graphs = 'yes'
    with pytest.raises(ConfigError, match='cuda_graphs'):
        validate(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_graph_replays_equal_eager(model):
    """On a GPU: the recorded graph gives the eager forward's logits for new inputs and random states."""
    model = model.cuda()
    runner = GraphedInference(model, warmup=2)
    for seed in range(3):
        rgb, x = (t.cuda() for t in inputs(2, seed=seed))
        torch.testing.assert_close(seeded(runner, seed, rgb, x), seeded(model, seed, rgb, x), rtol=1e-5, atol=1e-5)
    assert runner.captures == 1


# ---- training --------------------------------------------------------------------------------------

def _training_run(model, steps, cfg):
    """Losses, then parameters and buffers, after ``steps`` AdamW steps on fixed tiny batches, each step
    seeded as the training loop seeds its chunks."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        rgb, x = torch.randn(2, 3, *SIZE, generator=g), torch.randn(2, 3, *SIZE, generator=g)
        cells = torch.randint(0, K, (2, SIZE[0] // 16, SIZE[1] // 16), generator=g)
        label = cells.repeat_interleave(16, 1).repeat_interleave(16, 2)
        torch.manual_seed(100 + step)
        terms = model(rgb, x, label, return_terms=True)
        optimizer.zero_grad()
        terms['loss'].backward()
        optimizer.step()
        losses.append(torch.stack([terms[k].detach() for k in ('loss', 'ce', 'cm', 'vis', 'aux')]))
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()], copy_buffers(model)


def _segmentor_with_loss(backbone, **changes):
    # few anchor slots: the recorded losses compute InfoNCE over all max_features_total of them
    cfg = tiny_config(backbone=backbone, num_classes=K, max_features_total=240, **changes)
    torch.manual_seed(0)
    return build_segmentor(cfg, with_loss=True).train(), cfg


def recorded(model) -> GraphedTrainingForward:
    """The training graphs installed on a segmentor: over its forward (losses included) or encode_decode."""
    return model.__dict__.get('forward') or model.__dict__['encode_decode']


@pytest.mark.parametrize('sampler', ['vectorized', 'loop'])
def test_training_graphs_compute_the_eager_run(tiny_mscan, sampler):
    """Three AdamW steps through the recorded forward and backward (graph_module's autograd function
    replaying the stand-in recorder's graphs, after warm-up forwards and backwards on the first batch)
    give the eager run's losses, parameters and BatchNorm statistics (to float rounding): the gradients
    reach the parameters through the recorded backward, and the warm-up's statistics and random draws
    were put back. With the vectorised sampler the recording holds the losses too, in their padded form
    (no host read); with the authors' loop sampler only the encoders and the decoder."""
    eager, cfg = _segmentor_with_loss(tiny_mscan, anchor_sampler=sampler)
    graphed = copy.deepcopy(eager)
    use_training_graphs(graphed, True, recorder=EagerRecorder)
    assert recorded(graphed).losses == (sampler == 'vectorized')
    want = _training_run(eager, 3, cfg)
    got = _training_run(graphed, 3, cfg)
    # equal up to float rounding: a reduction over a static buffer may sum in another order
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-8)
    for a, b in zip(got[1] + got[2], want[1] + want[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert len(recorded(graphed).recorded) == 1 and not graphed.contrastive.padded
    # the four warm-up and capture forwards left no trace in the statistics
    tracked = [int(b) for name, b in graphed.named_buffers() if name.endswith('num_batches_tracked')]
    assert tracked and set(tracked) == {3}


def test_training_graphs_leave_the_model_as_it_was(tiny_mscan):
    """The state dict keeps its keys; eval mode, no-grad and label-less calls run eagerly; switching off
    removes it."""
    model, _ = _segmentor_with_loss(tiny_mscan)
    keys = list(model.state_dict())
    use_training_graphs(model, True, recorder=EagerRecorder)
    assert list(model.state_dict()) == keys
    rgb, x = inputs(1)
    label = torch.zeros(1, *rgb.shape[2:], dtype=torch.long)
    with torch.no_grad():
        model(rgb, x, label)
    assert model(rgb, x).shape == (1, K, *rgb.shape[2:])  # logits, eagerly
    model.eval()
    model(rgb, x, label)
    assert model.forward.recorded == {}
    use_training_graphs(model, False)
    assert 'forward' not in model.__dict__ and 'encode_decode' not in model.__dict__


def test_training_graphs_refuse_sync_batchnorm_and_compile(tiny_mscan):
    model, cfg = _segmentor_with_loss(tiny_mscan)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    with pytest.raises(ConfigError, match='sync_bn=False'):
        use_training_graphs(model, True)
    cfg.update(cuda_graphs_training=True, compile=True)
    with pytest.raises(ConfigError, match='choose one'):
        validate(cfg)


def test_for_training_installs_the_training_graphs(tiny_mscan):
    model, cfg = _segmentor_with_loss(tiny_mscan, cuda_graphs_training=True)
    assert isinstance(for_training(model, cfg).forward, GraphedTrainingForward)
    cfg.cuda_graphs_training = False
    assert 'forward' not in for_training(model, cfg).__dict__


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_training_graphs_follow_the_eager_run(tiny_mscan):
    """On a GPU: three steps through make_graphed_callables against eager (same seeds): close losses and
    parameters (the graphs replay the same kernels; the random numbers come from the same offsets)."""
    eager, cfg = _segmentor_with_loss(tiny_mscan)
    eager = eager.cuda()
    graphed = use_training_graphs(copy.deepcopy(eager), True)

    def on_cuda(model):
        run = _training_run
        return run(_OnDevice(model), 3, cfg)

    want, got = on_cuda(eager), on_cuda(graphed)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


class _OnDevice(nn.Module):
    """Moves the CPU batches of :func:`_training_run` to the model's device."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        device = next(self.model.parameters()).device
        return self.model(*(a.to(device) for a in args), **kwargs)


class _Failing(EagerRecorder):
    """A recorder whose capture fails, as CUDA's does on an op that cannot be captured."""

    def record(self, fn):
        raise RuntimeError('operation not permitted when stream is capturing')


def test_a_failed_recording_runs_eagerly(model, tiny_mscan, caplog):
    """A recording that fails leaves a warning and the same function, eagerly: inference with the bases
    drawn for the graph, training with the generators and statistics as they were."""
    runner = GraphedInference(model, recorder=_Failing())
    rgb, x = inputs(2)
    for seed in (0, 1):  # the second call does not try again
        torch.testing.assert_close(seeded(runner, seed, rgb, x), seeded(model, seed, rgb, x), rtol=0, atol=0)
    assert runner.captures == 0 and 'run eagerly' in caplog.text

    eager, cfg = _segmentor_with_loss(tiny_mscan)
    graphed = use_training_graphs(copy.deepcopy(eager), True, recorder=_Failing)
    want, got = _training_run(eager, 2, cfg), _training_run(graphed, 2, cfg)
    for a, b in zip([got[0]] + got[1] + got[2], [want[0]] + want[1] + want[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_losses_that_cannot_be_recorded_leave_the_model_recorded(tiny_mscan, monkeypatch, caplog):
    """When the recording with the losses fails (an op of theirs that a CUDA graph cannot hold), the
    encoders and the decoder are recorded alone, the losses run eagerly: the eager run's values."""
    def uncapturable(self, *args):
        raise RuntimeError('operation not permitted when stream is capturing')
    eager, cfg = _segmentor_with_loss(tiny_mscan)
    graphed = use_training_graphs(copy.deepcopy(eager), True, recorder=EagerRecorder)
    monkeypatch.setattr(graphs._TrainingTerms, 'forward', uncapturable)
    want, got = _training_run(eager, 2, cfg), _training_run(graphed, 2, cfg)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-8)
    assert list(graphed.forward.recorded.values()) == [None]
    assert [g is not None for g in graphed.encode_decode.recorded.values()] == [True]
    assert 'losses run eagerly' in caplog.text


def test_autocast_state_is_part_of_the_signature(model):
    """A forward under autocast is another recording (the graph holds the casts), equal to the eager
    forward under the same autocast."""
    runner = GraphedInference(model, recorder=EagerRecorder())
    rgb, x = inputs(1)
    seeded(runner, 0, rgb, x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        want, got = seeded(model, 1, rgb, x), seeded(runner, 1, rgb, x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert runner.captures == 2


def test_copies_record_their_own_graphs(model, tiny_mscan):
    """copy.deepcopy of a graphed model (inference wrapper, or a segmentor with training graphs) starts
    without recordings, so it computes with its own weights, not the original's."""
    runner = GraphedInference(model, recorder=EagerRecorder())
    rgb, x = inputs(1)
    seeded(runner, 0, rgb, x)
    clone = copy.deepcopy(runner)
    assert clone.captures == 0 and clone.model is not model
    with torch.no_grad():
        clone.model.decode_head.conv_seg.bias.add_(1.0)
    torch.testing.assert_close(seeded(clone, 1, rgb, x), seeded(clone.model, 1, rgb, x), rtol=0, atol=0)
    torch.testing.assert_close(seeded(runner, 1, rgb, x), seeded(model, 1, rgb, x), rtol=0, atol=0)

    segmentor, cfg = _segmentor_with_loss(tiny_mscan)
    use_training_graphs(segmentor, True, recorder=EagerRecorder)
    _training_run(segmentor, 1, cfg)
    twin = copy.deepcopy(segmentor)
    assert twin.forward.segmentor is twin and twin.forward.recorded == {} and twin.forward.losses
    assert len(segmentor.forward.recorded) == 1


def test_new_signatures_beyond_max_graphs_run_eagerly(model):
    runner = GraphedInference(model, recorder=EagerRecorder(), max_graphs=2)
    for size in ((32, 32), (32, 40), (40, 40), (32, 32), (40, 48)):
        rgb, x = inputs(1, size)
        torch.testing.assert_close(seeded(runner, 2, rgb, x), seeded(model, 2, rgb, x), rtol=0, atol=0)
    assert runner.captures == 2


@pytest.mark.parametrize('host_sync_every, optimizer', [(1, 'AdamW'), (2, 'AdamW'), (1, 'SGDM')])
def test_train_script_with_training_graphs_is_the_eager_run(tiny_training, tmp_path, monkeypatch,
                                                            host_sync_every, optimizer):
    """train.py, 2 epochs of 2 chunks each (replicas=2: two recorded forwards and backwards per step,
    BatchNorm following chunk 0), with cuda_graphs_training=True through the stand-in recorder: the last
    checkpoint (weights, BatchNorm statistics, AdamW state) equals the eager run's up to float rounding
    (a reduction over a static buffer may sum in another order: the decoder's last bias gradient, 3e-8
    relative, on this CPU). Also with host_sync_every=2 (fused AdamW, the step decided on the device),
    the training switches docs/speed.md recommends together, and with the other optimizer training
    offers, SGDM (outside the recording, as AdamW)."""
    config = os.path.join(REPO, 'SMMCL_LLRGBD', 'config.py')
    eager = tiny_training(log_dir=str(tmp_path / 'eager'), replicas=2, niters_per_epoch=2,
                          host_sync_every=host_sync_every, max_features_total=240, optimizer=optimizer)
    # The recording holds the contrastive loss's padded form; the eager run uses it too, so that the
    # only difference is the recording. (Against the plain form the values agree to float rounding,
    # tests/test_losses.py; AdamW turns the rounding noise of the conv biases before a BatchNorm, whose
    # gradients are rounding noise alone, into steps of the learning rate, so trajectories cannot be
    # compared that way.)
    monkeypatch.setattr(SupervisedMultiModalContrastiveLoss, 'padded', True)
    train_module.main(config, ['--set', *eager])
    installed = []

    def with_stand_in(model, enabled):
        installed.append(enabled)
        return graphs.use_training_graphs(model, enabled, recorder=EagerRecorder)
    monkeypatch.setattr(precision, 'use_training_graphs', with_stand_in)
    graphed = tiny_training(log_dir=str(tmp_path / 'graphed'), replicas=2, niters_per_epoch=2,
                            host_sync_every=host_sync_every, cuda_graphs_training=True, max_features_total=240,
                            optimizer=optimizer)
    train_module.main(config, ['--set', *graphed])
    assert installed == [True]
    a = read_checkpoint(str(tmp_path / 'eager' / 'checkpoint' / LAST))
    b = read_checkpoint(str(tmp_path / 'graphed' / 'checkpoint' / LAST))
    assert list(a['model']) == list(b['model'])
    for name in a['model']:
        torch.testing.assert_close(b['model'][name], a['model'][name], rtol=1e-5, atol=1e-8)
    from smmcl.engine.optim import optimizer_kind
    assert optimizer_kind(a['optimizer']) == optimizer_kind(b['optimizer']) == optimizer
    opt_a, opt_b = a['optimizer']['state'], b['optimizer']['state']
    for i in opt_a:
        for name in opt_a[i]:
            torch.testing.assert_close(opt_b[i][name], opt_a[i][name], rtol=1e-5, atol=1e-8)


def test_graphs_are_recorded_once_per_run_and_replay_new_weights(tiny_mscan, monkeypatch):
    """ReusedInference (the evaluation during training, eval.py over several checkpoints): the second
    evaluation replays the first one's recordings, with the weights changed in place since (plain path:
    the model's own tensors; fast path: the folded copy refreshed), and equals an eager evaluation."""
    from smmcl.engine.precision import ReusedInference
    cfg = tiny_config(backbone=tiny_mscan, num_classes=K, eval_crop_size=list(SIZE), seed=3)
    items = random_items(3)
    monkeypatch.setattr(GraphedInference, '__init__', _with_eager_recorder(GraphedInference.__init__))
    for fast in (False, True):
        torch.manual_seed(0)
        model = build_segmentor(cfg)
        cfg.update(fast_path=fast, cuda_graphs=True)
        reuse = ReusedInference(cfg)
        runner = reuse(model)
        first = ev.evaluate_per_image(runner, items, cfg, 'cpu')
        with torch.no_grad():  # an optimizer's step and new BatchNorm statistics, in place
            for p in model.parameters():
                p.add_(0.5 * torch.randn_like(p))
            for name, b in model.named_buffers():
                if name.endswith('running_var'):
                    b.mul_(2.0)
        second = ev.evaluate_per_image(reuse(model), items, cfg, 'cpu')
        assert reuse(model) is runner and runner.captures == 1
        cfg.cuda_graphs = False
        np.testing.assert_array_equal(second, ev.evaluate_per_image(for_inference(model, cfg), items, cfg, 'cpu'))
        assert not np.array_equal(first, second)  # the new weights were seen
