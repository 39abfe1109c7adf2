"""DeconvNet(model).project: exact against captum, batched like one at a time, bad input caught early.

The oracle: captum's NeuronDeconvolution (the gradient of one activation w.r.t. the input with every ReLU's
backward replaced by ReLU of the gradient) times the activation's value. captum hooks nn.ReLU modules, so
it gets stock models with out-of-place ReLUs; the layer the deconvnet skips (local response normalization)
is wrapped so its backward is the identity while its forward is unchanged. Eval-mode batch-norm keeps its
true backward: the deconvnet applies its transpose.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import NeuronDeconvolution
from captum.testing.helpers.basic_models import BasicModel_ConvNet_One_Conv
from conftest import assert_close_verbose
from test_receptive_field import zfnet_sequential
from torch import nn

import zfkernels.nn as znn
from zfkernels.deconvnet.chain import SUPPORTED_LAYERS
from zfkernels.deconvnet.projection import DeconvNet, Projection

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning:captum"),  # captum's notes about hooks and requires_grad
]

RTOL = 1e-4


# ------------------------------------------------------------------------------------------------ helpers
class SkipBackward(nn.Module):
    """A layer's forward with an identity backward: what the deconvnet does with LRN layers."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.layer(x) - x).detach()


def captum_ready(model: nn.Module, *, skip_normalization: bool = True) -> nn.Module:
    """A copy for captum: out-of-place ReLUs (captum hooks them), LRN layers with an identity backward as the
    deconvnet skips them (``skip_normalization=False``: they keep their true backward, captum's own setting).
    Batch-norm always keeps its true backward (the deconvnet applies its transpose)."""
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                child.inplace = False
            elif skip_normalization and isinstance(child, nn.LocalResponseNorm):
                setattr(module, name, SkipBackward(child))
    return model


