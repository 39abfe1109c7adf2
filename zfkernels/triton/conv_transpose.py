"""Triton backend: conv_transpose2d as an output-stationary implicit GEMM (deterministic, no atomics).

out[n, co, oh, ow] = bias[co] + sum over (ci, kh, kw) of x[n, ci, ih, iw] * w[ci, co, kh, kw], where
ih = (oh + pad_h - kh * dil_h) / stride_h must be integral and inside the input (the same for columns).
Output pixels are split by phase (oh % stride_h, ow % stride_w): within a phase the taps that hit are the
same for every pixel and form an arithmetic progression, so the K loop visits exactly those taps and each
maps the phase's pixel grid onto a shifted input grid. One program computes a BLOCK_M x BLOCK_N tile:
M = pixels of one phase (image, row, column), N = output channels of one group, K = input channels of the
group x the phase's taps, bias fused. Runs under TRITON_INTERPRET=1 on CPU tensors (how CI tests it).

NaN and inf propagate as in torch, whose products are only those of real inputs and weights: a row of A
outside the input is loaded as 0, and 0 * inf in the dot would be NaN. So the kernel is launched twice
on a device-side flag (weight all finite, computed on the device: no host synchronization, and nothing
data-dependent for torch.compile to trace): the plain GEMM runs when the flag is set, the EXACT variant,
which keeps such rows out of the accumulator, when it is not; every program of the other launch returns
at once. The plain kernel keeps its registers and pipelining: the variant is a separate compilation.

bf16 travels as int16 bits (widened exactly, rounded to nearest even in integer math) so one code path runs
compiled and interpreted; unpool_conv_transpose.py shares the store and the host helpers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ..ops._checks import Pair
from ..ops.conv_transpose import conv_transpose_output_size as conv_transpose_size
from ._common import (
    INT32_LIMIT,
    INTERPRET,
    backend_op,
    bf16_to_float,
    check_device,
    float_to_bf16,
    register_interpreted_fake,
)

FP32, FP64, FP16, BF16 = 0, 1, 2, 3
DTYPE_CODES = {torch.float32: FP32, torch.float64: FP64, torch.float16: FP16, torch.bfloat16: BF16}
# Widened bf16 operands are exact in tf32, so a tf32 dot multiplies them exactly (tensor cores, fp32 sums);
# fp32 must not lose bits (tests hold it to 1e-4 of fp64), fp64 and fp16 ignore the setting.
DOT_PRECISION = {FP32: "ieee", FP64: "ieee", FP16: "ieee", BF16: "tf32"}
MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2


# ------------------------------------------------------------------------------------------ jit helpers
@triton.jit
def load_widened(ptrs, mask, DTYPE: tl.constexpr):
    """Load in the accumulate type: fp64 stays fp64, every other dtype becomes fp32 (exactly)."""
    if DTYPE == 3:
        return bf16_to_float(tl.load(ptrs, mask=mask, other=0))
    elif DTYPE == 2:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_rounded(ptrs, acc, mask, DTYPE: tl.constexpr):
    """Store the accumulator rounded once to the output dtype (bf16 as int16 bits)."""
    if DTYPE == 3:
        tl.store(ptrs, float_to_bf16(acc), mask=mask)
    elif DTYPE == 2:
        tl.store(ptrs, acc.to(tl.float16), mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


# --------------------------------------------------------------------------------------------- kernel
@triton.jit
def _conv_transpose2d_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    finite_ptr,
    batch,
    in_h,
    in_w,
    in_per_group,
    out_per_group,
    out_channels,
    out_h,
    out_w,
    kernel_h,
    kernel_w,
    x_sn,
    x_sc,
    x_sh,
    x_sw,
    w_si,
    w_so,
    w_sh,
    w_sw,
    b_s,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    tap_step_h,
    tap_step_w,
    HAS_BIAS: tl.constexpr,
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
    pid_z = tl.program_id(2)  # (group, phase_h, phase_w)
    phase_w = pid_z % stride_w
    phase_h = (pid_z // stride_w) % stride_h
    group = pid_z // (stride_w * stride_h)
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
    n_ok = offs_n < out_per_group
    offs_k = tl.arange(0, BLOCK_K)
    x_image = x_ptr + image * x_sn + group * in_per_group * x_sc
    x_k = offs_k[None, :] * x_sc
    w_tile = w_ptr + group * in_per_group * w_si + offs_n[None, :] * w_so + offs_k[:, None] * w_si
    n_mask = n_ok[None, :]

    if DTYPE == 1:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The taps that hit this phase: kh * dil_h = (phase_h + pad_h) mod stride_h, i.e. kh_first, kh_first +
    # tap_step_h, ... (tap_step = stride / gcd(stride, dilation)), so the first is below tap_step or there is
    # none (kernel_h). Searched inline: a jit call costs the interpreter more than this loop.
    kh_first = tl.zeros((), dtype=tl.int32) + kernel_h  # a tensor: kernel_h may be a constexpr 1
    for tap in range(0, tap_step_h):
        hit = ((tap * dil_h) % stride_h == (phase_h + pad_h) % stride_h) & (kh_first == kernel_h)
        kh_first = tl.where(hit, tap, kh_first)
    kw_first = tl.zeros((), dtype=tl.int32) + kernel_w
    for tap in range(0, tap_step_w):
        hit = ((tap * dil_w) % stride_w == (phase_w + pad_w) % stride_w) & (kw_first == kernel_w)
        kw_first = tl.where(hit, tap, kw_first)
    for kh in range(kh_first, kernel_h, tap_step_h):
        in_row = row + (phase_h + pad_h - kh * dil_h) // stride_h  # exact division for a tap that hits
        row_ok = m_ok & (in_row >= 0) & (in_row < in_h)
        x_row = x_image + in_row * x_sh
        w_row = w_tile + kh * w_sh
        for kw in range(kw_first, kernel_w, tap_step_w):
            in_col = col + (phase_w + pad_w - kw * dil_w) // stride_w
            a_mask = (row_ok & (in_col >= 0) & (in_col < in_w))[:, None]
            a_ptrs = (x_row + in_col * x_sw)[:, None] + x_k
            b_ptrs = w_row + kw * w_sw
            for k0 in range(0, in_per_group, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=a_mask, other=0)
                    b = tl.load(b_ptrs, mask=n_mask, other=0)
                else:
                    a = tl.load(a_ptrs, mask=a_mask & (offs_k[None, :] < in_per_group - k0), other=0)
                    b = tl.load(b_ptrs, mask=(offs_k[:, None] < in_per_group - k0) & n_mask, other=0)
                if DTYPE == 3:  # widened inline: a jit call costs the interpreter more than the dot
                    a = bf16_to_float(a)
                    b = bf16_to_float(b)
                if EXACT:  # rows outside the input add nothing (their 0 times an inf weight would be NaN)
                    acc = tl.where(a_mask, tl.dot(a, b, acc, input_precision=PRECISION), acc)
                else:
                    acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K * x_sc
                b_ptrs += BLOCK_K * w_si

    channel = group * out_per_group + offs_n
    if HAS_BIAS:
        acc += load_widened(b_ptr + channel * b_s, n_ok, DTYPE)[None, :]
    out_row = phase_h + row * stride_h
    out_col = phase_w + col * stride_w
    out_ptrs = (
        out_ptr
        + image[:, None] * out_channels * out_h * out_w
        + (channel[None, :] * out_h + out_row[:, None]) * out_w
        + out_col[:, None]
    )
    store_rounded(out_ptrs, acc, m_ok[:, None] & n_ok[None, :], DTYPE)


# ----------------------------------------------------------------------------------------------- host
@dataclass(frozen=True)
class Tiles:
    """Block sizes and launch options of one GEMM kernel launch (all powers of two, at least 16)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


