"""Forward-mode AD: every op carries tangents (dual tensors, torch.func.jvp/jacfwd), equal to the stock ops'.

Before the ops had forward-mode formulas, torch.library dropped the tangents of dual tensors (they do not
require grad) and every jvp came out as zeros; these tests fail that way.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, assert_bitwise_equal, assert_close_verbose, distinct
from torch.autograd import forward_ad, gradcheck, gradgradcheck

import zfkernels

FORWARD_ONLY = {"check_forward_ad": True, "check_backward_ad": False, "check_undefined_grad": False}
# The numerical gradchecks take thousands of launches: 15 minutes in Triton's interpreter. The triton
# backend's twins carry the same formulas (registered from the same records), which the jvp tests above
# them run on every backend; the gradchecks run where launches are cheap.
NATIVE_BACKENDS = [name for name in BACKENDS if name != "triton"]


@pytest.fixture(params=NATIVE_BACKENDS)
def native_backend(request):
    with zfkernels.use_backend(request.param):
        yield request.param


def _jvp(fn, primals, tangents):
    return torch.func.jvp(fn, primals, tangents)[1]


@pytest.fixture
def pool_input(gen):
    return distinct((2, 3, 7, 9), generator=gen)


# ------------------------------------------------------------------------------ against the stock ops
@pytest.mark.parametrize("relu", [False, True])
def test_pool_jvp_equals_stock(backend, pool_input, gen, relu):
    tangent = torch.randn(pool_input.shape, generator=gen, dtype=torch.float64)
    ours = _jvp(
        lambda x: zfkernels.max_pool2d_switches(x, 3, 2, 1, True, relu=relu)[0], (pool_input,), (tangent,)
    )
    stock = _jvp(
        lambda x: F.max_pool2d(F.relu(x) if relu else x, 3, 2, 1, ceil_mode=True), (pool_input,), (tangent,)
    )
    assert ours.abs().sum() > 0
    assert_bitwise_equal(ours, stock, "pool tangent")


@pytest.mark.parametrize("rule", ["standard", "deconvnet", "guided"])
def test_relu_jvp_is_the_true_derivative_under_every_rule(backend, gen, rule):
    x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    tangent = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ours = _jvp(lambda a: zfkernels.relu(a, backward=rule), (x,), (tangent,))
    assert ours.abs().sum() > 0
    assert_bitwise_equal(ours, _jvp(torch.relu, (x,), (tangent,)), "relu tangent")


def test_relu_inplace_carries_the_tangent(backend, gen):
    x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    tangent = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ours = _jvp(lambda a: zfkernels.relu(a.clone(), inplace=True), (x,), (tangent,))
    assert_bitwise_equal(ours, _jvp(lambda a: torch.relu_(a.clone()), (x,), (tangent,)), "in-place tangent")


def test_unpool_jvp_equals_stock_without_shared_argmaxes(backend, gen):
    x = distinct((2, 3, 8, 8), generator=gen)
    values, indices = F.max_pool2d(x, 2, return_indices=True)  # 2x2 stride 2: no window shares an argmax
    tangent = torch.randn(values.shape, generator=gen, dtype=torch.float64)
    ours = _jvp(lambda v: zfkernels.max_unpool2d(v, indices, 2, output_size=(8, 8)), (values,), (tangent,))
    stock = _jvp(lambda v: F.max_unpool2d(v, indices, 2, output_size=(8, 8)), (values,), (tangent,))
    assert_bitwise_equal(ours, stock, "unpool tangent")


def test_conv_transpose_jvp_equals_stock(backend, gen, single_thread):
    x = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    tangents = tuple(torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (x, w, b))
    kwargs = {"stride": 2, "padding": 1, "output_padding": 1}
    ours = _jvp(lambda *a: zfkernels.conv_transpose2d(*a, **kwargs), (x, w, b), tangents)
    stock = _jvp(lambda *a: F.conv_transpose2d(*a, **kwargs), (x, w, b), tangents)
    assert_close_verbose(ours, stock, 1e-10, 1e-10, "conv_transpose tangent")


def test_fused_jvp_equals_its_composition(backend, gen, single_thread):
    values, switches = zfkernels.max_pool2d_switches(distinct((1, 3, 7, 9), generator=gen), 3, 2, 0, True)
    weight = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    tangents = (torch.randn(values.shape, generator=gen, dtype=torch.float64), torch.randn_like(weight))
    fused = lambda v, w: zfkernels.unpool_conv_transpose2d(
        v, switches, w, pool_kernel_size=3, pool_stride=2, unpool_size=(7, 9), padding=1
    )
    composed = lambda v, w: F.conv_transpose2d(
        F.relu(zfkernels.max_unpool2d(v, switches, 3, 2, output_size=(7, 9))), w, padding=1
    )
    ours = _jvp(fused, (values, weight), tangents)
    assert ours.abs().sum() > 0
    assert_close_verbose(ours, _jvp(composed, (values, weight), tangents), 1e-10, 1e-10, "fused tangent")


def test_jacfwd_equals_stock(backend, gen):
    x = distinct((1, 2, 5, 5), generator=gen)
    ours = torch.func.jacfwd(lambda a: zfkernels.max_pool2d_switches(a, 2, 1, relu=True)[0])(x)
    stock = torch.func.jacfwd(lambda a: F.max_pool2d(F.relu(a), 2, 1))(x)
    assert_bitwise_equal(ours, stock, "jacobian")


def test_dual_level_api(backend, pool_input, gen):
    tangent = torch.randn(pool_input.shape, generator=gen, dtype=torch.float64)
    with forward_ad.dual_level():
        values, switches = zfkernels.max_pool2d_switches(forward_ad.make_dual(pool_input, tangent), 2)
        assert forward_ad.unpack_dual(switches).tangent is None  # switches are not differentiable
        ours = forward_ad.unpack_dual(values).tangent
    assert_bitwise_equal(ours, _jvp(lambda a: F.max_pool2d(a, 2), (pool_input,), (tangent,)), "tangent")


def test_patched_model_jvp_equals_stock(gen):
    """The issue's example: a patched Conv-ReLU-MaxPool-Linear net gave [0, 0] for a nonzero jvp."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(3, 2, ceil_mode=True),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 3 * 3, 2),
    ).double()
    x = torch.randn(1, 3, 8, 8, generator=gen, dtype=torch.float64)
    tangent = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    stock = _jvp(model, (x,), (tangent,))
    zfkernels.patch(model)
    ours = _jvp(model, (x,), (tangent,))
    assert stock.abs().sum() > 0
    assert_close_verbose(ours, stock, 1e-12, 1e-12, "patched model tangent")


