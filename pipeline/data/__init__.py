"""Click logs in, session datasets out.

Reading raw logs in every supported format (``ingest``, ``schema``), the Great Expectations suite and the
runner that quarantines bad rows (``expectations``, ``validate``), sessionizing, filtering and the temporal
split into Parquet (``sessions``, ``spill``), the late-data check (``partitions``) and the synthetic log
generator (``generate``). Imports nothing from the model, tracking or orchestration layers.
"""
