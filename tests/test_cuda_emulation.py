"""Executes the CUDA kernels of csrc/cuda on the CPU, where there is no GPU to run them.

The unmodified masked_linear.cu is compiled with g++ against an emulated CUDA runtime
(tests/cuda_emulation/include: every block as real threads, barriers, checked loads, spec-exact
WMMA); only the `kernel<<<grid, block, 0, stream>>>(p)` launch lines are rewritten into calls of
the emulator. The harness compares every output element with a float64 reference over odd shapes,
strided / transposed / misaligned layouts and empty sizes, and checks that no read leaves the
inputs. A planted bug must make it fail, so the test is known to be able to."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emulation"
SOURCE = ROOT / "csrc" / "cuda" / "masked_linear.cu"
LAUNCH = re.compile(r"(\w+<[^;<>]*>)<<<\s*(\w+)\s*,\s*(\w+)\s*,\s*0\s*,\s*\w+\s*>>>\(([^;]*)\);")

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def emulated_source(text: str) -> str:
    def launch(match: re.Match) -> str:
        kernel, grid, block, args = match.groups()
        count_vec = "++g_vec, " if kernel.rstrip(">").endswith("true") else ""
        return f"({count_vec}emu_launch({grid}, {block}, [&] {{ {kernel}({args}); }}));"
    out, launches = LAUNCH.subn(launch, text)
    assert launches > 0 and "<<<" not in out, "a kernel launch the emulator does not recognise"
    return out


def build(tmp: Path, text: str, name: str) -> Path:
    cpp = tmp / f"{name}.cpp"
    cpp.write_text(emulated_source(text))
    binary = tmp / name
    subprocess.run(["g++", "-std=c++20", "-O2", "-pthread", "-w", f"-I{EMU / 'include'}", f"-I{ROOT / 'csrc'}",
                    str(cpp), str(EMU / "harness.cpp"), "-o", str(binary)], check=True, capture_output=True)
    return binary


def run(binary: Path, which: int) -> tuple[int, dict]:
    done = subprocess.run([str(binary), str(which)], capture_output=True, text=True, timeout=900)
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", done.stdout)}
    return done.returncode, counts | {"stderr": done.stderr[-3000:]}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("cuda_emu"), SOURCE.read_text(), "masked_linear_emu")


@pytest.mark.parametrize("which,dtype", [(0, "fp32"), (1, "fp16"), (2, "bf16"), (3, "fp64")], ids=lambda v: str(v))
def test_masked_linear_kernels_all_shapes_and_layouts(emulator, which, dtype):
    rc, counts = run(emulator, which)
    assert rc == 0 and counts.get("fails") == 0, counts
    assert counts["runs"] >= 120, counts


@pytest.mark.parametrize("which,dtype", [(10, "fp32"), (11, "fp16"), (12, "bf16"), (13, "fp64")], ids=lambda v: str(v))
def test_masked_linear_kernels_vector_path(emulator, which, dtype):
    rc, counts = run(emulator, which)
    assert rc == 0 and counts.get("fails") == 0, counts
    assert counts["vec_launches"] > 0, "the vectorised load path was never taken"


@pytest.mark.parametrize("which,dtype", [(20, "fp32"), (21, "fp16"), (22, "bf16"), (23, "fp64")], ids=lambda v: str(v))
def test_masked_out_inf_and_nan_weights_never_reach_the_output(emulator, which, dtype):
    """The mask is a select on the loaded bits (not a product, where 0 * inf is NaN), on the
    vector and the strided load path alike."""
    rc, counts = run(emulator, which)
    assert rc == 0 and counts.get("fails") == 0, counts
    assert counts["runs"] == 30 and counts["vec_launches"] > 0, counts


def test_a_planted_mask_bug_is_caught(tmp_path):
    text = SOURCE.read_text()
    mutated, n = re.subn(r">> \(i & 31\)", ">> ((i + 1) & 31)", text)
    assert n > 0, "mutation target not found: update the planted bug"
    rc, counts = run(build(tmp_path, mutated, "mutant"), 10)
    assert rc != 0 and counts.get("fails", 0) > 0, counts
