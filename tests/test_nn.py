"""zfkernels.nn: drop-in modules over the functional ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_bitwise_equal, assert_close_verbose, distinct, tied

import zfkernels as zk
from zfkernels import nn as znn

pytestmark = pytest.mark.usefixtures("single_thread")


def test_max_pool_module(backend, gen):
    x = tied((2, 3, 13, 13), torch.float32, gen)
    pool = znn.MaxPool2dSwitches(3, 2, ceil_mode=True, relu=True)
    values, switches = pool(x)
    exp_values, exp_switches = zk.max_pool2d_switches(x, 3, 2, 0, True, relu=True)
    assert_bitwise_equal(values, exp_values, "values")
    assert_bitwise_equal(switches, exp_switches, "switches")
    assert_bitwise_equal(values, F.max_pool2d(F.relu(x), 3, 2, ceil_mode=True), "vs torch")
    assert "kernel_size=3" in repr(pool) and "ceil_mode=True" in repr(pool) and "relu=True" in repr(pool)
    assert not list(pool.parameters())


def test_unpool_module(backend, gen):
    x = tied((2, 3, 13, 13), torch.float32, gen)
    values, switches = znn.MaxPool2dSwitches(3, 2, ceil_mode=True)(x)
    values = tied(values.shape, torch.float32, gen)
    unpool = znn.MaxUnpool2d(3, 2, relu=True)
    out = unpool(values, switches, output_size=x.shape[-2:])
    assert_bitwise_equal(
        out, zk.max_unpool2d(values, switches, 3, 2, output_size=(13, 13), relu=True), "unpool"
    )
    assert "relu=True" in repr(unpool)
    # without output_size: torch's default size, (6 - 1) * 2 + 3 = 13 here
    assert unpool(values, switches).shape == (2, 3, 13, 13)


def test_pool_unpool_modules_give_the_max_pool_gradient(backend, gen):
    x = tied((1, 2, 9, 9), torch.float64, gen)
    values, switches = znn.MaxPool2dSwitches(3, 2)(x)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.max_pool2d(xg, 3, 2), xg, grad_outputs=values)
    assert_bitwise_equal(znn.MaxUnpool2d(3, 2)(values, switches, x.shape), grad, "unpool == gradient")


@pytest.mark.parametrize("rule", ["standard", "deconvnet", "guided"])
def test_relu_module(backend, gen, rule):
    x = tied((2, 3, 4, 4), torch.float32, gen)
    grad = tied((2, 3, 4, 4), torch.float32, gen)
    module = znn.ReLU(backward=rule)
    assert repr(rule) in repr(module)
    xg = x.clone().requires_grad_()
    out = module(xg)
    assert_bitwise_equal(out, torch.relu(x), "forward")
    out.backward(grad)
    assert_bitwise_equal(xg.grad, zk.relu_backward(grad, torch.relu(x), rule), "backward")


def test_relu_module_inplace(backend, gen):
    x = tied((2, 3, 4), torch.float32, gen)
    y = x.clone()
    out = znn.ReLU(inplace=True)(y)
    assert out is y
    assert_bitwise_equal(y, torch.relu(x), "in place")


def test_relu_module_bad_rule():
    with pytest.raises(ValueError, match="backward"):
        znn.ReLU(backward="deconv")


def test_conv_transpose_module_is_a_torch_module():
    module = znn.ConvTranspose2d(4, 3, 7, stride=2, padding=1, output_padding=1)
    assert isinstance(module, torch.nn.ConvTranspose2d)
    stock = torch.nn.ConvTranspose2d(4, 3, 7, stride=2, padding=1, output_padding=1)
    assert module.state_dict().keys() == stock.state_dict().keys()
    assert all(
        a.shape == b.shape
        for a, b in zip(module.state_dict().values(), stock.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=4, out_channels=3, kernel_size=7, stride=2, padding=1, output_padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2, bias=False),
        dict(in_channels=3, out_channels=2, kernel_size=(3, 2), dilation=2),
        dict(in_channels=3, out_channels=30, kernel_size=3, padding=1),
    ],
    ids=["zfnet_conv1_shrunk", "groups_no_bias", "dilation", "stride1_direct"],
)
def test_conv_transpose_module_matches_stock(backend, gen, kwargs):
    torch.manual_seed(0)
    stock = torch.nn.ConvTranspose2d(**kwargs)
    module = znn.ConvTranspose2d(**kwargs)
    module.load_state_dict(stock.state_dict())
    x = torch.randn(2, kwargs["in_channels"], 5, 6, generator=gen)
    xs, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = stock(xs), module(xm)
    assert_close_verbose(got, want, rtol=1e-4, atol=1e-5, label="forward")
    want.square().sum().backward()
    got.square().sum().backward()
    assert_close_verbose(xm.grad, xs.grad, rtol=1e-4, atol=1e-4, label="grad input")
    assert_close_verbose(module.weight.grad, stock.weight.grad, rtol=1e-4, atol=1e-4, label="grad weight")
    # unbatched input, like nn.ConvTranspose2d
    assert_close_verbose(module(x[0]), stock(x[0]), rtol=1e-4, atol=1e-5, label="unbatched")


def test_conv_transpose_module_output_size(backend, gen):
    # output_size picks output_padding, as in nn.ConvTranspose2d: undo a 7x7/stride-2/padding-1 conv of 16x16
    kwargs = dict(in_channels=4, out_channels=3, kernel_size=7, stride=2, padding=1)
    torch.manual_seed(1)
    stock = torch.nn.ConvTranspose2d(**kwargs)
    module = znn.ConvTranspose2d(**kwargs)
    module.load_state_dict(stock.state_dict())
    x = torch.randn(1, 4, 6, 6, generator=gen)
    for size in ([15, 15], [16, 16], [16, 15]):
        out = module(x, output_size=size)
        assert list(out.shape[-2:]) == size
        assert_close_verbose(
            out, stock(x, output_size=size), rtol=1e-4, atol=1e-5, label=f"output_size={size}"
        )


def test_modules_in_a_deconvnet_layer(backend, gen):
    # One deconvnet step with modules: unpool with switches, rectify, transposed conv with the layer's weight.
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = distinct((1, 3, 13, 13), torch.float32, gen)
    features = torch.relu(conv(x)).detach()
    values, switches = znn.MaxPool2dSwitches(3, 2, ceil_mode=True)(features)
    deconv = znn.ConvTranspose2d(4, 3, 3, padding=1, bias=False)
    deconv.weight.data.copy_(conv.weight.data)
    projected = deconv(znn.ReLU()(znn.MaxUnpool2d(3, 2)(values, switches, features.shape)))
    fused = zk.unpool_conv_transpose2d(
        values,
        switches,
        conv.weight.detach(),
        pool_kernel_size=3,
        pool_stride=2,
        unpool_size=(13, 13),
        padding=1,
    )
    assert_close_verbose(projected.detach(), fused, rtol=1e-4, atol=1e-5, label="modules vs fused")


def test_compile_module_stack(gen):
    model = torch.nn.Sequential(
        znn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), znn.ReLU(backward="deconvnet")
    )
    x = torch.randn(2, 4, 5, 5, generator=gen)
    compiled = torch.compile(model, fullgraph=True)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = compiled(xc), model(xe)
    assert_close_verbose(got, want, rtol=1e-5, atol=1e-6, label="compiled")
    got.sum().backward()
    want.sum().backward()
    assert_close_verbose(xc.grad, xe.grad, rtol=1e-4, atol=1e-5, label="compiled grad")