def _pow2_between(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(value, 1))))


def gemm_tiles(dtype: torch.dtype, m_size: int, n_size: int, k_size: int) -> Tiles:
    """Heuristic tiles: N covers the channels up to 128, K chunks of 16 (fp64) to 64 (fp16) channels.

    Interpreted, every tl op costs a fixed overhead whatever its size: the fewest, largest programs win.
    """
    if INTERPRET:
        return Tiles(
            _pow2_between(m_size, 16, 1024), _pow2_between(n_size, 16, 128), _pow2_between(k_size, 16, 64)
        )
    block_n = _pow2_between(n_size, 16, 64 if dtype == torch.float64 else 128)
    k_cap = {torch.float64: 16, torch.float16: 64}.get(dtype, 32)
    block_k = _pow2_between(k_size, 16, k_cap)
    block_m = 64 if block_n >= 128 or dtype == torch.float64 else 128
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return Tiles(block_m, block_n, block_k, num_warps, 3 if dtype != torch.float64 else 2)


def weight_is_finite(weight: Tensor) -> Tensor:
    """A 0-dim bool on the weight's device: no NaN or inf in it (computed there, never read on the host)."""
    return torch.isfinite(weight).all()


def kernel_view(tensor: Tensor) -> Tensor:
    """bf16 goes to the kernels as int16 bits (numpy, hence the interpreter, has no bf16)."""
    return tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor


