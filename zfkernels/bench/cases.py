"""The one definition of benchmark cases, shared by `zfkernels bench` and the pytest-benchmark suite.

Op cases are (op, ZFNet layer, mode, dtype). Building one gives the inputs, the stock PyTorch code and the
zfkernels call; `BuiltCase.call(provider)` turns that into the callable a timer runs, for these providers:

- "eager": the stock PyTorch code as written;
- "compile": `torch.compile` of the same stock code (compiled while preparing, so never timed);
- every zfkernels backend that runs on the device ("cpu", "reference", "triton", "cuda"; never Triton's
  CPU interpreter, a correctness tool whose timings mean nothing).

End-to-end cases (`END_TO_END`, their workloads in end_to_end.py and analysis.py) are whole workloads,
one row per shape and mode: "zfnet_train" (one SGD step of ZFNet), "deconvnet" (top-1 projections of every
conv5 filter of torchvision's AlexNet, with captum as an extra provider), "patched_models" (zfkernels.patch
on torchvision models) and the opt-in analysis workloads. Their calls take seconds to minutes, so the runner
treats them as long (`long_calls`): the verifying call doubles as warm-up and peak-memory measurement, and
few calls are timed.

`expected()` is the reference backend's result. Every provider's result must equal it (bit for bit
for pool, unpool and ReLU; allclose for the convolutions and the end-to-end cases) before a timer may run
it, so a wrong fast kernel never reaches a table.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

import zfkernels

from .op_workloads import (  # noqa: F401  (DEFAULT_IMAGE_SIZE, POOL_*, zfnet_layers: where callers look)
    DEFAULT_IMAGE_SIZE,
    POOL_KERNEL,
    POOL_STRIDE,
    TINY,
    ConvLayer,
    Workload,
    as_tuple,
    conv_transpose_workload,
    layer_geometry,
    pool_workload,
    relu_workload,
    unpool_conv_transpose_workload,
    unpool_workload,
    zfnet_layers,
)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("forward", "backward", "full")
STOCK_PROVIDERS = ("eager", "compile")
# Third-party tools some end-to-end cases are measured against (only where they import), and the module
# each needs.
THIRD_PARTY_PROVIDERS = ("captum",)
_THIRD_PARTY_MODULES = {"captum": "captum.attr"}
# Baselines some end-to-end cases are measured against, never checked (they do not compute the result):
# "forward", the physical floor of the work (a plain forward pass); "eighth", the same work on an eighth of
# the data (the yardstick of a memory bound that must not grow with the data).
BASELINE_PROVIDERS = ("forward", "eighth")
# Every provider that is not a zfkernels backend: its failures are reported, but are not zfkernels' bugs.
EXTERNAL_PROVIDERS = (*STOCK_PROVIDERS, *THIRD_PARTY_PROVIDERS, *BASELINE_PROVIDERS)

LAYERS = ("L1", "L2", "L3", "L4", "L5")
# The tiny shape (op_workloads.TINY) runs at batch 1 whatever --batch says.
TINY_BATCH = 1
# The default run's op cells: the biggest layer, the smallest, and the per-call cost; forward and backward.
HEADLINE_LAYERS = ("L1", "L5", TINY)
HEADLINE_MODES = ("forward", "backward")

# --quick and the headline run: the deconvnet case projects this many images x filters (end_to_end.py).
QUICK_DECONVNET_IMAGES, QUICK_DECONVNET_FILTERS = 2, 8
# (torchvision builder, image side, batch as a multiple of --batch): the models at 224x224, batch 32,
# and ResNet18 at CIFAR's 32x32, batch 64 (many small layers: where a fixed per-call cost would show).
PATCHED_MODELS: dict[str, tuple[str, int, int]] = {
    "AlexNet.224": ("alexnet", 224, 1),
    "VGG11.224": ("vgg11", 224, 1),
    "ResNet18.224": ("resnet18", 224, 1),
    "ResNet18.32": ("resnet18", 32, 2),
}

# Relative to the reference output's largest magnitude: GEMMs may sum in another order than the reference.
CONV_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@contextlib.contextmanager
def provider_scope(provider: str) -> Iterator[None]:
    """Where `provider` runs: a zfkernels backend under `use_backend` (backward passes included), stock
    and third-party providers as they are."""
    if provider in EXTERNAL_PROVIDERS:
        yield
    else:
        with zfkernels.use_backend(provider):
            yield


def reference_result(built: BuiltCase | BuiltEndToEnd) -> tuple[Tensor, ...]:
    """A built case's result on the reference backend, in comparable form: what every provider must match."""
    with built.scope("reference"):
        reference = built.call("reference")
        return tuple(t.detach() for t in reference.comparable(reference.fresh_run()))


