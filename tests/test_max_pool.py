"""max_pool2d_switches and switches_to_indices: bit-exact against F.max_pool2d on every backend."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BACKENDS,
    FLOAT_DTYPES,
    POOL_CONFIGS,
    assert_bitwise_equal,
    backend_outputs,
    distinct,
    make_input,
    tied,
)

import zfkernels as zk

pytestmark = pytest.mark.usefixtures("single_thread")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def expected_switch_dtype(kernel):
    kh, kw = _pair(kernel)
    return torch.uint8 if kh * kw <= 256 else torch.int16 if kh * kw <= 32768 else torch.int32


def expected_switches(indices, width, kernel, stride, padding):
    """Window-local offsets kh * kW + kw of torch's flat indices, from the definition."""
    kh_, kw_ = _pair(kernel)
    sh, sw = _pair(stride if stride is not None else kernel)
    ph, pw = _pair(padding)
    oh = torch.arange(indices.shape[-2]).view(-1, 1)
    ow = torch.arange(indices.shape[-1]).view(1, -1)
    dh = indices // width - (oh * sh - ph)
    dw = indices % width - (ow * sw - pw)
    assert bool(((dh >= 0) & (dh < kh_) & (dw >= 0) & (dw < kw_)).all())
    return dh * kw_ + dw


def check_pool(x, kernel, stride, padding, ceil_mode, relu):
    values, switches = zk.max_pool2d_switches(x, kernel, stride, padding, ceil_mode, relu=relu)
    source = F.relu(x) if relu else x
    exp_values, exp_indices = F.max_pool2d(
        source, kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True
    )
    assert_bitwise_equal(values, exp_values, "values")
    assert switches.dtype == expected_switch_dtype(kernel)
    assert values.is_contiguous() and switches.is_contiguous()
    offsets = expected_switches(exp_indices, x.shape[-1], kernel, stride, padding)
    assert_bitwise_equal(switches.to(torch.int64), offsets, "switches")
    indices = zk.switches_to_indices(switches, x.shape, kernel, stride, padding)
    assert_bitwise_equal(indices, exp_indices, "switches_to_indices")
    return values, switches


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("kind", ["distinct", "ties", "zeros", "nan", "neg_inf"])
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, size", POOL_CONFIGS)
def test_matches_torch(backend, gen, kernel, stride, padding, ceil_mode, size, kind, relu):
    x = make_input(kind, (2, 3, *size), torch.float32, gen)
    values, _ = check_pool(x, kernel, stride, padding, ceil_mode, relu)
    if kind == "neg_inf" and not relu and min(size) >= 5:
        assert (values == float("-inf")).any(), "no -inf-only window in this input"


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("kind", ["ties", "nan", "neg_inf"])
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, size", POOL_CONFIGS[:7])
def test_backends_agree_bitwise(gen, kernel, stride, padding, ceil_mode, size, kind, relu):
    x = make_input(kind, (2, 3, *size), torch.float32, gen)
    results = backend_outputs(zk.max_pool2d_switches, x, kernel, stride, padding, ceil_mode, relu=relu)
    for name in BACKENDS[1:]:
        assert_bitwise_equal(results[name][0], results[BACKENDS[0]][0], f"values {name} vs {BACKENDS[0]}")
        assert_bitwise_equal(results[name][1], results[BACKENDS[0]][1], f"switches {name} vs {BACKENDS[0]}")


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16],
    ids=lambda d: str(d).split(".")[-1],
)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("kind", ["distinct", "ties", "nan", "neg_inf"])
@pytest.mark.parametrize(
    "kernel, stride, padding, ceil_mode, size", [POOL_CONFIGS[0], POOL_CONFIGS[5], POOL_CONFIGS[6]]
)
def test_dtypes(backend, gen, kernel, stride, padding, ceil_mode, size, kind, relu, dtype):
    x = make_input(kind, (2, 3, *size), dtype, gen)
    check_pool(x, kernel, stride, padding, ceil_mode, relu)


