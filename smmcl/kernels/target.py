"""The GPU the kernels are launched for: what some launches' arguments and constexprs follow (the weight
gradients' partial counts, the band kernels' grid, the NMF products' precision). Imports nothing of the
package, so that the kernel modules and the package's ``runs_on`` can both ask it."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

# The GPU a process without one compiles the kernels for (``bench/gpu_check.py --precompile``): its
# multiprocessors and compute capability, ``(132, (9, 0))`` for an H100 or H200. CPU tensors then stand for
# that GPU's while the launches are handed over to be compiled (``triton_compile.compile_ahead``), the
# launches' arguments following its properties as on the GPU. None: CPU tensors are the interpreter's.
COMPILING_FOR: Optional[Tuple[int, Tuple[int, int]]] = None


def gpu_properties(device: torch.device) -> Optional[Tuple[int, Tuple[int, int]]]:
    """(multiprocessors, compute capability) of the GPU the kernels run on for ``device``'s tensors: the
    CUDA device's, :data:`COMPILING_FOR` for CPU tensors when set, else None (the interpreter)."""
    if device.type == 'cuda':
        return _cuda_properties(torch.cuda.current_device() if device.index is None else device.index)
    return COMPILING_FOR


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int) -> Tuple[int, Tuple[int, int]]:
    # asked at launches (the weight gradients' partials, the NMF's products): once per device, not per launch
    properties = torch.cuda.get_device_properties(index)
    return properties.multi_processor_count, (properties.major, properties.minor)
