"""The triton backend's memory-bound kernels, called directly, against zfkernels.ops.reference, bit for bit.

What the op-level matrix (test_max_pool.py, ...) cannot see: block boundaries and multi-program grids (the
block sizes are shrunk here), the wide-window pool (row segments), the unrolled and looped unpool, int64
indexing, the bf16 bit conversions, int64 flat indices, the invalid-switch counts, and the zfkernels_triton
ops' schemas. Without a GPU, conftest sets TRITON_INTERPRET=1 and the kernels run on CPU tensors.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_bitwise_equal, assert_close_verbose, make_input, tied

import zfkernels

if "triton" not in zfkernels.available_backends():
    pytest.skip("the triton backend is not available here", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from zfkernels.ops import reference  # noqa: E402
from zfkernels.ops._checks import switch_dtype  # noqa: E402
from zfkernels.triton import _common, max_pool, max_unpool, renormalize_filters  # noqa: E402

relu = importlib.import_module("zfkernels.triton.relu")  # the package's `relu` is the function

DEVICE = _common.DEVICE_TYPE
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPE_IDS = lambda d: str(d).split(".")[-1]  # noqa: E731
# (kernel, stride, padding, ceil_mode, (H, W)): stride below, equal to and above the kernel, padding, ceil
GEOMETRIES = [
    pytest.param((3, 3), (2, 2), (0, 0), True, (13, 11), id="3s2_ceil"),
    pytest.param((3, 3), (1, 1), (1, 1), False, (7, 6), id="3s1p1"),
    pytest.param((2, 3), (1, 2), (1, 1), False, (6, 7), id="rect_2x3_s1x2_p1"),
    pytest.param((4, 4), (3, 3), (2, 2), True, (10, 9), id="4s3p2_ceil"),
    pytest.param((2, 2), (3, 3), (0, 0), True, (8, 7), id="2s3_gaps"),
]


@pytest.fixture
def small_blocks(monkeypatch):
    """Small blocks: the test shapes then span several programs, the last one partial (few of them: each
    program costs the interpreter tens of milliseconds)."""
    monkeypatch.setattr(max_pool, "BLOCK", 64)
    monkeypatch.setattr(max_unpool, "UNPOOL_BLOCK", 128)
    monkeypatch.setattr(max_unpool, "GATHER_BLOCK", 64)
    monkeypatch.setattr(relu, "BLOCK", 256)
    monkeypatch.setattr(renormalize_filters, "BLOCK", 16)


def on_device(*tensors):
    return tuple(t.to(DEVICE) for t in tensors)


def expected(fn, *args):
    """The reference on CPU copies (CUDA's scatter_add_ sums in no fixed order), moved to the device."""
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    result = fn(*cpu_args)
    if isinstance(result, tuple):
        return tuple(r.to(DEVICE) for r in result)
    return result.to(DEVICE)


def pool_and_check(x, kernel, stride, padding, ceil_mode, relu_first):
    """Our pool against the reference's: values and switches bit for bit. Returns ours."""
    dtype = switch_dtype(kernel)
    values, switches = max_pool.max_pool2d_switches(x, kernel, stride, padding, ceil_mode, relu_first, dtype)
    want_values, want_switches = expected(
        reference.max_pool2d_switches, x, kernel, stride, padding, ceil_mode, relu_first, dtype
    )
    assert_bitwise_equal(values, want_values, "values")
    assert_bitwise_equal(switches, want_switches, "switches")
    assert values.is_contiguous() and switches.is_contiguous()
    return values, switches


# ------------------------------------------------------------------------------------------ max-pool
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, size", GEOMETRIES)
def test_pool_unrolled_windows(gen, kernel, stride, padding, ceil_mode, size, dtype):
    for kind in ("distinct", "ties", "nan", "neg_inf"):
        (x,) = on_device(make_input(kind, (2, 3, *size), dtype, gen))
        for relu_first in (False, True):
            pool_and_check(x, kernel, stride, padding, ceil_mode, relu_first)


# Every kind in float32; the half types and float64 (only their loads differ) on the harder kinds.
WIDE_CASES = [
    (torch.float32, kind, r) for kind in ("distinct", "ties", "nan", "neg_inf") for r in (False, True)
]
WIDE_CASES += [
    (torch.bfloat16, "nan", False),
    (torch.bfloat16, "neg_inf", True),
    (torch.float16, "ties", True),
    (torch.float64, "nan", False),
]


@pytest.mark.parametrize(
    "kernel, stride, padding, size, segment, per_program",
    [
        ((9, 9), (2, 3), (4, 3), (12, 13), 4, 16),  # 81 elements: uint8 switches, 3 segments, 3 programs
        ((5, 20), (1, 7), (2, 10), (6, 23), 8, 64),  # segments 8 + 8 + 4, padding on every side
        ((17, 17), (1, 1), (0, 0), (18, 19), 256, 64),  # int16 switches, one segment
        ((33, 2), (3, 1), (0, 1), (38, 3), 256, 64),  # a tall window: 33 rows of one 2-column segment
    ],
    ids=["9x9_s2x3_p4x3", "5x20_segments_of_8", "17x17_int16", "33x2_tall"],
)
def test_pool_wide_windows(monkeypatch, gen, kernel, stride, padding, size, segment, per_program):
    """Windows over MAX_UNROLLED_WINDOW go by row segments reduced at once: the winner must still be the
    scan's (first maximum, last NaN, across segments and rows), and the value its exact bits."""
    monkeypatch.setattr(max_pool, "SEGMENT", segment)
    monkeypatch.setattr(max_pool, "WIDE_TILE", per_program * min(segment, triton.next_power_of_2(kernel[1])))
    assert kernel[0] * kernel[1] > max_pool.MAX_UNROLLED_WINDOW
    for dtype, kind, relu_first in WIDE_CASES:
        (x,) = on_device(make_input(kind, (1, 2, *size), dtype, gen))
        pool_and_check(x, kernel, stride, padding, False, relu_first)


def test_pool_wide_signed_zeros_and_nan_order(monkeypatch):
    """A segment's maximum compares +0.0 == -0.0: the first zero in scan order wins and keeps its sign; of
    NaNs in different segments and rows the last one wins."""
    monkeypatch.setattr(max_pool, "SEGMENT", 4)
    x = torch.full((1, 1, 9, 9), -1.0)
    x[0, 0, 2, 5] = -0.0
    x[0, 0, 3, 1] = 0.0
    values, switches = pool_and_check(*on_device(x), (9, 9), (1, 1), (0, 0), False, False)
    assert switches.item() == 2 * 9 + 5 and values.view(torch.int32).item() == -(2**31)
    x[0, 0, 1, 6] = float("nan")
    x[0, 0, 4, 2] = float("nan")
    x[0, 0, 4, 7] = 5.0
    _, switches = pool_and_check(*on_device(x), (9, 9), (1, 1), (0, 0), False, False)
    assert switches.item() == 4 * 9 + 2


def test_pool_int32_switches_for_a_huge_window():
    x = torch.zeros(1, 1, 182, 182)
    x[..., 181, 180] = 1.0  # 182 * 182 = 33124 > 32768 window elements
    _, switches = pool_and_check(*on_device(x), (182, 182), (1, 1), (0, 0), False, False)
    assert switches.dtype == torch.int32 and switches.item() == 181 * 182 + 180


def test_pool_other_switch_dtypes_are_converted(gen):
    """The reference signature takes the switch dtype; the op records the narrowest, others are converted."""
    (x,) = on_device(tied((2, 3, 9, 9), torch.float32, gen))
    for dtype in (torch.int16, torch.int32, torch.int64):
        values, switches = max_pool.max_pool2d_switches(x, (3, 3), (2, 2), (1, 1), True, True, dtype)
        want = expected(reference.max_pool2d_switches, x, (3, 3), (2, 2), (1, 1), True, True, dtype)
        assert_bitwise_equal(switches, want[1], f"{dtype} switches")


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "empty_batch"])
def test_pool_layouts_and_empty(gen, layout):
    base = tied((2, 3, 9, 8), torch.float16, gen)
    x = {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "transposed": base.transpose(-1, -2),
        "empty_batch": base[:0],
    }[layout]
    pool_and_check(*on_device(x), (3, 3), (2, 2), (1, 1), True, True)


