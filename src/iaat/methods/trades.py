"""TRADES (Zhang et al. 2019) and interpolated adversarial training / Mixup-AT (Lamb et al. 2019)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import attack_mode
from ..errors import ConfigError
from .base import Method, Objective, StepOutput


@dataclass(eq=False, kw_only=True)
class KLRegularised(Method):
    """The keys of methods with a KL robustness term and a Gaussian-start attack (TRADES, MART)."""

    beta: float = 6.0
    init_std: float = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 0 or self.init_std < 0:
            raise ConfigError("method.beta and method.init_std must be >= 0.")


@dataclass(eq=False, kw_only=True)
class TRADES(KLRegularised):
    """CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL inside the eps ball.

    The inner maximisation is the shared PGD kernel with its ``kl`` loss, started from
    ``init_std`` * N(0, 1) noise as in the authors' code. Two differences from their ``trades_loss``
    (yaodongyu/TRADES), neither of which changes the loss: the start is projected into [0, 1] before the
    first gradient (theirs clamps after each step only), and the clean batch goes through the model in train
    mode once (theirs twice, for the cross-entropy and for the KL's target, so their BatchNorm running
    statistics take in the clean batch twice per step).

    Args:
        beta: weight of the robustness (KL) term; 6 in the TRADES paper.
        init_std: std of the Gaussian start of the inner maximisation (0.001).

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> loss = iaat.TRADES(eps=8 / 255, beta=6.0).loss(model, torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    """

    name = "trades"
    log_keys = ("train_kl",)

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor]) -> Objective:
        return trades_objective(trades_examples(self, model, x, y, self.init_std), x, y, self.beta)


def trades_examples(method: Method, model: nn.Module, x: torch.Tensor, y: torch.Tensor, init_std: float,
                    **kwargs: Any) -> torch.Tensor:
    """TRADES' inner maximisation with ``method``'s attack: the KL to the clean prediction from an ``init_std``
    Gaussian start (``kwargs`` override the attack's settings, e.g. IAAT's per-sample ``eps`` and ``step_size``)."""
    with torch.no_grad(), attack_mode(model) as plain:
        clean_eval = plain(x)
    return method.attack_batch(model, x, y, loss="kl", reference=clean_eval, init_std=init_std, final_check=False,
                               **kwargs).x_adv


def trades_objective(x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, beta: float) -> Objective:
    """TRADES' loss at fixed examples, CE(f(x), y) + beta * KL(f(x) || f(x_adv)), as a function of the model.

    Example:
        >>> import torch
        >>> from iaat.methods.trades import trades_objective
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> x = torch.rand(4, 3, 8, 8)
        >>> objective = trades_objective(x, x, torch.tensor([0, 1, 2, 3]), beta=6.0)
        >>> float(objective(model).stats["kl"])  # x_adv = x: no KL term
        0.0
    """
    def objective(net: nn.Module) -> StepOutput:
        logits_clean = net(x)
        logits_adv = net(x_adv)
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_clean, dim=1), reduction="batchmean",
                      log_target=True)
        return StepOutput(F.cross_entropy(logits_clean, y) + beta * kl, logits_adv, {"kl": kl.detach() * len(y)})
    return objective


@dataclass(eq=False, kw_only=True)
class MixupAT(Method):
    """Interpolated adversarial training: mixup on clean and on PGD examples, the two losses averaged.

    Args:
        alpha: the mixing coefficient is drawn from Beta(alpha, alpha) (1).

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> loss = iaat.MixupAT(eps=8 / 255).loss(model, torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    """

    name = "mixup_at"

    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha <= 0:
            raise ConfigError(f"method.alpha must be > 0, got {self.alpha}.")

    def _draw(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        """A mixup: the weight lambda ~ Beta(alpha, alpha) and the partner of each sample."""
        return float(torch.distributions.Beta(self.alpha, self.alpha).sample()), torch.randperm(len(x), device=x.device)

    @staticmethod
    def _mix_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mix: tuple[float, torch.Tensor]):
        lam, perm = mix
        logits = model(lam * x + (1 - lam) * x[perm])
        return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm]), logits

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor]) -> Objective:
        x_adv = self.attack_batch(model, x, y, final_check=False).x_adv
        # drawn once: every call of the objective (AWP makes two) sees the same mixed examples
        clean_mix, adv_mix = self._draw(x), self._draw(x)

        def objective(net: nn.Module) -> StepOutput:
            loss_clean, _ = self._mix_loss(net, x, y, clean_mix)
            loss_adv, logits_adv = self._mix_loss(net, x_adv, y, adv_mix)
            return StepOutput(0.5 * (loss_clean + loss_adv), logits_adv)
        return objective
