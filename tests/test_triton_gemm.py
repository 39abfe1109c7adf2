"""The triton backend's implicit-GEMM ops (conv_transpose2d, the fused unpool_conv_transpose2d), called
directly against zfkernels.ops.reference: forced 16-wide tiles put tile edges and multi-tile grids
(M, N and K) on these small shapes. Without a GPU the kernels run in Triton's interpreter on CPU tensors
(conftest sets TRITON_INTERPRET=1), which also checks every int32 index operation for overflow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_bitwise_equal,
    assert_close_verbose,
    invalid_switch_cases,
    max_abs_error,
    tied,
)

import zfkernels as zk
from zfkernels.ops import reference

pytest.importorskip("triton")
from zfkernels.triton import _common as triton_common  # noqa: E402
from zfkernels.triton import conv_transpose as tct  # noqa: E402
from zfkernels.triton import unpool_conv_transpose as tuct  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

DEVICE = torch.device(triton_common.DEVICE_TYPE)
SMALL = tct.Tiles(16, 16, 16)  # the smallest tiles tl.dot takes: several tiles along M, N and K below
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = lambda d: str(d).split(".")[-1]
P = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def randn(shape, dtype, generator, shift=0.0):
    return (torch.randn(shape, generator=generator, dtype=torch.float64) + shift).to(dtype).to(DEVICE)


def check_against_fp64(out, expected64, torch_result, label):
    """fp32 within 1e-4 of fp64, fp64 within 1e-10, half types at most twice torch's own error."""
    scale = max(1.0, expected64.abs().max().item()) if expected64.numel() else 1.0
    if out.dtype == torch.float64:
        assert_close_verbose(out, expected64, rtol=1e-10, atol=1e-10 * scale, label=label)
    elif out.dtype == torch.float32:
        assert_close_verbose(out, expected64.float(), rtol=1e-4, atol=1e-5 * scale, label=label)
    else:
        assert out.dtype == torch_result.dtype and out.shape == expected64.shape
        ours, torchs = max_abs_error(out, expected64), max_abs_error(torch_result, expected64)
        assert ours <= 2 * torchs + 1e-5 * scale, f"{label}: error {ours} > 2 x torch's {torchs}"


# ------------------------------------------------------------------------------------ conv_transpose2d
# (input shape, weight shape, stride, padding, output_padding, groups, dilation)
CONV_CONFIGS = [
    pytest.param((2, 20, 5, 4), (20, 18, 3, 3), 2, 1, 1, 1, 1, id="k20_n18_m_tiles_stride2"),
    pytest.param((2, 8, 4, 5), (8, 3, 3, 2), (2, 1), (1, 0), (1, 0), 2, 1, id="groups2_rect_stride_pad"),
    pytest.param((1, 3, 4, 4), (3, 4, 3, 3), 2, (1, 2), 1, 1, (2, 3), id="dilation2x3_stride2"),
    pytest.param((1, 4, 5, 5), (4, 1, 3, 3), 1, 2, 0, 4, 2, id="depthwise_dilation2"),
    pytest.param((1, 3, 3, 3), (3, 2, 2, 2), 3, 0, 2, 1, 1, id="stride3_k2_phases_without_taps"),
    pytest.param((2, 3, 3, 4), (3, 5, 1, 1), 1, 0, 0, 1, 1, id="1x1_stride1"),
    pytest.param((1, 2, 1, 1), (2, 2, 1, 1), 4, 0, 3, 1, 1, id="1x1_input_stride4_bias_only_phases"),
    pytest.param((1, 2, 2, 2), (2, 2, 3, 3), 3, 2, 0, 1, 1, id="empty_phase_rows"),
]


def run_conv(x, w, b, stride, padding, output_padding, groups, dilation, tiles=SMALL):
    args = (P(stride), P(padding), P(output_padding), groups, P(dilation))
    return tct.launch_conv_transpose2d(x, w, b, *args, tiles=tiles)


