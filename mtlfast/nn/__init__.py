"""Drop-in modules: ``import mtlfast.nn as mnn``."""
from mtlfast.nn.sparse_sharing import SparseSharingLSTM

__all__ = ["SparseSharingLSTM"]
