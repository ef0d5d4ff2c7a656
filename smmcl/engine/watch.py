"""Watching a long run: the test split evaluated during training, every ``eval_every_epochs`` epochs.

Beyond the authors (off by default): a 1000-epoch run shows whether it learns without waiting for
``eval.py -e 300-1000``. Each evaluation runs on every rank with the configured protocol, exactly as
``eval.py`` scores a checkpoint (:func:`smmcl.engine.evaluate.evaluate_per_image`), appends the
authors' result table to the val log and the scores to its JSON (:func:`smmcl.engine.results.report`),
and writes ``val/mIoU`` (and ``val/mIoU_wo_first`` where reported) and a grid of the first test images'
predictions to TensorBoard. It changes nothing of the training: the model is evaluated in eval mode
(BatchNorm statistics untouched) and put back in its mode, and the random generators are restored
(:func:`smmcl.engine.seeding.kept_rng`), so weights, statistics and random streams are those of a run
without it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import cv2
import numpy as np
import torch
from torch import nn

from smmcl.data.dataset import RGBXDataset
from smmcl.engine import dist
from smmcl.engine.ahead import compile_ahead_of_evaluation
from smmcl.engine.evaluate import eval_workers, evaluate_per_image, predict, seed_item
from smmcl.engine.metrics import compute_scores
from smmcl.engine.precision import ReusedInference, mixed_precision
from smmcl.engine.results import open_val_log, report, subset_indices
from smmcl.engine.seeding import kept_rng
from smmcl.visual import gamma_lift, palette_rgb

GRID_IMAGES = 4  # test images shown in TensorBoard, always the first ones: the same every evaluation


@dataclass
class Watcher:
    """Evaluates ``module`` after every ``config.eval_every_epochs``-th epoch (see the module docstring).
    The test set is read at the first evaluation."""
    config: object
    ctx: dist.DistContext
    dataset: Optional[RGBXDataset] = None
    subsets: Dict[str, List[int]] = field(default_factory=dict)
    inference: Optional[ReusedInference] = None  # CUDA graphs recorded once per run, refreshed in place
    compiled: bool = False  # the Triton kernels of the evaluation compiled ahead (the first one)

    def due(self, epoch: int) -> bool:
        every = self.config.eval_every_epochs
        return bool(every) and epoch % every == 0

    def __call__(self, module: nn.Module, epoch: int, tb=None) -> None:
        """Evaluate the unwrapped model ``module`` after ``epoch`` (every rank; rank 0 reports to ``tb``)."""
        if self.dataset is None:
            self.dataset = RGBXDataset(self.config, 'val')
            self.subsets = subset_indices(self.config, self.dataset.names)
            self.inference = ReusedInference(self.config)
            if self.ctx.is_main:
                open_val_log(self.config)
        hists, grid = self.evaluate(module)
        if not self.ctx.is_main:
            return
        title = f'Model: epoch-{epoch} (evaluated during training)'
        miou = report(title, hists, self.subsets, self.config, checkpoint=None, epoch=epoch)
        if tb is not None:
            tb.add_scalar('val/mIoU', miou, epoch)
            if self.config.report_miou_without_first:
                tb.add_scalar('val/mIoU_wo_first', compute_scores(hists.sum(0))['mean_iou_wo_background'] * 100,
                              epoch)
            tb.add_image('val/predictions', grid, epoch, dataformats='HWC')

    def evaluate(self, module: nn.Module):
        """(N-K-K per-image confusion matrices, the prediction grid on rank 0 else None) of ``module``,
        left in the mode it was in. The training graphs (``cuda_graphs_training``, installed over the
        model's ``forward`` or ``encode_decode``) replay training shapes only, so the evaluation runs the
        model's own methods. Every rank evaluates
        with rank 0's BatchNorm statistics, the checkpoint's (each rank's own after the epoch's last
        forward differ: per-rank BatchNorm), and gets its own back afterwards."""
        config, ctx = self.config, self.ctx
        graphed = {name: module.__dict__.pop(name) for name in ('forward', 'encode_decode') if name in module.__dict__}
        was_training = module.training
        own_buffers = [b.clone() for b in module.buffers()]
        for buffer in module.buffers():  # rank 0's BatchNorm statistics, which the checkpoint keeps
            dist.broadcast_(buffer)
        try:
            if not self.compiled:
                compile_ahead_of_evaluation(module, self.dataset, config, ctx)  # with the Triton kernels
                self.compiled = True
            model = self.inference(module)
            amp, _ = mixed_precision(config, ctx.device)
            with amp:
                hists = evaluate_per_image(model, self.dataset, config, ctx.device, ctx.rank, ctx.world_size,
                                           num_workers=eval_workers(config))
                grid = prediction_grid(model, self.dataset, config, ctx.device) if ctx.is_main else None
        finally:
            for buffer, own in zip(module.buffers(), own_buffers):
                buffer.copy_(own)
            module.train(was_training)
            for name, training_graphs in graphed.items():
                setattr(module, name, training_graphs)
        return hists, grid


def prediction_grid(model: nn.Module, dataset, config, device, count: int = GRID_IMAGES) -> np.ndarray:
    """H-W-3 uint8 image: a row per test image of the first ``count``, the RGB image (gamma-lifted: dark
    scenes) beside its prediction in the dataset's colours, each predicted as ``eval.py`` predicts it
    (:func:`smmcl.engine.evaluate.seed_item`); rows resized to the first one's size. The caller's
    random generators are restored."""
    colours = palette_rgb(config.class_colors)
    rows = []
    with torch.no_grad(), kept_rng(device):
        for index in range(min(count, len(dataset))):
            item = dataset[index]
            seed_item(config, index)
            pred = predict(model, item['data'], item['modal_x'], config, device).cpu().numpy()
            rgb = item['data'] if config.true_rgb_order else item['data'][..., ::-1]  # network order: BGR
            row = np.concatenate([gamma_lift(np.ascontiguousarray(rgb)), colours[pred]], 1)
            if rows and row.shape != rows[0].shape:
                row = cv2.resize(row, rows[0].shape[1::-1], interpolation=cv2.INTER_NEAREST)
            rows.append(row)
    return np.concatenate(rows, 0)
