"""Bit-packed masks: kernels read 1 bit per weight instead of a byte (bool) or a full element
(a materialised ``weight * mask``), so a mask costs 1/16 of a bf16 weight's memory traffic.
Packing reads the bool mask once per call (see :func:`pack`).

Layout: a bool mask (R, C) packs along C into int32 words (R, ceil(C/32)); bit j of word w in
row r holds mask[r, 32*w + j]; the padding bits past C are 0.
"""
from __future__ import annotations

import torch

BITS_PER_WORD = 32


def num_words(columns: int) -> int:
    return (columns + BITS_PER_WORD - 1) // BITS_PER_WORD


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Packs a bool mask (..., C) into int32 words (..., ceil(C/32)) with plain torch ops, so it
    runs on every device and traces under ``torch.compile``."""
    *lead, columns = mask.shape
    words = num_words(columns)
    padded = mask.new_zeros((*lead, words * BITS_PER_WORD))
    padded[..., :columns] = mask
    shifts = torch.arange(BITS_PER_WORD, device=mask.device, dtype=torch.int64)
    # int64 sum of distinct powers of two is exact; the wrap to int32 keeps bit 31 as the sign bit.
    packed = (padded.view(*lead, words, BITS_PER_WORD).to(torch.int64) << shifts).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_mask(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: int32 words (..., W) to a bool mask (..., columns)."""
    shifts = torch.arange(BITS_PER_WORD, device=packed.device, dtype=torch.int32)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :columns].bool()


def pack(mask: torch.Tensor) -> torch.Tensor:
    """:func:`pack_mask` for a kernel call: in one Triton launch where Triton runs the mask's device
    (CUDA, or CPU under the interpreter), else with torch ops (which torch.compile also traces and
    fuses). Called on every call of an op, never cached (triton_kernels/bitmask.py says why)."""
    if torch.compiler.is_compiling() or not _triton_runs(mask.device):
        return pack_mask(mask)
    from mtlfast.triton_kernels.bitmask import pack_mask as pack_kernel

    return pack_kernel(mask)


def _triton_runs(device: torch.device) -> bool:
    from mtlfast import backends

    return backends.device_reason("triton", device) is None
