"""Switch-recording max-pool (optionally fused with a preceding ReLU) and its backward.

Forward: one output element per lane, its window scanned in row-major order as csrc/kernels/max_pool.h
does: take when ``v > best or v is NaN`` (the first maximum wins, the last NaN wins), starting from -inf
with the switch on the window's first element inside the input. Small windows are unrolled; windows of
more than MAX_UNROLLED_WINDOW elements go by row segments of up to SEGMENT columns, each reduced at once
(its last NaN, else its first maximum when that beats the running best: the same winner as the scan),
and the winner's value is re-read at the end, so its exact bits (-0.0, NaN payload) are stored.
Backward: the gather-form unpool of the gradient, ReLU-gated by the pooled values in the same pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops._checks import Pair, pooled_size
from ..ops._checks import switch_dtype as narrowest_switch_dtype
from ._common import (
    INTERPRET,
    backend_op,
    bf16_to_float,
    check_device,
    check_plane_fits_int32,
    launch,
    needs_int64,
    pooled_coordinates,
    program_offsets,
    register_interpreted_fake,
    widen,
)
from .max_unpool import unpool

NUM_WARPS = 4
# One output per thread on the GPU, so a warp's load of one window element spans 32 adjacent windows (a few
# sectors) rather than 128 (4 per thread); the interpreter prefers few, large programs.
BLOCK = 1024 if INTERPRET else 32 * NUM_WARPS
MAX_UNROLLED_WINDOW = 64  # up to 8x8 windows are unrolled element by element
SEGMENT = 256  # columns of a wide window reduced at once
WIDE_TILE = 4096  # output elements x segment columns per program in the wide kernel


@triton.jit
def _window_origins(offsets, out_h, out_w, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H, PAD_W):
    """(plane, h0, w0): the plane of each output element and its window's unclipped top-left corner."""
    plane, oh, ow = pooled_coordinates(offsets, out_h, out_w)
    return plane, oh * STRIDE_H - PAD_H, ow * STRIDE_W - PAD_W


