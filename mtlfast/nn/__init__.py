"""Drop-in modules: ``import mtlfast.nn as mnn``. (Filled by the op-family issues.)"""
__all__: list = []
