"""The papers' synthetic experiments, reproduced with mtlfast's layers (``python -m examples.NAME``)."""
