"""conv_transpose2d: F.conv_transpose2d's results (fp32 allclose; fp16/bf16 within 2x torch's own error)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, assert_close_verbose, backend_outputs, max_abs_error
from test_max_unpool import SMALL_MEMORY, peak_rss_growth

import zfkernels as zk
from zfkernels.ops import cpu as cpu_backend

pytestmark = pytest.mark.usefixtures("single_thread")

# (input shape, weight shape, stride, padding, output_padding, groups, dilation)
CONV_CONFIGS = [
    pytest.param((2, 4, 6, 6), (4, 3, 7, 7), 2, 1, 1, 1, 1, id="zfnet_conv1_shrunk_7x7s2p1op1"),
    pytest.param((2, 4, 5, 5), (4, 3, 3, 3), 2, 1, 0, 2, 1, id="groups2_stride2"),
    pytest.param((2, 6, 4, 4), (6, 1, 3, 3), 1, 1, 0, 3, (1, 2), id="groups3_depthwise_dilation1x2"),
    pytest.param((2, 3, 6, 5), (3, 2, 3, 3), 1, 0, 0, 1, 2, id="dilation2_stride1"),
    pytest.param((1, 2, 5, 4), (2, 3, 3, 2), 2, 1, 1, 1, 2, id="dilation2_stride2_outpad1"),
    pytest.param((2, 3, 6, 6), (3, 4, 3, 3), 1, 0, 0, 1, 1, id="stride1_gemm_path"),
    pytest.param((2, 3, 5, 5), (3, 32, 3, 3), 1, 1, 0, 1, 1, id="stride1_direct_path"),
    pytest.param((2, 3, 4, 5), (3, 2, 3, 2), (2, 1), (1, 0), (1, 0), 1, 1, id="rect_stride2x1"),
    pytest.param((1, 3, 4, 4), (3, 2, 2, 2), 3, 0, 2, 1, 1, id="stride3_kernel2_gaps"),
    pytest.param((2, 3, 3, 4), (3, 2, 1, 1), 2, 0, 1, 1, 1, id="1x1_stride2"),
]

DTYPE_IDS = lambda d: str(d).split(".")[-1]


def make_conv(input_shape, weight_shape, groups, dtype, generator, bias=True):
    x = torch.randn(input_shape, generator=generator, dtype=torch.float64).to(dtype)
    w = torch.randn(weight_shape, generator=generator, dtype=torch.float64).to(dtype)
    b = (
        torch.randn(weight_shape[1] * groups, generator=generator, dtype=torch.float64).to(dtype)
        if bias
        else None
    )
    return x, w, b


def fp64_reference(x, w, b, *args):
    return F.conv_transpose2d(x.double(), w.double(), None if b is None else b.double(), *args)


def check_conv(x, w, b, stride, padding, output_padding, groups, dilation):
    args = (stride, padding, output_padding, groups, dilation)
    out = zk.conv_transpose2d(x, w, b, *args)
    expected64 = fp64_reference(x, w, b, *args)
    scale = max(1.0, expected64.abs().max().item()) if expected64.numel() else 1.0
    if x.dtype == torch.float64:
        assert_close_verbose(
            out, expected64, rtol=1e-10, atol=1e-10 * scale, label="fp64 vs F.conv_transpose2d"
        )
    elif x.dtype == torch.float32:
        assert_close_verbose(
            out, expected64.float(), rtol=1e-4, atol=1e-5 * scale, label="fp32 vs fp64 reference"
        )
        assert_close_verbose(
            out,
            F.conv_transpose2d(x, w, b, *args),
            rtol=1e-4,
            atol=1e-5 * scale,
            label="fp32 vs F.conv_transpose2d",
        )
    else:  # flash-attention's rule: at most twice PyTorch's own error against a higher-precision reference
        assert out.dtype == x.dtype and out.shape == expected64.shape
        ours, torchs = (
            max_abs_error(out, expected64),
            max_abs_error(F.conv_transpose2d(x, w, b, *args), expected64),
        )
        assert ours <= 2 * torchs + 1e-5, f"{x.dtype}: error {ours} > 2 x torch's {torchs}"
    return out


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, output_padding, groups, dilation", CONV_CONFIGS
)
def test_matches_torch(
    backend, gen, input_shape, weight_shape, stride, padding, output_padding, groups, dilation, dtype, bias
):
    x, w, b = make_conv(input_shape, weight_shape, groups, dtype, gen, bias)
    check_conv(x, w, b, stride, padding, output_padding, groups, dilation)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, output_padding, groups, dilation", CONV_CONFIGS
)
def test_low_precision(
    backend, gen, input_shape, weight_shape, stride, padding, output_padding, groups, dilation, dtype
):
    x, w, b = make_conv(input_shape, weight_shape, groups, dtype, gen)
    check_conv(x, w, b, stride, padding, output_padding, groups, dilation)


def test_zfnet_layer1_output_size(backend, gen):
    # conv1 of ZFNet maps 224 -> 110 with 7x7 stride 2 padding 1; its transpose maps 110 back to 224
    # with output_padding 1. The same geometry on a small map: conv1 takes 16 to (16 + 2 - 7) // 2 + 1 = 6,
    # and the transpose takes 6 back to (6 - 1) * 2 - 2 + 7 + 1 = 16.
    x, w, b = make_conv((1, 4, 6, 6), (4, 3, 7, 7), 1, torch.float32, gen, bias=False)
    out = check_conv(x, w, b, 2, 1, 1, 1, 1)
    assert out.shape == (1, 3, 16, 16)
    assert F.conv2d(out, w, stride=2, padding=1).shape == x.shape


def test_direct_kernel_path_is_taken(monkeypatch, gen):
    # The cpu backend runs its direct kernel for 1 to 4 output channels (groups 1, dilation 1, fp32/fp64)
    # and hands wider convolutions to torch: make sure the tests above reach both.
    if "cpu" not in BACKENDS:
        pytest.fail("the cpu backend is not available; rebuild the extension")
    taken = []
    original = cpu_backend.cpu_module.conv_transpose2d_direct
    monkeypatch.setattr(
        cpu_backend.cpu_module,
        "conv_transpose2d_direct",
        lambda *a: taken.append(original(*a)) or taken[-1],
        raising=True,
    )
    with zk.use_backend("cpu"):
        for out_channels in (1, 2, 3, 4):
            x, w, b = make_conv((2, 4, 6, 5), (4, out_channels, 7, 7), 1, torch.float32, gen)
            check_conv(x, w, b, 2, 1, 1, 1, 1)
        assert taken == [True] * 4
        taken.clear()
        x, w, b = make_conv((2, 3, 5, 5), (3, 32, 3, 3), 1, torch.float32, gen)
        check_conv(x, w, b, 1, 1, 0, 1, 1)
        assert taken == []  # many output channels: straight to torch's (oneDNN's) convolution


@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, output_padding, groups, dilation", CONV_CONFIGS[:6]
)
def test_backends_agree(gen, input_shape, weight_shape, stride, padding, output_padding, groups, dilation):
    x, w, b = make_conv(input_shape, weight_shape, groups, torch.float32, gen)
    results = backend_outputs(zk.conv_transpose2d, x, w, b, stride, padding, output_padding, groups, dilation)
    for name in BACKENDS[1:]:
        assert_close_verbose(results[name], results[BACKENDS[0]], rtol=1e-4, atol=1e-4, label=name)


# ----------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize(
    "input_shape, weight_shape, stride, padding, output_padding, groups, dilation",
    [
        pytest.param((1, 2, 2, 2), (2, 1, 3, 3), 2, 1, 1, 1, 1, id="stride2_outpad"),
        pytest.param((1, 4, 2, 2), (4, 1, 2, 2), 1, 0, 0, 2, (2, 1), id="groups2_dilation"),
        pytest.param((1, 1, 2, 2), (1, 29, 3, 3), 1, 1, 0, 1, 1, id="direct_path"),
    ],
)
def test_gradcheck(
    backend, grad_checks, gen, input_shape, weight_shape, stride, padding, output_padding, groups, dilation
):
    gradcheck, gradgradcheck = grad_checks
    x, w, b = (t.requires_grad_() for t in make_conv(input_shape, weight_shape, groups, torch.float64, gen))
    fn = lambda x, w, b: zk.conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation)
    assert gradcheck(fn, (x, w, b))
    fn_no_bias = lambda x, w: zk.conv_transpose2d(
        x, w, None, stride, padding, output_padding, groups, dilation
    )
    assert gradcheck(fn_no_bias, (x, w))
    if weight_shape[1] * weight_shape[2] * weight_shape[3] <= 256:  # the same backward formula on both paths
        assert gradgradcheck(fn, (x, w, b))


def test_gradients_match_torch(backend, gen):
    x, w, b = make_conv((2, 4, 5, 5), (4, 3, 3, 3), 2, torch.float32, gen)
    grads = []
    for fn in (zk.conv_transpose2d, F.conv_transpose2d):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = fn(*leaves, 2, 1, 1, 2, 1)
        out.backward(torch.ones_like(out))
        grads.append([t.grad for t in leaves])
    for name, ours, theirs in zip(["input", "weight", "bias"], *grads, strict=True):
        assert_close_verbose(ours, theirs, rtol=1e-4, atol=1e-4, label=f"grad {name}")


# ------------------------------------------------------------------------------------ opcheck/compile
def _conv_samples():
    g = torch.Generator().manual_seed(4)
    samples = []
    for (xs, ws, stride, padding, out_pad, groups, dilation), dtype, bias, grad in [
        (((2, 4, 3, 3), (4, 3, 3, 3), [2, 2], [1, 1], [1, 1], 1, [1, 1]), torch.float64, True, True),
        (((1, 4, 3, 3), (4, 2, 2, 3), [1, 2], [0, 1], [0, 1], 2, [2, 1]), torch.float64, False, True),
        (((2, 3, 3, 3), (3, 30, 3, 3), [1, 1], [1, 1], [0, 0], 1, [1, 1]), torch.float32, True, True),
        (((1, 2, 4, 4), (2, 3, 5, 5), [2, 2], [2, 2], [1, 1], 1, [1, 1]), torch.float16, True, False),
        (((0, 2, 4, 4), (2, 3, 3, 3), [2, 2], [0, 0], [0, 0], 1, [1, 1]), torch.float32, True, False),
    ]:
        x, w, b = make_conv(xs, ws, groups, dtype, g, bias)
        x, w = x.requires_grad_(grad), w.requires_grad_(grad)
        b = b.requires_grad_(grad) if b is not None else None
        samples.append((x, w, b, stride, padding, out_pad, groups, dilation))
    return samples


@pytest.mark.parametrize("sample", range(5))
def test_opcheck(backend, sample):
    torch.library.opcheck(torch.ops.zfkernels.conv_transpose2d.default, _conv_samples()[sample])


def test_compile_fullgraph(gen):
    fn = lambda x, w, b: zk.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1)
    x, w, b = make_conv((2, 4, 6, 6), (4, 3, 7, 7), 1, torch.float32, gen)
    compiled = torch.compile(fn, fullgraph=True)
    leaves_c = [t.clone().requires_grad_() for t in (x, w, b)]
    leaves_e = [t.clone().requires_grad_() for t in (x, w, b)]
    got, want = compiled(*leaves_c), fn(*leaves_e)
    assert_close_verbose(got, want, rtol=1e-5, atol=1e-5, label="compiled")
    got.square().sum().backward()
    want.square().sum().backward()
    for c, e in zip(leaves_c, leaves_e, strict=True):
        assert_close_verbose(c.grad, e.grad, rtol=1e-4, atol=1e-4, label="compiled grad")


# ---------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
@pytest.mark.parametrize("config", [0, 1, 6], ids=["zfnet_gemm", "groups2", "direct"])
def test_non_contiguous_layouts(backend, gen, layout, config):
    input_shape, weight_shape, stride, padding, output_padding, groups, dilation = CONV_CONFIGS[config].values
    x, w, b = make_conv(input_shape, weight_shape, groups, torch.float32, gen)
    if layout == "transposed":
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        w = w.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=-1)[..., ::2]
        w = torch.cat([w, w], dim=0)[::2]
        b = torch.cat([b, b])[::2]
    else:
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    check_conv(x, w, b, stride, padding, output_padding, groups, dilation)


def test_unbatched(backend, gen):
    x, w, b = make_conv((4, 6, 6), (4, 3, 7, 7), 1, torch.float32, gen)
    out = check_conv(x, w, b, 2, 1, 1, 1, 1)
    assert out.shape == (3, 16, 16)


@pytest.mark.parametrize("config", [0, 6], ids=["gemm", "direct"])
def test_empty_batch(backend, gen, config):
    input_shape, weight_shape, stride, padding, output_padding, groups, dilation = CONV_CONFIGS[config].values
    x, w, b = make_conv((0, *input_shape[1:]), weight_shape, groups, torch.float32, gen)
    out = zk.conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation)
    assert out.shape == F.conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation).shape
    xg = x.clone().requires_grad_()
    zk.conv_transpose2d(xg, w, b, stride, padding, output_padding, groups, dilation).sum().backward()
    assert xg.grad.shape == x.shape


# ------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda x, w, b: ((x[0, 0], w, b), {}), ValueError, "input"),
        (lambda x, w, b: ((x.int(), w, b), {}), TypeError, "input"),
        (lambda x, w, b: ((x, w[0], b), {}), ValueError, "weight"),
        (lambda x, w, b: ((x, w.double(), b), {}), TypeError, "weight"),
        (lambda x, w, b: ((x, w[:3], b), {}), ValueError, "weight"),
        (lambda x, w, b: ((x, w, b.double()), {}), TypeError, "bias"),
        (lambda x, w, b: ((x, w, b[:2]), {}), ValueError, "bias"),
        (lambda x, w, b: ((x, w, b[None]), {}), ValueError, "bias"),
        (lambda x, w, b: ((x, w, b), {"groups": 0}), ValueError, "groups"),
        (lambda x, w, b: ((x, w, b), {"groups": 3}), ValueError, "groups"),
        (lambda x, w, b: ((x, w, b), {"groups": 2.0}), ValueError, "groups"),
        (lambda x, w, b: ((x, w, b), {"stride": 0}), ValueError, "stride"),
        (lambda x, w, b: ((x, w, b), {"stride": (1, 2, 3)}), TypeError, "stride"),
        (lambda x, w, b: ((x, w, b), {"padding": -1}), ValueError, "padding"),
        (lambda x, w, b: ((x, w, b), {"padding": 9}), ValueError, "padding"),
        (lambda x, w, b: ((x, w, b), {"dilation": 0}), ValueError, "dilation"),
        (lambda x, w, b: ((x, w, b), {"stride": 2, "output_padding": 2}), ValueError, "output_padding"),
        (lambda x, w, b: ((x, w, b), {"output_padding": 1}), ValueError, "output_padding"),
        (lambda x, w, b: ((x, w.to("meta"), b), {}), ValueError, "weight"),
        (lambda x, w, b: ((x, w, b.to("meta")), {}), ValueError, "bias"),
        (lambda x, w, b: ((x.to("meta"), w, b), {}), ValueError, "input"),
    ],
)
def test_bad_inputs(backend, make, error, match):
    x, w, b = torch.randn(1, 4, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(3)
    args, kwargs = make(x, w, b)
    with pytest.raises(error, match=match):
        zk.conv_transpose2d(*args, **kwargs)


# ------------------------------------------------------------------------------------- NaN and inf
# torch's products are only those of real inputs and weights (zeros of the input included): padding and the
# space between strided inputs form none, so 0 * inf = NaN appears only where a real zero meets an infinity.
# That is F.conv_transpose2d's float64 path (im2col + GEMM + col2im, the same as a loop over the products).
# Its float32 path on CPU runs oneDNN, which in some geometries with a NaN/inf weight (mostly with
# output_padding) also multiplies padding by it: NaN where no product exists, so it is not the oracle here
# (the reference backend computes such calls in float64 for that reason).
NONFINITE_OUT_CHANNELS = (1, 2, 3, 4, 5, 6, 8, 17, 33)


def exact_conv_transpose2d(x, w, b, *args):
    """The oracle for NaN and inf: F.conv_transpose2d in float64 (only real products), on the same values."""
    return F.conv_transpose2d(x.double(), w.double(), None if b is None else b.double(), *args)


def randint(generator, low, high):
    """A uniform int in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def sprinkle_nonfinite(t, generator, count, zero_fraction=0.0):
    """`t` with `count` random entries set to NaN, +inf or -inf, and about `zero_fraction` of the rest 0."""
    t = t.clone()
    flat = t.view(-1)
    if zero_fraction:
        flat[torch.rand(flat.shape, generator=generator) < zero_fraction] = 0
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=t.dtype)
    for _ in range(count):
        i = randint(generator, 0, flat.numel() - 1)
        flat[i] = specials[randint(generator, 0, 2)]
    return t