def layer_output(model: nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    """The output of `layer` in the model's own forward."""
    captured = []
    module = dict(model.named_modules())[layer]
    # Cloned in the hook: an in-place ReLU after the layer would overwrite it.
    handle = module.register_forward_hook(
        lambda m, i, o: captured.append((o[0] if isinstance(o, tuple) else o).clone())
    )
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return captured[0]


def assert_matches_captum(result: Projection, reference_model: nn.Module, layer: str, images: torch.Tensor):
    """Every projection equals captum's NeuronDeconvolution of its activation times its value."""
    batch = images.shape[0]
    module = dict(reference_model.named_modules())[layer]
    rows = torch.arange(batch)
    for fi, filt in enumerate(result.filters):
        for j in range(result.values.shape[2]):
            position = result.positions[:, fi, j]

            def selector(out, filt=filt, position=position):
                return out[rows, filt, position[:, 0], position[:, 1]]

            gradient = NeuronDeconvolution(reference_model, module).attribute(
                images.clone(), neuron_selector=selector
            )
            expected = gradient * result.values[:, fi, j].clamp(min=0).view(batch, 1, 1, 1)
            scale = expected.abs().max().item()
            assert_close_verbose(
                result.pixels[:, fi, j],
                expected,
                rtol=RTOL,
                atol=1e-6 * scale,
                label=f"{layer} filter {filt} top {j}",
            )


def assert_values_are_the_activations(result: Projection, model: nn.Module, layer: str, images: torch.Tensor):
    """values/positions: the layer's activations, strongest first, distinct positions, ties row-major."""
    activation = layer_output(model, layer, images)
    width = activation.shape[-1]
    for b in range(images.shape[0]):
        for fi, filt in enumerate(result.filters):
            flat = activation[b, filt].flatten()
            order = torch.sort(flat, descending=True, stable=True).indices[: result.values.shape[2]]
            assert result.positions[b, fi].tolist() == [[int(i) // width, int(i) % width] for i in order]
            assert torch.equal(result.values[b, fi], flat[order])


def images_for(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def seeded(build, seed=0):
    torch.manual_seed(seed)
    return build().eval()


@pytest.fixture(scope="module")
def zfnet_stock():
    return seeded(zfnet_sequential)


def zfnet_ours_from(stock: nn.Sequential) -> nn.Sequential:
    """The same network with zfkernels' modules: fused ReLU + switch pools, zfkernels.nn.ReLU elsewhere."""
    layers = OrderedDict()
    for name, module in stock.named_children():
        if isinstance(module, nn.ReLU):
            if name in ("relu1", "relu2", "relu5"):
                continue  # fused into the pool that follows
            layers[name] = znn.ReLU()
        elif isinstance(module, nn.MaxPool2d):
            layers[name] = PoolValues(znn.MaxPool2dSwitches(3, 2, ceil_mode=True, relu=True))
        else:
            layers[name] = copy.deepcopy(module)
    return nn.Sequential(layers).eval()


class PoolValues(nn.Module):
    """MaxPool2dSwitches inside a Sequential: pass the values on (the switches are for the deconvnet)."""

    def __init__(self, pool: znn.MaxPool2dSwitches):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        values, _switches = self.pool(x)
        return values


# ---------------------------------------------------------------------------------- exact against captum
ZFNET_LAYERS = ["conv1", "relu1", "pool1", "conv2", "pool2", "conv3", "relu3", "conv4", "conv5", "pool5"]


@pytest.mark.parametrize("layer", ZFNET_LAYERS)
def test_zfnet_shaped_matches_captum(zfnet_stock, layer):
    images = images_for((2, 3, 99, 99))
    result = DeconvNet(zfnet_stock).project(images, layer, filters=[0, 37], top=2)
    assert result.pixels.shape == (2, 2, 2, 3, 99, 99)
    assert_values_are_the_activations(result, zfnet_stock, layer, images)
    assert_matches_captum(result, captum_ready(zfnet_stock), layer, images)


def test_zfnet_shaped_with_zfkernels_modules_projects_the_same(zfnet_stock):
    ours = zfnet_ours_from(zfnet_stock)
    images = images_for((2, 3, 99, 99), seed=1)
    assert DeconvNet(ours).layers() == [
        "conv1",
        "pool1.pool",
        "conv2",
        "pool2.pool",
        "conv3",
        "relu3",
        "conv4",
        "relu4",
        "conv5",
        "pool5.pool",
    ]
    for stock_layer, our_layer in [("conv2", "conv2"), ("pool2", "pool2.pool"), ("pool5", "pool5.pool")]:
        expected = DeconvNet(zfnet_stock).project(images, stock_layer, filters=[3, 200], top=2)
        result = DeconvNet(ours).project(images, our_layer, filters=[3, 200], top=2)
        assert torch.equal(result.positions, expected.positions)
        assert torch.equal(result.values, expected.values)
        assert torch.equal(result.pixels, expected.pixels)


@pytest.mark.parametrize("normalization", [False, True], ids=["plain", "normalized"])
def test_zfkernels_zfnet_matches_captum(normalization):
    from zfkernels.models import ZFNet

    model = seeded(lambda: ZFNet(normalization=normalization))
    reference = captum_ready(model.to_stock())
    images = images_for((1, 3, 224, 224), seed=2)
    deconvnet = DeconvNet(model)
    for layer in ["conv1", "pool1", "conv3", "relu4", "pool5"]:
        result = deconvnet.project(images, layer, filters=[5], top=1)
        assert_matches_captum(result, reference, layer, images)


@pytest.mark.parametrize("layer", ["features.0", "features.3", "features.6", "features.8", "features.10"])
def test_alexnet_matches_captum(layer):
    model = seeded(torchvision.models.alexnet)
    images = images_for((2, 3, 67, 67), seed=3)
    result = DeconvNet(model).project(images, layer, filters=[3, 40], top=2)
    assert_values_are_the_activations(result, model, layer, images)
    assert_matches_captum(result, captum_ready(model), layer, images)


@pytest.fixture(scope="module")
def vgg16():
    return seeded(torchvision.models.vgg16)


def test_vgg16_every_conv_matches_captum(vgg16):
    images = images_for((1, 3, 64, 64), seed=4)
    reference = captum_ready(vgg16)
    deconvnet = DeconvNet(vgg16)
    convs = [name for name, m in vgg16.features.named_children() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    for index in convs:
        result = deconvnet.project(images, f"features.{index}", filters=[11], top=1)
        assert_matches_captum(result, reference, f"features.{index}", images)


def tie_model() -> nn.Sequential:
    """Integer weights and strongly negative biases: whole pooling windows are 0 after the ReLU."""
    torch.manual_seed(5)
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(2, 6, 3, padding=1),
            relu1=nn.ReLU(inplace=True),
            pool1=nn.MaxPool2d(3, 2, ceil_mode=True),
            conv2=nn.Conv2d(6, 5, 3, padding=1),
            relu2=nn.ReLU(inplace=True),
            pool2=nn.MaxPool2d(2, 2),
            conv3=nn.Conv2d(5, 4, 3, padding=1),
        )
    )
    with torch.no_grad():
        for conv in (model.conv1, model.conv2, model.conv3):
            conv.weight.copy_(torch.randint(-1, 2, conv.weight.shape).float())
            conv.bias.copy_(torch.randint(-1, 2, conv.bias.shape).float())
        model.conv1.bias[:3] = -100.0  # channels 0-2: all zero after relu1
        model.conv2.bias[1] = -100.0
    return model.eval()


@pytest.mark.parametrize("layer", ["pool1", "conv2", "pool2", "conv3"])
def test_ties_and_all_zero_windows_match_captum(layer):
    model = tie_model()
    images = torch.randint(-2, 3, (2, 2, 17, 15), generator=torch.Generator().manual_seed(6)).float()
    activation = layer_output(model, "relu1", images)
    assert (activation[:, :3] == 0).all()  # all-zero windows: the switch is the window's first element
    result = DeconvNet(model).project(images, layer, filters=None, top=3)
    assert_values_are_the_activations(result, model, layer, images)
    assert_matches_captum(result, captum_ready(model), layer, images)


def test_batchnorm_transposed_lrn_skipped_dropout_off():
    torch.manual_seed(7)
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 5, stride=2, padding=2),
            bn1=nn.BatchNorm2d(8),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(3, 2, padding=1),
            norm1=nn.LocalResponseNorm(3, alpha=0.5, k=1.0),
            drop1=nn.Dropout2d(0.5),
            conv2=nn.Conv2d(8, 6, 3, padding=1),
            idle=nn.Identity(),
            relu2=nn.ReLU(),
        )
    )
    with torch.no_grad():  # running statistics and affine parameters far from the identity
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
        model.bn1.weight.uniform_(-2, 2)
        model.bn1.bias.uniform_(-1, 1)
    model.train()  # projected in eval mode; the flags come back
    images = images_for((2, 3, 23, 21), seed=8)
    result = DeconvNet(model).project(images, "relu2", filters=[0, 4], top=2)
    assert model.training and model.drop1.training and model.bn1.training
    model.eval()
    assert_values_are_the_activations(result, model, "relu2", images)
    assert_matches_captum(result, captum_ready(model), "relu2", images)


