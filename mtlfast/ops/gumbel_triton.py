"""The Gumbel ops on the Triton kernels of mtlfast/triton_kernels/gumbel.py, whose launchers already
take the family's kernel interface (the CPU side is mtlfast/ops/gumbel_cpu.py): a sample is one
pass each way, noise recomputed in backward from the seed."""
from mtlfast.triton_kernels.gumbel import (allocation_combine_backward, allocation_combine_forward,  # noqa: F401
                                           gumbel_pairs_backward, gumbel_pairs_forward, gumbel_sigmoid_backward,
                                           gumbel_sigmoid_forward, gumbel_softmax_backward, gumbel_softmax_forward)
