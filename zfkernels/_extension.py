"""Loading of the compiled modules, and the codes the Python layer passes to them.

The package works without them (the "reference" backend); `python -m zfkernels.info` says why one is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from . import memory
from .memory import CACHED_OUTPUT_MIN_BYTES  # noqa: F401  (where tests and tools look for it)

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SWITCH_CODES = {torch.uint8: 0, torch.int16: 1, torch.int32: 2, torch.int64: 3}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(f"zfkernels.{name}"), None
    except ImportError as error:  # not built, or built for another Python
        return None, f"{type(error).__name__}: {error}"


cpu_module, cpu_error = _load("_C")
cuda_module, cuda_error = _load("_C_cuda")  # built when nvcc was found; runs only with a GPU


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of ``tensor`` is finite: on the CPU one pass of the extension's kernel (no bool
    tensor of the input's size, no thread start), elsewhere torch's."""
    if cpu_module is not None and tensor.device.type == "cpu" and tensor.dtype in DTYPE_CODES:
        t = tensor.contiguous()  # held in a name: the kernel reads its buffer
        return bool(cpu_module.all_finite(t.data_ptr(), DTYPE_CODES[t.dtype], t.numel()))
    return bool(torch.isfinite(tensor).all())


def output_empty(
    shape: tuple[int, ...] | torch.Size, like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """torch.empty(shape) for a kernel's output, on `like`'s device, of `dtype` (default: `like`'s).
    Large CPU outputs come from the output cache (zfkernels.memory): ordinary torch storages already
    faulted in (a fresh large allocation faults every page on first touch, which costs as much as the
    kernel), reused once nothing else holds them."""
    if like.device.type != "cpu":
        return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return memory.output_empty(shape, dtype or like.dtype)
