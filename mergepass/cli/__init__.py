"""Command lines: ``python -m mergepass.plan``, ``python -m mergepass.demo``, ``python -m mergepass.viz``."""
