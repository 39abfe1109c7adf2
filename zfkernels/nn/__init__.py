"""Drop-in modules over zfkernels.ops."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import ops
from ..ops._checks import FLOAT_DTYPES
from ..ops.reference import RULES


class MaxPool2dSwitches(torch.nn.Module):
    """``nn.MaxPool2d`` that returns ``(values, switches)``; ``relu=True`` fuses a preceding ReLU."""

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        ceil_mode: bool = False,
        *,
        relu: bool = False,
    ):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.relu = ceil_mode, relu

    def forward(self, input: Tensor) -> tuple[Tensor, Tensor]:
        return ops.max_pool2d_switches(
            input, self.kernel_size, self.stride, self.padding, self.ceil_mode, relu=self.relu
        )

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"ceil_mode={self.ceil_mode}, relu={self.relu}"
        )


class MaxUnpool2d(torch.nn.Module):
    """Unpool with switches, summing shared argmaxes; ``relu=True`` fuses the following ReLU."""

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        *,
        relu: bool = False,
    ):
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.relu = kernel_size, stride, padding, relu

    def forward(self, values: Tensor, switches: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        return ops.max_unpool2d(
            values, switches, self.kernel_size, self.stride, self.padding, output_size, relu=self.relu
        )

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, relu={self.relu}"
        )


class ReLU(torch.nn.Module):
    """``nn.ReLU`` with a gradient rule: "standard", "deconvnet" or "guided".

    Inputs zfkernels.relu does not take (integer, bool or complex dtypes) run
    ``torch.relu`` as ``nn.ReLU`` does: the same result, or the same error (none of them has a gradient for
    a rule to change).
    """

    def __init__(self, inplace: bool = False, *, backward: str = "standard"):
        super().__init__()
        if backward not in RULES:
            raise ValueError(f"backward must be one of {list(RULES)}, got {backward!r}")
        self.inplace, self.backward = inplace, backward

    def forward(self, input: Tensor) -> Tensor:
        if not _relu_takes(input):
            return torch.nn.functional.relu(input, inplace=self.inplace)
        return ops.relu(input, self.inplace, backward=self.backward)

    def extra_repr(self) -> str:
        return f"inplace={self.inplace}, backward={self.backward!r}"


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (same parameters and state dict) running zfkernels' transposed convolution.

    Calls zfkernels.conv_transpose2d does not take (a complex or integer input, an input whose dtype is not
    the weight's, a padding_mode other than "zeros", an input neither 3-D nor 4-D) run
    ``nn.ConvTranspose2d``'s own forward: the same result, or the same error. Results agree with it to
    floating-point rounding (see ``zfkernels.patch``).
    """

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if not self._zfkernels_takes(input):
            return super().forward(input, output_size)
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return ops.conv_transpose2d(
            input,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )

    def _zfkernels_takes(self, input: object) -> bool:
        parameters = [p for p in (self.weight, self.bias) if p is not None]
        return (
            self.padding_mode == "zeros"
            and isinstance(input, Tensor)
            and input.dim() in (3, 4)
            and input.dtype in FLOAT_DTYPES
            and all(p.dtype == input.dtype and p.device == input.device for p in parameters)
        )


def _relu_takes(input: object) -> bool:
    """Whether ``zfkernels.relu`` takes ``input`` (a float tensor)."""
    return isinstance(input, Tensor) and input.dtype in FLOAT_DTYPES


__all__ = ["ConvTranspose2d", "MaxPool2dSwitches", "MaxUnpool2d", "ReLU"]
