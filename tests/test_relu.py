"""relu (bit-equal torch.relu) and its three backward rules, on every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, FLOAT_DTYPES, assert_bitwise_equal, backend_outputs, distinct, tied, with_nans
from torch.autograd import gradcheck, gradgradcheck

import zfkernels as zk

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE_IDS = lambda d: str(d).split(".")[-1]
RULES = ["standard", "deconvnet", "guided"]
# Comparisons are bitwise except inside NaNs: any NaN matches any NaN. (torch itself does not keep NaN
# payloads: its vectorized bfloat16 relu turns 0x7FC0 into 0xFFFF, and float16 quiets signalling NaNs.)


def specials(dtype):
    """Signed zeros, infinities, subnormals, extremes, quiet NaNs of both signs, ties at zero."""
    info = torch.finfo(dtype)
    base = torch.tensor(
        [
            -0.0,
            0.0,
            -1.0,
            1.0,
            float("inf"),
            float("-inf"),
            info.max,
            -info.max,
            info.tiny / 2,
            -info.tiny / 2,
            info.smallest_normal,
            -info.smallest_normal,
            float("nan"),
            0.5,
            -0.5,
        ],
        dtype=torch.float64,
    ).to(dtype)
    return torch.cat([base, -base[-3:-2]])  # and a NaN with its sign bit set


def torch_relu_grad(x, grad):
    """torch's own relu gradient (threshold_backward on the output)."""
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(torch.relu(xg), xg, grad_outputs=grad)
    return g


# ------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_forward_specials_bitwise(backend, dtype):
    x = specials(dtype)
    assert_bitwise_equal(zk.relu(x), torch.relu(x), "relu")
    assert torch.signbit(zk.relu(x)[0]).item()  # -0.0 stays -0.0, as in torch.relu


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape",
    [(), (0,), (7,), (2, 3, 5, 4), (1, 2, 1, 3, 4, 2), (3, 70001)],
    ids=["0d", "empty", "1d", "4d", "6d", "multi_block"],
)
def test_forward_matches_torch(backend, gen, dtype, shape):
    x = with_nans(torch.randn(shape, generator=gen).to(dtype), gen, 0.05)
    if x.numel():
        x.view(-1)[::7] = -0.0
    assert_bitwise_equal(zk.relu(x), torch.relu(x), "relu")
    assert zk.relu(x).shape == x.shape


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_backends_agree_bitwise(gen, dtype):
    x = torch.cat([specials(dtype), with_nans(tied((300,), dtype, gen), gen)])
    grad = torch.cat([specials(dtype).flip(0), with_nans(tied((300,), dtype, gen), gen)])
    forward = backend_outputs(zk.relu, x)
    for rule in RULES:
        backward = backend_outputs(zk.relu_backward, grad, torch.relu(x), rule)
        for name in BACKENDS[1:]:
            assert_bitwise_equal(backward[name], backward[BACKENDS[0]], f"{rule} {name} vs {BACKENDS[0]}")
    for name in BACKENDS[1:]:
        assert_bitwise_equal(forward[name], forward[BACKENDS[0]], f"forward {name} vs {BACKENDS[0]}")


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "expanded"])
def test_forward_layouts(backend, gen, layout):
    base = with_nans(tied((2, 3, 6, 5), torch.float32, gen), gen)
    x = {
        "transposed": base.transpose(1, 3),
        "sliced": base[:, ::2, 1:, ::2],
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "expanded": base[:1, :1].expand(2, 3, 6, 5),
    }[layout]
    assert not x.is_contiguous()
    assert_bitwise_equal(zk.relu(x), torch.relu(x), "relu")
    grad = tied(x.shape, torch.float32, gen).transpose(-1, -2).contiguous().transpose(-1, -2)
    for rule in RULES:
        assert_bitwise_equal(
            zk.relu_backward(grad, zk.relu(x), rule),
            zk.relu_backward(grad.contiguous(), torch.relu(x).contiguous(), rule),
            rule,
        )


# -------------------------------------------------------------------------------------------- inplace
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_inplace(backend, gen, dtype):
    x = with_nans(tied((2, 3, 4, 5), dtype, gen), gen)
    y = x.clone()
    out = zk.relu(y, inplace=True)
    assert out is y
    assert_bitwise_equal(y, torch.relu(x), "relu inplace")


def test_inplace_non_contiguous_writes_through(backend, gen):
    base = tied((4, 6), torch.float32, gen)
    expected = base.clone()
    expected[:, ::2] = torch.relu(expected[:, ::2])
    view = base[:, ::2]
    assert zk.relu(view, inplace=True) is view
    assert_bitwise_equal(base, expected, "strided in-place relu")


