"""Optimizer state by parameter name: the authors' checkpoints resume in ours, ours in theirs.

The authors' order comes from their ``train.py`` + ``utils/init_func.py`` ``group_weight`` walking the
modules registered by ``models/builder.py``, ``models/encoders/dual_segnext.py`` ``MMSegNext`` and
``models/ham_utils.py`` ``BaseDecodeHead``; their ``engine/engine.py`` ``save_checkpoint`` /
``restore_checkpoint`` store and load ``optimizer.state_dict()`` by position. No checkpoint of theirs
exists offline, so the tests fabricate one from the name list.
"""
import json
import os
from collections import OrderedDict

import pytest
import torch
from torch import nn

from smmcl.engine.checkpoint import (CheckpointError, authors_checkpoint, read_checkpoint,
                                     restore_training_state, save_checkpoint, training_state)
from smmcl.engine.optim import build_optimizer, optimizer_param_names
from smmcl.engine.seeding import rng_state
from smmcl.models import EncoderDecoder, build_segmentor
from smmcl.models.authors_order import authors_param_groups, layer_scale_names

from conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = os.path.join(REPO, '..', 'shared', 'reference', 'state_dict_layout_mscan_b_14cls.json')
BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_segmentor(tiny_config(), with_loss=True)


def as_authors_registration(model: EncoderDecoder) -> EncoderDecoder:
    """``model`` with its children re-registered in the authors' order (MMSegNext.__init__'s setattr
    calls; BaseDecodeHead's conv_seg and dropout before LightHamHead's layers)."""
    backbone = model.backbone
    order = [f'{part}{i}' for i in range(1, 5) for part in ('patch_embed', 'patch_embed_other', 'block',
                                                            'block_other', 'norm', 'norm_other', 'module',
                                                            'fconv')]
    order += ['projector_color', 'projector_other']
    assert set(order) == set(backbone._modules)
    backbone._modules = OrderedDict((name, backbone._modules[name]) for name in order)
    head = model.decode_head
    order = ['conv_seg', 'dropout', 'squeeze', 'hamburger', 'align']
    assert set(order) == set(head._modules)
    head._modules = OrderedDict((name, head._modules[name]) for name in order)
    return model


def cmx_group_weight(model: nn.Module):
    """A transcription of CMX's ``utils/init_func.py`` ``group_weight`` (module walk, type tests)."""
    decay, no_decay = [], []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            decay.append(m.weight)
            if m.bias is not None:
                no_decay.append(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)):
            no_decay += [p for p in (m.weight, m.bias) if p is not None]
    return decay, no_decay


def names_of(model, params):
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in params]


def fabricated_authors_state(model, cfg, epoch=7):
    """What the authors' Engine.save_checkpoint writes after some training, in torch 1.12's AdamW format
    (their README's version): every position's moments are distinct, so a misplaced one is visible. The
    stage-1 fusion conv never gets a gradient (the decoder reads stages 2-4), so it has no state."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    decay, no_decay = authors_param_groups(cfg.backbone)
    generator = torch.Generator().manual_seed(5)
    state, groups, index = {}, [], 0
    for names, weight_decay in ((decay, cfg.weight_decay), (no_decay, 0.0)):
        params = []
        for name in names:
            if not name.startswith('backbone.fconv1.'):
                state[index] = {'step': torch.tensor(float(100 + index)),
                                'exp_avg': torch.randn(shapes[name], generator=generator),
                                'exp_avg_sq': torch.rand(shapes[name], generator=generator)}
            params.append(index)
            index += 1
        groups.append({'lr': 3e-5, 'betas': (0.9, 0.999), 'eps': 1e-8, 'weight_decay': weight_decay,
                       'amsgrad': False, 'foreach': None, 'maximize': False, 'capturable': False,
                       'params': params})
    return {'model': model.state_dict(), 'optimizer': {'state': state, 'param_groups': groups},
            'epoch': epoch, 'iteration': 3}


def state_by_name(model, optimizer):
    """{parameter name: its AdamW state} of a live optimizer."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: s for p, s in optimizer.state.items()}


def fake_gradients_and_step(model, optimizer):
    for name, p in model.named_parameters():
        p.grad = None if name.startswith('backbone.fconv1.') else torch.full_like(p, 1e-3)
    optimizer.step()


# ---- the name list --------------------------------------------------------------------------------

