"""Fig. 2-style grids: each projection beside the image patch its activation sees.

Zeiler & Fergus show, for a feature map, the projections of its strongest activations next to the
corresponding image patches. :func:`grid_image` tiles a :class:`~zfkernels.deconvnet.projection.Projection`
that way, one row per filter and one (projection, patch) pair per image and activation; :func:`save_grid`
writes it as a PNG. Projections are signed: each is shown on its own scale around mid-gray (zero is gray,
as the paper's renderings are contrast-normalized per patch), and patches are min-max scaled per patch.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .projection import Projection

__all__ = ["grid_image", "save_grid", "show_projection", "show_patch"]


def show_projection(crops: Tensor) -> Tensor:
    """Signed projections (..., C, H, W) to [0, 1] for display, each on its own scale: 0.5 + x / (2 max|x|).

    An all-zero projection (a non-positive activation) stays uniformly gray.
    """
    peak = crops.abs().amax(dim=(-3, -2, -1), keepdim=True)
    return (0.5 + crops / (2 * peak.clamp_min(torch.finfo(crops.dtype).tiny))).clamp(0, 1)


def show_patch(patches: Tensor) -> Tensor:
    """Image patches (..., C, H, W) min-max scaled to [0, 1], each patch on its own (a flat patch is gray)."""
    low = patches.amin(dim=(-3, -2, -1), keepdim=True)
    high = patches.amax(dim=(-3, -2, -1), keepdim=True)
    span = high - low
    return torch.where(span > 0, (patches - low) / span.clamp_min(torch.finfo(patches.dtype).tiny), 0.5)


def grid_image(projection: Projection, images: Tensor, *, gap: int = 2, background: float = 1.0) -> Tensor:
    """One (C, H, W) image in [0, 1]: a row per filter; per image and activation, the projection cropped to
    its receptive field, then the image patch, separated by `gap` pixels of `background`."""
    if not isinstance(projection, Projection):
        raise TypeError(
            f"projection must be a Projection (from DeconvNet.project), got {type(projection).__name__}"
        )
    if not isinstance(gap, int) or isinstance(gap, bool) or gap < 0:
        raise ValueError(f"gap must be a non-negative int, got {gap!r}")
    crops = show_projection(projection.crops().float().cpu())
    patches = show_patch(projection.patches(images).float().cpu())
    b, f, k, c, h, w = crops.shape
    columns = b * k
    grid = torch.full(
        (c, f * h + (f + 1) * gap, columns * (2 * w + gap) + (columns + 1) * gap), float(background)
    )
    for row in range(f):
        top = gap + row * (h + gap)
        for column in range(columns):
            image, activation = divmod(column, k)
            left = gap + column * (2 * w + 2 * gap)
            grid[:, top : top + h, left : left + w] = crops[image, row, activation]
            grid[:, top : top + h, left + w + gap : left + 2 * w + gap] = patches[image, row, activation]
    return grid


def save_grid(
    projection: Projection, images: Tensor, path: str | os.PathLike[str], **grid_options: object
) -> str:
    """Write :func:`grid_image` as a PNG at `path` (its directory must exist); returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # a file, never a window
    from matplotlib import pyplot as plt

    grid = grid_image(projection, images, **grid_options)
    pixels = grid.permute(1, 2, 0).numpy()
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    plt.imsave(os.fspath(path), pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0.0, vmax=1.0)
    return os.fspath(path)
