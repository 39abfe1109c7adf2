"""Projecting a mining result: every (layer, filter, rank) entry of the top-k tables, in pixel space.

Each image that appears in any table is loaded once and run forward once (one :meth:`DeconvNet.forward` for
all the layers), and all of its entries are projected from that forward in batched, receptive-field-cropped
passes (:meth:`ForwardPass.project_entries`): chain layers by the deconvnet, other layers (after a residual
add or a concatenation) by the exact gradient path. The work is split over the ranks of an initialized
``torch.distributed`` process group and summed back with collectives.

Determinism: the distinct images are cut into batches of ``batch_size`` in index order, and batch ``b`` runs
on rank ``b % world_size``. Every batch is the same whatever the number of processes, so every forward and
every projection is too: the result is bit for bit that of one process.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..deconvnet import DeconvNet
from .data import (
    Preprocess,
    Unreadable,
    current_rank_and_world_size,
    dataset_description,
    dataset_preprocessing,
    model_description,
    to_display,
)
from .mining import (
    Mining,
    _check_model_and_dataset,
    _first_image,
    _identity_differences,
    _image_tensor,
    _Indexed,
    _model_device_and_dtype,
    _stack,
)
from .results import LayerProjections, ProjectedMining

__all__ = ["ProjectionMismatchWarning", "project_mining"]

# How far a re-run activation may be from the mined value before it is reported: the forward's rounding
# differs between batch compositions (a few ulps of float32), a changed model or image differs far more.
VALUE_RTOL = 1e-3


class ProjectionMismatchWarning(UserWarning):
    """The activations of the projection's forward differ from the values mining recorded."""


@dataclass
class _Entries:
    """One layer's filled table slots, sorted by image: slot (filter, rank), dataset image, map position."""

    filters: np.ndarray  # (n,) int64
    ranks: np.ndarray  # (n,) int64
    images: np.ndarray  # (n,) int64, ascending
    positions: np.ndarray  # (n, 2) int64