# ------------------------------------------------------------------------------------ unpool, backward
def _switch_variants(x, kernel, stride, padding, ceil_mode):
    """Our switches in every width (uint8/int16/int32) and torch's int64 flat indices, for one pooling."""
    _, switches = reference.max_pool2d_switches(x, kernel, stride, padding, ceil_mode, False, torch.int32)
    _, indices = F.max_pool2d(x.float(), kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True)
    return {
        "uint8": switches.to(torch.uint8),
        "int16": switches.to(torch.int16),
        "int32": switches,
        "int64_flat": indices,
    }


def check_unpool_gather_backward(values, switches, gate, source, kernel, stride, padding, size, label):
    """Unpool (with and without ReLU), the gated pool backward and gather, each against the reference."""
    v, s, g, src = on_device(values, switches, gate, source)
    for relu_after in (False, True):
        assert_bitwise_equal(
            max_unpool.max_unpool2d(v, s, kernel, stride, padding, size, relu_after),
            expected(reference.max_unpool2d, v, s, kernel, stride, padding, size, relu_after),
            f"unpool {label} relu={relu_after}",
        )
    assert_bitwise_equal(
        max_pool.max_pool2d_switches_backward(v, g, s, kernel, stride, padding, size, True),
        expected(reference.max_pool2d_switches_backward, v, g, s, kernel, stride, padding, size, True),
        f"gated pool backward {label}",
    )
    assert_bitwise_equal(
        max_unpool.gather_switches(src, s, kernel, stride, padding),
        expected(reference.gather_switches, src, s, kernel, stride, padding),
        f"gather {label}",
    )


