"""The one PGD kernel shared by training and evaluation."""

from .pgd import PGD, AttackResult, attack_mode, margin_loss, pgd, random_targets

__all__ = ["PGD", "AttackResult", "attack_mode", "margin_loss", "pgd", "random_targets"]
