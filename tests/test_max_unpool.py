"""max_unpool2d (sums at shared argmaxes) and gather_switches (its adjoint), bit-exact on every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BACKENDS,
    POOL_CONFIGS,
    assert_bitwise_equal,
    backend_outputs,
    invalid_switch_cases,
    loop_unpool,
    make_input,
    tied,
    with_nans,
)

import zfkernels as zk
from zfkernels.ops import reference

pytestmark = pytest.mark.usefixtures("single_thread")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def geometry(kernel, stride, padding):
    return _pair(kernel), _pair(stride if stride is not None else kernel), _pair(padding)


def pooled(x, kernel, stride, padding, ceil_mode, relu=False):
    """values, our switches, torch's int64 indices."""
    values, switches = zk.max_pool2d_switches(x, kernel, stride, padding, ceil_mode, relu=relu)
    indices = zk.switches_to_indices(switches, x.shape, kernel, stride, padding)
    return values, switches, indices


def shared_argmax_count(indices):
    """How many pooled positions point at an input position another window already claimed."""
    flat = indices.flatten(2)
    return sum(
        int(flat[n, c].numel() - flat[n, c].unique().numel())
        for n in range(flat.shape[0])
        for c in range(flat.shape[1])
    )


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("values_kind", ["pooled", "ties", "nan"])
@pytest.mark.parametrize("kind", ["distinct", "ties", "zeros"])
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, size", POOL_CONFIGS)
def test_matches_loop_reference(
    backend, gen, kernel, stride, padding, ceil_mode, size, kind, values_kind, relu
):
    x = make_input(kind, (2, 3, *size), torch.float32, gen)
    values, switches, indices = pooled(x, kernel, stride, padding, ceil_mode)
    if values_kind == "ties":  # mixed signs: the sums can cancel and relu matters
        values = tied(values.shape, torch.float32, gen)
    elif values_kind == "nan":
        values = with_nans(tied(values.shape, torch.float32, gen), gen)
    k, s, p = geometry(kernel, stride, padding)
    expected = loop_unpool(values, switches, k, s, p, size, relu)
    out = zk.max_unpool2d(values, switches, kernel, stride, padding, output_size=size, relu=relu)
    assert_bitwise_equal(out, expected, "unpool(switches)")
    out_indices = zk.max_unpool2d(values, indices, kernel, stride, padding, output_size=size, relu=relu)
    assert_bitwise_equal(out_indices, expected, "unpool(torch indices)")


