"""Loading of the compiled modules, and the codes the Python layer passes to them.

The package works without them (the "reference" backend); `python -m zfkernels.info` says why one is missing.
"""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType

import torch

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SWITCH_CODES = {torch.uint8: 0, torch.int16: 1, torch.int32: 2, torch.int64: 3}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(f"zfkernels.{name}"), None
    except ImportError as error:  # not built, or built for another Python
        return None, f"{type(error).__name__}: {error}"


cpu_module, cpu_error = _load("_C")
cuda_module, cuda_error = _load("_C_cuda")  # built when nvcc was found; runs only with a GPU

_cache_mib = os.environ.get("ZFK_CPU_CACHE_MB", "").strip()
if _cache_mib:
    if not _cache_mib.isdigit():
        raise ValueError(f"ZFK_CPU_CACHE_MB must be a non-negative integer (MiB), got {_cache_mib!r}")
    if cpu_module is not None:
        cpu_module.set_output_cache_limit(int(_cache_mib) << 20)


# Outputs at least this large come from the output cache; smaller ones are cheap for torch's allocator.
CACHED_OUTPUT_MIN_BYTES = 8 << 20


def output_empty(
    shape: tuple[int, ...] | torch.Size, like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """torch.empty for a CPU kernel's output. Large ones come from the extension's output cache: blocks
    already faulted in (a fresh large allocation faults every page on first touch, which costs as much as
    the kernel), returned to the cache when torch frees the tensor. See zfkernels.memory."""
    dtype = dtype or like.dtype
    nbytes = math.prod(shape) * dtype.itemsize
    if cpu_module is None or like.device.type != "cpu" or nbytes < CACHED_OUTPUT_MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=like.device)
    return torch.from_dlpack(cpu_module.cached_bytes(nbytes)).view(dtype).view(shape)