def project_mining(
    mined: Mining,
    model: nn.Module,
    dataset: Dataset,
    *,
    layers: str | Sequence[str] | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    pixels_dtype: torch.dtype = torch.float32,
    display: Callable[[Tensor], Tensor] | None = None,
    progress: bool = True,
) -> ProjectedMining:
    """Project every entry of ``mined``'s top-k tables to pixel space, with the image patch it sees.

    ``model`` and ``dataset`` must be the ones mined (same weights, same images and preprocessing: checked
    against the mining's manifest where it has one). ``layers``: a subset of the mined layers (default all).
    Each entry's projection is cut to its layer's receptive-field window (the image's size for a layer that
    sees more than the image), stored as ``pixels_dtype``: float32 (the default) keeps
    :meth:`ForwardPass.project_entries`' values exactly; float16 halves the memory, but a projection whose
    magnitude is below float16's normal range (6e-5; common with untrained weights) loses precision or
    vanishes, so use it only for results of a known scale.
    ``display`` maps a batch of model inputs (N, C, H, W) to displayable images in [0, 1] for the patches;
    the default inverts the dataset's :class:`Preprocess` normalization (ImageNet mean/std when the
    dataset's preprocessing is unknown).

    Returns a :class:`ProjectedMining` (every rank of a process group gets the whole result).
    """
    if not isinstance(mined, Mining):
        raise TypeError(
            f"mined must be a zfkernels.analysis.Mining (from mine or load_mining), got {mined!r}"
        )
    _check_model_and_dataset(model, dataset)
    chosen = _chosen_layers(mined, layers)
    _check_int("batch_size", batch_size, 1)
    _check_int("num_workers", num_workers, 0)
    if pixels_dtype not in (torch.float16, torch.float32):
        raise TypeError(f"pixels_dtype must be torch.float32 or torch.float16, got {pixels_dtype!r}")
    if display is not None and not callable(display):
        raise TypeError(f"display must be callable (images -> [0, 1] images) or None, got {display!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")
    _check_same_run(mined, model, dataset)
    show = display if display is not None else _default_display(dataset)

    device, dtype = _model_device_and_dtype(model)
    deconvnet = DeconvNet(model)
    entries = {layer: _entries(mined[layer]) for layer in chosen}
    distinct = sorted({int(i) for e in entries.values() for i in np.unique(e.images).tolist()})
    if distinct and distinct[-1] >= len(dataset):  # type: ignore[arg-type]
        raise ValueError(
            f"mined refers to dataset index {distinct[-1]} but dataset has {len(dataset)} items: "  # type: ignore[arg-type]
            "project with the dataset that was mined"
        )
    channels, *image_size = mined.manifest.get("image_shape") or _first_image(dataset)[1].shape
    image_size = tuple(image_size)
    frames = {
        layer: _frame(deconvnet.receptive_field(layer, image_size).size, image_size) for layer in chosen
    }
    rank, world_size = current_rank_and_world_size()
    # One process writes every filled slot: no need to zero ~GBs first (a second pass of page faults on a
    # VM); only empty slots are zeroed, at the end. Ranks sum their arrays, so there every byte starts at 0.
    out = {
        layer: _empty_arrays(mined[layer].values.shape, channels, frames[layer], pixels_dtype, world_size > 1)
        for layer in chosen
    }
    largest_frame = (max(f[0] for f in frames.values()), max(f[1] for f in frames.values()))
    batches = [distinct[i : i + batch_size] for i in range(0, len(distinct), batch_size)]
    mine_ = [index for b, batch in enumerate(batches) if b % world_size == rank for index in batch]
    paths = {layer: deconvnet.path(layer) for layer in chosen}

    started = time.perf_counter()
    mismatched: dict[str, float] = {}
    loader = DataLoader(
        _Indexed(dataset),
        batch_size=batch_size,
        sampler=mine_,  # a rank's batches are whole global batches: b-th batch of mine_ = a global batch
        num_workers=num_workers,
        collate_fn=_collate,
    )
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(distinct),
        unit="img",
        desc="projecting" if world_size == 1 else f"projecting (rank 0 of {world_size})",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
    )
    try:
        for indices, images in loader:
            images = images.to(device, dtype)
            # A batch is a run of the sorted distinct images, so its entries are one run of each layer's
            # image-sorted entries (found by bisection: torch's small ops stall on a busy 2-core machine).
            runs = {layer: _run_of(entries[layer], indices) for layer in chosen}
            needed = [layer for layer in chosen if runs[layer].stop > runs[layer].start]
            forward = deconvnet.forward(images, needed)
            shown = (show(images).float().clamp(0, 1) * 255).round().to(torch.uint8)  # patches are 8-bit
            shown = _Padded(shown, largest_frame)
            for layer in needed:
                slot, run = entries[layer], runs[layer]
                filters, ranks = slot.filters[run], slot.ranks[run]
                in_batch = np.searchsorted(np.asarray(indices), slot.images[run])
                request = np.concatenate((in_batch[:, None], filters[:, None], slot.positions[run]), 1)
                projected = forward.project_entries(layer, torch.from_numpy(request).to(images.device))
                arrays, frame = out[layer], frames[layer]
                windows, origins = _reframed(projected.windows, projected.origins, frame)
                which = torch.from_numpy(in_batch).to(shown.maps.device)
                patches = shown.windows(which, origins.to(shown.maps.device), frame)
                where = (torch.from_numpy(filters), torch.from_numpy(ranks))
                arrays["pixels"][where] = windows.to("cpu", pixels_dtype)
                arrays["patches"][where] = patches.cpu()
                arrays["origins"][where] = origins.cpu()
                arrays["boxes"][where] = projected.boxes.cpu()
                recorded = mined[layer].values[where]
                _compare_values(layer, projected.values.cpu().float(), recorded, mismatched)
            bar.update(len(indices))
            del forward
    finally:
        bar.close()

    if world_size > 1:
        _sum_over_ranks(out, chosen)
    else:
        for layer in chosen:
            empty = mined[layer].images < 0
            if bool(empty.any()):
                for array in out[layer].values():
                    array[empty] = 0
    for layer, worst in mismatched.items():
        warnings.warn(
            f"layer {layer!r}: the projection's forward gives activations up to {worst:.3g} (relative) away "
            "from the values mining recorded: the model, the images or their preprocessing changed since "
            "mining, or the model is not deterministic",
            ProjectionMismatchWarning,
            stacklevel=2,
        )
    seconds = time.perf_counter() - started
    manifest = dict(mined.manifest)
    manifest["projection"] = {
        "layers": chosen,
        "paths": paths,
        "pixels_dtype": str(pixels_dtype).removeprefix("torch."),
        "distinct_images": len(distinct),
        "world_size": world_size,
        "seconds": round(seconds, 3),
    }
    result = {
        layer: LayerProjections(
            layer=layer,
            path=paths[layer],
            values=mined[layer].values.float(),
            images=mined[layer].images.long(),
            positions=mined[layer].positions.long(),
            **out[layer],
        )
        for layer in chosen
    }
    names = {index: mined.names.get(index, f"#{index}") for index in distinct}
    return ProjectedMining(result, names, manifest)


