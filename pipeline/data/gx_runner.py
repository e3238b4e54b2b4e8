"""Great Expectations, one context per process: creating it (fast, quiet), running the suite on a batch,
handing results between processes, and rendering the Data Docs.

Importing GX and creating a context is slow (seconds): the context is made once per process, with the GX
imports this suite never uses deferred until something reads them.
"""

from __future__ import annotations

import datetime as dt
import gc
import importlib
import importlib.util
import json
import logging
import os
import sys
import threading
import types
import warnings
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data import expectations as ex
from pipeline.data.schema import TIMESTAMP_TYPE

# BASIC: counts and a few example values per expectation (COMPLETE would also list every failing row,
# and every extra metric makes GX copy the batch once more).
RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 10}
_GX: dict[str, Any] = {}
# Great Expectations imports these at module level for expectations this suite never uses (the KL divergence
# chart, the KS tests): about 1 s of every validation's start-up, on one core while the other waits for the
# fork. Each stands in as an empty module until something reads an attribute of it, which imports the real one.
DEFERRED_GX_IMPORTS = ("altair", "scipy.stats")
_DEFER_LOCK = threading.RLock()


class _DeferredModule(types.ModuleType):
    """Placeholder in ``sys.modules``: the first attribute read imports the real module and takes its place."""

    def __getattr__(self, attr: str) -> Any:  # only called for attributes the placeholder lacks
        with _DEFER_LOCK:
            first = sys.modules.get(self.__name__) is self
            if first:
                del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)  # a broken install raises its ImportError here, each time
            if first:
                self.__dict__.update(real.__dict__)  # later reads through the placeholder find them directly
        return getattr(real, attr)


def _defer_gx_imports() -> None:
    if "great_expectations" in sys.modules:
        return
    for name in DEFERRED_GX_IMPORTS:
        spec = None if name in sys.modules else importlib.util.find_spec(name)
        if spec is not None:
            placeholder = _DeferredModule(name)
            placeholder.__spec__ = spec  # what find_spec() and the import system read, without loading it
            sys.modules[name] = placeholder


def gx_context() -> tuple[Any, Any]:
    """``(context, batch_definition)`` of the process-wide ephemeral GX context (quiet, no progress bars)."""
    if not _GX:
        # Importing GX and making a context leave ~350,000 long-lived objects: without this the cyclic GC walks
        # them again and again (~0.35 s of the start-up) and in every full collection after. Frozen, they stay
        # out of collections, and forked helpers leave the memory pages holding them shared.
        enabled = gc.isenabled()
        gc.disable()
        try:
            _GX.update(_new_gx_context())
            gc.freeze()
        finally:
            if enabled:
                gc.enable()
    return _GX["context"], _GX["batch_definition"]


def _new_gx_context() -> dict[str, Any]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    _defer_gx_imports()
    import great_expectations as gx
    import great_expectations.execution_engine.pandas_execution_engine as pandas_engine
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in list(logging.root.manager.loggerDict):  # some GX modules pin their own logger to INFO
        if name.startswith("great_expectations"):
            logging.getLogger(name).setLevel(logging.WARNING)
    # GX hashes every in-memory batch for a "fingerprint" batch marker (~0.4 s per million rows);
    # our batches are identified by their files in the report instead.
    pandas_engine.HASH_THRESHOLD = 0
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("click_events").add_dataframe_asset("batch")
    return {"context": context, "batch_definition": asset.add_batch_definition_whole_dataframe("whole_batch")}


def _register(suite: Any) -> Any:
    """The validation definition of ``suite``, registered in the context unless it is already the current one.

    Consecutive batches share one suite (times are parameters): registering it again would cost ~0.1 s of GX
    bookkeeping per batch. The context holds one suite of this name, so only the latest is remembered.
    """
    import great_expectations as gx

    context, batch_definition = gx_context()
    key = json.dumps(suite.to_json_dict(), sort_keys=True, default=str)
    current = _GX.get("registered")
    if current is None or current[0] != key:
        suite = context.suites.add_or_update(suite)
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=ex.SUITE_NAME, data=batch_definition, suite=suite)
        )
        current = _GX["registered"] = (key, definition)
    return current[1]


def run_suite(suite: Any, frame: Any, run_name: str, parameters: dict[str, Any]) -> Any:
    """Run the suite on a pandas frame; the result stays in the context's store for the Data Docs."""
    from great_expectations.core.run_identifier import RunIdentifier

    definition = _register(suite)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return definition.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters=parameters,
            result_format=RESULT_FORMAT,
            run_id=RunIdentifier(run_name=run_name),
        )


def clear_results() -> None:
    """Forget earlier validation results of this process, so Data Docs show only the current run."""
    store = gx_context()[0].validation_results_store
    for key in store.list_keys():
        store.remove_key(key)


def export_results() -> list[tuple[tuple[str, ...], Any]]:
    """This process's stored results, serialized (to hand them from a worker to the Data Docs builder)."""
    store = gx_context()[0].validation_results_store
    return [(store.key_to_tuple(k), store.serialize(store.get(k))) for k in store.list_keys()]


def import_results(results: list[tuple[tuple[str, ...], Any]]) -> None:
    store = gx_context()[0].validation_results_store
    for key, value in results:
        store.set(store.tuple_to_key(key), store.deserialize(value))


def build_data_docs(directory: str, suite: Any) -> None:
    """Render the Data Docs of this run's results into ``directory`` (once per run: rendering is slow)."""
    context, _ = gx_context()
    _register(suite)
    site = f"pipeline-{os.getpid()}"
    context.add_data_docs_site(
        site_name=site,
        site_config={
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": directory},
        },
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            context.build_data_docs(site_names=[site])
    finally:
        context.delete_data_docs_site(site)


# GX turns times into Python datetimes (years 1 to 9999): times outside are clipped for the suite only. The
# window is inside those years, so the timestamp_window rule flags exactly the same rows either way.
_GX_TIME_RANGE = (
    int(dt.datetime(1, 1, 1, tzinfo=dt.UTC).timestamp() * 1e6),
    int(dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp() * 1e6),
)


def clip_for_gx(times: pa.ChunkedArray) -> pa.ChunkedArray:
    micros = times.cast(pa.int64())
    low, high = pc.min_max(micros).values()
    if low.as_py() is None or (low.as_py() >= _GX_TIME_RANGE[0] and high.as_py() <= _GX_TIME_RANGE[1]):
        return times
    return pc.min_element_wise(pc.max_element_wise(micros, _GX_TIME_RANGE[0]), _GX_TIME_RANGE[1]).cast(TIMESTAMP_TYPE)
