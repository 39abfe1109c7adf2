"""unpool_conv_transpose2d: the fused deconvnet step equals conv_transpose2d(relu(unpool(values)), weight)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BACKENDS,
    assert_close_verbose,
    backend_outputs,
    invalid_switch_cases,
    max_abs_error,
    tied,
)
from test_conv_transpose import (
    NONFINITE_OUT_CHANNELS,
    assert_same_nonfinite,
    exact_conv_transpose2d,
    nonfinite_tolerance,
    randint,
    sprinkle_nonfinite,
)
from test_max_unpool import SMALL_MEMORY, peak_rss_growth

import zfkernels as zk
from zfkernels.ops import reference
from zfkernels.ops._checks import pooled_shape, switch_dtype

pytestmark = pytest.mark.usefixtures("single_thread")

# pool: (kernel, stride, padding, ceil_mode, unpool (H, W)); conv: (kernel (kH, kW), stride, padding,
# output_padding); channels in and out. Output channel counts cover every register block width the cpu
# kernel picks (8 for few channels, 32, 48, 64).
FUSED_CONFIGS = [
    pytest.param((3, 2, 0, True, (13, 13)), ((3, 3), 1, 1, 0), 3, 4, id="zfnet_conv5_3x3"),
    pytest.param((3, 2, 0, True, (16, 16)), ((7, 7), 2, 1, 1), 4, 3, id="zfnet_conv1_shrunk_7x7s2"),
    pytest.param((2, 2, 0, False, (8, 8)), ((5, 5), 2, 2, 1), 3, 33, id="2s2_conv5x5s2_block32"),
    pytest.param((3, 1, 1, False, (6, 7)), ((2, 3), (2, 1), (0, 1), (1, 0)), 2, 48, id="3s1p1_rect_block48"),
    pytest.param(((2, 3), (1, 2), 1, False, (6, 7)), ((3, 3), 1, 0, 0), 2, 64, id="rectpool_block64"),
    pytest.param((3, 2, 1, True, (7, 6)), ((3, 3), 3, 0, 2), 2, 5, id="3s2p1_ceil_conv_stride3"),
    # At most 4 output channels take the row-vectorized path: kernel rows of 1, 2 and 4 vectors.
    pytest.param((3, 2, 0, False, (15, 15)), ((11, 11), 4, 2, 3), 5, 3, id="alexnet_conv1_11x11s4_rows"),
    pytest.param((3, 2, 0, True, (9, 10)), ((3, 13), (2, 1), (1, 5), (1, 0)), 3, 2, id="rect_3x13_rows"),
    pytest.param((2, 2, 0, False, (6, 6)), ((4, 20), (1, 3), (0, 2), (0, 2)), 2, 1, id="wide_4x20_rows"),
]
DTYPE_IDS = lambda d: str(d).split(".")[-1]


def make_case(pool, c_in, c_out, kernel, dtype, generator, batch=2, use_indices=False):
    """Pooled tied input (shared argmaxes), mixed-sign values (so relu after the sum matters), a weight."""
    pool_kernel, pool_stride, pool_padding, ceil_mode, size = pool
    x = tied((batch, c_in, *size), dtype, generator)
    _, switches = zk.max_pool2d_switches(x, pool_kernel, pool_stride, pool_padding, ceil_mode)
    if use_indices:
        switches = zk.switches_to_indices(switches, size, pool_kernel, pool_stride, pool_padding)
    values = (torch.randn(switches.shape, generator=generator, dtype=torch.float64) - 0.3).to(dtype)
    weight = torch.randn(c_in, c_out, *kernel, generator=generator, dtype=torch.float64).to(dtype)
    return values, switches, weight


def reference_result(values, switches, weight, pool, conv, relu, dtype=torch.float64):
    """F.conv_transpose2d of the reference unpool(+relu), computed in `dtype`."""
    pool_kernel, pool_stride, pool_padding, _, size = pool
    _, stride, padding, output_padding = conv
    unpooled = zk.max_unpool2d(
        values.to(dtype), switches, pool_kernel, pool_stride, pool_padding, size, relu=relu
    )
    return F.conv_transpose2d(unpooled, weight.to(dtype), None, stride, padding, output_padding)


def fused(values, switches, weight, pool, conv, relu):
    pool_kernel, pool_stride, pool_padding, _, size = pool
    _, stride, padding, output_padding = conv
    return zk.unpool_conv_transpose2d(
        values,
        switches,
        weight,
        pool_kernel_size=pool_kernel,
        pool_stride=pool_stride,
        pool_padding=pool_padding,
        unpool_size=size,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        relu=relu,
    )


def check_fused(values, switches, weight, pool, conv, relu):
    out = fused(values, switches, weight, pool, conv, relu)
    with zk.use_backend("reference"):
        expected = reference_result(values, switches, weight, pool, conv, relu)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    if values.dtype == torch.float64:
        assert_close_verbose(out, expected, rtol=1e-10, atol=1e-10 * scale, label="fp64")
    elif values.dtype == torch.float32:
        assert_close_verbose(out, expected.float(), rtol=1e-4, atol=1e-5 * scale, label="fp32")
    else:  # at most twice the error of the unfused torch computation in the same dtype
        with zk.use_backend("reference"):
            unfused = reference_result(values, switches, weight, pool, conv, relu, values.dtype)
        ours, torchs = max_abs_error(out, expected), max_abs_error(unfused, expected)
        assert out.dtype == values.dtype
        assert ours <= 2 * torchs + 1e-5, f"{values.dtype}: error {ours} > 2 x unfused torch's {torchs}"
    return out


@pytest.mark.parametrize("use_indices", [False, True], ids=["switches", "indices"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("pool, conv, c_in, c_out", FUSED_CONFIGS)
def test_matches_unfused(backend, gen, pool, conv, c_in, c_out, dtype, relu, use_indices):
    values, switches, weight = make_case(pool, c_in, c_out, conv[0], dtype, gen, use_indices=use_indices)
    pool_kernel, pool_stride = pool[0], pool[1]
    if pool_kernel != pool_stride:  # overlapping windows on tied input: some argmaxes are shared
        flat = zk.switches_to_indices(switches, pool[4], *pool[:3]) if not use_indices else switches
        flat = flat.flatten(1)
        assert any(row.unique().numel() < row.numel() for row in flat), "no shared argmax in this case"
    assert (values < 0).any() and (values > 0).any()
    out = check_fused(values, switches, weight, pool, conv, relu)
    if relu:  # relu after the sum changes the result: the negative sums are dropped
        other = fused(values, switches, weight, pool, conv, False)
        assert not torch.allclose(out, other)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize("pool, conv, c_in, c_out", FUSED_CONFIGS[:3])
def test_low_precision(backend, gen, pool, conv, c_in, c_out, dtype):
    values, switches, weight = make_case(pool, c_in, c_out, conv[0], dtype, gen)
    check_fused(values, switches, weight, pool, conv, True)


def test_relu_after_the_sum_matters(backend):
    # Four windows share the argmax (2, 2) with values 3, -1, -1, -0.5: relu of the sum is 0.5, while
    # the sum of relus would be 3, and no relu at all gives the sum itself.
    x = torch.zeros(1, 1, 5, 5)
    x[..., 2, 2] = 1.0
    _, switches = zk.max_pool2d_switches(x, 3, 2)
    values = torch.tensor([[[[3.0, -1.0], [-1.0, -0.5]]]])
    weight = torch.ones(1, 1, 1, 1)
    common = dict(pool_kernel_size=3, pool_stride=2, unpool_size=(5, 5))
    out = zk.unpool_conv_transpose2d(values, switches, weight, **common)
    assert out[0, 0, 2, 2].item() == 0.5 and out.count_nonzero().item() == 1
    out = zk.unpool_conv_transpose2d(-values, switches, weight, **common)
    assert out.count_nonzero().item() == 0
    out = zk.unpool_conv_transpose2d(-values, switches, weight, relu=False, **common)
    assert out[0, 0, 2, 2].item() == -0.5


def test_all_negative_values_give_zero(backend, gen):
    values, switches, weight = make_case(FUSED_CONFIGS[0].values[0], 3, 4, (3, 3), torch.float32, gen)
    out = fused(-values.abs(), switches, weight, FUSED_CONFIGS[0].values[0], FUSED_CONFIGS[0].values[1], True)
    assert out.count_nonzero().item() == 0


@pytest.mark.parametrize("pool, conv, c_in, c_out", FUSED_CONFIGS[:4])
def test_backends_agree(gen, pool, conv, c_in, c_out):
    values, switches, weight = make_case(pool, c_in, c_out, conv[0], torch.float32, gen)
    results = backend_outputs(fused, values, switches, weight, pool, conv, True)
    for name in BACKENDS[1:]:
        assert_close_verbose(results[name], results[BACKENDS[0]], rtol=1e-4, atol=1e-4, label=name)


# ----------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "plain"])
@pytest.mark.parametrize(
    "pool, conv",
    [
        pytest.param((3, 2, 0, True, (5, 5)), ((3, 3), 1, 1, 0), id="3s2_conv3x3"),
        pytest.param((2, 1, 1, False, (3, 4)), ((2, 3), 2, 0, 1), id="2s1p1_conv_stride2"),
    ],
)
def test_gradcheck(backend, grad_checks, gen, pool, conv, relu):
    gradcheck, _ = grad_checks
    values, switches, weight = make_case(pool, 2, 2, conv[0], torch.float64, gen, batch=1)
    values, weight = values.requires_grad_(), weight.requires_grad_()
    assert gradcheck(lambda v, w: fused(v, switches, w, pool, conv, relu), (values, weight))


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "plain"])
def test_gradgradcheck(backend, grad_checks, gen, relu):
    _, gradgradcheck = grad_checks
    pool, conv = (3, 2, 0, True, (5, 5)), ((2, 2), 2, 0, 1)
    values, switches, weight = make_case(pool, 2, 1, conv[0], torch.float64, gen, batch=1)
    values, weight = values.requires_grad_(), weight.requires_grad_()
    assert gradgradcheck(lambda v, w: fused(v, switches, w, pool, conv, relu), (values, weight))


def test_gradients_match_unfused(backend, gen):
    pool, conv = FUSED_CONFIGS[1].values[:2]
    values, switches, weight = make_case(pool, 4, 3, conv[0], torch.float64, gen)
    grads = []
    for fn in (fused, reference_result):
        v, w = values.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(v, switches, w, pool, conv, True)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=torch.float64)).view_as(out))
        grads.append((v.grad, w.grad))
    assert_close_verbose(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-10, label="grad values")
    assert_close_verbose(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-10, label="grad weight")


# ------------------------------------------------------------------------------------ opcheck/compile
def _samples():
    g = torch.Generator().manual_seed(5)
    samples = []
    for pool, conv, c_in, c_out, dtype, relu, use_indices, grad in [
        ((3, 2, 0, True, (5, 5)), ((3, 3), 1, 1, 0), 2, 3, torch.float64, True, False, True),
        ((2, 1, 1, False, (3, 4)), ((2, 3), 2, 0, 1), 2, 2, torch.float64, False, True, True),
        ((3, 2, 0, True, (7, 7)), ((3, 3), 2, 1, 1), 3, 33, torch.float32, True, False, True),
        ((2, 2, 0, False, (4, 4)), ((3, 3), 1, 1, 0), 2, 4, torch.float16, True, False, False),
    ]:
        values, switches, weight = make_case(
            pool, c_in, c_out, conv[0], dtype, g, batch=2, use_indices=use_indices
        )
        k = list(pool[0]) if isinstance(pool[0], tuple) else [pool[0]] * 2
        s = list(pool[1]) if isinstance(pool[1], tuple) else [pool[1]] * 2
        p = list(pool[2]) if isinstance(pool[2], tuple) else [pool[2]] * 2
        pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]
        samples.append(
            (
                values.requires_grad_(grad),
                switches,
                weight.requires_grad_(grad),
                k,
                s,
                p,
                list(pool[4]),
                pair(conv[1]),
                pair(conv[2]),
                pair(conv[3]),
                relu,
            )
        )
    return samples


@pytest.mark.parametrize("sample", range(4))
def test_opcheck(backend, sample):
    torch.library.opcheck(torch.ops.zfkernels.unpool_conv_transpose2d.default, _samples()[sample])


def test_compile_fullgraph(gen):
    pool, conv = FUSED_CONFIGS[0].values[:2]
    values, switches, weight = make_case(pool, 3, 4, conv[0], torch.float32, gen)
    fn = lambda v, w: fused(v, switches, w, pool, conv, True)
    compiled = torch.compile(fn, fullgraph=True)
    vc, wc = values.clone().requires_grad_(), weight.clone().requires_grad_()
    ve, we = values.clone().requires_grad_(), weight.clone().requires_grad_()
    got, want = compiled(vc, wc), fn(ve, we)
    assert_close_verbose(got, want, rtol=1e-5, atol=1e-5, label="compiled")
    got.square().sum().backward()
    want.square().sum().backward()
    assert_close_verbose(vc.grad, ve.grad, rtol=1e-4, atol=1e-4, label="compiled grad values")
    assert_close_verbose(wc.grad, we.grad, rtol=1e-4, atol=1e-4, label="compiled grad weight")


# ---------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_non_contiguous_layouts(backend, gen, layout):
    pool, conv = FUSED_CONFIGS[1].values[:2]
    values, switches, weight = make_case(pool, 4, 3, conv[0], torch.float32, gen)
    expected = fused(values, switches, weight, pool, conv, True)
    if layout == "transposed":
        remake = lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":
        remake = lambda t: torch.stack([t, t], dim=-1)[..., 0]
    else:
        remake = lambda t: t.contiguous(memory_format=torch.channels_last)
    v, s, w = remake(values), remake(switches), remake(weight)
    assert not v.is_contiguous() and not s.is_contiguous() and not w.is_contiguous()
    assert_close_verbose(fused(v, s, w, pool, conv, True), expected, rtol=1e-6, atol=1e-6, label=layout)


def test_unbatched(backend, gen):
    pool, conv = FUSED_CONFIGS[0].values[:2]
    values, switches, weight = make_case(pool, 3, 4, conv[0], torch.float32, gen, batch=1)
    out = fused(values[0], switches[0], weight, pool, conv, True)
    assert out.shape == (4, 13, 13)
    assert_close_verbose(
        out, fused(values, switches, weight, pool, conv, True)[0], rtol=1e-6, atol=1e-6, label="unbatched"
    )


def test_empty_batch(backend, gen):
    pool, conv = FUSED_CONFIGS[1].values[:2]
    values, switches, weight = make_case(pool, 4, 3, conv[0], torch.float32, gen, batch=0)
    assert values.shape[0] == 0
    assert fused(values, switches, weight, pool, conv, True).shape == (0, 3, 36, 36)


def test_empty_batch_backward(backend, gen):
    pool, conv = FUSED_CONFIGS[1].values[:2]
    values, switches, weight = make_case(pool, 4, 3, conv[0], torch.float32, gen, batch=0)
    values.requires_grad_()
    weight.requires_grad_()
    fused(values, switches, weight, pool, conv, True).sum().backward()
    assert values.grad.shape == values.shape and weight.grad.shape == weight.shape


# ------------------------------------------------------------------------------------- bad inputs
def _valid():
    x = torch.arange(49.0).view(1, 1, 7, 7)
    values, switches = zk.max_pool2d_switches(x, 3, 2)
    return values, switches, torch.randn(1, 2, 3, 3)


COMMON = dict(pool_kernel_size=3, pool_stride=2, unpool_size=(7, 7))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda v, s, w: ((v[0, 0], s[0, 0], w), {}), ValueError, "values"),
        (lambda v, s, w: ((v.long(), s, w), {}), TypeError, "values"),
        (lambda v, s, w: ((v, s.double(), w), {}), TypeError, "switches"),
        (lambda v, s, w: ((v, s[..., :2], w), {}), ValueError, "switches"),
        (lambda v, s, w: ((v, s, w[0]), {}), ValueError, "weight"),
        (lambda v, s, w: ((v, s, w.double()), {}), TypeError, "weight"),
        (lambda v, s, w: ((v, s, torch.randn(2, 2, 3, 3)), {}), ValueError, "weight"),
        (lambda v, s, w: ((v, s, w), {"unpool_size": (9, 9)}), ValueError, "unpool_size"),
        (lambda v, s, w: ((v, s, w), {"unpool_size": (7, 4)}), ValueError, "unpool_size"),
        (lambda v, s, w: ((v, s, w), {"stride": 0}), ValueError, "stride"),
        (lambda v, s, w: ((v, s, w), {"padding": -1}), ValueError, "padding"),
        (lambda v, s, w: ((v, s, w), {"padding": 9}), ValueError, "padding"),
        (lambda v, s, w: ((v, s, w), {"output_padding": 1}), ValueError, "output_padding"),
        (lambda v, s, w: ((v, s, w), {"stride": 2, "output_padding": 2}), ValueError, "output_padding"),
        (lambda v, s, w: ((v, s, w.to("meta")), {}), ValueError, "weight"),
        (lambda v, s, w: ((v, s.to("meta"), w), {}), ValueError, "switches"),
        (lambda v, s, w: ((v.to("meta"), s, w), {}), ValueError, "values"),
        # the pooling arguments sit beside stride/padding of the convolution: errors must say which one
        pytest.param(
            lambda v, s, w: ((v, s, w), {"pool_kernel_size": 0}),
            ValueError,
            "pool_kernel_size",
            id="pool_kernel_size_0",
        ),
        pytest.param(
            lambda v, s, w: ((v, s, w), {"pool_stride": 0}), ValueError, "pool_stride", id="pool_stride_0"
        ),
        pytest.param(
            lambda v, s, w: ((v, s, w), {"pool_padding": 2}),
            ValueError,
            "pool_padding",
            id="pool_padding_too_large",
        ),
    ],
)
def test_bad_inputs(backend, make, error, match):
    args, kwargs = make(*_valid())
    with pytest.raises(error, match=match):
        zk.unpool_conv_transpose2d(*args, **{**COMMON, **kwargs})


@pytest.mark.parametrize("case", list(invalid_switch_cases()))
def test_switches_outside_window_raise(backend, case):
    values, switches, kernel, stride, padding, size = invalid_switch_cases()[case]
    weight = torch.randn(values.shape[1], 2, 3, 3)
    for relu in (True, False):
        with pytest.raises(ValueError, match="switches"):
            zk.unpool_conv_transpose2d(
                values,
                switches,
                weight,
                pool_kernel_size=kernel,
                pool_stride=stride,
                pool_padding=padding,
                unpool_size=size,
                relu=relu,
            )


def test_reference_module_matches_public_function(gen):
    # reference.unpool_conv_transpose2d is the oracle the cpu kernel is held to: pin it to its definition.
    pool, conv = FUSED_CONFIGS[0].values[:2]
    values, switches, weight = make_case(pool, 3, 4, conv[0], torch.float64, gen)
    out = reference.unpool_conv_transpose2d(
        values, switches, weight, (3, 3), (2, 2), (0, 0), (13, 13), (1, 1), (1, 1), (0, 0), True
    )
    unpooled = reference.max_unpool2d(values, switches, (3, 3), (2, 2), (0, 0), (13, 13), True)
    assert torch.equal(out, F.conv_transpose2d(unpooled, weight, None, 1, 1, 0))


# ------------------------------------------------------------------------------------- NaN and inf
def nonfinite_fused_case(generator, out_channels, dtype):
    """A tiny random fused case with NaN/inf in the pooled values, the weight or both, zeros among the values,
    and valid switches (shared argmaxes included): (values, switches, weight, pool, conv, relu), where pool is
    (kernel, stride, padding, unpool (H, W)) and conv ((kH, kW), stride, padding, output_padding) pairs."""
    while True:
        pool_kernel = (randint(generator, 1, 3), randint(generator, 1, 3))
        pool_stride = (randint(generator, 1, 3), randint(generator, 1, 3))
        pool_padding = (
            randint(generator, 0, pool_kernel[0] // 2),
            randint(generator, 0, pool_kernel[1] // 2),
        )
        ceil_mode = bool(randint(generator, 0, 1))
        size = (randint(generator, 2, 7), randint(generator, 2, 7))
        pooled = pooled_shape(size, pool_kernel, pool_stride, pool_padding, ceil_mode)
        kernel = (randint(generator, 1, 5), (1, 2, 3, 4, 5, 9, 13)[randint(generator, 0, 6)])  # 1, 2 vectors
        stride = (randint(generator, 1, 3), randint(generator, 1, 3))
        padding = (randint(generator, 0, kernel[0] - 1), randint(generator, 0, kernel[1] - 1))
        output_padding = (randint(generator, 0, stride[0] - 1), randint(generator, 0, stride[1] - 1))
        out = [(size[i] - 1) * stride[i] - 2 * padding[i] + kernel[i] + output_padding[i] for i in range(2)]
        if min(pooled) >= 1 and min(out) >= 1:
            break
    in_channels = randint(generator, 1, 4)
    x = tied((randint(generator, 1, 2), in_channels, *size), dtype, generator)
    _, switches = reference.max_pool2d_switches(
        x, pool_kernel, pool_stride, pool_padding, ceil_mode, False, switch_dtype(pool_kernel)
    )
    if randint(generator, 0, 3) == 0:
        switches = zk.switches_to_indices(switches, size, pool_kernel, pool_stride, pool_padding)
    where = ("values", "weight", "both")[randint(generator, 0, 2)]
    values = torch.randn(switches.shape, generator=generator, dtype=dtype)
    values = sprinkle_nonfinite(values, generator, randint(generator, 1, 3) if where != "weight" else 0, 0.2)
    weight = torch.randn(in_channels, out_channels, *kernel, generator=generator, dtype=dtype)
    weight = sprinkle_nonfinite(weight, generator, randint(generator, 1, 2) if where != "values" else 0)
    pool = (pool_kernel, pool_stride, pool_padding, size)
    return (
        values,
        switches,
        weight,
        pool,
        (kernel, stride, padding, output_padding),
        bool(randint(generator, 0, 1)),
    )


def fused_public(values, switches, weight, pool, conv, relu):
    pool_kernel, pool_stride, pool_padding, size = pool
    _, stride, padding, output_padding = conv
    return zk.unpool_conv_transpose2d(
        values,
        switches,
        weight,
        pool_kernel_size=pool_kernel,
        pool_stride=pool_stride,
        pool_padding=pool_padding,
        unpool_size=size,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        relu=relu,
    )


def fused_reference(values, switches, weight, pool, conv, relu):
    """torch's dense composition F.conv_transpose2d(relu(max_unpool2d(...)), weight), the unpooled map in the
    values' dtype (as the unfused op stores it), the convolution by exact_conv_transpose2d (float64)."""
    unpooled = reference.max_unpool2d(values, switches, *pool, relu)
    return exact_conv_transpose2d(unpooled, weight, None, *conv[1:])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_nonfinite_issue_example(backend):
    # Issue 12: a NaN value times the zero padding of the rows path's weight rows leaked into its neighbours.
    x = torch.full((1, 1, 4, 4), -1.0)
    x[0, 0, 0, 0] = float("nan")
    values, switches = reference.max_pool2d_switches(x, (2, 2), (2, 2), (0, 0), False, False, torch.uint8)
    common = dict(pool_kernel_size=2, unpool_size=(4, 4), relu=False)
    out = zk.unpool_conv_transpose2d(values, switches, torch.ones(1, 1, 1, 1), **common)
    unpooled = reference.max_unpool2d(values, switches, (2, 2), (2, 2), (0, 0), (4, 4), False)
    expected = F.conv_transpose2d(unpooled, torch.ones(1, 1, 1, 1))
    assert expected[0, 0, 0, 1:].tolist() == [0.0, -1.0, 0.0]
    assert_same_nonfinite(out, expected, 1e-6, 1e-6, f"{backend} NaN value")
    # The sparse path skipped zero values: torch's dense composition multiplies them, 0 * inf = NaN.
    weight = torch.full((1, 1, 1, 1), float("inf"))
    values = torch.tensor([[[[1.0, 0.0], [-2.0, 3.0]]]])
    switches = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    out = zk.unpool_conv_transpose2d(values, switches, weight, **common)
    unpooled = reference.max_unpool2d(values, switches, (2, 2), (2, 2), (0, 0), (4, 4), False)
    assert_same_nonfinite(out, F.conv_transpose2d(unpooled, weight), 1e-6, 1e-6, f"{backend} inf weight")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS)