def assert_same_nonfinite(actual, expected, rtol, atol, label):
    """NaN, +inf and -inf exactly where `expected` has them; the finite rest allclose (atol scaled by it)."""
    assert actual.shape == expected.shape, f"{label}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    inf = float("inf")
    for name, mask in (("NaN", torch.isnan), ("+inf", lambda t: t == inf), ("-inf", lambda t: t == -inf)):
        diff = mask(a) ^ mask(e)
        if diff.any():
            first = tuple(diff.nonzero()[0].tolist())
            raise AssertionError(
                f"{label}: {name} at {int(diff.sum())} of {a.numel()} positions differs from torch; first at "
                f"{first}: actual {a[first].item()!r}, expected {e[first].item()!r}"
            )
    finite = torch.isfinite(e)
    scale = max(1.0, e[finite].abs().max().item()) if finite.any() else 1.0
    assert_close_verbose(
        a.masked_fill(~finite, 0), e.masked_fill(~finite, 0), rtol=rtol, atol=atol * scale, label=label
    )


def nonfinite_conv_case(generator, out_channels, dtype):
    """A tiny random transposed convolution with NaN/inf in its input, its weight or both, and zeros in its
    input (whole planes at times): (x, w, b, stride, padding, output_padding, groups, dilation)."""
    while True:
        groups = 2 if out_channels % 2 == 0 and randint(generator, 0, 3) == 0 else 1
        in_channels = groups * randint(generator, 1, 3)
        kernel = (randint(generator, 1, 4), randint(generator, 1, 4))
        stride = (randint(generator, 1, 3), randint(generator, 1, 3))
        dilation = (
            (1, 1) if randint(generator, 0, 4) else (randint(generator, 1, 2), randint(generator, 1, 2))
        )
        padding = tuple(randint(generator, 0, dilation[i] * (kernel[i] - 1)) for i in range(2))
        output_padding = tuple(randint(generator, 0, max(stride[i], dilation[i]) - 1) for i in range(2))
        size = (randint(generator, 1, 5), randint(generator, 1, 5))
        out = [
            (size[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + output_padding[i] + 1
            for i in range(2)
        ]
        if min(out) >= 1:
            break
    where = ("input", "weight", "both")[randint(generator, 0, 2)]
    x = torch.randn(randint(generator, 1, 2), in_channels, *size, generator=generator, dtype=dtype)
    if randint(generator, 0, 2) == 0:
        x[:, randint(generator, 0, in_channels - 1)] = 0
    x = sprinkle_nonfinite(x, generator, randint(generator, 1, 3) if where != "weight" else 0, 0.2)
    w = torch.randn(in_channels, out_channels // groups, *kernel, generator=generator, dtype=dtype)
    w = sprinkle_nonfinite(w, generator, randint(generator, 1, 2) if where != "input" else 0)
    b = torch.randn(out_channels, generator=generator, dtype=dtype) if randint(generator, 0, 1) else None
    return x, w, b, stride, padding, output_padding, groups, dilation


def nonfinite_tolerance(dtype):
    return (1e-10, 1e-10) if dtype == torch.float64 else (1e-4, 1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_nonfinite_issue_example(backend):
    # Issue 12: the direct path multiplied its zero halo by the inf weight (48 NaN where torch has 36).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 6, 6, generator=g)
    x[0, 0] = 0
    w = torch.randn(3, 2, 3, 3, generator=g)
    w[0, 0, 1, 1] = float("inf")
    expected = exact_conv_transpose2d(x, w, None)
    assert int(expected.isnan().sum()) == 36 and torch.equal(
        F.conv_transpose2d(x, w).isnan(), expected.isnan()
    )
    assert_same_nonfinite(zk.conv_transpose2d(x, w), expected, 1e-4, 1e-5, f"{backend} issue example")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS)
def test_nonfinite_propagate_as_torch(backend, dtype):
    """Fuzz: NaN and +/-inf at random in inputs and weights, output channels 1..6 and wider, strides 1-3,
    paddings, output_padding, groups and dilations; NaN and inf where torch has them, the rest allclose."""
    g = torch.Generator().manual_seed(12 + (dtype == torch.float64))
    cases = 9 if backend == "triton" else 72  # the interpreter costs ~30 ms a launch
    rtol, atol = nonfinite_tolerance(dtype)
    for i in range(cases):
        x, w, b, *args = nonfinite_conv_case(
            g, NONFINITE_OUT_CHANNELS[i % len(NONFINITE_OUT_CHANNELS)], dtype
        )
        expected = exact_conv_transpose2d(x, w, b, *args)
        label = f"case {i}: x {tuple(x.shape)} w {tuple(w.shape)} bias {b is not None} args {args}"
        assert_same_nonfinite(zk.conv_transpose2d(x, w, b, *args), expected, rtol, atol, label)


def test_huge_stride_over_tiny_input(backend):
    # Issue 12, item 3: the direct kernel's per-residue tap lists were sized by the stride (2**26: 1.5 GB
    # for a 1x1 input whose output is the 2x2 kernel). Scratch must follow the input and output.
    x, w = torch.full((1, 1, 1, 1), 3.0), torch.arange(4.0).view(1, 1, 2, 2)
    out, growth = peak_rss_growth(lambda: zk.conv_transpose2d(x, w, stride=2**26))
    if backend == "triton" and isinstance(out, ValueError):  # its grid has a program axis per phase
        assert "stride" in str(out)
        return
    assert growth < SMALL_MEMORY, f"{growth / 2**20:.0f} MiB for a 1x1 input"
    assert torch.equal(out, F.conv_transpose2d(x, w, stride=2**26)), out


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS)
def test_nonfinite_low_precision(backend, dtype):
    # fp16/bf16 take the cpu backend's torch path, checked for NaN/inf weights by their bits.
    g = torch.Generator().manual_seed(14 + (dtype == torch.bfloat16))
    for i in range(3 if backend == "triton" else 18):
        out_channels = NONFINITE_OUT_CHANNELS[i % len(NONFINITE_OUT_CHANNELS)]
        x, w, b, *args = nonfinite_conv_case(g, out_channels, dtype)
        label = f"case {i}: x {tuple(x.shape)} w {tuple(w.shape)} bias {b is not None} args {args}"
        expected = exact_conv_transpose2d(x, w, b, *args)
        assert_same_nonfinite(zk.conv_transpose2d(x, w, b, *args), expected, 2e-2, 2e-2, label)
