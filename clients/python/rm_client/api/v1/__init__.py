"""Generated from proto/rm/v1 by tools/gen_proto.py. Do not edit."""
