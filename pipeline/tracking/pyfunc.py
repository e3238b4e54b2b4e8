"""The GRU4Rec recommender as an ``mlflow.pyfunc`` model, logged as code (MLflow "models from code").

MLflow logs this file itself as the model; the trained-model directory (weights + config) and the item map
travel as artifacts. Loading (``mlflow.pyfunc.load_model`` or ``mlflow models serve``) executes this file and
then calls ``load_context``.

Input: a DataFrame with one row per session and a column ``item_ids`` holding the session's clicked item ids
(original ids, as strings, oldest first). Output: one row per session with ``items`` (the top-K next items,
best first), ``scores`` and ``unknown_items`` (input items the model does not know and ignored).
``params={"k": 10}`` sets K (default 20). Over HTTP (``/invocations``)::

    {"dataframe_records": [{"item_ids": ["214536502", "214536500"]}], "params": {"k": 10}}
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

INPUT_COLUMN = "item_ids"
OUTPUT_COLUMNS = ("items", "scores", "unknown_items")
DEFAULT_K = 20


class SessionRecommender(PythonModel):
    """Next-item recommendations for sessions of original item ids."""

    def load_context(self, context: Any) -> None:
        from pipeline.model.predict import Recommender

        self.model_dir = context.artifacts["model_dir"]
        self.recommender = Recommender.load(self.model_dir)
        _check_item_map(context.artifacts.get("item_map"), self.recommender)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", DEFAULT_K))
        if k < 1:
            raise ValueError(f"params.k must be >= 1, got {k}")
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(f"input needs a column {INPUT_COLUMN!r} (list of item ids per session); got {list(model_input.columns)}")
        rows = [self.recommender.recommend(_as_ids(items), k=k) for items in model_input[INPUT_COLUMN]]
        return pd.DataFrame(
            {
                "items": [[str(i) for i in r["items"]] for r in rows],
                "scores": [[float(s) for s in r["scores"]] for r in rows],
                "unknown_items": [[str(i) for i in r["unknown_items"]] for r in rows],
            },
            columns=list(OUTPUT_COLUMNS),
        )


def _as_ids(items: Any) -> list[str]:
    if items is None:
        return []
    if isinstance(items, str):  # a single id sent as a scalar
        return [items]
    return [str(i) for i in list(items)]


def _check_item_map(path: str | None, recommender: Any) -> None:
    """Refuse to serve when the item map shipped with the model disagrees with the weights' item index."""
    if not path:
        return
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["item_idx", "item_id"]).sort_by("item_idx")
    expected = [str(i) for i in table.column("item_id").to_pylist()]
    actual = [str(i) for i in recommender.item_map.item_ids.to_pylist()]
    if expected != actual:
        raise ValueError(
            f"item map {path} ({len(expected)} items) does not match the model's item index ({len(actual)} items)"
        )


def signature() -> Any:
    """The model's input/output schema and its ``k`` parameter."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(Array(DataType.string), INPUT_COLUMN)]),
        outputs=Schema(
            [
                ColSpec(Array(DataType.string), "items"),
                ColSpec(Array(DataType.double), "scores"),
                ColSpec(Array(DataType.string), "unknown_items"),
            ]
        ),
        params=ParamSchema([ParamSpec("k", DataType.long, DEFAULT_K)]),
    )


def input_example(item_ids: list[str]) -> tuple[pd.DataFrame, dict[str, int]]:
    """An example request built from real item ids of the training data (plus one unknown id)."""
    return pd.DataFrame({INPUT_COLUMN: [list(item_ids) + ["<unknown-item>"]]}), {"k": 5}


# MLflow executes this file under a generated module name when it loads the model; a normal
# ``import pipeline.tracking.pyfunc`` (to reach ``signature``) must not register a model as a side effect.
if __name__ != "pipeline.tracking.pyfunc":
    mlflow.models.set_model(SessionRecommender())
