"""The Triton kernels' machine code for a GPU, without the GPU: registers, spills and instructions per output.

    python bench/sass.py                  # sm_90 (H100/H200), bf16, MSCAN-B's stage-1 shapes at 480x640
    python bench/sass.py --arch 80 --only dwconv3x3_gelu

Every tile and row configuration the autotuner may pick (``smmcl/kernels``) is compiled ahead of time
for ``--arch`` (Triton's own ptxas, no device needed) with the specialisation Triton gives the real
launch (pointers aligned, integers divisible by 16 where they are, strides of 1 made constants), and its
SASS read back with the bundled ``cuobjdump``. The kernels are straight-line code (every loop is
unrolled), so the static counts are what each thread executes: per element written, the lane
instructions (all of them: the measured H200 profile says the tile kernels are bound by this, not by
DRAM), the global loads, and the multiply-adds. A configuration that spills (local memory) is marked.
This ranks the configurations before a device run spends time on them; the timings themselves come from
``bench/gpu_check.py`` (its kernels and sweep steps).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from smmcl.kernels import triton_bands as bands
from smmcl.kernels import triton_channel as channel
from smmcl.kernels import triton_matmul as matmul
from smmcl.kernels import triton_dwconv as tiles
from smmcl.kernels import triton_rows as rows


def _cases(c: int, h: int, w: int):
    """(name, tile kernel, row kernel, constexprs, output tensors, channels) at stage-1 sizes. Along W the
    row kernel walks the columns of a channels_last map (H and W swapped), as the launcher runs it; in
    NCHW it runs along the rows."""
    hidden = 4 * c
    conv = dict(TRANSPOSE=False, HAS_BIAS=True, EPILOGUE=0, IN_BIAS=False)
    strips = dict(K0=7, K1=11, K2=21, TRANSPOSE=False, HAS_BIAS=True)
    mlp = dict(KH=3, KW=3, TRANSPOSE=False, HAS_BIAS=True)  # fc1's bias added as the input is loaded
    return [
        ('dwconv5x5', tiles._dwconv_kernel, rows.dwconv_rows_kernel, dict(KH=5, KW=5, **conv), 1, c),
        ('dwconv5x5_adjoint', tiles._dwconv_kernel, rows.dwconv_rows_kernel,
         dict(KH=5, KW=5, TRANSPOSE=True, HAS_BIAS=False, EPILOGUE=0, IN_BIAS=False), 1, c),
        ('dwconv3x3_gelu', tiles._dwconv_kernel, rows.dwconv_rows_kernel, dict(EPILOGUE=1, IN_BIAS=True, **mlp), 1,
         hidden),
        ('dwconv3x3_gelu_grad', tiles._dwconv_kernel, rows.dwconv_rows_kernel, dict(EPILOGUE=2, IN_BIAS=True, **mlp),
         1, hidden),
        ('strip3_along_w', tiles._strip3_kernel, rows.strip3_rows_kernel, dict(ALONG_W=True, **strips), 3, c),
        ('strip3_along_h', tiles._strip3_kernel, rows.strip3_rows_kernel, dict(ALONG_W=False, **strips), 3, c),
        ('strip3_sum_along_w', tiles._strip3_sum_kernel, rows.strip3_sum_rows_kernel, dict(ALONG_W=True, **strips),
         1, c),
        ('strip3_sum_along_h', tiles._strip3_sum_kernel, rows.strip3_sum_rows_kernel,
         dict(ALONG_W=False, **strips), 1, c),
    ]


def _wgrad_cases(c: int, h: int, w: int):
    """(name, [(family, kernel, constexprs, loop repeats)], channels) of the weight gradients at stage-1
    sizes. Their programs loop over tiles at run time, so the count is the loop body's: per position of
    the map (for the strips, of all three), ``repeats`` times for the tap-by-tap kernel's per-tap loop."""
    strips = dict(K0=7, K1=11, K2=21)
    taps = dict(TAPS0=8, TAPS1=16, TAPS2=32)
    return [
        ('wgrad5x5', [('gather', tiles._dwconv_wgrad_kernel, dict(TAPS=32), 1),
                      ('taps', tiles._dwconv_wgrad_taps_kernel, {}, 25),
                      ('rows', rows.dwconv_wgrad_rows_kernel, dict(KH=5, KW=5), 1),
                      ('bands', bands.dwconv_wgrad_bands_kernel, dict(KH=5, KW=5, PARTS=1), 1)], c, dict(KH=5, KW=5)),
        ('wgrad3x3', [('gather', tiles._dwconv_wgrad_kernel, dict(TAPS=16), 1),
                      ('taps', tiles._dwconv_wgrad_taps_kernel, {}, 9),
                      ('rows', rows.dwconv_wgrad_rows_kernel, dict(KH=3, KW=3), 1),
                      ('bands', bands.dwconv_wgrad_bands_kernel, dict(KH=3, KW=3, PARTS=1), 1)], 4 * c,
         dict(KH=3, KW=3)),
        # the backward's pass that also sums the weight gradient: the attention's 5x5 adjoint (plus the gate's
        # gradient, as training runs it), the MLP's GELU gradient (fc1's bias added as the input is loaded)
        ('grad_wgrad5x5', [('fused', rows.grad_wgrad_rows_kernel,
                            dict(KH=5, KW=5, GELU=False, HAS_BIAS=False, IN_BIAS=False, ADDEND=True), 1)], c,
         dict(KH=5, KW=5)),
        ('gelu_grad_wgrad3x3', [('fused', rows.grad_wgrad_rows_kernel,
                                 dict(KH=3, KW=3, GELU=True, HAS_BIAS=True, IN_BIAS=True, ADDEND=False), 1)], 4 * c,
         dict(KH=3, KW=3)),
        ('strip3_wgrad_along_h', [('tiles', tiles._strip3_wgrad_kernel, dict(ALONG_W=False, **taps), 1),
                                  ('rows', rows.strip3_wgrad_rows_kernel, dict(ALONG_W=False, **strips), 1)],
         c, strips),
        # in channels_last the launcher runs the row kernel along H of the swapped map (as along_h's row)
        ('strip3_wgrad_along_w', [('tiles', tiles._strip3_wgrad_kernel, dict(ALONG_W=True, **taps), 1),
                                  ('rows', rows.strip3_wgrad_rows_kernel, dict(ALONG_W=True, **strips), 1),
                                  ('bands', bands.strip3_wgrad_bands_kernel, dict(ONE_INPUT=True, PARTS=1, **strips),
                                   1)],
         c, strips),
    ]


