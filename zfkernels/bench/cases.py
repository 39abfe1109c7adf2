"""The one definition of benchmark cases, shared by `zfkernels bench` and the pytest-benchmark suite.

A case is (op, ZFNet layer, mode, dtype). Building it gives the inputs, the stock PyTorch code and the
zfkernels call; `BuiltCase.call(provider)` turns that into the callable a timer runs, for these providers:

- "eager": the stock PyTorch code as written;
- "compile": `torch.compile` of the same stock code (compiled while preparing, so never timed);
- every zfkernels backend that runs on the device ("cpu", "reference", later "triton", "cuda").

`BuiltCase.expected()` is the reference backend's result. Every provider's result must equal it (bit for bit
for pool, unpool and ReLU; allclose for the convolutions) before a timer may run it, so a wrong fast
kernel never reaches a table.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

import zfkernels

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("forward", "backward", "full")
STOCK_PROVIDERS = ("eager", "compile")
LAYERS = ("L1", "L2", "L3", "L4", "L5")

POOL_KERNEL, POOL_STRIDE = 3, 2  # ZFNet's overlapping 3x3 stride-2 pools, ceil_mode
DEFAULT_IMAGE_SIZE = 224

# Relative to the reference output's largest magnitude: GEMMs may sum in another order than the reference.
CONV_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class ConvLayer:
    """One ZFNet conv layer at a given input size: the geometry every op of that layer is benchmarked at."""

    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    in_size: int
    pooled: bool

    @property
    def out_size(self) -> int:
        return (self.in_size + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def pooled_size(self) -> int:
        """The pool after the ReLU, with ceil_mode (110 -> 55, 26 -> 13, 13 -> 6 at 224 input)."""
        return -(-(self.out_size - POOL_KERNEL) // POOL_STRIDE) + 1

    @property
    def deconv_output_padding(self) -> int:
        """What the transposed conv adds to land back on `in_size` (1 at layer 1: 110 -> 224, not 223)."""
        return self.in_size - ((self.out_size - 1) * self.stride - 2 * self.padding + self.kernel)


def zfnet_layers(image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, ConvLayer]:
    """ZFNet's five conv layers (Zeiler & Fergus 2013), each fed by the previous layer's output.

    At the paper's 224 input: conv1 96 7x7/2 pad 1 -> 110, pool -> 55; conv2 256 5x5/2 -> 26, pool -> 13;
    conv3 384, conv4 384, conv5 256, 3x3 pad 1 at 13; pool -> 6. A smaller `image_size` keeps the
    channels and kernels and shrinks the maps, so tests can build every case in milliseconds.
    """
    table = [
        ("L1", 3, 96, 7, 2, 1, True),
        ("L2", 96, 256, 5, 2, 0, True),
        ("L3", 256, 384, 3, 1, 1, False),
        ("L4", 384, 384, 3, 1, 1, False),
        ("L5", 384, 256, 3, 1, 1, True),
    ]
    layers: dict[str, ConvLayer] = {}
    size = image_size
    for name, cin, cout, kernel, stride, padding, pooled in table:
        layer = ConvLayer(name, cin, cout, kernel, stride, padding, size, pooled)
        if layer.out_size < POOL_KERNEL:
            raise ValueError(
                f"image_size {image_size} is too small for ZFNet: layer {name} maps are {layer.out_size}"
            )
        layers[name] = layer
        size = layer.pooled_size if pooled else layer.out_size
    return layers


def _as_tuple(outputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(outputs)


@dataclass
class Workload:
    """What one op at one layer computes, in stock PyTorch and with zfkernels, on shared inputs.

    The two input tuples differ only where the op's inputs differ in kind (torch's int64 indices against
    our uint8 switches); `differentiable` indexes both alike. The first output is the one backward
    differentiates, against `grad_output`.
    """

    stock_inputs: tuple[Tensor, ...]
    our_inputs: tuple[Tensor, ...]
    stock: Callable[..., tuple[Tensor, ...]]
    ours: Callable[..., tuple[Tensor, ...]]
    differentiable: tuple[int, ...]
    grad_output: Tensor
    shapes: dict[str, list[int]]
    forward_bytes: int
    backward_bytes: int
    # Puts our outputs in the stock form before the comparison (switches -> int64 indices); never timed.
    comparable_ours: Callable[[Sequence[Tensor]], tuple[Tensor, ...]] = _as_tuple


@dataclass(frozen=True)
class OpSpec:
    """An op of the suite: where it exists, how it is checked, and which cells the default run keeps."""

    name: str
    layers: tuple[str, ...]
    default_modes: tuple[str, ...]
    exact: bool
    memory_bound: bool
    # The reference backend is the stock code itself here; timing it again only measures dispatch.
    reference_is_stock: bool
    build: Callable[[ConvLayer, int, torch.dtype, torch.device, torch.Generator], Workload]


@dataclass(frozen=True)
class Case:
    """One row of the benchmark table: an op at a ZFNet layer, in a mode and a dtype."""

    op: str
    shape: str
    mode: str
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape}-{self.mode}-{self.dtype}"

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op]

    def build(
        self, batch: int, device: str | torch.device, image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0
    ) -> BuiltCase:
        """Make the inputs on `device`, seeded so that every run times the same data."""
        device = torch.device(device)
        generator = torch.Generator(device=device).manual_seed(seed)
        layer = zfnet_layers(image_size)[self.shape]
        workload = self.spec.build(layer, batch, DTYPES[self.dtype], device, generator)
        return BuiltCase(self, device, workload)


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _randn(
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    scale: float = 1.0,
) -> Tensor:
    return (torch.randn(tuple(shape), device=device, generator=generator) * scale).to(dtype)


def _integer_grad(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Tensor:
    """A gradient of small integers: where pooling windows share an argmax its gradients are summed, and
    sums of small integers are exact in any order and dtype, so every provider can be held to bit equality."""
    return torch.randint(-4, 5, tuple(shape), device=device, generator=generator).to(dtype)


def _unshared_switches(shape: Sequence[int], device: torch.device, generator: torch.Generator) -> Tensor:
    """Switches in the 2x2 corner (offsets 0, 1, 3, 4) of each 3x3 stride-2 window, which no other window
    reaches: our unpool sums where windows share an argmax and stock's overwrites, so only on unshared
    targets can both be checked against the reference. The scatter work is the same as with real switches."""
    corner = torch.tensor([0, 1, 3, 4], dtype=torch.uint8, device=device)
    return corner[torch.randint(0, 4, tuple(shape), device=device, generator=generator)]


def _shape_of(**tensors: Tensor) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in tensors.items()}


def _pool_workload(
    layer: ConvLayer, batch: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Workload:
    size = layer.out_size
    x = _randn((batch, layer.out_channels, size, size), dtype, device, generator)
    pooled = (batch, layer.out_channels, layer.pooled_size, layer.pooled_size)
    values_bytes = math.prod(pooled) * dtype.itemsize
    switch_bytes = math.prod(pooled)  # uint8

    def stock(x: Tensor) -> tuple[Tensor, ...]:
        return F.max_pool2d(F.relu(x), POOL_KERNEL, POOL_STRIDE, ceil_mode=True, return_indices=True)

    def ours(x: Tensor) -> tuple[Tensor, ...]:
        return zfkernels.max_pool2d_switches(x, POOL_KERNEL, POOL_STRIDE, ceil_mode=True, relu=True)

    def comparable(outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        values, switches = outputs
        return values, zfkernels.switches_to_indices(switches, (size, size), POOL_KERNEL, POOL_STRIDE)

    return Workload(
        stock_inputs=(x,),
        our_inputs=(x,),
        stock=stock,
        ours=ours,
        differentiable=(0,),
        grad_output=_integer_grad(pooled, dtype, device, generator),
        shapes=_shape_of(input=x) | {"values": list(pooled)},
        forward_bytes=_nbytes(x) + values_bytes + switch_bytes,
        # grad of values, values (the fused ReLU's mask) and switches in, grad of the input out
        backward_bytes=2 * values_bytes + switch_bytes + _nbytes(x),
        comparable_ours=comparable,
    )


def _unpool_workload(
    layer: ConvLayer, batch: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Workload:
    size = layer.out_size
    pooled = (batch, layer.out_channels, layer.pooled_size, layer.pooled_size)
    values = _randn(pooled, dtype, device, generator)
    switches = _unshared_switches(pooled, device, generator)
    indices = zfkernels.switches_to_indices(switches, (size, size), POOL_KERNEL, POOL_STRIDE)
    output_bytes = batch * layer.out_channels * size * size * dtype.itemsize

    def stock(values: Tensor, indices: Tensor) -> tuple[Tensor, ...]:
        return (F.relu(F.max_unpool2d(values, indices, POOL_KERNEL, POOL_STRIDE, output_size=(size, size))),)

    def ours(values: Tensor, switches: Tensor) -> tuple[Tensor, ...]:
        return (
            zfkernels.max_unpool2d(
                values, switches, POOL_KERNEL, POOL_STRIDE, output_size=(size, size), relu=True
            ),
        )

    return Workload(
        stock_inputs=(values, indices),
        our_inputs=(values, switches),
        stock=stock,
        ours=ours,
        differentiable=(0,),
        grad_output=_integer_grad((batch, layer.out_channels, size, size), dtype, device, generator),
        shapes=_shape_of(values=values) | {"output": [batch, layer.out_channels, size, size]},
        forward_bytes=_nbytes(values, switches) + output_bytes,
        # grad of the output and the output (ReLU's mask) in, gathered at the switches into grad of values
        backward_bytes=2 * output_bytes + _nbytes(switches, values),
    )


def _relu_workload(
    layer: ConvLayer, batch: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Workload:
    x = _randn((batch, layer.out_channels, layer.out_size, layer.out_size), dtype, device, generator)

    def stock(x: Tensor) -> tuple[Tensor, ...]:
        return (F.relu(x),)

    def ours(x: Tensor) -> tuple[Tensor, ...]:
        return (zfkernels.relu(x),)

    return Workload(
        stock_inputs=(x,),
        our_inputs=(x,),
        stock=stock,
        ours=ours,
        differentiable=(0,),
        grad_output=_randn(x.shape, dtype, device, generator),
        shapes=_shape_of(input=x),
        forward_bytes=2 * _nbytes(x),
        backward_bytes=3 * _nbytes(x),  # grad and output in, grad out
    )


def _deconv_weight_and_geometry(
    layer: ConvLayer, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> tuple[Tensor, dict[str, int]]:
    """The layer's transposed-conv weight (scaled by its fan-in) and keyword geometry, output -> input."""
    fan_in = layer.out_channels * layer.kernel**2 // layer.stride**2
    weight = _randn(
        (layer.out_channels, layer.in_channels, layer.kernel, layer.kernel),
        dtype,
        device,
        generator,
        scale=fan_in**-0.5,
    )
    geometry = {
        "stride": layer.stride,
        "padding": layer.padding,
        "output_padding": layer.deconv_output_padding,
    }
    return weight, geometry


