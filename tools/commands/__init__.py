"""One module per ``dt`` command; each exposes ``register(subparsers, common)``."""
