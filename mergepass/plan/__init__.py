"""``python -m mergepass.plan``: print a model's merge schedule (see :mod:`mergepass.cli.plan`).

The function that computes a schedule is :func:`mergepass.plan`."""
