"""The one PGD kernel shared by training and evaluation."""

from .pgd import AttackResult, attack_mode, margin_loss, pgd, random_targets

__all__ = ["AttackResult", "attack_mode", "margin_loss", "pgd", "random_targets"]
