"""Any CNN, not only chains: every conv of ResNet18, SqueezeNet1_1 and GoogLeNet projects exactly.

Layers whose path from the input is a chain take the cropped deconvnet, the others (after a residual add or
a concatenation) the gradient path. Both must equal the activation's value times its deconvnet gradient,
computed here without zfkernels: stock autograd with every ReLU (module or functional, in place or not)
swapped by a ``TorchFunctionMode`` for one whose backward is ReLU of the gradient, and stock max-pools with
their own gradient (which sums where windows share an argmax). Batch-norm keeps its true backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import assert_close_verbose
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from zfkernels.deconvnet import DeconvNet

pytestmark = pytest.mark.usefixtures("single_thread")

RTOL = 1e-4  # of the largest magnitude of the layer's projections


# ------------------------------------------------------------------------------------------- the oracle
class _DeconvReLU(torch.autograd.Function):
    """ReLU forward; backward ReLU of the gradient (the deconvnet rule), whatever the input's sign."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.clamp(min=0)


class _DeconvReLUs(TorchFunctionMode):
    """Every ReLU call (nn.ReLU goes through F.relu) becomes an out-of-place _DeconvReLU."""

    RELUS = (F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.RELUS:
            return _DeconvReLU.apply(args[0])
        return func(*args, **(kwargs or {}))


def deconvnet_gradient_times_value(model: nn.Module, images: Tensor, layer: str, entries: Tensor) -> Tensor:
    """(n, C, H, W): per entry (image, filter, row, col), the activation's value (clamped at 0) times its
    deconvnet gradient w.r.t. its image, by stock autograd (one backward per entry)."""
    captured = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: captured.append(o))
    leaf = images.clone().requires_grad_(True)
    try:
        with _DeconvReLUs():
            model(leaf)
    finally:
        handle.remove()
    (activation,) = captured
    out = []
    for image, channel, row, col in entries.tolist():
        selected = activation[image, channel, row, col]
        (gradient,) = torch.autograd.grad(selected, leaf, retain_graph=True)
        out.append(gradient[image] * selected.detach().clamp(min=0))
    return torch.stack(out)