def check_conv(x, w, b, stride, padding, output_padding, groups, dilation, tiles=SMALL):
    out = run_conv(x, w, b, stride, padding, output_padding, groups, dilation, tiles)
    args = (P(stride), P(padding), P(output_padding), groups, P(dilation))
    expected64 = reference.conv_transpose2d(x.double(), w.double(), None if b is None else b.double(), *args)
    check_against_fp64(out, expected64, reference.conv_transpose2d(x, w, b, *args), "conv_transpose2d")
    assert out.is_contiguous() and out.device == x.device
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, output_padding, groups, dilation", CONV_CONFIGS
)
def test_conv_matches_reference(
    input_shape, weight_shape, stride, padding, output_padding, groups, dilation, dtype
):
    g = torch.Generator().manual_seed(1)
    x, w = randn(input_shape, dtype, g), randn(weight_shape, dtype, g)
    b = randn(weight_shape[1] * groups, dtype, g)
    check_conv(x, w, b, stride, padding, output_padding, groups, dilation)
    if dtype == torch.float32:  # without bias, and with the launcher's own tiles
        check_conv(x, w, None, stride, padding, output_padding, groups, dilation)
        check_conv(x, w, b, stride, padding, output_padding, groups, dilation, tiles=None)


def test_conv_bias_only_where_no_tap_hits():
    # stride 3, kernel 2: output rows/columns 2 mod 3 meet no tap at all and must hold exactly the bias.
    g = torch.Generator().manual_seed(2)
    x, w, b = (
        randn((1, 3, 3, 3), torch.float32, g),
        randn((3, 2, 2, 2), torch.float32, g),
        randn(2, torch.float32, g),
    )
    out = run_conv(x, w, b, 3, 0, 2, 1, 1)
    assert out.shape == (1, 2, 10, 10)
    assert_bitwise_equal(out[:, :, 2::3, :], b.view(1, 2, 1, 1).expand(1, 2, 3, 10).contiguous(), "rows")
    assert_bitwise_equal(out[:, :, :, 2::3], b.view(1, 2, 1, 1).expand(1, 2, 10, 3).contiguous(), "cols")


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_conv_any_strides(layout):
    g = torch.Generator().manual_seed(3)
    x, w, b = (
        randn((2, 20, 5, 4), torch.float32, g),
        randn((20, 18, 3, 3), torch.float32, g),
        randn(18, torch.float32, g),
    )
    if layout == "transposed":
        x, w = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (x, w))
    elif layout == "sliced":
        x, w, b = torch.cat([x, x], dim=1)[:, ::2], torch.cat([w, w], dim=0)[::2], torch.cat([b, b])[::2]
    else:
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    assert not x.is_contiguous() and not w.is_contiguous()
    check_conv(x, w, b, 2, 1, 1, 1, 1)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf * 0
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
def test_conv_nonfinite_inputs_propagate(dtype):
    g = torch.Generator().manual_seed(4)
    x, w, b = randn((1, 18, 4, 4), dtype, g), randn((18, 17, 3, 3), dtype, g), randn(17, dtype, g)
    x[0, 1, 1, 2], x[0, 17, 3, 0], x[0, 5, 0, 0] = float("nan"), float("inf"), float("-inf")
    out = run_conv(x, w, b, 2, 1, 1, 1, 1)
    expected = reference.conv_transpose2d(x.float(), w.float(), b.float(), (2, 2), (1, 1), (1, 1), 1, (1, 1))
    assert torch.equal(out.isnan(), expected.to(dtype).isnan()) and out.isnan().any()
    assert torch.equal(out.isinf(), expected.to(dtype).isinf()) and out.isinf().any()


def test_conv_empty_batch_and_channels():
    for x_shape, w_shape in [((0, 4, 3, 3), (4, 3, 3, 3)), ((1, 4, 3, 3), (4, 0, 3, 3))]:
        x, w = torch.ones(x_shape, device=DEVICE), torch.ones(w_shape, device=DEVICE)
        out = run_conv(x, w, None, 2, 1, 1, 1, 1)
        assert out.shape == (x_shape[0], w_shape[1], 6, 6)  # (3 - 1) * 2 - 2 + 3 + 1


