"""Data and models for the analysis tools: image datasets, the model's preprocessing, fingerprints, per-rank
shards, and model + weights loading.

Everything here is shared by mining, projection and the CLI:

- :class:`ImageFolderDataset` reads JPEG/PNG files found recursively under a folder, in a stable order
  (sorted relative paths), and returns an :class:`Unreadable` marker, not an exception, for a file that
  does not decode, so a long run is never aborted by one bad file.
- :class:`Preprocess` is the model's preprocessing (resize the shorter side, center-crop, scale to [0, 1],
  normalize), with :meth:`Preprocess.to_display` as its inverse for showing patches.
- :func:`dataset_fingerprint` and :func:`weights_fingerprint` identify a run's inputs cheaply, so a resumed
  run or an output directory can be checked against them.
- :func:`shard_indices` / :class:`ShardSampler` split a dataset over ``torch.distributed`` ranks without
  padding or duplicates.
- :func:`load_model` builds ``"zfnet"`` or any torchvision classification model by name and loads weights
  with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler, Subset, TensorDataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "Preprocess",
    "ShardSampler",
    "Unreadable",
    "current_rank_and_world_size",
    "dataset_description",
    "dataset_fingerprint",
    "dataset_preprocessing",
    "default_preprocessing",
    "describe_preprocessing",
    "image_name",
    "load_model",
    "load_weights",
    "model_description",
    "model_names",
    "shard_indices",
    "to_display",
    "weights_fingerprint",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # compared lower-cased: .JPG and .Png count too
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ZFNET_NAME = "zfnet"
_INTERPOLATIONS = ("bilinear", "bicubic")


# --------------------------------------------------------------------------------------------- markers
@dataclass(frozen=True)
class Unreadable:
    """What a dataset returns for an image that cannot be decoded: its name and why.

    Mining skips it with a warning that names the file and records it in the manifest's ``skipped`` list.
    """

    name: str
    reason: str


# ------------------------------------------------------------------------------------------ preprocessing
@dataclass(frozen=True)
class Preprocess:
    """A model's preprocessing: PIL image -> normalized (3, crop, crop) float32 tensor.

    Resize so the shorter side is ``resize`` (the longer side scaled and truncated to an int, with PIL's
    antialiasing ``interpolation``), center-crop ``crop`` x ``crop``, scale to [0, 1], subtract ``mean`` and
    divide by ``std`` per channel. With the defaults this is torchvision's ImageNet evaluation transform
    (``Resize(256)``, ``CenterCrop(224)``, ``ToTensor()``, ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``),
    which ZFNet and torchvision's classification models expect, and gives the same tensor bit for bit.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize}), the shorter side")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std must have 3 entries (RGB), got {self.mean} and {self.std}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")

    def __call__(self, image: Any) -> Tensor:
        """The (3, crop, crop) float32 tensor of a PIL image (converted to RGB first)."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
        image = image.convert("RGB")
        width, height = image.size
        # torchvision's Resize(int): the shorter side becomes `resize`, the longer one scaled and truncated.
        if width <= height:
            size = (self.resize, int(self.resize * height / width))
        else:
            size = (int(self.resize * width / height), self.resize)
        resample = Image.Resampling.BILINEAR if self.interpolation == "bilinear" else Image.Resampling.BICUBIC
        if size != (width, height):
            image = image.resize(size, resample)
        top = int(round((size[1] - self.crop) / 2.0))  # torchvision's CenterCrop rounding
        left = int(round((size[0] - self.crop) / 2.0))
        image = image.crop((left, top, left + self.crop, top + self.crop))
        import numpy as np

        pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        tensor = pixels.to(torch.float32).div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return tensor.sub_(mean).div_(std)

    def to_display(self, image: Tensor) -> Tensor:
        """The inverse of the normalization, clamped to [0, 1]: ``(C, H, W)`` or ``(N, C, H, W)`` float."""
        return to_display(image, mean=self.mean, std=self.std)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description, recorded in manifests (equal descriptions, equal preprocessing)."""
        return {
            "kind": "resize-center-crop-normalize",
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


def to_display(
    image: Tensor, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """Undo the per-channel normalization of ``image`` ((C, H, W) or (N, C, H, W)) and clamp to [0, 1]."""
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() not in (3, 4) or image.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(
            f"image must be (C, H, W) or (N, C, H, W) with C = {len(mean)} (the mean/std entries), "
            f"got shape {tuple(image.shape)}"
        )
    dtype = image.dtype if image.dtype.is_floating_point else torch.float32
    shape = (len(mean), 1, 1)
    mean_t = torch.tensor(tuple(mean), dtype=dtype, device=image.device).view(shape)
    std_t = torch.tensor(tuple(std), dtype=dtype, device=image.device).view(shape)
    return (image.to(dtype) * std_t + mean_t).clamp_(0.0, 1.0)


def default_preprocessing(model_name: str | None = None) -> Preprocess:
    """The preprocessing a model expects: 256/224 ImageNet for ZFNet (and None); for a torchvision model
    the resize, crop, interpolation and mean/std of its weights' metadata (e.g. 342/299 for inception_v3),
    read without downloading anything; 256/224 ImageNet where torchvision has none."""
    if model_name is None or model_name.lower() == ZFNET_NAME:
        return Preprocess()
    name = _canonical_model_name(model_name)
    import torchvision

    try:
        transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError):  # no weights enum: the ImageNet default
        return Preprocess()
    interpolation = str(getattr(transforms, "interpolation", "bilinear")).rsplit(".", 1)[-1].lower()
    return Preprocess(
        resize=int(transforms.resize_size[0]),
        crop=int(transforms.crop_size[0]),
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
        interpolation=interpolation if interpolation in _INTERPOLATIONS else "bilinear",
    )


def describe_preprocessing(transform: object) -> Any:
    """A stable, JSON-able description of a transform: its ``describe()`` if it has one, the qualified name
    of a function or class, else its ``repr`` with memory addresses removed (they change between runs)."""
    if transform is None:
        return None
    describe = getattr(transform, "describe", None)
    if callable(describe):
        return describe()
    if inspect.isfunction(transform) or inspect.isclass(transform) or inspect.ismethod(transform):
        return f"{transform.__module__}.{transform.__qualname__}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


# ----------------------------------------------------------------------------------------------- datasets
class ImageFolderDataset(Dataset):
    """The JPEG/PNG images under ``root`` (recursively; extensions case-insensitive), in the order of their
    relative paths, each returned as ``transform(PIL image)``.

    ``transform`` defaults to :class:`Preprocess` (ImageNet 256/224). An image that fails to decode comes
    back as an :class:`Unreadable` (its relative path and the decoder's error), not an exception: mining
    skips it with a warning. Errors raised by ``transform`` itself propagate (a broken transform is a bug,
    not a bad file). ``name(i)`` is the relative path (``/``-separated) of image ``i``.

    The file list (and each file's size, for :meth:`fingerprint`) is read once, here: indices stay stable
    as long as the folder's contents do. A folder that does not exist or holds no image is a ValueError.
    """

    def __init__(self, root: str | os.PathLike[str], transform: Callable[[Any], Any] | None = None):
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
        if transform is not None and not callable(transform):
            raise TypeError(
                f"transform must be callable (PIL image -> tensor), got {type(transform).__name__}"
            )
        self.root = Path(root)
        if not self.root.exists():
            raise ValueError(f"image folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} is not a directory")
        self.transform = Preprocess() if transform is None else transform
        self.paths: list[str] = []
        for directory, subdirectories, files in os.walk(self.root):
            subdirectories.sort()
            for file in files:
                if os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
                    self.paths.append(Path(directory, file).relative_to(self.root).as_posix())
        self.paths.sort()  # sorted relative paths: the order (and so every index) is the folder's, not os's
        if not self.paths:
            raise ValueError(
                f"image folder {str(self.root)!r} holds no image (looked recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)} files, any case)"
            )
        self.sizes = [self._size(path) for path in self.paths]

    def _size(self, relative: str) -> int:
        try:
            return (self.root / relative).stat().st_size
        except OSError:  # a dangling link: still listed, reported unreadable when read
            return -1

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        """The relative path of image ``index``."""
        return self.paths[index]

    def __getitem__(self, index: int) -> Any:
        from PIL import Image

        path = self.root / self.paths[index]
        try:
            with Image.open(path) as opened:
                opened.load()  # decode now: a truncated or corrupt file fails here, not in the transform
                image = opened.convert("RGB")
        except Exception as error:  # noqa: BLE001  (any decoder failure means: this file is unreadable)
            return Unreadable(self.paths[index], f"{type(error).__name__}: {error}")
        return self.transform(image)

    def fingerprint(self) -> str:
        """sha256 over the sorted relative paths and file sizes: cheap (no file is read), and it changes
        when a file is added, removed, renamed or resized."""
        digest = hashlib.sha256(b"zfkernels.ImageFolderDataset\0")
        for path, size in zip(self.paths, self.sizes, strict=True):
            digest.update(f"{path}\0{size}\0".encode())
        return digest.hexdigest()

    def describe_preprocessing(self) -> Any:
        return describe_preprocessing(self.transform)

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, {len(self)} images)"


