"""IAAT: the selection rule, warmup, bounds, loss split, modes, memory persistence."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import config_method, run_in_process
from iaat.errors import ConfigError

U = 1 / 255


class RadiusStub(nn.Module):
    """Sample k (base image b_k) is classified correctly iff mean(x - b_k) < r_k: its L-inf robust radius is r_k.

    PGD's gradient sign is +1 on every pixel, so an attack at eps moves mean(x - b_k) to eps exactly.
    """

    def __init__(self, bases: torch.Tensor, radii: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bases", bases)
        self.register_buffer("radii", radii)
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(len(x))
        k = torch.cdist(x.flatten(1), self.bases.flatten(1)).argmin(1)
        margin = self.radii[k] - (x - self.bases[k]).flatten(1).mean(1)
        return torch.stack([margin, torch.zeros_like(margin)], 1)  # unscaled: CE gradients must not vanish


def stub_problem(n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bases = 0.3 + 0.4 * torch.rand(n, 1, 8, 8, generator=g)
    radii = (2 + 18 * torch.rand(n, generator=g)) * U
    return RadiusStub(bases, radii), bases, torch.zeros(n, dtype=torch.long), radii


def make_iaat(n: int, **params) -> "object":
    return config_method("iaat", n, {"eps": 8, "step_size": 2, "steps": 10}, **params)


def run_epochs(method, model, x, y, epochs: int, start: int = 0) -> None:
    idx = torch.arange(len(y))
    for epoch in range(start, start + epochs):
        method.start_epoch(epoch)
        method.compute(model, x, y, idx)


@pytest.mark.parametrize("selection", ["alg2", "line_search"])
def test_radius_settles_within_gamma_of_the_true_radius(selection):
    model, x, y, radii = stub_problem()
    method = make_iaat(len(y), warmup_epochs=1, eps_warmup=8, gamma=1.9, beta=0.1, selection=selection,
                       line_search_max=24)
    run_epochs(method, model, x, y, 90)
    mem = method.memory
    assert torch.all((mem - radii).abs() <= 1.9 * U + 1e-6), (mem - radii) / U
    assert torch.all(mem <= radii + 1e-6)  # a radius that breaks the sample is never kept


def test_alg2_choice_and_smoothing_one_step():
    model, x, y, radii = stub_problem()
    method = make_iaat(len(y), warmup_epochs=0, eps_init=8, gamma=2, beta=0.5)
    run_epochs(method, model, x, y, 1)
    mem0 = torch.full_like(radii, 8 * U)
    choice = torch.where(mem0 + 2 * U < radii, mem0 + 2 * U, torch.where(mem0 < radii, mem0, mem0 - 2 * U))
    torch.testing.assert_close(method.memory, 0.5 * mem0 + 0.5 * choice)


def test_line_search_picks_largest_grid_radius_that_holds():
    model, x, y, radii = stub_problem()
    method = make_iaat(len(y), warmup_epochs=0, beta=1.0, selection="line_search", line_search_step=1,
                       line_search_max=24)
    run_epochs(method, model, x, y, 1)
    expected = torch.floor(radii / U - 1e-3) * U  # grid radii strictly below r hold
    torch.testing.assert_close(method.memory, expected)


def test_alg2_selection_is_one_batched_attack():
    model, x, y, _ = stub_problem(8)
    method = make_iaat(len(y), warmup_epochs=0, eps_init=8, selection_check="final_iterate")
    run_epochs(method, model, x, y, 1)
    # the first batch's model check (B, once per method), clean check (B), selection over 2B: 10 steps + final
    # check, training attack 10 steps (B), training forward (B)
    assert model.calls == [8] + [8] + [16] * 11 + [8] * 10 + [8]

    model, x, y, radii = stub_problem(8)
    method = make_iaat(len(y), warmup_epochs=0, eps_init=8)  # any_iterate: a sample's attack ends at its miss
    run_epochs(method, model, x, y, 1)
    selection = model.calls[2:-11]  # after the model check and the clean check
    assert model.calls[:2] == [8, 8] and model.calls[-11:] == [8] * 11
    assert selection[0] == 16 and selection == sorted(selection, reverse=True) and len(selection) <= 11
    broken = int((8 * U >= radii).sum() + (10 * U >= radii).sum())  # the 2B attacks that break (+1 check)
    assert 0 < broken < 16 and sum(selection) < 16 * 11


@pytest.mark.parametrize("schedule", ["batched", "conditional"])
def test_selection_check_any_iterate_chooses_as_final_iterate_on_monotone_attacks(schedule):
    """On the stub an attack that breaks a sample never brings it back, so both checks choose the same radii;
    any_iterate gets there with fewer forward rows."""
    memories, rows = [], []
    for check in ("final_iterate", "any_iterate"):
        model, x, y, _ = stub_problem()
        method = make_iaat(len(y), warmup_epochs=0, eps_init=8, alg2_schedule=schedule, selection_check=check)
        run_epochs(method, model, x, y, 6)
        memories.append(method.memory)
        rows.append(sum(model.calls))
    torch.testing.assert_close(memories[1], memories[0])
    assert rows[1] < rows[0]


def test_reuse_needs_the_final_iterate_check():
    with pytest.raises(ConfigError, match="selection_check=final_iterate"):
        make_iaat(8, train_attack="reuse")


def test_online_mode_runs_no_extra_attack():
    model, x, y, radii = stub_problem(8)
    method = make_iaat(len(y), warmup_epochs=0, eps_init=8, selection="online", loss_split=False)
    run_epochs(method, model, x, y, 1)
    assert model.calls == [8] + [8] * 11  # the model check (first batch), then the training attack's 10 steps and
    # the training forward, like pgd_at
    held = 8 * U < radii
    expected = torch.where(held, 8 * U + 0.1 * 1.9 * U, 8 * U - 0.1 * 1.9 * U)
    torch.testing.assert_close(method.memory, expected)


def test_warmup_uses_fixed_eps_then_selection_starts():
    model, x, y, radii = stub_problem()
    method = make_iaat(len(y), warmup_epochs=3, eps_warmup=6, gamma=1.9, beta=0.5)
    run_epochs(method, model, x, y, 3)
    torch.testing.assert_close(method.memory, torch.full_like(radii, 6 * U))
    run_epochs(method, model, x, y, 1, start=3)
    assert not torch.allclose(method.memory, torch.full_like(radii, 6 * U))


def test_bounds_clip_every_radius():
    model, x, y, radii = stub_problem()
    method = make_iaat(len(y), warmup_epochs=0, eps_init=8, eps_min=4, eps_max=10, beta=1.0)
    run_epochs(method, model, x, y, 12)
    assert torch.all(method.memory >= 4 * U - 1e-7) and torch.all(method.memory <= 10 * U + 1e-7)
    small = radii < 3 * U
    assert small.any() and torch.allclose(method.memory[small], torch.full_like(method.memory[small], 4 * U))


def test_reuse_mode_stays_inside_the_new_radius():
    model, x, y, _ = stub_problem()
    method = make_iaat(len(y), warmup_epochs=0, eps_init=8, train_attack="reuse", selection_check="final_iterate")
    seen = {}

    def record(module, inputs, output):
        seen["x"] = inputs[0]

    handle = model.register_forward_hook(record)
    method.start_epoch(0)
    method.compute(model, x, y, torch.arange(len(y)))
    handle.remove()
    delta = (seen["x"] - x).flatten(1).abs().amax(1)
    assert torch.all(delta <= method.memory + 1e-6)
    assert model.calls.count(len(y)) == 3  # the first batch's model check, clean check, training forward: no attack


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_loss_split_uses_clean_loss_for_misclassified_samples():
    torch.manual_seed(0)
    model = Linear()
    x = torch.rand(16, 1, 8, 8)
    y = 1 - model(x).argmax(1)  # every sample misclassified when clean
    method = make_iaat(16, warmup_epochs=1, eps_warmup=8)
    method.start_epoch(0)
    out = method.compute(model, x, y, torch.arange(16))
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y))
    method = make_iaat(16, warmup_epochs=1, eps_warmup=8, loss_split=False)
    method.start_epoch(0)
    assert method.compute(model, x, y, torch.arange(16)).loss > F.cross_entropy(model(x), y) + 1e-3


@pytest.mark.parametrize("selection", ["alg2", "online"])
def test_skip_misclassified_attacks_only_clean_correct_samples_and_trains_the_same(selection, monkeypatch):
    """Half the batch is misclassified when clean: skipping their attacks attacks the other half only and gives
    the same loss and the same radii (no random start, so the attacks are deterministic)."""
    torch.manual_seed(0)
    model = Linear()
    x = torch.rand(16, 1, 8, 8)
    pred = model(x).argmax(1)
    y = torch.where(torch.arange(16) % 2 == 0, pred, 1 - pred)
    losses, memories, sizes = [], [], []
    import iaat.methods.base as base

    real_pgd = base.pgd

    def counting_pgd(model, x, *args, **kwargs):
        sizes.append(len(x))
        return real_pgd(model, x, *args, **kwargs)

    monkeypatch.setattr(base, "pgd", counting_pgd)
    for skip in (True, False):
        method = config_method("iaat", 16, {"eps": 8, "step_size": 2, "steps": 5, "random_start": False},
                               warmup_epochs=0, eps_init=4, selection=selection, skip_misclassified=skip)
        method.start_epoch(0)
        sizes.clear()
        losses.append(method.compute(model, x, y, torch.arange(16)).loss)
        memories.append(method.memory.clone())
        # alg2 (batched): one selection call over both radii, then the training attack; online: training only
        expected = [32, 16] if selection == "alg2" else [16]
        assert sizes == ([n // 2 for n in expected] if skip else expected)
    torch.testing.assert_close(losses[0], losses[1])
    assert torch.equal(memories[0], memories[1])


def test_learned_radii_rank_samples_by_distance_to_the_boundary():
    """Train a linear model with IAAT on data whose L-inf distance to the true boundary is known."""
    g = torch.Generator().manual_seed(0)
    n, d = 256, 16
    w = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    u = (torch.rand(n, d, generator=g) - 0.5) * 0.4
    u = u - (u @ w)[:, None] / d * w  # orthogonal to w: on the boundary
    dist = (1 + 29 * torch.rand(n, generator=g)) * U  # 1/255 .. 30/255
    side = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = (0.5 + u + (side * dist)[:, None] * w).view(n, 1, 4, 4).clamp(0, 1)
    y = (side > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    method = config_method("iaat", n, {"eps": 8, "step_size": 2, "steps": 10}, warmup_epochs=3, eps_warmup=4,
                           beta=0.5, gamma=1.9)
    for epoch in range(60):
        method.start_epoch(epoch)
        for idx in torch.randperm(n, generator=g).split(64):
            out = method.compute(model, x[idx], y[idx], idx)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    rank = lambda v: torch.argsort(torch.argsort(v)).float()  # noqa: E731
    rho = torch.corrcoef(torch.stack([rank(method.memory), rank(dist)]))[0, 1]
    assert rho > 0.8, float(rho)


@pytest.mark.parametrize("params, phrase", [
    ({"selection": "exact"}, "method.selection"),
    ({"gamma": 0.0075}, "already in [0, 1] units"),
    ({"beta": 0}, "method.beta"),
    ({"eps_min": 10, "eps_max": 4}, "larger than"),
    ({"gama": 2}, "Did you mean 'gamma'"),
])
def test_bad_parameters(params, phrase):
    with pytest.raises(ConfigError, match=phrase.replace("[", r"\[").replace("]", r"\]")):
        make_iaat(4, **params)


IAAT_ARGS = ["--dataset", "cifar10", "--model", "small_cnn", "--set", "model.width=8", "--set", "data.val_size=100",
             "--set", "attack.steps=3", "--batch-size", "50", "--no-progress", "--method", "iaat",
             "--set", "method.warmup_epochs=1", "--set", "data.download=false"]


@pytest.mark.slow
def test_memory_is_saved_per_epoch_and_resumed_exactly(tiny_cifar, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    base = ["train", "--data-dir", str(tiny_cifar), *IAAT_ARGS]
    res = run_in_process(*base, "--out", str(straight), "--epochs", "3")
    assert res.returncode == 0, res.stderr
    assert re.search(r"^epoch 1 \| .*radius_mean 8/255", res.stdout, flags=re.M)  # IAAT's number on its line
    assert res.stdout.startswith("training iaat (warmup_epochs=1") and "--print-config" in res.stdout
    assert run_in_process(*base, "--out", str(resumed), "--epochs", "2").returncode == 0
    res = run_in_process("train", "--out", str(resumed), "--resume", "--epochs", "3", "--no-progress")
    assert res.returncode == 0, res.stderr
    a = torch.load(straight / "checkpoints" / "epoch_0003.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "epoch_0003.pt", weights_only=True)
    assert torch.equal(a["method"]["memory"], b["method"]["memory"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    radii = [np.load(straight / "radii" / f"epoch_{e:04d}.npy") for e in (1, 2, 3)]
    assert all(r.shape == (400,) for r in radii)
    np.testing.assert_allclose(radii[0], 8 / 255, rtol=1e-6)  # warmup epoch: every radius at eps_warmup
    assert not np.allclose(radii[1], radii[2])
    np.testing.assert_array_equal(radii[2], a["method"]["memory"].numpy())
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert {"radius_mean", "radius_q10", "radius_q50", "radius_q90", "train_radius"} <= set(rows[-1])
    assert rows[0]["radius_mean"] == pytest.approx(8 / 255, rel=1e-5)  # metrics hold [0, 1] units


def test_conditional_schedule_chooses_like_batched():
    model, x, y, radii = stub_problem()
    memories = []
    for schedule in ("batched", "conditional"):
        method = make_iaat(len(y), warmup_epochs=0, eps_init=8, gamma=1.9, beta=0.5, alg2_schedule=schedule)
        run_epochs(method, model, x, y, 6)
        memories.append(method.memory)
    torch.testing.assert_close(memories[0], memories[1])
    model.calls.clear()
    method = make_iaat(len(y), warmup_epochs=0, eps_init=8, alg2_schedule="conditional",
                       selection_check="final_iterate")  # full-length attacks: batch sizes are easy to count
    run_epochs(method, model, x, y, 1)
    broke = int((radii < 8 * U + 1.9 * U).sum())
    assert 0 < broke < len(y)
    assert model.calls.count(broke) == 11  # the second selection attack ran on the broken samples only


# --- a port of the authors' code: yogeshbalaji/Instance_Adaptive_Adversarial_Training, attacks/pgd_adaptive.py
# (PGDAttackerAdaptive.attack) and trainers/trainer_adaptive.py (TrainerAdaptive.epsilon_select and the training
# step), with their `self`/`args` as arguments and `.cuda()` dropped -------------------------------------------------
def authors_attack(x, y, net, attack_steps, attack_lr_arr, attack_eps_arr, random_init=True, clamp=(0, 1)):
    x_adv = x.clone()
    attack_lr_arr = attack_lr_arr.view(attack_lr_arr.size(0), 1, 1, 1)
    attack_eps_arr = attack_eps_arr.view(attack_eps_arr.size(0), 1, 1, 1)
    if random_init:
        x_adv = x_adv + (torch.rand(x.size(), dtype=x.dtype, device=x.device) - 0.5) * 2 * attack_eps_arr
    for _ in range(attack_steps):
        x_adv.requires_grad = True
        net.zero_grad()
        logits = net(x_adv)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        grad = x_adv.grad.detach()
        grad = grad.sign()
        x_adv = x_adv + attack_lr_arr * grad
        diff = x_adv - x
        diff = torch.max(diff, -attack_eps_arr)
        diff = torch.min(diff, attack_eps_arr)
        x_adv = diff + x
        x_adv = x_adv.detach()
        x_adv = torch.clamp(x_adv, *clamp)
    return x_adv


def authors_epsilon_select(model, epoch, memory, args, input, target, indices):
    with torch.no_grad():
        logits = model(input)
        _, pred = torch.max(logits, dim=1)
        correct_preds_clean = (pred == target).float()
    if epoch < args["warmup"]:
        epsilon = torch.zeros(input.size(0)).fill_(args["attack_eps"])
        epsilon = epsilon * correct_preds_clean
    else:
        epsilon_prev = memory[indices]
        epsilon_low = epsilon_prev - args["gamma"]
        epsilon_cur = epsilon_prev
        epsilon_high = epsilon_prev + args["gamma"]
        attack_lr_cur = torch.clamp(epsilon_cur / (0.5 * args["attack_steps"]), min=args["attack_lr"])
        attack_lr_high = torch.clamp(epsilon_high / (0.5 * args["attack_steps"]), min=args["attack_lr"])
        input_cur = authors_attack(input, target, model, args["attack_steps"], attack_lr_cur, epsilon_cur)
        input_high = authors_attack(input, target, model, args["attack_steps"], attack_lr_high, epsilon_high)
        with torch.no_grad():
            _, logits_cur = torch.max(model(input_cur), dim=1)
            _, logits_high = torch.max(model(input_high), dim=1)
            pred_cur = (logits_cur == target).float()
            pred_high = (logits_high == target).float()
            epsilon = pred_high * epsilon_high + (1 - pred_high) * pred_cur * epsilon_cur + \
                (1 - pred_high) * (1 - pred_cur) * epsilon_low
            epsilon = epsilon * correct_preds_clean
            epsilon = torch.clamp(epsilon, min=0)
            epsilon = epsilon * args["beta"] + epsilon_prev * (1 - args["beta"])
    memory[indices] = epsilon
    return epsilon


def authors_step(model, epoch, memory, args, input, target, indices):
    epsilon_arr = authors_epsilon_select(model, epoch, memory, args, input, target, indices)
    attack_lr_arr = torch.clamp(epsilon_arr / (0.5 * args["attack_steps"]), min=args["attack_lr"])
    input = authors_attack(input, target, model, args["attack_steps"], attack_lr_arr, epsilon_arr)
    model.zero_grad()
    logits = model(input)
    loss = F.cross_entropy(logits, target)
    loss.backward()
    return input, loss
# --- end of the port -------------------------------------------------------------------------------------------------


def test_compat_authors_equals_the_authors_trainer_step_for_step():
    """Two epochs (warmup, then Alg. 2) on a BatchNorm model: radii, training inputs, loss, gradients and BatchNorm
    statistics equal the port's, both sides drawing their random starts from the same seed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(24, 4))
    theirs, ours = net, copy.deepcopy(net)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(12, 3, 8, 8, generator=g), torch.randint(0, 4, (12,), generator=g)
    idx = torch.arange(3, 15)
    args = {"warmup": 1, "attack_eps": 8 / 255, "gamma": 2 / 255, "beta": 0.5, "attack_steps": 5, "attack_lr": 2 / 255}
    memory = torch.zeros(20)
    method = config_method("iaat", 20, {"eps": 8, "step_size": 2, "steps": 5}, compat="authors", gamma=2, beta=0.5,
                           warmup_epochs=1)
    theirs.train(), ours.train()
    for epoch in range(2):
        torch.manual_seed(10 + epoch)
        x_theirs, loss_theirs = authors_step(theirs, epoch, memory, args, x, y, idx)
        torch.manual_seed(10 + epoch)
        method.start_epoch(epoch)
        seen: list = []
        hook = ours[0].register_forward_hook(lambda m, inp, out, seen=seen: seen.append(inp[0].detach()))
        for p in ours.parameters():
            p.grad = None
        out = method.compute(ours, x, y, idx)
        out.loss.backward()
        hook.remove()
        assert torch.allclose(method.memory, memory, rtol=0, atol=1e-6), epoch
        assert torch.allclose(seen[-1], x_theirs, rtol=0, atol=1e-6), epoch  # the training input
        assert out.loss.item() == pytest.approx(loss_theirs.item(), abs=1e-6)
        for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-6), (epoch, name)
        for a, b in zip(theirs.buffers(), ours.buffers()):
            assert torch.allclose(a.float(), b.float(), rtol=0, atol=1e-6), epoch
        with torch.no_grad():  # the same SGD step on both, so that epoch 2 starts from equal weights
            for p, q in zip(theirs.parameters(), ours.parameters()):
                p -= 0.5 * p.grad
                q -= 0.5 * q.grad
    assert (memory[idx] > 0).any() and (memory[idx] == 0).any()  # both kinds of samples were there


