"""The Triton kernels of a run compiled before its first step, all at once, in the compile workers.

A Triton launch compiles its kernel when its shape first comes; an autotuned one its 4-14 tile candidates, in
the compile workers of :mod:`smmcl.kernels.triton_compile`, one shape at a time, most workers idle. On a
machine whose Triton cache is empty, the first training step of the fast path with the kernels meets about
600 compilations (LLRGBD's config: MSCAN-B, chunks of 4 crops of 480x640; counted for sm_90 on the CPU),
compiled in rounds of one shape's candidates, 1-2 s each. Before it, a throwaway pass over the same shapes
hands them all to the workers at once (:func:`~smmcl.kernels.triton_compile.compile_ahead`): a training
step of one chunk on a model of its own (``train.py``), the evaluation of the first ``eval_batch_size`` test
images and of the first alone on a folded copy (``eval.py``, the evaluation during training), the prediction
of each new image size (:class:`smmcl.inference.Segmenter`: ``predict.py``, the tools). No kernel runs in a
pass; the run's model, its random streams and its gradients are left as they were, so the run computes what
it would have computed without. The processes of a training on one machine each compile a share into their
common cache, then wait for each other; a prediction compiles alone.

Only with the Triton kernels (``fast_path`` and ``triton_kernels``) and compile workers (on a GPU; off with
``SMMCL_TRITON_COMPILE_WORKERS=0``). A pass that fails is reported and the run goes on: its launches then
compile for themselves, as without this.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from ..models.builder import build_segmentor
from . import dist
from .evaluate import item_scores, predict_scores
from .precision import for_training, fused_kernels, inference_model, memory_format, mixed_precision
from .seeding import rng_state, set_rng_state

logger = logging.getLogger(__name__)


def compile_ahead_of_training(config, ctx: dist.DistContext, chunk_size: int) -> None:
    """Compiles the kernels of a training step of ``config``'s segmentor on chunks of ``chunk_size`` crops of
    ``image_height`` x ``image_width``, on a model of its own (plain BatchNorm: a pass that one process
    runs must not wait on the others' collectives; the kernels are the same). Every process of ``ctx``
    calls it."""
    def step():
        twin = build_segmentor(config, norm_layer=nn.BatchNorm2d, with_loss=True).to(ctx.device)
        twin = for_training(twin, config, graphs=False).train()
        height, width = int(config.image_height), int(config.image_width)
        rgb, x = (torch.randn(chunk_size, 3, height, width, device=ctx.device).contiguous(
            memory_format=memory_format(config)) for _ in range(2))
        # every class in vertical stripes, so that the contrastive terms find anchors as on real crops
        columns = torch.arange(width, device=ctx.device) * int(config.num_classes) // width
        label = columns.expand(chunk_size, height, width).contiguous()
        amp, _ = mixed_precision(config, ctx.device)
        with amp:
            loss = twin(rgb, x, label, return_terms=True)['loss']
        loss.backward()
    _compile_ahead('the training step', step, config, ctx.device, ctx)


def compile_ahead_of_evaluation(model: nn.Module, dataset, config, ctx: dist.DistContext) -> None:
    """Compiles the kernels of the evaluation of ``model`` (the segmentor on ``ctx.device``, its training
    graphs, if any, taken off) on ``dataset``'s first ``eval_batch_size`` images, and on its first alone (as
    the TensorBoard grid and ``predict.py`` run one), at every scale and window of the protocol. Every
    process of ``ctx`` calls it."""
    count = min(len(dataset), int(config.eval_batch_size))

    def forward():
        net = inference_model(model, config)  # with the kernels (the fast path): a folded copy
        amp, _ = mixed_precision(config, ctx.device)
        items = [(i, dataset[i]) for i in range(count)]
        with torch.no_grad(), amp:
            for group in [items] if count == 1 else [items, items[:1]]:
                for _ in item_scores(net, group, config, ctx.device):
                    pass
    if count:
        _compile_ahead('the evaluation', forward, config, ctx.device, ctx)


def compile_ahead_of_prediction(network: nn.Module, rgb, x, config, device: torch.device) -> None:
    """Compiles the kernels of :func:`~smmcl.engine.evaluate.predict_scores` on one image (``rgb``, ``x``: H-W-3
    and H-W(-3) uint8 in the network's channel order) at every scale and window of the protocol. ``network``:
    the eval-mode folded network (:func:`~smmcl.engine.precision.inference_model`'s) on ``device``, neither
    compiled nor graphed: a graph recorded in a pass would hold no kernel. Only this process compiles, and
    it waits for no other."""
    def forward():
        amp, _ = mixed_precision(config, device)
        with torch.no_grad(), amp:
            predict_scores(network, rgb, x, config, device)
    _compile_ahead(f'the prediction of {rgb.shape[0]}x{rgb.shape[1]} images', forward, config, device)


def _compile_ahead(what: str, run: Callable[[], None], config, device: torch.device,
                   ctx: Optional[dist.DistContext] = None) -> None:
    """``run`` as :func:`~smmcl.kernels.triton_compile.compile_ahead`'s pass, the random streams restored.
    With ``ctx``, this process compiles its share of it, then every process waits for the others' shares;
    without, it compiles the whole alone."""
    if not fused_kernels(config):
        return
    from ..kernels import triton_compile  # Triton: only with the kernels
    state = rng_state(device)
    # the processes on this machine (torchrun's LOCAL_WORLD_SIZE; our own launch starts them all here)
    share = (0, 1) if ctx is None else (ctx.local_rank, int(os.environ.get('LOCAL_WORLD_SIZE', ctx.world_size)))

    def quiet():
        with warnings.catch_warnings():  # what a pass computes is garbage: no warning about its values
            warnings.simplefilter('ignore')
            run()
    try:
        stats = triton_compile.compile_ahead(quiet, share=share)
    except Exception as error:  # noqa: BLE001 - the launches then compile for themselves, as without this
        logger.warning('compiling the Triton kernels of %s ahead failed (%s: %s); each launch compiles its own',
                       what, type(error).__name__, error)
        stats = None
    finally:
        set_rng_state(state, device)
        if device.type == 'cuda':
            torch.cuda.empty_cache()  # the pass's memory back, as if it had not run
    if ctx is not None:
        dist.barrier(device)  # every share compiled before any process launches
    if stats is not None and (ctx is None or ctx.is_main):
        logger.info('Triton kernels of %s compiled ahead: %d compilations in %.0f s%s', what,
                    stats['compilations'], stats['seconds'],
                    f' (this process\'s share of {share[1]})' if share[1] > 1 else '')
