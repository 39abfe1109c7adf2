"""Max-unpool with switches (gather form: no atomics on values) and its adjoint, gather_switches.

Unpool: each output element loops over the pooling windows that cover it, in row-major order, and adds the
values whose switch points at it: the sum reference.max_unpool2d's scatter_add_ makes, in the same order,
accumulated in float32 for half types (float64 for float64) and rounded once, after the optional ReLU.
Invalid switches are never followed (a position only takes a switch equal to its own offset in that
window); each program also validates one block of switches (switch_target) and adds the invalid ones to
an integer counter, with an atomic only when it found some: none in the common case.
The same kernel is max-pool's backward (see max_pool.py): its ReLU gate drops values whose pooled value
is <= 0 (NaN passes, as threshold_backward) in the same pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops._checks import Pair
from ._common import (
    INTERPRET,
    backend_op,
    bf16_to_float,
    check_device,
    check_plane_fits_int32,
    check_window_fits_int32,
    count_invalid,
    first_window,
    last_window,
    launch,
    narrow,
    needs_int64,
    pooled_coordinates,
    program_offsets,
    raise_if_invalid,
    register_interpreted_fake,
    switch_counter,
    switch_target,
)

NUM_WARPS = 4
# One element per thread on the GPU: a warp's switch and value loads then cover adjacent windows (a few
# sectors) instead of 4-element runs per thread spread over 128; the interpreter prefers few, large programs.
UNPOOL_BLOCK = 1024 if INTERPRET else 32 * NUM_WARPS
GATHER_BLOCK = 1024 if INTERPRET else 32 * NUM_WARPS
MAX_UNROLLED_WINDOWS = 16  # windows covering one position, unrolled; more (large stride-1 windows) loop


@triton.jit
def _unpool_kernel(
    values_ptr,
    switches_ptr,
    gate_ptr,
    out_ptr,
    invalid_ptr,
    numel,
    windows,
    pooled_h,
    pooled_w,
    out_h,
    out_w,
    KERNEL_H: tl.constexpr,
    KERNEL_W: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    WINDOWS_H: tl.constexpr,
    WINDOWS_W: tl.constexpr,
    FLAT: tl.constexpr,
    GATE: tl.constexpr,
    RELU: tl.constexpr,
    UNROLL: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = program_offsets(INT64, BLOCK)
    mask = offsets < numel
    out_plane = out_h * out_w
    plane = offsets // out_plane
    position = (offsets - plane * out_plane).to(tl.int32)
    ih = position // out_w
    iw = position - ih * out_w
    oh_first = first_window(ih, KERNEL_H, STRIDE_H, PAD_H)
    oh_span = tl.minimum(last_window(ih, STRIDE_H, PAD_H), pooled_h - 1) - oh_first
    ow_first = first_window(iw, KERNEL_W, STRIDE_W, PAD_W)
    ow_span = tl.minimum(last_window(iw, STRIDE_W, PAD_W), pooled_w - 1) - ow_first
    first_p = plane * (pooled_h * pooled_w) + oh_first * pooled_w + ow_first
    if FLAT:
        expected = position  # torch's flat index of this position
    else:  # this position's window-local offset in the first window covering it
        expected = (ih - (oh_first * STRIDE_H - PAD_H)) * KERNEL_W + (iw - (ow_first * STRIDE_W - PAD_W))
    compute_type: tl.constexpr = tl.float64 if values_ptr.dtype.element_ty == tl.float64 else tl.float32
    bf16: tl.constexpr = values_ptr.dtype.element_ty == tl.bfloat16
    acc = tl.zeros([BLOCK], dtype=compute_type)
    # windows in row-major order, the order the reference's scatter_add_ sums in; a factor equal to the
    # trip count unrolls the loop completely (the interpreter ignores it)
    for a in tl.range(WINDOWS_H, loop_unroll_factor=WINDOWS_H if UNROLL else 1):
        row_covers = mask & (a <= oh_span)
        row_p = first_p + a * pooled_w
        row_expected = expected if FLAT else expected - a * (STRIDE_H * KERNEL_W)
        for b in tl.range(WINDOWS_W, loop_unroll_factor=WINDOWS_W if UNROLL else 1):
            covers = row_covers & (b <= ow_span)
            p = row_p + b
            switch = tl.load(switches_ptr + p, mask=covers, other=0)
            if FLAT:  # this position's flat index: the same in every window
                hit = covers & (switch == row_expected)
            else:  # its offset in window b: STRIDE_W columns less than in the window before
                hit = covers & (switch.to(tl.int32) == row_expected - b * STRIDE_W)
            raw = tl.load(values_ptr + p, mask=hit, other=0)
            value = bf16_to_float(raw) if bf16 else raw.to(compute_type)  # no helper call: interpreter cost
            if GATE:  # max-pool backward's fused ReLU: the gradient passes where the pooled value is not <= 0
                gate = tl.load(gate_ptr + p, mask=hit, other=0)
                hit = hit & ~((bf16_to_float(gate) if bf16 else gate.to(compute_type)) <= 0)
            # +0.0 where nothing lands: the sum starts at +0.0 and never becomes -0.0, so it changes nothing
            acc += tl.where(hit, value, 0.0)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)
    tl.store(out_ptr + offsets, narrow(acc, out_ptr.dtype.element_ty), mask=mask)
    if tl.program_id(0) < tl.cdiv(windows, BLOCK):  # this program's block of switches, validated
        check = offsets < windows
        _, oh, ow = pooled_coordinates(offsets, pooled_h, pooled_w)
        switch = tl.load(switches_ptr + offsets, mask=check, other=0)
        _, valid = switch_target(
            switch, oh, ow, out_h, out_w, KERNEL_H, KERNEL_W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, FLAT
        )
        count_invalid(invalid_ptr, check, valid)


@triton.jit
def _gather_kernel(
    source_ptr,
    switches_ptr,
    out_ptr,
    invalid_ptr,
    numel,
    source_h,
    source_w,
    pooled_h,
    pooled_w,
    KERNEL_H: tl.constexpr,
    KERNEL_W: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    FLAT: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = program_offsets(INT64, BLOCK)
    mask = offsets < numel
    plane, oh, ow = pooled_coordinates(offsets, pooled_h, pooled_w)
    switch = tl.load(switches_ptr + offsets, mask=mask, other=0)
    target, valid = switch_target(
        switch, oh, ow, source_h, source_w, KERNEL_H, KERNEL_W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, FLAT
    )
    value = tl.load(source_ptr + plane * (source_h * source_w) + target, mask=mask & valid, other=0)
    tl.store(out_ptr + offsets, value, mask=mask)  # values only move: exact for every dtype, bf16 included
    count_invalid(invalid_ptr, mask, valid)


def unpool(
    values: Tensor,
    switches: Tensor,
    gate: Tensor | None,
    kernel: Pair,
    stride: Pair,
    padding: Pair,
    output_size: Pair,
    relu: bool,
) -> Tensor:
    """The gather-form unpool of `values`, ReLU-gated by `gate` when given; raises on invalid switches."""
    check_device(values)
    v, s = values.contiguous(), switches.contiguous()
    g = gate.contiguous() if gate is not None else v  # a placeholder pointer the kernel never reads
    n, c, pooled_h, pooled_w = v.shape
    out_h, out_w = output_size
    check_plane_fits_int32(out_h, out_w)
    check_window_fits_int32(kernel, stride, padding)
    out = torch.empty((n, c, out_h, out_w), dtype=v.dtype, device=v.device)
    invalid = switch_counter(v.device, s.numel())
    if out.numel():
        # windows covering one row: ceil(kernel / stride), and no more than there are (a window far wider
        # than the map would otherwise make every element loop over its size)
        windows_h = min(triton.cdiv(kernel[0], stride[0]), pooled_h)
        windows_w = min(triton.cdiv(kernel[1], stride[1]), pooled_w)
        # programs cover the output and, block for block, the switches they validate
        programs = triton.cdiv(max(out.numel(), s.numel()), UNPOOL_BLOCK)
        launch(_unpool_kernel)[(programs,)](
            v, s, g, out, invalid, out.numel(), s.numel(), pooled_h, pooled_w, out_h, out_w,
            *kernel, *stride, *padding, windows_h, windows_w,
            s.dtype == torch.int64, gate is not None, relu, windows_h * windows_w <= MAX_UNROLLED_WINDOWS,
            needs_int64(v, out), UNPOOL_BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    raise_if_invalid(invalid)
    return out


@backend_op("max_unpool2d", mutates_args=())
def _max_unpool2d_op(
    values: Tensor,
    switches: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    output_size: list[int],
    relu: bool,
) -> Tensor:
    return unpool(
        values,
        switches,
        None,
        (kernel_size[0], kernel_size[1]),
        (stride[0], stride[1]),
        (padding[0], padding[1]),
        (output_size[0], output_size[1]),
        relu,
    )


register_interpreted_fake(
    _max_unpool2d_op,
    lambda values, switches, kernel_size, stride, padding, output_size, relu: values.new_empty(
        (*values.shape[:2], output_size[0], output_size[1])
    ),
)


@backend_op("gather_switches", mutates_args=())
def _gather_switches_op(
    source: Tensor, switches: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]
) -> Tensor:
    check_device(source)
    src, s = source.contiguous(), switches.contiguous()
    source_h, source_w = src.shape[-2:]
    pooled_h, pooled_w = s.shape[-2:]
    check_plane_fits_int32(source_h, source_w)
    check_window_fits_int32(tuple(kernel_size), tuple(stride), tuple(padding))
    out = torch.empty(s.shape, dtype=src.dtype, device=src.device)
    invalid = switch_counter(src.device, s.numel())
    if out.numel():
        launch(_gather_kernel)[(triton.cdiv(out.numel(), GATHER_BLOCK),)](
            src, s, out, invalid, out.numel(), source_h, source_w, pooled_h, pooled_w,
            *kernel_size, *stride, *padding, s.dtype == torch.int64, needs_int64(src, s),
            GATHER_BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    raise_if_invalid(invalid)
    return out


register_interpreted_fake(
    _gather_switches_op,
    lambda source, switches, kernel_size, stride, padding: source.new_empty(switches.shape),
)


def max_unpool2d(
    values: Tensor, switches: Tensor, kernel: Pair, stride: Pair, padding: Pair, output_size: Pair, relu: bool
) -> Tensor:
    """reference.max_unpool2d: values summed at their switches in row-major window order, then ReLU."""
    return _max_unpool2d_op(
        values, switches, list(kernel), list(stride), list(padding), list(output_size), relu
    )


def gather_switches(source: Tensor, switches: Tensor, kernel: Pair, stride: Pair, padding: Pair) -> Tensor:
    """reference.gather_switches: `source` read at each switch (max_unpool2d's adjoint)."""
    return _gather_switches_op(source, switches, list(kernel), list(stride), list(padding))