def normalized_chain(normalization: str) -> nn.Sequential:
    """conv -> norm -> relu -> pool -> conv -> norm -> relu -> conv, the norm layers far from the identity."""

    def norm(channels: int) -> nn.Module:
        if normalization == "batchnorm":
            layer = nn.BatchNorm2d(channels)
            with torch.no_grad():  # trained-looking statistics: per-channel scales from 0.3 to 3
                layer.running_mean.uniform_(-1, 1)
                layer.running_var.uniform_(0.1, 4)
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.5, 0.5)
            return layer
        return nn.LocalResponseNorm(3, alpha=0.5, k=1.0) if normalization == "lrn" else nn.Identity()

    torch.manual_seed(29)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 5, stride=2, padding=2),
            norm1=norm(8),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(3, 2, ceil_mode=True),
            conv2=nn.Conv2d(8, 8, 3, padding=1),
            norm2=norm(8),
            relu2=nn.ReLU(),
            conv3=nn.Conv2d(8, 6, 3, padding=1),
        )
    ).eval()


def max_relative_difference(result: Projection, reference_model: nn.Module, layer: str, images) -> float:
    """The largest difference of a projection from captum's NeuronDeconvolution x value, over its scale."""
    module = dict(reference_model.named_modules())[layer]
    worst = 0.0
    for b in range(images.shape[0]):
        for fi, filt in enumerate(result.filters):
            row, col = result.positions[b, fi, 0].tolist()
            gradient = NeuronDeconvolution(reference_model, module).attribute(
                images[b : b + 1].clone(), neuron_selector=(filt, row, col)
            )
            expected = gradient[0] * result.values[b, fi, 0].clamp(min=0)
            difference = (result.pixels[b, fi, 0] - expected).abs().max() / expected.abs().max()
            worst = max(worst, float(difference))
    return worst


def test_lrn_on_the_path_is_skipped_so_captum_differs():
    # The documented exception: with LRN on the path the projection is that of the same model with LRN's
    # backward the identity (the paper skips it), not captum's NeuronDeconvolution x value.
    images = images_for((2, 3, 29, 27), seed=30)
    model = normalized_chain("lrn")
    result = DeconvNet(model).project(images, "conv3", filters=[0, 3, 5])
    assert_matches_captum(result, captum_ready(model), "conv3", images)
    assert (
        max_relative_difference(result, captum_ready(model, skip_normalization=False), "conv3", images) > 0.1
    )
    plain = normalized_chain("none")
    plain.load_state_dict(model.state_dict(), strict=False)  # the same convs, nothing between them
    result = DeconvNet(plain).project(images, "conv3", filters=[0, 3, 5])
    assert_matches_captum(result, captum_ready(plain, skip_normalization=False), "conv3", images)


def test_batchnorm_on_the_path_is_its_transpose_so_captum_agrees():
    # Eval-mode batch-norm is affine: the projection goes through its transpose, batch-norm's true backward,
    # so it is captum's NeuronDeconvolution x value; skipping it (the old rule) would differ by far.
    images = images_for((2, 3, 29, 27), seed=30)
    model = normalized_chain("batchnorm")
    result = DeconvNet(model).project(images, "conv3", filters=[0, 3, 5])
    assert_matches_captum(result, captum_ready(model, skip_normalization=False), "conv3", images)
    skipped = copy.deepcopy(model)
    skipped.norm1, skipped.norm2 = SkipBackward(model.norm1), SkipBackward(model.norm2)
    assert max_relative_difference(result, captum_ready(skipped), "conv3", images) > 0.1