# scikit-image's bundled photos (no download): the default images of `zfkernels visualize` and of the
# README's figure. Grayscale ones are shown to the model as RGB.
SAMPLE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "coins",
    "page",
    "text",
    "cell",
    "brick",
    "grass",
    "gravel",
    "moon",
    "clock",
)


class SamplePhotos(Dataset):
    """The real photos scikit-image ships (:data:`SAMPLE_PHOTOS`: an astronaut, a cat, coffee, a rocket, a
    retina, coins, textures...), each as ``transform(RGB PIL image)`` (default :class:`Preprocess`).

    A small dataset that needs no download, for trying the analysis tools and for tests; ``name(i)`` is the
    photo's name in ``skimage.data`` (e.g. ``"astronaut"``).
    """

    def __init__(self, transform: Callable[[Any], Any] | None = None):
        try:
            import skimage.data
        except ImportError as error:
            raise ImportError(
                "SamplePhotos needs scikit-image (pip install scikit-image); or pass your own images"
            ) from error
        if transform is not None and not callable(transform):
            raise TypeError(
                f"transform must be callable (PIL image -> tensor), got {type(transform).__name__}"
            )
        self._data = skimage.data
        self.transform = Preprocess() if transform is None else transform

    def __len__(self) -> int:
        return len(SAMPLE_PHOTOS)

    def name(self, index: int) -> str:
        return SAMPLE_PHOTOS[index]

    def __getitem__(self, index: int) -> Any:
        import numpy as np
        from PIL import Image

        pixels = np.asarray(getattr(self._data, SAMPLE_PHOTOS[index])())
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        return self.transform(Image.fromarray(pixels[:, :, :3]))

    def fingerprint(self) -> str:
        import skimage

        return f"skimage {skimage.__version__}: {','.join(SAMPLE_PHOTOS)}"

    def describe_preprocessing(self) -> Any:
        return describe_preprocessing(self.transform)

    def __repr__(self) -> str:
        return f"SamplePhotos({len(self)} scikit-image photos)"


