"""Loading of the compiled modules, and the codes the Python layer passes to them.

The package works without them (the "reference" backend); `python -m zfkernels.info` says why one is missing.
"""

from __future__ import annotations

import importlib
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


def huge_page_empty(
    shape: tuple[int, ...] | torch.Size, like: torch.Tensor, dtype: torch.dtype | None = None
):
    """torch.empty for a large CPU output, backed by huge pages before its first touch (fewer page faults)."""
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    nbytes = out.numel() * out.element_size()
    if cpu_module is not None and out.device.type == "cpu" and nbytes >= (8 << 20):
        cpu_module.advise_huge_pages(out.data_ptr(), nbytes)
    return out
