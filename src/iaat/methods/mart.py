"""MART: misclassification-aware adversarial training (Wang et al., ICLR 2020).

The loss on a batch, with ``p`` the softmax of the clean logits and ``p'`` that of the adversarial ones::

    BCE(p', y) + beta * mean_i KL(p_i || p'_i) * (1 - p_i[y_i])
    BCE(p', y) = CE(p', y) - log(1 - max_{k != y} p'_k)

The boosted cross-entropy also pushes down the most likely wrong class, and the KL term weighs each
sample by how unsure the model is of it when clean: misclassified samples count most. The adversarial
example maximises the cross-entropy (PGD from a small Gaussian start, as in the authors' ``mart.py``).

As in the authors' code, three small constants keep logarithms finite and the weights positive
(``log(1.0001 - p' + 1e-12)``, ``log(p' + 1e-12)``, ``1.0000001 - p[y]``); with them the loss equals
theirs (a port of their ``mart_loss`` checks it in ``tests/test_mart.py``). Two differences: the KL
term takes the clean log-probabilities from ``log_softmax`` (theirs: the log of the softmax, whose
gradient is NaN once a float32 softmax rounds a probability to 0; the values agree to rounding); and
the attack's Gaussian start is clamped to the image range before the first gradient (the kernel's
rule for every attack), where theirs clamps from the first step on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import Objective, StepOutput
from .trades import KLRegularised


def mart_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """MART's training loss from the clean and adversarial logits of one batch (see the module docstring).

    Example:
        >>> import torch
        >>> from iaat.methods.mart import mart_loss
        >>> clean, adv = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.5, 1.0, -1.0]])
        >>> round(float(mart_loss(clean, adv, torch.tensor([0]), beta=6.0)), 4)
        2.4112
    """
    return _mart_terms(logits_clean, logits_adv, y, beta)[0]


def _mart_terms(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MART's loss and each sample's KL(p || p')."""
    p_adv = F.softmax(logits_adv, dim=1)
    p_clean = F.softmax(logits_clean, dim=1)
    # the most likely wrong class of each adversarial example
    wrong = p_adv.scatter(1, y[:, None], float("-inf")).argmax(dim=1)
    boosted = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
    # log_softmax, not log(softmax): finite gradients where a saturated softmax rounds a probability to 0
    kl = (p_clean * (F.log_softmax(logits_clean, dim=1) - torch.log(p_adv + 1e-12))).sum(dim=1)
    unsure = 1.0000001 - p_clean.gather(1, y[:, None]).squeeze(1)
    return boosted + beta * (kl * unsure).mean(), kl


@dataclass(eq=False, kw_only=True)
class MART(KLRegularised):
    """Misclassification-aware adversarial training: boosted cross-entropy on PGD examples plus a KL term
    weighted by each sample's clean misclassification.

    Args:
        beta: weight of the KL term; 6 in the authors' WRN-34-10 script and ``mart_loss``, 5 in their ResNet-18 one.
        init_std: std of the Gaussian start of the attack (0.001, as in the authors' code).

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> loss = iaat.MART(eps=8 / 255, beta=6.0).loss(model, torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    """

    name = "mart"
    log_keys = ("train_kl",)

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor]) -> Objective:
        x_adv = self.attack_batch(model, x, y, init_std=self.init_std, final_check=False).x_adv

        def objective(net: nn.Module) -> StepOutput:
            logits_clean = net(x)
            logits_adv = net(x_adv)
            loss, kl = _mart_terms(logits_clean, logits_adv, y, self.beta)
            return StepOutput(loss, logits_adv, {"kl": kl.detach().sum()})
        return objective
