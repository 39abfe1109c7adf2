"""The end-to-end workloads of the benchmark: one SGD step of ZFNet (`zfnet_train`), the deconvnet's
projections of AlexNet's conv5 against captum and a dense stock deconvnet (`deconvnet`), and patched
torchvision models (`patched_models`). `cases.END_TO_END` registers them (with their targets); the analysis
workloads live in analysis.py. Each builder returns an `EndToEndWorkload`: a warm `ProviderCall` factory per
provider, what is compared, and within what tolerance.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import zfkernels
from zfkernels.ops import _backend

from ..models import ZFNet
from ..models.zfnet import VALID_INPUT_SIDES
from .cases import (
    PATCHED_MODELS,
    QUICK_DECONVNET_FILTERS,
    QUICK_DECONVNET_IMAGES,
    EndToEndWorkload,
    ProviderCall,
)

# ZFNet training step ---------------------------------------------------------------------------------
TRAIN_LEARNING_RATE, TRAIN_MOMENTUM = 1e-2, 0.9  # the paper's SGD
RENORM_RADIUS = 0.1  # the paper's filter RMS radius
# Every fourth conv1 filter starts beyond the radius, as layer-1 filters grow in training (the paper's
# reason to renormalize): so every step's renormalization rescales some filters and the check covers it (at
# the paper's N(0, 1e-2) init no filter reaches the radius, and renormalization would be a no-op whose
# omission no check could see). conv1 only: oversized filters in every layer compound into activations so
# large that the LRN's gradient cancels catastrophically and fp32 providers disagree by 1e-3.
OVERSIZED_FILTER_LAYER, OVERSIZED_FILTER_EVERY, OVERSIZED_FILTER_RMS = "conv1", 4, 0.15
TRAIN_TOLERANCE = 1e-4
DROPOUT_SEED = 1


def _renormalize_ours(model: nn.Module) -> None:
    # Looked up on every call, not bound at build time: a test can swap in a broken one.
    zfkernels.renormalize_filters_(model, RENORM_RADIUS)


def _renormalize_stock(model: nn.Module) -> None:
    """The paper's filter renormalization with plain torch ops, as a stock training loop would write it."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                weight = module.weight
                rms = weight.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
                weight.mul_(torch.where(rms > RENORM_RADIUS, RENORM_RADIUS / rms, torch.ones_like(rms)))


