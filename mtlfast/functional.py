"""The public functional API: ``import mtlfast.functional as MF``."""
from mtlfast.ops.masked_linear import masked_linear
from mtlfast.ops.sluice import alpha_mix, layer_mix, orthogonality_penalty

__all__ = ["masked_linear", "alpha_mix", "layer_mix", "orthogonality_penalty"]