def test_nan_last_in_window_wins(backend):
    # Two NaNs in one window: torch keeps the last one in row-major order, and so must we.
    x = torch.tensor([[[[1.0, float("nan"), 5.0], [float("nan"), 7.0, 2.0], [0.0, 3.0, float("nan")]]]])
    values, switches = check_pool(x, 3, 1, 0, False, False)
    assert values.isnan().all() and switches.item() == 8
    x[..., 2, 2] = 9.0
    values, switches = check_pool(x, 3, 1, 0, False, False)
    assert values.isnan().all() and switches.item() == 3


def test_signed_zero_and_relu_zero_window(backend):
    # -0.0 and +0.0 compare equal, so the first one wins; relu keeps -0.0 as torch.relu does.
    x = torch.tensor([[[[-0.0, 0.0], [-1.0, -2.0]]]])
    for relu in (False, True):
        values, switches = check_pool(x, 2, 2, 0, False, relu)
        assert switches.item() == 0


def test_ties_take_first_in_row_major_order(backend):
    x = torch.zeros(1, 1, 5, 5)
    x[..., 1, 2] = 4.0
    x[..., 2, 1] = 4.0  # same value later in row-major order: loses
    values, switches = check_pool(x, 3, 2, 0, False, False)
    assert switches[0, 0, 0, 0].item() == 1 * 3 + 2


@pytest.mark.parametrize("kind", ["distinct", "ties"])
@pytest.mark.parametrize(
    "kernel, size",
    [((17, 17), (17, 17)), ((16, 17), (18, 19)), ((16, 16), (16, 16))],
    ids=["17x17_int16", "16x17_int16", "16x16_uint8_255"],
)
def test_large_windows(backend, gen, kernel, size, kind):
    x = make_input(kind, (2, 2, *size), torch.float32, gen)
    check_pool(x, kernel, 1, 0, False, False)
    check_pool(x, kernel, 1, 0, False, True)


def test_uint8_switch_holds_last_offset_of_a_256_window(backend):
    x = torch.zeros(1, 1, 16, 16)
    x[..., 15, 15] = 1.0
    _, switches = check_pool(x, 16, 1, 0, False, False)
    assert switches.dtype == torch.uint8 and switches.item() == 255


def test_int32_switches_for_huge_window(backend):
    x = torch.zeros(1, 1, 182, 182)
    x[..., 181, 180] = 1.0  # window of 182*182 = 33124 > 32768 elements
    _, switches = check_pool(x, 182, 1, 0, False, False)
    assert switches.dtype == torch.int32 and switches.item() == 181 * 182 + 180


# ----------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize(
    "kernel, stride, padding, ceil_mode", [(3, 2, 0, True), (3, 1, 1, False), ((2, 3), (2, 1), 1, False)]
)
def test_gradcheck(backend, grad_checks, gen, kernel, stride, padding, ceil_mode, relu):
    gradcheck, gradgradcheck = grad_checks
    x = distinct((1, 2, 7, 6), torch.float64, gen).requires_grad_()
    fn = lambda t: zk.max_pool2d_switches(t, kernel, stride, padding, ceil_mode, relu=relu)[0]
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_backward_equals_torch_on_ties(backend, gen, relu, dtype):
    # Overlapping windows share argmaxes on tied input: torch's max_pool2d backward sums there in
    # row-major order of the pooled map, and so does ours, bit for bit.
    x = tied((2, 3, 9, 9), dtype, gen)
    grad_out = tied((2, 3, 4, 4), dtype, gen)
    ours = x.clone().requires_grad_()
    theirs = x.clone().requires_grad_()
    zk.max_pool2d_switches(ours, 3, 2, 0, True, relu=relu)[0].backward(grad_out)
    F.max_pool2d(F.relu(theirs) if relu else theirs, 3, 2, 0, ceil_mode=True).backward(grad_out)
    assert_bitwise_equal(ours.grad, theirs.grad, "grad_input")
    assert (ours.grad.abs() > grad_out.abs().max()).any() or not relu  # some summed positions exist


def test_switches_are_not_differentiable(gen):
    x = distinct((1, 1, 4, 4), torch.float64, gen).requires_grad_()
    values, switches = zk.max_pool2d_switches(x, 2)
    assert values.requires_grad and not switches.requires_grad