class _ZFNetTraining:
    """ZFNet, its batch and its starting weights: what every provider's training step starts from."""

    def __init__(self, batch: int, image_size: int, device: torch.device, seed: int):
        if image_size not in VALID_INPUT_SIDES:
            raise ValueError(
                f"zfnet_train needs an image size in {VALID_INPUT_SIDES.start}..{VALID_INPUT_SIDES.stop - 1} "
                f"(ZFNet's fc6 takes pool5 at 6x6), got {image_size}"
            )
        with torch.random.fork_rng(devices=[]):  # the paper's init draws from the global RNG: keep it apart
            torch.manual_seed(seed)
            template = ZFNet()
        with torch.no_grad():
            oversized = getattr(template, OVERSIZED_FILTER_LAYER).weight[::OVERSIZED_FILTER_EVERY]
            oversized.mul_(OVERSIZED_FILTER_RMS / oversized.square().mean(dim=(1, 2, 3), keepdim=True).sqrt())
        self.template = template.to(device)
        generator = torch.Generator(device=device).manual_seed(seed)
        self.images = torch.randn((batch, 3, image_size, image_size), device=device, generator=generator)
        self.labels = torch.randint(0, template.num_classes, (batch,), device=device, generator=generator)
        self.initial = {name: p.detach().clone() for name, p in self.template.named_parameters()}
        self.names = list(self.initial)

    def ours(self) -> ProviderCall:
        """Our ZFNet (zfkernels pools and ReLUs) under whichever backend is in scope."""
        return self.trainer(copy.deepcopy(self.template), _renormalize_ours)

    def stock(self, compiled: bool) -> ProviderCall:
        """The same net in stock torch layers; `compiled`: forward + loss through torch.compile."""
        return self.trainer(self.template.to_stock(), _renormalize_stock, compiled)

    def float64(self) -> tuple[Tensor, ...]:
        """The stock step in float64 from the same weights, batch and dropout masks (dropout draws the same
        masks in float64 as in float32), in comparable form."""
        images, initial = self.images.double(), {name: t.double() for name, t in self.initial.items()}
        step = self.trainer(
            self.template.to_stock().double(), _renormalize_stock, images=images, initial=initial
        )
        return tuple(t.detach() for t in step.comparable(step.fresh_run()))

    def trainer(
        self,
        model: nn.Module,
        renormalize: Callable[[nn.Module], None],
        compiled: bool = False,
        images: Tensor | None = None,
        initial: dict[str, Tensor] | None = None,
    ) -> ProviderCall:
        """One SGD step of `model` as a ProviderCall: `setup` restores the weights, zeroes the momentum and
        reseeds dropout; `run` is zero_grad, forward, cross-entropy, backward, optimizer step, renormalize.
        `images` and `initial` (weights) default to the workload's; float64 passes its own."""
        images = self.images if images is None else images
        initial = self.initial if initial is None else initial
        parameters = dict(model.named_parameters())
        if list(parameters) != self.names:
            raise ValueError(f"{type(model).__name__} does not have ZFNet's parameters")
        optimizer = torch.optim.SGD(
            list(parameters.values()), lr=TRAIN_LEARNING_RATE, momentum=TRAIN_MOMENTUM
        )
        # Zero momentum makes a step equal to a fresh optimizer's first (0.9 * 0 + g == g exactly) at the
        # cost of a steady-state step: no buffer is allocated inside the timed call.
        momentum = {name: torch.zeros_like(p) for name, p in parameters.items()}
        for name, p in parameters.items():
            optimizer.state[p]["momentum_buffer"] = momentum[name]
        labels = self.labels

        def loss_of(x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(model(x), y)

        if compiled:
            torch._dynamo.reset()  # a fresh cache, as for the op cases
            # fallback_random: inductor's own RNG would draw other dropout masks than eager's.
            loss_of = torch.compile(loss_of, dynamic=False, fullgraph=True, options={"fallback_random": True})

        def setup() -> None:
            with torch.no_grad():
                for name, p in parameters.items():
                    p.copy_(initial[name])
                    momentum[name].zero_()
            torch.manual_seed(DROPOUT_SEED)  # same masks for every provider: our ops draw no random numbers

        def step() -> Tensor:
            optimizer.zero_grad()
            loss = loss_of(images, labels)
            loss.backward()
            optimizer.step()
            renormalize(model)
            return loss.detach()

        def comparable(loss: object) -> tuple[Tensor, ...]:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters.values()]
            updates = [p.detach() - initial[name] for name, p in parameters.items()]
            return (loss, *grads, *updates)

        call = ProviderCall(step, comparable, setup)
        if compiled:
            call.fresh_run()  # compiles forward and (AOTAutograd) backward here, never in a verified call
        return call


def zfnet_train_workload(
    batch: int, image_size: int, quick: bool, device: torch.device, seed: int, shape: str, mode: str
) -> EndToEndWorkload:
    training = _ZFNetTraining(batch, image_size, device, seed)
    names = training.names
    return EndToEndWorkload(
        ours=training.ours,
        external={"eager": lambda: training.stock(False), "compile": lambda: training.stock(True)},
        output_names=["loss", *(f"grad {n}" for n in names), *(f"update {n}" for n in names)],
        tolerance=TRAIN_TOLERANCE,
        float64=training.float64,
        shapes={
            "images": list(training.images.shape),
            "parameters": [sum(p.numel() for p in training.initial.values())],
        },
        note=(
            f"one SGD step of ZFNet (1000 classes, LRN, dropout 0.5) at batch {batch}: zero_grad, forward, "
            f"cross-entropy, backward, SGD step (lr {TRAIN_LEARNING_RATE:g}, momentum {TRAIN_MOMENTUM:g}), "
            f"filter renormalization to RMS {RENORM_RADIUS:g} (zfkernels.renormalize_filters_ for the "
            "backends, plain torch ops for eager/compile). Untimed before each call: weights and momentum "
            "restored, dropout reseeded. eager/compile: ZFNet.to_stock(); compile: torch.compile of "
            "forward + loss (the backward compiled by AOTAutograd, fallback_random for eager's dropout "
            "masks), step and renormalization eager. Checked: loss, every gradient and every parameter "
            "update within 1e-4 of its scale of the reference backend's, or, relative to its scale, no "
            "further from a float64 step than twice fp32's own worst error (the reference's; torch.compile "
            "rounds differently, and activations within rounding of zero flip ReLU and max-pool gates, so "
            "fp32 conv gradients here are ~1e-2 of their scale from float64)"
        ),
    )