def test_inplace_autograd(backend, gen):
    x = distinct((2, 3, 4), torch.float64, gen).requires_grad_()
    grad = tied((2, 3, 4), torch.float64, gen)
    y = x * 1.0
    out = zk.relu(y, inplace=True)
    assert out is y
    out.backward(grad)
    assert_bitwise_equal(x.grad, torch_relu_grad(x.detach(), grad), "grad through in-place relu")
    leaf = x.detach().clone().requires_grad_()
    with pytest.raises(RuntimeError, match="leaf"):
        zk.relu(leaf, inplace=True)  # same rule as torch.relu_


def test_inplace_no_grad_mode(backend, gen):
    x = tied((3, 5), torch.float32, gen).requires_grad_()
    with torch.no_grad():
        y = x.clone()
        zk.relu(y, inplace=True)
    assert_bitwise_equal(y, torch.relu(x.detach()), "no_grad in-place")


# ------------------------------------------------------------------------------------------ backward
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rule", RULES)
def test_backward_rules(backend, gen, dtype, rule):
    x = torch.cat([specials(dtype), with_nans(tied((200,), dtype, gen), gen)])
    grad = torch.cat([specials(dtype).roll(5), with_nans(tied((200,), dtype, gen), gen)])
    standard = torch_relu_grad(x, grad)  # torch: a NaN output lets the gradient through
    expected = {"standard": standard, "deconvnet": torch.relu(grad), "guided": torch.relu(standard)}[rule]
    xg = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(zk.relu(xg, backward=rule), xg, grad_outputs=grad)
    assert_bitwise_equal(got, expected, f"autograd {rule}")
    assert_bitwise_equal(zk.relu_backward(grad, torch.relu(x), rule), expected, f"relu_backward {rule}")


def test_backward_rules_differ_where_they_should(backend):
    x = torch.tensor([-1.0, -1.0, 2.0, 2.0, 0.0])
    grad = torch.tensor([3.0, -3.0, 3.0, -3.0, 5.0])
    expected = {
        "standard": [0.0, 0.0, 3.0, -3.0, 0.0],
        "deconvnet": [3.0, 0.0, 3.0, 0.0, 5.0],
        "guided": [0.0, 0.0, 3.0, 0.0, 0.0],
    }
    for rule, want in expected.items():
        xg = x.clone().requires_grad_()
        zk.relu(xg, backward=rule).backward(grad)
        assert xg.grad.tolist() == want, rule


def test_standard_rule_passes_gradient_at_nan_output(backend):
    x = torch.tensor([float("nan"), -float("nan"), 0.0, -0.0])
    grad = torch.tensor([2.0, 3.0, 4.0, 5.0])
    got = zk.relu_backward(grad, zk.relu(x), "standard")
    assert got.tolist() == [2.0, 3.0, 0.0, 0.0]
    assert_bitwise_equal(got, torch.ops.aten.threshold_backward(grad, torch.relu(x), 0), "threshold_backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS)
def test_default_rule_is_standard(backend, gen, dtype):
    x = tied((50,), dtype, gen)
    grad = tied((50,), dtype, gen)
    xg = x.clone().requires_grad_()
    zk.relu(xg).backward(grad)
    assert_bitwise_equal(xg.grad, torch_relu_grad(x, grad), "default rule")
    assert_bitwise_equal(
        zk.relu_backward(grad, torch.relu(x)), torch_relu_grad(x, grad), "default relu_backward"
    )


# ----------------------------------------------------------------------------------------- autograd
def test_gradcheck_standard(backend, gen):
    x = distinct((2, 3, 4), torch.float64, gen).requires_grad_()
    assert gradcheck(lambda t: zk.relu(t), (x,))
    assert gradgradcheck(lambda t: zk.relu(t), (x,))


@pytest.mark.parametrize("rule", RULES)
def test_gradcheck_relu_backward(backend, gen, rule):
    # relu_backward is piecewise linear in grad: away from grad == 0 gradcheck holds for every rule.
    grad = distinct((3, 4), torch.float64, gen).requires_grad_()
    output = torch.relu(tied((3, 4), torch.float64, gen))
    fn = lambda g: zk.relu_backward(g, output, rule)
    assert gradcheck(fn, (grad,))
    assert gradgradcheck(fn, (grad,))


@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
def test_double_backward_of_rules(backend, gen, rule):
    # The gradient of the rule's output with respect to its incoming gradient, through autograd.
    x = distinct((20,), torch.float64, gen).requires_grad_()
    grad = distinct((20,), torch.float64, gen).requires_grad_()
    (first,) = torch.autograd.grad(zk.relu(x, backward=rule), x, grad_outputs=grad, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), grad)
    passes = grad.detach() > 0 if rule == "deconvnet" else (grad.detach() > 0) & (x.detach() > 0)
    assert_bitwise_equal(second, passes.to(torch.float64), f"d(rule)/d(grad) {rule}")


