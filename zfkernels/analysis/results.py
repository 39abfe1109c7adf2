"""The projected result of a mining run: what `projection` computes and `gallery` draws.

Files (never pickle; `np.load(..., allow_pickle=False)` reads them), under ``<directory>/projections/``:

    index.json   {"format": PROJECTIONS_FORMAT, "kind": "zfkernels.projections",
                  "layers": [{"layer", "file", "path"}, ...] (forward order),
                  "names": {"<dataset index>": "<image name>"}, "manifest": {...}}
    <i>.npz      layer i: values (C, k) float32, images (C, k) int64, positions (C, k, 2) int64,
                 pixels (C, k, ch, h, w) float16 or float32 (kept as given), patches (C, k, ch, h, w) uint8,
                 boxes (C, k, 4) int64, origins (C, k, 2) int64

File names are indices, never layer names (user data). Arrays are stored in the dtypes they have in memory,
so save -> load gives the same tensors bit for bit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .mining import _atomic_write, _json_bytes

__all__ = ["PROJECTIONS_FORMAT", "LayerProjections", "ProjectedMining", "load_projections"]

PROJECTIONS_FORMAT = 1  # of projections/index.json and its npz files; bump on any incompatible change
PROJECTIONS_KIND = "zfkernels.projections"
PROJECTIONS_DIRECTORY = "projections"
INDEX_FILE = "index.json"
PATHS = ("deconvnet", "gradient")

# field -> (allowed dtypes, trailing shape after (C, k); None marks the window's (ch, h, w))
_FIELDS: dict[str, tuple[tuple[torch.dtype, ...], tuple[int, ...] | None]] = {
    "values": ((torch.float32,), ()),
    "images": ((torch.int64,), ()),
    "positions": ((torch.int64,), (2,)),
    "pixels": ((torch.float16, torch.float32), None),
    "patches": ((torch.uint8,), None),
    "boxes": ((torch.int64,), (4,)),
    "origins": ((torch.int64,), (2,)),
}


@dataclass
class LayerProjections:
    """One layer of a projected mining result; entry (c, r) is filter c's r-th strongest image.

    The window of an entry is the layer's receptive field at the image, of one size for the whole layer,
    placed at `origins` (its top-left in image coordinates, negative where it overhangs the image).
    Image channels `ch` are 1 or 3.
    """

    layer: str  # module name, e.g. "features.10"
    path: str  # "deconvnet" (the cropped fast path) or "gradient" (the exact gradient path)
    values: Tensor  # (C, k) float32, descending per filter; -inf where fewer than k images exist
    images: Tensor  # (C, k) int64 dataset indices, -1 in empty slots
    positions: Tensor  # (C, k, 2) int64 row and column in the layer's output map
    pixels: Tensor  # (C, k, ch, h, w) float16/float32: the projection in its window, zero outside the image
    patches: Tensor  # (C, k, ch, h, w) uint8 0..255: the displayed image under the window, 0 outside it
    boxes: Tensor  # (C, k, 4) int64 (top, left, bottom, right): the receptive field clipped to the image
    origins: Tensor  # (C, k, 2) int64 the window's top-left in image coordinates

    def __post_init__(self) -> None:
        if not isinstance(self.layer, str):
            raise TypeError(f"layer must be a str, got {type(self.layer).__name__}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS} (layer {self.layer!r}), got {self.path!r}")
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"{name} must be a torch.Tensor (layer {self.layer!r}), got {type(value).__name__}"
                )
        if self.values.dim() != 2 or 0 in self.values.shape:
            raise ValueError(
                f"values must have shape (C, k) with C, k >= 1 (layer {self.layer!r}), "
                f"got {tuple(self.values.shape)}"
            )
        channels, k = self.values.shape
        window = tuple(self.pixels.shape[2:])
        if len(window) != 3 or window[0] not in (1, 3) or 0 in window:
            raise ValueError(
                f"pixels must have shape ({channels}, {k}, ch, h, w) with ch 1 or 3 and h, w >= 1 "
                f"(layer {self.layer!r}), got {tuple(self.pixels.shape)}"
            )
        for name, (dtypes, trailing) in _FIELDS.items():
            tensor = getattr(self, name)
            expected = (channels, k, *(window if trailing is None else trailing))
            if tuple(tensor.shape) != expected:
                source = "C, k from values" + (", the window from pixels" if trailing is None else "")
                raise ValueError(
                    f"{name} must have shape {expected} ({source}; layer {self.layer!r}), "
                    f"got {tuple(tensor.shape)}"
                )
            if tensor.dtype not in dtypes:
                allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
                raise TypeError(f"{name} must be {allowed} (layer {self.layer!r}), got {tensor.dtype}")

    @property
    def filters(self) -> int:
        return self.values.shape[0]

    @property
    def k(self) -> int:
        return self.values.shape[1]

    @property
    def window(self) -> tuple[int, int]:
        """(h, w) of every entry's window."""
        return self.pixels.shape[-2], self.pixels.shape[-1]