# DeconvNet workload ----------------------------------------------------------------------------------
DECONVNET_LAYER = "features.10"  # torchvision AlexNet's conv5
DECONVNET_IMAGES, DECONVNET_FILTERS = 9, 256  # the workload: every conv5 filter, the paper's top 9
DECONVNET_TOLERANCE = 1e-4
# Projections per dense chunk: at AlexNet's 224x224 a projection's largest maps (64x55x55 unpooled values
# and their int64 indices) take about 2 MB, so a chunk's intermediates stay near 150 MB.
DENSE_CHUNK = 64


class _DenseStep(NamedTuple):
    """One layer of the dense stock deconvnet, top down."""

    kind: str  # "conv", "relu" or "pool"
    weight: Tensor | None  # conv: the forward weight, used transposed
    indices: Tensor | None  # pool: F.max_pool2d's int64 indices (B, C, h, w) into each (H, W) input map
    stride: tuple[int, int]
    padding: tuple[int, int]
    output_padding: tuple[int, int]
    size: tuple[int, int]  # (H, W) of the layer's input: where the step lands


def _dense_chunk(
    image_index: Tensor,
    flat_position: Tensor,
    value: Tensor,
    top: tuple[int, int, int],
    steps: tuple[_DenseStep, ...],
) -> Tensor:
    """Project a chunk of single activations with stock ops on full-size maps: (k, C, H, W) pixels.

    Each projection starts as a one-hot map (its value at its channel and position in the layer's output);
    going down, pools unpool by scatter_add_ at the recorded indices, which sums where overlapping windows
    share an argmax, as the gradient does (F.max_unpool2d would overwrite there), then ReLU and the
    transposed conv with the layer's weights and no bias.
    """
    k = image_index.shape[0]
    channels, height, width = top
    rows = torch.arange(k, device=value.device)
    signal = value.new_zeros((k, channels * height * width)).index_put((rows, flat_position), value)
    signal = signal.view(k, channels, height, width)
    for step in steps:
        if step.kind == "conv":
            signal = F.conv_transpose2d(
                signal, step.weight, None, step.stride, step.padding, step.output_padding
            )
        elif step.kind == "relu":
            signal = F.relu(signal)
        else:
            indices = step.indices.index_select(0, image_index).flatten(2)
            unpooled = signal.new_zeros((k, signal.shape[1], step.size[0] * step.size[1]))
            signal = unpooled.scatter_add(2, indices, signal.flatten(2)).view(k, -1, *step.size)
    return signal


