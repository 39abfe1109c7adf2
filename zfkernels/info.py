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

        interpreted = " (TRITON_INTERPRET=1: kernels run in the CPU interpreter)"
        lines.append(f"triton {triton.__version__}" + (interpreted if _backend.triton_interpreted() else ""))
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
            "triton": "Triton kernels (zfkernels.triton)",
            "cuda": "CUDA C++ kernels (zfkernels._C_cuda)",
        }[name]
        lines.append(f"  {name:<10} {state} ({detail})")
    cpu_choice = _backend.resolve(torch.device("cpu"))
    lines.append(f"selected backend: {_backend.get_backend()}; CPU tensors run on '{cpu_choice}'")
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        picks = ", ".join(f"{op} -> {_backend.resolve(cuda, op)}" for op in _backend.AUTO_ON_CUDA)
        lines.append(f"CUDA tensors under 'auto': {picks}")
    for module in (_extension.cpu_module, _extension.cuda_module):
        if module is not None:
            lines.append(f"extension: {module.__file__}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