def test_nonfinite_propagate_as_torch(backend, dtype):
    """Fuzz: NaN and +/-inf at random in pooled values and weights, output channels 1..6 and wider (every
    path of the cpu kernel), strides 1-3, paddings, output_padding, relu or not, switches or indices."""
    g = torch.Generator().manual_seed(21 + (dtype == torch.float64))
    cases = 9 if backend == "triton" else 72  # the interpreter costs ~30 ms a launch
    rtol, atol = nonfinite_tolerance(dtype)
    for i in range(cases):
        case = nonfinite_fused_case(g, NONFINITE_OUT_CHANNELS[i % len(NONFINITE_OUT_CHANNELS)], dtype)
        values, switches, weight, pool, conv, relu = case
        label = (
            f"case {i}: values {tuple(values.shape)} weight {tuple(weight.shape)} pool {pool} conv {conv[1:]}"
        )
        expected = fused_reference(*case)
        assert_same_nonfinite(fused_public(*case), expected, rtol, atol, f"{label} relu {relu}")


def test_huge_pool_window_over_tiny_input(backend):
    # Issue 12's window-sized scratch, through the fused op: 1 x 2**27 windows (the cpu decode table) and
    # 1 x 2**20 windows at stride 1 (the triton kernel unrolled ceil(kernel / stride) windows per element).
    weight = torch.full((1, 2, 1, 1), 2.0)
    for window, stride, values, switches in (
        (2**27, None, [[[[3.0]]]], [[[[2**26]]]]),
        (2**20, 1, [[[[2.0, 3.0]]]], [[[[2**19, 2**19 - 1]]]]),
    ):
        values, switches = torch.tensor(values), torch.tensor(switches, dtype=torch.int32)
        call = functools.partial(
            zk.unpool_conv_transpose2d,
            values,
            switches,
            weight,
            pool_kernel_size=(1, window),
            pool_stride=stride,
            pool_padding=(0, window // 2),
            unpool_size=(1, 1),
        )
        out, growth = peak_rss_growth(call)
        assert growth < SMALL_MEMORY, f"{growth / 2**20:.0f} MiB for a 1x1 input"
        assert torch.equal(out, torch.full((1, 2, 1, 1), 2.0 * values.sum().item())), out
