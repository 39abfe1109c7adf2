"""The one place that picks a backend for an op call.

Backends implement the same functions (see zfkernels/ops/reference.py for the list and their exact
semantics): "reference" (pure PyTorch, any device), "cpu" (C++ kernels, CPU tensors), "triton" (Triton
kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1, which is how the tests run them without a
GPU) and "cuda" (CUDA C++ kernels, CUDA tensors). "auto" resolves per device and, on CUDA, per op
(AUTO_ON_CUDA below).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import os
from collections.abc import Callable, Iterator
from types import ModuleType, SimpleNamespace

import torch
from torch.autograd import forward_ad

from .. import _extension

KNOWN_BACKENDS = ("auto", "cpu", "reference", "triton", "cuda")
_selected = "auto"

# "auto" on CUDA tensors: the first available backend of each list. Not yet measured on a GPU (none was
# available while writing it); the order follows the kernels' design:
# - memory-bound ops: both GPU kernels are single-pass at copy bandwidth, so the difference is the launch:
#   the CUDA kernels launch from C++ (a few us), Triton's Python launcher costs tens of us per call;
# - conv_transpose2d: cuDNN (through the reference backend) picks tensor-core algorithms per shape;
# - the fused unpool + deconv: Triton's tl.dot uses tensor cores; the CUDA kernel is a CUDA-core gather.
_MEMORY_BOUND = ("cuda", "triton", "reference")
AUTO_ON_CUDA: dict[str, tuple[str, ...]] = {
    "max_pool2d_switches": _MEMORY_BOUND,
    "max_pool2d_switches_backward": _MEMORY_BOUND,
    "max_unpool2d": _MEMORY_BOUND,
    "gather_switches": _MEMORY_BOUND,
    "relu": _MEMORY_BOUND,
    "relu_": _MEMORY_BOUND,
    "relu_backward": _MEMORY_BOUND,
    "renormalize_filters_": _MEMORY_BOUND,
    "conv_transpose2d": ("reference", "triton", "cuda"),
    "unpool_conv_transpose2d": ("triton", "cuda", "reference"),
}


def triton_interpreted() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1): then on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as error:
        return f"triton is not installed ({error})"
    return None


def _why_unavailable(name: str) -> str | None:
    if name == "cpu" and _extension.cpu_module is None:
        return f"the C++ extension zfkernels._C did not load ({_extension.cpu_error})"
    if name == "triton":
        if _triton_import_error() is not None:
            return _triton_import_error()
        if not torch.cuda.is_available() and not triton_interpreted():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"
    if name == "cuda":
        if _extension.cuda_module is None:
            return f"the CUDA extension zfkernels._C_cuda is not built ({_extension.cuda_error})"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
    return None


def available_backends() -> list[str]:
    """Backends usable in this process ("auto" always is)."""
    return [name for name in KNOWN_BACKENDS if _why_unavailable(name) is None]


def get_backend() -> str:
    return _selected


def set_backend(name: str) -> None:
    """Select the backend for every op call that follows: one of KNOWN_BACKENDS."""
    global _selected
    if not isinstance(name, str) or name not in KNOWN_BACKENDS:
        raise ValueError(f"backend must be one of {list(KNOWN_BACKENDS)}, got {name!r}")
    reason = _why_unavailable(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    _selected = name
    _implementations.clear()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the ops inside with backend `name`, then restore the previous choice."""
    previous = _selected
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _runs_on(name: str) -> tuple[str, ...]:
    """Device types a concrete backend accepts."""
    if name == "cpu":
        return ("cpu",)
    if name == "cuda":
        return ("cuda",)
    if name == "triton":
        return ("cpu",) if triton_interpreted() else ("cuda",)
    return ("cpu", "cuda", "meta", "mps", "xpu")  # reference: wherever torch runs


