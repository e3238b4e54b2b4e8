"""Click logs in, session datasets out.

Each stage has one entry module, with its parts beside it:

- ``ingest``: read raw logs in every supported format into ``schema``'s canonical events
  (``formats``, ``inputs``, ``readers``, ``text``, ``times``, ``columns``, ``canonical``);
- ``validate``: the Great Expectations suite (``expectations``) run per batch, bad rows quarantined
  (``batch``, ``gx_runner``, ``quarantine``, ``report``, ``validation_output``);
- ``sessions``: order, filter, split in time and publish a session dataset
  (``build``, ``buckets``, ``arrays``, ``session_rules``, ``spill``, ``manifest``, ``workdirs``);
- ``partitions``: the late-data check; ``generate``: the synthetic log generator; ``progress``: progress lines.

Imports nothing from the model, tracking or orchestration layers.
"""
