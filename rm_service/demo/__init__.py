"""`rm-service demo`: the whole RLHF loop on the embedded default (see pipeline.py)."""

from rm_service.demo.pipeline import run_demo
from rm_service.demo.settings import DemoSettings

__all__ = ["DemoSettings", "run_demo"]
