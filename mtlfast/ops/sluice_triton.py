"""The sluice mixing ops on the Triton kernels of mtlfast/triton_kernels/sluice.py, whose launchers
already take the family's kernel interface (see mtlfast/ops/sluice_cpu.py for the CPU side): each
forward reads every input element once, each backward returns the input and the mixing-weight
gradients from one pass."""
from mtlfast.triton_kernels.sluice import (alpha_mix_backward, alpha_mix_forward, layer_mix_backward,  # noqa: F401
                                           layer_mix_forward, orthogonality_penalty_backward,
                                           orthogonality_penalty_forward)