# ------------------------------------------------------------------------------------ opcheck/compile
def _opcheck_samples():
    g = torch.Generator().manual_seed(1)
    return [
        (distinct((2, 3, 7, 7), torch.float64, g).requires_grad_(), [3, 3], [2, 2], [0, 0], True, False),
        (distinct((1, 2, 6, 5), torch.float64, g).requires_grad_(), [2, 2], [2, 2], [0, 0], False, True),
        (tied((2, 2, 6, 6), torch.float32, g).requires_grad_(), [3, 3], [1, 1], [1, 1], False, False),
        (tied((1, 2, 5, 7), torch.float32, g), [2, 3], [1, 2], [1, 1], True, True),
        # No NaN samples: opcheck compares with assert_close(equal_nan=False), where NaN != NaN.
        (make_input("neg_inf", (1, 2, 6, 6), torch.float16, g), [3, 3], [2, 2], [1, 1], True, False),
        (tied((1, 1, 17, 17), torch.bfloat16, g), [17, 17], [1, 1], [0, 0], False, False),
        (tied((0, 2, 6, 6), torch.float32, g), [2, 2], [2, 2], [0, 0], False, False),
    ]


@pytest.mark.parametrize("sample", range(7))
def test_opcheck(backend, sample):
    torch.library.opcheck(torch.ops.zfkernels.max_pool2d_switches.default, _opcheck_samples()[sample])


def test_compile_fullgraph(gen):
    def fn(x):
        values, switches = zk.max_pool2d_switches(x, 3, 2, 0, True, relu=True)
        return values, switches, zk.switches_to_indices(switches, x.shape, 3, 2, 0)

    x = tied((2, 3, 13, 13), torch.float32, gen)
    compiled = torch.compile(fn, fullgraph=True)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = compiled(xc), fn(xe)
    for name, a, b in zip(["values", "switches", "indices"], got, want, strict=True):
        assert_bitwise_equal(a, b, f"compiled {name}")
    got[0].sum().backward()
    want[0].sum().backward()
    assert_bitwise_equal(xc.grad, xe.grad, "compiled grad")


# ---------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "expanded"])
def test_non_contiguous_layouts(backend, gen, layout):
    base = tied((2, 4, 15, 13), torch.float32, gen)
    if layout == "transposed":
        x = base.transpose(-1, -2)
    elif layout == "sliced":
        x = base[:, 1::2, 1:, ::2]
    elif layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    else:
        x = base[:1, :1].expand(2, 3, 15, 13)
    assert not x.is_contiguous()
    for relu in (False, True):
        check_pool(x, 3, 2, 0, True, relu)
        check_pool(x, (2, 3), 1, 1, False, relu)


def test_unbatched(backend, gen):
    x = tied((3, 9, 8), torch.float32, gen)
    values, switches = zk.max_pool2d_switches(x, 3, 2, ceil_mode=True, relu=True)
    exp_values, exp_indices = F.max_pool2d(F.relu(x), 3, 2, ceil_mode=True, return_indices=True)
    assert_bitwise_equal(values, exp_values, "values")
    assert switches.shape == (3, 4, 4)
    assert_bitwise_equal(zk.switches_to_indices(switches, x.shape, 3, 2), exp_indices, "indices")
    batched_values, batched_switches = zk.max_pool2d_switches(x[None], 3, 2, ceil_mode=True, relu=True)
    assert_bitwise_equal(switches, batched_switches[0], "switches")


def test_empty_batch(backend):
    x = torch.empty(0, 3, 7, 7)
    values, switches = zk.max_pool2d_switches(x, 3, 2, ceil_mode=True)
    assert values.shape == switches.shape == (0, 3, 3, 3)
    assert switches.dtype == torch.uint8
    assert zk.switches_to_indices(switches, x.shape, 3, 2).shape == (0, 3, 3, 3)


def test_empty_batch_backward(backend):
    x = torch.empty(0, 3, 7, 7)
    xg = x.clone().requires_grad_()
    zk.max_pool2d_switches(xg, 3, 2, ceil_mode=True)[0].sum().backward()
    assert xg.grad.shape == x.shape


def test_meta_tensors_give_shapes():
    values, switches = zk.max_pool2d_switches(torch.empty(2, 3, 13, 13, device="meta"), 3, 2, ceil_mode=True)
    assert values.device.type == "meta" and values.shape == switches.shape == (2, 3, 6, 6)
    assert switches.dtype == torch.uint8


