"""The reference backend: pure PyTorch, the test oracle and the fallback on any device.

Every backend module implements these functions with these exact semantics, on 4-D NCHW inputs whose
arguments zfkernels.ops has already checked. Pool, unpool and ReLU must match this bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import Pair, check_no_invalid_switches

RULES = ("standard", "deconvnet", "guided")


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def switch_targets(switches: torch.Tensor, in_size: Pair, kernel: Pair, stride: Pair, padding: Pair):
    """Flat input index each switch points to, and whether it lies inside its window and the input."""
    out_h, out_w = switches.shape[-2:]
    device = switches.device
    oh = torch.arange(out_h, device=device).view(-1, 1)
    ow = torch.arange(out_w, device=device).view(1, -1)
    if switches.dtype == torch.int64:  # torch's flat indices: valid only inside their own window
        flat = switches
        ih, iw = flat.div(in_size[1], rounding_mode="floor"), flat.remainder(in_size[1])
        dh, dw = ih - (oh * stride[0] - padding[0]), iw - (ow * stride[1] - padding[1])
        valid = (flat >= 0) & (flat < in_size[0] * in_size[1]) & (dh >= 0) & (dh < kernel[0]) & (dw >= 0)
        valid &= dw < kernel[1]
        return flat, valid
    local = switches.to(torch.int64)
    ih = oh * stride[0] - padding[0] + local.div(kernel[1], rounding_mode="floor")
    iw = ow * stride[1] - padding[1] + local.remainder(kernel[1])
    valid = (local >= 0) & (local < kernel[0] * kernel[1]) & (ih >= 0) & (ih < in_size[0]) & (iw >= 0)
    valid &= iw < in_size[1]
    return ih * in_size[1] + iw, valid


def _checked_targets(switches, in_size, kernel, stride, padding) -> torch.Tensor:
    flat, valid = switch_targets(switches, in_size, kernel, stride, padding)
    check_no_invalid_switches(int((~valid).sum()))
    return flat


def max_pool2d_switches(
    input, kernel: Pair, stride: Pair, padding: Pair, ceil_mode: bool, relu: bool, switch_dtype
):
    source = torch.relu(input) if relu else input
    values, indices = F.max_pool2d(source, kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True)
    out_h, out_w = values.shape[-2:]
    width = input.shape[-1]
    oh = torch.arange(out_h, device=input.device).view(-1, 1)
    ow = torch.arange(out_w, device=input.device).view(1, -1)
    kh = indices.div(width, rounding_mode="floor") - (oh * stride[0] - padding[0])
    kw = indices.remainder(width) - (ow * stride[1] - padding[1])
    return values.contiguous(), (kh * kernel[1] + kw).to(switch_dtype).contiguous()


def max_unpool2d(values, switches, kernel: Pair, stride: Pair, padding: Pair, output_size: Pair, relu: bool):
    flat = _checked_targets(switches, output_size, kernel, stride, padding)
    n, c = values.shape[:2]
    acc = torch.zeros(
        n, c, output_size[0] * output_size[1], dtype=_accumulate_dtype(values.dtype), device=values.device
    )
    # scatter_add_ adds in row-major order of the pooled map, the order every backend sums in.
    acc.scatter_add_(2, flat.flatten(2), values.flatten(2).to(acc.dtype))
    if relu:
        acc = torch.relu(acc)
    return acc.to(values.dtype).view(n, c, *output_size)


def max_pool2d_switches_backward(
    grad, values, switches, kernel: Pair, stride: Pair, padding: Pair, input_size: Pair, relu: bool
):
    """The gradient of max_pool2d_switches: the pooled gradient unpooled, gated first by the fused ReLU."""
    if relu:
        grad = relu_backward(grad, values, 0)
    return max_unpool2d(grad, switches, kernel, stride, padding, input_size, False)


def gather_switches(source, switches, kernel: Pair, stride: Pair, padding: Pair):
    flat = _checked_targets(switches, tuple(source.shape[-2:]), kernel, stride, padding)
    return source.flatten(2).gather(2, flat.flatten(2)).view(switches.shape)


def relu(input):
    return torch.relu(input).contiguous()  # every backend returns contiguous outputs (the fake does too)


def relu_(input):
    return input.relu_()


def relu_backward(grad, output, rule: int):
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    if RULES[rule] == "deconvnet":
        return torch.where(grad < 0, zero, grad).contiguous()
    passed = torch.where(
        output <= 0, zero, grad
    )  # threshold_backward: a NaN output lets the gradient through
    return (passed if RULES[rule] == "standard" else torch.where(passed < 0, zero, passed)).contiguous()


def conv_transpose2d(
    input, weight, bias, stride: Pair, padding: Pair, output_padding: Pair, groups: int, dilation: Pair
):
    if input.device.type == "cpu" and input.dtype != torch.float64 and not bool(torch.isfinite(weight).all()):
        # Below float64 torch's CPU path is oneDNN, which in some geometries multiplies padding by a NaN/inf
        # weight; float64 forms only the real input x weight products, the semantics every backend keeps.
        wide = (t.double() if t is not None else None for t in (input, weight, bias))
        out = F.conv_transpose2d(*wide, stride, padding, output_padding, groups, dilation)
        return out.to(input.dtype).contiguous()
    return F.conv_transpose2d(
        input, weight, bias, stride, padding, output_padding, groups, dilation
    ).contiguous()


def unpool_conv_transpose2d(
    values,
    switches,
    weight,
    pool_kernel: Pair,
    pool_stride: Pair,
    pool_padding: Pair,
    unpool_size: Pair,
    stride: Pair,
    padding: Pair,
    output_padding: Pair,
    relu: bool,
):
    unpooled = max_unpool2d(values, switches, pool_kernel, pool_stride, pool_padding, unpool_size, relu)
    return conv_transpose2d(unpooled, weight, None, stride, padding, output_padding, 1, (1, 1))


def renormalize_filters_(weight, radius: float):
    """Rescale, in place, every filter (slice along dim 0) whose RMS exceeds `radius` to RMS `radius`.

    As the C++ kernel: sum of squares in float64 whatever the storage type (the decision "RMS > radius"
    must not hinge on summation order), scale = radius / RMS in float64, applied in the compute type
    (float32 for half types, else the dtype) and rounded once. Filters within the radius keep their bits.
    """
    filters = weight.shape[0]
    if filters == 0 or weight.numel() == 0:
        return weight
    per_filter = (filters, *([1] * (weight.dim() - 1)))  # broadcasts a per-filter value over its elements
    rms = weight.to(torch.float64).reshape(filters, -1).square().mean(dim=1).sqrt()
    scale = torch.where(rms > radius, radius / rms, torch.ones_like(rms))  # NaN RMS compares false: kept
    compute = _accumulate_dtype(weight.dtype)
    scaled = (weight.to(compute) * scale.to(compute).view(per_filter)).to(weight.dtype)
    # Filters with scale 1 (as in the kernel, also an RMS barely above radius) are not rewritten at all.
    weight.copy_(torch.where((scale != 1.0).view(per_filter), scaled, weight))
    return weight