@dataclass(frozen=True)
class OpSpec:
    """An op of the suite: where it exists, how it is checked, and which cells the default run keeps."""

    name: str
    layers: tuple[str, ...]
    quick_modes: tuple[str, ...]
    exact: bool
    memory_bound: bool
    # The reference backend is the stock code itself here; timing it again only measures dispatch.
    reference_is_stock: bool
    build: Callable[[ConvLayer, int, torch.dtype, torch.device, torch.Generator], Workload]


@dataclass(frozen=True)
class Case:
    """One row of the benchmark table: an op at a ZFNet layer (or an end-to-end workload at its one shape),
    in a mode and a dtype."""

    op: str
    shape: str
    mode: str
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape}-{self.mode}-{self.dtype}"

    @property
    def end_to_end(self) -> bool:
        return self.op in END_TO_END

    @property
    def spec(self) -> OpSpec | EndToEndSpec:
        return END_TO_END[self.op] if self.end_to_end else OPS[self.op]

    def build(
        self,
        batch: int,
        device: str | torch.device,
        image_size: int = DEFAULT_IMAGE_SIZE,
        seed: int = 0,
        quick: bool = False,
    ) -> BuiltCase | BuiltEndToEnd:
        """Make the inputs on `device`, seeded so that every run times the same data.

        `quick` shrinks the end-to-end workloads (see each one's spec); op cases ignore it.
        """
        device = torch.device(device)
        if self.end_to_end:
            spec = END_TO_END[self.op]
            if self.dtype not in spec.dtypes:
                raise ValueError(f"{self.op} runs in {', '.join(spec.dtypes)} only: {spec.dtype_reason}")
            workload = spec.build(batch, image_size, quick, device, seed, self.shape, self.mode)
            return BuiltEndToEnd(self, device, workload)
        generator = torch.Generator(device=device).manual_seed(seed)
        layer = layer_geometry(self.shape, image_size)
        batch = TINY_BATCH if self.shape == TINY else batch
        workload = self.spec.build(layer, batch, DTYPES[self.dtype], device, generator)
        return BuiltCase(self, device, workload)


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("pool", ("L1", "L2", "L5", TINY), ("forward", "backward"), exact=True, memory_bound=True,
               reference_is_stock=False, build=pool_workload),
        OpSpec("unpool", ("L1", "L2", "L5", TINY), ("forward",), exact=True, memory_bound=True,
               reference_is_stock=False, build=unpool_workload),
        OpSpec("relu", (*LAYERS, TINY), ("forward", "backward"), exact=True, memory_bound=True,
               reference_is_stock=True, build=relu_workload),
        OpSpec("conv_transpose", LAYERS, ("forward",), exact=False, memory_bound=False,
               reference_is_stock=True, build=conv_transpose_workload),
        OpSpec("unpool_conv_transpose", ("L1", "L2", "L5"), ("forward",), exact=False, memory_bound=False,
               reference_is_stock=False, build=unpool_conv_transpose_workload),
    )
}  # fmt: skip


@dataclass(frozen=True)
class OpTarget:
    """A README target on op cells (set for batch 32 at ZFNet's 224 input): the fastest zfkernels backend
    of every matching cell at least `times` x faster than `provider` ("eager", "compile"), or, for
    provider "copy", moving at least `times` of the preallocated copy's bandwidth."""

    what: str
    ops: tuple[str, ...]
    shapes: tuple[str, ...]
    modes: tuple[str, ...]
    dtypes: tuple[str, ...]
    provider: str
    times: float

    def applies(self, case: Case) -> bool:
        return (
            case.op in self.ops
            and case.shape in self.shapes
            and case.mode in self.modes
            and case.dtype in self.dtypes
        )