# ------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.zeros(4, 4), 2), {}, ValueError, "input"),
        ((torch.zeros(1, 1, 1, 4, 4), 2), {}, ValueError, "input"),
        ((torch.zeros(1, 1, 4, 4, dtype=torch.int32), 2), {}, TypeError, "input"),
        ((torch.zeros(1, 1, 4, 4, dtype=torch.bool), 2), {}, TypeError, "input"),
        (([[1.0, 2.0]], 2), {}, TypeError, "input"),
        ((torch.zeros(1, 1, 2, 2), 3), {}, ValueError, "kernel_size"),
        ((torch.zeros(1, 1, 4, 4), (2, 6)), {}, ValueError, "kernel_size"),
        ((torch.zeros(1, 1, 4, 4), 0), {}, ValueError, "kernel_size"),
        ((torch.zeros(1, 1, 4, 4), (2, 2, 2)), {}, TypeError, "kernel_size"),
        ((torch.zeros(1, 1, 4, 4), 2.0), {}, TypeError, "kernel_size"),
        ((torch.zeros(1, 1, 4, 4), 2, 0), {}, ValueError, "stride"),
        ((torch.zeros(1, 1, 4, 4), 3, 1, 2), {}, ValueError, "padding"),
        ((torch.zeros(1, 1, 4, 4), 3, 1, -1), {}, ValueError, "padding"),
        ((torch.zeros(1, 1, 4, 4), 2, 2, 0, 1), {}, TypeError, "ceil_mode"),
    ],
)
def test_bad_inputs(backend, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        zk.max_pool2d_switches(*args, **kwargs)


def test_switches_to_indices_bad_inputs(backend):
    switches = torch.zeros(1, 1, 3, 3, dtype=torch.uint8)
    with pytest.raises(TypeError, match="switches"):
        zk.switches_to_indices(switches.float(), (7, 7), 3, 2)
    with pytest.raises(ValueError, match="switches"):
        zk.switches_to_indices(switches[0, 0, 0], (7, 7), 3, 2)
    with pytest.raises(TypeError, match="input_size"):
        zk.switches_to_indices(switches, 7, 3, 2)
    bad = switches.clone()
    bad[0, 0, 1, 1] = 9  # a 3x3 window has offsets 0..8
    with pytest.raises(ValueError, match="switches"):
        zk.switches_to_indices(bad, (7, 7), 3, 2)
    # ceil_mode on width 6: the last window covers columns 4..6, and column 6 is past the border.
    _, edge = zk.max_pool2d_switches(torch.zeros(1, 1, 6, 6), 3, 2, ceil_mode=True)
    edge[0, 0, 0, 2] = 2
    with pytest.raises(ValueError, match="switches"):
        zk.switches_to_indices(edge, (6, 6), 3, 2)
    # with padding 1 the first window's offset 0 is the padding corner
    _, padded = zk.max_pool2d_switches(torch.zeros(1, 1, 5, 5), 3, 2, 1)
    padded[0, 0, 0, 0] = 0
    with pytest.raises(ValueError, match="switches"):
        zk.switches_to_indices(padded, (5, 5), 3, 2, 1)


# ------------------------------------------------------------------------------- the backward op itself
def _backward_samples():
    g = torch.Generator().manual_seed(2)
    samples = []
    for x, kernel, stride, padding, ceil_mode, relu in _opcheck_samples()[:4]:
        values, switches = zk.max_pool2d_switches(x.detach(), kernel, stride, padding, ceil_mode, relu=relu)
        grad = tied(tuple(values.shape), values.dtype, g)
        samples.append((grad, values, switches, kernel, stride, padding, list(x.shape[-2:]), relu))
    return samples


@pytest.mark.parametrize("sample", range(4))
def test_backward_op_opcheck(backend, sample):
    torch.library.opcheck(
        torch.ops.zfkernels.max_pool2d_switches_backward.default, _backward_samples()[sample]
    )


def test_backward_gate_matches_relu_backward_with_nan_and_zeros(backend, gen):
    # The fused ReLU gates the gradient by the pooled values as threshold_backward does: a value <= 0
    # (including -0.0) blocks it, a NaN value lets it through.
    x = tied((2, 3, 9, 9), torch.float32, gen)
    x.view(-1)[::13] = float("nan")
    x.view(-1)[5::11] = -0.0
    values, switches = zk.max_pool2d_switches(x, 3, 2, 0, True, relu=True)
    grad = tied(tuple(values.shape), torch.float32, gen)
    fused = torch.ops.zfkernels.max_pool2d_switches_backward(
        grad, values, switches, [3, 3], [2, 2], [0, 0], [9, 9], True
    )
    gated = zk.relu_backward(grad, values)
    unfused = zk.max_unpool2d(gated, switches, 3, 2, 0, output_size=(9, 9))
    assert_bitwise_equal(fused, unfused, "gated backward")


# ---------------------------------------------------------------------------------------- vector groups
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)  # half types: widened planes on the float vector path
@pytest.mark.parametrize("stride", [1, 2])
def test_every_row_width_and_vector_grouping(gen, dtype, stride):
    """The CPU kernel covers a row with groups of 1 to 4 vectors (the tail group shifted left), and clipped
    border columns 8 (or 4) rows at a time where rows allow, element by element elsewhere; the 3x3 stride-2
    walk also takes a bottom row (right column) that ceil_mode clips by one input row (column), as on even
    sizes here: every width from 3 to 80, at heights with and without whole row groups and a clipped bottom
    row, exercises each path against F.max_pool2d."""
    for width in range(3, 81):
        for height in (5, 6, 23):
            for padding, ceil_mode in ((0, True), (1, False)):
                x = tied((1, 2, height, width), dtype, gen)
                check_pool(x, 3, stride, padding, ceil_mode, True)
                check_pool(x, 3, stride, padding, ceil_mode, False)