class _DenseDeconvnet:
    """Zeiler & Fergus's deconvnet written with stock PyTorch ops only, dense and batched.

    The forward records the switches with `F.max_pool2d(return_indices=True)`; then every (image, filter)
    projection is a full-size map at every layer on the way down (`_dense_chunk`), batched over images x
    filters in chunks of `DENSE_CHUNK`. The last chunk is padded with zero-valued projections so that every
    chunk has one shape (torch.compile then compiles once).
    """

    def __init__(self, layers: Sequence[nn.Module], compiled: bool):
        self.layers = list(layers)
        self.compiled = compiled
        if compiled:
            torch._dynamo.reset()  # a fresh cache, as for the op cases
            self.chunk_fn = torch.compile(_dense_chunk, dynamic=False, fullgraph=True)
        else:
            self.chunk_fn = _dense_chunk

    def _forward(self, images: Tensor) -> tuple[Tensor, tuple[_DenseStep, ...]]:
        x, steps = images, []
        for module in self.layers:
            size = (x.shape[-2], x.shape[-1])
            if isinstance(module, nn.Conv2d):
                if module.groups != 1 or tuple(module.dilation) != (1, 1):
                    raise ValueError("the dense deconvnet handles plain convolutions only")
                x = F.conv2d(x, module.weight, module.bias, module.stride, module.padding)
                stride, padding, kernel = module.stride, module.padding, module.kernel_size
                output_padding = tuple(
                    size[i] - ((x.shape[-2 + i] - 1) * stride[i] - 2 * padding[i] + kernel[i])
                    for i in range(2)
                )
                steps.append(
                    _DenseStep("conv", module.weight.detach(), None, stride, padding, output_padding, size)
                )
            elif isinstance(module, nn.ReLU):
                x = F.relu(x)
                steps.append(_DenseStep("relu", None, None, (1, 1), (0, 0), (0, 0), size))
            elif isinstance(module, nn.MaxPool2d):
                x, indices = F.max_pool2d(
                    x,
                    module.kernel_size,
                    module.stride,
                    module.padding,
                    module.dilation,
                    module.ceil_mode,
                    return_indices=True,
                )
                steps.append(_DenseStep("pool", None, indices, (1, 1), (0, 0), (0, 0), size))
            else:
                raise TypeError(f"the dense deconvnet cannot invert {type(module).__name__}")
        return x, tuple(reversed(steps))

    def _chunks(self, images: Tensor, filters: Sequence[int]) -> Iterator[tuple[slice, Callable[[], Tensor]]]:
        """The forward, then per chunk of projections its slice of the output and the call computing it."""
        activation, steps = self._forward(images)
        count, (channels, height, width) = len(filters), activation.shape[1:]
        chosen = torch.tensor(list(filters), device=images.device)
        values, where = activation.index_select(1, chosen).flatten(2).max(dim=2)  # the strongest per map
        total = values.numel()
        image_index = torch.arange(images.shape[0], device=images.device).repeat_interleave(count)
        flat_position = (chosen.view(1, -1) * (height * width) + where).reshape(-1)
        value = values.clamp(min=0).reshape(-1)  # the maps are rectified: non-positive projects to zeros
        chunk = min(DENSE_CHUNK, total)
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            pieces = [t[start:stop] for t in (image_index, flat_position, value)]
            if stop - start < chunk:  # pad with zero-valued projections: one shape for every chunk
                pieces = [F.pad(t, (0, chunk - (stop - start))) for t in pieces]
            yield (
                slice(start, stop),
                functools.partial(self.chunk_fn, *pieces, (channels, height, width), steps),
            )

    def __call__(self, images: Tensor, filters: Sequence[int]) -> Tensor:
        """Pixels (B, F, 1, C, H, W): each image's strongest activation of each filter, projected."""
        with torch.no_grad():
            pixels = images.new_empty((images.shape[0] * len(filters), *images.shape[1:]))
            for where, compute in self._chunks(images, filters):
                pixels[where] = compute()[: where.stop - where.start]
        return pixels.view(images.shape[0], len(filters), 1, *images.shape[1:])

    def warm_up(self, images: Tensor, filters: Sequence[int]) -> None:
        """Run the forward and one chunk: for torch.compile, the compilation."""
        with torch.no_grad():
            _, compute = next(self._chunks(images, filters))
            compute()


def _captum_projections(
    model: nn.Module, layer_name: str, images: Tensor, filters: Sequence[int]
) -> Callable[[], Tensor]:
    """captum's deconvnet, one `NeuronDeconvolution.attribute` call per filter, scaled to projections.

    The neuron selector takes each image's strongest activation of the filter (and keeps its value); the
    attribution is the deconvnet gradient of that activation, so the projection is it times the value,
    zero where the value is not positive. captum hooks nn.ReLU modules and cannot hook in-place ones:
    it gets a copy of the model with inplace=False ReLUs.
    """
    from captum.attr import NeuronDeconvolution

    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    deconvolution = NeuronDeconvolution(model, dict(model.named_modules())[layer_name])
    inputs = images.detach().clone().requires_grad_()  # captum differentiates with respect to the inputs

    def run() -> Tensor:
        pixels = images.new_zeros((images.shape[0], len(filters), 1, *images.shape[1:]))
        for column, channel in enumerate(filters):
            strongest: list[Tensor] = []

            def selector(
                output: Tensor, channel: int = channel, strongest: list[Tensor] = strongest
            ) -> Tensor:
                values = output[:, channel].flatten(1).max(dim=1).values
                strongest.append(values.detach())
                return values

            with warnings.catch_warnings():  # one "setting backward hooks" warning per call
                warnings.filterwarnings("ignore", message="Setting backward hooks", category=UserWarning)
                gradient = deconvolution.attribute(inputs, selector)
            pixels[:, column, 0] = gradient * strongest[-1].clamp(min=0).view(-1, 1, 1, 1)
        return pixels

    return run


