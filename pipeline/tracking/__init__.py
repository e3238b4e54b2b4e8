"""MLflow: logging runs, plots, the pyfunc model, the registry and the promotion decision.

Records what it is given; the order of work (train, evaluate, log, decide) belongs to ``pipeline.flow``.
"""