def image_name(dataset: Dataset, index: int) -> str:
    """A name for item ``index``: the relative path for :class:`ImageFolderDataset`, ``name(i)`` for a
    dataset with a ``name`` method (:class:`SamplePhotos`), ``samples[i][0]`` for torchvision's
    ``ImageFolder``/``DatasetFolder``, the base dataset's name through a ``Subset``, else ``"#<index>"``."""
    if isinstance(dataset, ImageFolderDataset) or callable(getattr(dataset, "name", None)):
        return str(dataset.name(index))  # type: ignore[attr-defined]
    if isinstance(dataset, Subset):
        return image_name(dataset.dataset, int(dataset.indices[index]))
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, Sequence) and 0 <= index < len(samples):
        sample = samples[index]
        if isinstance(sample, (tuple, list)) and sample and isinstance(sample[0], (str, os.PathLike)):
            return os.fspath(sample[0])
    return f"#{index}"


def dataset_fingerprint(dataset: Dataset) -> str:
    """A sha256 that changes when the dataset's contents (probably) do, computed without reading images.

    - :class:`ImageFolderDataset`: sorted relative paths and file sizes.
    - a dataset with a ``fingerprint()`` method: its result (define one for your own datasets).
    - torchvision ``DatasetFolder``/``ImageFolder`` (``samples``): paths relative to ``root``, file sizes
      and targets.
    - ``TensorDataset``: every tensor's shape, dtype and bytes. ``Subset``: the base's and the indices.
    - anything else: class name and length only (weak: it cannot see a changed item).
    """
    digest = hashlib.sha256(f"{type(dataset).__module__}.{type(dataset).__qualname__}\0".encode())
    digest.update(f"{_length(dataset)}\0".encode())
    custom = getattr(dataset, "fingerprint", None)
    if callable(custom):
        digest.update(str(custom()).encode())
    elif isinstance(dataset, Subset):
        digest.update(dataset_fingerprint(dataset.dataset).encode())
        digest.update(",".join(str(int(i)) for i in dataset.indices).encode())
    elif isinstance(dataset, TensorDataset):
        for tensor in dataset.tensors:
            _hash_tensor(digest, tensor)
    elif isinstance(getattr(dataset, "samples", None), Sequence):
        root = getattr(dataset, "root", None)
        for sample in dataset.samples:
            path = os.fspath(sample[0]) if isinstance(sample, (tuple, list)) else str(sample)
            relative = os.path.relpath(path, root) if root is not None else path
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1
            rest = sample[1:] if isinstance(sample, (tuple, list)) else ()
            digest.update(f"{relative}\0{size}\0{rest!r}\0".encode())
    return digest.hexdigest()


