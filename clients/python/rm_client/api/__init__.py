"""The rm.v1 API (generated code lives in v1/)."""
