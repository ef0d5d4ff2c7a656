"""CUDA graphs (issue 10): the eager forward recorded once per input shape, then replayed.

An eager MSCAN-B forward launches a few thousand small kernels, and on an H100 the host's time to
launch them, not the GPU's work, bounds inference (README speed section). Sliding-window evaluation
and prediction feed the model inputs of a few fixed shapes (the crop, each scale's size, the last
partial batch), so each shape's forward can be captured once into a CUDA graph and replayed with one
launch.

Same function: SMMCL's NMF decoder draws random bases in every forward (``torch.rand``). A graph would
freeze that draw, so :class:`GraphedInference` draws the bases *outside* the graph, in the order and with
the generator the eager forward uses, and feeds them to the graph as inputs, next to the images: a
replay computes what the eager forward computes with the same random state (the only random numbers
an eval-mode forward draws are these bases; :func:`smmcl.engine.evaluate._drawn_bases` relies on the
same). Bases the caller gives (:func:`smmcl.models.ham_head.given_bases`, batched evaluation) are used
as they are.

Off by default (``config.cuda_graphs``). On a CPU, or any device other than CUDA, the wrapper calls the
model as it is: the switch is safe to leave on everywhere.

Training (``config.cuda_graphs_training``, off by default): the segmentor's ``encode_decode`` (both
encoders, the fusion, the decoder and the projectors: all but the losses, ~4,300 of a step's ~4,400
eager ops) is recorded with its backward by :func:`torch.cuda.make_graphed_callables`
(:class:`GraphedTrainingForward`); the losses, the anchor sampler and the optimizer stay eager. Inside
a graph the NMF bases and drop path draw from the default generator as PyTorch's graph-safe random
numbers: each replay takes the generator's seed and offset at that moment, so the per-chunk seeding of
the training step holds. The warm-up and capture run the forward and backward four times on the first
batch; the BatchNorm running statistics and the random generators are put back afterwards, so the
run is the eager one's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from smmcl.config import ConfigError
from smmcl.engine.chunks import copy_buffers, put_back_buffers
from smmcl.models.ham_head import given_bases, nmf_layers

logger = logging.getLogger(__name__)

# (function to record, its state) -> (replay, static outputs): see cuda_capture / eager_capture
Capture = Callable[[Callable[[], torch.Tensor], 'CaptureState'], Tuple[Callable[[], None], torch.Tensor]]


@dataclass
class CaptureState:
    """What the captures of one :class:`GraphedInference` share: the warm-up count and the memory pool
    (graphs replayed one at a time may share one; every output is copied out right after its replay)."""
    warmup: int = 3
    pool: Optional[Tuple[int, int]] = None


def cuda_capture(fn: Callable[[], torch.Tensor], state: CaptureState) -> Tuple[Callable[[], None], torch.Tensor]:
    """Record ``fn`` (reading only static tensors) into a CUDA graph: ``(graph.replay, static output)``.

    Warm-up runs on a side stream first, as PyTorch's CUDA-graph notes ask: cuDNN picks its algorithms,
    Triton's autotuner its tiles, and lazy initialisation happens outside the capture.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(state.warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=state.pool):
        out = fn()
    state.pool = graph.pool()
    return graph.replay, out


def eager_capture(fn: Callable[[], torch.Tensor], state: CaptureState) -> Tuple[Callable[[], None], torch.Tensor]:
    """A stand-in for :func:`cuda_capture` with a graph's semantics on any device (the CPU tests): the
    output is one static tensor that every replay overwrites from the static inputs' current values."""
    out = fn()

    def replay() -> None:
        out.copy_(fn())

    return replay, out


@dataclass
class _Graph:
    rgb: torch.Tensor
    x: torch.Tensor
    bases: List[torch.Tensor]
    replay: Callable[[], None]
    out: torch.Tensor


def _recorded_or_none(record: Callable, rgb: torch.Tensor, x: torch.Tensor):
    """``record()``, or None with a warning when recording fails (an op that cannot be captured, memory):
    those inputs' shapes then run eagerly, the same function, slower, rather than stopping a run."""
    try:
        return record()
    except RuntimeError as error:
        logger.warning('recording a CUDA graph for inputs %s / %s failed; they run eagerly from now on: %s',
                       tuple(rgb.shape), tuple(x.shape), error)
        return None


def _autocast_state(device_type: str) -> Tuple[bool, Optional[torch.dtype]]:
    """(enabled, dtype) of autocast on ``device_type`` now."""
    try:  # PyTorch >= 2.4
        enabled = torch.is_autocast_enabled(device_type)
        return (True, torch.get_autocast_dtype(device_type)) if enabled else (False, None)
    except (TypeError, AttributeError):  # 2.1 - 2.3: one function pair per device type
        if device_type == 'cuda':
            enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        else:
            enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return (True, dtype) if enabled else (False, None)