def dataset_description(dataset: Dataset) -> dict[str, Any]:
    """What a manifest records about a dataset: class, length, fingerprint (and root, when it has one)."""
    description: dict[str, Any] = {
        "class": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
        "length": _length(dataset),
        "fingerprint": dataset_fingerprint(dataset),
    }
    root = getattr(dataset, "root", None)
    if isinstance(root, (str, os.PathLike)):
        description["root"] = os.fspath(root)
    return description


def dataset_preprocessing(dataset: Dataset) -> Any:
    """The description of the preprocessing a dataset applies (its ``transform``), or None if unknown."""
    own = getattr(dataset, "describe_preprocessing", None)
    if callable(own):
        return own()
    if isinstance(dataset, Subset):
        return dataset_preprocessing(dataset.dataset)
    return describe_preprocessing(getattr(dataset, "transform", None))


def _length(dataset: Dataset) -> int:
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"dataset must be a map-style dataset with __len__ and __getitem__, got {type(dataset).__name__}"
        ) from None


def _hash_tensor(digest: Any, tensor: Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
    if tensor.numel():
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


# ------------------------------------------------------------------------------------------------- shards
def shard_indices(length: int, rank: int, world_size: int) -> range:
    """The dataset indices rank ``rank`` of ``world_size`` handles: ``range(rank, length, world_size)``.

    Strided, so every index belongs to exactly one rank (no padding, no duplicates, unlike
    ``DistributedSampler``'s default), and the shards differ in length by at most one.
    """
    for name, value in (("length", length), ("rank", rank), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1} (world_size {world_size}), got {rank}")
    return range(rank, length, world_size)


class ShardSampler(Sampler[int]):
    """The indices of :func:`shard_indices`, in increasing order, from shard position ``start`` on (a
    resumed run skips what it already did)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1, *, start: int = 0):
        self.indices = shard_indices(length, rank, world_size)
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= len(self.indices):
            raise ValueError(
                f"start must be an int in 0..{len(self.indices)} (the shard's length), got {start!r}"
            )
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices[self.start :])

    def __len__(self) -> int:
        return len(self.indices) - self.start


def current_rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized ``torch.distributed`` process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------------- models
def weights_fingerprint(model: nn.Module | Mapping[str, Tensor]) -> str:
    """sha256 over the state dict's names (sorted), shapes, dtypes and bytes (buffers included, so
    batch-norm statistics count)."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    if not isinstance(state, Mapping):
        raise TypeError(f"model must be an nn.Module or a state dict, got {type(model).__name__}")
    digest = hashlib.sha256(b"zfkernels.weights\0")
    for name in sorted(state):
        value = state[name]
        digest.update(f"{name}\0".encode())
        if isinstance(value, Tensor):
            _hash_tensor(digest, value)
        else:  # extra state (rare): its repr
            digest.update(repr(value).encode())
    return digest.hexdigest()


def model_description(model: nn.Module) -> dict[str, Any]:
    """What a manifest records about a model: class, parameter count and :func:`weights_fingerprint`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_sha256": weights_fingerprint(model),
    }


def model_names() -> list[str]:
    """Every name :func:`load_model` takes: ``"zfnet"`` and torchvision's classification models."""
    try:
        import torchvision
    except ImportError:
        return [ZFNET_NAME]
    return [ZFNET_NAME, *torchvision.models.list_models(module=torchvision.models)]


def _canonical_model_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str such as 'alexnet' or 'zfnet', got {type(name).__name__}")
    names = model_names()
    if name in names:
        return name
    if name.lower() in names:
        return name.lower()
    close = difflib.get_close_matches(name.lower(), names, n=3)
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    missing = "" if len(names) > 1 else " (torchvision is not installed: only zfnet is available)"
    raise ValueError(f"unknown model {name!r}{missing}; {hint}valid names: {', '.join(names)}")


