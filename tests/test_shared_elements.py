"""The CUDA kernels' formulations, run on the CPU through the same csrc/kernels code the GPU runs.

The CUDA backend cannot run without a GPU, so zfkernels._C exposes CPU runs of what its kernels do where the
CPU kernels work differently: the unpool gather (kernels/max_unpool.h, one output element at a time, plus
the per-switch validation), and the tiled transposed convolution (kernels/conv_transpose_tiled.h, emulated
thread by thread between barriers) with its dense and its unpooled-on-the-fly inputs, and its per-element
fallback. They are checked here against zfkernels.ops.reference: bit for bit where the contract is exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FLOAT_DTYPES,
    POOL_CONFIGS,
    assert_bitwise_equal,
    assert_close_verbose,
    invalid_switch_cases,
    make_input,
    max_abs_error,
    tied,
)
from test_conv_transpose import (
    NONFINITE_OUT_CHANNELS,
    assert_same_nonfinite,
    exact_conv_transpose2d,
    nonfinite_conv_case,
    nonfinite_tolerance,
)
from test_unpool_conv_transpose import fused_reference, nonfinite_fused_case

import zfkernels as zk
from zfkernels._extension import DTYPE_CODES, SWITCH_CODES, cpu_module
from zfkernels.ops import reference
from zfkernels.ops._checks import pool_params, pooled_size, switch_dtype

pytestmark = [
    pytest.mark.skipif(cpu_module is None, reason="the C++ extension zfkernels._C is not built"),
    pytest.mark.usefixtures("single_thread"),
]

DTYPE_IDS = lambda d: str(d).split(".")[-1]


def _geometry(kernel_size, stride, padding, ceil_mode, size):
    kernel, stride, pad = pool_params(kernel_size, stride, padding)
    out = tuple(pooled_size(size[i], kernel[i], stride[i], pad[i], ceil_mode) for i in range(2))
    return kernel, stride, pad, out


# ------------------------------------------------------------------------------------ unpool gather
def unpool_gather(values, switches, gate, kernel, stride, padding, output_size, relu):
    """csrc/cpu/max_unpool.cpp max_unpool2d_gather: (output, invalid switch count)."""
    n, c = values.shape[:2]
    out = torch.full((n, c, *output_size), float("nan"), dtype=values.dtype)  # every element must be written
    invalid = cpu_module.max_unpool2d_gather(
        values.data_ptr(),
        switches.data_ptr(),
        0 if gate is None else gate.data_ptr(),
        out.data_ptr(),
        DTYPE_CODES[values.dtype],
        SWITCH_CODES[switches.dtype],
        n * c,
        (*output_size, *values.shape[-2:]),
        (*kernel, *stride, *padding),
        relu,
        1,
    )
    return out, invalid


@pytest.mark.parametrize("use_indices", [False, True], ids=["switches", "indices"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["distinct", "ties", "zeros", "nan", "neg_inf"])
@pytest.mark.parametrize("kernel_size, stride, padding, ceil_mode, size", POOL_CONFIGS)
def test_unpool_gather_matches_reference(
    gen, kernel_size, stride, padding, ceil_mode, size, kind, dtype, use_indices
):
    kernel, stride, pad, _ = _geometry(kernel_size, stride, padding, ceil_mode, size)
    x = make_input(kind, (2, 3, *size), dtype, gen)
    values, switches = reference.max_pool2d_switches(
        x, kernel, stride, pad, ceil_mode, True, switch_dtype(kernel)
    )
    if use_indices:
        switches = zk.switches_to_indices(switches, size, kernel, stride, pad)
    signed = tied(values.shape, dtype, gen)  # shared argmaxes can sum below zero: relu matters
    for source in (values, signed):
        for relu in (False, True):
            got, invalid = unpool_gather(source, switches, None, kernel, stride, pad, size, relu)
            expected = reference.max_unpool2d(source, switches, kernel, stride, pad, size, relu)
            assert invalid == 0
            assert_bitwise_equal(got, expected, f"unpool (relu={relu})")
    # max-pool's backward with the ReLU fused: the gradient gated by the pooled values, in the same pass
    grad = tied(values.shape, dtype, gen)
    got, invalid = unpool_gather(grad, switches, values, kernel, stride, pad, size, False)
    expected = reference.max_pool2d_switches_backward(grad, values, switches, kernel, stride, pad, size, True)
    assert invalid == 0
    assert_bitwise_equal(got, expected, "gated unpool (pool backward)")


def test_unpool_gather_sums_shared_argmaxes_in_window_order():
    # Four 3x3/2 windows share the argmax (2, 2); fp16 values whose running fp32 sum differs from any
    # pairwise or fp16 sum: 2048 + 1 + 1 - 2048 is 2 in fp32 (exact) but 0 if rounded to fp16 on the way.
    x = torch.zeros(1, 1, 5, 5, dtype=torch.float16)
    x[..., 2, 2] = 1.0
    _, switches = reference.max_pool2d_switches(x, (3, 3), (2, 2), (0, 0), False, False, torch.uint8)
    values = torch.tensor([[[[2048.0, 1.0], [1.0, -2048.0]]]], dtype=torch.float16)
    got, _ = unpool_gather(values, switches, None, (3, 3), (2, 2), (0, 0), (5, 5), False)
    assert got[0, 0, 2, 2].item() == 2.0 and got.count_nonzero().item() == 1


@pytest.mark.parametrize("case", list(invalid_switch_cases()))
def test_unpool_gather_counts_and_skips_invalid_switches(case):
    values, switches, kernel_size, stride, padding, output_size = invalid_switch_cases()[case]
    kernel, stride, pad = pool_params(kernel_size, stride, padding)
    flat, valid = reference.switch_targets(switches, output_size, kernel, stride, pad)
    got, invalid = unpool_gather(values, switches, None, kernel, stride, pad, output_size, False)
    assert invalid == int((~valid).sum()) > 0
    # The valid switches' sums; an invalid one adds nothing (+0 at index 0 changes no sum, which is never -0).
    expected = torch.zeros(*values.shape[:2], output_size[0] * output_size[1], dtype=values.dtype)
    expected.scatter_add_(2, flat.where(valid, 0).flatten(2), values.where(valid, 0).flatten(2))
    assert_bitwise_equal(got, expected.view_as(got), "valid switches only")


# -------------------------------------------------------------------------- tiled transposed convolution
def conv_tiled(x, w, b, stride, padding, output_padding, groups, dilation, force_elements=False):
    """csrc/cpu/conv_transpose.cpp conv_transpose2d_tiled: (output, whether the tiled algorithm ran)."""
    n, c_in, h, width = x.shape
    _, out_per_group, k_h, k_w = w.shape
    out_h = (h - 1) * stride[0] - 2 * padding[0] + dilation[0] * (k_h - 1) + output_padding[0] + 1
    out_w = (width - 1) * stride[1] - 2 * padding[1] + dilation[1] * (k_w - 1) + output_padding[1] + 1
    out = torch.full((n, out_per_group * groups, out_h, out_w), float("nan"), dtype=x.dtype)
    tiled = cpu_module.conv_transpose2d_tiled(
        x.data_ptr(),
        w.data_ptr(),
        0 if b is None else b.data_ptr(),
        out.data_ptr(),
        DTYPE_CODES[x.dtype],
        n,
        c_in,
        out_per_group * groups,
        groups,
        (h, width, out_h, out_w),
        (k_h, k_w, *stride, *padding, *dilation),
        force_elements,
        1,
    )
    return out, tiled


def check_against_fp64(out, expected64, reference_low, label):
    """fp64/fp32 allclose to the fp64 result; fp16/bf16 within twice torch's own error (`reference_low`)."""
    scale = max(1.0, expected64.abs().max().item()) if expected64.numel() else 1.0
    if out.dtype == torch.float64:
        assert_close_verbose(out, expected64, rtol=1e-10, atol=1e-10 * scale, label=label)
    elif out.dtype == torch.float32:
        assert_close_verbose(out, expected64.float(), rtol=1e-4, atol=1e-5 * scale, label=label)
    else:
        ours, torchs = max_abs_error(out, expected64), max_abs_error(reference_low, expected64)
        assert ours <= 2 * torchs + 1e-5, f"{label} {out.dtype}: error {ours} > 2 x torch's {torchs}"


