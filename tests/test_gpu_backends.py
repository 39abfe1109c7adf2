"""The GPU backends ("cuda" and "triton") on CUDA tensors, against the reference backend on CPU copies.

Through the public API under zfkernels.use_backend(name): pool, unpool, pool backward, gather and ReLU bit for
bit; the transposed convolutions within the tolerances of test_conv_transpose.py and
test_unpool_conv_transpose.py; filter renormalization; fp64 gradcheck; torch.compile; invalid switches; empty
batches. Without a CUDA device, or without a backend, every test here is skipped, never faked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FLOAT_DTYPES,
    LOW_PRECISION,
    POOL_CONFIGS,
    assert_bitwise_equal,
    assert_close_verbose,
    distinct,
    invalid_switch_cases,
    make_input,
    max_abs_error,
    tied,
    with_nans,
)
from test_shared_elements import CONV_CONFIGS, FUSED_CONFIGS
from torch.autograd import gradcheck, gradgradcheck

import zfkernels as zk
from zfkernels.ops import _backend
from zfkernels.ops.reference import RULES


def _why_skip(name: str) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    reason = _backend._why_unavailable(name)
    return f"backend {name!r} is not available: {reason}" if reason else None


GPU_BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(_why_skip(name) is not None, reason=str(_why_skip(name))))
    for name in ("cuda", "triton")
]
pytestmark = pytest.mark.gpu
DTYPE_IDS = lambda d: str(d).split(".")[-1]


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request):
    """The name of a GPU backend; tests select it around the calls they check."""
    return request.param


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def gpu_and_reference(backend, fn, *args, **kwargs):
    """(fn on CUDA copies under `backend`, moved back to the CPU; fn on the CPU under "reference")."""
    with zk.use_backend("reference"):
        expected = fn(*args, **kwargs)
    with zk.use_backend(backend):
        got = fn(*_to(args, "cuda"), **_to(kwargs, "cuda"))
    outputs = got if isinstance(got, tuple) else (got,)
    for out in outputs:
        assert out.is_cuda and out.is_contiguous(), f"{backend}: outputs are contiguous CUDA tensors"
    return _to(got, "cpu"), expected


def _pooled_switches(x, kernel_size, stride, padding, ceil_mode, use_indices):
    """Switches (or torch's int64 indices) of the reference pool of x, on the CPU."""
    with zk.use_backend("reference"):
        values, switches = zk.max_pool2d_switches(x, kernel_size, stride, padding, ceil_mode)
        if use_indices:
            switches = zk.switches_to_indices(switches, x.shape, kernel_size, stride, padding)
    return values, switches


# --------------------------------------------------------------------------------------------- max-pool
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["distinct", "ties", "zeros", "nan", "neg_inf"])
@pytest.mark.parametrize("kernel_size, stride, padding, ceil_mode, size", POOL_CONFIGS)
def test_pool_bitwise(gpu_backend, gen, kernel_size, stride, padding, ceil_mode, size, kind, dtype, relu):
    x = make_input(kind, (2, 3, *size), dtype, gen)
    (values, switches), (exp_values, exp_switches) = gpu_and_reference(
        gpu_backend, zk.max_pool2d_switches, x, kernel_size, stride, padding, ceil_mode, relu=relu
    )
    assert_bitwise_equal(values, exp_values, "values")
    assert_bitwise_equal(switches, exp_switches, "switches")


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_pool_non_contiguous(gpu_backend, gen, layout):
    x = tied((2, 5, 13, 26), torch.float32, gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)  # .to("cuda") keeps this layout
        prepare = lambda t: t
    else:
        prepare = lambda t: t[..., 1:, ::2]  # made on each device: a copy would be contiguous
    with zk.use_backend("reference"):
        expected = zk.max_pool2d_switches(prepare(x), 3, 2, 0, True, relu=True)
    gx = prepare(x.cuda())
    assert not gx.is_contiguous()
    with zk.use_backend(gpu_backend):
        values, switches = zk.max_pool2d_switches(gx, 3, 2, 0, True, relu=True)
    assert_bitwise_equal(values.cpu(), expected[0], "values")
    assert_bitwise_equal(switches.cpu(), expected[1], "switches")