TARGET_BATCH = 32
_MEMORY_BOUND_OPS = ("pool", "unpool", "relu")
OP_TARGETS: tuple[OpTarget, ...] = (
    OpTarget("relu + pool with switches, L1 forward >= 10x eager", ("pool",), ("L1",), ("forward",),
             ("fp32",), "eager", 10.0),
    OpTarget("... and >= 25x eager (issue 14: no regression)", ("pool",), ("L1",), ("forward",), ("fp32",),
             "eager", 25.0),
    OpTarget("... >= 5x torch.compile", ("pool",), ("L1",), ("forward",), ("fp32",), "compile", 5.0),
    OpTarget("... at >= 80% of the copy's bandwidth", ("pool",), ("L1",), ("forward",), ("fp32",), "copy",
             0.8),
    OpTarget("unpool + relu, L1 forward >= 5x eager", ("unpool",), ("L1",), ("forward",), ("fp32",), "eager",
             5.0),
    OpTarget("max-pool backward, L1 >= 3x eager", ("pool",), ("L1",), ("backward",), ("fp32",), "eager", 3.0),
    OpTarget("conv_transpose2d, L1 forward >= 2x eager", ("conv_transpose",), ("L1",), ("forward",),
             ("fp32",), "eager", 2.0),
    OpTarget("unpool_conv_transpose2d, L2 forward >= 2x the three stock ops", ("unpool_conv_transpose",),
             ("L2",), ("forward",), ("fp32",), "eager", 2.0),
    OpTarget("every memory-bound cell (pool, unpool, relu at L1-L5) >= 1.0x eager", _MEMORY_BOUND_OPS,
             LAYERS, MODES, tuple(DTYPES), "eager", 1.0),
    OpTarget("every convolution cell >= 0.95x eager", ("conv_transpose", "unpool_conv_transpose"), LAYERS,
             MODES, tuple(DTYPES), "eager", 0.95),
    OpTarget("per-call cost: a tiny (1x4x8x8) call <= 4x torch's (>= 0.25x eager)", _MEMORY_BOUND_OPS,
             (TINY,), MODES, tuple(DTYPES), "eager", 0.25),
)  # fmt: skip


def select_cases(
    ops: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("fp32",),
    headline: bool = False,
) -> list[Case]:
    """The cases of the chosen ops, shapes, modes and dtypes, in suite order (op cases, then end-to-end).

    `None` means each op's own: all its layers, and its quick modes (the issue-2 set: pool forward and
    backward, ReLU forward and backward, everything else forward). `headline` (the default run of
    `zfkernels bench`) narrows what is not named: op cases at HEADLINE_LAYERS, forward and backward;
    end-to-end cases at their headline shapes. An end-to-end case exists at its own shapes, modes and dtypes
    only, so a selection that names none of those leaves it out (an empty result is the caller's to report:
    see `describe_ops`). Unknown names raise ValueError.
    """
    _check_names("op", ops, [*OPS, *END_TO_END])
    _check_names("shape", shapes, [*LAYERS, TINY, *(s for spec in END_TO_END.values() for s in spec.shapes)])
    _check_names("mode", modes, MODES)
    _check_names("dtype", dtypes, DTYPES)
    cases = []
    for spec in OPS.values():
        if ops is not None and spec.name not in ops:
            continue
        for layer in spec.layers:
            if (shapes is not None and layer not in shapes) or (
                shapes is None and headline and layer not in HEADLINE_LAYERS
            ):
                continue
            own_modes = HEADLINE_MODES if headline else spec.quick_modes
            for mode in own_modes if modes is None else [m for m in MODES if m in modes]:
                cases.extend(Case(spec.name, layer, mode, dtype) for dtype in dtypes)
    for spec in END_TO_END.values():
        if (ops is None and spec.opt_in) or (ops is not None and spec.name not in ops):
            continue
        own_shapes = spec.headline_shapes or spec.shapes if headline else spec.shapes
        cases.extend(
            Case(spec.name, shape, mode, dtype)
            for shape in spec.shapes
            if (shape in shapes if shapes is not None else shape in own_shapes)
            for mode in spec.modes
            if modes is None or mode in modes
            for dtype in dtypes
            if dtype in spec.dtypes
        )
    return cases


