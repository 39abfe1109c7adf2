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
    for name in ("auto", "cpu", "reference"):
        assert f"  {name} " in text


def test_missing_extension_falls_back_to_reference_and_says_why(monkeypatch):
    monkeypatch.setattr(_extension, "cpu_module", None)
    monkeypatch.setattr(_extension, "cpu_error", "ImportError: simulated")
    assert zfkernels.available_backends() == ["auto", "reference"]
    assert _backend.resolve(torch.device("cpu")) == "reference"
    with pytest.raises(RuntimeError, match="simulated"):
        zfkernels.set_backend("cpu")
    assert "missing: the C++ extension zfkernels._C did not load (ImportError: simulated)" in info.report()
    x = torch.randn(1, 2, 7, 7)
    values, switches = zfkernels.max_pool2d_switches(x, 3, 2)  # still works, on the reference backend
    assert torch.equal(values, torch.nn.functional.max_pool2d(x, 3, 2))