def resolve(device: torch.device, op: str | None = None) -> str:
    """The concrete backend that runs `op` on `device` under the current selection."""
    if _selected != "auto":
        if device.type not in _runs_on(_selected):
            raise ValueError(
                f"backend {_selected!r} runs {' or '.join(_runs_on(_selected))} tensors only, "
                f"got a tensor on {device}"
            )
        return _selected
    if device.type == "cpu":
        return "cpu" if _extension.cpu_module is not None else "reference"
    if device.type == "cuda" and op is not None:
        for name in AUTO_ON_CUDA[op]:
            if _why_unavailable(name) is None:
                return name
    return "reference"


def _module(name: str) -> ModuleType:
    return importlib.import_module(
        {
            "cpu": "zfkernels.ops.cpu",
            "reference": "zfkernels.ops.reference",
            "triton": "zfkernels.triton",
            "cuda": "zfkernels.ops.cuda",
        }[name]
    )


_implementations: dict[str, ModuleType | SimpleNamespace] = {}  # per device type, for the selection


def implementation(device: torch.device) -> ModuleType | SimpleNamespace:
    """The backend functions that run ops on `device` under the current selection (per op under "auto")."""
    found = _implementations.get(device.type)
    if found is None:
        found = _module(resolve(device)) if _selected != "auto" or device.type != "cuda" else _auto_on_cuda()
        _implementations[device.type] = found
    return found


@functools.cache  # which backends are available cannot change within a process
def _auto_on_cuda() -> SimpleNamespace:
    cuda = torch.device("cuda")
    return SimpleNamespace(**{op: getattr(_module(resolve(cuda, op)), op) for op in AUTO_ON_CUDA})


# ------------------------------------------------------------------ the ops a public function calls
# Each zfkernels::<op> custom op dispatches to a backend inside its implementation, so torch.compile sees
# it as one opaque node. The triton backend also registers zfkernels_triton::<op>, a triton_op with the same
# schema that torch.compile traces into; the public functions (and the backward formulas) call that twin
# directly when the triton backend is the one that runs, and it carries the same autograd formulas.
# A forward-mode formula `jvp(inputs, output, tangents)` returns the output's tangent (a tuple when the op
# has several outputs; None for a zero or non-differentiable one) from the inputs' tangents (None where an
# input has none); it is linear in the tangents and calls ops through `op()`, like the backward formulas.
#
# In plain eager code (no torch.compile, tracing, torch.func transform, forward AD, mode or tensor
# subclass) a call skips the dispatcher: the op's body runs directly, inside the same autograd.Function
# when a gradient is needed. The dispatcher's round trip through Python cost ~20 us a call, more than a
# small op's kernel.


@dataclasses.dataclass
class OpRecord:
    """One zfkernels:: op: its custom op, its Python body, and (once registered) its autograd Function."""

    name: str
    custom_op: object  # torch._library.custom_ops.CustomOpDef
    body: Callable  # the function the custom op runs on every device (it picks the backend)
    mutated: tuple[int, ...]  # positions of the arguments it writes in place
    formulas: tuple[Callable, Callable, Callable] | None = None  # backward, setup_context, jvp
    direct_function: type[torch.autograd.Function] | None = None  # the Function, called without dispatch
    call: Callable = None  # type: ignore[assignment]  # what op() returns for it on non-triton backends


OPS: dict[str, OpRecord] = {}


def define_op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable:
    """Decorator: `fn` becomes the custom op zfkernels::<name> (schema from its annotations), recorded."""

    def wrap(fn: Callable):
        custom_op = torch.library.custom_op(f"zfkernels::{name}", mutates_args=mutates_args)(fn)
        parameters = list(inspect.signature(fn).parameters)
        record = OpRecord(name, custom_op, fn, tuple(parameters.index(a) for a in mutates_args))
        record.call = _direct_caller(record, custom_op._opoverload)
        OPS[name] = record
        return custom_op

    return wrap


def register_autograd(custom_op, backward: Callable, setup_context: Callable, jvp: Callable) -> None:
    """Give a zfkernels custom op its reverse- and forward-mode formulas (remembered for its triton twin)."""
    record = OPS[custom_op._qualname.split("::")[1]]
    record.formulas = (backward, setup_context, jvp)
    record.direct_function = _install_autograd(custom_op, backward, setup_context, jvp, record.body)


