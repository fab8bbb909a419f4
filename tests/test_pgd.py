"""Property tests of the shared PGD kernel (iaat.attacks.pgd)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from iaat.attacks import margin_loss, pgd, random_targets
from iaat.data import ImageSet, load_dataset
from iaat.errors import ConfigError
from iaat.evaluation import AttackSpec, accuracy
from iaat.models import build_model

B = 8
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _batch(seed: int = 0, batch: int = B, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images with some pixels exactly at 0 and 1 (so the [0, 1] clamp matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g)
    x[:, :, :2] = 0.0
    x[:, :, -2:] = 1.0
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, y


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", 10, 3, width=8).eval()


@pytest.fixture(scope="module")
def digits_model():
    """A small_cnn (width 16) trained for 2 epochs of plain SGD on sklearn digits (about 1 s)."""
    ds = load_dataset("digits")
    torch.manual_seed(0)
    net = build_model("small_cnn", ds.num_classes, 1, width=16, mean=ds.mean, std=ds.std)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = ds.train.x.float() / 255, ds.train.y
    net.train()
    for _ in range(2):
        perm = torch.randperm(len(x))
        for lo in range(0, len(x) - 1, 64):
            idx = perm[lo:lo + 64]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    for p in net.parameters():
        p.grad = None
    return net, ds


def _digits_batch(ds, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    return ds.test.x[:n].float() / 255, ds.test.y[:n]


# --------------------------------------------------------------------------- norm-ball properties

_radius = st.one_of(st.just(0.0), st.floats(1e-3, 0.5, allow_nan=False))


@FEW
@given(eps=st.lists(_radius, min_size=B, max_size=B), steps=st.integers(0, 4), random_start=st.booleans(),
       step_scale=st.sampled_from([None, 0.3, 1.9]), seed=st.integers(0, 2**16))
def test_linf_stays_in_ball_and_image_range(tiny_model, eps, steps, random_start, step_scale, seed):
    x, y = _batch(seed)
    eps_t = torch.tensor(eps)
    step_size = None if step_scale is None else eps_t * step_scale
    torch.manual_seed(seed)
    res = pgd(tiny_model, x, y, eps_t, steps=steps, step_size=step_size, random_start=random_start)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    dist = (res.x_adv - x).abs().amax(dim=(1, 2, 3))
    assert torch.all(dist <= eps_t + 1e-6), (dist, eps_t)
    assert res.x_adv.min() >= 0.0 and res.x_adv.max() <= 1.0
    zero = eps_t == 0
    assert torch.equal(res.x_adv[zero], x[zero])
    assert res.kappa.shape == (B,) and res.kappa.dtype == torch.long
    assert torch.all((res.kappa >= 0) & (res.kappa <= steps))


@FEW
@given(eps=st.lists(st.one_of(st.just(0.0), st.floats(1e-2, 4.0, allow_nan=False)), min_size=B, max_size=B),
       steps=st.integers(0, 4), random_start=st.booleans(), seed=st.integers(0, 2**16))
def test_l2_stays_in_ball_and_image_range(tiny_model, eps, steps, random_start, seed):
    x, y = _batch(seed)
    eps_t = torch.tensor(eps)
    torch.manual_seed(seed)
    res = pgd(tiny_model, x, y, eps_t, steps=steps, norm="l2", random_start=random_start)
    norms = (res.x_adv - x).flatten(1).norm(dim=1)
    assert torch.all(norms <= eps_t + 1e-5), (norms, eps_t)
    assert res.x_adv.min() >= 0.0 and res.x_adv.max() <= 1.0
    zero = eps_t == 0
    assert torch.equal(res.x_adv[zero], x[zero])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_moves_to_the_ball_boundary(tiny_model, norm):
    """Non-triviality of the ball tests: with enough steps the perturbation reaches (close to) eps."""
    x = torch.full((B, 3, 16, 16), 0.5) + 0.1 * torch.rand(B, 3, 16, 16)
    y = torch.arange(B) % 10
    eps = 0.03 if norm == "linf" else 0.5
    torch.manual_seed(0)
    res = pgd(tiny_model, x, y, eps, steps=5, norm=norm)
    delta = res.x_adv - x
    size = delta.abs().amax(dim=(1, 2, 3)) if norm == "linf" else delta.flatten(1).norm(dim=1)
    assert torch.all(size > 0.9 * eps), size


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("random_start", [True, False])
@pytest.mark.parametrize("eps", [0.0, "zeros"])
@pytest.mark.parametrize("step_size", [None, 0.1])
def test_zero_radius_leaves_input_unchanged(tiny_model, norm, random_start, eps, step_size):
    x, y = _batch(3)
    radius = torch.zeros(B) if eps == "zeros" else eps
    torch.manual_seed(0)
    res = pgd(tiny_model, x, y, radius, steps=3, norm=norm, random_start=random_start, step_size=step_size)
    assert torch.equal(res.x_adv, x)
    with torch.no_grad():
        clean = tiny_model(x).argmax(1) == y
    assert torch.equal(res.correct, clean)


class _Flat(nn.Module):
    """A model that is never called when steps=0 and final_check=False."""

    def forward(self, x):  # pragma: no cover - must not run
        raise AssertionError("no forward call expected")


def test_linf_random_start_is_uniform_in_the_box():
    x = torch.full((2000, 1, 1, 2), 0.5)
    torch.manual_seed(0)
    res = pgd(_Flat(), x, torch.zeros(2000, dtype=torch.long), 0.2, steps=0, final_check=False)
    u = ((res.x_adv - x) / 0.2).flatten()
    assert u.abs().max() <= 1.0 + 1e-6
    assert 0.47 < (u.abs() < 0.5).float().mean() < 0.53  # uniform on [-1, 1]
    assert 0.47 < (u > 0).float().mean() < 0.53
    assert torch.equal(res.kappa, torch.zeros(2000, dtype=torch.long))


def test_l2_random_start_is_uniform_in_the_ball():
    """In 2 dimensions a uniform point of the unit disc has radius < 1/2 with probability 1/4."""
    x = torch.full((4000, 1, 1, 2), 0.5)
    torch.manual_seed(0)
    res = pgd(_Flat(), x, torch.zeros(4000, dtype=torch.long), 0.4, steps=0, norm="l2", final_check=False)
    d = (res.x_adv - x).flatten(1) / 0.4
    r = d.norm(dim=1)
    assert r.max() <= 1.0 + 1e-5
    assert 0.22 < (r < 0.5).float().mean() < 0.28
    assert 0.47 < (d[:, 0] > 0).float().mean() < 0.53


def test_bad_arguments_raise(tiny_model):
    x, y = _batch()
    with pytest.raises(ValueError, match="shape"):
        pgd(tiny_model, x, y, torch.zeros(B + 1))
    with pytest.raises(ValueError, match="norm"):
        pgd(tiny_model, x, y, 0.1, norm="l1")
    with pytest.raises(ValueError, match="restarts"):
        pgd(tiny_model, x, y, 0.1, restarts=0)
    with pytest.raises(ValueError, match="loss"):
        pgd(tiny_model, x, y, 0.1, loss="hinge")


def test_bf16_autocast_keeps_ball_and_range(tiny_model):
    x, y = _batch(5)
    eps = torch.linspace(0.0, 0.1, B)
    torch.manual_seed(0)
    res = pgd(tiny_model, x, y, eps, steps=3, autocast_dtype=torch.bfloat16)
    assert res.x_adv.dtype == torch.float32
    assert torch.all((res.x_adv - x).abs().amax(dim=(1, 2, 3)) <= eps + 1e-6)
    assert res.x_adv.min() >= 0.0 and res.x_adv.max() <= 1.0


# --------------------------------------------------------------------------- restarts and result consistency

@pytest.mark.parametrize("norm,eps", [("linf", 24 / 255), ("l2", 1.0)])
@pytest.mark.parametrize("loss", ["ce", "margin"])
@pytest.mark.parametrize("seed", [0, 1])
def test_restarts_never_worse_than_one_run(digits_model, norm, eps, loss, seed):
    net, ds = digits_model
    x, y = _digits_batch(ds)
    torch.manual_seed(seed)
    one = pgd(net, x, y, eps, steps=2, norm=norm, loss=loss, restarts=1)
    torch.manual_seed(seed)
    three = pgd(net, x, y, eps, steps=2, norm=norm, loss=loss, restarts=3)
    # A sample robust under 3 restarts is robust under 1 (correct3 <= correct1 elementwise).
    assert not torch.any(three.correct & ~one.correct)
    same_status = three.correct == one.correct
    assert torch.all(three.loss[same_status] >= one.loss[same_status] - 1e-6)
    assert three.correct.sum() <= one.correct.sum()


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_restarts_keep_the_best_of_the_individual_runs(digits_model, loss):
    """R restarts == R single runs drawn from the same RNG stream, keeping per sample a successful run
    if any (else the highest objective), and among the successful ones the highest objective."""
    net, ds = digits_model
    x, y = _digits_batch(ds)
    torch.manual_seed(3)
    runs = [pgd(net, x, y, 20 / 255, steps=1, loss=loss) for _ in range(4)]
    torch.manual_seed(3)
    best = pgd(net, x, y, 20 / 255, steps=1, loss=loss, restarts=4)
    correct = torch.stack([r.correct for r in runs])
    losses = torch.stack([r.loss for r in runs])
    assert torch.equal(best.correct, correct.all(0))
    assert (correct.any(0) & ~correct.all(0)).any(), "the runs should disagree somewhere for this test to bite"
    expected = torch.where(correct == best.correct, losses, torch.tensor(float("-inf"))).amax(0)
    torch.testing.assert_close(best.loss, expected)


@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_result_fields_describe_the_returned_images(digits_model, restarts, loss):
    """x_adv, logits, correct and loss of the kept restart belong together (no mixing between runs)."""
    net, ds = digits_model
    x, y = _digits_batch(ds, 64)
    torch.manual_seed(0)
    res = pgd(net, x, y, 24 / 255, steps=3, restarts=restarts, loss=loss)
    with torch.no_grad():
        logits = net(res.x_adv)
    torch.testing.assert_close(res.logits, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(res.correct, logits.argmax(1) == y)
    expected = F.cross_entropy(logits, y, reduction="none") if loss == "ce" else margin_loss(logits, y)
    torch.testing.assert_close(res.loss, expected, rtol=1e-4, atol=1e-4)


def test_final_check_false_returns_no_correctness(tiny_model):
    x, y = _batch()
    res = pgd(tiny_model, x, y, 0.05, steps=2, final_check=False)
    assert res.correct is None and res.logits is None and res.loss is None
    assert res.kappa.shape == (B,)
    # Restarts need the final check to choose a run, so it is forced.
    res = pgd(tiny_model, x, y, 0.05, steps=2, final_check=False, restarts=2)
    assert res.correct is not None and res.loss is not None and res.logits is not None


# --------------------------------------------------------------------------- model state

def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 3, width=8)
    with torch.no_grad():  # non-default running statistics
        model.train()
        model(torch.rand(16, 3, 16, 16))
    return model


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("restarts", [1, 2])
def test_model_mode_buffers_and_grads_untouched(training, norm, restarts):
    model = _bn_model().train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch()
    pgd(model, x, y, 0.05 if norm == "linf" else 0.5, steps=3, norm=norm, restarts=restarts)
    assert all(m.training == training for m in model.modules())
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_parameters_are_frozen_during_the_attack_and_restored_after():
    """An attack differentiates w.r.t. its input only: the weights are frozen meanwhile (a compiled backward would
    compute their gradients too), frozen layers of the caller stay frozen, and a graph built before the attack
    still trains the weights after it."""
    model = _bn_model().train()
    first = next(model.parameters())
    first.requires_grad_(False)  # the caller's frozen layer
    seen: list = []
    model.register_forward_hook(lambda m, i, o: seen.append(any(p.requires_grad for p in m.parameters())))
    x, y = _batch()
    clean_loss = F.cross_entropy(model(x), y)  # built before the attack, backpropagated after it
    pgd(model, x, y, 0.05, steps=2)
    clean_loss.backward()
    assert seen[0] and not any(seen[1:]) and len(seen) >= 3  # the clean forward, then the attack's
    assert not first.requires_grad and first.grad is None
    assert all(p.requires_grad and p.grad is not None for p in list(model.parameters())[1:])


def test_eval_mode_false_uses_train_mode_statistics():
    """Control for the test above: attacking in train mode does move BatchNorm statistics."""
    model = _bn_model().train()
    before = model.net.features[0][1].running_mean.clone()
    x, y = _batch()
    pgd(model, x, y, 0.05, steps=2, eval_mode=False)
    assert model.training
    assert not torch.equal(before, model.net.features[0][1].running_mean)
    assert all(p.grad is None for p in model.parameters())


def test_mode_restored_when_the_model_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, *_batch(), 0.1)
    assert model.training


# --------------------------------------------------------------------------- kappa and early stopping

class ScheduledStub(nn.Module):
    """Predictions fixed by the call count: sample i is classified as its label on forward calls
    0..k_i-1 and as ``(label + 1) % C`` afterwards. ``slope * sum(x)`` added to the logit of class
    ``(label + 1) % C`` makes the cross-entropy gradient w.r.t. x strictly positive everywhere (or zero
    with slope 0) without changing any prediction."""

    def __init__(self, labels: torch.Tensor, k: torch.Tensor, num_classes: int = 4, slope: float = 0.0):
        super().__init__()
        self.labels, self.k, self.c, self.slope = labels, k, num_classes, slope
        self.calls = 0

    def forward(self, x):
        call = self.calls
        self.calls += 1
        other = (self.labels + 1) % self.c
        pred = torch.where(self.k > call, self.labels, other)
        logits = 5.0 * F.one_hot(pred, self.c).float()
        return logits + self.slope * x.flatten(1).sum(1, keepdim=True) * F.one_hot(other, self.c).float()


@FEW
@given(k=st.lists(st.integers(0, 15), min_size=1, max_size=8), steps=st.integers(0, 12),
       random_start=st.booleans())
def test_kappa_counts_correct_iterates(k, steps, random_start):
    n = len(k)
    k_t = torch.tensor(k)
    labels = torch.arange(n) % 4
    stub = ScheduledStub(labels, k_t)
    x = torch.rand(n, 3, 4, 4)
    res = pgd(stub, x, labels, 0.1, steps=steps, random_start=random_start, final_check=False)
    assert stub.calls == steps
    assert torch.equal(res.kappa, torch.clamp(k_t, max=steps))
    assert res.correct is None

    stub = ScheduledStub(labels, k_t)
    res = pgd(stub, x, labels, 0.1, steps=steps, random_start=random_start, final_check=True)
    assert stub.calls == steps + 1
    assert torch.equal(res.kappa, torch.clamp(k_t, max=steps))
    # The final check is the (steps + 1)-th call, at the final iterate x_K.
    assert torch.equal(res.correct, k_t > steps)


def test_correct_is_final_iterate_correctness(tiny_model):
    x, y = _batch(7)
    torch.manual_seed(0)
    res = pgd(tiny_model, x, y, 0.1, steps=4)
    with torch.no_grad():
        assert torch.equal(res.correct, tiny_model(res.x_adv).argmax(1) == y)


ALPHA = 0.02


def _applied_steps(first_wrong, steps, tau):
    """Run the stub attack from x = 0.5 without random start; return how many +alpha steps each sample took."""
    m = torch.tensor(first_wrong)
    labels = torch.arange(len(m)) % 4
    stub = ScheduledStub(labels, m, slope=1e-3)
    x = torch.full((len(m), 3, 4, 4), 0.5)
    res = pgd(stub, x, labels, 0.45, steps=steps, step_size=ALPHA, random_start=False, early_stop_tau=tau,
              final_check=False)
    delta = res.x_adv - x
    assert torch.all(delta == delta[:, :1, :1, :1]), "every pixel moves by the same +alpha steps"
    assert torch.all(delta >= 0)
    count = delta[:, 0, 0, 0] / ALPHA
    assert torch.allclose(count, count.round(), atol=1e-3)
    return count.round().long(), res.kappa


@pytest.mark.parametrize("tau", [None, 0, 1, 3])
@pytest.mark.parametrize("steps", [1, 6, 10])
def test_early_stop_tau(tau, steps):
    first_wrong = [0, 1, 2, 3, 5, 7, 10, 25]
    applied, kappa = _applied_steps(first_wrong, steps, tau)
    m = torch.tensor(first_wrong)
    if tau is None:
        expected = torch.full_like(m, steps)
    else:
        # Sample i is first misclassified at iterate m_i and stays so: it moves tau more steps (one per
        # misclassified iterate it may step on from; the test above has iterates that flip back).
        expected = torch.clamp(m + tau, max=steps)
    assert torch.equal(applied, expected), (applied, expected)
    assert torch.equal(kappa, torch.clamp(m, max=steps))


def test_early_stopped_sample_is_frozen_across_step_counts():
    """Once stopped, more steps do not move a sample: x_adv is the same for every larger `steps`."""
    first_wrong, tau = [2, 4, 1, 3], 2
    runs = [_applied_steps(first_wrong, steps, tau)[0] for steps in (6, 9, 15)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2])
    assert torch.equal(runs[0], torch.tensor(first_wrong) + tau)


class PathStub(nn.Module):
    """Classifies sample i correctly at iterate x_n iff ``pattern[i][n]``, n the number of +ALPHA steps x has taken
    from 0.5 (so a stopped sample's frozen iterate keeps its class); the slope term as in :class:`ScheduledStub`."""

    def __init__(self, labels: torch.Tensor, pattern: list, num_classes: int = 4, slope: float = 1e-3):
        super().__init__()
        self.labels, self.pattern, self.c, self.slope = labels, torch.tensor(pattern), num_classes, slope

    def forward(self, x):
        n = ((x.flatten(1).mean(1) - 0.5) / ALPHA).round().long().clamp(max=self.pattern.shape[1] - 1)
        other = (self.labels + 1) % self.c
        pred = torch.where(self.pattern.gather(1, n[:, None]).squeeze(1), self.labels, other)
        return 5.0 * F.one_hot(pred, self.c).float() + self.slope * x.flatten(1).sum(1, keepdim=True) * F.one_hot(
            other, self.c).float()


def _authors_pgd_k_tau(correct_at: list, steps: int, tau: int) -> tuple[int, int]:
    """Steps taken and kappa of one sample under the stopping rule of FAT's ``earlystop`` (ported from
    zjfheart/Friendly-Adversarial-Training, earlystop.py; GAIRAT's ``GA_earlystop`` counts kappa the same way):
    ``control`` starts at tau, a misclassified iterate with ``control == 0`` ends the attack, any other
    misclassified iterate spends one, a correct one adds to kappa."""
    control, kappa, n = tau, 0, 0
    for _ in range(steps):
        if not correct_at[n]:
            if control == 0:
                break
            control -= 1
        else:
            kappa += 1
        n += 1
    return n, kappa


@FEW
@given(pattern=st.lists(st.lists(st.booleans(), min_size=13, max_size=13), min_size=1, max_size=6),
       steps=st.integers(0, 12), tau=st.integers(0, 4))
def test_early_stop_tau_counts_misclassified_iterates_as_the_authors_code(pattern, steps, tau):
    """FAT's PGD-K-tau when iterates flip between correct and wrong: a sample stops at its (tau + 1)-th
    misclassified iterate, not tau steps after its first one, and a stopped sample adds nothing to kappa."""
    labels = torch.arange(len(pattern)) % 4
    x = torch.full((len(pattern), 3, 4, 4), 0.5)
    res = pgd(PathStub(labels, pattern), x, labels, 0.45, steps=steps, step_size=ALPHA, random_start=False,
              early_stop_tau=tau, final_check=False)
    taken = ((res.x_adv - x).flatten(1).mean(1) / ALPHA).round().long()
    expected = torch.tensor([_authors_pgd_k_tau(row, steps, tau) for row in pattern])
    assert torch.equal(taken, expected[:, 0])
    assert torch.equal(res.kappa, expected[:, 1])


class Flat(nn.Module):
    """Logits that do not depend on x (zero gradient): the label decides correct (0) or wrong (any other)."""

    def forward(self, x):
        return torch.zeros(len(x), 4) + 0.0 * x.flatten(1).sum(1, keepdim=True)


def test_step_noise_is_gaussian_with_the_given_std_and_spares_stopped_samples():
    """FAT's omega: with a zero gradient one step moves a sample by the noise alone; a sample stopped by the
    early stop (wrong from its first iterate, tau 0) is not moved by it."""
    x, y = torch.full((64, 3, 16, 16), 0.5), torch.zeros(64, dtype=torch.long)
    y[:8] = 1  # misclassified at once
    torch.manual_seed(0)
    res = pgd(Flat(), x, y, 0.3, steps=1, random_start=False, step_noise=0.01, early_stop_tau=0, final_check=False)
    moved = (res.x_adv - x)[8:]
    assert abs(float(moved.std()) - 0.01) < 5e-4 and abs(float(moved.mean())) < 5e-4
    assert torch.equal(res.x_adv[:8], x[:8])
    plain = pgd(Flat(), x, y, 0.3, steps=1, random_start=False, early_stop_tau=0, final_check=False)
    assert torch.equal(plain.x_adv, x)  # no noise by default


@pytest.mark.parametrize("noise, phrase", [(-0.1, "step_noise"), (2.0, "larger than 1"), (float("nan"), "finite")])
def test_step_noise_must_be_a_size(noise, phrase):
    x, y = _batch()
    with pytest.raises(ConfigError, match=phrase):
        pgd(Flat(), x, y % 4, 8 / 255, steps=1, step_noise=noise)


# --------------------------------------------------------------------------- targeted attacks and losses

@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_targeted_attack_moves_towards_target(digits_model, loss):
    net, ds = digits_model
    x, y = _digits_batch(ds)
    t = random_targets(y, 10, torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean_hit = (net(x).argmax(1) == t).float().mean()
    torch.manual_seed(0)
    res = pgd(net, x, y, 32 / 255, steps=10, target=t, loss=loss)
    with torch.no_grad():
        pred = net(res.x_adv).argmax(1)
    adv_hit = (pred == t).float().mean()
    assert adv_hit > clean_hit + 0.15, (clean_hit, adv_hit)
    assert torch.equal(res.correct, pred == y)  # `correct` is still about the true label
    assert torch.all((res.x_adv - x).abs().amax(dim=(1, 2, 3)) <= 32 / 255 + 1e-6)


@FEW
@given(num_classes=st.integers(2, 20), n=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_random_targets_never_the_true_label(num_classes, n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    t = random_targets(y, num_classes, g)
    assert t.shape == y.shape and t.dtype == y.dtype
    assert torch.all(t != y)
    assert torch.all((t >= 0) & (t < num_classes))


def test_random_targets_are_uniform_over_other_classes():
    y = torch.full((9000,), 3)
    t = random_targets(y, 10, torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=10)
    assert counts[3] == 0
    others = counts[torch.arange(10) != 3]
    assert torch.all((others > 850) & (others < 1150)), counts


@pytest.mark.parametrize("logits,labels,targeted,expected", [
    ([[1.0, 3.0, 2.0], [5.0, 0.0, -1.0]], [1, 0], False, [-1.0, -5.0]),
    ([[1.0, 3.0, 2.0], [5.0, 0.0, -1.0]], [0, 2], False, [2.0, 6.0]),
    ([[1.0, 3.0, 2.0], [5.0, 0.0, -1.0]], [1, 0], True, [1.0, 5.0]),
    ([[1.0, 3.0, 2.0], [5.0, 0.0, -1.0]], [2, 1], True, [-1.0, -5.0]),
    ([[2.0, 2.0, -7.0]], [0], False, [0.0]),  # a tie counts as zero margin
    ([[0.5, -1.5]], [1], True, [-2.0]),
])
def test_margin_loss_hand_computed(logits, labels, targeted, expected):
    out = margin_loss(torch.tensor(logits), torch.tensor(labels), targeted=targeted)
    assert torch.equal(out, torch.tensor(expected))


# --------------------------------------------------------------------------- monotonicity on a trained model

EPS_PIXELS = (0, 8, 16, 32, 64)
STEPS = (1, 5, 20)


@pytest.fixture(scope="module")
def robust_grid(digits_model):
    net, ds = digits_model
    grid, clean = {}, None
    for steps in STEPS:
        for e in EPS_PIXELS:
            torch.manual_seed(0)
            out = accuracy(net, ds.test, [AttackSpec(eps=e / 255, steps=steps)])
            (entry,) = out["attacks"].values()
            grid[steps, e] = round(entry["accuracy"] * out["n"])
            clean = round(out["clean"] * out["n"])
    return grid, clean, len(ds.test)


def test_trained_model_is_a_meaningful_target(robust_grid):
    grid, clean, n = robust_grid
    assert clean >= 0.9 * n
    for steps in STEPS:
        assert grid[steps, 0] == clean  # eps = 0 is no attack
        assert all(grid[steps, e] <= clean for e in EPS_PIXELS)
    assert grid[20, 64] < 0.2 * n


class _WrongThenRight(nn.Module):
    """Wrong on the first forward call (the clean check of `evaluate`), right on every later one."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        label = 0 if self.calls > 1 else 1
        return 5.0 * F.one_hot(torch.full((len(x),), label), 3).float() + self.w * x.flatten(1).sum(1, keepdim=True)


def test_evaluate_counts_robust_only_if_clean_correct():
    data = ImageSet(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.zeros(6, dtype=torch.long))
    out = accuracy(_WrongThenRight(), data, [AttackSpec(eps=8 / 255, steps=2)])
    assert out["clean"] == 0.0
    (entry,) = out["attacks"].values()
    assert entry["accuracy"] == 0.0  # the attack "fails", but the clean image was already wrong


TOL = 1  # samples (1/300 of the digits test set)


@pytest.mark.parametrize("steps", STEPS)
def test_accuracy_non_increasing_in_eps(robust_grid, steps):
    grid, _, _ = robust_grid
    accs = [grid[steps, e] for e in EPS_PIXELS]
    assert all(b <= a + TOL for a, b in zip(accs, accs[1:])), accs


@pytest.mark.parametrize("eps", EPS_PIXELS)
def test_accuracy_non_increasing_in_steps(robust_grid, eps):
    grid, _, _ = robust_grid
    accs = [grid[s, eps] for s in STEPS]
    assert all(b <= a + TOL for a, b in zip(accs, accs[1:])), accs


# --------------------------------------------------------------------------- stop at the first miss

class TaggedStub(nn.Module):
    """Like :class:`ScheduledStub`, but each sample is told apart by a tag pixel (``x[:, 0, 0, 0]``, which
    gets no gradient and so never moves without a random start) and counts its own forward calls: sample
    i is classified as its label on its calls 0..k_i-1, wrongly afterwards, whatever batch it is in."""

    def __init__(self, labels: torch.Tensor, k: torch.Tensor, num_classes: int = 4, slope: float = 1e-3):
        super().__init__()
        self.labels, self.k, self.c, self.slope = labels, k, num_classes, slope
        self.calls = torch.zeros(len(k), dtype=torch.long)
        self.rows_seen = 0

    def forward(self, x):
        ids = (x[:, 0, 0, 0].detach() * 100).round().long()
        labels, other = self.labels[ids], (self.labels[ids] + 1) % self.c
        pred = torch.where(self.k[ids] > self.calls[ids], labels, other)
        self.calls[ids] += 1
        self.rows_seen += len(ids)
        moving = x.clone()
        moving[:, 0, 0, 0] = 0  # the tag gets no gradient
        logits = 5.0 * F.one_hot(pred, self.c).float()
        return logits + self.slope * moving.flatten(1).sum(1, keepdim=True) * F.one_hot(other, self.c).float()


def _tagged(k: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = len(k)
    x = torch.full((n, 3, 4, 4), 0.5)
    x[:, 0, 0, 0] = torch.arange(n) / 100
    return x, torch.arange(n) % 4, torch.tensor(k)


@FEW
@given(k=st.lists(st.integers(0, 15), min_size=1, max_size=8), steps=st.integers(1, 12))
def test_stop_on_miss_ends_each_sample_at_its_first_miss(k, steps):
    """Same verdicts as the full attack; each sample is forwarded only until its first miss (or through the
    final check), and its x_adv is that iterate."""
    x, labels, k_t = _tagged(k)
    full = pgd(TaggedStub(labels, k_t), x, labels, 0.45, steps=steps, step_size=ALPHA, random_start=False)
    stub = TaggedStub(labels, k_t)
    res = pgd(stub, x, labels, 0.45, steps=steps, step_size=ALPHA, random_start=False, stop_on_miss=True)
    assert torch.equal(res.first_miss, full.first_miss)
    assert torch.equal(res.correct, k_t > steps) and torch.equal(res.robust, res.correct)
    assert torch.equal(res.kappa, torch.clamp(k_t, max=steps))
    assert res.logits is None and res.loss is None
    calls = torch.where(k_t < steps, k_t + 1, torch.full_like(k_t, steps + 1))  # the miss, or K steps + check
    assert torch.equal(stub.calls, calls) and stub.rows_seen == int(calls.sum())
    moved = (res.x_adv - x)[:, 1:]  # every pixel but the tag moved +ALPHA per applied step
    applied = torch.clamp(k_t, max=steps).to(x.dtype)
    assert torch.allclose(moved, applied.view(-1, 1, 1, 1).expand_as(moved) * ALPHA, atol=1e-6)


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_stop_on_miss_follows_the_full_attack_until_the_miss(digits_model, norm, eps):
    """On a real model (float64, so that batch size cannot change a rounding): survivors end where the full
    attack ends, and a sample that breaks stops at the full attack's first misclassified iterate."""
    import copy

    net, ds = digits_model
    net = copy.deepcopy(net).double()
    x, y = _digits_batch(ds, 96)
    x = x.double()
    torch.manual_seed(3)
    full = pgd(net, x, y, eps, steps=6, norm=norm)
    torch.manual_seed(3)
    res = pgd(net, x, y, eps, steps=6, norm=norm, stop_on_miss=True)
    assert torch.equal(res.first_miss, full.first_miss)
    assert torch.equal(res.correct, full.robust)
    assert 0 < int(res.correct.sum()) < len(y), "the test needs samples that break and samples that hold"
    held = res.correct
    torch.testing.assert_close(res.x_adv[held], full.x_adv[held], rtol=0, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(net(res.x_adv).argmax(1) == y, held)  # the returned iterate of a broken sample is wrong
    delta = (res.x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps + 1e-9).all()) and res.x_adv.min() >= 0 and res.x_adv.max() <= 1


def test_stop_on_miss_refuses_what_it_cannot_do(tiny_model):
    x, y = _batch(1)
    for kwargs in ({"restarts": 2}, {"target": (y + 1) % 10}, {"early_stop_tau": 1}):
        with pytest.raises(ValueError, match="stop_on_miss"):
            pgd(tiny_model, x, y, 0.1, steps=2, stop_on_miss=True, **kwargs)


def test_the_loop_timed_on_the_gpu_is_the_one_pgd_runs():
    """tests/test_cuda.py checks the kernel's loop for host syncs through ``_one_run`` with ``_run_settings``: the
    same iterates as :func:`pgd` from the same seed."""
    from iaat.attacks.pgd import _as_radius, _one_run, _run_settings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 10)).eval()
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6)
    torch.manual_seed(1)
    want = pgd(model, x, y, 8 / 255, steps=5, step_size=2 / 255, final_check=False)
    torch.manual_seed(1)
    x_adv, kappa, first_miss = _one_run(model, x, y, _as_radius(8 / 255, 6, x), _as_radius(2 / 255, 6, x), None, None,
                                        _run_settings("cpu", steps=5))
    assert torch.equal(x_adv, want.x_adv) and torch.equal(kappa, want.kappa)
    assert torch.equal(first_miss, want.first_miss)


def test_steps_given_as_a_0d_tensor_or_numpy_int_are_taken_as_the_number(tiny_model):
    """README: NumPy scalars and 0-d tensors are taken as numbers; PGD checks steps when built, like eps."""
    import numpy as np

    import iaat

    x, y = _batch()
    for steps in (torch.tensor(2), np.int64(2)):
        assert pgd(tiny_model, x, y, 8 / 255, steps=steps).steps == 2
        attack = iaat.PGD(tiny_model, eps=8 / 255, steps=steps)
        assert attack.steps == 2 and type(attack.steps) is int and attack(x, y).shape == x.shape
    for bad in (torch.tensor(2.5), -1, torch.tensor([2, 3])):
        with pytest.raises(ConfigError, match="steps must be a whole number >= 0"):
            iaat.PGD(tiny_model, eps=8 / 255, steps=bad)
        with pytest.raises(ConfigError, match="steps must be a whole number >= 0"):
            pgd(tiny_model, x, y, 8 / 255, steps=bad)


@pytest.mark.parametrize("loss, got", [
    (lambda logits, y: logits, r"got shape \(8, 10\)"),
    (lambda logits, y: F.cross_entropy(logits, y), r"got shape \(\)"),
    (lambda logits, y: 1.0, "got a float")])
def test_a_loss_function_of_the_wrong_shape_is_refused(tiny_model, loss, got):
    x, y = _batch()
    for steps in (3, 0):  # the first step's objective; with no step, the final check's
        with pytest.raises(ConfigError, match=r"a loss function must return one value per sample, shape \(8,\), " + got):
            pgd(tiny_model, x, y, 8 / 255, steps=steps, loss=loss)
