"""The analysis layer's end-to-end workloads (issue 13): mining a dataset's top-9, its memory, projecting it.

All run torchvision's AlexNet (random init, fixed seed), all five conv layers, k = 9, on synthetic 224 px
images, fp32. Registered in `cases.END_TO_END` as "mining", "projection" and "mining_memory"; opt-in
(`--ops mining,projection,mining_memory`), since a run takes minutes.

- mining: `mine(...)` over 2,048 images in memory (256 with --quick) as a user runs it, against the
  issue's floor: a plain `torch.no_grad()` forward of the model over the same images (the "forward"
  baseline: timed, never checked, since it computes no tables). Mining stops after the last mined layer
  (conv5), so it does not run the classifier; the baseline does (it is what a user would otherwise run
  over the dataset).
- projection: `project_mining(...)` of a mining result made while building the case (untimed), against
  the floor of one plain forward over the distinct images it needs, and against captum's
  `NeuronDeconvolution` used as a captum user would: one call per filter over its 9 images with a per-image
  selector, times the value. Captum runs on a sample of filters (2 per layer, 1 with --quick) and its time
  is scaled to all filters (`time_scale`); the sampled projections are what every provider is checked on.
- mining_memory: the peak memory of mining 8,192 images (1,024 with --quick) against mining the first
  eighth of them (the "eighth" baseline); the issue's bound: within 10%. The images are generated from
  their index (`GeneratedImages`), so the dataset holds no memory. Memory only (`memory_only`): each runs
  once, profiled; the mining case times and checks the same code. benchmarks/mining_memory.py measures the
  same as the peak RSS of fresh processes.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from .cases import EndToEndWorkload, ProviderCall

MINING_IMAGES, QUICK_MINING_IMAGES = 2048, 256
MEMORY_IMAGES, QUICK_MEMORY_IMAGES = 8192, 1024
MINING_K = 9
MINING_BATCH = 64
PROJECTION_BATCH = 16
CAPTUM_FILTERS_PER_LAYER, QUICK_CAPTUM_FILTERS_PER_LAYER = 2, 1
# Projection stores pixels in float16 by default (what users get, and time): one rounding of 2**-11.
PROJECTION_TOLERANCE = 1e-3


def _alexnet_and_images(count: int, image_size: int, device: torch.device, seed: int):
    import torchvision

    with torch.random.fork_rng(devices=[]):  # torchvision's init draws from the global RNG: keep it apart
        torch.manual_seed(seed)
        model = torchvision.models.alexnet(weights=None).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    images = torch.randn((count, 3, image_size, image_size), device=device, generator=generator)
    return model.to(device), images


class GeneratedImages(Dataset):
    """``count`` standard-normal ``size`` px images, image i drawn from seed ``seed + i``: nothing is stored,
    so a dataset of any length holds no memory."""

    def __init__(self, count: int, size: int = 224, seed: int = 0):
        self.count, self.size, self.seed = count, size, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < self.count:
            raise IndexError(f"image {index} of {self.count}")
        generator = torch.Generator().manual_seed(self.seed + index)
        return torch.randn((3, self.size, self.size), generator=generator)

    def fingerprint(self) -> str:
        return f"GeneratedImages({self.count}, {self.size}, seed={self.seed})"


def _plain_forward(model: nn.Module, images: Tensor, batch: int) -> ProviderCall:
    def run() -> None:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch):
                model(images[start : start + batch])

    return ProviderCall(run, lambda result: ())


def _tables(mined) -> tuple[Tensor, ...]:
    return tuple(
        torch.cat([getattr(mined[layer], field).flatten() for layer in mined.layers]).float()
        for field in ("values", "images", "positions")
    )


def mining_workload(
    batch: int, image_size: int, quick: bool, device: torch.device, seed: int
) -> EndToEndWorkload:
    """`batch` does not apply: mining's batch is MINING_BATCH, the baseline's the same."""
    from ..analysis import mine

    count = QUICK_MINING_IMAGES if quick else MINING_IMAGES
    model, images = _alexnet_and_images(count, image_size, device, seed)
    dataset = TensorDataset(images)

    def ours() -> ProviderCall:
        return ProviderCall(
            lambda: mine(model, dataset, k=MINING_K, batch_size=MINING_BATCH, progress=False),
            _tables,
        )

    reduced = f" (--quick: reduced from {MINING_IMAGES})" if quick else ""
    return EndToEndWorkload(
        ours=ours,
        external={"forward": lambda: _plain_forward(model, images, MINING_BATCH)},
        unchecked={"forward": "the physical floor: a plain forward computes no tables"},
        output_names=["values", "images", "positions"],
        tolerance=0.0,
        shapes={"images": list(images.shape)},
        note=(
            f"top-{MINING_K} of every filter of AlexNet's five conv layers over {count} random "
            f"{image_size} px images{reduced} in memory, random weights, fp32, batches of {MINING_BATCH}; "
            "zfkernels: analysis.mine (stops after conv5: no classifier); forward: the plain "
            "torch.no_grad() forward of the model over the same images, the floor (not checked: it computes "
            "no tables)"
        ),
    )


def mining_memory_workload(
    batch: int, image_size: int, quick: bool, device: torch.device, seed: int
) -> EndToEndWorkload:
    """`batch` does not apply: mining's batch is MINING_BATCH."""
    from ..analysis import mine

    count = QUICK_MEMORY_IMAGES if quick else MEMORY_IMAGES
    model, _ = _alexnet_and_images(0, image_size, device, seed)

    def mining(images: int) -> ProviderCall:
        dataset = GeneratedImages(images, image_size, seed)
        return ProviderCall(
            lambda: mine(model, dataset, k=MINING_K, batch_size=MINING_BATCH, progress=False), _tables
        )

    reduced = f" (--quick: reduced from {MEMORY_IMAGES})" if quick else ""
    return EndToEndWorkload(
        ours=lambda: mining(count),
        external={"eighth": lambda: mining(count // 8)},
        unchecked={"eighth": "the yardstick: the same mining over the first eighth of the images"},
        output_names=["values", "images", "positions"],
        tolerance=0.0,
        shapes={"images": [count, 3, image_size, image_size]},
        note=(
            f"peak memory of mining the top-{MINING_K} of AlexNet's five conv layers (random weights, fp32, "
            f"batches of {MINING_BATCH}) over {count} random {image_size} px images{reduced} generated from "
            f"their index (the dataset holds no memory); eighth: the same over the first {count // 8}. "
            "Memory only: each runs once, under the memory profiler (the mining case times and checks this "
            "code)"
        ),
    )


def projection_workload(
    batch: int, image_size: int, quick: bool, device: torch.device, seed: int
) -> EndToEndWorkload:
    """`batch` does not apply: projection's batch is PROJECTION_BATCH, the baseline's the same."""
    from ..analysis import mine, project_mining

    count = QUICK_MINING_IMAGES if quick else MINING_IMAGES
    per_layer = QUICK_CAPTUM_FILTERS_PER_LAYER if quick else CAPTUM_FILTERS_PER_LAYER
    model, images = _alexnet_and_images(count, image_size, device, seed)
    dataset = TensorDataset(images)
    mined = mine(model, dataset, k=MINING_K, batch_size=MINING_BATCH, progress=False)
    distinct = torch.tensor(mined.distinct_images(), device=device)
    # The sample every provider is checked on (and captum runs on): evenly spaced filters of each layer.
    sample = {
        layer: torch.linspace(0, mined[layer].values.shape[0] - 1, per_layer).round().long().tolist()
        for layer in mined.layers
    }
    total_filters = sum(mined[layer].values.shape[0] for layer in mined.layers)
    sampled_filters = sum(len(filters) for filters in sample.values())

    def sampled_windows(projected) -> tuple[Tensor, ...]:
        return tuple(
            projected.layers[layer].pixels[filters].flatten(0, 1).float() for layer, filters in sample.items()
        )

    def ours() -> ProviderCall:
        return ProviderCall(
            lambda: project_mining(mined, model, dataset, batch_size=PROJECTION_BATCH, progress=False),
            sampled_windows,
        )

    def captum() -> ProviderCall:
        return _captum_per_filter(model, mined, images, sample, image_size)

    reduced = f" (--quick: reduced from {MINING_IMAGES})" if quick else ""
    return EndToEndWorkload(
        ours=ours,
        external={
            "forward": lambda: _plain_forward(model, images[distinct], PROJECTION_BATCH),
            "captum": captum,
        },
        unchecked={"forward": "the floor: a plain forward over the distinct images projects nothing"},
        time_scale={"captum": total_filters / sampled_filters},
        output_names=list(sample),
        tolerance=PROJECTION_TOLERANCE,
        slice_dims=1,
        shapes={"images": list(images.shape), "distinct images": [int(distinct.numel())]},
        note=(
            f"every top-{MINING_K} entry of AlexNet's five conv layers ({total_filters} filters) mined over "
            f"{count} random {image_size} px images{reduced}, random weights, fp32: zfkernels: "
            f"analysis.project_mining (each of the {distinct.numel()} distinct images loaded and run "
            f"forward once, batches of {PROJECTION_BATCH}, up to conv5); forward: one plain forward of the "
            "model over those images (the floor, not checked); captum: NeuronDeconvolution.attribute per "
            f"filter over its images with a per-image selector x the value, run on {sampled_filters} "
            f"filters ({per_layer} per layer) and its time scaled by {total_filters}/{sampled_filters}. "
            "Checked: those filters' windows, each "
            "within 1e-4 of its own largest magnitude"
        ),
    )


def _captum_per_filter(
    model: nn.Module, mined, images: Tensor, sample: dict[str, list[int]], image_size: int
):
    """One `NeuronDeconvolution.attribute` per sampled filter over its k images (each image's mined position
    picked by a per-image selector), times the value; then cut to the projection's windows (untimed)."""
    from captum.attr import NeuronDeconvolution

    from ..deconvnet import DeconvNet

    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # captum cannot hook in-place ReLUs
    modules = dict(model.named_modules())
    fields = {layer: DeconvNet(model).receptive_field(layer, (image_size, image_size)) for layer in sample}

    def run() -> dict[str, list[Tensor]]:
        out: dict[str, list[Tensor]] = {}
        for layer, filters in sample.items():
            deconvolution = NeuronDeconvolution(model, modules[layer])
            table = mined[layer]
            for channel in filters:
                filled = table.images[channel] >= 0
                which = table.images[channel][filled]
                rows, cols = table.positions[channel][filled].unbind(1)
                inputs = images[which].detach().clone().requires_grad_()
                values: list[Tensor] = []

                def selector(output: Tensor, c: int = channel, r=rows, q=cols, v=values) -> Tensor:
                    picked = output[torch.arange(output.shape[0]), c, r, q]
                    v.append(picked.detach())
                    return picked

                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Setting backward hooks", category=UserWarning)
                    gradient = deconvolution.attribute(inputs, selector)
                out.setdefault(layer, []).append(gradient * values[-1].clamp(min=0).view(-1, 1, 1, 1))
        return out

    def comparable(planes: dict[str, list[Tensor]]) -> tuple[Tensor, ...]:
        windows = []
        for layer, filters in sample.items():
            field = fields[layer]
            size = (min(field.size[0], image_size), min(field.size[1], image_size))
            cut = []
            for channel, plane in zip(filters, planes[layer], strict=True):
                filled = mined[layer].images[channel] >= 0
                boxes = field.boxes(mined[layer].positions[channel][filled])
                for i, (top, left, _, _) in enumerate(boxes.tolist()):
                    top, left = (top, left) if field.size[0] <= image_size else (0, 0)
                    cut.append(_window(plane[i], top, left, size))
            windows.append(torch.stack(cut))
        return tuple(windows)

    return ProviderCall(run, comparable)


def _window(plane: Tensor, top: int, left: int, size: tuple[int, int]) -> Tensor:
    """The size[0] x size[1] window of a (C, H, W) plane at (top, left), zero where it leaves the plane."""
    out = plane.new_zeros((plane.shape[0], *size))
    height, width = plane.shape[-2:]
    t, lo, b, r = max(top, 0), max(left, 0), min(top + size[0], height), min(left + size[1], width)
    if t < b and lo < r:
        out[:, t - top : b - top, lo - left : r - left] = plane[:, t:b, lo:r]
    return out.detach()