def check_int32_spans(**tensors: Tensor) -> None:
    """Kernels index within one image (and the whole weight) in int32, batches in int64: refuse the rest."""
    for name, t in tensors.items():
        span = sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
        if t.numel() and span > INT32_LIMIT:
            raise ValueError(
                f"triton backend: one image of {name} spans {span + 1} elements, over int32 indexing"
            )


def launch_conv_transpose2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Pair,
    padding: Pair,
    output_padding: Pair,
    groups: int,
    dilation: Pair,
    tiles: Tiles | None = None,
) -> Tensor:
    """Allocate the output and launch the kernel; `tiles` overrides the heuristic (tests force small ones)."""
    batch, in_channels, in_h, in_w = input.shape
    _, out_per_group, kernel_h, kernel_w = weight.shape
    in_per_group = in_channels // groups
    out_h = conv_transpose_size(in_h, kernel_h, stride[0], padding[0], output_padding[0], dilation[0])
    out_w = conv_transpose_size(in_w, kernel_w, stride[1], padding[1], output_padding[1], dilation[1])
    out = torch.empty((batch, out_per_group * groups, out_h, out_w), dtype=input.dtype, device=input.device)
    check_device(input)
    if out.numel() == 0:
        return out
    check_int32_spans(input=input, output=out, weight=weight.unsqueeze(0))
    phases = groups * stride[0] * stride[1]
    pixels = batch * triton.cdiv(out_h, stride[0]) * triton.cdiv(out_w, stride[1])  # phase 0's, the most
    tiles = tiles or gemm_tiles(input.dtype, pixels, out_per_group, in_per_group)
    grid = (triton.cdiv(pixels, tiles.block_m), triton.cdiv(out_per_group, tiles.block_n), phases)
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(
            f"the triton backend supports at most {MAX_GRID_YZ} of groups x stride_h x stride_w "
            f"(got {phases}) and of output channel tiles per group (got {grid[1]})"
        )
    code = DTYPE_CODES[input.dtype]
    x, w = kernel_view(input), kernel_view(weight)
    b = kernel_view(bias) if bias is not None else w  # never read without HAS_BIAS
    finite = weight_is_finite(weight)
    for exact in (False, True):  # one of the two runs, chosen on the device (see the module docstring)
        wrap_triton(_conv_transpose2d_kernel)[grid](
            x,
            w,
            b,
            kernel_view(out),
            finite,
            batch,
            in_h,
            in_w,
            in_per_group,
            out_per_group,
            out_per_group * groups,
            out_h,
            out_w,
            kernel_h,
            kernel_w,
            *x.stride(),
            *w.stride(),
            b.stride(0),
            *stride,
            *padding,
            *dilation,
            stride[0] // math.gcd(stride[0], dilation[0]),
            stride[1] // math.gcd(stride[1], dilation[1]),
            HAS_BIAS=bias is not None,
            EXACT=exact,
            DTYPE=code,
            PRECISION=DOT_PRECISION[code],
            EVEN_K=in_per_group % tiles.block_k == 0,  # no channel mask needed
            BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n,
            BLOCK_K=tiles.block_k,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )
    return out


@backend_op("conv_transpose2d", mutates_args=())
def _conv_transpose2d_op(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    groups: int,
    dilation: list[int],
) -> Tensor:
    return launch_conv_transpose2d(
        input,
        weight,
        bias,
        (stride[0], stride[1]),
        (padding[0], padding[1]),
        (output_padding[0], output_padding[1]),
        groups,
        (dilation[0], dilation[1]),
    )


def _conv_transpose2d_fake(input, weight, bias, stride, padding, output_padding, groups, dilation):
    sizes = [
        conv_transpose_size(
            input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], output_padding[i], dilation[i]
        )
        for i in range(2)
    ]
    return input.new_empty((input.shape[0], weight.shape[1] * groups, *sizes))


register_interpreted_fake(_conv_transpose2d_op, _conv_transpose2d_fake)


def conv_transpose2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Pair,
    padding: Pair,
    output_padding: Pair,
    groups: int,
    dilation: Pair,
) -> Tensor:
    """reference.conv_transpose2d on the Triton kernel: fp32 with IEEE products and sums, fp64 in fp64,
    fp16/bf16 with fp32 sums rounded once; any input strides, contiguous NCHW output."""
    return torch.ops.zfkernels_triton.conv_transpose2d(
        input, weight, bias, list(stride), list(padding), list(output_padding), groups, list(dilation)
    )