@pytest.mark.parametrize("switch_kind", ["switches", "indices"])
@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16],
    ids=lambda d: str(d).split(".")[-1],
)
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, size", POOL_CONFIGS[:7])
def test_backends_agree_bitwise(gen, kernel, stride, padding, ceil_mode, size, dtype, switch_kind):
    x = tied((2, 3, *size), dtype, gen)
    values, switches, indices = pooled(x, kernel, stride, padding, ceil_mode)
    s = switches if switch_kind == "switches" else indices
    v = tied(values.shape, dtype, gen) * 0.3  # not exactly representable: sums round
    for relu in (False, True):
        results = backend_outputs(zk.max_unpool2d, v, s, kernel, stride, padding, size, relu=relu)
        gathers = backend_outputs(zk.gather_switches, x, s, kernel, stride, padding)
        for name in BACKENDS[1:]:
            assert_bitwise_equal(results[name], results[BACKENDS[0]], f"unpool {name} vs {BACKENDS[0]}")
            assert_bitwise_equal(gathers[name], gathers[BACKENDS[0]], f"gather {name} vs {BACKENDS[0]}")


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16],
    ids=lambda d: str(d).split(".")[-1],
)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, size", [POOL_CONFIGS[0], POOL_CONFIGS[5]])
def test_dtypes(backend, gen, kernel, stride, padding, ceil_mode, size, relu, dtype):
    x = tied((2, 3, *size), dtype, gen)
    values, switches, indices = pooled(x, kernel, stride, padding, ceil_mode, relu=True)
    values = with_nans(tied(values.shape, dtype, gen) / 3, gen, 0.05)
    k, s, p = geometry(kernel, stride, padding)
    out = zk.max_unpool2d(values, switches, kernel, stride, padding, size, relu=relu)
    assert_bitwise_equal(out, loop_unpool(values, switches, k, s, p, size, relu), "unpool")
    assert_bitwise_equal(
        out, reference.max_unpool2d(values, switches, k, s, p, size, relu), "unpool vs reference"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_sums_round_once(backend, gen, dtype):
    # Every interior position is the argmax of 4 windows (3x3 stride 2): sums of 4 values that need
    # rounding. Summing in float and rounding once differs from summing in the storage type.
    x = torch.ones(2, 3, 13, 13, dtype=dtype)
    x[..., 2::2, 2::2] = 2.0
    values, switches, indices = pooled(x, 3, 2, 0, True)
    assert shared_argmax_count(indices) > 0
    mantissa = torch.randint(0, 1024, values.shape, generator=gen).to(torch.float32)
    values = (
        (1 + mantissa / 1024) * torch.where(torch.rand(values.shape, generator=gen) < 0.3, -1.0, 1.0)
    ).to(dtype)
    out = zk.max_unpool2d(values, switches, 3, 2, output_size=(13, 13))
    expected = loop_unpool(values, switches, (3, 3), (2, 2), (0, 0), (13, 13))
    assert_bitwise_equal(out, expected, "unpool (float accumulation)")
    naive = loop_unpool(values, switches, (3, 3), (2, 2), (0, 0), (13, 13), acc_dtype=dtype)
    assert not torch.equal(naive, out), "inputs too easy: rounding in the storage type gives the same sums"
    # the cpu backend's half/bfloat16 <-> float conversions (csrc/kernels/common.h) against torch's
    results = backend_outputs(zk.max_unpool2d, values, switches, 3, 2, 0, (13, 13), relu=True)
    for name in BACKENDS[1:]:
        assert_bitwise_equal(results[name], results[BACKENDS[0]], f"{name} vs {BACKENDS[0]}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_specials_round_trip(backend, dtype):
    # Subnormals, the largest finite value (whose doubling overflows to inf), signed zeros, inf, NaN:
    # the float <-> half/bfloat16 conversions must be exact (cpu: csrc/kernels/common.h).
    info = torch.finfo(dtype)
    specials = torch.tensor(
        [
            info.tiny / 4,
            -info.tiny / 2,
            info.max,
            info.max,
            -0.0,
            0.0,
            float("inf"),
            -info.max,
            info.smallest_normal,
            3 * info.eps,
            float("nan"),
            -3 * info.tiny / 8,
        ],
        dtype=torch.float32,
    ).to(dtype)
    # kernel 1: every value lands alone, so unpool is load + store
    v = specials.view(1, 1, 3, 4)
    out = zk.max_unpool2d(v, torch.zeros(v.shape, dtype=torch.uint8), 1, output_size=(3, 4))
    assert_bitwise_equal(
        out,
        loop_unpool(v, torch.zeros(v.shape, dtype=torch.uint8), (1, 1), (1, 1), (0, 0), (3, 4)),
        "kernel 1",
    )
    x = torch.zeros(1, 1, 5, 5, dtype=dtype)
    x[..., 2, 2] = 1
    values, switches, _ = pooled(x, 3, 1, 0, False)  # 3x3 stride 1: all nine windows pick (2, 2)
    for start in range(specials.numel()):
        v = specials.roll(start)[:9].view(1, 1, 3, 3).clone()
        out = zk.max_unpool2d(v, switches, 3, 1, output_size=(5, 5))
        assert_bitwise_equal(out, loop_unpool(v, switches, (3, 3), (1, 1), (0, 0), (5, 5)), "specials summed")


# ---------------------------------------------------------------------- sums, unlike F.max_unpool2d
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_sums_where_stock_unpool_overwrites(backend, dtype):
    # Tied plateau: every 3x3/stride-2 window's maximum (all equal, 2.0) sits on a window border, so
    # neighbouring windows share it. The gradient of max-pool sums there; stock unpool overwrites.
    x = torch.ones(1, 2, 9, 9, dtype=dtype)
    x[..., 2::2, 2::2] = 2.0
    values, switches, indices = pooled(x, 3, 2, 0, True)
    assert shared_argmax_count(indices) > 0
    ours = zk.max_unpool2d(values, switches, 3, 2, output_size=x.shape[-2:])
    stock = F.max_unpool2d(values, indices, 3, 2, output_size=x.shape[-2:])
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.max_pool2d(xg, 3, 2, ceil_mode=True), xg, grad_outputs=values)
    assert_bitwise_equal(ours, grad, "unpool vs max_pool2d gradient")
    assert ours[0, 0, 2, 2].item() == 8.0 and stock[0, 0, 2, 2].item() == 2.0  # windows (0|1, 0|1) share it
    assert not torch.equal(ours, stock)
    assert ours.sum().item() == values.sum().item() != stock.sum().item()  # the sum conserves mass


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_all_equal_input(backend, dtype):
    # All-equal input: ties everywhere, so each window's switch is its first in-image element. With
    # 3x3/stride 2 those are all different (no sharing: equals stock unpool); with 3x3/stride 1/padding 1
    # the clipped border windows share them (sums, unlike stock unpool). Both equal the gradient.
    x = torch.full((1, 2, 7, 7), 0.5, dtype=dtype)
    for (stride, padding, ceil_mode), shares in [((2, 0, True), False), ((1, 1, False), True)]:
        values, switches, indices = pooled(x, 3, stride, padding, ceil_mode)
        assert (shared_argmax_count(indices) > 0) == shares
        ours = zk.max_unpool2d(values, switches, 3, stride, padding, output_size=x.shape[-2:])
        stock = F.max_unpool2d(values, indices, 3, stride, padding, output_size=x.shape[-2:])
        xg = x.clone().requires_grad_()
        out = F.max_pool2d(xg, 3, stride, padding, ceil_mode=ceil_mode)
        (grad,) = torch.autograd.grad(out, xg, grad_outputs=values)
        assert_bitwise_equal(ours, grad, "unpool vs max_pool2d gradient")
        assert torch.equal(ours, stock) != shares


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, size", POOL_CONFIGS[:9])
def test_equals_max_pool_gradient(backend, gen, kernel, stride, padding, ceil_mode, size, dtype):
    x = tied((2, 3, *size), dtype, gen)
    values, switches, indices = pooled(x, kernel, stride, padding, ceil_mode)
    grad_out = tied(values.shape, dtype, gen)
    xg = x.clone().requires_grad_()
    out = F.max_pool2d(xg, kernel, stride, padding, ceil_mode=ceil_mode)
    (grad,) = torch.autograd.grad(out, xg, grad_outputs=grad_out)
    assert_bitwise_equal(zk.max_unpool2d(grad_out, switches, kernel, stride, padding, size), grad, "unpool")
    assert_bitwise_equal(
        zk.max_unpool2d(grad_out, indices, kernel, stride, padding, size), grad, "unpool(indices)"
    )


def test_relu_applies_after_the_sum(backend):
    x = torch.zeros(1, 1, 5, 5)
    x[..., 2, 2] = 1.0
    values, switches, _ = pooled(x, 3, 2, 0, False)  # all four windows pick (2, 2)
    v = torch.tensor([[[[3.0, -1.0], [-1.0, -0.5]]]])
    out = zk.max_unpool2d(v, switches, 3, 2, output_size=(5, 5), relu=True)
    assert out[0, 0, 2, 2].item() == 0.5 and out.count_nonzero().item() == 1
    v = -v
    out = zk.max_unpool2d(v, switches, 3, 2, output_size=(5, 5), relu=True)
    assert out.count_nonzero().item() == 0
    assert not torch.signbit(out).any()


def test_default_output_size(backend, gen):
    x = tied((1, 2, 8, 8), torch.float32, gen)
    values, switches, _ = pooled(x, 2, 2, 0, False)
    out = zk.max_unpool2d(values, switches, 2)
    assert out.shape == (1, 2, 8, 8)
    assert_bitwise_equal(out, loop_unpool(values, switches, (2, 2), (2, 2), (0, 0), (8, 8)), "unpool")
    # a longer output_size such as x.shape is accepted (its last two entries count)
    assert_bitwise_equal(
        zk.max_unpool2d(values, switches, 2, output_size=x.shape), out, "output_size=x.shape"
    )


# ------------------------------------------------------------------------------------------- gather
@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16],
    ids=lambda d: str(d).split(".")[-1],
)
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, size", POOL_CONFIGS)
def test_gather_matches_torch_gather(backend, gen, kernel, stride, padding, ceil_mode, size, dtype):
    x = tied((2, 3, *size), dtype, gen)
    _, switches, indices = pooled(x, kernel, stride, padding, ceil_mode)
    source = with_nans(tied(x.shape, dtype, gen) / 3, gen, 0.1)
    expected = source.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)
    assert_bitwise_equal(zk.gather_switches(source, switches, kernel, stride, padding), expected, "gather")
    assert_bitwise_equal(
        zk.gather_switches(source, indices, kernel, stride, padding), expected, "gather(indices)"
    )


