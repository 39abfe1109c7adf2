"""Triton backend: the fused deconvnet step conv_transpose2d(relu(max_unpool2d(values, switches)), weight).

The same output-stationary implicit GEMM as conv_transpose.py (phases by oh % stride, K = input channels x
the phase's taps, no bias), except that the A operand is built on the fly from the pooled map: the unpooled
element at (ci, ih, iw) is the sum, in row-major order of the pooling windows covering (ih, iw), of the
pooled values whose switch points there (fp32 sums for half types, from +0.0), rectified if asked and
rounded to the dtype, exactly as reference.max_unpool2d. The unpooled map is never materialized; A tiles
that come out all zero skip their weight load and dot. Invalid switches are never followed (a covered
position's expected offset is the only value that matches) and are counted by a separate pass over the
switches, which raises like every backend.

NaN and inf propagate as in torch's dense composition, which multiplies every element of the unpooled map,
zeros included, by the weight, and nothing outside the map: so an all-zero tile is skipped only when the
weight is finite (else 0 * inf = NaN is part of the result), and rows outside the map (A loaded as 0) must
add nothing. As in conv_transpose.py the kernel is launched twice on a device-side flag (weight all finite),
the EXACT variant doing both; the programs of the launch that does not apply return at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ..ops._checks import Pair
from ._common import (
    INTERPRET,
    backend_op,
    bf16_to_float,
    check_device,
    check_window_fits_int32,
    float_to_bf16,
    is_tracing,
    raise_if_invalid,
    register_interpreted_fake,
    switch_counter,
    switch_target,
)
from .conv_transpose import (
    DOT_PRECISION,
    DTYPE_CODES,
    MAX_GRID_YZ,
    Tiles,
    check_int32_spans,
    conv_transpose_size,
    gemm_tiles,
    kernel_view,
    store_rounded,
    weight_is_finite,
)

COUNT_BLOCK = 1024  # switches per program of the invalid-switch count


@triton.jit
def _unpool_conv_transpose2d_kernel(
    v_ptr,
    s_ptr,
    w_ptr,
    out_ptr,
    finite_ptr,
    batch,
    in_channels,
    pooled_h,
    pooled_w,
    unpool_h,
    unpool_w,
    out_channels,
    out_h,
    out_w,
    kernel_h,
    kernel_w,
    v_sn,
    v_sc,
    v_sh,
    v_sw,
    s_sn,
    s_sc,
    s_sh,
    s_sw,
    w_si,
    w_so,
    w_sh,
    w_sw,
    pool_kernel_h,
    pool_kernel_w,
    pool_stride_h,
    pool_stride_w,
    pool_pad_h,
    pool_pad_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    RELU: tl.constexpr,
    FLAT: tl.constexpr,
    WINDOWS_H: tl.constexpr,
    WINDOWS_W: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
    EXACT: tl.constexpr,
    DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # finite_ptr: whether the weight is all finite. EXACT runs only when it is not, the plain GEMM when it is.
    if tl.load(finite_ptr) == EXACT:
        return
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)  # (phase_h, phase_w)
    phase_w = pid_z % stride_w
    phase_h = pid_z // stride_w
    rows = (out_h - phase_h + stride_h - 1) // stride_h  # output rows of this phase: phase_h + stride_h * j
    cols = (out_w - phase_w + stride_w - 1) // stride_w
    m_total = batch * rows * cols
    if pid_m * BLOCK_M >= m_total:  # the grid is sized for phase 0, the largest
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < m_total
    col = offs_m % cols
    row = (offs_m // cols) % rows
    image = (offs_m // (cols * rows)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < out_channels
    offs_k = tl.arange(0, BLOCK_K)
    v_image = v_ptr + image * v_sn
    s_image = s_ptr + image * s_sn
    v_k = offs_k[None, :] * v_sc
    s_k = offs_k[None, :] * s_sc
    w_tile = w_ptr + offs_n[None, :] * w_so + offs_k[:, None] * w_si
    n_mask = n_ok[None, :]
    # A window lower, the same position's offset in it is this much smaller.
    window_row_step = pool_stride_h * pool_kernel_w
    # First window covering i: max(ceil((i + pad - kernel + 1) / stride), 0) = max(i + shift, 0) // stride.
    first_shift_h = pool_pad_h - pool_kernel_h + pool_stride_h
    first_shift_w = pool_pad_w - pool_kernel_w + pool_stride_w

    if DTYPE == 1:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Dilation 1: the taps that hit a phase are every stride-th from (phase + pad) % stride.
    for kh in range((phase_h + pad_h) % stride_h, kernel_h, stride_h):
        ih = row + (phase_h + pad_h - kh) // stride_h  # exact division for a tap that hits
        # Windows ph_first .. ph_first + more_h cover row ih (none where ih or the pixel is out of range):
        # _common's first_window/last_window, inlined (a jit call costs the interpreter dearly).
        ph_first = tl.maximum(ih + first_shift_h, 0) // pool_stride_h
        more_h = tl.minimum((ih + pool_pad_h) // pool_stride_h, pooled_h - 1) - ph_first
        row_inside = m_ok & (ih >= 0) & (ih < unpool_h)
        more_h = tl.where(row_inside, more_h, -1)
        w_row = w_tile + kh * w_sh
        for kw in range((phase_w + pad_w) % stride_w, kernel_w, stride_w):
            iw = col + (phase_w + pad_w - kw) // stride_w
            pw_first = tl.maximum(iw + first_shift_w, 0) // pool_stride_w
            more_w = tl.minimum((iw + pool_pad_w) // pool_stride_w, pooled_w - 1) - pw_first
            more_w = tl.where((iw >= 0) & (iw < unpool_w), more_w, -1)
            # Window (ph_first + i, pw_first + j) covers (ih, iw) for i <= more_h, j <= more_w; there the
            # only switch pointing at (ih, iw) is its flat index, or its offset in that window, which is
            # `expected` less i * window_row_step + j * pool_stride_w: an equality decides.
            if FLAT:
                expected = (ih * unpool_w + iw).to(tl.int64)[:, None]
            else:
                expected = (
                    (ih - ph_first * pool_stride_h + pool_pad_h) * pool_kernel_w
                    + (iw - pw_first * pool_stride_w + pool_pad_w)
                )[:, None]
            s_tile = (s_image + ph_first * s_sh + pw_first * s_sw)[:, None] + s_k
            v_tile = (v_image + ph_first * v_sh + pw_first * v_sw)[:, None] + v_k
            b_ptrs = w_row + kw * w_sw
            for k0 in range(0, in_channels, BLOCK_K):
                if EVEN_K:
                    k_mask = None
                else:
                    k_mask = offs_k[None, :] < in_channels - k0
                if DTYPE == 1:
                    total = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float64)
                else:
                    total = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
                # The covering windows in row-major order: unpool's summation order. Adding the +0.0 of a
                # miss changes nothing (the sum starts at +0.0, so it is never -0.0). Pointers and the
                # expected offset step from window to window (cheaper than recomputing them).
                s_row, v_row, offset_row = s_tile, v_tile, expected
                for i in tl.static_range(WINDOWS_H):
                    s_win, v_win, offset = s_row, v_row, offset_row
                    for j in tl.static_range(WINDOWS_W):
                        window_ok = ((more_h >= i) & (more_w >= j))[:, None]
                        if not EVEN_K:
                            window_ok = window_ok & k_mask
                        switch = tl.load(s_win, mask=window_ok, other=0)
                        if FLAT:
                            hit = window_ok & (switch == offset)
                        else:
                            hit = window_ok & (switch.to(tl.int32) == offset)
                        value = tl.load(v_win, mask=hit, other=0)
                        if DTYPE == 3:  # widened inline (a jit call costs the interpreter dearly)
                            value = bf16_to_float(value)
                        elif DTYPE == 2:
                            value = value.to(tl.float32)
                        total += value
                        if j + 1 < WINDOWS_W:
                            s_win += s_sw
                            v_win += v_sw
                            if not FLAT:
                                offset -= pool_stride_w
                    if i + 1 < WINDOWS_H:
                        s_row += s_sh
                        v_row += v_sh
                        if not FLAT:
                            offset_row -= window_row_step
                if RELU:
                    total = tl.where(total < 0, 0.0, total)  # NaN passes, as torch.relu
                if DTYPE == 3:  # rounded to bf16 as unpool stores it, then exact in tf32
                    a = bf16_to_float(float_to_bf16(total))
                elif DTYPE == 2:
                    a = total.to(tl.float16)
                else:
                    a = total
                # Unpooled maps are sparse (a switch per window, then relu): all-zero tiles add nothing,
                # unless the weight holds an infinity or NaN (EXACT), which torch multiplies by those zeros.
                if SKIP_EMPTY and not EXACT:
                    nonzero = tl.max(tl.where(a != 0, 1, 0)) > 0
                else:
                    nonzero = True
                if nonzero:
                    if EVEN_K:
                        b = tl.load(b_ptrs, mask=n_mask, other=0)
                    else:
                        b = tl.load(b_ptrs, mask=(offs_k[:, None] < in_channels - k0) & n_mask, other=0)
                    if DTYPE == 3:
                        b = bf16_to_float(b)
                    if EXACT:  # rows outside the unpooled map add nothing (their 0 times inf would be NaN)
                        inside = (row_inside & (iw >= 0) & (iw < unpool_w))[:, None]
                        acc = tl.where(inside, tl.dot(a, b, acc, input_precision=PRECISION), acc)
                    else:
                        acc = tl.dot(a, b, acc, input_precision=PRECISION)
                s_tile += BLOCK_K * s_sc
                v_tile += BLOCK_K * v_sc
                b_ptrs += BLOCK_K * w_si

    out_row = phase_h + row * stride_h
    out_col = phase_w + col * stride_w
    out_ptrs = (
        out_ptr
        + image[:, None] * out_channels * out_h * out_w
        + (offs_n[None, :] * out_h + out_row[:, None]) * out_w
        + out_col[:, None]
    )
    store_rounded(out_ptrs, acc, m_ok[:, None] & n_ok[None, :], DTYPE)


@triton.jit
def _count_invalid_switches_kernel(
    s_ptr,
    count_ptr,
    total,
    channels,
    pooled_h,
    pooled_w,
    s_sn,
    s_sc,
    s_sh,
    s_sw,
    unpool_h,
    unpool_w,
    pool_kernel_h,
    pool_kernel_w,
    pool_stride_h,
    pool_stride_w,
    pool_pad_h,
    pool_pad_w,
    FLAT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    pw = (offs % pooled_w).to(tl.int32)
    rest = offs // pooled_w
    ph = (rest % pooled_h).to(tl.int32)
    rest = rest // pooled_h
    switch = tl.load(
        s_ptr + (rest // channels) * s_sn + (rest % channels) * s_sc + ph * s_sh + pw * s_sw, mask=mask
    )
    _, valid = switch_target(
        switch,
        ph,
        pw,
        unpool_h,
        unpool_w,
        pool_kernel_h,
        pool_kernel_w,
        pool_stride_h,
        pool_stride_w,
        pool_pad_h,
        pool_pad_w,
        FLAT,
    )
    tl.atomic_add(count_ptr, tl.sum((mask & ~valid).to(tl.int32)))


def fused_tiles(dtype: torch.dtype, m_size: int, n_size: int, k_size: int) -> Tiles:
    """gemm_tiles with at most 64 rows on GPUs: building A (a gather per covering window) takes registers."""
    tiles = gemm_tiles(dtype, m_size, n_size, k_size)
    return (
        tiles
        if INTERPRET
        else Tiles(min(tiles.block_m, 64), tiles.block_n, tiles.block_k, 4, tiles.num_stages)
    )


def launch_unpool_conv_transpose2d(
    values: Tensor,
    switches: Tensor,
    weight: Tensor,
    pool_kernel: Pair,
    pool_stride: Pair,
    pool_padding: Pair,
    unpool_size: Pair,
    stride: Pair,
    padding: Pair,
    output_padding: Pair,
    relu: bool,
    tiles: Tiles | None = None,
    skip_empty: bool = True,
) -> Tensor:
    """Allocate, count invalid switches (raising if any), launch; `tiles`/`skip_empty` are for tests."""
    check_device(values)
    batch, in_channels, pooled_h, pooled_w = values.shape
    _, out_channels, kernel_h, kernel_w = weight.shape
    out_h = conv_transpose_size(unpool_size[0], kernel_h, stride[0], padding[0], output_padding[0], 1)
    out_w = conv_transpose_size(unpool_size[1], kernel_w, stride[1], padding[1], output_padding[1], 1)
    out = torch.empty((batch, out_channels, out_h, out_w), dtype=values.dtype, device=values.device)
    check_window_fits_int32(pool_kernel, pool_stride, pool_padding)
    if values.numel() and not is_tracing(values):
        _count_invalid_switches(switches, pool_kernel, pool_stride, pool_padding, unpool_size)
    if out.numel() == 0:
        return out
    check_int32_spans(values=values, switches=switches, output=out, weight=weight.unsqueeze(0))
    pixels = batch * triton.cdiv(out_h, stride[0]) * triton.cdiv(out_w, stride[1])  # phase 0's, the most
    tiles = tiles or fused_tiles(values.dtype, pixels, out_channels, in_channels)
    grid = (
        triton.cdiv(pixels, tiles.block_m),
        triton.cdiv(out_channels, tiles.block_n),
        stride[0] * stride[1],
    )
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(
            f"the triton backend supports at most {MAX_GRID_YZ} of stride_h x stride_w (got {grid[2]}) and "
            f"of output channel tiles (got {grid[1]})"
        )
    code = DTYPE_CODES[values.dtype]
    v, w = kernel_view(values), kernel_view(weight)
    finite = weight_is_finite(weight)
    for exact in (False, True):  # one of the two runs, chosen on the device (see the module docstring)
        wrap_triton(_unpool_conv_transpose2d_kernel)[grid](
            v,
            switches,
            w,
            kernel_view(out),
            finite,
            batch,
            in_channels,
            pooled_h,
            pooled_w,
            *unpool_size,
            out_channels,
            out_h,
            out_w,
            kernel_h,
            kernel_w,
            *v.stride(),
            *switches.stride(),
            *w.stride(),
            *pool_kernel,
            *pool_stride,
            *pool_padding,
            *stride,
            *padding,
            RELU=relu,
            FLAT=switches.dtype == torch.int64,
            # windows covering one row, at most: ceil(kernel / stride), and no more than there are (a huge
            # window over a small map would unroll its size)
            WINDOWS_H=min(triton.cdiv(pool_kernel[0], pool_stride[0]), pooled_h),
            WINDOWS_W=min(triton.cdiv(pool_kernel[1], pool_stride[1]), pooled_w),
            SKIP_EMPTY=skip_empty,
            EXACT=exact,
            DTYPE=code,
            PRECISION=DOT_PRECISION[code],
            EVEN_K=in_channels % tiles.block_k == 0,  # no channel mask needed
            BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n,
            BLOCK_K=tiles.block_k,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )
    return out


def _count_invalid_switches(
    switches: Tensor, pool_kernel: Pair, pool_stride: Pair, pool_padding: Pair, unpool_size: Pair
) -> None:
    """One pass over the switches counting those outside their window or on padding; raises if any."""
    total = switches.numel()
    counter = switch_counter(switches.device, total)
    wrap_triton(_count_invalid_switches_kernel)[(triton.cdiv(total, COUNT_BLOCK),)](
        switches,
        counter,
        total,
        switches.shape[1],
        switches.shape[2],
        switches.shape[3],
        *switches.stride(),
        *unpool_size,
        *pool_kernel,
        *pool_stride,
        *pool_padding,
        FLAT=switches.dtype == torch.int64,
        BLOCK=COUNT_BLOCK,
    )
    raise_if_invalid(counter)


@backend_op("unpool_conv_transpose2d", mutates_args=())
def _unpool_conv_transpose2d_op(
    values: Tensor,
    switches: Tensor,
    weight: Tensor,
    pool_kernel_size: list[int],
    pool_stride: list[int],
    pool_padding: list[int],
    unpool_size: list[int],
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    relu: bool,
) -> Tensor:
    pair = lambda v: (v[0], v[1])  # the schema's lists as the launcher's tuples
    return launch_unpool_conv_transpose2d(
        values,
        switches,
        weight,
        pair(pool_kernel_size),
        pair(pool_stride),
        pair(pool_padding),
        pair(unpool_size),
        pair(stride),
        pair(padding),
        pair(output_padding),
        relu,
    )


def _unpool_conv_transpose2d_fake(
    values,
    switches,
    weight,
    pool_kernel_size,
    pool_stride,
    pool_padding,
    unpool_size,
    stride,
    padding,
    output_padding,
    relu,
):
    sizes = [
        conv_transpose_size(unpool_size[i], weight.shape[2 + i], stride[i], padding[i], output_padding[i], 1)
        for i in range(2)
    ]
    return values.new_empty((values.shape[0], weight.shape[1], *sizes))


register_interpreted_fake(_unpool_conv_transpose2d_op, _unpool_conv_transpose2d_fake)


def unpool_conv_transpose2d(
    values: Tensor,
    switches: Tensor,
    weight: Tensor,
    pool_kernel: Pair,
    pool_stride: Pair,
    pool_padding: Pair,
    unpool_size: Pair,
    stride: Pair,
    padding: Pair,
    output_padding: Pair,
    relu: bool,
) -> Tensor:
    """reference.unpool_conv_transpose2d without materializing the unpooled map: the unpooled values are
    bit-exact (sums in window order, relu, rounded to the dtype), the GEMM as conv_transpose2d's."""
    return torch.ops.zfkernels_triton.unpool_conv_transpose2d(
        values,
        switches,
        weight,
        list(pool_kernel),
        list(pool_stride),
        list(pool_padding),
        list(unpool_size),
        list(stride),
        list(padding),
        list(output_padding),
        relu,
    )
