"""Drop-in modules: ``import mtlfast.nn as mnn``."""
from mtlfast.nn.gumbel import GumbelMatrix, ModularLayer
from mtlfast.nn.sluice import CrossStitch, LayerMixture, SluiceLSTM, SluiceMixer
from mtlfast.nn.sparse_sharing import SparseSharingLSTM

__all__ = ["SparseSharingLSTM", "SluiceMixer", "CrossStitch", "LayerMixture", "SluiceLSTM", "GumbelMatrix",
           "ModularLayer"]
