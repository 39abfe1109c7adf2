"""Zeiler & Fergus's filter renormalization, in place: one program per filter (a slice along dim 0).

As csrc/kernels/renormalize_filters.h: the sum of squares in float64 whatever the dtype, scale = radius / RMS
in float64 when RMS > radius (NaN compares false), applied in the compute type (float32 for half types) and
rounded once; a filter with scale 1 is not written at all, so it keeps its bits. A filter is read twice
(sum, then scale); the second read mostly hits L2 at conv filter sizes.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._common import backend_op, check_device, launch, narrow, needs_int64, register_interpreted_fake, widen

BLOCK = 1024  # filter elements per step
NUM_WARPS = 4


@triton.jit
def _renormalize_kernel(weight_ptr, size, radius: tl.float64, INT64: tl.constexpr, BLOCK: tl.constexpr):
    if INT64:
        base = weight_ptr + tl.program_id(0).to(tl.int64) * size
    else:
        base = weight_ptr + tl.program_id(0) * size
    columns = tl.arange(0, BLOCK)
    squares = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, size, BLOCK):
        offsets = start + columns
        v = widen(tl.load(base + offsets, mask=offsets < size, other=0)).to(tl.float64)
        squares += v * v
    rms = tl.sqrt(tl.sum(squares) / size)  # float64 / and sqrt are IEEE-rounded (div.rn.f64, sqrt.rn.f64)
    if rms > radius:
        scale = (radius / rms).to(tl.float64 if weight_ptr.dtype.element_ty == tl.float64 else tl.float32)
        for start in range(0, size, BLOCK):
            offsets = start + columns
            mask = offsets < size
            v = widen(tl.load(base + offsets, mask=mask, other=0))
            tl.store(base + offsets, narrow(v * scale, weight_ptr.dtype.element_ty), mask=mask)


@backend_op("renormalize_filters_", mutates_args=("weight",))
def _renormalize_filters_op(weight: Tensor, radius: float) -> None:
    check_device(weight)
    w = weight if weight.is_contiguous() else weight.contiguous()
    filters = w.shape[0]
    if filters and w.numel():
        size = w.numel() // filters
        launch(_renormalize_kernel)[(filters,)](
            w, size, float(radius), needs_int64(w), BLOCK, num_warps=NUM_WARPS
        )
    if w is not weight:
        weight.copy_(w)  # filters are rows of a contiguous copy: written back into the caller's layout


register_interpreted_fake(_renormalize_filters_op, lambda weight, radius: None)


def renormalize_filters_(weight: Tensor, radius: float) -> Tensor:
    """reference.renormalize_filters_: filters (dim 0) whose RMS exceeds `radius` rescaled to it, in place."""
    _renormalize_filters_op(weight, radius)
    return weight