@triton.jit
def _pool_kernel(
    x_ptr,
    values_ptr,
    switches_ptr,
    numel,
    in_h,
    in_w,
    out_h,
    out_w,
    KERNEL_H: tl.constexpr,
    KERNEL_W: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    RELU: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Windows of at most MAX_UNROLLED_WINDOW elements, unrolled: the element-by-element scan."""
    offsets = program_offsets(INT64, BLOCK)
    mask = offsets < numel
    plane, h0, w0 = _window_origins(offsets, out_h, out_w, STRIDE_H, STRIDE_W, PAD_H, PAD_W)
    x_plane = x_ptr + plane * (in_h * in_w)
    compute_type: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    bf16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    best = tl.full([BLOCK], float("-inf"), compute_type)
    best_raw = tl.full([BLOCK], float("-inf"), compute_type).to(x_ptr.dtype.element_ty)  # stored bits
    # before any take, the switch is the window's first element inside the input (all -inf windows)
    best_switch = (tl.maximum(h0, 0) - h0) * KERNEL_W + (tl.maximum(w0, 0) - w0)
    for kh in tl.static_range(KERNEL_H):
        ih = h0 + kh
        row_ok = mask & (ih >= 0) & (ih < in_h)
        row = x_plane + ih * in_w
        for kw in tl.static_range(KERNEL_W):
            iw = w0 + kw
            ok = row_ok & (iw >= 0) & (iw < in_w)
            raw = tl.load(row + iw, mask=ok, other=0)
            v = bf16_to_float(raw) if bf16 else raw.to(compute_type)  # no helper call: interpreter cost
            if RELU:
                negative = v < 0
                v = tl.where(negative, 0.0, v)
                raw = tl.where(negative, 0.0, raw)  # +0.0 in the storage type
            take = ok & ((v > best) | (v != v))
            best = tl.where(take, v, best)
            best_raw = tl.where(take, raw, best_raw)
            best_switch = tl.where(take, kh * KERNEL_W + kw, best_switch)
    tl.store(values_ptr + offsets, best_raw, mask=mask)
    tl.store(switches_ptr + offsets, best_switch.to(switches_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pool_wide_kernel(
    x_ptr,
    values_ptr,
    switches_ptr,
    numel,
    in_h,
    in_w,
    out_h,
    out_w,
    KERNEL_H: tl.constexpr,
    KERNEL_W: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    RELU: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK: tl.constexpr,
    SEGMENT: tl.constexpr,
):
    """Large windows: row segments of SEGMENT columns, each a 2-D tile reduced along its columns."""
    offsets = program_offsets(INT64, BLOCK)
    mask = offsets < numel
    plane, h0, w0 = _window_origins(offsets, out_h, out_w, STRIDE_H, STRIDE_W, PAD_H, PAD_W)
    x_plane = x_ptr + plane * (in_h * in_w)
    compute_type: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    columns = tl.arange(0, SEGMENT)[None, :]
    best = tl.full([BLOCK], float("-inf"), compute_type)
    best_is_nan = tl.zeros([BLOCK], dtype=tl.int1)
    best_switch = (tl.maximum(h0, 0) - h0) * KERNEL_W + (tl.maximum(w0, 0) - w0)
    for kh in range(KERNEL_H):
        ih = h0 + kh
        row_ok = (mask & (ih >= 0) & (ih < in_h))[:, None]
        row = (x_plane + ih * in_w)[:, None]
        for start in range(0, KERNEL_W, SEGMENT):
            kw = start + columns
            iw = w0[:, None] + kw
            ok = row_ok & (kw < KERNEL_W) & (iw >= 0) & (iw < in_w)
            v = widen(tl.load(row + iw, mask=ok, other=0))
            if RELU:
                v = tl.where(v < 0, 0.0, v)
            nan = ok & (v != v)
            number = ok & (v == v)
            last_nan = tl.max(tl.where(nan, kw, -1), axis=1)
            top = tl.max(tl.where(number, v, float("-inf")), axis=1)
            first_top = tl.min(tl.where(number & (v == top[:, None]), kw, KERNEL_W), axis=1)
            take_nan = last_nan >= 0  # a NaN replaces any best, and the segment's last NaN wins
            take_top = ~take_nan & ~best_is_nan & (top > best)  # nothing but a NaN beats a NaN
            best = tl.where(take_top, top, best)
            best_is_nan = best_is_nan | take_nan
            best_switch = tl.where(
                take_nan, kh * KERNEL_W + last_nan, tl.where(take_top, kh * KERNEL_W + first_top, best_switch)
            )
    # re-read the winner: its own bits (a maximum compared equal to +-0.0 may be either zero)
    dh = best_switch // KERNEL_W
    raw = tl.load(x_plane + (h0 + dh) * in_w + (w0 + best_switch - dh * KERNEL_W), mask=mask, other=0)
    if RELU:
        raw = tl.where(widen(raw) < 0, 0.0, raw)
    tl.store(values_ptr + offsets, raw, mask=mask)
    tl.store(switches_ptr + offsets, best_switch.to(switches_ptr.dtype.element_ty), mask=mask)


@backend_op("max_pool2d_switches", mutates_args=())
def _max_pool2d_switches_op(
    input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], ceil_mode: bool, relu: bool
) -> tuple[Tensor, Tensor]:
    check_device(input)
    x = input.contiguous()
    n, c, in_h, in_w = x.shape
    kernel = (kernel_size[0], kernel_size[1])
    out_h = pooled_size(in_h, kernel[0], stride[0], padding[0], ceil_mode)
    out_w = pooled_size(in_w, kernel[1], stride[1], padding[1], ceil_mode)
    check_plane_fits_int32(in_h, in_w)
    values = torch.empty((n, c, out_h, out_w), dtype=x.dtype, device=x.device)
    switches = torch.empty((n, c, out_h, out_w), dtype=narrowest_switch_dtype(kernel), device=x.device)
    numel = values.numel()
    if numel:
        geometry = (numel, in_h, in_w, out_h, out_w, *kernel, *stride, *padding, relu, needs_int64(x))
        if kernel[0] * kernel[1] <= MAX_UNROLLED_WINDOW:
            launch(_pool_kernel)[(triton.cdiv(numel, BLOCK),)](
                x, values, switches, *geometry, BLOCK, num_warps=NUM_WARPS
            )
        else:
            segment = min(SEGMENT, triton.next_power_of_2(kernel[1]))
            block = WIDE_TILE // segment
            launch(_pool_wide_kernel)[(triton.cdiv(numel, block),)](
                x, values, switches, *geometry, block, segment, num_warps=NUM_WARPS
            )
    return values, switches


def _pool_fake(input, kernel_size, stride, padding, ceil_mode, relu):
    n, c, in_h, in_w = input.shape
    out_h = pooled_size(in_h, kernel_size[0], stride[0], padding[0], ceil_mode)
    out_w = pooled_size(in_w, kernel_size[1], stride[1], padding[1], ceil_mode)
    kernel = (kernel_size[0], kernel_size[1])
    switches = input.new_empty((n, c, out_h, out_w), dtype=narrowest_switch_dtype(kernel))
    return input.new_empty((n, c, out_h, out_w)), switches


register_interpreted_fake(_max_pool2d_switches_op, _pool_fake)


@backend_op("max_pool2d_switches_backward", mutates_args=())
def _max_pool2d_switches_backward_op(
    grad: Tensor,
    values: Tensor,
    switches: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    input_size: list[int],
    relu: bool,
) -> Tensor:
    return unpool(
        grad,
        switches,
        values if relu else None,
        (kernel_size[0], kernel_size[1]),
        (stride[0], stride[1]),
        (padding[0], padding[1]),
        (input_size[0], input_size[1]),
        False,
    )


register_interpreted_fake(
    _max_pool2d_switches_backward_op,
    lambda grad, values, switches, kernel_size, stride, padding, input_size, relu: grad.new_empty(
        (*grad.shape[:2], input_size[0], input_size[1])
    ),
)


def max_pool2d_switches(
    input: Tensor, kernel: Pair, stride: Pair, padding: Pair, ceil_mode: bool, relu: bool, switch_dtype
) -> tuple[Tensor, Tensor]:
    """reference.max_pool2d_switches: (values, window-local switches as `switch_dtype`)."""
    values, switches = _max_pool2d_switches_op(
        input, list(kernel), list(stride), list(padding), ceil_mode, relu
    )
    # the op records the narrowest type for the window (what zfkernels.ops asks for); others are converted
    return values, switches if switches.dtype == switch_dtype else switches.to(switch_dtype)


def max_pool2d_switches_backward(
    grad: Tensor,
    values: Tensor,
    switches: Tensor,
    kernel: Pair,
    stride: Pair,
    padding: Pair,
    input_size: Pair,
    relu: bool,
) -> Tensor:
    """reference.max_pool2d_switches_backward: the gradient unpooled, gated by the pooled values if `relu`."""
    return _max_pool2d_switches_backward_op(
        grad, values, switches, list(kernel), list(stride), list(padding), list(input_size), relu
    )