def test_gather_of_pooled_input_gives_values(backend, gen):
    x = with_nans(tied((2, 3, 13, 13), torch.float32, gen), gen)
    values, switches, _ = pooled(x, 3, 2, 0, True)
    assert_bitwise_equal(zk.gather_switches(x, switches, 3, 2), values, "gather(x) == values")


def test_unpool_and_gather_are_adjoint(backend, gen):
    x = tied((2, 3, 11, 10), torch.float64, gen)
    values, switches, _ = pooled(x, 3, 2, 1, True)
    v = torch.randn(values.shape, generator=gen, dtype=torch.float64)
    s = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    lhs = (zk.max_unpool2d(v, switches, 3, 2, 1, x.shape[-2:]) * s).sum()
    rhs = (v * zk.gather_switches(s, switches, 3, 2, 1)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("switch_kind", ["switches", "indices"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize(
    "kernel, stride, padding, ceil_mode, size",
    [(3, 2, 0, True, (7, 7)), (3, 1, 1, False, (5, 6)), ((2, 3), (1, 2), 1, False, (4, 5))],
)
def test_unpool_gradcheck(
    backend, grad_checks, gen, kernel, stride, padding, ceil_mode, size, relu, switch_kind
):
    gradcheck, gradgradcheck = grad_checks
    x = tied((1, 2, *size), torch.float64, gen)  # ties: shared argmaxes, so gradients sum
    _, switches, indices = pooled(x, kernel, stride, padding, ceil_mode)
    s = switches if switch_kind == "switches" else indices
    values = torch.randn(switches.shape, generator=gen, dtype=torch.float64).requires_grad_()
    fn = lambda v: zk.max_unpool2d(v, s, kernel, stride, padding, size, relu=relu)
    assert gradcheck(fn, (values,))
    assert gradgradcheck(fn, (values,))


@pytest.mark.parametrize(
    "kernel, stride, padding, ceil_mode, size", [(3, 2, 0, True, (7, 7)), (3, 1, 1, False, (5, 6))]
)
def test_gather_gradcheck(backend, grad_checks, gen, kernel, stride, padding, ceil_mode, size):
    gradcheck, gradgradcheck = grad_checks
    x = tied((1, 2, *size), torch.float64, gen)
    _, switches, _ = pooled(x, kernel, stride, padding, ceil_mode)
    source = torch.randn(x.shape, generator=gen, dtype=torch.float64).requires_grad_()
    fn = lambda t: zk.gather_switches(t, switches, kernel, stride, padding)
    assert gradcheck(fn, (source,))
    assert gradgradcheck(fn, (source,))


def test_switches_get_no_gradient(gen):
    x = tied((1, 1, 5, 5), torch.float64, gen)
    values, switches, _ = pooled(x, 2, 1, 0, False)
    out = zk.max_unpool2d(values.requires_grad_(), switches, 2, 1, output_size=(5, 5))
    out.sum().backward()
    assert not switches.requires_grad and values.grad is not None


# ------------------------------------------------------------------------------------ opcheck/compile
def _unpool_samples():
    g = torch.Generator().manual_seed(2)
    samples = []
    for dtype, kernel, stride, padding, ceil_mode, size, relu, use_indices, grad in [
        (torch.float64, 3, 2, 0, True, (7, 7), False, False, True),
        (torch.float64, 3, 1, 1, False, (5, 6), True, False, True),
        (torch.float32, 3, 2, 1, True, (6, 7), True, True, True),
        (torch.float16, (2, 3), (1, 2), (1, 1), False, (6, 7), False, False, False),
        (torch.bfloat16, 2, 2, 0, True, (5, 5), True, True, False),
        (torch.float32, 17, 1, 0, False, (17, 17), False, False, True),  # int16 switches
    ]:
        x = tied((2, 2, *size), dtype, g)
        _, switches, indices = pooled(x, kernel, stride, padding, ceil_mode)
        values = torch.randn(switches.shape, generator=g).to(dtype).requires_grad_(grad)
        k, s, p = (list(t) for t in geometry(kernel, stride, padding))
        samples.append(
            (
                (values, indices if use_indices else switches, k, s, p, list(size), relu),
                (
                    torch.randn(x.shape, generator=g).to(dtype).requires_grad_(grad),
                    indices if use_indices else switches,
                    k,
                    s,
                    p,
                ),
            )
        )
    return samples


@pytest.mark.parametrize("sample", range(6))
def test_opcheck(backend, sample):
    unpool_args, gather_args = _unpool_samples()[sample]
    torch.library.opcheck(torch.ops.zfkernels.max_unpool2d.default, unpool_args)
    torch.library.opcheck(torch.ops.zfkernels.gather_switches.default, gather_args)


def test_compile_fullgraph(gen):
    def fn(values, switches, source):
        unpooled = zk.max_unpool2d(values, switches, 3, 2, output_size=(13, 13), relu=True)
        return unpooled, zk.gather_switches(source * unpooled, switches, 3, 2)

    x = tied((2, 3, 13, 13), torch.float32, gen)
    _, switches, _ = pooled(x, 3, 2, 0, True)
    values = tied(switches.shape, torch.float32, gen)
    source = tied(x.shape, torch.float32, gen)
    compiled = torch.compile(fn, fullgraph=True)
    vc, ve = values.clone().requires_grad_(), values.clone().requires_grad_()
    got, want = compiled(vc, switches, source), fn(ve, switches, source)
    assert_bitwise_equal(got[0], want[0], "compiled unpool")
    assert_bitwise_equal(got[1], want[1], "compiled gather")
    (got[0].sum() + got[1].sum()).backward()
    (want[0].sum() + want[1].sum()).backward()
    assert_bitwise_equal(vc.grad, ve.grad, "compiled grad")


# ---------------------------------------------------------------------------------------- layouts
def _layouts(t):
    """The same logical tensor in several non-contiguous layouts."""
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    big[..., ::2] = t
    return {
        "transposed": t.transpose(-1, -2).contiguous().transpose(-1, -2),
        "sliced": big[..., ::2],
        "channels_last": t.contiguous(memory_format=torch.channels_last),
    }


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_non_contiguous_layouts(backend, gen, layout):
    x = tied((2, 3, 13, 11), torch.float32, gen)
    values, switches, indices = pooled(x, 3, 2, 0, True)
    values = tied(values.shape, torch.float32, gen)
    expected = zk.max_unpool2d(values, switches, 3, 2, output_size=(13, 11), relu=True)
    v, s, i = _layouts(values)[layout], _layouts(switches)[layout], _layouts(indices)[layout]
    assert not v.is_contiguous() and not s.is_contiguous()
    assert_bitwise_equal(zk.max_unpool2d(v, s, 3, 2, output_size=(13, 11), relu=True), expected, "unpool")
    assert_bitwise_equal(
        zk.max_unpool2d(v, i, 3, 2, output_size=(13, 11), relu=True), expected, "unpool(indices)"
    )
    source = _layouts(tied(x.shape, torch.float32, gen))[layout]
    expected_gather = zk.gather_switches(source.contiguous(), switches, 3, 2)
    assert_bitwise_equal(zk.gather_switches(source, s, 3, 2), expected_gather, "gather")


def test_unbatched(backend, gen):
    x = tied((3, 9, 8), torch.float32, gen)
    values, switches, indices = pooled(x, 3, 2, 0, True)
    assert values.dim() == 3
    out = zk.max_unpool2d(values, switches, 3, 2, output_size=(9, 8), relu=True)
    assert_bitwise_equal(
        out, zk.max_unpool2d(values[None], switches[None], 3, 2, output_size=(9, 8), relu=True)[0], "unpool"
    )
    assert_bitwise_equal(zk.gather_switches(x, switches, 3, 2), values, "gather")


def test_empty_batch_unpool(backend):
    values = torch.empty(0, 3, 3, 3)
    switches = torch.zeros(0, 3, 3, 3, dtype=torch.uint8)
    assert zk.max_unpool2d(values, switches, 3, 2, output_size=(7, 7)).shape == (0, 3, 7, 7)
    assert zk.max_unpool2d(values, switches.long(), 3, 2, output_size=(7, 7), relu=True).shape == (0, 3, 7, 7)


def test_empty_batch_gather(backend):
    switches = torch.zeros(0, 3, 3, 3, dtype=torch.uint8)
    assert zk.gather_switches(torch.empty(0, 3, 7, 7), switches, 3, 2).shape == (0, 3, 3, 3)


# ------------------------------------------------------------------------------------- bad inputs
def _valid():
    x = torch.arange(49.0).view(1, 1, 7, 7)
    values, switches = zk.max_pool2d_switches(x, 3, 2)
    return values, switches


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda v, s: ((v[0, 0], s[0, 0], 3, 2), {}), ValueError, "values"),
        (lambda v, s: ((v.int(), s, 3, 2), {}), TypeError, "values"),
        (lambda v, s: ((v, s.float(), 3, 2), {}), TypeError, "switches"),
        (lambda v, s: ((v, s.to(torch.int8), 3, 2), {}), TypeError, "switches"),
        (lambda v, s: ((v, s[..., :2], 3, 2), {}), ValueError, "switches"),
        (lambda v, s: ((v, s[0], 3, 2), {}), ValueError, "switches"),
        (lambda v, s: ((v, s, 3, 2), {"output_size": (9, 9)}), ValueError, "output_size"),
        (lambda v, s: ((v, s, 3, 2), {"output_size": (4, 7)}), ValueError, "output_size"),
        (lambda v, s: ((v, s, 3, 2), {"output_size": "77"}), TypeError, "output_size"),
        (lambda v, s: ((v, s, 0, 2), {}), ValueError, "kernel_size"),
        # a kernel larger than the (padded) output: no output_size pools to the values' size
        (lambda v, s: ((v, s, 9, 2), {"output_size": (7, 7)}), ValueError, "output_size"),
        (lambda v, s: ((v, s, 3, 0), {}), ValueError, "stride"),
        (lambda v, s: ((v, s, 3, 2, 2), {}), ValueError, "padding"),
        (lambda v, s: ((v, s.to("meta"), 3, 2), {}), ValueError, "switches"),
        (lambda v, s: ((v.to("meta"), s, 3, 2), {}), ValueError, "values"),
    ],
)
def test_unpool_bad_inputs(backend, make, error, match):
    args, kwargs = make(*_valid())
    with pytest.raises(error, match=match):
        zk.max_unpool2d(*args, **kwargs)


