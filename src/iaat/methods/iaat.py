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
* ``line_search`` (Table 7): attack at every radius of a grid Δ, 2Δ, ... up to
  ``line_search_max`` in one batched call, choose the largest radius below the first one
  that breaks the sample, then smooth as above.

Step size (``step_rule``): ``proportional`` (default) uses max(attack.step_size, 2·eps/K), as
the authors' code does, so a K-step attack can reach the boundary of a large ball while small
balls keep the paper's fixed 2/255 step; ``fixed`` uses attack.step_size for every radius.

The official code differs in three places, all deliberate here: it sets the choice of samples
misclassified when clean to 0 (here they follow Alg. 2, which gives memory−γ), its selection
forward passes run in train mode so BatchNorm statistics absorb every attack (here all attacks
run in eval mode), and it checks only the final iterate of a selection attack (here
``selection_check: final_iterate``; the default checks every iterate, see above).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..attacks import attack_mode
from ..attacks.pgd import project
from ..errors import ConfigError
from ..units import Size, parse_size
from .base import Method, StepOutput
from .gair import GairParams, GairWeighting, weighted_ce

SELECTIONS = ("alg2", "online", "line_search")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass
class _Resolved:
    """IAAT's parameters with sizes in [0, 1] units."""

    gamma: float
    beta: float
    warmup_epochs: int
    eps_warmup: float
    eps_init: float
    eps_min: float
    eps_max: float
    selection: str
    selection_steps: Optional[int]
    selection_check: str
    alg2_schedule: str
    train_attack: str
    step_rule: str
    loss_split: bool
    skip_misclassified: bool
    grid_step: float
    line_search_max: float
    save_radii: bool
    weights: str


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


