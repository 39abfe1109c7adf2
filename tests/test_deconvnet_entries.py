"""DeconvNet.forward(...).project_entries(...): chosen activations, each cut to its receptive field.

The mining projection's API. Each window must equal ``DeconvNet.project(...).crops()`` of the same
activation: on the chain path bit for bit when the same activations run together (the same kernels on the
same batches; oneDNN's transposed conv rounds differently for another batch size, so other chunkings agree
to rounding), within 1e-6 of its largest magnitude on the gradient path (torch's backward on other batches).
Entries may repeat and come in any order.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import assert_close_verbose

from zfkernels.deconvnet import DeconvNet, projection

pytestmark = pytest.mark.usefixtures("single_thread")


def assert_within(actual: torch.Tensor, expected: torch.Tensor, fraction: float) -> None:
    """Each window within ``fraction`` of its own largest magnitude (a zero window exactly zero)."""
    scale = expected.abs().amax((1, 2, 3), keepdim=True)
    error = (actual - expected).abs()
    worst = float((error / scale.clamp(min=1e-30)).max()) if error.numel() else 0.0
    assert (error <= fraction * scale).all(), f"off by {worst:.3g} of the window's largest magnitude"


def seeded(build, seed=0):
    torch.manual_seed(seed)
    return build().eval()


@pytest.fixture(scope="module")
def alexnet():
    return seeded(torchvision.models.alexnet)


@pytest.fixture(scope="module")
def resnet():
    return seeded(torchvision.models.resnet18)


def images_for(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def entries_of(result: projection.Projection) -> torch.Tensor:
    """(B * F * k, 4) entries in the projection's own order."""
    b, f, k = result.values.shape
    image = torch.arange(b).view(b, 1, 1).expand(b, f, k)
    filters = torch.tensor(result.filters).view(1, f, 1).expand(b, f, k)
    return torch.cat((image.reshape(-1, 1), filters.reshape(-1, 1), result.positions.reshape(-1, 2)), 1)


