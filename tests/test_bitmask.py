"""Bit-packing of masks: layout, round trip, and the per-version cache."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mtlfast import bitmask


def test_hand_computed_words():
    mask = torch.zeros(2, 33, dtype=torch.bool)
    mask[0, [0, 2]] = True          # word 0 = 0b101 = 5
    mask[0, 32] = True              # word 1 = 1
    mask[1, 31] = True              # bit 31: the int32 sign bit
    packed = bitmask.pack_mask(mask)
    assert packed.dtype == torch.int32 and packed.shape == (2, 2)
    assert packed.tolist() == [[5, 1], [-2**31, 0]]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 5), cols=st.integers(0, 100), density=st.floats(0, 1))
def test_round_trip(rows, cols, density):
    mask = torch.rand(rows, cols) < density
    packed = bitmask.pack_mask(mask)
    assert packed.shape == (rows, bitmask.num_words(cols))
    assert torch.equal(bitmask.unpack_mask(packed, cols), mask)


def test_padding_bits_are_zero():
    packed = bitmask.pack_mask(torch.ones(3, 40, dtype=torch.bool))
    assert packed[:, 1].tolist() == [0xFF] * 3


def test_cache_hits_and_invalidates_on_write():
    mask = torch.rand(4, 50) < 0.5
    first = bitmask.packed_mask(mask)
    assert bitmask.packed_mask(mask) is first
    mask[0, 0] = ~mask[0, 0]
    second = bitmask.packed_mask(mask)
    assert second is not first
    assert torch.equal(bitmask.unpack_mask(second, 50), mask)


def test_cache_entry_dies_with_mask():
    mask = torch.rand(4, 50) < 0.5
    bitmask.packed_mask(mask)
    key = id(mask)
    assert key in bitmask._packed_cache
    del mask
    assert key not in bitmask._packed_cache


def test_inference_tensors_are_packed_without_cache():
    with torch.inference_mode():
        mask = torch.rand(3, 9) < 0.5
    assert torch.equal(bitmask.unpack_mask(bitmask.packed_mask(mask), 9), mask)
