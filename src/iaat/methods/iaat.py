"""IAAT: instance-adaptive adversarial training (Balaji, Goldstein, Hoffman).

Every training sample i has a radius ``memory[i]`` (the epsilon memory), indexed by the
sample's position in the training set. For the first ``warmup_epochs`` every sample is
trained at ``eps_warmup``. After that, per batch (the paper's Alg. 2):

    attack at memory+γ   → still classified correctly?  choose memory+γ
    else attack at memory → still correct?              choose memory
    else                                                choose memory−γ
    eps = (1−β)·memory + β·choice, clipped to [eps_min, eps_max], written back to memory

and the model trains on PGD(x, y, eps). Alg. 1's loss takes the adversarial loss for samples
classified correctly when clean and the clean loss for the others (``loss_split``). Those others
are not attacked at all (``skip_misclassified``): their training attack would be thrown away, and
Alg. 2's attacks would give them memory−γ anyway (an attack maximising their loss leaves them
misclassified), so they get memory−γ directly.

This is the one place where a radius is chosen. Selection modes:

* ``alg2`` (default): both selection attacks (at memory+γ and at memory) run as ONE batched
  PGD call over 2B images; no per-sample loops and no sequential launches
  (``alg2_schedule: batched``, best on GPUs). ``alg2_schedule: conditional`` follows Alg. 2
  literally instead: attack everyone at memory+γ, then only the samples that broke at memory
  (one host sync to gather them). It costs 1 + f attacks for a fraction f of broken samples
  instead of 2, worth it where a bigger batch buys no parallelism (CPUs). The training
  example is then crafted at the new eps (``train_attack: separate``, exactly as the paper),
  or taken from the selection attack whose radius is nearest and projected onto the new
  eps ball (``train_attack: reuse``: two attacks' cost instead of three, radii differ by at
  most β·γ before the projection).
  Whether a sample "stays correct" under a selection attack (``selection_check``): with
  ``any_iterate`` (default) it breaks as soon as any PGD iterate is misclassified, and its attack
  stops there (the kernel's ``stop_on_miss``: later steps run on the samples still standing only);
  with ``final_iterate`` every attack runs all its steps and only the last iterate is classified,
  as in the authors' code. Alg. 2 asks whether the attack finds an adversarial example within the
  radius; an iterate that fooled the model is one, even if later steps wander back (the strict
  evaluation counts it the same way), and the steps after it are wasted work.
* ``online`` (the paper's Section 3 wording): train at eps = memory and update the memory
  from whether the training attack itself fooled the model in the training forward pass:
  +γ if not, −γ if it did. No extra attacks at all.
* ``weights: gair`` composes IAAT's radii with GAIRAT's loss weights (the GAIR keys of
  :class:`~iaat.methods.gair.GairParams`), kappa taken from the attack that made the example.
* ``train_loss: trades`` trains TRADES at IAAT's radii: the radii are selected as above (cross-entropy
  attacks: does the sample stay correct?), the training example is TRADES' KL attack at each
  sample's radius, and the loss is TRADES' CE(f(x), y) + trades_beta·KL(f(x) ‖ f(x')).
* ``line_search`` (Table 7): attack at every radius of a grid Δ, 2Δ, ... up to
  ``line_search_max`` in one batched call, choose the largest radius below the first one
  that breaks the sample, then smooth as above.

Step size (``step_rule``): ``proportional`` (default) uses max(attack.step_size, 2·eps/K), as
the authors' code does, so a K-step attack can reach the boundary of a large ball while small
balls keep the paper's fixed 2/255 step; ``fixed`` uses attack.step_size for every radius.

Differences from the authors' code (yogeshbalaji/Instance_Adaptive_Adversarial_Training:
trainers/trainer_adaptive.py, attacks/pgd_adaptive.py), each deliberate:

1. BatchNorm: the clean check and every attack run in eval mode here; theirs run in train mode, so
   the running statistics absorb every selection and training attack and each "still correct?"
   decision uses the attacked batch's own statistics.
2. Samples misclassified when clean, during warmup: they write 0 to the memory (and so train those
   samples at radius 0, on the clean image); here the memory gets ``eps_warmup`` for every sample
   (and, with ``loss_split``, those samples also train on their clean image).
3. The same samples after warmup: their choice is 0, so the smoothed radius is (1−β)·memory, and they
   are trained on PGD at that radius with the adversarial loss for every sample (no loss split);
   here they follow Alg. 2 (choice memory−γ, i.e. memory−β·γ after smoothing) and, with
   ``loss_split`` (the paper's Alg. 1), contribute their clean loss without being attacked
   (``skip_misclassified``). Their selection attacks also run on these samples; here they are skipped.
4. Selection check: theirs classifies only the final iterate; here any misclassified iterate breaks
   a sample by default (``selection_check: final_iterate`` restores theirs; see above).
5. Random start: theirs is not clamped to the [0, 1] image range before the first gradient (their
   clamp follows each step); here the start is projected onto the ball and into [0, 1] first, as in
   every attack of this project (and in GAIRAT's and Madry et al.'s code): the paper does not say,
   and the kernel is shared with evaluation, where every iterate must be a valid image.
6. Bounds: theirs clamp radii below at 0 only; here radii stay in [``eps_min``, ``eps_max``] (by default
   at most 1 under L-inf, where a larger radius means nothing): the same in practice.

``compat: authors`` computes as their code instead, all six differences included (every forward in
train mode, the warmup's and the selection's radius 0 for samples misclassified when clean, both selection
attacks on every sample with only their final iterates checked, the training attack at the new radius for
every sample and the loss on all of them, the unclamped random start, radii clamped below at 0 only); a
port of their ``epsilon_select``, attack and training step checks it step for step in ``tests/test_iaat.py``.

The presets follow the paper's Table 10 where the authors' repository differs from it (their
config trains with batch 256, reflect padding and a WRN variant without affine BatchNorm).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..attacks import attack_mode
from ..attacks.pgd import project
from ..errors import ConfigError
from ..schema import field_default
from ..units import format_size
from .base import BASE_FIELDS, CompatParams, Objective, StepOutput, size
from .gair import GairParams, GairWeighting, weighted_ce
from .per_sample import PerSampleState, summary
from .trades import trades_examples, trades_objective

#: IAAT's keys that ``compat: authors`` uses (every other one must keep its default there)
AUTHORS_KEYS = frozenset({"gamma", "beta", "warmup_epochs", "save_radii", "compat"})
#: ``train_loss: trades``: the std of the attack's Gaussian start and the default beta (the TRADES authors')
TRADES_INIT_STD, TRADES_BETA = 0.001, 6.0

SELECTIONS = ("alg2", "online", "line_search")
#: the paper's radius step on CIFAR-10 (L-inf, eps 8/255)
GAMMA = 1.9 / 255


def _on_rows(mask: torch.Tensor, compute: Any, fill: Any) -> tuple:
    """``compute(rows)`` on the rows of ``mask`` only, as one smaller batch; ``fill()``'s values elsewhere.

    ``compute`` takes an index (``slice(None)`` when every row is in ``mask``: no copies) and returns a tuple
    of per-row tensors; ``fill()`` returns full-size tensors of the same kinds. One host sync: the row count.
    """
    keep = mask.nonzero().squeeze(1)
    if len(keep) == len(mask):
        return tuple(compute(slice(None)))
    out = list(fill())
    if len(keep):
        for full, part in zip(out, compute(keep)):
            full[keep] = part
    return tuple(out)


@dataclass(eq=False, kw_only=True)
class IAAT(PerSampleState, GairParams, CompatParams):
    """Instance-adaptive adversarial training with an epsilon memory over the training set.

    Args (besides the attack's, see :class:`~iaat.methods.base.Method`; sizes in [0, 1] units):
        num_train: number of training samples (one radius each); required.
        gamma: radius change per selection (1.9/255).
        beta: smoothing, eps = (1 - beta) * memory + beta * choice (0.1).
        warmup_epochs: epochs at the fixed ``eps_warmup`` (5; the paper: 5 for ResNet-18, 10 for WRN).
        eps_warmup: radius during warmup; default ``eps``, the training radius.
        eps_init: memory before the first selection when there is no warmup (0).
        eps_min, eps_max: bounds of every radius (0 and none; the paper's ImageNet setting: eps_min 4/255).
        selection: ``alg2`` | ``online`` | ``line_search`` (see the module docstring).
        selection_steps: PGD steps of the selection attacks (default ``steps``).
        selection_check: ``any_iterate`` (a sample breaks at its first misclassified iterate, where its
            selection attack stops) | ``final_iterate`` (the authors' code: only the last iterate counts).
        alg2_schedule: ``batched`` (one attack over 2B images) | ``conditional`` (the attack at memory only
            where memory+γ broke).
        train_attack: ``separate`` (the paper) | ``reuse`` (project the selection attack's perturbation).
        step_rule: ``proportional``: step max(step_size, 2 eps / steps) | ``fixed``: step_size.
        loss_split: Alg. 1: the clean loss for samples misclassified when clean (True).
        skip_misclassified: with loss_split, no attacks for samples misclassified when clean (True).
        line_search_step, line_search_max: grid of ``line_search`` (default gamma; 16/255).
        save_radii: the trainer writes every sample's radius to ``RUN/radii/epoch_NNNN.npy`` (True).
        weights: ``none`` | ``gair``: also weight each loss by GAIRAT's kappa weights (the GAIR keys).
        train_loss: ``ce`` (the paper) | ``trades``: TRADES' attack (KL from a Gaussian start) and loss
            CE(f(x), y) + trades_beta * KL(f(x) || f(x')), each sample at its own radius; needs
            ``loss_split: false`` (TRADES has its own clean term) and ``weights: none``.
        trades_beta: TRADES' weight of the KL term with ``train_loss: trades`` (6).
        compat: ``none`` | ``authors``: compute as the authors' trainer_adaptive.py, each difference listed
            in the module docstring included (keys: gamma, beta, warmup_epochs, save_radii).

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> method = iaat.IAAT(num_train=100, epochs=10, eps=8 / 255, gamma=1.9 / 255, warmup_epochs=1)
        >>> x, y, index = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), torch.tensor([7, 3, 99, 0])
        >>> for epoch in range(2):
        ...     method.start_epoch(epoch)
        ...     method.loss(model, x, y, index).backward()
        >>> method.memory.shape
        torch.Size([100])
    """

    name = "iaat"
    varying_batches = True  # selection and training attacks on the samples still standing
    needs_epoch = True
    state_keys = ("memory",)  # exported as RUN/radii/ (epoch_arrays)
    size_keys = ("memory",)
    log_keys = ("radius_mean", "gair_lambda")

    weights: str = "none"
    train_loss: str = "ce"
    trades_beta: float = TRADES_BETA
    gamma: float = size(GAMMA)
    beta: float = 0.1
    warmup_epochs: int = 5
    eps_warmup: Optional[float] = size(None)
    eps_init: float = size(0.0)
    eps_min: float = size(0.0)
    eps_max: Optional[float] = size(None)
    selection: str = "alg2"
    selection_steps: Optional[int] = None
    selection_check: str = "any_iterate"
    alg2_schedule: str = "batched"
    train_attack: str = "separate"
    step_rule: str = "proportional"
    loss_split: bool = True
    skip_misclassified: bool = True
    line_search_step: Optional[float] = size(None)
    line_search_max: float = size(16 / 255)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check()
        self.warmup_follows_eps = self.eps_warmup is None
        if self.eps_warmup is None:
            self.eps_warmup = self.eps
        #: the radii's upper bound: eps_max, else the whole pixel range under L-inf (none under L2)
        self.upper = self.eps_max if self.eps_max is not None else (1.0 if self.norm == "linf" else math.inf)
        #: the warmup radius asked for when the bounds moved it (the bounds hold for every radius, warmup's too)
        self.warmup_asked = self.eps_warmup if self.clip(self.eps_warmup) != self.eps_warmup else None
        self.eps_warmup = self.clip(self.eps_warmup)
        self.grid_step = self.line_search_step if self.line_search_step is not None else self.gamma
        self.skip = self.loss_split and self.skip_misclassified  #: no attacks for samples misclassified when clean
        self.gair = GairWeighting(self) if self.weights == "gair" else None
        self.init_state(memory=self.clip(self.eps_init))

    def _check(self) -> None:
        """Check the parameters' values (their types and units were checked by the base class)."""
        if self.num_train is None:
            raise ConfigError("IAAT keeps one radius per training sample: pass num_train=len(train_set).")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"method.selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}.")
        if self.selection_check not in ("any_iterate", "final_iterate"):
            raise ConfigError(f"method.selection_check must be any_iterate or final_iterate, got "
                              f"{self.selection_check!r}.")
        if self.train_attack == "reuse" and self.selection_check == "any_iterate":
            raise ConfigError("method.train_attack=reuse needs method.selection_check=final_iterate: with "
                              "any_iterate a selection attack stops at its first misclassified iterate, too weak "
                              "a training example.")
        if self.alg2_schedule not in ("batched", "conditional"):
            raise ConfigError(f"method.alg2_schedule must be batched or conditional, got {self.alg2_schedule!r}.")
        if self.train_attack not in ("separate", "reuse"):
            raise ConfigError(f"method.train_attack must be separate or reuse, got {self.train_attack!r}.")
        if self.step_rule not in ("proportional", "fixed"):
            raise ConfigError(f"method.step_rule must be proportional or fixed, got {self.step_rule!r}.")
        if self.weights not in ("none", "gair"):
            raise ConfigError(f"method.weights must be none or gair, got {self.weights!r}.")
        self.check_compat()
        if self.compat == "authors":
            changed = [f.name for f in dataclasses.fields(self) if f.name not in BASE_FIELDS | AUTHORS_KEYS
                       and getattr(self, f.name) != field_default(f)]
            if changed:
                raise ConfigError(f"method.{changed[0]} does not apply with method.compat=authors, which computes as "
                                  f"the authors' code (keys there: {', '.join(sorted(AUTHORS_KEYS - {'compat'}))}); "
                                  f"drop {', '.join(changed)}.")
        if self.train_loss not in ("ce", "trades"):
            raise ConfigError(f"method.train_loss must be ce or trades, got {self.train_loss!r}.")
        if self.train_loss == "trades":
            clash = [key for key, bad in (("loss_split: false", self.loss_split), ("weights: none", self.weights != "none"),
                                          ("train_attack: separate", self.train_attack != "separate")) if bad]
            if clash:
                raise ConfigError(f"method.train_loss=trades (TRADES at IAAT's radii) needs {', '.join(clash)}: TRADES has "
                                  f"its own clean term and its own attack. Supported with it: any selection, "
                                  f"trades_beta, the radius keys.")
        elif self.trades_beta != TRADES_BETA:
            raise ConfigError("method.trades_beta applies to method.train_loss=trades only.")
        if self.trades_beta < 0:
            raise ConfigError(f"method.trades_beta must be >= 0, got {self.trades_beta}.")
        if self.weights == "none":
            changed = [f.name for f in dataclasses.fields(GairParams) if getattr(self, f.name) != field_default(f)]
            if changed:
                raise ConfigError(f"method.{changed[0]} is a key of GAIR weighting, which IAAT uses only with "
                                  f"method.weights=gair; set that too, or drop {', '.join(changed)}.")
        if self.weights == "gair" and self.lam_schedule == "linear" and self.epochs is None:
            raise ConfigError("the linear lambda schedule runs over the whole training: pass epochs=N.")
        if not 0 < self.beta <= 1:
            raise ConfigError(f"method.beta must be in (0, 1], got {self.beta}.")
        if self.gamma <= 0 or (self.line_search_step is not None and self.line_search_step <= 0) \
                or self.line_search_max <= 0:
            raise ConfigError("method.gamma, method.line_search_step and method.line_search_max must be positive.")
        if self.warmup_epochs < 0:
            raise ConfigError(f"method.warmup_epochs must be >= 0, got {self.warmup_epochs}.")
        if self.selection_steps is not None and self.selection_steps < 1:
            raise ConfigError(f"method.selection_steps must be >= 1, got {self.selection_steps}.")
        if self.eps_max is not None and self.eps_min > self.eps_max:
            raise ConfigError(f"method.eps_min ({format_size(self.eps_min)}) is larger than method.eps_max "
                              f"({format_size(self.eps_max)}).")

    def notes(self) -> list[str]:
        notes = super().notes()
        if self.norm == "l2" and self.gamma == GAMMA:
            notes.append(f"iaat: gamma {format_size(self.gamma)} is the paper's L-inf step; under l2 scale it with eps "
                         f"(the paper: gamma = 1.9/8 of eps)")
        if self.selection == "line_search" and self.line_search_max < self.eps:
            notes.append(f"iaat: the line search's grid ends at line_search_max {format_size(self.line_search_max)}, "
                         f"below eps {format_size(self.eps)}: no radius goes above it")
        if self.warmup_epochs and self.warmup_asked is not None:
            notes.append(f"iaat: the {self.warmup_epochs} warmup epoch(s) train at {format_size(self.eps_warmup)}, "
                         f"not at {format_size(self.warmup_asked)}: every radius stays within [eps_min, eps_max]")
        elif not (self.warmup_follows_eps or self.warmup_epochs == 0 or self.eps_warmup == self.eps):
            notes.append(f"iaat: the {self.warmup_epochs} warmup epoch(s) train at eps_warmup "
                         f"{format_size(self.eps_warmup)}, not at the training radius eps {format_size(self.eps)}")
        if self.epochs is not None and self.warmup_epochs >= self.epochs:
            notes.append(f"iaat: all {self.epochs} epochs are warmup (method.warmup_epochs={self.warmup_epochs}): "
                         f"no radius adapts in this run")
        if self.gamma >= self.eps > 0:
            notes.append(f"iaat: gamma {format_size(self.gamma)} is at least the training radius "
                         f"{format_size(self.eps)}: one step down takes a radius to eps_min "
                         f"{format_size(self.eps_min)} (the paper: gamma 1.9/255 at eps 8/255)")
        return notes

    # -- pieces ------------------------------------------------------------------------------------------
    def clip(self, eps: Any) -> Any:
        if torch.is_tensor(eps):
            return eps.clamp(self.eps_min, self.upper)
        return min(max(eps, self.eps_min), self.upper)

    def _step_sizes(self, eps: torch.Tensor, steps: int) -> torch.Tensor:
        """Per-sample PGD step for radii ``eps`` (see ``step_rule``)."""
        fixed = torch.full_like(eps, self.step_size)
        if self.step_rule == "fixed":
            return fixed
        return torch.maximum(fixed, 2.0 * eps / max(steps, 1))

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, steps: int,
                **kwargs: Any):
        return self.attack_batch(model, x, y, eps=eps, steps=steps, step_size=self._step_sizes(eps, steps), **kwargs)

    def _select_attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, steps: int):
        """A selection attack: ``correct`` says whether the sample held at ``eps`` (see ``selection_check``)."""
        return self._attack(model, x, y, eps, steps, stop_on_miss=self.selection_check == "any_iterate")

    def _attack_where(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, steps: int,
                      mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training attack on the samples of ``mask`` only; the others keep x and kappa 0 (misclassified at x)."""
        def attack(rows: Any) -> tuple:
            adv = self._attack(model, x[rows], y[rows], eps[rows], steps, final_check=False)
            return adv.x_adv, adv.kappa

        return _on_rows(mask, attack, lambda: (x.clone(), torch.zeros_like(y)))

    @property
    def in_warmup(self) -> bool:
        return self.epoch < self.warmup_epochs

    def smooth(self, memory: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        return self.clip((1.0 - self.beta) * memory + self.beta * choice)

    def select_alg2(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mem: torch.Tensor,
                    active: Optional[torch.Tensor] = None):
        """Alg. 2's selection attacks at radii mem+γ and mem (see ``alg2_schedule``).

        Returns ``(choice, hold_high, hold_cur, x_high, x_cur, kappa_high, kappa_cur)``; with the conditional
        schedule the ``*_cur`` values are only meaningful where ``hold_high`` is false. Samples outside
        ``active`` (misclassified when clean, with ``skip_misclassified``) are not attacked: they get
        memory−γ, which is what the two attacks give them (an attack that maximises their loss leaves them
        misclassified), with x and kappa 0.
        """
        g = self.gamma
        if active is not None:
            def skipped() -> tuple:
                broke = torch.zeros_like(active)
                return (self.clip(mem - g), broke, broke.clone(), x.clone(), x.clone(), torch.zeros_like(y),
                        torch.zeros_like(y))

            return _on_rows(active, lambda rows: self.select_alg2(model, x[rows], y[rows], mem[rows]), skipped)
        steps = self.selection_steps or self.steps
        high = self.clip(mem + g)
        if self.alg2_schedule == "batched":
            res = self._select_attack(model, torch.cat([x, x]), torch.cat([y, y]), torch.cat([high, mem]), steps)
            hold_high, hold_cur = res.correct.chunk(2)
            x_high, x_cur = res.x_adv.chunk(2)
            kappa_high, kappa_cur = res.kappa.chunk(2)
        else:
            res = self._select_attack(model, x, y, high, steps)
            hold_high, x_high, kappa_high = res.correct, res.x_adv, res.kappa
            hold_cur, x_cur, kappa_cur = hold_high.clone(), x_high.clone(), kappa_high.clone()
            broke = (~hold_high).nonzero().squeeze(1)  # the one host sync: how many need the second attack
            if len(broke):
                sub = self._select_attack(model, x[broke], y[broke], mem[broke], steps)
                hold_cur[broke], x_cur[broke], kappa_cur[broke] = sub.correct, sub.x_adv, sub.kappa
        choice = torch.where(hold_high, high, torch.where(hold_cur, mem, self.clip(mem - g)))
        return choice, hold_high, hold_cur, x_high, x_cur, kappa_high, kappa_cur

    def select_line_search(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Table 7: the largest grid radius below the first one at which PGD breaks the sample."""
        steps = self.selection_steps or self.steps
        n_grid = max(1, int(self.line_search_max / self.grid_step + 1e-6))
        radii = torch.arange(1, n_grid + 1, device=x.device, dtype=x.dtype) * self.grid_step
        b = len(y)
        eps = radii.repeat_interleave(b)
        res = self._select_attack(model, x.repeat(n_grid, 1, 1, 1), y.repeat(n_grid), eps, steps)
        holds = res.correct.view(n_grid, b)
        survived = torch.cumprod(holds.long(), dim=0).sum(0)  # grid points held before the first break
        return survived.to(x.dtype) * self.grid_step

    # -- the method --------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor]) -> Objective:
        idx = self.rows(index)
        if self.compat == "authors":
            return self._prepare_authors(model, x, y, idx)
        steps = self.steps
        stats: dict = {}
        if self.loss_split:
            with torch.no_grad(), attack_mode(model) as plain:
                clean_ok = plain(x).argmax(1) == y
            stats["clean_acc"] = clean_ok.sum()
        mem = self.memory[idx]

        kappa_steps = steps  # K of the attack whose kappa feeds GAIR weights
        if self.in_warmup:
            eps = torch.full_like(mem, self.eps_warmup)
        elif self.selection == "alg2":
            choice, hold_high, hold_cur, x_high, x_cur, kappa_high, kappa_cur = self.select_alg2(
                model, x, y, mem, clean_ok if self.skip else None)
            eps = self.smooth(mem, choice)
            stats["up"] = hold_high.sum()
            stats["same"] = (~hold_high & hold_cur).sum()
            stats["down"] = (~hold_high & ~hold_cur).sum()
        elif self.selection == "line_search":
            eps = self.smooth(mem, self.select_line_search(model, x, y))
        else:  # online: train at the memory; the update follows from the training forward below
            eps = mem
        stats["radius"] = eps.sum()  # the radius trained at
        self.write("memory", idx, eps)

        if self.train_loss == "trades":
            return self._online_update(self._trades_objective(model, x, y, eps, stats), mem, idx, y)
        if not self.in_warmup and self.selection == "alg2" and self.train_attack == "reuse":
            source = torch.where(hold_high.view(-1, 1, 1, 1), x_high, x_cur)
            x_adv = x + project(source - x, x, eps.view(-1, 1, 1, 1), self.norm)
            kappa = torch.where(hold_high, kappa_high, kappa_cur)
            kappa_steps = self.selection_steps or steps
        elif self.skip:
            x_adv, kappa = self._attack_where(model, x, y, eps, steps, clean_ok)
        else:
            adv = self._attack(model, x, y, eps, steps, final_check=False)
            x_adv, kappa = adv.x_adv, adv.kappa

        x_train = torch.where(clean_ok.view(-1, 1, 1, 1), x_adv, x) if self.loss_split else x_adv
        weights = None
        if self.gair is not None and self.gair.active(self.epoch):
            weights = self.gair.weights(kappa, kappa_steps, self.epoch, self.epochs)
            stats["gair_weight_sq"] = (weights * weights).sum()

        def objective(net: nn.Module) -> StepOutput:
            logits = net(x_train)
            return StepOutput(weighted_ce(logits, y, weights), logits, dict(stats))
        return self._online_update(objective, mem, idx, y)

    def _trades_objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
                          stats: dict) -> Objective:
        """``train_loss: trades``: TRADES' attack and loss, each sample at its own radius ``eps``."""
        x_adv = trades_examples(self, model, x, y, TRADES_INIT_STD, eps=eps, step_size=self._step_sizes(eps, self.steps))
        trades = trades_objective(x_adv, x, y, self.trades_beta)

        def objective(net: nn.Module) -> StepOutput:
            out = trades(net)
            out.stats.update(stats)
            return out
        return objective

    def _prepare_authors(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Objective:
        """``compat: authors``: trainer_adaptive.py's ``epsilon_select`` and training attack, step for step: every
        forward in train mode (BatchNorm's batch statistics; the running ones absorb each), radius 0 for samples
        misclassified when clean, both selection attacks on every sample and only their final iterates checked,
        the training attack at the new radius for every sample, the loss on all of them."""
        with torch.no_grad(), attack_mode(model, eval_mode=False) as plain:
            clean_ok = (plain(x).argmax(1) == y).to(self.memory.dtype)
        prev = self.memory[idx]
        stats: dict = {"clean_acc": clean_ok.sum()}
        if self.in_warmup:
            eps = torch.full_like(prev, self.eps_warmup) * clean_ok
        else:
            low, high = prev - self.gamma, prev + self.gamma
            x_cur, x_high = self._authors_attack(model, x, y, prev), self._authors_attack(model, x, y, high)
            with torch.no_grad(), attack_mode(model, eval_mode=False) as plain:
                hold_cur = (plain(x_cur).argmax(1) == y).to(prev.dtype)
                hold_high = (plain(x_high).argmax(1) == y).to(prev.dtype)
            choice = hold_high * high + (1 - hold_high) * hold_cur * prev + (1 - hold_high) * (1 - hold_cur) * low
            eps = (choice * clean_ok).clamp(min=0) * self.beta + prev * (1 - self.beta)
            stats.update(up=hold_high.sum(), same=((1 - hold_high) * hold_cur).sum(),
                         down=((1 - hold_high) * (1 - hold_cur)).sum())
        self.write("memory", idx, eps)
        stats["radius"] = eps.sum()
        x_adv = self._authors_attack(model, x, y, eps)

        def objective(net: nn.Module) -> StepOutput:
            logits = net(x_adv)
            return StepOutput(weighted_ce(logits, y), logits, dict(stats))
        return objective

    def _authors_attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """PGDAttackerAdaptive.attack: train mode, a uniform start not clamped before the first gradient, the
        step max(step_size, 2 eps / K), no check of its own."""
        return self._attack(model, x, y, eps.to(x.dtype), self.steps, eval_mode=False, clamp_start=False,
                            final_check=False).x_adv

    def _online_update(self, objective: Objective, mem: torch.Tensor, idx: torch.Tensor, y: torch.Tensor
                       ) -> Objective:
        """With ``selection: online``, the objective also moves each radius by whether its sample held in the
        training forward pass (+γ held, −γ fooled); the other selections have written the memory already."""
        if self.in_warmup or self.selection != "online":
            return objective

        def updating(net: nn.Module) -> StepOutput:
            out = objective(net)
            held = out.logits.detach().argmax(1) == y
            self.memory[idx] = self.smooth(mem, torch.where(held, self.clip(mem + self.gamma),
                                                            self.clip(mem - self.gamma)))
            out.stats["up"] = held.sum()
            out.stats["down"] = (~held).sum()
            return out
        return updating

    # -- bookkeeping -------------------------------------------------------------------------------------
    def end_epoch(self) -> dict:
        """The radius memory's mean, std, min, max and quantiles ([0, 1] units), and GAIR's lambda (once an epoch
        has started: it is the epoch's)."""
        row = summary(self.memory, "radius")
        if self.gair is not None and self.epoch is not None:
            row["gair_lambda"] = self.gair.lam(self.epoch, self.epochs)
        return row

    def epoch_arrays(self) -> dict[str, torch.Tensor]:
        return {"radii": self.memory.float().cpu()} if self.save_radii else {}
