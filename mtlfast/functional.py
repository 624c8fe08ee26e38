"""The public functional API: ``import mtlfast.functional as MF``."""
from mtlfast.ops.masked_linear import masked_linear

__all__ = ["masked_linear"]
