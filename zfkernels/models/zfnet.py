"""ZFNet: the 8-layer network of Zeiler & Fergus (2013, arXiv 1311.2901, Fig. 3), built on zfkernels' ops."""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor

from .. import nn as znn
from ..ops._checks import pooled_size

# The paper's recipe, for reference (no trainer here): SGD, mini-batch 128, learning rate 1e-2 annealed
# by hand on plateaus, momentum 0.9, dropout 0.5 in fc6/fc7, weights ~ N(0, 1e-2) and biases 0, 224x224
# crops (corners + centre, with flips) of 256x256 images, 70 epochs, and after each update every conv
# filter whose RMS exceeds 0.1 renormalized to 0.1 (`zfkernels.filter_renormalizer`).
PAPER_INIT_STD = 1e-2
PAPER_DROPOUT = 0.5
# Contrast normalization "across feature maps" read as AlexNet's local response normalization; torch's
# LocalResponseNorm divides alpha by `size`, as Caffe (the paper's framework era) does.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0

POOL_KERNEL, POOL_STRIDE = 3, 2  # overlapping 3x3 stride-2 pools, ceil_mode as in Caffe
CONV_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_NAMES = ("fc6", "fc7", "fc8")
FC6_GRID = 6  # fc6 reads pool5 as 6x6x256 = 9216 features