def test_pool_large_windows_wide_switches(gpu_backend, gen):
    # 17x17 windows need int16 switches; one int32 case (182x182) and the uint8 edge (offset 255 of 16x16).
    for kernel, size in (((17, 17), (19, 18)), ((182, 182), (183, 182)), ((16, 16), (16, 16))):
        x = tied((1, 2, *size), torch.float32, gen)
        (values, switches), (exp_values, exp_switches) = gpu_and_reference(
            gpu_backend, zk.max_pool2d_switches, x, kernel, 1
        )
        assert_bitwise_equal(values, exp_values, f"values {kernel}")
        assert_bitwise_equal(switches, exp_switches, f"switches {kernel}")


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel_size, stride, padding, ceil_mode, size", POOL_CONFIGS)
def test_pool_backward_bitwise(gpu_backend, gen, kernel_size, stride, padding, ceil_mode, size, dtype, relu):
    x = tied((2, 3, *size), dtype, gen)  # ties and zeros: shared argmaxes sum, the fused ReLU gates
    with zk.use_backend("reference"):
        pooled = zk.max_pool2d_switches(x, kernel_size, stride, padding, ceil_mode)[0]
    grad = tied(pooled.shape, dtype, gen)

    def pool_grad(x, grad):
        x = x.clone().requires_grad_()
        zk.max_pool2d_switches(x, kernel_size, stride, padding, ceil_mode, relu=relu)[0].backward(grad)
        return x.grad

    got, expected = gpu_and_reference(gpu_backend, pool_grad, x, grad)
    assert_bitwise_equal(got, expected, "grad_input")