def test_conv_zero_input_channels_give_the_bias():
    x, w, b = (
        torch.ones(2, 0, 3, 3, device=DEVICE),
        torch.ones(0, 3, 2, 2, device=DEVICE),
        torch.arange(3.0, device=DEVICE),
    )
    out = run_conv(x, w, b, 1, 0, 0, 1, 1)
    assert_bitwise_equal(out, b.view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous(), "bias only")


def test_conv_refuses_too_many_phases():
    x, w = torch.zeros(1, 16384, 1, 1, device=DEVICE), torch.zeros(16384, 1, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="groups x stride_h x stride_w"):
        run_conv(x, w, None, 2, 0, 0, 16384, 1)


# ----------------------------------------------------------------------------- unpool_conv_transpose2d
# pool: (kernel, stride, padding, ceil_mode, unpool (H, W)); conv: (kernel, stride, padding, output_padding)
FUSED_CONFIGS = [
    # 50 pixels in phase 0, 32 in phase 1 (early-returning tiles), 17 channels in and out: 16-wide tiles
    # split M, N and K with ragged edges.
    pytest.param((3, 2, 0, True, (5, 5)), ((3, 3), 2, 1, 0), 17, 17, id="3s2_ceil_conv3s2_multi_tile"),
    pytest.param((2, 2, 0, False, (6, 6)), ((4, 4), 2, 1, 1), 3, 5, id="2s2_disjoint_conv4s2"),
    pytest.param((3, 1, 1, False, (5, 6)), ((2, 3), (2, 1), (0, 1), (1, 0)), 2, 17, id="3s1p1_nine_windows"),
    pytest.param(((2, 3), (1, 2), 1, False, (5, 7)), ((3, 3), 3, 0, 2), 3, 4, id="rect_pool_conv_stride3"),
    pytest.param((3, 2, 1, True, (6, 5)), ((1, 1), 2, 0, 1), 4, 3, id="3s2p1_ceil_1x1_stride2"),
]
MULTI_TILE = FUSED_CONFIGS[0].values


def make_fused(pool, c_in, c_out, kernel, dtype, generator, batch=2, switch_dtype=torch.uint8):
    """Tied input (shared argmaxes), mixed-sign pooled values (relu after the sum matters)."""
    pool_kernel, pool_stride, pool_padding, ceil_mode, size = pool
    x = tied((batch, c_in, *size), torch.float32, generator)
    _, switches = zk.max_pool2d_switches(x, pool_kernel, pool_stride, pool_padding, ceil_mode)
    if switch_dtype == torch.int64:
        switches = zk.switches_to_indices(switches, size, pool_kernel, pool_stride, pool_padding)
    values = randn(switches.shape, dtype, generator, shift=-0.3)
    weight = randn((c_in, c_out, *kernel), dtype, generator)
    return values, switches.to(switch_dtype).to(DEVICE), weight


def fused_args(pool, conv, relu):
    pool_kernel, pool_stride, pool_padding, _, size = pool
    stride = pool_kernel if pool_stride is None else pool_stride
    return (P(pool_kernel), P(stride), P(pool_padding), size, P(conv[1]), P(conv[2]), P(conv[3]), relu)


def run_fused(values, switches, weight, args, tiles=None, skip_empty=True):
    return tuct.launch_unpool_conv_transpose2d(
        values, switches, weight, *args, tiles=tiles, skip_empty=skip_empty
    )


def check_fused(out, values, switches, weight, args):
    pool_kernel, pool_stride, pool_padding, size, stride, padding, output_padding, relu = args
    # The unpooled map is exact in every dtype: hold the GEMM to fp64 on exactly that map.
    unpooled = reference.max_unpool2d(values, switches, pool_kernel, pool_stride, pool_padding, size, relu)
    expected64 = F.conv_transpose2d(unpooled.double(), weight.double(), None, stride, padding, output_padding)
    unfused = reference.unpool_conv_transpose2d(values, switches, weight, *args)
    check_against_fp64(out, expected64, unfused, "unpool_conv_transpose2d")
    assert out.is_contiguous() and out.dtype == values.dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pool, conv, c_in, c_out", FUSED_CONFIGS)
