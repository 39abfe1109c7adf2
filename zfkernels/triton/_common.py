"""Pieces shared by the triton backend's kernels: @triton.jit helpers and launch helpers.

jit helpers (callable from any @triton.jit kernel; geometry arguments may be constexpr or runtime ints):
  switch_target        where a switch points (flat position in its plane) and whether it is valid there
  first_window / last_window   the pooling windows that cover an input row (or column)
  pooled_coordinates   (plane, oh, ow) of flat offsets into a pooled map
  count_invalid        add a block's invalid switches to a counter (an atomic only when there are some)
  widen, narrow        storage dtype <-> compute type (float32 for half types), exact / rounded once
  bf16_to_float, float_to_bf16   exact bf16 <-> float32 on bits (c10's rounding)

bf16 is computed on through its bits (widen/narrow): the interpreter keeps bf16 as raw uint16 in numpy,
so plain bf16 compares are wrong there (loads and stores that only move values are exact), and its
float32 -> bf16 cast does not round to nearest even; bit arithmetic is exact in both modes. fp16 needs no
such care: numpy's float16 compares and float32 -> float16 rounding are exact, as on the GPU.

Interpreter mode is decided the way triton decides it: TRITON_INTERPRET=1 in the environment when the
jit functions are created (at import of this package). Interpreted, the kernels run on CPU tensors;
compiled, on CUDA tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from ..ops._checks import check_no_invalid_switches


@triton.jit
def _probe():
    pass


# triton.jit returns an InterpretedFunction instead of a JITFunction when TRITON_INTERPRET=1 at import.
INTERPRET: bool = not isinstance(_probe, JITFunction)
DEVICE_TYPE: str = "cpu" if INTERPRET else "cuda"
INT32_LIMIT = 2**31 - 1
BLOCK_MARGIN = 2**16  # no kernel block covers more elements than this

# ------------------------------------------------------------------------------------------ jit helpers


@triton.jit
def program_offsets(INT64: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK flat offsets of a 1-D blocked launch (int64 only when the tensors need it)."""
    if INT64:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    else:
        start = tl.program_id(0) * BLOCK
    return start + tl.arange(0, BLOCK)


@triton.jit
def pooled_coordinates(offsets, pooled_h, pooled_w):
    """(plane, oh, ow) of flat offsets into an (N, C, pooled_h, pooled_w) map (oh, ow in int32)."""
    pooled_plane = pooled_h * pooled_w
    plane = offsets // pooled_plane
    position = (offsets - plane * pooled_plane).to(tl.int32)
    oh = position // pooled_w
    return plane, oh, position - oh * pooled_w


@triton.jit
def count_invalid(counter_ptr, mask, valid):
    """Add the number of lanes in `mask` whose switch is not `valid` to the counter: an integer atomic, and
    only when there are some (so the common, all-valid case costs no atomic at all)."""
    invalid = tl.sum((mask & ~valid).to(tl.int32))
    tl.atomic_add(counter_ptr, invalid.to(counter_ptr.dtype.element_ty), mask=invalid > 0)


@triton.jit
def switch_target(
    switch, oh, ow, in_h, in_w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, FLAT: tl.constexpr
):
    """(target, valid): the flat in-plane position (int32, 0 where invalid) a switch of window (oh, ow) points
    to, and whether it lies inside its window and the input. FLAT: int64 flat indices (torch's), else
    window-local offsets kh * kernel_w + kw from the unclipped window origin (csrc/kernels/common.h)."""
    h0 = oh * stride_h - pad_h
    w0 = ow * stride_w - pad_w
    if FLAT:
        index = switch.to(tl.int64)
        valid = (index >= 0) & (index < in_h * in_w)
        safe = tl.where(valid, index, 0).to(tl.int32)  # in range now: int32 math from here on
        ih = safe // in_w
        iw = safe - ih * in_w
        dh = ih - h0
        dw = iw - w0
        valid = valid & (dh >= 0) & (dh < kernel_h) & (dw >= 0) & (dw < kernel_w)
    else:
        local = switch.to(tl.int32)  # uint8 zero-extends, int16 sign-extends (negatives are invalid)
        valid = (local >= 0) & (local < kernel_h * kernel_w)
        safe = tl.where(valid, local, 0)
        dh = safe // kernel_w
        ih = h0 + dh
        iw = w0 + (safe - dh * kernel_w)
        valid = valid & (ih >= 0) & (ih < in_h) & (iw >= 0) & (iw < in_w)
    target = tl.where(valid, ih * in_w + iw, 0)
    return target, valid