@pytest.mark.parametrize("height", [9, 10])
@pytest.mark.parametrize("width", [17, 32, 33, 40, 52, 55, 96, 110])
def test_a_single_nan_anywhere_in_the_plane(gen, width, height):
    """The 3x3 stride-2 walk assumes no NaN and checks the elements it reads as it goes, walking again when
    one turns up: plane i of the batch holds one NaN, at flat position i, so every position is checked,
    including the last element a vector group reads, the clipped bottom row and right column the walk takes
    (even sizes, ceil_mode; the column in a 16-lane group at widths 32, 52 and 96, in an 8-lane one at 40
    and 110) and the borders it leaves to other code."""
    x = tied((height * width, height, width), torch.float32, gen)
    x.view(height * width, -1).diagonal().fill_(float("nan"))
    for relu in (False, True):
        check_pool(x, 3, 2, 0, True, relu)
        check_pool(x, 3, 2, 1, False, relu)


def test_avx2_walk_matches_torch_where_avx512_is_present():
    """ZFK_NO_AVX512=1 makes the CPU kernels take their AVX2 paths even on an AVX-512 machine, so both
    versions of the 3x3 stride-2 walk are checked here, NaN rerun included."""
    script = (
        "import torch, test_max_pool as t\n"
        "g = torch.Generator().manual_seed(0)\n"
        "t.test_a_single_nan_anywhere_in_the_plane(g, 40, 10)\n"
        "for w in range(17, 60, 3):\n"
        "    x = t.tied((2, 3, 23, w), torch.float32, g)\n"
        "    for relu in (False, True):\n"
        "        t.check_pool(x, 3, 2, 0, True, relu)\n"
    )
    env = dict(os.environ, ZFK_NO_AVX512="1", PYTHONPATH=os.path.dirname(__file__))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("special", ["nan", "neg_inf"])
def test_border_columns_with_nan_and_infinities(gen, special, dtype):
    """Border columns taken L rows at a time follow torch for NaN (last NaN wins) and -inf windows too."""
    for width in (9, 17, 30, 52):
        x = make_input(special, (2, 3, 40, width), dtype, gen)
        for relu in (False, True):
            check_pool(x, 3, 2, 1, True, relu)
            check_pool(x, 3, 2, 0, True, relu)  # even sizes: the walk takes the clipped last row and column
            check_pool(x, (3, 2), (2, 1), (1, 0), False, relu)