def test_name_list_is_the_authors_state_dict_less_buffers_and_layer_scales():
    with open(LAYOUT) as f:
        layout = json.load(f)
    params = {k for k in layout if not k.endswith(BUFFERS)}
    decay, no_decay = authors_param_groups('mscan_b')
    scales = layer_scale_names('mscan_b')
    together = decay + no_decay + scales
    assert len(together) == len(set(together)) == len(params) == 1488
    assert set(together) == params
    assert (len(decay), len(no_decay), len(scales)) == (595, 809, 84)
    assert all(len(layout[n]) == 4 for n in decay) and all(len(layout[n]) == 1 for n in no_decay)
    # Written-down anchors of the authors' order: both branches' stems first, conv_seg first in the head.
    assert decay[:4] == ['backbone.patch_embed1.proj.0.weight', 'backbone.patch_embed1.proj.3.weight',
                         'backbone.patch_embed_other1.proj.0.weight',
                         'backbone.patch_embed_other1.proj.3.weight']
    assert decay[4] == 'backbone.block1.0.attn.proj_1.weight'
    assert decay[-5:] == ['decode_head.conv_seg.weight', 'decode_head.squeeze.conv.weight',
                          'decode_head.hamburger.ham_in.conv.weight',
                          'decode_head.hamburger.ham_out.conv.weight', 'decode_head.align.conv.weight']
    assert no_decay[:6] == ['backbone.patch_embed1.proj.0.bias', 'backbone.patch_embed1.proj.1.weight',
                            'backbone.patch_embed1.proj.1.bias', 'backbone.patch_embed1.proj.3.bias',
                            'backbone.patch_embed1.proj.4.weight', 'backbone.patch_embed1.proj.4.bias']
    first_other_block = decay.index('backbone.block_other1.0.attn.proj_1.weight')
    assert decay[first_other_block - 1] == 'backbone.block1.2.mlp.fc2.weight'
    assert decay.index('backbone.module1.Spatial.encode.0.weight') > decay.index(
        'backbone.block_other1.2.mlp.fc2.weight')


def test_name_list_is_their_registration_order_filtered_by_group_weight():
    model = tiny_model()
    ours = tuple(names_of(model, g) for g in cmx_group_weight(model))
    theirs = tuple(names_of(model, g) for g in cmx_group_weight(as_authors_registration(model)))
    assert theirs == authors_param_groups('mscan_t')
    assert ours != theirs and [sorted(g) for g in ours] == [sorted(g) for g in theirs]


# ---- resuming the authors' checkpoint in ours -------------------------------------------------------

def test_authors_checkpoint_resumes_by_name_and_steps(tmp_path):
    cfg, source = tiny_config(), tiny_model(seed=1)
    authors = fabricated_authors_state(source, cfg)
    path = str(tmp_path / 'epoch-7.pth')
    torch.save(authors, path)  # their plain torch.save

    model = tiny_model(seed=2)
    optimizer = build_optimizer(model, cfg)
    restore_training_state(read_checkpoint(path), model, optimizer, cfg, path)

    stored = dict(zip([n for g in authors_param_groups('mscan_t') for n in g],
                      range(sum(map(len, authors_param_groups('mscan_t'))))))
    restored = state_by_name(model, optimizer)
    assert set(restored) == {n for n in stored if not n.startswith('backbone.fconv1.')}
    for name, s in restored.items():
        expected = authors['optimizer']['state'][stored[name]]
        assert torch.equal(s['exp_avg'], expected['exp_avg']), name
        assert torch.equal(s['exp_avg_sq'], expected['exp_avg_sq']), name
        assert s['step'].item() == expected['step'].item(), name
    assert [g['lr'] for g in optimizer.param_groups] == [3e-5, 3e-5]
    assert [g['weight_decay'] for g in optimizer.param_groups] == [cfg.weight_decay, 0.0]

    fake_gradients_and_step(model, optimizer)
    after = state_by_name(model, optimizer)
    assert all(after[n]['step'].item() == authors['optimizer']['state'][stored[n]]['step'].item() + 1
               for n in after)


def test_positional_loading_of_their_checkpoint_is_what_crashed():
    """Why names are needed: loaded by position, moments land on parameters of another shape."""
    cfg = tiny_config()
    model = tiny_model()
    optimizer = build_optimizer(model, cfg)
    optimizer.load_state_dict(fabricated_authors_state(model, cfg)['optimizer'])
    with pytest.raises(RuntimeError):
        fake_gradients_and_step(model, optimizer)


def test_misplaced_state_is_refused_before_the_first_step(tmp_path):
    """Our old positional state without our extras reads as the authors': the shapes say it is not."""
    cfg, model = tiny_config(), tiny_model()
    optimizer = build_optimizer(model, cfg)
    fake_gradients_and_step(model, optimizer)
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 1, 'iteration': 0}
    with pytest.raises(CheckpointError, match='has shape'):
        restore_training_state(state, model, build_optimizer(model, cfg), cfg, 'ckpt')


# ---- our checkpoints in the authors' order ---------------------------------------------------------

@pytest.fixture(scope='module')
def trained():
    cfg, model = tiny_config(), tiny_model()
    optimizer = build_optimizer(model, cfg)
    fake_gradients_and_step(model, optimizer)
    fake_gradients_and_step(model, optimizer)
    return cfg, model, optimizer


