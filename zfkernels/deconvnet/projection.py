"""``DeconvNet(model).project(images, layer)``: single activations projected to pixel space (Zeiler & Fergus).

For every image and every chosen filter of ``layer``, the strongest activation (or the ``top`` strongest)
is kept alone, at its value, and sent down the paper's chain: unpool with the switches recorded on the way
up (summing where overlapping windows share an argmax), ReLU, transposed conv with the same weights and no
bias; normalization, batch-norm, dropout and identity layers are skipped. The result equals the
activation's value times its gradient w.r.t. the input with every ReLU's backward replaced by ReLU of the
gradient (captum's ``NeuronDeconvolution`` times the value) when no batch-norm or local response
normalization lies on the path; with one, that gradient with the layer's backward taken as the identity
(see :meth:`DeconvNet.project`).

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .._extension import DTYPE_CODES, cpu_module, output_empty
from .chain import Chain, ChainForward, Conv, LayerChains, MaxPool, ReLU, check_against_model
from .receptive_field import ReceptiveField, window_below

Pair = tuple[int, int]

__all__ = ["DeconvNet", "Projection"]

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
    receptive field (its ``size`` is the side of the windows :meth:`crops` and :meth:`patches` return).
    """

    pixels: Tensor
    values: Tensor
    positions: Tensor
    boxes: Tensor
    layer: str
    filters: list[int]
    receptive_field: ReceptiveField

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


# -------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class _Step:
    """One batched step on the windows: [ReLU] [unpool [ReLU]] [transposed conv]."""

    in_size: Pair  # (H, W) of the map the step's input windows live in (what lies outside is zeroed)
    in_window: Pair
    out_window: Pair
    pre_relu: bool
    pool: MaxPool | None
    pool_index: int  # chain index of `pool` (its switches), -1 without one
    post_relu: bool
    conv: Conv | None


@dataclass(frozen=True)
class _Plan:
    """How to project one layer's activations at one image size."""

    seed: list[tuple[str, MaxPool | None, int]]  # ("relu" | "unpool", pool, chain index) above the first conv
    seed_conv: Conv | None  # the first transposed conv: the value times one filter's weights
    steps: list[_Step]
    shared_steps: int  # leading steps without an unpool: image-independent, run once per filter and clipping
    channels: int  # image channels
    bytes_per_projection: int  # peak intermediate memory of one projection


def _plan(chain: Chain, sizes: list[Pair], image_size: Pair, channels: int, itemsize: int) -> _Plan:
    """Group the backward ops into batched steps and size every window."""

    def size_below(index: int) -> Pair:
        return sizes[index - 1] if index > 0 else image_size

    def below(window: Pair, op: Conv | MaxPool) -> Pair:
        return tuple(
            window_below(0, window[i], op.kernel[i], op.stride[i], op.padding[i])[1] for i in range(2)
        )

    backward: list[tuple[str, Conv | MaxPool | None, int]] = []
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

    while i < len(backward):
        in_window, in_size, in_channels = window, level, level_channels
        pre_relu = post_relu = False
        pool, pool_index, conv = None, -1, None
        elements = in_channels * in_window[0] * in_window[1]
        while kind(i) == "relu":
            pre_relu, i = True, i + 1
        if kind(i) == "unpool":
            _, pool, pool_index = backward[i]
            window, level, i = below(window, pool), size_below(pool_index), i + 1
            elements += in_channels * window[0] * window[1]  # the unpooled window (the reference backend's)
            while kind(i) == "relu":
                post_relu, i = True, i + 1
        if kind(i) == "conv":
            _, conv, index = backward[i]
            window, level, level_channels, i = below(window, conv), size_below(index), conv.in_channels, i + 1
            elements += level_channels * window[0] * window[1]
        peak = max(peak, elements)
        steps.append(_Step(in_size, in_window, window, pre_relu, pool, pool_index, post_relu, conv))
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


def _padded(switches: Tensor, window: Pair) -> Tensor:
    """Switches padded by a window on every side, so any window that meets the map can be sliced."""
    h, w = window
    return F.pad(switches, (w, w, h, h))


