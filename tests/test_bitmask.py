"""Bit-packing of masks: layout, round trip, the one-launch pack, and no stale packing."""
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


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", [(3, 1), (2, 3, 33), (5, 64), (17, 100), (0, 5), (4, 0)])
def test_pack_kernel_matches_torch_pack(shape, contiguous):
    """The one-launch pack (Triton; the interpreter here) = pack_mask, for any strides."""
    mask = torch.rand(*shape) < 0.5
    if not contiguous:
        mask = (torch.rand(*shape[:-1], 2 * shape[-1]) < 0.5)[..., ::2]
    assert torch.equal(bitmask.pack(mask), bitmask.pack_mask(mask))


def test_pack_sees_every_write():
    """No cache: a write through .data (which does not bump the version counter) or another view
    is what the next pack reads."""
    mask = torch.rand(4, 50) < 0.5
    first = bitmask.pack(mask)
    mask.data[0, 0] = ~mask[0, 0]
    mask[1].data.fill_(True)
    assert not torch.equal(bitmask.pack(mask), first)
    assert torch.equal(bitmask.unpack_mask(bitmask.pack(mask), 50), mask)