def _conv_transpose_workload(
    layer: ConvLayer, batch: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Workload:
    """The deconvnet direction of the layer: its output maps back to its input's size."""
    x = _randn((batch, layer.out_channels, layer.out_size, layer.out_size), dtype, device, generator)
    weight, geometry = _deconv_weight_and_geometry(layer, dtype, device, generator)

    def stock(x: Tensor, weight: Tensor) -> tuple[Tensor, ...]:
        return (F.conv_transpose2d(x, weight, **geometry),)

    def ours(x: Tensor, weight: Tensor) -> tuple[Tensor, ...]:
        return (zfkernels.conv_transpose2d(x, weight, **geometry),)

    output = (batch, layer.in_channels, layer.in_size, layer.in_size)
    return Workload(
        stock_inputs=(x, weight),
        our_inputs=(x, weight),
        stock=stock,
        ours=ours,
        differentiable=(0, 1),
        grad_output=_randn(output, dtype, device, generator),
        shapes=_shape_of(input=x, weight=weight) | {"output": list(output)},
        forward_bytes=0,
        backward_bytes=0,
    )


def _unpool_conv_transpose_workload(
    layer: ConvLayer, batch: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Workload:
    """Layer 2's deconvnet step: pooled 13x13 -> unpooled 26x26 -> ReLU -> 5x5/2 transposed conv -> 55x55."""
    size = layer.out_size
    pooled = (batch, layer.out_channels, layer.pooled_size, layer.pooled_size)
    values = _randn(pooled, dtype, device, generator)
    switches = _unshared_switches(pooled, device, generator)
    indices = zfkernels.switches_to_indices(switches, (size, size), POOL_KERNEL, POOL_STRIDE)
    weight, geometry = _deconv_weight_and_geometry(layer, dtype, device, generator)

    def stock(values: Tensor, indices: Tensor, weight: Tensor) -> tuple[Tensor, ...]:
        unpooled = F.max_unpool2d(values, indices, POOL_KERNEL, POOL_STRIDE, output_size=(size, size))
        return (F.conv_transpose2d(F.relu(unpooled), weight, **geometry),)

    def ours(values: Tensor, switches: Tensor, weight: Tensor) -> tuple[Tensor, ...]:
        return (
            zfkernels.unpool_conv_transpose2d(
                values,
                switches,
                weight,
                pool_kernel_size=POOL_KERNEL,
                pool_stride=POOL_STRIDE,
                unpool_size=(size, size),
                relu=True,
                **geometry,
            ),
        )

    output = (batch, layer.in_channels, layer.in_size, layer.in_size)
    return Workload(
        stock_inputs=(values, indices, weight),
        our_inputs=(values, switches, weight),
        stock=stock,
        ours=ours,
        differentiable=(0, 2),
        grad_output=_randn(output, dtype, device, generator),
        shapes=_shape_of(values=values, weight=weight)
        | {"unpooled": [batch, layer.out_channels, size, size], "output": list(output)},
        forward_bytes=0,
        backward_bytes=0,
    )


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("pool", ("L1", "L2", "L5"), ("forward", "backward"), exact=True, memory_bound=True,
               reference_is_stock=False, build=_pool_workload),
        OpSpec("unpool", ("L1", "L2", "L5"), ("forward",), exact=True, memory_bound=True,
               reference_is_stock=False, build=_unpool_workload),
        OpSpec("relu", LAYERS, ("forward", "backward"), exact=True, memory_bound=True,
               reference_is_stock=True, build=_relu_workload),
        OpSpec("conv_transpose", LAYERS, ("forward",), exact=False, memory_bound=False,
               reference_is_stock=True, build=_conv_transpose_workload),
        OpSpec("unpool_conv_transpose", ("L2",), ("forward",), exact=False, memory_bound=False,
               reference_is_stock=False, build=_unpool_conv_transpose_workload),
    )
}  # fmt: skip