def register_twin_autograd(namespace: str) -> None:
    """Give every op of `namespace` that has a zfkernels twin the twin's autograd formulas."""
    from torch._library.custom_ops import OPDEFS

    for name, record in OPS.items():
        if record.formulas is not None and hasattr(getattr(torch.ops, namespace), name):
            _install_autograd(OPDEFS[f"{namespace}::{name}"], *record.formulas)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def dispatcher_needed(args: tuple) -> bool:
    """Whether a call must go through the dispatcher: something besides eager autograd sees the op."""
    for a in args:
        if isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TENSORS:
            return True  # a subclass (FakeTensor, FunctionalTensor, DTensor, ...) has its own handling
    # (A TorchFunctionMode never sees a torch.ops call, so one being active changes nothing: zfkernels.patch
    # runs a model's forward under one.)
    return (
        torch.compiler.is_compiling()
        or forward_ad._current_level >= 0
        or torch._C._are_functorch_transforms_active()
        or torch._C._get_tracing_state() is not None
        or torch._C._len_torch_dispatch_stack() > 0
    )


def runs_directly(name: str, *tensors: torch.Tensor) -> bool:
    """Whether op `name` on these tensors runs without the dispatcher: plain eager code, and a backend
    other than triton (which runs through its twin op)."""
    return not _through_twin(tensors[0].device, name) and not dispatcher_needed(tensors)


def _through_twin(device: torch.device, name: str) -> bool:
    """Whether the triton backend runs op `name` on `device` (through its twin op; CPU tensors only when
    triton is selected by name, so the common CPU call skips the lookup)."""
    return (device.type != "cpu" or _selected == "triton") and _runs_twin(device.type, name)


def _direct_caller(record: OpRecord, overload) -> Callable:
    body, mutated = record.body, record.mutated

    def call(*args):
        if dispatcher_needed(args):
            return overload(*args)
        function = record.direct_function
        if function is not None and torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args)
        result = body(*args)
        for index in mutated:  # as the dispatcher's in-place bookkeeping: autograd sees the write
            torch.autograd.graph.increment_version(args[index])
        return result

    call.__name__ = call.__qualname__ = record.name
    return call


def _tangent(value):
    return forward_ad.unpack_dual(value).tangent if isinstance(value, torch.Tensor) else None


