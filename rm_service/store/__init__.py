"""The DuckDB preference store."""

from rm_service.store.db import Store
from rm_service.store.labels import IngestOutcome, LabelIn

__all__ = ["Store", "LabelIn", "IngestOutcome"]
