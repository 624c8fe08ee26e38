"""The one way into mtlfast._C: torch tensors go in as DLPack capsules, which the native code reads
(and checks: dtype, shape, strides, device, index values) without PyTorch headers (DESIGN.md).
The dtype travels inside the capsule (DLPack's own type codes), so no dtype code is mirrored here."""
from __future__ import annotations

from typing import Optional

import torch

_to_dlpack = torch._C._to_dlpack


_LIB = None


def lib():
    """The extension module mtlfast._C (imported on first use: the package works without it; kept
    once imported, since an import statement costs about 0.7 µs on every kernel call)."""
    global _LIB
    if _LIB is None:
        from mtlfast import _C
        _LIB = _C
    return _LIB


def capsule(t: Optional[torch.Tensor]):
    """t as a DLPack capsule for mtlfast._C (None stays None). About 0.3 µs: no copy, the capsule
    holds a reference to t's storage, and tensors that require grad are fine. Keep it in a name or
    an argument list until the call returns, like the tensor itself."""
    return None if t is None else _to_dlpack(t)


def threads() -> int:
    """The CPU kernels' thread count: torch's, within what mtlfast._C accepts."""
    return min(torch.get_num_threads(), lib().MAX_THREADS)