def describe_ops(ops: Sequence[str] | None = None) -> str:
    """Where each op exists (shapes, modes, dtypes), for the message when a selection matches nothing."""
    described = []
    for name in ops or [*OPS, *END_TO_END]:
        if name in END_TO_END:
            spec = END_TO_END[name]
            described.append(
                f"{name} at shape {'/'.join(spec.shapes)}, mode {'/'.join(spec.modes)}, "
                f"{'/'.join(spec.dtypes)} only "
                f"({spec.dtype_reason})"
            )
        elif name in OPS:
            described.append(f"{name} at {', '.join(OPS[name].layers)} in any mode and dtype")
    return "; ".join(described)


def case_unavailable(case: Case) -> str | None:
    """Why `case` cannot be built in this environment (a package it needs is missing), or None."""
    if not case.end_to_end:
        return None
    missing = [module for module in END_TO_END[case.op].requires if importlib.util.find_spec(module) is None]
    if missing:
        return f"{case.op} needs {', '.join(missing)} (pip install {' '.join(missing)})"
    return None


def provider_unavailable(provider: str) -> str | None:
    """Why a third-party provider cannot run here (not installed, or its import fails), or None."""
    if provider not in THIRD_PARTY_PROVIDERS:
        return None
    return _third_party_import_error(provider)


@functools.cache
def _third_party_import_error(provider: str) -> str | None:
    module = _THIRD_PARTY_MODULES[provider]
    try:
        importlib.import_module(module)
    except Exception as error:  # any failure to import means the provider cannot run, whatever the cause
        return f"{module} cannot be imported ({type(error).__name__}: {error}); pip install {provider}"
    return None


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
        if backend == "auto" or (backend == "triton" and probe.device.type == "cpu"):
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
    """Providers a case is measured with: `requested` (those that run here and apply to the case), or by
    default: for op cases stock eager, torch.compile and every backend, leaving out the reference backend
    where it is the stock code itself; for end-to-end cases their external providers that can run here
    (captum only where it imports) and every backend."""
    backends = backend_providers(device)
    if case.end_to_end:
        spec = END_TO_END[case.op]
        ours = backends[:1] if spec.single_backend else backends
        runnable = [*(p for p in spec.external_providers if provider_unavailable(p) is None), *ours]
        return runnable if requested is None else [p for p in requested if p in runnable]
    if requested is not None:  # asked for by name, the reference backend is timed even where it is stock
        return [p for p in requested if p in STOCK_PROVIDERS or p in backends]
    return [
        *STOCK_PROVIDERS,
        *(b for b in backends if not (b == "reference" and case.spec.reference_is_stock)),
    ]


@dataclass
class ProviderCall:
    """A provider's prepared case: `run` is what gets timed; `comparable` turns its return value into the
    tensors checked against the reference (outside any timing); `setup`, when there is one, runs before
    every call, verifying or timed, and is never timed: it puts back the state the timed work starts from
    (weights and optimizer state a training step changed)."""

    run: Callable[[], object]
    comparable: Callable[[object], tuple[Tensor, ...]]
    setup: Callable[[], None] | None = None

    def fresh_run(self) -> object:
        """`setup`, then `run`: one call from the starting state."""
        if self.setup is not None:
            self.setup()
        return self.run()


@dataclass
class BuiltCase:
    """A case with its inputs on the device: hands each provider its callable and checks its result."""

    case: Case
    device: torch.device
    workload: Workload
    _expected: tuple[Tensor, ...] | None = field(default=None, repr=False)
    # Op calls take micro- to milliseconds: warmed up, timed many times, profiled in a call of their own.
    long_calls: ClassVar[bool] = False

    @property
    def shapes(self) -> dict[str, list[int]]:
        """Named input/output shapes, for the report."""
        return self.workload.shapes

    @property
    def note(self) -> str | None:
        """What the report should say about the case beyond its shapes (op cases need nothing)."""
        return None

    @property
    def bytes_moved(self) -> int | None:
        """Bytes a memory-bound op must read and write once (its inputs and outputs, in zfkernels' form: uint8
        switches), credited alike to every provider so that GB/s ranks them as time does.
        None for compute-bound ops."""
        if not self.case.spec.memory_bound:
            return None
        forward, backward = self.workload.forward_bytes, self.workload.backward_bytes
        return {"forward": forward, "backward": backward, "full": forward + backward}[self.case.mode]

    def scope(self, provider: str) -> contextlib.AbstractContextManager[None]:
        """Where `provider` must run: under its zfkernels backend (backward passes included), or as is."""
        return provider_scope(provider)

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
            to_comparable = as_tuple
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
                lambda: torch.autograd.grad(differentiated, wrt, w.grad_output, retain_graph=True), as_tuple
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
            self._expected = reference_result(self)
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


