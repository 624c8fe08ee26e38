"""mtlfast: fused kernels for learned-sharing multi-task networks in PyTorch."""
from mtlfast._version import __version__
from mtlfast.backends import BackendUnavailableError, available_backends, use_backend
from mtlfast import functional, nn  # noqa: F401  (registers the ops with the dispatcher)

__all__ = ["__version__", "available_backends", "use_backend", "BackendUnavailableError",
           "functional", "nn", "profile"]


def __getattr__(name: str):
    # mtlfast.profile on first use: imported here eagerly, `python -m mtlfast.profile` would find
    # the module loaded before it runs as __main__ (a RuntimeWarning and two copies)
    if name == "profile":
        import importlib

        return importlib.import_module("mtlfast.profile")
    raise AttributeError(f"module 'mtlfast' has no attribute {name!r}")
