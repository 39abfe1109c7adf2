"""What each op case computes: ZFNet's layer geometry (and the tiny per-call shape), and per op a `Workload`
(shared inputs, the stock PyTorch code, the zfkernels call, bytes moved). cases.OPS registers the builders.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import zfkernels

POOL_KERNEL, POOL_STRIDE = 3, 2  # ZFNet's overlapping 3x3 stride-2 pools, ceil_mode
DEFAULT_IMAGE_SIZE = 224
# A tensor of 1x4x8x8 (batch 1 whatever --batch says): what a call costs when the kernel is nothing, the
# fixed per-call overhead a model of many small layers pays.
TINY = "tiny"


@dataclass(frozen=True)
class ConvLayer:
    """One ZFNet conv layer at a given input size: the geometry every op of that layer is benchmarked at."""

    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    in_size: int
    pooled: bool

    @property
    def out_size(self) -> int:
        return (self.in_size + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def pooled_size(self) -> int:
        """The pool after the ReLU, with ceil_mode (110 -> 55, 26 -> 13, 13 -> 6 at 224 input)."""
        return -(-(self.out_size - POOL_KERNEL) // POOL_STRIDE) + 1

    @property
    def deconv_output_padding(self) -> int:
        """What the transposed conv adds to land back on `in_size` (1 at layer 1: 110 -> 224, not 223)."""
        return self.in_size - ((self.out_size - 1) * self.stride - 2 * self.padding + self.kernel)


def zfnet_layers(image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, ConvLayer]:
    """ZFNet's five conv layers (Zeiler & Fergus 2013), each fed by the previous layer's output.

    At the paper's 224 input: conv1 96 7x7/2 pad 1 -> 110, pool -> 55; conv2 256 5x5/2 -> 26, pool -> 13;
    conv3 384, conv4 384, conv5 256, 3x3 pad 1 at 13; pool -> 6. A smaller `image_size` keeps the
    channels and kernels and shrinks the maps, so tests can build every case in milliseconds.
    """
    table = [
        ("L1", 3, 96, 7, 2, 1, True),
        ("L2", 96, 256, 5, 2, 0, True),
        ("L3", 256, 384, 3, 1, 1, False),
        ("L4", 384, 384, 3, 1, 1, False),
        ("L5", 384, 256, 3, 1, 1, True),
    ]
    layers: dict[str, ConvLayer] = {}
    size = image_size
    for name, cin, cout, kernel, stride, padding, pooled in table:
        layer = ConvLayer(name, cin, cout, kernel, stride, padding, size, pooled)
        if layer.out_size < POOL_KERNEL:
            raise ValueError(
                f"image_size {image_size} is too small for ZFNet: layer {name} maps are {layer.out_size}"
            )
        layers[name] = layer
        size = layer.pooled_size if pooled else layer.out_size
    return layers


def layer_geometry(shape: str, image_size: int = DEFAULT_IMAGE_SIZE) -> ConvLayer:
    """The geometry an op case runs at: a ZFNet layer at `image_size`, or the tiny 4-channel 8x8 map."""
    if shape == TINY:
        return ConvLayer(TINY, 4, 4, 1, 1, 0, 8, True)  # a 1x1 conv: 8x8 maps, pooled to 4x4
    return zfnet_layers(image_size)[shape]


def as_tuple(outputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(outputs)


@dataclass
class Workload:
    """What one op at one layer computes, in stock PyTorch and with zfkernels, on shared inputs.

    The two input tuples differ only where the op's inputs differ in kind (torch's int64 indices against
    our uint8 switches); `differentiable` indexes both alike. The first output is the one backward
    differentiates, against `grad_output`.
    """

    stock_inputs: tuple[Tensor, ...]
    our_inputs: tuple[Tensor, ...]
    stock: Callable[..., tuple[Tensor, ...]]
    ours: Callable[..., tuple[Tensor, ...]]
    differentiable: tuple[int, ...]
    grad_output: Tensor
    shapes: dict[str, list[int]]
    forward_bytes: int
    backward_bytes: int
    # Puts our outputs in the stock form before the comparison (switches -> int64 indices); never timed.
    comparable_ours: Callable[[Sequence[Tensor]], tuple[Tensor, ...]] = as_tuple


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _randn(
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    scale: float = 1.0,
) -> Tensor:
    return (torch.randn(tuple(shape), device=device, generator=generator) * scale).to(dtype)


def _integer_grad(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Tensor:
    """A gradient of small integers: where pooling windows share an argmax its gradients are summed, and
    sums of small integers are exact in any order and dtype, so every provider can be held to bit equality."""
    return torch.randint(-4, 5, tuple(shape), device=device, generator=generator).to(dtype)


def _unshared_switches(shape: Sequence[int], device: torch.device, generator: torch.Generator) -> Tensor:
    """Switches in the 2x2 corner (offsets 0, 1, 3, 4) of each 3x3 stride-2 window, which no other window
    reaches: our unpool sums where windows share an argmax and stock's overwrites, so only on unshared
    targets can both be checked against the reference. The scatter work is the same as with real switches."""
    corner = torch.tensor([0, 1, 3, 4], dtype=torch.uint8, device=device)
    return corner[torch.randint(0, 4, tuple(shape), device=device, generator=generator)]


def _shape_of(**tensors: Tensor) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in tensors.items()}


def pool_workload(
    layer: ConvLayer, batch: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Workload:
    size = layer.out_size
    x = _randn((batch, layer.out_channels, size, size), dtype, device, generator)
    pooled = (batch, layer.out_channels, layer.pooled_size, layer.pooled_size)
    values_bytes = math.prod(pooled) * dtype.itemsize
    switch_bytes = math.prod(pooled)  # uint8

    def stock(x: Tensor) -> tuple[Tensor, ...]:
        return F.max_pool2d(F.relu(x), POOL_KERNEL, POOL_STRIDE, ceil_mode=True, return_indices=True)

    def ours(x: Tensor) -> tuple[Tensor, ...]:
        return zfkernels.max_pool2d_switches(x, POOL_KERNEL, POOL_STRIDE, ceil_mode=True, relu=True)

    def comparable(outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        values, switches = outputs
        return values, zfkernels.switches_to_indices(switches, (size, size), POOL_KERNEL, POOL_STRIDE)

    return Workload(
        stock_inputs=(x,),
        our_inputs=(x,),
        stock=stock,
        ours=ours,
        differentiable=(0,),
        grad_output=_integer_grad(pooled, dtype, device, generator),
        shapes=_shape_of(input=x) | {"values": list(pooled)},
        forward_bytes=_nbytes(x) + values_bytes + switch_bytes,
        # grad of values, values (the fused ReLU's mask) and switches in, grad of the input out
        backward_bytes=2 * values_bytes + switch_bytes + _nbytes(x),
        comparable_ours=comparable,
    )


def unpool_workload(
    layer: ConvLayer, batch: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Workload:
    size = layer.out_size
    pooled = (batch, layer.out_channels, layer.pooled_size, layer.pooled_size)
    values = _randn(pooled, dtype, device, generator)
    switches = _unshared_switches(pooled, device, generator)
    indices = zfkernels.switches_to_indices(switches, (size, size), POOL_KERNEL, POOL_STRIDE)
    output_bytes = batch * layer.out_channels * size * size * dtype.itemsize

    def stock(values: Tensor, indices: Tensor) -> tuple[Tensor, ...]:
        return (F.relu(F.max_unpool2d(values, indices, POOL_KERNEL, POOL_STRIDE, output_size=(size, size))),)

    def ours(values: Tensor, switches: Tensor) -> tuple[Tensor, ...]:
        return (
            zfkernels.max_unpool2d(
                values, switches, POOL_KERNEL, POOL_STRIDE, output_size=(size, size), relu=True
            ),
        )

    return Workload(
        stock_inputs=(values, indices),
        our_inputs=(values, switches),
        stock=stock,
        ours=ours,
        differentiable=(0,),
        grad_output=_integer_grad((batch, layer.out_channels, size, size), dtype, device, generator),
        shapes=_shape_of(values=values) | {"output": [batch, layer.out_channels, size, size]},
        forward_bytes=_nbytes(values, switches) + output_bytes,
        # grad of the output and the output (ReLU's mask) in, gathered at the switches into grad of values
        backward_bytes=2 * output_bytes + _nbytes(switches, values),
    )


def relu_workload(
    layer: ConvLayer, batch: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Workload:
    x = _randn((batch, layer.out_channels, layer.out_size, layer.out_size), dtype, device, generator)

    def stock(x: Tensor) -> tuple[Tensor, ...]:
        return (F.relu(x),)

    def ours(x: Tensor) -> tuple[Tensor, ...]:
        return (zfkernels.relu(x),)

    return Workload(
        stock_inputs=(x,),
        our_inputs=(x,),
        stock=stock,
        ours=ours,
        differentiable=(0,),
        grad_output=_randn(x.shape, dtype, device, generator),
        shapes=_shape_of(input=x),
        forward_bytes=2 * _nbytes(x),
        backward_bytes=3 * _nbytes(x),  # grad and output in, grad out
    )


def _deconv_weight_and_geometry(
    layer: ConvLayer, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> tuple[Tensor, dict[str, int]]:
    """The layer's transposed-conv weight (scaled by its fan-in) and keyword geometry, output -> input."""
    fan_in = layer.out_channels * layer.kernel**2 // layer.stride**2
    weight = _randn(
        (layer.out_channels, layer.in_channels, layer.kernel, layer.kernel),
        dtype,
        device,
        generator,
        scale=fan_in**-0.5,
    )
    geometry = {
        "stride": layer.stride,
        "padding": layer.padding,
        "output_padding": layer.deconv_output_padding,
    }
    return weight, geometry