def shuffled_with_repeats(count: int, seed: int) -> torch.Tensor:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return torch.cat((order, order[: count // 2 + 1]))  # any order, some twice


@pytest.mark.parametrize(
    ("layer", "top"),
    [("features.0", 2), ("features.2", 2), ("features.7", 2), ("features.10", 2), ("features.12", 1)],
)
def test_chain_windows_equal_project_crops_bit_for_bit(alexnet, layer, top):
    images = images_for((3, 3, 67, 67), seed=1)
    deconvnet = DeconvNet(alexnet)
    expected = deconvnet.project(images, layer, filters=[5, 0, 17], top=top)
    record = deconvnet.forward(images, ["features.0", layer])  # several layers in one forward
    assert record.path(layer) == "deconvnet"
    entries = entries_of(expected)
    pick = shuffled_with_repeats(entries.shape[0], seed=2)
    result = record.project_entries(layer, entries[pick])
    assert result.path == "deconvnet" and result.layer == layer
    assert result.receptive_field == expected.receptive_field == record.receptive_field(layer)
    crops = expected.crops().reshape(-1, *result.windows.shape[1:])
    assert torch.equal(result.windows, crops[pick])
    assert torch.equal(result.values, expected.values.reshape(-1)[pick])
    assert torch.equal(result.origins, expected.windows().reshape(-1, 4)[pick, :2])
    assert torch.equal(result.boxes, expected.boxes.reshape(-1, 4)[pick])
    patches = expected.patches(images).reshape(-1, *result.windows.shape[1:])
    assert torch.equal(result.patches(images), patches[pick])
    # One chunk per projection: other batch sizes for oneDNN's transposed conv, the last bits may differ.
    small = DeconvNet(alexnet, chunk_bytes=1).forward(images, layer).project_entries(layer, entries[pick])
    assert_within(small.windows, result.windows, 1e-6)


@pytest.mark.parametrize("layer", ["layer1.1.conv1", "layer2.0.downsample.0", "layer3.1.conv2"])
def test_gradient_windows_equal_project_crops(resnet, layer):
    images = images_for((2, 3, 64, 64), seed=3)
    deconvnet = DeconvNet(resnet)
    expected = deconvnet.project(images, layer, filters=[3, 1], top=2)
    assert expected.path == "gradient"
    record = deconvnet.forward(images, ["conv1", layer, "layer1.0.conv2"])
    assert record.path(layer) == "gradient" and record.path("conv1") == "deconvnet"
    entries = entries_of(expected)
    pick = shuffled_with_repeats(entries.shape[0], seed=4)
    result = record.project_entries(layer, entries[pick])
    assert result.path == "gradient"
    crops = expected.crops().reshape(-1, *result.windows.shape[1:])[pick]
    assert crops.abs().amax((1, 2, 3)).gt(0).sum() >= 4
    assert_within(result.windows, crops, 1e-6)
    assert_close_verbose(result.values, expected.values.reshape(-1)[pick], rtol=1e-6, atol=1e-7)
    assert torch.equal(result.origins, expected.windows().reshape(-1, 4)[pick, :2])
    assert torch.equal(result.boxes, expected.boxes.reshape(-1, 4)[pick])
    patches = expected.patches(images).reshape(-1, *result.windows.shape[1:])
    assert torch.equal(result.patches(images), patches[pick])


def test_empty_entries(alexnet, resnet):
    for model, layer, size in ((alexnet, "features.10", 67), (resnet, "layer2.1.conv1", 64)):
        images = images_for((2, 3, size, size), seed=5)
        record = DeconvNet(model).forward(images, layer)
        field = record.receptive_field(layer)
        for empty in (torch.zeros(0, 4, dtype=torch.int64), []):
            result = record.project_entries(layer, empty)
            assert result.windows.shape == (0, 3, *field.size)
            assert (
                result.values.shape == (0,)
                and result.origins.shape == (0, 2)
                and result.boxes.shape == (0, 4)
            )
            assert result.patches(images).shape == (0, 3, *field.size)


def test_bad_entries_and_layers(alexnet, resnet):
    images = images_for((2, 3, 67, 67), seed=6)
    for model, layer in ((alexnet, "features.10"), (resnet, "layer2.1.conv1")):
        record = DeconvNet(model).forward(images, layer)
        b, c, h, w = record.activation(layer).shape
        for bad in ([[2, 0, 0, 0]], [[0, c, 0, 0]], [[0, 0, h, 0]], [[0, 0, 0, w]], [[0, 0, 0, -1]]):
            with pytest.raises(ValueError, match=r"entries\[0\] = .* out of range"):
                record.project_entries(layer, torch.tensor(bad))
        with pytest.raises(ValueError, match=r"entries must have shape \(n, 4\)"):
            record.project_entries(layer, torch.zeros(3, 3, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"entries must be \(n, 4\)"):
            record.project_entries(layer, [[0, 0, 0]])
        with pytest.raises(TypeError, match="entries must be integers"):
            record.project_entries(layer, torch.zeros(1, 4))
        with pytest.raises(ValueError, match=r"layer 'features.3' was not run by this forward"):
            record.project_entries("features.3", [[0, 0, 0, 0]])
        with pytest.raises(ValueError, match=r"layer 'features.3' was not run by this forward"):
            record.activation("features.3")
    with pytest.raises(ValueError, match=r"layer 'nope' is not a module"):
        DeconvNet(alexnet).forward(images, ["features.0", "nope"])
    with pytest.raises(ValueError, match=r"layers must be a layer name or a non-empty sequence"):
        DeconvNet(alexnet).forward(images, [])
    with pytest.raises(ValueError, match=r"path must be one of"):
        DeconvNet(alexnet).forward(images, "features.0", path="fast")


def test_many_entries_are_chunked(alexnet, resnet, monkeypatch):
    """2,000 entries: the chain path runs them in chunks bounded by chunk_bytes, the gradient path one
    backward per round of one entry per image; no image-sized plane per entry at once."""
    images = images_for((4, 3, 67, 67), seed=7)
    generator = torch.Generator().manual_seed(8)

    def random_entries(activation: torch.Tensor, count: int) -> torch.Tensor:
        return torch.stack([torch.randint(n, (count,), generator=generator) for n in activation.shape], 1)

    seen = []
    seed = projection._seed
    monkeypatch.setattr(projection, "_seed", lambda *args: (seen.append(args[2].shape[0]), seed(*args))[1])
    deconvnet = DeconvNet(alexnet, chunk_bytes=4 << 20)
    record = deconvnet.forward(images, "features.5")
    entries = random_entries(record.activation("features.5"), 2000)
    result = record.project_entries("features.5", entries)
    assert sum(seen) == 2000 and len(seen) > 1
    plan = projection._plan(
        deconvnet.chain("features.5"), record._records["features.5"].sizes, (67, 67), 3, torch.float32
    )
    assert max(seen) <= (4 << 20) // plan.bytes_per_projection
    single = record.project_entries("features.5", entries[1234:1235])
    assert_within(result.windows[1234:1235], single.windows, 1e-6)

    rounds = []
    gradients = projection.deconvnet_gradients

    def counted(*args):
        for index, planes in gradients(*args):
            rounds.append(planes.shape[0])
            yield index, planes

    monkeypatch.setattr(projection, "deconvnet_gradients", counted)
    small = images_for((2, 3, 32, 32), seed=9)
    record = DeconvNet(resnet).forward(small, "layer1.1.conv1")
    entries = random_entries(record.activation("layer1.1.conv1"), 40)
    result = record.project_entries("layer1.1.conv1", entries)
    assert sum(rounds) == 40 and max(rounds) <= 2  # one entry per image per backward
    assert result.windows.shape[0] == 40