def odd_chain() -> nn.Sequential:
    """ReLU and pool before the first conv, two pools in a row, rectangular kernels and strides."""
    torch.manual_seed(19)
    return nn.Sequential(
        OrderedDict(
            relu0=nn.ReLU(),
            pool0=nn.MaxPool2d(2, 2),
            conv1=nn.Conv2d(3, 5, (3, 5), stride=(2, 1), padding=(1, 2)),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(3, 2, ceil_mode=True),
            pool2=nn.MaxPool2d((2, 3), 1, padding=(1, 1)),
            conv2=nn.Conv2d(5, 4, 3),
        )
    ).eval()


@pytest.mark.parametrize("layer", ["relu0", "pool0", "conv1", "pool1", "pool2", "conv2"])
def test_odd_chains_match_captum(layer):
    model = odd_chain()
    images = images_for((2, 3, 41, 30), seed=20)
    result = DeconvNet(model).project(images, layer, filters=[0, 2], top=3)
    assert_values_are_the_activations(result, model, layer, images)
    assert_matches_captum(result, captum_ready(model), layer, images)


def test_float64():
    model = odd_chain().double()
    images = images_for((2, 3, 41, 30), seed=21).double()
    result = DeconvNet(model).project(images, "conv2", top=2)
    assert result.pixels.dtype == result.values.dtype == torch.float64
    assert_matches_captum(result, captum_ready(model), "conv2", images)


def test_empty_batch(zfnet_stock):
    result = DeconvNet(zfnet_stock).project(torch.zeros(0, 3, 99, 99), "conv5", filters=[1, 2], top=3)
    assert result.pixels.shape == (0, 2, 3, 3, 99, 99)
    assert result.values.shape == (0, 2, 3) and result.positions.shape == (0, 2, 3, 2)
    assert result.boxes.shape == (0, 2, 3, 4)


# ------------------------------------------------------------------------------- batching and selection
def test_batching_equals_one_at_a_time(zfnet_stock):
    images = images_for((3, 3, 99, 99), seed=9)
    filters = [7, 0, 90]
    for layer in ["pool1", "conv4", "pool5"]:
        batched = DeconvNet(zfnet_stock).project(images, layer, filters=filters, top=2)
        one_chunk_each = DeconvNet(zfnet_stock, chunk_bytes=1).project(images, layer, filters=filters, top=2)
        for b in range(3):
            for fi, filt in enumerate(filters):
                single = DeconvNet(zfnet_stock).project(images[b : b + 1], layer, filters=filt, top=2)
                assert torch.equal(single.positions[0, 0], batched.positions[b, fi])
                # The forward conv may pick another algorithm for another batch size: last-bit differences.
                assert_close_verbose(single.values[0, 0], batched.values[b, fi], rtol=1e-6, atol=1e-7)
                for other in (batched, one_chunk_each):
                    scale = single.pixels.abs().max().item()
                    assert_close_verbose(
                        other.pixels[b, fi], single.pixels[0, 0], rtol=1e-5, atol=1e-6 * scale, label=layer
                    )


def test_paste_kernel_equals_slice_by_slice(zfnet_stock, monkeypatch):
    """The extension's paste (CPU) and the slice-by-slice paste (other devices) place windows identically,
    clipped at every border."""
    from zfkernels.deconvnet import projection

    images = images_for((2, 3, 99, 99), seed=4)
    for layer in ["conv1", "pool2", "conv5"]:
        kernel = DeconvNet(zfnet_stock).project(images, layer, filters=[3, 50], top=3)
        with monkeypatch.context() as patched:
            patched.setattr(projection, "cpu_module", None)
            sliced = DeconvNet(zfnet_stock).project(images, layer, filters=[3, 50], top=3)
        assert torch.equal(kernel.pixels, sliced.pixels), layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fill", [False, True])
def test_paste_valid_rectangles_and_fill(dtype, fill, monkeypatch):
    """_paste with per-window valid rectangles and fill: the kernel and the slice-by-slice paste both equal
    the definition (a window pixel lands where it is in its map and in its valid part; with fill, every other
    element of a target map is 0; without, untouched), at origins and rectangles in, across and far outside
    the maps, empty rectangles included."""
    from zfkernels.deconvnet import projection

    generator = torch.Generator().manual_seed(21)
    count, channels, (h, w), (height, width) = 12, 2, (5, 7), (9, 6)
    windows = torch.randn((count, channels, h, w), generator=generator).to(dtype)
    origins = torch.randint(-12, 14, (count, 2), generator=generator)
    valid = torch.randint(-3, 10, (count, 4), generator=generator)
    targets = torch.randperm(count + 3, generator=generator)[:count].tolist()
    start = torch.full((count + 3, channels, height, width), 7.0, dtype=dtype)

    expected = start.clone()
    for i, target in enumerate(targets):
        if fill:
            expected[target] = 0
        top, left = origins[i].tolist()
        for y in range(h):
            for x in range(w):
                inside = 0 <= top + y < height and 0 <= left + x < width
                allowed = valid[i, 0] <= y < valid[i, 2] and valid[i, 1] <= x < valid[i, 3]
                if inside and allowed:
                    expected[target, :, top + y, left + x] = windows[i, :, y, x]
    kernel = start.clone()
    projection._paste(kernel, targets, windows, origins, valid, fill=fill)
    with monkeypatch.context() as patched:
        patched.setattr(projection, "cpu_module", None)
        sliced = start.clone()
        projection._paste(sliced, targets, windows, origins, valid, fill=fill)
    assert torch.equal(kernel, expected) and torch.equal(sliced, expected)


