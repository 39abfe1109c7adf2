"""Fig. 2-style grids of projections beside their image patches."""

from __future__ import annotations

import matplotlib.image
import pytest
import torch
from torch import nn

from zfkernels.deconvnet.grid import grid_image, save_grid, show_patch, show_projection
from zfkernels.deconvnet.projection import DeconvNet


@pytest.fixture
def projected():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(4, 5, 3), nn.ReLU()
    )
    images = torch.rand(2, 3, 17, 17)
    return DeconvNet(model).project(images, "3", filters=[0, 2, 4], top=2), images


def test_show_projection_is_gray_at_zero_and_spans_the_range():
    crops = torch.tensor([[[[-2.0, 0.0, 1.0]]], [[[0.0, 0.0, 0.0]]]])
    shown = show_projection(crops)
    assert torch.equal(shown[0].flatten(), torch.tensor([0.0, 0.5, 0.75]))
    assert torch.equal(shown[1], torch.full_like(shown[1], 0.5))


def test_show_patch_scales_each_patch():
    patches = torch.stack([torch.arange(4.0).view(1, 2, 2), torch.full((1, 2, 2), 3.0)])
    shown = show_patch(patches)
    assert torch.equal(shown[0].flatten(), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    assert torch.equal(shown[1], torch.full_like(shown[1], 0.5))


def test_grid_layout_places_projection_then_patch(projected):
    projection, images = projected
    gap = 2
    grid = grid_image(projection, images, gap=gap)
    b, f, k, c, h, w = projection.crops().shape
    columns = b * k
    assert grid.shape == (c, f * h + (f + 1) * gap, columns * (2 * w + 2 * gap) + gap)
    assert 0.0 <= grid.min() and grid.max() <= 1.0
    # Row 1 (filter 2), column 3 (image 1, activation 1): projection, gap, patch.
    top, left = gap + 1 * (h + gap), gap + 3 * (2 * w + 2 * gap)
    expected_crop = show_projection(projection.crops()[1, 1, 1])
    expected_patch = show_patch(projection.patches(images)[1, 1, 1])
    assert torch.equal(grid[:, top : top + h, left : left + w], expected_crop)
    assert torch.equal(grid[:, top : top + h, left + w + gap : left + 2 * w + gap], expected_patch)
    assert torch.all(grid[:, :gap] == 1.0)  # background between rows


def test_save_grid_writes_a_png(projected, tmp_path):
    projection, images = projected
    path = save_grid(projection, images, tmp_path / "fig2.png")
    pixels = matplotlib.image.imread(path)
    grid = grid_image(projection, images)
    assert pixels.shape[:2] == grid.shape[1:]
    assert abs(float(pixels[..., :3].mean()) - float(grid.mean())) < 0.01


def test_bad_arguments(projected):
    projection, images = projected
    with pytest.raises(TypeError, match="projection"):
        grid_image(images, images)
    with pytest.raises(ValueError, match="gap"):
        grid_image(projection, images, gap=-1)
    with pytest.raises(ValueError, match="images"):
        grid_image(projection, images[:1])
