"""The DuckDB preference store."""

from rm_service.store.db import Store
from rm_service.store.labels import LabelIn, IngestOutcome

__all__ = ["Store", "LabelIn", "IngestOutcome"]