@pytest.mark.parametrize("case", list(invalid_switch_cases()))
def test_switches_outside_window_raise(backend, case):
    values, switches, kernel, stride, padding, size = invalid_switch_cases()[case]
    with pytest.raises(ValueError, match="switches"):
        zk.max_unpool2d(values, switches, kernel, stride, padding, size)
    with pytest.raises(ValueError, match="switches"):
        zk.max_unpool2d(values, switches, kernel, stride, padding, size, relu=True)
    with pytest.raises(ValueError, match="switches"):
        zk.gather_switches(torch.ones(1, 1, *size), switches, kernel, stride, padding)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda x, s: ((x[0, 0], s, 3, 2), {}), ValueError, "source"),
        (lambda x, s: ((x.long(), s, 3, 2), {}), TypeError, "source"),
        (lambda x, s: ((x, s.float(), 3, 2), {}), TypeError, "switches"),
        (lambda x, s: ((x, s[0], 3, 2), {}), ValueError, "switches"),
        (lambda x, s: ((x, s.expand(2, 1, 3, 3), 3, 2), {}), ValueError, "switches"),
        (lambda x, s: ((x, s.to("meta"), 3, 2), {}), ValueError, "switches"),
        (lambda x, s: ((x, s, 0, 2), {}), ValueError, "kernel_size"),
        (lambda x, s: ((x, s, 9, 2), {}), ValueError, "source"),
        # a source that does not pool to the switches' size: the message must name source (or switches)
        pytest.param(
            lambda x, s: ((x[..., :4, :4], s, 3, 2), {}),
            ValueError,
            "source|switches",
            id="source_too_small_for_switches",
        ),
        pytest.param(
            lambda x, s: ((torch.ones(1, 1, 11, 11), s, 3, 2), {}),
            ValueError,
            "source|switches",
            id="source_too_large_for_switches",
        ),
    ],
)
def test_gather_bad_inputs(backend, make, error, match):
    _, switches = _valid()
    args, kwargs = make(torch.ones(1, 1, 7, 7), switches)
    with pytest.raises(error, match=match):
        zk.gather_switches(*args, **kwargs)