def unpool_inputs(shape, size, dtype, gen):
    """Values with NaN and -0.0 to sum, a gate with NaN and -0.0 (both pass / block as threshold_backward
    does), and a source to gather from."""
    values = make_input("nan", shape, dtype, gen)
    values.view(-1)[3::7] = -0.0
    gate = make_input("ties", shape, dtype, gen)
    gate.view(-1)[::5] = float("nan")
    gate.view(-1)[1::5] = -0.0
    return values, gate, make_input("distinct", (*shape[:2], *size), dtype, gen)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, size", GEOMETRIES)
def test_unpool_gather_and_backward(gen, kernel, stride, padding, ceil_mode, size, dtype):
    """Tied input makes overlapping windows share argmaxes (sums of several values); our switches and
    torch's int64 flat indices."""
    x = tied((2, 3, *size), torch.float32, gen)
    variants = _switch_variants(x, kernel, stride, padding, ceil_mode)
    values, gate, source = unpool_inputs(variants["uint8"].shape, size, dtype, gen)
    for name in ("uint8", "int64_flat"):
        check_unpool_gather_backward(
            values, variants[name], gate, source, kernel, stride, padding, size, name
        )


@pytest.mark.parametrize("name", ["int16", "int32"])
def test_unpool_gather_and_backward_wide_switch_types(gen, name):
    x = tied((2, 3, 9, 8), torch.float32, gen)
    switches = _switch_variants(x, (3, 3), (2, 2), (1, 1), True)[name]
    values, gate, source = unpool_inputs(switches.shape, (9, 8), torch.float32, gen)
    check_unpool_gather_backward(values, switches, gate, source, (3, 3), (2, 2), (1, 1), (9, 8), name)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
