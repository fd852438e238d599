"""The rm.v1 API (generated code under v1/, from proto/ by tools/gen_proto.py)."""
