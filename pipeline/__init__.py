"""GRU4Rec training pipeline: click logs -> validated Parquet sessions -> GRU4Rec -> MLflow registry."""

__version__ = "0.1.0"