# ---------------------------------------------------------------------------------------------- arguments
def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _chosen_layers(mined: Mining, layers: str | Sequence[str] | None) -> list[str]:
    if layers is None:
        return list(mined.layers)
    chosen = [layers] if isinstance(layers, str) else list(layers)
    if not chosen:
        raise ValueError("layers is empty; pass None for every mined layer, or some of their names")
    unknown = [layer for layer in chosen if layer not in mined.tables]
    if unknown:
        raise ValueError(f"layers {unknown} were not mined; mined layers: {', '.join(mined.layers)}")
    return [layer for layer in mined.layers if layer in chosen]  # forward order, as mined


def _check_same_run(mined: Mining, model: nn.Module, dataset: Dataset) -> None:
    """Refuse a model or dataset other than the mined ones (where the mining's manifest records them)."""
    recorded = mined.manifest
    if not recorded.get("model") and not recorded.get("dataset"):
        return  # a Mining built by hand: nothing to compare
    current = {
        "model": model_description(model),
        "dataset": dataset_description(dataset),
        "preprocessing": dataset_preprocessing(dataset),
        "layers": recorded.get("layers"),
        "k": recorded.get("k"),
    }
    differences = _identity_differences(recorded, current)
    if differences:
        raise ValueError(
            f"the model and dataset given are not the ones mined: {'; '.join(differences)}. Project with the "
            "mined model (same weights) and dataset, or mine again"
        )


def _default_display(dataset: Dataset) -> Callable[[Tensor], Tensor]:
    """The inverse of the dataset's normalization: its Preprocess's, else ImageNet's mean/std."""
    base = dataset
    while hasattr(base, "dataset") and not hasattr(base, "transform"):  # Subset and similar wrappers
        base = base.dataset
    transform = getattr(base, "transform", None)
    if isinstance(transform, Preprocess):
        return transform.to_display
    return to_display


# ------------------------------------------------------------------------------------------------ entries
def _entries(table) -> _Entries:
    images = table.images.numpy()
    filters, ranks = np.nonzero(images >= 0)
    order = np.argsort(images[filters, ranks], kind="stable")
    filters, ranks = filters[order].astype(np.int64), ranks[order].astype(np.int64)
    positions = table.positions.numpy()[filters, ranks].astype(np.int64)
    return _Entries(filters, ranks, images[filters, ranks].astype(np.int64), positions)


def _run_of(entries: _Entries, batch: list[int]) -> slice:
    """The entries of a batch: a run of the sorted distinct images (so of the image-sorted entries)."""
    start = int(np.searchsorted(entries.images, batch[0], side="left"))
    return slice(start, int(np.searchsorted(entries.images, batch[-1], side="right")))


def _collate(items: list[tuple[int, object]]) -> tuple[list[int], Tensor]:
    indices, images = [], []
    for index, item in items:
        image = _image_tensor(item, index)
        if isinstance(image, Unreadable):
            raise ValueError(
                f"image {image.name!r} (dataset index {index}) cannot be read now ({image.reason}), but it "
                "was read when mining: the dataset changed"
            )
        indices.append(index)
        images.append(image)
    return indices, _stack(images)


# ------------------------------------------------------------------------------------------------ windows
def _frame(field_size: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int]:
    """The stored window: the receptive field's, but no larger than the image (all of a projection lies in
    the image, so a wider field would only store zeros)."""
    return min(field_size[0], image_size[0]), min(field_size[1], image_size[1])


