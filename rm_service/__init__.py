"""rm-service: preference data and reward models for RLHF."""

__version__ = "0.1.0"
