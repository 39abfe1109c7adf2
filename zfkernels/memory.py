"""The CPU output cache: large outputs of the CPU kernels reuse memory that is already faulted in.

A fresh large CPU allocation is mmapped by the C library, and every page of it faults on first touch:
for a memory-bound kernel that costs about as much as the kernel. So outputs of 8 MiB and more come from
a cache of 2 MiB-page blocks; when torch frees such a tensor, its block goes back to the cache (up to
`limit` idle bytes: an eighth of physical memory, at most 4 GiB, by default, or `ZFK_CPU_CACHE_MB` MiB
from the environment at import; 0 turns the cache off). Like PyTorch's CUDA caching allocator, the idle
memory stays with the process until `empty_cache()`.
"""

from __future__ import annotations

from typing import TypedDict

from ._extension import cpu_error, cpu_module


class CacheInfo(TypedDict):
    in_use: int  # bytes held by live tensors
    peak_in_use: int  # high-water mark of in_use since reset_peak()
    idle: int  # bytes kept for reuse
    limit: int  # most idle bytes kept


def _module():
    if cpu_module is None:
        raise RuntimeError(f"the CPU output cache needs the compiled extension zfkernels._C ({cpu_error})")
    return cpu_module


def cache_info() -> CacheInfo:
    """Byte counts of the CPU output cache."""
    return CacheInfo(**_module().output_cache_stats())


def set_cache_limit(nbytes: int) -> None:
    """Keep at most `nbytes` idle (0 frees every block as soon as torch releases it)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
    _module().set_output_cache_limit(nbytes)


def empty_cache() -> None:
    """Return every idle block to the system (live tensors keep theirs)."""
    module = _module()
    limit = module.output_cache_stats()["limit"]
    module.set_output_cache_limit(0)
    module.set_output_cache_limit(limit)


def reset_peak() -> None:
    """Start a new high-water mark for `cache_info()["peak_in_use"]`."""
    _module().reset_output_cache_peak()


__all__ = ["CacheInfo", "cache_info", "empty_cache", "reset_peak", "set_cache_limit"]