@pytest.mark.parametrize("params, phrase", [
    ({"compat": "authors", "selection": "online"}, "method.selection does not apply with method.compat=authors"),
    ({"compat": "authors", "loss_split": False}, "method.loss_split does not apply"),
    ({"compat": "authors", "weights": "gair"}, "method.weights does not apply")])
def test_compat_authors_refuses_keys_it_does_not_use(params, phrase):
    with pytest.raises(ConfigError, match=phrase):
        make_iaat(8, **params)


def test_the_warmup_radius_keeps_to_the_bounds_and_says_so():
    """eps_min and eps_max bound every radius, the warmup's too (a warmup at eps above eps_max once went through)."""
    import iaat

    capped = iaat.IAAT(num_train=4, eps=32 / 255, warmup_epochs=1, eps_max=16 / 255)
    assert capped.eps_warmup == pytest.approx(16 / 255)
    assert capped.notes() and "train at 16/255, not at 32/255" in capped.notes()[0]
    raised = iaat.IAAT(num_train=4, eps=2 / 255, warmup_epochs=1, eps_min=4 / 255)
    assert raised.eps_warmup == pytest.approx(4 / 255)
    assert iaat.IAAT(num_train=4).notes() == []


def test_settings_that_keep_radii_from_adapting_are_named_when_training_starts():
    import iaat

    assert iaat.IAAT(num_train=4, epochs=10).notes() == []
    (all_warmup,) = iaat.IAAT(num_train=4, epochs=3, warmup_epochs=5).notes()
    assert "all 3 epochs are warmup" in all_warmup
    (big_step,) = iaat.IAAT(num_train=4, epochs=10, eps=8 / 255, gamma=8 / 255).notes()
    assert "gamma 8/255 is at least the training radius 8/255" in big_step
