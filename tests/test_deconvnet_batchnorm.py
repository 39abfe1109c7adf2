"""Eval-mode batch-norm on the deconvnet (chain) path goes down as its transpose, a per-channel scale.

Eval batch-norm is ``a * x + b`` per channel with ``a = weight / sqrt(running_var + eps)``; the projection
must be the activation's value times its deconvnet gradient with batch-norm's true backward (the oracle of
test_deconvnet_gradient.py: stock autograd, ReLUs with the deconvnet rule). Skipping it, as the paper does
with LRN, would give another result: the scales here are far from 1 and of both signs.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from conftest import assert_close_verbose
from test_deconvnet_gradient import deconvnet_gradient_times_value, pasted
from torch import nn

from zfkernels.deconvnet import DeconvNet
from zfkernels.deconvnet.chain import BatchNorm

pytestmark = pytest.mark.usefixtures("single_thread")


def conv_bn_relu_pool(*, affine: bool = True, bn_before_first_conv: bool = False) -> nn.Sequential:
    torch.manual_seed(11)
    layers = [("bn0", nn.BatchNorm2d(3))] if bn_before_first_conv else []
    layers += [
        ("conv1", nn.Conv2d(3, 6, 5, stride=2, padding=2)),
        ("bn1", nn.BatchNorm2d(6, affine=affine)),
        ("relu1", nn.ReLU(inplace=True)),
        ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
        ("conv2", nn.Conv2d(6, 5, 3, padding=1)),
        ("bn2", nn.BatchNorm2d(5, affine=affine)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2, 2)),
        ("bn3", nn.BatchNorm2d(5, affine=affine)),  # between an unpool and a transposed conv
        ("conv3", nn.Conv2d(5, 4, 2)),
    ]
    model = nn.Sequential(OrderedDict(layers))
    generator = torch.Generator().manual_seed(12)
    with torch.no_grad():
        model.conv3.bias.add_(1.0)  # its few activations positive: a value <= 0 would project to zeros
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) * 3 + 0.2)
                if affine:
                    module.weight.copy_(torch.rand(c, generator=generator) * 3 - 1)  # scales -1.x .. 4.x
                    module.bias.copy_(torch.rand(c, generator=generator) - 0.5)
    return model.double().eval()


def strongest_entries(activation: torch.Tensor) -> torch.Tensor:
    """Every (image, filter)'s strongest activation."""
    batch, channels, _, width = activation.shape
    flat = activation.flatten(2).argmax(2)
    image, channel = torch.meshgrid(torch.arange(batch), torch.arange(channels), indexing="ij")
    return torch.stack((image, channel, flat // width, flat % width), -1).reshape(-1, 4)


@pytest.mark.parametrize(
    ("affine", "bn_before_first_conv"),
    [(True, False), (False, False), (True, True)],
    ids=["affine", "plain", "bn0"],
)
@pytest.mark.parametrize(
    ("layer", "path"),
    # pool2: bn2's scale lies above the first transposed conv (it can flip the sign); a projection starts at
    # a conv, ReLU or max-pool on the chain path, so a batch-norm layer itself takes the gradient path.
    [
        ("conv2", "deconvnet"),
        ("relu2", "deconvnet"),
        ("pool2", "deconvnet"),
        ("conv3", "deconvnet"),
        ("bn2", "gradient"),
    ],
)
def test_batchnorm_projects_through_its_transpose(layer, path, affine, bn_before_first_conv):
    model = conv_bn_relu_pool(affine=affine, bn_before_first_conv=bn_before_first_conv)
    images = torch.randn(2, 3, 27, 25, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    deconvnet = DeconvNet(model)
    assert deconvnet.path(layer) == path
    if path == "deconvnet":
        assert any(isinstance(op, BatchNorm) for op in deconvnet.chain(layer).ops)
    record = deconvnet.forward(images, layer)
    entries = strongest_entries(record.activation(layer))
    result = record.project_entries(layer, entries)
    assert result.path == path
    expected = deconvnet_gradient_times_value(model, images, layer, entries)
    scale = expected.abs().max().item()
    assert scale > 0
    actual = pasted(result.windows, result.origins, (27, 25))
    # The gradient path runs torch's kernels, in another order: float64 rounding, far below 1e-10.
    assert_close_verbose(actual, expected, rtol=0, atol=1e-10 * scale, label=layer)
    # project() too, on whole images.
    projection = deconvnet.project(images, layer, top=1)
    flat = projection.pixels.reshape(-1, *projection.pixels.shape[-3:])
    assert_close_verbose(flat, expected, rtol=0, atol=1e-10 * scale, label=f"{layer} project")


def test_batchnorm_scale_is_weight_over_sqrt_running_var_plus_eps():
    model = conv_bn_relu_pool()
    op = next(op for op in DeconvNet(model).chain("conv2").ops if isinstance(op, BatchNorm))
    bn = model.bn1
    expected = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    assert_close_verbose(op.scale(torch.float64), expected, rtol=1e-15, atol=0)


def test_batchnorm_without_running_statistics_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        DeconvNet(model).project(torch.randn(1, 3, 9, 9), "2", path="deconvnet")
    with pytest.raises(ValueError, match="track_running_stats=False"):
        DeconvNet(model).project(torch.randn(1, 3, 9, 9), "2", path="gradient")
