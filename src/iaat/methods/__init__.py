"""Training methods: how a batch becomes a loss. Each is a small plug-in of the trainer."""

from .base import AttackSettings, Method, StepOutput
from .registry import METHODS, build_method, method_class

__all__ = ["AttackSettings", "Method", "StepOutput", "METHODS", "build_method", "method_class"]
