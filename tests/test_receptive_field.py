"""Receptive-field maths: known values for AlexNet, VGG16 and ZFNet, and a brute-force cross-check.

The brute force builds a one-channel copy of a chain's geometry (every conv all ones, every max-pool an
average pool of the same window, so no gradient is ever zero by chance) and reads the receptive field off
the support of one activation's gradient with respect to the input.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

from zfkernels.deconvnet.chain import Conv, MaxPool
from zfkernels.deconvnet.projection import DeconvNet
from zfkernels.deconvnet.receptive_field import (
    LayerGeometry,
    ReceptiveField,
    receptive_fields,
    window_below,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def zfnet_sequential() -> nn.Sequential:
    """ZFNet's feature layers as stock modules, named as zfkernels.models.ZFNet names them."""
    layers = [
        ("conv1", nn.Conv2d(3, 96, 7, stride=2, padding=1)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
        ("conv2", nn.Conv2d(96, 256, 5, stride=2)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),
        ("conv3", nn.Conv2d(256, 384, 3, padding=1)),
        ("relu3", nn.ReLU()),
        ("conv4", nn.Conv2d(384, 384, 3, padding=1)),
        ("relu4", nn.ReLU()),
        ("conv5", nn.Conv2d(384, 256, 3, padding=1)),
        ("relu5", nn.ReLU()),
        ("pool5", nn.MaxPool2d(3, 2, ceil_mode=True)),
    ]
    return nn.Sequential(OrderedDict(layers))


@pytest.fixture(scope="module")
def alexnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.alexnet().eval()


@pytest.fixture(scope="module")
def vgg16_features() -> nn.Module:
    # Only the geometry matters here: the feature extractor, without VGG's 100M-parameter classifier.
    torch.manual_seed(0)
    return torchvision.models.vgg16().features.eval()


# ----------------------------------------------------------------------------------------- known values
@pytest.mark.parametrize(
    ("layer", "size", "jump", "start"),
    [
        ("features.0", 11, 4, -2),  # conv1
        ("features.2", 19, 8, -2),  # pool1
        ("features.10", 163, 16, -66),  # conv5
        ("features.12", 195, 32, -66),  # pool5: the classic "AlexNet conv5 sees 195 pixels"
    ],
)
def test_alexnet_known_values(alexnet, layer, size, jump, start):
    field = DeconvNet(alexnet).receptive_field(layer)
    assert field == ReceptiveField((size, size), (jump, jump), (start, start))


@pytest.mark.parametrize(
    ("layer", "size", "jump"),
    [
        ("2", 5, 1),  # conv1_2 (features.2 in the full model)
        ("28", 196, 16),  # conv5_3
        ("30", 212, 32),  # pool5: the classic "VGG16 conv5 sees 212 pixels"
    ],
)
def test_vgg16_known_values(vgg16_features, layer, size, jump):
    field = DeconvNet(vgg16_features).receptive_field(layer)
    assert field.size == (size, size) and field.jump == (jump, jump)


@pytest.mark.parametrize(
    ("layer", "size", "jump", "start"),
    [
        ("conv1", 7, 2, -1),
        ("pool1", 11, 4, -1),
        ("conv2", 27, 8, -1),
        ("pool2", 43, 16, -1),
        ("conv5", 139, 16, -49),  # conv3-5 pad 1 at jump 16: -1 - 3 * 16
        ("pool5", 171, 32, -49),
    ],
)
def test_zfnet_known_values(layer, size, jump, start):
    field = DeconvNet(zfnet_sequential()).receptive_field(layer)
    assert field == ReceptiveField((size, size), (jump, jump), (start, start))


# ---------------------------------------------------------------------------------------- brute force
def support_model(model: nn.Module, layer: str) -> nn.Sequential:
    """One channel, the chain's geometry: all-ones convs, average pools in place of max-pools."""
    layers = []
    for op in DeconvNet(model).chain(layer).ops:
        if isinstance(op, Conv):
            conv = nn.Conv2d(1, 1, op.kernel, op.stride, op.padding, bias=False)
            nn.init.ones_(conv.weight)
            layers.append(conv)
        elif isinstance(op, MaxPool):
            layers.append(
                nn.AvgPool2d(op.kernel, op.stride, op.padding, op.ceil_mode, count_include_pad=False)
            )
    return nn.Sequential(*layers).double()


def gradient_box(model: nn.Sequential, image_size: tuple[int, int], row: int, col: int) -> tuple[int, ...]:
    """Half-open bounding box of the input pixels activation (row, col) depends on."""
    image = torch.ones(1, 1, *image_size, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(model(image)[0, 0, row, col], image)
    rows, cols = grad[0, 0].nonzero(as_tuple=True)
    return rows.min().item(), cols.min().item(), rows.max().item() + 1, cols.max().item() + 1


@pytest.mark.parametrize(
    ("model_name", "layer", "image_size"),
    [
        ("zfnet", "conv2", (67, 61)),
        ("zfnet", "pool2", (67, 61)),
        ("zfnet", "conv5", (99, 99)),
        ("zfnet", "pool5", (131, 125)),
        ("alexnet", "features.5", (99, 99)),
        ("alexnet", "features.12", (131, 131)),
        ("vgg16", "28", (83, 77)),
    ],
)
def test_brute_force_gradient_support(alexnet, vgg16_features, model_name, layer, image_size):
    model = {"zfnet": zfnet_sequential(), "alexnet": alexnet, "vgg16": vgg16_features}[model_name]
    chain = DeconvNet(model).chain(layer)
    field = chain.receptive_field
    probe = support_model(model, layer)
    out_h, out_w = probe(torch.zeros(1, 1, *image_size, dtype=torch.float64)).shape[-2:]
    # Corners and the middle: clipped boxes at the borders, and (where it fits) a full one inside.
    for row, col in [(0, 0), (out_h - 1, out_w - 1), (out_h // 2, out_w // 2), (0, out_w - 1)]:
        expected = gradient_box(probe, image_size, row, col)
        positions = torch.tensor([[row, col]])
        assert tuple(chain.input_boxes(positions, image_size)[0].tolist()) == expected, (row, col)
        # The receptive field clipped to the image only contains it (equal unless a map ends first).
        top, left, bottom, right = field.boxes(positions, image_size)[0].tolist()
        assert top <= expected[0] and left <= expected[1] and bottom >= expected[2] and right >= expected[3]


@pytest.mark.parametrize(
    ("model_name", "layer", "size"),
    [
        ("alexnet", "features.10", 163),
        ("alexnet", "features.12", 195),
        ("vgg16", "28", 196),
        ("vgg16", "30", 212),
    ],
)
def test_brute_force_unclipped_size(alexnet, vgg16_features, model_name, layer, size):
    # An image big enough that the middle activation sees its whole field.
    model = {"alexnet": alexnet, "vgg16": vgg16_features}[model_name]
    probe = support_model(model, layer)
    image_size = (451, 451)
    out = probe(torch.zeros(1, 1, *image_size, dtype=torch.float64))
    row = col = out.shape[-1] // 2
    top, left, bottom, right = gradient_box(probe, image_size, row, col)
    assert (bottom - top, right - left) == (size, size)
    assert DeconvNet(model).receptive_field(layer).box(row, col) == (top, left, bottom, right)


# ------------------------------------------------------------------------------------------ the maths
def test_recurrence_by_hand():
    fields = receptive_fields(
        [LayerGeometry((3, 5), (2, 1), (1, 2)), LayerGeometry(), LayerGeometry((2, 2), (2, 2), (0, 0))]
    )
    assert fields[0] == ReceptiveField((3, 5), (2, 1), (-1, -2))
    assert fields[1] == fields[0]  # a pointwise layer changes nothing
    assert fields[2] == ReceptiveField((3 + 2, 5 + 1), (4, 2), (-1, -2))
    assert receptive_fields([]) == []


def test_boxes_clip_and_shape():
    field = ReceptiveField((11, 11), (4, 4), (-2, -2))
    positions = torch.tensor([[[0, 0], [3, 5]], [[20, 1], [10, 10]]])
    unclipped = field.boxes(positions)
    assert unclipped.shape == (2, 2, 4) and unclipped.dtype == torch.int64
    assert unclipped[0, 0].tolist() == [-2, -2, 9, 9]
    assert unclipped[0, 1].tolist() == [10, 18, 21, 29]
    clipped = field.boxes(positions, (40, 25))
    assert clipped[0, 0].tolist() == [0, 0, 9, 9]
    assert clipped[1, 0].tolist() == [40, 2, 40, 13]  # entirely below the image: an empty box
    assert clipped[1, 1].tolist() == [38, 25, 40, 25]  # right of the image: empty (left == right)
    for i in range(2):
        for j in range(2):
            top, left, bottom, right = unclipped[i, j].tolist()
            assert field.box(*positions[i, j].tolist()) == (top, left, bottom, right)


def test_window_below_matches_transposed_conv_support():
    # Rows [y0, y0 + h) of a transposed conv's input reach exactly rows window_below(...) of its output.
    for kernel, stride, padding in [(3, 1, 1), (5, 2, 0), (11, 4, 2), (3, 2, 0)]:
        for y0, h in [(0, 1), (2, 3), (4, 2)]:
            x = torch.zeros(1, 1, 8, 1, dtype=torch.float64)
            x[0, 0, y0 : y0 + h] = 1
            weight = torch.ones(1, 1, kernel, 1, dtype=torch.float64)
            full = torch.nn.functional.conv_transpose2d(x, weight, stride=(stride, 1))  # no padding: all rows
            rows = full[0, 0, :, 0].nonzero().flatten()
            origin, size = window_below(y0, h, kernel, stride, padding)
            assert (rows.min().item() - padding, rows.max().item() + 1 - rows.min().item()) == (origin, size)


def test_bad_arguments():
    with pytest.raises(TypeError, match="kernel"):
        LayerGeometry(kernel=3)
    with pytest.raises(ValueError, match="stride"):
        LayerGeometry(stride=(0, 1))
    with pytest.raises(TypeError, match="layers"):
        receptive_fields([(3, 1, 1)])
    with pytest.raises(ValueError, match="positions"):
        ReceptiveField().boxes(torch.zeros(3, 3))