def load_model(
    name: str,
    weights: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    num_classes: int = 1000,
    seed: int = 0,
) -> nn.Module:
    """Build model ``name`` (``"zfnet"`` -> :class:`zfkernels.models.ZFNet`, or any torchvision
    classification model, e.g. ``"alexnet"``), in eval mode on the CPU.

    Without ``weights`` the model keeps its random initialization, drawn with ``torch.manual_seed(seed)``
    (the global RNG is left as it was), so the same name and seed give the same weights. ``weights`` is a
    file for ``torch.load(..., weights_only=True, map_location="cpu")`` or a mapping; see
    :func:`load_weights` for what it may hold. Unknown names raise a ValueError listing the valid ones.
    """
    canonical = _canonical_model_name(name)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if canonical == ZFNET_NAME:
            from ..models import ZFNet

            model: nn.Module = ZFNet(num_classes=num_classes)
        else:
            import torchvision

            model = torchvision.models.get_model(canonical, weights=None, num_classes=num_classes)
    if weights is not None:
        load_weights(model, weights, model_name=canonical)
    return model.eval()


def load_weights(
    model: nn.Module,
    weights: str | os.PathLike[str] | Mapping[str, Any],
    *,
    model_name: str | None = None,
) -> nn.Module:
    """Load ``weights`` into ``model`` strictly and return it.

    ``weights``: a path (read with ``torch.load(path, weights_only=True, map_location="cpu")``: no code is
    unpickled) or a mapping, holding a state dict directly or under ``"state_dict"`` or ``"model"`` (as
    training scripts save it). A ``module.`` prefix on every key (DistributedDataParallel) or
    ``_orig_mod.`` (``torch.compile``) is removed. Weights that do not fit raise a ValueError naming the
    missing, unexpected and wrong-shape keys (the first few of each, and how many).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    source = "weights"
    if isinstance(weights, (str, os.PathLike)):
        source = f"weights {os.fspath(weights)!r}"
        if not os.path.isfile(weights):
            raise ValueError(f"{source}: no such file")
        try:
            loaded = torch.load(weights, weights_only=True, map_location="cpu")
        except Exception as error:  # noqa: BLE001  (any load failure is reported with the file's name)
            raise ValueError(
                f"{source} could not be read by torch.load(weights_only=True): {error}"
            ) from error
    elif isinstance(weights, Mapping):
        loaded = weights
    else:
        raise TypeError(f"weights must be a path or a state dict (mapping), got {type(weights).__name__}")
    state = _state_dict_of(loaded, source)
    model_label = f"model {model_name!r}" if model_name else f"the model ({type(model).__name__})"
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key}: weights {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and isinstance(state[key], Tensor) and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = [
            _listed(missing, "missing key", "missing keys"),
            _listed(unexpected, "unexpected key", "unexpected keys"),
            _listed(wrong_shape, "key with the wrong shape", "keys with the wrong shape"),
        ]
        raise ValueError(f"{source} do not fit {model_label}: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)
    return model


def _state_dict_of(loaded: object, source: str) -> dict[str, Any]:
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        what = type(loaded).__name__ if not isinstance(loaded, Mapping) else "an empty mapping"
        raise ValueError(f"{source} hold {what}, not a state dict (a mapping of parameter names to tensors)")
    non_tensors = [key for key, value in loaded.items() if not isinstance(value, Tensor)]
    if non_tensors:
        raise ValueError(
            f"{source} are not a state dict: {len(non_tensors)} of its {len(loaded)} entries are not tensors "
            f"({', '.join(map(repr, non_tensors[:5]))}{', ...' if len(non_tensors) > 5 else ''}); a "
            "checkpoint holding the state dict under 'state_dict' or 'model' is read from there"
        )
    state = dict(loaded)
    for prefix in ("module.", "_orig_mod."):  # DistributedDataParallel, torch.compile
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _listed(items: Sequence[str], singular: str, plural: str, shown: int = 5) -> str:
    """``"2 missing keys (a, b)"``: the count and the first ``shown`` items; "" for none."""
    if not items:
        return ""
    more = f", ... ({len(items) - shown} more)" if len(items) > shown else ""
    return f"{len(items)} {singular if len(items) == 1 else plural} ({', '.join(items[:shown])}{more})"
