"""MLflow: logging runs, plots, the pyfunc model, the registry and the promotion decision.

Records what it is given; the order of work (read, train, evaluate, log, decide) belongs to ``pipeline.flow``
(one trial: :mod:`pipeline.flow.trial`).

* runs: where runs go, their tags, lookup by run key, the DAG run's parent run, validation reports
* training: what a training run records (params, inputs, step and test metrics, ranks, plots, the model)
* plots, pyfunc: the PNG plots; the served pyfunc model (models-from-code)
* registry: versions, aliases, lineage tags, the pin; lock: the promotion lock
* decision: the rules, pure; guards, lineage, compare: the evidence; promotion: ``promote``
* levers: rollback, move, pin, unpin; records: every decision logged as a run
* views, history: read-only views of the decisions and versions, the champion history picture
"""