# (input shape, weight shape, stride, padding, output_padding, groups, dilation): the geometries of
# tests/test_conv_transpose.py, plus shapes that take several spatial tiles, input-channel stages and
# output-channel blocks.
CONV_CONFIGS = [
    pytest.param((2, 4, 6, 6), (4, 3, 7, 7), (2, 2), (1, 1), (1, 1), 1, (1, 1), id="zfnet_conv1_7x7s2p1op1"),
    pytest.param((2, 4, 5, 5), (4, 3, 3, 3), (2, 2), (1, 1), (0, 0), 2, (1, 1), id="groups2_stride2"),
    pytest.param((2, 6, 4, 4), (6, 1, 3, 3), (1, 1), (1, 1), (0, 0), 3, (1, 2), id="depthwise_dilation1x2"),
    pytest.param((2, 3, 6, 5), (3, 2, 3, 3), (1, 1), (0, 0), (0, 0), 1, (2, 2), id="dilation2_stride1"),
    pytest.param(
        (1, 2, 5, 4), (2, 3, 3, 2), (2, 2), (1, 1), (1, 1), 1, (2, 2), id="dilation2_stride2_outpad1"
    ),
    pytest.param((2, 3, 5, 5), (3, 32, 3, 3), (1, 1), (1, 1), (0, 0), 1, (1, 1), id="two_channel_blocks"),
    pytest.param((2, 3, 4, 5), (3, 2, 3, 2), (2, 1), (1, 0), (1, 0), 1, (1, 1), id="rect_stride2x1"),
    pytest.param((1, 3, 4, 4), (3, 2, 2, 2), (3, 3), (0, 0), (2, 2), 1, (1, 1), id="stride3_tapless_phases"),
    pytest.param((2, 3, 3, 4), (3, 2, 1, 1), (2, 2), (0, 0), (1, 1), 1, (1, 1), id="1x1_stride2"),
    pytest.param((1, 5, 4, 3), (5, 6, 11, 11), (4, 4), (2, 2), (3, 1), 1, (1, 1), id="alexnet_11x11s4"),
    pytest.param(
        (2, 40, 19, 23), (40, 20, 5, 5), (2, 2), (2, 2), (1, 1), 1, (1, 1), id="tiles_stages_blocks"
    ),
    pytest.param((1, 34, 9, 70), (34, 7, 3, 3), (1, 1), (1, 1), (0, 0), 2, (1, 1), id="wide_rows_groups"),
]