# ---------------------------------------------------------------------------- huge windows, tiny inputs
def _status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_rss_growth(fn):
    """(what fn() returned or raised, by how many bytes the process's peak RSS rose above its RSS before
    the call). Linux: the peak (VmHWM) is reset through /proc/self/clear_refs first."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pytest.skip("no /proc/self/clear_refs to reset the peak RSS with")
    before = _status_kib("VmRSS")
    try:
        result = fn()
    except Exception as error:  # noqa: BLE001 - returned for the caller to check
        result = error
    return result, (_status_kib("VmHWM") - before) * 1024


SMALL_MEMORY = 128 << 20  # a tiny input's call must not need more (the decode table took 3.7 GB)


@pytest.mark.parametrize("window", [2**27, 2**33], ids=["2^27", "2^33"])
def test_huge_window_over_tiny_input(backend, window):
    # Issue 12: the cpu decode table had an entry per window element (2**27: 9.6 s and 3.7 GB; 2**33:
    # std::bad_alloc). Scratch must follow the input: the window's size alone costs nothing.
    values = torch.ones(1, 1, 1, 1)
    kernel, padding = (1, window), (0, window // 2)  # the one window's origin is column -window // 2
    bad = torch.zeros(1, 1, 1, 1, dtype=torch.int32)  # on the padding: invalid
    call = lambda s: zk.max_unpool2d(values, s, kernel, None, padding, output_size=(1, 1))
    result, growth = peak_rss_growth(lambda: call(bad))
    # refused: for the invalid switch, or (triton, whose kernels index in int32) for the window's size
    assert isinstance(result, ValueError) and ("switches" in str(result) or "kernel_size" in str(result)), (
        result
    )
    assert growth < SMALL_MEMORY, f"{growth / 2**20:.0f} MiB for a 1x1 input"
    if window // 2 < 2**31:  # the valid switch fits int32
        good = torch.full((1, 1, 1, 1), window // 2, dtype=torch.int32)
        result, growth = peak_rss_growth(lambda: call(good))
        assert growth < SMALL_MEMORY, f"{growth / 2**20:.0f} MiB for a 1x1 input"
        assert_bitwise_equal(result, values, "unpool")
        gathered, growth = peak_rss_growth(lambda: zk.gather_switches(values, good, kernel, None, padding))
        assert growth < SMALL_MEMORY, f"{growth / 2**20:.0f} MiB for a 1x1 input"
        assert_bitwise_equal(gathered, values, "gather")


def test_huge_stride_one_window(backend):
    # Two 1 x 2**20 windows at stride 1 cover a 1x1 map: each element is covered by two windows, not 2**20
    # (the triton gather looped over ceil(kernel / stride) windows per element).
    kernel, padding = (1, 2**20), (0, 2**19)
    values = torch.tensor([[[[2.0, 3.0]]]])
    switches = torch.tensor([[[[2**19, 2**19 - 1]]]], dtype=torch.int32)  # both point at column 0
    out = zk.max_unpool2d(values, switches, kernel, 1, padding, output_size=(1, 1))
    assert_bitwise_equal(out, torch.tensor([[[[5.0]]]]), "unpool")
    assert_bitwise_equal(
        zk.gather_switches(out, switches, kernel, 1, padding), torch.full_like(values, 5.0), "gather"
    )