# ----------------------------------------------------------------------------------- unpool and gather
@pytest.mark.parametrize("use_indices", [False, True], ids=["switches", "indices"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel_size, stride, padding, ceil_mode, size", POOL_CONFIGS)
def test_unpool_bitwise(gpu_backend, gen, kernel_size, stride, padding, ceil_mode, size, dtype, use_indices):
    x = tied((2, 3, *size), dtype, gen)
    pooled, switches = _pooled_switches(x, kernel_size, stride, padding, ceil_mode, use_indices)
    signed = tied(pooled.shape, dtype, gen)  # shared argmaxes can sum below zero: relu after the sum matters
    specials = with_nans(make_input("neg_inf", pooled.shape, dtype, gen), gen)
    for values in (pooled, signed, specials):
        for relu in (False, True):
            got, expected = gpu_and_reference(
                gpu_backend, zk.max_unpool2d, values, switches, kernel_size, stride, padding, size, relu=relu
            )
            assert_bitwise_equal(got, expected, f"unpool relu={relu}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_IDS)
def test_unpool_low_precision_sums_round_once(gpu_backend, dtype):
    # 3x3/2 windows share the argmax (2, 2); summed in float and rounded once, 2048 + 1 + 1 - 2048 is 2.
    x = torch.zeros(1, 1, 5, 5, dtype=dtype)
    x[..., 2, 2] = 1.0
    _, switches = _pooled_switches(x, 3, 2, 0, False, False)
    values = torch.tensor([[[[2048.0, 1.0], [1.0, -2048.0]]]], dtype=dtype)
    got, expected = gpu_and_reference(gpu_backend, zk.max_unpool2d, values, switches, 3, 2, 0, (5, 5))
    assert_bitwise_equal(got, expected, "unpool")
    assert got[0, 0, 2, 2].item() == 2.0


@pytest.mark.parametrize("use_indices", [False, True], ids=["switches", "indices"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel_size, stride, padding, ceil_mode, size", POOL_CONFIGS)
def test_gather_bitwise(gpu_backend, gen, kernel_size, stride, padding, ceil_mode, size, dtype, use_indices):
    x = tied((2, 3, *size), dtype, gen)
    _, switches = _pooled_switches(x, kernel_size, stride, padding, ceil_mode, use_indices)
    source = with_nans(make_input("neg_inf", x.shape, dtype, gen), gen)
    source[..., 0, :] = -0.0  # bits are copied: -0.0 stays -0.0
    got, expected = gpu_and_reference(
        gpu_backend, zk.gather_switches, source, switches, kernel_size, stride, padding
    )
    assert_bitwise_equal(got, expected, "gather")


# ------------------------------------------------------------------------------------------------- ReLU
def _relu_input(shape, dtype, generator):
    x = with_nans(tied(shape, dtype, generator), generator)
    x.view(-1)[:4] = torch.tensor([-0.0, float("inf"), float("-inf"), 0.0], dtype=dtype)
    return x


# Sizes around the 16-byte packs (a pack holds 2 to 8 elements) and their tails; "offset" starts one element
# into a buffer, so the pointer is misaligned and the kernels take their scalar path.
RELU_SHAPES = [(7,), (2, 3, 5, 5), (4, 257), (3, 1031)]


@pytest.mark.parametrize("offset", [False, True], ids=["aligned", "offset"])
@pytest.mark.parametrize("shape", RELU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_relu_bitwise(gpu_backend, gen, dtype, shape, offset):
    numel = 1
    for s in shape:
        numel *= s
    # Sliced on each device (a copy would be realigned): buffer[1:] starts one element past the allocation.
    window = (lambda b: b[1:].view(shape)) if offset else (lambda b: b[:-1].view(shape))
    x_buffer, grad_buffer = (
        _relu_input((numel + 1,), dtype, gen),
        with_nans(tied((numel + 1,), dtype, gen), gen),
    )
    grad_buffer[:3] = torch.tensor([-0.0, 0.0, -0.0], dtype=dtype)
    out_buffer = torch.relu(x_buffer)
    x, grad, output = window(x_buffer), window(grad_buffer), window(out_buffer)
    gx, ggrad, goutput = (window(b.cuda()) for b in (x_buffer, grad_buffer, out_buffer))
    # Allocations are 16-byte aligned; one element (at most 8 bytes) past one is not.
    assert (gx.data_ptr() % 16 != 0) == offset

    with zk.use_backend(gpu_backend):
        got = [zk.relu(gx)] + [zk.relu_backward(ggrad, goutput, rule) for rule in RULES]
    with zk.use_backend("reference"):
        expected = [zk.relu(x)] + [zk.relu_backward(grad, output, rule) for rule in RULES]
    for label, g, e in zip(["relu", *RULES], got, expected, strict=True):
        assert_bitwise_equal(g.cpu(), e, label)
    gpu_in_place = window(x_buffer.cuda())
    with zk.use_backend(gpu_backend):
        zk.relu(gpu_in_place, inplace=True)
    assert_bitwise_equal(gpu_in_place.cpu(), torch.relu(x), "relu_ in place")


def test_relu_inplace_non_contiguous_writes_through(gpu_backend, gen):
    x = tied((6, 8), torch.float32, gen).cuda()
    view = x.t()
    with zk.use_backend(gpu_backend):
        zk.relu(view, inplace=True)
    assert_bitwise_equal(x.cpu(), torch.relu(x.cpu()), "written through the transposed view")


# ------------------------------------------------------------------------------- transposed convolutions
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, output_padding, groups, dilation", CONV_CONFIGS
)
def test_conv_transpose(
    gpu_backend,
    gen,
    input_shape,
    weight_shape,
    stride,
    padding,
    output_padding,
    groups,
    dilation,
    dtype,
    bias,
):
    x = torch.randn(input_shape, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(weight_shape, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(weight_shape[1] * groups, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    args = (stride, padding, output_padding, groups, dilation)
    got, torchs = gpu_and_reference(gpu_backend, zk.conv_transpose2d, x, w, b, *args)
    expected64 = F.conv_transpose2d(x.double(), w.double(), None if b is None else b.double(), *args)
    scale = max(1.0, expected64.abs().max().item())
    if dtype == torch.float64:
        assert_close_verbose(got, expected64, rtol=1e-10, atol=1e-10 * scale, label="fp64")
    elif dtype == torch.float32:
        assert_close_verbose(got, expected64.float(), rtol=1e-4, atol=1e-5 * scale, label="fp32 vs fp64")
    else:  # at most twice PyTorch's own error against the fp64 result
        ours, theirs = max_abs_error(got, expected64), max_abs_error(torchs, expected64)
        assert got.dtype == dtype and ours <= 2 * theirs + 1e-5, (
            f"{dtype}: error {ours} > 2 x torch's {theirs}"
        )


def _fused(values, switches, weight, pool, conv, relu):
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


def _unfused(values, switches, weight, pool, conv, relu, dtype):
    """The reference unpool (+relu) then F.conv_transpose2d, computed in `dtype` (CPU)."""
    pool_kernel, pool_stride, pool_padding, _, size = pool
    _, stride, padding, output_padding = conv
    with zk.use_backend("reference"):
        unpooled = zk.max_unpool2d(
            values.to(dtype), switches, pool_kernel, pool_stride, pool_padding, size, relu=relu
        )
    return F.conv_transpose2d(unpooled, weight.to(dtype), None, stride, padding, output_padding)


@pytest.mark.parametrize("use_indices", [False, True], ids=["switches", "indices"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "plain"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pool, conv, c_in, c_out", FUSED_CONFIGS)
def test_unpool_conv_transpose(gpu_backend, gen, pool, conv, c_in, c_out, dtype, relu, use_indices):
    pool_kernel, pool_stride, pool_padding, ceil_mode, size = pool
    x = tied((2, c_in, *size), dtype, gen)
    _, switches = _pooled_switches(x, pool_kernel, pool_stride, pool_padding, ceil_mode, use_indices)
    values = (torch.randn(switches.shape, generator=gen, dtype=torch.float64) - 0.3).to(dtype)
    weight = torch.randn(c_in, c_out, *conv[0], generator=gen, dtype=torch.float64).to(dtype)
    with zk.use_backend(gpu_backend):
        got = _fused(values.cuda(), switches.cuda(), weight.cuda(), pool, conv, relu).cpu()
    expected = _unfused(values, switches, weight, pool, conv, relu, torch.float64)
    scale = max(1.0, expected.abs().max().item())
    if dtype == torch.float64:
        assert_close_verbose(got, expected, rtol=1e-10, atol=1e-10 * scale, label="fp64")
    elif dtype == torch.float32:
        assert_close_verbose(got, expected.float(), rtol=1e-4, atol=1e-5 * scale, label="fp32")
    else:  # at most twice the error of the unfused torch computation in the same dtype
        ours = max_abs_error(got, expected)
        theirs = max_abs_error(_unfused(values, switches, weight, pool, conv, relu, dtype), expected)
        assert got.dtype == dtype and ours <= 2 * theirs + 1e-5, (
            f"{dtype}: error {ours} > 2 x unfused {theirs}"
        )


# ------------------------------------------------------------------------------ filter renormalization
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_renormalize_filters(gpu_backend, gen, dtype):
    weight = torch.randn(32, 16, 5, 5, generator=gen, dtype=torch.float64)
    rms = weight.reshape(32, -1).square().mean(1).sqrt()
    targets = 0.1 * torch.linspace(0.2, 3.0, 32, dtype=torch.float64)  # a third within the radius
    weight = (weight / rms.view(-1, 1, 1, 1) * targets.view(-1, 1, 1, 1)).to(dtype)
    weight[3] = 0.25  # RMS exactly 0.25 > 0.1: rescaled by exactly 0.4 in the compute type
    weight[5] = float("nan")  # NaN RMS compares false: left as is

    def renormalized(w):
        return zk.renormalize_filters_(w.clone(), 0.1)

    got, expected = gpu_and_reference(gpu_backend, renormalized, weight)
    kept = (weight.double().reshape(32, -1).square().mean(1).sqrt() > 0.1).logical_not()
    assert kept.any() and not kept.all()
    assert_bitwise_equal(got[kept], weight[kept], "filters within the radius keep their bits")
    # Same formula; the float64 sums' order differs, which can move a float64 scale by an ulp or two.
    eps = 4 * torch.finfo(dtype).eps
    assert_close_verbose(got, expected, rtol=eps, atol=0, label="vs reference")


# -------------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize(
    "kernel, stride, padding, ceil_mode", [(3, 2, 0, True), (3, 1, 1, False), ((2, 3), (2, 1), 1, False)]
)
def test_pool_gradcheck(gpu_backend, gen, kernel, stride, padding, ceil_mode, relu):
    x = distinct((1, 2, 7, 6), torch.float64, gen).cuda().requires_grad_()
    fn = lambda t: zk.max_pool2d_switches(t, kernel, stride, padding, ceil_mode, relu=relu)[0]
    with zk.use_backend(gpu_backend):
        assert gradcheck(fn, (x,))
        assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("use_indices", [False, True], ids=["switches", "indices"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_unpool_gradcheck(gpu_backend, gen, relu, use_indices):
    x = tied((1, 2, 9, 8), torch.float64, gen)
    _, switches = _pooled_switches(x, 3, 2, 0, True, use_indices)
    values = torch.randn(switches.shape, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    fn = lambda v: zk.max_unpool2d(v, switches.cuda(), 3, 2, 0, (9, 8), relu=relu)
    with zk.use_backend(gpu_backend):
        assert gradcheck(fn, (values,))
        assert gradgradcheck(fn, (values,))


# ------------------------------------------------------------------------------------------ compile
def test_compile_fullgraph(gpu_backend, gen):
    def fn(x):
        v, s = zk.max_pool2d_switches(zk.relu(x), 3, 2, ceil_mode=True)
        return zk.max_unpool2d(v * 2 - 1, s, 3, 2, output_size=x.shape[-2:], relu=True)

    x = tied((2, 3, 13, 13), torch.float32, gen).cuda()
    with zk.use_backend(gpu_backend):
        compiled = torch.compile(fn, fullgraph=True)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = compiled(xc), fn(xe)
        assert_bitwise_equal(got, want, "compiled")
        grad = tied(x.shape, torch.float32, gen).cuda()
        (got * grad).sum().backward()
        (want * grad).sum().backward()
    assert_bitwise_equal(xc.grad, xe.grad, "compiled grad")
    with zk.use_backend("reference"):
        assert_bitwise_equal(got.cpu(), fn(x.cpu()), "vs reference")


# --------------------------------------------------------------------------------- invalid switches
@pytest.mark.parametrize("case", list(invalid_switch_cases()))
def test_invalid_switches_raise(gpu_backend, gen, case):
    values, switches, kernel, stride, padding, output_size = _to(invalid_switch_cases()[case], "cuda")
    with zk.use_backend(gpu_backend):
        with pytest.raises(ValueError, match="switches"):
            zk.max_unpool2d(values, switches, kernel, stride, padding, output_size)
        with pytest.raises(ValueError, match="switches"):
            zk.gather_switches(
                torch.zeros(*values.shape[:2], *output_size, device="cuda"), switches, kernel, stride, padding
            )
        weight = torch.randn(values.shape[1], 2, 3, 3, generator=gen).cuda()
        with pytest.raises(ValueError, match="switches"):
            zk.unpool_conv_transpose2d(
                values,
                switches,
                weight,
                pool_kernel_size=kernel,
                pool_stride=stride,
                pool_padding=padding,
                unpool_size=output_size,
                padding=1,
            )


# -------------------------------------------------------------------------------------- empty batch
def test_empty_batch(gpu_backend, gen):
    x = torch.randn(0, 3, 13, 13, device="cuda")
    with zk.use_backend(gpu_backend):
        values, switches = zk.max_pool2d_switches(x, 3, 2, ceil_mode=True, relu=True)
        assert values.shape == switches.shape == (0, 3, 6, 6)
        assert zk.max_unpool2d(values, switches, 3, 2, output_size=(13, 13)).shape == x.shape
        assert zk.gather_switches(x, switches, 3, 2).shape == values.shape
        assert zk.relu(x).shape == x.shape
        assert zk.relu_backward(x, x, "guided").shape == x.shape
        weight = torch.randn(3, 4, 3, 3, device="cuda")
        assert zk.conv_transpose2d(x, weight, stride=2).shape == (0, 4, 27, 27)
        fused = zk.unpool_conv_transpose2d(
            values, switches, weight, pool_kernel_size=3, pool_stride=2, unpool_size=(13, 13)
        )
        assert fused.shape == (0, 4, 15, 15)
        xg = x.clone().requires_grad_()
        zk.max_pool2d_switches(xg, 3, 2)[0].sum().backward()
        assert xg.grad.shape == x.shape