# ------------------------------------------------------------------------------------------ end-to-end
@dataclass(frozen=True)
class SpeedupBar:
    """A target an issue sets: the fastest zfkernels backend at least `times` faster than `provider`
    (`times` < 1: costing at most 1 / `times` as much, e.g. 1 / 1.10 against a floor)."""

    provider: str
    times: float


@dataclass(frozen=True)
class MemoryBar:
    """A target an issue sets: the zfkernels backend's peak memory at most `times` x `provider`'s."""

    provider: str
    times: float


@dataclass
class EndToEndWorkload:
    """A whole workload, prepared: a factory per provider that returns its warm `ProviderCall`.

    `ours` serves every zfkernels backend (it is called inside the backend's scope); `external` holds the
    stock and third-party providers. A factory does all one-time work (model copies, torch.compile's
    compilation), so the first call it returns is as warm as the next. Each output is compared with the
    reference's within `tolerance` x its largest magnitude; with `slice_dims` > 0 every slice along the
    leading `slice_dims` dimensions against its own (one projection must not hide behind a larger one).

    `float64`, where given, computes the same result in float64 (comparable form). An output off the
    reference by more than the tolerance then still passes if its error against float64, relative to its
    scale, is at most twice the reference's worst over all outputs: fp32's own noise floor for this
    workload (the guide's rule for arithmetic in another order, which torch.compile's training step needs:
    see `end_to_end.zfnet_train_workload`).
    """

    ours: Callable[[], ProviderCall]
    external: dict[str, Callable[[], ProviderCall]]
    output_names: list[str]
    tolerance: float
    shapes: dict[str, list[int]]
    note: str
    slice_dims: int = 0
    float64: Callable[[], tuple[Tensor, ...]] | None = None
    # Providers timed but never checked (a baseline that does not compute the result), with the reason.
    unchecked: dict[str, str] = field(default_factory=dict)
    # Providers that do a sample of the work: their time x this factor is what the targets compare.
    time_scale: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EndToEndSpec:
    """An end-to-end case: its one shape and mode, the dtypes it runs in, and who it is measured against."""

    name: str
    shapes: tuple[str, ...]
    modes: tuple[str, ...]
    dtypes: tuple[str, ...]
    dtype_reason: str
    external_providers: tuple[str, ...]
    requires: tuple[str, ...]
    # (batch, image_size, quick, device, seed, shape, mode) -> workload
    build: Callable[[int, int, bool, torch.device, int, str, str], EndToEndWorkload]
    bars: tuple[SpeedupBar, ...] = ()
    memory_bar_bytes: int | None = None
    memory_bars: tuple[MemoryBar, ...] = ()
    # Measured for peak memory only: each provider runs once, under the memory profiler; nothing is timed
    # or checked against the reference (a case that times and checks the same code does that).
    memory_only: bool = False
    # Uses no zfkernels op (mining runs the model's own layers): one backend provider stands for all.
    single_backend: bool = False
    # Left out of a selection that names no ops (a run takes minutes): `--ops <name>` runs it.
    opt_in: bool = False
    # The shapes the default (headline) run keeps when none is named; empty: all of them.
    headline_shapes: tuple[str, ...] = ()