def _reframed(windows: Tensor, origins: Tensor, frame: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Windows of the receptive field's size moved into ``frame``-sized ones: along an axis where the field
    is wider than the image, the frame is the image (origin 0); elsewhere unchanged."""
    if tuple(windows.shape[-2:]) == frame:
        return windows, origins
    wider = torch.tensor([windows.shape[-2] > frame[0], windows.shape[-1] > frame[1]], device=origins.device)
    moved = torch.where(wider, torch.zeros_like(origins), origins)
    every = torch.arange(windows.shape[0], device=windows.device)
    return _windows_at(windows, every, moved - origins, frame), moved


def _windows_at(source: Tensor, which: Tensor, origins: Tensor, frame: tuple[int, int]) -> Tensor:
    """``frame``-sized windows of the (B, C, H, W) ``source``: window i of map ``which[i]`` with its top-left
    at ``origins[i]`` (row, col; may lie outside the map), zero where it leaves the map. (n, C, fh, fw)."""
    return _Padded(source, frame).windows(which, origins, frame)


class _Padded:
    """Maps zero-padded by ``margin`` on every side, so that windows up to that size can be cut anywhere
    they meet the map, by one indexing of a strided view of every window (no copy until the index): 5-7x
    faster here than a loop of slices, which pays Python and a small copy per window. Made once per batch
    for the patches of every layer."""

    def __init__(self, source: Tensor, margin: tuple[int, int]):
        self.margin, self.size = margin, tuple(source.shape[-2:])
        self.maps = F.pad(source, (margin[1], margin[1], margin[0], margin[0])).contiguous()

    def windows(self, which: Tensor, origins: Tensor, frame: tuple[int, int]) -> Tensor:
        (fh, fw), (mh, mw), (height, width) = frame, self.margin, self.size
        if fh > mh or fw > mw:
            raise ValueError(f"window {frame} is larger than the padding {self.margin}")
        batch, channels, padded_h, padded_w = self.maps.shape
        stride_b, stride_c, stride_h, stride_w = self.maps.stride()
        every_window = self.maps.as_strided(
            (batch, padded_h - fh + 1, padded_w - fw + 1, channels, fh, fw),
            (stride_b, stride_h, stride_w, stride_c, stride_h, stride_w),
        )
        rows = origins[:, 0].clamp(-fh, height) + mh  # further out, the window is all padding either way
        cols = origins[:, 1].clamp(-fw, width) + mw
        return every_window[which, rows, cols]


def _empty_arrays(
    table_shape: torch.Size, channels: int, frame: tuple[int, int], pixels_dtype: torch.dtype, zeroed: bool
) -> dict[str, Tensor]:
    filters, k = table_shape
    new = torch.zeros if zeroed else torch.empty
    return {
        "pixels": new((filters, k, channels, *frame), dtype=pixels_dtype),
        "patches": new((filters, k, channels, *frame), dtype=torch.uint8),
        "boxes": new((filters, k, 4), dtype=torch.int64),
        "origins": new((filters, k, 2), dtype=torch.int64),
    }


def _compare_values(layer: str, values: Tensor, mined: Tensor, worst: dict[str, float]) -> None:
    if values.numel() == 0:
        return
    scale = mined.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    error = float(((values - mined).abs() / torch.maximum(mined.abs(), scale * 1e-3)).max())
    if not error <= VALUE_RTOL:  # NaN counts as a mismatch
        worst[layer] = max(worst.get(layer, 0.0), error) if not math.isnan(error) else math.inf


# -------------------------------------------------------------------------------------------- distributed
def _sum_over_ranks(out: dict[str, dict[str, Tensor]], layers: list[str]) -> None:
    """Every slot was written by exactly one rank and is zero (all bits) on the others, so summing the
    arrays' bit patterns as integers gives every rank the whole result, bit for bit, in any dtype."""
    import torch.distributed as dist

    as_integers = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for layer in layers:
        for array in out[layer].values():
            bits = array.view(as_integers[array.element_size()]) if array.dtype.is_floating_point else array
            if bits.element_size() < 4:  # gloo sums no 8- or 16-bit integers: in int32, then back
                wide = bits.to(torch.int32)
                dist.all_reduce(wide)
                bits.copy_(wide)
            else:
                dist.all_reduce(bits)