def test_fused_matches_reference(pool, conv, c_in, c_out, dtype):
    g = torch.Generator().manual_seed(5)
    values, switches, weight = make_fused(pool, c_in, c_out, conv[0], dtype, g)
    args = fused_args(pool, conv, True)
    # Small tiles where the shape is built for them; the other geometries in the launcher's own tiles.
    out = run_fused(values, switches, weight, args, tiles=SMALL if (pool, conv) == MULTI_TILE[:2] else None)
    check_fused(out, values, switches, weight, args)


@pytest.mark.parametrize("switch_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64], ids=DTYPE_IDS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "plain"])
@pytest.mark.parametrize("pool, conv, c_in, c_out", FUSED_CONFIGS[1:3])
def test_fused_switch_dtypes_and_relu(pool, conv, c_in, c_out, relu, switch_dtype):
    g = torch.Generator().manual_seed(6)
    values, switches, weight = make_fused(
        pool, c_in, c_out, conv[0], torch.float32, g, switch_dtype=switch_dtype
    )
    out = run_fused(values, switches, weight, fused_args(pool, conv, relu))
    check_fused(out, values, switches, weight, fused_args(pool, conv, relu))
    if relu:  # the rectification happened after the sum: without it the result differs
        assert not torch.allclose(out, run_fused(values, switches, weight, fused_args(pool, conv, False)))


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fused_unpooled_map_is_bit_exact(dtype, relu):
    # A 1x1 identity convolution returns the A operand itself: the on-the-fly unpool (sums of shared
    # argmaxes in window order, fp32 for half types, relu, one rounding) must equal max_unpool2d's bits.
    g = torch.Generator().manual_seed(7)
    pool = (3, 2, 0, True, (9, 8))
    values, switches, _ = make_fused(pool, 18, 18, (1, 1), dtype, g)
    values = (values * 7.3).to(dtype)  # larger sums: fp16/bf16 round them
    identity = torch.eye(18, dtype=dtype, device=DEVICE).view(18, 18, 1, 1)
    args = fused_args(pool, ((1, 1), 1, 0, 0), relu)
    out = run_fused(values, switches, identity, args)
    assert_bitwise_equal(out, reference.max_unpool2d(values, switches, *args[:4], relu), f"{dtype} unpooled")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf * 0
def test_fused_nonfinite_values_propagate():
    g = torch.Generator().manual_seed(8)
    pool, conv, c_in, c_out = MULTI_TILE
    values, switches, weight = make_fused(pool, c_in, c_out, conv[0], torch.float32, g)
    values[0, 3, 1, 1], values[1, 16, 0, 0], values[0, 0, 1, 0] = float("nan"), float("inf"), float("-inf")
    args = fused_args(pool, conv, False)
    out = run_fused(values, switches, weight, args, tiles=SMALL)
    expected = reference.unpool_conv_transpose2d(values, switches, weight, *args)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()
    assert torch.equal(out.isinf(), expected.isinf()) and out.isinf().any()
    assert_close_verbose(out, expected, rtol=1e-4, atol=1e-4, label="finite part")


@pytest.mark.parametrize("sparse", [True, False], ids=["mostly_negative", "mixed"])
def test_fused_skipping_empty_tiles_changes_nothing(sparse):
    g = torch.Generator().manual_seed(9)
    pool, conv, c_in, c_out = MULTI_TILE
    values, switches, weight = make_fused(pool, c_in, c_out, conv[0], torch.float32, g)
    if sparse:  # relu leaves two positive sums (K blocks 1 and 2): most A tiles are all zero and skipped
        values = -values.abs()
        values[0, 2, 0, 1], values[1, 16, 1, 1] = 1.5, 0.7
    args = fused_args(pool, conv, True)
    skipped = run_fused(values, switches, weight, args, tiles=SMALL)
    assert_bitwise_equal(
        skipped, run_fused(values, switches, weight, args, tiles=SMALL, skip_empty=False), "skip"
    )
    check_fused(skipped, values, switches, weight, args)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_fused_any_strides(layout):
    g = torch.Generator().manual_seed(10)
    pool, conv, c_in, c_out = MULTI_TILE
    values, switches, weight = make_fused(pool, c_in, c_out, conv[0], torch.float32, g)
    if layout == "transposed":
        remake = lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":
        remake = lambda t: torch.stack([t, t], dim=-1)[..., 0]
    else:
        remake = lambda t: t.contiguous(memory_format=torch.channels_last)
    v, s, w = remake(values), remake(switches), remake(weight)
    assert not v.is_contiguous() and not s.is_contiguous() and not w.is_contiguous()
    check_fused(run_fused(v, s, w, fused_args(pool, conv, True)), v, s, w, fused_args(pool, conv, True))


def test_fused_empty_batch():
    g = torch.Generator().manual_seed(11)
    pool, conv, c_in, c_out = FUSED_CONFIGS[1].values
    values, switches, weight = make_fused(pool, c_in, c_out, conv[0], torch.float32, g, batch=0)
    out = run_fused(values, switches, weight, fused_args(pool, conv, True))
    assert out.shape == (0, c_out, 13, 13)  # (6 - 1) * 2 - 2 + 4 + 1


@pytest.mark.parametrize("case", list(invalid_switch_cases()))
def test_fused_counts_invalid_switches(case):
    values, switches, kernel, stride, padding, size = invalid_switch_cases()[case]
    weight = torch.randn(1, 2, 3, 3).to(DEVICE)
    args = (P(kernel), P(stride), P(padding), size, (1, 1), (0, 0), (0, 0), True)
    with pytest.raises(ValueError, match=r"switches has 1 entries outside"):  # exactly the one bad switch
        run_fused(values.to(DEVICE), switches.to(DEVICE), weight, args)


def test_fused_counts_every_invalid_switch():
    g = torch.Generator().manual_seed(12)
    pool = (3, 2, 0, False, (7, 7))
    values, switches, weight = make_fused(pool, 3, 2, (3, 3), torch.float32, g)
    switches[0, :, 0, 0] = 9  # past a 3x3 window: 3 channels
    switches[1, 2, 1, :] = 200  # 3 windows
    args = fused_args(pool, ((3, 3), 1, 0, 0), True)
    with pytest.raises(ValueError, match=r"switches has 6 entries outside"):
        run_fused(values, switches, weight, args)


# ------------------------------------------------------------------------------- the ops themselves
@pytest.mark.parametrize("name", ["conv_transpose2d", "unpool_conv_transpose2d"])
def test_ops_have_the_zfkernels_schemas(name):
    ours = str(getattr(torch.ops.zfkernels_triton, name).default._schema)
    theirs = str(getattr(torch.ops.zfkernels, name).default._schema)
    assert ours.replace("zfkernels_triton::", "zfkernels::") == theirs


def _op_samples():
    g = torch.Generator().manual_seed(13)
    x, w, b = (
        randn((2, 4, 3, 3), torch.float32, g),
        randn((4, 3, 3, 3), torch.float32, g),
        randn(3, torch.float32, g),
    )
    conv = (x, w, b, [2, 2], [1, 1], [1, 1], 1, [1, 1])
    pool, c = FUSED_CONFIGS[1].values[:2]
    values, switches, weight = make_fused(pool, 3, 5, c[0], torch.float32, g)
    fused = (values, switches, weight, [2, 2], [2, 2], [0, 0], [6, 6], [2, 2], [1, 1], [1, 1], True)
    return {"conv_transpose2d": conv, "unpool_conv_transpose2d": fused}


@pytest.mark.parametrize("name", ["conv_transpose2d", "unpool_conv_transpose2d"])
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.zfkernels_triton, name).default, _op_samples()[name])


