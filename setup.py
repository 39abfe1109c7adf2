"""setup.py drives CMake (one build system): it configures csrc/ with pybind11 and copies the modules in.

Environment:
  ZFK_CUDA=1 forces the CUDA module, ZFK_CUDA=0 skips it; unset, it is built when nvcc is found.
  ZFK_CUDA_ARCHS / TORCH_CUDA_ARCH_LIST pick the GPU architectures (default sm_80 and sm_90).
  ZFK_BUILD_TYPE=Debug builds without optimization.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def resolve_nvcc(nvcc: str) -> str:
    """Follow a wrapper script (`exec .../bin/nvcc "$@"`) to the real toolkit, so CMake finds cudart."""
    path = Path(nvcc).resolve()
    try:
        text = path.read_text(errors="ignore") if path.stat().st_size < 4096 else ""
    except OSError:
        return str(path)
    for token in text.split():
        if token.endswith("/bin/nvcc") and Path(token).exists():
            return str(Path(token).resolve())
    return str(path)


def cuda_archs() -> str:
    explicit = os.environ.get("ZFK_CUDA_ARCHS")
    if explicit:
        return explicit.replace(" ", ";").replace(",", ";")
    torch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if torch_list:  # "8.0;9.0+PTX" -> "80;90"
        archs = [a.replace("+PTX", "").replace(".", "") for a in torch_list.replace(" ", ";").split(";") if a]
        return ";".join(archs)
    return "80;90"


def cuda_compiler() -> str | None:
    """The nvcc to build zfkernels._C_cuda with, or None to skip it (ZFK_CUDA=0, or no nvcc found)."""
    want_cuda = os.environ.get("ZFK_CUDA", "")
    nvcc = find_nvcc()
    if want_cuda == "1" and nvcc is None:
        raise RuntimeError("ZFK_CUDA=1 but no nvcc was found: set CUDA_HOME or put nvcc on PATH")
    if want_cuda == "0" or nvcc is None or not any((ROOT / "csrc" / "cuda").glob("*.cu")):
        return None
    return resolve_nvcc(nvcc)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if ext.name != "zfkernels._C":
            return  # the one CMake run below builds every module into the same directory
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        # A build directory in the source tree, not pip's temporary one: the next install (the README's
        # second line right after its first) reuses the compiled kernels instead of rebuilding them.
        build_type = os.environ.get("ZFK_BUILD_TYPE", "Release")
        build_temp = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{build_type}"
        build_temp.mkdir(parents=True, exist_ok=True)
        import pybind11

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
        ]
        ninja = shutil.which("ninja")
        if ninja:  # each isolated pip environment has its own ninja: name the current one every time
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        real_nvcc = cuda_compiler()
        if real_nvcc is not None:
            args += [
                "-DZFK_CUDA=ON",
                f"-DCMAKE_CUDA_COMPILER={real_nvcc}",
                f"-DCUDAToolkit_ROOT={Path(real_nvcc).parent.parent}",
                f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs()}",
            ]
        else:
            args.append("-DZFK_CUDA=OFF")
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)


# Every module is declared, so that setuptools copies each into place (an editable install copies only
# declared extensions).
MODULES = ["zfkernels._C"] + (["zfkernels._C_cuda"] if cuda_compiler() is not None else [])
setup(ext_modules=[CMakeExtension(name) for name in MODULES], cmdclass={"build_ext": CMakeBuild})
