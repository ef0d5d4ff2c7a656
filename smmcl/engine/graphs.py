"""CUDA graphs: the eager forward recorded once per input shape, then replayed.

An eager MSCAN-B forward launches a few thousand small kernels, and on an H100 the host's time to
launch them, not the GPU's work, bounds inference and training (docs/speed.md). Evaluation and
prediction feed the model inputs of a few fixed shapes (the crop, each scale's size, the last partial
batch), training one (the crop, ``drop_last`` batches), so each shape's work can be captured once into
a CUDA graph and replayed with one launch.

Inference (``config.cuda_graphs``, :class:`GraphedInference`). SMMCL's NMF decoder draws random bases in
every forward (``torch.rand``). A graph would freeze that draw, so the bases are drawn *outside* the
graph, in the order and with the generator the eager forward uses, and fed to the graph as inputs, next
to the images: a replay computes what the eager forward computes with the same random state (the only
random numbers an eval-mode forward draws are these bases; :func:`smmcl.engine.evaluate._drawn_bases`
relies on the same). Bases the caller gives (:func:`smmcl.models.ham_head.given_bases`, batched
evaluation) are used as they are.

Training (``config.cuda_graphs_training``, :class:`GraphedTrainingForward`): the segmentor's whole
training forward (both encoders, the fusion, the decoder, the projectors, the cross-entropy, the anchor
sampler and the InfoNCE terms) is recorded with its backward, :func:`torch.cuda.make_graphed_callables`'
recipe (:func:`graph_module`); the optimizer stays eager. The contrastive loss then runs in its padded
form inside the recording (:func:`smmcl.losses.contrastive.sync_free`: the vectorised sampler's draws
in fixed slots, masked InfoNCE; no host read), the same values to float rounding. With the authors'
loop sampler, which reads the host per class, only ``encode_decode`` is recorded and the losses stay
eager. Inside the graphs the NMF bases, drop path and the sampler's permutations draw from the default
generator as PyTorch's graph-safe random numbers: each replay takes the generator's seed and offset at
that moment, so the training step's per-chunk seeding holds. The warm-up runs the forward and backward
on the first batch; the BatchNorm running statistics and the random generators are put back afterwards,
so the run goes on as the eager one.

Captures use ``capture_error_mode='thread_local'``: in the default global mode, a CUDA call from any
other thread of the process (the DataLoader's pin-memory thread prefetching the next batch) invalidates
the capture and leaves that thread failing too. Both switches are off by default; on a CPU, or any
device other than CUDA, the model runs as it is. A recording that fails anyway leaves a warning and runs
those inputs eagerly. The CPU tests drive all of it through :class:`EagerRecorder`, which has a graph's
semantics without a GPU.
"""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from smmcl.config import ConfigError
from smmcl.engine.chunks import copy_buffers, put_back_buffers
from smmcl.engine.seeding import kept_rng
from smmcl.losses.contrastive import has_sync_free_form, sync_free
from smmcl.models.ham_head import given_bases, nmf_layers

logger = logging.getLogger(__name__)


# ---- recording ------------------------------------------------------------------------------------

class CudaRecorder:
    """Warm-up and capture of CUDA graphs that share one memory pool.

    Graphs of one pool must not run concurrently, and memory a capture freed may serve a later one:
    :class:`GraphedInference` copies every output out at once; :func:`graph_module`'s backward graph
    reuses what its forward graph freed, as ``make_graphed_callables`` does (its outputs and saved
    tensors stay alive, so their memory is not taken).
    """

    def __init__(self):
        self.pool = None

    def warm_up(self, fn: Callable[[], object], times: int) -> None:
        """Run ``fn`` ``times`` times on a side stream (PyTorch's CUDA-graph notes: cuDNN picks its
        algorithms, Triton's autotuner its tiles, lazy initialisation happens, all outside the capture)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(times):
                fn()
        torch.cuda.current_stream().wait_stream(side)

    def record(self, fn: Callable[[], object]):
        """``(replay, outputs)``: ``fn`` (reading only static tensors) captured into a CUDA graph; its
        outputs are static tensors that every ``replay()`` rewrites."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode='thread_local'):
            outputs = fn()
        self.pool = graph.pool()
        return graph.replay, outputs