def test_multi_program_grids(gen, dtype):
    """858 outputs and 252 windows over blocks of 64 / 128: several programs, the last ones partial."""
    x = make_input("ties", (2, 3, 13, 11), dtype, gen)
    values, switches = pool_and_check(*on_device(x), (3, 3), (2, 2), (0, 0), True, True)
    indices = _switch_variants(x.float(), (3, 3), (2, 2), (0, 0), True)["int64_flat"]
    grad, gate, source = unpool_inputs(switches.shape, (13, 11), dtype, gen)
    for name, s in (("uint8", switches.cpu()), ("int64_flat", indices)):
        check_unpool_gather_backward(grad, s, gate, source, (3, 3), (2, 2), (0, 0), (13, 11), name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "kernel, stride, size", [((5, 5), (1, 1), (8, 9)), ((16, 17), (1, 1), (18, 19))], ids=["5x5s1", "16x17s1"]
)
def test_unpool_looped_windows(gen, kernel, stride, size, dtype):
    """More than MAX_UNROLLED_WINDOWS windows cover a position: the window loop is not unrolled."""
    windows = -(-kernel[0] // stride[0]) * -(-kernel[1] // stride[1])
    assert windows > max_unpool.MAX_UNROLLED_WINDOWS
    x = tied((1, 2, *size), torch.float32, gen)  # ties: many windows share one argmax
    switches = _switch_variants(x, kernel, stride, (0, 0), False)["int16"]
    values = make_input("distinct", switches.shape, dtype, gen)
    v, s = on_device(values, switches)
    for relu_after in (False, True):
        assert_bitwise_equal(
            max_unpool.max_unpool2d(v, s, kernel, stride, (0, 0), size, relu_after),
            expected(reference.max_unpool2d, v, s, kernel, stride, (0, 0), size, relu_after),
            f"unpool relu={relu_after}",
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS)
def test_unpool_half_sums_round_once(dtype):
    """Nine windows share one argmax: 2**(mantissa+1) then eight 1.0s. Summed in float32 and rounded once
    that is exact; rounded to the half type at every step each 1.0 would be lost (a tie to even)."""
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0  # the argmax of the nine windows centred on (1..3, 1..3)
    switches = _switch_variants(x, (3, 3), (1, 1), (1, 1), False)["uint8"]
    big = 2.0 ** ({torch.float16: 10, torch.bfloat16: 7}[dtype] + 1)  # mantissa bits + 1: ulp 2
    values = torch.ones(switches.shape, dtype=dtype)
    values[0, 0, 1, 1] = big  # the first of the nine in row-major order
    v, s = on_device(values, switches)
    out = max_unpool.max_unpool2d(v, s, (3, 3), (1, 1), (1, 1), (5, 5), False)
    assert_bitwise_equal(out, expected(reference.max_unpool2d, v, s, (3, 3), (1, 1), (1, 1), (5, 5), False))
    assert out[0, 0, 2, 2].item() == big + 8
    stepwise = torch.tensor(big, dtype=dtype)
    for _ in range(8):
        stepwise = stepwise + torch.ones((), dtype=dtype)
    assert stepwise.item() == big, "rounding at every step would have lost the 1.0s"


def test_unpool_more_switches_than_outputs(monkeypatch, gen):
    """2x2 windows, stride 1, padding 1: the pooled map is (H+1) x (W+1), larger than the output, so some
    programs only validate switches."""
    monkeypatch.setattr(max_unpool, "UNPOOL_BLOCK", 16)
    x = tied((1, 2, 4, 5), torch.float32, gen)
    switches = _switch_variants(x, (2, 2), (1, 1), (1, 1), False)["uint8"]
    assert switches[0, 0].numel() > x[0, 0].numel()
    values = make_input("distinct", switches.shape, torch.float32, gen)
    v, s = on_device(values, switches)
    assert_bitwise_equal(
        max_unpool.max_unpool2d(v, s, (2, 2), (1, 1), (1, 1), (4, 5), False),
        expected(reference.max_unpool2d, v, s, (2, 2), (1, 1), (1, 1), (4, 5), False),
    )
    bad = s.clone()
    bad.view(-1)[-1] = 3  # the last window's offset 3 is its bottom-right corner: past the input
    with pytest.raises(ValueError, match="switches has 1 entries"):
        max_unpool.max_unpool2d(v, bad, (2, 2), (1, 1), (1, 1), (4, 5), False)


def test_empty_unpool_and_gather():
    values = torch.empty(0, 3, 4, 4, device=DEVICE)
    switches = torch.empty(0, 3, 4, 4, dtype=torch.uint8, device=DEVICE)
    unpooled = max_unpool.max_unpool2d(values, switches, (3, 3), (2, 2), (0, 0), (9, 9), True)
    assert unpooled.shape == (0, 3, 9, 9)
    gathered = max_unpool.gather_switches(unpooled, switches, (3, 3), (2, 2), (0, 0))
    assert gathered.shape == (0, 3, 4, 4)


@pytest.mark.usefixtures("small_blocks")
def test_invalid_switches_counted_across_programs(gen):
    """Every kind of invalid switch, spread over several programs, is counted once (none is followed)."""
    x = tied((2, 3, 9, 9), torch.float32, gen)
    switches = _switch_variants(x, (3, 3), (2, 2), (1, 1), True)["int16"].clone()
    values = make_input("distinct", switches.shape, torch.float32, gen)
    switches[0, 0, 0, 0] = 0  # on the padding corner
    switches[0, 2, 1, 3] = 9  # past a 3x3 window
    switches[1, 1, 4, 4] = 8  # ceil window (4, 4) spans rows 7..9: row 9 is past the input
    switches[1, 2, 2, 2] = -3
    indices = _switch_variants(x, (3, 3), (2, 2), (1, 1), True)["int64_flat"].clone()
    indices[0, 1, 0, 0] = 80  # inside the input, outside window (0, 0)
    indices[1, 0, 3, 3] = 81  # past the end
    indices[1, 2, 4, 0] = -1
    for bad, count in ((switches, 4), (indices, 3)):  # local offsets, flat indices
        v, s, src = on_device(values, bad, x)
        message = f"switches has {count} entries"
        with pytest.raises(ValueError, match=message):
            max_unpool.max_unpool2d(v, s, (3, 3), (2, 2), (1, 1), (9, 9), False)
        with pytest.raises(ValueError, match=message):
            max_pool.max_pool2d_switches_backward(v, v, s, (3, 3), (2, 2), (1, 1), (9, 9), True)
        with pytest.raises(ValueError, match=message):
            max_unpool.gather_switches(src, s, (3, 3), (2, 2), (1, 1))


# ---------------------------------------------------------------------------------- int64 indexing
def test_int64_indexing_path(monkeypatch, gen):
    """Tensors of 2**31 elements cannot be allocated here: the int64 variants run on small ones instead."""
    for module in (max_pool, max_unpool, relu, renormalize_filters):
        monkeypatch.setattr(module, "needs_int64", lambda *tensors: True)
    (x,) = on_device(tied((2, 3, 9, 8), torch.bfloat16, gen))
    geometry = ((3, 3), (2, 2), (1, 1))
    values, switches = pool_and_check(x, *geometry, True, True)
    (grad,) = on_device(tied(tuple(values.shape), torch.bfloat16, gen))
    backward_args = (grad, values, switches, *geometry, (9, 8), True)
    assert_bitwise_equal(
        max_pool.max_pool2d_switches_backward(*backward_args),
        expected(reference.max_pool2d_switches_backward, *backward_args),
    )
    assert_bitwise_equal(
        max_unpool.gather_switches(x, switches, *geometry),
        expected(reference.gather_switches, x, switches, *geometry),
    )
    assert_bitwise_equal(relu.relu_backward(x, x, 2), expected(reference.relu_backward, x, x, 2))
    weight = x.float().clone()
    renormalize_filters.renormalize_filters_(weight, 0.5)
    assert_close_verbose(weight, expected(reference.renormalize_filters_, x.float().clone(), 0.5), 4e-7, 0)


# ---------------------------------------------------------------------------------------------- relu
def _specials(dtype, numel, gen):
    x = torch.randn(numel, generator=gen).to(dtype)
    x[::7] = float("nan")
    x[1::7] = -0.0
    x[2::7] = float("-inf")
    x[3::7] = 0.0
    x[4::11] = float("inf")
    return x


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_relu_forward_inplace_and_rules(gen, dtype):
    x, grad = on_device(_specials(dtype, 1000, gen).view(10, 100), _specials(dtype, 1000, gen).view(10, 100))
    output = relu.relu(x)
    assert_bitwise_equal(output, expected(reference.relu, x), "relu")
    for rule in range(3):
        assert_bitwise_equal(
            relu.relu_backward(grad, output, rule),
            expected(reference.relu_backward, grad, output, rule),
            f"rule {rule}",
        )
    inplace = x.clone()
    assert relu.relu_(inplace) is inplace
    assert_bitwise_equal(inplace, output, "relu_ contiguous")
    strided = x.clone().t()  # not contiguous: computed aside and copied back into its own layout
    relu.relu_(strided)
    assert_bitwise_equal(strided, output.t(), "relu_ transposed")
    assert_bitwise_equal(relu.relu(x.t()), output.t().contiguous(), "relu of a transposed input")
    assert relu.relu(x[:0]).shape == (0, 100)


# -------------------------------------------------------------------------------------- renormalize
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_renormalize_multi_block_filters(gen, dtype):
    """Filters of 5 * 3 * 3 = 45 elements in blocks of 16: the sum and the scaling each take 3 steps."""
    scales = torch.linspace(0.02, 0.3, 12, dtype=torch.float64).view(-1, 1, 1, 1)
    before = (torch.randn(12, 5, 3, 3, generator=gen, dtype=torch.float64) * scales).to(dtype)
    before[3] = float("nan")
    (weight,) = on_device(before.clone())
    renormalize_filters.renormalize_filters_(weight, 0.1)
    want = expected(reference.renormalize_filters_, before.clone(), 0.1)
    eps = 4 * torch.finfo(dtype).eps  # float64 sums in another order may move the scale by an ulp
    assert_close_verbose(weight, want, rtol=eps, atol=0, label="renormalized")
    untouched = want.cpu().view(12, -1).eq(before.view(12, -1)).all(dim=1) | before.view(12, -1).isnan().any(
        1
    )
    assert 0 < int(untouched.sum()) < 12
    for f in torch.nonzero(untouched).flatten().tolist():
        assert_bitwise_equal(weight[f], before[f].to(DEVICE), f"filter {f} within the radius keeps its bits")


def test_renormalize_non_contiguous_writes_back(gen):
    base = torch.randn(6, 4, 3, 3, generator=gen)
    (weight,) = on_device(base.permute(1, 0, 2, 3))  # filters along dim 0 of a permuted view
    before = weight.clone()
    renormalize_filters.renormalize_filters_(weight, 0.1)
    assert_close_verbose(weight, expected(reference.renormalize_filters_, before, 0.1), 4e-7, 0)


# --------------------------------------------------------------------------------- shared jit helpers
@triton.jit
def _bf16_round_trip_kernel(bits_ptr, widened_ptr, floats_ptr, narrowed_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(widened_ptr + offsets, _common.bf16_to_float(tl.load(bits_ptr + offsets, mask=mask)), mask=mask)
    tl.store(
        narrowed_ptr + offsets, _common.float_to_bf16(tl.load(floats_ptr + offsets, mask=mask)), mask=mask
    )


def test_bf16_conversions_match_torch(gen):
    """Every bf16 bit pattern widens exactly; float32 rounds to nearest even (exact ties, carries into the
    exponent, overflow to inf, subnormals) and NaN becomes 0x7FC0, as torch's conversion does."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    floats = (patterns.view(torch.bfloat16).float().view(torch.int32) + 0x8000).view(torch.float32)  # ties
    floats[:4096] = (
        torch.randint(-(2**31), 2**31 - 1, (4096,), generator=gen).to(torch.int32).view(torch.float32)
    )
    floats[4096:4102] = torch.tensor([3.3895314e38, 3.4028235e38, 1e-40, -1e-45, 1.00390625, 1.01171875])
    bits, floats = on_device(patterns, floats)
    widened = torch.empty(bits.shape, dtype=torch.float32, device=DEVICE)
    narrowed = torch.empty(bits.shape, dtype=torch.int16, device=DEVICE)
    n = bits.numel()
    _bf16_round_trip_kernel[(triton.cdiv(n, 16384),)](bits, widened, floats, narrowed, n, BLOCK=16384)
    assert_bitwise_equal(widened, bits.view(torch.bfloat16).float(), "bf16 -> float32")
    assert_bitwise_equal(narrowed.view(torch.bfloat16), floats.to(torch.bfloat16), "float32 -> bf16")
    assert (narrowed[floats.isnan()] == 0x7FC0).all()


@triton.jit
def _switch_target_kernel(
    switches_ptr, target_ptr, valid_ptr, n, pooled_h, pooled_w, in_h, in_w,
    KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    _, oh, ow = _common.pooled_coordinates(offsets, pooled_h, pooled_w)
    target, valid = _common.switch_target(
        tl.load(switches_ptr + offsets, mask=mask), oh, ow, in_h, in_w,
        KERNEL_H, KERNEL_W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, FLAT,
    )  # fmt: skip
    tl.store(target_ptr + offsets, target, mask=mask)
    tl.store(valid_ptr + offsets, valid.to(tl.int8), mask=mask)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64], ids=DTYPE_IDS)
def test_switch_target_matches_reference(gen, dtype):
    """Random switches, most of them invalid (outside the window, on padding, past the border, negative):
    switch_target agrees with reference.switch_targets on validity, and on the target where valid."""
    kernel, stride, padding, in_size = (3, 4), (2, 3), (1, 2), (9, 10)
    pooled = (5, 4)
    high = in_size[0] * in_size[1] + 5 if dtype == torch.int64 else kernel[0] * kernel[1] + 4
    low = 0 if dtype == torch.uint8 else -3
    switches = torch.randint(low, high, (2, 3, *pooled), generator=gen).to(dtype)
    want_target, want_valid = reference.switch_targets(switches, in_size, kernel, stride, padding)
    assert 0 < int(want_valid.sum()) < want_valid.numel()
    (s,) = on_device(switches)
    target = torch.empty(s.shape, dtype=torch.int32, device=DEVICE)
    valid = torch.empty(s.shape, dtype=torch.int8, device=DEVICE)
    _switch_target_kernel[(1,)](
        s,
        target,
        valid,
        s.numel(),
        *pooled,
        *in_size,
        *kernel,
        *stride,
        *padding,
        dtype == torch.int64,
        BLOCK=128,
    )
    assert torch.equal(valid.cpu().bool(), want_valid)
    assert torch.equal(target.cpu()[want_valid].long(), want_target[want_valid])


# --------------------------------------------------------------------------------------- the ops
_OPS = [
    "max_pool2d_switches",
    "max_pool2d_switches_backward",
    "max_unpool2d",
    "gather_switches",
    "relu",
    "relu_",
    "relu_backward",
    "renormalize_filters_",
]


@pytest.mark.parametrize("name", _OPS)
def test_triton_op_schema_is_the_custom_ops(name):
    ours = str(getattr(torch.ops.zfkernels_triton, name).default._schema)
    theirs = str(getattr(torch.ops.zfkernels, name).default._schema)
    assert ours.replace("zfkernels_triton::", "zfkernels::") == theirs


def _op_samples(gen):
    x = tied((2, 3, 7, 6), torch.float32, gen)
    values, switches = reference.max_pool2d_switches(x, (3, 3), (2, 2), (1, 1), True, True, torch.uint8)
    grad = tied(tuple(values.shape), torch.float32, gen)
    return {
        "max_pool2d_switches": (x, [3, 3], [2, 2], [1, 1], True, True),
        "max_pool2d_switches_backward": (grad, values, switches, [3, 3], [2, 2], [1, 1], [7, 6], True),
        "max_unpool2d": (grad, switches, [3, 3], [2, 2], [1, 1], [7, 6], True),
        "gather_switches": (x, switches, [3, 3], [2, 2], [1, 1]),
        "relu": (x, 2),
        "relu_": (x.clone(),),
        "relu_backward": (grad, values, 2),
        "renormalize_filters_": (x.clone(), 0.5),
    }


@pytest.mark.parametrize("name", _OPS)
def test_opcheck(gen, name):
    """Schema, fake tensors (shapes without running a kernel) and functionalization, on device tensors."""
    args = tuple(on_device(a)[0] if isinstance(a, torch.Tensor) else a for a in _op_samples(gen)[name])
    torch.library.opcheck(
        getattr(torch.ops.zfkernels_triton, name).default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


def test_meta_tensors_give_shapes():
    x = torch.empty(2, 3, 13, 13, device="meta")
    values, switches = torch.ops.zfkernels_triton.max_pool2d_switches(x, [3, 3], [2, 2], [0, 0], True, False)
    assert values.shape == switches.shape == (2, 3, 6, 6) and switches.dtype == torch.uint8
    out = torch.ops.zfkernels_triton.max_unpool2d(values, switches, [3, 3], [2, 2], [0, 0], [13, 13], True)
    assert out.device.type == "meta" and out.shape == x.shape


def test_compile_fullgraph(gen):
    """torch.compile through the ops (traced into the kernels when compiled; opaque ops when interpreted)."""

    def step(x, grad):
        values, switches = torch.ops.zfkernels_triton.max_pool2d_switches(
            x, [3, 3], [2, 2], [0, 0], True, True
        )
        back = torch.ops.zfkernels_triton.max_pool2d_switches_backward(
            grad, values, switches, [3, 3], [2, 2], [0, 0], [9, 9], True
        )
        return torch.ops.zfkernels_triton.relu_backward(back, x, 1), switches

    x, grad = on_device(tied((2, 3, 9, 9), torch.float32, gen), tied((2, 3, 4, 4), torch.float32, gen))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if _common.INTERPRET else "inductor")
    for got, want in zip(compiled(x, grad), step(x, grad), strict=True):
        assert_bitwise_equal(got, want, "compiled")


# ------------------------------------------------------------------------------ the compiled kernels
_COMPILE_SCRIPT = r"""
import importlib
import torch, triton
from triton.backends.compiler import GPUTarget

pool, unpool, relu, renorm = (
    importlib.import_module(f"zfkernels.triton.{name}")
    for name in ("max_pool", "max_unpool", "relu", "renormalize_filters")
)

def build(kernel, pointers, **constants):
    # pointers: {argument: element type}; other runtime arguments are i32 (fp64 when annotated so)
    signature = {}
    for name in kernel.arg_names:
        param = kernel.params[kernel.arg_names.index(name)]
        scalar = "fp64" if "fp64" in param.annotation else "i32"
        signature[name] = "constexpr" if param.is_constexpr else pointers.get(name, scalar)
    source = triton.compiler.ASTSource(kernel, signature, constants)
    assert "cubin" in triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm, kernel.__name__

geometry = dict(KERNEL_H=3, KERNEL_W=3, STRIDE_H=2, STRIDE_W=2, PAD_H=1, PAD_W=1)
wide = dict(KERNEL_H=17, KERNEL_W=17, STRIDE_H=1, STRIDE_W=1, PAD_H=0, PAD_W=0)
pool_bf16 = dict(x_ptr="*bf16", values_ptr="*bf16", switches_ptr="*u8")
build(pool._pool_kernel, pool_bf16, **geometry, RELU=True, INT64=False, BLOCK=128)
pool_f32 = dict(x_ptr="*fp32", values_ptr="*fp32", switches_ptr="*i16")
build(pool._pool_wide_kernel, pool_f32, **wide, RELU=True, INT64=True, BLOCK=128, SEGMENT=32)
unpool_bf16 = dict(values_ptr="*bf16", switches_ptr="*u8", gate_ptr="*bf16", out_ptr="*bf16")
unpool_bf16.update(invalid_ptr="*i32")
flags = dict(FLAT=False, GATE=True, RELU=False, INT64=False, BLOCK=128)
build(unpool._unpool_kernel, unpool_bf16, **geometry, WINDOWS_H=2, WINDOWS_W=2, UNROLL=True, **flags)
unpool_f32 = dict(values_ptr="*fp32", switches_ptr="*i64", gate_ptr="*fp32", out_ptr="*fp32")
unpool_f32.update(invalid_ptr="*i64")
flags = dict(FLAT=True, GATE=False, RELU=True, INT64=True, BLOCK=128)
build(unpool._unpool_kernel, unpool_f32, **wide, WINDOWS_H=17, WINDOWS_W=17, UNROLL=False, **flags)
gather = dict(source_ptr="*bf16", switches_ptr="*i64", out_ptr="*bf16", invalid_ptr="*i32")
build(unpool._gather_kernel, gather, **geometry, FLAT=True, INT64=False, BLOCK=128)
build(relu._relu_kernel, dict(x_ptr="*bf16", out_ptr="*bf16"), INT64=False, BLOCK=4096)
halves = dict(grad_ptr="*fp16", output_ptr="*fp16", out_ptr="*fp16")
build(relu._relu_backward_kernel, halves, RULE=2, INT64=True, BLOCK=4096)
build(renorm._renormalize_kernel, dict(weight_ptr="*bf16"), INT64=False, BLOCK=1024)

# torch.compile's view of the triton_ops: traced with fake CUDA tensors, each decomposes into its kernel
# launches, with no host sync for the invalid-switch check
import logging
from torch._functorch.aot_autograd import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode

logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)  # no driver here
ops = torch.ops.zfkernels_triton

def step(x):
    values, switches = ops.max_pool2d_switches(x, [3, 3], [2, 2], [0, 0], True, True)
    back = ops.max_pool2d_switches_backward(values, values, switches, [3, 3], [2, 2], [0, 0], [13, 13], True)
    gathered = ops.gather_switches(back, switches, [3, 3], [2, 2], [0, 0])
    weight = ops.relu_backward(gathered, values, 2).clone()
    ops.relu_(weight)
    ops.renormalize_filters_(weight, 0.1)
    return ops.relu(weight, 0)

graphs = []
with FakeTensorMode():
    out = aot_function(step, fw_compiler=lambda gm, _: graphs.append(gm.code) or gm)(
        torch.empty(2, 3, 13, 13, device="cuda")
    )
assert out.shape == (2, 3, 6, 6), out.shape
assert graphs[0].count("triton_kernel_wrapper_functional(") == 7, graphs[0]
assert "zfkernels_triton" not in graphs[0] and "_local_scalar_dense" not in graphs[0], graphs[0]
"""


@pytest.mark.skipif(
    not _common.INTERPRET, reason="with a GPU every other test here runs the compiled kernels"
)
def test_compiled_mode_without_a_gpu():
    """The interpreter neither compiles nor traces: in a process without TRITON_INTERPRET each kernel (bf16,
    int64 switches, unrolled and looped variants) is compiled for sm_90 (a GPU-less cubin build), which
    catches errors only the compiler sees, and the triton_ops are traced as torch.compile traces them."""
    import os
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
