"""Command line interface (``lowbit``): argument parsing only; the work is in ``lowbit.workflows``."""