@dataclass
class BuiltEndToEnd:
    """An end-to-end case with its workload on the device; the same interface as `BuiltCase`."""

    case: Case
    device: torch.device
    workload: EndToEndWorkload
    _expected: tuple[Tensor, ...] | None = field(default=None, repr=False)
    _float64: tuple[Tensor, ...] | None = field(default=None, repr=False)
    _float64_floor: float | None = field(default=None, repr=False)
    # Calls take seconds to minutes: the runner verifies, profiles and warms up in one call, and times few.
    long_calls: ClassVar[bool] = True
    bytes_moved: ClassVar[int | None] = None  # compute-bound: no bandwidth figure

    @property
    def memory_only(self) -> bool:
        return END_TO_END[self.case.op].memory_only

    @property
    def shapes(self) -> dict[str, list[int]]:
        return self.workload.shapes

    @property
    def note(self) -> str | None:
        return self.workload.note

    def scope(self, provider: str) -> contextlib.AbstractContextManager[None]:
        """Where `provider` must run: under its zfkernels backend, or as is."""
        return provider_scope(provider)

    def call(self, provider: str) -> ProviderCall:
        """Prepare `provider` (compiling, for "compile"); call this inside `scope(provider)`."""
        if provider in self.workload.external:
            return self.workload.external[provider]()
        if provider in EXTERNAL_PROVIDERS:
            raise ValueError(f"provider {provider!r} does not measure {self.case.id}")
        return self.workload.ours()

    def expected(self) -> tuple[Tensor, ...]:
        """The reference backend's result, in comparable form (computed once, on first use)."""
        if self._expected is None:
            self._expected = reference_result(self)
        return self._expected

    def mismatch(self, actual: tuple[Tensor, ...]) -> str | None:
        """Why `actual` differs from the reference (None if it agrees), naming the first differing output."""
        expected = self.expected()
        if len(actual) != len(expected):
            return f"{len(actual)} outputs, expected {len(expected)}"
        w = self.workload
        for index, (name, got, want) in enumerate(zip(w.output_names, actual, expected, strict=True)):
            problem = _scaled_mismatch(got, want, w.tolerance, w.slice_dims)
            if problem is None:
                continue
            if w.float64 is None or got.shape != want.shape:
                return f"{name}: {problem}"
            error = _relative_error(got, self.float64_result()[index])
            floor = self.float64_floor()
            if not error <= 2 * floor:
                return (
                    f"{name}: {problem}; against float64 its error is {error:.3g} of its scale, over twice "
                    f"the reference's worst ({floor:.3g})"
                )
        return None

    def float64_result(self) -> tuple[Tensor, ...]:
        """The workload's float64 result (computed once, on first use: only when a provider needs it)."""
        if self.workload.float64 is None:
            raise ValueError(f"{self.case.id} has no float64 computation")
        if self._float64 is None:
            self._float64 = self.workload.float64()
        return self._float64

    def float64_floor(self) -> float:
        """fp32's noise floor here: the reference's largest error against float64 over all outputs, each
        relative to its own scale."""
        if self._float64_floor is None:
            pairs = zip(self.expected(), self.float64_result(), strict=True)
            self._float64_floor = max(_relative_error(want, truth) for want, truth in pairs)
        return self._float64_floor


def _relative_error(got: Tensor, truth: Tensor) -> float:
    """max |got - truth| / max |truth|, in float64 (NaN counts as infinite; 0 for an all-zero match)."""
    if got.numel() == 0:
        return 0.0
    truth = truth.double()
    error = float((got.detach().double() - truth).abs().max().nan_to_num(math.inf))
    return error / max(float(truth.abs().max()), 1e-300) if error else 0.0


