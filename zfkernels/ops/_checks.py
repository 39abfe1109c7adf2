"""Argument checks and geometry shared by the public ops: every error names the argument at fault."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SWITCH_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)  # int64: torch's flat indices

Pair = tuple[int, int]
INT32_MAX = 2**31 - 1  # torch's pooling and convolution take their geometry as int32, so do the kernels


def pair(value: int | Sequence[int], name: str, minimum: int) -> Pair:
    """An int or a sequence of one or two ints, each in [`minimum`, INT32_MAX], as a pair."""
    items = (
        [value]
        if isinstance(value, int)
        else list(value)
        if isinstance(value, (tuple, list, torch.Size))
        else None
    )
    if (
        items is None
        or len(items) not in (1, 2)
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in items)
    ):
        raise TypeError(f"{name} must be an int or a tuple of 2 ints, got {value!r}")
    if len(items) == 1:
        items = items * 2
    if any(v < minimum for v in items):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if any(v > INT32_MAX for v in items):
        raise ValueError(f"{name} must be at most 2**31 - 1 = {INT32_MAX}, got {value!r}")
    return items[0], items[1]


def pool_params(kernel_size, stride, padding, prefix: str = "") -> tuple[Pair, Pair, Pair]:
    """Checked (kernel, stride, padding) pairs; `prefix` names them in errors (e.g. "pool_")."""
    kernel = pair(kernel_size, f"{prefix}kernel_size", 1)
    stride_pair = (
        kernel
        if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0)
        else pair(stride, f"{prefix}stride", 1)
    )
    if kernel[0] * kernel[1] > INT32_MAX:  # switches are window-local offsets, int32 at the widest
        raise ValueError(
            f"{prefix}kernel_size {kernel_size!r} spans {kernel[0] * kernel[1]} elements; at most "
            f"2**31 - 1 = {INT32_MAX} are supported"
        )
    pad = pair(padding, f"{prefix}padding", 0)
    if pad[0] > kernel[0] // 2 or pad[1] > kernel[1] // 2:
        raise ValueError(
            f"{prefix}padding must be at most half of {prefix}kernel_size, "
            f"got {prefix}padding={padding!r}, {prefix}kernel_size={kernel_size!r}"
        )
    return kernel, stride_pair, pad


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape (dilation 1)."""
    out = (size + 2 * pad - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1  # the last window must start inside the input or its left padding
    return out


def pooled_shape(size: Sequence[int], kernel: Pair, stride: Pair, pad: Pair, ceil_mode: bool) -> Pair:
    """The (height, width) a pool gives an input of (height, width) `size`: pooled_size per dimension."""
    return (
        pooled_size(size[0], kernel[0], stride[0], pad[0], ceil_mode),
        pooled_size(size[1], kernel[1], stride[1], pad[1], ceil_mode),
    )


def pool_geometry_args(in_size: Pair, out_size: Pair, kernel: Pair, stride: Pair, pad: Pair):
    """A pool's geometry as the native modules take it: (in_h, in_w, out_h, out_w), (kernel, stride, pad)."""
    return (*in_size, *out_size), (*kernel, *stride, *pad)


def switch_dtype(kernel: Pair) -> torch.dtype:
    """The narrowest integer that holds every window-local offset."""
    window = kernel[0] * kernel[1]
    return torch.uint8 if window <= 256 else torch.int16 if window <= 32768 else torch.int32


def check_tensor(
    tensor, name: str, dims: tuple[int, ...] | None, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
) -> None:
    """`tensor` is a tensor with one of `dims` dimensions (None: any number) and one of `dtypes`."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dims is not None and tensor.dim() not in dims:
        wanted = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {wanted}, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {tensor.dtype}")


def check_nonempty_planes(tensor: torch.Tensor, name: str) -> None:
    """torch's pooling rule: only the batch dimension of an (N, C, H, W) or (C, H, W) tensor may be empty."""
    if any(size == 0 for size in tensor.shape[-3:]):
        raise ValueError(
            f"{name} must have non-zero channels, height and width (only a batch dimension may be empty), "
            f"got shape {tuple(tensor.shape)}"
        )


def check_nonempty_weight(weight: torch.Tensor) -> None:
    """torch's convolution rule: a weight with a zero-size dimension is refused."""
    if weight.numel() == 0:
        raise ValueError(f"weight must not have a zero-size dimension, got shape {tuple(weight.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def check_pool_fits(size: Pair, kernel: Pair, pad: Pair, name: str = "kernel_size") -> None:
    if size[0] + 2 * pad[0] < kernel[0] or size[1] + 2 * pad[1] < kernel[1]:
        raise ValueError(
            f"{name} {kernel} is larger than the padded input {size[0] + 2 * pad[0]}x{size[1] + 2 * pad[1]}"
        )


def check_no_invalid_switches(invalid: int, name: str = "switches") -> None:
    if invalid:
        raise ValueError(f"{name} has {invalid} entries outside their pooling window (or on padding)")