def select_cases(
    ops: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("fp32",),
) -> list[Case]:
    """The cases of the chosen ops, layers, modes and dtypes, in suite order.

    `None` means each op's own: all its layers, and its default modes (the issue-2 set: pool forward and
    backward, ReLU forward and backward, everything else forward). Unknown names raise ValueError.
    """
    _check_names("op", ops, OPS)
    _check_names("shape", shapes, LAYERS)
    _check_names("mode", modes, MODES)
    _check_names("dtype", dtypes, DTYPES)
    cases = []
    for spec in OPS.values():
        if ops is not None and spec.name not in ops:
            continue
        for layer in spec.layers:
            if shapes is not None and layer not in shapes:
                continue
            for mode in spec.default_modes if modes is None else [m for m in MODES if m in modes]:
                cases.extend(Case(spec.name, layer, mode, dtype) for dtype in dtypes)
    return cases


def _check_names(kind: str, names: Sequence[str] | None, known: Sequence[str] | dict[str, object]) -> None:
    unknown = [name for name in names or () if name not in known]
    if unknown:
        raise ValueError(f"unknown {kind} {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")


def backend_providers(device: str | torch.device) -> list[str]:
    """The zfkernels backends that run tensors on `device`, in zfkernels' order.

    Asked of the ops themselves (a one-element ReLU under each backend) rather than of a table here, so
    a backend that lands later ("triton", "cuda") joins the benchmarks without a change to this file.
    """
    return list(_backend_providers(str(torch.device(device))))


