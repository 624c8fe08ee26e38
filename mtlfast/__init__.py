"""mtlfast: fused kernels for learned-sharing multi-task networks in PyTorch."""
from mtlfast._version import __version__
from mtlfast.backends import BackendUnavailableError, available_backends, use_backend
from mtlfast import functional, nn  # noqa: F401  (registers the ops with the dispatcher)
from mtlfast import profile  # noqa: F401

__all__ = ["__version__", "available_backends", "use_backend", "BackendUnavailableError",
           "functional", "nn", "profile"]