@dataclass
class ProjectedMining:
    """Every projected layer of a mining run in forward order, with the image names and the run's manifest."""

    layers: dict[str, LayerProjections]
    names: dict[int, str]  # dataset index -> image name (user data: escape it wherever it is shown)
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, dict):
            raise TypeError(
                f"layers must be a dict of name -> LayerProjections, got {type(self.layers).__name__}"
            )
        for name, layer in self.layers.items():
            if not isinstance(layer, LayerProjections):
                raise TypeError(f"layers[{name!r}] must be a LayerProjections, got {type(layer).__name__}")
            if layer.layer != name:
                raise ValueError(f"layers[{name!r}] holds layer {layer.layer!r}: the key must be its name")
        if not isinstance(self.names, dict):
            raise TypeError(f"names must be a dict of dataset index -> name, got {type(self.names).__name__}")
        if not isinstance(self.manifest, dict):
            raise TypeError(f"manifest must be a dict, got {type(self.manifest).__name__}")

    def layer(self, name: str) -> LayerProjections:
        """The layer called `name`; a ValueError lists the known layers otherwise."""
        if name not in self.layers:
            known = ", ".join(map(repr, self.layers)) or "no layers"
            raise ValueError(f"layer {name!r} is not in the result; it has {known}")
        return self.layers[name]

    def name(self, index: int) -> str:
        """The image name of dataset index `index` (`#<index>` where unknown)."""
        return self.names.get(int(index), f"#{int(index)}")

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``projections/`` under `directory` (created if needed; each file replaced atomically, the
        index last); returns the ``projections`` directory."""
        target = Path(directory) / PROJECTIONS_DIRECTORY
        target.mkdir(parents=True, exist_ok=True)
        entries = []
        for index, (name, layer) in enumerate(self.layers.items()):
            arrays = {key: getattr(layer, key).detach().cpu().contiguous().numpy() for key in _FIELDS}
            file = f"{index}.npz"
            _atomic_write(target / file, lambda out, a=arrays: np.savez(out, **a))
            entries.append({"layer": name, "file": file, "path": layer.path})
        record = {
            "format": PROJECTIONS_FORMAT,
            "kind": PROJECTIONS_KIND,
            "layers": entries,
            "names": {str(i): str(n) for i, n in sorted(self.names.items())},
            "manifest": self.manifest,
        }
        _atomic_write(target / INDEX_FILE, lambda out: out.write(_json_bytes(record)))
        return target


def load_projections(directory: str | os.PathLike[str]) -> ProjectedMining:
    """Read what :meth:`ProjectedMining.save` wrote under `directory` (never unpickles anything).

    Another format version, or a file that does not match the index, is refused with a ValueError naming
    the file."""
    source = Path(directory) / PROJECTIONS_DIRECTORY
    index_path = source / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"no projections in {str(directory)!r} (expected {str(index_path)!r})")
    try:
        record = json.loads(index_path.read_text("utf-8"))
    except ValueError as error:
        raise ValueError(f"{str(index_path)!r} is not JSON: {error}") from error
    if not isinstance(record, dict) or record.get("kind") != PROJECTIONS_KIND:
        kind = record.get("kind") if isinstance(record, dict) else None
        raise ValueError(f"{str(index_path)!r} is not a {PROJECTIONS_KIND} index (kind {kind!r})")
    version = record.get("format")
    if version != PROJECTIONS_FORMAT:
        newer = isinstance(version, int) and version > PROJECTIONS_FORMAT
        raise ValueError(
            f"{str(index_path)!r} has format version {version!r}; this zfkernels reads format "
            f"{PROJECTIONS_FORMAT}"
            + (" (it was written by a newer zfkernels: upgrade to read it)" if newer else "")
        )
    layers: dict[str, LayerProjections] = {}
    for entry in record.get("layers", []):
        file = source / str(entry["file"])
        if file.parent != source:  # the index names files by index; anything else is not ours
            raise ValueError(f"{str(index_path)!r} names a file outside {str(source)!r}: {entry['file']!r}")
        try:
            with np.load(file, allow_pickle=False) as data:
                arrays = {key: torch.from_numpy(data[key].copy()) for key in _FIELDS}
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(
                f"{str(file)!r} (layer {entry['layer']!r}) is missing or incomplete: {error}"
            ) from error
        try:
            layers[entry["layer"]] = LayerProjections(layer=entry["layer"], path=entry["path"], **arrays)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{str(file)!r}: {error}") from error
    names = {int(i): n for i, n in record.get("names", {}).items()}
    return ProjectedMining(layers, names, record.get("manifest", {}))