@triton.jit
def first_window(i, kernel, stride, pad):
    """The first pooling window (row or column index) whose span covers input coordinate i (may be past the
    last window: callers bound it by the pooled size)."""
    reach = i + pad - kernel + 1  # windows oh with oh * stride >= reach cover i (ceil division, from 0)
    return (tl.maximum(reach, 0) + stride - 1) // stride


@triton.jit
def last_window(i, stride, pad):
    """The last pooling window whose span covers input coordinate i (before bounding by the pooled size)."""
    return (i + pad) // stride


@triton.jit
def widen(x):
    """A loaded value in its compute type, exactly: bf16 and fp16 -> float32, float32/float64 unchanged."""
    if x.dtype == tl.bfloat16:
        return bf16_to_float(x.to(tl.int16, bitcast=True))
    elif x.dtype == tl.float16:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def narrow(x, DTYPE: tl.constexpr):
    """A compute-type value rounded once (nearest even) to the storage dtype DTYPE."""
    if DTYPE == tl.bfloat16:
        return float_to_bf16(x).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def bf16_to_float(bits):
    """bf16 bits (int16 or uint16) -> float32, exactly."""
    return (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def float_to_bf16(x):
    """float32 -> bf16 bits (int16), round to nearest even; NaN -> 0x7FC0 (c10::BFloat16's rule)."""
    u = tl.where(x != x, 0x7FC00000, x.to(tl.uint32, bitcast=True))  # NaN first: the sum cannot wrap
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)


# --------------------------------------------------------------------------------------- launch helpers


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether some flat offset into these tensors can exceed int32 (then kernels index in int64): the last
    program's block reaches up to a block (at most BLOCK_MARGIN elements) past the end."""
    return any(t.numel() > INT32_LIMIT - BLOCK_MARGIN for t in tensors)


def check_plane_fits_int32(height: int, width: int) -> None:
    """Kernels address within a plane in int32; a plane of 2**31 elements or more is refused."""
    if height * width > INT32_LIMIT:
        raise ValueError(f"triton backend: a {height}x{width} plane exceeds int32 indexing")


def check_window_fits_int32(
    kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> None:
    """Kernels compute window offsets (kh * kernel_w + kw, below the window's size) and origins in int32: a
    larger pooling window is refused by name instead of overflowing."""
    if kernel[0] * kernel[1] > INT32_LIMIT or max(*stride, *padding) > INT32_LIMIT:
        raise ValueError(
            f"triton backend: a {kernel[0]}x{kernel[1]} pooling window (kernel_size, stride {stride}, "
            f"padding {padding}) exceeds int32 indexing"
        )


def is_tracing(tensor: torch.Tensor) -> bool:
    """True for fake/functional tensors or inside torch.compile: no data exists to look at (no .item())."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(tensor) or tensor.device.type == "meta"


def switch_counter(device: torch.device, most: int) -> torch.Tensor:
    """A zero the kernels add switch counts to with integer atomics: int32, or int64 past `most` >= 2**31."""
    return torch.zeros(1, dtype=torch.int32 if most <= INT32_LIMIT else torch.int64, device=device)


def raise_if_invalid(counter: torch.Tensor) -> None:
    """Raise ValueError when the kernels counted invalid switches; no host sync while tracing."""
    if not is_tracing(counter):
        check_no_invalid_switches(int(counter.item()))


def check_device(tensor: torch.Tensor) -> None:
    """The interpreter runs CPU tensors, compiled kernels CUDA tensors: anything else is refused clearly."""
    if tensor.device.type != DEVICE_TYPE and tensor.device.type != "meta":
        mode = "under TRITON_INTERPRET=1" if INTERPRET else "compiled (TRITON_INTERPRET unset at import)"
        raise ValueError(
            f"the triton backend {mode} runs {DEVICE_TYPE} tensors, got a tensor on {tensor.device}"
        )


def backend_op(name: str, mutates_args: Iterable[str] | str) -> Callable:
    """Decorator making `zfkernels_triton::<name>` a torch.library.triton_op (torch.compile traces into its
    kernels). Interpreted, it is a plain custom_op instead: make_fx cannot trace an interpreted launch (it is
    Python over numpy), so the op stays opaque and gets its fake from `register_interpreted_fake`."""
    qualified = f"zfkernels_triton::{name}"
    if INTERPRET:
        return torch.library.custom_op(qualified, mutates_args=mutates_args)
    return torch.library.triton_op(qualified, mutates_args=mutates_args)


def register_interpreted_fake(op, fake: Callable) -> None:
    """triton_op derives its fake from its (traceable) body; the interpreter's custom_op needs this one."""
    if INTERPRET:
        op.register_fake(fake)


def launch(kernel):
    """The kernel as a triton_op body launches it: through wrap_triton (a no-op for interpreted kernels)."""
    return torch.library.wrap_triton(kernel)