def _scaled_mismatch(got: Tensor, want: Tensor, tolerance: float, slice_dims: int) -> str | None:
    """Max |got - want| within `tolerance` x max |want|, per slice along the leading `slice_dims` dims."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"is {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
    if want.numel() == 0:
        return None
    lead = tuple(want.shape[:slice_dims])
    got_slices = got.detach().float().reshape(math.prod(lead), -1)
    want_slices = want.float().reshape(math.prod(lead), -1)
    error = (got_slices - want_slices).abs().amax(dim=1)  # NaN where either is NaN: never within tolerance
    scale = want_slices.abs().amax(dim=1)
    failing = ~(error <= tolerance * scale.clamp(min=1e-30))
    if not bool(failing.any()):
        return None
    worst = int(torch.where(failing, error / scale.clamp(min=1e-30), -1.0).nan_to_num(math.inf).argmax())
    where = f" at {list(_unravel(worst, lead))}" if lead else ""
    count = f" ({int(failing.sum())} of {len(failing)} slices)" if lead else ""
    return (
        f"max |error| {float(error[worst]):.3g}{where} exceeds {tolerance:g} x {float(scale[worst]):.3g}"
        + count
    )


def _unravel(index: int, shape: Sequence[int]) -> tuple[int, ...]:
    position = []
    for size in reversed(shape):
        position.append(index % size)
        index //= size
    return tuple(reversed(position))


def _end_to_end(name: str) -> Callable[..., EndToEndWorkload]:
    """A workload builder of end_to_end.py, imported when first built (that module builds on this one's
    classes)."""

    def build(*args) -> EndToEndWorkload:
        from . import end_to_end

        return getattr(end_to_end, name)(*args)

    return build


def _mining_workload(
    batch: int, image_size: int, quick: bool, device: torch.device, seed: int, shape: str, mode: str
):
    from .analysis import mining_workload  # analysis.py builds on this module's classes

    return mining_workload(batch, image_size, quick, device, seed)


def _projection_workload(
    batch: int, image_size: int, quick: bool, device: torch.device, seed: int, shape: str, mode: str
):
    from .analysis import projection_workload

    return projection_workload(batch, image_size, quick, device, seed)


def _mining_memory_workload(
    batch: int, image_size: int, quick: bool, device: torch.device, seed: int, shape: str, mode: str
):
    from .analysis import mining_memory_workload

    return mining_memory_workload(batch, image_size, quick, device, seed)


END_TO_END: dict[str, EndToEndSpec] = {
    spec.name: spec
    for spec in (
        EndToEndSpec(
            "zfnet_train",
            shapes=("ZFNet",),
            modes=("full",),
            dtypes=("fp32",),
            dtype_reason="the paper trains in fp32; under bf16 autocast torch.compile's gradients differ "
            "from eager's by a quarter of their scale (inductor keeps fused intermediates in fp32), so a "
            "bf16 step has no check every provider can pass",
            external_providers=("eager", "compile"),
            requires=(),
            build=_end_to_end("zfnet_train_workload"),
        ),
        EndToEndSpec(
            "deconvnet",
            shapes=("AlexNet.conv5",),
            modes=("forward",),
            dtypes=("fp32",),
            dtype_reason="the issue's workload is fp32 on the CPU",
            external_providers=("eager", "compile", "captum"),
            requires=("torchvision",),
            build=_end_to_end("deconvnet_workload"),
            bars=(SpeedupBar("captum", 30.0), SpeedupBar("eager", 10.0)),
            memory_bar_bytes=3 * 10**9,
        ),
        EndToEndSpec(
            "patched_models",
            shapes=tuple(PATCHED_MODELS),
            modes=("forward", "full"),
            dtypes=("fp32",),
            dtype_reason="the models train in fp32",
            external_providers=("eager",),
            requires=("torchvision",),
            build=_end_to_end("patched_models_workload"),
            bars=(SpeedupBar("eager", 1.0),),
            headline_shapes=("ResNet18.32",),
        ),
        EndToEndSpec(
            "mining",
            shapes=("AlexNet.2048",),
            modes=("forward",),
            dtypes=("fp32",),
            dtype_reason="the issue's workload is fp32 on the CPU",
            external_providers=("forward",),
            requires=("torchvision",),
            build=_mining_workload,
            bars=(SpeedupBar("forward", 1 / 1.10),),
            single_backend=True,
            opt_in=True,
        ),
        EndToEndSpec(
            "projection",
            shapes=("AlexNet.2048",),
            modes=("forward",),
            dtypes=("fp32",),
            dtype_reason="the issue's workload is fp32 on the CPU",
            external_providers=("forward", "captum"),
            requires=("torchvision",),
            build=_projection_workload,
            bars=(SpeedupBar("forward", 1 / 1.5), SpeedupBar("captum", 5.0)),
            opt_in=True,
        ),
        EndToEndSpec(
            "mining_memory",
            shapes=("AlexNet.8192",),
            modes=("forward",),
            dtypes=("fp32",),
            dtype_reason="the issue's workload is fp32 on the CPU",
            external_providers=("eighth",),
            requires=("torchvision",),
            build=_mining_memory_workload,
            memory_bars=(MemoryBar("eighth", 1.10),),
            single_backend=True,
            opt_in=True,
            memory_only=True,
        ),
    )
}