def test_filters_int_list_none():
    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(5, 4, 3), nn.ReLU()
    ).eval()
    images = images_for((2, 3, 16, 16), seed=11)
    deconvnet = DeconvNet(model)
    every = deconvnet.project(images, "4")
    assert every.filters == [0, 1, 2, 3] and every.pixels.shape == (2, 4, 1, 3, 16, 16)
    one = deconvnet.project(images, "4", filters=2)
    listed = deconvnet.project(images, "4", filters=[2, 0])
    from_tensor = deconvnet.project(images, "4", filters=torch.tensor([2, 0]))
    from_numpy = deconvnet.project(images, "4", filters=np.array([2, 0]))
    assert one.filters == [2] and one.pixels.shape == (2, 1, 1, 3, 16, 16)
    assert deconvnet.project(images, "4", filters=torch.tensor(2)).filters == [2]
    assert listed.filters == from_tensor.filters == from_numpy.filters == [2, 0]
    assert torch.equal(listed.pixels, from_tensor.pixels) and torch.equal(listed.pixels, from_numpy.pixels)
    for result, index in [(one, [0]), (listed, [0, 1])]:
        for position, filt in zip(index, result.filters, strict=True):
            scale = every.pixels[:, filt].abs().max().item()
            assert_close_verbose(
                result.pixels[:, position], every.pixels[:, filt], rtol=1e-5, atol=1e-6 * scale
            )


def test_top_k_distinct_descending_and_ties_row_major():
    model = nn.Sequential(nn.Conv2d(1, 2, 3)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[1, 0, 1, 1] = 1.0
        model[0].bias.copy_(torch.tensor([1.0, 0.0]))
    images = torch.zeros(1, 1, 6, 7)
    images[0, 0, 3, 2] = images[0, 0, 2, 5] = images[0, 0, 4, 4] = 2.0  # a tie at 2.0, then 1.5
    images[0, 0, 1, 1] = 1.5
    result = DeconvNet(model).project(images, "0", top=4)
    # Filter 0 is constant (bias only): ties everywhere, taken in row-major order.
    assert result.positions[0, 0].tolist() == [[0, 0], [0, 1], [0, 2], [0, 3]]
    assert result.values[0, 0].tolist() == [1.0] * 4
    # Filter 1 reads the centre pixel: the two 2.0 in row-major order, then the other 2.0, then 1.5.
    assert result.positions[0, 1].tolist() == [[1, 4], [2, 1], [3, 3], [0, 0]]
    assert result.values[0, 1].tolist() == [2.0, 2.0, 2.0, 1.5]
    # A conv with no bias projects its weight times the value; filter 0's all-zero weight gives zeros.
    assert result.pixels[0, 1, 0, 0, 2, 5].item() == 2.0 and result.pixels[0, 1, 0].count_nonzero() == 1
    assert result.pixels[0, 0].count_nonzero() == 0


def test_non_positive_activations_project_to_zeros():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3)).eval()
    with torch.no_grad():
        model[2].bias.fill_(-50.0)  # every activation of the last conv is negative
    result = DeconvNet(model).project(images_for((2, 3, 12, 12)), "2", top=2)
    assert (result.values < 0).all()
    assert result.pixels.count_nonzero() == 0


def test_nothing_outside_the_box(zfnet_stock):
    images = images_for((2, 3, 99, 99), seed=13)
    for layer in ["conv1", "pool2", "conv5", "pool5"]:
        result = DeconvNet(zfnet_stock).project(images, layer, filters=[1, 2, 90], top=2)
        inside = torch.zeros_like(result.pixels, dtype=torch.bool)
        for index in torch.cartesian_prod(*(torch.arange(n) for n in result.values.shape)).tolist():
            top, left, bottom, right = result.boxes[tuple(index)].tolist()
            inside[(*index, slice(None), slice(top, bottom), slice(left, right))] = True
        assert result.pixels[~inside].count_nonzero() == 0, layer
        assert result.pixels[inside].count_nonzero() > 0, layer
        field = result.receptive_field.boxes(result.positions, (99, 99))
        assert (result.boxes[..., :2] >= field[..., :2]).all() and (
            result.boxes[..., 2:] <= field[..., 2:]
        ).all()