def deconvnet_workload(
    batch: int, image_size: int, quick: bool, device: torch.device, seed: int, shape: str, mode: str
) -> EndToEndWorkload:
    """The issue's workload; `batch` does not apply (9 images, the paper's top 9; 2 with `quick`)."""
    import torchvision

    from ..deconvnet.projection import DeconvNet

    count, filter_count = (
        (QUICK_DECONVNET_IMAGES, QUICK_DECONVNET_FILTERS) if quick else (DECONVNET_IMAGES, DECONVNET_FILTERS)
    )
    with torch.random.fork_rng(devices=[]):  # torchvision's init draws from the global RNG: keep it apart
        torch.manual_seed(seed)
        model = torchvision.models.alexnet(weights=None).eval()
    model = model.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    images = torch.randn((count, 3, image_size, image_size), device=device, generator=generator)
    all_filters = model.features[10].out_channels
    if filter_count > all_filters:
        raise ValueError(f"AlexNet's {DECONVNET_LAYER} has {all_filters} filters, not {filter_count}")
    filters = list(range(filter_count))
    layers = model.features[: int(DECONVNET_LAYER.rsplit(".", 1)[1]) + 1]

    def as_pixels(pixels: object) -> tuple[Tensor, ...]:
        return (pixels,)

    def ours() -> ProviderCall:
        deconvnet = DeconvNet(model)
        chosen = None if filter_count == all_filters else filters  # the call: every filter
        return ProviderCall(
            lambda: deconvnet.project(images, DECONVNET_LAYER, chosen, top=1).pixels, as_pixels
        )

    def dense(compiled: bool) -> ProviderCall:
        deconvnet = _DenseDeconvnet(layers, compiled)
        if compiled:
            deconvnet.warm_up(images, filters)
        return ProviderCall(lambda: deconvnet(images, filters), as_pixels)

    def captum() -> ProviderCall:
        return ProviderCall(_captum_projections(model, DECONVNET_LAYER, images, filters), as_pixels)

    reduced = f" (--quick: reduced from {DECONVNET_IMAGES} x {DECONVNET_FILTERS})" if quick else ""
    return EndToEndWorkload(
        ours=ours,
        external={"eager": lambda: dense(False), "compile": lambda: dense(True), "captum": captum},
        output_names=["pixels"],
        tolerance=DECONVNET_TOLERANCE,
        slice_dims=3,
        shapes={"images": list(images.shape), "pixels": [count, filter_count, 1, *images.shape[1:]]},
        note=(
            f"top-1 projection of {filter_count} filters of torchvision AlexNet {DECONVNET_LAYER} (conv5) "
            f"for {count} images{reduced}, random weights and images, fp32. Backends: "
            f"DeconvNet(model).project(images, '{DECONVNET_LAYER}', top=1); eager: a dense batched deconvnet "
            f"in stock ops (max_pool2d indices, scatter_add unpool, relu, conv_transpose2d; {DENSE_CHUNK} "
            "projections per chunk); compile: torch.compile of its per-chunk function; captum: one "
            "NeuronDeconvolution.attribute per filter (per-image max selector) x the activation. "
            "Checked: every projection within 1e-4 of its own largest magnitude"
        ),
    )


# Patched torchvision models ----------------------------------------------------------------------------
QUICK_PATCHED_SIDE = 64  # --quick: the 224 models at 64x64 (AlexNet's and VGG's classifiers pool adaptively)
PATCHED_TOLERANCE = 1e-4