def _gather_windows(padded: Tensor, image_index: Tensor, origin: Tensor, window: Pair) -> Tensor:
    """(n, C, h, w): each projection's window of its own image's (padded) switches.

    One slice copy per projection: each is small enough to run inline, where a single advanced-indexing
    gather measured 3-4x slower (it waits on the thread pool)."""
    h, w = window
    out = padded.new_empty((origin.shape[0], padded.shape[1], h, w))
    rows, cols = (origin[:, 0] + h).tolist(), (origin[:, 1] + w).tolist()
    for i, (image, row, col) in enumerate(zip(image_index.tolist(), rows, cols, strict=True)):
        out[i] = padded[image, :, row : row + h, col : col + w]
    return out


class DeconvNet:
    """Zeiler & Fergus's deconvnet over a CNN: project single activations of any conv/ReLU/pool layer.

    ``model`` is any module whose path from the input to the chosen layer is a chain of ``nn.Conv2d``,
    ReLUs (``nn.ReLU``, ``zfkernels.nn.ReLU``, ``F.relu``, ``torch.relu``...), max-pools (``nn.MaxPool2d``,
    ``F.max_pool2d``, ``zfkernels.nn.MaxPool2dSwitches``) and layers the projection skips:
    ``nn.LocalResponseNorm`` (the paper skips normalization), ``nn.BatchNorm2d`` (affine at test time, and
    skipped like normalization: so the projection is not captum's ``NeuronDeconvolution`` there, see
    :meth:`project`), ``nn.Dropout*`` and ``nn.Identity``. The path is read by ``torch.fx``
    tracing of the model, so the forward's own order counts, not the registration order. Zeiler & Fergus's
    ZFNet, torchvision's AlexNet and VGG work as shipped (layer names such as ``"features.10"``).

    The model is run in eval mode while projecting (its training flags are restored afterwards). With
    ``check=True`` the model's own forward is run on the first image up to the layer, and the chain's
    activation must match it: a guard against anything the chain cannot see (for an fx-traced model, once
    per layer and image size; for a model read in registration order, on every call). The structure is
    read once, here (build a new DeconvNet after replacing layers); weights are read at each call.
    ``chunk_bytes`` bounds the intermediate memory of a batch of projections (the output comes on top).
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

    def layers(self) -> list[str]:
        """Names of the layers whose activations can be projected, in forward order."""
        return self._chains.projectable()

    def chain(self, layer: str) -> Chain:
        """The chain of ops from the input to ``layer``."""
        return self._chains.chain(layer)

    def receptive_field(self, layer: str) -> ReceptiveField:
        """The receptive field of one activation of ``layer`` in the input image."""
        return self.chain(layer).receptive_field

    def project(
        self,
        images: Tensor,
        layer: str,
        filters: int | Sequence[int] | Tensor | None = None,
        top: int = 1,
    ) -> Projection:
        """Project the ``top`` strongest activations of each filter of ``layer``, per image, to pixel space.

        ``images``: (B, C, H, W) in the model's dtype and device. ``filters``: a channel index, a sequence
        (or 1-D integer tensor or array) of them, or None for all channels of ``layer``'s output. ``top``:
        how many activations per image and filter, at distinct positions, strongest first (ties: first in
        row-major order). Returns a :class:`Projection` whose ``pixels`` are (B, F, top, C, H, W).

        What a projection equals: the activation's value times its deconvnet gradient w.r.t. the image
        (every ReLU's backward replaced by ReLU of the gradient, every max-pool's by the unpool that sums at
        shared argmaxes), i.e. captum's ``NeuronDeconvolution`` times the value, exactly when the path from
        the input to ``layer`` has no batch-norm (``nn.BatchNorm2d``) and no local response normalization
        (``nn.LocalResponseNorm``, ``nn.CrossMapLRN2d``, ``F.local_response_norm``). Those layers run on the
        way up but are skipped on the way down, as the paper skips normalization: the projection passes the
        signal through them unchanged, where the gradient would be scaled per channel by
        ``weight / sqrt(running_var + eps)`` (batch-norm in eval mode) or multiplied by LRN's Jacobian. With
        one on the path, the projection equals the value times the deconvnet gradient of the same model in
        which each such layer's backward is the identity (its forward unchanged), and differs from
        ``NeuronDeconvolution`` (by 73% at ResNet18's ``layer1.0.conv2``, batch-norm statistics gathered on
        random images). Dropout (the model is projected in eval mode) and ``nn.Identity`` are the identity
        both ways and change nothing.

        Images with a NaN or inf raise ValueError before anything runs (a projection of a non-finite image
        is undefined); so do NaN/inf activations of the filters asked for (a NaN parameter, an overflow),
        once the chain has run.
        """
        chain = self.chain(layer)
        sizes = self._check_images(images, chain)
        channels = chain.out_channels(images.shape[1])
        selected = _filter_list(filters, channels, layer)
        positions_available = sizes[-1][0] * sizes[-1][1] if sizes else images.shape[-2] * images.shape[-1]
        top_index = _as_index(top)  # numpy and 0-d tensor integers are ints too, as for filters
        if top_index is None:
            raise TypeError(f"top must be an int, got {top!r}")
        top = top_index
        if not 1 <= top <= positions_available:
            raise ValueError(
                f"top must be in 1..{positions_available} (the positions in the output of layer {layer!r}), "
                f"got {top}"
            )
        with _eval_mode(self.model), torch.no_grad():
            record = chain.forward(images)
            _check_finite_activations(record.activation, selected, layer)
            key = (layer, tuple(images.shape[1:]), images.dtype, images.device)
            if self.check and images.shape[0] > 0 and key not in self._checked:
                check_against_model(self.model, chain, images[:1], record.activation[:1])
                if chain.traced:  # a traced chain is the forward's structure: once per layer and size
                    self._checked.add(key)
            return self._project(chain, record, images, layer, selected, top)

    # ------------------------------------------------------------------------------------------ internals
    def _check_images(self, images: Tensor, chain: Chain) -> list[Pair]:
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
        non_finite = ~torch.isfinite(images)
        if bool(non_finite.any()):
            count = int(non_finite.sum())
            which = non_finite.flatten(1).any(1).nonzero().flatten().tolist()
            shown = ", ".join(map(str, which[:8])) + (", ..." if len(which) > 8 else "")
            raise ValueError(
                f"images contains {_counted(count, 'NaN/inf value')} (in {_counted(len(which), 'image')}: "
                f"{shown}); a projection of a non-finite image is undefined"
            )
        return chain.sizes((images.shape[-2], images.shape[-1]))

    def _project(
        self, chain: Chain, record: ChainForward, images: Tensor, layer: str, filters: list[int], top: int
    ) -> Projection:
        batch, channels, height, width = images.shape
        count = len(filters)
        activation = record.activation
        flat = activation[:, filters].flatten(2)  # (B, F, h * w)
        map_width = activation.shape[-1]
        # Stable descending sort: equal activations keep row-major order, the first one wins (as max-pool).
        values, order = torch.sort(flat, dim=-1, descending=True, stable=True)
        values, order = values[..., :top].contiguous(), order[..., :top]
        positions = torch.stack((order // map_width, order % map_width), dim=-1)
        field = chain.receptive_field
        boxes = chain.input_boxes(positions, (height, width))
        # From the output cache: a repeated projection reuses the last one's faulted-in block (zeroing it
        # costs a tenth of faulting 1.4 GB of fresh pages in again).
        pixels = output_empty((batch, count, top, channels, height, width), images).zero_()
        if batch > 0:
            plan = _plan(chain, record.sizes, (height, width), channels, images.element_size())
            filter_index = torch.tensor(filters, dtype=torch.int64, device=images.device)
            # Filter-major order: a chunk then holds the same filters for several images, whose
            # image-independent top steps are shared (see _seed).
            order = torch.arange(batch * count * top, device=images.device)
            order = order.view(batch, count, top).transpose(0, 1).reshape(-1)
            self._run(
                plan,
                record,
                pixels.view(-1, channels, height, width),
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
        out: Tensor,
        order: Tensor,
        image_index: Tensor,
        channel: Tensor,
        value: Tensor,
        position: Tensor,
    ) -> None:
        """Project ``out.shape[0]`` activations into ``out``, chunk by chunk in the given ``order``."""
        chunk = max(1, self.chunk_bytes // max(plan.bytes_per_projection, 1))
        # The padded switches are shared by all chunks: pad them once.
        padded = {
            step.pool_index: _padded(record.switches[step.pool_index], step.in_window)
            for step in plan.steps
            if step.pool is not None
        }
        for start in range(0, order.shape[0], chunk):
            index = order[start : start + chunk]
            images = image_index[index]
            window, origin = _seed(plan, record, images, channel[index], value[index], position[index])
            for step in plan.steps[plan.shared_steps :]:
                window, origin = _run_step(step, window, origin, images, padded)
            _paste(out, index.tolist(), window, origin)


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
    for kind, pool, index in plan.seed:
        if kind == "unpool":
            switch = record.switches[index][image_index, channel, row, col].to(torch.int64)
            row = row * pool.stride[0] - pool.padding[0] + switch // pool.kernel[1]
            col = col * pool.stride[1] - pool.padding[1] + switch % pool.kernel[1]
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
    unique, inverse = torch.unique(torch.cat(keys, dim=1), dim=0, return_inverse=True)
    first = torch.full((unique.shape[0],), count, dtype=torch.int64, device=value.device)
    first.scatter_reduce_(0, inverse, torch.arange(count, device=value.device), reduce="amin")
    window, unit_origin = conv.weight.index_select(0, unique[:, 0]), origin[first]
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
    step: _Step, window: Tensor, origin: Tensor, image_index: Tensor, padded: dict[int, Tensor]
) -> tuple[Tensor, Tensor]:
    """One step on a batch of windows: the output windows and their origins."""
    window = _outside_zeroed(window, origin, step.in_size)
    if step.pre_relu:
        window = ops.relu(window)
    pool, conv = step.pool, step.conv
    if pool is not None:
        switches = _gather_windows(padded[step.pool_index], image_index, origin, step.in_window)
        unpooled = tuple((step.in_window[i] - 1) * pool.stride[i] + pool.kernel[i] for i in range(2))
        if conv is None:
            window = ops.max_unpool2d(
                window, switches, pool.kernel, pool.stride, 0, unpooled, relu=step.post_relu
            )
        else:
            window = ops.unpool_conv_transpose2d(
                window,
                switches,
                conv.weight,
                pool_kernel_size=pool.kernel,
                pool_stride=pool.stride,
                pool_padding=0,
                unpool_size=unpooled,
                stride=conv.stride,
                padding=0,
                relu=step.post_relu,
            )
    elif conv is not None:
        window = ops.conv_transpose2d(window, conv.weight, None, conv.stride, 0)
    return window, _origin_below(step, origin)


# Each copy stays below torch's parallel grain size (32768 elements), so it runs inline on the calling
# thread: thousands of small parallel copies would each wait on an OpenMP barrier, which costs far more
# than the copy on a busy machine.
_PASTE_BLOCK = 16384


def _paste(out: Tensor, targets: list[int], window: Tensor, origin: Tensor) -> None:
    """Write window ``i`` into ``out[targets[i]]`` (image-sized) at its origin, clipped at the borders.

    On the CPU the extension's kernel copies all windows in one call (rows as memcpy, windows in parallel);
    elsewhere, slice by slice."""
    height, width = out.shape[-2:]
    channels, h, w = window.shape[-3:]
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
            DTYPE_CODES[out.dtype],
            len(targets),
            channels,
            (h, w),
            (height, width),
            math.prod(out.shape[:-3]),
            torch.get_num_threads(),
        )
        return
    for i, (target, (top, left)) in enumerate(zip(targets, origin.tolist(), strict=True)):
        t, lo, b, r = max(top, 0), max(left, 0), min(top + h, height), min(left + w, width)
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