def test_crops_and_patches(zfnet_stock):
    images = images_for((2, 3, 99, 99), seed=14)
    result = DeconvNet(zfnet_stock).project(images, "conv5", filters=[9, 10], top=2)
    size = result.receptive_field.size
    crops, patches = result.crops(), result.patches(images, fill=float("nan"))
    assert crops.shape == patches.shape == (2, 2, 2, 3, *size)
    # A crop holds the whole projection (nothing lies outside the receptive field).
    assert_close_verbose(
        crops.sum(dim=(-3, -2, -1)), result.pixels.sum(dim=(-3, -2, -1)), rtol=1e-5, atol=1e-6
    )
    windows = result.windows()
    for index in [(0, 0, 0), (1, 1, 1), (0, 1, 1)]:
        top, left, bottom, right = windows[index].tolist()
        for y, x in [(max(top, 0), max(left, 0)), (min(bottom, 99) - 1, min(right, 99) - 1)]:
            assert patches[index][:, y - top, x - left].tolist() == images[index[0], :, y, x].tolist()
            assert crops[index][:, y - top, x - left].tolist() == result.pixels[index][:, y, x].tolist()
        if top < 0:
            assert patches[index][:, 0].isnan().all()  # outside the image: the fill
    with pytest.raises(ValueError, match="images must be the projected images"):
        result.patches(images[:1])


# ------------------------------------------------------------------------------- models read by fx
class FunctionalNet(nn.Module):
    """F.relu / torch.relu / F.max_pool2d in forward; modules registered in another order than used."""

    def __init__(self):
        super().__init__()
        self.second = nn.Conv2d(6, 4, 3, padding=1)
        self.first = nn.Conv2d(3, 6, 5, stride=2)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.first(x)), 3, stride=2, ceil_mode=True)
        return torch.relu(self.second(x)).relu().mean()


def test_functional_model_read_by_fx():
    torch.manual_seed(15)
    model = FunctionalNet().eval()
    sequential = nn.Sequential(
        OrderedDict(
            first=model.first,
            r1=nn.ReLU(),
            pool=nn.MaxPool2d(3, 2, ceil_mode=True),
            second=model.second,
            r2=nn.ReLU(),
        )
    ).eval()
    images = images_for((2, 3, 31, 29), seed=16)
    deconvnet = DeconvNet(model)
    assert deconvnet.layers() == ["first", "second"]
    result = deconvnet.project(images, "second", top=2)
    expected = DeconvNet(sequential).project(images, "second", top=2)
    assert torch.equal(result.pixels, expected.pixels) and torch.equal(result.positions, expected.positions)
    assert_matches_captum(expected, captum_ready(sequential), "second", images)


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so the chain is read in registration order."""

    def __init__(self, functional_relu: bool = False, swapped: bool = False):
        super().__init__()
        self.functional_relu, self.swapped = functional_relu, swapped
        self.a = nn.Conv2d(3, 3, 3)
        self.relu = None if functional_relu else nn.ReLU()  # F.relu: no module to read in registration order
        self.b = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        if x.sum() > float("-inf"):  # always true, but fx cannot know
            x = self.b(x) if self.swapped else self.a(x)
            x = F.relu(x) if self.functional_relu else self.relu(x)
            x = self.a(x) if self.swapped else self.b(x)
        return x


def test_untraceable_model_falls_back_and_is_checked():
    torch.manual_seed(17)
    images = images_for((1, 3, 12, 12), seed=18)
    plain = Untraceable().eval()
    result = DeconvNet(plain).project(images, "b", top=1)
    assert_matches_captum(result, captum_ready(plain), "b", images)
    for variant in (dict(functional_relu=True), dict(swapped=True)):
        model = Untraceable(**variant).eval()
        model.load_state_dict(plain.state_dict())
        with pytest.raises(ValueError, match="does not reproduce the model's forward"):
            DeconvNet(model).project(images, "b")
        DeconvNet(model, check=False).project(images, "b")  # unchecked: the user's responsibility


def test_optional_forward_argument_is_traced_at_its_default():
    # captum's own test model: forward(self, x1, x2=None) adds x2 only when given. fx, unbound, traces the
    # add as if x2 were given and refused every layer; the call projected is model(images), x2=None.
    model = BasicModel_ConvNet_One_Conv().eval()
    deconvnet = DeconvNet(model)
    assert deconvnet.layers() == ["conv1", "relu1"]
    images = 30 * torch.rand((3, 1, 4, 4), generator=torch.Generator().manual_seed(23))
    for layer in ("conv1", "relu1"):
        result = deconvnet.project(images, layer, top=2)
        assert_values_are_the_activations(result, model, layer, images)
        assert_matches_captum(result, captum_ready(model), layer, images)


NO_BIAS = torch.zeros(1)


class OptionalExtras(nn.Module):
    """Optional arguments of every kind: a flag, a keyword-only scale, a tensor default, **kwargs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.extra = nn.Conv2d(3, 4, 3)

    def forward(self, x, shift=None, use_extra=False, bias=NO_BIAS, *, scale=1.0, **ignored):
        if shift is not None:
            x = x + shift
        y = self.extra(x) if use_extra else self.conv(x)
        if scale != 1.0:
            y = y * scale
        return F.relu(y) + bias