class GraphedInference(nn.Module):
    """``model(rgb, x) -> logits`` of an eval-mode segmentor, each input signature recorded once as a
    CUDA graph and replayed after (module docstring).

    A signature is the inputs' shapes and dtypes, the NMF bases' shapes and the autocast state: a new
    one is warmed up and captured (seconds for MSCAN-B), a known one copies the inputs and the bases
    into the graph's static tensors, replays, and returns a copy of its output. Inputs on another
    device than CUDA go to ``model`` directly.

    Args:
        model: the model (``for_inference``'s), put in eval mode, called as ``model(rgb, x)``.
        warmup: eager forwards before each capture.
        capture: how a forward is recorded: :func:`cuda_capture` on CUDA; the tests pass
            :func:`eager_capture`, which also applies it on the CPU.

    Attributes:
        model: the wrapped model (its NMFs are found through this module too).
        captures: the number of graphs recorded so far.
    """

    def __init__(self, model: nn.Module, warmup: int = 3, capture: Optional[Capture] = None):
        super().__init__()
        self.model = model
        self._capture = capture
        self._state = CaptureState(warmup=warmup)
        self._graphs: Dict[tuple, _Graph] = {}
        self.train(False)  # an eval-mode wrapper (callers read .training to restore it)

    @property
    def captures(self) -> int:
        return sum(graph is not None for graph in self._graphs.values())

    def train(self, mode: bool = True) -> 'GraphedInference':
        if mode:
            raise ValueError('GraphedInference is for inference: the recorded forward is the eval-mode one '
                             '(NMF steps, BatchNorm statistics); train the wrapped model instead')
        return super().train(False)

    def _bases(self, batch: int, device: torch.device) -> List[torch.Tensor]:
        """Per NMF, the caller's given bases or a fresh draw, drawn as the eager forward draws them."""
        return [nmf.fixed_bases if nmf.fixed_bases is not None else nmf.draw_bases(batch, channels, device)
                for nmf, channels in nmf_layers(self.model)]

    def forward(self, rgb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """N-3-H-W (rgb), N-C_x-H-W (x) -> N-K-H-W logits, as ``model(rgb, x)``."""
        capture = self._capture or (cuda_capture if rgb.is_cuda else None)
        if capture is None:
            return self.model(rgb, x)
        if self.model.training:
            raise ValueError('GraphedInference needs an eval-mode model: call .eval() on it first')
        with torch.no_grad():
            bases = self._bases(rgb.shape[0], rgb.device)
            key = (tuple(rgb.shape), rgb.dtype, tuple(x.shape), x.dtype, rgb.device,
                   tuple((tuple(b.shape), b.dtype) for b in bases), _autocast_state(rgb.device.type))
            if key not in self._graphs:
                self._graphs[key] = _recorded_or_none(lambda: self._record(rgb, x, bases, capture), rgb, x)
            else:
                graph = self._graphs[key]
                for static, value in zip([graph.rgb, graph.x] + graph.bases if graph else [], [rgb, x] + bases):
                    static.copy_(value)
            graph = self._graphs[key]
            if graph is None:  # the recording failed: this signature runs eagerly, with the bases drawn above
                with given_bases(self.model, bases):
                    return self.model(rgb, x)
            graph.replay()
            return graph.out.clone()

    def _record(self, rgb: torch.Tensor, x: torch.Tensor, bases: List[torch.Tensor], capture: Capture) -> _Graph:
        static_rgb, static_x = rgb.clone(), x.clone()
        static_bases = [b.clone() for b in bases]
        enabled, dtype = _autocast_state(rgb.device.type)

        def forward() -> torch.Tensor:
            # Autocast's weight-cast cache would hand the graph casts made outside its memory pool and
            # freed when the caller's autocast context ends: record with the cache off.
            with given_bases(self.model, static_bases), \
                    torch.autocast(rgb.device.type, dtype=dtype, enabled=enabled, cache_enabled=False):
                return self.model(static_rgb, static_x)

        logger.info('recording a CUDA graph of the forward for inputs %s / %s', tuple(rgb.shape), tuple(x.shape))
        replay, out = capture(forward, self._state)
        return _Graph(static_rgb, static_x, static_bases, replay, out)


def graphed(model: nn.Module, config) -> nn.Module:
    """``model`` wrapped in :class:`GraphedInference` when ``config.cuda_graphs``, else itself."""
    return GraphedInference(model) if config.cuda_graphs else model


# ---- training -------------------------------------------------------------------------------------

def eager_make_graphed(module: nn.Module, sample_args: Tuple[torch.Tensor, ...], num_warmup_iters: int = 3,
                       allow_unused_input: bool = False) -> nn.Module:
    """A stand-in for :func:`torch.cuda.make_graphed_callables` on any device (the CPU tests): its side
    effects without a graph -- ``num_warmup_iters`` forwards and backwards (``torch.autograd.grad``, no
    ``.grad`` written) and the capture's forward, which update BatchNorm statistics and draw random
    numbers -- then ``module`` as it is."""
    params = tuple(p for p in module.parameters() if p.requires_grad)
    for i in range(num_warmup_iters + 1):
        outputs = [o for o in torch.utils._pytree.tree_leaves(module(*sample_args)) if o.requires_grad]
        if i < num_warmup_iters:
            torch.autograd.grad(outputs, params, grad_outputs=[torch.ones_like(o) for o in outputs],
                                allow_unused=allow_unused_input)
    return module


class _EncodeDecode(nn.Module):
    """A segmentor's ``encode_decode`` as a module of its own: ``make_graphed_callables`` records a
    module's forward with its parameters (those of the encoders and the decoder: all the segmentor's)."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.backbone, self.decode_head = segmentor.backbone, segmentor.decode_head
        self._encode_decode = type(segmentor).encode_decode.__get__(segmentor)

    def forward(self, rgb: torch.Tensor, x: torch.Tensor):
        return self._encode_decode(rgb, x)


class GraphedTrainingForward:
    """A segmentor's training-mode ``encode_decode`` from CUDA graphs (forward and backward), one
    recording per input signature (shapes, dtypes, autocast state); eager elsewhere (eval mode, no
    grad, devices other than CUDA). Installed by :func:`use_training_graphs`; not a module, so the
    segmentor's parameters and state dict stay as they are.

    Args:
        segmentor: an :class:`~smmcl.models.segmentor.EncoderDecoder`.
        warmup: warm-up iterations before each capture.
        make_graphed: :func:`torch.cuda.make_graphed_callables` on CUDA; the tests pass
            :func:`eager_make_graphed`, which also applies it on the CPU.
    """

    def __init__(self, segmentor: nn.Module, warmup: int = 3, make_graphed: Optional[Callable] = None):
        if any(isinstance(m, nn.SyncBatchNorm) for m in segmentor.modules()):
            raise ConfigError('cuda_graphs_training=True cannot record SyncBatchNorm\'s collectives: set '
                             'sync_bn=False (per-chunk BatchNorm, the authors\') or cuda_graphs_training=False')
        self.segmentor, self.warmup, self.make_graphed = segmentor, warmup, make_graphed
        self.recorded: Dict[tuple, Callable] = {}

    def __call__(self, rgb: torch.Tensor, x: torch.Tensor):
        """N-3-H-W, N-C_x-H-W -> (logits N-K-H-W, colour embedding, X embedding), as ``encode_decode``."""
        make = self.make_graphed or (torch.cuda.make_graphed_callables if rgb.is_cuda else None)
        eager = type(self.segmentor).encode_decode.__get__(self.segmentor)
        if make is None or not self.segmentor.training or not torch.is_grad_enabled():
            return eager(rgb, x)
        key = (tuple(rgb.shape), rgb.dtype, tuple(x.shape), x.dtype, rgb.device, _autocast_state(rgb.device.type))
        if key not in self.recorded:
            self.recorded[key] = _recorded_or_none(lambda: self._record(rgb, x, make), rgb, x)
        graphed = self.recorded[key]
        return eager(rgb, x) if graphed is None else graphed(rgb, x)

    def _record(self, rgb: torch.Tensor, x: torch.Tensor, make: Callable) -> Callable:
        module = _EncodeDecode(self.segmentor)
        enabled, dtype = _autocast_state(rgb.device.type)
        devices = [rgb.device.index if rgb.device.index is not None else torch.cuda.current_device()] \
            if rgb.is_cuda else []
        statistics = copy_buffers(module)
        logger.info('recording CUDA graphs of the training forward and backward for inputs %s / %s',
                    tuple(rgb.shape), tuple(x.shape))
        # The warm-up iterations update the BatchNorm statistics and draw random numbers: both are put
        # back, so that the run continues as the eager one. make_graphed_callables refuses autocast's
        # weight-cast cache.
        try:
            with torch.random.fork_rng(devices=devices), \
                    torch.autocast(rgb.device.type, dtype=dtype, enabled=enabled, cache_enabled=False):
                return make(module, (rgb.detach().clone(), x.detach().clone()), num_warmup_iters=self.warmup,
                            allow_unused_input=True)
        finally:
            put_back_buffers(module, statistics)


def use_training_graphs(model: nn.Module, enabled: bool, make_graphed: Optional[Callable] = None) -> nn.Module:
    """Give the segmentor ``model`` a :class:`GraphedTrainingForward` as its ``encode_decode`` (an instance
    attribute shadowing the method), or take it away (in place)."""
    if enabled:
        model.encode_decode = GraphedTrainingForward(model, make_graphed=make_graphed)
    else:
        model.__dict__.pop('encode_decode', None)
    return model