def entries_for(activation: Tensor, generator: torch.Generator) -> Tensor:
    """A few entries per layer: the strongest of a random filter in each image, and the top-left and
    bottom-right corners (border clipping) of the filter strongest there."""
    batch, channels, height, width = activation.shape
    entries = []
    for image in range(batch):
        channel = int(torch.randint(channels, (1,), generator=generator))
        flat = int(activation[image, channel].flatten().argmax())
        entries.append((image, channel, flat // width, flat % width))
    for image, (row, col) in ((0, (0, 0)), (batch - 1, (height - 1, width - 1))):
        entries.append((image, int(activation[image, :, row, col].argmax()), row, col))
    return torch.tensor(entries, dtype=torch.int64)


def pasted(windows: Tensor, origins: Tensor, image_size: tuple[int, int]) -> Tensor:
    """The windows placed in image-sized planes (what lies outside the image dropped)."""
    height, width = image_size
    out = windows.new_zeros((windows.shape[0], windows.shape[1], height, width))
    rf_h, rf_w = windows.shape[-2:]
    for i, (top, left) in enumerate(origins.tolist()):
        t, lo, b, r = max(top, 0), max(left, 0), min(top + rf_h, height), min(left + rf_w, width)
        out[i, :, t:b, lo:r] = windows[i, :, t - top : b - top, lo - left : r - left]
    return out


def outside_the_image(windows: Tensor, origins: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Each window with the part inside the image zeroed: what must be zero."""
    rf_h, rf_w = windows.shape[-2:]
    rows = origins[:, :1] + torch.arange(rf_h)
    cols = origins[:, 1:] + torch.arange(rf_w)
    row_inside, col_inside = (rows >= 0) & (rows < image_size[0]), (cols >= 0) & (cols < image_size[1])
    inside = row_inside[:, :, None] & col_inside[:, None]
    return windows * ~inside[:, None]


# ------------------------------------------------------------------------------------------- the models
def trained_looking(model: nn.Module, seed: int) -> nn.Module:
    """Batch-norm statistics and affine parameters away from their defaults (scales of both signs), eval."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) * 2 - 0.5)
                module.bias.copy_(torch.rand(c, generator=generator) * 0.4 - 0.2)
    return model.double().eval()


def resnet18() -> nn.Module:
    return torchvision.models.resnet18()


def squeezenet1_1() -> nn.Module:
    return torchvision.models.squeezenet1_1()


def googlenet() -> nn.Module:
    return torchvision.models.googlenet(aux_logits=False, init_weights=True)


# The conv layers on a chain from the input (the deconvnet path); every other conv takes the gradient path.
CHAIN_CONVS = {
    "resnet18": {"conv1", "layer1.0.conv1", "layer1.0.conv2"},
    "squeezenet1_1": {"features.0", "features.3.squeeze", "features.3.expand1x1", "features.3.expand3x3"},
    "googlenet": {
        "conv1.conv",
        "conv2.conv",
        "conv3.conv",
        "inception3a.branch1.conv",
        "inception3a.branch2.0.conv",
        "inception3a.branch2.1.conv",
        "inception3a.branch3.0.conv",
        "inception3a.branch3.1.conv",
        "inception3a.branch4.1.conv",
    },
}
BUILDERS = {"resnet18": resnet18, "squeezenet1_1": squeezenet1_1, "googlenet": googlenet}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_conv_projects_as_value_times_deconvnet_gradient(name):
    torch.manual_seed(3)
    model = trained_looking(BUILDERS[name](), seed=4)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    convs = [n for n, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    deconvnet = DeconvNet(model)
    paths = {layer: deconvnet.path(layer) for layer in convs}
    assert {layer for layer, path in paths.items() if path == "deconvnet"} == CHAIN_CONVS[name]
    assert set(deconvnet.layers(include_gradient_path=True)) >= set(convs)

    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    record = deconvnet.forward(images, convs)  # every layer at once
    # One forward of the model for the gradient layers; the chain layers' check runs on one image each.
    assert calls.count(images.shape[0]) == 1
    generator = torch.Generator().manual_seed(6)
    for layer in convs:
        assert record.path(layer) == paths[layer]
        entries = entries_for(record.activation(layer), generator)
        result = record.project_entries(layer, entries)
        assert result.path == paths[layer] and result.layer == layer
        assert torch.equal(result.entries, entries)
        expected = deconvnet_gradient_times_value(model, images, layer, entries)
        assert torch.equal(result.values, record.activation(layer)[tuple(entries.T)])
        scale = expected.abs().max().item()
        assert scale > 0, layer
        actual = pasted(result.windows, result.origins, (64, 64))
        assert_close_verbose(actual, expected, rtol=0, atol=RTOL * scale, label=f"{name} {layer}")
        assert not outside_the_image(result.windows, result.origins, (64, 64)).any()
        # Boxes: the window clipped to the image, containing the whole support.
        support = expected.abs().amax(1) > 0
        for i, (top, left, bottom, right) in enumerate(result.boxes.tolist()):
            assert support[i, :top].sum() == support[i, bottom:].sum() == 0
            assert support[i, :, :left].sum() == support[i, :, right:].sum() == 0


class Functional(nn.Module):
    """Functional ops the gradient path reads from the graph: an avg-pool with ceil_mode as its 5th positional
    argument (not a dilation), a concatenation, a residual add, a grouped conv, and a squeeze-excitation
    gate (a global pool: the layers after it see the whole image)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.conv2 = nn.Conv2d(12, 6, 3, stride=2)
        self.gate = nn.Conv2d(6, 6, 1)
        self.conv3 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = torch.cat((x, F.relu(self.grouped(x))), 1)
        x = F.avg_pool2d(x, 3, 2, 1, True)
        y = F.relu(self.conv2(x))
        y = F.max_pool2d(y, 2, 2, 0, 1, True) + F.avg_pool2d(y, 2, 2, 0, True)
        y = y * torch.sigmoid(self.gate(F.adaptive_avg_pool2d(y, 1)))
        return self.conv3(y)


def test_functional_ops_geometry_and_whole_image_fields():
    torch.manual_seed(8)
    model = Functional().double().eval()
    images = torch.randn(2, 3, 23, 21, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    deconvnet = DeconvNet(model)
    assert deconvnet.path("conv1") == "deconvnet"
    layers = ["grouped", "conv2", "gate", "conv3"]
    assert all(deconvnet.path(layer) == "gradient" for layer in layers)
    # conv1 + grouped (3x3 each): 5; avg-pool 3/2: 5 + 2 * 1 = 7, jump 2; conv2 3x3/2: 7 + 2 * 2 = 11
    assert deconvnet.receptive_field("conv2").size == (11, 11)
    assert deconvnet.receptive_field("conv2").jump == (4, 4)
    with pytest.raises(ValueError, match=r"layer 'conv3' can see the whole image .*image_size"):
        deconvnet.receptive_field("conv3")
    record = deconvnet.forward(images, layers)
    generator = torch.Generator().manual_seed(10)
    for layer in layers:
        entries = entries_for(record.activation(layer), generator)
        result = record.project_entries(layer, entries)
        expected = deconvnet_gradient_times_value(model, images, layer, entries)
        actual = pasted(result.windows, result.origins, (23, 21))
        scale = expected.abs().max().item()
        assert_close_verbose(actual, expected, rtol=0, atol=RTOL * scale, label=layer)
    whole = record.project_entries("conv3", entries_for(record.activation("conv3"), generator))
    assert whole.receptive_field.size == (23, 21) and whole.windows.shape[-2:] == (23, 21)
    assert whole.origins.eq(0).all() and whole.boxes.tolist() == [[0, 0, 23, 21]] * whole.entries.shape[0]
