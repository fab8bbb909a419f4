"""Clean and adversarial evaluation through the shared PGD kernel."""

from .robustness import AttackSpec, evaluate

__all__ = ["AttackSpec", "evaluate"]
