"""Plain vs fast path, side by side, on whatever device is present.

Measures, for SMMCL's model and loss: training-step images/s (train.py's own iteration,
``smmcl.engine.train.train_step``, on a batch in the training loader's format: the copy to the device and
the normalisation, forward, all four losses, backward, the optimizer train.py builds: fused AdamW on
the fast path, whose ``host_sync_every=50`` is ``speed='fast'``'s), inference images/s (eval-mode
forward), whole sliding-window evaluation images/s of a synthetic test set (loading included), and peak
memory. Prints one table.

    python bench/bench.py                      # GPU: MSCAN-B, batch 8, 480x640
    python bench/bench.py --backbone mscan_t --height 120 --width 160 --batch 2   # a quick CPU run

Plain path: the authors' way (fp32, NCHW, their per-class anchor-sampling loop, one window at a time).
Fast path: vectorised sampler, channels_last, bf16 autocast where the device computes bf16 natively
(NMF and InfoNCE stay fp32; the dtype column says what ran), BN and layer scales folded for inference,
batched sliding windows, optional torch.compile (--compile; its compile time is reported) or CUDA
graphs (--cuda-graphs: ``cuda_graphs`` and ``cuda_graphs_training``, on a GPU). Both paths
are configured by the same helpers as train.py and eval.py (``smmcl.engine.precision``).
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time

import torch

try:
    import smmcl  # noqa: F401  (an installed package: `make install`; no sys.path edits)
except ModuleNotFoundError:
    sys.exit('smmcl is not installed: run `make install` or `pip install -e .` in the repo root')

from smmcl.config import base_config  # noqa: E402
from smmcl.models import build_segmentor  # noqa: E402
from smmcl.engine.precision import (for_inference, for_training, maybe_compile, memory_format,  # noqa: E402
                                    mixed_precision)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    """Peak GPU memory *reserved* since ``reset_peak`` (the process's peak RSS on the CPU), one counter
    for every path: with CUDA graphs the recorded activations live in the graphs' private pools,
    allocated when recording and never again when replaying, which the peak allocation of the timed
    replays would miss; reserved memory counts them (and the allocator's cached blocks, emptied by
    ``reset_peak``, so an upper bound of what a run needs)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_reserved(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process peak RSS


def make_cfg(args, fast):
    """The plain path (the authors' way) or the fast path, as training and evaluation configure them."""
    cfg = base_config()
    cfg.update(backbone=args.backbone, num_classes=args.classes, batch_size=args.batch, replicas=1,
               anchor_sampler='vectorized' if fast else 'loop', fast_path=fast, amp=fast,
               compile=fast and args.compile, cuda_graphs=fast and args.cuda_graphs,
               cuda_graphs_training=fast and args.cuda_graphs,
               # speed='fast' on a GPU: the loss read every 50 steps, fused AdamW (smmcl.engine.speed)
               host_sync_every=50 if fast else 1,
               # bench.py's own runs keep the config's decoder; gpu_check's smoke model asks for a narrow one
               decoder_embed_dim=getattr(args, 'decoder_embed_dim', cfg.decoder_embed_dim))
    return cfg


def precision_of(amp) -> str:
    return {torch.bfloat16: 'bf16', torch.float16: 'fp16'}.get(getattr(amp, 'fast_dtype', None), 'fp32')


def synthetic_images(args, device, cfg):
    """Normalised-looking N-3-H-W rgb and x on ``device``, in the model's memory format (inference)."""
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.height, args.width)
    fmt = memory_format(cfg)
    return tuple(torch.randn(shape, generator=g).to(device).contiguous(memory_format=fmt) for _ in range(2))


def loader_batch(args, device):
    """A batch as the training loader hands it to ``train_step``: uint8 N-3-H-W images, int64 N-H-W
    blocky labels with many classes (so the sampler sees many anchor sets per image), N-4 valid boxes
    (the whole crop); pinned on a GPU, as the loader pins them."""
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.height, args.width)
    cells = torch.randint(0, args.classes, (args.batch, args.height // 32 + 1, args.width // 32 + 1), generator=g)
    batch = dict(data=torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
                 modal_x=torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
                 label=cells.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :args.height, :args.width],
                 valid_box=torch.tensor([[0, args.height, 0, args.width]] * args.batch))
    return {key: t.pin_memory() for key, t in batch.items()} if device.type == 'cuda' else batch


def training_step(cfg, device, model):
    """``step(batch, i)``: train.py's iteration ``i`` (:func:`smmcl.engine.train.train_step`: the batch to
    the device and normalised there, each chunk's forward and backward, the optimizer's step or its
    skip) with what train.py builds from ``cfg``: ``build_optimizer`` (fused AdamW with
    ``host_sync_every > 1``), precision, chunks, the step decision on the device or the host.
    ``model``: :func:`~smmcl.engine.precision.for_training`'s, on ``device``."""
    from smmcl.engine.chunks import plan_chunks
    from smmcl.engine.dist import DistContext
    from smmcl.engine.host_sync import skips_on_device
    from smmcl.engine.optim import build_optimizer
    from smmcl.engine.train import Loop, train_step
    ctx = DistContext(device=device)
    amp, scaler = mixed_precision(cfg, device)
    loop = Loop(maybe_compile(model, cfg), model, None, build_optimizer(model, cfg), scaler, amp, policy=None,
                data=None, plan=plan_chunks(cfg, ctx), config=cfg, ctx=ctx, tb=None,
                skip_on_device=skips_on_device(cfg, scaler, ctx))
    return lambda batch, i: train_step(loop, batch, i)


def bench_train(args, device, fast):
    """(images/s, peak GiB, compile s, dtype) of train.py's iteration on one batch, repeated."""
    cfg = make_cfg(args, fast)
    torch.manual_seed(0)
    model = for_training(build_segmentor(cfg, with_loss=True).to(device).train(), cfg)
    step = training_step(cfg, device, model)
    batch = loader_batch(args, device)
    start = time.perf_counter()
    step(batch, 0)
    sync(device)
    compile_s = time.perf_counter() - start if cfg.compile else 0.0
    for i in range(args.warmup):
        step(batch, 1 + i)
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    for i in range(args.iters):
        step(batch, 1 + args.warmup + i)
    sync(device)
    elapsed = time.perf_counter() - start
    peak = peak_gib(device)
    return args.batch * args.iters / elapsed, peak, compile_s, precision_of(mixed_precision(cfg, device)[0])


def bench_infer(args, device, fast):
    cfg = make_cfg(args, fast)
    torch.manual_seed(0)
    model = for_inference(build_segmentor(cfg).to(device), cfg)
    amp, _ = mixed_precision(cfg, device)
    rgb, x = synthetic_images(args, device, cfg)
    with torch.no_grad(), amp:
        for _ in range(args.warmup + 1):
            model(rgb, x)
        sync(device)
        reset_peak(device)
        start = time.perf_counter()
        for _ in range(args.iters):
            model(rgb, x)
        sync(device)
    return args.batch * args.iters / (time.perf_counter() - start), peak_gib(device)


def bench_eval(args, device, fast, data_dir):
    """Images/s of a whole sliding-window evaluation of a synthetic LLRGBD-layout test set, loading
    included."""
    try:
        run, images = evaluation(args, device, fast, data_dir)
    except ImportError as err:  # pragma: no cover - only while the evaluator is missing
        print(f'whole-evaluation benchmark skipped: {err}')
        return float('nan')
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return images / (time.perf_counter() - start)


def evaluation(args, device, fast, data_dir):
    """(run, images): ``run()`` evaluates the synthetic test set in ``data_dir`` as eval.py does (the
    model built and the dataset listed here, before)."""
    from smmcl.config import finalize
    from smmcl.data.dataset import RGBXDataset
    from smmcl.engine.evaluate import eval_workers, evaluate
    cfg = make_cfg(args, fast)
    cfg.update(dataset_name='LLRGBD', dataset_path=data_dir, train_split_dir='train',
               eval_split_dir='test', rgb_folder='rgb', x_folder='depth', gt_folder='label',
               eval_crop_size=[args.height, args.width], eval_batch_size=args.batch if fast else 1,
               exp_dir=data_dir)
    cfg = finalize(cfg)
    torch.manual_seed(0)
    model = for_inference(build_segmentor(cfg).to(device), cfg)
    amp, _ = mixed_precision(cfg, device)
    dataset = RGBXDataset(cfg, 'val')

    def run():
        with amp:
            evaluate(model, dataset, cfg, device, num_workers=eval_workers(cfg))  # as eval.py reads images

    return run, len(dataset)


def main(argv=None):
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('--backbone', default='mscan_b' if on_gpu else 'mscan_t')
    parser.add_argument('--batch', type=int, default=8 if on_gpu else 2)
    parser.add_argument('--height', type=int, default=480 if on_gpu else 120)
    parser.add_argument('--width', type=int, default=640 if on_gpu else 160)
    parser.add_argument('--classes', type=int, default=14)
    parser.add_argument('--iters', type=int, default=20 if on_gpu else 3)
    parser.add_argument('--warmup', type=int, default=5 if on_gpu else 1)
    parser.add_argument('--eval-images', type=int, default=479 if on_gpu else 8)
    parser.add_argument('--compile', action='store_true', help='torch.compile the fast path')
    parser.add_argument('--cuda-graphs', action='store_true',
                        help='fast path with CUDA graphs (cuda_graphs and cuda_graphs_training)')
    parser.add_argument('--skip-eval', action='store_true')
    args = parser.parse_args(argv)
    device = torch.device('cuda' if on_gpu else 'cpu')
    name = torch.cuda.get_device_name(device) if on_gpu else f'CPU ({torch.get_num_threads()} threads)'
    print(f'device: {name}; torch {torch.__version__}; {args.backbone}, batch {args.batch}, '
          f'{args.height}x{args.width}, {args.classes} classes')

    rows = {}
    for label, fast in (('plain', False), ('fast', True)):
        train_ips, train_peak, compile_s, precision = bench_train(args, device, fast)
        infer_ips, infer_peak = bench_infer(args, device, fast)
        rows[label] = dict(train=train_ips, train_peak=train_peak, infer=infer_ips, compile=compile_s,
                           precision=precision)
    if not args.skip_eval:
        from smmcl.data.synthetic import generate
        with tempfile.TemporaryDirectory() as data_dir:
            generate('LLRGBD', data_dir, n_train=1, n_test=args.eval_images, height=args.height,
                     width=args.width, seed=0)
            for label, fast in (('plain', False), ('fast', True)):
                rows[label]['eval'] = bench_eval(args, device, fast, data_dir)

    mem = 'peak GiB (GPU reserved)' if on_gpu else 'peak RSS GiB'
    header = f"{'path':<6} | {'dtype':<5} | {'train img/s':>11} | {'infer img/s':>11} | {'eval img/s':>10} | {mem:>20} | compile s"
    print(header)
    print('-' * len(header))
    for label, r in rows.items():
        print(f"{label:<6} | {r['precision']:<5} | {r['train']:>11.2f} | {r['infer']:>11.2f} | {r.get('eval', float('nan')):>10.2f} | "
              f"{r['train_peak']:>20.2f} | {r['compile']:.1f}")
    p, f = rows['plain'], rows['fast']
    print(f"speed-up: train x{f['train'] / p['train']:.2f}, inference x{f['infer'] / p['infer']:.2f}"
          + (f", evaluation x{f['eval'] / p['eval']:.2f}" if 'eval' in f else ''))


if __name__ == '__main__':
    main()