# ------------------------------------------------------------------------------------ opcheck/compile
def _relu_samples():
    g = torch.Generator().manual_seed(3)
    return [
        (distinct((2, 3, 4), torch.float64, g).requires_grad_(), 0),
        (distinct((5,), torch.float64, g).requires_grad_(), 1),
        (distinct((2, 2, 3, 3), torch.float32, g).requires_grad_(), 2),
        (tied((3, 4), torch.float16, g), 0),
        (tied((0, 4), torch.bfloat16, g), 1),
        (distinct((), torch.float32, g), 0),
    ]


@pytest.mark.parametrize("sample", range(6))
def test_opcheck(backend, sample):
    x, rule = _relu_samples()[sample]
    torch.library.opcheck(torch.ops.zfkernels.relu.default, (x, rule))
    torch.library.opcheck(torch.ops.zfkernels.relu_.default, (x.detach().clone(),))
    grad = tied(x.shape, x.dtype, torch.Generator().manual_seed(sample)).requires_grad_(x.requires_grad)
    output = torch.relu(x.detach())
    torch.library.opcheck(torch.ops.zfkernels.relu_backward.default, (grad, output, rule))


def test_compile_fullgraph(gen):
    def fn(x):
        a = zk.relu(x, backward="guided")
        b = x * 2
        zk.relu(b, inplace=True)
        return a + zk.relu(-x, backward="deconvnet"), b

    x = with_nans(tied((2, 3, 5, 5), torch.float32, gen), gen)
    compiled = torch.compile(fn, fullgraph=True)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = compiled(xc), fn(xe)
    assert_bitwise_equal(got[0], want[0], "compiled relu")
    assert_bitwise_equal(got[1], want[1], "compiled in-place relu")
    grad = tied(x.shape, torch.float32, gen)
    (got[0] * grad + got[1]).sum().backward()
    (want[0] * grad + want[1]).sum().backward()
    assert_bitwise_equal(xc.grad, xe.grad, "compiled grad")


def test_compile_inplace_no_grad(gen):
    def fn(x):
        y = x + 1
        zk.relu(y, inplace=True)
        return y

    x = tied((4, 7), torch.float32, gen)
    with torch.no_grad():
        assert_bitwise_equal(torch.compile(fn, fullgraph=True)(x), torch.relu(x + 1), "compiled relu_")


# ------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs(backend):
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="input"):
        zk.relu(torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="input"):
        zk.relu([1.0, -1.0])
    many_dims = -torch.ones([1] * 9)  # any rank, as torch.relu
    assert torch.equal(zk.relu(many_dims), torch.relu(many_dims))
    with pytest.raises(ValueError, match="backward"):
        zk.relu(x, backward="rectified")
    with pytest.raises(ValueError, match="backward"):
        zk.relu(x, inplace=True, backward="Guided")
    with pytest.raises(ValueError, match="backward"):
        zk.relu_backward(x, x, "sideways")
    with pytest.raises(TypeError, match="grad"):
        zk.relu_backward(x.int(), x)
    with pytest.raises(TypeError, match="output"):
        zk.relu_backward(x, x.int())
    with pytest.raises(ValueError, match="output"):
        zk.relu_backward(x, x[:2])
    with pytest.raises(ValueError, match="output"):
        zk.relu_backward(x, x.double())
    with pytest.raises(ValueError, match="output"):
        zk.relu_backward(x, x.to("meta"))
    with pytest.raises(ValueError, match="grad"):
        zk.relu_backward(x.to("meta"), x)


def test_auto_runs_torchs_relu_where_it_is_the_same_op_and_faster():
    """Under "auto" on the CPU a small contiguous call of the standard rule is torch.relu itself (the same
    bits forward and backward, and a cheaper call); large tensors, other rules and named backends run ours."""
    from zfkernels.memory import CACHED_OUTPUT_MIN_BYTES

    small = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert zk.relu(small).grad_fn.name() == "ReluBackward0"
    assert "zfkernels" in zk.relu(small, backward="guided").grad_fn.name()
    large = torch.randn(CACHED_OUTPUT_MIN_BYTES // 4 + 1, requires_grad=True)
    assert "zfkernels" in zk.relu(large).grad_fn.name()
    assert (
        "zfkernels" in zk.relu(small.detach().transpose(2, 3).requires_grad_()).grad_fn.name()
    )  # not contiguous
    with zk.use_backend("cpu"):
        assert "zfkernels" in zk.relu(small).grad_fn.name()
    x = small.detach().clone()
    x.view(-1)[:3] = torch.tensor([float("nan"), -0.0, float("-inf")])
    assert torch.equal(zk.relu(x).view(torch.int32), torch.relu(x).view(torch.int32))
