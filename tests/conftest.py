"""Shared fixtures: a tiny synthetic LLRGBD on disk and the settings of a tiny CPU training run."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A training run of about a second per epoch on the CPU: the smallest backbone, a 32-channel decoder,
# 64x96 crops, batch 2, one iteration per epoch, no ImageNet weights. min_views_per_class=1 lets the
# contrastive terms find anchors in the 2x3 cells of stage 4.
TINY_TRAINING = dict(
    backbone='mscan_t', pretrained_model=None, decoder_embed_dim=32, image_height=64, image_width=96,
    batch_size=2, num_train_imgs=4, niters_per_epoch=1, nepochs=2, warm_up_epoch=1, lr=1e-3,
    checkpoint_start_epoch=1, checkpoint_step=1, num_workers=0, deterministic=True,
    min_views_per_class=1, dist_timeout_s=60)


@pytest.fixture(scope='session')
def tiny_llrgbd(tmp_path_factory) -> str:
    """A synthetic LLRGBD folder (4 train, 2 test images of 48x64), written once per session."""
    from smmcl.data.synthetic import generate
    return generate('LLRGBD', str(tmp_path_factory.mktemp('llrgbd')), n_train=4, n_test=2, height=48,
                    width=64, seed=0)


@pytest.fixture
def tiny_training(tiny_llrgbd, tmp_path):
    """``tiny_training(**changes)`` -> ``--set`` values for a tiny run on ``tiny_llrgbd`` logging to
    ``tmp_path/log`` (checkpoints in ``tmp_path/log/checkpoint``)."""
    def overrides(**changes):
        values = dict(TINY_TRAINING, dataset_path=tiny_llrgbd, log_dir=str(tmp_path / 'log'))
        values.update(changes)
        return [f'{key}={value}' for key, value in values.items()]
    return overrides


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Training in-process sets process-wide torch switches (deterministic algorithms, cudnn benchmark,
    thread count); put them back so that later tests run as they would alone."""
    import torch
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.get_num_threads())
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]
    torch.set_num_threads(saved[3])