class IAAT(Method):
    """Instance-adaptive adversarial training with an epsilon memory over the training set."""

    name = "iaat"

    @dataclass
    class Params(GairParams):
        weights: str = "none"  #: none | gair: also weight each loss by GAIRAT's kappa weights (GairParams keys)
        gamma: Size = 1.9  #: radius change per selection, pixel units over 255 (paper: 1.9/255)
        beta: float = 0.1  #: smoothing: eps = (1-beta)*memory + beta*choice
        warmup_epochs: int = 5  #: epochs at the fixed eps_warmup (paper: 5 for ResNet-18, 10 for WRN)
        eps_warmup: Size = 8  #: radius during warmup, pixel units over 255
        eps_init: Size = 0  #: memory before the first selection when there is no warmup
        eps_min: Size = 0  #: lower bound of every radius (paper, ImageNet: 4/255)
        eps_max: Optional[Size] = None  #: optional upper bound
        selection: str = "alg2"  #: alg2 | online | line_search
        selection_steps: Optional[int] = None  #: PGD steps of the selection attacks (default attack.steps)
        #: any_iterate: a sample breaks at its first misclassified PGD iterate, where its selection attack stops |
        #: final_iterate: the authors' code, every selection attack runs all steps and only its end counts
        selection_check: str = "any_iterate"
        alg2_schedule: str = "batched"  #: batched (one 2B attack) | conditional (attack at memory only where needed)
        train_attack: str = "separate"  #: separate (paper) | reuse (project the selection attack's perturbation)
        step_rule: str = "proportional"  #: proportional: max(step_size, 2*eps/steps) | fixed: step_size
        loss_split: bool = True  #: Alg. 1: clean loss for samples misclassified when clean
        #: with loss_split: no attacks for samples misclassified when clean: no training attack (they train on
        #: their clean image) and, in alg2, no selection attacks (they get memory-γ, as the attacks would give)
        skip_misclassified: bool = True
        line_search_step: Optional[Size] = None  #: grid spacing of line_search (default gamma)
        line_search_max: Size = 16  #: largest radius line_search tries
        save_radii: bool = True  #: write every sample's radius to RUN/radii/epoch_NNNN.npy each epoch

    @classmethod
    def parse_params(cls, raw: dict) -> Any:
        params = super().parse_params(raw)
        cls.resolve(params)
        return params

    @staticmethod
    def resolve(p: "IAAT.Params") -> _Resolved:
        """Check the parameters and convert sizes to [0, 1] units."""
        if p.selection not in SELECTIONS:
            raise ConfigError(f"method.selection must be one of {', '.join(SELECTIONS)}, got {p.selection!r}.")
        if p.selection_check not in ("any_iterate", "final_iterate"):
            raise ConfigError(f"method.selection_check must be any_iterate or final_iterate, got "
                              f"{p.selection_check!r}.")
        if p.train_attack == "reuse" and p.selection_check == "any_iterate":
            raise ConfigError("method.train_attack=reuse needs method.selection_check=final_iterate: with "
                              "any_iterate a selection attack stops at its first misclassified iterate, too weak "
                              "a training example.")
        if p.alg2_schedule not in ("batched", "conditional"):
            raise ConfigError(f"method.alg2_schedule must be batched or conditional, got {p.alg2_schedule!r}.")
        if p.train_attack not in ("separate", "reuse"):
            raise ConfigError(f"method.train_attack must be separate or reuse, got {p.train_attack!r}.")
        if p.step_rule not in ("proportional", "fixed"):
            raise ConfigError(f"method.step_rule must be proportional or fixed, got {p.step_rule!r}.")
        if p.weights not in ("none", "gair"):
            raise ConfigError(f"method.weights must be none or gair, got {p.weights!r}.")
        if p.weights == "gair":
            GairWeighting.check(p)
        if not 0 < p.beta <= 1:
            raise ConfigError(f"method.beta must be in (0, 1], got {p.beta}.")
        if p.warmup_epochs < 0:
            raise ConfigError(f"method.warmup_epochs must be >= 0, got {p.warmup_epochs}.")
        if p.selection_steps is not None and p.selection_steps < 1:
            raise ConfigError(f"method.selection_steps must be >= 1, got {p.selection_steps}.")
        gamma = parse_size(p.gamma, "method.gamma", allow_zero=False)
        eps_min = parse_size(p.eps_min, "method.eps_min")
        eps_max = parse_size(p.eps_max, "method.eps_max") if p.eps_max is not None else 1.0
        if eps_min > eps_max:
            raise ConfigError(f"method.eps_min ({p.eps_min}) is larger than method.eps_max ({p.eps_max}).")
        grid = parse_size(p.line_search_step, "method.line_search_step", allow_zero=False) \
            if p.line_search_step is not None else gamma
        return _Resolved(gamma, p.beta, p.warmup_epochs, parse_size(p.eps_warmup, "method.eps_warmup"),
                         parse_size(p.eps_init, "method.eps_init"), eps_min, eps_max, p.selection,
                         p.selection_steps, p.selection_check, p.alg2_schedule, p.train_attack, p.step_rule, p.loss_split,
                         p.loss_split and p.skip_misclassified, grid,
                         parse_size(p.line_search_max, "method.line_search_max", allow_zero=False), p.save_radii,
                         p.weights)

    def __init__(self, params: Any, attack, num_train: int, num_classes: int, device: torch.device) -> None:
        super().__init__(params, attack, num_train, num_classes, device)
        self.cfg = self.resolve(params)
        self.gair = GairWeighting(params) if self.cfg.weights == "gair" else None
        self.memory = torch.full((num_train,), self.clip(self.cfg.eps_init), dtype=torch.float32, device=device)
        self.touched = torch.zeros(num_train, dtype=torch.bool, device=device)  #: rows this rank wrote since a merge

    # -- pieces ------------------------------------------------------------------------------------------
    def clip(self, eps: Any) -> Any:
        if torch.is_tensor(eps):
            return eps.clamp(self.cfg.eps_min, self.cfg.eps_max)
        return min(max(eps, self.cfg.eps_min), self.cfg.eps_max)

    def step_size(self, eps: torch.Tensor, steps: int) -> torch.Tensor:
        """Per-sample PGD step for radii ``eps`` (see ``step_rule``)."""
        fixed = torch.full_like(eps, self.attack.step_size)
        if self.cfg.step_rule == "fixed":
            return fixed
        return torch.maximum(fixed, 2.0 * eps / max(steps, 1))

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, steps: int,
                **kwargs: Any):
        return self.attack_batch(model, x, y, eps=eps, steps=steps, step_size=self.step_size(eps, steps), **kwargs)

    def _select_attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, steps: int):
        """A selection attack: ``correct`` says whether the sample held at ``eps`` (see ``selection_check``)."""
        return self._attack(model, x, y, eps, steps, stop_on_miss=self.cfg.selection_check == "any_iterate")

    def _attack_where(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, steps: int,
                      mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training attack on the samples of ``mask`` only; the others keep x and kappa 0 (misclassified at x)."""
        def attack(rows: Any) -> tuple:
            adv = self._attack(model, x[rows], y[rows], eps[rows], steps, final_check=False)
            return adv.x_adv, adv.kappa

        return _on_rows(mask, attack, lambda: (x.clone(), torch.zeros_like(y)))

    @property
    def in_warmup(self) -> bool:
        return self.epoch < self.cfg.warmup_epochs

    def smooth(self, memory: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        return self.clip((1.0 - self.cfg.beta) * memory + self.cfg.beta * choice)

    def select_alg2(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mem: torch.Tensor,
                    active: Optional[torch.Tensor] = None):
        """Alg. 2's selection attacks at radii mem+γ and mem (see ``alg2_schedule``).

        Returns ``(choice, hold_high, hold_cur, x_high, x_cur, kappa_high, kappa_cur)``; with the conditional
        schedule the ``*_cur`` values are only meaningful where ``hold_high`` is false. Samples outside
        ``active`` (misclassified when clean, with ``skip_misclassified``) are not attacked: they get
        memory−γ, which is what the two attacks give them (an attack that maximises their loss leaves them
        misclassified), with x and kappa 0.
        """
        g = self.cfg.gamma
        if active is not None:
            def skipped() -> tuple:
                broke = torch.zeros_like(active)
                return (self.clip(mem - g), broke, broke.clone(), x.clone(), x.clone(), torch.zeros_like(y),
                        torch.zeros_like(y))

            return _on_rows(active, lambda rows: self.select_alg2(model, x[rows], y[rows], mem[rows]), skipped)
        steps = self.cfg.selection_steps or self.attack.steps
        high = self.clip(mem + g)
        if self.cfg.alg2_schedule == "batched":
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
        steps = self.cfg.selection_steps or self.attack.steps
        n_grid = max(1, int(self.cfg.line_search_max / self.cfg.grid_step + 1e-6))
        radii = torch.arange(1, n_grid + 1, device=x.device, dtype=x.dtype) * self.cfg.grid_step
        b = len(y)
        eps = radii.repeat_interleave(b)
        res = self._select_attack(model, x.repeat(n_grid, 1, 1, 1), y.repeat(n_grid), eps, steps)
        holds = res.correct.view(n_grid, b)
        survived = torch.cumprod(holds.long(), dim=0).sum(0)  # grid points held before the first break
        return survived.to(x.dtype) * self.cfg.grid_step

    # -- the method --------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepOutput:
        c = self.cfg
        steps = self.attack.steps
        stats: dict = {}
        if c.loss_split:
            with torch.no_grad(), attack_mode(model) as plain:
                clean_ok = plain(x).argmax(1) == y
            stats["clean_acc"] = clean_ok.sum()
        mem = self.memory[idx]

        kappa_steps = steps  # K of the attack whose kappa feeds GAIR weights
        if self.in_warmup:
            eps = torch.full_like(mem, c.eps_warmup)
        elif c.selection == "alg2":
            choice, hold_high, hold_cur, x_high, x_cur, kappa_high, kappa_cur = self.select_alg2(
                model, x, y, mem, clean_ok if c.skip_misclassified else None)
            eps = self.smooth(mem, choice)
            stats["up"] = hold_high.sum()
            stats["same"] = (~hold_high & hold_cur).sum()
            stats["down"] = (~hold_high & ~hold_cur).sum()
        elif c.selection == "line_search":
            eps = self.smooth(mem, self.select_line_search(model, x, y))
        else:  # online: train at the memory; the update follows from the training forward below
            eps = mem

        if not self.in_warmup and c.selection == "alg2" and c.train_attack == "reuse":
            source = torch.where(hold_high.view(-1, 1, 1, 1), x_high, x_cur)
            x_adv = x + project(source - x, x, eps.view(-1, 1, 1, 1), self.attack.norm)
            kappa = torch.where(hold_high, kappa_high, kappa_cur)
            kappa_steps = c.selection_steps or steps
        elif c.skip_misclassified:
            x_adv, kappa = self._attack_where(model, x, y, eps, steps, clean_ok)
        else:
            adv = self._attack(model, x, y, eps, steps, final_check=False)
            x_adv, kappa = adv.x_adv, adv.kappa

        x_train = torch.where(clean_ok.view(-1, 1, 1, 1), x_adv, x) if c.loss_split else x_adv
        logits = model(x_train)
        weights = None
        if self.gair is not None and self.gair.active(self.epoch):
            weights = self.gair.weights(kappa, kappa_steps, self.epoch, self.total_epochs)
            stats["gair_weight_sq"] = (weights * weights).sum()
        loss = weighted_ce(logits, y, weights)
        stats["radius"] = eps.sum()  # the radius trained at

        if not self.in_warmup and c.selection == "online":
            held = logits.detach().argmax(1) == y
            eps = self.smooth(mem, torch.where(held, self.clip(mem + c.gamma), self.clip(mem - c.gamma)))
            stats["up"] = held.sum()
            stats["down"] = (~held).sum()
        self.memory[idx] = eps
        self.touched[idx] = True
        return StepOutput(loss, logits, stats)

    # -- bookkeeping -------------------------------------------------------------------------------------
    def end_epoch(self, epoch: int, run_dir: Optional[Path]) -> dict:
        mem = self.memory.float().cpu()
        q = torch.quantile(mem, torch.tensor(QUANTILES, dtype=mem.dtype))
        row = {"radius_mean": float(mem.mean()) * 255, "radius_std": float(mem.std()) * 255,
               "radius_min": float(mem.min()) * 255, "radius_max": float(mem.max()) * 255,
               **{f"radius_q{int(p * 100):02d}": float(v) * 255 for p, v in zip(QUANTILES, q)}}
        if self.gair is not None:
            row["gair_lambda"] = self.gair.lam(epoch, self.total_epochs)
        if run_dir is not None and self.cfg.save_radii:
            from ..engine.checkpoint import atomic_write_bytes

            folder = Path(run_dir) / "radii"
            folder.mkdir(exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, mem.numpy().astype(np.float32), allow_pickle=False)
            atomic_write_bytes(folder / f"epoch_{epoch + 1:04d}.npy", buf.getvalue())
        return row

    def merge_ranks(self, info: Any) -> None:
        from ..distributed import merge_rows

        self.memory = merge_rows(self.memory, self.touched, info)
        self.touched.zero_()

    def state_dict(self) -> dict:
        return {"memory": self.memory.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        memory = state["memory"]
        if memory.shape != self.memory.shape:
            raise ConfigError(f"the checkpoint's epsilon memory has {memory.shape[0]} entries but the training set "
                              f"has {self.memory.shape[0]} samples.")
        self.memory.copy_(memory.to(self.memory.device))