@functools.cache
def _backend_providers(device: str) -> tuple[str, ...]:
    probe = torch.zeros(1, device=device)
    runnable = []
    for backend in zfkernels.available_backends():
        if backend == "auto":
            continue
        try:
            with zfkernels.use_backend(backend):
                zfkernels.relu(probe)
        except (RuntimeError, ValueError, NotImplementedError):
            continue
        runnable.append(backend)
    return tuple(runnable)


def providers_for(
    case: Case, device: str | torch.device, requested: Sequence[str] | None = None
) -> list[str]:
    """Providers a case is measured with: `requested` (those that run here), or by default stock eager,
    torch.compile and every backend, leaving out the reference backend where it is the stock code itself."""
    backends = backend_providers(device)
    if requested is not None:
        return [p for p in requested if p in STOCK_PROVIDERS or p in backends]
    return [
        *STOCK_PROVIDERS,
        *(b for b in backends if not (b == "reference" and case.spec.reference_is_stock)),
    ]


@dataclass
class ProviderCall:
    """A provider's prepared case: `run` is what gets timed; `comparable` turns its return value into the
    tensors checked against the reference (outside any timing)."""

    run: Callable[[], object]
    comparable: Callable[[object], tuple[Tensor, ...]]


@dataclass
class BuiltCase:
    """A case with its inputs on the device: hands each provider its callable and checks its result."""

    case: Case
    device: torch.device
    workload: Workload
    _expected: tuple[Tensor, ...] | None = field(default=None, repr=False)

    @property
    def bytes_moved(self) -> int | None:
        """Bytes a memory-bound op must read and write once (its inputs and outputs, in zfkernels' form: uint8
        switches), credited alike to every provider so that GB/s ranks them as time does.
        None for compute-bound ops."""
        if not self.case.spec.memory_bound:
            return None
        forward, backward = self.workload.forward_bytes, self.workload.backward_bytes
        return {"forward": forward, "backward": backward, "full": forward + backward}[self.case.mode]

    @contextlib.contextmanager
    def scope(self, provider: str) -> Iterator[None]:
        """Where `provider` must run: under its zfkernels backend (backward passes included), or as is."""
        if provider in STOCK_PROVIDERS:
            yield
        else:
            with zfkernels.use_backend(provider):
                yield

    def call(self, provider: str) -> ProviderCall:
        """Prepare `provider` for timing; call it inside `scope(provider)`.

        "compile" is compiled here (with a fresh dynamo cache, since all cases of an op share the stock
        code object and its recompile limit would otherwise send later cases silently back to eager).
        Backward mode runs the forward here and keeps its graph, so only the backward is timed.
        """
        w = self.workload
        if provider in STOCK_PROVIDERS:
            inputs, fn = w.stock_inputs, w.stock
            if provider == "compile":
                torch._dynamo.reset()
                fn = torch.compile(w.stock, dynamic=False, fullgraph=True)
            to_comparable = _as_tuple
        else:
            inputs, fn, to_comparable = w.our_inputs, w.ours, w.comparable_ours
        mode = self.case.mode
        if mode == "forward":
            return ProviderCall(lambda: fn(*inputs), to_comparable)
        leaves = tuple(t.detach().requires_grad_(i in w.differentiable) for i, t in enumerate(inputs))
        wrt = tuple(leaves[i] for i in w.differentiable)
        if mode == "backward":
            differentiated = fn(*leaves)[0]
            return ProviderCall(
                lambda: torch.autograd.grad(differentiated, wrt, w.grad_output, retain_graph=True), _as_tuple
            )

        def forward_and_backward() -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
            outputs = fn(*leaves)
            return outputs, torch.autograd.grad(outputs[0], wrt, w.grad_output)

        return ProviderCall(
            forward_and_backward,
            lambda result: (*to_comparable(tuple(t.detach() for t in result[0])), *result[1]),
        )

    def expected(self) -> tuple[Tensor, ...]:
        """The reference backend's result, in comparable form: what every provider must reproduce (computed
        once, on first use)."""
        if self._expected is None:
            with self.scope("reference"):
                reference = self.call("reference")
                self._expected = tuple(t.detach() for t in reference.comparable(reference.run()))
        return self._expected

    def mismatch(self, actual: tuple[Tensor, ...]) -> str | None:
        """Why `actual` differs from the reference (None when it agrees): exact equality for pool, unpool
        and ReLU, a tolerance relative to the output's scale for the convolutions."""
        if len(actual) != len(self.expected()):
            return f"{len(actual)} outputs, expected {len(self.expected())}"
        for position, (got, want) in enumerate(zip(actual, self.expected(), strict=True)):
            if got.shape != want.shape or got.dtype != want.dtype:
                return (
                    f"output {position} is {got.dtype}{list(got.shape)}, "
                    f"expected {want.dtype}{list(want.shape)}"
                )
            if self.case.spec.exact or not want.is_floating_point():
                if not torch.equal(got, want):
                    differing = int((got != want).sum()) - int((got.isnan() & want.isnan()).sum())
                    if differing:
                        return f"output {position}: {differing} of {want.numel()} elements differ (exact op)"
                continue
            error = float((got.float() - want.float()).abs().max()) if want.numel() else 0.0
            scale = float(want.float().abs().max()) if want.numel() else 0.0
            if not error <= CONV_TOLERANCE[want.dtype] * max(scale, 1e-30):
                tolerance = CONV_TOLERANCE[want.dtype]
                return f"output {position}: max |error| {error:.3g} exceeds {tolerance:g} x {scale:.3g}"
        return None