class _PatchedModel:
    """A torchvision model with random weights, its batch, and what each provider's call starts from."""

    def __init__(self, shape: str, batch: int, quick: bool, device: torch.device, seed: int, mode: str):
        import torchvision

        builder, side, batch_factor = PATCHED_MODELS[shape]
        side = min(side, QUICK_PATCHED_SIDE) if quick else side
        classes = 10 if side < 64 else 1000
        with torch.random.fork_rng(devices=[]):  # torchvision's init draws from the global RNG
            torch.manual_seed(seed)
            self.template = getattr(torchvision.models, builder)(weights=None, num_classes=classes).to(device)
        generator = torch.Generator(device=device).manual_seed(seed)
        self.images = torch.randn((batch * batch_factor, 3, side, side), device=device, generator=generator)
        self.labels = torch.randint(0, classes, (batch * batch_factor,), device=device, generator=generator)
        self.training = mode == "full"
        self.initial = copy.deepcopy(self.template.state_dict())

    def ours(self) -> ProviderCall:
        """The patched model under the backend in scope; the one "auto" picks on this device runs under
        "auto" itself, as a user's model does (on the CPU that adds torch's own ReLU for small calls of the
        standard rule: see zfkernels.ops.relu)."""
        call = self.call(zfkernels.patch(copy.deepcopy(self.template)))
        with zfkernels.use_backend("auto"):
            auto = _backend.implementation(self.images.device)
        if _backend.implementation(self.images.device) is auto:
            run = call.run

            def as_a_user_runs_it() -> object:
                with zfkernels.use_backend("auto"):
                    return run()

            call.run = as_a_user_runs_it
        return call

    def stock(self) -> ProviderCall:
        return self.call(copy.deepcopy(self.template))

    def call(self, model: nn.Module) -> ProviderCall:
        """Inference (eval, no_grad: the logits) or one SGD training step (train mode: loss, gradients,
        parameter updates); `setup` restores weights, batch-norm statistics and momentum, reseeds dropout."""
        model.train(self.training)
        images, labels, initial = self.images, self.labels, self.initial
        parameters = dict(model.named_parameters())
        optimizer = torch.optim.SGD(
            list(parameters.values()), lr=TRAIN_LEARNING_RATE, momentum=TRAIN_MOMENTUM
        )
        momentum = {name: torch.zeros_like(p) for name, p in parameters.items()}
        for name, p in parameters.items():
            optimizer.state[p]["momentum_buffer"] = momentum[name]

        def setup() -> None:
            with torch.no_grad():
                model.load_state_dict(initial)
                for buffer in momentum.values():
                    buffer.zero_()
            torch.manual_seed(DROPOUT_SEED)  # same dropout masks for every provider

        def infer() -> Tensor:
            with torch.no_grad():
                return model(images)

        def step() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            return loss.detach()

        def comparable(result: object) -> tuple[Tensor, ...]:
            if not self.training:
                return (result,)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters.values()]
            updates = [p.detach() - initial[name] for name, p in parameters.items()]
            return (result, *grads, *updates)

        return ProviderCall(step if self.training else infer, comparable, setup)


def patched_models_workload(
    batch: int, image_size: int, quick: bool, device: torch.device, seed: int, shape: str, mode: str
) -> EndToEndWorkload:
    patched = _PatchedModel(shape, batch, quick, device, seed, mode)
    names = [name for name, _ in patched.template.named_parameters()]
    outputs = (
        ["logits"]
        if mode == "forward"
        else ["loss", *(f"grad {n}" for n in names), *(f"update {n}" for n in names)]
    )
    what = (
        "inference (eval, no_grad)"
        if mode == "forward"
        else (
            f"one SGD training step (train mode, cross-entropy, lr {TRAIN_LEARNING_RATE:g}, "
            f"momentum {TRAIN_MOMENTUM:g})"
        )
    )
    return EndToEndWorkload(
        ours=patched.ours,
        external={"eager": patched.stock},
        output_names=outputs,
        tolerance=PATCHED_TOLERANCE,
        shapes={"images": list(patched.images.shape)},
        note=(
            f"torchvision {PATCHED_MODELS[shape][0]} with random weights, {what}: zfkernels.patch(model) "
            "under each backend against the unpatched model (eager). Untimed before each call: weights, "
            "batch-norm statistics and momentum restored, dropout reseeded"
        ),
    )
