"""`python -m zfkernels.info`: which backends are built and usable here, and why one is missing."""

from __future__ import annotations

import platform

import torch

from . import __version__, _extension
from .ops import _backend


def report() -> str:
    lines = [
        f"zfkernels {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"CPU threads {torch.get_num_threads()}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        lines.append(f"CUDA {torch.version.cuda}: {torch.cuda.get_device_name()}")
    else:
        lines.append(f"CUDA: no device visible (torch built with CUDA {torch.version.cuda})")
    lines.append("backends:")
    for name in _backend.KNOWN_BACKENDS:
        reason = _backend._why_unavailable(name)
        state = "usable" if reason is None else f"missing: {reason}"
        detail = {
            "auto": "picks per device",
            "cpu": "C++ kernels (zfkernels._C)",
            "reference": "pure PyTorch",
        }[name]
        lines.append(f"  {name:<10} {state} ({detail})")
    cpu_choice = _backend.resolve(torch.device("cpu"))
    lines.append(f"selected backend: {_backend.get_backend()}; CPU tensors run on '{cpu_choice}'")
    if _extension.cpu_module is not None:
        lines.append(f"extension: {_extension.cpu_module.__file__}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
