"""The values a config key may take, where they form a fixed set, in one leaf module.

:func:`smmcl.config.validate` checks a loaded config against these once, before any process starts,
and the code that implements each choice imports its names from here, so the configuration depends
on no model or engine module. The MSCAN variants (SegNeXt's ``mscan_t/s/b/l``: widths, depths, MLP
ratios, drop-path rate) are the choices of ``backbone``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence

NONFINITE_LOSS = ('stop', 'skip')  # config.nonfinite_loss (smmcl.engine.train)
EVAL_PROTOCOLS = ('authors', 'corrected')  # config.eval_protocol (smmcl.engine.evaluate)
OPTIMIZERS = ('AdamW', 'SGDM')  # config.optimizer (smmcl.engine.optim)
ANCHOR_SAMPLERS = ('vectorized', 'loop')  # config.anchor_sampler (smmcl.losses.contrastive)
DECODERS = ('LightHamHead',)  # config.decoder (smmcl.models.builder)
SPEEDS = ('reference', 'fast')  # config.speed (smmcl.engine.speed)


@dataclass(frozen=True)
class MSCANSpec:
    embed_dims: Sequence[int]
    depths: Sequence[int]
    drop_path_rate: float
    mlp_ratios: Sequence[float] = (8, 8, 4, 4)


def mscan_t() -> MSCANSpec:
    return MSCANSpec((32, 64, 160, 256), (3, 3, 5, 2), 0.1)


def mscan_s() -> MSCANSpec:
    return MSCANSpec((64, 128, 320, 512), (2, 2, 4, 2), 0.1)


def mscan_b() -> MSCANSpec:
    return MSCANSpec((64, 128, 320, 512), (3, 3, 12, 3), 0.2)


def mscan_l() -> MSCANSpec:
    return MSCANSpec((64, 128, 320, 512), (3, 5, 27, 3), 0.3)


# config.backbone (smmcl.models.mscan builds them). A dict, so that a test can register a variant of its own.
MSCAN_VARIANTS: Dict[str, Callable[[], MSCANSpec]] = {
    'mscan_t': mscan_t, 'mscan_s': mscan_s, 'mscan_b': mscan_b, 'mscan_l': mscan_l,
}