class EagerRecorder:
    """:class:`CudaRecorder`'s semantics on any device, for the CPU tests: the warm-up runs ``fn``; the
    "recording" runs it once and keeps its outputs as the static tensors, which every ``replay()``
    overwrites with a new run's values (``fn`` reads the static inputs' current values)."""

    def warm_up(self, fn: Callable[[], object], times: int) -> None:
        for _ in range(times):
            fn()

    def record(self, fn: Callable[[], object]):
        outputs = fn()

        def replay() -> None:
            new = fn()
            with torch.no_grad():
                for static, value in zip(_as_tuple(outputs), _as_tuple(new)):
                    if static is not None:
                        static.detach().copy_(value)

        return replay, outputs


def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


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


def _uncached_autocast(device_type: str):
    """The autocast now in force, without its weight-cast cache: a cached cast made outside a graph's
    memory pool would be freed when the caller's autocast context ends, under the graph's feet
    (``make_graphed_callables`` refuses the cache for that reason)."""
    enabled, dtype = _autocast_state(device_type)
    return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False)


# ---- inference ------------------------------------------------------------------------------------

@dataclass
class _Graph:
    rgb: torch.Tensor
    x: torch.Tensor
    bases: List[torch.Tensor]
    replay: Callable[[], None]
    out: torch.Tensor


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
        recorder: :class:`CudaRecorder` (the default, on CUDA inputs); the tests pass an
            :class:`EagerRecorder`, which also applies on the CPU.
        max_graphs: signatures recorded at most; later new ones run eagerly. Each graph keeps its
            activations' memory, and prediction on a folder of photos of many sizes would otherwise
            record (and hold) one graph per size.

    Attributes:
        model: the wrapped model (its NMFs are found through this module too).
        captures: the number of graphs recorded so far.
    """

    def __init__(self, model: nn.Module, warmup: int = 3, recorder=None, max_graphs: int = 8):
        super().__init__()
        self.model = model
        self.warmup, self.max_graphs = warmup, max_graphs
        self._recorder = recorder  # None: a CudaRecorder, made on the first CUDA input
        self._graphs: Dict[tuple, Optional[_Graph]] = {}  # None: the recording failed, run eagerly
        self.train(False)  # an eval-mode wrapper (callers read .training to restore it)

    @property
    def captures(self) -> int:
        return sum(graph is not None for graph in self._graphs.values())

    def __deepcopy__(self, memo) -> 'GraphedInference':
        # The graphs replay the original's kernels on the original's tensors: a copy records its own.
        recorder = type(self._recorder)() if isinstance(self._recorder, EagerRecorder) else None
        return GraphedInference(copy.deepcopy(self.model, memo), self.warmup, recorder, self.max_graphs)

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
        if not rgb.is_cuda and not isinstance(self._recorder, EagerRecorder):
            return self.model(rgb, x)
        if self.model.training:
            raise ValueError('GraphedInference needs an eval-mode model: call .eval() on it first')
        with torch.no_grad():
            bases = self._bases(rgb.shape[0], rgb.device)
            key = (tuple(rgb.shape), rgb.dtype, tuple(x.shape), x.dtype, rgb.device,
                   tuple((tuple(b.shape), b.dtype) for b in bases), _autocast_state(rgb.device.type))
            if key not in self._graphs and len(self._graphs) >= self.max_graphs:
                logger.warning('%d input signatures recorded as CUDA graphs already (max_graphs); inputs %s / %s '
                               'and other new ones run eagerly', self.max_graphs, tuple(rgb.shape), tuple(x.shape))
                self._graphs[key] = None
            elif key not in self._graphs:
                self._graphs[key] = _recorded_or_none(lambda: self._record(rgb, x, bases), rgb, x)
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

    def _record(self, rgb: torch.Tensor, x: torch.Tensor, bases: List[torch.Tensor]) -> _Graph:
        static_rgb, static_x = rgb.clone(), x.clone()
        static_bases = [b.clone() for b in bases]
        if self._recorder is None:
            self._recorder = CudaRecorder()  # one memory pool for all this model's graphs
        recorder = self._recorder

        def forward() -> torch.Tensor:
            with given_bases(self.model, static_bases), _uncached_autocast(rgb.device.type):
                return self.model(static_rgb, static_x)

        logger.info('recording a CUDA graph of the forward for inputs %s / %s', tuple(rgb.shape), tuple(x.shape))
        recorder.warm_up(forward, self.warmup)
        replay, out = recorder.record(forward)
        return _Graph(static_rgb, static_x, static_bases, replay, out)


def graphed(model: nn.Module, config) -> nn.Module:
    """``model`` wrapped in :class:`GraphedInference` when ``config.cuda_graphs``, else itself."""
    return GraphedInference(model) if config.cuda_graphs else model


# ---- training -------------------------------------------------------------------------------------

def graph_module(module: nn.Module, sample_args: Sequence[torch.Tensor], recorder, warmup: int = 3) -> Callable:
    """``module``'s forward and backward recorded as two graphs: a function of the same arguments returning
    what ``module`` returns, differentiable with respect to its parameters.

    :func:`torch.cuda.make_graphed_callables`' recipe for one module (static inputs: ``sample_args``, the
    parameters and the outputs' gradients; the backward graph is ``torch.autograd.grad`` of the recorded
    outputs), in the recorder's capture mode. Replays read the inputs' current values (copied into
    ``sample_args``) and the parameters in place: an in-place optimizer update is seen, a new object not.

    Args:
        module: in the mode it will run in; its forward takes tensors and returns (nested) tensors.
        sample_args: tensors of the real inputs' shapes, dtypes and layouts; kept as the static inputs.
        recorder: :class:`CudaRecorder` or :class:`EagerRecorder`.
        warmup: forwards and backwards first (BatchNorm updates and draws: the caller puts them back).
    """
    static_inputs = tuple(sample_args)
    params = tuple(module.parameters())
    surface = static_inputs + params
    differentiable = tuple(t for t in surface if t.requires_grad)
    live = {}  # the outputs of the latest forward (the stand-in's backward differentiates those)

    def forward():
        with torch.enable_grad():
            leaves, live['spec'] = tree_flatten(module(*static_inputs))
        live['outputs'] = tuple(leaves)
        return live['outputs']

    def warm_step():
        outputs = [o for o in forward() if o.requires_grad]
        torch.autograd.grad(outputs, differentiable, grad_outputs=[torch.zeros_like(o) for o in outputs],
                            allow_unused=True)

    recorder.warm_up(warm_step, warmup)
    replay_forward, static_outputs = recorder.record(forward)
    spec = live['spec']
    static_grad_outputs = tuple(torch.zeros_like(o) if o.requires_grad else None for o in static_outputs)

    def backward():
        pairs = [(o, g) for o, g in zip(live['outputs'], static_grad_outputs) if g is not None]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], differentiable, grad_outputs=[g for _, g in pairs],
                                         allow_unused=True))
        return tuple(next(grads) if t.requires_grad else None for t in surface)

    replay_backward, static_grad_inputs = recorder.record(backward)
    replay = _replaying_function((static_inputs, static_outputs, replay_forward),
                                 (static_grad_outputs, static_grad_inputs, replay_backward))
    return lambda *args: tree_unflatten(list(replay.apply(*args, *params)), spec)


def _replaying_function(forward_graph, backward_graph) -> type:
    """An autograd function replaying a recorded forward and backward: ``forward_graph`` = (static
    inputs, static outputs, replay), ``backward_graph`` = (static output gradients, static input
    gradients, replay); its arguments are the inputs then the parameters (the graphs' static inputs)."""
    static_inputs, static_outputs, replay_forward = forward_graph
    static_grad_outputs, static_grad_inputs, replay_backward = backward_graph

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            for static, value in zip(static_inputs, inputs):
                if static.data_ptr() != value.data_ptr():
                    static.copy_(value)
            replay_forward()
            return tuple(o.detach() for o in static_outputs)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, *grads):
            for static, grad in zip(static_grad_outputs, grads):
                if static is not None:
                    static.copy_(grad)
            replay_backward()
            # Copies, not views: autograd may keep a returned gradient as the parameter's .grad, which
            # the next replay (the next chunk's backward, gradient accumulation) would then overwrite.
            # One multi-tensor pass (x 1.0, exact) rather than a launch per parameter.
            present = [g for g in static_grad_inputs if g is not None]
            copies = iter(torch._foreach_mul(present, 1.0) if present else ())
            return tuple(next(copies) if g is not None else None for g in static_grad_inputs)

    return Replay


