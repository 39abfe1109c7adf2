"""The one place that picks a backend for an op call.

Backends implement the same functions (see zfkernels/ops/reference.py for the list and their exact
semantics). "auto" resolves per device:
  cpu tensors  -> "cpu" (the C++ kernels) when the extension is built, else "reference";
  cuda tensors -> "reference" until the triton/cuda backends land (they will rank first there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import torch

from .. import _extension

KNOWN_BACKENDS = ("auto", "cpu", "reference")
_selected = "auto"


def _why_unavailable(name: str) -> str | None:
    if name == "cpu" and _extension.cpu_module is None:
        return f"the C++ extension zfkernels._C did not load ({_extension.cpu_error})"
    return None


def available_backends() -> list[str]:
    """Backends usable in this process ("auto" always is)."""
    return [name for name in KNOWN_BACKENDS if _why_unavailable(name) is None]


def get_backend() -> str:
    return _selected


def set_backend(name: str) -> None:
    """Select the backend for every op call that follows ("auto", "cpu" or "reference")."""
    global _selected
    if not isinstance(name, str) or name not in KNOWN_BACKENDS:
        raise ValueError(f"backend must be one of {list(KNOWN_BACKENDS)}, got {name!r}")
    reason = _why_unavailable(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    _selected = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the ops inside with backend `name`, then restore the previous choice."""
    previous = _selected
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve(device: torch.device) -> str:
    if _selected != "auto":
        if _selected == "cpu" and device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs CPU tensors only, got a tensor on {device}")
        return _selected
    if device.type == "cpu" and _extension.cpu_module is not None:
        return "cpu"
    return "reference"


def implementation(device: torch.device) -> ModuleType:
    """The backend module that runs an op on `device` under the current selection."""
    name = resolve(device)
    if name == "cpu":
        from . import cpu

        return cpu
    from . import reference

    return reference