def test_flags_and_keyword_only_defaults_are_traced_at_their_defaults():
    torch.manual_seed(24)
    model = OptionalExtras().eval()
    assert DeconvNet(model).layers() == ["conv"]  # use_extra=False: the call never reaches `extra`
    with pytest.raises(ValueError, match="'extra' is never called"):
        DeconvNet(model).chain("extra")
    images = images_for((2, 3, 9, 9), seed=25)
    result = DeconvNet(model).project(images, "conv", top=2)
    assert_matches_captum(result, captum_ready(model), "conv", images)


class DoubledConv(nn.Conv2d):
    """A conv subclass whose forward is not the convolution its weights describe."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_conv_subclass_with_another_forward_fails_the_check():
    torch.manual_seed(22)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), DoubledConv(4, 4, 3)).eval()
    with pytest.raises(ValueError, match="does not reproduce the model's forward at layer '2'"):
        DeconvNet(model).project(images_for((1, 3, 12, 12)), "2")
    DeconvNet(model).project(images_for((1, 3, 12, 12)), "0")  # the path to '0' is fine


# ------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def alexnet_deconvnet():
    return DeconvNet(seeded(torchvision.models.alexnet))


def test_unknown_layer_lists_projectable_layers(alexnet_deconvnet):
    with pytest.raises(ValueError, match=r"'conv5' is not a module.*'features.10'"):
        alexnet_deconvnet.project(images_for((1, 3, 67, 67)), "conv5")
    with pytest.raises(ValueError, match=r"AdaptiveAvgPool2d.*'features.12'"):
        alexnet_deconvnet.project(images_for((1, 3, 67, 67)), "avgpool", path="deconvnet")
    with pytest.raises(TypeError, match="layer must be a module name"):
        alexnet_deconvnet.project(images_for((1, 3, 67, 67)), 10)


def test_bad_filters_and_top(alexnet_deconvnet):
    images = images_for((1, 3, 67, 67))
    with pytest.raises(ValueError, match=r"\[256\] out of range: layer 'features.10' has 256 channels"):
        alexnet_deconvnet.project(images, "features.10", filters=[0, 256])
    with pytest.raises(ValueError, match="has 64 channels"):
        alexnet_deconvnet.project(images, "features.0", filters=-1)
    with pytest.raises(ValueError, match="at least one filter"):
        alexnet_deconvnet.project(images, "features.0", filters=[])
    with pytest.raises(TypeError, match="filters must be"):
        alexnet_deconvnet.project(images, "features.0", filters=1.5)
    with pytest.raises(TypeError, match="filters must be"):
        alexnet_deconvnet.project(images, "features.0", filters=True)
    with pytest.raises(ValueError, match=r"top must be in 1..9"):
        alexnet_deconvnet.project(images, "features.10", top=10)  # conv5 is 3x3 at 67x67
    with pytest.raises(
        ValueError, match=r"top must be in 1..9 \(the positions in the output of layer 'features.10'\)"
    ):
        alexnet_deconvnet.project(images, "features.10", top=0)
    for not_an_int in (1.0, True, torch.tensor(2.0), "2"):
        with pytest.raises(TypeError, match="top must be an int"):
            alexnet_deconvnet.project(images, "features.10", top=not_an_int)
    for integer in (np.int64(2), torch.tensor(2)):  # integers of other libraries count, as for filters
        assert alexnet_deconvnet.project(images, "features.10", filters=[1], top=integer).values.shape == (
            1,
            1,
            2,
        )


def test_bad_images(alexnet_deconvnet):
    with pytest.raises(ValueError, match=r"3 channels \(the first conv 'features.0' expects 3\)"):
        alexnet_deconvnet.project(images_for((1, 4, 67, 67)), "features.3")
    with pytest.raises(ValueError, match=r"images must be 4-D.*unsqueeze"):
        alexnet_deconvnet.project(images_for((3, 67, 67)), "features.3")
    with pytest.raises(TypeError, match="model's dtype torch.float32"):
        alexnet_deconvnet.project(images_for((1, 3, 67, 67)).double(), "features.3")
    with pytest.raises(TypeError, match="floating point"):
        alexnet_deconvnet.project(torch.zeros(1, 3, 67, 67, dtype=torch.int64), "features.3")
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        alexnet_deconvnet.project([[0.0]], "features.3")
    with pytest.raises(ValueError, match=r"too small for layer 'features.10'.*at least 31x31 pixels"):
        alexnet_deconvnet.project(images_for((1, 3, 30, 40)), "features.10")
    alexnet_deconvnet.project(images_for((1, 3, 31, 31)), "features.10")  # the smallest it takes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_images_are_refused_before_any_work(bad, monkeypatch):
    torch.manual_seed(26)
    model = odd_chain()
    images = images_for((3, 3, 41, 30), seed=27)
    images[1, 2, 5, 7] = images[2, 0, 0, 0] = bad
    deconvnet = DeconvNet(model)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    monkeypatch.setattr(deconvnet, "_project", lambda *args: calls.append(2))
    message = (
        "images contains 2 NaN/inf values \\(in 2 images: 1, 2\\); a projection of a non-finite image is"
    )
    with pytest.raises(ValueError, match=message):
        deconvnet.project(images, "conv2")
    assert calls == []


def test_non_finite_activation_from_a_parameter_is_refused_and_other_filters_still_project():
    model = odd_chain()
    images = images_for((2, 3, 41, 30), seed=28)
    with torch.no_grad():
        model.conv2.bias[1] = float("nan")
    with pytest.raises(
        ValueError, match=r"layer 'conv2' gives \d+ NaN/inf activations .* conv weight or bias"
    ):
        DeconvNet(model).project(images, "conv2", filters=[0, 1])
    result = DeconvNet(model).project(images, "conv2", filters=[0, 2])
    assert result.pixels.isfinite().all()
    assert_matches_captum(result, captum_ready(model), "conv2", images)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.after = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        return self.after(x + self.conv(x))


@pytest.mark.parametrize(
    ("model", "layer", "named"),
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3)), "2", "AvgPool2d"),
        (nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 4, 3, groups=2)), "1", "groups=2"),
        (nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2)), "0", "dilation=(2, 2)"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3)), "2", "Tanh"),
        (nn.Sequential(nn.MaxPool2d(2, dilation=2), nn.Conv2d(3, 4, 3)), "1", "dilation=2"),
        (Residual(), "after", "add"),
    ],
    ids=["avg_pool", "grouped_conv", "dilated_conv", "tanh", "dilated_pool", "residual_add"],
)
def test_unsupported_op_on_the_path(model, layer, named):
    # Not a chain: the deconvnet path refuses it, naming the op; "auto" takes the gradient path.
    deconvnet = DeconvNet(model.eval())
    images = images_for((1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"cannot be projected") as error:
        deconvnet.project(images, layer, path="deconvnet")
    assert named in str(error.value) and "Supported: nn.Conv2d" in str(error.value)
    assert layer not in deconvnet.layers()
    assert layer in deconvnet.layers(include_gradient_path=True)
    assert deconvnet.path(layer) == "gradient"
    with warnings.catch_warnings():  # patch() leaves a dilated pool alone and says so
        warnings.simplefilter("ignore", UserWarning)
        result = deconvnet.project(images, layer, filters=[0])
    assert result.path == "gradient"
    assert result.pixels.isfinite().all()


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.twice = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, y):
        return self.twice(self.twice(self.conv(y))) + x.mean()


class UntraceableWithTanh(Untraceable):
    """Registration order (fx cannot trace it) with a layer the deconvnet cannot invert."""

    def __init__(self):
        super().__init__()
        self.relu = nn.Tanh()


def refusal(call) -> str:
    with pytest.raises(ValueError) as error:
        call()
    return str(error.value)


def test_refusal_is_sentences_ending_with_the_projectable_layers():
    supported = "Supported: " + SUPPORTED_LAYERS + "."
    tanh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3)).eval()
    # The whole text once, exactly: reason, what is supported, what could be projected instead.
    assert refusal(lambda: DeconvNet(tanh).chain("2")) == (
        "layer '2' cannot be projected: its path from the input goes through '1' (Tanh), which the "
        f"deconvnet cannot invert. {supported} Layers that can be projected: '0'."
    )
    messages = {
        "not a module": refusal(lambda: DeconvNet(tanh).chain("conv9")),
        "not a conv/ReLU/pool": refusal(lambda: DeconvNet(tanh).chain("1")),
        "called twice": refusal(lambda: DeconvNet(TwoInputs()).chain("twice")),
        "another forward argument": refusal(lambda: DeconvNet(TwoInputs()).chain("conv")),
        "registration order": refusal(lambda: DeconvNet(UntraceableWithTanh()).chain("b")),
        "nothing projectable": refusal(
            lambda: DeconvNet(nn.Sequential(nn.Tanh(), nn.Conv2d(3, 3, 1))).chain("1")
        ),
    }
    for kind, message in messages.items():
        # One line; every sentence closed before the next begins; the list of layers is the last one.
        assert "\n" not in message and ".." not in message, kind
        before, listing = message.rsplit(" Layers that can be projected: ", 1)
        assert before.endswith("."), (kind, message)
        assert listing.endswith(".") and re.fullmatch(r"('[\w.]+'(, '[\w.]+')*|none)\.", listing), (
            kind,
            message,
        )
    assert messages["nothing projectable"].endswith("Layers that can be projected: none.")
    assert messages["not a conv/ReLU/pool"].startswith(
        "layer '1' (Tanh) is not a conv, ReLU or max-pool layer, where a projection starts. Layers that"
    )
    assert "module registration order because torch.fx could not trace" in messages["registration order"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        DeconvNet(lambda x: x)
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU()))
    with pytest.raises(TypeError, match="TorchScript module .* pass that instead"):
        DeconvNet(scripted)
    with pytest.raises(ValueError, match="chunk_bytes"):
        DeconvNet(nn.Conv2d(3, 3, 3), chunk_bytes=0)
    with pytest.raises(TypeError, match="check must be a bool"):
        DeconvNet(nn.Conv2d(3, 3, 3), check=1)