def test_our_checkpoint_stores_the_authors_order(trained, tmp_path):
    cfg, model, optimizer = trained
    state = read_checkpoint(save_checkpoint(training_state(model, optimizer, 2, 0, 2, [rng_state()], cfg),
                                            str(tmp_path)))
    theirs = list(authors_param_groups('mscan_t'))
    assert state['optimizer_param_names'] == theirs
    live = state_by_name(model, optimizer)
    flat = [n for g in theirs for n in g]
    groups = state['optimizer']['param_groups']
    assert [g['params'] for g in groups] == [list(range(len(theirs[0]))),
                                             list(range(len(theirs[0]), len(flat)))]
    assert [g['weight_decay'] for g in groups] == [cfg.weight_decay, 0.0]
    assert {flat[k] for k in state['optimizer']['state']} == set(live)
    for k, s in state['optimizer']['state'].items():
        assert torch.equal(s['exp_avg'], live[flat[k]]['exp_avg']), flat[k]

    # The authors' Engine.restore_checkpoint: their model, their group_weight, load by position.
    theirs_model = as_authors_registration(tiny_model(seed=3))
    decay, no_decay = cmx_group_weight(theirs_model)
    their_optimizer = torch.optim.AdamW([dict(params=decay), dict(params=no_decay, weight_decay=0.0)])
    their_optimizer.load_state_dict(authors_checkpoint(state)['optimizer'])
    resumed = state_by_name(theirs_model, their_optimizer)
    assert set(resumed) == set(live)
    assert all(torch.equal(resumed[n]['exp_avg_sq'], live[n]['exp_avg_sq']) for n in live)
    fake_gradients_and_step(theirs_model, their_optimizer)


def test_our_checkpoint_round_trips_by_name(trained, tmp_path):
    cfg, model, optimizer = trained
    path = save_checkpoint(training_state(model, optimizer, 2, 0, 2, [rng_state()], cfg), str(tmp_path))
    fresh = tiny_model(seed=4)
    fresh_optimizer = build_optimizer(fresh, cfg)
    restore_training_state(read_checkpoint(path), fresh, fresh_optimizer, cfg, path)
    live, restored = state_by_name(model, optimizer), state_by_name(fresh, fresh_optimizer)
    assert set(live) == set(restored)
    assert all(torch.equal(live[n]['exp_avg'], restored[n]['exp_avg']) for n in live)
    assert optimizer_param_names(fresh, fresh_optimizer) == optimizer_param_names(model, optimizer)


def test_our_checkpoints_from_before_the_authors_order_still_resume(trained):
    cfg, model, optimizer = trained
    legacy = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 2,
              'iteration': 0, 'rng': [rng_state()], 'lr_step': 2, 'sampler_epoch': 2,
              'config': {'backbone': 'mscan_t', 'num_classes': 5}}
    fresh = tiny_model(seed=4)
    fresh_optimizer = build_optimizer(fresh, cfg)
    restore_training_state(legacy, fresh, fresh_optimizer, cfg, 'legacy')
    live, restored = state_by_name(model, optimizer), state_by_name(fresh, fresh_optimizer)
    assert all(torch.equal(live[n]['exp_avg'], restored[n]['exp_avg']) for n in live)
    with pytest.raises(CheckpointError, match="our own parameter order"):
        authors_checkpoint(legacy)


def test_trained_layer_scales_are_not_the_authors(tmp_path):
    cfg = tiny_config(train_layer_scale=True)
    model = tiny_model()
    optimizer = build_optimizer(model, cfg)
    fake_gradients_and_step(model, optimizer)
    state = training_state(model, optimizer, 1, 0, 1, [rng_state()], cfg)
    decay, no_decay = authors_param_groups('mscan_t')
    names = state['optimizer_param_names']
    assert names[0] == decay and names[1][:len(no_decay)] == no_decay
    assert sorted(names[1][len(no_decay):]) == sorted(layer_scale_names('mscan_t'))
    with pytest.raises(CheckpointError, match='train_layer_scale=True'):
        authors_checkpoint(state)
    # ours resumes it (with the same switch), and refuses it without
    fresh = tiny_model(seed=4)
    restore_training_state(state, fresh, build_optimizer(fresh, cfg), cfg, 'ckpt')
    with pytest.raises(CheckpointError, match='train_layer_scale'):
        restore_training_state(state, fresh, build_optimizer(fresh, tiny_config()), tiny_config(), 'ckpt')


def test_authors_checkpoint_keeps_what_their_train_py_reads(trained):
    cfg, model, optimizer = trained
    state = training_state(model, optimizer, 2, 5, 2, [rng_state()], cfg)
    theirs = authors_checkpoint(state)
    assert set(theirs) == {'model', 'optimizer', 'epoch', 'iteration'}
    assert theirs['epoch'] == 2 and theirs['iteration'] == 5
    authors = fabricated_authors_state(model, cfg)
    assert all(authors_checkpoint(authors)[key] is authors[key] for key in authors)
