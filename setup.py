"""Builds mtlfast._C with CMake + ninja; MTLFAST_NATIVE=0 skips it (the package still works).

When the native build is asked for and fails, the install fails: a CUDA source that stops compiling
while nvcc is present must break CI, not silently drop the backend.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    text = (ROOT / "mtlfast" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("mtlfast: cmake not found (pip install cmake), or set MTLFAST_NATIVE=0")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMTLFAST_VERSION={_version()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('MTLFAST_BUILD_TYPE', 'Release')}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if os.environ.get("MTLFAST_CUDA", "1") == "0":
            args.append("-DMTLFAST_WITH_CUDA=OFF")
        if os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}")
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


native = os.environ.get("MTLFAST_NATIVE", "1") != "0"

setup(
    version=_version(),
    packages=["mtlfast", "mtlfast.ops", "mtlfast.nn", "mtlfast.triton_kernels"],
    # Triton kernels live in a top-level source folder but install only under mtlfast: the name
    # triton_kernels is taken on PyPI and by Triton itself.
    package_dir={"mtlfast.triton_kernels": "triton_kernels"},
    ext_modules=[CMakeExtension("mtlfast._C")] if native else [],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