# ------------------------------------------------------------------------ gradcheck, forward mode
def test_gradcheck_forward_pool_unpool_gather(native_backend, gen):
    x = distinct((1, 2, 6, 7), generator=gen).requires_grad_()
    assert gradcheck(
        lambda a: zfkernels.max_pool2d_switches(a, 3, 2, 1, True, relu=True)[0], (x,), **FORWARD_ONLY
    )
    values, switches = zfkernels.max_pool2d_switches(x.detach(), 3, 2, 1, True)
    values.requires_grad_()
    unpool = lambda v: zfkernels.max_unpool2d(v, switches, 3, 2, 1, output_size=(6, 7), relu=True)
    assert gradcheck(unpool, (values,), **FORWARD_ONLY)
    source = distinct((1, 2, 6, 7), generator=gen).requires_grad_()
    assert gradcheck(lambda s: zfkernels.gather_switches(s, switches, 3, 2, 1), (source,), **FORWARD_ONLY)


@pytest.mark.parametrize("rule", ["standard", "deconvnet", "guided"])
def test_gradcheck_forward_relu_and_its_backward(native_backend, gen, rule):
    x = distinct((2, 3, 4), generator=gen).requires_grad_()
    assert gradcheck(lambda a: zfkernels.relu(a, backward=rule), (x,), **FORWARD_ONLY)
    grad = distinct((2, 3, 4), generator=gen).requires_grad_()
    output = torch.relu(x.detach())
    assert gradcheck(lambda g: zfkernels.relu_backward(g, output, rule), (grad,), **FORWARD_ONLY)


def test_gradcheck_forward_transposed_convolutions(native_backend, gen, single_thread):
    x = torch.randn(1, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    conv = lambda *a: zfkernels.conv_transpose2d(*a, stride=2, padding=1)
    assert gradcheck(conv, (x, w, b), **FORWARD_ONLY)
    values, switches = zfkernels.max_pool2d_switches(distinct((1, 3, 7, 9), generator=gen), 3, 2, 0, True)
    values.requires_grad_()
    fused = lambda v, weight: zfkernels.unpool_conv_transpose2d(
        v, switches, weight, pool_kernel_size=3, pool_stride=2, unpool_size=(7, 9), padding=1
    )
    assert gradcheck(fused, (values, w), **FORWARD_ONLY)


def test_forward_over_reverse(native_backend, gen, single_thread):
    """gradgradcheck's forward-over-reverse: the backward formulas carry tangents of the saved inputs."""
    x = distinct((1, 2, 6, 7), generator=gen).requires_grad_()
    pool = lambda a: zfkernels.max_pool2d_switches(a, 3, 2, 1, True, relu=True)[0]
    assert gradgradcheck(pool, (x,), check_fwd_over_rev=True)
    w = torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    conv = lambda a, weight: zfkernels.conv_transpose2d(a, weight, stride=2)
    assert gradgradcheck(conv, (x, w), check_fwd_over_rev=True)


# --------------------------------------------------------------------------------- what cannot work
def test_reverse_mode_func_transforms_raise_clearly(gen):
    x = torch.randn(4, generator=gen, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"zfkernels::relu: torch\.func's reverse-mode"):
        torch.func.grad(lambda a: zfkernels.relu(a).sum())(x)


def test_vmap_still_works(gen):
    x = torch.randn(3, 2, 4, 4, generator=gen)
    assert_bitwise_equal(torch.vmap(zfkernels.relu)(x), torch.relu(x), "vmapped relu")
