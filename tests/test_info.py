"""python -m mtlfast.info reports versions, the native build and every backend with its reason."""
import os
import subprocess
import sys

import mtlfast
from mtlfast import info


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