def _channel_cases():
    """(name, [(family, kernel, constexprs, loop repeats or None)], pointer dtypes) of the per-channel passes
    (:mod:`smmcl.kernels.triton_channel`), as the fast bf16 path runs them: the bias add on a bf16 conv
    output (alone, with proj_1's GELU, with conv3's gate) and its backward (the bias gradient's sums of a
    bf16 gradient, and with each epilogue's backward), the training block tails on the float32 residual
    stream and a bf16 branch with its conv's bias and drop path's mask, the MLP's and the attention's with
    its float32 shortcut, forward and backward (the backward passes loop over pixel blocks: counted per
    element of the loop body), the blocks' BatchNorm in training (the statistics' sums of the float32
    stream, the float32 output with its bf16 copy, and their backward's sums and apply, the copy's
    gradient bf16, the stream's from the shortcut added), the folded blocks' float32 stream and its bf16
    copy (with the branch's last bias), the cross-modal modulation's outputs from float32 maps and bf16
    coefficients, written in bf16 as the maps and as their concat (the encoder's stages 2-3), their
    backward from those three gradients (its loop over the channels, per element), its
    inputs' gradient sums (a float32 gradient, a bf16 concat's half, the pooled gradients) and its inputs'
    pass (a float32 map into the bf16 concat, with its channels' sums, maxima and their counts)."""
    add, grad = channel.bias_add_kernel, channel.bias_grad_kernel
    tail, tail_grad = channel.scaled_residual_kernel, channel.scaled_residual_grad_kernel
    sums, apply = channel.norm_sums_kernel, channel.norm_apply_kernel
    return [
        ('bias_add', [('triton', add, dict(EPILOGUE=0), None)], {}),
        ('bias_gelu', [('triton', add, dict(EPILOGUE=1), None)], {}),
        ('bias_gate', [('triton', add, dict(EPILOGUE=2), None)], {}),
        ('bias_grad', [('triton', grad, dict(EPILOGUE=0), 1)], dict(out_ptr='fp32')),
        ('bias_gelu_grad', [('triton', grad, dict(EPILOGUE=1), 1)], dict(out_ptr='fp32')),
        ('bias_gate_grad', [('triton', grad, dict(EPILOGUE=2), 1)], dict(out_ptr='fp32')),
        ('residual', [('triton', tail, dict(HAS_KEEP=True, HAS_BIAS=True, HAS_SHORTCUT=False, STATS=False), None)],
         dict(x_ptr='fp32', f_ptr='fp32', keep_ptr='fp32', bias_ptr='fp32', out_ptr='fp32')),
        ('residual_grad', [('triton', tail_grad, dict(HAS_KEEP=True, HAS_BIAS=True, HAS_SHORTCUT=False), 1)],
         dict(g_ptr='fp32', f_ptr='fp32', keep_ptr='fp32', bias_ptr='fp32', out_ptr='fp32',
              bias_out_ptr='fp32')),
        ('shortcut_residual', [('triton', tail, dict(HAS_KEEP=True, HAS_BIAS=True, HAS_SHORTCUT=True, STATS=False),
                                None)],
         dict(x_ptr='fp32', f_ptr='fp32', keep_ptr='fp32', bias_ptr='fp32', s_ptr='fp32', out_ptr='fp32',
              v_ptr='fp32')),
        # with the next BatchNorm's sums, as training runs both tails (its loop's body, per element)
        ('shortcut_residual_stats', [('triton', tail, dict(HAS_KEEP=True, HAS_BIAS=True, HAS_SHORTCUT=True,
                                                           STATS=True), 1)],
         dict(x_ptr='fp32', f_ptr='fp32', keep_ptr='fp32', bias_ptr='fp32', s_ptr='fp32', out_ptr='fp32',
              v_ptr='fp32', sums_ptr='fp32')),
        ('shortcut_residual_grad', [('triton', tail_grad, dict(HAS_KEEP=True, HAS_BIAS=True, HAS_SHORTCUT=True), 1)],
         dict(g_ptr='fp32', v_ptr='fp32', f_ptr='fp32', keep_ptr='fp32', bias_ptr='fp32', gs_ptr='fp32',
              out_ptr='fp32', bias_out_ptr='fp32')),
        ('norm_sums', [('triton', sums, dict(BACKWARD=False, HAS_G=False, HAS_H=False), 1)],
         dict(x_ptr='fp32', mean_ptr='fp32', out_ptr='fp32')),
        ('norm_apply', [('triton', apply, dict(HAS_G=False, HAS_H=False, HAS_E=False, HAS_LOW=True, HAS_FULL=True),
                         None)],
         dict(x_ptr='fp32', coef_ptr='fp32', full_ptr='fp32')),
        ('norm_grad_sums', [('triton', sums, dict(BACKWARD=True, HAS_G=True, HAS_H=True), 1)],
         dict(x_ptr='fp32', g_ptr='fp32', mean_ptr='fp32', out_ptr='fp32')),
        ('norm_grad_apply', [('triton', apply, dict(HAS_G=True, HAS_H=True, HAS_E=True, HAS_LOW=False, HAS_FULL=True),
                              None)],
         dict(x_ptr='fp32', g_ptr='fp32', e_ptr='fp32', coef_ptr='fp32', full_ptr='fp32')),
        ('residual_pair', [('triton', channel.residual_pair_kernel, dict(HAS_FACTOR=True, HAS_BIAS=True), None)],
         dict(b_ptr='fp32', f_ptr='fp32', bias_ptr='fp32', out_ptr='fp32')),
        ('modulation', [('triton', channel.modulation_kernel, dict(HAS_OUT=True, HAS_FUSE=True), None)],
         dict(r_ptr='fp32', x_ptr='fp32')),
        ('modulation_grad', [('triton', channel.modulation_grad_kernel, dict(HAS_A=True, HAS_B=True, HAS_F=True), 1)],
         dict(r_ptr='fp32', x_ptr='fp32', gr_ptr='fp32', gx_ptr='fp32', gc_ptr='fp32')),
        ('pooled_grad', [('triton', channel.pooled_grad_kernel, dict(HAS_PASS=True, HAS_HALF=True, HAS_POOLED=True),
                          None)],
         dict(gp_ptr='fp32', v_ptr='fp32', gm_ptr='fp32', mx_ptr='fp32', share_ptr='fp32', out_ptr='fp32')),
        ('pool_concat', [('triton', channel.pool_concat_kernel, {}, 1)], dict(v_ptr='fp32', out_ptr='fp32')),
    ]


