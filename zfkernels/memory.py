"""The CPU output cache: large op outputs reuse torch storages whose pages are already faulted in.

A fresh large CPU allocation is mmapped by the C library, and every page of it faults on first touch: for a
memory-bound kernel that costs about as much as the kernel. So the CPU kernels take outputs of 8 MiB and
more from a pool of ordinary torch storages (`torch.empty(nbytes, dtype=torch.uint8)`): a tensor handed
out is an ordinary contiguous tensor over one whole storage (resize_, out=, set_, share_memory_, pickling
and numpy() work as on `torch.empty`). A storage is idle when nothing but the cache holds it (no tensor,
view, storage object or numpy array); an idle storage of exactly the requested size, still an ordinary
private resizable one, is handed out again.

Frees are noticed at the cache's next call (an allocation, `cache_info()`, `empty_cache()`), not when they
happen: torch tells nobody when a storage loses a user. At each call the cache keeps at most `limit` idle
bytes, dropping the least recently handed out storages first. `limit` is an eighth of physical memory, at
most 4 GiB, by default, or `ZFK_CPU_CACHE_MB` MiB from the environment at import; an output larger than
`limit` is a plain `torch.empty` (so 0 turns the cache off), and a limit above the machine's memory means no
limit. Like PyTorch's
CUDA caching allocator, idle memory stays with the process until `empty_cache()`.

The cache needs `torch._C._storage_Use_Count` (every CUDA build of torch; CPU-only builds from torch 2.8 on);
without it outputs are plain `torch.empty` and `cache_info()` reports zeros.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import operator
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import TypedDict

import torch

# Outputs at least this large come from the cache; smaller ones are cheap for torch's allocator.
CACHED_OUTPUT_MIN_BYTES = 8 << 20

_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
_PAGE = mmap.PAGESIZE
_libc_madvise = None


def _advise_huge_pages(address: int, nbytes: int) -> None:
    """Ask for transparent huge pages over a fresh allocation, before its first touch. Where THP is
    "madvise" (not "always"), reused outputs measured up to 15% slower on 4 KiB pages (TLB misses); the
    first touch also faults 2 MiB at a time. Best effort: any failure leaves ordinary pages."""
    global _libc_madvise
    if _MADV_HUGEPAGE is None:
        return
    try:
        if _libc_madvise is None:
            madvise = ctypes.CDLL(None, use_errno=True).madvise
            madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            madvise.restype = ctypes.c_int
            _libc_madvise = madvise
        start = address - address % _PAGE  # the allocator's header page is in the same mapping
        _libc_madvise(start, address + nbytes - start, _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass


_use_count = getattr(torch._C, "_storage_Use_Count", None)
_CPU = torch.device("cpu")


class CacheInfo(TypedDict):
    in_use: int  # bytes of cached storages held by someone besides the cache
    peak_in_use: int  # high-water mark of in_use (taken at each hand-out) since reset_peak()
    idle: int  # bytes kept for reuse
    limit: int  # most idle bytes kept


def _default_limit() -> int:
    """An eighth of physical memory, at most 4 GiB: room to keep a large repeated output (a 1.4 GB batch of
    image-sized projections) without holding much of a small machine."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        physical = 0
    if physical <= 0:
        physical = 8 << 30
    return min(physical // 8, 4 << 30)


def _limit_from_environment(default: int) -> int:
    """`ZFK_CPU_CACHE_MB` in bytes; a bad value warns, naming the variable, and keeps the default (an
    environment variable must never break `import zfkernels`)."""
    raw = os.environ.get("ZFK_CPU_CACHE_MB", "")
    text = raw.strip()
    if not text:
        return default
    if text.isascii() and text.isdigit():
        return int(text) << 20
    warnings.warn(
        f"ZFK_CPU_CACHE_MB must be a non-negative integer number of MiB, got {raw!r}; "
        f"using the default CPU output cache limit ({default >> 20} MiB)",
        RuntimeWarning,
        stacklevel=2,
    )
    return default


def _references(storages: Sequence[torch.UntypedStorage]) -> list[tuple[int, int]]:
    """(Python references, storage use count) of each storage. The cache's own references are measured
    once, by the same code on a storage that only a list holds (`_OutputCache.__init__`): a storage's
    Python object is shared by everyone who asks a tensor for it, so holding it does not raise the use
    count; holding a tensor, view or numpy array does."""
    return [(sys.getrefcount(storage), _use_count(storage._cdata)) for storage in storages]


class _OutputCache:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.peak_in_use = 0
        self._storages: list[torch.UntypedStorage] = []  # least recently handed out first
        self._bypass = 0
        self._lock = threading.RLock()
        self._busy = False  # set while the pool is scanned: a re-entrant call (a finalizer's op) bypasses it
        self._own_references = _references([torch.UntypedStorage(1)])[0] if _use_count is not None else None
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        # Another thread of the parent may have held the lock; it does not exist here. The storages stay
        # (private copy-on-write pages, each still held by the same tensors as in the parent).
        self._lock = threading.RLock()
        self._busy = False

    def empty(self, shape: Sequence[int], dtype: torch.dtype, nbytes: int) -> torch.Tensor:
        if self._own_references is None or self._bypass or nbytes > self.limit:
            return torch.empty(shape, dtype=dtype, device="cpu")
        with self._lock:
            if self._busy:  # this thread is inside a scan (a finalizer ran an op): stay out of the pool
                return torch.empty(shape, dtype=dtype, device="cpu")
            # Taken out of the pool until it is appended below, so a re-entrant call cannot hand it out.
            storage, in_use, _ = self._collect(self.limit, wanted=nbytes)
            if storage is None:  # after the trim, so dropped idle storages are released first
                storage = self._allocate(nbytes)
            self._storages.append(storage)
            self.peak_in_use = max(self.peak_in_use, in_use + nbytes)
            return torch.empty(0, dtype=dtype, device="cpu").set_(storage, 0, tuple(shape))

    def _allocate(self, nbytes: int) -> torch.UntypedStorage:
        try:
            storage = torch.empty(nbytes, dtype=torch.uint8, device="cpu").untyped_storage()
        except RuntimeError:  # out of memory: give back every idle storage and try once more
            self._collect(0)
            storage = torch.empty(nbytes, dtype=torch.uint8, device="cpu").untyped_storage()
        _advise_huge_pages(storage.data_ptr(), nbytes)
        return storage

    def _collect(self, keep_idle: int, wanted: int = 0) -> tuple[torch.UntypedStorage | None, int, int]:
        """Scan the pool (the lock held): take out the most recently handed out idle storage of exactly
        `wanted` bytes, if any; drop idle storages that are no longer ordinary private resizable ones, then
        the least recently handed out idle ones until at most `keep_idle` idle bytes remain.
        Returns (the storage taken out or None, bytes in use, idle bytes kept)."""
        self._busy = True
        try:
            return self._collect_busy(keep_idle, wanted)
        finally:
            self._busy = False

    def _collect_busy(self, keep_idle: int, wanted: int) -> tuple[torch.UntypedStorage | None, int, int]:
        own = self._own_references
        entries = []  # (storage, nbytes, idle), least recently handed out first
        for storage, references in zip(self._storages, _references(self._storages), strict=True):
            nbytes = storage.nbytes()
            if references != own:
                entries.append((storage, nbytes, False))
            # A numpy() export leaves a storage unresizable for good; share_memory_() may have given it to
            # another process, which can still write there.
            elif nbytes > 0 and storage.resizable() and not storage.is_shared():
                entries.append((storage, nbytes, True))
        taken = None
        if wanted:
            for index in range(len(entries) - 1, -1, -1):
                if entries[index][2] and entries[index][1] == wanted:
                    taken = index
                    break
        idle = sum(nbytes for index, (_, nbytes, is_idle) in enumerate(entries) if is_idle and index != taken)
        in_use, kept = 0, []
        for index, (storage, nbytes, is_idle) in enumerate(entries):
            if index == taken:
                continue
            if not is_idle:
                in_use += nbytes
            elif idle > keep_idle:
                idle -= nbytes
                continue
            kept.append(storage)
        self._storages = kept
        return (entries[taken][0] if taken is not None else None), in_use, idle

    def info(self) -> CacheInfo:
        if self._own_references is None:
            return CacheInfo(in_use=0, peak_in_use=0, idle=0, limit=self.limit)
        with self._lock:
            _, in_use, idle = self._collect(self.limit)
            self.peak_in_use = max(self.peak_in_use, in_use)
            return CacheInfo(in_use=in_use, peak_in_use=self.peak_in_use, idle=idle, limit=self.limit)

    def set_limit(self, nbytes: int) -> None:
        with self._lock:
            self.limit = nbytes
            self.release_idle(nbytes)

    def release_idle(self, keep: int = 0) -> None:
        with self._lock:
            if self._own_references is not None:
                self._collect(keep)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_in_use = self._collect(self.limit)[1] if self._own_references is not None else 0


_cache = _OutputCache(_limit_from_environment(_default_limit()))


def output_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor; large ones come from the cache."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < CACHED_OUTPUT_MIN_BYTES:
        return torch.empty(size=shape, dtype=dtype, device=_CPU)  # the fastest spelling (~2 us)
    return _cache.empty(shape, dtype, nbytes)


def cache_info() -> CacheInfo:
    """Byte counts of the CPU output cache, with the frees since its last call taken into account."""
    return _cache.info()


def set_cache_limit(nbytes: int) -> None:
    """Keep at most `nbytes` idle (0 turns the cache off; above the machine's memory means no limit)."""
    try:
        if isinstance(nbytes, bool):
            raise TypeError
        nbytes = operator.index(nbytes)
    except TypeError:
        kind = type(nbytes).__name__
        raise TypeError(f"nbytes must be a non-negative int, got {kind} {nbytes!r}") from None
    if nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
    _cache.set_limit(nbytes)


def empty_cache() -> None:
    """Release every idle storage (live tensors keep theirs)."""
    _cache.release_idle()


def reset_peak() -> None:
    """Start a new high-water mark for `cache_info()["peak_in_use"]` (at the bytes in use now)."""
    _cache.reset_peak()


@contextlib.contextmanager
def _bypassed() -> Iterator[None]:
    """Outputs made inside are plain torch.empty (for a memory profile that must see every allocation and
    free: a cached storage's reuse and release are invisible to torch's profiler)."""
    with _cache._lock:
        _cache._bypass += 1
    try:
        yield
    finally:
        with _cache._lock:
            _cache._bypass -= 1


__all__ = ["CacheInfo", "cache_info", "empty_cache", "reset_peak", "set_cache_limit"]
