"""The native module: it imports without a GPU, says what it was built with, and CUDA sources
were compiled wherever nvcc exists (so CI fails when one stops compiling)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NATIVE_WANTED = os.environ.get("MTLFAST_NATIVE", "1") != "0"
needs_native = pytest.mark.skipif(not NATIVE_WANTED, reason="MTLFAST_NATIVE=0: the native build was skipped on purpose")


@needs_native
def test_build_info_fields():
    from mtlfast import _C
    import mtlfast
    info = _C.build_info()
    assert set(info) == {"version", "cpu", "cuda", "cuda_archs", "cuda_version"}
    assert info["version"] == mtlfast.__version__
    assert info["cpu"] is True
    if info["cuda"]:
        assert info["cuda_archs"] and all(isinstance(a, int) and a >= 50 for a in info["cuda_archs"])
        assert info["cuda_version"].count(".") >= 1
    else:
        assert info["cuda_archs"] == [] and info["cuda_version"] is None


@needs_native
def test_cuda_compiled_when_nvcc_present():
    from mtlfast import _C
    if shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
        assert _C.build_info()["cuda"] is False
        return
    if os.environ.get("MTLFAST_CUDA") == "0":
        pytest.skip("MTLFAST_CUDA=0: CUDA kernels left out on purpose")
    info = _C.build_info()
    assert info["cuda"] is True, "nvcc is on PATH but mtlfast._C was built without CUDA kernels"
    expected = os.environ.get("CMAKE_CUDA_ARCHITECTURES")
    if not expected and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        assert info["cuda_archs"] == [80, 90]
    assert hasattr(_C, "masked_linear_forward")


@needs_native
def test_device_count_without_driver_is_zero_not_error():
    import torch
    from mtlfast import _C
    count = _C.cuda_device_count()
    assert count >= 0
    if not torch.cuda.is_available():
        assert count == 0


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")
def test_torch_cuda_arch_list_is_honoured(tmp_path):
    """CMake configure only (seconds): TORCH_CUDA_ARCH_LIST maps to CMAKE_CUDA_ARCHITECTURES."""
    import pybind11
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "8.0 9.0+PTX"}
    env.pop("CMAKE_CUDA_ARCHITECTURES", None)
    done = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                           f"-DPython_EXECUTABLE={sys.executable}"], check=True, env=env, capture_output=True,
                          text=True)
    assert "mtlfast: CUDA kernels ON, architectures 80-real;90" in done.stdout


def test_package_works_without_native_module():
    """What MTLFAST_NATIVE=0 leaves: no mtlfast._C. The reference (and Triton) still work, and the
    native backends say why they cannot run."""
    script = r"""
import importlib.abc, sys
class NoNative(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mtlfast._C":
            raise ImportError("mtlfast._C hidden for this test")
sys.meta_path.insert(0, NoNative())
import torch, mtlfast, mtlfast.functional as MF
status = mtlfast.available_backends()
assert status["reference"] is None, status
assert "mtlfast._C is not built" in status["cpu"], status
assert "mtlfast._C is not built" in status["cuda"] or "no CUDA device" in status["cuda"], status
x, w, m = torch.randn(3, 8), torch.randn(5, 8), torch.rand(5, 8) < 0.5
torch.testing.assert_close(MF.masked_linear(x, w, m), x @ (w * m).t())
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "0", "MTLFAST_BACKEND": ""}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
