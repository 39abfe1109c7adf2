"""Receptive-field maths for a chain of sliding-window layers (convolutions and pools).

One activation of a layer sees a rectangle of input pixels, its receptive field. For a chain of layers
``l = 1..L`` with kernel ``k_l`` (dilated extent), stride ``s_l`` and padding ``p_l`` (per axis)::

    jump_l  = jump_{l-1} * s_l                    (input pixels between neighbouring activations)
    size_l  = size_{l-1} + (k_l - 1) * jump_{l-1}  (pixels one activation sees)
    start_l = start_{l-1} - p_l * jump_{l-1}       (top-left input pixel seen by activation (0, 0))

starting from jump 1, size 1, start 0 at the input. Activation ``(row, col)`` then sees input rows
``[start + row * jump, start + row * jump + size)`` (and likewise columns), before clipping to the image.
Pointwise layers (ReLU, normalization, dropout) are kernel 1, stride 1, padding 0 and change nothing.

At the borders the pixels an activation really depends on can be fewer than its receptive field clipped
to the image: a ceil-mode pool's last window, or a conv whose windows do not reach its input's last rows,
hides some border rows of the map below. :func:`input_boxes` clips at every map on the way down and gives
exactly the pixels a projection (or a gradient) can reach.

The same recurrence, read downwards, is how the deconvnet crops: a window of ``h`` rows starting at row
``y0`` of a layer's output maps, through that layer's transposed conv (or unpool), to ``(h - 1) * s + k``
rows starting at ``y0 * s - p`` of its input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Pair = tuple[int, int]

__all__ = ["LayerGeometry", "ReceptiveField", "input_boxes", "receptive_fields", "window_below"]


@dataclass(frozen=True)
class LayerGeometry:
    """A layer's sliding-window geometry, per axis (rows, cols). ``kernel`` is the dilated extent."""

    kernel: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)

    def __post_init__(self) -> None:
        for name in ("kernel", "stride", "padding"):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple)
                or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            ):
                raise TypeError(f"{name} must be a tuple of 2 ints, got {value!r}")
        if min(self.kernel) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(
                f"kernel and stride must be >= 1 and padding >= 0, got kernel={self.kernel}, "
                f"stride={self.stride}, padding={self.padding}"
            )


@dataclass(frozen=True)
class ReceptiveField:
    """Where the activations of one layer look in the input image (per axis: rows, cols).

    ``size``: pixels one activation sees; ``jump``: input pixels between neighbouring activations;
    ``start``: the input coordinate of the top-left pixel seen by activation (0, 0) (negative when the
    layers pad). Nothing here is clipped to an image: :meth:`boxes` does that.
    """

    size: Pair = (1, 1)
    jump: Pair = (1, 1)
    start: Pair = (0, 0)

    def then(self, layer: LayerGeometry) -> ReceptiveField:
        """The receptive field one layer further up the chain."""
        return ReceptiveField(
            size=tuple(self.size[i] + (layer.kernel[i] - 1) * self.jump[i] for i in range(2)),
            jump=tuple(self.jump[i] * layer.stride[i] for i in range(2)),
            start=tuple(self.start[i] - layer.padding[i] * self.jump[i] for i in range(2)),
        )

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Unclipped half-open box ``(top, left, bottom, right)`` seen by activation ``(row, col)``."""
        top = self.start[0] + row * self.jump[0]
        left = self.start[1] + col * self.jump[1]
        return top, left, top + self.size[0], left + self.size[1]

    def boxes(self, positions: Tensor, image_size: Sequence[int] | None = None) -> Tensor:
        """Half-open boxes ``(top, left, bottom, right)`` (int64, ``(..., 4)``) of ``positions`` (``(..., 2)``
        rows and cols), clipped to ``image_size`` ``(H, W)`` when given: ``image[..., top:bottom,
        left:right]`` is then the patch the activation sees."""
        if not isinstance(positions, Tensor) or positions.dim() == 0 or positions.shape[-1] != 2:
            got = tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__
            raise ValueError(f"positions must be a tensor of shape (..., 2) (row, col), got {got}")
        pos = positions.to(torch.int64)
        top = self.start[0] + pos[..., 0] * self.jump[0]
        left = self.start[1] + pos[..., 1] * self.jump[1]
        bottom, right = top + self.size[0], left + self.size[1]
        if image_size is not None:
            height, width = int(image_size[-2]), int(image_size[-1])
            top, bottom = top.clamp(0, height), bottom.clamp(0, height)
            left, right = left.clamp(0, width), right.clamp(0, width)
        return torch.stack((top, left, bottom, right), dim=-1)


def receptive_fields(layers: Sequence[LayerGeometry]) -> list[ReceptiveField]:
    """The receptive field after each layer of a chain (input first): ``result[i]`` is after ``layers[i]``."""
    fields, field = [], ReceptiveField()
    for layer in layers:
        if not isinstance(layer, LayerGeometry):
            raise TypeError(f"layers must hold LayerGeometry items, got {type(layer).__name__}")
        field = field.then(layer)
        fields.append(field)
    return fields


def window_below(origin: int, size: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """Rows ``[origin', origin' + size')`` of a layer's input that rows ``[origin, origin + size)`` of its
    output reach through the transposed conv (or unpool) with this geometry: everything they touch."""
    return origin * stride - padding, (size - 1) * stride + kernel


def input_boxes(layers: Sequence[LayerGeometry], input_sizes: Sequence[Pair], positions: Tensor) -> Tensor:
    """Half-open boxes ``(top, left, bottom, right)`` of the input pixels each activation depends on.

    ``layers[i]`` reads a map of ``input_sizes[i]`` (``input_sizes[0]`` is the image); ``positions`` is
    ``(..., 2)`` (row, col) in the last layer's output. Each activation's window is taken down layer by
    layer and clipped to every map on the way, so the box is the support of its gradient with respect to
    the image (for weights with no zeros): inside its receptive field clipped to the image, and smaller
    where intermediate maps end first. Returns int64 ``(..., 4)``; an empty box has top == bottom or
    left == right.
    """
    if len(layers) != len(input_sizes):
        raise ValueError(f"input_sizes must give one size per layer ({len(layers)}), got {len(input_sizes)}")
    if not isinstance(positions, Tensor) or positions.dim() == 0 or positions.shape[-1] != 2:
        got = tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__
        raise ValueError(f"positions must be a tensor of shape (..., 2) (row, col), got {got}")
    low = positions.to(torch.int64)
    high = low + 1
    for layer, size in zip(reversed(layers), reversed(input_sizes), strict=True):
        stride = torch.tensor(layer.stride, device=low.device)
        padding = torch.tensor(layer.padding, device=low.device)
        kernel = torch.tensor(layer.kernel, device=low.device)
        limit = torch.tensor(size, device=low.device)
        low, high = low * stride - padding, (high - 1) * stride - padding + kernel
        low = torch.minimum(low.clamp(min=0), limit)
        high = torch.maximum(torch.minimum(high, limit), low)
    return torch.cat((low, high), dim=-1)
