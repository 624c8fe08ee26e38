"""The public functional API: ``import mtlfast.functional as MF``."""
from mtlfast.ops.gumbel import allocation_combine, gumbel_pairs, gumbel_sigmoid, gumbel_softmax
from mtlfast.ops.masked_linear import masked_linear
from mtlfast.ops.masked_lstm import masked_lstm_layer
from mtlfast.ops.sluice import alpha_mix, layer_mix, orthogonality_penalty

__all__ = ["masked_linear", "masked_lstm_layer", "alpha_mix", "layer_mix", "orthogonality_penalty", "gumbel_sigmoid",
           "gumbel_pairs", "gumbel_softmax", "allocation_combine"]