@pytest.mark.parametrize("name", ["conv_transpose2d", "unpool_conv_transpose2d"])
def test_compile_fullgraph(name):
    # Compiled, torch.compile traces into the triton_op's kernels; interpreted, the op is opaque to it.
    op = getattr(torch.ops.zfkernels_triton, name)
    args = _op_samples()[name]
    backend = "aot_eager" if triton_common.INTERPRET else "inductor"
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True, backend=backend)
    assert_close_verbose(compiled(*args), op(*args), rtol=1e-6, atol=1e-6, label="compiled")


def test_backend_functions_take_reference_arguments():
    g = torch.Generator().manual_seed(14)
    x, w, b = (
        randn((1, 4, 3, 3), torch.float64, g),
        randn((4, 2, 3, 3), torch.float64, g),
        randn(4, torch.float64, g),
    )
    args = ((2, 1), (1, 0), (1, 0), 2, (1, 2))
    assert_close_verbose(
        tct.conv_transpose2d(x, w, b, *args), reference.conv_transpose2d(x, w, b, *args), 1e-12, 1e-12, "conv"
    )
    pool, conv = FUSED_CONFIGS[2].values[:2]
    values, switches, weight = make_fused(pool, 2, 3, conv[0], torch.float64, g)
    fargs = fused_args(pool, conv, True)
    assert_close_verbose(
        tuct.unpool_conv_transpose2d(values, switches, weight, *fargs),
        reference.unpool_conv_transpose2d(values, switches, weight, *fargs),
        1e-12,
        1e-12,
        "fused",
    )