class _EncodeDecode(nn.Module):
    """A segmentor's ``encode_decode`` as a module of its own, holding its parameters (those of the
    encoders and the decoder: all the segmentor's)."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.backbone, self.decode_head = segmentor.backbone, segmentor.decode_head
        self._encode_decode = type(segmentor).encode_decode.__get__(segmentor)

    def forward(self, rgb: torch.Tensor, x: torch.Tensor):
        return self._encode_decode(rgb, x)


class _TrainingTerms(nn.Module):
    """A segmentor's whole training forward, losses included, as a module of its own: (rgb, x, label) ->
    the loss terms (``loss``, ``ce``, ``cm``, ``vis``, ``aux``), the contrastive ones in their padded
    form (what a recording holds; the segmentor's eager calls keep the plain one)."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.backbone, self.decode_head = segmentor.backbone, segmentor.decode_head
        self._forward = type(segmentor).forward.__get__(segmentor)
        self._contrastive = segmentor.contrastive

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, label: torch.Tensor):
        with sync_free(self._contrastive):
            return self._forward(rgb, x, label, return_terms=True)


class GraphedTrainingForward:
    """A segmentor's training forward from CUDA graphs (forward and backward), one recording per input
    signature (shapes, dtypes, autocast state); eager elsewhere (eval mode, no grad, no labels with
    ``losses``, devices other than CUDA). Installed by :func:`use_training_graphs`; not a module, so the
    segmentor's parameters and state dict stay as they are.

    Two extents: ``losses=False`` records ``encode_decode`` (encoders, fusion, decoder, projectors) and
    is called as it; ``losses=True`` records the whole ``forward(rgb, x, label)`` with the cross-entropy
    and the contrastive terms (their padded form, :func:`smmcl.losses.contrastive.sync_free`: no host
    read, fixed shapes) and is called as ``forward``.

    Args:
        segmentor: an :class:`~smmcl.models.segmentor.EncoderDecoder`.
        warmup: forwards and backwards before each capture.
        recorder: the recorder class, :class:`CudaRecorder` on CUDA inputs; the tests pass
            :class:`EagerRecorder`, which also applies on the CPU.
        losses: the extent (above).

    Raises:
        ConfigError: the segmentor has SyncBatchNorm layers (collectives cannot be recorded).
    """

    def __init__(self, segmentor: nn.Module, warmup: int = 3, recorder: Optional[type] = None,
                 losses: bool = False):
        if any(isinstance(m, nn.SyncBatchNorm) for m in segmentor.modules()):
            raise ConfigError('cuda_graphs_training=True cannot record SyncBatchNorm\'s collectives: set '
                              'sync_bn=False (per-chunk BatchNorm, the authors\') or cuda_graphs_training=False')
        self.segmentor, self.warmup, self.recorder, self.losses = segmentor, warmup, recorder, losses
        self.recorded: Dict[tuple, Optional[Callable]] = {}  # None: the recording failed, run eagerly

    def __deepcopy__(self, memo) -> 'GraphedTrainingForward':
        # A copied segmentor (copy.deepcopy(model)) must not replay the original's graphs, which read and
        # write the original's parameters: the copy starts without recordings.
        clone = object.__new__(GraphedTrainingForward)
        clone.segmentor = copy.deepcopy(self.segmentor, memo)
        clone.warmup, clone.recorder, clone.losses, clone.recorded = self.warmup, self.recorder, self.losses, {}
        return clone

    def __call__(self, rgb: torch.Tensor, x: torch.Tensor, label: Optional[torch.Tensor] = None,
                 return_terms: bool = False):
        """As ``encode_decode(rgb, x)`` (N-3-H-W, N-C_x-H-W -> logits N-K-H-W, colour embedding, X
        embedding), or with ``losses`` as ``forward(rgb, x, label, return_terms)``."""
        recorder = self.recorder or (CudaRecorder if rgb.is_cuda else None)
        cls = type(self.segmentor)
        if self.losses:
            eager = functools.partial(cls.forward.__get__(self.segmentor), return_terms=return_terms)
            inputs = (rgb, x) if label is None else (rgb, x, label)
        else:
            eager, inputs = cls.encode_decode.__get__(self.segmentor), (rgb, x)
        if recorder is None or not self.segmentor.training or not torch.is_grad_enabled() \
                or (self.losses and label is None):
            return eager(*inputs)
        key = tuple((tuple(t.shape), t.dtype) for t in inputs) + (rgb.device, _autocast_state(rgb.device.type))
        if key not in self.recorded:
            self.recorded[key] = _recorded_or_none(lambda: self._record(inputs, recorder), rgb, x)
            if self.recorded[key] is None and self.losses and 'encode_decode' not in self.segmentor.__dict__:
                # the losses could not be recorded: the encoders and the decoder still can, alone
                logger.warning('recording the encoders and the decoder alone; the losses run eagerly')
                self.segmentor.encode_decode = GraphedTrainingForward(self.segmentor, self.warmup, self.recorder)
        graphed = self.recorded[key]
        if graphed is None:
            return eager(*inputs)
        out = graphed(*inputs)
        return out if not self.losses or return_terms else out['loss']

    def _record(self, inputs: Tuple[torch.Tensor, ...], recorder: type) -> Callable:
        module = (_TrainingTerms if self.losses else _EncodeDecode)(self.segmentor)
        statistics = copy_buffers(module)
        device = inputs[0].device
        logger.info('recording CUDA graphs of the training forward%s and backward for inputs %s',
                    ' with its losses' if self.losses else '', ' / '.join(str(tuple(t.shape)) for t in inputs))
        # The warm-up updates the BatchNorm statistics and draws random numbers: both are put back, so
        # that the run continues as the eager one.
        try:
            with kept_rng(device), _uncached_autocast(device.type):
                return graph_module(module, tuple(t.detach().clone() for t in inputs), recorder(), self.warmup)
        finally:
            put_back_buffers(module, statistics)


def use_training_graphs(model: nn.Module, enabled: bool, recorder: Optional[type] = None) -> nn.Module:
    """Give the segmentor ``model`` a :class:`GraphedTrainingForward` (in place), or take it away: with the
    vectorised anchor sampler, whose padded form reads nothing on the host, over the whole ``forward``,
    losses included; with the authors' loop sampler, which reads the host per class, over
    ``encode_decode`` (an instance attribute shadowing the method), the losses eager."""
    contrastive = getattr(model, 'contrastive', None)
    losses = contrastive is not None and has_sync_free_form(contrastive)
    model.__dict__.pop('encode_decode', None)
    model.__dict__.pop('forward', None)
    if enabled:
        name = 'forward' if losses else 'encode_decode'
        setattr(model, name, GraphedTrainingForward(model, recorder=recorder, losses=losses))
        if contrastive is not None and not losses:
            logger.info('cuda_graphs_training: the losses stay eager (the loop anchor sampler reads the host '
                        'per class); the encoders and the decoder are recorded')
    return model