def _matmul_cases(channels: int = 512, pixels: int = 60 * 80, rank: int = 64, batch: int = 8):
    """(name, integer arguments) of the NMF's large products (:mod:`smmcl.kernels.triton_matmul`) at MSCAN-B's
    decoder (512 channels, stride 8 of 480x640, rank 64) as the NMF writes them: ``x^T @ bases`` (x a
    transposed view), ``x @ coef`` (its 4,800-long reduction split four ways) and the reconstruction
    ``bases @ coef^T``. The strides of a B-M-K, B-K-N and (split) B-M-N float32 operand."""
    d, n, r = channels, pixels, rank

    def ints(m, cols, k, k_per_split, a, b, splits=1):
        out = (batch * m * cols if splits > 1 else 0, m * cols, cols, 1)
        return dict(M=m, N=cols, K=k, k_per_split=k_per_split, **dict(zip(('sab', 'sam', 'sak'), a)),
                    **dict(zip(('sbb', 'sbk', 'sbn'), b)), **dict(zip(('scs', 'scb', 'scm', 'scn'), out)))
    return [('bmm_xT_bases', ints(n, r, d, d, (d * n, 1, n), (d * r, r, 1))),
            ('bmm_x_coef', ints(d, r, n, n // 4, (d * n, n, 1), (n * r, r, 1), splits=4)),
            ('bmm_bases_coefT', ints(d, n, r, r, (d * r, r, 1), (n * r, 1, r)))]


def _jit(kernel):
    """The JITFunction under the autotuner (or ``kernel`` itself, launched with fixed sizes), and the
    autotuner's candidate configs."""
    return (kernel.fn, list(kernel.configs)) if isinstance(kernel, triton.runtime.Autotuner) else (kernel, [])


def _weight_arg(name: str) -> bool:
    return re.fullmatch(r'(?:[wb]|ib)\d?_ptr', name) is not None  # parameters stay float32 under autocast


def compile_config(kernel, meta: dict, config, ints: dict, arch: int, dtype: str = 'bf16', pointers=None):
    """The cubin of ``kernel`` (an autotuned Triton kernel) for one config, specialised as Triton's JIT
    would for these integer arguments: 1 becomes a constant, multiples of 16 get the divisibility hint.
    Pointers point to ``dtype`` (weights and biases to float32) unless ``pointers`` names another."""
    fn, _ = _jit(kernel)
    signature, attrs = {}, {}
    constexprs = {k: v for k, v in dict(meta, **config.kwargs).items() if k in fn.arg_names}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = 'constexpr'
        elif name.endswith('_ptr'):
            signature[name] = '*' + (pointers or {}).get(name, 'fp32' if _weight_arg(name) else dtype)
            attrs[(index,)] = [['tt.divisibility', 16]]
        elif isinstance(ints[name], float):
            signature[name] = 'fp32'
        elif ints[name] == 1:
            signature[name] = 'constexpr'
            constexprs[name] = 1
        else:
            signature[name] = 'i32'
            if ints[name] % 16 == 0:
                attrs[(index,)] = [['tt.divisibility', 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget('cuda', arch, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    return compiled.asm['cubin']


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', name)


def sass_stats(cubin: bytes) -> dict:
    """Registers, local (spill) bytes and the count of each SASS opcode of a one-kernel cubin (``ops``), and
    of each innermost loop's body (``loops``: a backward branch's range that holds no other)."""
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool('cuobjdump'), '-sass', f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_tool('cuobjdump'), '-res-usage', f.name], capture_output=True, text=True,
                               check=True).stdout
    code = []  # (address, opcode, operands)
    for line in sass.splitlines():
        match = re.match(r'\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(.*)', line)
        if match and match.group(2) != 'NOP':
            code.append((int(match.group(1), 16), match.group(2), match.group(3)))
    ranges = []
    for address, opcode, operands in code:
        target = re.search(r'0x([0-9a-f]+)', operands) if opcode == 'BRA' else None
        if target and int(target.group(1), 16) < address:
            ranges.append((int(target.group(1), 16), address))
    innermost = [r for r in ranges if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    loops = [collections.Counter(op for address, op, _ in code if start <= address <= end) for start, end in innermost]
    regs = re.search(r'REG:(\d+)', usage)
    local = re.search(r'LOCAL:(\d+)', usage)
    return dict(regs=int(regs.group(1)) if regs else -1, local=int(local.group(1)) if local else -1,
                ops=collections.Counter(op for _, op, _ in code), loops=loops)


def per_output(stats: dict, config, outputs_per_program: int, ops=None) -> dict:
    """Lane instructions, global loads (to registers or to shared memory) and FFMAs per element written
    (static counts x threads); ``ops``: other counts than the whole kernel's (a loop body's, for the
    outputs of one iteration)."""
    lanes = 32 * config.num_warps / outputs_per_program
    ops = stats['ops'] if ops is None else ops
    # LDGSTS: the asynchronous copies to shared memory of the tensor-core kernels' pipelined loops
    return dict(instructions=sum(ops.values()) * lanes, loads=(ops['LDG'] + ops['LDGSTS']) * lanes,
                ffma=(ops['FFMA'] + ops['HFMA2']) * lanes)


def _loop_ops(stats: dict, repeats: int) -> collections.Counter:
    """The counts a weight gradient spends per tile: its innermost loops' bodies (the strips' three jobs,
    one loop each), or ``repeats`` times the smallest (the tap-by-tap kernel: one loop per tap)."""
    if repeats > 1:
        body = min(stats['loops'], key=lambda ops: sum(ops.values()))
        return collections.Counter({op: count * repeats for op, count in body.items()})
    return sum(stats['loops'], collections.Counter())


def _elements(config, outputs: int) -> int:
    kw = config.kwargs
    return kw.get('BLOCK_C', 1) * kw.get('BLOCK_H', kw.get('ROWS', 1)) * kw.get('BLOCK_W', kw.get('BLOCK_P')) * outputs


def _ints(c: int, h: int, w: int, channels_last: bool) -> dict:
    """A map's sizes and strides; hn, hc, hw those of a concat of two such maps (the modulation's inputs'
    gradient pass reads one half), keep_scale the block tails' drop path scale of a kept image (a float
    argument)."""
    concat = dict(hn=2 * h * w * c, hc=1, hw=2 * c) if channels_last else dict(hn=2 * c * h * w, hc=h * w, hw=1)
    other = dict(N=8, C=c, H=h, W=w, keep_scale=1 / 0.9, **concat)
    if channels_last:
        return dict(other, sn=h * w * c, sc=1, sh=w * c, sw=c)
    return dict(other, sn=c * h * w, sc=h * w, sh=w, sw=1)


# the band kernels (NCHW, along W) of the forward strips and the backward's adjoint sum, as autocast runs
# them: bfloat16 maps, float32 taps in three bfloat16 parts; counted per tile of their loop
_BAND_KERNELS = {'strip3_along_w': bands.strip3_bands_kernel, 'strip3_sum_along_w': bands.strip3_sum_bands_kernel}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('--arch', type=int, default=90, help='compute capability x10 (90: H100/H200)')
    parser.add_argument('--only', default='', help='comma-separated cases, e.g. dwconv3x3_gelu')
    parser.add_argument('--channels', type=int, default=64, help="stage 1's width (MSCAN-B: 64)")
    parser.add_argument('--height', type=int, default=120, help='stage 1 at 480x640: 120x160')
    parser.add_argument('--width', type=int, default=160)
    parser.add_argument('--first', action='store_true', help="each family's first config per layout only")
    parser.add_argument('--largest', action='store_true',
                        help="each family's config with the most elements a thread per layout only (the likeliest to spill)")
    parser.add_argument('--family', default='', help='comma-separated families, e.g. rows')
    args = parser.parse_args(argv)
    if os.environ.get('TRITON_INTERPRET') == '1':
        sys.exit('bench/sass.py compiles the kernels: run it without TRITON_INTERPRET=1')
    only = set(filter(None, args.only.split(',')))
    results = []
    print(f'sm_{args.arch}, bf16 activations, stage 1 ({args.channels} channels, MLP {4 * args.channels}), '
          f'{args.height}x{args.width}; per element written: lane instructions, global loads, FMAs')
    print(f"{'case':<20} {'layout':<6} {'family':<6} {'config':<22} {'regs':>4} {'spill':>5} "
          f"{'instr':>7} {'loads':>6} {'fma':>6}")
    # (name, [(family, kernel, constexprs, loop repeats or None: straight-line)], outputs, channels, ints)
    cases = [(name, [('tiles', tile_kernel, meta, None), ('rows', row_kernel, meta, None)]
              + ([('bands', _BAND_KERNELS[name], dict(meta, PARTS=3), 1)] if name in _BAND_KERNELS else []),
              outputs, channels, {})
             for name, tile_kernel, row_kernel, meta, outputs, channels in _cases(args.channels, args.height,
                                                                                   args.width)]
    cases += [(name, families, 1, channels, dict(ints, N=8, num_chunks=33))
              for name, families, channels, ints in _wgrad_cases(args.channels, args.height, args.width)]
    cases += [(name, families, 1, args.channels, dict(N=8, num_chunks=33, chunks=33, pointers=pointers))
              for name, families, pointers in _channel_cases()]
    for name, families, outputs, channels, extra in cases:
        extra = dict(extra)
        pointers = extra.pop('pointers', None)
        if only and name not in only:
            continue
        for channels_last in (False, True):
            for family, kernel, meta, repeats in families:
                if family == 'bands' and channels_last:  # NCHW only
                    continue
                ints = dict(_ints(channels, args.height, args.width, channels_last), **extra)
                if family == 'rows' and meta.get('ALONG_W') and channels_last:  # as the launchers run it
                    ints = dict(ints, H=ints['W'], W=ints['H'], sh=ints['sw'], sw=ints['sh'])
                    meta = dict(meta, ALONG_W=False)
                _, configs = _jit(kernel)
                if args.family and family not in args.family.split(','):
                    continue
                wanted = [c for c in configs if (c.kwargs.get('BLOCK_C', 1) >= 16) == channels_last]
                wanted = wanted[:1] if args.first else wanted
                if args.largest:
                    wanted = [max(wanted, key=lambda c: _elements(c, 1) / c.num_warps)]
                for config in wanted:
                    try:
                        stats = sass_stats(compile_config(kernel, meta, config, ints, args.arch, pointers=pointers))
                    except Exception as err:  # noqa: BLE001 - report the config and go on
                        print(f'{name:<20} {"NHWC" if channels_last else "NCHW":<6} {family:<6} '
                              f'{_describe(config):<22} failed: {type(err).__name__}: {str(err)[:80]}')
                        continue
                    counts = None if repeats is None else _loop_ops(stats, repeats)
                    row = dict(case=name, layout='NHWC' if channels_last else 'NCHW', family=family,
                               config=_describe(config), regs=stats['regs'], spill=stats['local'],
                               **per_output(stats, config, _elements(config, outputs), counts))
                    results.append(row)
                    print(f"{row['case']:<20} {row['layout']:<6} {family:<6} {row['config']:<22} {row['regs']:>4} "
                          f"{row['spill']:>5} {row['instructions']:7.1f} {row['loads']:6.2f} {row['ffma']:6.2f}")
    cases = [(name, ints) for name, ints in _matmul_cases() if not only or name in only]
    if cases:
        print('\nNMF products (float32 operands, 3xTF32): per program, static counts')
        print(f"{'case':<20} {'config':<22} {'stages':>6} {'regs':>4} {'spill':>5} {'mma':>5} {'ffma':>5}")
    for name, ints in cases:
        for config in (matmul.MATMUL_CONFIGS[:1] if args.first else matmul.MATMUL_CONFIGS):
            cubin = compile_config(matmul.bmm_kernel, dict(PRECISION='tf32x3'), config, ints, args.arch,
                                   pointers=dict(a_ptr='fp32', b_ptr='fp32', c_ptr='fp32'))
            stats = sass_stats(cubin)
            row = dict(case=name, config=_describe(config), regs=stats['regs'], spill=stats['local'],
                       mma=stats['ops']['HGMMA'] + stats['ops']['HMMA'], ffma=stats['ops']['FFMA'])
            results.append(row)
            print(f"{name:<20} {row['config']:<22} {config.num_stages:>6} {row['regs']:>4} {row['spill']:>5} "
                  f"{row['mma']:>5} {row['ffma']:>5}")
    nmf = [case for case in _nmf_update_cases() if not only or case[0] in only]
    if nmf:
        print('\nNMF updates (float32): per element written; IEEE divisions a thread')
        print(f"{'case':<20} {'config':<22} {'regs':>4} {'spill':>5} {'instr':>7} {'loads':>6} {'ieee':>4}")
    for name, kernel, meta, ints, outputs in nmf:
        config = triton.Config(dict(BLOCK_ROWS=matmul.UPDATE_ROWS, BLOCK_COLS=64), num_warps=matmul.UPDATE_WARPS)
        stats = sass_stats(compile_config(kernel, meta, config, ints, args.arch, dtype='fp32'))
        lanes = 32 * config.num_warps / (matmul.UPDATE_ROWS * 64 * outputs)
        # FCHK: an IEEE division's check of its operands for the fast path, one per division a thread (an
        # approximate division has none)
        row = dict(case=name, config=_describe(config), regs=stats['regs'], spill=stats['local'],
                   instructions=sum(stats['ops'].values()) * lanes, loads=stats['ops']['LDG'] * lanes,
                   ieee_divisions=stats['ops']['FCHK'])
        results.append(row)
        print(f"{name:<20} {row['config']:<22} {row['regs']:>4} {row['spill']:>5} {row['instructions']:7.1f} "
              f"{row['loads']:6.2f} {row['ieee_divisions']:>4}")
    return results


def _nmf_update_cases(rows: int = 8 * 60 * 80, rank: int = 64):
    """(name, kernel, constexprs, integer and float arguments, outputs per element) of the NMF update's
    element-wise passes at MSCAN-B's coefficients (8 images at stride 8 of 480x640, rank 64): the forward
    keeping its denominator (training), the backward writing into a slot of the 14 factors stacked side by
    side (6 steps: 2T+2 uses of x)."""
    slot_stride = (2 * 6 + 2) * rank
    update = dict(rows=rows, cols=rank, s_factor=rank, s_numerator=rank, s_product=rank, eps=1e-6)
    grad = dict(rows=rows, cols=rank, s_grad=rank, s_denominator=rank, s_factor=rank, s_updated=rank,
                s_numerator=rank, s_grad_numerator=slot_stride)
    return [('nmf_update', matmul.nmf_update_kernel, dict(STORE_DENOMINATOR=True), update, 2),
            ('nmf_update_grad', matmul.nmf_update_grad_kernel, {}, grad, 3)]


def _describe(config) -> str:
    sizes = 'x'.join(str(v) for k, v in config.kwargs.items())
    return f'{sizes} w{config.num_warps}'


if __name__ == '__main__':
    main()
