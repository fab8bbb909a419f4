"""MAIL: margin-aware instance reweighting learning (Wang, Liu, Han, Liu, Gong, Niu, Zhou, Sugiyama, NeurIPS 2021).

Like GAIRAT, MAIL weighs each sample's adversarial loss by how vulnerable the sample is; it replaces
GAIRAT's count of attack steps (discrete, and dependent on the attack's path) by the probabilistic margin
of the adversarial example, ``PM = p_y(x') - max_{k != y} p_k(x')``, and the weight::

    w = scale * sigmoid(-slope * (PM - bias))          (the authors' code: scale 3, no normalisation)

Samples misclassified under attack by a wide margin (PM near -1) weigh close to ``scale``; barely correct
ones (PM near 0) little (0.02 at the MAIL-AT bias -0.5), confidently correct ones close to 0. The weights are
detached and come from the same train-mode forward as the loss.

``train_loss: at`` trains ``mean_i w_i * CE(f(x'_i), y_i)`` on PGD examples (cross-entropy from a 0.001-std
Gaussian start, projected into [0, 1] before the first gradient, where the authors' code clamps after each step
only); ``trades`` trains ``CE(f(x), y) + trades_beta * mean_i w_i * KL(f(x_i) || f(x'_i))`` on TRADES' KL
examples (MAIL-TRADES). The first ``burn_in_epochs`` train the plain loss (weights 1); the
authors' script trains plain AT for 76 of its 120 epochs (``epoch <= 75``, 0-based) first.

The weights are the authors' ``weight_assign`` (QizhouWang/MAIL, mail_loss.py); a port of it and of their
losses checks them in ``tests/test_family.py``. The margin works for any number of classes (theirs builds a
10-class identity on CUDA). Their code does not normalise the weights (the fixed ``scale`` instead): with the
MAIL-AT bias of -0.5 a sample at PM = 0 weighs 0.02, so once most samples sit near PM = 0 the weighted loss,
and with it the step, shrinks many times over. The paper
normalises the weights to mean 1 over the batch; ``normalize: true`` does so (over the global batch under
torchrun), and then ``scale`` cancels.

Every sample's last margin and weight are kept (``margins``, ``weights``): written after every epoch and
summarised in ``metrics.jsonl``, in the checkpoints like any per-sample state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.pgd import kl_per_sample
from ..errors import ConfigError
from .base import Objective, StepOutput, refuse_unless
from .gair import mean_one, weighted_ce
from .per_sample import PerSampleState, summary
from .trades import trades_examples


def probabilistic_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``p_y - max_{k != y} p_k`` per sample, from logits (in [-1, 1]; positive while classified correctly).

    Example:
        >>> import torch
        >>> from iaat.methods.mail import probabilistic_margin
        >>> round(float(probabilistic_margin(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]))), 4)
        0.6805
    """
    p = F.softmax(logits.float(), dim=1)
    others = p.scatter(1, y[:, None], -1.0).amax(1)
    return p.gather(1, y[:, None]).squeeze(1) - others


def mail_weights(margin: torch.Tensor, bias: float, slope: float, scale: float = 3.0) -> torch.Tensor:
    """MAIL's weights ``scale * sigmoid(-slope * (margin - bias))`` (detached).

    Example:
        >>> import torch
        >>> from iaat.methods.mail import mail_weights
        >>> mail_weights(torch.tensor([-1.0, -0.5, 0.0]), bias=-0.5, slope=10.0)
        tensor([2.9799, 1.5000, 0.0201])
    """
    return (scale * torch.sigmoid(-slope * (margin - bias))).detach()


@dataclass(eq=False, kw_only=True)
class MAIL(PerSampleState):
    """Probabilistic-margin-aware instance reweighting of the adversarial loss (MAIL-AT, MAIL-TRADES).

    Args (besides the attack's):
        num_train: number of training samples (one margin and weight each); required.
        bias, slope: the weight function's (-0.5 and 10, the authors' MAIL-AT command; MAIL-TRADES: 0 and 2).
        scale: the weights' maximum (3, the authors' code).
        burn_in_epochs: plain (unweighted) epochs before the weights start (0; the authors': 76 of 120).
        train_loss: ``at`` (weighted cross-entropy on PGD examples) | ``trades`` (weighted TRADES KL term).
        trades_beta: TRADES' weight of the KL term with ``train_loss: trades`` (5, the authors' script).
        init_std: std of the Gaussian start of the attack (0.001, the authors' code).
        normalize: scale the weights to mean 1 over the batch, as the paper (False: the authors' code).
        save_radii: write the margins and weights to ``RUN/margins``, ``RUN/weights`` after every epoch (True).

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> method = iaat.MAIL(num_train=100, eps=8 / 255, steps=3)
        >>> method.start_epoch(0)
        >>> x, y, index = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), torch.tensor([7, 3, 99, 0])
        >>> method.loss(model, x, y, index).backward()
        >>> bool(((method.weights[index] > 0) & (method.weights[index] < 3)).all())
        True
    """

    name = "mail"
    needs_epoch = True
    log_keys = ("weight_mean", "margin_mean")
    state_keys = ("margins", "weights")
    epoch_keys = ("margins", "weights")

    bias: float = -0.5
    slope: float = 10.0
    scale: float = 3.0
    burn_in_epochs: int = 0
    train_loss: str = "at"
    trades_beta: float = 5.0
    init_std: float = 0.001
    normalize: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_loss not in ("at", "trades"):
            raise ConfigError(f"method.train_loss must be at or trades, got {self.train_loss!r}.")
        refuse_unless(self, self.train_loss == "trades", "train_loss=trades", ("trades_beta",))
        if self.slope < 0 or self.scale <= 0 or self.burn_in_epochs < 0 or self.trades_beta < 0 or self.init_std < 0:
            raise ConfigError("method.slope, method.burn_in_epochs, method.trades_beta and method.init_std must be >= 0 "
                              "and method.scale > 0.")
        self.init_state(margins=0.0, weights=1.0)

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor]) -> Objective:
        rows = self.rows(index)
        weighted = self.epoch >= self.burn_in_epochs
        if self.train_loss == "trades":
            x_adv = trades_examples(self, model, x, y, self.init_std)
        else:
            x_adv = self.attack_batch(model, x, y, init_std=self.init_std, final_check=False).x_adv

        def objective(net: nn.Module) -> StepOutput:
            logits_clean = net(x) if self.train_loss == "trades" else None
            logits = net(x_adv)
            margin = probabilistic_margin(logits.detach(), y)
            w = mail_weights(margin, self.bias, self.slope, self.scale) if weighted else torch.ones_like(margin)
            if weighted and self.normalize:
                w = mean_one(w)
            self.write("margins", rows, margin)
            self.write("weights", rows, w)
            if logits_clean is None:
                loss = weighted_ce(logits, y, w)
            else:
                kl = kl_per_sample(logits_clean, logits)
                loss = F.cross_entropy(logits_clean, y) + self.trades_beta * (kl * w).mean()
            return StepOutput(loss, logits, {"weight": w.sum(), "margin": margin.sum()})
        return objective

    def end_epoch(self) -> dict:
        """The last weights' and margins' statistics over the training set."""
        return {**summary(self.weights, "weight"), **summary(self.margins, "margin")}
