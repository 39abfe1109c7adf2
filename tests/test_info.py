"""`python -m zfkernels.info` and the behaviour without the compiled extension."""

import subprocess
import sys

import pytest
import torch

import zfkernels
from zfkernels import _extension, info
from zfkernels.ops import _backend


def test_info_lists_backends_and_versions():
    text = subprocess.run(
        [sys.executable, "-m", "zfkernels.info"], capture_output=True, text=True, check=True
    ).stdout
    assert f"torch {torch.__version__}" in text
    for name in ("auto", "cpu", "reference", "triton", "cuda"):
        assert f"  {name} " in text
    assert "CUDA: no device visible" in text or "CUDA tensors under 'auto'" in text


def test_missing_extension_falls_back_to_reference_and_says_why(monkeypatch):
    monkeypatch.setattr(_extension, "cpu_module", None)
    monkeypatch.setattr(_extension, "cpu_error", "ImportError: simulated")
    assert "cpu" not in zfkernels.available_backends()
    assert {"auto", "reference"} <= set(zfkernels.available_backends())
    assert _backend.resolve(torch.device("cpu")) == "reference"
    with pytest.raises(RuntimeError, match="simulated"):
        zfkernels.set_backend("cpu")
    assert "missing: the C++ extension zfkernels._C did not load (ImportError: simulated)" in info.report()
    x = torch.randn(1, 2, 7, 7)
    values, switches = zfkernels.max_pool2d_switches(x, 3, 2)  # still works, on the reference backend
    assert torch.equal(values, torch.nn.functional.max_pool2d(x, 3, 2))


def test_cuda_backend_without_module_or_device_says_why(monkeypatch):
    monkeypatch.setattr(_extension, "cuda_module", None)
    monkeypatch.setattr(_extension, "cuda_error", "ImportError: simulated")
    assert "cuda" not in zfkernels.available_backends()
    with pytest.raises(RuntimeError, match="_C_cuda is not built"):
        zfkernels.set_backend("cuda")
    expected = "missing: the CUDA extension zfkernels._C_cuda is not built (ImportError: simulated)"
    assert expected in info.report()


def test_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        assert "triton" not in zfkernels.available_backends()
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            zfkernels.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend._runs_on("triton") == ("cpu",)


def test_backend_on_the_wrong_device_names_it(monkeypatch):
    monkeypatch.setattr(_backend, "_selected", "cpu")
    with pytest.raises(ValueError, match="backend 'cpu' runs cpu tensors only, got a tensor on meta"):
        _backend.resolve(torch.device("meta"))