# --------------------------------------------------------------------- compiled for a GPU, without one
_COMPILE_FOR_SM90 = """
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class NoGpuDriver:  # what the launcher asks the driver for; ptxas needs no device
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


driver.set_active(NoGpuDriver())
import zfkernels.triton.conv_transpose as tct
import zfkernels.triton.unpool_conv_transpose as tuct


class Compile:  # stands in for wrap_triton: compile with the launch's real specialization, run nothing
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            ptx = compiled.asm["ptx"]
            print(self.kernel.__name__, kwargs.get("DTYPE"), "wgmma" in ptx or "mma.sync" in ptx)
        return run


for module in (tct, tuct):
    module.wrap_triton = Compile
    module.check_device = lambda tensor: None
tuct.raise_if_invalid = lambda counter: None  # the count kernel was compiled, never run
for dtype in (torch.float32, torch.bfloat16):
    x, w = torch.randn(2, 32, 5, 5).to(dtype), torch.randn(32, 16, 3, 3).to(dtype)
    # ints of value 1 become constexprs; then 10 channels per group need the K mask
    tct.launch_conv_transpose2d(x, w, w[0, :, 0, 0], (1, 1), (1, 1), (0, 0), 1, (1, 1))
    tct.launch_conv_transpose2d(x[:, :20], w[:20], None, (2, 2), (1, 1), (1, 1), 2, (2, 1))
    values, switches = torch.randn(2, 32, 3, 3).to(dtype), torch.zeros(2, 32, 3, 3, dtype=torch.uint8)
    args = ((3, 3), (2, 2), (0, 0), (7, 7), (1, 1), (1, 1), (0, 0), True)
    tuct.launch_unpool_conv_transpose2d(values, switches, w, *args)
    tuct.launch_unpool_conv_transpose2d(values[:, :20], switches[:, :20].long(), w[:20], *args[:-1], False)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the other tests run the compiled kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter runs Python, not Triton's compiler: this catches what only compilation rejects
    # (e.g. ints of value 1 specialized into constexprs), and checks tensor cores where they belong.
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_COMPILE_FOR_SM90)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = re.findall(r"^(\w+) (\S+) (True|False)$", result.stdout, flags=re.M)
    # per dtype: two convolutions and two fused kernels, each launched plain and EXACT, and two counts
    assert len(lines) == 20, result.stdout
    for kernel, dtype, tensor_cores in lines:
        if kernel != "_count_invalid_switches_kernel":  # fp32 must not use tf32 (IEEE products); bf16 does
            assert tensor_cores == str(dtype == str(tct.BF16)), (kernel, dtype)
