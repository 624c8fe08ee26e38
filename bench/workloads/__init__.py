"""One module per op family; each calls :func:`bench.registry.register` on import."""