def conv_transpose_workload(
    layer: ConvLayer, batch: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Workload:
    """The deconvnet direction of the layer: its output maps back to its input's size."""
    x = _randn((batch, layer.out_channels, layer.out_size, layer.out_size), dtype, device, generator)
    weight, geometry = _deconv_weight_and_geometry(layer, dtype, device, generator)

    def stock(x: Tensor, weight: Tensor) -> tuple[Tensor, ...]:
        return (F.conv_transpose2d(x, weight, **geometry),)

    def ours(x: Tensor, weight: Tensor) -> tuple[Tensor, ...]:
        return (zfkernels.conv_transpose2d(x, weight, **geometry),)

    output = (batch, layer.in_channels, layer.in_size, layer.in_size)
    return Workload(
        stock_inputs=(x, weight),
        our_inputs=(x, weight),
        stock=stock,
        ours=ours,
        differentiable=(0, 1),
        grad_output=_randn(output, dtype, device, generator),
        shapes=_shape_of(input=x, weight=weight) | {"output": list(output)},
        forward_bytes=0,
        backward_bytes=0,
    )


def unpool_conv_transpose_workload(
    layer: ConvLayer, batch: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Workload:
    """A layer's deconvnet step, e.g. layer 2's: pooled 13x13 -> unpooled 26x26 -> ReLU -> 5x5/2
    transposed conv -> 55x55."""
    size = layer.out_size
    pooled = (batch, layer.out_channels, layer.pooled_size, layer.pooled_size)
    values = _randn(pooled, dtype, device, generator)
    switches = _unshared_switches(pooled, device, generator)
    indices = zfkernels.switches_to_indices(switches, (size, size), POOL_KERNEL, POOL_STRIDE)
    weight, geometry = _deconv_weight_and_geometry(layer, dtype, device, generator)

    def stock(values: Tensor, indices: Tensor, weight: Tensor) -> tuple[Tensor, ...]:
        unpooled = F.max_unpool2d(values, indices, POOL_KERNEL, POOL_STRIDE, output_size=(size, size))
        return (F.conv_transpose2d(F.relu(unpooled), weight, **geometry),)

    def ours(values: Tensor, switches: Tensor, weight: Tensor) -> tuple[Tensor, ...]:
        return (
            zfkernels.unpool_conv_transpose2d(
                values,
                switches,
                weight,
                pool_kernel_size=POOL_KERNEL,
                pool_stride=POOL_STRIDE,
                unpool_size=(size, size),
                relu=True,
                **geometry,
            ),
        )

    output = (batch, layer.in_channels, layer.in_size, layer.in_size)
    return Workload(
        stock_inputs=(values, indices, weight),
        our_inputs=(values, switches, weight),
        stock=stock,
        ours=ours,
        differentiable=(0, 2),
        grad_output=_randn(output, dtype, device, generator),
        shapes=_shape_of(values=values, weight=weight)
        | {"unpooled": [batch, layer.out_channels, size, size], "output": list(output)},
        forward_bytes=0,
        backward_bytes=0,
    )
