"""iaat: instance-adaptive adversarial training (IAAT, GAIRAT and their baselines)."""

__version__ = "0.1.0"