@pytest.mark.parametrize("force_elements", [False, True], ids=["tiled", "elements"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, output_padding, groups, dilation", CONV_CONFIGS
)
def test_conv_tiled_matches_torch(
    gen, input_shape, weight_shape, stride, padding, output_padding, groups, dilation, dtype, force_elements
):
    x = torch.randn(input_shape, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(weight_shape, generator=gen, dtype=torch.float64).to(dtype)
    args = (stride, padding, output_padding, groups, dilation)
    for b in (torch.randn(weight_shape[1] * groups, generator=gen, dtype=torch.float64).to(dtype), None):
        out, tiled = conv_tiled(x, w, b, *args, force_elements=force_elements)
        assert tiled == (not force_elements)
        expected = F.conv_transpose2d(x.double(), w.double(), None if b is None else b.double(), *args)
        low = F.conv_transpose2d(x, w, b, *args) if dtype in (torch.float16, torch.bfloat16) else None
        check_against_fp64(out, expected, low, "tiled" if tiled else "elements")


def test_conv_tiled_falls_back_when_no_tile_fits(gen):
    # A 3x3 kernel dilated by 200 needs a 400-element halo: no shared-memory plan, the element kernel runs.
    x = torch.randn(1, 2, 3, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64)
    out, tiled = conv_tiled(x, w, None, (1, 1), (0, 0), (0, 0), 1, (200, 200))
    assert not tiled
    expected = F.conv_transpose2d(x, w, None, 1, 0, 0, 1, 200)
    assert_close_verbose(out, expected, rtol=1e-12, atol=1e-12, label="fallback")


def test_conv_tiled_empty_batch(gen):
    x = torch.randn(0, 4, 6, 6, generator=gen)
    w = torch.randn(4, 3, 7, 7, generator=gen)
    out, tiled = conv_tiled(x, w, None, (2, 2), (1, 1), (1, 1), 1, (1, 1))
    assert tiled and out.shape == (0, 3, 16, 16)


# --------------------------------------------------------------------- fused unpool + transposed conv
def fused_tiled(values, switches, weight, pool, conv, relu, force_elements=False):
    """csrc/cpu/unpool_conv_transpose.cpp unpool_conv_transpose2d_tiled: (output, invalid, tiled ran)."""
    kernel, stride, pad, size = pool
    (k_h, k_w), conv_stride, conv_pad, output_padding = conv
    n, c_in = values.shape[:2]
    c_out = weight.shape[1]
    out_h = (size[0] - 1) * conv_stride[0] - 2 * conv_pad[0] + k_h + output_padding[0]
    out_w = (size[1] - 1) * conv_stride[1] - 2 * conv_pad[1] + k_w + output_padding[1]
    out = torch.full((n, c_out, out_h, out_w), float("nan"), dtype=values.dtype)
    invalid, tiled = cpu_module.unpool_conv_transpose2d_tiled(
        values.data_ptr(),
        switches.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        DTYPE_CODES[values.dtype],
        SWITCH_CODES[switches.dtype],
        n,
        c_in,
        c_out,
        (*size, *values.shape[-2:]),
        (*kernel, *stride, *pad),
        (*size, out_h, out_w),
        (k_h, k_w, *conv_stride, *conv_pad, 1, 1),
        relu,
        force_elements,
        1,
    )
    return out, invalid, tiled


# pool: (kernel, stride, padding, ceil_mode, unpool (H, W)); conv: ((kH, kW), stride, padding,
# output_padding); input channels, output channels.
FUSED_CONFIGS = [
    pytest.param((3, 2, 0, True, (13, 13)), ((3, 3), 1, 1, 0), 3, 4, id="zfnet_conv5_3x3"),
    pytest.param((3, 2, 0, True, (16, 16)), ((7, 7), 2, 1, 1), 4, 3, id="zfnet_conv1_7x7s2"),
    pytest.param((2, 2, 0, False, (8, 8)), ((5, 5), 2, 2, 1), 3, 33, id="2s2_conv5x5s2_3_blocks"),
    pytest.param((3, 1, 1, False, (6, 7)), ((2, 3), (2, 1), (0, 1), (1, 0)), 2, 9, id="3s1p1_rect"),
    pytest.param(((2, 3), (1, 2), 1, False, (6, 7)), ((3, 3), 1, 0, 0), 2, 5, id="rect_pool"),
    pytest.param((3, 2, 1, True, (7, 6)), ((3, 3), 3, 0, 2), 2, 5, id="3s2p1_ceil_conv_stride3"),
    pytest.param((3, 2, 0, False, (15, 15)), ((11, 11), 4, 2, 3), 5, 3, id="alexnet_11x11s4"),
    pytest.param((3, 2, 0, True, (26, 40)), ((5, 5), 2, 2, 1), 20, 17, id="tiles_stages_blocks"),
]


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def make_fused_case(pool, c_in, c_out, kernel, dtype, generator, use_indices):
    """Pooled tied input (shared argmaxes), mixed-sign values (relu after the sum matters), a weight."""
    pool_kernel, pool_stride, pool_padding, ceil_mode, size = pool
    kernel_pair, stride_pair, pad_pair = pool_params(pool_kernel, pool_stride, pool_padding)
    x = tied((2, c_in, *size), dtype, generator)
    _, switches = reference.max_pool2d_switches(
        x, kernel_pair, stride_pair, pad_pair, ceil_mode, False, switch_dtype(kernel_pair)
    )
    if use_indices:
        switches = zk.switches_to_indices(switches, size, kernel_pair, stride_pair, pad_pair)
    values = (torch.randn(switches.shape, generator=generator, dtype=torch.float64) - 0.3).to(dtype)
    weight = torch.randn(c_in, c_out, *kernel, generator=generator, dtype=torch.float64).to(dtype)
    return values, switches, weight, (kernel_pair, stride_pair, pad_pair, size)


@pytest.mark.parametrize("force_elements", [False, True], ids=["tiled", "elements"])
@pytest.mark.parametrize("use_indices", [False, True], ids=["switches", "indices"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pool, conv, c_in, c_out", FUSED_CONFIGS)
def test_fused_tiled_matches_unfused(gen, pool, conv, c_in, c_out, dtype, use_indices, force_elements):
    values, switches, weight, geometry = make_fused_case(pool, c_in, c_out, conv[0], dtype, gen, use_indices)
    kernel, stride, pad, size = geometry
    conv = (conv[0], _pair(conv[1]), _pair(conv[2]), _pair(conv[3]))
    for relu in (True, False):
        out, invalid, tiled = fused_tiled(values, switches, weight, geometry, conv, relu, force_elements)
        assert invalid == 0 and tiled == (not force_elements)
        # The unfused op's unpooled map, rounded to the dtype as it stores it, then convolved in fp64: what is
        # left is our float accumulation and one rounding of the output.
        unpooled = reference.max_unpool2d(values, switches, kernel, stride, pad, size, relu)
        expected = F.conv_transpose2d(unpooled.double(), weight.double(), None, *conv[1:])
        scale = max(1.0, expected.abs().max().item())
        rtol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, torch.finfo(dtype).eps)
        atol = 1e-10 * scale if dtype == torch.float64 else 1e-5 * scale
        assert_close_verbose(out, expected.to(dtype), rtol=rtol, atol=atol, label=f"fused relu={relu}")


@pytest.mark.parametrize("case", list(invalid_switch_cases()))
def test_fused_tiled_counts_invalid_switches(gen, case):
    values, switches, kernel_size, stride, padding, output_size = invalid_switch_cases()[case]
    kernel, stride, pad = pool_params(kernel_size, stride, padding)
    _, valid = reference.switch_targets(switches, output_size, kernel, stride, pad)
    weight = torch.randn(1, 2, 3, 3, generator=gen)
    geometry = (kernel, stride, pad, output_size)
    out, invalid, _ = fused_tiled(values, switches, weight, geometry, ((3, 3), (1, 1), (1, 1), (0, 0)), False)
    assert invalid == int((~valid).sum()) > 0
    assert torch.isfinite(out).all()  # every output written, no invalid switch followed


# ------------------------------------------------------------------------------------- NaN and inf
@pytest.mark.parametrize("force_elements", [False, True], ids=["tiled", "elements"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS)
def test_conv_tiled_nonfinite_propagate_as_torch(dtype, force_elements):
    # The tile's zero halo times an inf weight made NaN where torch forms no product: only the taps whose
    # input lies inside the map may be multiplied (tests/test_conv_transpose.py fuzzes the other backends).
    g = torch.Generator().manual_seed(31 + (dtype == torch.float64))
    rtol, atol = nonfinite_tolerance(dtype)
    for i in range(48):
        x, w, b, *args = nonfinite_conv_case(
            g, NONFINITE_OUT_CHANNELS[i % len(NONFINITE_OUT_CHANNELS)], dtype
        )
        out, tiled = conv_tiled(x, w, b, *args, force_elements=force_elements)
        assert tiled == (not force_elements)
        label = f"case {i}: x {tuple(x.shape)} w {tuple(w.shape)} bias {b is not None} args {args}"
        assert_same_nonfinite(out, exact_conv_transpose2d(x, w, b, *args), rtol, atol, label)


@pytest.mark.parametrize("force_elements", [False, True], ids=["tiled", "elements"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS)
def test_fused_tiled_nonfinite_propagate_as_torch(dtype, force_elements):
    g = torch.Generator().manual_seed(41 + (dtype == torch.float64))
    rtol, atol = nonfinite_tolerance(dtype)
    for i in range(48):
        case = nonfinite_fused_case(g, NONFINITE_OUT_CHANNELS[i % len(NONFINITE_OUT_CHANNELS)], dtype)
        values, switches, weight, pool, conv, relu = case
        out, invalid, tiled = fused_tiled(values, switches, weight, pool, conv, relu, force_elements)
        assert invalid == 0 and tiled == (not force_elements)
        label = (
            f"case {i}: values {tuple(values.shape)} weight {tuple(weight.shape)} pool {pool} conv {conv[1:]}"
        )
        assert_same_nonfinite(out, fused_reference(*case), rtol, atol, f"{label} relu {relu}")
