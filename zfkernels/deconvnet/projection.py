"""``DeconvNet(model).project(images, layer)``: single activations projected to pixel space (Zeiler & Fergus).

For every image and every chosen filter of ``layer``, the strongest activation (or the ``top`` strongest)
is kept alone, at its value, and sent down the paper's chain: unpool with the switches recorded on the way
up (summing where overlapping windows share an argmax), ReLU, transposed conv with the same weights and no
bias; eval-mode batch-norm goes down as its transpose (a per-channel scale), local response normalization
is skipped as in the paper, dropout and identity layers change nothing. The result equals the activation's
value times its gradient w.r.t. the input with every ReLU's backward replaced by ReLU of the gradient
(captum's ``NeuronDeconvolution`` times the value), except that LRN's backward is taken as the identity
(see :meth:`DeconvNet.project`). Layers whose path from the input is not such a chain (residual adds,
concatenations, average pools...) take the gradient path (``gradient.py``): the same quantity by autograd
through the model patched in ``deconvnet_mode``. :meth:`DeconvNet.forward` and
:meth:`ForwardPass.project_entries` project chosen activations of several layers after one forward.

Why it is fast: a single activation's signal is nonzero only inside its receptive field, so every step runs
on a fixed-size window around it instead of the whole map, for all ``B * F * top`` projections at once:

- The top of the chain is the activation alone: it rides through ReLUs and unpools as one number at one
  position (an unpool just moves it to its switch), and the first transposed conv is that number times
  one filter's weights. No map is ever built for it.
- Each later step takes the window (same size for every projection, each at its own origin), zeroes what
  lies outside the map (the full computation would never see it), gathers the pool's switches of that
  window from the projection's own image, and runs ``zfkernels.unpool_conv_transpose2d`` on the batch
  with ``pool_padding=0``: a window of ``h`` rows from row ``y0`` maps to ``(h - 1) * s + k`` rows from row
  ``y0 * s - p``, which hold the full result restricted there.
- Between the first transposed conv and the first unpool nothing depends on the image (no switches yet):
  those steps run once per distinct (filter, border clipping) on a unit activation and are scaled by each
  projection's value (ReLU commutes with a positive scale). Projections run filter-major, so a chunk holds
  one filter for many images and shares that work.
- Windows are pasted into image-sized outputs at the end; projections run in chunks so the intermediate
  memory stays bounded whatever B, F and top are.
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .. import memory, ops
from .._extension import DTYPE_CODES, all_finite, cpu_module, output_empty
from .chain import (
    BatchNorm,
    Chain,
    ChainForward,
    Conv,
    LayerChains,
    MaxPool,
    ReLU,
    check_against_model,
    forward_chains,
)
from .gradient import WholeImage, deconvnet_gradients, gradient_forward, graph_fields, whole_image_field
from .receptive_field import ReceptiveField, window_below

Pair = tuple[int, int]

__all__ = ["PATHS", "DeconvNet", "EntryProjection", "ForwardPass", "Projection"]

PATHS = ("deconvnet", "gradient")  # how a layer is projected: the cropped chain, or autograd

DEFAULT_CHUNK_BYTES = 256 << 20  # intermediate memory per chunk of projections (the output is extra)


# ------------------------------------------------------------------------------------------------ result
@dataclass(frozen=True)
class Projection:
    """Projections of single activations to pixel space, for B images x F filters x ``top`` activations.

    ``pixels``: (B, F, k, C, H, W), each projection in image coordinates, zero outside its receptive field.
    ``values``: (B, F, k), the activations, strongest first (a value <= 0 projects to zeros).
    ``positions``: (B, F, k, 2) int64, (row, col) of each activation in ``layer``'s output.
    ``boxes``: (B, F, k, 4) int64, the image pixels each activation depends on as a half-open box
    ``(top, left, bottom, right)``: its receptive field clipped to the image (and, at the borders, to every
    map on the way down, so exactly the gradient's support). ``image[:, top:bottom, left:right]`` is the
    patch the activation sees (the paper's Fig. 2 shows these patches next to the projections); nothing
    of its projection lies outside.
    ``filters``: the filter (channel) index of each F entry. ``receptive_field``: the layer's unclipped
    receptive field (its ``size`` is the side of the windows :meth:`crops` and :meth:`patches` return; for a
    layer that sees the whole image, the image's size with ``jump`` (0, 0)). ``path``: how the layer was
    projected, ``"deconvnet"`` (the cropped chain) or ``"gradient"`` (autograd through the patched model;
    there ``boxes`` are the receptive field clipped to the image, which contains the support).
    """

    pixels: Tensor
    values: Tensor
    positions: Tensor
    boxes: Tensor
    layer: str
    filters: list[int]
    receptive_field: ReceptiveField
    path: str = "deconvnet"

    def windows(self) -> Tensor:
        """Unclipped receptive-field windows ``(top, left, bottom, right)``, (B, F, k, 4) int64."""
        return self.receptive_field.boxes(self.positions)

    def crops(self, *, fill: float = 0.0) -> Tensor:
        """Each projection cut to its activation's receptive field: (B, F, k, C, rf_h, rf_w).

        Every crop has the receptive field's full size; where the field leaves the image the crop holds
        ``fill``. For crops clipped to the image instead, slice ``pixels`` with ``boxes``.
        """
        b, f, k, c, h, w = self.pixels.shape
        crops = _cut(self.pixels.view(-1, c, h, w), list(range(b * f * k)), self.windows(), fill)
        return crops.view(b, f, k, c, *self.receptive_field.size)

    def patches(self, images: Tensor, *, fill: float = 0.0) -> Tensor:
        """The image patch each activation sees: (B, F, k, C, rf_h, rf_w), ``fill`` outside the image.

        ``images`` are the (B, C, H, W) images that were projected. Aligned pixel for pixel with
        :meth:`crops`, so patch and projection can be shown side by side as in the paper's Fig. 2.
        """
        b, f, k, c, h, w = self.pixels.shape
        if not isinstance(images, Tensor) or tuple(images.shape) != (b, c, h, w):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be the projected images, shape {(b, c, h, w)}, got {got}")
        sources = [i // (f * k) for i in range(b * f * k)]
        return _cut(images, sources, self.windows(), fill).view(b, f, k, c, *self.receptive_field.size)


def _cut(source: Tensor, sources: list[int], windows: Tensor, fill: float) -> Tensor:
    """Window ``i`` of ``source[sources[i]]`` (``(C, H, W)`` maps), ``fill`` where it leaves the map."""
    c, h, w = source.shape[-3:]
    boxes = windows.reshape(-1, 4).tolist()
    size = (boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1]) if boxes else (0, 0)
    out = source.new_full((len(boxes), c, *size), fill)
    for i, (top, left, bottom, right) in enumerate(boxes):
        t, lo, b, r = max(top, 0), max(left, 0), min(bottom, h), min(right, w)
        if t < b and lo < r:
            out[i, :, t - top : b - top, lo - left : r - left] = source[sources[i], :, t:b, lo:r]
    return out


@dataclass(frozen=True)
class EntryProjection:
    """Projections of chosen activations of one layer, each cut to a window of the layer's receptive field.

    ``entries``: (n, 4) int64, ``(image, filter, row, col)``: the image's index in the batch, the filter
    (channel) and the activation's position in ``layer``'s output.
    ``values``: (n,), the activations (a value <= 0 projects to zeros).
    ``windows``: (n, C, rf_h, rf_w), each projection (value x deconvnet gradient) in the window of the
    layer's unclipped receptive field at that activation; zero where the window leaves the image. Equal to
    ``Projection.crops()`` of :meth:`DeconvNet.project` for the same activation (how exactly:
    :meth:`ForwardPass.project_entries`).
    ``origins``: (n, 2) int64, each window's top-left ``(row, col)`` in image coordinates (negative where
    the field starts above or left of the image): window pixel ``(y, x)`` is image pixel
    ``(origin_row + y, origin_col + x)``.
    ``boxes``: (n, 4) int64, ``(top, left, bottom, right)`` half-open in image coordinates: the window
    clipped to the image (deconvnet path: also to every map on the way down, exactly the support).
    ``receptive_field``: the layer's (its ``size`` is the window's); ``path``: "deconvnet" or "gradient".
    """

    entries: Tensor
    values: Tensor
    windows: Tensor
    origins: Tensor
    boxes: Tensor
    layer: str
    path: str
    receptive_field: ReceptiveField

    def patches(self, images: Tensor, *, fill: float = 0.0) -> Tensor:
        """The image patch under each window, (n, C, rf_h, rf_w), ``fill`` outside the image; ``images`` are
        the (B, C, H, W) images of the forward. Aligned pixel for pixel with ``windows``."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != self.windows.shape[1]:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            channels = self.windows.shape[1]
            raise ValueError(f"images must be the (B, {channels}, H, W) images projected, got {got}")
        size = self.receptive_field.size
        windows = torch.cat((self.origins, self.origins + torch.tensor(size, device=self.origins.device)), 1)
        out = _cut(images, self.entries[:, 0].tolist(), windows, fill)
        return out.view(-1, images.shape[1], *size)


# -------------------------------------------------------------------------------------------------- plan
# An elementwise op of the way down: "relu" (the deconvnet rule) or a batch-norm's per-channel scale (C,).
_Elementwise = str | Tensor


@dataclass(frozen=True)
class _Step:
    """One batched step on the windows: [ReLU/scales] [unpool [ReLU] [ReLU/scales]] [transposed conv].

    Batch-norm scales cost nothing where they can be moved: through an unpool (both act per channel) into
    ``pre``, or into the transposed conv's weights (``weight``'s rows scaled) when nothing but scales lies
    between them and the conv. ``post`` holds what is left between the unpool's ReLU and the conv (a scale
    and then another ReLU), which unfuses the step; no chain of the usual order produces one."""

    in_size: Pair  # (H, W) of the map the step's input windows live in (what lies outside is zeroed)
    in_window: Pair
    out_window: Pair
    pre: tuple[_Elementwise, ...]
    pool: MaxPool | None
    pool_index: int  # chain index of `pool` (its switches), -1 without one
    post_relu: bool
    post: tuple[_Elementwise, ...]
    conv: Conv | None
    weight: Tensor | None  # the conv's weight, times the scales folded into it


@dataclass(frozen=True)
class _Plan:
    """How to project one layer's activations at one image size."""

    # ("relu" | "unpool" | "scale", pool or scale, chain index) above the first conv
    seed: list[tuple[str, MaxPool | Tensor | None, int]]
    seed_conv: Conv | None  # the first transposed conv: the value times one filter's weights
    steps: list[_Step]
    shared_steps: int  # leading steps without an unpool: image-independent, run once per filter and clipping
    channels: int  # image channels
    bytes_per_projection: int  # peak intermediate memory of one projection

    @property
    def signed_seed(self) -> bool:
        """Whether the seed can turn a value negative (a batch-norm scale above the first conv)."""
        return any(kind == "scale" for kind, _, _ in self.seed)


def _simplified(ops_down: list[_Elementwise]) -> list[_Elementwise]:
    """Repeated ReLUs as one (ReLU is idempotent), neighbouring scales multiplied into one."""
    out: list[_Elementwise] = []
    for op in ops_down:
        if isinstance(op, str) and out and isinstance(out[-1], str):
            continue
        if isinstance(op, Tensor) and out and isinstance(out[-1], Tensor):
            out[-1] = out[-1] * op
            continue
        out.append(op)
    return out


def _folded(weight: Tensor, scales: list[_Elementwise]) -> Tensor:
    """The transposed conv's weight with the scales applied to its input channels folded in (rows of W)."""
    for scale in scales:
        weight = weight * scale.view(-1, 1, 1, 1)
    return weight


def _plan(chain: Chain, sizes: list[Pair], image_size: Pair, channels: int, dtype: torch.dtype) -> _Plan:
    """Group the backward ops into batched steps and size every window."""
    itemsize = torch.empty((), dtype=dtype).element_size()

    def size_below(index: int) -> Pair:
        return sizes[index - 1] if index > 0 else image_size

    def below(window: Pair, op: Conv | MaxPool) -> Pair:
        return tuple(
            window_below(0, window[i], op.kernel[i], op.stride[i], op.padding[i])[1] for i in range(2)
        )

    backward: list[tuple[str, Conv | MaxPool | Tensor | None, int]] = []
    for index in reversed(range(len(chain.ops))):
        op = chain.ops[index]
        if isinstance(op, Conv):
            backward.append(("conv", op, index))
        elif isinstance(op, ReLU):
            backward.append(("relu", None, index))
        elif isinstance(op, MaxPool):
            backward.append(("unpool", op, index))
            if op.relu:  # the ReLU fused before the pool comes after the unpool on the way down
                backward.append(("relu", None, index))
        elif isinstance(op, BatchNorm):
            backward.append(("scale", op.scale(dtype), index))
    i = 0
    while i < len(backward) and backward[i][0] != "conv":
        i += 1
    seed, steps = backward[:i], []
    if i == len(backward):  # no conv on the path: the activation lands on the image as it is
        return _Plan(seed, None, steps, 0, channels, 2 * channels * itemsize)
    _, seed_conv, index = backward[i]
    i += 1
    window, level, level_channels = seed_conv.kernel, size_below(index), seed_conv.in_channels
    peak = level_channels * window[0] * window[1]

    def kind(at: int) -> str | None:
        return backward[at][0] if at < len(backward) else None

    def elementwise(at: int) -> _Elementwise:
        return "relu" if backward[at][0] == "relu" else backward[at][1]

    while i < len(backward):
        in_window, in_size, in_channels = window, level, level_channels
        pre: list[_Elementwise] = []
        post: list[_Elementwise] = []
        pool, pool_index, conv = None, -1, None
        elements = in_channels * in_window[0] * in_window[1]
        while kind(i) in ("relu", "scale"):
            pre.append(elementwise(i))
            i += 1
        if kind(i) == "unpool":
            _, pool, pool_index = backward[i]
            window, level, i = below(window, pool), size_below(pool_index), i + 1
            elements += in_channels * window[0] * window[1]  # the unpooled window (the reference backend's)
            while kind(i) in ("relu", "scale"):
                post.append(elementwise(i))
                i += 1
        if kind(i) == "conv":
            _, conv, index = backward[i]
            window, level, level_channels, i = below(window, conv), size_below(index), conv.in_channels, i + 1
            elements += level_channels * window[0] * window[1]
        while post and isinstance(post[0], Tensor):  # a scale commutes with the unpool: on the small window
            pre.append(post.pop(0))
        pre, post = _simplified(pre), _simplified(post)
        post_relu = bool(post)  # what is left of post starts with a ReLU
        post = post[1:]
        weight = None if conv is None else conv.weight
        if conv is not None and pool is not None and all(isinstance(op, Tensor) for op in post):
            weight, post = _folded(weight, post), []
        elif conv is not None and pool is None:
            trailing = 0
            while trailing < len(pre) and isinstance(pre[len(pre) - 1 - trailing], Tensor):
                trailing += 1
            if trailing:
                weight, pre = _folded(weight, pre[len(pre) - trailing :]), pre[: len(pre) - trailing]
        peak = max(peak, elements)
        pre_ops, post_ops = tuple(pre), tuple(post)
        steps.append(
            _Step(in_size, in_window, window, pre_ops, pool, pool_index, post_relu, post_ops, conv, weight)
        )
    final = channels * window[0] * window[1]
    shared = next((n for n, step in enumerate(steps) if step.pool is not None), len(steps))
    return _Plan(seed, seed_conv, steps, shared, channels, (max(peak, final) + final) * itemsize)


# ----------------------------------------------------------------------------------------------- engine
def _outside_zeroed(signal: Tensor, origin: Tensor, size: Pair) -> Tensor:
    """Zero the window positions that lie outside the map (the full computation never has them), in place.

    One multiply by a broadcast mask: zeroing just the outside rows and columns, grouped by overhang,
    measured several times slower (one indexed write per group)."""
    h, w = signal.shape[-2:]
    rows = origin[:, :1] + torch.arange(h, device=origin.device)
    cols = origin[:, 1:] + torch.arange(w, device=origin.device)
    row_ok = (rows >= 0) & (rows < size[0])
    col_ok = (cols >= 0) & (cols < size[1])
    if bool(row_ok.all()) and bool(col_ok.all()):
        return signal
    inside = (row_ok[:, :, None] & col_ok[:, None, :]).unsqueeze(1).to(signal.dtype)
    return signal.mul_(inside)  # every window is a fresh tensor of this module's own


def _gather_windows(switches: Tensor, image_index: Tensor, origin: Tensor, window: Pair) -> Tensor:
    """(n, C, h, w): each projection's window of its own image's switches, 0 where it leaves the map (those
    positions' signal is zeroed by `_outside_zeroed`, so any switch there is never used).

    One clipped slice copy per projection into a zeroed block: each is small enough to run inline, where a
    single advanced-indexing gather measured 3-4x slower (it waits on the thread pool), and padding every
    image's switches first cost more than the copies (a full pass over the batch's maps per layer)."""
    h, w = window
    height, width = switches.shape[-2:]
    out = switches.new_zeros((origin.shape[0], switches.shape[1], h, w))
    rows, cols = origin[:, 0].tolist(), origin[:, 1].tolist()
    for i, (image, row, col) in enumerate(zip(image_index.tolist(), rows, cols, strict=True)):
        top, left, bottom, right = max(row, 0), max(col, 0), min(row + h, height), min(col + w, width)
        if top < bottom and left < right:
            out[i, :, top - row : bottom - row, left - col : right - col] = switches[
                image, :, top:bottom, left:right
            ]
    return out


class DeconvNet:
    """Zeiler & Fergus's deconvnet over a CNN: project single activations of any layer to pixel space.

    Two paths, chosen per layer (:meth:`path` says which):

    - ``"deconvnet"``: the layer's path from the input is a chain of ``nn.Conv2d``, ReLUs (``nn.ReLU``,
      ``zfkernels.nn.ReLU``, ``F.relu``, ``torch.relu``...), max-pools (``nn.MaxPool2d``, ``F.max_pool2d``,
      ``zfkernels.nn.MaxPool2dSwitches``), eval-mode batch-norm (``nn.BatchNorm2d`` with running
      statistics: affine, projected through its transpose, a per-channel scale), local response
      normalization (skipped on the way down, as in the paper), ``nn.Dropout*`` and ``nn.Identity``. It
      runs the fast cropped deconvnet: every projection on a window of its receptive field, all at once.
      :meth:`layers` lists these layers. Zeiler & Fergus's ZFNet, torchvision's AlexNet and VGG are chains
      throughout (layer names such as ``"features.10"``).
    - ``"gradient"``: any other module called once by the forward whose output is an (N, C, H, W) map
      (the layers after a residual add or a concatenation: ResNet, SqueezeNet, GoogLeNet...). The model is
      run forward with autograd, patched by ``zfkernels.patch`` in ``deconvnet_mode`` (in place for the
      call, then restored), and each projection is the activation's value times its deconvnet gradient,
      one backward pass per activation per image (images in a batch share it). Same rules: batch-norm by
      its transpose, LRN skipped; other layers by their own gradient.

    Both give the value times the deconvnet gradient of the activation; :meth:`project` says exactly.
    The path is read by ``torch.fx`` tracing of the model, so the forward's own order counts, not the
    registration order.

    The model is run in eval mode while projecting (its training flags are restored afterwards). With
    ``check=True`` the model's own forward is run on the first image up to a chain layer, and the chain's
    activation must match it: a guard against anything the chain cannot see (for an fx-traced model, once
    per layer and image size; for a model read in registration order, on every call). The structure is
    read once, here (build a new DeconvNet after replacing layers); weights are read at each call.
    ``chunk_bytes`` bounds the intermediate memory of a batch of chain projections (the output comes on
    top).
    """

    def __init__(self, model: nn.Module, *, check: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, torch.jit.ScriptModule):  # no layer types or Python forward left to read
            raise TypeError(
                "model is a TorchScript module (torch.jit.script/trace); DeconvNet reads the layers and the "
                "forward of the eager model: pass that instead"
            )
        if not isinstance(check, bool):
            raise TypeError(f"check must be a bool, got {check!r}")
        if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        self.model, self.check, self.chunk_bytes = model, check, chunk_bytes
        self._chains = LayerChains(model)
        self._checked: set[tuple[object, ...]] = set()
        self._fields: dict[fx.Node, object] | None = None  # receptive fields of the graph's nodes, on demand
        self._patch_warnings: list[str] = []
        self._warned = False

    def layers(self, *, include_gradient_path: bool = False) -> list[str]:
        """Names of the conv, ReLU and max-pool layers that can be projected, in forward order.

        By default those on the deconvnet path (chains from the input), as before the gradient path
        existed. With ``include_gradient_path=True`` also those the gradient path projects: every conv,
        ReLU and max-pool module the forward calls exactly once. (The gradient path takes any module called
        once whose output is an (N, C, H, W) map, such as a residual block; only these kinds are listed.)
        """
        if not isinstance(include_gradient_path, bool):
            raise TypeError(f"include_gradient_path must be a bool, got {include_gradient_path!r}")
        if not include_gradient_path:
            return self._chains.projectable()
        names = []
        for name in self._chains.candidates():
            if isinstance(self._chains._resolve(name), Chain) or self._gradient_refusal(name) is None:
                names.append(name)
        return names

    def path(self, layer: str) -> str:
        """How ``layer`` is projected: ``"deconvnet"`` (its path from the input is a chain: the cropped
        deconvnet) or ``"gradient"`` (autograd through the patched model). ValueError when neither can."""
        self._check_layer_name(layer)
        chain = self._chains._resolve(layer)
        if isinstance(chain, Chain):
            return "deconvnet"
        refusal = self._gradient_refusal(layer)
        if refusal is None:
            return "gradient"
        sentence = self._chains._projectable_sentence()
        raise ValueError(f"layer {layer!r} cannot be projected: {refusal}. {sentence}")

    def chain(self, layer: str) -> Chain:
        """The chain of ops from the input to ``layer`` (a layer on the deconvnet path)."""
        return self._chains.chain(layer)

    def receptive_field(self, layer: str, image_size: Pair | None = None) -> ReceptiveField:
        """The receptive field of one activation of ``layer`` in the input image.

        Deconvnet path: the chain's. Gradient path: receptive-field arithmetic over the traced graph, the
        union over the paths that meet at an add or a concatenation. A layer that can see the whole image
        (after a global pool, a normalization over the map, or an op whose geometry is not known here)
        has the whole image as its field: pass ``image_size`` ``(H, W)`` for it (ValueError otherwise,
        saying why the field is the whole image)."""
        if self.path(layer) == "deconvnet":
            return self.chain(layer).receptive_field
        field = self._gradient_field(layer)
        if isinstance(field, ReceptiveField):
            return field
        if image_size is None:
            raise ValueError(
                f"layer {layer!r} can see the whole image ({field.reason}): pass image_size=(H, W) to get "
                "the whole image as its receptive field"
            )
        return whole_image_field(_image_size(image_size))

    def project(
        self,
        images: Tensor,
        layer: str,
        filters: int | Sequence[int] | Tensor | None = None,
        top: int = 1,
        *,
        path: str = "auto",
    ) -> Projection:
        """Project the ``top`` strongest activations of each filter of ``layer``, per image, to pixel space.

        ``images``: (B, C, H, W) in the model's dtype and device. ``filters``: a channel index, a sequence
        (or 1-D integer tensor or array) of them, or None for all channels of ``layer``'s output. ``top``:
        how many activations per image and filter, at distinct positions, strongest first (ties: first in
        row-major order). ``path``: ``"auto"`` (the deconvnet path where the layer is on a chain, the
        gradient path elsewhere; :meth:`path` tells), or ``"deconvnet"`` / ``"gradient"`` to force one (the
        gradient path takes any layer). Returns a :class:`Projection` whose ``pixels`` are
        (B, F, top, C, H, W) and whose ``path`` says which path ran.

        What a projection equals, on both paths: the activation's value (clamped at 0) times its deconvnet
        gradient w.r.t. the image: every ReLU's backward replaced by ReLU of the gradient, every max-pool's
        by the unpool that sums at shared argmaxes, batch-norm (eval mode) by its true backward (its
        transpose, a per-channel scale by ``weight / sqrt(running_var + eps)``), i.e. captum's
        ``NeuronDeconvolution`` times the value. The one exception is local response normalization
        (``nn.LocalResponseNorm``, ``nn.CrossMapLRN2d``, ``F.local_response_norm``): the paper skips it on
        the way down, and so do both paths, so with LRN on the path the projection equals the value times
        the deconvnet gradient of the same model with LRN's backward the identity (its forward unchanged).
        Dropout (the model is projected in eval mode) and ``nn.Identity`` change nothing. Batch-norm without
        running statistics (``track_running_stats=False``) normalizes by the batch even in eval mode and is
        refused. The gradient path computes the same with torch's kernels (the convs' gradients, not our
        windowed transposed convs), so the two paths agree to rounding (about 1e-7 of the largest value).

        Images with a NaN or inf raise ValueError before anything runs (a projection of a non-finite image
        is undefined); so do NaN/inf activations of the filters asked for (a NaN parameter, an overflow),
        once the forward has run.
        """
        if self._choose_path(layer, path) == "gradient":
            return self._project_gradient(images, layer, filters, top)
        chain = self.chain(layer)
        sizes = self._check_images(images, chain)
        channels = chain.out_channels(images.shape[1])
        selected = _filter_list(filters, channels, layer)
        positions_available = sizes[-1][0] * sizes[-1][1] if sizes else images.shape[-2] * images.shape[-1]
        top = _top(top, positions_available, layer)
        with _eval_mode(self.model), torch.no_grad():
            record = chain.forward(images)
            _check_finite_activations(record.activation, selected, layer)
            self._check_chain(chain, images, record)
            return self._project(chain, record, images, layer, selected, top)

    def forward(self, images: Tensor, layers: str | Sequence[str], *, path: str = "auto") -> ForwardPass:
        """Run ``images`` forward once and keep what projecting activations of each of ``layers`` needs.

        Chain layers (deconvnet path) share one switch-recording forward of their chains (a prefix common
        to several chains runs once); gradient-path layers share one autograd forward of the patched model,
        stopped after the last of them. Project with :meth:`ForwardPass.project_entries`. ``path``: as in
        :meth:`project`, for every layer. The gradient path keeps the forward's autograd graph alive as
        long as the returned object lives (memory grows with the batch and the depth of the layers).
        """
        names = self._layer_list(layers)
        chosen = {name: self._choose_path(name, path) for name in names}
        chain_layers = [name for name in names if chosen[name] == "deconvnet"]
        gradient_layers = [name for name in names if chosen[name] == "gradient"]
        records: dict[str, ChainForward] = {}
        chains = {name: self.chain(name) for name in chain_layers}
        for chain in chains.values():
            self._check_images(images, chain, finite=False)
        if gradient_layers:
            self._check_gradient_images(images, finite=False)
        if names:
            _check_finite_images(images)  # once for all the layers: a full pass over the batch
        with _eval_mode(self.model):
            if chain_layers:
                with torch.no_grad():
                    records = forward_chains(list(chains.values()), images)
                    for name, chain in chains.items():
                        self._check_chain(chain, images, records[name])
            leaf, activations = None, {}
            if gradient_layers and images.shape[0] > 0:
                leaf, activations = self._gradient_forward(images, gradient_layers)
            elif gradient_layers:  # no image: the layers' shapes from one zero image, nothing to project
                one = images.new_zeros((1, *images.shape[1:]))
                _, activations = self._gradient_forward(one, gradient_layers)
                activations = {name: value.detach()[:0] for name, value in activations.items()}
        return ForwardPass(self, images, names, chosen, chains, records, leaf, activations)

    def project_entries(
        self, images: Tensor, layer: str, entries: Tensor | Sequence[Sequence[int]], *, path: str = "auto"
    ) -> EntryProjection:
        """``forward(images, [layer], path=path).project_entries(layer, entries)`` (:class:`ForwardPass`)."""
        return self.forward(images, [layer], path=path).project_entries(layer, entries)

    # ------------------------------------------------------------------------------------------ internals
    def _check_layer_name(self, layer: object) -> None:
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a module name (str) such as 'conv5', got {type(layer).__name__}")
        if layer not in self._chains.modules or layer == "":
            raise ValueError(
                f"layer {layer!r} is not a module of the model. {self._chains._projectable_sentence()} "
                "Other layers: DeconvNet.layers(include_gradient_path=True)."
            )

    def _layer_list(self, layers: str | Sequence[str]) -> list[str]:
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, Sequence) or not layers:
            raise ValueError(f"layers must be a layer name or a non-empty sequence of them, got {layers!r}")
        for layer in layers:
            self._check_layer_name(layer)
        return list(dict.fromkeys(layers))

    def _choose_path(self, layer: str, path: str) -> str:
        if path not in ("auto", *PATHS):
            raise ValueError(f"path must be one of 'auto', 'deconvnet', 'gradient', got {path!r}")
        if path == "auto":
            return self.path(layer)
        self._check_layer_name(layer)
        if path == "deconvnet":
            self.chain(layer)  # the chain's own error when there is none
            return path
        refusal = self._gradient_refusal(layer)
        if refusal is not None:
            raise ValueError(f"layer {layer!r} cannot be projected on the gradient path: {refusal}")
        return path

    def _gradient_refusal(self, layer: str) -> str | None:
        """Why the gradient path cannot take ``layer`` (None: it can); known from the trace."""
        counts = self._chains.call_counts
        if counts is None:  # untraced: the forward itself counts the calls
            return None
        calls = counts.get(layer, 0)
        if calls == 0:
            return "it is never called by the model's forward"
        if calls > 1:
            return f"it is called {calls} times in the forward, so which call to project is ambiguous"
        return None

    def _gradient_field(self, layer: str) -> ReceptiveField | WholeImage:
        graph = self._chains.graph
        if graph is None:
            error = self._chains.trace_error
            return WholeImage(f"torch.fx could not trace the model ({type(error).__name__})")
        if self._fields is None:
            self._fields = graph_fields(graph, self._chains.modules)
        node = self._chains.module_outputs.get(layer)
        field = self._fields.get(node) if node is not None else None
        if field is None:
            return WholeImage(f"the graph does not show how layer {layer!r} depends on the image")
        return field

    def _check_chain(self, chain: Chain, images: Tensor, record: ChainForward) -> None:
        """The chain's activation against the model's own forward, once per layer and image size."""
        key = (chain.layer, tuple(images.shape[1:]), images.dtype, images.device)
        if self.check and images.shape[0] > 0 and key not in self._checked:
            check_against_model(self.model, chain, images[:1], record.activation[:1])
            if chain.traced:  # a traced chain is the forward's structure: once per layer and size
                self._checked.add(key)

    def _check_gradient_images(self, images: Tensor, *, finite: bool = True) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            hint = "; for one image use images.unsqueeze(0)" if images.dim() == 3 else ""
            raise ValueError(f"images must be 4-D (B, C, H, W), got shape {tuple(images.shape)}{hint}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"images must be floating point, got {images.dtype}")
        parameter = next(iter(self.model.parameters()), None)
        if parameter is not None:
            if images.dtype != parameter.dtype:
                raise TypeError(f"images must have the model's dtype {parameter.dtype}, got {images.dtype}")
            if images.device != parameter.device:
                raise ValueError(
                    f"images must be on the model's device {parameter.device}, got {images.device}"
                )
        if finite:
            _check_finite_images(images)

    def _gradient_forward(self, images: Tensor, layers: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        graph = self._chains.graph
        functional_lrn = graph is None or any(
            n.op == "call_function" and n.target is F.local_response_norm for n in graph.nodes
        )
        leaf, activations = gradient_forward(
            self.model,
            images,
            layers,
            stop_early=graph is not None,
            functional_lrn=functional_lrn,
            warned=self._patch_warnings,
        )
        if self._patch_warnings and not self._warned:
            self._warned = True
            warnings.warn(
                "on the gradient path, " + " ".join(dict.fromkeys(self._patch_warnings)) + " A ReLU left "
                "unpatched gets its plain gradient there, not the deconvnet rule.",
                UserWarning,
                stacklevel=3,
            )
        return leaf, activations

    def _project_gradient(
        self, images: Tensor, layer: str, filters: int | Sequence[int] | Tensor | None, top: object
    ) -> Projection:
        self._check_gradient_images(images)
        if _as_index(top) is None:
            raise TypeError(f"top must be an int, got {top!r}")
        record = self.forward(images, [layer], path="gradient")
        activation = record.activation(layer)
        selected = _filter_list(filters, activation.shape[1], layer)
        top = _top(top, activation.shape[-2] * activation.shape[-1], layer)
        _check_finite_activations(activation, selected, layer)
        values, positions = _strongest(activation, selected, top)
        batch, channels, height, width = images.shape
        field = record.receptive_field(layer)
        boxes = field.boxes(positions, (height, width))
        count = len(selected)
        pixels = output_empty((batch, count, top, channels, height, width), images).zero_()
        if batch > 0:
            flat = pixels.view(-1, channels, height, width)
            image_index = torch.arange(batch, device=images.device).repeat_interleave(count * top)
            channel = torch.tensor(selected, dtype=torch.int64, device=images.device).repeat_interleave(top)
            value = values.reshape(-1).clamp(min=0)
            position = positions.reshape(-1, 2)
            for entries, gradients in record._gradients(
                layer, image_index, channel.repeat(batch), position[:, 0], position[:, 1]
            ):
                flat[entries] = gradients.mul_(value[entries].view(-1, 1, 1, 1))
        return Projection(pixels, values, positions, boxes, layer, selected, field, path="gradient")

    def _check_images(self, images: Tensor, chain: Chain, *, finite: bool = True) -> list[Pair]:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            hint = "; for one image use images.unsqueeze(0)" if images.dim() == 3 else ""
            raise ValueError(
                f"images must be 4-D {chain.expected_input()}, got shape {tuple(images.shape)}{hint}"
            )
        convs = chain.convs
        if not images.dtype.is_floating_point:
            raise TypeError(f"images must be floating point, got {images.dtype}")
        if convs:
            weight = convs[0].module.weight
            if images.dtype != weight.dtype:
                raise TypeError(f"images must have the model's dtype {weight.dtype}, got {images.dtype}")
            if images.device != weight.device:
                raise ValueError(f"images must be on the model's device {weight.device}, got {images.device}")
            if images.shape[1] != convs[0].in_channels:
                raise ValueError(
                    f"images must have {convs[0].in_channels} channels (the first conv {convs[0].name!r} "
                    f"expects {convs[0].in_channels}), got shape {tuple(images.shape)}"
                )
            for before, after in zip(convs, convs[1:], strict=False):
                if after.in_channels != before.out_channels:
                    raise ValueError(
                        f"layer {chain.layer!r} cannot be projected: {after.name!r} takes "
                        f"{after.in_channels} channels but {before.name!r} gives {before.out_channels}"
                    )
        if finite:
            _check_finite_images(images)
        return chain.sizes((images.shape[-2], images.shape[-1]))

    def _project(
        self, chain: Chain, record: ChainForward, images: Tensor, layer: str, filters: list[int], top: int
    ) -> Projection:
        batch, channels, height, width = images.shape
        count = len(filters)
        values, positions = _strongest(record.activation, filters, top)
        field = chain.receptive_field
        boxes = chain.input_boxes(positions, (height, width))
        # From the output cache: a repeated projection reuses the last one's faulted-in block (zeroing it
        # costs a tenth of faulting 1.4 GB of fresh pages in again).
        pixels = output_empty((batch, count, top, channels, height, width), images).zero_()
        if batch > 0:
            plan = _plan(chain, record.sizes, (height, width), channels, images.dtype)
            filter_index = torch.tensor(filters, dtype=torch.int64, device=images.device)
            # Filter-major order: a chunk then holds the same filters for several images, whose
            # image-independent top steps are shared (see _seed).
            order = torch.arange(batch * count * top, device=images.device)
            order = order.view(batch, count, top).transpose(0, 1).reshape(-1)
            out = pixels.view(-1, channels, height, width)
            self._run(
                plan,
                record,
                lambda index, window, origin: _paste(out, index.tolist(), window, origin),
                order,
                image_index=torch.arange(batch, device=images.device).repeat_interleave(count * top),
                channel=filter_index.repeat_interleave(top).repeat(batch),
                value=values.reshape(-1),
                position=positions.reshape(-1, 2),
            )
        return Projection(pixels, values, positions, boxes, layer, list(filters), field)

    def _run(
        self,
        plan: _Plan,
        record: ChainForward,
        sink: Callable[[Tensor, Tensor, Tensor], None],
        order: Tensor,
        image_index: Tensor,
        channel: Tensor,
        value: Tensor,
        position: Tensor,
    ) -> None:
        """Project the activations chunk by chunk in the given ``order``; each chunk's windows (at the
        image, ``(n, C, h, w)``) and their origins go to ``sink(index, windows, origins)``, ``index`` being
        the chunk's entries."""
        chunk = max(1, self.chunk_bytes // max(plan.bytes_per_projection, 1))
        switches = {step.pool_index: record.switches[step.pool_index] for step in plan.steps if step.pool}
        for start in range(0, order.shape[0], chunk):
            index = order[start : start + chunk]
            images = image_index[index]
            window, origin = _seed(plan, record, images, channel[index], value[index], position[index])
            for step in plan.steps[plan.shared_steps :]:
                window, origin = _run_step(step, window, origin, images, switches)
            sink(index, window, origin)


class ForwardPass:
    """One forward of a batch of images, holding what projecting activations of each requested layer needs.

    Made by :meth:`DeconvNet.forward`: chain layers keep their chains' switches and activations, gradient-path
    layers their outputs in the autograd graph of the patched model. Then :meth:`project_entries` projects
    any activations of any of those layers, as often as wanted, without running the forward again::

        record = deconvnet.forward(images, ["conv1", "layer2.0.conv2"])
        out = record.project_entries("layer2.0.conv2", [(0, 5, 3, 4), (1, 5, 0, 7), (1, 9, 2, 2)])
        out.windows  # (3, C, rf_h, rf_w) projections cut to the receptive field; out.origins, out.boxes
    """

    def __init__(
        self,
        deconvnet: DeconvNet,
        images: Tensor,
        layers: list[str],
        paths: dict[str, str],
        chains: dict[str, Chain],
        records: dict[str, ChainForward],
        leaf: Tensor | None,
        activations: dict[str, Tensor],
    ):
        self.images = images
        self.layers: tuple[str, ...] = tuple(layers)
        self._deconvnet, self._paths, self._chains, self._records = deconvnet, paths, chains, records
        self._leaf, self._activations = leaf, activations

    def path(self, layer: str) -> str:
        """``"deconvnet"`` or ``"gradient"``: how ``layer``'s activations are projected."""
        self._check_layer(layer)
        return self._paths[layer]

    def activation(self, layer: str) -> Tensor:
        """``layer``'s output for the images, (B, C, h, w), detached."""
        self._check_layer(layer)
        if self._paths[layer] == "deconvnet":
            return self._records[layer].activation
        return self._activations[layer].detach()

    def receptive_field(self, layer: str) -> ReceptiveField:
        """``layer``'s receptive field (the whole image for a layer that can see all of it)."""
        self._check_layer(layer)
        return self._deconvnet.receptive_field(layer, tuple(self.images.shape[-2:]))

    def project_entries(self, layer: str, entries: Tensor | Sequence[Sequence[int]]) -> EntryProjection:
        """Project activations of ``layer``, each cut to a window of the layer's receptive field.

        ``entries``: (n, 4) integers ``(image, filter, row, col)`` (a tensor, or a sequence of 4-tuples):
        the image's index in this batch, the filter (channel) and the position in ``layer``'s output; any
        number per image, in any order, repeats allowed. Returns an :class:`EntryProjection`, row ``i`` for
        entry ``i``. Each window equals ``DeconvNet.project(...).crops()`` of that activation: on the
        deconvnet path bit for bit when the same activations are projected together (the same kernels on
        the same batches; oneDNN's transposed conv rounds differently for another batch size, so another
        chunking agrees to rounding); on the gradient path to rounding (the backward runs on other
        batches), within 1e-6 of its largest value. ValueError naming ``entries`` for an index out of range
        or a wrong shape, naming the layer for one this forward did not run.

        Deconvnet path: the cropped deconvnet, chunked as in :meth:`DeconvNet.project`, the windows written
        straight into the (n, C, rf_h, rf_w) result (no image-sized plane). Gradient path: one backward pass
        per round of one entry per image (``retain_graph``), each gradient cut to its window.
        """
        self._check_layer(layer)
        activation = self.activation(layer)
        entries = _entry_tensor(entries, activation, layer)
        image_index, channel, row, col = entries.unbind(1)
        position = entries[:, 2:]
        values = activation[image_index, channel, row, col]
        if not bool(torch.isfinite(values).all()):
            bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
            raise ValueError(
                f"layer {layer!r} gives NaN/inf activations at entries {bad[:8]}{' ...' * (len(bad) > 8)} "
                "from finite images (a NaN/inf parameter on the path, or an overflow): their projection is "
                "undefined"
            )
        images = self.images
        height, width = images.shape[-2:]
        field = self.receptive_field(layer)
        origins = field.boxes(position)[:, :2]
        windows_shape = (entries.shape[0], images.shape[1], *field.size)
        if self._paths[layer] == "deconvnet":
            # Every element is pasted (see _chain_windows). Not from the CPU output cache: sizes vary by call.
            windows = images.new_empty(windows_shape)
            chain = self._chains[layer]
            boxes = chain.input_boxes(position, (height, width))
            if entries.shape[0] > 0:
                self._chain_windows(layer, windows, origins, image_index, channel, values, position)
        else:
            windows = images.new_zeros(windows_shape)
            boxes = field.boxes(position, (height, width))
            value = values.clamp(min=0)
            for index, gradients in self._gradients(layer, image_index, channel, row, col):
                gradients.mul_(value[index].view(-1, 1, 1, 1))
                ends = origins[index] + torch.tensor(field.size, device=origins.device)
                cut = torch.cat((origins[index], ends), 1)
                windows[index] = _cut(gradients, list(range(index.shape[0])), cut, 0.0)
        return EntryProjection(entries, values, windows, origins, boxes, layer, self._paths[layer], field)

    # ------------------------------------------------------------------------------------------ internals
    def _check_layer(self, layer: str) -> None:
        if layer not in self._paths:
            raise ValueError(f"layer {layer!r} was not run by this forward; its layers: {list(self.layers)}")

    def _chain_windows(
        self,
        layer: str,
        windows: Tensor,
        origins: Tensor,
        image_index: Tensor,
        channel: Tensor,
        values: Tensor,
        position: Tensor,
    ) -> None:
        chain, record, images = self._chains[layer], self._records[layer], self.images
        size = (images.shape[-2], images.shape[-1])
        plan = _plan(chain, record.sizes, size, images.shape[1], images.dtype)

        def sink(index: Tensor, window: Tensor, origin: Tensor) -> None:
            # Placed in its field, all of which is written: zeros where the image-sized projection would
            # clip the window at the image's borders (the valid part: the window within the image).
            image_size = torch.tensor(size, device=origin.device)
            valid = torch.cat(((-origin).clamp(min=0), image_size - origin), 1)
            _paste(windows, index.tolist(), window, origin - origins[index], valid, fill=True)

        order = torch.sort(channel, stable=True).indices  # filter-major: shared seeds (see _seed)
        # Outside the CPU output cache: every call's chunks have other sizes (entries per image vary), so
        # cached storages are never reused but hoarded, and each chunk faulted fresh pages in, where the
        # allocator would have recycled freed ones (measured: the fused step 2-3x slower with the cache).
        with _eval_mode(self._deconvnet.model), torch.no_grad(), memory._bypassed():
            self._deconvnet._run(plan, record, sink, order, image_index, channel, values, position)

    def _gradients(
        self, layer: str, image_index: Tensor, channel: Tensor, row: Tensor, col: Tensor
    ) -> Iterator[tuple[Tensor, Tensor]]:
        if image_index.shape[0] == 0:
            return iter(())
        if self._leaf is None:
            raise RuntimeError("this forward ran no image, so it has nothing to project")
        return deconvnet_gradients(self._activations[layer], self._leaf, image_index, channel, row, col)


def _entry_tensor(entries: object, activation: Tensor, layer: str) -> Tensor:
    """``entries`` as an (n, 4) int64 tensor on the activation's device, every index checked."""
    if isinstance(entries, Tensor):
        if entries.dtype.is_floating_point or entries.dtype.is_complex or entries.dtype == torch.bool:
            raise TypeError(f"entries must be integers (image, filter, row, col), got dtype {entries.dtype}")
        tensor = entries.to(device=activation.device, dtype=torch.int64)
    else:
        wrong = f"entries must be (n, 4) integers (image, filter, row, col), got {entries!r}"
        try:
            items = [[_as_index(v) for v in entry] for entry in entries]
        except TypeError:
            raise TypeError(wrong) from None
        if any(v is None for entry in items for v in entry):
            raise TypeError(wrong)
        if any(len(entry) != 4 for entry in items):
            raise ValueError(wrong)
        tensor = torch.tensor(items, dtype=torch.int64, device=activation.device)
        if not items:
            tensor = tensor.reshape(0, 4)
    if tensor.dim() != 2 or tensor.shape[1] != 4:
        got = tuple(tensor.shape)
        raise ValueError(f"entries must have shape (n, 4) (image, filter, row, col), got {got}")
    limits = activation.shape
    names = ("image", "filter", "row", "col")
    for axis, (name, limit) in enumerate(zip(names, limits, strict=True)):
        column = tensor[:, axis]
        bad = ((column < 0) | (column >= limit)).nonzero().flatten()
        if bad.numel():
            first = int(bad[0])
            raise ValueError(
                f"entries[{first}] = {tensor[first].tolist()}: {name} {int(column[first])} is out of range; "
                f"layer {layer!r} gives {tuple(limits)} (images, filters, rows, cols) for these images"
            )
    return tensor


def _check_finite_images(images: Tensor) -> None:
    if all_finite(images):
        return
    non_finite = ~torch.isfinite(images)
    if bool(non_finite.any()):
        count = int(non_finite.sum())
        which = non_finite.flatten(1).any(1).nonzero().flatten().tolist()
        shown = ", ".join(map(str, which[:8])) + (", ..." if len(which) > 8 else "")
        raise ValueError(
            f"images contains {_counted(count, 'NaN/inf value')} (in {_counted(len(which), 'image')}: "
            f"{shown}); a projection of a non-finite image is undefined"
        )


def _top(top: object, positions_available: int, layer: str) -> int:
    top_index = _as_index(top)  # numpy and 0-d tensor integers are ints too, as for filters
    if top_index is None:
        raise TypeError(f"top must be an int, got {top!r}")
    if not 1 <= top_index <= positions_available:
        raise ValueError(
            f"top must be in 1..{positions_available} (the positions in the output of layer {layer!r}), "
            f"got {top_index}"
        )
    return top_index


def _strongest(activation: Tensor, filters: list[int], top: int) -> tuple[Tensor, Tensor]:
    """The ``top`` strongest activations of each filter per image: values (B, F, top), positions (.., 2)."""
    flat = activation[:, filters].flatten(2)  # (B, F, h * w)
    map_width = activation.shape[-1]
    # Stable descending sort: equal activations keep row-major order, the first one wins (as max-pool).
    values, order = torch.sort(flat, dim=-1, descending=True, stable=True)
    values, order = values[..., :top].contiguous(), order[..., :top]
    return values, torch.stack((order // map_width, order % map_width), dim=-1)


def _image_size(image_size: object) -> Pair:
    if (
        not isinstance(image_size, (tuple, list, torch.Size))
        or len(image_size) != 2
        or not all(_as_index(v) is not None and _as_index(v) > 0 for v in image_size)
    ):
        raise ValueError(f"image_size must be (H, W), two positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _check_finite_activations(activation: Tensor, filters: list[int], layer: str) -> None:
    """ValueError when an activation to project is NaN/inf although the images are finite (checked before)."""
    non_finite = ~torch.isfinite(activation[:, filters])
    if bool(non_finite.any()):
        count = int(non_finite.sum())
        raise ValueError(
            f"layer {layer!r} gives {_counted(count, 'NaN/inf activation')} in the filters asked for, from "
            "finite images: a parameter on the path (a conv weight or bias, batch-norm statistics) "
            "is NaN/inf, or the forward overflows its dtype; a projection of a non-finite activation is "
            "undefined"
        )


def _seed(
    plan: _Plan, record: ChainForward, image_index: Tensor, channel: Tensor, value: Tensor, position: Tensor
) -> tuple[Tensor, Tensor]:
    """Each activation alone, through the ops above the first pool: a window and its origin per projection.

    Above the first conv the activation is one number at one position (an unpool just moves it to its
    switch). From the first transposed conv down to the first unpool nothing depends on the image: the
    signal is the value times what filter ``channel``'s unit activation becomes, except that positions
    off the map are zeroed at every level, which depends on where the activation sits. So those steps run
    once per distinct (filter, clipping) pair, on a unit activation, and are scaled per projection (a ReLU
    commutes with a positive scale; non-positive activations project to zeros).
    """
    value = value.clamp(min=0)  # the maps are rectified: a non-positive activation projects to zeros
    row, col = position[:, 0], position[:, 1]
    scaled = False  # until a batch-norm scale, every value is >= 0 and a ReLU changes nothing
    for kind, item, index in plan.seed:
        if kind == "unpool":
            pool = item
            switch = record.switches[index][image_index, channel, row, col].to(torch.int64)
            row = row * pool.stride[0] - pool.padding[0] + switch // pool.kernel[1]
            col = col * pool.stride[1] - pool.padding[1] + switch % pool.kernel[1]
        elif kind == "scale":
            value, scaled = value * item.index_select(0, channel), True
        elif scaled:
            value = value.clamp(min=0)
    conv = plan.seed_conv
    count = value.shape[0]
    if conv is None:  # no conv on the path: the activation itself lands on the image
        window = value.new_zeros((count, plan.channels, 1, 1))
        window[torch.arange(count, device=value.device), channel, 0, 0] = value
        return window, torch.stack((row, col), dim=1)
    origin = torch.stack((row * conv.stride[0] - conv.padding[0], col * conv.stride[1] - conv.padding[1]), 1)
    shared = plan.steps[: plan.shared_steps]
    if not shared:
        return conv.weight.index_select(0, channel) * value.view(-1, 1, 1, 1), origin
    # Key: the filter and, per shared step, how far its window sticks out of the map on each side.
    keys, step_origin = [channel.unsqueeze(1)], origin
    for step in shared:
        keys.append(_overhang(step_origin, step.in_window, step.in_size))
        step_origin = _origin_below(step, step_origin)
    if plan.signed_seed:  # ReLU(v x) = |v| ReLU(-x) for v < 0: the unit activation carries the sign
        negative = value < 0
        keys.append(negative.to(torch.int64).unsqueeze(1))
    unique, inverse = torch.unique(torch.cat(keys, dim=1), dim=0, return_inverse=True)
    first = torch.full((unique.shape[0],), count, dtype=torch.int64, device=value.device)
    first.scatter_reduce_(0, inverse, torch.arange(count, device=value.device), reduce="amin")
    window, unit_origin = conv.weight.index_select(0, unique[:, 0]), origin[first]
    if plan.signed_seed:
        window = torch.where(negative[first].view(-1, 1, 1, 1), -window, window)
        value = value.abs()
    for step in shared:
        window, unit_origin = _run_step(step, window, unit_origin, image_index[first], {})
    return window.index_select(0, inverse).mul_(value.view(-1, 1, 1, 1)), step_origin


def _overhang(origin: Tensor, window: Pair, size: Pair) -> Tensor:
    """(n, 4): rows above, columns left of, rows below and columns right of the map each window covers."""
    before = (-origin).clamp(min=0)
    after = (
        origin + torch.tensor(window, device=origin.device) - torch.tensor(size, device=origin.device)
    ).clamp(min=0)
    return torch.cat((before, after), dim=1)


def _origin_below(step: _Step, origin: Tensor) -> Tensor:
    """Where a step's output window starts, given where its input window starts."""
    for op in (step.pool, step.conv):
        if op is not None:
            stride = torch.tensor(op.stride, device=origin.device)
            origin = origin * stride - torch.tensor(op.padding, device=origin.device)
    return origin


def _run_step(
    step: _Step, window: Tensor, origin: Tensor, image_index: Tensor, switches: dict[int, Tensor]
) -> tuple[Tensor, Tensor]:
    """One step on a batch of windows: the output windows and their origins."""
    window = _outside_zeroed(window, origin, step.in_size)
    window = _elementwise(window, step.pre)
    pool, conv = step.pool, step.conv
    if pool is not None:
        gathered = _gather_windows(switches[step.pool_index], image_index, origin, step.in_window)
        unpooled = tuple((step.in_window[i] - 1) * pool.stride[i] + pool.kernel[i] for i in range(2))
        if conv is None or step.post:
            window = ops.max_unpool2d(
                window, gathered, pool.kernel, pool.stride, 0, unpooled, relu=step.post_relu
            )
            window = _elementwise(window, step.post)
            if conv is not None:
                window = ops.conv_transpose2d(window, step.weight, None, conv.stride, 0)
        else:
            window = ops.unpool_conv_transpose2d(
                window,
                gathered,
                step.weight,
                pool_kernel_size=pool.kernel,
                pool_stride=pool.stride,
                pool_padding=0,
                unpool_size=unpooled,
                stride=conv.stride,
                padding=0,
                relu=step.post_relu,
            )
    elif conv is not None:
        window = ops.conv_transpose2d(window, step.weight, None, conv.stride, 0)
    return window, _origin_below(step, origin)


def _elementwise(window: Tensor, ops_down: tuple[_Elementwise, ...]) -> Tensor:
    """The ReLUs and batch-norm scales of a step, in order, on a batch of windows (n, C, h, w)."""
    for op in ops_down:
        window = ops.relu(window) if isinstance(op, str) else window * op.view(1, -1, 1, 1)
    return window


# Each copy stays below torch's parallel grain size (32768 elements), so it runs inline on the calling
# thread: thousands of small parallel copies would each wait on an OpenMP barrier, which costs far more
# than the copy on a busy machine.
_PASTE_BLOCK = 16384


def _paste(
    out: Tensor,
    targets: list[int],
    window: Tensor,
    origin: Tensor,
    valid: Tensor | None = None,
    fill: bool = False,
) -> None:
    """Write window ``i`` into map ``out[targets[i]]`` at its origin, clipped at the map's borders and, where
    ``valid`` is given ((n, 4) top, left, bottom, right in window coordinates), to that part of the window.
    ``fill``: every element of each target map is written (zeros where nothing of the window lands), so
    ``out`` need not be zeroed first. Targets are distinct.

    On the CPU the extension's kernel copies all windows in one call (rows as memcpy, windows in parallel);
    elsewhere, slice by slice."""
    height, width = out.shape[-2:]
    channels, h, w = window.shape[-3:]
    if valid is not None:
        valid = valid.to(device="cpu", dtype=torch.int64).contiguous()
    if (
        cpu_module is not None
        and out.device.type == "cpu"
        and out.dtype in DTYPE_CODES
        and window.dtype == out.dtype
        and out.is_contiguous()
    ):
        window = window.contiguous()
        target_index = torch.tensor(targets, dtype=torch.int64)
        origins = origin.to(device="cpu", dtype=torch.int64).contiguous()
        cpu_module.paste_windows(
            window.data_ptr(),
            out.data_ptr(),
            target_index.data_ptr(),
            origins.data_ptr(),
            0 if valid is None else valid.data_ptr(),
            fill,
            DTYPE_CODES[out.dtype],
            len(targets),
            channels,
            (h, w),
            (height, width),
            math.prod(out.shape[:-3]),
            torch.get_num_threads(),
        )
        return
    bounds = [(0, 0, h, w)] * len(targets) if valid is None else valid.tolist()
    for i, (target, (top, left)) in enumerate(zip(targets, origin.tolist(), strict=True)):
        if fill:
            out[target].zero_()
        v_top, v_left, v_bottom, v_right = bounds[i]
        t, lo = max(top, top + v_top, 0), max(left, left + v_left, 0)
        b, r = min(top + h, top + v_bottom, height), min(left + w, left + v_right, width)
        if t >= b or lo >= r:
            continue
        rows = max(1, _PASTE_BLOCK // (r - lo))
        for c in range(channels):
            for y in range(t, b, rows):
                y1 = min(y + rows, b)
                out[target, c, y:y1, lo:r] = window[i, c, y - top : y1 - top, lo - left : r - left]


def _as_index(value: object) -> int | None:
    """``value`` as a Python int if it is an integer (numpy and 0-d integer tensors too), not a bool."""
    if isinstance(value, (bool, float)) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _filter_list(filters: int | Sequence[int] | Tensor | None, channels: int, layer: str) -> list[int]:
    """The filter indices asked for, checked against the layer's channel count."""
    if filters is None:
        return list(range(channels))
    wrong = f"filters must be an int, a sequence of ints or None, got {filters!r}"
    single = _as_index(filters) if not isinstance(filters, Tensor) or filters.dim() == 0 else None
    if single is not None:
        items = [single]
    elif isinstance(filters, (str, bytes, dict)) or not hasattr(filters, "__iter__"):
        raise TypeError(wrong)
    else:
        items = [_as_index(f) for f in filters]
        if any(f is None for f in items):
            raise TypeError(wrong)
    if not items:
        raise ValueError("filters must name at least one filter (or be None for all)")
    bad = [f for f in items if not 0 <= f < channels]
    if bad:
        raise ValueError(
            f"filters {bad} out of range: layer {layer!r} has {channels} channels (filters 0..{channels - 1})"
        )
    return items


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (dropout off, batch-norm on running statistics), its flags restored after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
