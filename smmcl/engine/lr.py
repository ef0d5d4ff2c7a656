"""The learning-rate schedule of SMMCL: CMX's ``WarmUpPolyLR`` (``utils/lr_policy.py``).

Linear warm-up from 0 over ``warmup_steps`` iterations, then polynomial decay to 0 at ``total_iters``::

    lr(k) = start_lr * k / warmup_steps                      if k < warmup_steps
    lr(k) = start_lr * (1 - k / total_iters) ** lr_power     otherwise

How the authors apply it (CMX ``train.py``) matters for reproducing their runs: the optimizer is built
with ``lr=start_lr`` and the schedule's value is written into the parameter groups *after*
``optimizer.step()``, for ``current_idx = (epoch - 1) * niters_per_epoch + idx``. So global step 0 runs
with the base lr (not 0, as the warm-up formula would give), and step ``k >= 1`` runs with ``lr(k - 1)``.
:func:`lr_for_step` states that offset; the training loop reproduces it by calling :func:`set_lr` after
each step.
"""
from __future__ import annotations

from torch.optim import Optimizer


class WarmUpPolyLR:
    """CMX's ``WarmUpPolyLR(start_lr, lr_power, total_iters, warmup_steps)``."""

    def __init__(self, start_lr: float, lr_power: float, total_iters: int, warmup_steps: int):
        self.start_lr = start_lr
        self.lr_power = lr_power
        self.total_iters = total_iters + 0.0  # CMX adds 0.0 so the division is a float one
        self.warmup_steps = warmup_steps

    def get_lr(self, cur_iter: int) -> float:
        if cur_iter < self.warmup_steps:
            return self.start_lr * (cur_iter / self.warmup_steps)
        return self.start_lr * ((1 - float(cur_iter) / self.total_iters) ** self.lr_power)


def lr_for_step(policy: WarmUpPolyLR, step: int) -> float:
    """The lr that global optimizer step ``step`` (0-based) runs with in the authors' loop."""
    return policy.start_lr if step == 0 else policy.get_lr(step - 1)


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Write ``lr`` into every parameter group (CMX does this after each ``optimizer.step()``)."""
    for group in optimizer.param_groups:
        group['lr'] = lr
