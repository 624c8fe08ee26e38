"""Bit-packed masks: kernels read 1 bit per weight instead of a byte (bool) or a full element
(a materialised ``weight * mask``), so a mask costs 1/16 of a bf16 weight's memory traffic.

Layout: a bool mask (R, C) packs along C into int32 words (R, ceil(C/32)); bit j of word w in
row r holds mask[r, 32*w + j]; the padding bits past C are 0.
"""
from __future__ import annotations

import weakref

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


# Masks change rarely (once per pruning round) but are used on every call: packing them once
# per version keeps the eager hot path free of the pack kernels. Keyed by the tensor object,
# invalidated by its version counter (any in-place write) and dropped when the tensor dies.
_packed_cache: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def packed_mask(mask: torch.Tensor) -> torch.Tensor:
    """``pack_mask(mask)``, cached per mask tensor and version outside of ``torch.compile``."""
    if torch.compiler.is_compiling() or mask.is_inference():
        return pack_mask(mask)
    key = id(mask)
    hit = _packed_cache.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == mask._version:
        return hit[2]
    packed = pack_mask(mask)
    _packed_cache[key] = (weakref.ref(mask, lambda _ref, key=key: _packed_cache.pop(key, None)),
                          mask._version, packed)
    return packed