def has_tangent(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a dual tensor of forward-mode AD (then in-place fast paths must not drop it)."""
    return forward_ad._current_level >= 0 and _tangent(tensor) is not None


def _dual(output: torch.Tensor, tangent: torch.Tensor | None) -> torch.Tensor:
    return output if tangent is None else forward_ad.make_dual(output, tangent)  # None: a zero tangent


_SAVED = object()  # stands for a tensor input among the non-tensor ones kept for the forward-mode formula


def _install_autograd(
    custom_op, backward: Callable, setup_context: Callable, jvp: Callable, body: Callable | None = None
) -> type[torch.autograd.Function] | None:
    """Register the op's Autograd kernel: an autograd.Function with its backward and forward-mode formulas.
    Returns, when `body` is given, the same Function around `body` for calls that skip the dispatcher.

    This replaces the kernel torch.library's register_autograd installs, which records a backward only when
    an input requires grad: dual tensors (forward AD, torch.func.jvp) do not, so their tangents were dropped
    and came out as zeros. The Function saves the inputs it is given, dual ones included, so a backward
    run under forward AD (forward-over-reverse) sees their tangents too.
    """
    name, overload = custom_op._qualname, custom_op._opoverload

    def below_autograd(keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    def forward(keyset, *args):
        return below_autograd(keyset, args)

    def setup_formulas(ctx, inputs, output):
        setup_context(ctx, inputs[1:], output)
        if forward_ad._current_level >= 0:  # what the forward-mode formula reads
            outputs = output if isinstance(output, tuple) else (output,)
            ctx.save_for_forward(*[a for a in inputs[1:] if isinstance(a, torch.Tensor)], *outputs)
            ctx.jvp_arguments = [_SAVED if isinstance(a, torch.Tensor) else a for a in inputs[1:]]

    def backward_formula(ctx, *grads):
        needs_input_grad = ctx.needs_input_grad
        ctx.needs_input_grad = needs_input_grad[1:]  # as the op's inputs, without the keyset
        try:
            grad_inputs = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs_input_grad
        return (None, *(grad_inputs if isinstance(grad_inputs, tuple) else (grad_inputs,)))

    def jvp_formula(ctx, _keyset_tangent, *tangents):
        saved = iter(ctx.saved_tensors)
        primals = [next(saved) if a is _SAVED else a for a in ctx.jvp_arguments]
        outputs = tuple(saved)
        return jvp(primals, outputs if len(outputs) > 1 else outputs[0], tangents)

    # Named after the op, so autograd graphs read "zfkernels_reluBackward" (the name is fixed at creation).
    formulas = type(
        name.replace("::", "_"),
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_formulas),
            "backward": staticmethod(backward_formula),
            "jvp": staticmethod(jvp_formula),
        },
    )

    def autograd_kernel(keyset, *args):
        functorch = torch._C._are_functorch_transforms_active()
        if functorch and forward_ad._current_level >= 0:
            # torch.func.jvp/jacfwd: functorch would route the Function through a higher-order op that
            # cannot run here, so the op runs on the primals and its output is made dual.
            tangents = [_tangent(a) for a in args]
            if any(t is not None for t in tangents):
                primals = [
                    a if t is None else forward_ad.unpack_dual(a).primal
                    for a, t in zip(args, tangents, strict=True)
                ]
                output = autograd_kernel(keyset, *primals)
                output_tangent = jvp(primals, output, tangents)
                if not isinstance(output, tuple):
                    return _dual(output, output_tangent)
                return tuple(_dual(o, t) for o, t in zip(output, output_tangent, strict=True))
        if functorch and _in_reverse_transform(args):
            raise NotImplementedError(
                f"{name}: torch.func's reverse-mode transforms (grad, vjp, jacrev, hessian) cannot run "
                "torch.library custom ops with a backward formula in this torch version; use "
                "torch.autograd.grad or .backward() for gradients (torch.func.jvp, jacfwd and vmap work)"
            )
        if (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)) or (
            forward_ad._current_level >= 0 and any(_tangent(a) is not None for a in args)
        ):
            return formulas.apply(keyset, *args)
        return below_autograd(keyset, args)

    custom_op._lib.impl(custom_op._name, autograd_kernel, "Autograd", with_keyset=True)
    if body is None:
        return None
    # Direct calls never carry forward-mode tangents (those go through the dispatcher), so no jvp here.
    return type(
        formulas.__name__,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(body),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        },
    )


def _in_reverse_transform(args) -> bool:
    """Whether the innermost functorch transform is torch.func.grad/vjp and it differentiates these args."""
    from torch._C._functorch import TransformType, peek_interpreter_stack

    top = peek_interpreter_stack()
    return (
        top is not None
        and top.key() == TransformType.Grad
        and torch.is_grad_enabled()
        and torch._C._any_requires_grad(*args)
    )


@torch.compiler.assume_constant_result  # run, not traced: under torch.compile the choice is fixed at tracing
def _runs_twin(device_type: str, name: str) -> bool:
    if resolve(torch.device(device_type), name) != "triton":
        return False
    _module("triton")  # defines the twins (and their autograd) on first use
    return True


def op(name: str, device: torch.device) -> Callable:
    """What a call of `name` on `device` goes through: zfkernels_triton::<name> when the triton backend runs
    it, else zfkernels::<name> (which picks its backend when it runs), directly in plain eager code."""
    if _through_twin(device, name):
        return getattr(torch.ops.zfkernels_triton, name)
    return OPS[name].call
