"""mtlfast.info: ``python -m mtlfast.info`` reports versions, the native build and every backend
with its reason; ``environment`` gives the fields every benchmark record and example result carries."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import mtlfast
from mtlfast import info

REVISION = re.compile(r"^([0-9a-f]{7,40}(-dirty)?|unknown)$")
# the environment fields of bench/records.py's schema and of examples/results/*.json
ENVIRONMENT = ("device", "device_name", "torch", "triton", "cuda", "mtlfast", "mtlfast_build", "git", "threads",
               "python")


def test_collect_fields():
    data = info.collect()
    for key in ("mtlfast", "torch", "triton", "cuda_devices", "native_build", "triton_interpreter", "backends"):
        assert key in data
    assert data["mtlfast"] == mtlfast.__version__
    assert data["backends"] == mtlfast.available_backends()
    assert data["triton_interpreter"] == (os.environ.get("TRITON_INTERPRET") == "1")


def test_command_line():
    env = {**os.environ, "TRITON_INTERPRET": "0", "MTLFAST_BACKEND": ""}
    out = subprocess.run([sys.executable, "-m", "mtlfast.info"], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert f"mtlfast {mtlfast.__version__}" in out
    assert "interpreter off" in out
    for name in ("reference", "triton", "cuda", "cpu"):
        assert f"\n  {name} " in out
    assert "reference  available" in out


def test_environment_fields():
    env = info.environment("cpu")
    assert tuple(env) == ENVIRONMENT
    assert env["device"] == "cpu" and env["device_name"] and env["mtlfast"] == mtlfast.__version__
    assert env["torch"] == torch.__version__ and env["cuda"] == torch.version.cuda
    assert isinstance(env["threads"], int) and env["threads"] >= 1
    assert REVISION.match(env["git"])
    build = env["mtlfast_build"]
    assert build is None or {"version", "cpu", "cuda", "cuda_archs", "cuda_version"} <= set(build)


def test_git_revision_format(tmp_path):
    assert REVISION.match(info.git_revision())
    assert info.git_revision(tmp_path) == "unknown"
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    (tmp_path / "f.txt").write_text("1\n")
    for cmd in (["init", "-q"], ["add", "f.txt"], ["commit", "-q", "-m", "x"]):
        subprocess.run(git + cmd, cwd=tmp_path, check=True, capture_output=True)
    clean = info.git_revision(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{7,40}", clean)
    (tmp_path / "f.txt").write_text("2\n")
    assert info.git_revision(tmp_path) == f"{clean}-dirty"