def feature_sizes(height: int, width: int) -> dict[str, tuple[int, int]]:
    """(H, W) of every convolution and pool output for an input of ``height`` x ``width``.

    ``feature_sizes(224, 224)`` gives conv1 110, pool1 55, conv2 26, pool2 13, conv3-5 13, pool5 6. A
    size of 0 means the input is too small for that layer.
    """
    sizes: dict[str, tuple[int, int]] = {}

    def conv(size: tuple[int, int], kernel: int, stride: int, padding: int) -> tuple[int, int]:
        return tuple(max(0, (s + 2 * padding - kernel) // stride + 1) for s in size)

    def pool(size: tuple[int, int]) -> tuple[int, int]:
        if min(size) < POOL_KERNEL:  # the window would not fit: report 0 rather than a misleading size
            return (0, 0)
        return tuple(pooled_size(s, POOL_KERNEL, POOL_STRIDE, 0, True) for s in size)

    sizes["conv1"] = conv((height, width), 7, 2, 1)
    sizes["pool1"] = pool(sizes["conv1"])
    sizes["conv2"] = conv(sizes["pool1"], 5, 2, 0)
    sizes["pool2"] = pool(sizes["conv2"])
    sizes["conv3"] = sizes["conv4"] = sizes["conv5"] = conv(sizes["pool2"], 3, 1, 1)
    sizes["pool5"] = pool(sizes["conv5"])
    return sizes


# Input sides (per dimension) that pool5 reduces to fc6's 6x6; the paper's 224 lies inside.
VALID_INPUT_SIDES = range(
    min(s for s in range(1, 512) if feature_sizes(s, s)["pool5"][0] == FC6_GRID),
    max(s for s in range(1, 512) if feature_sizes(s, s)["pool5"][0] == FC6_GRID) + 1,
)


class RecordedPool(NamedTuple):
    """What one max-pool recorded in a forward pass: all a deconvnet needs to unpool there."""

    values: Tensor  # the pool's output (after its fused ReLU), (N, C, h, w)
    switches: Tensor  # uint8 window-local argmax offsets kh * 3 + kw, same shape as values
    input_size: tuple[int, int]  # (H, W) of the pooled map: max_unpool2d's output_size


def _contrast_normalization() -> torch.nn.LocalResponseNorm:
    return torch.nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)


def _relu_pool() -> znn.MaxPool2dSwitches:
    # ReLU fused into the switch-recording pool: one pass, and only the pooled map is kept for backward.
    return znn.MaxPool2dSwitches(POOL_KERNEL, POOL_STRIDE, ceil_mode=True, relu=True)


class ZFNet(torch.nn.Module):
    """Zeiler & Fergus's ImageNet network (their Fig. 3), with zfkernels' switch-recording pools.

    Layers, for a 224x224x3 input (named as here; ``dict(model.named_modules())["conv5"]`` works)::

        conv1  96 7x7 stride 2 pad 1  -> 110x110   pool1  ReLU + max 3x3/2 (ceil) -> 55   norm1
        conv2 256 5x5 stride 2        ->  26x26    pool2  ReLU + max 3x3/2 (ceil) -> 13   norm2
        conv3 384 3x3 pad 1 -> 13  relu3     conv4 384 3x3 pad 1 -> 13  relu4
        conv5 256 3x3 pad 1 -> 13          pool5  ReLU + max 3x3/2 (ceil) -> 6x6x256 = 9216
        fc6 4096  relu6  drop6 (0.5)       fc7 4096  relu7  drop7 (0.5)       fc8 num_classes

    62,357,608 parameters for 1000 classes. Each ReLU followed by a pool is fused into that pool
    (``zfkernels.nn.MaxPool2dSwitches(relu=True)``), which records uint8 switches instead of int64
    indices; the other ReLUs are ``zfkernels.nn.ReLU``. Convolutions and linears are stock torch.

    ``norm1``/``norm2`` are the paper's "contrast normalization across feature maps", read (as in
    AlexNet, which the paper follows) as ``nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2)``.
    ``normalization=False`` leaves them out (``model.norm1 is None``); every other name is unchanged.

    Initialization follows the paper: every weight ~ N(0, 1e-2), every bias 0. The paper trained with
    SGD (batch 128, learning rate 1e-2 annealed on plateaus, momentum 0.9) and renormalized conv filters
    after each step: ``optimizer.register_step_post_hook(zfkernels.filter_renormalizer(model))``.

    Input: (N, 3, H, W) with each of H, W in 207..238 (224 in the paper): any size at which pool5 gives
    6x6, since fc6 takes exactly 6x6x256 features. ``forward`` returns logits (N, num_classes).

    Switches for a deconvnet: ``forward_with_switches(input)`` returns ``(logits, records)`` with a
    :class:`RecordedPool` per pool name; or set ``model.record_switches = True`` and every ``forward``
    stores the last pass's records in ``model.recorded_switches`` (this keeps the pooled maps, and
    their autograd graph, alive until the next forward). The default forward has no side effects, so
    ``torch.compile(model, fullgraph=True)`` works.

    ``to_stock()`` gives the same network in stock torch layers (state dicts interchange).
    """

    def __init__(self, num_classes: int = 1000, normalization: bool = True):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool):
            raise TypeError(f"num_classes must be a positive int, got {num_classes!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(normalization, bool):
            raise TypeError(f"normalization must be a bool, got {normalization!r}")
        self.num_classes, self.normalization = num_classes, normalization
        self.conv1 = torch.nn.Conv2d(3, 96, 7, stride=2, padding=1)
        self.pool1 = _relu_pool()
        self.register_module("norm1", _contrast_normalization() if normalization else None)
        self.conv2 = torch.nn.Conv2d(96, 256, 5, stride=2)
        self.pool2 = _relu_pool()
        self.register_module("norm2", _contrast_normalization() if normalization else None)
        self.conv3 = torch.nn.Conv2d(256, 384, 3, padding=1)
        self.relu3 = znn.ReLU()
        self.conv4 = torch.nn.Conv2d(384, 384, 3, padding=1)
        self.relu4 = znn.ReLU()
        self.conv5 = torch.nn.Conv2d(384, 256, 3, padding=1)
        self.pool5 = _relu_pool()
        self.fc6 = torch.nn.Linear(256 * FC6_GRID * FC6_GRID, 4096)
        self.relu6 = znn.ReLU()
        self.drop6 = torch.nn.Dropout(PAPER_DROPOUT)
        self.fc7 = torch.nn.Linear(4096, 4096)
        self.relu7 = znn.ReLU()
        self.drop7 = torch.nn.Dropout(PAPER_DROPOUT)
        self.fc8 = torch.nn.Linear(4096, num_classes)
        self.record_switches = False
        self.recorded_switches: dict[str, RecordedPool] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialization: weights ~ N(0, 1e-2), biases 0 (uses torch's global RNG)."""
        for name in (*CONV_NAMES, *FC_NAMES):
            layer = getattr(self, name)
            torch.nn.init.normal_(layer.weight, mean=0.0, std=PAPER_INIT_STD)
            torch.nn.init.zeros_(layer.bias)

    def _check_input(self, input: object) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        expected = (
            f"(N, 3, H, W) with H and W in {VALID_INPUT_SIDES.start}..{VALID_INPUT_SIDES.stop - 1} "
            f"(3x224x224 in the paper; fc6 needs pool5 to be {FC6_GRID}x{FC6_GRID}x256)"
        )
        if input.dim() != 4:
            hint = "; for one image use input.unsqueeze(0)" if input.dim() == 3 else ""
            raise ValueError(f"input must be {expected}, got shape {tuple(input.shape)}{hint}")
        if input.shape[1] != 3:
            raise ValueError(f"input must be {expected}: 3 channels, got shape {tuple(input.shape)}")
        pool5 = feature_sizes(input.shape[-2], input.shape[-1])["pool5"]
        if pool5 != (FC6_GRID, FC6_GRID):
            raise ValueError(
                f"input must be {expected}, got shape {tuple(input.shape)}, for which pool5 is "
                f"{pool5[0]}x{pool5[1]}"
            )
        weight_dtype = self.conv1.weight.dtype
        if input.dtype != weight_dtype:
            raise TypeError(f"input must have the model's dtype {weight_dtype}, got {input.dtype}")

    def _pool(self, name: str, x: Tensor, records: dict[str, RecordedPool] | None) -> Tensor:
        values, switches = getattr(self, name)(x)
        if records is not None:
            records[name] = RecordedPool(values, switches, (x.shape[-2], x.shape[-1]))
        return values

    def _forward(self, input: Tensor, records: dict[str, RecordedPool] | None) -> Tensor:
        # fx symbolic tracing (a deconvnet reading the layer graph) sees proxies, which have no shape.
        if not torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            self._check_input(input)
        x = self._pool("pool1", self.conv1(input), records)
        if self.norm1 is not None:
            x = self.norm1(x)
        x = self._pool("pool2", self.conv2(x), records)
        if self.norm2 is not None:
            x = self.norm2(x)
        x = self.relu3(self.conv3(x))
        x = self.relu4(self.conv4(x))
        x = self._pool("pool5", self.conv5(x), records)
        x = self.drop6(self.relu6(self.fc6(torch.flatten(x, 1))))
        x = self.drop7(self.relu7(self.fc7(x)))
        return self.fc8(x)

    def forward(self, input: Tensor) -> Tensor:
        """Logits (N, num_classes); also fills ``recorded_switches`` when ``record_switches`` is set."""
        if not self.record_switches:
            return self._forward(input, None)
        records: dict[str, RecordedPool] = {}
        logits = self._forward(input, records)
        self.recorded_switches = records
        return logits

    def forward_with_switches(self, input: Tensor) -> tuple[Tensor, dict[str, RecordedPool]]:
        """``(logits, {"pool1": RecordedPool, "pool2": ..., "pool5": ...})``, without side effects."""
        records: dict[str, RecordedPool] = {}
        return self._forward(input, records), records

    def to_stock(self) -> torch.nn.Sequential:
        """A copy of this network in stock torch layers, with the same weights and training mode.

        ``nn.ReLU`` + ``nn.MaxPool2d(3, 2, ceil_mode=True)`` stand for each fused pool (as relu1/pool1,
        relu2/pool2, relu5/pool5), ``nn.ReLU`` for the others, and an ``nn.Flatten`` named "flatten" sits
        before fc6. Parameter names are the same, so ``load_state_dict`` works in both directions. Tools
        that hook ``nn.ReLU`` modules (captum's deconvolution and guided backprop) need this form.
        """
        layers: OrderedDict[str, torch.nn.Module] = OrderedDict()
        blocks = ((1, True, True), (2, True, True), (3, False, False), (4, False, False), (5, True, False))
        for n, pooled, normalized in blocks:
            layers[f"conv{n}"] = _copy_layer(getattr(self, f"conv{n}"))
            layers[f"relu{n}"] = torch.nn.ReLU()
            if pooled:
                layers[f"pool{n}"] = torch.nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE, ceil_mode=True)
            if normalized and self.normalization:
                layers[f"norm{n}"] = _contrast_normalization()
        layers["flatten"] = torch.nn.Flatten(1)
        for n in (6, 7):
            layers[f"fc{n}"] = _copy_layer(getattr(self, f"fc{n}"))
            layers[f"relu{n}"] = torch.nn.ReLU()
            layers[f"drop{n}"] = torch.nn.Dropout(PAPER_DROPOUT)
        layers["fc8"] = _copy_layer(self.fc8)
        return torch.nn.Sequential(layers).train(self.training)


def _copy_layer(layer: torch.nn.Module) -> torch.nn.Module:
    """A stock ``nn.Conv2d``/``nn.Linear`` with the same hyperparameters and a copy of the weights."""
    if isinstance(layer, torch.nn.Conv2d):
        copy = torch.nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            device="meta",
        )
    else:
        copy = torch.nn.Linear(layer.in_features, layer.out_features, device="meta")
    # Built on the meta device so no throwaway initialization runs; assign takes the copied tensors.
    copy.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    return copy
